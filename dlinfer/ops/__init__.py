"""dlinfer's op contract.

Each public function keeps the signature LMDeploy 0.18's dlinfer backend calls, checks its arguments (a
``ValueError``/``TypeError`` naming the argument), and calls a schema-legal ``torch.library`` custom op
``torch.ops.dlinfer.<name>``; that op picks a vendor from the inputs' metadata (``dlinfer.vendor.registry``)
and runs its implementation. Every custom op has a fake implementation, so ``torch.compile`` and CUDA graphs
trace through it.

Every op is declared once, in the op table (``dlinfer.ops.table``): its vendor signature, what it writes and
returns, its kind and features. Vendor implementations take the custom op's arguments in the table's order
(``table.OPS[name].signature``): plain tensors and numbers, caches and outputs written in place. The batch layout is one form (``dlinfer.ops._batch``): a query
partition is int32 ``[B + 1]`` start offsets on the query's device (``cu_seqlens_q[0] == 0``, as FlashInfer's
``indptr`` and vLLM's ``query_start_loc``); per-sequence KV lengths are int32 ``[B]``.
"""

from dlinfer.ops.activation import silu_and_mul
from dlinfer.ops.fused import apply_rotary_pos_emb_fill_kv_cache
from dlinfer.ops.attention import paged_decode_attention, paged_prefill_attention, prefill_attention
from dlinfer.ops.kv_cache import fill_kv_cache
from dlinfer.ops.linear import linear
from dlinfer.ops.moe import fused_moe, moe_gating_topk_softmax
from dlinfer.ops.norm import add_rms_norm, rms_norm
from dlinfer.ops.quant import (add_rms_norm_w8a8, dynamic_quant, fused_moe_w8a8, linear_w8a8, linear_w8a8_static,
                              rms_norm_w8a8, weight_quant_matmul)
from dlinfer.ops.rotary import apply_rotary_pos_emb

from dlinfer.ops.table import TABLE

#: LMDeploy's contract, in the op table's order.
CORE_OPS = tuple(d.name for d in TABLE if d.core)
#: Beyond LMDeploy's contract: fusions a vendor may serve; the reference defines them by composition.
EXTRA_OPS = tuple(d.name for d in TABLE if not d.core)

__all__ = list(CORE_OPS) + list(EXTRA_OPS) + ["CORE_OPS", "EXTRA_OPS"]
