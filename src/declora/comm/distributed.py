"""torch.distributed transport: one process (rank) per client, point-to-point with graph neighbours only.

Each rank is one client (``local_clients == [rank]``). :meth:`DistributedCommunicator.exchange` sends
the rank's message to its neighbours in W and receives theirs with ``dist.batch_isend_irecv``; nothing
is all-reduced for gossip. ``average`` (FedAvg's server, and the evaluated averaged model) is an
``all_reduce``; ``gather``/``total`` (metrics) are ``all_gather``/``all_reduce``.

A message (a dict of tensors of any dtypes: fp32 states, or uint8 codes + fp32 scales from
:mod:`declora.mixing.compress`) travels as ONE uint8 buffer per neighbour: every tensor's bytes, concatenated
in key order. All clients' messages share names, shapes and dtypes, so a receiver sizes its buffer and
cuts it back into tensors from its own message. The bytes arrive bit for bit.

Every message is preceded by a fixed-size header and checked before it is mixed (sender, round, size,
names/shapes/dtypes, then finite values): a bad one stops the run with one line naming the sender rank
and the round (:mod:`declora.comm.dist_safety`), and a message of the wrong size is never received.

Failures: every wait is bounded by ``comm.timeout_s`` (given to ``init_process_group``). A neighbour
that died (connection reset) or hangs (timeout) raises :class:`PeerFailure` naming its rank and the
round: a rank knows which neighbour each receive was waiting for. The detecting rank also records the
failure in the rendezvous store, so a rank that only sees a broken collective, or a neighbour that
stopped because of it, names the failed peer rather than the messenger; failing that, a peer on this
machine whose process has exited is named. Under torchrun, whose agent SIGTERMs the survivors as soon
as one rank exits, each survivor prints its one line before it stops (:func:`dist_safety.report_sigterm`).
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from declora.comm import dist_safety
from declora.comm.base import Communicator, Message, State, message_bytes, neighbors
from declora.comm.dist_failures import FailureReports
from declora.comm.dist_safety import BadMessage, PeerFailure
from declora.comm.messages import MessageRejected, check_finite
from declora.config import CommConfig, ConfigError
from declora.fault_injection import poisoned


def pack(message: Message) -> torch.Tensor:
    """All tensors of ``message`` as one flat uint8 tensor (their raw bytes, in key order)."""
    parts = [message[name].detach().contiguous().reshape(-1).view(torch.uint8) for name in sorted(message)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack(buffer: torch.Tensor, like: Message) -> Message:
    """Inverse of :func:`pack`: cut ``buffer`` into tensors shaped and typed like ``like``'s."""
    out: Message = {}
    offset = 0
    for name in sorted(like):
        ref = like[name]
        size = ref.numel() * ref.element_size()
        chunk = buffer[offset : offset + size]
        if offset % ref.element_size():  # a view must be aligned to the element size: copy this one
            chunk = chunk.clone()
        out[name] = chunk.view(ref.dtype).reshape(ref.shape).to(ref.device)
        offset += size
    if offset != buffer.numel():
        raise ValueError(f"message buffer holds {buffer.numel()} bytes, expected {offset}")
    return out


def env_rank_world() -> tuple[int, int]:
    """``RANK`` and ``WORLD_SIZE`` as set by torchrun (or by hand, with ``comm.init_method=file://...``)."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ConfigError(
            "runtime=distributed needs RANK and WORLD_SIZE: launch with "
            "`torchrun --nproc-per-node N -m declora train runtime=distributed ...` or `declora launch`"
        ) from None


class DistributedCommunicator(FailureReports, Communicator):
    """One client per rank over an initialised default process group.

    Args:
        store: the rendezvous key-value store (failure reports, start-up barrier); None = no store.
        timeout_s: bound on every wait once training runs; startup_timeout_s: on the first
            :meth:`barrier` (ranks load data and model at different speeds).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
        store: dist.Store | None = None,
        timeout_s: float = 300.0,
        startup_timeout_s: float = 1800.0,
    ) -> None:
        self.rank = rank
        self.num_clients = world_size
        self.local_clients = [rank]
        self.device = torch.device(device)  # where tensors go on the wire (cuda for nccl)
        self.store = store
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self.round = 0
        self._barriers = 0
        self.processes: dict[int, str] = {}  # rank -> "host pid" of every other rank (dist_safety.exited)

    @classmethod
    def from_env(cls, workers: int, cfg: CommConfig, model_device: str = "auto") -> DistributedCommunicator:
        """Join the process group described by the environment (torchrun) and ``cfg``.

        Raises:
            ConfigError: ``WORLD_SIZE`` differs from the number of clients, or the backend is unusable.
            PeerFailure: not every rank joined within ``comm.startup_timeout_s``.
        """
        rank, world = env_rank_world()
        if world != workers:
            raise ConfigError(
                f"runtime=distributed runs one process per client: WORLD_SIZE={world} but the run has "
                f"{workers} clients; set train.clients={world} or launch {workers} processes"
            )
        cuda = torch.cuda.is_available() and model_device in ("auto", "cuda")
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
        device = torch.device("cpu")
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise ConfigError("comm.backend=nccl needs CUDA; use comm.backend=gloo on CPU")
            local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        startup, timeout = timedelta(seconds=cfg.startup_timeout_s), timedelta(seconds=cfg.timeout_s)
        box: list[DistributedCommunicator] = []  # the SIGTERM line reads the communicator built below
        dist_safety.report_sigterm(
            lambda: box[0].sigterm_line() if box else f"rank {rank}: stopped by SIGTERM at start-up",
            lambda: box[0].sigterm_code() if box else dist_safety.SIGTERM_EXIT,
        )
        try:
            store, rank, world = next(dist.rendezvous(cfg.init_method, rank, world, timeout=startup))
            store.set_timeout(startup)
            dist.init_process_group(
                backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world, timeout=timeout
            )
            store.set_timeout(timeout)
        except RuntimeError as err:  # DistStoreError (a rank never came) is a RuntimeError
            raise PeerFailure(None, 0, rank, f"rendezvous at {cfg.init_method}", str(err)) from None
        comm = cls(rank, world, device, dist.PrefixStore("declora", store), cfg.timeout_s, cfg.startup_timeout_s)
        dist_safety.mark_stopping(clear=True)  # a stale marker of a former process with this pid
        try:  # who runs where, so that a rank can tell which local peer exited (all ranks are past the rendezvous)
            comm.store.set(f"process/{rank}", dist_safety.this_process())
            comm.processes = {r: comm.store.get(f"process/{r}").decode() for r in range(world) if r != rank}
        except RuntimeError as err:
            raise PeerFailure(None, 0, rank, "start-up", str(err)) from None
        box.append(comm)
        return comm

    # -- transport ---------------------------------------------------------------------------------------
    def exchange(self, messages: dict[int, Message], W: np.ndarray) -> dict[int, dict[int, Message]]:
        (own,) = messages.values()
        peers = neighbors(W, self.rank)
        if not peers:
            return {self.rank: {}}
        sent = poisoned(own, self.rank, self.round)  # test-only fault injection (DECLORA_POISON); else own
        wire = pack(sent).to(self.device)
        size = sum(t.numel() * t.element_size() for t in own.values())  # what a good neighbour sends
        # 1. fixed-size headers: a payload is received only after its header matched (no size mismatch in gloo)
        header = dist_safety.wire_header(sent, self.rank, self.round, wire.numel()).to(self.device)
        heads = self._send_receive(peers, header, "header exchange with neighbour")
        for j in peers:
            try:
                dist_safety.check_header(heads[j].cpu(), own, size, j, self.round)
            except MessageRejected as bad:
                raise self._rejected(bad) from None
        # 2. payloads, checked for finite values before anything is mixed
        buffers = self._send_receive(peers, wire, "exchange with neighbour", torch.empty(size, dtype=torch.uint8))
        received = {j: unpack(buffers[j], own) for j in peers}
        for j in peers:
            bad = check_finite(received[j])
            if bad:
                raise self._rejected(MessageRejected(j, self.round, f"non-finite values in {', '.join(bad[:3])}"))
        return {self.rank: received}

    def _rejected(self, bad: MessageRejected) -> BadMessage:
        dist_safety.mark_stopping()
        self._report(bad.sender, "bad", bad.reason)
        return BadMessage(bad.sender, self.round, self.rank, bad.reason)

    def _send_receive(
        self, peers: list[int], out: torch.Tensor, what: str, like: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Send ``out`` to every peer and receive one tensor shaped like ``like`` (default ``out``) from each."""
        like = out if like is None else like.to(self.device)
        buffers = {j: torch.empty_like(like) for j in peers}
        ops, op_peer = [], []
        for j in peers:
            ops += [dist.P2POp(dist.isend, out, j), dist.P2POp(dist.irecv, buffers[j], j)]
            op_peer += [j, j]
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as err:
            raise self._collective_failed("send/receive", err) from None
        # gloo: one work per op, so a failure names its peer; nccl coalesces them into one
        owners = op_peer if len(works) == len(ops) else [None] * len(works)
        for work, peer in zip(works, owners, strict=True):
            try:
                work.wait()
            except RuntimeError as err:
                if peer is None:
                    raise self._collective_failed(f"{what}s {peers}", err) from None
                raise self._neighbour_failed(peer, what, err) from None
        return buffers

    def average(self, states: dict[int, State]) -> tuple[State, int]:
        (own,) = states.values()
        names = sorted(own)
        flat = torch.cat([own[n].detach().reshape(-1).double() for n in names]).to(self.device)
        self._all_reduce(flat, "average")
        flat = (flat / self.num_clients).to(next(iter(own.values())).device)
        mean, offset = {}, 0
        for n in names:
            mean[n] = flat[offset : offset + own[n].numel()].reshape(own[n].shape).to(own[n].dtype)
            offset += own[n].numel()
        return {n: mean[n] for n in own}, message_bytes(own)  # each client uploads once, as in FedAvg

    def gather(self, values: dict[int, float]) -> dict[int, float]:
        # (has a value, value): a rank that sat the round out (fedavg sampling) contributes nothing
        mine = [1.0, float(values[self.rank])] if values else [0.0, 0.0]
        out = [torch.zeros(2, dtype=torch.float64, device=self.device) for _ in range(self.num_clients)]
        try:
            dist.all_gather(out, torch.tensor(mine, dtype=torch.float64, device=self.device))
        except RuntimeError as err:
            raise self._collective_failed("gather", err) from None
        return {r: float(t[1]) for r, t in enumerate(out) if t[0] > 0}

    def total(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self._all_reduce(t, "total")
        return float(t.item())

    def barrier(self) -> None:
        """Every rank sets a key in the store and waits for all; a rank that never comes is named.

        The first barrier (after start-up) waits up to ``startup_timeout_s``, later ones ``timeout_s``.
        """
        if self.store is None:
            self.total(0.0)  # an all_reduce: bounded by the process-group timeout
            return
        self._barriers += 1
        keys = [f"barrier/{self._barriers}/{r}" for r in range(self.num_clients)]
        wait = self.startup_timeout_s if self._barriers == 1 else self.timeout_s
        try:
            self.store.set(keys[self.rank], "1")
            self.store.wait(keys, timedelta(seconds=wait))
        except RuntimeError as err:
            dist_safety.mark_stopping()
            try:
                missing = [r for r, key in enumerate(keys) if not self.store.check([key])]
            except RuntimeError:
                missing = []
            peer = missing[0] if missing else self._reported_peer()
            if peer is not None and missing:
                self._report(peer)
            raise PeerFailure(peer, self.round, self.rank, "barrier", str(err)) from None

    def _all_reduce(self, t: torch.Tensor, what: str) -> None:
        try:
            dist.all_reduce(t)
        except RuntimeError as err:
            raise self._collective_failed(what, err) from None

    def close(self) -> None:
        """Leave the process group (after a clean run; a failed one just exits)."""
        if dist.is_initialized():
            dist.destroy_process_group()
