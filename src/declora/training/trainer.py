"""The round loop, readable top to bottom.

setup: graph -> data (tokenized once) -> partition -> one frozen base + PEFT -> clients (:mod:`.setup`)
for t in 1..T:
    1. every local client takes K optimizer steps on its own data
    2. the algorithm exchanges tensors through the communicator (gossip with W for Dec-LoRA)
    3. evaluate the averaged model (and each client), consensus error, write a metrics row
    4. checkpoint every client (resume=RUN_DIR continues from the last complete round)
finish: adapters (PEFT format), summary.json, plots (:mod:`.finish`)

With churn options (``topology.link_drop``, ``train.peer_dropout``, ...) each round first draws its live
graph (:mod:`declora.mixing.churn`): offline peers skip 1 and 2, stragglers take fewer steps, and 2 mixes with
W_t, the mixing matrix of the live graph; without them every round is exactly the loop above.

runtime=simulation runs every client in this process; runtime=distributed runs this same loop in one
process per client (torchrun), the communicator moving tensors between ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from declora.algorithms import build_algorithm
from declora.client import batched
from declora.client.client import Client
from declora.client.dp_sgd import metrics as privacy_metrics
from declora.client.guards import Guard
from declora.comm import Communicator, build_communicator
from declora.config import Config
from declora.data.validation import improves
from declora.evaluation.evaluate import length_sorted
from declora.fault_injection import maybe_fail
from declora.mixing.churn import Churn, LiveRound
from declora.rundir import layout, protect
from declora.rundir.adapters import save_best
from declora.rundir.writer import RunDir
from declora.training import checkpoint
from declora.training.callbacks import CallbackList
from declora.training.checkpoint import Progress
from declora.training.finish import finish, save_adapter
from declora.training.result import Inputs
from declora.training.round_eval import evaluate_round
from declora.training.setup import Setup, make_clients, setup
from declora.training.trackers import build_trackers


def run(
    cfg: Config,
    comm: Communicator | None = None,
    run_dir: RunDir | None = None,
    *,
    inputs: Inputs | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train with ``cfg``; returns the summary (also written to ``summary.json``).

    Args:
        comm: the transport; None = from ``cfg.runtime`` (under torch.distributed: join the process
            group of ``RANK``/``WORLD_SIZE``, this process being client ``RANK``).
        inputs: in-memory datasets / model / tokenizer (see :func:`declora.train`).
        callbacks: :class:`declora.training.callbacks.Callback` objects; ``report_to`` trackers are added.
    """
    # 0. Set-up: every check that can fail does so before the first round.
    checkpoint.check_resumable(cfg)
    protect.check_out_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)  # before any model
    algorithm = build_algorithm(cfg.train.algorithm, cfg)  # built once, handed down
    own_comm = comm is None
    comm = comm or build_communicator(cfg, algorithm.workers(cfg.train))
    cfg = same_out_dir(cfg, comm)
    names = [n for n in cfg.report_to if n != "none"]
    hooks = CallbackList(callbacks, build_trackers(names) if comm.rank == 0 else [], active=bool(names))
    s = setup(cfg, inputs, algorithm=algorithm)
    W = s.topology.W if s.topology is not None else np.eye(algorithm.workers(cfg.train))
    if cfg.overwrite and cfg.resume is None and cfg.out_dir is not None:  # set-up passed: now replace
        protect.clear_run(cfg.out_dir)
        comm.barrier()  # every process has cleared before any writes
    rd = run_dir or RunDir(cfg)
    clients = make_clients(s, comm.local_clients)
    comm.barrier()  # start-up done on every process (distributed: waits up to comm.startup_timeout_s)
    done = start_or_resume(s, rd, clients, comm)
    churn = Churn.from_config(cfg, W, algorithm.steps_per_round(cfg.train))  # None unless a churn option is set
    loop = Loop(s, clients, comm, rd, done, churn, W)
    hooks.train_begin(cfg, rd.path)
    if cfg.train.rounds == 0:  # evaluation only: the initial (zero-shot) model, reported as round 0
        loop.record(0, {"round": 0, "train_loss": None} | loop.evaluate(), {}, {})
    stopped = False
    for round_ in loop.progress_bar():
        comm.round = round_
        maybe_fail(comm.local_clients, round_)  # test-only fault injection (DECLORA_FAULT); no-op otherwise
        live = churn.live(round_) if churn else None  # offline peers wait, stragglers take fewer steps
        # 1. Local steps: each client on its own data, with its own optimizer state.
        losses = loop.local_steps(round_, live)
        # 2. Communication: what is exchanged and how it is combined is the algorithm's business.
        Wt = loop.communicate(round_, live, list(losses))
        # 3. Evaluation: the averaged model is the number the paper reports.
        local: dict[int, dict[str, Any]] = {}
        if round_ % cfg.eval.every == 0 or round_ == cfg.train.rounds:
            row = {"round": round_, "train_loss": loop.mean_loss(losses)} | loop.evaluate(local, round_, live)
            loop.record(round_, row | (churn.metrics(live, Wt) if live else {}), local, losses)
        # Callbacks and trackers (declora.training.callbacks): one may stop the run after this round.
        evaluated = loop.history[-1] if loop.history and loop.history[-1]["round"] == round_ else None
        stopped = hooks.round_end(round_, evaluated, clients, losses, local if evaluated else {}, comm)
        # 4. Checkpoint: each process saves its clients atomically; rank 0 then marks the round complete.
        if checkpoint.due(cfg, round_) or (stopped and cfg.checkpoint_every > 0):  # a stopped run can resume
            checkpoint.save(rd.path, loop.progress(round_), clients, algorithm, comm, keep=cfg.checkpoint_keep)
        if stopped:
            break
    loop.close()
    summary = finish(s, clients, comm, rd, loop.progress(loop.last_round), churn)
    if cfg.checkpoint_cleanup and not stopped:  # finished: the checkpoints only served to resume
        checkpoint.cleanup(rd.path, comm)
    if own_comm:
        comm.close()
    hooks.train_end(summary, loop.history, cfg)
    return summary


def same_out_dir(cfg: Config, comm: Communicator) -> Config:
    """Under torch.distributed with no ``out_dir``, every rank must pick the same folder: rank 0's clock."""
    if cfg.runtime != "distributed" or cfg.out_dir is not None:
        return cfg
    stamp = time.localtime(comm.total(time.time() if comm.rank == 0 else 0.0))
    return replace(cfg, out_dir=f"runs/{time.strftime('%Y%m%d-%H%M%S', stamp)}-{cfg.train.algorithm}")


def start_or_resume(s: Setup, rd: RunDir, clients: dict[int, Client], comm: Communicator) -> Progress:
    """Progress to continue from (a checkpoint on resume; runtime=swarm: the live peers' round); opens the
    run folder's files for this start."""
    cfg = s.cfg
    done = Progress()
    if cfg.resume:
        done = checkpoint.restore(rd.path, clients, s.algorithm, comm, cfg.train.rounds, cfg.resume_from_scratch)
    done = comm.join(done, clients)  # runtime=swarm: catch up with the live peers (no-op otherwise)
    rd.write_config(cfg)  # on every rank: on machines without a shared disk each needs it to resume
    if comm.rank == 0:  # rank 0 writes the run directory; every rank its own adapters (and ranks/rank_<r>)
        rd.start_metrics(done.history)
        rd.unmark_done()  # a resumed run is unfinished until it finishes again
    if cfg.runtime == "distributed":
        rd.start_rank_metrics(comm.rank, done.round)
    return done


@dataclass
class Loop:
    """The round loop's state and its per-round steps; :func:`run` reads as the sequence of them."""

    s: Setup
    clients: dict[int, Client]
    comm: Communicator
    rd: RunDir
    done: Progress  # where this start continues from
    churn: Churn | None
    W: np.ndarray

    def __post_init__(self) -> None:
        self.cfg = self.s.cfg
        self.history: list[dict[str, Any]] = list(self.done.history)
        self.total_bytes, self.train_s = self.done.total_bytes, self.done.train_s
        self.start = time.perf_counter() - self.done.wall_s
        self.last_round = self.done.round
        self.steps = self.s.algorithm.steps_per_round(self.cfg.train)
        self.avg_idx = length_sorted(self.s.data)
        self.client_idx = length_sorted(self.s.data, self.cfg.eval.client_max_examples)
        first_loss = self.history[0]["train_loss"] if self.history else None  # divergence guard's baseline
        self.guard = Guard(self.cfg.train.lr, self.rd.path, self.cfg.train.divergence_factor, first_loss)
        self.bar: Any = None

    def progress_bar(self) -> Any:
        """The rounds still to do, with a tqdm bar on rank 0 (``progress=false`` hides it)."""
        from tqdm.auto import tqdm

        tc = self.cfg.train
        self.bar = tqdm(
            range(self.done.round + 1, tc.rounds + 1),
            desc=f"{tc.algorithm}",
            disable=not self.cfg.progress or self.comm.rank != 0,
            unit="round",
            initial=self.done.round,
            total=tc.rounds,
        )
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def progress(self, round_: int) -> Progress:
        return Progress(round_, self.history, self.total_bytes, self.train_s, time.perf_counter() - self.start)

    def local_steps(self, round_: int, live: LiveRound | None) -> dict[int, float]:
        """Step 1: every active local client's K steps; returns its mean train loss."""
        t0 = time.perf_counter()
        s, tc = self.s, self.cfg.train
        active = s.algorithm.participants(round_, tc)  # all clients, unless the algorithm samples
        if live is not None:
            active = [i for i in active if i in live.online]
        k = {i: live.steps[i] if live else self.steps for i in active}
        if batched.enabled(self.cfg, len(self.clients)):  # train.batch_clients: one pass over many clients
            mine = [c for i, c in self.clients.items() if i in active]
            losses = batched.local_steps(mine, k, s.model, s.data, round_, s.device, tc.clients_per_pass)
        else:
            losses = {
                i: c.local_steps(s.model, s.data, k[i], round_, s.device)
                for i, c in self.clients.items()
                if i in active
            }
        self.guard.losses(round_, losses, self.clients)
        self.guard.states(round_, {i: self.clients[i].state() for i in losses}, "after local steps")
        self.train_s += time.perf_counter() - t0
        return losses

    def communicate(self, round_: int, live: LiveRound | None, active: list[int]) -> np.ndarray:
        """Step 2: the algorithm's exchange over W (W_t under churn); returns W_t. Counts the bytes sent."""
        t0 = time.perf_counter()
        Wt = self.churn.mixing(live) if live else self.W  # churn: failed edges carry nothing
        mine = {i: c.state() for i, c in self.clients.items()}
        states, sent = self.s.algorithm.communicate(mine, self.comm, Wt, participants=active)
        for i, c in self.clients.items():
            c.set_state(states[i])
        self.guard.states(round_, {i: c.state() for i, c in self.clients.items()}, "after exchange")
        self.train_s += time.perf_counter() - t0
        self.sent, self.sent_all = sent, int(self.comm.total(sent))  # this process's, and all processes'
        self.total_bytes += self.sent_all
        self.last_round = round_
        return Wt

    def mean_loss(self, losses: dict[int, float]) -> float | None:
        trained = list(self.comm.gather(losses).values())  # empty if every peer was offline
        return float(np.mean(trained)) if trained else None

    def evaluate(
        self, local: dict[int, dict[str, Any]] | None = None, round_: int = 0, live: LiveRound | None = None
    ) -> dict[str, Any]:
        """Step 3: the averaged model's (and the clients') numbers; ``local`` gets each local client's.

        Under churn the averaged model is over the round's members (:meth:`Churn.members`) and the row
        also reports ``members`` and ``online_accuracy`` (:mod:`declora.evaluation.membership`).
        """
        members = self.churn.members(round_) if self.churn and round_ else None
        online = list(live.online) if live is not None else None
        return evaluate_round(self.s, self.clients, self.comm, self.avg_idx, self.client_idx, local, members, online)

    def record(
        self, round_: int, row: dict[str, Any], local: dict[int, dict[str, Any]], losses: dict[int, float]
    ) -> None:
        """Step 3, bookkeeping: guard, metrics row (+ per-rank row), the validation-best adapter, the bar."""
        cfg, comm = self.cfg, self.comm
        self.guard.evaluation(round_, row.get("eval_loss"))  # before the row, the checkpoint or DONE
        row |= {"bytes_sent": self.sent_all if round_ else 0, "wall_s": round(time.perf_counter() - self.start, 3)}
        row |= privacy_metrics(self.clients, comm) if round_ else {}  # dp_sgd: epsilon spent so far
        self.history.append(row)
        if comm.rank == 0:
            self.rd.append_metrics(row)
        if round_ and cfg.save_adapters and improves(self.history, row):  # a new validation best
            members = self.churn.members(round_) if self.churn else None  # as the row's averaged model
            best = self.s.algorithm.averaged(comm, {i: c.state() for i, c in self.clients.items()}, members)
            if comm.local_clients[0] == 0:
                save_best(self.s.model, best, self.rd.adapter_dir(layout.BEST), save_adapter)
        if round_ and cfg.runtime == "distributed":
            own = {"round": round_, "rank": comm.rank, "train_loss": losses.get(comm.rank)}
            own |= local[comm.rank] | {"bytes_sent": self.sent, "wall_s": row["wall_s"]}
            own |= {"epsilon": row["epsilon_per_peer"][comm.rank]} if "epsilon" in row else {}
            self.rd.append_rank_metrics(comm.rank, own)
        if round_ and self.bar is not None:
            loss = row["train_loss"] if row["train_loss"] is not None else float("nan")
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{row['accuracy']:.3f}", cons=f"{row['consensus_error']:.2e}")
