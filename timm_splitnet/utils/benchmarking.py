""" Paired, interleaved timing: variants measured in the same rounds, their throughput ratios with a spread

Several variants (e.g. an undivided network and its divisions) are timed in R rounds; in every round each variant
runs K steps back to back, in an order that rotates from round to round. The ratio of two variants is taken per
round and summarised by its median and interquartile range, so a machine whose speed drifts (other jobs, clocks,
thermals) slows both sides of a ratio alike. Design notes: docs/benchmarks.md.
"""
import math
import statistics
import time
import timeit
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch.utils.benchmark import Measurement, TaskSpec, set_torch_threads
from torch.utils.benchmark import timer as accelerator_timer

__all__ = [
    'Band', 'CudaEventClock', 'PairedRounds', 'Variant', 'band', 'clock_kind', 'device_clock', 'format_summary',
    'ratio_fields',
    'rotation', 'row_band', 'run_paired', 'steps_per_round', 'verdicts',
]

Clock = Callable[[], float]


class Band(NamedTuple):
    """Median of a sample with its interquartile range [lo, hi] (linear interpolation between order statistics)."""
    median: float
    lo: float
    hi: float

    def format(self, digits: int = 2) -> str:
        return f'{self.median:.{digits}f} ({self.lo:.{digits}f}-{self.hi:.{digits}f})'


def band(values: Sequence[float]) -> Band:
    """The median and quartiles of `values` (all three equal for a single value).

    Raises:
        ValueError: `values` is empty.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError('band() needs at least one value.')
    if len(values) == 1:
        return Band(values[0], values[0], values[0])
    lo, median, hi = statistics.quantiles(values, n=4, method='inclusive')
    return Band(median, lo, hi)


class CudaEventClock:
    """Seconds elapsed on one CUDA device, read through events (for `timeit`'s `timer` argument).

    Each read records an event on the device's current stream and waits for it, so a read returns once the work
    queued before it has finished; the time is measured by the device between that event and one recorded at
    construction.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        with torch.cuda.device(self.device):
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()

    def __call__(self) -> float:
        with torch.cuda.device(self.device):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        event.synchronize()
        return self.origin.elapsed_time(event) / 1e3


def clock_kind(devices: Sequence[Any] = (), cpu_time: bool = False) -> str:
    """Which clock `device_clock` picks: 'cuda_events' (one CUDA device), 'synchronized_wall' (several CUDA
    devices), 'process_time' (CPU only, when `cpu_time`), else 'wall'."""
    kinds = {torch.device(d).type for d in devices}
    cuda = {torch.device(d) for d in devices if torch.device(d).type == 'cuda'}
    if len(cuda) == 1:
        return 'cuda_events'
    if cuda:
        return 'synchronized_wall'
    return 'process_time' if cpu_time and kinds <= {'cpu'} else 'wall'


def device_clock(devices: Sequence[Any] = (), cpu_time: bool = False) -> Clock:
    """The clock for steps that run on `devices`.

    CUDA events on a single CUDA device; with several CUDA devices, host time read after every one of them is
    synchronised. On the CPU with `cpu_time`: the process's CPU time (`time.process_time`, user + system), which
    other jobs sharing the cores do not inflate; it equals the elapsed time of an idle machine only when the steps
    run on one thread. Otherwise `torch.utils.benchmark.timer` (host time, after synchronising the current
    accelerator if there is one).
    """
    kind = clock_kind(devices, cpu_time)
    if kind == 'cuda_events':
        return CudaEventClock(next(torch.device(d) for d in devices if torch.device(d).type == 'cuda'))
    if kind == 'synchronized_wall':
        cuda = sorted({torch.device(d) for d in devices if torch.device(d).type == 'cuda'}, key=str)

        def clock() -> float:
            for d in cuda:
                torch.cuda.synchronize(d)
            return time.perf_counter()
        return clock
    return time.process_time if kind == 'process_time' else accelerator_timer


@dataclass
class Variant:
    """One thing to time: `step()` does one unit of work on `items` samples (e.g. a batch) on `devices`.

    `clock` defaults to `device_clock(devices)`; tests pass a fake one.
    """
    name: str
    step: Callable[[], Any]
    items: int = 1
    devices: Sequence[Any] = ()
    clock: Optional[Clock] = None


def rotation(num_variants: int, round_index: int) -> List[int]:
    """The order of the variants in round `round_index`: 0, 1, ..., n-1 shifted left by the round index, so each
    variant runs first (and after each other) equally often over n rounds."""
    start = round_index % num_variants
    return [(start + i) % num_variants for i in range(num_variants)]


def steps_per_round(total_steps: int, rounds: int) -> int:
    """K, the steps each variant runs per round, from a total per variant spread over `rounds` (at least 1)."""
    return max(1, int(total_steps) // max(1, int(rounds)))


@dataclass
class PairedRounds:
    """What `run_paired` measured: per variant, the mean step time (s) of each round, with the rounds' orders."""
    names: List[str]
    items: List[int]
    step_times: List[List[float]]
    steps: int
    orders: List[List[int]] = field(default_factory=list)
    num_threads: Optional[int] = None

    @property
    def rounds(self) -> int:
        return len(self.orders)

    def index(self, variant: Any) -> int:
        return variant if isinstance(variant, int) else self.names.index(variant)

    def throughputs(self, variant: Any) -> List[float]:
        """Items per second of `variant` in every round."""
        i = self.index(variant)
        return [self.items[i] / t for t in self.step_times[i]]

    def ratios(self, variant: Any, baseline: Any = 0) -> List[float]:
        """Per round: throughput of `variant` over that of `baseline` in the same round."""
        return [v / b for v, b in zip(self.throughputs(variant), self.throughputs(baseline))]

    def ratio(self, variant: Any, baseline: Any = 0) -> Band:
        """Median and interquartile range of the per-round throughput ratios `variant` / `baseline`."""
        return band(self.ratios(variant, baseline))

    def throughput(self, variant: Any) -> Band:
        """Median and interquartile range of the variant's throughput over the rounds."""
        return band(self.throughputs(variant))

    def step_time(self, variant: Any) -> Band:
        """Median and interquartile range of the variant's mean step time (s) over the rounds."""
        return band(self.step_times[self.index(variant)])

    def noise(self, variant: Any = 0) -> float:
        """Round-to-round spread of a variant's throughput: interquartile range over median (0 = steady)."""
        b = self.throughput(variant)
        return (b.hi - b.lo) / b.median if b.median else math.inf

    def measurement(self, variant: Any) -> Measurement:
        """The variant's rounds as a `torch.utils.benchmark.Measurement` (one raw time per round of K steps)."""
        i = self.index(variant)
        spec = TaskSpec(stmt=self.names[i], setup='pass', num_threads=self.num_threads or torch.get_num_threads())
        return Measurement(number_per_run=self.steps, raw_times=[t * self.steps for t in self.step_times[i]],
                           task_spec=spec)


def run_paired(
        variants: Sequence[Variant],
        rounds: int = 10,
        steps: int = 1,
        min_time: float = 0.,
        warmup: int = 0,
        num_threads: Optional[int] = None,
        progress: Optional[Callable[[int, 'PairedRounds'], None]] = None,
) -> PairedRounds:
    """Time `variants` in interleaved rounds.

    Each variant is warmed up with `warmup` steps, then every round runs each variant for `steps` steps back to back
    (one `timeit` block with the garbage collector off, the variant's clock read before and after), the variants in
    the order `rotation(n, round)`. Rounds continue past `rounds` until the timed blocks add up to `min_time`
    seconds (hyperfine's "at least N runs and T seconds").

    Args:
        variants: What to time; all are built and ready.
        rounds: Minimum number of rounds.
        steps: K, steps per variant per round.
        min_time: Minimum total seconds of timed blocks.
        warmup: Untimed steps per variant before the first round (each variant's device is waited for after them).
        num_threads: torch intra-op threads for the whole run (`torch.utils.benchmark.set_torch_threads`); None keeps
            the current setting.
        progress: Called after every round with the round count and the rounds so far.

    Raises:
        ValueError: No variant, or `rounds` / `steps` below 1.
    """
    if not variants:
        raise ValueError('run_paired() needs at least one variant.')
    if rounds < 1 or steps < 1:
        raise ValueError(f'run_paired() needs rounds >= 1 and steps >= 1, got rounds={rounds}, steps={steps}.')
    clocks = [v.clock or device_clock(v.devices) for v in variants]
    timers = [timeit.Timer(v.step, timer=c) for v, c in zip(variants, clocks)]
    result = PairedRounds(names=[v.name for v in variants], items=[int(v.items) for v in variants],
                          step_times=[[] for _ in variants], steps=int(steps), num_threads=num_threads)
    with set_torch_threads(num_threads) if num_threads else nullcontext():
        for variant, clock in zip(variants, clocks):
            for _ in range(warmup):
                variant.step()
            clock()  # waits for the variant's devices
        timed = 0.
        while result.rounds < rounds or timed < min_time:
            order = rotation(len(variants), result.rounds)
            for i in order:
                seconds = max(timers[i].timeit(steps), 1e-9)
                result.step_times[i].append(seconds / steps)
                timed += seconds
            result.orders.append(order)
            if progress is not None:
                progress(result.rounds, result)
    return result


# ----- result rows: ratio keys, the summary table and the verdict -----

def ratio_fields(key: str, ratio: Band, digits: int = 3) -> Dict[str, float]:
    """`{key: median, key_lo: first quartile, key_hi: third quartile}`, rounded."""
    return {key: round(ratio.median, digits), f'{key}_lo': round(ratio.lo, digits),
            f'{key}_hi': round(ratio.hi, digits)}


def row_band(row: Dict[str, Any], key: str) -> Optional[Band]:
    """The band stored in a result row under `key`, `key_lo`, `key_hi` (None when the row has no `key`)."""
    if row.get(key) is None:
        return None
    median = float(row[key])
    lo, hi = row.get(f'{key}_lo'), row.get(f'{key}_hi')
    return Band(median, median if lo is None else float(lo), median if hi is None else float(hi))


def _cell(value: Any, fmt: str) -> str:
    if value is None or value == '':
        return '-'
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _ratio_cell(row: Dict[str, Any], kind: str, has_ratios: bool) -> str:
    ratio = row_band(row, f'{kind}_vs_s1')
    if ratio is not None:
        return ratio.format()
    if has_ratios and row.get('split_factor') == 1 and row.get(f'{kind}_samples_per_sec') is not None:
        return 'baseline'
    return '-'


def format_summary(rows: Sequence[Dict[str, Any]]) -> str:
    """A small aligned table of benchmark rows: img/s, the ratio to S=1 with its interquartile range, params, GMACs
    and the FLOP bound (S=1's GMACs over the row's: the ratio if time followed the multiply-adds)."""
    has_ratios = any(row_band(r, f'{k}_vs_s1') for r in rows for k in ('infer', 'train'))
    head = ('model', 'S', 'backend', 'mode', 'infer img/s', 'train img/s', 'infer vs S=1', 'train vs S=1',
            'params(M)', 'GMACs', 'FLOP bound')
    table = [head]
    errors = []
    for r in rows:
        if r.get('error'):
            errors.append(f'{r.get("model")}: error: {r["error"]}')
            continue
        table.append((
            str(r.get('model')), _cell(r.get('split_factor'), '{}'), _cell(r.get('split_backend'), '{}'),
            _cell(r.get('split_mode'), '{}'), _cell(r.get('infer_samples_per_sec'), '{:.1f}'),
            _cell(r.get('train_samples_per_sec'), '{:.1f}'), _ratio_cell(r, 'infer', has_ratios),
            _ratio_cell(r, 'train', has_ratios), _cell(r.get('param_count'), '{:.2f}'),
            _cell(r.get('infer_gmacs', r.get('train_gmacs')), '{:.3f}'), _cell(r.get('flop_bound_vs_s1'), '{:.2f}')))
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in table]
    return '\n'.join(lines + errors)


def verdicts(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """One sentence per row with a ratio to S=1, e.g. "wrn16_8 S=2 infers at 0.95x (0.91-0.98) and trains at 0.88x
    (0.85-0.91) of S=1; the FLOP bound is 0.89x.", then one on the rounds and the noise."""
    lines, noise, rounds, clocks = [], [], set(), set()
    for r in rows:
        parts = []
        for kind, verb in (('infer', 'infers'), ('train', 'trains')):
            ratio = row_band(r, f'{kind}_vs_s1')
            if ratio is not None:
                parts.append(f'{verb} at {ratio.median:.2f}x ({ratio.lo:.2f}-{ratio.hi:.2f})')
                if r.get(f'{kind}_noise') is not None:
                    noise.append(float(r[f'{kind}_noise']))
                if r.get(f'{kind}_rounds'):
                    rounds.add(int(r[f'{kind}_rounds']))
                if r.get(f'{kind}_clock'):
                    clocks.add(str(r[f'{kind}_clock']))
        if not parts:
            continue
        model = str(r.get('model', ''))
        arch = model[len('splitnet_'):].rsplit('_s', 1)[0] if model.startswith('splitnet_') else model
        how = [x for x in (r.get('split_backend'), r.get('split_mode') if r.get('split_mode') != 'sequential'
                           else None) if x]
        text = f'{arch} S={r.get("split_factor")}' + (f' ({", ".join(how)})' if how else '')
        text += f' {" and ".join(parts)} of S=1'
        if r.get('flop_bound_vs_s1') is not None:
            text += f'; the FLOP bound is {float(r["flop_bound_vs_s1"]):.2f}x'
        lines.append(text + '.')
    if lines and rounds:
        counts = '/'.join(map(str, sorted(rounds)))
        timed = f' timed by {", ".join(sorted(clocks))}' if clocks else ''
        lines.append(f'Medians (interquartile ranges) of the per-round ratios over {counts} paired rounds{timed}; '
                     f'S=1\'s own img/s moved by up to {100 * max(noise, default=0):.0f}% (IQR / median) between '
                     f'rounds.')
    return lines
