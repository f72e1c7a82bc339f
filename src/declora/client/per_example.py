"""Per-example gradients for DP-SGD (declora.client.dp_sgd): each example's gradient of its own loss.

``torch.func``: ``vmap`` over ``grad`` of the same ``functional_call`` that swaps a peer's tensors into
the one shared base, so any trained tensor of any module type gets its per-example gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from declora.types import State


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


def per_example_grads(
    model: nn.Module, params: State, batch: dict[str, torch.Tensor], causal: bool = False
) -> tuple[State, torch.Tensor]:
    """Each example's gradient of its own loss w.r.t. the tensors of ``params`` that require grad.

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
