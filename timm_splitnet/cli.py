""" Command-line plumbing shared by train.py, validate.py and benchmark.py

Argument groups, model creation with helpful errors, devices and precision, results files, logging, and the
torchrun / member-parallel session of a script. `CliError` is bad input, reported as one line by `cli_errors`;
`as_cli_error` turns a library's ValueError / RuntimeError into one.
"""
import argparse
import csv
import difflib
import json
import logging
import os
import re
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

import timm
from timm.utils import ParseKwargs, setup_default_logging

from .parallel.concurrent import parse_devices, resolve_device
from .parallel.member_parallel import MemberParallelPlan, MemberParallelSplitNet, init_member_parallel
from .task.distributed import select_split_backend
from .utils.flops import count_macs
from .models import SPLIT_ARCHS, SplitNet, create_splitnet, member_kwargs

__all__ = [
    'CliError', 'cli_errors', 'as_cli_error', 'cli_session', 'add_model_args', 'add_input_args', 'add_results_args',
    'add_member_parallel_args', 'resolve_data_dir', 'is_wildcard', 'expand_model_names', 'parse_splitnet_name',
    'check_model_name', 'create_any_model', 'create_model_checked', 'model_kwargs', 'set_split_backend',
    'check_compile_backend',
    'model_gmacs', 'resolve_device_checked', 'parse_devices_checked',
    'resolve_amp_dtype', 'autocast_factory', 'write_results', 'print_results', 'setup_logging', 'TORCHRUN_ENV',
    'torchrun_rank', 'check_torchrun_env', 'check_rank_device', 'init_member_parallel_checked', 'rank_devices',
    'finish_member_parallel',
]

_logger = logging.getLogger(__name__)
_owns_process_group = False  # the default process group was created by init_member_parallel_checked

# what `torchrun` (torch.distributed.run) sets for every worker; env:// initialisation reads them
TORCHRUN_ENV = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


# ----- errors -----

class CliError(Exception):
    """Bad input on the command line: reported as one message and a non-zero exit, without a traceback."""


@contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    """Report a `CliError` raised in the block as `SystemExit('<prog>: error: <message>')` (argparse's format)."""
    try:
        yield
    except CliError as e:
        raise SystemExit(f'{prog}: error: {e}') from None


@contextmanager
def as_cli_error(*types: Type[Exception]) -> Iterator[None]:
    """Re-raise `types` (default: ValueError) raised in the block as a `CliError` with the same message."""
    catch = types or (ValueError,)
    try:
        yield
    except catch as e:
        raise CliError(str(e)) from e


# ----- arguments -----

def add_model_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--model (or a wildcard), --model-list, --model-kwargs, --num-classes, --split-backend."""
    group = parser.add_argument_group('Model')
    group.add_argument('--model', '-m', metavar='NAME', default=None,
                       help='name of the model (timm name or splitnet_<arch>_s<S>); a wildcard such as '
                            '"splitnet_resnet110_s*" runs every match')
    group.add_argument('--model-list', metavar='FILE_OR_NAMES', default='',
                       help='file with one model name per line, or a comma separated list of names / wildcards')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra model kwargs, e.g. --model-kwargs drop_rate=0.1')
    group.add_argument('--num-classes', type=int, default=None,
                       help='size of the classifier (default: the model\'s own)')
    group.add_argument('--split-backend', default=None, type=str,
                       help='SplitNet member execution backend (e.g. loop)')
    return group


def add_input_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """-b / --batch-size, --img-size, --input-size, --channels-last."""
    group = parser.add_argument_group('Input')
    group.add_argument('-b', '--batch-size', default=256, type=int, metavar='N',
                       help='images per batch (default: 256)')
    group.add_argument('--img-size', default=None, type=int, metavar='N',
                       help='side of the square input image (default: the model\'s)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar=('C', 'H', 'W'),
                       help='full input shape C H W, e.g. --input-size 3 224 224; wins over --img-size '
                            '(default: the model\'s)')
    group.add_argument('--channels-last', action='store_true', default=False,
                       help='keep model and inputs in the channels_last (NHWC) layout')
    return group


def add_results_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--results-file, --results-format."""
    group = parser.add_argument_group('Results')
    group.add_argument('--results-file', default='', type=str, metavar='FILENAME',
                       help='output results file (written by rank 0 only with --member-parallel)')
    group.add_argument('--results-format', default='csv', type=str, choices=['csv', 'json'],
                       help='how --results-file is written: csv (one row per result) or json (a list) (default: csv)')
    return group


def add_member_parallel_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--member-parallel, --dist-backend, --dist-timeout (runs under torchrun)."""
    group = parser.add_argument_group(
        'Member-parallel (launch with torchrun --nproc_per_node=N; N divides S or is a multiple of S)')
    group.add_argument('--member-parallel', action='store_true', default=False,
                       help='one process per member (group): member i on rank i mod N, logits gathered over the '
                            'processes; every rank loads the full model, rank 0 reports')
    group.add_argument('--dist-backend', default=None, type=str,
                       help='torch.distributed backend (default: nccl on CUDA, gloo on CPU)')
    group.add_argument('--dist-timeout', default=600., type=float, metavar='SECONDS',
                       help='timeout of every collective: a dead or stalled rank fails the run after it '
                            '(default: 600)')
    return group


def resolve_data_dir(positional: Optional[str], option: Optional[str]) -> Optional[str]:
    """The data folder given as the positional DIR (timm's form) or as --data-dir; both may name the same folder.

    Raises:
        CliError: Both are given and name different folders.
    """
    if positional and option and os.path.abspath(positional) != os.path.abspath(option):
        raise CliError(f'two data folders given: DIR {positional!r} and --data-dir {option!r}; pass one of them.')
    return option or positional or None


# ----- models -----

def is_wildcard(name: str) -> bool:
    """True for a model name with fnmatch wildcards (`*`, `?`, `[...]`)."""
    return any(c in name for c in '*?[')


def expand_model_names(model: Optional[str] = None, model_list: str = '') -> List[str]:
    """Model names of `--model` and `--model-list` (file or comma list), wildcards expanded with timm.list_models.

    Raises:
        CliError: No model given, or a wildcard matches nothing.
    """
    names = []
    if model_list:
        if os.path.isfile(model_list):
            with open(model_list) as f:
                names += [line.strip() for line in f if line.strip() and not line.strip().startswith('#')]
        else:
            names += [n.strip() for n in model_list.split(',') if n.strip()]
    if model:
        names.append(model)
    if not names:
        raise CliError('no model given: use --model NAME (or a wildcard) or --model-list FILE_OR_NAMES.')
    out = []
    for name in names:
        if is_wildcard(name):
            matches = timm.list_models(name)
            if not matches:
                raise CliError(f'no registered model matches {name!r}.')
            out += matches
        else:
            out.append(name)
    return list(dict.fromkeys(out))


_SPLITNET_NAME = re.compile(r'^splitnet_(?P<arch>.+)_s(?P<split_factor>\d+)$')


def parse_splitnet_name(name: str) -> Optional[Tuple[str, int]]:
    """(arch, S) of a `splitnet_<arch>_s<S>` name whose arch is a known SplitNet architecture, else None.

    Only S = 1, 2, 4 are registered in timm; this name form reaches every S a division rule defines.
    """
    match = _SPLITNET_NAME.match(name)
    if match is None or match['arch'] not in SPLIT_ARCHS:
        return None
    return match['arch'], int(match['split_factor'])


def check_model_name(name: str) -> None:
    """Raise a CliError when `name` is neither a registered timm model nor `splitnet_<arch>_s<S>` of a known arch.

    The error lists close matches; an S that the division rule of a known arch does not define gives the rule's
    message (the supported S).
    """
    if ':' in name or timm.is_model(name):  # hf-hub:, local-dir: ... are resolved by timm
        return
    parsed = parse_splitnet_name(name)
    if parsed is not None:
        with as_cli_error():
            member_kwargs(*parsed)
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
    hint = f' Did you mean: {", ".join(close)}?' if close else ' See timm.list_models() (or "splitnet_*").'
    raise CliError(f'unknown model {name!r}.{hint}')


def create_any_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """`timm.create_model`, plus `splitnet_<arch>_s<S>` names of S values that are not registered (built by
    `create_splitnet`)."""
    parsed = None if timm.is_model(name) else parse_splitnet_name(name)
    if parsed is not None:
        return create_splitnet(*parsed, pretrained=pretrained, **{k: v for k, v in kwargs.items() if v is not None})
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def create_model_checked(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """`create_any_model` with bad names and bad kwargs reported as a CliError."""
    check_model_name(name)
    try:
        return create_any_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, ValueError, TypeError, FileNotFoundError, KeyError) as e:
        raise CliError(f'could not create model {name!r}: {e}') from e


def model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The model kwargs of `--model-kwargs` and `--num-classes`."""
    kwargs = dict(getattr(args, 'model_kwargs', None) or {})
    if getattr(args, 'num_classes', None) is not None:
        kwargs['num_classes'] = args.num_classes
    return kwargs


def set_split_backend(model: nn.Module, backend: Optional[str]) -> Optional[str]:
    """Select the member execution backend of a SplitNet (`--split-backend`); returns the backend name (None for
    plain models). An unknown backend is reported as a CliError."""
    with as_cli_error():
        return select_split_backend(model, backend)


def check_compile_backend(torchcompile: Optional[str], split_backend: Optional[str]) -> None:
    """`--torchcompile` needs a backend chosen before compiling: refuse 'auto', which times its candidates on the
    first batch (that trial must not run inside the compiled graph)."""
    if torchcompile and split_backend == 'auto':
        raise CliError('--torchcompile with --split-backend auto: the auto backend times its candidates on the first '
                       'batch, which must not run inside the compiled graph; pass --split-backend loop or packed.')


def model_gmacs(
        name: str,
        input_size: Sequence[int],
        model: Optional[nn.Module] = None,
        **kwargs,
) -> Optional[float]:
    """Giga multiply-adds per image of `name`, counted on a copy built on the meta device (no memory, no compute).

    Falls back to counting on `model` when the meta build fails; returns None if neither works.
    """
    if model is not None and getattr(model, 'num_classes', None):
        kwargs.setdefault('num_classes', model.num_classes)  # e.g. the head of --pretrained-path weights
    try:
        with torch.device('meta'):
            meta_model = create_any_model(name, pretrained=False, **kwargs)
        return round(count_macs(meta_model, tuple(input_size)) / 1e9, 4)
    except Exception as e:  # some models cannot run on meta tensors
        _logger.debug(f'MAC count on the meta device failed for {name}: {e}')
    if model is None:
        return None
    try:
        return round(count_macs(model, tuple(input_size)) / 1e9, 4)
    except Exception as e:
        _logger.warning(f'could not count MACs of {name}: {e}')
        return None


# ----- devices and precision -----

def resolve_device_checked(device: Optional[str]) -> torch.device:
    """The `--device` (default: cuda if available, else cpu), checked to exist."""
    if not device:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    with as_cli_error():
        return resolve_device(device)


def parse_devices_checked(devices: str) -> List[torch.device]:
    """The `--devices` list ('cuda:0,cuda:1'), every device checked to exist."""
    with as_cli_error():
        return parse_devices(devices)


def resolve_amp_dtype(name: str) -> torch.dtype:
    """The dtype of `--amp-dtype` (float16 / half / bfloat16)."""
    dtypes = {'float16': torch.float16, 'half': torch.float16, 'bfloat16': torch.bfloat16}
    if name not in dtypes:
        raise CliError(f'unknown --amp-dtype {name!r}, expected float16 or bfloat16.')
    return dtypes[name]


def autocast_factory(device: torch.device, amp_dtype: Optional[torch.dtype]) -> Callable[[], Any]:
    """A context factory: autocast on `device` with `amp_dtype`, or a null context without one."""
    if amp_dtype is None:
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=amp_dtype)


# ----- results and logging -----

def write_results(results_file: str, results: List[Dict[str, Any]], format: str = 'csv') -> None:
    """Write result rows as JSON (a list) or CSV (one row per result, columns = union of keys in order)."""
    directory = os.path.dirname(os.path.abspath(results_file))
    os.makedirs(directory, exist_ok=True)
    with open(results_file, mode='w', newline='') as f:
        if format == 'json':
            json.dump(results, f, indent=4)
        else:
            keys = list(dict.fromkeys(k for r in results for k in r))
            dw = csv.DictWriter(f, fieldnames=keys, restval='')
            dw.writeheader()
            for r in results:
                dw.writerow(r)


def print_results(results: List[Dict[str, Any]], args: argparse.Namespace, table: str = '') -> None:
    """Write `--results-file` (in `--results-format`), print `table` and the rows as JSON after a `--result` line
    (the format of timm's scripts, for tools that read a script's output)."""
    if getattr(args, 'results_file', ''):
        write_results(args.results_file, results, format=args.results_format)
    if table:
        print(table)
    print(f'--result\n{json.dumps(results, indent=4)}')


def setup_logging(rank: int = 0) -> None:
    """timm's default logging (warnings only on ranks other than 0), unless the process (e.g. pytest) configured
    logging already."""
    if not logging.getLogger().handlers:
        setup_default_logging(default_level=logging.INFO if rank == 0 else logging.WARNING)


# ----- member-parallel runs (torchrun) -----

def torchrun_rank() -> int:
    """This process's global rank: torch.distributed's when initialised, else torchrun's RANK (0 outside it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get('RANK', 0))


@contextmanager
def cli_session(prog: str, member_parallel: bool = False) -> Iterator[int]:
    """The frame of a script's `main`: logging, errors reported by `cli_errors`, the torchrun check; yields the rank.

    With `member_parallel` the rank is torchrun's (other ranks log warnings only and name their rank in error
    messages) and a launch without torchrun is refused with the command to use; otherwise the rank is 0.
    """
    rank = torchrun_rank() if member_parallel else 0
    setup_logging(rank)
    with cli_errors(prog if rank == 0 else f'{prog} (rank {rank})'):
        if member_parallel:
            check_torchrun_env(prog)
        yield rank


def check_torchrun_env(prog: str) -> None:
    """Raise a CliError telling how to launch `prog` when this process does not run under torchrun.

    Raises:
        CliError: A torchrun variable (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is missing, or
            torch.distributed is not available in this torch build.
    """
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise CliError(
            f'--member-parallel runs one process per member (group): launch {prog} with torchrun, e.g. '
            f'"torchrun --nproc_per_node=N {prog} ... --member-parallel" (N divides the number of members S or '
            f'is a multiple of S). Not set here: {", ".join(missing)}.')
    if not torch.distributed.is_available():
        raise CliError('--member-parallel needs torch.distributed, which this torch build does not have.')


def check_rank_device(device: Optional[str]) -> None:
    """Check the `--device` of a member-parallel rank: one GPU per local rank (cuda:LOCAL_RANK) must exist.

    Raises:
        CliError: An unknown device, one GPU index for several processes of a node, or fewer GPUs than processes.
    """
    if not device:
        if not torch.cuda.is_available():
            return
        device = 'cuda'
    dev = resolve_device_checked(device)
    if dev.type != 'cuda':
        return
    local_ranks = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    if torch.device(device).index is not None:
        if local_ranks > 1:
            raise CliError(f'--device {device} would put all {local_ranks} processes of this node on one GPU: use '
                           f'--device cuda (process LOCAL_RANK on cuda:LOCAL_RANK).')
        return
    count, local_rank = torch.cuda.device_count(), int(os.environ.get('LOCAL_RANK', 0))
    if local_rank >= count:
        raise CliError(f'process LOCAL_RANK={local_rank} has no GPU: this node has {count} CUDA device(s) for '
                       f'{local_ranks} processes (torchrun --nproc_per_node at most {count}).')


def init_member_parallel_checked(
        model: nn.Module,
        device: Optional[str] = None,
        backend: Optional[str] = None,
        timeout: Optional[float] = None,
        name: str = '',
) -> Tuple[nn.Module, MemberParallelPlan, torch.device]:
    """Wrap a SplitNet for member-parallel inference under torchrun; the inputs are checked first.

    Every rank builds the full model and loads its weights; this keeps member i on rank i mod N (its replicas on
    the ranks i + S, i + 2S, ... when N is a multiple of S), initialising the default process group from torchrun's
    environment on the first call. A collective: every rank calls it, for the same models in the same order.

    Args:
        model: The SplitNet, weights loaded, ensemble set (taken apart: see `MemberParallelSplitNet`).
        device: `--device`: 'cuda' (cuda:LOCAL_RANK), 'cpu', or None (cuda if available).
        backend: `--dist-backend` (default: nccl on CUDA, gloo otherwise).
        timeout: `--dist-timeout` in seconds (default: 10 minutes).
        name: The model name, for messages.

    Returns:
        (MemberParallelSplitNet on this rank's device, MemberParallelPlan, device).

    Raises:
        CliError: Not a SplitNet, a world size that does not fit S, or a bad device.
    """
    name = name or type(model).__name__
    if not isinstance(model, SplitNet):
        raise CliError(f'--member-parallel needs a SplitNet model, {name} is a {type(model).__name__}.')
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    with as_cli_error():
        MemberParallelPlan(world_size, torchrun_rank(), model.split_factor)  # checked before any process group
    check_rank_device(device)
    global _owns_process_group
    initialised = torch.distributed.is_initialized()
    plan, dev = init_member_parallel(
        model.split_factor, device=device, backend=backend, timeout=None if timeout is None else float(timeout))
    _owns_process_group |= not initialised and torch.distributed.is_initialized()
    return MemberParallelSplitNet(model, plan, dev), plan, dev


def rank_devices(plan: MemberParallelPlan, device: torch.device) -> str:
    """The device of every rank, 'cuda:0,cuda:1' (a collective over all ranks)."""
    if not plan.distributed:
        return str(device)
    devices = [None] * plan.world_size
    torch.distributed.all_gather_object(devices, str(device), group=plan.group)
    return ','.join(devices)


def finish_member_parallel() -> None:
    """Tear down the default process group after the last collective of a member-parallel run, if
    `init_member_parallel_checked` created it (a group the caller set up is left to the caller)."""
    global _owns_process_group
    if _owns_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _owns_process_group = False
