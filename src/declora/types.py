"""The two tensor-dict types every layer passes around, defined once.

A ``State`` is one client's trainable tensors by parameter name (LoRA A/B, the task head); a ``Message``
is what goes on the wire: a state, or an encoded (packed, compressed) state.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]
Message = dict[str, torch.Tensor]

__all__ = ["Message", "State"]
