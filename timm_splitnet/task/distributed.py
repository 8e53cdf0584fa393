""" How a training run spreads a SplitNet over the processes: data parallel (default) or member parallel

The drivers own the process, device and data side of a run; the task (`CoTrainingTask`, `MemberParallelTask`) owns
the step and the checkpoint side. See docs/member_parallel.md for the hook order in train.py.
"""
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Iterable, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data

from timm.layers import convert_sync_batchnorm
from timm.utils import NativeScaler, distribute_bn, init_distributed_device, is_distributed_env, world_info_from_env

from ..loss import CoTrainingLoss
from ..models import SplitNet
from ..parallel.member_parallel import (
    MemberParallelPlan, MemberParallelSplitNet, MemberViewDataset, convert_member_sync_batchnorm,
    distribute_member_bn, init_distributed_from_env, member_parallel_loader,
)
from .cotraining import CoTrainingTask
from .member_parallel import MemberParallelTask

__all__ = ['DataParallelTraining', 'MemberParallelTraining', 'select_split_backend']

_logger = logging.getLogger(__name__)


def select_split_backend(model: nn.Module, backend: Optional[str]) -> Optional[str]:
    """Select the member execution backend of a SplitNet (unchanged when `backend` is empty).

    Returns:
        The backend's name, or None for a model that is not a SplitNet (a backend other than 'loop' is then ignored
        with a warning).

    Raises:
        ValueError: An unknown backend, or one that does not support the model.
    """
    if not isinstance(model, SplitNet):
        if backend not in (None, '', 'loop'):
            _logger.warning(f'split backend {backend} ignored: {type(model).__name__} is not a SplitNet.')
        return None
    if backend:
        model.set_split_backend(backend)
    return str(model.split_backend)


class DataParallelTraining:
    """The default mode: one process, or DDP of the whole SplitNet (every process holds every member).

    Hooks, in train.py's order: `init_device`, `setup_model`, `train_dataset` / `sampler_distributed` / `loader`,
    `create_task`, `create_loss_scaler`, `prepare_distributed`; per step `data_parallel_size`; per epoch
    `distribute_bn`; at the end `finish`.
    """

    def __init__(
            self,
            seed: int = 0,
            world_size: int = 1,
            timeout: Union[None, float, timedelta] = None,
            backend: Optional[str] = None,
    ):
        """
        Args:
            seed: The run's seed.
            world_size: Number of processes (`init_device` sets it).
            timeout: Collective timeout in seconds: a collective waiting longer for a dead or stalled rank fails
                (default: torch's).
            backend: torch.distributed backend (default: nccl on CUDA, gloo otherwise).
        """
        self.seed = seed
        self.world_size = world_size
        self.distributed = world_size > 1
        self.timeout = timeout
        self.backend = backend

    # ----- processes and model -----

    def init_device(self, args: Any) -> torch.device:
        """As timm's `init_distributed_device` (torchrun's or SLURM's environment, cuda:LOCAL_RANK on GPUs), with the
        collective `timeout`: sets `args.distributed`, `world_size`, `rank`, `local_rank`, `device`.

        Args:
            args: The run's arguments (an argparse namespace with at least `device` and `dist_backend`).
        """
        if self.timeout is None or not is_distributed_env():
            device = init_distributed_device(args)
            self.distributed, self.world_size = args.distributed, args.world_size
            return device
        if 'RANK' not in os.environ:  # srun without torchrun: torch's env:// reads the ranks from these, as timm's
            local_rank, rank, world_size = world_info_from_env()
            os.environ.update(LOCAL_RANK=str(local_rank), RANK=str(rank), WORLD_SIZE=str(world_size))
        return self._init_from_env(args)

    def _init_from_env(self, args: Any) -> torch.device:
        device = init_distributed_from_env(args.device, backend=self.backend, timeout=self.timeout)
        args.distributed = dist.is_initialized()
        args.world_size = dist.get_world_size() if args.distributed else 1
        args.rank = dist.get_rank() if args.distributed else 0
        args.local_rank = int(os.environ.get('LOCAL_RANK', '0'))
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
        """Move the model to `device`, select the split backend, convert BatchNorm to SyncBatchNorm (`sync_bn`, DDP
        only; timm's converter keeps the activation of `BatchNormAct2d`).

        Returns:
            (model, split backend name or None for a model that is not a SplitNet).

        Raises:
            ValueError: An unknown split backend.
        """
        model.to(device=device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        backend = select_split_backend(model, split_backend)
        if self.distributed and sync_bn:
            model = convert_sync_batchnorm(model)
        return model, backend

    @property
    def data_parallel_size(self) -> int:
        """Processes that train on different samples (images/s counts theirs)."""
        return self.world_size

    # ----- data -----

    def train_dataset(self, dataset: torch.utils.data.Dataset, num_views: int) -> torch.utils.data.Dataset:
        """The training data set as this mode loads it: unchanged, map-style or streamed (its `num_views` views come
        from its transform, `timm_splitnet.data.set_views_transform`)."""
        return dataset

    @property
    def sampler_distributed(self) -> bool:
        """`distributed` of `timm.data.create_loader`: a `DistributedSampler` over all processes."""
        return self.distributed

    def loader(self, loader: Any, is_training: bool = True) -> Any:
        """The loader from `create_loader`, as this mode uses it."""
        return loader

    # ----- task, AMP -----

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
        """Let the task wrap its model for distributed training (`CoTrainingTask.wrap_ddp`; not in one process)."""
        if self.distributed:
            task.prepare_distributed(
                device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=broadcast_buffers)

    # ----- epochs, end -----

    def distribute_bn(self, models: Iterable[Optional[nn.Module]], mode: str = 'reduce') -> None:
        """Average ('reduce') or broadcast ('broadcast') the BN running statistics over the processes; '' skips."""
        if not self.distributed or mode not in ('broadcast', 'reduce'):
            return
        for model in models:
            if model is not None:
                distribute_bn(model, self.world_size, mode == 'reduce')

    def finish(self) -> None:
        """Tear down the process group after the last collective."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class MemberParallelTraining(DataParallelTraining):
    """Member parallel (under torchrun): every rank trains its members of the SplitNet.

    Member i lives on rank i mod N (N divides S), or N = S x R with R replicas of every member, data parallel among
    the replicas. The ranks of a replica load the same samples and each augments the views of its own members.
    `plan` (a `MemberParallelPlan`) is set by `setup_model`. The caller checks the torchrun environment and the
    device first (`timm_splitnet.cli.check_torchrun_env`, `check_rank_device`).
    """

    def __init__(
            self,
            seed: int = 0,
            timeout: Union[None, float, timedelta] = None,
            backend: Optional[str] = None,
    ):
        """
        Args:
            seed: The run's seed: seeds the members' views and the shared mixup stream alike on every rank.
            timeout: Collective timeout in seconds: a collective waiting longer for a dead or stalled rank fails.
            backend: torch.distributed backend (default: nccl on CUDA, gloo otherwise).
        """
        super().__init__(seed, timeout=timeout, backend=backend)
        self.plan: Optional[MemberParallelPlan] = None

    def _plan(self) -> MemberParallelPlan:
        if self.plan is None:
            raise RuntimeError('MemberParallelTraining: call setup_model first.')
        return self.plan

    def init_device(self, args: Any) -> torch.device:
        """The default process group from torchrun's environment with the collective timeout (cuda:LOCAL_RANK on
        GPUs); sets `args.distributed`, `world_size`, `rank`, `local_rank`, `device` as timm's does."""
        return self._init_from_env(args)

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
            ValueError: The model is not a SplitNet, or the number of processes does not fit its S members.
        """
        if not isinstance(model, SplitNet):
            raise ValueError(f'member-parallel training needs a SplitNet model (splitnet_<arch>_s<S>), got a '
                             f'{type(model).__name__}.')
        if split_backend not in (None, '', 'loop'):
            _logger.warning(f'split backend {split_backend} ignored: the members of a member-parallel rank run one '
                            f'after the other (loop).')
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
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError('member-parallel training seeds every view by its sample index, which a streamed '
                             '(iterable) data set does not have: use a map-style data set.')
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
        """As `DataParallelTraining`; float16 with gradient clipping is refused.

        Raises:
            ValueError: float16 AMP on CUDA with `clip_grad` (timm's scaler would clip by the rank-local norm, not
                by the norm over all members).
        """
        scaler = super().create_loss_scaler(device, amp_dtype, clip_grad)
        if scaler is not None and clip_grad is not None:
            raise ValueError('clip_grad with float16 AMP is not supported member-parallel (the loss scaler would clip '
                             'each rank\'s members by their own norm): use bfloat16 AMP or no gradient clipping.')
        return scaler

    def distribute_bn(self, models: Iterable[Optional[nn.Module]], mode: str = 'reduce') -> None:
        """As `DataParallelTraining`, among the replicas of the same members only (nothing without replicas)."""
        if mode not in ('broadcast', 'reduce'):
            return
        for model in models:
            if model is not None:
                distribute_member_bn(model, self._plan(), mode == 'reduce')
