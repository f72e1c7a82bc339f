"""Every simulated client in one forward pass: per-client adapters over the one shared frozen base.

``train.batch_clients``: the local steps of many clients run together. At each local step their
minibatches are padded to one width and concatenated; the frozen base runs once over all of them;
each LoRA layer adds every client's own ``B_c A_c x`` by a batched matmul over the stacked factors,
and the task head (a small module) runs per client through ``torch.func.functional_call``. Each
client's loss is the mean over its own rows, so the backward of their sum gives each client exactly
its own gradient; each client then takes its own (clipped, scaled, scheduled) optimizer step, as
:meth:`~declora.client.client.Client.local_steps` does.

Randomness is replayed per client. Sequentially, client c's dropout masks come from the global
generator seeded with ``step_seed(seed, round, c)``, in forward order. Here every ``nn.Dropout`` and the
attention function (whose dropout lives inside the attention kernel) run per client segment, cropped
to that client's own width, with the global generator swapped to that client's state: each client
draws the same masks, for the same shapes, in the same order. What differs is float rounding (matmuls
of other shapes); ``tests/client/test_batched.py`` pins the tolerance.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from declora.client.client import Client, step_seed
from declora.client.guards import check_loss
from declora.client.precision import autocast
from declora.data.loading import TaskData, collate
from declora.errors import ConfigError

_LORA = re.compile(r"(.+)\.lora_([AB])\.default\.weight")
_HEAD = ".modules_to_save.default"


class _ClientRng:
    """One global-generator state per client, swapped in around each of its random draws."""

    def __init__(self, seeds: dict[int, int], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        outer = self._get()
        self.states = {}
        for cid, seed in seeds.items():
            torch.manual_seed(seed)  # exactly what Client.local_steps does before its steps
            self.states[cid] = self._get()
        self._set(outer)

    def _get(self) -> tuple[torch.Tensor, ...]:
        return (torch.get_rng_state(), *((torch.cuda.get_rng_state(),) if self.cuda else ()))

    def _set(self, state: tuple[torch.Tensor, ...]) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1])

    @contextlib.contextmanager
    def client(self, cid: int) -> Iterator[None]:
        outer = self._get()
        self._set(self.states[cid])
        try:
            yield
        finally:
            self.states[cid] = self._get()
            self._set(outer)

    def leave(self, cid: int) -> None:
        """Leave the global generator where the sequential loop would: after client ``cid``'s steps."""
        self._set(self.states[cid])


class _Pass:
    """Which clients the current forward pass holds, their rows and widths, and their tensors."""

    def __init__(self, rng: _ClientRng) -> None:
        self.rng = rng
        self.cids: list[int] = []
        self.widths: list[int] = []
        self.rows, self.width = 0, 0
        self.current: int | None = None  # inside one segment's head call: draws go to that client only
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.heads: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.factors: dict[str, tuple[str, str]] = {}  # LoRA layer path -> its A and B tensor names
        self.head_names: dict[str, list[str]] = {}  # head module path -> its trained tensor names

    def segments(self) -> Iterator[tuple[int, slice, int]]:
        for j, (cid, w) in enumerate(zip(self.cids, self.widths, strict=True)):
            yield cid, slice(j * self.rows, (j + 1) * self.rows), w


def layout(model: nn.Module, names: list[str]) -> tuple[dict[str, tuple[str, str]], dict[str, list[str]]]:
    """Sort the trainable tensors into LoRA layers (path -> A, B names) and head modules (path -> names).

    Raises:
        ConfigError: a trainable tensor the batched pass does not know how to apply per client.
    """
    modules = dict(model.named_modules())
    factors: dict[str, dict[str, str]] = {}
    heads: dict[str, list[str]] = {}
    for name in names:
        match = _LORA.fullmatch(name)
        if match:
            factors.setdefault(match[1], {})[match[2]] = name
        elif "lora_" in name:
            raise ConfigError(f"train.batch_clients: {name} is not a plain LoRA factor; set train.batch_clients=false")
        else:
            path = name.split(_HEAD)[0] + _HEAD if _HEAD in name else name.rsplit(".", 1)[0]
            heads.setdefault(path, []).append(name)
    for path, ab in factors.items():
        module = modules[path]
        if set(ab) != {"A", "B"} or getattr(module, "lora_variant", {}) or not hasattr(module, "base_layer"):
            raise ConfigError(f"train.batch_clients: {path} is not a plain LoRA linear; set train.batch_clients=false")
    nested = [a for a in heads for b in [*heads, *factors] if a != b and b.startswith(a + ".")]
    if nested:
        raise ConfigError(f"train.batch_clients: {nested[0]} holds other trained modules; set train.batch_clients=false")
    return {p: (ab["A"], ab["B"]) for p, ab in factors.items()}, heads


def _dropout(module: nn.Module, ctx: _Pass, orig: Callable[..., Any]) -> Callable[..., Any]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not module.training or module.p == 0:
            return orig(x)  # draws nothing (as torch's dropout returns its input untouched)
        if ctx.current is not None:  # inside one client's head
            with ctx.rng.client(ctx.cids[ctx.current]):
                return orig(x)
        if x.dim() >= 3 and x.size(1) != ctx.width:
            raise ConfigError("train.batch_clients: a dropout outside (batch, sequence, ...); set it to false")
        out = []
        for cid, rows, w in ctx.segments():
            own = x[rows, :w] if x.dim() >= 3 else x[rows]
            with ctx.rng.client(cid):
                y = orig(own.contiguous())  # the shape the sequential pass draws its mask for
            out.append(torch.cat([y, x[rows, w:]], 1) if x.dim() >= 3 and w < ctx.width else y)
        return torch.cat(out, 0)

    return forward


def _attention(ctx: _Pass, orig: Callable[..., Any] | None) -> Callable[..., Any]:
    def attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, **kw: Any) -> Any:
        fn = orig or sys.modules[type(module).__module__].eager_attention_forward
        out = []
        for cid, rows, w in ctx.segments():
            m = None if mask is None else mask[rows if mask.size(0) > 1 else slice(None), :, :w, :w]
            if m is not None and m.dtype == torch.bool and bool(m.all()):
                m = None  # as the sequential pass of an unpadded batch builds no mask
            with ctx.rng.client(cid):
                o, _ = fn(module, q[rows, :, :w], k[rows, :, :w], v[rows, :, :w], m, **kw)
            out.append(F.pad(o, (0, 0, 0, 0, 0, ctx.width - w)))  # (rows, width, heads, head_dim)
        return torch.cat(out, 0), None

    return attention


def _lora(module: nn.Module, path: str, ctx: _Pass) -> Callable[..., Any]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = module.base_layer(x, *args, **kwargs)  # the frozen base, once for every client
        a, b = ctx.stacks[path]  # (clients, r, in), (clients, out, r)
        x = module._cast_input_dtype(x, a.dtype)
        h = module.lora_dropout["default"](x)
        h = h.reshape(len(ctx.cids), -1, h.size(-1))  # each client's rows x positions, flattened
        delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2)).reshape(result.shape)
        return (result + delta * module.scaling["default"]).to(result.dtype)

    return forward


def _head(module: nn.Module, path: str, ctx: _Pass, orig: Callable[..., Any]) -> Callable[..., Any]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if ctx.current is not None:  # re-entered from functional_call below
            return orig(x, *args, **kwargs)
        out = []
        for j, (_, rows, _w) in enumerate(ctx.segments()):
            ctx.current = j
            try:
                out.append(torch.func.functional_call(module, ctx.heads[path][j], (x[rows], *args), kwargs))
            finally:
                ctx.current = None
        return torch.cat(out, 0)

    return forward


@contextlib.contextmanager
def _patched(model: nn.Module, factors: dict[str, Any], heads: dict[str, Any], ctx: _Pass) -> Iterator[None]:
    """Route the model's dropout, attention, LoRA layers and heads through ``ctx`` while inside."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modules = dict(model.named_modules())
    patches: dict[nn.Module, Callable[..., Any]] = {}
    for m in modules.values():
        if isinstance(m, nn.Dropout):
            patches[m] = _dropout(m, ctx, m.forward)
    patches |= {modules[p]: _lora(modules[p], p, ctx) for p in factors}
    patches |= {modules[p]: _head(modules[p], p, ctx, modules[p].forward) for p in heads}
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):
        raise ConfigError(f"train.batch_clients runs eager or sdpa attention, not {impl}; set it to false")
    local = ALL_ATTENTION_FUNCTIONS._local_mapping  # a per-instance override, undone below
    before = local.get(impl)
    ALL_ATTENTION_FUNCTIONS[impl] = _attention(ctx, ALL_ATTENTION_FUNCTIONS._global_mapping.get(impl))
    for m, fn in patches.items():
        m.forward = fn  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for m in patches:
            del m.forward
        if before is None:
            del ALL_ATTENTION_FUNCTIONS[impl]
        else:
            ALL_ATTENTION_FUNCTIONS[impl] = before


def _forward(model: nn.Module, ctx: _Pass, group: list[Client], batches: list[dict], pad: int) -> list[torch.Tensor]:
    """One forward pass over ``group``'s batches; returns each client's mean loss over its own rows."""
    ctx.cids = [c.cid for c in group]
    ctx.widths = [b["input_ids"].size(1) for b in batches]
    ctx.rows, ctx.width = batches[0]["input_ids"].size(0), max(ctx.widths)
    if any(b["input_ids"].size(0) != ctx.rows for b in batches) or batches[0]["labels"].dim() != 1:
        raise ConfigError("train.batch_clients needs equal batches with one label each; set it to false")
    for path, (a, b) in ctx.factors.items():
        ctx.stacks[path] = (torch.stack([c.params[a] for c in group]), torch.stack([c.params[b] for c in group]))
    for path, names in ctx.head_names.items():
        cut = len(path) + 1
        ctx.heads[path] = [{n[cut:]: c.params[n] for n in names} for c in group]
    inputs = {
        key: torch.cat([F.pad(b[key], (0, ctx.width - b[key].size(1)), value=pad if key == "input_ids" else 0) for b in batches])
        for key in batches[0]
        if key != "labels"
    }
    labels = torch.cat([b["labels"] for b in batches])
    outer = torch.get_rng_state()
    logits = model(**inputs).logits
    if not torch.equal(outer, torch.get_rng_state()):  # a draw no client owns: the masks would differ
        raise ConfigError("train.batch_clients: this model draws random numbers outside dropout; set it to false")
    n = logits.size(-1)
    if n < 2:
        raise ConfigError("train.batch_clients runs classification (2+ labels); set it to false")
    # Hugging Face's single-label classification loss, per client (CrossEntropyLoss, mean over its rows).
    return [F.cross_entropy(logits[rows].view(-1, n), labels[rows].view(-1)) for _, rows, _ in ctx.segments()]


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
    group: list[Client], model: nn.Module, data: TaskData, steps: int, round_: int, device: torch.device, per_pass: int
) -> tuple[dict[int, float], _ClientRng]:
    tc = group[0].train_cfg
    accum = tc.grad_accumulation
    rng = _ClientRng({c.cid: step_seed(tc.seed, round_, c.cid) for c in group}, device)
    ctx = _Pass(rng)
    ctx.factors, ctx.head_names = layout(model, list(group[0].params))
    sums = {c.cid: [] for c in group}  # every micro-batch's loss
    for c in group:
        c.step_losses = []
    with _patched(model, ctx.factors, ctx.head_names, ctx):
        for k in range(steps * accum):
            batches = {c.cid: collate(data.train, c.stream.next(), data.pad_token_id, device) for c in group}
            # Shortest batches together: a pass pads to its widest client, so this wastes the least.
            order = sorted(group, key=lambda c: batches[c.cid]["input_ids"].size(1))
            for start in range(0, len(order), per_pass):
                part = order[start : start + per_pass]
                with autocast(tc.mixed_precision, device):
                    losses = _forward(model, ctx, part, [batches[c.cid] for c in part], data.pad_token_id)
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
    ``per_pass`` (None = all) in one forward pass. The result and every client's state are those of
    ``{c.cid: c.local_steps(model, data, steps[c.cid], round_, device) for c in clients}`` up to float
    rounding, the global random generator included.
    """
    if not clients:
        return {}
    model.train()
    out: dict[int, float] = {}
    last = None
    for k in dict.fromkeys(steps[c.cid] for c in clients):
        group = [c for c in clients if steps[c.cid] == k]
        losses, rng = _same_k(group, model, data, k, round_, device, per_pass or len(group))
        out |= losses
        if steps[clients[-1].cid] == k:
            last = rng
    assert last is not None
    last.leave(clients[-1].cid)
    return {c.cid: out[c.cid] for c in clients}


def enabled(cfg: Any, local_clients: int) -> bool:
    """Whether the trainer batches its clients: ``true``, or ``auto`` where supported and worth it."""
    from declora.config.training import batch_clients_refusal

    mode = cfg.train.batch_clients
    return mode is True or (mode == "auto" and local_clients > 1 and batch_clients_refusal(cfg) is None)
