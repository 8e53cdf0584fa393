""" Execution backends of SplitNet members

A backend decides how the S members of a `SplitNet` run; it never changes the parameters, their names or the
state dict (always the member layout `models.{i}.*`), so checkpoints do not depend on the backend.

- 'loop': the members one after another (the paper's execution), every family, every device.

Hacked together by the timm-splitnet authors
"""
from typing import TYPE_CHECKING, Dict, List, Type

import torch

if TYPE_CHECKING:
    from .splitnet import SplitNet

__all__ = ['SplitBackend', 'LoopBackend', 'SPLIT_BACKENDS', 'resolve_backend']


class SplitBackend:
    """How the members of a SplitNet are executed."""
    name = ''

    def forward_members(self, model: 'SplitNet', views: List[torch.Tensor]) -> torch.Tensor:
        """Member logits [S, B, C] for member inputs `views` (one tensor per member)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        return str(self) == str(other)

    def __hash__(self) -> int:
        return hash(self.name)


class LoopBackend(SplitBackend):
    """The members one after another in a Python loop."""
    name = 'loop'

    def forward_members(self, model: 'SplitNet', views: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack([m(v) for m, v in zip(model.models, views)])


SPLIT_BACKENDS: Dict[str, Type[SplitBackend]] = {'loop': LoopBackend}


def resolve_backend(model: 'SplitNet', name: str) -> SplitBackend:
    """The backend called `name` for `model`."""
    name = str(name)
    if name not in SPLIT_BACKENDS:
        raise ValueError(f'Unknown split backend {name!r}, expected one of {sorted(SPLIT_BACKENDS)}.')
    return SPLIT_BACKENDS[name]()
