""" How train.py spreads a SplitNet over the processes: data parallel (default) or member parallel

train.py calls these hooks where the two modes differ, so its loop reads the same for both:

* `DataParallelTraining`: one process, or DDP of the whole SplitNet under torchrun (timm's train.py): every process
  holds every member and loads its own shard of the data (`DistributedSampler`).
* `MemberParallelTraining` (`--member-parallel` under torchrun): member i lives on rank i mod N (N divides S), or
  N = S x R with R replicas of every member, data parallel among the replicas (see `timm_splitnet.member_parallel`).
  The ranks of a replica load the same samples, each augments the views of its own members, and the co-training
  loss uses every member's logits through an autograd-aware all-gather. Checkpoints hold the single-process state
  dicts (`gather_state_dict`, `gather_optimizer_state_dict`), so runs resume in either mode from the other's
  checkpoints, and the export is the full SplitNet.

Hook order in train.py: `init_device` (before anything else), `setup_model` (places the model; the plan of the
member-parallel mode exists from here on), `train_dataset` / `sampler_distributed` / `loader` (data loaders),
`create_task`, `create_loss_scaler`, `load_optimizer_state_dict` (resume), `prepare_distributed`; per step
`clip_grad` and `data_parallel_size` (images/s); per epoch `distribute_bn`, `optimizer_state_dict` (a collective in
the member-parallel mode: every rank calls it); at the end `full_model` (rank 0's export) and `finish`.

Hacked together by the timm-splitnet authors
"""
import argparse
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data

from timm.layers import convert_sync_batchnorm
from timm.utils import NativeScaler, dispatch_clip_grad, distribute_bn, init_distributed_device, unwrap_model

from ..cli import CliError, as_cli_error, check_rank_device, check_torchrun_env, set_split_backend
from ..data import MultiViewDataset
from ..loss import CoTrainingLoss
from ..parallel.member_parallel import (
    MemberParallelPlan, MemberParallelSplitNet, MemberParallelTask, MemberViewDataset, clip_grad as member_clip_grad,
    convert_member_sync_batchnorm, distribute_member_bn, gather_optimizer_state_dict, init_distributed_from_env,
    load_optimizer_state_dict, member_parallel_loader)
from ..models import SplitNet
from .cotraining import CoTrainingTask

__all__ = ['DataParallelTraining', 'MemberParallelTraining']

_logger = logging.getLogger(__name__)


class DataParallelTraining:
    """Hooks of the default mode: one process, or DDP of the whole SplitNet (every process holds every member)."""

    def __init__(self, seed: int = 0, world_size: int = 1):
        """
        Args:
            seed: The run's seed (`--seed`).
            world_size: Number of processes (`init_device` sets it).
        """
        self.seed = seed
        self.world_size = world_size
        self.distributed = world_size > 1

    # ----- setup -----

    def init_device(self, args: argparse.Namespace) -> torch.device:
        """timm's `init_distributed_device`: sets `args.distributed`, `world_size`, `rank`, `local_rank`, `device`."""
        device = init_distributed_device(args)
        self.distributed, self.world_size = args.distributed, args.world_size
        return device

    def setup_model(
            self,
            model: nn.Module,
            device: torch.device,
            split_backend: Optional[str] = None,
            sync_bn: bool = False,
            channels_last: bool = False,
    ) -> Tuple[nn.Module, Optional[str]]:
        """Move the model to `device`, select the split backend, convert BatchNorm to SyncBatchNorm (`sync_bn`, DDP
        only; timm's converter keeps the activation of `BatchNormAct2d`).

        Returns:
            (model, split backend name or None for a model that is not a SplitNet).
        """
        model.to(device=device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        backend = set_split_backend(model, split_backend)
        if self.distributed and sync_bn:
            model = convert_sync_batchnorm(model)
        return model, backend

    @property
    def data_parallel_size(self) -> int:
        """Processes that train on different samples (images/s counts theirs)."""
        return self.world_size

    # ----- data -----

    def train_dataset(self, dataset: torch.utils.data.Dataset, num_views: int) -> torch.utils.data.Dataset:
        """The training dataset with `num_views` views per sample (S, or 1 for one view shared by the members)."""
        return MultiViewDataset(dataset, num_views) if num_views > 1 else dataset

    @property
    def sampler_distributed(self) -> bool:
        """`distributed` of `timm.data.create_loader`: a `DistributedSampler` over all processes."""
        return self.distributed

    def loader(self, loader: Any, is_training: bool = True) -> Any:
        """The loader from `create_loader`, as this mode uses it."""
        return loader

    # ----- task, optimizer, AMP -----

    def create_task(
            self,
            model: nn.Module,
            criterion: CoTrainingLoss,
            num_views: int,
            mixup_fn: Optional[Callable] = None,
            device: Optional[torch.device] = None,
            verbose: bool = True,
    ) -> CoTrainingTask:
        """The co-training task (`num_views`: S, or 1 for one view shared by all members)."""
        return CoTrainingTask(model, criterion, num_views=num_views, mixup_fn=mixup_fn, device=device, verbose=verbose)

    def create_loss_scaler(
            self,
            device: torch.device,
            amp_dtype: Optional[torch.dtype],
            clip_grad: Optional[float] = None,
    ) -> Optional[NativeScaler]:
        """timm's `NativeScaler` for float16 AMP on CUDA (`amp_dtype` None: no AMP), else None."""
        if amp_dtype == torch.float16 and device.type == 'cuda':
            return NativeScaler(device=device.type)
        return None

    def prepare_distributed(self, task: CoTrainingTask, device: torch.device, broadcast_buffers: bool = True) -> None:
        """Wrap the model in DDP (distributed runs only)."""
        if self.distributed:
            task.prepare_distributed(
                device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=broadcast_buffers)

    def load_optimizer_state_dict(
            self,
            optimizer: torch.optim.Optimizer,
            model: nn.Module,
            state_dict: Dict[str, Any],
    ) -> None:
        """Load a checkpoint's optimizer state (a state dict over the full SplitNet, from either mode)."""
        try:
            optimizer.load_state_dict(state_dict)
        except (ValueError, KeyError) as e:
            raise CliError(f'the optimizer state of the checkpoint does not fit this optimizer: {e}') from e

    # ----- training loop -----

    def clip_grad(self, model: nn.Module, value: float, mode: str = 'norm') -> None:
        """timm's `dispatch_clip_grad` over the model's parameters."""
        dispatch_clip_grad(model.parameters(), value=value, mode=mode)

    def distribute_bn(self, models: Iterable[Optional[nn.Module]], mode: str = 'reduce') -> None:
        """Average ('reduce') or broadcast ('broadcast') the BN running statistics over the processes; '' skips."""
        if not self.distributed or mode not in ('broadcast', 'reduce'):
            return
        for model in models:
            if model is not None:
                distribute_bn(model, self.world_size, mode == 'reduce')

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> Optional[Dict[str, Any]]:
        """The optimizer state dict for the checkpoint (over the full SplitNet)."""
        return optimizer.state_dict()

    # ----- end -----

    def full_model(self, task: CoTrainingTask, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
        """The trained SplitNet holding `state_dict` (a checkpoint's full state dict), for the export."""
        model = unwrap_model(task.get_trainable_module())
        model.load_state_dict(state_dict)
        return model

    def finish(self) -> None:
        """Tear down the process group after the last collective."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class MemberParallelTraining(DataParallelTraining):
    """Hooks of `--member-parallel` (under torchrun): every rank trains its members of the SplitNet.

    `plan` (a `MemberParallelPlan`) is set by `setup_model`.
    """

    def __init__(
            self,
            seed: int = 0,
            timeout: Union[None, float, timedelta] = None,
            backend: Optional[str] = None,
            prog: str = 'train.py',
    ):
        """
        Args:
            seed: The run's seed (`--seed`): seeds the members' views and the shared mixup stream alike on every rank.
            timeout: `--dist-timeout`, seconds: a collective waiting longer for a dead or stalled rank fails the run.
            backend: `--dist-backend` (default: nccl on CUDA, gloo otherwise).
            prog: The script, for messages.
        """
        super().__init__(seed)
        self.timeout = timeout
        self.backend = backend
        self.prog = prog
        self.plan: Optional[MemberParallelPlan] = None

    def _plan(self) -> MemberParallelPlan:
        if self.plan is None:
            raise RuntimeError('MemberParallelTraining: call setup_model first.')
        return self.plan

    def init_device(self, args: argparse.Namespace) -> torch.device:
        """The default process group from torchrun's environment with the collective timeout (cuda:LOCAL_RANK on
        GPUs); sets `args.distributed`, `world_size`, `rank`, `local_rank`, `device` as timm's does."""
        check_torchrun_env(self.prog)
        check_rank_device(args.device)
        device = init_distributed_from_env(args.device, backend=self.backend, timeout=self.timeout)
        args.distributed = dist.is_initialized()
        args.world_size = dist.get_world_size() if args.distributed else 1
        args.rank = dist.get_rank() if args.distributed else 0
        args.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        args.device = str(device)
        self.distributed, self.world_size = args.distributed, args.world_size
        return device

    def setup_model(
            self,
            model: nn.Module,
            device: torch.device,
            split_backend: Optional[str] = None,
            sync_bn: bool = False,
            channels_last: bool = False,
    ) -> Tuple[nn.Module, Optional[str]]:
        """Keep this rank's members of the SplitNet (built alike on every rank) on `device`; `sync_bn` syncs BN
        statistics among the replicas of the same members only. A collective (creates the process groups).

        Raises:
            CliError: The model is not a SplitNet, or the number of processes does not fit its S members.
        """
        if not isinstance(model, SplitNet):
            raise CliError(f'--member-parallel needs a SplitNet model (splitnet_<arch>_s<S>), got a '
                           f'{type(model).__name__}.')
        if split_backend not in (None, '', 'loop'):
            _logger.warning(f'--split-backend {split_backend} ignored: with --member-parallel the members of a rank '
                            f'run one after the other (loop).')
        with as_cli_error():
            self.plan = MemberParallelPlan.from_process_group(model.split_factor, timeout=self.timeout)
        model = MemberParallelSplitNet(model, self.plan, device=device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if sync_bn:
            model = convert_member_sync_batchnorm(model, self.plan)
        return model, 'loop'

    @property
    def data_parallel_size(self) -> int:
        return self._plan().num_replicas

    def train_dataset(self, dataset: torch.utils.data.Dataset, num_views: int) -> torch.utils.data.Dataset:
        """The views of this rank's members (one shared view when `num_views` is 1), seeded per (sample, member):
        member i's view does not depend on the rank that draws it."""
        plan = self._plan()
        return MemberViewDataset(dataset, plan.members, seed=self.seed, same_view=num_views == 1)

    @property
    def sampler_distributed(self) -> bool:
        return False  # `loader` puts the member-parallel sampler in

    def loader(self, loader: Any, is_training: bool = True) -> Any:
        """The loader rebuilt with the member-parallel sampler: the ranks of a replica load the same samples."""
        return member_parallel_loader(loader, self._plan(), is_training, self.seed)

    def create_task(
            self,
            model: nn.Module,
            criterion: CoTrainingLoss,
            num_views: int,
            mixup_fn: Optional[Callable] = None,
            device: Optional[torch.device] = None,
            verbose: bool = True,
    ) -> MemberParallelTask:
        """The member-parallel task: this rank's views in, the loss over all members' (gathered) logits out; mixup
        draws from a stream seeded alike on every rank."""
        return MemberParallelTask(
            model, criterion, num_views=1 if num_views == 1 else None, mixup_fn=mixup_fn, mixup_seed=self.seed,
            device=device, verbose=verbose)

    def create_loss_scaler(
            self,
            device: torch.device,
            amp_dtype: Optional[torch.dtype],
            clip_grad: Optional[float] = None,
    ) -> Optional[NativeScaler]:
        """As `DataParallelTraining`; float16 with `--clip-grad` is refused (timm's scaler clips by the rank-local
        norm, not the norm over all members)."""
        scaler = super().create_loss_scaler(device, amp_dtype, clip_grad)
        if scaler is not None and clip_grad is not None:
            raise CliError('--clip-grad with float16 AMP is not supported with --member-parallel (the loss scaler '
                           'would clip each rank\'s members by their own norm): use --amp-dtype bfloat16 or drop '
                           '--clip-grad.')
        return scaler

    def prepare_distributed(self, task: CoTrainingTask, device: torch.device, broadcast_buffers: bool = True) -> None:
        """DDP among the replicas of the same members (nothing to wrap without replicas)."""
        task.prepare_distributed(
            device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=broadcast_buffers)

    def load_optimizer_state_dict(
            self,
            optimizer: torch.optim.Optimizer,
            model: nn.Module,
            state_dict: Dict[str, Any],
    ) -> None:
        """This rank's part of a single-process optimizer state dict (from either mode's checkpoint)."""
        try:
            load_optimizer_state_dict(optimizer, model, state_dict)
        except (ValueError, KeyError) as e:
            raise CliError(f'the optimizer state of the checkpoint does not fit this optimizer: {e}') from e

    def clip_grad(self, model: nn.Module, value: float, mode: str = 'norm') -> None:
        """The single-process clip: 'norm' by the total norm over every member's gradients (a collective)."""
        member_clip_grad(model, value, mode)

    def distribute_bn(self, models: Iterable[Optional[nn.Module]], mode: str = 'reduce') -> None:
        """As `DataParallelTraining`, among the replicas of the same members only (nothing without replicas)."""
        if mode not in ('broadcast', 'reduce'):
            return
        for model in models:
            if model is not None:
                distribute_member_bn(model, self._plan(), mode == 'reduce')

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> Optional[Dict[str, Any]]:
        """The single-process optimizer state dict, on rank 0 (None elsewhere). A collective: every rank calls it."""
        return gather_optimizer_state_dict(optimizer, model, dst=0)

    def full_model(self, task: CoTrainingTask, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
        """A full SplitNet (on the CPU) holding `state_dict`; no communication."""
        return unwrap_model(task.get_trainable_module()).to_splitnet(state_dict)
