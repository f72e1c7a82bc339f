"""How one forward pass runs many clients through the shared model (``train.batch_clients``).

While :func:`patched` is active, every ``nn.Dropout``, the attention function, each LoRA layer and each
head module of the model route through a :class:`Pass`: dropout and attention per client segment with
that client's random generator (:class:`ClientRng`), LoRA as a batched matmul over the clients' stacked
factors, heads per client through ``torch.func.functional_call``. :func:`forward` runs one pass and
returns each client's loss. The steps around it are :mod:`declora.client.batched`'s.
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

from declora.client.client import Client
from declora.errors import ConfigError

_LORA = re.compile(r"(.+)\.lora_([AB])\.default\.weight")
_HEAD = ".modules_to_save.default"


class ClientRng:
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


class Pass:
    """Which clients the current forward pass holds, their rows and widths, and their tensors."""

    def __init__(self, rng: ClientRng) -> None:
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
        raise ConfigError(f"train.batch_clients: {nested[0]} holds other trained modules; set it to false")
    return {p: (ab["A"], ab["B"]) for p, ab in factors.items()}, heads


def _dropout(module: nn.Module, ctx: Pass, orig: Callable[..., Any]) -> Callable[..., Any]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not module.training or module.p == 0:
            return orig(x)  # draws nothing (as torch's dropout returns its input untouched)
        if ctx.current is not None:  # inside one client's head
            with ctx.rng.client(ctx.cids[ctx.current]):
                return orig(x)
        if x.dim() >= 3 and x.size(1) != ctx.width:
            raise ConfigError("train.batch_clients: a dropout outside (batch, sequence, ...); set it to false")
        # One product with a mask built outside autograd: slicing x per client instead would make the
        # backward allocate a full-size gradient per client (quadratic in the clients of a pass).
        with torch.no_grad():
            mask = torch.ones_like(x)  # padding positions pass unchanged
            for cid, rows, w in ctx.segments():
                own = mask[rows, :w] if x.dim() >= 3 else mask[rows]
                with ctx.rng.client(cid):  # dropout(1) = the client's scaled mask, drawn for its own shape
                    own.copy_(orig(torch.ones(own.shape, dtype=x.dtype, device=x.device)))
        return x * mask  # = torch's dropout: input * (bernoulli / (1 - p))

    return forward


def _attention(ctx: Pass, orig: Callable[..., Any] | None) -> Callable[..., Any]:
    def attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, **kw: Any) -> Any:
        fn = orig or sys.modules[type(module).__module__].eager_attention_forward
        out, qs, ks, vs = [], q.split(ctx.rows), k.split(ctx.rows), v.split(ctx.rows)  # split: one backward
        for j, (cid, rows, w) in enumerate(ctx.segments()):
            m = None if mask is None else mask[rows if mask.size(0) > 1 else slice(None), :, :w, :w]
            if m is not None and m.dtype == torch.bool and bool(m.all()):
                m = None  # as the sequential pass of an unpadded batch builds no mask
            with ctx.rng.client(cid):
                o, _ = fn(module, qs[j][:, :, :w], ks[j][:, :, :w], vs[j][:, :, :w], m, **kw)
            out.append(F.pad(o, (0, 0, 0, 0, 0, ctx.width - w)))  # (rows, width, heads, head_dim)
        return torch.cat(out, 0), None

    return attention


def _lora(module: nn.Module, path: str, ctx: Pass) -> Callable[..., Any]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = module.base_layer(x, *args, **kwargs)  # the frozen base, once for every client
        a, b = ctx.stacks[path]  # (clients, r, in), (clients, out, r)
        x = module._cast_input_dtype(x, a.dtype)
        h = module.lora_dropout["default"](x)
        h = h.reshape(len(ctx.cids), -1, h.size(-1))  # each client's rows x positions, flattened
        delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2)).reshape(result.shape)
        return (result + delta * module.scaling["default"]).to(result.dtype)

    return forward


def _head(module: nn.Module, path: str, ctx: Pass, orig: Callable[..., Any]) -> Callable[..., Any]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if ctx.current is not None:  # re-entered from functional_call below
            return orig(x, *args, **kwargs)
        out = []
        for j, own in enumerate(x.split(ctx.rows)):
            ctx.current = j
            try:
                out.append(torch.func.functional_call(module, ctx.heads[path][j], (own, *args), kwargs))
            finally:
                ctx.current = None
        return torch.cat(out, 0)

    return forward


@contextlib.contextmanager
def patched(model: nn.Module, factors: dict[str, Any], heads: dict[str, Any], ctx: Pass) -> Iterator[None]:
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


def forward(model: nn.Module, ctx: Pass, group: list[Client], batches: list[dict], pad: int) -> list[torch.Tensor]:
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

    def padded(key: str) -> torch.Tensor:  # to the pass's width: pad tokens, attention mask 0, token type 0
        fill = pad if key == "input_ids" else 0
        return torch.cat([F.pad(b[key], (0, ctx.width - b[key].size(1)), value=fill) for b in batches])

    inputs = {key: padded(key) for key in batches[0] if key != "labels"}
    labels = torch.cat([b["labels"] for b in batches])
    outer = torch.get_rng_state()
    logits = model(**inputs).logits
    if not torch.equal(outer, torch.get_rng_state()):  # a draw no client owns: the masks would differ
        raise ConfigError("train.batch_clients: this model draws random numbers outside dropout; set it to false")
    n = logits.size(-1)
    if n < 2:
        raise ConfigError("train.batch_clients runs classification (2+ labels); set it to false")
    # Hugging Face's single-label classification loss, per client (CrossEntropyLoss, mean over its rows).
    pairs = zip(logits.split(ctx.rows), labels.split(ctx.rows), strict=True)
    return [F.cross_entropy(own.view(-1, n), y.view(-1)) for own, y in pairs]
