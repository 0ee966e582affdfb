"""Quantized checkpoints written offline by ``dlinfer.testing.quantize``: stock LMDeploy's loader reads them (its
own AWQ / SmoothQuant modules, built from the checkpoint's ``quantization_config``) and its patched model, run on
the CPU through dlinfer's quantized ops (reference vendor), reproduces the dequantized float model's logits (for
W8A8 with the same per-token activation quantization applied to transformers' linears)."""

from __future__ import annotations

import pytest

pytest.importorskip("lmdeploy", reason="LMDeploy is not installed (scripts/setup_lmdeploy.sh installs it)")

import torch  # noqa: E402

from lmdeploy_harness import PagedModel, hf_logits  # noqa: E402

pytestmark = pytest.mark.lmdeploy

# relative L2 error of the logits against transformers' float32 model with the dequantized weights:
# AWQ (LMDeploy runs it in float16) computes with exactly those weights: float16 rounding only.
# W8A8 (run in float32 here) also quantizes each linear's input per token to int8; the reference does the same
# (forward pre-hooks on transformers' linears), so float32 rounding remains, and where it lands an activation on
# the other side of a rounding tie, one int8 step of that token (measured 2.5e-4; the quantization itself moves the
# logits by ~2e-2).
TOL = {"awq": 5e-3, "w8a8": 1e-3}
DTYPE = {"awq": "auto", "w8a8": "float32"}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT_OPS = {"awq": ("weight_quant_matmul",),
             "w8a8": ("dynamic_quant", "linear_w8a8", "rms_norm_w8a8", "add_rms_norm_w8a8")}


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(4, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _fake_quant_logits(path: str, token_lists: list[list[int]]) -> list[torch.Tensor]:
    """transformers (float32) with each quantized linear's input quantized per token to int8 and back."""
    import transformers

    from dlinfer.testing.quantize import fake_quant_per_token

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if name.endswith(LINEARS):
            module.register_forward_pre_hook(lambda mod, args: (fake_quant_per_token(args[0]), *args[1:]))
    with torch.inference_mode():
        return [model(torch.tensor(tokens)[None]).logits[0].float() for tokens in token_lists]


@pytest.mark.parametrize("fmt", ["awq", "w8a8"])
def test_lmdeploy_loads_the_quantized_checkpoint_and_matches_the_dequantized_model(fmt, tiny_model, patched,
                                                                                  tmp_path, monkeypatch):
    import dlinfer.ops
    from dlinfer.testing.quantize import quantize_model
    from dlinfer.vendor import registry

    src = tiny_model("llama")
    quantize_model(src, tmp_path / "q", fmt, group_size=64, dequantized_dir=tmp_path / "deq")
    calls = {name: 0 for name in QUANT_OPS[fmt]}
    for name in calls:  # LMDeploy's kernels call dlinfer.ops.<name> at call time: count them
        original = getattr(dlinfer.ops, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dlinfer.ops, name, counting)

    with registry.pinned("reference"):
        pm = PagedModel(str(tmp_path / "q"), dtype=DTYPE[fmt])
        qkv = type(pm.model.model.layers[0].self_attn.qkv_proj).__name__
        assert qkv == {"awq": "QKVAwqLinear", "w8a8": "QKVW8A8Linear"}[fmt]
        if fmt == "w8a8":
            assert pm.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.int8
        a, b = _tokens(1, 13), _tokens(2, 6)
        sa, sb = pm.new_sequence(a), pm.new_sequence(b)
        prefill = pm.step([sa, sb], [len(a) - 1, len(b)])
        sb.tokens.append(7)
        decode = pm.step([sa, sb], [1, 1])  # a decode step (one new token per sequence)

    assert all(n > 0 for n in calls.values()), calls
    reference = _fake_quant_logits if fmt == "w8a8" else hf_logits
    deq_a, deq_b = reference(str(tmp_path / "deq"), [a, b + [7]])
    float_a, float_b = hf_logits(src, [a, b + [7]])
    got = torch.cat([prefill, decode])
    want = torch.cat([deq_a[:-1], deq_b[:-1], deq_a[-1:], deq_b[-1:]])
    unquantized = torch.cat([float_a[:-1], float_b[:-1], float_a[-1:], float_b[-1:]])
    err = _rel(got, want)
    assert err <= TOL[fmt], f"{fmt}: relative logits error vs the dequantized model {err:.3g} > {TOL[fmt]}"
    # the quantized weights were read: the float model is much farther away than the dequantized one
    assert _rel(got, unquantized) > 10 * err
