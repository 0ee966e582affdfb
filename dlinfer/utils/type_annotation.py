"""Types LMDeploy imports from dlinfer (``MoeMetadata``, ``MoECommType``), with upstream dlinfer's fields."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch


class MoECommType(enum.Enum):
    """How tokens reach experts across ranks (Ascend-specific strategies keep their upstream names)."""

    ALLGATHER = enum.auto()
    ALLTOALL = enum.auto()
    MC2 = enum.auto()


@dataclasses.dataclass
class MoeMetadata:
    """Per-step MoE communication metadata built by LMDeploy's dlinfer backends.

    dlinfer's in-tree vendors serve tensor-parallel MoE (``ep_size == 1``); the expert-parallel fields are
    carried for vendors that implement expert parallelism.
    """

    max_tokens_across_dp: int = 1
    pad_size: int = 0
    dp_size: int = 1
    tp_size: int = 1
    ep_size: int = 1
    tp_rank: int = 0
    ep_rank: int = 0
    tp_group: Any = None
    ep_group: Any = None
    moe_comm_type: MoECommType | None = None
    x_active_mask: torch.Tensor | None = None
    moe_group_name: str | None = None
    expert_ids_per_ep_rank: torch.Tensor | None = None
    router_n_groups: int = -1
