""" Training loaders that can start an epoch at any batch, with the data order and random draws of an unbroken run

`make_resumable` rebuilds the DataLoader of a timm loader (`create_loader`, with or without its PrefetchLoader) so
that the epoch's sample order and the loader workers' seeds come from a generator seeded by (seed, epoch, rank)
instead of the process's global stream, and so that the host random state is recorded before every batch is fetched.
`loader_position_state` / `restore_loader_position` carry a mid-epoch checkpoint's position over to the next run.
See docs/training.md ("Preemption, auto-resume and faults").
"""
import itertools
import re
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple

import torch
import torch.utils.data

from ..utils.train_state import get_rng_state, set_rng_state
from .device_views import DeviceViewLoader

__all__ = [
    'ResumableSampler', 'ResumableDataLoader', 'make_resumable', 'find_data_loader', 'loader_position_state',
    'restore_loader_position', 'loader_seed', 'describe_worker_failure',
]

_MASK63 = (1 << 63) - 1


def loader_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of the loader generator of one epoch of one process (distinct for every seed, epoch and rank)."""
    state = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(rank) * 0x94D049BB133111EB)
    state &= _MASK63
    state ^= state >> 31
    return (state * 0xD6E8FEB86659FD93) & _MASK63


class ResumableSampler(torch.utils.data.Sampler):
    """A training sampler whose epochs are seeded and whose next pass can start later in the epoch.

    Wraps the loader's sampler (a `RandomSampler` drawing from the loader's generator, a `DistributedSampler`, ...).
    `set_epoch(e)` seeds the shared generator for epoch e (and calls the wrapped sampler's `set_epoch`); `skip(n)`
    makes the next pass leave out its first n indices (the order is still drawn in full, so it is the epoch's
    order) and `len()` count only the rest until that pass starts.
    """

    def __init__(self, sampler: torch.utils.data.Sampler, generator: torch.Generator, seed: int = 0, rank: int = 0):
        self.sampler = sampler
        self.generator = generator
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self._skip = 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.generator.manual_seed(loader_seed(self.seed, self.epoch, self.rank))
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def skip(self, num_samples: int) -> None:
        self._skip = max(0, int(num_samples))

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self._skip)

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        return itertools.islice(iter(self.sampler), skip, None)


class _RecordingIterator:
    """The DataLoader's iterator, with the host random state recorded (or replayed) before every batch it fetches."""

    def __init__(self, iterator: Iterator[Any], loader: 'ResumableDataLoader', replay: List[Dict[str, Any]],
                 resume_state: Optional[Dict[str, Any]]):
        self.iterator = iterator
        self.loader = loader
        self.replay = replay
        self.resume_state = resume_state

    def __iter__(self) -> '_RecordingIterator':
        return self

    def __len__(self) -> int:
        return len(self.iterator)

    def __next__(self) -> Any:
        if self.replay:  # a batch the checkpointed run had fetched ahead: fetch it with the draws it had
            set_rng_state(self.replay.pop(0))
        elif self.resume_state is not None:  # then continue with the state of the checkpoint
            set_rng_state(self.resume_state)
            self.resume_state = None
        loader = self.loader
        state = get_rng_state()
        batch = next(self.iterator)
        loader._fetch_states.append((loader._fetched, state))
        loader._fetched += 1
        return batch


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A `DataLoader` (built by `make_resumable`) that can start its next pass at a batch of the epoch.

    Before every batch it fetches it records the host random state, so that a checkpoint can replay the batches a
    consumer had fetched ahead (timm's PrefetchLoader holds one) with the draws they had.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fetched = 0  # batches of the epoch fetched so far (counting a skipped start)
        self._fetch_states: Deque[Tuple[int, Dict[str, Any]]] = deque(maxlen=8)
        self._replay: List[Dict[str, Any]] = []
        self._resume_state: Optional[Dict[str, Any]] = None
        self._start = 0

    @property
    def resumable_sampler(self) -> ResumableSampler:
        return self.sampler

    def start_at(
            self,
            batch: int,
            replay: Optional[List[Dict[str, Any]]] = None,
            resume_state: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Make the next pass start at `batch`; with `replay`, fetch its first batches under those host random states
        and switch to `resume_state` after them."""
        self.sampler.skip(batch * self.batch_size)
        self._start = batch
        self._replay = list(replay or [])
        self._resume_state = resume_state if self._replay else None

    def __iter__(self) -> Iterator[Any]:
        self._fetched = self._start
        self._start = 0
        self._fetch_states.clear()
        replay, self._replay = self._replay, []
        resume_state, self._resume_state = self._resume_state, None
        return _RecordingIterator(super().__iter__(), self, replay, resume_state)

    def states_ahead(self, consumed: int) -> List[Dict[str, Any]]:
        """Host random states recorded before the batches fetched beyond the first `consumed` of the epoch."""
        return [state for index, state in self._fetch_states if index >= consumed]


def find_data_loader(loader: Any) -> Optional[torch.utils.data.DataLoader]:
    """The torch DataLoader inside a timm PrefetchLoader / DeviceViewLoader (or the loader itself)."""
    for _ in range(4):
        if isinstance(loader, torch.utils.data.DataLoader):
            return loader
        loader = getattr(loader, 'loader', None)
    return None


def make_resumable(loader: Any, seed: int = 0, rank: int = 0) -> Any:
    """Rebuild the training DataLoader inside `loader` as a `ResumableDataLoader` (returns `loader`, or the new
    DataLoader when `loader` is one).

    A shuffling `RandomSampler` draws from the loader's generator, seeded per epoch by `set_epoch`; other samplers
    (`DistributedSampler`, timm's `RepeatAugSampler`, the member-parallel sampler) keep their own order and are
    wrapped. Loaders over iterable data sets, with a custom batch sampler, or timm's MultiEpochsDataLoader are
    returned unchanged (they cannot start mid-epoch: see `restore_loader_position`).
    """
    inner = find_data_loader(loader)
    if (inner is None or isinstance(inner, ResumableDataLoader) or type(inner) is not torch.utils.data.DataLoader
            or isinstance(inner.dataset, torch.utils.data.IterableDataset) or inner.batch_size is None):
        return loader
    generator = torch.Generator()
    sampler = inner.sampler
    if isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
        sampler = torch.utils.data.RandomSampler(
            inner.dataset, replacement=sampler.replacement, num_samples=sampler._num_samples, generator=generator)
    kwargs = dict(
        batch_size=inner.batch_size, sampler=ResumableSampler(sampler, generator, seed, rank), shuffle=False,
        num_workers=inner.num_workers, collate_fn=inner.collate_fn, pin_memory=inner.pin_memory,
        drop_last=inner.drop_last, timeout=inner.timeout, worker_init_fn=inner.worker_init_fn,
        multiprocessing_context=inner.multiprocessing_context, generator=generator,
        persistent_workers=inner.persistent_workers)
    if inner.num_workers > 0:
        kwargs['prefetch_factor'] = inner.prefetch_factor
    if getattr(inner, 'pin_memory_device', ''):
        kwargs['pin_memory_device'] = inner.pin_memory_device
    rebuilt = ResumableDataLoader(inner.dataset, **kwargs)
    if inner is loader:
        return rebuilt
    holder = loader
    while holder.loader is not inner:
        holder = holder.loader
    holder.loader = rebuilt
    return loader


def loader_position_state(loader: Any, consumed: int) -> Dict[str, Any]:
    """This process's part of a mid-epoch checkpoint's position, after `consumed` batches of the epoch were trained:
    the host random states of the batches fetched ahead, and the device-view generators (`--views-on-device`)."""
    state: Dict[str, Any] = {}
    inner = find_data_loader(loader)
    if isinstance(inner, ResumableDataLoader):
        state['replay'] = inner.states_ahead(consumed)
    if isinstance(loader, DeviceViewLoader):
        state['device_views'] = loader.augment.state_dict()
    return state


def restore_loader_position(
        loader: Any,
        batch: int,
        state: Optional[Dict[str, Any]] = None,
        resume_state: Optional[Dict[str, Any]] = None,
) -> bool:
    """Make the next pass over `loader` (its epoch set already) continue after `batch` batches.

    Args:
        loader: A loader from `make_resumable`.
        batch: Batches of the epoch already trained.
        state: This process's `loader_position_state` from the checkpoint.
        resume_state: The host random state of the checkpoint (restored after the replayed batches are fetched).

    Returns:
        False when the loader cannot start mid-epoch (iterable data set, custom batch sampler): its next pass starts
        at the beginning of its data and the caller stops it after the epoch's remaining batches.
    """
    state = state or {}
    if isinstance(loader, DeviceViewLoader) and state.get('device_views'):
        loader.augment.load_state_dict(state['device_views'])
    inner = find_data_loader(loader)
    if not isinstance(inner, ResumableDataLoader):
        return False
    inner.start_at(batch, state.get('replay'), resume_state)
    return True


_WORKER_KILLED = re.compile(r'DataLoader worker \(pid[^)]*?(\d+)\) is killed by signal: ([\w ]+)')
_WORKER_EXITED = re.compile(r'DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly')


def describe_worker_failure(error: BaseException) -> Optional[str]:
    """A clear message for a loader worker that died (killed by the OOM killer, crashed), None for other errors."""
    text = str(error)
    killed, exited = _WORKER_KILLED.search(text), _WORKER_EXITED.search(text)
    if killed is None and exited is None:
        return None
    if killed is not None:
        what = f'data loader worker (pid {killed[1]}) was killed by signal {killed[2].strip()}'
    else:
        what = f'data loader worker (pid {exited[1].strip()}) exited unexpectedly'
    cause = ('most likely by the kernel\'s out-of-memory killer (see `dmesg`)'
             if 'kill' in text.lower() or exited is not None else 'it crashed')
    return (f'a {what}, {cause}. To use less host memory: fewer workers (-j/--workers), a smaller --batch-size, '
            f'no --pin-mem, or a larger memory limit for the job')
