#!/usr/bin/env python3
""" SplitNet inference / train benchmark

timm-style throughput and latency benchmark of SplitNet (and plain timm) models on random inputs. For a SplitNet with
S > 1 it reports, side by side (the paper's Fig. 3 / Fig. 6 latency study):

- `undivided`: the S=1 model of the same architecture (`splitnet_<arch>_s1`, `--compare-undivided`, default on),
- `sequential`: the S members one after another on `--device` (the normal model),
- `concurrent`: member i on `--devices[i mod n]`, one host thread per device (`timm_splitnet.parallel.concurrent`),
- `member_parallel`: under torchrun with `--member-parallel`, member i on rank i mod N, one process per member
  (group), the logits all-gathered over the processes (`timm_splitnet.parallel.member_parallel`): timed on rank 0
  with the gather; rank 0 alone then runs the single-process rows and reports.

    python benchmark.py --model splitnet_wrn28_10_s4 --devices cuda:0,cuda:1,cuda:2,cuda:3 --amp -b 100
    torchrun --nproc_per_node=4 benchmark.py --model splitnet_wrn28_10_s4 --member-parallel --amp -b 100
    python benchmark.py --model-list "splitnet_resnet50_s2,splitnet_wrn50_3_s2" --bench both --plot latency.png
    python benchmark.py --plot-from results.json --plot latency.png

The models of one architecture (S=1, its divisions, their backends and split modes) are built together and timed
in paired rounds (`timm_splitnet.utils.benchmarking`): each round runs every one of them for K steps, in a rotating
order, and the ratio to S=1 is taken per round, so a machine whose speed drifts slows both sides of a ratio alike.
`--split-backend` takes a comma list here (e.g. `loop,packed,auto`): each backend is one more variant of the rounds.

Result keys follow timm's benchmark.py (`infer_samples_per_sec`, `infer_step_time`, `infer_batch_size`,
`infer_img_size`, `infer_gmacs`, `train_*`, `param_count`), as medians over the rounds, plus
`infer_step_time_median`, `infer_latency_ms` (median step time per image), `infer_peak_mem_mb` (CUDA only),
`infer_vs_s1` with `infer_vs_s1_lo` / `infer_vs_s1_hi` (median and interquartile range of the per-round throughput
ratio to S=1), `infer_rounds`, `infer_round_steps`, `infer_noise` (round-to-round spread of S=1's img/s, IQR over
median), `infer_clock` (what timed the steps: CUDA events, or on one CPU thread the process CPU time),
`flop_bound_vs_s1` (S=1's GMACs over the row's), `split_mode`, `split_factor`, `split_backend`, `devices`,
`world_size` (member-parallel rows) and `group` (the requested model a row belongs to).
"""
import argparse
import gc
import json
import logging
import re
import time
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Collection, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.benchmark import set_torch_threads

import timm
from timm.utils import ParseKwargs

import timm_splitnet  # noqa: F401  registers the splitnet_* models
from timm_splitnet import SplitNet, count_params, splitnet_name
from timm_splitnet.cli import (
    CliError, add_input_args, add_member_parallel_args, add_model_args, add_results_args, autocast_factory,
    check_compile_backend, cli_session, create_model_checked, expand_model_names, finish_member_parallel,
    init_member_parallel_checked, model_gmacs, model_kwargs, parse_devices_checked, print_results, rank_devices,
    resolve_amp_dtype, resolve_device_checked, resolve_eval_data_config, set_split_backend,
)
from timm_splitnet.parallel.concurrent import ConcurrentMembers, cuda_devices, synchronize_devices
from timm_splitnet.utils.benchmarking import (
    Variant, clock_kind, device_clock, format_summary, ratio_fields, run_paired, steps_per_round, verdicts,
)

_logger = logging.getLogger('benchmark')

SPLIT_MODES = ('undivided', 'sequential', 'concurrent', 'member_parallel')
_SPLITNET_NAME = re.compile(r'^splitnet_(?P<arch>.+)_s(?P<s>\d+)$')

parser = argparse.ArgumentParser(description='SplitNet / timm model benchmark')
parser.add_argument('--bench', default='both', type=str, choices=['infer', 'train', 'both', 'data'],
                    help='benchmark mode: "both", "infer", "train", or "data": views/s of the CPU multi-view loader '
                         'and of the views made on the device (train.py --views-on-device) (default: both)')
parser.add_argument('--num-warm-iter', default=10, type=int,
                    help='untimed steps run before the timed ones (default: 10; at least 1 with --member-parallel)')
parser.add_argument('--num-bench-iter', default=40, type=int,
                    help='timed steps per model, shared out over the rounds (default: 40)')
parser.add_argument('--rounds', default=10, type=int, metavar='R',
                    help='paired rounds: in each, every model of a comparison runs its share of --num-bench-iter '
                         'steps (at least one), in an order that rotates, and the ratios are taken per round '
                         '(default: 10, or --num-bench-iter if smaller)')
parser.add_argument('--min-time', default=0., type=float, metavar='SECONDS',
                    help='add rounds until the timed steps of a comparison reach this many seconds (default: 0: '
                         'just --rounds; member-parallel runs use --rounds only)')
parser.add_argument('--clock', default='auto', type=str, choices=['auto', 'wall', 'cpu'],
                    help='how CPU steps are timed: "cpu" = the process CPU time, which other jobs sharing the '
                         'cores do not inflate (right for one intra-op thread), "wall" = elapsed time, "auto" = cpu '
                         'for single-process runs on one thread, else wall; CUDA steps are timed by the device '
                         '(default: auto)')
parser.add_argument('--num-threads', default=None, type=int, metavar='N',
                    help='torch intra-op threads while timing (default: as torch starts, all cores; one for the CPU '
                         'comparison of a bare run)')
parser.add_argument('--device', default=None, type=str,
                    help='device of the sequential / undivided runs (default: first of --devices, else cuda if '
                         'available, else cpu); with --member-parallel: cuda = cuda:LOCAL_RANK')
parser.add_argument('--devices', default='', type=str, metavar='DEV[,DEV...]',
                    help='also run SplitNet members concurrently, member i on device i mod n (e.g. cuda:0,cuda:1)')
parser.add_argument('--streams', action='store_true', default=False,
                    help='concurrent runs: every device slot issues its work on its own CUDA stream')
parser.add_argument('--compare-undivided', action=argparse.BooleanOptionalAction, default=None,
                    help='also benchmark the undivided splitnet_<arch>_s1 model (default: on for SplitNets with S>1)')
parser.add_argument('--use-train-size', action='store_true', default=False,
                    help='time at the pretrained cfg\'s input_size, not its test_input_size (where one is set)')
parser.add_argument('--amp', action='store_true', default=False,
                    help='mixed precision: autocast in --amp-dtype, float32 weights (replaces --precision)')
parser.add_argument('--amp-dtype', default=None, type=str,
                    help='autocast type of --amp: float16 (half) or bfloat16 (default: bfloat16 on a CPU, float16 '
                         'on a GPU)')
parser.add_argument('--precision', default='float32', type=str,
                    help='amp / amp_float16 / amp_bfloat16: float32 weights under float16 / bfloat16 autocast; '
                         'float16, bfloat16: weights and inputs in that type (default: float32)')
parser.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                    help='torch.compile with this backend (inductor if the flag has no value); not for concurrent '
                         'runs')
parser.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='train benchmark optimizer')
parser.add_argument('--lr', default=1e-4, type=float, metavar='LR', help='train benchmark learning rate')
parser.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                    help='train benchmark: epsilon of an adaptive optimizer (default: the optimizer\'s)')
parser.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                    help='train benchmark: betas of an Adam-like optimizer (default: the optimizer\'s)')
parser.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs,
                    help='train benchmark: more optimizer arguments as key=value')
parser.add_argument('--grad-checkpointing', action='store_true', default=False,
                    help='recompute activations in the backward pass (every member of a SplitNet)')
parser.add_argument('--drop-path', type=float, default=None, metavar='PCT',
                    help='stochastic depth rate of the undivided network, divided by sqrt(S) for each member')
parser.add_argument('--torchcompile-mode', type=str, default=None,
                    help='torch.compile mode with --torchcompile, e.g. max-autotune (default: torch\'s)')
parser.add_argument('--cot-weight', default=0.5, type=float,
                    help='co-training weight of the SplitNet train benchmark loss (default: 0.5)')
parser.add_argument('--seed', default=42, type=int, help='random seed of weights and inputs')
parser.add_argument('--views', default=None, type=int, metavar='S',
                    help='--bench data: views per image (default: S of --model, else 2)')
parser.add_argument('--data-dir', default='', type=str, metavar='DIR',
                    help='--bench data: image folder (ImageNet layout, its train split; default: synthetic images), or '
                         'the shards of a streamed --dataset')
parser.add_argument('--dataset', default='', type=str, metavar='NAME',
                    help='--bench data: what --data-dir holds, as train.py names it: "" (image folder), "wds/<name>", '
                         '"hfids/<folder>", ... (default: "")')
parser.add_argument('--compare-folder', default='', type=str, metavar='DIR',
                    help='--bench data: also time this image folder with the same settings, in a row beside the '
                         '--dataset row')
parser.add_argument('-j', '--workers', default=4, type=int, metavar='N', help='--bench data: loader processes')
parser.add_argument('--plot', default='', type=str, metavar='FILE.png',
                    help='draw the latency comparison (undivided / sequential / concurrent) to this file')
parser.add_argument('--plot-from', default='', type=str, metavar='RESULTS.json',
                    help='re-plot a saved JSON results file (with --plot); no benchmark is run')
add_model_args(parser)
add_input_args(parser)
add_member_parallel_args(parser)
add_results_args(parser)


def resolve_precision(precision: str) -> Tuple[Optional[torch.dtype], torch.dtype]:
    """(autocast dtype or None, model / data dtype) of a timm `--precision` value."""
    choices = {
        'amp': (torch.float16, torch.float32),
        'amp_float16': (torch.float16, torch.float32),
        'amp_bfloat16': (torch.bfloat16, torch.float32),
        'float16': (None, torch.float16),
        'bfloat16': (None, torch.bfloat16),
        'float32': (None, torch.float32),
    }
    if precision not in choices:
        raise CliError(f'unknown --precision {precision!r}, expected one of {", ".join(choices)}.')
    return choices[precision]


def parse_splitnet_name(name: str) -> Optional[Tuple[str, int]]:
    """(arch, S) of a `splitnet_<arch>_s<S>` name, else None."""
    match = _SPLITNET_NAME.match(name)
    return (match['arch'], int(match['s'])) if match else None


# ----- timing: paired rounds (timm_splitnet.utils.benchmarking) -----

class Run(NamedTuple):
    """One variant of a comparison: a model in an execution mode (single, sequential, concurrent, member_parallel)
    with a split backend (None: the model's default)."""
    name: str
    mode: str
    backend: Optional[str] = None

    def label(self) -> str:
        parsed = parse_splitnet_name(self.name)
        text = f'S={parsed[1]}' if parsed else self.name
        extra = [m for m in (self.backend, self.mode if self.mode not in ('sequential', 'single') else None) if m]
        return text + (f' ({", ".join(extra)})' if extra else '')


def parse_split_backends(value: Optional[str]) -> List[Optional[str]]:
    """The backends of `--split-backend` (a comma list here); [None] when not given."""
    backends = [b.strip() for b in (value or '').split(',') if b.strip()]
    return list(dict.fromkeys(backends)) or [None]


def _memory_allocated(devices: Sequence[torch.device]) -> Dict[torch.device, int]:
    return {d: torch.cuda.memory_allocated(d) for d in cuda_devices(devices)}


def warm_up(setup: 'BenchSetup', step: Callable[[], Any], num_warm: int) -> Optional[float]:
    """Run `num_warm` steps; returns the peak CUDA memory of the setup alone (MiB, None on CPU): its weights
    (`setup.resident`) plus the most the steps allocated on top of what was allocated before them."""
    devices = cuda_devices(setup.devices)
    for d in devices:
        torch.cuda.reset_peak_memory_stats(d)
    before = _memory_allocated(devices)
    for _ in range(num_warm):
        step()
    synchronize_devices(setup.devices)
    if not devices:
        return None
    peak = max(setup.resident.get(d, 0) + torch.cuda.max_memory_allocated(d) - before[d] for d in devices)
    return round(peak / 2 ** 20, 1)


# ----- one benchmark setup -----

class BenchSetup:
    """A model ready to benchmark in one split mode: forward function, input device(s), precision.

    Mode 'member_parallel' is a collective: every rank of the torchrun job builds it, for the same model.
    """

    def __init__(
            self,
            name: str,
            mode: str,
            args,
            device: Optional[torch.device],
            devices: Optional[List[torch.device]],
            split_backend: Optional[str] = None,
    ):
        self.name = name
        self.mode = mode
        self.resident: Dict[torch.device, int] = {}  # bytes on each CUDA device once built (set by the caller)
        self.seed = args.seed
        self.precision = args.precision
        if args.amp:  # overrides --precision, as in timm
            amp_dtype = resolve_amp_dtype(args.amp_dtype, device or (devices[0] if devices else None))
            self.precision = 'amp_bfloat16' if amp_dtype == torch.bfloat16 else 'amp_float16'
        self.amp_dtype, self.dtype = resolve_precision(self.precision)
        self.memory_format = torch.channels_last if args.channels_last else None
        kwargs = model_kwargs(args)
        torch.manual_seed(args.seed)
        self.model = create_model_checked(name, **kwargs)
        if args.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.is_split = isinstance(self.model, SplitNet)
        if self.is_split:  # the train bench measures the co-training step: train mode returns the member logits
            self.model.set_cotraining(True)
        if mode == 'member_parallel':  # the members of a rank run one after the other
            self.split_backend = 'loop' if self.is_split else None
        else:
            self.split_backend = set_split_backend(self.model, split_backend)
            if mode != 'concurrent':
                check_compile_backend(args.torchcompile, self.split_backend)
        self.split_factor = self.model.split_factor if self.is_split else None
        self.param_count = count_params(self.model)
        data_config, _ = resolve_eval_data_config(args, self.model, use_test_size=not args.use_train_size)
        self.input_size = tuple(data_config['input_size'])
        self.num_classes = self.model.num_classes
        self.gmacs = model_gmacs(name, self.input_size, model=self.model, **kwargs)
        self.model.to(dtype=self.dtype)
        if self.memory_format is not None:
            self.model.to(memory_format=self.memory_format)
        self.runner = None
        self.plan = None
        self.min_warm_iter = 0
        if mode == 'concurrent':
            self.runner = ConcurrentMembers(self.model, devices, amp_dtype=self.amp_dtype, streams=args.streams)
            self.device = self.runner.device
            self.devices = self.runner.used_devices
            self.forward_members = self.runner.forward_members
            self.forward = self.runner
            self.parameters = lambda: self.runner.parameters()
            self.autocast = nullcontext  # the runner enters autocast in every worker thread
            if args.torchcompile:
                _logger.warning('--torchcompile is not applied to concurrent runs.')
            return
        if mode == 'member_parallel':  # this rank keeps its members; the logits are gathered over the ranks
            from timm_splitnet.parallel.member_parallel import member_parallel_forward
            if args.split_backend not in (None, '', 'loop'):
                _logger.warning(f'--split-backend {args.split_backend} ignored by the member-parallel run.')
            self.model, self.plan, device = init_member_parallel_checked(
                self.model, args.device, backend=args.dist_backend, timeout=args.dist_timeout, name=name)
            if args.torchcompile:
                for member in self.model.owned:  # the gather stays eager
                    member.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
            self.forward = partial(member_parallel_forward, self.model)  # the ensemble, gather included
            self.forward_members = self.model.forward_members  # all members' logits, with gradients to own
            self.min_warm_iter = 1  # the first forward in a mode also checks the ranks' batches
        else:
            self.model.to(device)
            if args.torchcompile and hasattr(self.model, 'prepare_split_backend'):
                self.model.prepare_split_backend()  # the packed programs built eagerly, not inside the compiled frame
            self.forward = torch.compile(self.model, backend=args.torchcompile, mode=args.torchcompile_mode) \
                if args.torchcompile else self.model
            self.forward_members = self.forward  # train mode: a SplitNet returns the member logits [S, B, C]
        self.device = device
        self.devices = [device]
        self.parameters = self.model.parameters
        self.autocast = autocast_factory(device, self.amp_dtype)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        if self.runner is not None:
            self.runner.train(mode)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with `--seed`: the same inputs and targets on every rank."""
        return torch.Generator().manual_seed(self.seed)

    def input(self, batch_size: int) -> torch.Tensor:
        x = torch.randn((batch_size,) + self.input_size, generator=self.generator())
        x = x.to(device=self.device, dtype=self.dtype)
        return x.contiguous(memory_format=self.memory_format) if self.memory_format is not None else x

    def target(self, batch_size: int) -> torch.Tensor:
        return torch.randint(0, max(self.num_classes, 1), (batch_size,), generator=self.generator()).to(self.device)

    def info(self) -> Dict[str, Any]:
        """The setup's columns; a collective in mode 'member_parallel' (the devices of all ranks)."""
        if self.plan is not None:
            devices = rank_devices(self.plan, self.device)
        else:
            devices = ','.join(str(d) for d in (self.runner.slot_devices if self.runner else self.devices))
        info = OrderedDict(
            split_mode=self.mode,
            split_factor=self.split_factor,
            split_backend=self.split_backend,
            precision=self.precision,
            devices=devices,
        )
        if self.plan is not None:
            info['world_size'] = self.plan.world_size
        return info

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.runner = self.forward = self.forward_members = self.model = None


def make_criterion(is_split: bool, cot_weight: float = 0.5) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss of the train benchmark: the co-training loss on member logits [S, B, C] (else their summed CE)."""
    if not is_split:
        return F.cross_entropy
    try:
        from timm_splitnet.loss import CoTrainingLoss
        criterion = CoTrainingLoss(cot_weight=cot_weight)
    except ImportError:
        criterion = None

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if criterion is None:
            return sum(F.cross_entropy(z.float(), target) for z in logits)
        out = criterion(logits, target)
        if isinstance(out, dict):
            return out['loss']
        return getattr(out, 'loss', out)

    return loss_fn


def make_infer_step(setup: BenchSetup, args) -> Callable[[], None]:
    """One inference step of `setup` (eval mode, no autograd) on a fixed random batch."""
    setup.train(False)
    x = setup.input(args.batch_size)

    def step():
        with torch.inference_mode(), setup.autocast():
            setup.forward(x)

    return step


def make_train_step(setup: BenchSetup, args) -> Callable[[], None]:
    """One train step of `setup` (forward of the member logits, co-training loss, backward, optimizer step)."""
    from timm.optim import create_optimizer_v2
    setup.train(True)
    criterion = make_criterion(setup.is_split, args.cot_weight)
    opt_kwargs = dict(args.opt_kwargs or {})
    if args.opt_eps is not None:
        opt_kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs['betas'] = args.opt_betas
    optimizer = create_optimizer_v2(list(setup.parameters()), opt=args.opt, lr=args.lr, **opt_kwargs)
    x = setup.input(args.batch_size)
    target = setup.target(args.batch_size)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with setup.autocast():
            out = setup.forward_members(x)
            loss = criterion(out, target)
        loss.backward()
        optimizer.step()

    return step


def _log_round(kind: str, runs: List[Run], base: Optional[int], total: int, count: int, rounds) -> None:
    """Progress of the rounds: the last round's ratios to S=1 (or img/s without S=1)."""
    if base is not None and len(runs) > 1:
        ratios = ', '.join(f'{r.label()} {rounds.ratios(i, base)[-1]:.2f}x' for i, r in enumerate(runs) if i != base)
        text = f'{ratios} of {runs[base].label()} ({rounds.throughputs(base)[-1]:.1f} img/s)'
    else:
        text = ', '.join(f'{r.label()} {rounds.throughputs(i)[-1]:.1f} img/s' for i, r in enumerate(runs))
    _logger.info(f'{kind} round {count}/{total}: {text}')


def _measure_kind(kind: str, setups: Dict[Run, BenchSetup], rows: Dict[Run, Any], args,
                  baseline: Optional[Run]) -> None:
    """Warm every setup up for `kind` ('infer' / 'train'), time them together in paired rounds, add the row keys."""
    runs, variants, peaks = [], [], {}
    # one clock for the whole comparison: CPU time only where it stands for the elapsed time of an idle machine
    cpu_time = args.clock == 'cpu' or (args.clock == 'auto' and torch.get_num_threads() == 1 and all(
        r.mode in ('single', 'sequential') for r in setups))
    for run, setup in setups.items():
        if isinstance(rows[run], Exception):
            continue
        try:
            step = (make_infer_step if kind == 'infer' else make_train_step)(setup, args)
            peaks[run] = warm_up(setup, step, max(1, args.num_warm_iter, setup.min_warm_iter))
        except Exception as e:
            if run.mode == 'member_parallel':
                raise
            rows[run] = e
            continue
        runs.append(run)
        variants.append(Variant(run.label(), step, items=args.batch_size, devices=setup.devices,
                                clock=device_clock(setup.devices, cpu_time)))
    if not runs:
        return
    base = runs.index(baseline) if baseline in runs else None
    steps = steps_per_round(args.num_bench_iter, args.rounds)
    collective = any(r.mode == 'member_parallel' for r in runs)  # every rank must run the same rounds
    rounds = run_paired(
        variants, rounds=args.rounds, steps=steps, min_time=0. if collective else args.min_time,
        progress=partial(_log_round, kind, runs, base, args.rounds))
    for i, run in enumerate(runs):
        setup, row = setups[run], rows[run]
        step_ms = rounds.step_time(i).median * 1000.
        row[f'{kind}_samples_per_sec'] = round(rounds.throughput(i).median, 2)
        row[f'{kind}_step_time'] = round(step_ms, 3)
        row[f'{kind}_step_time_median'] = round(step_ms, 3)
        row[f'{kind}_latency_ms'] = round(step_ms / args.batch_size, 4)
        row[f'{kind}_batch_size'] = args.batch_size
        row[f'{kind}_img_size'] = setup.input_size[-1]
        if kind == 'infer':
            row['infer_gmacs'] = setup.gmacs
        row[f'{kind}_peak_mem_mb'] = peaks[run]
        if base is not None and i != base:
            row.update(ratio_fields(f'{kind}_vs_s1', rounds.ratio(i, base)))
        row[f'{kind}_clock'] = clock_kind(setup.devices, cpu_time)
        row[f'{kind}_rounds'] = rounds.rounds
        row[f'{kind}_round_steps'] = steps
        row[f'{kind}_noise'] = round(rounds.noise(i if base is None else base), 3)
    if kind == 'train':
        for setup in setups.values():
            setup.train(False)


def measure_group(
        runs: Sequence[Run],
        args,
        device: Optional[torch.device],
        devices: Optional[List[torch.device]],
        baseline: Optional[Run] = None,
) -> Dict[Run, Any]:
    """The row of every run (or the exception that stopped it), all runs built first and timed together.

    Infer and train are timed in turn, each in `--rounds` paired rounds; ratios are to `baseline` (S=1).
    """
    rows: Dict[Run, Any] = OrderedDict()
    setups: Dict[Run, BenchSetup] = OrderedDict()
    known = [d for d in [device, *(devices or [])] if d is not None]
    # warm-up and rounds at one thread count (oneDNN keeps its kernels per thread count)
    with set_torch_threads(args.num_threads) if args.num_threads else nullcontext():
        try:
            for run in runs:
                try:
                    before = _memory_allocated(known)
                    setup = BenchSetup(run.name, run.mode, args, device, devices, split_backend=run.backend)
                    setup.resident = {d: n - before.get(d, 0) for d, n in _memory_allocated(setup.devices).items()}
                    setups[run] = setup
                    rows[run] = OrderedDict(model=run.name)
                    rows[run].update(setup.info())
                except Exception as e:
                    if run.mode == 'member_parallel':
                        raise
                    rows[run] = e
            for kind in ('infer', 'train'):
                if args.bench in (kind, 'both'):
                    try:
                        _measure_kind(kind, setups, rows, args, baseline)
                    except Exception as e:  # a failure inside the rounds stops the whole comparison
                        if any(r.mode == 'member_parallel' for r in setups):
                            raise
                        for run in setups:
                            rows[run] = e
            for run, setup in setups.items():
                row = rows[run]
                if isinstance(row, Exception):
                    continue
                if args.bench == 'train':
                    row['train_gmacs'] = setup.gmacs
                base_gmacs = setups[baseline].gmacs if baseline in setups else None
                if base_gmacs and setup.gmacs and run != baseline and any(k.endswith('_vs_s1') for k in row):
                    row['flop_bound_vs_s1'] = round(base_gmacs / setup.gmacs, 3)
                row['param_count'] = round(setup.param_count / 1e6, 4)
        finally:
            cuda = cuda_devices([d for s in setups.values() for d in s.devices])
            for setup in setups.values():
                setup.close()
            setups.clear()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return rows


def benchmark_member_parallel(
        model_names: List[str],
        args,
        cache: Dict[Tuple[str, str], Any],
        rank: int = 0,
) -> None:
    """The member-parallel run of every model, on every rank (collectives), into `cache[(name, 'member_parallel')]`.

    A failure is stored in the cache (the row of rank 0 reports it) and logged on the other ranks; with a single
    model it is raised, except out of memory (reported as a row, as the single-process runs do). These rows are
    timed in rounds of their own: the single-process runs happen later, on rank 0 alone.
    """
    for name in model_names:
        key = (name, 'member_parallel')
        _logger.info(f'Benchmarking {name} (member_parallel) ...')
        try:
            cache[key] = [measure_group([Run(name, 'member_parallel')], args, None, None)[Run(name, 'member_parallel')]]
        except Exception as e:
            if len(model_names) == 1 and not isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            if rank != 0:
                _logger.error(f'{name} (member_parallel): {type(e).__name__}: {e}')
            cache[key] = e


def planned_runs(
        name: str,
        args,
        devices: Optional[List[torch.device]],
        warn: bool = True,
        reported: Collection[str] = (),
) -> List[Tuple[str, str]]:
    """(model, split mode) of every row of one requested model: undivided / sequential / concurrent /
    member_parallel as they apply (`warn`: log the comparisons that cannot be made). The undivided comparison is
    left out when its model is in `reported` (the caller's table has its row already: requested itself, or
    compared with an earlier model)."""
    parsed = parse_splitnet_name(name)
    split_factor = parsed[1] if parsed else None
    compare = args.compare_undivided
    if compare is None:
        compare = bool(split_factor and split_factor > 1)
    runs = []
    if compare and parsed and split_factor > 1:
        undivided = splitnet_name(parsed[0], 1)
        if undivided in reported:
            pass
        elif timm.is_model(undivided):
            runs.append((undivided, 'undivided'))
        elif warn:
            _logger.warning(f'no undivided model {undivided} to compare {name} with.')
    runs.append((name, 'sequential' if parsed else 'single'))
    if devices and parsed:
        runs.append((name, 'concurrent'))
    elif devices and warn:
        _logger.warning(f'--devices ignored for {name}: not a SplitNet.')
    if args.member_parallel:
        runs.append((name, 'member_parallel'))
    return runs


def _split_factor(name: str) -> Optional[int]:
    parsed = parse_splitnet_name(name)
    return parsed[1] if parsed else None


def _exec_mode(mode: str) -> str:
    return 'sequential' if mode == 'undivided' else mode


def benchmark_paired(
        model_names: List[str],
        args,
        device: torch.device,
        devices: Optional[List[torch.device]],
        cache: Dict[Tuple[str, str], Any],
) -> None:
    """Time the single-process rows of all requested models, one comparison per architecture (its S=1 network,
    divisions, backends and split modes built together and timed in the same rounds), into
    `cache[(model, mode)]` as a list of rows (one per backend) or the exception that stopped them."""
    backends = parse_split_backends(args.split_backend)
    groups: Dict[str, List[Run]] = OrderedDict()
    results: Dict[Tuple[str, str], List[Tuple[Run, Any]]] = OrderedDict()
    for name in model_names:
        for run_name, mode in planned_runs(name, args, devices):
            mode = _exec_mode(mode)
            if mode == 'member_parallel' or (run_name, mode) in cache:
                continue
            parsed = parse_splitnet_name(run_name)
            divided = parsed is not None and parsed[1] > 1 and mode == 'sequential'
            group = groups.setdefault(parsed[0] if parsed else run_name, [])
            for backend in (backends if divided else backends[:1]):
                if Run(run_name, mode, backend) not in group:
                    group.append(Run(run_name, mode, backend))
    for runs in groups.values():
        baseline = next((r for r in runs if r.mode == 'sequential' and _split_factor(r.name) == 1), None)
        if baseline is not None:  # S=1 first: the order of the first round
            runs.remove(baseline)
            runs.insert(0, baseline)
        _logger.info(f'Benchmarking {", ".join(r.label() for r in runs)} in paired rounds ...')
        rows = measure_group(runs, args, device, devices, baseline)
        for run in runs:
            results.setdefault((run.name, run.mode), []).append((run, rows[run]))
    for key, values in results.items():
        failed = [v for _, v in values if isinstance(v, Exception)]
        if len(failed) == len(values):
            cache[key] = failed[0]
            continue
        cache[key] = []
        for run, value in values:  # a backend that failed beside others that ran: an error row of its own
            if isinstance(value, Exception):
                _logger.error(f'{run.name} ({run.mode}, {run.backend}): {type(value).__name__}: {value}')
                value = OrderedDict(model=run.name, split_backend=run.backend, error=str(value))
            cache[key].append(value)


def benchmark_model(
        name: str,
        args,
        device: torch.device,
        devices: Optional[List[torch.device]],
        cache: Dict[Tuple[str, str], Any],
        reported: Collection[str] = (),
) -> List[Dict[str, Any]]:
    """The rows of one requested model, from `cache` (`benchmark_paired` and `benchmark_member_parallel` fill it):
    undivided / sequential / concurrent / member_parallel as they apply, the undivided one unless its model is in
    `reported`; a failure stored there is raised."""
    rows = []
    for run_name, mode in planned_runs(name, args, devices, warn=False, reported=reported):
        key = (run_name, _exec_mode(mode))
        if key not in cache:
            benchmark_paired([name], args, device, devices, cache)
        if isinstance(cache[key], Exception):
            raise cache[key]
        for cached in cache[key]:
            row = OrderedDict(cached)
            row['split_mode'] = mode
            row['group'] = name
            rows.append(row)
    return rows


# ----- data loading: CPU views vs device views -----

class _SyntheticImages(torch.utils.data.Dataset):
    """Random RGB PIL images of one size (drawn per index), class = index mod 10; `transform` set by the caller."""

    def __init__(self, num_images: int, size: int, seed: int = 0):
        self.num_images, self.size, self.seed = num_images, size, seed
        self.transform = None

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        from PIL import Image
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        pixels = torch.randint(0, 256, (self.size, self.size, 3), dtype=torch.uint8, generator=g)
        img = Image.fromarray(pixels.numpy())
        return (self.transform(img) if self.transform is not None else img), index % 10


def _time_loader(loader, device: torch.device, num_warm: int, num_bench: int) -> Tuple[float, int]:
    """(seconds, views) of `num_bench` batches after `num_warm`; the device is synchronised before each clock read."""
    it = iter(loader)
    for _ in range(num_warm):
        next(it)
    synchronize_devices([device])
    t0 = time.perf_counter()
    views = 0
    for _ in range(num_bench):
        x, _ = next(it)
        views += x.shape[0]
    synchronize_devices([device])
    return time.perf_counter() - t0, views


def bench_data(args, device: torch.device, dataset_name: str = '', data_dir: str = '') -> Dict[str, Any]:
    """Views/s of the two ways to feed S views per image: timm's loader with the views made by the data set's
    transform (`MultiViewTransform`: every view augmented on the CPU, normalised by the prefetcher) and
    `DeviceViewLoader` (decoded once on the CPU, the views made on `device`). Both use `--workers` processes, batch
    `-b` images and the same crop / flip / erasing. The images are those of `data_dir` read as `dataset_name` (an
    image folder, or streamed shards such as wds/...), or synthetic ones."""
    from timm.data import create_loader
    from timm_splitnet.data import (
        DeviceViewAugment, DeviceViewLoader, create_dataset, create_decode_transform, create_train_transform,
        set_loader_workers, set_views_transform)
    views = args.views
    if views is None:
        parsed = parse_splitnet_name(args.model) if args.model else None
        views = parsed[1] if parsed else 2
    size = args.img_size or (args.input_size[-1] if args.input_size else 32)
    input_size = (3, size, size)
    crop_mode = 'pad' if size <= 64 else 'rrc'
    num_batches = args.num_warm_iter + args.num_bench_iter
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def dataset():
        if data_dir:
            try:
                return create_dataset(dataset_name, root=data_dir, split='train', is_training=True,
                                      batch_size=args.batch_size, seed=args.seed)
            except (OSError, RuntimeError, ValueError, ImportError) as e:
                raise CliError(f'cannot read --dataset {dataset_name!r} in {data_dir}: {e}') from e
        return _SyntheticImages(args.batch_size * num_batches, size if crop_mode == 'pad' else size * 8 // 7)

    common = dict(batch_size=args.batch_size, is_training=True, no_aug=True, num_workers=args.workers,
                  pin_memory=device.type == 'cuda', device=device, input_size=input_size, mean=mean, std=std,
                  persistent_workers=False)
    if len(dataset()) < args.batch_size * num_batches:
        raise CliError(f'--bench data needs {args.batch_size * num_batches} images (-b x iterations), '
                       f'{data_dir} has {len(dataset())}.')
    cpu_loader = create_loader(dataset(), use_prefetcher=True, **common)
    set_loader_workers(cpu_loader.dataset, args.workers)
    set_views_transform(cpu_loader.dataset, create_train_transform(
        input_size, train_crop_mode=crop_mode, padding=max(1, size // 8), use_prefetcher=True, mean=mean, std=std),
        views)
    cpu_seconds, cpu_views = _time_loader(cpu_loader, device, args.num_warm_iter, args.num_bench_iter)

    plain = create_loader(dataset(), use_prefetcher=False, **common)
    set_loader_workers(plain.dataset, args.workers)
    plain.dataset.transform = create_decode_transform(input_size, crop_mode)
    augment = DeviceViewAugment(views, input_size, crop_mode=crop_mode, padding=max(1, size // 8), mean=mean, std=std,
                                seed=args.seed)
    dev_seconds, dev_views = _time_loader(
        DeviceViewLoader(plain, augment, device), device, args.num_warm_iter, args.num_bench_iter)
    return OrderedDict(
        bench='data', views=views, img_size=size, crop_mode=crop_mode, batch_size=args.batch_size,
        workers=args.workers, device=str(device), dataset=dataset_name or ('folder' if data_dir else 'synthetic'),
        data=data_dir or 'synthetic',
        cpu_views_per_sec=round(cpu_views / cpu_seconds, 1), device_views_per_sec=round(dev_views / dev_seconds, 1),
        speedup=round(cpu_seconds / cpu_views * dev_views / dev_seconds, 3))


def format_data_rows(rows: List[Dict[str, Any]]) -> str:
    """The table of `--bench data` rows."""
    lines = [f'{"data":<16} {"S":>3} {"img":>5} {"crop":>5} {"batch":>6} {"workers":>8} {"CPU views/s":>13} '
             f'{"device views/s":>15} {"speedup":>8}  device']
    for r in rows:
        lines.append(f'{r.get("dataset", ""):<16} {r["views"]:>3} {r["img_size"]:>5} {r["crop_mode"]:>5} '
                     f'{r["batch_size"]:>6} {r["workers"]:>8} {r["cpu_views_per_sec"]:>13.1f} '
                     f'{r["device_views_per_sec"]:>15.1f} {r["speedup"]:>8.2f}  {r["device"]}')
    return '\n'.join(lines)


def format_rows(rows: List[Dict[str, Any]]) -> str:
    """A readable table of result rows."""
    cols = [
        ('model', 'model', '{}', 32), ('split_mode', 'mode', '{}', 15), ('split_factor', 'S', '{}', 3),
        ('devices', 'devices', '{}', 15), ('infer_samples_per_sec', 'inf img/s', '{:.1f}', 10),
        ('infer_step_time_median', 'inf ms', '{:.2f}', 9), ('infer_latency_ms', 'ms/img', '{:.4f}', 9),
        ('infer_peak_mem_mb', 'inf MiB', '{:.0f}', 8), ('train_samples_per_sec', 'train img/s', '{:.1f}', 11),
        ('train_step_time_median', 'train ms', '{:.2f}', 9), ('param_count', 'params(M)', '{:.3f}', 9),
        ('gmacs', 'GMACs', '{:.3f}', 8),
    ]

    def cell(row, key, fmt):
        value = row.get(key, row.get('infer_gmacs', row.get('train_gmacs')) if key == 'gmacs' else None)
        if value is None:
            return '-'
        try:
            return fmt.format(value)
        except (ValueError, TypeError):
            return str(value)

    lines = [' '.join(f'{title:>{w}}' if i else f'{title:<{w}}' for i, (_, title, _, w) in enumerate(cols))]
    for row in rows:
        if 'error' in row:
            lines.append(f'{row["model"]:<32} error: {row["error"]}')
            continue
        lines.append(' '.join(
            f'{cell(row, k, fmt):>{w}}' if i else f'{cell(row, k, fmt):<{w}}' for i, (k, _, fmt, w) in enumerate(cols)))
    return '\n'.join(lines)


def load_results(path: str) -> List[Dict[str, Any]]:
    """Result rows of a JSON results file (a list of rows, or {'results': [...]})."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise CliError(f'results file not found: {path}') from e
    except json.JSONDecodeError as e:
        raise CliError(f'{path} is not a JSON results file ({e}); re-plot needs --results-format json output.') from e
    rows = data.get('results', data) if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise CliError(f'{path} does not hold a list of result rows.')
    return rows


# ----- the comparison of a bare `python benchmark.py` -----

# per device type: the undivided network and its S=2, S=4 divisions, at a size that runs in about a minute there
DEFAULT_COMPARISON = {
    'cpu': dict(arch='wrn16_8', img_size=32, num_classes=100, batch_size=8, num_warm_iter=1, num_bench_iter=10,
                rounds=10, num_threads=1),
    'cuda': dict(arch='wrn50_3', img_size=224, num_classes=1000, batch_size=64, num_warm_iter=5, num_bench_iter=30,
                 rounds=10),
}
DEFAULT_SPLIT_FACTORS = (1, 2, 4)


def explicit_dests(argv: Optional[List[str]]) -> set:
    """The dests that `argv` sets itself (not left at the parser's default)."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parsed = parser.parse_args(argv, namespace)
    return {dest for dest, value in vars(parsed).items() if value is not unset}


def resolve_default_comparison(args, device: torch.device, explicit: set) -> List[str]:
    """Fill in the comparison run when no model is given: an undivided network beside its S=2 and S=4 divisions,
    sized for `device` (WRN-16-8 at 32 px on a CPU, WRN-50-3 at 224 px on a GPU).

    Settings given on the command line are kept; returns the model names.
    """
    sizing = dict(DEFAULT_COMPARISON.get(device.type, DEFAULT_COMPARISON['cuda']))
    arch = sizing.pop('arch')
    for dest, value in sizing.items():
        if dest not in explicit:
            setattr(args, dest, value)
    if 'compare_undivided' not in explicit:
        args.compare_undivided = False  # S=1 is in the list itself
    names = [splitnet_name(arch, s) for s in DEFAULT_SPLIT_FACTORS]
    _logger.info(
        f'No model given: comparing {", ".join(names)} on {device} at {args.img_size} px, batch size '
        f'{args.batch_size} (pass --model NAME to benchmark another model).')
    return names


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Command line entry point; returns the result rows (raises SystemExit with a message on bad input).

    Without --model / --model-list it runs `resolve_default_comparison` (S=1 beside S=2 and S=4, with the ratios).

    With `--member-parallel` (under torchrun) every rank runs the member-parallel rows first; then rank 0 alone runs
    the single-process rows, reports and returns all rows, the other ranks return an empty list.
    """
    args = parser.parse_args(argv)
    if args.plot_from:
        with cli_session('benchmark.py'):
            if not args.plot:
                raise CliError('--plot-from needs --plot FILE.png.')
            rows = load_results(args.plot_from)
            _plot(rows, args.plot)
            return rows
    if args.bench == 'data':
        with cli_session('benchmark.py'):
            device = resolve_device_checked(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
            rows = [bench_data(args, device, args.dataset, args.data_dir)]
            if args.compare_folder:
                rows.append(bench_data(args, device, '', args.compare_folder))
        print_results(rows, args, table=format_data_rows(rows))
        return rows
    with cli_session('benchmark.py', args.member_parallel) as rank:
        resolve_precision(args.precision)
        if args.amp and args.amp_dtype is not None:
            resolve_amp_dtype(args.amp_dtype, torch.device('meta'))  # a bad name stops before any model is built
        devices = parse_devices_checked(args.devices) if args.devices else None
        device = resolve_device_checked(args.device) if args.device or not devices else devices[0]
        if device.type == 'cuda' or any(d.type == 'cuda' for d in devices or []):  # as timm's benchmark.py
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
        explicit = explicit_dests(argv)
        if args.model or args.model_list:
            model_names = expand_model_names(args.model, args.model_list)
        else:
            model_names = resolve_default_comparison(args, device, explicit)
        if 'rounds' not in explicit:  # never more timed steps than --num-bench-iter asks for
            args.rounds = max(1, min(args.rounds, args.num_bench_iter))
        if args.rounds < 1 or (args.num_threads is not None and args.num_threads < 1):
            raise CliError(f'--rounds and --num-threads need at least 1, got {args.rounds} and {args.num_threads}.')
        rows, cache = [], {}
        if args.member_parallel:
            benchmark_member_parallel(model_names, args, cache, rank)
            finish_member_parallel()
            if rank != 0:
                return []  # rank 0 runs the single-process rows alone, on an otherwise idle machine
        benchmark_paired(model_names, args, device, devices, cache)
        for name in model_names:
            reported = set(model_names) | {r['model'] for r in rows if r.get('split_mode') == 'undivided'}
            try:
                rows += benchmark_model(name, args, device, devices, cache, reported)
            except torch.cuda.OutOfMemoryError as e:
                _logger.error(f'{name}: out of memory at batch size {args.batch_size}: {str(e).splitlines()[0]}')
                rows.append(OrderedDict(model=name, error=f'out of memory at batch size {args.batch_size}'))
            except Exception as e:
                if len(model_names) == 1:
                    raise
                # bulk mode: report the model's failure and go on with the others (as timm's benchmark.py)
                _logger.error(f'{name}: {type(e).__name__}: {e}', exc_info=not isinstance(e, CliError))
                rows.append(OrderedDict(model=name, error=str(e)))
    print_results(rows, args, table=format_rows(rows))
    if len(rows) > 1:  # the human summary after the JSON
        print('\n' + format_summary(rows))
        print('\n'.join(verdicts(rows)))
    if args.plot:
        _plot(rows, args.plot)
    if any('error' in r for r in rows):
        raise SystemExit(1)
    return rows


def _plot(rows: List[Dict[str, Any]], path: str) -> None:
    from timm_splitnet.plots import plot_latency
    plot_latency(rows, path)
    _logger.info(f'Plot written to {path}')


if __name__ == '__main__':
    from torch.distributed.elastic.multiprocessing.errors import record
    record(main)()  # under torchrun: the failing rank's traceback in torchrun's summary
