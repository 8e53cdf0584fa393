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

Result keys follow timm's benchmark.py (`infer_samples_per_sec`, `infer_step_time` (mean ms), `infer_batch_size`,
`infer_img_size`, `infer_gmacs`, `train_*`, `param_count`), plus `infer_step_time_median`, `infer_latency_ms`
(median step time per image), `infer_peak_mem_mb` (CUDA only), `split_mode`, `split_factor`, `split_backend`,
`devices`, `world_size` (member-parallel rows) and `group` (the requested model a row belongs to).

Hacked together by the timm-splitnet authors
"""
import argparse
import gc
import json
import logging
import re
import statistics
import time
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

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

_logger = logging.getLogger('benchmark')

SPLIT_MODES = ('undivided', 'sequential', 'concurrent', 'member_parallel')
_SPLITNET_NAME = re.compile(r'^splitnet_(?P<arch>.+)_s(?P<s>\d+)$')

parser = argparse.ArgumentParser(description='SplitNet / timm model benchmark')
parser.add_argument('--bench', default='both', type=str, choices=['infer', 'train', 'both', 'data'],
                    help='benchmark mode: "both", "infer", "train", or "data": views/s of the CPU multi-view loader '
                         'and of the views made on the device (train.py --views-on-device) (default: both)')
parser.add_argument('--num-warm-iter', default=10, type=int,
                    help='number of warmup iterations (default: 10; at least 1 with --member-parallel)')
parser.add_argument('--num-bench-iter', default=40, type=int, help='number of benchmark iterations (default: 40)')
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
                    help='run inference at train size, not test-input-size if it exists')
parser.add_argument('--amp', action='store_true', default=False,
                    help='use PyTorch Native AMP for mixed precision training. Overrides --precision arg.')
parser.add_argument('--amp-dtype', default=None, type=str,
                    help='lower precision AMP dtype (default: float16). Overrides --precision arg if args.amp True.')
parser.add_argument('--precision', default='float32', type=str,
                    help='numeric precision. One of (amp, amp_float16, amp_bfloat16, float16, bfloat16, float32)')
parser.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                    help='enable compilation w/ specified backend (default: inductor); not for concurrent runs')
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
                    help='--bench data: image folder (ImageNet layout, its train split; default: synthetic images)')
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


# ----- timing -----

def time_steps(step: Callable[[], Any], devices: Sequence[torch.device], num_warm: int, num_bench: int) -> List[float]:
    """Step times (ms) of `num_bench` calls after `num_warm` warm-up calls; every device used is synchronised."""
    for _ in range(num_warm):
        step()
    synchronize_devices(devices)
    times = []
    for _ in range(num_bench):
        t0 = time.perf_counter()
        step()
        synchronize_devices(devices)
        times.append((time.perf_counter() - t0) * 1000.)
    return times


def _reset_peak_memory(devices: Sequence[torch.device]) -> None:
    for d in cuda_devices(devices):
        torch.cuda.reset_peak_memory_stats(d)


def _peak_memory_mb(devices: Sequence[torch.device]) -> Optional[float]:
    """Largest `max_memory_allocated` over the CUDA devices used (MiB), None on CPU."""
    peaks = [torch.cuda.max_memory_allocated(d) for d in cuda_devices(devices)]
    return round(max(peaks) / 2 ** 20, 1) if peaks else None


def _summary(times_ms: List[float], batch_size: int, img_size: int) -> Dict[str, Any]:
    mean = statistics.fmean(times_ms)
    median = statistics.median(times_ms)
    return OrderedDict(
        samples_per_sec=round(batch_size * 1000. / mean, 2),
        step_time=round(mean, 3),
        step_time_median=round(median, 3),
        latency_ms=round(median / batch_size, 4),
        batch_size=batch_size,
        img_size=img_size,
    )


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
    ):
        self.name = name
        self.mode = mode
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
            self.split_backend = set_split_backend(self.model, args.split_backend)
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


def bench_infer(setup: BenchSetup, args) -> Dict[str, Any]:
    setup.train(False)
    x = setup.input(args.batch_size)

    def step():
        with torch.inference_mode(), setup.autocast():
            setup.forward(x)

    _reset_peak_memory(setup.devices)
    times = time_steps(step, setup.devices, max(args.num_warm_iter, setup.min_warm_iter), args.num_bench_iter)
    results = _summary(times, args.batch_size, setup.input_size[-1])
    results['gmacs'] = setup.gmacs
    results['peak_mem_mb'] = _peak_memory_mb(setup.devices)
    return results


def bench_train(setup: BenchSetup, args) -> Dict[str, Any]:
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

    _reset_peak_memory(setup.devices)
    times = time_steps(step, setup.devices, max(args.num_warm_iter, setup.min_warm_iter), args.num_bench_iter)
    results = _summary(times, args.batch_size, setup.input_size[-1])
    results['peak_mem_mb'] = _peak_memory_mb(setup.devices)
    setup.train(False)
    return results


def benchmark_one(
        name: str,
        mode: str,
        args,
        device: Optional[torch.device],
        devices: Optional[List[torch.device]],
) -> Dict[str, Any]:
    """One result row: `name` in split mode `mode`, infer and / or train keys merged as in timm."""
    setup = BenchSetup(name, mode, args, device, devices)
    device = setup.device
    try:
        row = OrderedDict(model=name)
        row.update(setup.info())
        if args.bench in ('infer', 'both'):
            row.update((f'infer_{k}', v) for k, v in bench_infer(setup, args).items())
        if args.bench in ('train', 'both'):
            train = bench_train(setup, args)
            row.update((f'train_{k}', v) for k, v in train.items())
            if 'infer_gmacs' not in row:
                row['train_gmacs'] = setup.gmacs
        row['param_count'] = round(setup.param_count / 1e6, 4)
    finally:
        setup.close()
        del setup
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return row


def benchmark_member_parallel(
        model_names: List[str],
        args,
        cache: Dict[Tuple[str, str], Any],
        rank: int = 0,
) -> None:
    """The member-parallel run of every model, on every rank (collectives), into `cache[(name, 'member_parallel')]`.

    A failure is stored in the cache (the row of rank 0 reports it) and logged on the other ranks; with a single
    model it is raised, except out of memory (reported as a row, as the single-process runs do).
    """
    for name in model_names:
        key = (name, 'member_parallel')
        _logger.info(f'Benchmarking {name} (member_parallel) ...')
        try:
            cache[key] = benchmark_one(name, 'member_parallel', args, None, None)
        except Exception as e:
            if len(model_names) == 1 and not isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            if rank != 0:
                _logger.error(f'{name} (member_parallel): {type(e).__name__}: {e}')
            cache[key] = e


def benchmark_model(
        name: str,
        args,
        device: torch.device,
        devices: Optional[List[torch.device]],
        cache: Dict[Tuple[str, str], Any],
        reported: Collection[str] = (),
) -> List[Dict[str, Any]]:
    """The rows of one requested model: undivided / sequential / concurrent / member_parallel as they apply.

    The member-parallel row comes from the cache (`benchmark_member_parallel` ran it first); a failure stored
    there is raised. The undivided comparison is left out when its model is in `reported` (the caller's table has
    its row already: requested itself, or compared with an earlier model).
    """
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
        else:
            _logger.warning(f'no undivided model {undivided} to compare {name} with.')
    runs.append((name, 'sequential' if parsed else 'single'))
    if devices and parsed:
        runs.append((name, 'concurrent'))
    elif devices:
        _logger.warning(f'--devices ignored for {name}: not a SplitNet.')
    if args.member_parallel:
        runs.append((name, 'member_parallel'))
        if isinstance(cache.get((name, 'member_parallel')), Exception):
            raise cache[(name, 'member_parallel')]
    rows = []
    for run_name, mode in runs:
        key = (run_name, mode)
        if key not in cache:
            _logger.info(f'Benchmarking {run_name} ({mode}) ...')
            cache[key] = benchmark_one(run_name, mode, args, device, devices)
            if mode == 'undivided':
                cache[(run_name, 'sequential')] = cache[key]
        row = OrderedDict(cache[key])
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


def bench_data(args, device: torch.device) -> Dict[str, Any]:
    """Views/s of the two ways to feed S views per image: timm's loader over `MultiViewDataset` (every view
    augmented on the CPU, normalised by the prefetcher) and `DeviceViewLoader` (decoded once on the CPU, the views
    made on `device`). Both use `--workers` processes, batch `-b` images and the same crop / flip / erasing."""
    from timm.data import create_loader
    from timm_splitnet.data import (
        DeviceViewAugment, DeviceViewLoader, MultiViewDataset, create_dataset, create_decode_transform,
        create_train_transform)
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
        if args.data_dir:
            return create_dataset('', root=args.data_dir, split='train', is_training=True)
        return _SyntheticImages(args.batch_size * num_batches, size if crop_mode == 'pad' else size * 8 // 7)

    common = dict(batch_size=args.batch_size, is_training=True, no_aug=True, num_workers=args.workers,
                  pin_memory=device.type == 'cuda', device=device, input_size=input_size, mean=mean, std=std,
                  persistent_workers=False)
    if len(dataset()) < args.batch_size * num_batches:
        raise CliError(f'--bench data needs {args.batch_size * num_batches} images (-b x iterations), '
                       f'--data-dir {args.data_dir} has {len(dataset())}.')
    cpu_loader = create_loader(MultiViewDataset(dataset(), views), use_prefetcher=True, **common)
    cpu_loader.dataset.transform = create_train_transform(
        input_size, train_crop_mode=crop_mode, padding=max(1, size // 8), use_prefetcher=True, mean=mean, std=std)
    cpu_seconds, cpu_views = _time_loader(cpu_loader, device, args.num_warm_iter, args.num_bench_iter)

    plain = create_loader(dataset(), use_prefetcher=False, **common)
    plain.dataset.transform = create_decode_transform(input_size, crop_mode)
    augment = DeviceViewAugment(views, input_size, crop_mode=crop_mode, padding=max(1, size // 8), mean=mean, std=std,
                                seed=args.seed)
    dev_seconds, dev_views = _time_loader(
        DeviceViewLoader(plain, augment, device), device, args.num_warm_iter, args.num_bench_iter)
    return OrderedDict(
        bench='data', views=views, img_size=size, crop_mode=crop_mode, batch_size=args.batch_size,
        workers=args.workers, device=str(device), data=args.data_dir or 'synthetic',
        cpu_views_per_sec=round(cpu_views / cpu_seconds, 1), device_views_per_sec=round(dev_views / dev_seconds, 1),
        speedup=round(cpu_seconds / cpu_views * dev_views / dev_seconds, 3))


def format_data_rows(rows: List[Dict[str, Any]]) -> str:
    """The table of `--bench data` rows."""
    lines = [f'{"S":>3} {"img":>5} {"crop":>5} {"batch":>6} {"workers":>8} {"CPU views/s":>13} '
             f'{"device views/s":>15} {"speedup":>8}  device']
    for r in rows:
        lines.append(f'{r["views"]:>3} {r["img_size"]:>5} {r["crop_mode"]:>5} {r["batch_size"]:>6} {r["workers"]:>8} '
                     f'{r["cpu_views_per_sec"]:>13.1f} {r["device_views_per_sec"]:>15.1f} {r["speedup"]:>8.2f}  '
                     f'{r["device"]}')
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
    'cpu': dict(arch='wrn16_8', img_size=32, num_classes=100, batch_size=8, num_warm_iter=1, num_bench_iter=3),
    'cuda': dict(arch='wrn50_3', img_size=224, num_classes=1000, batch_size=64, num_warm_iter=5, num_bench_iter=20),
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


def add_throughput_ratios(rows: List[Dict[str, Any]]) -> List[str]:
    """Add the throughput of every divided SplitNet row relative to its undivided S=1 network (`infer_vs_s1`,
    `train_vs_s1`) where both are in `rows`; returns one readable line per such row."""
    baselines = {}
    for row in rows:
        parsed = parse_splitnet_name(str(row.get('model', '')))
        if parsed and parsed[1] == 1 and 'error' not in row:
            baselines.setdefault(parsed[0], row)
    lines = []
    for row in rows:
        parsed = parse_splitnet_name(str(row.get('model', '')))
        if not parsed or parsed[1] == 1 or parsed[0] not in baselines or 'error' in row:
            continue
        base = baselines[parsed[0]]
        parts = []
        for kind, title in (('infer', 'inference'), ('train', 'training')):
            key = f'{kind}_samples_per_sec'
            if row.get(key) and base.get(key):
                row[f'{kind}_vs_s1'] = round(row[key] / base[key], 3)
                parts.append(f'{title} {row[f"{kind}_vs_s1"]:.2f}x')
        if parts:
            lines.append(f'{row["model"]} ({row.get("split_mode", "")}): {", ".join(parts)} the throughput of '
                         f'{base["model"]}')
    return lines


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
            rows = [bench_data(args, device)]
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
        if args.model or args.model_list:
            model_names = expand_model_names(args.model, args.model_list)
        else:
            model_names = resolve_default_comparison(args, device, explicit_dests(argv))
        rows, cache = [], {}
        if args.member_parallel:
            benchmark_member_parallel(model_names, args, cache, rank)
            finish_member_parallel()
            if rank != 0:
                return []  # rank 0 runs the single-process rows alone, on an otherwise idle machine
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
    ratios = add_throughput_ratios(rows)
    table = format_rows(rows)
    if ratios:
        table += '\nThroughput relative to the undivided network:\n' + '\n'.join(f'  {line}' for line in ratios)
    print_results(rows, args, table=table)
    if args.plot:
        _plot(rows, args.plot)
    if any('error' in r for r in rows):
        raise SystemExit(1)
    return rows


def _plot(rows: List[Dict[str, Any]], path: str) -> None:
    from timm_splitnet.plots import plot_latency
    plot_latency(rows, path)
    _logger.info(f'Latency plot written to {path}')


if __name__ == '__main__':
    from torch.distributed.elastic.multiprocessing.errors import record
    record(main)()  # under torchrun: the failing rank's traceback in torchrun's summary
