"""An asyncio TCP proxy for fault injection (no toxiproxy here): put it between a client
and a server and break the link on purpose.

Modes: `cut()` resets every connection and refuses new ones until `restore()`;
`blackhole()` keeps the sockets but drops every byte; `delay(s)` holds each chunk back;
`throttle(bytes_per_s)` paces the server -> client direction; `drop_reply_after(marker)`
forwards the next request chunk that contains `marker`, swallows the server's reply to
it and resets that connection (a reply lost after the server acted on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class NetProxy:
    target_host: str
    target_port: int
    host: str = "127.0.0.1"
    port: int = 0
    delay_s: float = 0.0
    throttle_bytes_per_s: int = 0
    receive_buffer_bytes: int = 0  # SO_RCVBUF of the client-facing sockets (0: kernel's)
    dropped_replies: int = 0
    _cut: bool = False
    _blackhole: bool = False
    _marker: bytes | None = None
    _server: asyncio.Server | None = None
    _links: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    reply_dropped: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    async def start(self) -> NetProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.receive_buffer_bytes:
            # Inherited by accepted sockets: a slow link must push back on the sender
            # instead of vanishing into megabytes of autotuned kernel buffer.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer_bytes)
        listener.bind((self.host, self.port))
        self._server = await asyncio.start_server(self._accept, sock=listener)
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        return self

    def start_in_thread(self) -> NetProxy:
        """Serve from a thread of its own, so blocking test code cannot stall the proxy."""
        ready = threading.Event()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="netproxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    # -- modes ---------------------------------------------------------------------------
    def cut(self) -> None:
        self._cut = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._reset_all)

    def blackhole(self) -> None:
        self._blackhole = True

    def delay(self, seconds: float) -> None:
        self.delay_s = seconds

    def throttle(self, bytes_per_s: int) -> None:
        self.throttle_bytes_per_s = bytes_per_s

    def drop_reply_after(self, marker: bytes) -> None:
        self.reply_dropped.clear()
        self._marker = marker

    def restore(self) -> None:
        self._cut = self._blackhole = False
        self.delay_s, self.throttle_bytes_per_s, self._marker = 0.0, 0, None

    # -- plumbing ------------------------------------------------------------------------
    def _reset_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _reset(writer)
            return
        self._writers |= {writer, up_writer}
        armed = asyncio.Event()  # a request with the marker went up: drop its reply
        up = asyncio.create_task(self._pump(reader, up_writer, armed, upstream=True))
        down = asyncio.create_task(self._pump(up_reader, writer, armed, upstream=False))
        self._links |= {up, down}
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        self._links -= {up, down}
        for w in (writer, up_writer):
            self._writers.discard(w)
            _reset(w)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        armed: asyncio.Event,
        *,
        upstream: bool,
    ) -> None:
        while True:
            chunk = await reader.read(65536 if not self.throttle_bytes_per_s else 4096)
            if not chunk:
                return
            if self._blackhole:
                continue
            if upstream and self._marker is not None and self._marker in chunk:
                self._marker = None
                armed.set()
            elif not upstream and armed.is_set():
                self.dropped_replies += 1
                self.reply_dropped.set()
                return  # swallow the reply and end the link: the client sees a reset
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if not upstream and self.throttle_bytes_per_s:
                await asyncio.sleep(len(chunk) / self.throttle_bytes_per_s)
            writer.write(chunk)
            await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), like a crashed peer or a cut cable."""
    with contextlib.suppress(Exception):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
