"""Every simulated client in one forward pass: per-client adapters over the one shared frozen base.

``train.batch_clients``: at each local step the clients' batches are padded to one width and
concatenated; the frozen base runs once over them; each LoRA layer adds every client's own ``B_c A_c x``
by a batched matmul over the stacked factors; the head runs per client (``functional_call``). The
backward of the sum of per-client mean losses gives each client exactly its own gradient; each then
takes its own clipped, scaled, scheduled optimizer step, as :meth:`Client.local_steps` does.

Randomness is replayed per client: every ``nn.Dropout`` and the attention function (whose dropout is
inside the kernel) run per client, cropped to its own width, with the global generator swapped to that
client's state (seeded as the sequential loop seeds it). Each client draws the same masks for the same
shapes in the same order; only float rounding differs (``tests/client/test_batched.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from declora.client import batched_pass
from declora.client.batched_pass import ClientRng, Pass, layout, patched
from declora.client.client import Client, step_seed
from declora.client.guards import check_loss
from declora.client.precision import autocast
from declora.data.loading import TaskData, collate

# A pass's fixed cost, in batches of mean width: small on a CPU (time grows with padded tokens), large
# on a GPU (a MiniLM step is bound by kernel launches). Indexed by "is CUDA".
_PASS_COST = (1.0, 8.0)
_MAX_PASS = 128  # clients per pass when train.clients_per_pass is null (bounds the cut search)
# Padded tokens per pass, unless one client: on a CPU a pass beyond ~2k tokens falls out of cache and
# runs slower than the clients one by one (MiniLM, 2 cores: 0.73x at 6.6k-token passes, 0.94x at 2.1k;
# torch.mm's rate is flat from 600 to 6,600 rows); on a GPU, activation memory (MiniLM ~190 KB a token).
_MAX_TOKENS = (2048, 32768)


def passes(widths: list[int], cap: int, cost: float, max_width: float = float("inf")) -> list[slice]:
    """Cut width-sorted clients into passes of <= ``cap`` (and <= ``max_width`` summed widths unless one
    client) minimising padded tokens + ``cost`` mean widths per pass, by dynamic programming over runs."""
    overhead = cost * sum(widths) / len(widths)
    best, cut = [0.0] + [float("inf")] * len(widths), [0] * (len(widths) + 1)
    for j in range(1, len(widths) + 1):
        for i in range(j - 1, max(0, j - cap) - 1, -1):
            if i < j - 1 and (j - i) * widths[j - 1] > max_width:
                break  # over the token budget: wider passes only grow from here
            total = best[i] + (j - i) * widths[j - 1] + overhead
            if total < best[j]:
                best[j], cut[j] = total, i
    out, j = [], len(widths)
    while j > 0:
        out.append(slice(cut[j], j))
        j = cut[j]
    return out[::-1]


def _optimizer_step(c: Client) -> None:
    """One client's optimizer step on its accumulated gradient: as :meth:`Client.local_steps` takes it."""
    if c.train_cfg.max_grad_norm is not None:
        c.scaler.unscale_(c.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in c.params.values() if p.requires_grad], c.train_cfg.max_grad_norm)
    c.scaler.step(c.optimizer)
    c.scaler.update()
    c.optimizer.zero_grad(set_to_none=True)
    if c.scheduler is not None:
        c.scheduler.step()


def _same_k(
    group: list[Client], model: nn.Module, data: TaskData, steps: int, round_: int, device: Any, cap: int | None
) -> tuple[dict[int, float], ClientRng]:
    tc = group[0].train_cfg
    accum = tc.grad_accumulation
    rng = ClientRng({c.cid: step_seed(tc.seed, round_, c.cid) for c in group}, device)
    ctx = Pass(rng)
    ctx.factors, ctx.head_names = layout(model, list(group[0].params))
    sums = {c.cid: [] for c in group}  # every micro-batch's loss
    for c in group:
        c.step_losses = []
    with patched(model, ctx.factors, ctx.head_names, ctx):
        for k in range(steps * accum):
            batches = {c.cid: collate(data.train, c.stream.next(), data.pad_token_id, device) for c in group}
            order = sorted(group, key=lambda c: batches[c.cid]["input_ids"].size(1))
            widths = [batches[c.cid]["input_ids"].size(1) for c in order]
            cuda = device.type == "cuda"
            budget = _MAX_TOKENS[cuda] / tc.batch_size if cap is None else float("inf")  # summed widths
            cuts = passes(widths, cap or _MAX_PASS, _PASS_COST[cuda], budget)
            for part in (order[cut] for cut in cuts):
                with autocast(tc.mixed_precision, device):
                    losses = batched_pass.forward(model, ctx, part, [batches[c.cid] for c in part], data.pad_token_id)
                total = 0
                for c, loss in zip(part, losses, strict=True):
                    check_loss(loss.item(), round_, c.cid, tc.lr)
                    sums[c.cid].append(loss.item())
                    total = total + c.scaler.scale(loss / accum if accum > 1 else loss)
                total.backward()  # each client's tensors get the gradient of its own loss only
            if (k + 1) % accum:
                continue
            for c in group:
                _optimizer_step(c)
                c.step_losses.append(sum(sums[c.cid][-accum:]) / accum)
    return {cid: sum(v) / len(v) for cid, v in sums.items()}, rng


def local_steps(
    clients: list[Client],
    steps: dict[int, int],
    model: nn.Module,
    data: TaskData,
    round_: int,
    device: torch.device,
    per_pass: int | None = None,
) -> dict[int, float]:
    """``clients``' local steps (client ``c`` takes ``steps[c.cid]``), batched; returns each mean loss.

    Clients with the same number of steps run together (stragglers form their own passes), at most
    ``per_pass`` in one forward pass (None: within a token budget), cut by :func:`passes`. The result
    and every client's state are those of ``{c.cid: c.local_steps(model, data, steps[c.cid], round_,
    device) for c in clients}`` up to float rounding, the global random generator included.
    """
    if not clients:
        return {}
    model.train()
    out: dict[int, float] = {}
    last = None
    for k in dict.fromkeys(steps[c.cid] for c in clients):
        group = [c for c in clients if steps[c.cid] == k]
        losses, rng = _same_k(group, model, data, k, round_, device, per_pass)
        out |= losses
        if steps[clients[-1].cid] == k:
            last = rng
    assert last is not None
    last.leave(clients[-1].cid)
    return {c.cid: out[c.cid] for c in clients}


def enabled(cfg: Any, local_clients: int) -> bool:
    """Whether the trainer batches its clients: ``true``, or ``auto`` where supported and worth it."""
    from declora.config.train import batch_clients_refusal

    mode = cfg.train.batch_clients
    return mode is True or (mode == "auto" and local_clients > 1 and batch_clients_refusal(cfg) is None)
