"""Raw HTTP/1.1 over a socket, for requests no HTTP client library would send."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field


@dataclass
class RawReply:
    status: int | None  # None: no status line before the connection closed or the timeout
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names, last value wins
    body: bytes = b""
    raw: bytes = b""
    closed: bool = False  # the proxy closed the connection
    timed_out: bool = False  # nothing complete arrived in time
    elapsed: float = 0.0


def parse_reply(data: bytes) -> tuple[int | None, dict[str, str], bytes, bool]:
    """(status, headers, body, complete) of the first response in `data`."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None, {}, b"", False
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        return None, {}, b"", False
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if "content-length" in headers:
        n = int(headers["content-length"])
        return status, headers, rest[:n], len(rest) >= n
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return status, headers, rest, rest.endswith(b"0\r\n\r\n")
    return status, headers, rest, False  # read to EOF


async def exchange(addr: str, data: bytes, *, timeout: float = 3.0, half_close: bool = False) -> RawReply:
    """Send `data` on a fresh connection; read the first response until complete, EOF or `timeout`."""
    host, port = addr.removeprefix("http://").rsplit(":", 1)
    began = time.monotonic()
    reader, writer = await asyncio.open_connection(host, int(port))
    got = b""
    reply = RawReply(None)
    try:
        with contextlib.suppress(OSError):
            writer.write(data)
            await writer.drain()
            if half_close:
                writer.write_eof()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        chunk = await reader.read(65536)
                    except ConnectionError:
                        chunk = b""
                    if not chunk:
                        reply.closed = True
                        break
                    got += chunk
                    if parse_reply(got)[3]:
                        break
        except TimeoutError:
            reply.timed_out = True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    reply.status, reply.headers, reply.body, _ = parse_reply(got)
    reply.raw = got
    reply.elapsed = time.monotonic() - began
    return reply


def exchange_sync(addr: str, data: bytes, *, timeout: float = 1.0, quiet: float = 0.3) -> RawReply:
    """Blocking twin of `exchange` for hypothesis: if nothing arrives within `quiet` seconds, the
    write side is shut (the message may be legitimately incomplete), then up to `timeout` more."""
    host, port = addr.removeprefix("http://").rsplit(":", 1)
    began = time.monotonic()
    reply = RawReply(None)
    got = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        s.settimeout(quiet)
        shut = False
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if shut:
                    reply.timed_out = True
                    break
                shut = True
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                s.settimeout(timeout)
                continue
            except OSError:
                chunk = b""
            if not chunk:
                reply.closed = True
                break
            got += chunk
            if parse_reply(got)[3]:
                break
    reply.status, reply.headers, reply.body, _ = parse_reply(got)
    reply.raw = got
    reply.elapsed = time.monotonic() - began
    return reply
