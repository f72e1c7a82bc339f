"""runtime=distributed: the message header check, and naming a failed peer when the launcher stops us.

**Header.** Before its payload, every rank sends each neighbour a fixed-size header (6 int64:
magic, sender rank, round, payload bytes, and a 63-bit hash of the tensors' names, shapes and dtypes
as :func:`declora.comm.messages.make_header` lists them). Headers always have the same size, so
receiving one can never overrun a buffer; the payload is only received once its header matched what
this rank expects (its own message of the same round), so a message of the wrong size never reaches
gloo (which aborts the process on a size mismatch). After the payload arrives, every floating tensor
must be finite. A failed check raises :class:`~declora.comm.messages.MessageRejected` naming the
sender rank and the round; runtime=distributed then **stops the run** (one ``PeerError`` line, exit 1):
nothing of the bad message is mixed and no checkpoint of the round is written. (runtime=swarm instead
drops the edge for the round and goes on; a synchronous torch.distributed job has no way for both ends
of an edge to agree on dropping it without one more exchange per round.)

**SIGTERM.** torchrun's agent SIGTERMs every surviving rank as soon as one rank exits, usually while
the survivors are still in their local steps, before they could notice anything. :func:`report_sigterm`
makes a rank print one line naming the round and, when a peer on this machine has exited, that peer's
rank, then exit at once. A rank that stops on purpose (it noticed a failure, or got SIGTERM) first
leaves a marker file (:func:`mark_stopping`), so the ranks stopped *because of* the failure are never
mistaken for the failed one. A thread waits for the signal (it is blocked in every other thread started
afterwards), so the line comes even while the main thread is inside a blocking gloo call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable

import torch

from declora.comm.messages import Message, MessageRejected, make_header
from declora.errors import PeerError

HEADER_LEN = 6
MAGIC = 0x0DEC_0A11_0001  # declora, wire header version 1
SIGTERM_EXIT = 128 + signal.SIGTERM


class PeerFailure(PeerError):
    """A peer stopped answering; the message names it (when known), the round and the operation.

    A :class:`~declora.errors.PeerError` (so a RuntimeError): the CLI prints it as one line, exit 1.

    Attributes:
        peer: rank of the missing peer, or None when no rank could be identified.
        round: the training round in which the failure was noticed.
        rank: the rank that noticed it.
    """

    def __init__(self, peer: int | None, round_: int, rank: int, what: str, detail: str) -> None:
        self.peer, self.round, self.rank = peer, round_, rank
        who = f"peer rank {peer}" if peer is not None else "a peer (rank unknown)"
        detail = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", " ".join(detail.split()))  # drop gloo's source path
        detail = detail.split(" This is typically")[0][:160]
        when = f"at round {round_}" if round_ else "at start-up"
        super().__init__(f"rank {rank}: {who} is missing {when} ({what}: {detail})")


class BadMessage(PeerError):
    """A neighbour's message failed its checks (:mod:`declora.comm.dist_safety`); the run stops.

    Attributes: ``peer`` (the sender rank), ``round``, ``rank`` (the receiver), as for :class:`PeerFailure`.
    """

    def __init__(self, peer: int, round_: int, rank: int, reason: str, reporter: int | None = None) -> None:
        self.peer, self.round, self.rank = peer, round_, rank
        if reporter is None:
            tail = "nothing of it was mixed; runtime=distributed stops the run on a bad message"
            super().__init__(f"rank {rank}: peer rank {peer} sent a bad message at round {round_}: {reason}; {tail}")
        else:
            super().__init__(
                f"rank {rank}: peer rank {peer} sent a bad message at round {round_} (reported by rank {reporter}: "
                f"{reason}); stopping"
            )


def spec_hash(message: Message) -> int:
    """A 63-bit hash of ``message``'s names, shapes and dtypes (stable across processes and machines)."""
    spec = make_header(message, 0, 0)
    text = json.dumps([spec["names"], spec["shapes"], spec["dtypes"]], separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def wire_header(message: Message, sender: int, round_: int, nbytes: int) -> torch.Tensor:
    """The fixed-size header that precedes ``message``'s payload of ``nbytes`` bytes."""
    return torch.tensor([MAGIC, sender, round_, nbytes, spec_hash(message), 0], dtype=torch.int64)


def check_header(header: torch.Tensor, like: Message, nbytes: int, sender: int, round_: int) -> None:
    """Check a neighbour's header against this rank's own message of the round (``like``, ``nbytes``).

    Raises:
        MessageRejected: naming ``sender`` and ``round_``: not a declora header, another sender or round,
            a payload of another size, or other tensor names, shapes or dtypes.
    """
    magic, claimed, rnd, size, spec, _ = (int(v) for v in header.tolist())
    if magic != MAGIC:
        raise MessageRejected(sender, round_, "malformed header (not a declora message)")
    if claimed != sender:
        raise MessageRejected(sender, round_, f"it claims to come from client {claimed}")
    if rnd != round_:
        raise MessageRejected(sender, round_, f"stale or future round {rnd} (expected {round_})")
    if size != nbytes:
        raise MessageRejected(sender, round_, f"payload of {size} bytes, expected {nbytes}")
    if spec != spec_hash(like):
        raise MessageRejected(sender, round_, "wrong tensor names, shapes or dtypes")


# -- which local peer died ------------------------------------------------------------------------------
def this_process() -> str:
    """``"<host> <pid>"``: published in the rendezvous store so that peers on this machine can check us."""
    return f"{socket.gethostname()} {os.getpid()}"


def _marker(pid: int | str) -> str:
    return os.path.join(tempfile.gettempdir(), "declora-stopping", f"{socket.gethostname()}-{pid}")


def mark_stopping(clear: bool = False) -> None:
    """Leave (or with ``clear``, remove a stale) marker that this process stops on purpose (best effort)."""
    path = _marker(os.getpid())
    try:
        if clear:
            if os.path.exists(path):
                os.remove(path)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="ascii") as f:
            f.write("stopping\n")
    except OSError:
        pass


def stopped_on_purpose(where: str) -> bool:
    """Whether the process ``where`` (a :func:`this_process` string) on this machine left a stop marker.

    False for a process on another machine (it cannot be checked from here).
    """
    name, _, pid = where.rpartition(" ")
    return name == socket.gethostname() and pid.isdigit() and os.path.exists(_marker(pid))


def exited(peers: dict[int, str]) -> list[int]:
    """Ranks in ``peers`` (rank -> :func:`this_process` string) on this machine whose process has exited.

    A zombie (exited, not yet reaped by the launcher) counts as exited; a process that left a
    :func:`mark_stopping` marker does not (it stopped because of a failure, it is not the failure).
    Peers on other machines are never listed: they cannot be checked from here.
    """
    host = socket.gethostname()
    dead = []
    for rank, where in sorted(peers.items()):
        name, _, pid = where.rpartition(" ")
        if name != host or not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            state = "gone"  # already reaped
        # the marker is looked at only once the process is known to be dead: it is written before the
        # process exits, so it is there by now if it ever will be (looking first left a window in which a
        # peer stopping on purpose wrote its marker and exited between the two looks, and was blamed)
        if state in ("Z", "X", "gone") and not stopped_on_purpose(where):
            dead.append(rank)
    return dead


def sigterm_line(rank: int, round_: int, processes: dict[int, str], dead: list[int] | None = None) -> str:
    """The line of a rank stopped by SIGTERM: names a peer on this machine that exited, if there is one.

    ``dead``: the :func:`exited` snapshot to use (so the line and the exit code agree); None = look now.
    """
    dead = exited(processes) if dead is None else dead
    when = f"at round {round_}" if round_ else "at start-up"
    if dead:
        return (
            f"rank {rank}: peer rank {', '.join(map(str, dead))} is missing {when} (its process exited; "
            "the launcher stopped this rank with SIGTERM)"
        )
    return (
        f"rank {rank}: stopped by SIGTERM {when}; no peer on this machine has exited (a peer on another "
        "machine failed, or the run was cancelled: see the launcher's log)"
    )


def report_sigterm(describe: Callable[[], str], exit_code: Callable[[], int]) -> bool:
    """On SIGTERM, write ``declora: error: <describe()>`` to stderr and exit with ``exit_code()``.

    Call before any thread is started (the process group's): SIGTERM is blocked in the calling thread,
    and so in every thread it starts later, and one daemon thread waits for it. Returns False (nothing
    installed) off the main thread or where ``signal.sigwait`` is missing.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "sigwait"):
        return False

    def respond() -> None:
        mark_stopping()  # before anything else: a peer that finds this process gone must know why
        try:
            line, code = "declora: error: " + " ".join(describe().split()), exit_code()
        except Exception as err:  # noqa: BLE001 - the line must come out whatever went wrong
            line, code = f"declora: error: stopped by SIGTERM ({err})", SIGTERM_EXIT
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
        os.write(2, (line + "\n").encode())
        os._exit(code)  # not sys.exit: the main thread may be inside a gloo call that never returns

    def wait() -> None:
        signal.sigwait({signal.SIGTERM})
        respond()

    # a thread started before this call (none on CPU; CUDA may have some) does not block SIGTERM: a signal
    # delivered to it runs this handler once the main thread is back in Python, instead of killing silently
    signal.signal(signal.SIGTERM, lambda *_: respond())
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=wait, name="declora-sigterm", daemon=True).start()
    return True
