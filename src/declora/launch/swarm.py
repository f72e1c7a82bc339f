"""``declora peer`` (one swarm peer), ``declora swarm`` (N local peers) and the swarm's assembled result.

``declora peer [--config F] swarm.client_id=I swarm.initial_peers=[MADDR] ...`` is ``declora train
runtime=swarm``: it prints this peer's multiaddr first (give it to the others), trains, and writes its own
run directory. Started again in the same ``out_dir`` after a crash, it resumes from its own last complete
checkpoint and rejoins the swarm at its current round.

``declora swarm --clients N [--out DIR] overrides`` tries a swarm on this machine: it makes an identity
key for each peer, an allowlist of their peer IDs (``DIR/allowlist.txt``), starts peer 0, then the others
with peer 0's address, each in its own process group (heavy imports are done once, then each peer is
forked), waits for all of them and assembles ``DIR/summary.json`` and ``DIR/adapters/average`` with
:func:`assemble`. ``--late I@R`` starts peer I only once peer 0 has finished round R-1, to try a
newcomer joining a running swarm.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from declora.config import Config, ConfigError, load_config
from declora.rundir import layout


def peer_config(config: str | None, overrides: list[str]) -> Config:
    """The config of one peer: ``runtime=swarm``, an ``out_dir`` per client, and resume after a crash."""
    cfg = load_config(config, ["runtime=swarm", *overrides])
    if cfg.out_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = load_config(
            config, ["runtime=swarm", *overrides, f"out_dir=runs/{stamp}-swarm-peer{cfg.swarm.client_id}"]
        )
    out = Path(cfg.out_dir)
    if cfg.resume is None and any(out.glob(f"{layout.CHECKPOINTS}/{layout.ROUND_GLOB}/{layout.MARKER}")):
        print(f"declora peer: {out} holds a checkpoint of this peer: resuming from it", file=sys.stderr, flush=True)
        cfg = load_config(config, ["runtime=swarm", *overrides, f"resume={out}"])
    return cfg


def run_peer(config: str | None, overrides: list[str]) -> dict[str, Any]:
    """Run one swarm peer to the end; returns its summary."""
    from declora.quiet import quiet_libraries
    from declora.training.trainer import run

    cfg = peer_config(config, overrides)
    quiet_libraries()
    return run(cfg)


def print_peer_id(config: str | None, overrides: list[str]) -> str:
    """``declora peer --print-id``: this peer's allowlist line ``PEER_ID CLIENT_ID`` (the identity key is
    created if it does not exist: at ``swarm.identity_path``, ``~`` expanded, or ``<out_dir>/swarm/identity.key``)."""
    from declora.comm.swarm_records import identity_file, peer_id_of

    cfg = load_config(config, ["runtime=swarm", *overrides, "swarm.open=true"])  # no allowlist yet: that is why
    sc = cfg.swarm
    if sc.identity_path is None and cfg.out_dir is None:
        raise ConfigError(
            "--print-id needs swarm.identity_path=FILE or out_dir=DIR: the same one the peer will be started with"
        )
    line = f"{peer_id_of(*identity_file(sc.identity_path, cfg.out_dir))} {sc.client_id}"
    print(line, flush=True)
    return line


# -- the local launcher --------------------------------------------------------------------------------------
def _fork_peer(i: int, folder: Path, config: str | None, overrides: list[str]) -> int:
    pid = os.fork()
    if pid:
        return pid
    os.setsid()  # its own process group: the peer and its p2p daemon die together
    fd = os.open(folder / layout.PEER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    code = 1
    try:
        run_peer(config, overrides)
        code = 0
    except ConfigError as err:
        print(f"declora: error: {err}", file=sys.stderr)
        code = 2
    except BaseException as err:  # noqa: BLE001 - report anything, exit non-zero
        code = getattr(err, "exit_code", 1)
        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def parse_late(specs: list[str] | None, clients: int) -> dict[int, int]:
    """``["4@2"]`` -> {4: 2}: peer 4 starts when the swarm is in round 2 (peer 0 cannot be late)."""
    late: dict[int, int] = {}
    for spec in specs or []:
        who, _, when = spec.partition("@")
        if not (who.isdigit() and when.isdigit() and 0 < int(who) < clients and int(when) >= 1):
            raise ConfigError(f"--late {spec}: use PEER@ROUND with 0 < PEER < {clients} and ROUND >= 1")
        if int(who) in late:
            raise ConfigError(f"--late {spec}: peer {who} is already late (--late {who}@{late[int(who)]}); give one")
        late[int(who)] = int(when)
    return late


def launch_swarm(
    clients: int,
    overrides: list[str],
    config: str | None = None,
    out: str | None = None,
    late: dict[int, int] | None = None,
) -> int:
    """Start ``clients`` local peers (see the module docstring); returns 0 iff every peer exited 0.

    Args:
        late: peer -> round: that peer is started only once peer 0 has finished the round before.
    """
    import peft  # noqa: F401 - imported once here, so forked peers start warm
    import transformers  # noqa: F401

    import declora.comm.swarm  # noqa: F401
    import declora.training.trainer  # noqa: F401
    from declora.comm.swarm_net import peer_id_of

    if clients < 1:
        raise ConfigError(f"--clients={clients} must be >= 1")
    base = Path(out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-swarm")
    cfg = load_config(config, ["runtime=swarm", f"train.clients={clients}", *overrides])  # fail before forking
    if cfg.train.clients != clients:
        raise ConfigError(f"--clients={clients} but train.clients={cfg.train.clients}: drop the override")
    base.mkdir(parents=True, exist_ok=True)
    ids = {i: peer_id_of(layout.swarm_dir(layout.peer_dir(base, i)) / layout.SWARM_IDENTITY) for i in range(clients)}
    allow = base / layout.SWARM_ALLOWLIST
    allow.write_text("".join(f"{p} {i}\n" for i, p in ids.items()))
    common = [f"train.clients={clients}", f"swarm.allowlist_file={allow}", *overrides]
    pids: dict[int, int] = {}
    first = ""
    late = late or {}
    try:
        for i in [*(i for i in range(clients) if i not in late), *sorted(late, key=late.get)]:
            folder = layout.peer_dir(base, i)
            if i in late and not _wait_round(layout.peer_dir(base, 0), pids[0], late[i] - 1):
                continue  # the swarm ended first: this peer never starts
            if i in late:
                print(f"declora swarm: starting peer {i} at round {late[i]}", file=sys.stderr, flush=True)
            extra = [
                f"swarm.client_id={i}",
                f"out_dir={folder}",
                f"swarm.identity_path={layout.swarm_dir(folder) / layout.SWARM_IDENTITY}",
            ]
            if i > 0:
                extra.append(f"swarm.initial_peers=[{first}]")
            pids[i] = _fork_peer(i, folder, config, [*common, *extra])
            (folder / layout.PEER_PID).write_text(f"{pids[i]}\n")
            if i == 0:
                first = _wait_address(folder, pids[0], cfg.swarm.startup_timeout_s)
                print(f"declora swarm: peer 0 listens on {first}", file=sys.stderr, flush=True)
        codes = {i: None for i in range(clients)}
        for i, pid in pids.items():
            codes[i] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        for pid in pids.values():  # whatever happened, no peer outlives the launcher
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    summary = assemble(base, codes)
    print(json.dumps({k: summary[k] for k in ("final_accuracy", "averaged_over", "live_per_round", "exit_codes")}))
    return 0 if all(c == 0 for c in codes.values()) else 1


def _wait_round(folder: Path, pid: int, round_: int) -> bool:
    """Wait until the peer in ``folder`` has finished ``round_`` (False: it exited before)."""
    live = layout.swarm_dir(folder) / layout.SWARM_LIVE
    while True:
        if round_ <= 0 or (live.is_file() and f'"round": {round_},' in live.read_text()):
            return True
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:  # exited (still waitable)
            return False
        time.sleep(0.1)


def _wait_address(folder: Path, pid: int, timeout: float) -> str:
    path = layout.swarm_dir(folder) / layout.SWARM_ADDRESS
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > deadline:
            raise ConfigError(f"peer 0 did not start (see {folder / layout.PEER_LOG})")
        time.sleep(0.1)
    return path.read_text().split()[1]


# -- assembling the result -----------------------------------------------------------------------------------
def assemble(base: str | Path, exit_codes: dict[int, int] | None = None, evaluate_average: bool = True) -> dict:
    """Assemble a swarm's result from its peers' run directories ``BASE/peer_<i>/``.

    Writes ``BASE/summary.json``: per round, the peers that exchanged (``live_per_round``) and the edges
    both ends counted (``edges_per_round``; ``one_sided_edges`` lists any edge only one end counted),
    each peer's last round, and the accuracy of the averaged model, the mean of the final adapters the
    peers published (``swarm/state.pt``; a peer that died publishes none), saved as ``adapters/average``.
    """
    import torch

    from declora.mixing.kernel import average_states
    from declora.rundir.files import atomic_write_text

    base = Path(base)
    rounds: dict[int, dict[int, list[int]]] = {}
    peers: dict[int, dict[str, Any]] = {}
    states = {}
    for folder in sorted(base.glob(f"{layout.PEER_PREFIX}*"), key=lambda p: int(p.name.split("_")[1])):
        i = int(folder.name.split("_")[1])
        live = layout.swarm_dir(folder) / layout.SWARM_LIVE
        rows = [json.loads(x) for x in live.read_text().splitlines() if x.strip()] if live.is_file() else []
        for r in rows:
            rounds.setdefault(r["round"], {})[i] = r["exchanged"]
        info: dict[str, Any] = {"last_round": max((r["round"] for r in rows), default=0)}
        address = layout.swarm_dir(folder) / layout.SWARM_ADDRESS
        info["peer"] = address.read_text().split()[0] if address.is_file() else None
        if exit_codes is not None:
            info["exit_code"] = exit_codes.get(i)
        final = layout.swarm_dir(folder) / layout.SWARM_STATE
        if final.is_file():
            states[i] = torch.load(final, map_location="cpu", weights_only=True)["state"]
        own = folder / layout.SUMMARY
        if own.is_file():
            info["final_accuracy_own_model"] = json.loads(own.read_text()).get("final_accuracy")
            info["suspects"] = json.loads(own.read_text()).get("suspects")  # comm.robust: whom it flagged
        peers[i] = info
    liars = _byzantine_peers(base)  # byzantine.peers: the attackers are left out of the averaged model
    states = {i: state for i, state in states.items() if i not in liars}
    edges, one_sided = {}, {}
    for t, seen in sorted(rounds.items()):
        pairs = {(min(i, j), max(i, j)) for i, got in seen.items() for j in got}
        both = sorted(p for p in pairs if p[1] in seen.get(p[0], []) and p[0] in seen.get(p[1], []))
        edges[t], one_sided[t] = [list(p) for p in both], [list(p) for p in sorted(pairs - set(both))]
    summary: dict[str, Any] = {
        "clients": len(peers),
        "peers": {str(i): v for i, v in peers.items()},
        "live_per_round": {str(t): sorted(seen) for t, seen in sorted(rounds.items())},
        "edges_per_round": {str(t): e for t, e in edges.items()},
        "one_sided_edges": {str(t): e for t, e in one_sided.items() if e},
        "averaged_over": sorted(states),
        **({"byzantine_peers": sorted(liars)} if liars else {}),
        "exit_codes": {str(i): v.get("exit_code") for i, v in peers.items()},
        "final_accuracy": None,
    }
    if states and evaluate_average:
        summary |= _evaluate_average(base, average_states([states[i] for i in sorted(states)]))
    atomic_write_text(base / layout.SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _byzantine_peers(base: Path) -> set[int]:
    """``byzantine.peers`` from the peers' config.yaml files (every peer of a swarm is told the same list)."""
    import yaml

    liars: set[int] = set()
    for config in base.glob(f"{layout.PEER_PREFIX}*/{layout.CONFIG}"):
        liars |= set((yaml.safe_load(config.read_text()) or {}).get("byzantine", {}).get("peers") or [])
    return liars


def _evaluate_average(base: Path, mean: dict) -> dict[str, Any]:
    """The averaged model's accuracy on the held-out set (the first peer's config), and its adapter."""
    from declora.evaluation.evaluate import evaluate, length_sorted
    from declora.training.finish import save_adapter
    from declora.training.setup import setup

    config = next(iter(sorted(base.glob(f"{layout.PEER_PREFIX}*/{layout.CONFIG}"))))
    cfg = load_config(config, ["resume=null", "runtime=simulation"])
    s = setup(cfg)
    result = evaluate(s.model, mean, s.data, length_sorted(s.data), s.device, cfg.eval.batch_size)
    if cfg.save_adapters:
        save_adapter(s.model, mean, layout.adapter_dir(base, layout.AVERAGE))
    return {"final_accuracy": result.accuracy, "final_eval_loss": result.loss}
