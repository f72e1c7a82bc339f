"""Message compression for gossip: uniform quantization, bit packing, encode/decode of a whole state.

Pure tensor maths: nothing here knows about clients, graphs or processes.

Scheme (``bits`` in 8, 4, 2): symmetric uniform quantization with ``L = 2**(bits-1) - 1`` levels on
each side of zero, so zero is exact (LoRA B starts at zero) and ``Q(-x) = -Q(x)``::

    s = max|x| / L                      (one scale per tensor, or one per row of a matrix)
    q = round(x / s)   in [-L, L]       (nearest, or stochastic: floor(x / s + u), u ~ U[0, 1))
    Q(x) = s * q

Nearest rounding errs by at most ``s / 2`` per entry; stochastic rounding by less than ``s`` and is
unbiased, ``E[Q(x)] = x``. At 2 bits this is ternary ({-s, 0, s}). The codes ``q + L`` (unsigned,
< 2**bits) are packed ``8 // bits`` to a byte, so a 4-bit message really is ``numel / 2`` bytes plus
one fp32 scale per tensor (or per row). ``bits=16`` casts to float16, ``bits=32`` sends the state as is.

A :data:`Message` is a ``dict[str, torch.Tensor]`` (``name::codes`` uint8, ``name::scale`` float32),
so a communicator sends it as any other state and counts its real bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from declora.types import Message, State

BITS = (32, 16, 8, 4, 2)
SCALES = ("tensor", "row")
ROUNDINGS = ("nearest", "stochastic")
CODES, SCALE, HALF = "::codes", "::scale", "::fp16"


def levels(bits: int) -> int:
    """``L``: the largest code magnitude (codes are integers in ``[-L, L]``); 127, 7 or 1."""
    if bits not in (8, 4, 2):
        raise ValueError(f"integer quantization supports 8, 4 or 2 bits, not {bits}")
    return 2 ** (bits - 1) - 1


def _rows(x: torch.Tensor, scale: str) -> torch.Tensor:
    """(R, C) view: one row per scale (R = 1 for per-tensor scale and for vectors)."""
    if scale == "row" and x.ndim >= 2:
        return x.reshape(x.shape[0], -1)
    return x.reshape(1, -1)


def quantize(
    x: torch.Tensor,
    bits: int,
    scale: str = "tensor",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to unsigned integer codes and their scales.

    Args:
        x: any float tensor.
        bits: 8, 4 or 2.
        scale: ``tensor`` (one scale) or ``row`` (one per index of the first dimension of a matrix).
        rounding: ``nearest`` or ``stochastic`` (needs ``generator`` for reproducible draws).
        generator: CPU generator for the stochastic rounding noise.

    Returns:
        ``codes``: uint8, same shape as ``x``, values in ``[0, 2L]`` (``q + L``);
        ``scales``: float32 of shape (R,), R = 1 or ``x.shape[0]``.
    """
    L = levels(bits)
    rows = _rows(x.detach(), scale).float()
    s = rows.abs().amax(dim=1, keepdim=True) / L  # (R, 1)
    y = rows / torch.where(s > 0, s, torch.ones_like(s))
    if rounding == "stochastic":
        noise = torch.rand(y.shape, generator=generator, dtype=torch.float32)
        q = torch.floor(y + noise.to(y.device))
    elif rounding == "nearest":
        q = torch.round(y)
    else:
        raise ValueError(f"rounding={rounding!r} is not one of {', '.join(ROUNDINGS)}")
    codes = (q.clamp_(-L, L) + L).to(torch.uint8)
    return codes.reshape(x.shape), s.reshape(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, scale: str = "tensor") -> torch.Tensor:
    """``s * (codes - L)``: the float32 tensor that :func:`quantize` encoded (shape of ``codes``)."""
    rows = _rows(codes, scale).float() - levels(bits)
    return (rows * scales.reshape(-1, 1).float()).reshape(codes.shape)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) ``8 // bits`` to a byte, little end first.

    Returns:
        uint8 of shape (ceil(numel * bits / 8),).
    """
    flat = codes.reshape(-1).to(torch.uint8)
    per_byte = 8 // bits
    if per_byte == 1:
        return flat.clone()
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.reshape(-1, per_byte)
    packed = torch.zeros(groups.shape[0], dtype=torch.uint8, device=flat.device)
    for k in range(per_byte):
        packed |= groups[:, k] << (bits * k)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes, uint8, flat."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed[:numel]
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    return ((packed.reshape(-1, 1) >> shifts) & mask).reshape(-1)[:numel]


@dataclass(frozen=True)
class Quantizer:
    """Encodes a whole state into a packed :data:`Message` and decodes it back.

    Attributes:
        bits: 32 (identity), 16 (float16 cast), 8, 4 or 2 (uniform quantization, packed).
        scale: ``tensor`` or ``row`` (integer bit widths only).
        rounding: ``nearest`` or ``stochastic`` (integer bit widths only).
    """

    bits: int = 32
    scale: str = "tensor"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits} is not one of {', '.join(map(str, BITS))}")
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r} is not one of {', '.join(SCALES)}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding={self.rounding!r} is not one of {', '.join(ROUNDINGS)}")

    @property
    def exact(self) -> bool:
        """Whether decode(encode(x)) == x bit for bit."""
        return self.bits == 32

    def encode(self, state: State, generator: torch.Generator | None = None) -> Message:
        """The message carrying ``state``; tensors are encoded in ``state``'s order.

        ``bits=32`` returns ``state`` itself (no copy): callers must not mutate it afterwards.
        """
        if self.bits == 32:
            return state
        if self.bits == 16:
            return {name + HALF: t.detach().to(torch.float16) for name, t in state.items()}
        message: Message = {}
        for name, t in state.items():
            codes, scales = quantize(t, self.bits, self.scale, self.rounding, generator)
            message[name + CODES] = pack_bits(codes, self.bits)
            message[name + SCALE] = scales
        return message

    def decode(self, message: Message, like: State) -> State:
        """The state a receiver reconstructs; names, shapes and dtypes come from ``like``."""
        if self.bits == 32:
            return {name: message[name] for name in like}
        if self.bits == 16:
            return {name: message[name + HALF].to(t.dtype) for name, t in like.items()}
        out: State = {}
        for name, t in like.items():
            codes = unpack_bits(message[name + CODES], self.bits, t.numel()).reshape(t.shape)
            out[name] = dequantize(codes, message[name + SCALE], self.bits, self.scale).to(t.dtype)
        return out

    def payload_bytes(self, state: State) -> int:
        """Bytes of ``encode(state)`` without encoding: packed codes + fp32 scales (or the cast size)."""
        if self.bits in (32, 16):
            return sum(t.numel() * (t.element_size() if self.bits == 32 else 2) for t in state.values())
        total = 0
        for t in state.values():
            total += -(-t.numel() * self.bits // 8) + 4 * _rows(t, self.scale).shape[0]
        return total
