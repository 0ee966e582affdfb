import torch


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    x = hidden_states.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    return (normed * weight.float()).to(hidden_states.dtype)


def add_rms_norm(hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    added = (hidden_states.float() + residual.float()).to(hidden_states.dtype)
    return rms_norm(added, weight, epsilon), added
