"""Message headers and the check every received message passes before it is mixed.

A message on the wire is a header plus one payload: every tensor's raw bytes, concatenated in name
order. The header names the sender (client id), the round, and each tensor's name, shape and dtype.
A receiver checks it against its *own* message of the same round (all clients' messages share names,
shapes and dtypes) and against what it expects (who, which round) before anything is mixed:

- wrong names, shapes or dtypes, or a payload whose size disagrees with the header;
- a non-finite value in any floating tensor (NaN or inf);
- a stale (or future) round, or a sender other than the neighbour it came from;
- where the transport binds messages to a run and a receiver (the swarm does): a message of another run
  (its config fingerprint differs) or addressed to another client, so a replayed message is named.

Any of these raises :class:`MessageRejected`, whose one-line message names the sender and the round; the
caller logs it and treats the edge as failed for that round. Used by the swarm runtime; the header and
:func:`check_finite` are transport-neutral, so torch.distributed can use them as well.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from declora.errors import PeerError
from declora.types import Message

HEADER_VERSION = 1


class MessageRejected(PeerError):
    """A received message failed its checks; never mixed in. Names the sender and the round.

    Attributes:
        sender: the client id the message claims to come from (or the expected one).
        round: the round of the exchange.
        reason: what was wrong, in a few words.
    """

    def __init__(self, sender: Any, round_: int, reason: str) -> None:
        self.sender, self.round, self.reason = sender, round_, reason
        super().__init__(f"dropped the message of client {sender} in round {round_}: {reason}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_header(
    message: Message, sender: int, round_: int, run: str | None = None, receiver: int | None = None
) -> dict[str, Any]:
    """The header of ``message``: sender, round, and each tensor's name, shape and dtype (name order);
    with ``run`` (a config fingerprint) and ``receiver``, the message is bound to them as well."""
    names = sorted(message)
    header = {
        "v": HEADER_VERSION,
        "sender": int(sender),
        "round": int(round_),
        "names": names,
        "shapes": [list(message[n].shape) for n in names],
        "dtypes": [_dtype_name(message[n].dtype) for n in names],
    }
    if run is not None:
        header["run"] = run
    if receiver is not None:
        header["to"] = int(receiver)
    return header


def encode(message: Message) -> bytes:
    """Every tensor's raw bytes, in name order (the header describes how to cut them apart)."""
    return b"".join(
        message[n].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for n in sorted(message)
    )


def check_finite(state: Message) -> list[str]:
    """Names of the floating tensors of ``state`` that hold a NaN or an infinity (empty = all finite)."""
    return [n for n in sorted(state) if state[n].is_floating_point() and not bool(torch.isfinite(state[n]).all())]


def receive(
    header: dict[str, Any],
    payload: bytes,
    like: Message,
    sender: int,
    round_: int,
    run: str | None = None,
    receiver: int | None = None,
) -> Message:
    """Check a received message against what is expected and return its tensors.

    Args:
        header: the parsed header.
        payload: the raw bytes that came with it.
        like: the receiver's own message of this round (names, shapes, dtypes and device to match).
        sender: the client id the message must come from.
        round_: the round it must belong to.
        run: if given, the run fingerprint the message must carry.
        receiver: if given, the client id the message must be addressed to.

    Raises:
        MessageRejected: naming the sender and the round, for any mismatch or non-finite value.
    """
    claimed = header.get("sender")
    if claimed != sender:
        raise MessageRejected(sender, round_, f"it claims to come from client {claimed}")
    if header.get("round") != round_:
        raise MessageRejected(sender, round_, f"stale or future round {header.get('round')} (expected {round_})")
    if run is not None and header.get("run") != run:
        raise MessageRejected(sender, round_, f"a message of another run ({header.get('run')}, this run is {run})")
    if receiver is not None and header.get("to") != receiver:
        raise MessageRejected(sender, round_, f"addressed to client {header.get('to')}, not {receiver}")
    expected = make_header(like, sender, round_)
    for key in ("names", "shapes", "dtypes"):
        if header.get(key) != expected[key]:
            got, want = header.get(key), expected[key]
            diff = next((f"{a} != {b}" for a, b in zip(got or [], want, strict=False) if a != b), f"{got} != {want}")
            raise MessageRejected(sender, round_, f"wrong tensor {key} ({str(diff)[:120]})")
    sizes = [math.prod(like[n].shape) * like[n].element_size() for n in expected["names"]]
    if len(payload) != sum(sizes):
        raise MessageRejected(sender, round_, f"payload of {len(payload)} bytes, the header describes {sum(sizes)}")
    out: Message = {}
    offset = 0
    for name, size in zip(expected["names"], sizes, strict=True):
        ref = like[name]
        raw = np.frombuffer(payload, dtype=np.uint8, count=size, offset=offset).copy()
        out[name] = torch.from_numpy(raw).view(ref.dtype).reshape(ref.shape).to(ref.device)
        offset += size
    bad = check_finite(out)
    if bad:
        raise MessageRejected(sender, round_, f"non-finite values in {', '.join(bad[:3])}")
    return out
