"""The round loop, readable top to bottom.

setup: graph -> data (tokenized once) -> partition -> one frozen base + PEFT -> clients
for t in 1..T:
    1. every local client takes K optimizer steps on its own data
    2. the algorithm exchanges tensors through the communicator (gossip with W for Dec-LoRA)
    3. evaluate the averaged model (and each client), consensus error, write a metrics row
    4. checkpoint every client (resume=RUN_DIR continues from the last complete round)
finish: adapters (PEFT format), summary.json, plots

With churn options (``topology.link_drop``, ``train.peer_dropout``, ...) each round first draws its live
graph (:mod:`declora.mixing.churn`): offline peers skip 1 and 2, stragglers take fewer steps, and 2 mixes with
W_t, the mixing matrix of the live graph; without them every round is exactly the loop above.

runtime=simulation runs every client in this process; runtime=distributed runs this same loop in one
process per client (torchrun), the communicator moving tensors between ranks.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from declora.algorithms import Algorithm, build_algorithm
from declora.api import Inputs
from declora.client.client import Client
from declora.client.dp_sgd import attach as attach_privacy
from declora.client.dp_sgd import metrics as privacy_metrics
from declora.client.dp_sgd import summary as privacy_summary
from declora.client.guards import Guard
from declora.client.precision import check_mixed_precision
from declora.comm import Communicator, build_communicator
from declora.config import Config, ConfigError
from declora.data.causal import load_causal_task
from declora.data.checks import check_proportions
from declora.data.grouping import token_lengths
from declora.data.loading import BatchStream, TaskData, load_task
from declora.data.validation import improves, load_validation, select_best
from declora.evaluation.evaluate import evaluate, length_sorted
from declora.fault_injection import maybe_fail
from declora.mixing.churn import Churn
from declora.mixing.kernel import squared_distance, state_bytes
from declora.mixing.topology import Topology
from declora.model.loading import (
    build_model,
    gguf_file_of,
    load_state,
    load_tokenizer,
    num_parameters,
    resolve_model_path,
    select_device,
    trainable_state,
)
from declora.model.peft_methods import save_trainable
from declora.model.quantized import base_model_bytes, check_quantization, hide_bnb_cpu_notice
from declora.partition import partition_counts, partitioner_from_config
from declora.rundir import protect
from declora.rundir.adapters import describe_adapters, save_best
from declora.rundir.files import share_files
from declora.rundir.layout import RunDir, atomic_write_text
from declora.training import checkpoint
from declora.training.callbacks import CallbackList
from declora.training.checkpoint import Progress


@dataclass
class Setup:
    """Everything a run needs before its first round."""

    cfg: Config
    algorithm: Algorithm
    topology: Topology | None
    data: TaskData
    parts: list[np.ndarray]  # training indices of each worker
    model: nn.Module
    init: dict[str, torch.Tensor]  # the shared initial trainable state
    device: torch.device
    validation: TaskData | None = None  # data.validation_split: picks best_round (declora.data.validation)
    tokenizer: Any = None  # saved beside adapters/average and adapters/best


def build_topology(cfg: Config, algorithm: Algorithm) -> Topology | None:
    """The run's graph and W, or None for algorithms without one (centralized, local, fedavg)."""
    return Topology.from_config(cfg.topology, cfg.train.clients, cfg.train.seed) if algorithm.uses_graph else None


def partitioner_split(cfg: Config, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's training indices under ``partition.*`` (a ConfigError names a bad option)."""
    try:
        return partitioner_from_config(cfg.partition, cfg.train.clients, cfg.train.seed).split(labels)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def setup(cfg: Config, inputs: Inputs | None = None) -> Setup:
    """Validate and build everything, cheapest checks first, so bad input fails before any training.

    Args:
        inputs: datasets, model and tokenizer objects used instead of ``data.path``/``model.name_or_path``.
    """
    inputs = inputs or Inputs()
    hide_bnb_cpu_notice(cfg.model.quantization != "none")  # before peft imports bitsandbytes
    algorithm = build_algorithm(cfg.train.algorithm, cfg)
    if inputs.model is None:
        resolve_model_path(cfg.model.name_or_path, gguf_file_of(cfg.model))  # a bad path fails before data is read
    check_quantization(cfg.model, select_device(cfg.model.device))  # bitsandbytes present and working
    check_mixed_precision(cfg.train.mixed_precision, select_device(cfg.model.device))  # bf16/fp16 supported here
    topology = build_topology(cfg, algorithm)

    tokenizer = load_tokenizer(cfg.model, inputs.tokenizer)
    load = load_causal_task if cfg.model.task_type == "causal_lm" else load_task  # prompt + answer tokens
    data = load(cfg.data, tokenizer, cfg.model.max_length, seed=cfg.train.seed, given=inputs.splits)
    workers = algorithm.workers(cfg.train)
    check_proportions(cfg.partition.kind, cfg.partition.proportions, data.label_names, data.source)
    parts = partitioner_split(cfg, data.train.labels)
    if workers < len(parts):  # pooled (centralized): one model on the union of the clients' data
        parts = [np.sort(np.concatenate(parts))]

    model = build_model(cfg.model, cfg.peft, data.num_labels, seed=cfg.train.seed, base=inputs.model)
    init = trainable_state(model)  # the same starting adapter and head for every client
    algorithm.set_initial_state(init)
    model.requires_grad_(False)  # the shared module is frozen: clients hold the trainable copies
    validation = None if inputs.splits else load_validation(cfg, tokenizer, data.label_names)
    device = next(model.parameters()).device
    return Setup(cfg, algorithm, topology, data, parts, model, init, device, validation, tokenizer)


def make_clients(s: Setup, local_ids: list[int]) -> dict[int, Client]:
    trained = {n for n in s.init if s.algorithm.is_trained(n)}
    lengths = token_lengths(s.data.train.input_ids) if s.cfg.data.group_by_length else None
    clients = {
        i: Client.create(
            i,
            s.algorithm.client_init(i, s.init),  # s.init itself unless peft.ranks gives peers their own rank
            trained,
            BatchStream(s.parts[i], s.cfg.train.batch_size, s.cfg.train.seed, i, lengths),
            s.cfg.train,
            total_steps=s.cfg.train.rounds * s.algorithm.steps_per_round(s.cfg.train),  # lr schedule horizon
        )
        for i in local_ids
    }
    return attach_privacy(s.cfg, s.algorithm, s.parts, clients)  # privacy.mechanism=dp_sgd: DP-SGD per peer


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
    checkpoint.check_resumable(cfg)
    protect.check_out_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)  # before any model
    workers = build_algorithm(cfg.train.algorithm).workers(cfg.train)
    own_comm = comm is None
    comm = comm or build_communicator(cfg, workers)
    if cfg.runtime == "distributed" and cfg.out_dir is None:  # every rank must pick the same folder
        stamp = time.localtime(comm.total(time.time() if comm.rank == 0 else 0.0))
        cfg = replace(cfg, out_dir=f"runs/{time.strftime('%Y%m%d-%H%M%S', stamp)}-{cfg.train.algorithm}")
    hooks = CallbackList(callbacks, cfg, comm.rank)  # the user's callbacks + report_to trackers
    s = setup(cfg, inputs)
    tc, ec = cfg.train, cfg.eval
    W = s.topology.W if s.topology is not None else np.eye(workers)
    if cfg.overwrite and cfg.resume is None and cfg.out_dir is not None:  # set-up passed: now replace
        protect.clear_run(cfg.out_dir)
        comm.barrier()  # every process has cleared before any writes
    rd = run_dir or RunDir(cfg)
    clients = make_clients(s, comm.local_clients)
    comm.barrier()  # start-up done on every process (distributed: waits up to comm.startup_timeout_s)
    done = (
        checkpoint.restore(rd.path, clients, s.algorithm, comm, tc.rounds, cfg.resume_from_scratch)
        if cfg.resume
        else Progress()
    )
    done = comm.join(done, clients)  # runtime=swarm: catch up with the live peers (no-op otherwise)
    rd.write_config(cfg)  # on every rank: on machines without a shared disk each needs it to resume
    if comm.rank == 0:  # rank 0 writes the run directory; every rank its own adapters (and ranks/rank_<r>)
        rd.start_metrics(done.history)
        (rd.path / "DONE").unlink(missing_ok=True)  # a resumed run is unfinished until it finishes again
    per_rank = cfg.runtime == "distributed"
    if per_rank:
        rd.start_rank_metrics(comm.rank, done.round)
    steps = s.algorithm.steps_per_round(tc)
    churn = Churn.from_config(cfg, W, steps)  # None unless a churn option is set: then every round uses W
    avg_idx = length_sorted(s.data)
    client_idx = length_sorted(s.data, ec.client_max_examples)

    from tqdm.auto import tqdm

    hooks.train_begin(cfg, rd.path)
    stop = False
    history: list[dict[str, Any]] = list(done.history)
    total_bytes, train_s, start = done.total_bytes, done.train_s, time.perf_counter() - done.wall_s
    first_loss = done.history[0]["train_loss"] if done.history else None  # divergence guard's baseline
    guard = Guard(tc.lr, rd.path, tc.divergence_factor, first_loss)  # stops at the first non-finite value
    bar = tqdm(
        range(done.round + 1, tc.rounds + 1),
        desc=f"{tc.algorithm}",
        disable=not cfg.progress or comm.rank != 0,
        unit="round",
        initial=done.round,
        total=tc.rounds,
    )
    if tc.rounds == 0:  # evaluation only: the initial (zero-shot) model, reported as round 0
        row = {"round": 0, "train_loss": None} | evaluate_round(s, clients, comm, avg_idx, client_idx)
        guard.evaluation(0, row.get("eval_loss"))
        history.append(row | {"bytes_sent": 0, "wall_s": round(time.perf_counter() - start, 3)})
        if comm.rank == 0:
            rd.append_metrics(history[-1])
    for round_ in bar:
        comm.round = round_
        maybe_fail(comm.local_clients, round_)  # test-only fault injection (DECLORA_FAULT); no-op otherwise
        # 1. Local steps: each client on its own data, with its own optimizer state.
        t0 = time.perf_counter()
        active = s.algorithm.participants(round_, tc)  # all clients, unless the algorithm samples
        live = churn.live(round_) if churn else None  # churn: offline peers wait, stragglers take fewer steps
        if live is not None:
            active = [i for i in active if i in live.online]
        k = {i: live.steps[i] if live else steps for i in active}
        losses = {i: c.local_steps(s.model, s.data, k[i], round_, s.device) for i, c in clients.items() if i in active}
        guard.losses(round_, losses, clients)
        guard.states(round_, {i: clients[i].state() for i in losses}, "after local steps")
        # 2. Communication: what is exchanged and how it is combined is the algorithm's business.
        Wt = churn.mixing(live) if live else W  # churn: mixing on the live graph (failed edges carry nothing)
        mine = {i: c.state() for i, c in clients.items()}
        states, sent = s.algorithm.communicate(mine, comm, Wt, participants=active)
        for i, c in clients.items():
            c.set_state(states[i])
        guard.states(round_, {i: c.state() for i, c in clients.items()}, "after exchange")
        train_s += time.perf_counter() - t0
        sent_all = int(comm.total(sent))
        total_bytes += sent_all
        if round_ % ec.every == 0 or round_ == tc.rounds:
            # 3. Evaluation: the averaged model is the number the paper reports.
            local: dict[int, dict[str, Any]] = {}
            row = evaluate_round(s, clients, comm, avg_idx, client_idx, local)
            guard.evaluation(round_, row.get("eval_loss"))  # before the row, the checkpoint or DONE
            trained_losses = list(comm.gather(losses).values())  # empty if every peer was offline
            row = {"round": round_, "train_loss": float(np.mean(trained_losses)) if trained_losses else None} | row
            row |= churn.metrics(live, Wt) if live else {}
            row |= {"bytes_sent": sent_all, "wall_s": round(time.perf_counter() - start, 3)}
            row |= privacy_metrics(clients, comm)  # dp_sgd: epsilon spent so far (max over peers, per peer)
            history.append(row)
            if comm.rank == 0:
                rd.append_metrics(row)
            if cfg.save_adapters and improves(history, row):  # a new validation best: adapters/best
                best = s.algorithm.averaged(comm, {i: c.state() for i, c in clients.items()})
                if comm.local_clients[0] == 0:
                    save_best(s.model, best, rd.adapter_dir("best"), save_adapter)
            if per_rank:
                own = {"round": round_, "rank": comm.rank, "train_loss": losses.get(comm.rank)}
                own |= local[comm.rank] | {"bytes_sent": sent, "wall_s": row["wall_s"]}
                own |= {"epsilon": row["epsilon_per_peer"][comm.rank]} if "epsilon" in row else {}
                rd.append_rank_metrics(comm.rank, own)
            bar.set_postfix(
                loss=f"{row['train_loss'] if row['train_loss'] is not None else float('nan'):.3f}",
                acc=f"{row['accuracy']:.3f}",
                cons=f"{row['consensus_error']:.2e}",
            )
        # Callbacks and trackers (declora.training.callbacks): one may stop the run after this round.
        evaluated = history[-1] if history and history[-1]["round"] == round_ else None
        stop = hooks.round_end(round_, evaluated, clients, losses, local if evaluated else {}, comm)
        # 4. Checkpoint: each process saves its clients atomically; rank 0 then marks the round complete.
        if checkpoint.due(cfg, round_) or (stop and cfg.checkpoint_every > 0):  # a stopped run can resume
            progress = Progress(round_, history, total_bytes, train_s, time.perf_counter() - start)
            checkpoint.save(rd.path, progress, clients, s.algorithm, comm, keep=cfg.checkpoint_keep)
        if stop:
            s.cfg = replace(cfg, train=replace(tc, rounds=round_))  # the summary counts the rounds done
            break
    bar.close()

    summary = finish(s, clients, comm, rd, history, total_bytes, train_s, time.perf_counter() - start)
    if cfg.checkpoint_cleanup and not stop:  # finished: the checkpoints only served to resume
        checkpoint.cleanup(rd.path, comm)
    if own_comm:
        comm.close()
    hooks.train_end(summary, history, cfg)
    return summary


def evaluate_round(
    s: Setup,
    clients: dict[int, Client],
    comm: Communicator,
    avg_idx: np.ndarray,
    client_idx: np.ndarray,
    local: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Averaged-model accuracy, per-client accuracy (mean/min/max) and the consensus error.

    Args:
        local: if given, filled with each local client's own numbers (``ranks/rank_<r>/metrics.jsonl``).
    """
    mean = s.algorithm.averaged(comm, {i: c.state() for i, c in clients.items()})  # metrics only: not counted
    avg = evaluate(s.model, mean, s.data, avg_idx, s.device, s.cfg.eval.batch_size)
    row: dict[str, Any] = {"accuracy": avg.accuracy, "eval_loss": avg.loss}
    if s.validation is not None:  # model selection only; draws no RNG, so the numbers above are unchanged
        val = evaluate(s.model, mean, s.validation, length_sorted(s.validation), s.device, s.cfg.eval.batch_size)
        row |= {"val_accuracy": val.accuracy, "val_loss": val.loss}
    dist = comm.gather({i: squared_distance(c.state(), mean) for i, c in clients.items()})
    row["consensus_error"] = float(np.mean(list(dist.values())))
    if s.cfg.eval.clients:
        accs = comm.gather(
            {
                i: evaluate(s.model, c.state(), s.data, client_idx, s.device, s.cfg.eval.batch_size).accuracy
                for i, c in clients.items()
            }
        )
        values = list(accs.values())
        row |= {
            "client_accuracy_mean": float(np.mean(values)),
            "client_accuracy_min": float(np.min(values)),
            "client_accuracy_max": float(np.max(values)),
        }
    else:
        row |= {"client_accuracy_mean": None, "client_accuracy_min": None, "client_accuracy_max": None}
    if local is not None:
        for i in clients:
            local[i] = {"client_accuracy": accs[i] if s.cfg.eval.clients else None, "squared_distance": dist[i]}
    return row


def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], path: Any) -> None:
    """peft ``save_pretrained`` into a temporary folder, then rename: a half-saved adapter never appears."""
    import shutil

    load_state(model, state)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_trainable(model, state, tmp)  # peft save_pretrained (head_only: head.safetensors)
    share_files(tmp)  # safetensors writes 0600: the umask decides, as for every run file
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def churn_summary(s: Setup, workers: int) -> dict[str, Any]:
    """summary.json's churn fields: rounds each peer missed (empty without churn) and peft.ranks per peer."""
    W = s.topology.W if s.topology is not None else np.eye(workers)
    churn = Churn.from_config(s.cfg, W, s.algorithm.steps_per_round(s.cfg.train))
    out: dict[str, Any] = {"missed_rounds": churn.missed_rounds(s.cfg.train.rounds)} if churn else {}
    return out | ({"peer_ranks": s.algorithm.ranks} if s.cfg.peft.ranks else {})


def finish(
    s: Setup,
    clients: dict[int, Client],
    comm: Communicator,
    rd: RunDir,
    history: list[dict[str, Any]],
    total_bytes: int,
    train_s: float,
    wall_s: float,
) -> dict[str, Any]:
    """Write adapters, summary.json and plots; returns the summary."""
    cfg, tc = s.cfg, s.cfg.train
    mean = s.algorithm.averaged(comm, {i: c.state() for i, c in clients.items()})
    Guard(tc.lr, rd.path).states(tc.rounds, {"average": mean}, "averaged model")  # never an adapter from NaN
    if cfg.save_adapters:
        if comm.local_clients[0] == 0 and cfg.runtime != "swarm":  # a swarm peer has no global average
            save_adapter(s.model, mean, rd.adapter_dir("average"))
        for i, c in clients.items():
            save_adapter(s.model, c.state(), rd.adapter_dir(f"client_{i}"))
            s.algorithm.finish_adapter(i, rd.adapter_dir(f"client_{i}"))  # peft.ranks: cut to the peer's rank
    workers = s.algorithm.workers(tc)
    samples = tc.rounds * s.algorithm.steps_per_round(tc) * tc.batch_size * tc.grad_accumulation * workers
    trained = {n: t for n, t in s.init.items() if s.algorithm.is_trained(n)}  # what clients train and send
    counts = partition_counts(s.parts, s.data.train.labels, s.data.num_labels)
    summary = {
        "algorithm": tc.algorithm,
        "model": cfg.model.name_or_path,
        "task": cfg.data.task,
        "clients": tc.clients,
        "rounds": tc.rounds,
        "local_steps": tc.local_steps,
        "topology": cfg.topology.kind if s.topology else None,
        "mixing": cfg.topology.mixing if s.topology else None,
        "spectral_gap": s.topology.spectral_gap if s.topology else None,
        "mixing_rms": s.topology.rms_contraction if s.topology else None,
        "partition": cfg.partition.kind,
        **select_best(history),  # best_round on the validation split when there is one
        "final_accuracy": history[-1]["accuracy"],
        "final_client_accuracy_mean": history[-1]["client_accuracy_mean"],
        "final_consensus_error": history[-1]["consensus_error"],
        "total_bytes_sent": total_bytes,
        "trainable_params": num_parameters(trained),
        "message_bytes": state_bytes(trained),
        "base_model_mb": round(base_model_bytes(s.model, exclude=s.init) / 2**20, 3),
        "peft_method": cfg.peft.method,
        "train_examples": len(s.data.train),
        "eval_examples": len(s.data.eval),
        "validation_examples": len(s.validation.eval) if s.validation is not None else 0,
        "samples": samples,
        "wall_s": round(wall_s, 2),
        "train_s": round(train_s, 2),
        "samples_per_s": round(samples / max(train_s, 1e-9), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "partition_counts": counts.tolist(),
        "label_names": s.data.label_names,
        "data_source": s.data.source,
        "device": str(s.device),
        "seed": tc.seed,
        **churn_summary(s, workers),
        **privacy_summary(clients, comm, cfg),  # dp_sgd: final (epsilon, delta) of every peer
        "run_dir": str(rd.path),
    }
    if cfg.runtime == "distributed":  # this rank's own wall time, memory and throughput
        rd.write_rank_summary(comm.rank, summary | {"rank": comm.rank})
    if comm.rank != 0:
        return summary
    rd.write_summary(summary)
    if cfg.save_adapters:  # portable base name, labels, model card (declora.rundir.adapters)
        describe_adapters(rd.path, cfg, summary, history, s.tokenizer)
    if cfg.plots:
        from declora.partition import plot_partition
        from declora.rundir.plots import plot_churn, plot_run, run_title

        title = run_title(cfg, summary)
        plot_run(history, rd.path / "plots", title)
        plot_churn(history, rd.path / "plots", title)  # only with churn: online peers and live edges
        plot_partition(counts, str(rd.path / "plots" / "partition.png"), s.data.label_names, title)
    atomic_write_text(rd.path / "DONE", "")
    return summary
