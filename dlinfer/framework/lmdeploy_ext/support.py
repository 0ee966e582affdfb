"""What LMDeploy + dlinfer serves on CUDA, and the refusal at engine start of what it does not.

Checked in the main process before LMDeploy builds its executor (``patch`` wraps ``build_executor``), so an
unsupported setup fails with one message naming every feature, instead of a worker crashing or, worse, a model
running with a feature silently ignored (LMDeploy's dlinfer attention ignores sliding windows, soft-capping and
ALiBi, for instance).

Quantization served: AWQ checkpoints (4-bit weights, GEMM packing: ``weight_quant_matmul``) and LMDeploy's
SmoothQuant W8A8 checkpoints (int8: ``dynamic_quant``, ``linear_w8a8``, ``rms_norm_w8a8``, ``add_rms_norm_w8a8``)
of the dense architectures and of Mixtral (its experts through ``fused_moe_w8a8``, its router in float), and the
KV cache in 8 or 4 bits (``quant_policy`` 8 / 4: stock LMDeploy's per-token scales and zeros,
``dlinfer.ops.kv_quant``). Refused: FP8 weights or KV cache, GPTQ / compressed-tensors, AWQ on MoE models (LMDeploy
builds no AWQ experts), SmoothQuant on Qwen3-MoE (LMDeploy 0.18 itself cannot run it: it builds the attention's
q/k norms as W8A8 norms, whose int8 output its rotary embedding cannot take).
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

#: KV-cache quantization served (LMDeploy's ``quant_policy``): none, 4-bit and 8-bit integer caches.
SUPPORTED_QUANT_POLICIES = frozenset({0, 4, 8})
#: ``model_format`` values served: the checkpoint's own format (AWQ checkpoints carry their quantization_config).
SUPPORTED_MODEL_FORMATS = frozenset({None, "hf", "awq"})
_MOE_ARCHITECTURES = frozenset({"Qwen3MoeForCausalLM", "MixtralForCausalLM"})
#: SmoothQuant (W8A8) checkpoints served: the dense architectures and Mixtral (W8A8 experts: ``fused_moe_w8a8``).
W8A8_ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM"})
_W8A8_REFUSED = {
    "Qwen3MoeForCausalLM": "LMDeploy 0.18 cannot run it: it builds the attention's q/k norms as W8A8 norms, whose "
                           "int8 output its rotary embedding cannot take",
}


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
        reasons.extend(weight_quant_features(quant, archs))
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


def weight_quant_features(quant: Any, archs: list[str]) -> list[str]:
    """What of a checkpoint's ``quantization_config`` dlinfer's LMDeploy backend cannot serve, in words."""
    method = _get(quant, "quant_method", None) or "unknown"
    what = f"quantized weights (quantization_config.quant_method={method!r}"
    if method == "awq":
        bits, version = _get(quant, "bits", 4), str(_get(quant, "version", "gemm") or "gemm").lower()
        reasons = []
        if int(bits) != 4:
            reasons.append(f"{what}, bits={bits}; AWQ is served in 4 bits)")
        if version != "gemm":
            reasons.append(f"{what}, version={version!r}; AWQ is served in its GEMM packing)")
        moe = sorted(set(archs) & _MOE_ARCHITECTURES)
        if moe:
            reasons.append(f"{what} on MoE architecture {', '.join(moe)}: LMDeploy builds no AWQ experts)")
        return reasons
    if method == "smooth_quant":
        quant_dtype = _get(quant, "quant_dtype", None) or "int8"
        reasons = []
        if quant_dtype != "int8":
            reasons.append(f"{what}, quant_dtype={quant_dtype!r}; W8A8 is served in int8)")
        for arch in sorted((set(archs) & SUPPORTED_ARCHITECTURES) - W8A8_ARCHITECTURES):
            why = _W8A8_REFUSED[arch]
            reasons.append(f"{what} on {arch}: {why}; SmoothQuant is served on "
                           f"{', '.join(sorted(W8A8_ARCHITECTURES))})")
        return reasons
    return [f"{what}; served: 'awq' (4-bit, GEMM) and 'smooth_quant' (int8 W8A8))"]


def engine_features(*, cache_config: Any = None, backend_config: Any = None, dist_config: Any = None,
                    misc_config: Any = None, adapters: Any = None, specdecode_config: Any = None,
                    dtype: Any = None) -> list[str]:
    """LMDeploy engine settings dlinfer's backend cannot serve, in words."""
    reasons = []
    quant_policy = int(_get(cache_config, "quant_policy", 0) or 0)
    if quant_policy not in SUPPORTED_QUANT_POLICIES:
        reasons.append(f"KV-cache quantization quant_policy={quant_policy} (served: 0, 4 and 8, the integer caches; "
                       "not FP8 or TurboQuant)")
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
    if fmt not in SUPPORTED_MODEL_FORMATS:
        reasons.append(f"model_format={fmt!r} (served: the checkpoint's own format, 'hf' or 'awq')")
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
