"""The ``reference`` vendor: every op in plain, readable PyTorch, on any device, in float32 arithmetic.

It is the oracle every other vendor is checked against and the fallback when nothing faster can serve a call.
"""

from dlinfer.vendor.reference import activation, attention, kv_cache, linear, moe, norm, rotary
from dlinfer.vendor.registry import ANY_DEVICE, Capabilities, Vendor

_FEATURES = frozenset({"strided_cache", "non_causal"})

VENDOR = Vendor(
    name="reference",
    priority=0,
    devices=frozenset({ANY_DEVICE}),
    default_devices=frozenset({ANY_DEVICE}),
    ops={
        "silu_and_mul": activation.silu_and_mul,
        "rms_norm": norm.rms_norm,
        "add_rms_norm": norm.add_rms_norm,
        "apply_rotary_pos_emb": rotary.apply_rotary_pos_emb,
        "fill_kv_cache": kv_cache.fill_kv_cache,
        "prefill_attention": attention.prefill_attention,
        "paged_prefill_attention": attention.paged_prefill_attention,
        "paged_decode_attention": attention.paged_decode_attention,
        "moe_gating_topk_softmax": moe.moe_gating_topk_softmax,
        "fused_moe": moe.fused_moe,
        "linear": linear.linear,
        "apply_rotary_pos_emb_fill_kv_cache": rotary.apply_rotary_pos_emb_fill_kv_cache,
    },
    capabilities={op: Capabilities(features=_FEATURES)
                  for op in ("fill_kv_cache", "prefill_attention", "paged_prefill_attention",
                             "paged_decode_attention", "apply_rotary_pos_emb_fill_kv_cache")},
    description="pure PyTorch, any device; the correctness oracle",
)
