"""The version-dependent parts of the vLLM plugin (compat.py), on whichever vLLM release is installed."""

from __future__ import annotations

import types

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed (bash scripts/setup_vllm_env.sh)")

from dlinfer.framework import vllm_ext  # noqa: E402
from dlinfer.framework.vllm_ext import compat  # noqa: E402
from dlinfer.framework.vllm_ext.attention import DlinferAttentionBackend, split_kv_cache  # noqa: E402


def test_backend_name_is_a_registered_member():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm_ext._reset_for_tests()
    vllm_ext.register()
    name = compat.ATTENTION_BACKEND_NAME
    assert name == ("DLINFER" if compat.named_backends else "CUSTOM")
    # vLLM's Attention layer looks its backend up by get_name(): it must be the member dlinfer registered.
    assert DlinferAttentionBackend.get_name() == name
    assert AttentionBackendEnum[name].get_path() == vllm_ext.ATTENTION_BACKEND_PATH
    assert compat.register_attention_backend(vllm_ext.ATTENTION_BACKEND_PATH) == name  # idempotent


def test_override_unknown_member_is_refused():
    with pytest.raises(ValueError, match="member_name"):
        compat.override_attention_backend("NO_SUCH_BACKEND", vllm_ext.ATTENTION_BACKEND_PATH)


@pytest.mark.skipif(compat.named_backends, reason="vLLM 0.26's single CUSTOM slot")
def test_custom_slot_held_by_another_plugin_is_not_taken():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    member = AttentionBackendEnum.CUSTOM
    register_backend(member, "other.plugin.Backend")
    try:
        with pytest.raises(RuntimeError, match="other.plugin.Backend"):
            compat.register_attention_backend(vllm_ext.ATTENTION_BACKEND_PATH)
    finally:
        register_backend(member, vllm_ext.ATTENTION_BACKEND_PATH)


def test_moe_hash_routing_flag():
    assert compat.moe_has_hash_routing(types.SimpleNamespace()) is False  # vLLM 0.26: no such field
    assert compat.moe_has_hash_routing(types.SimpleNamespace(has_hash_routing=True)) is True


def _allocate_like_vllm_026(backend, num_blocks, block_size, heads, head_size, layers_dim):
    """What vLLM 0.26's runner does: a buffer in the physical order, permuted back to the logical shape."""
    shape = backend.get_kv_cache_shape(num_blocks, block_size, heads, head_size)
    order = backend.get_kv_cache_stride_order(include_num_layers_dimension=layers_dim)
    if layers_dim:
        shape = (2,) + shape  # two layers
    physical = torch.zeros([shape[i] for i in order])
    inverse = [order.index(i) for i in range(len(order))]
    cache = physical.permute(*inverse)
    return cache[0] if layers_dim else cache


@pytest.mark.skipif(compat.KVCacheLayout is not None, reason="vLLM 0.26's KV cache shape API")
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("layers_dim", [False, True])
def test_packed_kv_cache_026(layout, layers_dim):
    from vllm.v1.attention.backends.utils import set_kv_cache_layout

    set_kv_cache_layout(layout)
    try:
        cache = _allocate_like_vllm_026(DlinferAttentionBackend, 5, 16, 2, 8, layers_dim)
    finally:
        set_kv_cache_layout(None)
    assert cache.shape == (5, 2, 16, 16)
    key_cache, value_cache = split_kv_cache(cache, 8)
    assert key_cache.shape == value_cache.shape == (5, 16, 2, 8)
    # Writes through the views land in the packed tensor: key first, value after it.
    key_cache[3, 7, 1].fill_(1.0)
    value_cache[3, 7, 1].fill_(2.0)
    assert torch.equal(cache[3, 1, 7], torch.tensor([1.0] * 8 + [2.0] * 8))
    assert cache.sum() == 8 * 3
    with pytest.raises(ValueError, match="block_size"):
        DlinferAttentionBackend.get_kv_cache_shape(5, 12, 2, 8)


@pytest.mark.skipif(compat.KVCacheLayout is None, reason="newer vLLM's KV cache layout API")
def test_packed_kv_cache_layouts():
    layouts = DlinferAttentionBackend.supported_kv_cache_layouts()
    assert layouts[0] == compat.KVCacheLayout.LBNHC and compat.KVCacheLayout.LBHNC in layouts
