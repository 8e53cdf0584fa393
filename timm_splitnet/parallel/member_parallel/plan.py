""" Member-parallel layout: which members a rank owns, and the process groups between the ranks """
from datetime import timedelta
from typing import Optional, Tuple, Union

import torch.distributed as dist

__all__ = ['MemberParallelPlan', 'MemberParallelError', 'DEFAULT_TIMEOUT', 'GRAD_MODES', 'valid_world_sizes',
           'as_timedelta']

DEFAULT_TIMEOUT = timedelta(minutes=10)
GRAD_MODES = ('local', 'sum')  # backward of the logits gather, see `gather_member_logits`


class MemberParallelError(RuntimeError):
    """A member-parallel collective failed (a peer rank died, stalled past the timeout, or sent another batch)."""


def as_timedelta(timeout: Union[None, float, timedelta]) -> timedelta:
    """A collective timeout as a timedelta: seconds, a timedelta, or None for `DEFAULT_TIMEOUT`."""
    if timeout is None:
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))


def valid_world_sizes(split_factor: int, max_replicas: int = 4) -> Tuple[int, ...]:
    """World sizes that fit S members: the divisors of S and the multiples S x R (R <= max_replicas shown)."""
    divisors = [n for n in range(1, split_factor + 1) if split_factor % n == 0]
    return tuple(divisors + [split_factor * r for r in range(2, max_replicas + 1)])


class MemberParallelPlan:
    """Which members a rank owns and the process groups between ranks (see docs/member_parallel.md).

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
        self.timeout = as_timedelta(timeout)
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
