import torch


def fill_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  kv_start_indices: torch.Tensor, k_scales_zeros, v_scales_zeros, quant_bits: int) -> None:
    block_size = key_cache.shape[1]
    slots = kv_start_indices.long()
    keep = slots >= 0
    slots = slots[keep]
    blocks, offsets = slots // block_size, slots % block_size
    # Advanced indexing on the (possibly strided) cache views writes through to the packed buffer.
    key_cache[blocks, offsets] = key[keep]
    value_cache[blocks, offsets] = value[keep]
