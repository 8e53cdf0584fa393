""" The 'packed' split backend: the S members run as one grouped network

Programs are lowered once per members (and per train/eval mode and input kind) and rebuilt when the members'
module tree changes; members the packer cannot run fall back to 'loop' with one log line naming the reason.
"""
import logging
import weakref
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from ...models._backends import (
    LoopBackend, SplitBackend, is_shared_input, join_views, members_label, register_split_backend)
from .lowering import lower_members
from .program import PackedProgram
from .values import Unpackable

__all__ = ['PackedBackend']

_logger = logging.getLogger(__name__)


class _Structure:
    """Identity of the members and of their module tree: a packed program is valid while it is unchanged."""

    def __init__(self, members: Sequence[nn.Module]):
        self.member_refs = [weakref.ref(m) for m in members]
        container = [members._modules] if isinstance(members, nn.Module) else []
        self.dicts = container + [m._modules for member in members for m in member.modules() if m._modules]
        self.snapshot = [tuple(d.values()) for d in self.dicts]

    def valid(self, members: Sequence[nn.Module]) -> bool:
        if len(members) != len(self.member_refs) or any(r() is not m for r, m in zip(self.member_refs, members)):
            return False
        # C-level loops: the check costs ~0.1 us per module with children
        return list(map(tuple, map(dict.values, self.dicts))) == self.snapshot


@register_split_backend('packed')
class PackedBackend(SplitBackend):
    """The S members as one network: grouped convs, BN over S*C channels, one batched matmul per Linear.

    Falls back to 'loop' (one log line naming the members and the reason) for members the packer cannot run, and
    for members with gradient checkpointing enabled.
    """

    def __init__(self):
        self._structure: Optional[_Structure] = None
        # (train mode, shared input, input rank) -> program, or the reason the members cannot be packed
        self._programs: Dict[Tuple[bool, bool, int], Union[PackedProgram, str]] = {}
        self._logged: Set[str] = set()
        self._loop = LoopBackend()

    def __getstate__(self) -> Dict[str, Any]:
        # compiled programs hold references to the member modules: never copy or pickle them
        return {'_logged': set(self._logged)}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()
        self._logged = state.get('_logged', set())

    def attach(self, members: Sequence[nn.Module]) -> None:
        self.program(members, shared=True, in_ndim=4)

    def prepare(self, members: Sequence[nn.Module], in_ndim: int = 4) -> None:
        """The programs of both modes and both input kinds, built now (the modes of all submodules are restored)."""
        modes = [(m, m.training) for member in members for m in member.modules()]
        try:
            for training in (True, False):
                for member in members:
                    member.train(training)
                for shared in (True, False):
                    self.program(members, shared, in_ndim)
        finally:
            for m, training in modes:
                m.training = training

    def _log_fallback(self, members: Sequence[nn.Module], reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            _logger.info(f"SplitNet '{self.name}' backend: {members_label(members)} runs with 'loop': {reason}.")

    def program(self, members: Sequence[nn.Module], shared: bool, in_ndim: int) -> Optional[PackedProgram]:
        """The packed program of `members` for their current mode and input kind, None when they cannot be packed."""
        if self._structure is None or not self._structure.valid(members):
            self._structure = _Structure(members)
            self._programs = {}
        key = (members[0].training, shared, in_ndim)
        program = self._programs.get(key)
        if program is None:
            try:
                program = lower_members(list(members), shared, in_ndim)
            except Unpackable as e:
                program = str(e)
            self._programs[key] = program
        if isinstance(program, str):
            self._log_fallback(members, program)
            return None
        return program

    def supports(self, members: Sequence[nn.Module], views: List[torch.Tensor]) -> bool:
        """True when `members` run packed for these inputs in their current mode."""
        if any(getattr(m, 'grad_checkpointing', False) for m in members):
            return False
        return self.program(members, is_shared_input(views), views[0].ndim) is not None

    def forward_members(self, members: Sequence[nn.Module], views: List[torch.Tensor]) -> torch.Tensor:
        if any(getattr(m, 'grad_checkpointing', False) for m in members):
            self._log_fallback(members, 'gradient checkpointing is enabled (the loop checkpoints every member)')
            return self._loop.forward_members(members, views)
        shared = is_shared_input(views)
        program = self.program(members, shared, views[0].ndim)
        if program is None:
            return self._loop.forward_members(members, views)
        x = views[0] if shared else join_views(views)  # the packed batch itself when the views are its blocks
        return program(x)
