"""A loopback TCP proxy for fault injection: cut, black-hole, delay, throttle, drop one reply.

It runs its own asyncio loop in a daemon thread, so synchronous tests and real
subprocesses can sit on either side. Every control method is thread-safe.

- `cut()`: reset every open connection now (both sides see the close); new ones work.
- `refuse(True)`: new connections are closed at once (the peer is "down").
- `blackhole(True)`: bytes are swallowed both ways and connections stay open (a dead
  link neither side is told about: half-open detection); new connections are accepted
  and swallowed too.
- `delay_s`: each chunk waits this long before it is forwarded (both ways).
- `throttle_bps`: server-to-client bytes per second (a slow link), with small reads so
  the kernel buffers stay what they are.
- `drop_reply_after(pattern)`: the next client chunk containing `pattern` is forwarded,
  then that connection is cut before any reply gets back (a reply lost after the server
  ran the request). Returns an Event set when it fired.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    mute: bool = False  # replies are swallowed (a request whose reply is being dropped)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.delay_s = 0.0
        self.throttle_bps = 0
        self.connections_total = 0
        self._refuse = False
        self._blackhole = False
        self._drop: tuple[bytes, threading.Event] | None = None
        self._conns: set[_Conn] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> int:
        self._thread.start()
        self.port = self._call(self._listen())
        return self.port

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- controls ----------------------------------------------------------------------
    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._cut_all)

    def refuse(self, on: bool) -> None:
        self._refuse = on
        if on:
            self.cut()

    def blackhole(self, on: bool) -> None:
        self._blackhole = on

    def drop_reply_after(self, pattern: bytes) -> threading.Event:
        fired = threading.Event()
        self._drop = (pattern, fired)
        return fired

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # -- internals ---------------------------------------------------------------------
    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        self._cut_all()
        if self._server is not None:
            self._server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _cut_all(self) -> None:
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse:
            writer.transport.abort()
            return
        self.connections_total += 1
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            if self._blackhole:
                while self._blackhole and await reader.read(65536):
                    pass
                if self._blackhole:
                    return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            conn.upstream = up_writer
            up = asyncio.create_task(self._pump(reader, up_writer, conn, upstream=True))
            down = asyncio.create_task(self._pump(up_reader, writer, conn, upstream=False))
            conn.tasks = [up, down]
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            conn.close()
            self._conns.discard(conn)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: _Conn,
        *,
        upstream: bool,
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                size = 4096 if (self.throttle_bps and not upstream) else 65536
                chunk = await reader.read(size)
                if not chunk:
                    return
                drop = self._drop
                if upstream and drop is not None and drop[0] in chunk:
                    self._drop = None
                    conn.mute = True  # nothing the server answers gets back
                    writer.write(chunk)
                    await writer.drain()
                    await asyncio.sleep(0.05)  # let the server run the request
                    drop[1].set()
                    conn.close()
                    return
                if self._blackhole or (conn.mute and not upstream):
                    continue
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if self.throttle_bps and not upstream:
                    await asyncio.sleep(len(chunk) / self.throttle_bps)
                writer.write(chunk)
                await writer.drain()
