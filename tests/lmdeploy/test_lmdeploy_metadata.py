"""Step metadata of the dlinfer CUDA backend: right slots and flags, built without host syncs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("lmdeploy", reason="LMDeploy is not installed (scripts/setup_lmdeploy.sh installs it)")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from dlinfer.framework.lmdeploy_ext.metadata import slot_indices  # noqa: E402

pytestmark = pytest.mark.lmdeploy

# Tensor methods that move data to the host (a device sync on CUDA) or size outputs from tensor values.
SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "equal", "nonzero",
           "unique", "masked_select", "any", "all"}


class HostSyncDetector(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            self.syncs.append(name)
        if name == "to" and any(str(a) == "cpu" for a in list(args[1:]) + [kwargs.get("device")]):
            self.syncs.append("to(cpu)")
        if name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.syncs.append("repeat_interleave without output_size")
        return func(*args, **kwargs)


def _step(q_lens, history, tables, block_size=4, decoding=False):
    q = torch.tensor(q_lens)
    kv = q + torch.tensor(history)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return SimpleNamespace(
        kv_caches=[[torch.zeros(16, block_size, 1, 8), torch.zeros(16, block_size, 1, 8)]],
        q_seqlens=q, kv_seqlens=kv, block_offsets=table, input_ids=torch.zeros(1, int(q.sum()), dtype=torch.long),
        is_decoding=decoding, sum_kv_seqlen=int(kv.sum()), max_q_seqlen=int(q.max()), max_kv_seqlen=int(kv.max()),
        kv_quant_policy=0)


def _expected_slots(q_lens, history, tables, block_size):
    out = []
    for q, h, table in zip(q_lens, history, tables):
        for pos in range(h, h + q):
            out.append(table[pos // block_size] * block_size + pos % block_size)
    return out


@pytest.mark.parametrize("q_lens,history,decoding", [
    ([5, 3, 7], [0, 0, 0], False),      # plain prefill
    ([5, 3, 2], [6, 0, 9], False),      # chunked prefill mixed with a fresh sequence
    ([1, 1, 1], [6, 3, 12], True),      # decode, crossing block boundaries
])
def test_metadata_is_right_and_sync_free(q_lens, history, decoding):
    from dlinfer.framework.lmdeploy_ext.backend import DlinferCudaOpsBackend
    from dlinfer.utils.type_annotation import MoeMetadata

    tables = [[9, 2, 14, 5], [7, 3], [11, 0, 6, 1]]  # shuffled, non-contiguous blocks
    ctx = _step(q_lens, history, tables, decoding=decoding)
    with HostSyncDetector() as detector:
        DlinferCudaOpsBackend.update_step_context(ctx)
    assert detector.syncs == [], f"update_step_context syncs with the host: {detector.syncs}"
    meta = ctx.attn_metadata
    assert meta.kv_start_indices.tolist() == _expected_slots(q_lens, history, tables, 4)
    assert meta.is_decoding is decoding
    assert meta.is_prefill_no_cache is (not decoding and not any(history))
    assert len(meta.attention_mask) > 0, "causal attention needs a non-empty attention_mask"
    assert meta.cu_seqlens_q.tolist() == [0] + torch.tensor(q_lens).cumsum(0).tolist()
    # the *_cpu fields are the device tensors themselves (no host copies)
    assert meta.kv_seqlens_cpu is meta.kv_seqlens and meta.cu_seqlens_q_cpu is meta.cu_seqlens_q
    assert meta.kv_seqlens.tolist() == [q + h for q, h in zip(q_lens, history)]
    assert meta.max_kv_seq_len == max(q + h for q, h in zip(q_lens, history))
    assert meta.block_offsets.dtype == torch.int32 and meta.q_seqlens.dtype == torch.int32
    assert isinstance(ctx.moe_metadata, MoeMetadata) and ctx.moe_metadata.ep_size == 1


def test_slot_indices_decode_equals_prefill_formula():
    table = torch.tensor([[3, 1, 4], [0, 5, 2]])
    kv = torch.tensor([9, 12])
    decode = slot_indices(torch.ones(2, dtype=torch.long), kv, table, 4, 2, True)
    prefill_form = slot_indices(torch.ones(2, dtype=torch.long), kv, table, 4, 2, False)
    assert decode.tolist() == prefill_form.tolist() == [4 * 4 + 0, 2 * 4 + 3]


def test_multi_token_decoding_is_refused():
    from dlinfer.errors import NotSupportedError
    from dlinfer.framework.lmdeploy_ext.backend import DlinferCudaOpsBackend

    ctx = _step([2, 2], [5, 3], [[1, 2], [3]], decoding=True)
    with pytest.raises(NotSupportedError, match="multi-token decoding"):
        DlinferCudaOpsBackend.update_step_context(ctx)
