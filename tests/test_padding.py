"""per_sample calibration: right padding is left out of every statistic and loss of the AWQ block algorithm.

Rows of different lengths are right-padded with an attention mask; the capture carries the real-token mask
(`CapturedInputs.token_mask`) and `quantize_block` takes it. (a) the padded batch gives the statistics of the
same texts run one by one without padding; (b) what stands in the padding positions (the pad id, or the
activations there) changes nothing in the quantized weights; (c) an all-real mask is no mask.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model, tiny_input_ids

from awqforge.arch import get_adapter
from awqforge.awq import BlockSettings, capture_layer_inputs, quantize_block
from awqforge.awq.block import fp_pass
from awqforge.awq.search import Stats, candidates, module_losses, w_mean
from awqforge.errors import AWQForgeError

pytestmark = pytest.mark.usefixtures("one_thread")

LONG, SHORT = 32, 13
# dense (plain, fused qkv/gate_up, learned positions + LayerNorm, sliding/global attention) and MoE (top-k routed
# with and without shared experts, Llama 4's dense routing)
PADDED_FAMILIES = [
    "llama",
    "phi3",
    "opt",
    "gemma3_text",
    "mixtral",
    "qwen2_moe",
    "deepseek_v3",
    "llama4_text",
]
SETTINGS = BlockSettings(bits=3, group_size=32, search_fraction=0.5, search_topk=2)


def padded_batch(pad_ids: torch.Tensor | int, n: int = 4, lengths=(LONG, SHORT, 24, 7)):
    """n rows of random text, longest first, right-padded (pad_ids: one id, or ids per position) and the mask."""
    ids = tiny_input_ids(n, LONG, seed=3)
    mask = torch.zeros(n, LONG, dtype=torch.long)
    for i, length in enumerate(lengths[:n]):
        mask[i, :length] = 1
    pads = pad_ids if isinstance(pad_ids, torch.Tensor) else torch.full_like(ids, pad_ids)
    return torch.where(mask.bool(), ids, pads), mask


def quantize_all(model, ids, mask, settings=SETTINGS, perturb_pads: bool = False):
    """The pipeline's capture and quantize_block over every block in order; per block the codes, scales and
    zeros of every linear, the mapping scales and the layer metrics."""
    adapter = get_adapter(model.config)
    layers = adapter.get_layers(model)
    captured = capture_layer_inputs(model, layers, ids, mask)
    x, token_mask = captured.inputs, captured.token_mask
    if perturb_pads:  # activations of the padding positions replaced by large noise
        gen = torch.Generator().manual_seed(7)
        noise = 50 * torch.randn(x.shape, generator=gen)
        x = torch.where(token_mask[..., None], x, noise)
    out = []
    for i, block in enumerate(layers):
        res = quantize_block(
            block,
            x,
            captured.layer_kwargs[i],
            settings=settings,
            adapter=adapter,
            block_index=i,
            token_mask=token_mask,
        )
        x = res.outputs
        out.append(res)
    return out, token_mask


def assert_same_quantization(a, b):
    for ra, rb in zip(a, b, strict=True):
        assert ra.quantized.keys() == rb.quantized.keys()
        for name, qa in ra.quantized.items():
            qb = rb.quantized[name]
            assert torch.equal(qa.qweight, qb.qweight), name
            assert torch.equal(qa.scales, qb.scales), name
            assert torch.equal(qa.zeros, qb.zeros), name
        for name, info in ra.scales.items():
            assert torch.equal(info["scales"], rb.scales[name]["scales"]), name
            assert info["loss"] == rb.scales[name]["loss"], name
        assert [(m.name, m.mse_rtn, m.mse_quant) for m in ra.layers] == [
            (m.name, m.mse_rtn, m.mse_quant) for m in rb.layers
        ]


@pytest.mark.parametrize("family", PADDED_FAMILIES)
def test_pad_values_do_not_change_the_quantization(family):
    """(b) Another pad id, random ids in the padding, or noise as the padding's activations: same codes,
    scales, zeros, mapping scales and metrics, bit for bit (a real token never reads a padding position)."""
    ids0, mask = padded_batch(0)
    ref, token_mask = quantize_all(build_tiny_model(family), ids0, mask)
    assert token_mask is not None and int(token_mask.sum()) == int(mask.sum())
    ids1, _ = padded_batch(tiny_input_ids(4, LONG, seed=11))
    assert not torch.equal(ids0, ids1) and torch.equal(ids0[mask.bool()], ids1[mask.bool()])
    assert_same_quantization(ref, quantize_all(build_tiny_model(family), ids1, mask)[0])
    assert_same_quantization(ref, quantize_all(build_tiny_model(family), ids0, mask, perturb_pads=True)[0])


def block_parts(model, adapter, i: int = 0):
    block = adapter.get_layers(model)[i]
    adapter.prepare_block(block)
    linears = adapter.quantizable_linears(block, ())
    maps = [m for m in adapter.mappings(block) if m.skip_reason is None]
    return block, linears, maps


@pytest.mark.parametrize("family", PADDED_FAMILIES)
@torch.no_grad()
def test_padded_statistics_equal_the_unpadded_texts(family):
    """(a) The FP pass over the padded batch (mask given) collects the statistics of the same texts run one by
    one, unpadded: every linear's input Gram matrix and token count, every mapping's mean |x| per channel, and
    the module-output losses of the scale search; the real positions' block outputs are the unpadded ones."""
    ids, mask = padded_batch(0, n=2)
    model = build_tiny_model(family)
    adapter = get_adapter(model.config)
    layers = adapter.get_layers(model)
    block, linears, maps = block_parts(model, adapter)
    s = SETTINGS

    captured = capture_layer_inputs(model, layers, ids, mask)
    padded = Stats()
    out = fp_pass(
        block,
        captured.inputs,
        captured.layer_kwargs[0],
        [slice(0, 2)],
        linears,
        maps,
        s,
        padded,
        captured.token_mask,
    )

    alone = Stats()  # the same texts, each its own unpadded batch of one, into one Stats
    for row, length in enumerate((LONG, SHORT)):
        cap = capture_layer_inputs(model, layers, ids[row : row + 1, :length])
        ref_out = fp_pass(block, cap.inputs, cap.layer_kwargs[0], [slice(0, 1)], linears, maps, s, alone)
        torch.testing.assert_close(out[row, :length], ref_out[0], rtol=1e-4, atol=1e-5)

    n_real = LONG + SHORT
    for name in linears:
        got, want = padded.inputs_of(name), alone.inputs_of(name)
        if want is None:  # an expert no real token reaches
            assert got is None, name
            continue
        assert got.count == want.count, name
        torch.testing.assert_close(got.gram, want.gram, rtol=1e-5, atol=1e-6)
    assert padded.count[next(iter(padded.count))] == n_real  # q/k/v's shared input: the real tokens
    for idx in range(len(maps)):
        assert padded.abs_count.get(idx) == alone.abs_count.get(idx), maps[idx].name
        if idx in alone.abs_sum:
            torch.testing.assert_close(padded.abs_sum[idx], alone.abs_sum[idx], rtol=1e-5, atol=1e-5)

    names_of = {id(m): n for n, m in linears.items()}
    scored = 0
    for idx, m in enumerate(maps):
        if m.linear_loss or padded.abs_count.get(idx, 0) == 0:
            continue
        qlins = [(names_of[id(lin)], lin) for lin in m.linears]
        x_mean = alone.abs_sum[idx] / alone.abs_count[idx]
        cands = candidates(x_mean, w_mean([lin.weight.float() for _, lin in qlins], s.group_size), s)[::4]
        got, _ = module_losses(cands, qlins, m, padded, s, 1, "test")
        want, _ = module_losses(cands, qlins, m, alone, s, 2, "test")  # both calls scored in full
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
        scored += 1
    assert scored >= 1  # the attention module (and the MLP / MoE block where its loss is a module's)


def test_all_real_mask_is_no_mask():
    """(c) concat rows have no padding: a mask of ones gives bit for bit what no mask gives."""
    ids = tiny_input_ids(4, 32)
    model_a, model_b = build_tiny_model("llama"), build_tiny_model("llama")
    a, mask_a = quantize_all(model_a, ids, None)
    b, mask_b = quantize_all(model_b, ids, torch.ones_like(ids))
    assert mask_a is None and mask_b is None
    assert_same_quantization(a, b)
    for ra, rb in zip(a, b, strict=True):
        assert torch.equal(ra.outputs, rb.outputs)


def test_capture_refuses_left_padding():
    """Real tokens are exact only with the padding on the right and an unpadded first row."""
    ids, mask = padded_batch(0, n=2)
    model = build_tiny_model("llama")
    layers = get_adapter(model.config).get_layers(model)
    with pytest.raises(AWQForgeError, match="on the right"):
        capture_layer_inputs(model, layers, ids, mask.flip(1))
