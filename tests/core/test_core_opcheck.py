"""torch.library.opcheck for every dlinfer custom op (schema, fake impl, autograd registration, AOT dispatch)."""

from __future__ import annotations

import pytest
import torch

import dlinfer.ops as ops


def _g():
    return torch.Generator().manual_seed(0)


def _cache(nb=3, bs=16, hk=2, d=8, dv=8):
    g = _g()
    return torch.randn(nb, bs, hk, d, generator=g), torch.randn(nb, bs, hk, dv, generator=g)


def _paged():
    kc, vc = _cache()
    table = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)
    return kc, vc, table


def _starts(*offsets):
    """The vendor contract's batch layout: int32 [B + 1] start offsets."""
    return torch.tensor(offsets, dtype=torch.int32)


def _args():
    g = _g()
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    i8 = lambda *s: torch.randint(-127, 128, s, generator=g).to(torch.int8)  # noqa: E731
    kc, vc, table = _paged()
    cases = {
        "silu_and_mul": (r(3, 10),),
        "rms_norm": (r(3, 8), r(8), 1e-6),
        "add_rms_norm": (r(3, 8), r(3, 8), r(8), 1e-6),
        "apply_rotary_pos_emb": (r(4, 4, 8), r(4, 2, 8), r(4, 8), r(4, 8)),
        "fill_kv_cache": (r(3, 2, 8), r(3, 2, 8), kc.clone(), vc.clone(), torch.tensor([5, -1, 40]), [], [], 0),
        "prefill_attention": (r(5, 4, 8), r(5, 2, 8), r(5, 2, 8), _starts(0, 2, 5), _starts(0, 2, 5), 3,
                              0.35, True, torch.empty(5, 4, 8)),
        "paged_prefill_attention": (r(4, 4, 8), kc, vc, table, _starts(0, 3, 4), torch.tensor([20, 1]), 3, 20,
                                    0.35, True, torch.empty(4, 4, 8), [], [], 0),
        "paged_decode_attention": (r(2, 4, 8), kc, vc, table, torch.tensor([20, 1]), 32, 0.35, torch.empty(2, 4, 8),
                                   [], [], 0),
        "moe_gating_topk_softmax": (r(5, 6), 2),
        "fused_moe": (r(3, 8), r(4, 12, 8), r(4, 8, 6), torch.rand(3, 2, generator=g),
                      torch.tensor([[0, 3], [1, 2], [3, 1]]), True),
        "linear": (r(3, 8), r(5, 8), r(5)),
        "weight_quant_matmul": (r(3, 64), torch.randint(-2 ** 31, 2 ** 31 - 1, (64, 2), generator=g, dtype=torch.int32),
                                r(2, 16).abs(), torch.randint(0, 2 ** 31 - 1, (2, 2), generator=g, dtype=torch.int32),
                                r(16), 32),
        "dynamic_quant": (r(3, 8), torch.int8, "PER_TOKEN"),
        "linear_w8a8": (i8(3, 8), i8(5, 8), r(3, 1).abs(), r(5, 1).abs(), torch.float16, torch.int8,
                        r(5).half()),
        "linear_w8a8_static": (r(3, 8), i8(5, 8), torch.tensor([0.05]), torch.tensor([2], dtype=torch.int8),
                               r(5).abs(), torch.float32, torch.int8, torch.arange(5, dtype=torch.int32)),
        "rms_norm_w8a8": (r(3, 8), r(8), 1e-6, torch.int8),
        "add_rms_norm_w8a8": (r(3, 8), r(3, 8), r(8), 1e-6, torch.int8),
        "fused_moe_w8a8": (r(3, 8), i8(4, 12, 8), r(4, 12, 1).abs(), i8(4, 8, 6), r(4, 8, 1).abs(),
                           torch.rand(3, 2, generator=g), torch.tensor([[0, 3], [1, 2], [3, 1]]), True),
        "apply_rotary_pos_emb_fill_kv_cache": (r(3, 4, 8), r(3, 2, 8), r(3, 2, 8), kc.clone(), vc.clone(), r(3, 8),
                                               r(3, 8), torch.tensor([0, 17, -1])),
    }
    return cases


ALL_OPS = tuple(ops.CORE_OPS) + tuple(getattr(ops, "EXTRA_OPS", ()))


def test_every_registered_dlinfer_op_is_covered():
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("dlinfer::")}
    assert registered == set(ALL_OPS) == set(_args())


@pytest.mark.parametrize("name", ALL_OPS)
def test_opcheck(name):
    op = getattr(torch.ops.dlinfer, name).default
    torch.library.opcheck(op, _args()[name])
