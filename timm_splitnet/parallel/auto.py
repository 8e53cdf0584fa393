""" The 'auto' split backend: the fastest of loop / packed / vmap, chosen by a short timed trial

The choice is cached per process and per (members, device, dtype, input shape, mode); the trial leaves the members'
state (BN statistics, RNG, .grad) untouched. `clear_auto_cache` forgets the choices.
"""
import logging
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..models._backends import (
    SPLIT_BACKENDS, SplitBackend, is_shared_input, members_label, register_split_backend,
)
from . import packed as _packed  # noqa: F401 (registers 'packed')
from . import vmap as _vmap  # noqa: F401 (registers 'vmap')

__all__ = ['AutoBackend', 'clear_auto_cache']

_logger = logging.getLogger(__name__)

_AUTO_CHOICES: Dict[tuple, str] = {}
_AUTO_CANDIDATES = ('loop', 'packed', 'vmap')


def clear_auto_cache() -> None:
    """Forget the process-wide choices of the 'auto' backend."""
    _AUTO_CHOICES.clear()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # older torch: device-less autocast queries
        if device_type == 'cuda' and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype


def _arch_key(members: Sequence[nn.Module]) -> tuple:
    """(member architecture, member parameter count, S)."""
    return members_label(members), sum(p.numel() for p in members[0].parameters()), len(members)


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@register_split_backend('auto')
class AutoBackend(SplitBackend):
    """The fastest supported backend for the device, dtype and input shape, chosen by a short timed trial.

    The trial runs a few train steps (forward + backward, gradients taken with torch.autograd.grad so .grad is not
    touched) or eval forwards of every candidate on the real members; BN buffers and the RNG state are restored
    afterwards. Choices are cached per process (`clear_auto_cache` forgets them).
    """
    warmup_steps = 1
    timed_steps = 3

    def __init__(self):
        self._backends: Dict[str, SplitBackend] = {n: SPLIT_BACKENDS[n]() for n in _AUTO_CANDIDATES}
        self._arch: Optional[Tuple[weakref.ref, int, tuple]] = None  # (members identity, S, arch key)
        self.last_choice: Optional[str] = None
        self.last_timings: Dict[str, float] = {}

    def __getstate__(self) -> Dict[str, Any]:
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()

    def key(self, members: Sequence[nn.Module], views: List[torch.Tensor]) -> tuple:
        """The trial's cache key: (member arch, member params, S, device type, compute dtype, input shape, shared,
        channels_last, train, grad enabled)."""
        owner = members if isinstance(members, nn.Module) else members[0]
        if self._arch is None or self._arch[0]() is not owner or self._arch[1] != len(members):
            self._arch = (weakref.ref(owner), len(members), _arch_key(members))
        x = views[0]
        return self._arch[2] + (
            x.device.type, _compute_dtype(x), tuple(x.shape), is_shared_input(views),
            x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last), members[0].training,
            torch.is_grad_enabled())

    def forward_members(self, members: Sequence[nn.Module], views: List[torch.Tensor]) -> torch.Tensor:
        choice = self.choose(members, views)
        return self._backends[choice].forward_members(members, views)

    def candidates(self, members: Sequence[nn.Module], views: List[torch.Tensor]) -> List[str]:
        """'loop' and the other backends that support these members and inputs."""
        return ['loop'] + [n for n in ('packed', 'vmap') if self._backends[n].supports(members, views)]

    def choose(self, members: Sequence[nn.Module], views: List[torch.Tensor]) -> str:
        """The backend for these inputs (runs the trial the first time a key is seen in this process)."""
        key = self.key(members, views)
        choice = _AUTO_CHOICES.get(key)
        if choice is None:
            names = self.candidates(members, views)
            if len(names) == 1:
                choice, self.last_timings = names[0], {}
            else:
                self.last_timings = self._trial(members, views, names)
                choice = min(self.last_timings, key=self.last_timings.get)
                training = members[0].training
                if training and _distributed_world() > 1:
                    # every rank must run the same backend in train mode (SyncBatchNorm collectives): rank 0 decides
                    decision = [choice]
                    device = views[0].device if views[0].device.type == 'cuda' else None
                    torch.distributed.broadcast_object_list(decision, src=0, device=device)
                    choice = decision[0]
                timings = ', '.join(f'{n} {t * 1e3:.2f} ms' for n, t in self.last_timings.items())
                _logger.info(
                    f"SplitNet 'auto' backend: {members_label(members)} on {views[0].device.type} "
                    f"{_compute_dtype(views[0])} input {list(views[0].shape)} "
                    f"{'train' if training else 'eval'}: {timings} -> {choice}.")
            _AUTO_CHOICES[key] = choice
        self.last_choice = choice
        return choice

    def _trial(self, members: Sequence[nn.Module], views: List[torch.Tensor], names: List[str]) -> Dict[str, float]:
        """Median time of a train step (or eval forward) of every candidate; restores BN buffers and the RNG."""
        device = views[0].device
        views = [v.detach() for v in views] if not is_shared_input(views) else [views[0].detach()] * len(views)
        params = [p for m in members for p in m.parameters() if p.requires_grad]
        backward = members[0].training and torch.is_grad_enabled() and bool(params)
        buffers = [b for m in members for b in m.buffers()]
        saved = [b.detach().clone() for b in buffers]
        devices = [device] if device.type == 'cuda' else []
        timings = {}
        try:
            with torch.random.fork_rng(devices=devices):
                for name in names:
                    def step(backend: SplitBackend = self._backends[name]) -> None:
                        out = backend.forward_members(members, views)
                        if backward:
                            torch.autograd.grad(out.float().sum(), params, allow_unused=True)

                    for _ in range(self.warmup_steps):
                        step()
                    times = []
                    for _ in range(self.timed_steps):
                        _synchronize(device)
                        start = time.perf_counter()
                        step()
                        _synchronize(device)
                        times.append(time.perf_counter() - start)
                    timings[name] = sorted(times)[len(times) // 2]
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
        return timings
