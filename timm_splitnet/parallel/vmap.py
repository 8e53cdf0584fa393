""" The 'vmap' split backend: torch.func.functional_call + vmap over the members' stacked parameters

Eval mode only: in train mode the BN running-statistics updates cannot be written back from vmap, so the members
run with 'loop' (as do members vmap fails on, with one log line).
"""
import logging
from typing import Any, Dict, List, Sequence, Set, Tuple

import torch
import torch.nn as nn

from ..models._backends import LoopBackend, SplitBackend, is_shared_input, members_label, register_split_backend

__all__ = ['VmapBackend']

_logger = logging.getLogger(__name__)


@register_split_backend('vmap')
class VmapBackend(SplitBackend):
    """torch.func.functional_call + vmap over the members' stacked parameters and buffers, eval mode only.

    Train mode (BN running statistics cannot be written back from vmap) and members vmap cannot run use 'loop'.
    """

    def __init__(self):
        self._loop = LoopBackend()
        self._failed: Dict[Tuple[type, bool], str] = {}  # (member type, shared input) -> why vmap failed
        self._logged: Set[str] = set()

    def __getstate__(self) -> Dict[str, Any]:
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()

    def _log_fallback(self, members: Sequence[nn.Module], reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            _logger.info(f"SplitNet '{self.name}' backend: {members_label(members)} runs with 'loop': {reason}.")

    def supports(self, members: Sequence[nn.Module], views: List[torch.Tensor]) -> bool:
        """True when `members` run with vmap for these inputs in their current mode."""
        return not members[0].training and (type(members[0]), is_shared_input(views)) not in self._failed

    def forward_members(self, members: Sequence[nn.Module], views: List[torch.Tensor]) -> torch.Tensor:
        if members[0].training:
            self._log_fallback(members, 'train mode (vmap cannot update the members\' BN running statistics)')
            return self._loop.forward_members(members, views)
        shared = is_shared_input(views)
        key = (type(members[0]), shared)
        if key in self._failed:
            return self._loop.forward_members(members, views)
        try:
            return self._forward(list(members), views, shared)
        except Exception as e:  # noqa: BLE001 (eval mode has no state to restore: run the loop instead)
            self._failed[key] = f'vmap failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
            self._log_fallback(members, self._failed[key])
            return self._loop.forward_members(members, views)

    @staticmethod
    def _forward(members: List[nn.Module], views: List[torch.Tensor], shared: bool) -> torch.Tensor:
        from torch.func import functional_call, vmap
        skeleton = members[0]
        names = [n for n, _ in skeleton.named_parameters()]
        buffer_names = [n for n, _ in skeleton.named_buffers()]
        per_member = [dict(m.named_parameters()) for m in members]
        per_member_buffers = [dict(m.named_buffers()) for m in members]
        # stacked inside autograd: gradients (if any) reach the member parameters
        params = {n: torch.stack([d[n] for d in per_member]) for n in names}
        buffers = {n: torch.stack([d[n] for d in per_member_buffers]) for n in buffer_names}

        def run(p, b, x):
            return functional_call(skeleton, (p, b), (x,))

        if shared:
            return vmap(run, in_dims=(0, 0, None))(params, buffers, views[0])
        return vmap(run, in_dims=(0, 0, 0))(params, buffers, torch.stack(views))
