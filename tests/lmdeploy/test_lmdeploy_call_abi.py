"""The call ABI: every dlinfer op LMDeploy 0.18 calls arrives with the arguments of the op contract (dlinfer/ops/table.py).

The calls are recorded while LMDeploy's own patched models run (prefill, chunked prefill, decode), so an LMDeploy
upgrade that changes a call site (argument order, count, keyword names, layouts) fails here loudly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lmdeploy", reason="LMDeploy is not installed (scripts/setup_lmdeploy.sh installs it)")

import torch  # noqa: E402

import dlinfer.ops  # noqa: E402
from dlinfer.ops import table  # noqa: E402
from lmdeploy_harness import PagedModel  # noqa: E402

pytestmark = pytest.mark.lmdeploy

INDEX = (torch.int32, torch.int64)
ATTN_KW = {"head_size_v", "softmax_scale", "attn_output", "kv_scales", "kv_zeros", "quant_bits"}


class Recorder:
    def __init__(self, monkeypatch, names=dlinfer.ops.CORE_OPS):
        self.calls: list[tuple[str, tuple, dict]] = []
        for name in names:
            monkeypatch.setattr(dlinfer.ops, name, self._wrap(name, getattr(dlinfer.ops, name)))

    def _wrap(self, name, fn):
        def recorded(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return fn(*args, **kwargs)
        return recorded

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _shape(t):
    assert isinstance(t, torch.Tensor), f"expected a tensor, got {type(t).__name__}"
    return tuple(t.shape)


def _ints(t, n=None):
    assert isinstance(t, torch.Tensor) and t.dtype in INDEX and t.dim() == 1, f"expected 1-D int tensor, got {t!r}"
    if n is not None:
        assert t.numel() == n, f"expected {n} entries, got {t.numel()}"


def _mask_causal(mask):
    assert isinstance(mask, (list, tuple)) and len(mask) > 0, f"causal attention needs a non-empty attn_mask: {mask!r}"


def check_call(name, args, kwargs, ctx, cfg):
    """Assert one recorded call matches the contract; ``ctx`` is LMDeploy's StepContext of that step."""
    meta = ctx.attn_metadata
    hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    tokens = ctx.input_ids.numel()
    batch = ctx.q_seqlens.numel()
    if name == "silu_and_mul":
        assert len(args) == 1 and set(kwargs) <= {"dim"}
        assert _shape(args[0])[-1] % 2 == 0
    elif name == "rms_norm":
        assert len(args) == 3 and not kwargs
        assert _shape(args[0])[-1] == _shape(args[1])[0] and isinstance(args[2], float)
    elif name == "add_rms_norm":
        assert len(args) == 4 and not kwargs
        assert _shape(args[0]) == _shape(args[1]) and _shape(args[2]) == (_shape(args[0])[-1],)
        assert isinstance(args[3], float)
    elif name == "apply_rotary_pos_emb":
        assert len(args) == 4 and not kwargs
        q, k, cos, sin = args
        assert _shape(q) == (tokens, hq, d) and _shape(k) == (tokens, hk, d)
        assert _shape(cos) == (tokens, d) and _shape(sin) == (tokens, d)
    elif name == "apply_rotary_pos_emb_fill_kv_cache":  # dlinfer's own call (the deferred rotary), not LMDeploy's
        assert len(args) == 8 and not kwargs
        q, k, v, kc, vc, cos, sin, slots = args
        assert _shape(q) == (tokens, hq, d) and _shape(k) == (tokens, hk, d) and _shape(v)[:2] == (tokens, hk)
        assert _shape(cos) == (tokens, d) and _shape(sin) == (tokens, d)
        assert _shape(kc)[2:] == (hk, d) and _shape(vc)[:3] == _shape(kc)[:3]
        _ints(slots, tokens)
        assert slots is meta.kv_start_indices, "kv_start_indices must come from the step metadata"
    elif name == "fill_kv_cache":
        assert len(args) == 5 and set(kwargs) == {"k_scales_zeros", "v_scales_zeros", "quant_bits"}
        k, v, kc, vc, slots = args
        assert _shape(k) == (tokens, hk, d) and _shape(v)[:2] == (tokens, hk)
        assert _shape(kc)[2:] == (hk, d) and _shape(vc)[:3] == _shape(kc)[:3]
        _ints(slots, tokens)
        assert slots is meta.kv_start_indices, "kv_start_indices must come from the step metadata"
        assert kwargs["quant_bits"] == 0
    elif name == "prefill_attention":
        assert len(args) == 11 and set(kwargs) == {"softmax_scale", "attn_output", "actual_seq_lengths_cpu"}
        q, k, v, kc, vc, q_lens, kv_lens, max_q, nq, nk, mask = args
        assert _shape(q) == (tokens, hq, d) and _shape(k) == (tokens, hk, d)
        _ints(q_lens, batch)
        _ints(kv_lens, batch)
        assert isinstance(max_q, int) and (nq, nk) == (hq, hk)
        _mask_causal(mask)
        assert torch.equal(q_lens, kv_lens), "prefill_attention is the no-history path"
        assert _shape(kwargs["attn_output"])[:2] == (tokens, hq)
    elif name == "paged_prefill_attention":
        assert len(args) == 14 and set(kwargs) == ATTN_KW
        q, k, v, kc, vc, table, block_size, cu_q, kv_lens, max_q, max_kv, nq, nk, mask = args
        assert _shape(q) == (tokens, hq, d)
        assert _shape(table)[0] == batch and table.dtype in INDEX and block_size == _shape(kc)[1]
        _ints(cu_q, batch)
        assert int(cu_q[-1]) == tokens, "cu_seqlens_q[1:] holds cumulative query ends"
        _ints(kv_lens, batch)
        assert kv_lens is meta.kv_seqlens_cpu, "kv_seqlens must be the metadata's tensor (no host copy)"
        assert cu_q.data_ptr() == meta.cu_seqlens_q[1:].data_ptr(), "cu_seqlens_q[1:] must view the metadata"
        assert isinstance(max_q, int) and isinstance(max_kv, int) and max_kv >= int(kv_lens.max())
        assert (nq, nk) == (hq, hk)
        _mask_causal(mask)
        assert kwargs["quant_bits"] == 0
    elif name == "paged_decode_attention":
        assert len(args) == 10 and set(kwargs) == ATTN_KW
        q, kc, vc, table, block_size, cu_q, kv_lens, max_kv, nq, nk = args
        assert _shape(q) == (batch, hq, d) and block_size == _shape(kc)[1]
        assert _shape(table)[0] == batch
        _ints(cu_q, batch)
        _ints(kv_lens, batch)
        assert kv_lens is meta.kv_seqlens_cpu, "kv_seqlens must be the metadata's tensor (no host copy)"
        assert isinstance(max_kv, int) and max_kv >= int(kv_lens.max())
        assert (nq, nk) == (hq, hk)
        assert _shape(kwargs["attn_output"]) == (batch, hq, d)
    elif name == "moe_gating_topk_softmax":
        from dlinfer.utils.type_annotation import MoeMetadata

        assert len(args) == 3 and not kwargs
        assert _shape(args[0])[0] == tokens and isinstance(args[1], int) and isinstance(args[2], MoeMetadata)
    elif name == "fused_moe":
        from dlinfer.utils.type_annotation import MoeMetadata

        assert len(args) == 9 and not kwargs
        h, gu, dw, w, ids, topk, renorm, moe_meta, layout = args
        experts, two_inter, hidden = _shape(gu)
        assert _shape(h) == (tokens, hidden) and _shape(dw) == (experts, hidden, two_inter // 2)
        assert _shape(w) == _shape(ids) == (tokens, topk)
        assert isinstance(renorm, bool) and isinstance(moe_meta, MoeMetadata) and layout is None
    elif name == "linear":
        assert len(args) == 2 and set(kwargs) == {"bias", "all_reduce", "group"}
        assert _shape(args[0])[-1] == _shape(args[1])[1]
    else:
        raise AssertionError(f"unexpected op {name}")


def _run(arch, tiny_model, monkeypatch, names=dlinfer.ops.CORE_OPS):
    path = tiny_model(arch)
    pm = PagedModel(path, block_size=16)
    rec = Recorder(monkeypatch, names)
    cfg = pm.model_config
    sa, sb, sc = pm.new_sequence(list(range(10, 40))), pm.new_sequence(list(range(50, 62))), \
        pm.new_sequence(list(range(70, 80)))
    seen: dict[str, int] = {}
    for seqs, q_lens in (([sa, sb], [12, 5]), ([sa, sb, sc], [7, 4, 6]), ([sa, sb, sc], [1, 1, 1])):
        pm.step(seqs, q_lens)
        for name, args, kwargs in rec.take():
            try:
                check_call(name, args, kwargs, pm.last_context, cfg)
            except AssertionError as exc:
                shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
                raise AssertionError(f"{arch}: LMDeploy's call of dlinfer.ops.{name} broke the contract: {exc}\n"
                                     f"  args: {shapes}\n  kwargs: {sorted(kwargs)}") from exc
            seen[name] = seen.get(name, 0) + 1
    return seen


def test_every_lmdeploy_call_matches_the_contract(tiny_model, patched, monkeypatch):
    monkeypatch.setenv("DLINFER_LMDEPLOY_FUSE_ROTARY", "0")  # LMDeploy's own rotary and KV-cache calls
    seen = _run("llama", tiny_model, monkeypatch)
    seen_moe = _run("qwen3_moe", tiny_model, monkeypatch)
    dense = {"silu_and_mul", "rms_norm", "add_rms_norm", "apply_rotary_pos_emb", "fill_kv_cache",
             "prefill_attention", "paged_prefill_attention", "paged_decode_attention", "linear"}
    assert dense <= set(seen), f"ops LMDeploy's Llama never called: {sorted(dense - set(seen))}"
    moe = {"moe_gating_topk_softmax", "fused_moe"}
    assert moe <= set(seen_moe), f"ops LMDeploy's Qwen3-MoE never called: {sorted(moe - set(seen_moe))}"
    # The quantized family is called only by quantized checkpoints (tests/lmdeploy/test_lmdeploy_quant.py).
    unquantized = {d.name for d in table.TABLE if d.core and d.family != "quant"}
    assert set(seen) | set(seen_moe) == unquantized


def test_deferred_rotary_runs_fused_with_the_cache_write(tiny_model, patched, monkeypatch):
    """By default each attention layer's rotary embedding is deferred to its attention and runs fused with the
    KV-cache write: one apply_rotary_pos_emb_fill_kv_cache per layer and step, no apply_rotary_pos_emb or
    fill_kv_cache call left (the logits stay transformers': test_lmdeploy_models.py)."""
    names = dlinfer.ops.CORE_OPS + ("apply_rotary_pos_emb_fill_kv_cache",)
    for arch in ("llama", "qwen3_moe"):
        seen = _run(arch, tiny_model, monkeypatch, names)
        assert "apply_rotary_pos_emb" not in seen and "fill_kv_cache" not in seen, (arch, seen)
        layers = json.loads((Path(tiny_model(arch)) / "config.json").read_text())["num_hidden_layers"]
        assert seen["apply_rotary_pos_emb_fill_kv_cache"] == 3 * layers, (arch, seen)
