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
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

import timm
from timm.data import resolve_data_config
from timm.utils import ParseKwargs, setup_default_logging

from .data import ITERABLE_PREFIXES
from .parallel.concurrent import parse_devices, resolve_device
from .parallel.member_parallel import MemberParallelPlan, MemberParallelSplitNet, init_member_parallel
from .task.distributed import select_split_backend
from .utils.checkpoint import DATA_CONFIG_KEYS, with_data_config
from .utils.flops import count_macs
from .models import SplitNet, create_model, member_kwargs, parse_splitnet_name
from .models._weights import peek_weights

__all__ = [
    'CliError', 'cli_errors', 'as_cli_error', 'cli_session', 'add_model_args', 'add_input_args', 'add_results_args',
    'add_member_parallel_args', 'resolve_data_dir', 'is_wildcard', 'expand_model_names', 'parse_splitnet_name',
    'check_model_name', 'create_any_model', 'create_model_checked', 'model_kwargs', 'set_split_backend',
    'check_compile_backend',
    'model_gmacs', 'resolve_device_checked', 'parse_devices_checked',
    'resolve_amp_dtype', 'autocast_factory', 'write_results', 'print_results', 'setup_logging', 'TORCHRUN_ENV',
    'torchrun_rank', 'check_torchrun_env', 'check_rank_device', 'init_member_parallel_checked', 'rank_devices',
    'finish_member_parallel', 'peek_weights_checked', 'weights_classes', 'check_pretrained_classes',
    'resolve_eval_data_config', 'positive_int', 'check_num_samples',
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
    """--model (or a wildcard), --model-list, --model-kwargs, --num-classes, --gp, --split-backend."""
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
    group.add_argument('--gp', default=None, type=str, metavar='POOL',
                       help='global pooling of the model, of every member of a SplitNet: avg, max, avgmax, '
                            'catavgmax, fast (default: the model\'s)')
    group.add_argument('--split-backend', default=None, type=str,
                       help='SplitNet member execution backend (e.g. loop)')
    return group


def add_input_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """-b / --batch-size, --img-size, --in-chans, --input-size, --channels-last."""
    group = parser.add_argument_group('Input')
    group.add_argument('-b', '--batch-size', default=256, type=positive_int, metavar='N',
                       help='images per batch (default: 256)')
    group.add_argument('--img-size', default=None, type=int, metavar='N',
                       help='side of the square input image (default: the model\'s)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='channels of the input images (default: 3, or the first value of --input-size)')
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


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (`-b`, ...): anything else is a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


# timm's data set types that stream their samples and cannot tell their length by themselves
def check_num_samples(flag: str, num_samples: Optional[int], dataset: str) -> None:
    """A sample count (`--num-samples`, `--train-num-samples`) is for iterable data sets only: refuse it elsewhere
    (timm would ignore it there)."""
    if num_samples is None:
        return
    if dataset.partition('/')[0].lower() not in ITERABLE_PREFIXES:
        kinds = ', '.join(p + '/' for p in ITERABLE_PREFIXES)
        given = f'--dataset {dataset}' if dataset else 'an image folder'
        raise CliError(f'{flag} sets the length of an iterable data set ({kinds}); {given} knows its own length.')


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
    """`timm.create_model` (every S a division rule defines is registered), with the rule's message for another S
    (`timm_splitnet.create_model`)."""
    return create_model(name, pretrained=pretrained, **kwargs)


def create_model_checked(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """`create_any_model` with bad names and bad kwargs reported as a CliError."""
    check_model_name(name)
    try:
        return create_any_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, ValueError, TypeError, FileNotFoundError, KeyError) as e:
        raise CliError(f'could not create model {name!r}: {e}') from e


def model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The model kwargs of `--model-kwargs`, `--num-classes`, `--gp`, `--in-chans` (or `--input-size`) and
    `--drop-path`, where the script has them."""
    kwargs = dict(getattr(args, 'model_kwargs', None) or {})
    input_size = getattr(args, 'input_size', None)
    options = dict(num_classes=getattr(args, 'num_classes', None), global_pool=getattr(args, 'gp', None),
                   in_chans=input_size[0] if input_size else getattr(args, 'in_chans', None),
                   drop_path_rate=getattr(args, 'drop_path', None))
    kwargs.update((k, v) for k, v in options.items() if v is not None)
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


# ----- weights files and their data config -----

def peek_weights_checked(path: str, use_ema: bool = True) -> Tuple[Dict[str, Tuple[int, ...]], Optional[Dict]]:
    """The tensor shapes of a weights file and the data config recorded in it (`peek_weights`), errors as CliError."""
    if not os.path.isfile(path):
        raise CliError(f'weights file not found: {path}')
    with as_cli_error():
        return peek_weights(path, use_ema=use_ema)


def _classifier_names(name: str) -> Tuple[Optional[int], Tuple[str, ...]]:
    """(classes, classifier module names) of the pretrained cfg of model `name` ((None, ()) without one)."""
    cfg = timm.models.get_pretrained_cfg(name) if ':' not in name else None
    if cfg is None or not cfg.classifier:
        return None, ()
    names = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier)
    return cfg.num_classes, names


def weights_classes(
        name: str,
        flag: str,
        path: str,
        shapes: Dict[str, Tuple[int, ...]],
        num_classes: Optional[int],
        strict: bool = False,
) -> Optional[int]:
    """The class count of the classifier in a weights file (`shapes`: its tensor shapes), which the model must be
    built with: an evaluation never runs a random classifier.

    timm's pretrained loading drops a classifier whose class count differs from the cfg's, and a model built with
    the cfg's count cannot take the file's; building it with the file's count avoids both.

    Args:
        strict: The file is loaded strictly (--checkpoint), which reports a file without the model's classifier
            itself; timm's pretrained loading (--pretrained-path) would leave a classifier of another class count
            random instead, so that is refused here.

    Returns:
        The file's class count, or None when the file has no classifier under the cfg's names (or the model no cfg).

    Raises:
        CliError: `num_classes` (--num-classes) differs from the file's classifier, or (not `strict`) the file has
            none and `num_classes` differs from the model's.
    """
    cfg_classes, classifiers = _classifier_names(name)
    if not classifiers:
        return None
    found = {shapes[c + '.weight'][0] for c in classifiers if c + '.weight' in shapes}
    if not found:
        if not strict and num_classes is not None and num_classes != cfg_classes:
            raise CliError(f'{flag} {path} holds no classifier ({classifiers[0]}.weight), so the {num_classes}-class '
                           f'classifier of --num-classes would stay random in this evaluation; pass weights that have '
                           f'one.')
        return None
    if len(found) > 1 or (num_classes is not None and num_classes not in found):
        raise CliError(f'{flag} {path} holds a classifier of {" / ".join(map(str, sorted(found)))} classes, but '
                       f'--num-classes is {num_classes}: the model would be evaluated with a random classifier. Leave '
                       f'--num-classes out to evaluate the file\'s classifier.')
    return found.pop()


def check_pretrained_classes(name: str, num_classes: Optional[int]) -> None:
    """Refuse `--pretrained` with a `--num-classes` other than the pretrained classifier's: timm would replace the
    classifier with a random one, which an evaluation must not use."""
    cfg_classes, classifiers = _classifier_names(name)
    if num_classes is not None and classifiers and cfg_classes and num_classes != cfg_classes:
        raise CliError(f'--pretrained loads the {cfg_classes}-class classifier of {name}; --num-classes {num_classes} '
                       f'would replace it with a random one in this evaluation. Leave --num-classes out, or load '
                       f'weights with a {num_classes}-class classifier (--checkpoint FILE or --pretrained-path FILE).')


# the command-line options that set each data-config key
_DATA_CONFIG_OPTIONS = dict(
    input_size=('img_size', 'input_size', 'in_chans'), interpolation=('interpolation',), mean=('mean',), std=('std',),
    crop_pct=('crop_pct',), crop_mode=('crop_mode',))


def resolve_eval_data_config(
        args: argparse.Namespace,
        model: nn.Module,
        recorded: Optional[Dict[str, Any]] = None,
        use_test_size: bool = True,
) -> Tuple[Dict[str, Any], str]:
    """timm's `resolve_data_config` with the data config a weights file recorded (`recorded`, see `peek_weights`)
    in place of the model's pretrained cfg; the command line overrides both.

    Returns:
        The data config and a line that says where each value came from (command line, checkpoint, model).
    """
    recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in (recorded or {}).items()
                if k in DATA_CONFIG_KEYS and v is not None}
    cfg = with_data_config(dict(getattr(model, 'pretrained_cfg', None) or {}), recorded)
    input_size = getattr(args, 'input_size', None)
    in_chans = input_size[0] if input_size else getattr(args, 'in_chans', None)
    for key in ('mean', 'std'):
        given = getattr(args, key, None)
        if given and in_chans and len(given) not in (1, in_chans):
            raise CliError(f'--{key} has {len(given)} values for {in_chans} input channels: give one or {in_chans}.')
    data_config = resolve_data_config(vars(args), pretrained_cfg=cfg, model=model, use_test_size=use_test_size)
    if in_chans and data_config['input_size'][0] != in_chans:  # timm keeps the cfg's channels with --in-chans
        data_config['input_size'] = (in_chans, *data_config['input_size'][1:])
    in_chans = data_config['input_size'][0]
    for key in ('mean', 'std'):
        values = tuple(data_config[key])
        if len(values) != in_chans:
            if in_chans != 1:
                raise CliError(f'{in_chans} input channels but {len(values)} {key} values (the model\'s): pass '
                               f'--{key} with {in_chans} values.')
            data_config[key] = (sum(values) / len(values),)  # grey images: one value for the one channel
    parts = []
    for key, options in _DATA_CONFIG_OPTIONS.items():
        given = any(getattr(args, option, None) not in (None, '') for option in options)
        source = 'command line' if given else 'checkpoint' if key in recorded else 'model'
        parts.append(f'{key} {data_config.get(key)} ({source})')
    return data_config, ', '.join(parts)


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


def resolve_amp_dtype(name: Optional[str], device: Optional[torch.device] = None) -> torch.dtype:
    """The dtype of `--amp-dtype` (float16 / half / bfloat16); without one, bfloat16 on a CPU (where float16 autocast
    is usually far slower) and float16 elsewhere. Float16 asked for on a CPU is done, with a warning."""
    dtypes = {'float16': torch.float16, 'half': torch.float16, 'bfloat16': torch.bfloat16}
    if name is not None and name not in dtypes:
        raise CliError(f'unknown --amp-dtype {name!r}, expected float16 or bfloat16.')
    if device is None:
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    on_cpu = torch.device(device).type == 'cpu'
    if name is None:
        if on_cpu:
            _logger.info('--amp on the CPU: bfloat16 autocast (float16 is usually far slower there; --amp-dtype '
                         'float16 to use it anyway).')
        return torch.bfloat16 if on_cpu else torch.float16
    if on_cpu and dtypes[name] == torch.float16:
        _logger.warning('--amp-dtype float16 on the CPU: float16 autocast is usually far slower there than bfloat16 '
                        '(--amp-dtype bfloat16).')
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


def print_results(
        results: List[Dict[str, Any]],
        args: argparse.Namespace,
        table: str = '',
        show_json: bool = True,
) -> None:
    """Write `--results-file` (in `--results-format`), print `table` and, with `show_json`, the rows as JSON after a
    `--result` line (the format of timm's scripts, for tools that read a script's output)."""
    if getattr(args, 'results_file', ''):
        write_results(args.results_file, results, format=args.results_format)
    if table:
        print(table)
    if show_json:
        print(f'--result\n{json.dumps(results, indent=4)}')
    elif getattr(args, 'results_file', ''):
        print(f'All results ({args.results_format}): {args.results_file}')


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
