"""vLLM adapter: runs vLLM's layers and attention on ``dlinfer.ops``, with no change to vLLM or the model.

Installed next to vLLM, dlinfer declares the entry point ``vllm.general_plugins: dlinfer =
dlinfer.framework.vllm_ext:register``. vLLM calls :func:`register` in every process it starts (the API
server, the engine core, each worker), before the model is built. It registers, through vLLM's public hooks:

========================  ==================================  =================================================
switch name               vLLM class replaced                 dlinfer ops
========================  ==================================  =================================================
``rms_norm``              ``RMSNorm`` (``register_oot``)      ``rms_norm``, ``add_rms_norm``
``silu_and_mul``          ``SiluAndMul``                      ``silu_and_mul``
``rotary_embedding``      ``RotaryEmbedding`` (NeoX style)    ``apply_rotary_pos_emb``
``fused_moe``             ``UnquantizedFusedMoEMethod``       ``moe_gating_topk_softmax``, ``fused_moe``
``attention``             the ``CPU_ATTN`` backend (CPU),     ``fill_kv_cache``, ``prefill_attention``,
                          plus a ``DLINFER`` backend name     ``paged_prefill_attention``, ``paged_decode_attention``
                          (``CUSTOM`` on vLLM 0.26): select
                          it on CUDA with ``LLM(...,
                          attention_config=attention_config())``
========================  ==================================  =================================================

Switches (environment variables, read by every process):

* ``DLINFER_VLLM=0`` turns the whole plugin off (so does leaving ``dlinfer`` out of vLLM's ``VLLM_PLUGINS``).
* ``DLINFER_VLLM_DISABLE=rms_norm,rotary_embedding`` leaves the listed ops to vLLM (``rotary`` and ``moe`` are
  accepted for ``rotary_embedding`` and ``fused_moe``; ``all`` disables every op).

A layer whose configuration dlinfer's ops do not cover (GPT-J style rotary, a MoE with grouped top-k,
sliding-window attention, ...) keeps vLLM's own implementation for the layer ops and says why once in the log;
for attention, whose backend is chosen for the whole model, an unsupported feature is refused with a
``NotImplementedError`` naming it (on CUDA-like platforms through vLLM's ``validate_configuration``).
"""

from __future__ import annotations

import logging
import threading

from dlinfer import settings
from dlinfer.errors import warn

# A child of vLLM's logger, so the messages show in vLLM's log with its format and level.
logger = logging.getLogger("vllm.dlinfer")

#: Switch names, in registration order.
OPS = ("rms_norm", "silu_and_mul", "rotary_embedding", "fused_moe", "attention")
_ALIASES = {"rotary": "rotary_embedding", "rope": "rotary_embedding", "moe": "fused_moe",
            "attn": "attention", "silu": "silu_and_mul", "rmsnorm": "rms_norm"}
#: dlinfer ops behind each switch (what the counters count).
DLINFER_OPS = {
    "rms_norm": ("rms_norm", "add_rms_norm"),
    "silu_and_mul": ("silu_and_mul",),
    "rotary_embedding": ("apply_rotary_pos_emb",),
    "fused_moe": ("moe_gating_topk_softmax", "fused_moe"),
    "attention": ("fill_kv_cache", "prefill_attention", "paged_prefill_attention", "paged_decode_attention"),
}
ATTENTION_BACKEND_PATH = "dlinfer.framework.vllm_ext.attention.DlinferAttentionBackend"

_lock = threading.Lock()
_registered: dict[str, str] = {}  # switch name -> what was registered
_done = False
_summary_logged = False


def enabled() -> bool:
    """``False`` when ``DLINFER_VLLM`` is ``0``/``false``/``off``/``no`` (an unknown value is an error)."""
    return settings.flag("DLINFER_VLLM")


def disabled_ops(value: str | None = None) -> frozenset[str]:
    """The switch names turned off by ``DLINFER_VLLM_DISABLE`` (or ``value``); unknown names are logged."""
    raw = settings.text("DLINFER_VLLM_DISABLE") if value is None else value
    out = set()
    for item in raw.replace(";", ",").split(","):
        name = item.strip().lower().replace("-", "_")
        if not name:
            continue
        if name == "all":
            return frozenset(OPS)
        name = _ALIASES.get(name, name)
        if name not in OPS:
            logger.warning("dlinfer: DLINFER_VLLM_DISABLE names unknown op %r (known: %s)", item.strip(),
                           ", ".join(OPS))
            continue
        out.add(name)
    return frozenset(out)


def attention_config() -> dict[str, str]:
    """``attention_config`` for ``vllm.LLM(...)`` that selects dlinfer's attention backend, needed on CUDA-like
    platforms (on a CPU the plugin serves vLLM's ``CPU_ATTN`` anyway): ``{"backend": "DLINFER"}``, or
    ``{"backend": "CUSTOM"}`` on vLLM 0.26.

    The name is registered in this process first: newer vLLM checks it when ``LLM`` builds its configuration,
    before it loads plugins. Engine processes register it again when vLLM loads the plugin there. On a vLLM that
    adds the name (0.32), an engine process started with ``spawn`` receives the configuration before it loads
    plugins and cannot read the new name back: run such engines forked (vLLM's default on CUDA when the parent has
    not initialized CUDA). vLLM 0.26's ``CUSTOM`` is a fixed member and has no such limit.
    """
    from dlinfer.framework.vllm_ext import compat

    return {"backend": compat.register_attention_backend(ATTENTION_BACKEND_PATH)}


def registered_ops() -> dict[str, str]:
    """What :func:`register` took over in this process: ``{switch name: vLLM class or backend}``."""
    return dict(_registered)


def register() -> None:
    """vLLM plugin entry point. Idempotent, cheap, and never raises (vLLM does not catch plugin errors)."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        _done = True
        try:
            on = enabled()
        except ValueError as exc:  # a misspelt switch: say so on stderr, and leave vLLM as it is
            warn(f"dlinfer: vLLM plugin off: {exc}")
            return
        if not on:
            logger.info("dlinfer: vLLM plugin off (DLINFER_VLLM=%s)", settings.text("DLINFER_VLLM"))
            return
        try:
            _register(disabled_ops())
        except Exception:  # noqa: BLE001 - a plugin error must not take vLLM down; stock ops keep working
            logger.exception("dlinfer: vLLM plugin failed to register; vLLM keeps its own ops")
            return


def log_summary_once() -> None:
    """Log, once per process, what the plugin took over and which vendor serves it.

    Called when the first replaced layer is built: vLLM loads plugins before it configures logging, so a
    message from :func:`register` itself would be lost.
    """
    global _summary_logged
    if _summary_logged:
        return
    _summary_logged = True
    _log_summary()


def _register(off: frozenset[str]) -> None:
    from vllm.model_executor.custom_op import op_registry_oot

    def oot(base, replacement, switch: str) -> None:
        name = base.__name__
        current = op_registry_oot.get(name)
        if current is replacement:
            _registered[switch] = name
            return
        if current is not None:
            logger.warning("dlinfer: %s is already replaced by %s.%s; leaving it", name, current.__module__,
                           current.__qualname__)
            return
        base.register_oot(replacement)
        _registered[switch] = name

    if "rms_norm" not in off or "silu_and_mul" not in off or "rotary_embedding" not in off:
        from dlinfer.framework.vllm_ext import layers

        if "rms_norm" not in off:
            oot(layers.RMSNorm, layers.DlinferRMSNorm, "rms_norm")
        if "silu_and_mul" not in off:
            oot(layers.SiluAndMul, layers.DlinferSiluAndMul, "silu_and_mul")
        if "rotary_embedding" not in off:
            oot(layers.RotaryEmbedding, layers.DlinferRotaryEmbedding, "rotary_embedding")
    if "fused_moe" not in off:
        from dlinfer.framework.vllm_ext import moe

        oot(moe.UnquantizedFusedMoEMethod, moe.DlinferUnquantizedFusedMoEMethod, "fused_moe")
    if "attention" not in off:
        _register_attention()


def _register_attention() -> None:
    from vllm.platforms import current_platform

    from dlinfer.framework.vllm_ext import compat

    # A name of its own (DLINFER; vLLM 0.26 has only the CUSTOM slot), so that vLLM reports it and CUDA-like
    # platforms select it with attention_config={"backend": <name>}.
    name = compat.register_attention_backend(ATTENTION_BACKEND_PATH)
    if current_platform.is_cpu():
        # vLLM's CPU platform always picks CPU_ATTN: take that member over.
        compat.override_attention_backend("CPU_ATTN", ATTENTION_BACKEND_PATH)
        _registered["attention"] = "CPU_ATTN -> " + name
    else:
        _registered["attention"] = f"{name} (select with attention_config={{'backend': '{name}'}})"


def _log_summary() -> None:
    try:
        from dlinfer.vendor import default_device_type, vendor_for_device

        device = _vllm_device_type() or default_device_type()
        parts = []
        for switch in OPS:
            if switch in _registered:
                ops = DLINFER_OPS[switch]
                vendors = sorted({vendor_for_device(device, op) for op in ops})
                parts.append(f"{switch} ({_registered[switch]}; vendor {'/'.join(vendors)})")
        off = [s for s in OPS if s not in _registered]
        logger.info("dlinfer: vLLM plugin took over on %s: %s%s", device, ", ".join(parts) or "nothing",
                    f"; left to vLLM: {', '.join(off)}" if off else "")
    except Exception:  # noqa: BLE001 - logging must never break registration
        logger.debug("dlinfer: could not summarize the vLLM plugin", exc_info=True)


def _vllm_device_type() -> str | None:
    try:
        from vllm.platforms import current_platform

        return current_platform.device_type or None
    except Exception:  # noqa: BLE001
        return None


def _reset_for_tests() -> None:
    """Forget that :func:`register` ran in this process (the vLLM registries keep their entries)."""
    global _done
    with _lock:
        _done = False
        _registered.clear()
