"""torch.distributed transport: one process (rank) per client, point-to-point with graph neighbours only.

Each rank is one client (``local_clients == [rank]``). :meth:`DistributedCommunicator.exchange` sends
the rank's message to its neighbours in W and receives theirs with ``dist.batch_isend_irecv``; nothing
is all-reduced for gossip. ``average`` (FedAvg's server, and the evaluated averaged model) is an
``all_reduce``; ``gather``/``total`` (metrics) are ``all_gather``/``all_reduce``.

A message (a dict of tensors of any dtypes: fp32 states, or uint8 codes + fp32 scales from
:mod:`declora.compress`) travels as ONE uint8 buffer per neighbour: every tensor's bytes, concatenated
in key order. All clients' messages share names, shapes and dtypes, so a receiver sizes its buffer and
cuts it back into tensors from its own message. The bytes arrive bit for bit.

Failures: every wait is bounded by ``comm.timeout_s`` (given to ``init_process_group``). A neighbour
that died (connection reset) or hangs (timeout) raises :class:`PeerFailure` naming its rank and the
round. The detecting rank also records the failure in the rendezvous store, so a rank that only sees a
broken collective (it is not a neighbour of the dead peer) can still name it.
"""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from declora.comm.base import Communicator, Message, State, message_bytes, neighbors
from declora.config import CommConfig, ConfigError


class PeerFailure(RuntimeError):
    """A peer stopped answering; the message names it (when known), the round and the operation.

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


class DistributedCommunicator(Communicator):
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
        try:
            store, rank, world = next(dist.rendezvous(cfg.init_method, rank, world, timeout=startup))
            store.set_timeout(startup)
            dist.init_process_group(
                backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world, timeout=timeout
            )
            store.set_timeout(timeout)
        except RuntimeError as err:  # DistStoreError (a rank never came) is a RuntimeError
            raise PeerFailure(None, 0, rank, f"rendezvous at {cfg.init_method}", str(err)) from None
        return cls(rank, world, device, dist.PrefixStore("declora", store), cfg.timeout_s, cfg.startup_timeout_s)

    # -- failure handling ------------------------------------------------------------------------------
    def _report(self, peer: int) -> None:
        """Record in the rendezvous store that ``peer`` failed (best effort: the store may be gone too)."""
        try:
            if self.store is not None:
                self.store.set(f"failed/{peer}", f"{self.round} {self.rank}")
        except Exception:  # noqa: BLE001 - the store lives with rank 0 or the agent; it may be dead as well
            pass

    def _reported_peer(self, wait_s: float = 3.0) -> int | None:
        """A peer some rank reported as failed; polls briefly since the report may still be on its way."""
        deadline = time.monotonic() + wait_s
        try:
            while self.store is not None:
                for peer in range(self.num_clients):
                    if peer != self.rank and self.store.check([f"failed/{peer}"]):
                        return peer
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        except Exception:  # noqa: BLE001
            pass
        return None

    def _collective_failed(self, what: str, err: Exception) -> PeerFailure:
        return PeerFailure(self._reported_peer(), self.round, self.rank, what, str(err))

    # -- transport ---------------------------------------------------------------------------------------
    def exchange(self, messages: dict[int, Message], W: np.ndarray) -> dict[int, dict[int, Message]]:
        (own,) = messages.values()
        peers = neighbors(W, self.rank)
        if not peers:
            return {self.rank: {}}
        wire = pack(own).to(self.device)
        buffers = {j: torch.empty_like(wire) for j in peers}
        ops, op_peer = [], []
        for j in peers:
            ops += [dist.P2POp(dist.isend, wire, j), dist.P2POp(dist.irecv, buffers[j], j)]
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
                    raise self._collective_failed(f"exchange with neighbours {peers}", err) from None
                self._report(peer)
                raise PeerFailure(peer, self.round, self.rank, "exchange with neighbour", str(err)) from None
        return {self.rank: {j: unpack(buffers[j], own) for j in peers}}

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
