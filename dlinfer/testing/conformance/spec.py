"""What the kit needs to know to test one op (:class:`OpSpec`); each family's module under ``cases`` fills a
``SPECS`` table of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from dlinfer.testing.conformance.inputs import Rand


@dataclasses.dataclass
class OpSpec:
    """How to test one op: its cases, how to build inputs for one, how to run it, what to compare."""

    kind: str
    cases: Callable[[bool], list[dict]]
    build: Callable[[dict, torch.dtype, Rand], dict]
    run: Callable[[dict], dict[str, torch.Tensor]]
    extra_check: Callable[[dict, dict, dict, torch.dtype], list[str]] | None = None
