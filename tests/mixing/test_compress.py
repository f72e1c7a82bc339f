"""Quantization maths: error bounds, unbiased stochastic rounding, bit packing, real payload sizes."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import roundtrip

from declora.comm.base import message_bytes
from declora.mixing.compress import Quantizer, dequantize, levels, pack_bits, quantize, unpack_bits


def lora_like_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Shapes of a LoRA pair, a head matrix, a bias and an all-zero B (odd sizes on purpose)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_A": torch.rand(4, 37, generator=g) - 0.5,
        "lora_B": torch.randn(37, 4, generator=g) * 1e-2,
        "head.weight": torch.randn(3, 37, generator=g),
        "head.bias": torch.randn(3, generator=g),
        "zero_B": torch.zeros(5, 4),
    }


def row_scales(x: torch.Tensor, bits: int, scale: str) -> torch.Tensor:
    """The step size s of every entry of x, broadcast to x's shape."""
    rows = x.reshape(x.shape[0], -1) if scale == "row" and x.ndim >= 2 else x.reshape(1, -1)
    s = rows.abs().amax(1, keepdim=True) / levels(bits)
    return s.expand_as(rows).reshape(x.shape)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("scale", ["tensor", "row"])
def test_nearest_rounding_errs_by_at_most_half_a_step(bits: int, scale: str) -> None:
    for name, x in lora_like_state().items():
        codes, scales = quantize(x, bits, scale, "nearest")
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 * levels(bits)
        err = (dequantize(codes, scales, bits, scale) - x).abs()
        s = row_scales(x, bits, scale)
        assert bool((err <= s / 2 + 1e-7 * s.clamp_min(1e-30)).all()), name
        # the largest entry of every row (per scale) is exact
        assert float(err.max()) <= float(s.max()) / 2 + 1e-7


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("scale", ["tensor", "row"])
def test_stochastic_rounding_errs_by_less_than_a_step(bits: int, scale: str) -> None:
    g = torch.Generator().manual_seed(1)
    for name, x in lora_like_state().items():
        codes, scales = quantize(x, bits, scale, "stochastic", g)
        err = (dequantize(codes, scales, bits, scale) - x).abs()
        s = row_scales(x, bits, scale)
        assert bool((err <= s * (1 + 1e-6)).all()), name
        if float(s.max()) > 0:
            assert bool((err[s > 0] < s[s > 0] * (1 + 1e-6)).all())


def test_stochastic_rounding_is_unbiased_and_nearest_is_not() -> None:
    draws, bits = 4000, 2
    g = torch.Generator().manual_seed(2)
    x = torch.rand(64, generator=g) * 2 - 1
    x[0] = 1.0  # fixes the scale at 1 (ternary: steps of 1)
    s = float(x.abs().max()) / levels(bits)
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(draws):
        codes, scales = quantize(x, bits, "tensor", "stochastic", g)
        total += dequantize(codes, scales, bits).double()
    mean = total / draws
    # each draw has variance <= s^2 / 4, so the mean of 4000 draws has std <= s / (2 sqrt(4000)) ~ 0.008 s;
    # 5 standard deviations leaves a false alarm rate below 1e-6 per entry
    bound = 5 * s / (2 * math.sqrt(draws))
    assert float((mean - x.double()).abs().max()) < bound
    nearest = dequantize(*quantize(x, bits, "tensor", "nearest"), bits)
    assert float((nearest - x).abs().max()) > 10 * bound  # the test can tell a biased quantizer apart


def test_stochastic_rounding_is_reproducible_from_the_generator_seed() -> None:
    x = lora_like_state()["head.weight"]
    a = quantize(x, 4, "row", "stochastic", torch.Generator().manual_seed(5))[0]
    b = quantize(x, 4, "row", "stochastic", torch.Generator().manual_seed(5))[0]
    c = quantize(x, 4, "row", "stochastic", torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1001])
def test_pack_then_unpack_is_the_identity(bits: int, numel: int) -> None:
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, numel), codes)


def test_pack_bits_golden_bytes() -> None:
    # 4-bit: low nibble first; 2-bit: the first code in the lowest two bits
    assert pack_bits(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]
    assert pack_bits(torch.tensor([1, 2, 3, 0, 2], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b10]


@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
@pytest.mark.parametrize("scale", ["tensor", "row"])
def test_payload_bytes_match_the_encoded_message(bits: int, scale: str) -> None:
    state = lora_like_state()
    q = Quantizer(bits, scale)
    message = q.encode(state)
    assert message_bytes(message) == q.payload_bytes(state)
    decoded = q.decode(message, state)
    assert decoded.keys() == state.keys()
    assert all(decoded[n].shape == t.shape and decoded[n].dtype == t.dtype for n, t in state.items())


def test_four_bit_payload_is_an_eighth_of_fp32_plus_scales() -> None:
    g = torch.Generator().manual_seed(3)
    state = {"A": torch.randn(16, 768, generator=g), "B": torch.randn(768, 16, generator=g), "b": torch.randn(2)}
    fp32 = message_bytes(Quantizer(32).encode(state))
    assert fp32 == 4 * (2 * 16 * 768 + 2)
    per_tensor = message_bytes(Quantizer(4, "tensor").encode(state))
    assert per_tensor == fp32 // 8 + 3 * 4  # numel / 2 bytes of codes + one fp32 scale per tensor
    per_row = message_bytes(Quantizer(4, "row").encode(state))
    assert per_row == fp32 // 8 + (16 + 768 + 1) * 4  # one scale per row of each matrix
    assert message_bytes(Quantizer(2, "tensor").encode(state)) == (3072 + 3072 + 1) + 3 * 4  # ceil per tensor
    assert message_bytes(Quantizer(8, "tensor").encode(state)) == fp32 // 4 + 3 * 4
    assert message_bytes(Quantizer(16).encode(state)) == fp32 // 2


def test_zero_tensors_stay_exactly_zero_and_32_bits_is_the_identity() -> None:
    state = lora_like_state()
    for bits in (8, 4, 2):
        assert torch.equal(roundtrip(Quantizer(bits), state)["zero_B"], state["zero_B"])
    assert Quantizer(32).encode(state) is state
    half = roundtrip(Quantizer(16), state)
    for name, t in state.items():
        torch.testing.assert_close(half[name], t, rtol=2**-11, atol=1e-7)


def test_quantizer_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="bits=3"):
        Quantizer(3)
    with pytest.raises(ValueError, match="scale"):
        Quantizer(4, "column")
    with pytest.raises(ValueError, match="rounding"):
        Quantizer(4, "tensor", "up")
