""" Stopping a run cleanly: preemption signals, a wall-clock budget, and one stop decision shared by all ranks

`PreemptionGuard` records the signals a cluster sends before it kills a job (SIGTERM, SIGUSR1) and watches a time
budget; `poll()` at every optimizer step turns that into a decision every process takes at the same step. See
docs/training.md ("Preemption, auto-resume and faults").
"""
import logging
import os
import re
import signal
import threading
import time
from datetime import timedelta
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

__all__ = [
    'PREEMPTED_EXIT_CODE', 'PreemptionGuard', 'parse_signals', 'parse_duration', 'format_duration', 'agree_all',
]

_logger = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL: "temporary failure, try again". The run checkpointed and stopped before its last epoch;
# the same command with `--resume auto` continues it (SLURM: requeue the job; torchrun: a restart does it).
PREEMPTED_EXIT_CODE = 75

_DURATION = re.compile(r'^(?:(?P<days>\d+)-)?(?P<hours>\d+):(?P<minutes>[0-5]?\d):(?P<seconds>[0-5]?\d(?:\.\d*)?)$')


def parse_signals(names: Union[str, Sequence[str]]) -> Tuple[signal.Signals, ...]:
    """Signals from names ('TERM', 'SIGUSR1', 'usr2') or numbers; 'none' (or nothing) gives an empty tuple.

    Raises:
        ValueError: An unknown signal, or one that cannot be caught (SIGKILL, SIGSTOP).
    """
    if isinstance(names, str):
        names = names.replace(',', ' ').split()
    found = []
    for name in names:
        text = str(name).strip().upper()
        if text in ('', 'NONE'):
            continue
        try:
            sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[
                text if text.startswith('SIG') else 'SIG' + text]
        except (KeyError, ValueError):
            raise ValueError(f'unknown signal {name!r}: expected a name such as TERM, USR1, USR2, INT or a '
                             f'number.') from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f'{sig.name} cannot be caught; a process cannot checkpoint on it.')
        if sig not in found:
            found.append(sig)
    return tuple(found)


def parse_duration(text: str) -> float:
    """Seconds of a wall-clock duration written `HH:MM:SS` or `D-HH:MM:SS` (SLURM's notation).

    Raises:
        ValueError: Any other form, or a duration of zero.
    """
    match = _DURATION.match(str(text).strip())
    if match is None:
        raise ValueError(f'{text!r} is not a duration: expected HH:MM:SS or D-HH:MM:SS, e.g. 23:50:00.')
    seconds = (int(match['days'] or 0) * 86400 + int(match['hours']) * 3600 + int(match['minutes']) * 60 +
               float(match['seconds']))
    if seconds <= 0:
        raise ValueError(f'{text!r}: the duration must be longer than zero.')
    return seconds


def format_duration(seconds: float) -> str:
    """`H:MM:SS` of a number of seconds (rounded down)."""
    seconds = max(0, int(seconds))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def agree_all(ok: bool, distributed: bool = False, device: Optional[torch.device] = None) -> bool:
    """True when `ok` holds on every rank (a collective: every rank calls it at the same point)."""
    if not distributed:
        return bool(ok)
    flag = torch.tensor([1. if ok else 0.], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


class PreemptionGuard:
    """One stop decision, taken by every rank at the same step, from preemption signals and a time budget.

    Used as a context manager: on entry the handlers of `signals` are installed (they only record the signal; the
    training loop decides when to stop), on exit the previous handlers come back. A second signal while the run is
    already stopping (e.g. during the checkpoint write) is recorded and otherwise ignored.

    `poll()` is called by every rank after every optimizer step. Alone, it answers at once. Distributed, it starts a
    non-blocking all-reduce (MAX) of this rank's flags and returns the result of the previous step's all-reduce, so
    the wait is hidden and the decision comes one step late, but on every rank at the same step; a rank that alone
    got the signal stops the others with it. `agree()` is the blocking variant for the points between epochs. The
    collectives run on a gloo group of their own (CPU tensors, no device synchronisation).

    The budget (`max_time` seconds from `start_time`) counts as spent when the time left is less than a reserve:
    twice the longest step seen (the step in flight and the one-step-late decision), the longest checkpoint write
    seen (before the first, an estimate from `checkpoint_bytes` at 50 MB/s) and, at the end of an epoch, the
    evaluation that follows.
    """

    def __init__(
            self,
            signals: Sequence[Union[int, signal.Signals]] = (signal.SIGTERM, signal.SIGUSR1),
            max_time: Optional[float] = None,
            start_time: Optional[float] = None,
            distributed: bool = False,
            timeout: Union[None, float, timedelta] = None,
    ):
        """
        Args:
            signals: Signals that ask the run to checkpoint and stop.
            max_time: Wall-clock budget of this process in seconds (None: no budget).
            start_time: When the budget started (`time.time()`; default: now).
            distributed: Agree over the default process group (every rank must create the guard at the same point).
            timeout: Timeout of the agreement collectives (seconds; default: the process group's).
        """
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.max_time = max_time
        self.start_time = time.time() if start_time is None else start_time
        self.distributed = distributed and dist.is_available() and dist.is_initialized()
        self.received: List[Tuple[signal.Signals, float]] = []
        self.stopping = False
        self.reason = ''
        self.step_seconds = 0.
        self.save_seconds: Optional[float] = None
        self.last_save_seconds = 0.
        self.eval_seconds: Optional[float] = None
        self.checkpoint_bytes = 0
        self.eval_batches = 0
        self._step_total = 0.
        self._steps = 0
        self._last_poll: Optional[float] = None
        self._previous = {}
        self._pid = os.getpid()
        self._work = None
        self._buffer: Optional[torch.Tensor] = None
        self._group = None
        if self.distributed and self.active:
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() != 'gloo':  # the flags stay on the CPU, away from the training device's stream
                kwargs = {'timeout': _as_timedelta(timeout)} if timeout is not None else {}
                self._group = dist.new_group(backend='gloo', **kwargs)
        else:
            self.rank, self.world_size = 0, 1

    @property
    def active(self) -> bool:
        """Whether anything can ask for a stop (signals to catch or a budget)."""
        return bool(self.signals) or self.max_time is not None

    # ----- signals -----

    def __enter__(self) -> 'PreemptionGuard':
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.uninstall()

    def install(self) -> None:
        """Install the signal handlers (main thread only; elsewhere the signals keep their handlers, with a warning)."""
        if not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            _logger.warning('Preemption signals are not caught: the run is not in the main thread.')
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers that were installed before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        # only record: logging or I/O here could re-enter a write the signal interrupted. Forked loader workers
        # inherit this handler and ignore the signal (the main process decides for them).
        if os.getpid() == self._pid:
            self.received.append((signal.Signals(signum), time.time()))

    @property
    def signalled(self) -> bool:
        return bool(self.received)

    # ----- budget -----

    def elapsed(self) -> float:
        return time.time() - self.start_time

    def time_left(self) -> Optional[float]:
        """Seconds of the budget left, None without a budget."""
        return None if self.max_time is None else self.max_time - self.elapsed()

    def reserve(self, extra: float = 0.) -> float:
        """Seconds kept back from the budget: two steps, a checkpoint write and `extra`."""
        save = self.save_seconds
        if save is None:
            save = 1. + self.checkpoint_bytes / 50e6
        return 2 * self.step_seconds + save + extra

    def note_save(self, seconds: float) -> None:
        """Record how long a checkpoint write took (the reserve keeps the longest)."""
        self.last_save_seconds = seconds
        self.save_seconds = max(self.save_seconds or 0., seconds)

    def note_eval(self, seconds: float) -> None:
        """Record how long an evaluation took (the reserve before the next one)."""
        self.eval_seconds = seconds

    def eval_estimate(self) -> float:
        """Seconds the evaluation at the end of an epoch is expected to take."""
        if self.eval_seconds is not None:
            return self.eval_seconds
        mean_step = self._step_total / self._steps if self._steps else 0.
        return self.eval_batches * mean_step

    def time_up(self, extra: float = 0.) -> bool:
        left = self.time_left()
        return left is not None and left <= self.reserve(extra)

    # ----- the decision -----

    def _flags(self, extra: float = 0.) -> torch.Tensor:
        flags = torch.zeros(2 * self.world_size, dtype=torch.float32)
        if self.received:
            flags[2 * self.rank] = float(self.received[0][0])
        if self.time_up(extra):
            flags[2 * self.rank + 1] = 1.
        return flags

    def _decide(self, flags: torch.Tensor) -> bool:
        if self.stopping or not bool(flags.any()):
            return self.stopping
        flags = flags.view(-1, 2)
        parts = []
        sig_ranks = [r for r in range(flags.shape[0]) if flags[r, 0] > 0]
        if sig_ranks:
            names = sorted({signal.Signals(int(flags[r, 0])).name for r in sig_ranks})
            where = f' on rank {", ".join(map(str, sig_ranks))}' if self.world_size > 1 else ''
            parts.append(f'{"/".join(names)} received{where}')
        if bool((flags[:, 1] > 0).any()):
            parts.append(f'the --max-time budget of {format_duration(self.max_time)} is nearly spent '
                         f'({format_duration(self.elapsed())} elapsed)')
        self.stopping = True
        self.reason = '; '.join(parts)
        return True

    def poll(self) -> bool:
        """After an optimizer step, on every rank: True when the run stops now (the same answer on every rank)."""
        now = time.time()
        if self._last_poll is not None:
            step = now - self._last_poll
            self.step_seconds = max(self.step_seconds, step)
            self._step_total += step
            self._steps += 1
        self._last_poll = now
        if self.stopping or not self.active:
            return self.stopping
        flags = self._flags()
        if not self.distributed:
            return self._decide(flags)
        previous = self._wait()
        self._buffer = flags
        self._work = dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return self._decide(previous) if previous is not None else False

    def agree(self, extra_seconds: float = 0.) -> bool:
        """Blocking: True when the run stops now (between epochs; `extra_seconds` of work would follow)."""
        self._last_poll = None  # the time until the next step is not a step
        if self.stopping or not self.active:
            return self.stopping
        previous = self._wait()
        if previous is not None and self._decide(previous):
            return True
        flags = self._flags(extra_seconds)
        if self.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return self._decide(flags)

    def restart_step_clock(self) -> None:
        """Do not count the time since the last poll as a step (after an evaluation or a checkpoint write)."""
        self._last_poll = None

    def _wait(self) -> Optional[torch.Tensor]:
        if self._work is None:
            return None
        self._work.wait()
        self._work = None
        return self._buffer

    def close(self) -> None:
        """Wait for an all-reduce still in flight (every rank started it)."""
        if self._work is not None:
            try:
                self._wait()
            except RuntimeError:  # a peer is gone; the error that matters is raised elsewhere
                self._work = None

    def describe_signals(self) -> str:
        """'SIGTERM at 12:00:01, SIGTERM at 12:00:03' for the log ('' without signals)."""
        return ', '.join(f'{s.name} at {time.strftime("%H:%M:%S", time.localtime(t))}' for s, t in self.received)


def _as_timedelta(value: Union[float, timedelta]) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=float(value))
