"""The peers dlinfer is timed against: LMDeploy 0.18.0's CUDA Triton kernels and plain torch.

LMDeploy's kernels are loaded without its serving stack: ``lmdeploy/__init__.py`` imports the engine, so the
packages on the way to ``lmdeploy/pytorch/kernels/cuda`` are registered as bare module objects (with the
right ``__path__``), ``lmdeploy.utils.get_logger`` and ``lmdeploy.messages.QuantPolicy`` are stubbed, and only
the kernel modules are imported. Nothing here touches CUDA at import time.

Every adapter takes dlinfer's layouts (caches ``[num_blocks, block_size, Hk, D]``, packed ``[T, H, D]``
tokens) and the metadata LMDeploy's CUDA backend would hand its kernel for the same batch; the callers in
``gpu_suite.py`` build both views of one batch.
"""

from __future__ import annotations

import enum
import importlib
import importlib.machinery
import logging
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dlinfer.utils.layout import n_fastest

LMDEPLOY_VERSION = "0.18.0"
KERNEL_MODULES = ("pagedattention", "flashattention", "fill_kv_cache", "flatten_kv_cache", "rms_norm",
                  "apply_rotary_pos_emb", "activation", "moe.fused_moe")


# ------------------------------------------------------------------------------------------ LMDeploy loader
class _QuantPolicy(enum.IntEnum):
    """Stand-in for ``lmdeploy.messages.QuantPolicy`` (the values of LMDeploy 0.18.0)."""

    NONE = 0
    INT4 = 4
    INT8 = 8
    FP8 = 16
    FP8_E5M2 = 17
    TURBO_QUANT = 42


def find_lmdeploy(search_path: list[str] | None = None) -> Path:
    """The directory of the ``lmdeploy`` package, found without importing it.

    ``DLINFER_PEER_LMDEPLOY`` may name the package directory (``.../site-packages/lmdeploy``) directly.
    """
    env = os.environ.get("DLINFER_PEER_LMDEPLOY", "").strip()
    if env:
        path = Path(env)
        if not (path / "pytorch" / "kernels" / "cuda").is_dir():
            raise FileNotFoundError(f"DLINFER_PEER_LMDEPLOY={env} holds no pytorch/kernels/cuda")
        return path
    spec = importlib.machinery.PathFinder.find_spec("lmdeploy", search_path)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"lmdeploy {LMDEPLOY_VERSION} is not on sys.path: install the stripped wheel from scripts/gpu_wheels.sh "
            "(pip install --no-deps --target DIR .whl/*.whl; PYTHONPATH=DIR) or set DLINFER_PEER_LMDEPLOY")
    return Path(list(spec.submodule_search_locations)[0])


def _bare_package(name: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module.__package__ = name
    module.__file__ = None
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__spec__.submodule_search_locations = [str(path)]
    return module


@dataclass
class LmdeployKernels:
    """LMDeploy's kernel modules, by their file names."""

    root: Path
    version: str
    pagedattention: types.ModuleType
    flashattention: types.ModuleType
    fill_kv_cache: types.ModuleType
    flatten_kv_cache: types.ModuleType
    rms_norm: types.ModuleType
    apply_rotary_pos_emb: types.ModuleType
    activation: types.ModuleType
    fused_moe: types.ModuleType


_loaded: LmdeployKernels | None = None


def load_lmdeploy(search_path: list[str] | None = None) -> LmdeployKernels:
    """Import LMDeploy's CUDA Triton kernels without its serving stack (once per process)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    root = find_lmdeploy(search_path)
    cuda_dir = root / "pytorch" / "kernels" / "cuda"
    version = _wheel_version(root)
    if "lmdeploy" in sys.modules and getattr(sys.modules["lmdeploy"], "__file__", None):
        # The real package is already imported (an environment with LMDeploy installed): use it as is.
        pass
    else:
        packages = {
            "lmdeploy": root,
            "lmdeploy.pytorch": root / "pytorch",
            "lmdeploy.pytorch.kernels": root / "pytorch" / "kernels",
            "lmdeploy.pytorch.kernels.cuda": cuda_dir,
            "lmdeploy.pytorch.kernels.cuda.moe": cuda_dir / "moe",
        }
        for name, path in packages.items():
            if name not in sys.modules:
                sys.modules[name] = _bare_package(name, path)
        if "lmdeploy.utils" not in sys.modules:
            utils = types.ModuleType("lmdeploy.utils")
            utils.get_logger = lambda name=None, *a, **k: logging.getLogger(name or "lmdeploy")
            sys.modules["lmdeploy.utils"] = utils
        if "lmdeploy.messages" not in sys.modules:
            messages = types.ModuleType("lmdeploy.messages")
            messages.QuantPolicy = _QuantPolicy
            sys.modules["lmdeploy.messages"] = messages
    base = "lmdeploy.pytorch.kernels.cuda"
    mods = {name.split(".")[-1]: importlib.import_module(f"{base}.{name}") for name in KERNEL_MODULES}
    _loaded = LmdeployKernels(root=root, version=version, **mods)
    return _loaded


def _wheel_version(root: Path) -> str:
    for info in root.parent.glob("lmdeploy-*.dist-info"):
        return info.name[len("lmdeploy-"):-len(".dist-info")]
    version_file = root / "version.py"
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("'\"")
    return "unknown"


# ------------------------------------------------------------------------------------------ LMDeploy adapters
def lmdeploy_paged_decode(k: LmdeployKernels, query, key_cache, value_cache, block_table, kv_seqlens,
                          softmax_scale):
    """``flash_attn_with_kvcache`` as LMDeploy's decode path calls it (one query token per sequence)."""
    return k.pagedattention.flash_attn_with_kvcache(query, key_cache, value_cache, cache_seqlens=kv_seqlens,
                                                    page_table=block_table, max_seqlen_q=1,
                                                    softmax_scale=softmax_scale)


def lmdeploy_prefill(k: LmdeployKernels, query, key, value, cu_seqlens_q, cu_seqlens_k, max_q_seq_len,
                     max_kv_seq_len, softmax_scale, causal=True):
    """``flash_attn_varlen_func`` on packed ``[T, H, D]`` tokens (``kv_layout='shd'``)."""
    return k.flashattention.flash_attn_varlen_func(query, key, value, cu_seqlens_q=cu_seqlens_q,
                                                   cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_q_seq_len,
                                                   max_seqlen_k=max_kv_seq_len, softmax_scale=softmax_scale,
                                                   causal=causal, kv_layout="shd")


def lmdeploy_paged_prefill(k: LmdeployKernels, query, key_cache, value_cache, block_table, cu_seqlens_q,
                           cu_seqlens_k, kv_seqlens, kv_start_loc, max_q_seq_len, max_kv_seq_len,
                           kv_flatten_size: int, softmax_scale, causal=True):
    """LMDeploy's Triton prefill path: flatten the paged cache (``hsd``), then varlen flash attention.

    ``kv_flatten_size`` is the host-side total of ``kv_seqlens`` LMDeploy keeps in its metadata; the
    flattened buffer is padded by one block as LMDeploy pads it.
    """
    block_size = key_cache.size(1)
    out_size = -(-kv_flatten_size // block_size) * block_size + block_size
    flat_k, flat_v = k.flatten_kv_cache.flatten_kv_cache(key_cache, value_cache, kv_seqlens, block_table,
                                                         start_loc=kv_start_loc, out_size=out_size,
                                                         out_dtype=query.dtype, flatten_kv_layout="hsd")
    return k.flashattention.flash_attn_varlen_func(query, flat_k, flat_v, cu_seqlens_q=cu_seqlens_q,
                                                   cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_q_seq_len,
                                                   max_seqlen_k=max_kv_seq_len, softmax_scale=softmax_scale,
                                                   causal=causal, kv_layout="hsd")


def lmdeploy_fill_kv_cache(k: LmdeployKernels, key, value, key_cache, value_cache, q_start_loc, q_seqlens,
                           kv_seqlens, max_q_seq_len, block_table):
    """``fill_kv_cache``: sequence b's ``q_seqlens[b]`` new tokens are its last ones of ``kv_seqlens[b]``."""
    return k.fill_kv_cache.fill_kv_cache(key, value, key_cache, value_cache, q_start_loc, q_seqlens,
                                         kv_seq_length=kv_seqlens, max_q_seq_length=max_q_seq_len,
                                         block_offsets=block_table)


def lmdeploy_rms_norm(k: LmdeployKernels, hidden, weight, eps):
    return k.rms_norm.rms_norm(hidden, weight, eps)


def lmdeploy_add_rms_norm(k: LmdeployKernels, hidden, residual, weight, eps):
    return k.rms_norm.rms_norm(hidden, weight, eps, residual=residual)


def lmdeploy_rotary(k: LmdeployKernels, query, key, cos, sin):
    """In place, as LMDeploy's CUDA backend calls it (``q_embed=q``, ``k_embed=k``)."""
    return k.apply_rotary_pos_emb.apply_rotary_pos_emb(query, key, cos, sin, q_embed=query, k_embed=key)


def lmdeploy_silu_and_mul(k: LmdeployKernels, x):
    return k.activation.silu_and_mul(x)


def lmdeploy_moe_weights(gate_up_weights: torch.Tensor, down_weights: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' weights in the layout stock LMDeploy 0.18 serves them in on CUDA: its ``TritonFusedMoEImpl.
    update_weights`` (``backends/cuda/moe/default.py``) keeps the shapes ``[E, N, K]`` but stores them N-fastest
    (strides ``(N*K, 1, N)``), the layout its ``fused_moe`` kernel is run on in the engine. A copy of each."""
    return n_fastest(gate_up_weights), n_fastest(down_weights)


def lmdeploy_fused_moe(k: LmdeployKernels, hidden, gate_up_weights, down_weights, topk_weights, topk_ids, topk,
                       renormalize):
    return k.fused_moe.fused_moe(hidden, gate_up_weights, down_weights, topk_weights, topk_ids, topk=topk,
                                 renormalize=renormalize)


# --------------------------------------------------------------------------------------------- torch peers
def torch_paged_decode(query, key_cache, value_cache, block_table, context_len: int, softmax_scale):
    """Gather every sequence's blocks, then SDPA (all sequences of one static ``context_len``)."""
    batch, num_heads, _ = query.shape
    block_size = key_cache.shape[1]
    num_blocks = -(-context_len // block_size)
    table = block_table[:, :num_blocks].long()
    keys = key_cache[table].flatten(1, 2)[:, :context_len].transpose(1, 2)      # [B, Hk, L, D]
    values = value_cache[table].flatten(1, 2)[:, :context_len].transpose(1, 2)
    out = F.scaled_dot_product_attention(query.unsqueeze(2), keys, values, scale=softmax_scale, enable_gqa=True)
    return out.squeeze(2)


def torch_prefill_sdpa(query4, key4, value4, softmax_scale, backend: str):
    """SDPA on ``[B, H, S, D]`` (equal-length sequences, K/V already expanded to the query heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    with sdpa_kernel(which):
        return F.scaled_dot_product_attention(query4, key4, value4, is_causal=True, scale=softmax_scale)


def torch_prefill_varlen(query, key, value, cu_seqlens, max_seqlen, softmax_scale, backend: str):
    """Causal varlen attention through torch's private library kernels, on the packed ``[T, H, D]`` layout the
    engines use, K/V with their own (fewer) heads: ``backend`` "cudnn" (``aten._cudnn_attention_forward``, cuDNN's
    ragged SDPA) or "fa2" (``aten._flash_attention_forward``, FlashAttention-2 in torch). Returns ``[T, Hq, D]``.
    These are what a library-backed path of the registry could call for real (unequal) sequence lengths; they
    raise where this torch or cuDNN build does not support the layout or GQA."""
    if backend == "cudnn":
        return torch.ops.aten._cudnn_attention_forward(query, key, value, None, cu_seqlens, cu_seqlens, max_seqlen,
                                                       max_seqlen, False, 0.0, True, False,
                                                       scale=softmax_scale)[0]
    if backend == "fa2":
        return torch.ops.aten._flash_attention_forward(query, key, value, cu_seqlens, cu_seqlens, max_seqlen,
                                                       max_seqlen, 0.0, True, False, scale=softmax_scale)[0]
    raise ValueError(f"backend must be 'cudnn' or 'fa2', got {backend!r}")


def torch_fill_kv_cache(key, value, key_cache, value_cache, slots_int64):
    """``index_copy_`` into the flattened (contiguous) caches; every slot valid."""
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slots_int64, key)
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slots_int64, value)
    return key_cache, value_cache


def torch_rms_norm(hidden, weight, eps):
    """The Hugging Face ``LlamaRMSNorm`` formula."""
    dtype = hidden.dtype
    h = hidden.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def torch_add_rms_norm(hidden, residual, weight, eps):
    summed = hidden + residual
    return torch_rms_norm(summed, weight, eps), summed


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def torch_rotary(query, key, cos, sin):
    """The Hugging Face formula, written back in place."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    query.copy_(query * c + _rotate_half(query) * s)
    key.copy_(key * c + _rotate_half(key) * s)
    return query, key


def torch_silu_and_mul(x):
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def torch_gating(router_logits, topk):
    probs = torch.softmax(router_logits.float(), dim=-1)
    return torch.topk(probs, topk, dim=-1)


def torch_moe_expert_loop(hidden, gate_up_weights, down_weights, topk_weights, topk_ids, renormalize):
    """One expert at a time over the tokens routed to it (host syncs: timed eagerly)."""
    weights = topk_weights.float()
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.flatten()
    counts = torch.bincount(flat_ids, minlength=gate_up_weights.shape[0]).tolist()
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // topk_ids.shape[1]
    weight_of = weights.flatten()[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        idx = token_of[start:start + count]
        gate_up = hidden[idx] @ gate_up_weights[expert].t()
        act = torch_silu_and_mul(gate_up)
        y = (act @ down_weights[expert].t()).float() * weight_of[start:start + count, None]
        out.index_add_(0, idx, y)
        start += count
    return out.to(hidden.dtype)
