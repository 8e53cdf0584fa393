""" The packed program: the S members compiled into one sequence of steps over a slot environment

Built by `lowering.lower_members`; running it increments the BN counters once, runs the steps (freeing every value
after its last use) and writes the BN running statistics back into the members.
"""
from typing import List, NamedTuple, Tuple

import torch
import torch.nn as nn

from .batch_norm import PendingStats, write_back
from .values import Env, Step, ValueKind

__all__ = ['ProgramStep', 'PackedProgram']


class ProgramStep(NamedTuple):
    """One step of the program and the slots to free after it."""
    run: Step
    free: Tuple[int, ...]


class PackedProgram:
    """Runs the packed computation of the members on a packed (or shared) input, returns member logits [S, ...]."""

    def __init__(
            self,
            split_factor: int,
            steps: List[ProgramStep],
            num_slots: int,
            out_slot: int,
            out_kind: ValueKind,
            batched_bns: List[List[nn.Module]],
            pending: List[PendingStats],
    ):
        """
        Args:
            split_factor: Number of members S.
            steps: The steps in execution order.
            num_slots: Size of the environment (slot 0 is the input).
            out_slot: Slot of the member output.
            out_kind: Kind of the member output.
            batched_bns: The BN layers (S modules each) called once per forward: their counters are incremented
                and their statistics written back once per forward for all of them.
            pending: The list the batched BN steps append their updated statistics to.
        """
        self.split_factor = split_factor
        self.steps = steps
        self.num_slots = num_slots
        self.input_slot = 0
        self.out_slot = out_slot
        self.out_kind = out_kind
        self.batched_bns = batched_bns
        self.pending = pending

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        env: Env = [None] * self.num_slots
        env[self.input_slot] = x
        tracked = [m.num_batches_tracked for mods in self.batched_bns if mods[0].training and
                   mods[0].track_running_stats for m in mods if m.num_batches_tracked is not None]
        if tracked:
            torch._foreach_add_(tracked, 1)
        pending = self.pending
        pending.clear()
        try:
            for step, free in self.steps:
                step(env)
                for j in free:
                    env[j] = None
        finally:
            if pending:
                # the running statistics of all BN layers, updated in the packed buffers, back into the members
                write_back(pending)
                pending.clear()
        out = env[self.out_slot]
        S = self.split_factor
        if self.out_kind is ValueKind.INVARIANT:
            return torch.stack([out] * S)
        # [B, S*N, ...] -> [S, B, N, ...]
        return out.unflatten(1, (S, -1)).transpose(0, 1)
