"""The README's "Using the ops" example runs as printed (on CPU here) and its results are right."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _section_code(title: str) -> str:
    text = README.read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"expected one python block under '## {title}'"
    return blocks[0]


def test_using_the_ops_snippet_runs_and_is_right(isolated_registry):
    code = _section_code("Using the ops")
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    assert out.getvalue().strip() == "torch.Size([8, 256]) torch.Size([2, 8, 64])"

    # The values, against plain torch: silu(x[:, :256]) * x[:, 256:], and attention over each sequence's tokens.
    x, y = namespace["x"], namespace["y"]
    torch.testing.assert_close(y, torch.nn.functional.silu(x[:, :256]) * x[:, 256:])
    ns = namespace
    q, k_cache, v_cache = ns["q"], ns["k_cache"], ns["v_cache"]
    group = ns["q_heads"] // ns["kv_heads"]
    for b, (blocks, length) in enumerate(zip(ns["block_offsets"].tolist(), ns["kv_seqlens"].tolist())):
        k = k_cache[blocks].reshape(-1, ns["kv_heads"], ns["head_dim"])[:length]
        v = v_cache[blocks].reshape(-1, ns["kv_heads"], ns["head_dim"])[:length]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [T, Hq, D]
        scores = torch.einsum("hd,thd->ht", q[b].float(), k.float()) / ns["head_dim"] ** 0.5
        want = torch.einsum("ht,thd->hd", scores.softmax(-1), v.float())
        torch.testing.assert_close(ns["out"][b].float(), want, rtol=1e-4, atol=1e-4)
