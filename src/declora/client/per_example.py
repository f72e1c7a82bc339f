"""Per-example gradients for DP-SGD (declora.client.dp_sgd): each example's gradient of its own loss.

Two ways, one result (tests/client/test_per_example.py checks them equal):

- **hooks** (Opacus' trick, used whenever it applies): one ordinary batched forward and backward of
  the *sum* of the per-example losses through ``functional_call``. A forward hook on every
  ``nn.Linear`` whose weight or bias is trained keeps its input ``x`` (B, ..., in) and a hook on its
  output receives ``g = dloss/doutput`` (B, ..., out); example b's gradient is then
  ``g_b^T x_b`` (out, in) for the weight and ``sum g_b`` (out) for the bias, summed over the middle
  (token) dimensions and over the module's calls. Exact because examples never meet in the forward
  pass (no batch norm; padding is masked). It applies when every trained tensor is the weight or bias
  of a plain ``nn.Linear`` used only by that module (LoRA's ``lora_A``/``lora_B``, peft's
  ``modules_to_save`` copies of a linear head) and the loss is one we can write per example:
  single-label sequence classification (cross-entropy) or a causal LM (the mean cross-entropy over
  the example's own target tokens, as transformers computes it). Cost: that of one non-private
  forward and backward (measured 0.96-1.00x on MiniLM), 1.04x / 1.74x faster than vmap on 64 / 256
  sentences and 1.6x less peak memory (``benchmarks/dp_memory.py --compare-paths``, 2 CPU threads).
- **vmap**: ``torch.func.vmap`` over ``grad`` of the same ``functional_call``, any trained tensor of
  any module type (ia3 vectors, prompt embeddings, LayerNorms, regression heads...).

A guard keeps the hooks honest: the batched backward also gives the summed gradient of every trained
tensor; if the per-example gradients do not add up to it (a trained tensor used outside its Linear's
forward, a layer that flattens the batch), the step is recomputed with vmap and a warning is issued.

One documented difference: a causal example without any target token (every label -100; the data
pipeline never makes one) has loss 0 and gradient 0 under hooks, NaN under vmap (transformers'
mean over no tokens).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from declora.types import State

IGNORE = -100  # transformers' and torch's ignore_index for LM labels


class HooksMissedGradient(RuntimeError):
    """The per-example gradients of the hook path do not add up to the batch's gradient.

    ``key`` names what was missed (a tensor, a module type), without numbers: one warning per key."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key


def _attention_mask_4d(model: nn.Module, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """The (B, 1, q, k) mask transformers takes as-is: its own 2D -> 4D conversion inspects the mask's
    values (``padding_mask.all()``), which vmap cannot batch. Right padding (declora.data.loading.collate)."""
    keep = mask[:, None, None, :].bool()
    if causal:
        n = mask.shape[1]
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()[None, None]
    if getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") != "eager":
        return keep  # sdpa: True = attend
    dtype = next(model.parameters()).dtype
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


def vmap_per_example_grads(
    model: nn.Module, params: State, batch: dict[str, torch.Tensor], causal: bool = False
) -> tuple[State, torch.Tensor]:
    """Each example's gradient of its own loss w.r.t. the tensors of ``params`` that require grad (vmap).

    Returns:
        ``(grads, losses)``: name -> (B, *shape) gradients, and the (B,) per-example losses.
    """
    from torch.func import functional_call, grad, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    trained = {n: p.detach() for n, p in params.items() if p.requires_grad}
    fixed = {n: p.detach() for n, p in params.items() if not p.requires_grad}

    def loss_of_one(tensors: State, example: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        one = {k: v.unsqueeze(0) for k, v in example.items()}
        loss = functional_call(model, fixed | tensors, args=(), kwargs=one, strict=False).loss
        return loss, loss.detach()

    batched = dict(batch)
    if "attention_mask" in batched:
        batched["attention_mask"] = _attention_mask_4d(model, batch["attention_mask"], causal)
    with sdpa_kernel(SDPBackend.MATH):  # the math kernel has vmap rules (the fused ones fall back to a loop)
        return vmap(grad(loss_of_one, has_aux=True), in_dims=(None, 0), randomness="different")(trained, batched)


def _linear_of(model: nn.Module, name: str) -> tuple[nn.Linear, str] | None:
    """The plain ``nn.Linear`` whose ``weight``/``bias`` is parameter ``name``, and which of the two."""
    path, _, attr = name.rpartition(".")
    if attr not in ("weight", "bias"):
        return None
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    # exactly nn.Linear: subclasses may not run forward (MultiheadAttention's out_proj) or run another one
    return (module, attr) if type(module) is nn.Linear else None


def _why_not_hooks(model: nn.Module, params: State, causal: bool) -> str | None:
    """None when the hook path computes the per-example gradients exactly, else why not (for the docs)."""
    trained = [n for n, p in params.items() if p.requires_grad]
    if not trained:
        return "nothing is trained"
    config = getattr(model, "config", None)
    if config is None:
        return "not a transformers model (no config: the loss is unknown)"
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return "gradient checkpointing (its recomputation would fire the forward hooks twice)"
    if not causal and (
        getattr(config, "problem_type", None) not in (None, "single_label_classification")
        or getattr(config, "num_labels", 0) < 2
    ):
        return "the loss is regression or multi-label"
    owners: dict[int, set[int]] = {}  # parameter -> the modules holding it (tied weights: several)
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(id(model.get_submodule(n.rpartition(".")[0])))
    own = dict(model.named_parameters())
    for name in trained:
        if _linear_of(model, name) is None:
            return f"{name} is not the weight or bias of an nn.Linear"
        if name in own and len(owners[id(own[name])]) > 1:
            return f"{name} is tied to another module's parameter"
    return None


def hooks_apply(model: nn.Module, params: State, causal: bool = False) -> bool:
    """Whether :func:`per_example_grads` takes the hook path for this model and trained set (see module doc)."""
    return _why_not_hooks(model, params, causal) is None


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B,) float32 losses, each what transformers' ``model(**one_example).loss`` gives for that example.

    Sequence classification: cross-entropy of the example's label. Causal LM: the mean cross-entropy of
    the next-token predictions over the example's target tokens (labels != -100; 0 when it has none).
    """
    logits = logits.float()  # transformers upcasts before its loss too
    if not causal:
        return nn.functional.cross_entropy(logits.view(len(labels), -1), labels.view(-1), reduction="none")
    targets = labels[:, 1:]
    tokens = nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
    )  # (B, T - 1): 0 on ignored positions
    return tokens.sum(1) / (targets != IGNORE).sum(1).clamp(min=1)


def _capture(names: dict[str, str], grads: State, size: int, bad: list[str]) -> Callable[..., None]:
    """A forward hook for one Linear: on each call, a hook on its output that adds every example's
    gradient of the module's ``names`` (attr -> parameter name) into ``grads``."""

    def forward_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> None:
        if not out.requires_grad:
            return
        x = args[0] if args else kwargs["input"]
        if x.dim() < 2 or x.shape[0] != size:  # the batch dimension is not first: no per-example split
            bad.append(type(module).__name__)
            return

        def on_grad(g: torch.Tensor) -> None:
            # autocast ran the matmul on x rounded to the output's dtype: use the same operand
            g3 = g.reshape(size, -1, g.shape[-1]).float()
            if "weight" in names:
                x3 = x.detach().to(g.dtype).reshape(size, -1, x.shape[-1]).float()
                grads[names["weight"]].add_(torch.bmm(g3.transpose(1, 2), x3))  # (B, out, in)
            if "bias" in names:
                grads[names["bias"]].add_(g3.sum(1))

        out.register_hook(on_grad)

    return forward_hook


def _check_sums(grads: State, total: dict[str, torch.Tensor], tol: float) -> None:
    """Raise :class:`HooksMissedGradient` unless the per-example gradients add up to the batch's.

    The error is measured against the examples' summed norms, not the sum's norm: examples of
    opposite labels cancel, and rounding (bf16 above all) scales with the terms, not their sum."""
    for name, g in total.items():
        summed = grads[name].sum(0)
        err = (summed - g.float()).norm()
        if err > tol * max(grads[name].flatten(1).norm(dim=1).sum(), g.float().norm()):
            raise HooksMissedGradient(name, f"the per-example gradients miss {err:.3g} of the batch gradient")


def hook_per_example_grads(
    model: nn.Module, params: State, batch: dict[str, torch.Tensor], causal: bool = False
) -> tuple[State, torch.Tensor]:
    """Each example's gradient of its own loss (hooks on the trained Linears; see the module doc).

    Returns:
        ``(grads, losses)``: name -> (B, *shape) float32 gradients, and the (B,) detached losses.

    Raises:
        ValueError: the hook path does not apply (see :func:`hooks_apply`).
        HooksMissedGradient: the per-example gradients do not add up to the batch's gradient.
    """
    why = _why_not_hooks(model, params, causal)
    if why is not None:
        raise ValueError(f"per-example gradients by hooks do not apply: {why}")
    return _by_hooks(model, params, batch, causal)


def _by_hooks(
    model: nn.Module, params: State, batch: dict[str, torch.Tensor], causal: bool
) -> tuple[State, torch.Tensor]:
    """:func:`hook_per_example_grads` once :func:`hooks_apply` said yes."""
    from torch.func import functional_call

    # fresh leaves: the client's own tensors' .grad stay untouched
    trained = {n: p.detach().requires_grad_() for n, p in params.items() if p.requires_grad}
    fixed = {n: p.detach() for n, p in params.items() if not p.requires_grad}
    inputs = dict(batch)
    labels = inputs.pop("labels")
    size = len(labels)
    grads = {n: torch.zeros((size, *p.shape), dtype=torch.float32, device=p.device) for n, p in trained.items()}
    modules: dict[int, tuple[nn.Module, dict[str, str]]] = {}
    for name in trained:
        module, attr = _linear_of(model, name)  # type: ignore[misc]  # checked by hooks_apply
        modules.setdefault(id(module), (module, {}))[1][attr] = name
    bad: list[str] = []
    handles = []
    try:  # the hooks live for this call only
        for module, names in modules.values():
            handles.append(module.register_forward_hook(_capture(names, grads, size, bad), with_kwargs=True))
        logits = functional_call(model, fixed | trained, args=(), kwargs=inputs, strict=False).logits
        losses = per_example_losses(logits, labels, causal)
        total = torch.autograd.grad(losses.sum(), list(trained.values()), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if bad:
        raise HooksMissedGradient(bad[0], f"called on an input whose first dimension is not the batch of {size}")
    device = next(iter(trained.values())).device
    low = [next(model.parameters()), *trained.values()]  # a bf16/fp16 base, or adapters
    reduced = torch.is_autocast_enabled(device.type) or any(p.dtype != torch.float32 for p in low)
    sums = [torch.zeros_like(p) if g is None else g for g, p in zip(total, trained.values(), strict=True)]
    _check_sums(grads, dict(zip(trained, sums, strict=True)), tol=1e-2 if reduced else 1e-3)
    return grads, losses.detach()


def per_example_grads(
    model: nn.Module, params: State, batch: dict[str, torch.Tensor], causal: bool = False
) -> tuple[State, torch.Tensor]:
    """Each example's gradient of its own loss w.r.t. the tensors of ``params`` that require grad:
    by hooks where :func:`hooks_apply` (and the labels are class indices), else by vmap.

    Returns:
        ``(grads, losses)``: name -> (B, *shape) float32 gradients, and the (B,) per-example losses.
    """
    labels = batch.get("labels")
    if labels is not None and not labels.is_floating_point() and hooks_apply(model, params, causal):
        try:
            return _by_hooks(model, params, batch, causal)
        except HooksMissedGradient as err:  # privacy needs the exact per-example gradient: recompute it
            # no numbers in the message: Python's warning registry then shows it once per key
            msg = f"per-example gradients by hooks missed part of {err.key}; using vmap (slower, exact)"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return vmap_per_example_grads(model, params, batch, causal)
