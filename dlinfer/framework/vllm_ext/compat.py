"""Every part of the vLLM plugin that depends on the vLLM release, in one place (vLLM 0.26 and 0.32 are tested).

The plugin points were compared between vLLM 0.26.0 (the newest release whose CUDA wheel pins torch 2.11,
the torch of the GPU image) and 0.32.0 (the CPU test environment):

=====================================  ====================================  ==================================
plugin point                           vLLM 0.26                             vLLM 0.32
=====================================  ====================================  ==================================
a new attention backend name           none: the one third-party slot is     ``register_backend("NAME", path)``
                                       ``AttentionBackendEnum.CUSTOM``       adds an ``AttentionBackendEnum``
                                       (``register_backend(CUSTOM, path)``)  member
overriding a stock backend             ``register_backend(member, path)``    same
``Attention`` layer                    ``AttentionBackendEnum[              same (so ``get_name()`` must be
                                       backend.get_name()]``                 the registered member's name)
KV-cache layout of a backend           ``get_kv_cache_shape`` (logical       ``supported_kv_cache_layouts()``
                                       ``[blocks, Hk, block, 2 D]``) +       -> ``KVCacheLayout`` members; the
                                       ``get_kv_cache_stride_order`` (the    logical shape ``[blocks, Hk,
                                       global NHD/HND layout)                block, D + Dv]`` comes from the spec
``FusedMoEConfig.has_hash_routing``    absent (no hash routing)              present
``CustomOp.register_oot``,             same in both                          same
``dispatch_forward``, RMSNorm /
SiluAndMul / RotaryEmbedding fields
``AttentionImpl`` / builder API,       same in both (``build``,              same
``CommonAttentionMetadata`` fields     ``_init_reorder_batch_threshold``,
the plugin reads                       ``seq_lens_cpu_upper_bound``, ...)
``AttentionCGSupport``, splitting ops  same: ``NEVER`` .. ``ALWAYS``; the    same
                                       graph splits at
                                       ``vllm::unified_attention_with_output``
``UnquantizedFusedMoEMethod``          same (``is_monolithic``,              same
                                       ``apply_monolithic(layer, x,
                                       router_logits, input_ids)``)
=====================================  ====================================  ==================================

Each difference is decided by what the installed vLLM provides (feature tests, not version numbers), so a
release between the two behaves like the older or the newer one according to its API.

CUDA graphs and ``torch.compile``: dlinfer's attention runs inside vLLM's ``unified_attention_with_output``
custom op, where vLLM's piecewise compilation splits the graph in both releases; the backend declares
``AttentionCGSupport.NEVER`` (its per-step metadata reads host values), so vLLM captures the pieces between
attention calls (piecewise CUDA graphs) and runs attention eagerly.
"""

from __future__ import annotations

import logging

from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

logger = logging.getLogger("vllm.dlinfer")

__all__ = ["ATTENTION_BACKEND_NAME", "PackedKVCacheLayout", "moe_has_hash_routing", "named_backends",
           "override_attention_backend", "register_attention_backend"]

#: Newer vLLM (0.32 here): ``register_backend`` accepts a new name and adds an ``AttentionBackendEnum`` member.
named_backends: bool = callable(getattr(AttentionBackendEnum, "register", None))

#: The ``AttentionBackendEnum`` member dlinfer's backend is registered as, and the name it reports
#: (``get_name()``); select it on CUDA with ``attention_config={"backend": ATTENTION_BACKEND_NAME}``.
ATTENTION_BACKEND_NAME: str = "DLINFER" if named_backends else "CUSTOM"


def register_attention_backend(class_path: str) -> str:
    """Register dlinfer's backend under :data:`ATTENTION_BACKEND_NAME`; return that name.

    Raises ``RuntimeError`` when vLLM 0.26's single third-party slot (``CUSTOM``) already holds another
    plugin's backend: dlinfer does not take it from that plugin.
    """
    if named_backends:
        if ATTENTION_BACKEND_NAME not in AttentionBackendEnum.__members__:
            register_backend(ATTENTION_BACKEND_NAME, class_path)
        else:
            override_attention_backend(ATTENTION_BACKEND_NAME, class_path)
        return ATTENTION_BACKEND_NAME
    member = AttentionBackendEnum[ATTENTION_BACKEND_NAME]
    try:
        current = member.get_path()
    except ValueError:  # the slot is empty
        current = None
    if current not in (None, class_path):
        raise RuntimeError(f"vLLM's third-party attention backend slot {ATTENTION_BACKEND_NAME} already holds "
                           f"{current}; dlinfer's attention backend is not registered")
    register_backend(member, class_path)
    return ATTENTION_BACKEND_NAME


def override_attention_backend(member_name: str, class_path: str) -> None:
    """Serve an existing backend member (e.g. ``CPU_ATTN``) with ``class_path`` (same API in 0.26 and 0.32)."""
    if member_name not in AttentionBackendEnum.__members__:
        raise ValueError(f"member_name: vLLM has no attention backend {member_name!r}")
    register_backend(AttentionBackendEnum[member_name], class_path)


def moe_has_hash_routing(moe) -> bool:
    """``FusedMoEConfig.has_hash_routing`` where vLLM has it (0.26 has no hash routing)."""
    return bool(getattr(moe, "has_hash_routing", False))


try:  # vLLM 0.32: the backend lists the physical layouts its kernels read
    from vllm.v1.kv_cache_interface import KVCacheLayout
except ImportError:  # vLLM 0.26: the backend gives the logical shape and a stride order
    KVCacheLayout = None


if KVCacheLayout is not None:

    class PackedKVCacheLayout:
        """Mixin for an ``AttentionBackend``: one cache tensor per layer, logically ``[num_blocks, Hk,
        block_size, D + Dv]`` (key and value packed in the last dimension), physically token-major blocks
        (preferred) or head-major blocks; any order works as long as the last dimension is contiguous."""

        @classmethod
        def supported_kv_cache_layouts(cls) -> tuple:
            return (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC)

else:
    from vllm.v1.attention.backends.utils import get_kv_cache_layout

    # Permutations from the logical [num_blocks, Hk, block_size, 2 D] (with a leading num_layers
    # dimension when asked) to the physical order of vLLM's global NHD / HND cache layout.
    _STRIDE_ORDERS = {
        ("NHD", False): (0, 2, 1, 3),  # [num_blocks, block_size, Hk, 2 D]
        ("NHD", True): (1, 0, 3, 2, 4),  # [num_blocks, num_layers, block_size, Hk, 2 D]
        ("HND", False): (0, 1, 2, 3),  # [num_blocks, Hk, block_size, 2 D]
        ("HND", True): (1, 2, 0, 3, 4),  # [num_blocks, Hk, num_layers, block_size, 2 D]
    }

    class PackedKVCacheLayout:
        """Mixin for an ``AttentionBackend`` (vLLM 0.26 API): the same packed cache as on newer vLLM, logical
        shape ``[num_blocks, Hk, block_size, 2 D]`` in vLLM's global NHD (default) or HND order."""

        @staticmethod
        def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                               cache_dtype_str: str = "auto") -> tuple[int, ...]:
            if block_size % 16 != 0:
                raise ValueError(f"block_size: must be a multiple of 16, got {block_size}")
            return (num_blocks, num_kv_heads, block_size, 2 * head_size)

        @staticmethod
        def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
            layout = get_kv_cache_layout()
            try:
                return _STRIDE_ORDERS[(layout, bool(include_num_layers_dimension))]
            except KeyError:
                raise ValueError(f"unknown vLLM KV cache layout {layout!r} (expected NHD or HND)") from None
