"""The vLLM plugin's parts, in this process (no engine): switches, registration, layers, refusals, KV views."""

from __future__ import annotations

import logging
import types

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed (bash scripts/setup_vllm_env.sh)")

from dlinfer.framework import vllm_ext  # noqa: E402
from dlinfer.framework.vllm_ext import counters  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    vllm_ext._reset_for_tests()
    vllm_ext.register()
    yield
    vllm_ext._reset_for_tests()
    vllm_ext.register()


@pytest.fixture
def vllm_config():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()) as config:
        yield config


@pytest.fixture
def dlinfer_log(caplog):
    logger = logging.getLogger("vllm.dlinfer")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="vllm.dlinfer")
    yield caplog
    logger.removeHandler(caplog.handler)


# ------------------------------------------------------------------------------------------------ switches
def test_disable_list_parsing(dlinfer_log):
    assert vllm_ext.disabled_ops("rms_norm, rotary ,MOE") == {"rms_norm", "rotary_embedding", "fused_moe"}
    assert vllm_ext.disabled_ops("all") == frozenset(vllm_ext.OPS)
    assert vllm_ext.disabled_ops("") == frozenset()
    assert vllm_ext.disabled_ops("attention,flash_decoding") == {"attention"}
    assert "flash_decoding" in dlinfer_log.text and "known:" in dlinfer_log.text


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("False", False), ("1", True), ("", True)])
def test_global_switch(monkeypatch, value, on):
    monkeypatch.setenv("DLINFER_VLLM", value)
    assert vllm_ext.enabled() is on


def test_register_is_idempotent_and_uses_vllm_hooks():
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from dlinfer.framework.vllm_ext import compat, layers, moe

    vllm_ext.register()
    vllm_ext._reset_for_tests()
    vllm_ext.register()  # a second registration in the same process must not trip vLLM's duplicate checks
    assert set(vllm_ext.registered_ops()) == set(vllm_ext.OPS)
    assert op_registry_oot["RMSNorm"] is layers.DlinferRMSNorm
    assert op_registry_oot["SiluAndMul"] is layers.DlinferSiluAndMul
    assert op_registry_oot["RotaryEmbedding"] is layers.DlinferRotaryEmbedding
    assert op_registry_oot["UnquantizedFusedMoEMethod"] is moe.DlinferUnquantizedFusedMoEMethod
    assert AttentionBackendEnum.CPU_ATTN.get_path() == vllm_ext.ATTENTION_BACKEND_PATH
    assert AttentionBackendEnum[compat.ATTENTION_BACKEND_NAME].get_path() == vllm_ext.ATTENTION_BACKEND_PATH


def test_off_switch_registers_nothing(monkeypatch):
    monkeypatch.setenv("DLINFER_VLLM", "0")
    vllm_ext._reset_for_tests()
    vllm_ext.register()
    assert vllm_ext.registered_ops() == {}
    monkeypatch.setenv("DLINFER_VLLM", "1")
    monkeypatch.setenv("DLINFER_VLLM_DISABLE", "all")
    vllm_ext._reset_for_tests()
    vllm_ext.register()
    assert vllm_ext.registered_ops() == {}


def test_register_never_raises(monkeypatch, dlinfer_log):
    def broken(off):
        raise RuntimeError("boom")

    monkeypatch.setattr(vllm_ext, "_register", broken)
    vllm_ext._reset_for_tests()
    vllm_ext.register()  # vLLM does not catch errors from a plugin's function: register must
    assert "failed to register" in dlinfer_log.text and "boom" in dlinfer_log.text


# -------------------------------------------------------------------------------------------------- layers
def test_rms_norm_matches_vllm(vllm_config):
    from vllm.model_executor.layers.layernorm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5)
    assert type(norm).__name__ == "DlinferRMSNorm"
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, res = torch.randn(7, 64), torch.randn(7, 64)
    before = counters.snapshot()
    out = norm(x)
    out2, new_res = norm(x.clone(), res.clone())
    ref = RMSNorm.forward_native(norm, x.clone())  # vLLM's own implementation, called on the base class
    ref2, ref_res = RMSNorm.forward_native(norm, x.clone(), res.clone())
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out2, ref2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    after = counters.snapshot()
    assert after.get("rms_norm", 0) == before.get("rms_norm", 0) + 1
    assert after.get("add_rms_norm", 0) == before.get("add_rms_norm", 0) + 1


def test_rms_norm_with_partial_variance_keeps_vllm(vllm_config):
    from vllm.model_executor.layers.layernorm import RMSNorm

    norm = RMSNorm(64, var_hidden_size=32)
    assert norm._dlinfer_refusal and "variance" in norm._dlinfer_refusal
    x = torch.randn(3, 64)
    torch.testing.assert_close(norm(x), RMSNorm.forward_native(norm, x))


def test_silu_and_mul_matches_vllm(vllm_config):
    from vllm.model_executor.layers.activation import SiluAndMul

    act = SiluAndMul()
    assert type(act).__name__ == "DlinferSiluAndMul"
    x = torch.randn(5, 2 * 48)
    torch.testing.assert_close(act(x), SiluAndMul.forward_native(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_rotary_matches_vllm_in_place_on_qkv_views(vllm_config, rotary_dim):
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    torch.manual_seed(0)
    head, hq, hk, tokens = 32, 4, 2, 9
    rope = RotaryEmbedding(head, rotary_dim, 2048, 10000.0, True, torch.float32)
    assert type(rope).__name__ == "DlinferRotaryEmbedding" and rope._dlinfer_refusal is None
    positions = torch.randint(0, 2048, (tokens,))
    qkv = torch.randn(tokens, (hq + 2 * hk) * head)
    q, k, _ = qkv.split([hq * head, hk * head, hk * head], dim=-1)  # strided views, as vLLM's models make
    ref_q, ref_k = RotaryEmbedding.forward_native(rope, positions, q.clone(), k.clone())
    out_q, out_k = rope(positions, q, k)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    torch.testing.assert_close(out_q, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_k, ref_k, rtol=1e-5, atol=1e-5)


def test_gptj_rotary_keeps_vllm(vllm_config):
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    rope = RotaryEmbedding(32, 32, 512, 10000.0, False, torch.float32)
    assert "GPT-J" in rope._dlinfer_refusal
    positions = torch.arange(4)
    q, k = torch.randn(4, 64), torch.randn(4, 64)
    ref = RotaryEmbedding.forward_native(rope, positions, q.clone(), k.clone())
    before = counters.snapshot().get("apply_rotary_pos_emb", 0)
    out = rope(positions, q.clone(), k.clone())
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    assert counters.snapshot().get("apply_rotary_pos_emb", 0) == before


# ----------------------------------------------------------------------------------------------------- MoE
def test_moe_refusals_name_the_feature():
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import RoutingMethodType

    from dlinfer.framework.vllm_ext.moe import config_refusal, layer_refusal

    par = types.SimpleNamespace(use_ep=False, ep_size=1, dp_size=1, pcp_size=1, is_sequence_parallel=False)
    base = dict(routing_method=RoutingMethodType.RenormalizeNaive, activation=MoEActivation.SILU, has_bias=False,
                is_lora_enabled=False, has_hash_routing=False, moe_parallel_config=par, num_local_experts=8,
                num_experts=8, swiglu_limit=None, swiglu_alpha=None, swiglu_beta=None)
    assert config_refusal(types.SimpleNamespace(**base)) is None
    assert "DeepSeekV3" in config_refusal(types.SimpleNamespace(**dict(base, routing_method=RoutingMethodType.DeepSeekV3)))
    assert "gelu" in config_refusal(types.SimpleNamespace(**dict(base, activation=MoEActivation.GELU)))
    assert "bias" in config_refusal(types.SimpleNamespace(**dict(base, has_bias=True)))
    ep = types.SimpleNamespace(**dict(vars(par), use_ep=True, ep_size=2))
    assert "expert parallelism" in config_refusal(types.SimpleNamespace(**dict(base, moe_parallel_config=ep)))
    layer = dict(use_grouped_topk=False, num_expert_group=None, custom_routing_function=None, scoring_func="softmax",
                 e_score_correction_bias=None, routed_scaling_factor=1.0, apply_router_weight_on_input=False,
                 expert_map=None)
    assert layer_refusal(types.SimpleNamespace(**layer)) is None
    assert "grouped" in layer_refusal(types.SimpleNamespace(**dict(layer, use_grouped_topk=True, num_expert_group=4)))
    assert "sigmoid" in layer_refusal(types.SimpleNamespace(**dict(layer, scoring_func="sigmoid")))
    assert "2.5" in layer_refusal(types.SimpleNamespace(**dict(layer, routed_scaling_factor=2.5)))


@pytest.mark.parametrize("preference", ["k_fastest", "n_fastest"])
def test_moe_weights_take_the_vendors_preferred_layout_at_load(monkeypatch, dlinfer_log, preference):
    import dlinfer.ops as dl
    from dlinfer.framework.vllm_ext import moe
    from dlinfer.utils.layout import is_n_fastest

    asked = []

    def prefers(op, device, dtype):
        asked.append((op, torch.device(device).type, dtype))
        return preference

    monkeypatch.setattr(moe, "preferred_weight_layout", prefers)
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(4, 2 * 24, 32, generator=g) / 6
    w2 = torch.randn(4, 32, 24, generator=g) / 5
    layer = types.SimpleNamespace(w13_weight=torch.nn.Parameter(w13.clone(), requires_grad=False),
                                  w2_weight=torch.nn.Parameter(w2.clone(), requires_grad=False), top_k=2,
                                  renormalize=True)
    method = object.__new__(moe.DlinferUnquantizedFusedMoEMethod)  # the config's checks are tested above
    method.process_weights_after_loading(layer)
    assert asked == [("fused_moe", "cpu", torch.float32)]
    for param, values in ((layer.w13_weight, w13), (layer.w2_weight, w2)):
        assert is_n_fastest(param.data) == (preference == "n_fastest")
        assert param.data.is_contiguous() == (preference == "k_fastest")
        assert torch.equal(param.data, values)
    assert f"expert weights laid out {preference[0].upper()}-fastest on cpu float32" in dlinfer_log.text
    x, logits = torch.randn(5, 32, generator=g), torch.randn(5, 4, generator=g)
    out = method.apply_monolithic(layer, x, logits)
    weights, ids = dl.moe_gating_topk_softmax(logits, 2)
    torch.testing.assert_close(out, dl.fused_moe(x, w13, w2, weights, ids, 2, True), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("kwargs, words", [
    (dict(sliding_window=4096), "sliding-window"),
    (dict(alibi_slopes=[0.5, 0.25, 0.125, 0.0625]), "ALiBi"),
    (dict(logits_soft_cap=30.0), "soft-capping"),
    (dict(kv_cache_dtype="fp8"), "quantized KV cache"),
    (dict(attn_type="encoder_only"), "encoder_only attention"),
    (dict(sinks=torch.zeros(4)), "sinks"),
])
def test_attention_layer_refused_with_reason(vllm_config, kwargs, words):
    from dlinfer.framework.vllm_ext.attention import DlinferAttentionImpl

    with pytest.raises(NotImplementedError, match=words) as info:
        DlinferAttentionImpl(4, 32, 32 ** -0.5, 2, **kwargs)
    assert "DLINFER_VLLM_DISABLE=attention" in str(info.value)


def test_attention_validate_configuration_gives_vllm_the_reasons():
    from vllm.platforms.interface import DeviceCapability

    from dlinfer.framework.vllm_ext.attention import DlinferAttentionBackend as B

    cap = DeviceCapability(9, 0)
    plain = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False,
                 has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
                 device_capability=cap, attn_type="decoder")
    assert B.validate_configuration(**plain) == []
    assert B.validate_configuration(**dict(plain, block_size=64)) == []
    for change, words in [(dict(has_sliding_window=True), "sliding window"), (dict(use_mla=True), "MLA"),
                          (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"), (dict(has_sink=True), "sinks"),
                          (dict(attn_type="encoder_only"), "encoder_only"), (dict(head_size=33), "odd head size"),
                          (dict(block_size=8), "block_size"), (dict(use_kv_connector=True), "KV connector")]:
        reasons = B.validate_configuration(**dict(plain, **change))
        assert any(words in r for r in reasons), (change, reasons)


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_kv_cache_views_are_zero_copy_in_any_layout(layout):
    import dlinfer.ops as dl
    from dlinfer.framework.vllm_ext.attention import split_kv_cache

    blocks, heads, block_size, d, dv = 6, 2, 16, 8, 4
    if layout == "LBNHC":  # physical [B, N, H, C], seen by the backend as logical [B, H, N, C]
        packed = torch.zeros(blocks, block_size, heads, d + dv).transpose(1, 2)
    else:
        packed = torch.zeros(blocks, heads, block_size, d + dv)
    key_cache, value_cache = split_kv_cache(packed, d)
    assert key_cache.shape == (blocks, block_size, heads, d) and value_cache.shape == (blocks, block_size, heads, dv)
    assert key_cache.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    key, value = torch.randn(3, heads, d), torch.randn(3, heads, dv)
    slots = torch.tensor([5, -1, 2 * block_size + 7])  # -1: a padding token, skipped
    dl.fill_kv_cache(key, value, key_cache, value_cache, slots)
    torch.testing.assert_close(packed[0, :, 5, :d], key[0], rtol=0, atol=0)
    torch.testing.assert_close(packed[2, :, 7, d:], value[2], rtol=0, atol=0)
    assert int((packed != 0).sum()) == key[0].numel() + value[0].numel() + key[2].numel() + value[2].numel()
