"""A batch that failed because of its content is stored entry by entry, so that only
the entry at fault is quarantined and the projector goes on with the next one."""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

from projections import quarantine
from projections.logs import LogReader
from projections.quarantine import UNSTORABLE, Quarantined
from projections.writer import Applied, Entry, Writer, entry_key

log = logging.getLogger("projections.isolation")


async def guarded(
    writer: Writer,
    reader: LogReader,
    stream: str,
    step: Coroutine[Any, Any, Applied],
    *,
    upto: str,
    refusals: bool,
) -> Applied:
    """Run one batch (`step`); when an entry's content fails it, store the entries up to
    `upto` one at a time. Failures no entry can cause propagate (the caller retries)."""
    try:
        return await step
    except Exception as exc:
        if not quarantine.blames_entry(exc):
            raise
        log.warning(
            "projector.batch.failed stream=%s error=%s; storing its entries one at a time",
            stream,
            quarantine.reason_of(exc),
        )
    return await one_by_one(writer, reader, stream, upto, refusals=refusals)


async def one_by_one(
    writer: Writer, reader: LogReader, stream: str, upto: str, *, refusals: bool
) -> Applied:
    """One bounded step from the stored position to `upto`, each entry in its own
    transaction; an entry that cannot be stored is quarantined in its place."""
    position = await writer.position(stream)
    gap = await reader.fetch(stream, position, "+", upto=upto)
    items: list[Entry | Quarantined] = [*gap.entries, *gap.bad]
    items.sort(key=lambda item: entry_key(item.entry_id))
    new = 0
    for item in items:
        if isinstance(item, Quarantined):
            applied = await writer.apply(stream, [], reader.fetch, refusals=refusals, bad=[item])
        else:
            try:
                applied = await writer.apply(stream, [item], reader.fetch, refusals=refusals)
            except Exception as exc:
                if not quarantine.blames_entry(exc):
                    raise
                held = Quarantined(
                    stream, item.entry_id, item.raw, UNSTORABLE, quarantine.reason_of(exc)
                )
                applied = await writer.apply(
                    stream, [], reader.fetch, refusals=refusals, bad=[held]
                )
        new += applied.new
        position = applied.position
    return Applied(new, position)
