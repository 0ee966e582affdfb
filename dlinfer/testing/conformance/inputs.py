"""Input builders shared by the case modules: deterministic random tensors, paged caches (NaN in every slot a
kernel must not read), masks, rotary tables, fused q/k/v buffers."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Rand:
    """Deterministic random inputs (same seed, same tensors): values drawn on the device, indices on the host."""

    def __init__(self, seed: int, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device
        self.device_gen = self.gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)

    def normal(self, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.device_gen, dtype=torch.float32, device=self.device)
        return (x * scale).to(dtype)

    def ints(self, low: int, high: int, *shape) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen)

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen)


def caches(rnd: Rand, num_blocks: int, block_size: int, heads: int, d: int, dv: int, dtype, layout: str):
    """Key/value caches ``[num_blocks, block_size, heads, d|dv]`` and the buffers that hold them.

    layouts: ``separate`` (two contiguous tensors), ``packed`` (vLLM: one buffer, K|V in the last dim, so the
    caches are strided views), ``head_major`` (buffers ``[blocks, heads, block_size, d]`` seen transposed).
    """
    if layout == "separate":
        k = rnd.normal(num_blocks, block_size, heads, d, dtype=dtype)
        v = rnd.normal(num_blocks, block_size, heads, dv, dtype=dtype)
        return k, v, [k, v]
    if layout == "packed":
        buf = rnd.normal(num_blocks, block_size, heads, d + dv, dtype=dtype)
        return buf[..., :d], buf[..., d:], [buf]
    if layout == "head_major":
        kb = rnd.normal(num_blocks, heads, block_size, d, dtype=dtype)
        vb = rnd.normal(num_blocks, heads, block_size, dv, dtype=dtype)
        return kb.transpose(1, 2), vb.transpose(1, 2), [kb, vb]
    raise ValueError(f"unknown cache layout {layout!r}")


def paged(rnd: Rand, kv_lens: Sequence[int], block_size: int, heads: int, d: int, dv: int, dtype, layout: str,
           index_dtype=torch.int32, tail: str = "random"):
    """Caches holding ``kv_lens`` tokens per sequence in shuffled blocks; every other slot holds NaN.

    ``tail`` fills block-table entries past a sequence's last block: ``random`` valid ids or ``garbage``
    (out-of-range ids, which the contract says are ignored).
    """
    need = [(n + block_size - 1) // block_size for n in kv_lens]
    width = max(need + [1]) + 1
    num_blocks = sum(need) + 3
    k_cache, v_cache, buffers = caches(rnd, num_blocks, block_size, heads, d, dv, dtype, layout)
    order = rnd.perm(num_blocks).tolist()
    table = rnd.ints(0, num_blocks, len(kv_lens), width)
    if tail == "garbage":
        table = table + num_blocks + 1000
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    nxt = 0
    for b, (n, blocks) in enumerate(zip(kv_lens, need)):
        for i in range(blocks):
            table[b, i] = order[nxt]
            used[order[nxt], : min(block_size, n - i * block_size)] = True
            nxt += 1
    unused = (~used).to(k_cache.device)
    k_cache[unused] = float("nan")
    v_cache[unused] = float("nan")
    return k_cache, v_cache, buffers, table.to(device=rnd.device, dtype=index_dtype)


def mask(causal: bool, device) -> list:
    return [torch.ones(1, dtype=torch.bool, device=device)] if causal else []


def rope_tables(rnd: Rand, tokens: int, d: int, dtype):
    pos = rnd.ints(0, 4096, tokens).float()
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(rnd.device, dtype), emb.sin().to(rnd.device, dtype)



def qkv(rnd, T, hq, hk, d, dv, dtype, fused):
    """q/k/v ``[T, H, D]``: views of one fused projection buffer (strided), or separate tensors."""
    if fused:
        buf = rnd.normal(T, (hq + hk) * d + hk * dv, dtype=dtype)
        q = buf[:, : hq * d].view(T, hq, d)
        k = buf[:, hq * d:(hq + hk) * d].view(T, hk, d)
        v = buf[:, (hq + hk) * d:].view(T, hk, dv)
        return q, k, v, buf
    q, k, v = rnd.normal(T, hq, d, dtype=dtype), rnd.normal(T, hk, d, dtype=dtype), rnd.normal(T, hk, dv, dtype=dtype)
    return q, k, v, None
