"""A fault-injecting TCP proxy for HTTP (S3) traffic on loopback, run in a background thread.

    proxy = FaultProxy("127.0.0.1", seaweedfs_port).start()
    proxy.add(Fault("503", method="PUT", times=2))      # the next two PUTs answer 503 SlowDown
    ... point LAWTUNE_S3_ENDPOINT_URL at proxy.endpoint ...
    proxy.stop()

Each request travels on its own connection (the proxy rewrites ``Connection`` to ``close``),
so a fault hits exactly the request it matched. Faults:

- ``503`` / ``500`` / ``403``: answer with an S3 XML error (``SlowDown`` / ``InternalError`` /
  ``ExpiredToken``) instead of forwarding.
- ``reset-upload``: forward the request head and ``after`` bytes of its body, then reset both sides.
- ``reset-download``: forward the request, relay ``after`` bytes of the response, then reset.
- ``stall``: accept the request and send nothing back for ``seconds`` (past the client's read timeout).
- ``lose-response``: forward the whole request and let the store answer it (so it is applied),
  then reset the client's connection instead of relaying the answer.
- ``refuse``: reset the connection as soon as the request head arrived (a store that is down).
- ``header_contains`` narrows a fault to requests with that header text (``Range: bytes=8388608-``).

``FaultProxy(..., keep_alive=True)`` instead relays bytes as they come, connections stay open
and the client pools them (no per-request faults then); ``drop_connections("reset")`` resets
every open one, as a load balancer's idle timeout does, and ``drop_connections("blackhole")``
keeps them open but relays nothing more, as a NAT that forgot them does.

A real network would do these to us; SeaweedFS behind the proxy is real.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class Fault:
    kind: str  # 503 | 500 | 403 | reset-upload | reset-download | stall | lose-response | refuse
    method: str | None = None  # match on the HTTP method (None: any)
    path_contains: str = ""  # and on a substring of the request target
    header_contains: str = ""  # and on a substring of the request head's header lines
    times: int = 1  # how many matching requests it hits (then it is spent)
    after: int = 1024  # bytes let through before a reset
    seconds: float = 5.0  # how long a stall lasts
    hits: int = field(default=0, init=False)


_BODIES = {
    "503": (b"503 Slow Down", b"SlowDown", b"Please reduce your request rate."),
    "500": (b"500 Internal Server Error", b"InternalError", b"We encountered an internal error. Please try again."),
    "403": (b"403 Forbidden", b"ExpiredToken", b"The provided token has expired."),
}


class FaultProxy:
    def __init__(self, host: str, port: int, *, keep_alive: bool = False):
        self.upstream = (host, port)
        self.keep_alive = keep_alive
        self.connections = 0  # client connections accepted so far
        self._open: list[dict] = []  # keep-alive mode: the open connection pairs
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str]] = []  # (method, target, fault or "pass")
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop)
        self._server = fut.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def _close():
            self._server.close()
            for pair in list(self._open):  # keep-alive connections the client still pools
                pair["client"].transport.abort()
                pair["upstream"].transport.abort()
            await asyncio.sleep(0.1)  # their handlers run their cleanup on this loop before it stops

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def hits(self, kind: str | None = None) -> int:
        return sum(1 for _, _, f in self.log if f != "pass" and (kind is None or f == kind))

    def drop_connections(self, how: str) -> int:
        """Keep-alive mode: ``reset`` every open connection, or ``blackhole`` them; how many there were."""
        async def _drop():
            for pair in list(self._open):
                if how == "reset":
                    _reset(pair["client"])
                    _reset(pair["upstream"])
                else:
                    pair["blackhole"] = True
            return len(self._open)

        return asyncio.run_coroutine_threadsafe(_drop(), self._loop).result(10)

    def _pick(self, method: str, target: str, head: bytes = b"") -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.hits < fault.times and (fault.method in (None, method)) and fault.path_contains in target \
                        and fault.header_contains.encode() in head:
                    fault.hits += 1
                    return fault
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.keep_alive:
            await self._relay(reader, writer)
            return
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.split(b"\r\n")
        method, target = (lines[0].decode("latin-1").split(" ") + ["", ""])[:2]
        kept = [ln for ln in lines[1:] if ln and not ln.lower().startswith(b"connection:")]
        head = b"\r\n".join([lines[0], *kept, b"Connection: close", b"", b""])
        fault = self._pick(method, target, head)
        self.log.append((method, target, fault.kind if fault else "pass"))
        if fault and fault.kind == "refuse":
            _reset(writer)
            return
        if fault and fault.kind in _BODIES:
            status, code, message = _BODIES[fault.kind]
            body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>" + code + b"</Code><Message>" + message + b"</Message></Error>"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await _drain_close(writer)
            return
        if fault and fault.kind == "stall":
            await asyncio.sleep(fault.seconds)
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        up_writer.write(head)
        if fault and fault.kind == "lose-response":
            # The whole request reaches the store and is applied; its answer never reaches the client.
            await _pipe_request(reader, up_writer, head)
            try:
                await asyncio.wait_for(up_reader.read(), 60)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
            _reset(writer)
            _reset(up_writer)
            return
        up_limit = fault.after if fault and fault.kind == "reset-upload" else None
        down_limit = fault.after if fault and fault.kind == "reset-download" else None
        upload = asyncio.ensure_future(_pipe(reader, up_writer, up_limit))
        download = asyncio.ensure_future(_pipe(up_reader, writer, down_limit))
        done, _ = await asyncio.wait({upload, download}, return_when=asyncio.FIRST_COMPLETED)
        if upload in done and upload.result() == "cut" or download in done and download.result() == "cut":
            for task in (upload, download):
                task.cancel()
            _reset(writer)
            _reset(up_writer)
            return
        await asyncio.wait({upload, download}, timeout=120)
        for task in (upload, download):
            task.cancel()
        for w in (writer, up_writer):
            await _drain_close(w)


    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        pair = {"client": writer, "upstream": up_writer, "blackhole": False}
        self._open.append(pair)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65536):
                    if not pair["blackhole"]:
                        dst.write(chunk)
                        await dst.drain()
            except (ConnectionError, OSError):
                pass

        try:
            await asyncio.wait({asyncio.ensure_future(pump(reader, up_writer)), asyncio.ensure_future(pump(up_reader, writer))},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._open.remove(pair)
            for w in (writer, up_writer):
                w.transport.abort()


async def _pipe_request(src: asyncio.StreamReader, dst: asyncio.StreamWriter, head: bytes) -> None:
    """Relay the request body that follows ``head`` (by its Content-Length), then nothing more."""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while length > 0:
        chunk = await src.read(min(65536, length))
        if not chunk:
            break
        dst.write(chunk)
        length -= len(chunk)
    await dst.drain()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None) -> str:
    sent = 0
    try:
        while True:
            chunk = await src.read(65536)
            if not chunk:
                if dst.can_write_eof():
                    dst.write_eof()
                return "eof"
            if limit is not None and sent + len(chunk) >= limit:
                dst.write(chunk[: max(0, limit - sent)])
                await dst.drain()
                return "cut"
            dst.write(chunk)
            sent += len(chunk)
            await dst.drain()
    except (ConnectionError, OSError):
        return "error"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a dropped connection looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


async def _drain_close(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass
