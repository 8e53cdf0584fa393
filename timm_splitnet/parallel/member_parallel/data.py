""" Member-parallel data: per-member seeded views, the replica sampler and loader, mixup drawn alike on every rank """
import random
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.utils.data

from timm.data.distributed_sampler import OrderedDistributedSampler

from ...data.views import MultiViewDataset
from .plan import MemberParallelPlan

__all__ = [
    'ViewKey', 'MemberViewDataset', 'MemberParallelSampler', 'member_parallel_sampler', 'member_parallel_loader',
    'SharedRandomMixup',
]


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
        super().__init__(dataset, num_views=1 if same_view else len(members), same_view=same_view)
        self.members = members
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def view(self, img: Any, index: int, member: int, epoch: Optional[int] = None) -> Any:
        """The view of `member` (-1: the shared view) of sample `index`, drawn from its own seeded RNGs."""
        epoch = self.epoch if epoch is None else epoch
        with _seeded_rngs(_view_seed(self.seed, epoch, index, member)):
            return self.transform(img)

    def __getitem__(self, key: Union[int, ViewKey, Tuple[int, int]]) -> Tuple[Tuple[Any, ...], Any]:
        if isinstance(key, tuple):
            index, epoch = int(key[0]), int(key[1])
        else:
            index, epoch = int(key), self.epoch
        img, target = self.dataset[index][:2]
        members = (-1,) if self.same_view else self.members
        if self.transform is None:
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

