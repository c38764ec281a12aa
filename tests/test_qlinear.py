"""QuantLinear: construction, buffers, round trips, kernel dispatch vs reference, fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import awqforge
from awqforge import packing
from awqforge.kernels import cpu
from awqforge.qlinear import QuantLinear
from awqforge.quant import QuantizedTensor, quantize_tensor


@pytest.fixture(autouse=True, scope="module")
def built_kernel():
    cpu.load_extension(allow_build=True)  # scripts/install.sh builds it; compiled here otherwise


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_exported_lazily():
    assert awqforge.QuantLinear is QuantLinear


def test_awq_buffers_are_the_checkpoint_tensors():
    qt = quantize_tensor(torch.randn(64, 256), 4, 128)
    layer = QuantLinear.from_quantized(qt, torch.randn(64), dtype=torch.float16)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "bias"}
    awq = packing.pack_awq_gemm(qt)
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(sd[name], awq[name]), name
    back = layer.quantized_tensor()
    assert torch.equal(back.qweight, qt.qweight) and torch.equal(back.zeros, qt.zeros)
    assert (back.bits, back.group_size) == (4, 128)


@pytest.mark.parametrize("bits,out_f", [(4, 64), (4, 36), (2, 40), (3, 24), (8, 16)])
def test_round_trip_every_width(bits, out_f):
    qt = quantize_tensor(torch.randn(out_f, 96), bits, 32)
    layer = QuantLinear.from_quantized(qt, dtype=torch.float32)
    assert layer.layout == ("awq_gemm" if bits == 4 and out_f % 8 == 0 else "dense")
    back = layer.quantized_tensor()
    assert torch.equal(back.qweight, qt.qweight) and torch.equal(back.zeros, qt.zeros)
    assert torch.equal(back.scales, qt.scales)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, -1])
def test_forward_matches_reference(bits, dtype, group_size):
    torch.manual_seed(bits)
    linear = nn.Linear(128, 72, bias=True).to(dtype)
    layer = QuantLinear.from_linear(linear, bits=bits, group_size=group_size)
    assert layer.dtype == dtype
    x = torch.randn(3, 7, 128).to(dtype)
    y = layer(x)
    ref = layer.reference_forward(x)
    assert y.shape == (3, 7, 72) and y.dtype == dtype
    assert rel_err(y, ref) < (2e-4 if dtype == torch.float32 else 1e-2)  # int16-rounded x on SIMD paths
    # and the quantization itself is sane: close to the FP layer at 8 bits
    if bits == 8:
        assert rel_err(y, linear(x)) < 0.05


def test_state_dict_round_trip_and_cache_invalidation():
    torch.manual_seed(0)
    a = QuantLinear.from_linear(nn.Linear(128, 64, bias=False), group_size=64)
    b = QuantLinear.from_linear(nn.Linear(128, 64, bias=False), group_size=64)
    x = torch.randn(2, 128)
    yb = b(x)  # builds b's CPU layout cache
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))
    assert not torch.allclose(b(x), yb)


def test_kernels_can_be_switched_off(monkeypatch):
    layer = QuantLinear.from_linear(nn.Linear(64, 32), group_size=32)
    calls = []
    monkeypatch.setattr(
        QuantLinear, "reference_forward", lambda self, x: calls.append(1) or x @ torch.zeros(64, 32)
    )
    layer(torch.randn(1, 64))
    assert not calls
    monkeypatch.setenv("AWQFORGE_KERNELS", "0")
    layer(torch.randn(1, 64))
    assert calls


def test_failed_cpu_build_falls_back_with_warning(monkeypatch):
    def broken(allow_build=None, verbose=False):
        raise cpu.KernelBuildError("building the AWQForge CPU kernel in /nowhere failed: no compiler")

    monkeypatch.setattr(cpu, "load_extension", broken)
    monkeypatch.setattr("awqforge.qlinear._warned", set())
    layer = QuantLinear.from_linear(nn.Linear(64, 32), group_size=32)
    x = torch.randn(2, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
    assert any("no compiler" in str(w.message) for w in caught)
    torch.testing.assert_close(y, layer.reference_forward(x))


def test_rejects_mismatched_quantized_tensor():
    layer = QuantLinear(64, 32, bits=4, group_size=32)
    with pytest.raises(ValueError, match="does not fit"):
        layer.load_quantized(
            QuantizedTensor(
                torch.zeros(32, 64, dtype=torch.uint8),
                torch.ones(32, 1),
                torch.zeros(32, 1, dtype=torch.uint8),
                4,
                -1,
            )
        )


@pytest.fixture
def one_thread():
    """Many tiny ops: on a shared, oversubscribed CPU, OpenMP barriers dominate with >1 thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_smollm2_greedy_tokens_kernel_equals_reference(one_thread):
    """A quantized SmolLM2-135M generates the same greedy tokens through the kernel and the reference.

    fp32 model: kernel and reference logits agree to ~5e-5. (In bf16 both paths round every layer's
    output to 8 bits; their 1-ulp differences move the logits by ~0.5, as much as switching the
    reference's matmul to bf16 does, and can flip a near-tie: no test of token identity there.)
    """
    smollm = pytest.importorskip("awqforge.smollm")
    transformers = pytest.importorskip("transformers")
    try:
        path = smollm.ensure_smollm2_checkpoint()
    except Exception as exc:  # package or conversion unavailable here
        pytest.skip(f"SmolLM2 checkpoint unavailable: {exc}")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    layers = []
    for module in model.model.layers.modules():
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                q = QuantLinear.from_linear(child, bits=4, group_size=64)
                setattr(module, child_name, q)
                layers.append(q)
    assert len(layers) == 7 * len(model.model.layers)
    ids = tok("The capital of France is", return_tensors="pt").input_ids

    def greedy(use_kernel: bool) -> list[int]:
        for q in layers:
            q.use_kernel = use_kernel
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
        return out[0, ids.shape[1] :].tolist()

    kernel_tokens = greedy(True)
    assert kernel_tokens == greedy(False)
    assert len(set(kernel_tokens)) > 1  # not a degenerate repetition


def test_cpu_layer_holds_its_weights_once():
    """On the CPU a 4-bit layer keeps only the kernel layout; state_dict still gives the checkpoint tensors."""
    torch.manual_seed(3)
    qt = quantize_tensor(torch.randn(64, 256), 4, 128)
    layer = QuantLinear.from_quantized(qt, dtype=torch.bfloat16)
    assert layer.qweight is None and layer.qzeros is None and layer.scales is None
    cpu_layout = packing.pack_cpu_w4(
        QuantizedTensor(qt.qweight, qt.scales.to(torch.bfloat16), qt.zeros, 4, 128)
    )
    held = {name: t for name, t in layer.named_buffers()}
    assert set(held) == {"qdata", "params"}
    assert torch.equal(held["qdata"], cpu_layout["qdata"]) and torch.equal(
        held["params"], cpu_layout["params"]
    )
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales"}
    awq = packing.pack_awq_gemm(qt)
    assert torch.equal(sd["qweight"], awq["qweight"]) and torch.equal(sd["qzeros"], awq["qzeros"])
    assert torch.equal(sd["scales"], qt.scales.t().to(torch.bfloat16))
    # a fresh layer loads them straight into the CPU layout, and computes the same
    fresh = QuantLinear(256, 64, group_size=128, dtype=torch.bfloat16)
    assert fresh.qweight is None
    fresh.load_state_dict(sd)
    assert fresh.qweight is None and torch.equal(fresh.qdata, layer.qdata)
    x = torch.randn(3, 256).bfloat16()
    torch.testing.assert_close(fresh(x), layer(x))
    # a dtype change goes through the checkpoint tensors and comes back to the CPU layout
    half = QuantLinear.from_quantized(qt, dtype=torch.float32).half()
    assert half.dtype == torch.float16 and half.qweight is None and half.params.dtype == torch.float32
    assert torch.equal(half.state_dict()["scales"], qt.scales.t().half())


def test_dense_4bit_layer_is_cpu_resident_too():
    qt = quantize_tensor(torch.randn(36, 96), 4, 32)  # out % 8 != 0: the dense checkpoint layout
    layer = QuantLinear.from_quantized(qt, dtype=torch.float32)
    assert layer.layout == "dense" and layer.qweight is None
    assert torch.equal(layer.state_dict()["qweight"], packing.pack_dense(qt.qweight, 4))
    back = layer.quantized_tensor()
    assert torch.equal(back.qweight, qt.qweight) and torch.equal(back.zeros, qt.zeros)
