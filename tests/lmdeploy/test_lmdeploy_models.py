"""LMDeploy's own patched models, on the CPU through dlinfer's LMDeploy backend, against transformers (fp32)."""

from __future__ import annotations

import pytest

pytest.importorskip("lmdeploy", reason="LMDeploy is not installed (scripts/setup_lmdeploy.sh installs it)")

import torch  # noqa: E402

from lmdeploy_harness import PagedModel, hf_logits  # noqa: E402

pytestmark = pytest.mark.lmdeploy

TOL = 1e-4


def _tokens(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 500, (n,), generator=gen).tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
def test_prefill_chunked_prefill_decode_match_transformers(arch, tiny_model, patched):
    from dlinfer.framework.lmdeploy_ext.backend import DlinferCudaOpsBackend
    from lmdeploy.pytorch.backends import get_backend

    assert get_backend() is DlinferCudaOpsBackend
    path = tiny_model(arch)
    a, b, c = _tokens(1, 24), _tokens(2, 12), _tokens(3, 9)
    ref_a, ref_b, ref_c = hf_logits(path, [a, b, c])
    pm = PagedModel(path, block_size=16)
    sa, sb, sc = pm.new_sequence(a), pm.new_sequence(b), pm.new_sequence(c)

    def check(got, want, what):
        err = (got - want).abs().max().item()
        assert err <= TOL, f"{arch} {what}: max |logits - transformers| = {err:.3g} > {TOL}"

    # prefill without history (prefill_attention)
    out = pm.step([sa, sb], [10, 5])
    check(out[:10], ref_a[:10], "prefill a")
    check(out[10:], ref_b[:5], "prefill b")
    # chunked prefill: a and b continue over cached history (crossing a block boundary), c starts fresh
    out = pm.step([sa, sb, sc], [8, 3, 6])
    check(out[:8], ref_a[10:18], "chunked prefill a")
    check(out[8:11], ref_b[5:8], "chunked prefill b")
    check(out[11:], ref_c[:6], "chunked prefill c (no history, in a batch with history)")
    # decode, three steps, mixed lengths
    for step in range(3):
        out = pm.step([sa, sb, sc], [1, 1, 1])
        check(out[0], ref_a[18 + step], f"decode a step {step}")
        check(out[1], ref_b[8 + step], f"decode b step {step}")
        check(out[2], ref_c[6 + step], f"decode c step {step}")


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_experts_laid_out_n_fastest_give_the_same_logits(arch, tiny_model, patched, monkeypatch):
    """DLINFER_LMDEPLOY_MOE_N_FASTEST=1: every expert weight is N-fastest after loading (LMDeploy's CUDA layout),
    shapes unchanged, and the model still matches transformers at prefill and decode."""
    from dlinfer.framework.lmdeploy_ext.backend import DlinferCudaFusedMoEImpl

    monkeypatch.setenv("DLINFER_LMDEPLOY_MOE_N_FASTEST", "1")
    path = tiny_model(arch)
    a = _tokens(4, 14)
    (ref,) = hf_logits(path, [a])
    pm = PagedModel(path, block_size=16)
    moes = [m for m in pm.model.modules() if isinstance(getattr(m, "impl", None), DlinferCudaFusedMoEImpl)]
    assert moes, "no fused MoE layer took the N-fastest layout"
    for m in moes:
        for w in (m.gate_up.weight, m.down.weight):
            assert w.dim() == 3 and w.stride(1) == 1 and w.stride(2) == w.shape[1], (tuple(w.shape), w.stride())
    seq = pm.new_sequence(a)
    out = pm.step([seq], [12])
    err = (out - ref[:12]).abs().max().item()
    assert err <= TOL, f"{arch} prefill: max |logits - transformers| = {err:.3g}"
    for step in range(2):
        out = pm.step([seq], [1])
        err = (out[0] - ref[12 + step]).abs().max().item()
        assert err <= TOL, f"{arch} decode step {step}: max |logits - transformers| = {err:.3g}"


def _moe_layers(pm):
    from lmdeploy.pytorch.backends.dlinfer.moe import DlinferFusedMoEImpl

    moes = [m for m in pm.model.modules() if isinstance(getattr(m, "impl", None), DlinferFusedMoEImpl)]
    assert moes
    return moes


def _k_fastest(m) -> bool:
    return m.gate_up.weight.stride(2) == 1 and m.down.weight.stride(2) == 1


def test_moe_experts_keep_lmdeploys_layout_by_default(tiny_model, patched, monkeypatch):
    """auto (the default): the CPU's vendor states no preference, so the experts stay K-fastest."""
    monkeypatch.delenv("DLINFER_LMDEPLOY_MOE_N_FASTEST", raising=False)
    pm = PagedModel(tiny_model("mixtral"), block_size=16)
    assert all(_k_fastest(m) for m in _moe_layers(pm))


@pytest.mark.parametrize("setting,expect_n_fastest", [(None, True), ("auto", True), ("0", False)])
def test_moe_layout_follows_the_vendors_preference_unless_set(tiny_model, patched, monkeypatch, setting,
                                                              expect_n_fastest):
    """auto asks the registry which layout the vendor serving fused_moe prefers on the weights' device and dtype
    (here a vendor that prefers N-fastest); 0 keeps K-fastest whatever the vendor says."""
    from dlinfer.framework.lmdeploy_ext import backend

    asked = []

    def prefers_n(op, device, dtype):
        asked.append((op, torch.device(device).type, dtype))
        return "n_fastest"

    monkeypatch.setattr(backend, "preferred_weight_layout", prefers_n)
    if setting is None:
        monkeypatch.delenv("DLINFER_LMDEPLOY_MOE_N_FASTEST", raising=False)
    else:
        monkeypatch.setenv("DLINFER_LMDEPLOY_MOE_N_FASTEST", setting)
    pm = PagedModel(tiny_model("mixtral"), block_size=16)
    moes = _moe_layers(pm)
    assert all(_k_fastest(m) != expect_n_fastest for m in moes)
    if expect_n_fastest:
        assert asked and all(a[0] == "fused_moe" and a[1] == "cpu" for a in asked)
    else:
        assert not asked


def test_n_fastest_refuses_a_weight_that_is_not_three_dimensional():
    from dlinfer.utils.layout import n_fastest

    with pytest.raises(ValueError, match="weight"):
        n_fastest(torch.zeros(4, 4))
