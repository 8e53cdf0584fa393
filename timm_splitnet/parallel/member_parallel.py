""" Member-parallel SplitNet: one member (or a few) per process, launched with torchrun

The paper's multi-device claim (§5): the S members of a SplitNet are independent networks that only meet in the
co-training loss, so they can live on different GPUs. With N processes (`torchrun --nproc_per_node=N`):

* N divides S: member i lives on rank i mod N (S / N members per rank, one replica);
* N = S x R: R replicas of every member, member i on the ranks i, i + S, i + 2S, ...; the replicas of a member are
  data parallel (DDP over the *member group* of their ranks), each replica with its own shard of the data.

Process groups (`MemberParallelPlan`): the *cross-member group* of a rank is the M = min(N, S) ranks of its replica
that together hold all S members (the member logits are all-gathered there); its *member group* is the R ranks that
hold replicas of the same members (gradients, BN statistics and SyncBatchNorm stay there: averaging over all ranks
would mix different networks).

One training step on every rank of a cross-member group:

1. the loader yields the *same sample indices* (`member_parallel_sampler`: a `DistributedSampler` over the R
   replicas, rank = replica index) and every rank augments only the views of its own members
   (`MemberViewDataset`: the view of member i of sample j in epoch e is drawn from RNGs seeded by
   (seed, e, j, i), so it does not depend on which rank computes it, nor on the loader's worker count);
2. Mixup / CutMix draw the same lambda, partner and box on every rank (`SharedRandomMixup`: a private NumPy stream
   seeded alike on every rank);
3. the rank runs its members on its views and all-gathers the logits of all members, [S, B, C] in member order
   (`gather_member_logits`);
4. every rank computes the full co-training loss ``sum_i CE_i + w * JS(z_1..z_S)`` from the gathered logits, the
   same value as the single-process loop, and back-propagates it. The gather's backward hands every rank the
   gradient of *its own* slice only (`grad_mode='local'`): the loss is identical on every rank, so that slice is
   exactly the gradient that the member receives from the full loss, no more, no less. (The textbook adjoint of an
   all-gather sums the slice gradients over the ranks: with every rank back-propagating the full loss that is M times
   too large. `grad_mode='sum'` is that adjoint, for losses that differ per rank: back-propagate the own members'
   CE terms plus ``w * JS / M`` on every rank.)
5. DDP over the member group averages the gradients of the replicas (nothing to do without replicas).

Checkpoints: `MemberParallelSplitNet.state_dict()` holds the owned members only; `gather_state_dict` collects the
standard SplitNet state dict (`models.{i}.*`, the keys and order of single-process training) and
`gather_optimizer_state_dict` the optimizer state dict that a single-process optimizer over the full SplitNet would
have (same param groups, same parameter indices), so `SplitNet.load_state_dict`, `optimizer.load_state_dict`,
timm checkpoints and `export_model` take them unchanged. The other way, `MemberParallelSplitNet.load_state_dict`
takes a full SplitNet state dict (each rank keeps its members) and `load_optimizer_state_dict` a single-process
optimizer state dict: a run resumes in either mode from a checkpoint of the other.

Failures: the groups are created with a timeout (`init_groups(timeout=...)`, default 10 minutes). When a worker
dies, torchrun (`max_restarts=0`) stops the other workers of its node and exits non-zero with a summary naming the
failed rank; a rank blocked in a member-parallel collective meanwhile (or on another node, or beside a rank that
stalls without dying) raises `MemberParallelError` naming the collective and the ranks once the peer is gone or the
timeout expires. Nothing here catches these errors; decorate the script's `main` with
`torch.distributed.elastic.multiprocessing.errors.record` so that torchrun prints the failing rank's traceback.

What it buys, against DDP of the whole SplitNet on the same N GPUs: a rank holds S/N of the parameters, gradients
and optimizer state (ImageNet-size members that do not fit together on one GPU) and communicates per step only the
logits (S x B x C values, e.g. 2 MB for S=4, B=128, C=1000 in fp32) instead of all-reducing every gradient (147 MB
for the 36.7M parameters of WRN-28-10 S=4); each member still sees the whole batch of its replica, so its BN
statistics are those of single-process training. At inference the members run at the same time on their GPUs (the
latency of one member plus one gather). Costs: every rank of a replica loads and decodes every image of the batch
(only the augmentation is split), and the step waits for the slowest member.

Limitations: fp16 `GradScaler` skips steps per rank (a gradient overflow on one rank does not skip the step on the
others): prefer bf16. timm's `NativeScaler` clips with the rank-local norm: use `clip_grad` (after
`scaler.unscale_`) for the single-process total-norm clip. SyncBatchNorm (replicas only) needs GPUs. The owned
members run one after the other (no packed split backend for the owned subset). The prefetcher's on-device random
erasing draws from each rank's own stream (independent per member, but not the single-process draws); erasing in
the dataset transform is seeded per view. `grad_mode='sum'` communicates in backward, in the cross-member group,
while DDP (with replicas) all-reduces in the member group: keep the default 'local' with NCCL and replicas.

Launch (see the README):

    torchrun --nproc_per_node=2 train.py ... --member-parallel                      # one node
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        --rdzv-id=job1 train.py ... --member-parallel                                # on every node

Hacked together by the timm-splitnet authors
"""
import copy
import logging
import math
import os
import random
from collections import OrderedDict
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data

from timm.data.distributed_sampler import OrderedDistributedSampler
from timm.utils import unwrap_model

from ..data.views import MultiViewDataset
from ..loss import CoTrainingLoss
from ..task.cotraining import CoTrainingTask

__all__ = [
    'MemberParallelPlan', 'MemberParallelSplitNet', 'MemberParallelTask', 'MemberParallelError',
    'MemberViewDataset', 'MemberParallelSampler', 'ViewKey', 'SharedRandomMixup', 'DEFAULT_TIMEOUT',
    'gather_member_logits', 'member_parallel_forward', 'member_parallel_sampler', 'member_parallel_loader',
    'gather_state_dict', 'gather_optimizer_state_dict', 'load_optimizer_state_dict', 'distribute_member_bn',
    'clip_grad', 'convert_member_sync_batchnorm', 'init_distributed_from_env', 'init_member_parallel',
    'valid_world_sizes',
]

_logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=10)
GRAD_MODES = ('local', 'sum')


class MemberParallelError(RuntimeError):
    """A member-parallel collective failed (a peer rank died, stalled past the timeout, or sent another batch)."""


def _timedelta(timeout: Union[None, float, timedelta]) -> timedelta:
    if timeout is None:
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))


def valid_world_sizes(split_factor: int, max_replicas: int = 4) -> Tuple[int, ...]:
    """World sizes that fit S members: the divisors of S and the multiples S x R (R <= max_replicas shown)."""
    divisors = [n for n in range(1, split_factor + 1) if split_factor % n == 0]
    return tuple(divisors + [split_factor * r for r in range(2, max_replicas + 1)])


# ----- layout -----

class MemberParallelPlan:
    """Which members a rank owns and the process groups between ranks (see the module docstring).

    With M = min(N, S) ranks per replica and R = N / M replicas, rank r is slot `r % M` of replica `r // M`; it owns
    members `slot, slot + M, slot + 2M, ...` (member i on rank i mod N when N divides S). Constructing a plan needs no
    process group; `init_groups` creates the groups (a collective: every rank calls it, in the same order).

    Attributes:
        world_size: N.
        rank: Global rank of this process.
        split_factor: S.
        slots: M, ranks per replica (size of the cross-member group).
        num_replicas: R.
        slot: This rank's position in its replica (rank in the cross-member group).
        replica: This rank's replica index (rank in the member group; the data sampler's rank).
        members: Member indices owned by this rank, increasing.
        member_group_ranks: Global ranks holding replicas of this rank's members (data parallel among them).
        cross_group_ranks: Global ranks of this rank's replica (the logits are gathered among them).
        member_group: Process group of `member_group_ranks` (None with one replica).
        cross_group: Process group of `cross_group_ranks` (None with one rank per replica).
        group: Process group of all ranks with the plan's timeout (None with one process).
    """

    def __init__(self, world_size: int, rank: int, split_factor: int):
        """
        Args:
            world_size: Number of processes N.
            rank: Global rank of this process, 0 <= rank < N.
            split_factor: Number of members S.

        Raises:
            ValueError: N neither divides S nor is a multiple of S, or the rank is out of range.
        """
        if not isinstance(split_factor, int) or split_factor < 1:
            raise ValueError(f'member-parallel: S must be a positive integer, got {split_factor!r}.')
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f'member-parallel: the world size must be a positive integer, got {world_size!r}.')
        if split_factor % world_size and world_size % split_factor:
            choices = ', '.join(str(n) for n in valid_world_sizes(split_factor))
            raise ValueError(
                f'member-parallel: {world_size} processes do not fit S={split_factor} members: the number of '
                f'processes N must divide S (S/N members per process) or be a multiple of S (N = S x replicas, '
                f'data parallel between the replicas of a member). Valid N for S={split_factor}: {choices}, ...')
        if not 0 <= rank < world_size:
            raise ValueError(f'member-parallel: rank {rank} is outside 0..{world_size - 1}.')
        self.world_size = world_size
        self.rank = rank
        self.split_factor = split_factor
        self.slots = min(world_size, split_factor)
        self.num_replicas = world_size // self.slots
        self.slot = rank % self.slots
        self.replica = rank // self.slots
        self.members = tuple(range(self.slot, split_factor, self.slots))
        self.member_group_ranks = tuple(self.slot + r * self.slots for r in range(self.num_replicas))
        self.cross_group_ranks = tuple(self.replica * self.slots + s for s in range(self.slots))
        self.member_group = None
        self.cross_group = None
        self.group = None
        self.timeout: Optional[timedelta] = None
        self._groups_ready = world_size == 1

    @classmethod
    def from_process_group(
            cls,
            split_factor: int,
            timeout: Union[None, float, timedelta] = None,
    ) -> 'MemberParallelPlan':
        """The plan of this process in the initialised default process group, with its groups created.

        Without an initialised process group the plan is the single-process one (N = 1, every member owned).
        """
        if dist.is_available() and dist.is_initialized():
            plan = cls(dist.get_world_size(), dist.get_rank(), split_factor)
        else:
            plan = cls(1, 0, split_factor)
        return plan.init_groups(timeout)

    def init_groups(
            self,
            timeout: Union[None, float, timedelta] = None,
            backend: Optional[str] = None,
    ) -> 'MemberParallelPlan':
        """Create the process groups (a collective over all ranks: every rank calls it with the same arguments).

        Args:
            timeout: Timeout of every collective in these groups (seconds or timedelta; default 10 minutes). A peer
                that stalls longer makes the collective raise instead of hanging.
            backend: Backend of the groups (default: the default group's, e.g. nccl or gloo).
        """
        self.timeout = _timedelta(timeout)
        if self.world_size == 1:
            self._groups_ready = True
            return self
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError('MemberParallelPlan.init_groups needs an initialised process group '
                               '(torch.distributed.init_process_group, e.g. under torchrun).')
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f'MemberParallelPlan of world size {self.world_size}, rank {self.rank}, but the process group has '
                f'world size {dist.get_world_size()}, rank {dist.get_rank()}.')
        kwargs = dict(timeout=self.timeout, backend=backend)
        # the same new_group calls in the same order on every rank; keep the groups that hold this rank
        self.group = dist.new_group(list(range(self.world_size)), **kwargs)
        if self.num_replicas > 1:
            for slot in range(self.slots):
                ranks = [slot + r * self.slots for r in range(self.num_replicas)]
                group = dist.new_group(ranks, **kwargs)
                if slot == self.slot:
                    self.member_group = group
        if self.slots > 1:
            for replica in range(self.num_replicas):
                ranks = [replica * self.slots + s for s in range(self.slots)]
                group = dist.new_group(ranks, **kwargs)
                if replica == self.replica:
                    self.cross_group = group
        self._groups_ready = True
        return self

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owner(self, member: int, replica: int = 0) -> int:
        """Global rank that holds `member` in `replica`."""
        return replica * self.slots + member % self.slots

    def check_ready(self) -> None:
        if not self._groups_ready:
            raise RuntimeError('MemberParallelPlan: call init_groups() (on every rank) before using the plan.')

    def describe(self) -> str:
        text = (f'rank {self.rank}/{self.world_size}: member(s) {list(self.members)} of S={self.split_factor}, '
                f'logits gathered over ranks {list(self.cross_group_ranks)}')
        if self.num_replicas > 1:
            text += (f', replica {self.replica} of {self.num_replicas} (data parallel with ranks '
                     f'{list(self.member_group_ranks)})')
        return text

    def __repr__(self) -> str:
        return f'MemberParallelPlan({self.describe()})'

    def __deepcopy__(self, memo) -> 'MemberParallelPlan':
        return self  # process groups are not copyable; an EMA copy of the model shares the plan


@contextmanager
def _collective(plan: MemberParallelPlan, what: str, ranks: Sequence[int]):
    """Re-raise a failed collective as a MemberParallelError that names it, the ranks and the timeout."""
    try:
        yield
    except MemberParallelError:
        raise
    except RuntimeError as e:  # DistBackendError, DistNetworkError, gloo / NCCL timeouts are RuntimeErrors
        timeout = f'{plan.timeout.total_seconds():g} s' if plan.timeout is not None else 'default'
        peers = [r for r in ranks if r != plan.rank]
        raise MemberParallelError(
            f'member-parallel {what} over ranks {list(ranks)} failed on rank {plan.rank} waiting for rank(s) '
            f'{peers}: one of them died, stalled longer than the timeout ({timeout}) or is in another collective. '
            f'{type(e).__name__}: {e}') from e


def _check_same(plan: MemberParallelPlan, what: str, fingerprint: torch.Tensor) -> None:
    """Raise MemberParallelError unless every rank of the cross-member group has the same fingerprint."""
    if plan.cross_group is None:
        return
    fingerprint = fingerprint.detach().double().reshape(-1)
    parts = [torch.empty_like(fingerprint) for _ in plan.cross_group_ranks]
    with _collective(plan, f'check of the {what}', plan.cross_group_ranks):
        dist.all_gather(parts, fingerprint.contiguous(), group=plan.cross_group)
    parts = torch.stack(parts).cpu()
    differ = [r for r, p in zip(plan.cross_group_ranks, parts) if not torch.allclose(p, parts[plan.slot],
                                                                                      rtol=1e-6, atol=1e-6)]
    if differ:
        raise MemberParallelError(
            f'member-parallel: the {what} differs between rank {plan.rank} and rank(s) {differ} of its replica '
            f'(ranks {list(plan.cross_group_ranks)}): every rank of a replica must load the same samples (use '
            f'member_parallel_sampler / member_parallel_loader, not a DistributedSampler over all ranks) and draw '
            f'the same mixup (SharedRandomMixup). Fingerprints (shape..., sum, weighted sum): '
            f'{parts.tolist()}.')


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    shape = list(t.shape) + [0] * (5 - t.ndim)
    flat = t.detach().reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder_(97)
    return torch.cat([torch.tensor(shape[:5], dtype=torch.float64, device=flat.device),
                      torch.stack([flat.sum(), (flat * weights).sum()])])


# ----- autograd-aware gather of the member logits -----

class _GatherMembers(torch.autograd.Function):
    """All-gather [k, B, C] from the M ranks of the cross-member group into [M, k, B, C].

    Backward: 'local' returns this rank's slice of the output gradient (every rank computed the same loss), 'sum'
    all-reduces the output gradient first (the adjoint of the all-gather, for rank-dependent losses).
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, plan: MemberParallelPlan, reduce_grad: bool) -> torch.Tensor:
        ctx.plan = plan
        ctx.reduce_grad = reduce_grad
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in plan.cross_group_ranks]
        with _collective(plan, 'all-gather of the member logits', plan.cross_group_ranks):
            dist.all_gather(parts, local, group=plan.cross_group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        if ctx.reduce_grad:
            grad = grad.contiguous()
            with _collective(plan, 'all-reduce of the member logit gradients', plan.cross_group_ranks):
                dist.all_reduce(grad, group=plan.cross_group)
        return grad[plan.slot].contiguous(), None, None


def gather_member_logits(local: torch.Tensor, plan: MemberParallelPlan, grad_mode: str = 'local') -> torch.Tensor:
    """All member outputs [S, B, ...] in member order from this rank's members' outputs [k, B, ...].

    Every rank of the cross-member group receives all members' outputs; gradients flow back to the owned slice.

    Args:
        local: Outputs of `plan.members`, in that order, [k, B, ...]; the same shape on every rank.
        plan: The layout.
        grad_mode: 'local': every rank back-propagates the same loss (the full co-training loss) and keeps the
            gradient of its own slice, which is exactly the gradient of the single-process loss. 'sum': the
            gradients of all ranks are summed (the adjoint of an all-gather): back-propagate per rank only that
            rank's share of the loss (e.g. own CE terms + w * JS / M), otherwise the gradients are M times too large.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f'gather_member_logits: grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}.')
    plan.check_ready()
    if local.shape[0] != len(plan.members):
        raise ValueError(f'gather_member_logits: expected the outputs of {len(plan.members)} member(s) '
                         f'{list(plan.members)}, got {local.shape[0]}.')
    if plan.cross_group is None:
        return local  # this rank holds every member
    stacked = _GatherMembers.apply(local, plan, grad_mode == 'sum')  # [M, k, B, ...]; [j, l] is member j + l * M
    return stacked.transpose(0, 1).reshape(plan.split_factor, *local.shape[1:])


# ----- the model -----

def _member_index(key: str) -> Optional[int]:
    parts = key.split('.', 2)
    if len(parts) >= 2 and parts[0] == 'models' and parts[1].isdigit():
        return int(parts[1])
    return None


class MemberParallelSplitNet(nn.Module):
    """The members of a SplitNet that this rank owns, with the SplitNet forward over all members.

    Only the owned members are submodules (`models.{i}` for i in `plan.members`): they alone are moved to the
    device, run, receive gradients, appear in `parameters()` (optimizer, DDP, EMA) and in `state_dict()` (whose keys
    are the single-process keys of these members). Wrapping takes the SplitNet apart: its owned members move here,
    the others are released (moved to the meta device), and what is left is kept as a weightless skeleton for
    `to_splitnet` and for checking full state dicts. Build the SplitNet with the same seed on every rank to start
    from the weights a single-process run with that seed starts from.

    Forward (train and eval): `forward_members(x)` runs the owned members on their inputs and all-gathers the
    logits of all S members, [S, B, C] on every rank (a collective: every rank of the replica calls it with a batch
    of the same samples). `forward` returns them in train mode and their ensemble [B, C] in eval mode, like
    `SplitNet.forward`. The input is `[B, C, H, W]` (every member sees the same image), `[B, k*C, H, W]` (the views
    of the k owned members, in member order) or `[B, S*C, H, W]` (all views; each member takes its own).
    """

    def __init__(
            self,
            model: nn.Module,
            plan: MemberParallelPlan,
            device: Optional[Union[str, torch.device]] = None,
            grad_mode: str = 'local',
    ):
        """
        Args:
            model: A `SplitNet` (not wrapped); taken apart, see above.
            plan: The layout, with its groups created (`init_groups`).
            device: Device of the owned members (default: where they are).
            grad_mode: Backward of the logits gather (see `gather_member_logits`); 'local' for the co-training
                loss computed alike on every rank (`MemberParallelTask`).
        """
        super().__init__()
        if not (hasattr(model, 'models') and hasattr(model, 'split_factor') and hasattr(model, 'combine')):
            raise TypeError(f'MemberParallelSplitNet needs a SplitNet, got {type(model).__name__}.')
        if model.split_factor != plan.split_factor:
            raise ValueError(f'MemberParallelSplitNet: the model has S={model.split_factor} members but the plan is '
                             f'for S={plan.split_factor}.')
        if grad_mode not in GRAD_MODES:
            raise ValueError(f'MemberParallelSplitNet: grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}.')
        plan.check_ready()
        self.plan = plan
        self.grad_mode = grad_mode
        self.members = plan.members
        self.split_factor = model.split_factor
        self.member_name = model.member_name
        self.num_classes = model.num_classes
        self.in_chans = model.in_chans
        self.num_features = model.num_features
        self.head_hidden_size = getattr(model, 'head_hidden_size', model.num_features)
        self.ensemble = model.ensemble
        self.ensemble_softmax = model.ensemble_softmax
        self.grad_checkpointing = getattr(model, 'grad_checkpointing', False)
        for attr in ('pretrained_cfg', 'default_cfg', 'pretrained_cfg_overlay'):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

        # a CPU copy of one member: non-persistent buffers and structure for to_splitnet
        template = copy.deepcopy(model.models[self.members[0]]).cpu()
        owned = OrderedDict()
        for i in range(self.split_factor):
            member = model.models[i]
            if i in self.members:
                owned[str(i)] = member
                model.models[i] = copy.deepcopy(template).to('meta')
            else:
                model.models[i] = member.to('meta')
        model.set_split_backend('loop')
        self.models = nn.ModuleDict(owned)
        if device is not None:
            self.models.to(device)
        self._skeleton = [model]  # in lists: not submodules (no parameters, not in state_dict / .to())
        self._template = [template]
        self._checked_modes = set()

    # ----- configuration -----

    @property
    def owned(self) -> List[nn.Module]:
        """The owned member modules, in `members` order."""
        return [self.models[str(i)] for i in self.members]

    def describe(self) -> str:
        name = (getattr(self, 'pretrained_cfg', None) or {}).get('architecture') or f'SplitNet({self.member_name})'
        return f'{name} (S={self.split_factor}, {self.num_classes} classes), member-parallel {self.plan.describe()}'

    def set_ensemble(self, ensemble: str = 'mean', ensemble_softmax: bool = False) -> None:
        self._skeleton[0].set_ensemble(ensemble, ensemble_softmax)
        self.ensemble = ensemble
        self.ensemble_softmax = bool(ensemble_softmax)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return self._skeleton[0].group_matcher(coarse=coarse)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for m in self.owned:
            m.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = set()
        for i, m in zip(self.members, self.owned):
            if hasattr(m, 'no_weight_decay'):
                names.update(f'models.{i}.{n}' for n in m.no_weight_decay())
        return names

    @torch.jit.ignore
    def get_classifier(self) -> nn.ModuleList:
        return nn.ModuleList([m.get_classifier() for m in self.owned])

    # ----- forward -----

    def local_views(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The input of every owned member (see the class docstring for the accepted layouts)."""
        channels = x.shape[1] if x.ndim == 4 else None
        k = len(self.members)
        if channels == self.in_chans:
            return [x] * k
        if channels == self.in_chans * k:
            return list(x.chunk(k, dim=1))
        if channels == self.in_chans * self.split_factor:
            views = x.chunk(self.split_factor, dim=1)
            return [views[i] for i in self.members]
        raise ValueError(
            f'{self.describe()}: expected an input [B, {self.in_chans}, H, W] (every member sees the same image), '
            f'[B, {k * self.in_chans}, H, W] (the views of the {k} owned member(s)) or '
            f'[B, {self.split_factor * self.in_chans}, H, W] (all views), got {list(x.shape)}.')

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the owned members only, [k, B, C]; no communication."""
        return torch.stack([m(v) for m, v in zip(self.owned, self.local_views(x))])

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of all S members [S, B, C], on every rank (a collective over the replica's ranks)."""
        mode = 'train' if self.training else 'eval'
        if mode not in self._checked_modes and self.plan.cross_group is not None:
            # the first batch in each mode: same shapes everywhere; in eval (shared input) the same images too
            shared = x.ndim == 4 and x.shape[1] in (self.in_chans, self.split_factor * self.in_chans)
            fingerprint = _fingerprint(x) if shared and not self.training else _fingerprint(x)[:5]
            _check_same(self.plan, f'{mode} input batch', fingerprint)
            self._checked_modes.add(mode)
        return gather_member_logits(self.forward_local(x), self.plan, self.grad_mode)

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """Ensemble member outputs [S, B, C] into [B, C] the configured way (as `SplitNet.combine`)."""
        if self.ensemble_softmax:
            logits = logits.float().softmax(dim=-1)
        return logits.mean(0) if self.ensemble == 'mean' else logits.amax(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Train mode: member logits [S, B, C]. Eval mode: the ensemble [B, C]. Without classifier: features."""
        outs = self.forward_members(x)
        if self.num_classes == 0:
            return torch.cat(outs.unbind(0), dim=1)
        return outs if self.training else self.combine(outs)

    # ----- weights -----

    def check_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True, source: str = '') -> None:
        """Raise a ValueError naming both sides when `state_dict` is not a full state dict of this SplitNet."""
        self._skeleton[0].check_state_dict(state_dict, strict=strict, source=source)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load the owned members from a full SplitNet state dict (`models.{i}.*` for all i), or from one that
        holds exactly the owned members. A state dict of another (arch, S, num_classes) raises a clear error."""
        present = {_member_index(k) for k in state_dict}
        if present - set(self.members):
            self.check_state_dict(state_dict, strict=strict)
            state_dict = OrderedDict((k, v) for k, v in state_dict.items() if _member_index(k) in self.members)
        elif strict and set(state_dict) != set(self.state_dict()):
            self.check_state_dict(state_dict, strict=True)  # raises with both sides named
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def to_splitnet(self, state_dict: Dict[str, torch.Tensor], device: Union[str, torch.device] = 'cpu') -> nn.Module:
        """A full `SplitNet` on `device` holding `state_dict` (e.g. from `gather_state_dict`), for export / eval.

        The SplitNet has this model's pretrained cfg, ensemble settings and train / eval mode. No communication:
        call it where the gathered state dict is (rank 0).
        """
        model = copy.deepcopy(self._skeleton[0])  # members on the meta device: nothing is copied
        model.models = nn.ModuleList([copy.deepcopy(self._template[0]) for _ in range(self.split_factor)])
        model.set_split_backend('loop')
        model.set_ensemble(self.ensemble, self.ensemble_softmax)
        model.load_state_dict(state_dict)
        return model.to(device).train(self.training)

    def extra_repr(self) -> str:
        return f'{self.plan.describe()}, grad_mode={self.grad_mode}'


def _member_parallel(model: nn.Module) -> MemberParallelSplitNet:
    base = unwrap_model(model)
    if not isinstance(base, MemberParallelSplitNet):
        raise TypeError(f'Expected a MemberParallelSplitNet (possibly in DDP / EMA), got {type(base).__name__}.')
    return base


@torch.no_grad()
def member_parallel_forward(
        model: nn.Module,
        x: torch.Tensor,
        members: bool = False,
) -> torch.Tensor:
    """Inference over the processes (validate / benchmark): every rank of a replica runs its members on the same
    batch and receives all members' logits; returns the ensemble [B, C] (or the members [S, B, C]) on every rank.

    A collective: every rank of the replica calls it with the same batch (`member_parallel_loader(...,
    is_training=False)` gives every rank of a replica the same samples).
    """
    mp = _member_parallel(model)
    logits = mp.forward_members(x)
    return logits if members else mp.combine(logits)


# ----- data -----

class ViewKey(NamedTuple):
    """A sample index with the epoch whose views to draw (yielded by `MemberParallelSampler`)."""
    index: int
    epoch: int


_MASK64 = (1 << 64) - 1


def _view_seed(*values: int) -> int:
    """A 64-bit seed mixed from integers (SplitMix64 steps): different inputs give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state


@contextmanager
def _seeded_rngs(seed: int):
    """Seed Python's, NumPy's and torch's CPU RNGs for one view, then restore the caller's streams."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.random.default_generator.manual_seed(seed & ((1 << 63) - 1))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


class MemberViewDataset(MultiViewDataset):
    """The views of the members a rank owns, each drawn independently of the rank that computes it.

    Like `MultiViewDataset`, but the view of member i of sample j in epoch e runs the transform under Python,
    NumPy and torch (CPU) RNGs seeded from (seed, e, j, i): every rank draws the same view for member i whichever
    rank and loader worker compute it, different members get independent views, and the process's own random
    streams are left untouched. The epoch comes with the index from `MemberParallelSampler` (`ViewKey`), so it is
    right with persistent loader workers too; plain integer indices use `set_epoch`.

    Samples are `(tuple_of_views, target)` (one view per owned member, or one shared view with `same_view`), which
    timm's `fast_collate` / `collate_views` stack split-major as for `MultiViewDataset`.
    """

    def __init__(
            self,
            dataset: torch.utils.data.Dataset,
            members: Sequence[int],
            seed: int = 0,
            same_view: bool = False,
    ):
        """
        Args:
            dataset: Map-style dataset returning (image, target) with an untransformed image.
            members: Member indices whose views to return (`plan.members`), in member order.
            seed: Seed of the views (the run's seed; the same on every rank).
            same_view: One view per sample shared by all members (ablation): seeded by (seed, epoch, index) only.
        """
        members = tuple(int(m) for m in members)
        if not members:
            raise ValueError('MemberViewDataset needs at least one member.')
        super().__init__(dataset, num_views=1 if same_view else len(members))
        self.members = members
        self.seed = int(seed)
        self.same_view = same_view
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def view(self, img: Any, index: int, member: int, epoch: Optional[int] = None) -> Any:
        """The view of `member` (-1: the shared view) of sample `index`, drawn from its own seeded RNGs."""
        epoch = self.epoch if epoch is None else epoch
        with _seeded_rngs(_view_seed(self.seed, epoch, index, member)):
            return self._transform(img)

    def __getitem__(self, key: Union[int, ViewKey, Tuple[int, int]]) -> Tuple[Tuple[Any, ...], Any]:
        if isinstance(key, tuple):
            index, epoch = int(key[0]), int(key[1])
        else:
            index, epoch = int(key), self.epoch
        img, target = self.dataset[index][:2]
        members = (-1,) if self.same_view else self.members
        if self._transform is None:
            views = (img,) * len(members)
        else:
            views = tuple(self.view(img, index, m, epoch) for m in members)
        return views, target

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(members={list(self.members)}, seed={self.seed}, '
                f'same_view={self.same_view}, dataset={self.dataset!r})')


class MemberParallelSampler(torch.utils.data.DistributedSampler):
    """`DistributedSampler` over the replicas: every rank of a replica draws the same indices.

    `num_replicas` is the number of replicas R and `rank` the replica index, so the ranks of one replica (which
    together hold all S members) see the same samples and the replicas split the data set as DDP ranks do. With a
    `MemberViewDataset` the indices come as `ViewKey(index, epoch)`, which seeds the views of that epoch.
    """

    def __init__(
            self,
            dataset: torch.utils.data.Dataset,
            plan: MemberParallelPlan,
            shuffle: bool = True,
            seed: int = 0,
            drop_last: bool = False,
    ):
        super().__init__(
            dataset, num_replicas=plan.num_replicas, rank=plan.replica, shuffle=shuffle, seed=seed,
            drop_last=drop_last)
        self.view_keys = isinstance(dataset, MemberViewDataset)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(epoch)  # for a loader without workers or a re-created one

    def __iter__(self) -> Iterator[Union[int, ViewKey]]:
        if not self.view_keys:
            yield from super().__iter__()
            return
        epoch = self.epoch
        for index in super().__iter__():
            yield ViewKey(index, epoch)


def member_parallel_sampler(
        dataset: torch.utils.data.Dataset,
        plan: MemberParallelPlan,
        is_training: bool = True,
        seed: int = 0,
) -> Optional[torch.utils.data.Sampler]:
    """The sampler of a member-parallel loader: the same indices on the ranks of a replica, the replicas sharded.

    Training: a shuffling `MemberParallelSampler` (call `set_epoch` every epoch, as with `DistributedSampler`).
    Eval: timm's `OrderedDistributedSampler` over the replicas (None with one replica: sequential).
    """
    if is_training:
        return MemberParallelSampler(dataset, plan, shuffle=True, seed=seed)
    if plan.num_replicas > 1:
        return OrderedDistributedSampler(dataset, num_replicas=plan.num_replicas, rank=plan.replica)
    return None


def member_parallel_loader(loader, plan: MemberParallelPlan, is_training: bool = True, seed: int = 0):
    """Rebuild a loader from `timm.data.create_loader(..., distributed=False)` with `member_parallel_sampler`.

    The DataLoader is rebuilt with the same dataset, batch size, workers, collate function, worker init, pinning and
    `drop_last`; a timm `PrefetchLoader` keeps its normalisation and random erasing and gets the new DataLoader.
    """
    inner = getattr(loader, 'loader', loader)
    if not isinstance(inner, torch.utils.data.DataLoader):
        raise TypeError(f'member_parallel_loader expects a DataLoader or timm PrefetchLoader, got {type(loader)}.')
    if inner.batch_size is None:
        raise ValueError('member_parallel_loader: loaders with a custom batch sampler are not supported.')
    sampler = member_parallel_sampler(inner.dataset, plan, is_training=is_training, seed=seed)
    kwargs = dict(
        batch_size=inner.batch_size, sampler=sampler, shuffle=False, num_workers=inner.num_workers,
        collate_fn=inner.collate_fn, pin_memory=inner.pin_memory, drop_last=inner.drop_last, timeout=inner.timeout,
        worker_init_fn=inner.worker_init_fn, multiprocessing_context=inner.multiprocessing_context,
        generator=inner.generator, persistent_workers=inner.persistent_workers)
    if inner.num_workers > 0:
        kwargs['prefetch_factor'] = inner.prefetch_factor
    if getattr(inner, 'pin_memory_device', ''):
        kwargs['pin_memory_device'] = inner.pin_memory_device
    rebuilt = type(inner)(inner.dataset, **kwargs)
    if inner is loader:
        return rebuilt
    loader.loader = rebuilt
    return loader


class SharedRandomMixup:
    """A timm `Mixup` drawing from a private NumPy stream: the same draws on every rank that uses the same seed.

    timm's Mixup draws lambda, the mode and the CutMix box from NumPy's global RNG, which differs between ranks. The
    ranks of a replica mix different views (their members') of the same samples and must mix them alike: this
    wrapper swaps a private `RandomState` in for every call. Attributes are read from the wrapped Mixup
    (`mixup_enabled`, `num_classes`, ...); `state_dict` / `load_state_dict` checkpoint the stream.
    """

    def __init__(self, mixup_fn: Callable, seed: int = 0):
        self.mixup_fn = mixup_fn
        self.rng = np.random.RandomState(int(seed) & 0xFFFFFFFF)

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        saved = np.random.get_state()
        np.random.set_state(self.rng.get_state())
        try:
            return self.mixup_fn(x, target)
        finally:
            self.rng.set_state(np.random.get_state())
            np.random.set_state(saved)

    def __getattr__(self, name: str):
        mixup_fn = self.__dict__.get('mixup_fn')
        if mixup_fn is None:
            raise AttributeError(name)
        return getattr(mixup_fn, name)

    @property
    def mixup_enabled(self) -> bool:
        return getattr(self.mixup_fn, 'mixup_enabled', True)

    @mixup_enabled.setter
    def mixup_enabled(self, value: bool) -> None:
        self.mixup_fn.mixup_enabled = value

    def state_dict(self) -> Dict[str, Any]:
        name, keys, pos, has_gauss, cached = self.rng.get_state()
        return dict(name=name, keys=[int(k) for k in keys], pos=int(pos), has_gauss=int(has_gauss),
                    cached=float(cached))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rng.set_state((state['name'], np.asarray(state['keys'], dtype=np.uint32), state['pos'],
                            state['has_gauss'], state['cached']))


# ----- training task -----

class MemberParallelTask(CoTrainingTask):
    """`CoTrainingTask` for a `MemberParallelSplitNet`: the batch holds the views of the owned members only.

    `task(input, target)` takes the loader's split-major batch of this rank's views (`[k * B, C, H, W]`, or
    `[B, C, H, W]` with one shared view), mixes it with the shared mixup stream, runs the owned members, gathers all
    members' logits and returns the full co-training loss, identical on every rank and equal to the single-process
    loss (`loss`, `loss_ce`, `loss_cot`, `cot_weight`, `output`, `batch_size` as `CoTrainingTask`).
    `loss.backward()` gives every owned parameter the gradient of that loss (see `gather_member_logits`).

    The first `check_steps` batches are checked to hold the same samples and targets on every rank of the replica.
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
        """
        mp = _member_parallel(model)
        num_owned = len(mp.members)
        if num_views is None:
            num_views = num_owned
        if num_views not in (1, num_owned):
            raise ValueError(f'MemberParallelTask: num_views must be 1 (shared view) or the number of owned members '
                             f'({num_owned}), got {num_views}.')
        if mixup_fn is not None and not isinstance(mixup_fn, SharedRandomMixup):
            mixup_fn = SharedRandomMixup(mixup_fn, mixup_seed)
        super(CoTrainingTask, self).__init__(device=device, dtype=dtype, verbose=verbose)
        self.trainable_module = model
        self.criterion = criterion
        self.num_views = num_views
        self.mixup_fn = mixup_fn
        self.split_factor = mp.split_factor
        self.plan = mp.plan
        self.eval_members_fn: Optional[Callable] = None
        self.check_steps = check_steps
        if self.verbose:
            _logger.info(f'MemberParallelTask: {mp.plan.describe()}, {num_views} view(s) per sample, '
                         f'criterion={criterion}, mixup={"shared stream" if mixup_fn is not None else "off"}')

    def split_batch(self, input: torch.Tensor, target: torch.Tensor):
        input, target = super().split_batch(input, target)
        if self.check_steps > 0:
            self.check_steps -= 1
            _check_same(self.plan, 'batch targets (after mixup)', _fingerprint(target))
        return input, target

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'MemberParallelTask':
        """With replicas: DDP over the member group (gradients averaged among replicas of the same members only).
        Without replicas there is nothing to wrap: each member lives on one rank."""
        if self.plan.num_replicas > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.trainable_module = DDP(
                self.trainable_module, device_ids=device_ids, process_group=self.plan.member_group, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile every owned member in place (the gather stays eager; the state dict keys do not change)."""
        for m in _member_parallel(self.trainable_module).owned:
            m.compile(backend=backend, mode=mode, **compile_kwargs)
        return self.trainable_module

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


# ----- checkpoints -----

def _gather_objects(obj: Any, plan: MemberParallelPlan, dst: Optional[int], what: str) -> Optional[List[Any]]:
    if not plan.distributed:
        return [obj]
    plan.check_ready()
    ranks = range(plan.world_size)
    with _collective(plan, what, ranks):
        if dst is None:
            parts = [None] * plan.world_size
            dist.all_gather_object(parts, obj, group=plan.group)
            return parts
        parts = [None] * plan.world_size if plan.rank == dst else None
        dist.gather_object(obj, parts, dst=dst, group=plan.group)
    return parts


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def gather_state_dict(model: nn.Module, dst: Optional[int] = 0) -> Optional['OrderedDict[str, torch.Tensor]']:
    """The standard SplitNet state dict (`models.{i}.*` for every member, single-process key order, CPU tensors).

    A collective over all ranks (every rank calls it). Replica 0 contributes its members.

    Args:
        model: A MemberParallelSplitNet, possibly wrapped (DDP, torch.compile, EMA).
        dst: Rank that receives the state dict (None elsewhere), or None: every rank receives it.
    """
    mp = _member_parallel(model)
    local = None
    if mp.plan.replica == 0:
        local = OrderedDict((k, v.detach().cpu()) for k, v in mp.state_dict().items())
    parts = _gather_objects(local, mp.plan, dst, 'gather of the state dict')
    if parts is None:
        return None
    per_member: Dict[int, 'OrderedDict[str, torch.Tensor]'] = {}
    for part in parts:
        for k, v in (part or {}).items():
            per_member.setdefault(_member_index(k), OrderedDict())[k] = v
    missing = [i for i in range(mp.split_factor) if i not in per_member]
    if missing:
        raise MemberParallelError(f'gather_state_dict: no rank sent member(s) {missing}.')
    return OrderedDict((k, v) for i in range(mp.split_factor) for k, v in per_member[i].items())


def _named_param_groups(optimizer: torch.optim.Optimizer, mp: MemberParallelSplitNet) -> List[List[str]]:
    names = {id(p): n for n, p in mp.named_parameters()}
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        try:
            groups.append([names[id(p)] for p in group['params']])
        except KeyError:
            raise ValueError(f'param group {g} of the optimizer holds parameters that are not the owned members\' '
                             f'parameters of the member-parallel model.') from None
    return groups


def gather_optimizer_state_dict(
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        dst: Optional[int] = 0,
) -> Optional[Dict[str, Any]]:
    """The state dict that a single-process optimizer over the full SplitNet would have.

    Rule: the single-process optimizer has the same param groups (e.g. timm's no-decay / decay groups, or layer-decay
    groups) and lists the parameters of each group member-major, in the order of `named_parameters()` (what
    `timm.optim.create_optimizer_v2` builds). The member-parallel optimizer of a rank has the same groups over its
    own members. Group g of the result lists member 0's group-g parameters, then member 1's, ..., with the indices
    `torch.optim.Optimizer.state_dict` would give them; per-parameter state (momentum, Adam moments, step) moves
    along, hyper-parameters (lr, initial_lr, ...) are rank 0's. A collective over all ranks.

    Args:
        optimizer: Optimizer over the owned parameters of `model`.
        model: The MemberParallelSplitNet (possibly wrapped).
        dst: Rank that receives the result (None elsewhere), or None for every rank.
    """
    mp = _member_parallel(model)
    local = None
    if mp.plan.replica == 0:
        state_dict = optimizer.state_dict()
        names = _named_param_groups(optimizer, mp)
        index_name = {idx: name for group, group_names in zip(state_dict['param_groups'], names)
                      for idx, name in zip(group['params'], group_names)}
        local = dict(
            state={index_name[idx]: _cpu(s) for idx, s in state_dict['state'].items()},
            groups=[{k: v for k, v in g.items() if k not in ('params', 'param_names')}
                    for g in state_dict['param_groups']],
            param_names=['param_names' in g for g in state_dict['param_groups']],
            names=names)
    parts = _gather_objects(local, mp.plan, dst, 'gather of the optimizer state')
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    num_groups = len(parts[0]['groups'])
    if any(len(p['groups']) != num_groups for p in parts):
        raise ValueError('gather_optimizer_state_dict: the ranks\' optimizers have different numbers of param '
                         f'groups: {[len(p["groups"]) for p in parts]}.')
    state, param_groups, index = {}, [], 0
    for g in range(num_groups):
        per_member: Dict[int, List[str]] = {}
        for part in parts:
            for name in part['names'][g]:
                per_member.setdefault(_member_index(name), []).append(name)
        group_names = [n for i in sorted(per_member) for n in per_member[i]]
        group = dict(parts[0]['groups'][g], params=list(range(index, index + len(group_names))))
        if parts[0]['param_names'][g]:
            group['param_names'] = group_names
        name_index = dict(zip(group_names, group['params']))
        for part in parts:
            for name, s in part['state'].items():
                if name in name_index:
                    state[name_index[name]] = s
        param_groups.append(group)
        index += len(group_names)
    return {'state': dict(sorted(state.items())), 'param_groups': param_groups}


def load_optimizer_state_dict(
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        state_dict: Dict[str, Any],
) -> None:
    """Load a single-process optimizer state dict (over the full SplitNet) into this rank's optimizer.

    The inverse of `gather_optimizer_state_dict` under the same rule; every member of a SplitNet has the same
    parameters, so each group holds S x (one member's count) parameters, member-major. No communication.

    Raises:
        ValueError: The state dict has other param groups or group sizes (another model or optimizer setup).
    """
    mp = _member_parallel(model)
    own_groups = _named_param_groups(optimizer, mp)
    saved_groups = state_dict['param_groups']
    if len(saved_groups) != len(own_groups):
        raise ValueError(
            f'load_optimizer_state_dict: the saved optimizer has {len(saved_groups)} param group(s), this optimizer '
            f'{len(own_groups)}: it was built for another model or optimizer setup.')
    saved_state = state_dict['state']
    new_state, new_groups, own_index = {}, [], 0
    for g, (saved, names) in enumerate(zip(saved_groups, own_groups)):
        per_member: Dict[int, List[str]] = {}
        for name in names:
            per_member.setdefault(_member_index(name), []).append(name)
        counts = {len(v) for v in per_member.values()}
        if len(counts) > 1:
            raise ValueError(f'load_optimizer_state_dict: the owned members have different parameter counts in '
                             f'param group {g}: {counts}.')
        count = counts.pop() if counts else 0
        if len(saved['params']) != mp.split_factor * count:
            raise ValueError(
                f'load_optimizer_state_dict: param group {g} of the saved optimizer holds {len(saved["params"])} '
                f'parameters, a SplitNet of S={mp.split_factor} members with this setup has '
                f'{mp.split_factor} x {count}: the state dict is of another model or optimizer setup.')
        ids = []
        for name in names:
            member = _member_index(name)
            full_idx = saved['params'][member * count + per_member[member].index(name)]
            if full_idx in saved_state:
                new_state[own_index] = saved_state[full_idx]
            ids.append(own_index)
            own_index += 1
        group = {k: v for k, v in saved.items() if k not in ('params', 'param_names')}
        group['params'] = ids
        if 'param_names' in saved:
            group['param_names'] = names
        new_groups.append(group)
    optimizer.load_state_dict({'state': new_state, 'param_groups': new_groups})


# ----- BN, gradient clipping -----

def convert_member_sync_batchnorm(model: nn.Module, plan: MemberParallelPlan) -> nn.Module:
    """SyncBatchNorm among the replicas of the same members (`--sync-bn`): batch statistics are never shared
    between different members. Without replicas every member's BN already sees its whole batch: unchanged.
    SyncBatchNorm runs on GPUs (and XPU / HPU) only."""
    if plan.num_replicas == 1:
        return model
    from timm.layers import convert_sync_batchnorm  # keeps timm's BatchNormAct2d activation (torch's drops it)
    return convert_sync_batchnorm(model, process_group=plan.member_group)


def distribute_member_bn(model: nn.Module, plan: MemberParallelPlan, reduce: bool = True) -> None:
    """timm's `distribute_bn` restricted to the member group: average (`reduce`) or broadcast from the first
    replica the BN running statistics of the replicas of each member. Nothing to do without replicas."""
    if plan.num_replicas == 1:
        return
    mp = _member_parallel(model)
    with _collective(plan, 'BN statistics sync', plan.member_group_ranks):
        for name, buf in mp.named_buffers(recurse=True):
            if 'running_mean' in name or 'running_var' in name:
                if reduce:
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=plan.member_group)
                    buf /= float(plan.num_replicas)
                else:
                    dist.broadcast(buf, plan.member_group_ranks[0], group=plan.member_group)


def clip_grad(model: nn.Module, value: float, mode: str = 'norm', norm_type: float = 2.0) -> Optional[torch.Tensor]:
    """timm's `dispatch_clip_grad` for a member-parallel model, equal to clipping the single-process SplitNet.

    'norm' clips by the total norm over *all* members' gradients (the squared norms are summed over the replica's
    ranks; replicas hold averaged, identical gradients), returning that norm; 'value' and 'agc' are per element /
    per parameter, hence local. Call it on every rank (with 'norm' it is a collective), after backward (and after
    `GradScaler.unscale_`).
    """
    mp = _member_parallel(model)
    params = [p for p in mp.parameters() if p.grad is not None]
    if mode == 'value':
        torch.nn.utils.clip_grad_value_(params, value)
        return None
    if mode == 'agc':
        from timm.utils import adaptive_clip_grad
        adaptive_clip_grad(params, value, norm_type=norm_type)
        return None
    if mode != 'norm':
        raise ValueError(f'clip_grad: unknown mode {mode!r}, expected norm, value or agc.')
    device = params[0].grad.device if params else torch.device('cpu')
    if math.isinf(norm_type):
        local = torch.stack([p.grad.detach().abs().max().float() for p in params]).max() if params else \
            torch.zeros((), device=device)
        op = dist.ReduceOp.MAX
    else:
        local = torch.stack([p.grad.detach().float().norm(norm_type) ** norm_type for p in params]).sum() \
            if params else torch.zeros((), device=device)
        op = dist.ReduceOp.SUM
    if mp.plan.cross_group is not None:
        with _collective(mp.plan, 'all-reduce of the gradient norm', mp.plan.cross_group_ranks):
            dist.all_reduce(local, op=op, group=mp.plan.cross_group)
    total = local if math.isinf(norm_type) else local ** (1. / norm_type)
    coef = (value / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return total


# ----- process group setup for scripts -----

def init_distributed_from_env(
        device: Optional[str] = None,
        backend: Optional[str] = None,
        timeout: Union[None, float, timedelta] = None,
) -> torch.device:
    """Initialise the default process group from torchrun's environment (if not done yet), with `timeout`.

    Without torchrun (or with WORLD_SIZE=1) no process group is created.

    Args:
        device: 'cuda' (one GPU per process: cuda:LOCAL_RANK), 'cpu', or None (cuda if available).
        backend: nccl on CUDA, gloo otherwise, unless given.
        timeout: Timeout of the default group's collectives (seconds or timedelta, default 10 minutes).

    Returns:
        This process's device.
    """
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if torch.device(device).type == 'cuda':
        dev = torch.device('cuda', local_rank if torch.device(device).index is None else torch.device(device).index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        if int(os.environ.get('WORLD_SIZE', 1)) > 1:
            backend = backend or ('nccl' if dev.type == 'cuda' else 'gloo')
            dist.init_process_group(backend=backend, timeout=_timedelta(timeout))
    return dev


def init_member_parallel(
        split_factor: int,
        device: Optional[str] = None,
        backend: Optional[str] = None,
        timeout: Union[None, float, timedelta] = None,
) -> Tuple[MemberParallelPlan, torch.device]:
    """Initialise the default process group from torchrun's environment (if not done yet) and create the plan.

    For scripts without timm's `init_distributed_device` (validate.py, benchmark.py). The default group and the
    member-parallel groups get `timeout`.

    Args:
        split_factor: S.
        device: 'cuda' (one GPU per process: cuda:LOCAL_RANK), 'cpu', or None (cuda if available).
        backend: nccl on CUDA, gloo otherwise, unless given.
        timeout: Collective timeout (seconds or timedelta, default 10 minutes).

    Returns:
        (plan, device).
    """
    dev = init_distributed_from_env(device, backend=backend, timeout=timeout)
    plan = MemberParallelPlan.from_process_group(split_factor, timeout)
    return plan, dev
