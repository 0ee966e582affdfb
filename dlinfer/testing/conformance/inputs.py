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
    num_blocks = _num_blocks(kv_lens, block_size)
    k_cache, v_cache, buffers = caches(rnd, num_blocks, block_size, heads, d, dv, dtype, layout)
    table, unused = _block_table(rnd, kv_lens, block_size, num_blocks, tail)
    unused = unused.to(k_cache.device)
    k_cache[unused] = float("nan")
    v_cache[unused] = float("nan")
    return k_cache, v_cache, buffers, table.to(device=rnd.device, dtype=index_dtype)


def _num_blocks(kv_lens: Sequence[int], block_size: int) -> int:
    return sum((n + block_size - 1) // block_size for n in kv_lens) + 3


def _block_table(rnd: Rand, kv_lens: Sequence[int], block_size: int, num_blocks: int, tail: str):
    """A shuffled block table holding ``kv_lens`` tokens per sequence, and the ``[num_blocks, block_size]`` mask of
    the slots no sequence uses."""
    need = [(n + block_size - 1) // block_size for n in kv_lens]
    order = rnd.perm(num_blocks).tolist()
    table = rnd.ints(0, num_blocks, len(kv_lens), max(need + [1]) + 1)
    if tail == "garbage":
        table = table + num_blocks + 1000
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    nxt = 0
    for b, (n, blocks) in enumerate(zip(kv_lens, need)):
        for i in range(blocks):
            table[b, i] = order[nxt]
            used[order[nxt], : min(block_size, n - i * block_size)] = True
            nxt += 1
    return table, ~used


def quant_caches(rnd: Rand, num_blocks: int, block_size: int, heads: int, d: int, dv: int, quant_bits: int,
                 layout: str, scale_dtype, form: str) -> dict:
    """A quantized cache (``dlinfer.ops.kv_quant``): uint8 ``k_cache``/``v_cache`` of random bytes (``[..., D]``,
    ``[..., D / 2]`` for 4 bits; layouts as :func:`caches`) and per-token ``ks``, ``kz``, ``vs``, ``vz``
    (positive scales of about ``2 / L``, zeros in ``[0, L]``), held as ``form``:

    * ``lmdeploy``: one ``[..., heads, 2]`` tensor per cache (scale, zero: LMDeploy's cache layout);
    * ``pair``: four ``[num_blocks, block_size, heads]`` tensors;
    * ``stacked``: ``scales``/``zeros`` ``[2, num_blocks, block_size, heads]`` (K first).

    Also returns ``fill_k``/``fill_v`` (``fill_kv_cache``'s ``k_scales_zeros``/``v_scales_zeros``), ``kv_scales``/
    ``kv_zeros`` (the attention ops') and ``buffers`` (every tensor written or read, for comparisons).
    """
    levels = 2 ** quant_bits - 1
    dc, dvc = (d, dv) if quant_bits == 8 else (d // 2, dv // 2)
    shapes = {"separate": ((num_blocks, block_size, heads, dc), (num_blocks, block_size, heads, dvc)),
              "packed": ((num_blocks, block_size, heads, dc + dvc),),
              "head_major": ((num_blocks, heads, block_size, dc), (num_blocks, heads, block_size, dvc))}[layout]
    bufs = [rnd.ints(0, 256, *shape).to(rnd.device, torch.uint8) for shape in shapes]
    if layout == "separate":
        k_cache, v_cache = bufs
    elif layout == "packed":
        k_cache, v_cache = bufs[0][..., :dc], bufs[0][..., dc:]
    else:
        k_cache, v_cache = bufs[0].transpose(1, 2), bufs[1].transpose(1, 2)
    per_token = (num_blocks, block_size, heads)

    def scales(*shape):
        return (rnd.normal(*shape).abs() * (1.0 / levels) + 1.0 / levels).to(scale_dtype)

    def zeros(*shape):
        return (rnd.normal(*shape).abs() * (levels / 4)).clamp(max=levels).to(scale_dtype)

    if form == "lmdeploy":
        k_sz = torch.stack((scales(*per_token), zeros(*per_token)), dim=-1)
        v_sz = torch.stack((scales(*per_token), zeros(*per_token)), dim=-1)
        ks, kz, vs, vz = k_sz[..., 0], k_sz[..., 1], v_sz[..., 0], v_sz[..., 1]
        x = {"fill_k": [k_sz], "fill_v": [v_sz], "kv_scales": (ks, vs), "kv_zeros": (kz, vz), "sz": [k_sz, v_sz]}
    elif form == "pair":
        ks, kz, vs, vz = scales(*per_token), zeros(*per_token), scales(*per_token), zeros(*per_token)
        x = {"fill_k": [ks, kz], "fill_v": [vs, vz], "kv_scales": [ks, vs], "kv_zeros": [kz, vz],
             "sz": [ks, kz, vs, vz]}
    elif form == "stacked":
        both_s, both_z = scales(2, *per_token), zeros(2, *per_token)
        ks, vs, kz, vz = both_s[0], both_s[1], both_z[0], both_z[1]
        x = {"fill_k": [ks, kz], "fill_v": [vs, vz], "kv_scales": both_s, "kv_zeros": both_z, "sz": [both_s, both_z]}
    else:
        raise ValueError(f"unknown scales form {form!r}")
    x.update(k_cache=k_cache, v_cache=v_cache, ks=ks, kz=kz, vs=vs, vz=vz, buffers=bufs + x["sz"])
    return x


def paged_quant(rnd: Rand, kv_lens: Sequence[int], block_size: int, heads: int, d: int, dv: int, quant_bits: int,
                layout: str, scale_dtype, form: str, index_dtype=torch.int32, tail: str = "random") -> dict:
    """:func:`paged` for a quantized cache (:func:`quant_caches`): the scales and zeros of every slot no sequence
    uses are NaN (a kernel that reads one makes its output NaN); also returns ``table``."""
    num_blocks = _num_blocks(kv_lens, block_size)
    x = quant_caches(rnd, num_blocks, block_size, heads, d, dv, quant_bits, layout, scale_dtype, form)
    table, unused = _block_table(rnd, kv_lens, block_size, num_blocks, tail)
    unused = unused.to(rnd.device)
    for name in ("ks", "kz", "vs", "vz"):
        x[name][unused] = float("nan")
    x["table"] = table.to(device=rnd.device, dtype=index_dtype)
    return x


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
