"""Test helper: run ``declora train`` in N local processes, one per rank, with a file:// rendezvous.

Usage: ``python tests/rank_launcher.py N LOGDIR [train args...]``

The heavy imports (torch, transformers, peft, declora) happen once, here; then one child per rank is
forked (``RANK``/``WORLD_SIZE`` set, stdout+stderr in ``LOGDIR/rank_<r>.log``). Each child's exit
status and end time go to ``LOGDIR/rank_<r>.rc`` as ``"<status> <unix time>"``, its pid to
``LOGDIR/rank_<r>.pid``. With ``DECLORA_TEST_AGENT=1`` it acts as torchrun's agent does: as soon as one
rank exits with a non-zero status, every other rank gets SIGTERM. This stands in for
torchrun on a 2-core test machine where importing the stack four times over costs most of a minute.
The caller starts it in a new session and kills the whole process group when done.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

import peft  # noqa: F401 - imported before forking, so children start warm
import transformers  # noqa: F401

import declora.comm.distributed  # noqa: F401
import declora.training.trainer  # noqa: F401
from declora.cli import app as cli


def child(rank: int, world: int, logdir: str, args: list[str]) -> int:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    fd = os.open(os.path.join(logdir, f"rank_{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        return cli.main(["train", *args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report anything, exit non-zero
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main() -> None:
    world, logdir, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    ranks: dict[int, int] = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            os._exit(child(rank, world, logdir, args))
        ranks[pid] = rank
        with open(os.path.join(logdir, f"rank_{rank}.pid"), "w") as f:
            f.write(f"{pid}\n")
    agent = os.environ.get("DECLORA_TEST_AGENT") == "1"
    while ranks:
        pid, status = os.wait()
        rank = ranks.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        rc = os.path.join(logdir, f"rank_{rank}.rc")
        with open(rc + ".tmp", "w") as f:  # then renamed: the caller counts rc files and may kill us at once
            f.write(f"{code} {time.time()}\n")
        os.replace(rc + ".tmp", rc)
        if agent and code != 0:  # torchrun's agent: one worker failed -> SIGTERM the others
            agent = False
            for other in ranks:
                os.kill(other, signal.SIGTERM)


if __name__ == "__main__":
    main()
