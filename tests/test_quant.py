"""Group-wise quantization primitives: ranges, round trips and error bounds."""

import pytest
import torch

from awqforge.quant import compute_qparams, dequantize, fake_quantize, quantize_tensor


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("zero_point", [True, False])
def test_codes_in_range_and_error_bounded(bits, group_size, zero_point):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    qt = quantize_tensor(w, bits, group_size, zero_point)
    assert qt.qweight.dtype == torch.uint8
    assert int(qt.qweight.max()) <= 2**bits - 1
    g = 128 if group_size == -1 else group_size
    assert qt.scales.shape == (48, 128 // g)
    err = (qt.dequantize() - w).abs().reshape(48, 128 // g, g)
    # Round to nearest: at most half a step, except where the symmetric range clips the most negative value.
    bound = qt.scales.unsqueeze(-1) * (0.5 if zero_point else 1.0) + 1e-6
    assert bool((err <= bound).all())


def test_symmetric_zero_is_midpoint():
    w = torch.randn(8, 64)
    qt = quantize_tensor(w, 4, 32, zero_point=False)
    assert bool((qt.zeros == 8).all())


def test_fake_quantize_matches_dequantize_and_keeps_dtype():
    w = torch.randn(16, 64, dtype=torch.bfloat16)
    fq = fake_quantize(w, 4, 32)
    assert fq.dtype == torch.bfloat16
    s, z = compute_qparams(w, 4, 32)
    qt = quantize_tensor(w, 4, 32)
    torch.testing.assert_close(fq.float(), dequantize(qt.qweight, s, z, 32).bfloat16().float())


def test_group_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        compute_qparams(torch.randn(4, 96), 4, 64)


def test_more_bits_less_error():
    w = torch.randn(64, 256)
    errs = [float((fake_quantize(w, b, 64) - w).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
