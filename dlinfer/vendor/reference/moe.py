import torch
import torch.nn.functional as F


def moe_gating_topk_softmax(router_logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(router_logits.float(), dim=-1)
    # Stable sort so that ties go to the lower expert id, the same on every device.
    weights, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    return weights[:, :topk].contiguous(), ids[:, :topk].contiguous()


def fused_moe(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor, down_weights: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    weights = topk_weights.float()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    ids = topk_ids.long()
    for expert in torch.unique(ids).tolist():
        token_idx, slot_idx = torch.nonzero(ids == expert, as_tuple=True)
        x = hidden_states[token_idx]
        gate, up = F.linear(x, gate_up_weights[expert]).float().chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(hidden_states.dtype)
        y = F.linear(act, down_weights[expert]).float()
        out.index_add_(0, token_idx, y * weights[token_idx, slot_idx, None])
    return out.to(hidden_states.dtype)
