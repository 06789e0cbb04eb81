"""`subscribe`: a reconnecting dashboard follows command ids again.

`{"type": "subscribe", "command_ids": [...]}` is answered with one `subscribed` frame
holding the current status of every id the user sent or may view; the others are
listed as `unknown` (whether they exist is not revealed). From then on the session
receives every later status of the known ones, as for the commands it sent itself.
"""

from __future__ import annotations

import asyncio

import msgspec

from gateway.follows import Follows
from gateway.sessions import DashboardSession
from ledger import lifecycle
from ledger.store import CommandRecord, Ledger
from schemas.events import Status
from schemas.messages import StatusUpdate, Subscribe, Subscribed, iso_ms

SUBSCRIBE_DECODER = msgspec.json.Decoder(Subscribe)


def _current(record: CommandRecord) -> StatusUpdate:
    last = record.events[-1] if record.events else None
    return StatusUpdate(
        command_id=record.command_id,
        status=record.status,
        at=iso_ms(last.at) if last is not None else "",
        edge_id=record.edge_id,
        error=getattr(last, "error", None),
        late=record.late,
        event_id=last.event_id if last is not None else None,
    )


async def subscribe(
    ledger: Ledger, follows: Follows, dash: DashboardSession, frame: Subscribe
) -> Subscribed:
    """Follow the ids `dash` may see and answer with their current statuses."""
    wanted = list(dict.fromkeys(frame.command_ids))
    # Follow first, read second: a transition between the two is forwarded, not lost.
    fresh = [cid for cid in wanted if cid not in dash.following]
    for cid in fresh:
        follows.follow(dash, cid)
    try:
        records = await asyncio.gather(*(ledger.lookup(cid) for cid in wanted))
    except BaseException:
        for cid in fresh:
            follows.unfollow(dash, cid)
        raise
    statuses: list[StatusUpdate] = []
    unknown: list[str] = []
    for cid, record in zip(wanted, records, strict=True):
        mine = record is not None and record.command.actor == dash.user.actor
        if record is None or not (mine or dash.may_view(record.edge_id)):
            unknown.append(cid)
            follows.unfollow(dash, cid)
            continue
        statuses.append(_current(record))
        if Status(record.status) in lifecycle.TERMINAL:
            follows.unfollow(dash, cid)  # nothing more will come
    return Subscribed(statuses=statuses, unknown=unknown)


def is_subscribe(raw: bytes) -> bool:
    """A control frame whose `type` is `subscribe` (checked after `is_control_frame`)."""
    try:
        return _KIND.decode(raw).type == "subscribe"
    except msgspec.DecodeError:
        return False


class _Kind(msgspec.Struct):
    type: object = None


_KIND = msgspec.json.Decoder(_Kind)
