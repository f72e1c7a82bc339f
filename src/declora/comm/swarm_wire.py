"""The swarm's request framing on a raw libp2p stream, with every size bounded before it is read.

A request or a response is one frame: a 4-byte header length, a JSON header (at most
:data:`MAX_HEADER` bytes), an 8-byte payload length and the payload. The receiver reads the lengths
first and refuses a frame whose header is too big, or whose payload is not exactly the size it expects
(its own message's size for an exchange, nothing for a commit), *before* reading the rest: a stranger
cannot make a peer buffer a 100 MB request. The handler learns the remote's authenticated peer ID from
the stream itself, so the allowlist is checked before a single byte of the request is read.

hivemind's protobuf handlers read the whole request before the handler runs; that is why the swarm uses
:meth:`hivemind.p2p.P2P.add_binary_stream_handler` and this framing instead.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

MAX_HEADER = 64 * 1024  # a header names every tensor: a few KB for the largest adapters
REFUSED = "refused"  # header key of a refusal: {"refused": "why"}


class FrameError(ValueError):
    """A frame that breaks the framing rules (too big, malformed): the stream is dropped."""


async def write_frame(writer: asyncio.StreamWriter, header: dict[str, Any], payload: bytes = b"") -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    writer.write(len(raw).to_bytes(4, "big") + raw + len(payload).to_bytes(8, "big"))
    view = memoryview(payload)
    for offset in range(0, len(view), 1 << 16):
        writer.write(view[offset : offset + (1 << 16)])
    await writer.drain()


async def read_header(reader: asyncio.StreamReader) -> tuple[dict[str, Any], int]:
    """The next frame's header and its announced payload length (the payload itself is not read yet)."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_HEADER:
        raise FrameError(f"a header of {size} bytes (at most {MAX_HEADER})")
    try:
        header = json.loads((await reader.readexactly(size)).decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise FrameError(f"malformed header ({err})") from None
    if not isinstance(header, dict):
        raise FrameError("malformed header (not an object)")
    return header, int.from_bytes(await reader.readexactly(8), "big")


async def read_payload(reader: asyncio.StreamReader, announced: int, expected: int) -> bytes:
    """Read a payload of ``announced`` bytes if that is exactly ``expected``; otherwise refuse unread."""
    if announced != expected:
        raise FrameError(f"a payload of {announced} bytes where {expected} are expected")
    return await reader.readexactly(announced) if announced else b""


async def read_frame(reader: asyncio.StreamReader, expected: int) -> tuple[dict[str, Any], bytes]:
    """A whole frame (a response): its payload must be exactly ``expected`` bytes, or empty (a refusal)."""
    header, announced = await read_header(reader)
    if announced == 0:
        return header, b""
    return header, await read_payload(reader, announced, expected)


def close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except Exception:  # noqa: BLE001 - the stream may already be gone
        pass
