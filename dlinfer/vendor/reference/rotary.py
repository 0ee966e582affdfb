import torch

from dlinfer.vendor.reference.kv_cache import fill_kv_cache


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def apply_rotary_pos_emb(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    cos = cos.float()[:, None, :]
    sin = sin.float()[:, None, :]
    query.copy_(_rotate(query, cos, sin))
    key.copy_(_rotate(key, cos, sin))


def apply_rotary_pos_emb_fill_kv_cache(query, key, value, key_cache, value_cache, cos, sin,
                                       kv_start_indices) -> None:
    apply_rotary_pos_emb(query, key, cos, sin)
    fill_kv_cache(key, value, key_cache, value_cache, kv_start_indices, [], [], 0)
