"""The audit record of an input the gateway refused before admission (`stage="gateway"`).

Every refusal the gateway writes, whatever refused it (intake, cancels, handshakes,
admission, an ended session), is built here, so they all read alike in the audit.
"""

from __future__ import annotations

import hashlib
import time

from ledger.ids import new_event_id
from schemas.errors import ErrorObject
from schemas.events import Rejected

EXCERPT_CHARS = 512  # of the refused input, kept in the audit record


def refusal_event(
    actor: str,
    err: ErrorObject,
    *,
    edge_id: str | None = None,
    command_id: str | None = None,
    raw: bytes | None = None,
    excerpt: str = "",
) -> Rejected:
    """`raw`, the input as received, gives the record its digest and excerpt; a refused
    request or handshake without a body is described by `excerpt` instead."""
    if raw is not None:
        excerpt = raw[:EXCERPT_CHARS].decode("utf-8", "replace")
    return Rejected(
        event_id=new_event_id(),
        at=time.time_ns() // 1_000_000,
        command_id=command_id or "",
        edge_id=edge_id or "",
        actor=actor,
        error=err,
        stage="gateway",
        input_digest=hashlib.sha256(raw).hexdigest() if raw is not None else "",
        input_excerpt=excerpt,
    )
