"""What LMDeploy + dlinfer serves on CUDA, and the refusal at engine start of what it does not.

Checked in the main process before LMDeploy builds its executor (``patch`` wraps ``build_executor``), so an
unsupported setup fails with one message naming every feature, instead of a worker crashing or, worse, a model
running with a feature silently ignored (LMDeploy's dlinfer attention ignores sliding windows, soft-capping and
ALiBi, for instance).
"""

from __future__ import annotations

from typing import Any

from dlinfer.errors import NotSupportedError

#: Hugging Face architectures whose LMDeploy models run every layer through ``dlinfer.ops`` and are tested.
SUPPORTED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
})

_SUPPORTED_DTYPES = {"auto", "float16", "bfloat16", "float32", "half", "bf16", "fp16", "float", None}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def model_features(hf_config: Any) -> list[str]:
    """Features of a Hugging Face config that dlinfer's LMDeploy backend cannot serve, in words."""
    reasons = []
    archs = list(_get(hf_config, "architectures", None) or [])
    if not archs:
        reasons.append("a model config without 'architectures'")
    for arch in archs:
        if arch not in SUPPORTED_ARCHITECTURES:
            reasons.append(f"architecture {arch} (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    quant = _get(hf_config, "quantization_config", None)
    if quant:
        method = _get(quant, "quant_method", None) or "unknown"
        reasons.append(f"quantized weights (quantization_config.quant_method={method!r})")
    window = _get(hf_config, "sliding_window", None)
    use_window = _get(hf_config, "use_sliding_window", True)
    if window and use_window and int(window) < int(_get(hf_config, "max_position_embeddings", 0) or 0):
        reasons.append(f"sliding-window attention (sliding_window={window})")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if _get(hf_config, name, None):
            reasons.append(f"logit soft-capping ({name}={_get(hf_config, name)})")
    if _get(hf_config, "alibi", False) or _get(hf_config, "use_alibi", False):
        reasons.append("ALiBi attention")
    rope = _get(hf_config, "rope_parameters", None) or _get(hf_config, "rope_scaling", None)
    rope_type = _get(rope, "rope_type", None) or _get(rope, "type", None)
    if rope_type in ("mrope",) or _get(rope, "mrope_section", None):
        reasons.append("multimodal rotary embedding (mrope)")
    return reasons


def engine_features(*, cache_config: Any = None, backend_config: Any = None, dist_config: Any = None,
                    misc_config: Any = None, adapters: Any = None, specdecode_config: Any = None,
                    dtype: Any = None) -> list[str]:
    """LMDeploy engine settings dlinfer's backend cannot serve, in words."""
    reasons = []
    quant_policy = int(_get(cache_config, "quant_policy", 0) or 0)
    if quant_policy:
        reasons.append(f"KV-cache quantization (quant_policy={quant_policy}); use quant_policy=0")
    if adapters:
        reasons.append(f"LoRA adapters ({', '.join(sorted(adapters))})")
    if specdecode_config is not None:
        reasons.append("speculative decoding")
    dp = int(_get(dist_config, "dp", 1) or 1)
    ep = int(_get(dist_config, "ep", 1) or 1)
    if dp > 1:
        reasons.append(f"data parallelism (dp={dp}); use tensor parallelism (tp)")
    if ep > 1:
        reasons.append(f"expert parallelism (ep={ep}); use tensor parallelism (tp)")
    fmt = _get(misc_config, "model_format", None)
    if fmt not in (None, "hf"):
        reasons.append(f"model_format={fmt!r} (quantized weights)")
    if isinstance(dtype, str) and dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"dtype={dtype!r}")
    device_type = _get(backend_config, "device_type", "cuda")
    if device_type not in (None, "cuda"):
        reasons.append(f"device_type={device_type!r} (dlinfer's LMDeploy adapter serves 'cuda'; LMDeploy's own "
                       "dlinfer backends serve ascend/maca/camb)")
    return reasons


def check_engine_config(hf_config: Any, engine_config: Any, speculative_config: Any = None) -> None:
    """:func:`check_supported` for LMDeploy's user-facing ``PytorchEngineConfig`` (``None``: defaults)."""
    from types import SimpleNamespace

    def get(name, default=None):
        return _get(engine_config, name, default)

    check_supported(
        hf_config,
        cache_config=SimpleNamespace(quant_policy=get("quant_policy", 0)),
        backend_config=SimpleNamespace(device_type=get("device_type", "cuda")),
        dist_config=SimpleNamespace(dp=get("dp", 1), ep=get("ep", 1)),
        misc_config=SimpleNamespace(model_format=get("model_format")),
        adapters=get("adapters"),
        specdecode_config=speculative_config,
        dtype=get("dtype", "auto"),
    )


def check_supported(hf_config: Any = None, **engine_settings: Any) -> None:
    """Raise :class:`NotSupportedError` naming every unsupported feature; return silently otherwise."""
    reasons = (model_features(hf_config) if hf_config is not None else []) + engine_features(**engine_settings)
    if reasons:
        raise NotSupportedError(
            "LMDeploy on dlinfer cannot serve this setup: " + "; ".join(reasons)
            + ". Run stock LMDeploy instead (plain `lmdeploy`, DLINFER_LMDEPLOY unset, or "
              "dlinfer.framework.lmdeploy_ext.revert()).")
