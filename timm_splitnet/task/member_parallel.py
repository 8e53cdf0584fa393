""" Co-training task of a member-parallel SplitNet: this rank's views in, the loss over all members' logits out """
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from timm.utils import unwrap_model

from ..loss import CoTrainingLoss
from ..parallel.member_parallel import (
    MemberParallelPlan, MemberParallelSplitNet, SharedRandomMixup, clip_grad, gather_optimizer_state_dict,
    gather_state_dict, load_optimizer_state_dict,
)
from ..parallel.member_parallel.collectives import batch_fingerprint, check_same
from ..parallel.member_parallel.module import unwrap_member_parallel
from .cotraining import CoTrainingTask

__all__ = ['MemberParallelTask']


class MemberParallelTask(CoTrainingTask):
    """`CoTrainingTask` for a `MemberParallelSplitNet`: the batch holds the views of the owned members only.

    `task(input, target)` takes the loader's split-major batch of this rank's views (`[k * B, C, H, W]`, or
    `[B, C, H, W]` with one shared view), mixes it with the shared mixup stream, runs the owned members, gathers all
    members' logits and returns the full co-training loss, identical on every rank and equal to the single-process
    loss (`loss`, `loss_ce`, `loss_cot`, `cot_weight`, `output`, `batch_size` as `CoTrainingTask`).
    `loss.backward()` gives every owned parameter the gradient of that loss (see `gather_member_logits`).

    Checkpoints hold the single-process layout: `get_checkpoint_state` and `optimizer_state_dict` gather it on rank 0
    (collectives: every rank calls them), `load_optimizer_state_dict` takes this rank's part of it. The first
    `check_steps` batches are checked to hold the same samples and targets on every rank of the replica.
    """

    def __init__(
            self,
            model: MemberParallelSplitNet,
            criterion: CoTrainingLoss,
            num_views: Optional[int] = None,
            mixup_fn: Optional[Callable] = None,
            mixup_seed: int = 0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            check_steps: int = 1,
    ):
        """
        Args:
            model: The member-parallel SplitNet.
            criterion: Co-training loss of all members' logits [S, B, C].
            num_views: Views per sample in the batch: the number of owned members (default), or 1 (shared view).
            mixup_fn: Optional `timm.data.Mixup`; wrapped in `SharedRandomMixup(mixup_fn, mixup_seed)` unless it
                already is one.
            mixup_seed: Seed of the shared mixup stream (the same on every rank).
            device: Device of the task.
            dtype: Dtype of the task.
            verbose: Log the configuration.
            check_steps: Number of first batches whose targets are compared across the replica's ranks.

        Raises:
            TypeError: `model` is not a MemberParallelSplitNet (possibly wrapped).
            ValueError: `num_views` is neither 1 nor the number of owned members.
        """
        if mixup_fn is not None and not isinstance(mixup_fn, SharedRandomMixup):
            mixup_fn = SharedRandomMixup(mixup_fn, mixup_seed)
        super().__init__(
            model, criterion, num_views=num_views, mixup_fn=mixup_fn, device=device, dtype=dtype, verbose=verbose)
        self.check_steps = check_steps

    @property
    def plan(self) -> MemberParallelPlan:
        """The layout of the members over the ranks."""
        return unwrap_member_parallel(self.trainable_module).plan

    # ----- hooks of CoTrainingTask -----

    def batch_members(self, model: nn.Module) -> int:
        """The owned members: a sample carries their views only."""
        return len(unwrap_member_parallel(model).members)

    def wrap_ddp(self, module: nn.Module, device_ids: Optional[list] = None, **ddp_kwargs) -> nn.Module:
        """With replicas: DDP over the member group (gradients averaged among replicas of the same members only).
        Without replicas there is nothing to wrap: each member lives on one rank."""
        plan = unwrap_member_parallel(module).plan
        if plan.num_replicas == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(module, device_ids=device_ids, process_group=plan.member_group, **ddp_kwargs)

    def describe(self) -> str:
        mixup = 'shared stream' if self.mixup_fn is not None else 'off'
        return (f'{self.plan.describe()}, {self.num_views} view(s) per sample, criterion={self.criterion}, '
                f'mixup={mixup}')

    # ----- training step -----

    def split_batch(self, input: torch.Tensor, target: torch.Tensor):
        input, target = super().split_batch(input, target)
        if self.check_steps > 0:
            self.check_steps -= 1
            check_same(self.plan, 'batch targets (after mixup)', batch_fingerprint(target))
        return input, target

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile every owned member in place (the gather stays eager; the state dict keys do not change)."""
        for m in unwrap_member_parallel(self.trainable_module).owned:
            m.compile(backend=backend, mode=mode, **compile_kwargs)
        return self.trainable_module

    def clip_grad(self, value: float, mode: str = 'norm') -> Optional[torch.Tensor]:
        """The single-process clip: 'norm' by the total norm over every member's gradients (a collective)."""
        return clip_grad(self.get_trainable_module(), value, mode)

    # ----- checkpoints -----

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The shared mixup stream (the same on every rank), for an exact resume."""
        if isinstance(self.mixup_fn, SharedRandomMixup) and not ema:
            return dict(shared_mixup=self.mixup_fn.state_dict())
        return {}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True, module=None, ema=False) -> None:
        if state and 'shared_mixup' in state and isinstance(self.mixup_fn, SharedRandomMixup):
            self.mixup_fn.load_state_dict(state['shared_mixup'])

    def get_checkpoint_state(self, ema: bool = False, unwrap_fn=unwrap_model) -> Dict[str, Any]:
        """The gathered (single-process layout) state dict on rank 0, {} elsewhere; a collective."""
        module = self.get_trainable_module(ema=ema)
        if module is None:
            return {}
        state_dict = gather_state_dict(module, dst=0)
        if self.plan.rank != 0:
            return {}
        state = {'state_dict_ema' if ema else 'state_dict': state_dict}
        task_state = self.get_task_state(ema=ema)
        if task_state:
            state['task_state_ema' if ema else 'task_state'] = task_state
        return state

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
        """The single-process optimizer state dict, on rank 0 (None elsewhere). A collective: every rank calls it."""
        return gather_optimizer_state_dict(optimizer, self.get_trainable_module(), dst=0)

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: Dict[str, Any]) -> None:
        """This rank's part of a single-process optimizer state dict (from either mode's checkpoint).

        Raises:
            ValueError: The state dict is of another model or optimizer setup.
        """
        try:
            load_optimizer_state_dict(optimizer, self.get_trainable_module(), state_dict)
        except (ValueError, KeyError) as e:
            raise ValueError(f'the optimizer state of the checkpoint does not fit this optimizer: {e}') from e

    def full_model(self, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
        """A full SplitNet (on the CPU) holding `state_dict`; no communication."""
        return unwrap_member_parallel(self.get_trainable_module()).to_splitnet(state_dict)
