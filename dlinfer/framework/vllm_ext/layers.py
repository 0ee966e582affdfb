"""vLLM layer ops served by ``dlinfer.ops``: RMSNorm (with and without residual), SiluAndMul, RotaryEmbedding.

Each class subclasses vLLM's and is registered with ``register_oot``, so vLLM instantiates it wherever the
model builds the stock class. vLLM picks a layer's forward once, at construction (``dispatch_forward``): eager
mode calls ``forward_<platform>``, Inductor mode ``forward_native``; both run the dlinfer op here. A layer
whose configuration the dlinfer op does not cover keeps vLLM's own forward, and the reason is logged once.
"""

from __future__ import annotations

import logging

import torch

import dlinfer.ops as dl
from dlinfer.framework.vllm_ext import log_summary_once
from dlinfer.framework.vllm_ext.counters import hit
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

logger = logging.getLogger("vllm.dlinfer")

__all__ = ["DlinferRMSNorm", "DlinferRotaryEmbedding", "DlinferSiluAndMul", "RMSNorm", "RotaryEmbedding",
           "SiluAndMul"]

_logged: set[tuple[str, str]] = set()


def _keep_stock(layer: str, reason: str) -> None:
    if (layer, reason) not in _logged:
        _logged.add((layer, reason))
        logger.info("dlinfer: %s keeps vLLM's implementation: %s", layer, reason)


class _DlinferLayer:
    """Mixin: route the forward vLLM dispatches to ``_dlinfer_forward`` unless ``_dlinfer_refusal`` is set.

    ``CustomOp.__init__`` calls ``dispatch_forward`` before the subclass has set its attributes, so the
    stock choice is kept and the decision is made per layer once ``__init__`` finished.
    """

    _dlinfer_refusal: str | None = None

    def dispatch_forward(self, compile_native: bool):
        log_summary_once()
        self._stock_forward = super().dispatch_forward(compile_native)
        return self._forward

    def _forward(self, *args, **kwargs):
        if self._dlinfer_refusal is not None:
            return self._stock_forward(*args, **kwargs)
        return self._dlinfer_forward(*args, **kwargs)

    def forward_native(self, *args, **kwargs):
        if self._dlinfer_refusal is not None:
            return super().forward_native(*args, **kwargs)
        return self._dlinfer_forward(*args, **kwargs)

    def _refuse(self, reason: str | None) -> None:
        self._dlinfer_refusal = reason
        if reason is not None:
            _keep_stock(type(self).__mro__[2].__name__, reason)


class DlinferRMSNorm(_DlinferLayer, RMSNorm):
    """``RMSNorm`` on ``dlinfer.ops.rms_norm`` / ``add_rms_norm`` (the residual form returns ``(out, x + res)``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.variance_size_override is not None:
            self._refuse(f"variance over the first {self.variance_size_override} of {self.hidden_size} features")
        elif not self.has_weight:
            self._refuse("no weight (has_weight=False)")

    def _dlinfer_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            hit("rms_norm")
            return dl.rms_norm(x, self.weight, self.variance_epsilon)
        hit("add_rms_norm")
        return dl.add_rms_norm(x, residual, self.weight, self.variance_epsilon)


class DlinferSiluAndMul(_DlinferLayer, SiluAndMul):
    """``SiluAndMul`` on ``dlinfer.ops.silu_and_mul``."""

    def _dlinfer_forward(self, x: torch.Tensor) -> torch.Tensor:
        hit("silu_and_mul")
        return dl.silu_and_mul(x)


class DlinferRotaryEmbedding(_DlinferLayer, RotaryEmbedding):
    """The default ``RotaryEmbedding`` (NeoX rotate-half, full or partial rotary dim) on
    ``dlinfer.ops.apply_rotary_pos_emb``, in place on vLLM's query/key views.

    vLLM's cache row is ``cat(cos[:r/2], sin[:r/2])``; dlinfer takes per-token ``cos``/``sin`` of the full
    rotary width (the halves repeated), so the two tables are expanded once, at construction, and indexed per
    call.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.is_neox_style:
            self._refuse("GPT-J style (interleaved) rotary; dlinfer's op is rotate-half (NeoX)")
        elif self.rotary_dim % 2:
            self._refuse(f"odd rotary_dim {self.rotary_dim}")
        elif not isinstance(getattr(self, "cos_sin_cache", None), torch.Tensor):
            self._refuse("no cos/sin cache built at construction (init_cache=False)")
        else:
            # Built once here (not per call: torch.compile must not see data-dependent caching).
            cos, sin = self.cos_sin_cache.chunk(2, dim=-1)
            self.register_buffer("_dlinfer_cos", torch.cat((cos, cos), dim=-1), persistent=False)
            self.register_buffer("_dlinfer_sin", torch.cat((sin, sin), dim=-1), persistent=False)

    def _cos_sin(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._dlinfer_cos, self._dlinfer_sin
        if cos.dtype != like.dtype or cos.device != like.device:
            cos, sin = cos.to(like.device, like.dtype), sin.to(like.device, like.dtype)
            if not torch.compiler.is_compiling():
                self._dlinfer_cos, self._dlinfer_sin = cos, sin
        return cos, sin

    def _dlinfer_forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
        if key is None:  # cross-layer KV sharing: only the query rotates
            return self._stock_forward(positions, query, key)
        positions = positions.flatten()
        tokens = positions.shape[0]
        cos_table, sin_table = self._cos_sin(query)
        cos = cos_table.index_select(0, positions)
        sin = sin_table.index_select(0, positions)
        q = query.view(tokens, -1, self.head_size)[..., : self.rotary_dim]
        k = key.view(tokens, -1, self.head_size)[..., : self.rotary_dim]
        hit("apply_rotary_pos_emb")
        dl.apply_rotary_pos_emb(q, k, cos, sin)
        return query, key
