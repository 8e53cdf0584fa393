#!/usr/bin/env python3
""" SplitNet validation script

Validates SplitNet (and plain timm) classifiers on a folder or a timm dataset. For a SplitNet one pass computes the
member logits once and derives the top-1/top-5 accuracy of every member and of the ensemble under the four manners
of the paper's Table 9 (mean / max of logits, mean / max of softmax probabilities).

    python validate.py --data-dir /data/cifar100 --model splitnet_wrn28_10_s4 --checkpoint model_best.pth.tar
    python validate.py --data-dir /data/imagenet --model splitnet_resnet50_s2 --pretrained \\
        --pretrained-path resnet50_s2.safetensors --amp --devices cuda:0,cuda:1

Flags follow timm's `validate.py` where timm has the flag. `--devices` places member i on device i mod n and runs the
members concurrently in threads of this process (`timm_splitnet.parallel.concurrent.ConcurrentMembers`);
`--member-parallel` under torchrun places member i on rank i mod N, one process per member (group), and gathers the
logits over the processes (`timm_splitnet.parallel.member_parallel`); rank 0 reports. Accuracies are the same as
sequential either way.

The same pass gives the calibration of the ensemble and of every member (`nll`, `brier`, `ece`; 15 equal-width bins of
the top-1 confidence) and the members' diversity (`disagreement`, `pairwise_kl`), see `timm_splitnet.utils.metrics`;
`--reliability-plot FILE.png` draws the reliability diagram of the ensemble and of the mean member.

    torchrun --nproc_per_node=2 validate.py --data-dir /data/imagenet --model splitnet_resnet50_s2 \\
        --checkpoint model_best.pth.tar --member-parallel
"""
import argparse
import logging
import os
import time
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import create_loader
from timm.data.distributed_sampler import OrderedDistributedSampler
from timm.models import load_checkpoint
from timm.utils import AverageMeter, accuracy, random_seed

import timm_splitnet  # noqa: F401  registers the splitnet_* models
from timm_splitnet import SplitNet, count_params, load_safetensors
from timm_splitnet.data import create_dataset
from timm_splitnet.utils import prepare_batch
from timm_splitnet.models.authors import checkpoint_build_kwargs, is_authors_checkpoint, load_authors_checkpoint
from timm_splitnet.cli import (
    CliError, add_input_args, add_member_parallel_args, add_model_args, add_results_args, autocast_factory,
    check_compile_backend, check_num_samples, check_pretrained_classes, cli_session, create_model_checked,
    expand_model_names, finish_member_parallel, init_member_parallel_checked, model_gmacs, model_kwargs,
    parse_devices_checked, peek_weights_checked, positive_int, print_results, rank_devices, resolve_amp_dtype,
    resolve_data_dir, resolve_device_checked, resolve_eval_data_config, set_split_backend, weights_classes,
)
from timm_splitnet.parallel.concurrent import ConcurrentMembers
from timm_splitnet.utils.metrics import ENSEMBLE_MANNERS, CalibrationMeter, EnsembleMetrics

_logger = logging.getLogger('validate')

# ENSEMBLE_MANNERS, the Table 9 manners: name -> (reduction over members, on softmax probabilities)
_MANNER_LABELS = {
    'mean': 'logits + mean', 'max': 'logits + max', 'softmax_mean': 'softmax + mean', 'softmax_max': 'softmax + max'}


_SPLIT_SYNONYMS = (
    {'train', 'training'},
    {'validation', 'valid', 'val', 'eval', 'evaluation'},
    {'test'},
)
_SPLIT_FOLDERS = set().union(*_SPLIT_SYNONYMS)


parser = argparse.ArgumentParser(description='SplitNet / timm ImageNet-style validation')
parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                    help='data folder, as timm\'s validate.py takes it (same as --data-dir)')
parser.add_argument('--data-dir', metavar='DIR',
                    help='data folder: <dir>/<split>/<class>/*.jpg (the ImageNet layout), or the root of --dataset')
parser.add_argument('--dataset', metavar='NAME', default='',
                    help='"<type>/<name>": "" for an image folder or tar (default), "torch/cifar100", "hfds/...", '
                         '"sklearn/digits" (ships with scikit-learn, needs no folder)')
parser.add_argument('--split', metavar='NAME', default='validation',
                    help='split to evaluate; in a folder, val / valid / eval count as validation (default: validation)')
parser.add_argument('--dataset-download', action='store_true', default=False,
                    help='let torch/ and tfds/ data sets download themselves into the data folder')
parser.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                    help='class name -> index: a .txt with one name per line in index order, or a pickled dict '
                         '(.pkl) (default: the sorted folder names)')
parser.add_argument('--pretrained', dest='pretrained', action='store_true',
                    help='use pretrained weights (of the pretrained cfg or of --pretrained-path)')
parser.add_argument('--pretrained-path', default=None, type=str, metavar='FILE',
                    help='local weights file used as the pretrained weights, implies --pretrained '
                         '(pretrained_cfg_overlay=dict(file=...))')
parser.add_argument('--checkpoint', default='', type=str, metavar='PATH',
                    help='path to a checkpoint (.pth.tar / .pth from timm train scripts, or .safetensors)')
parser.add_argument('--use-ema', dest='use_ema', action='store_true',
                    help='use the EMA weights (state_dict_ema) of a .pth.tar checkpoint')
parser.add_argument('-j', '--workers', default=4, type=int, metavar='N',
                    help='data loader processes (default: 4)')
parser.add_argument('--crop-pct', default=None, type=float, metavar='N',
                    help='resize to size / N, then keep the centre size x size (default: the model\'s)')
parser.add_argument('--crop-mode', default=None, type=str, metavar='N',
                    help='center: keep the aspect ratio, crop the middle; squash: stretch to the target; border: fit '
                         'the longest side and pad (default: the model\'s, else center)')
parser.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                    help='per-channel mean subtracted from the pixels (default: the model\'s)')
parser.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                    help='per-channel standard deviation the pixels are divided by (default: the model\'s)')
parser.add_argument('--interpolation', default='', type=str, metavar='NAME',
                    help='resize filter, e.g. bilinear or bicubic (default: the model\'s)')
parser.add_argument('--no-prefetcher', action='store_true', default=False,
                    help='convert and normalize in the loader workers instead of on the device')
parser.add_argument('--pin-mem', action='store_true', default=False,
                    help='page-lock the loader\'s batches (faster copies to a GPU, more host memory)')
parser.add_argument('--log-freq', default=10, type=int, metavar='N',
                    help='log a progress line every N batches and after the last one; 0: none (default: 10)')
parser.add_argument('--device', default=None, type=str,
                    help='device (default: cuda if available, else cpu; with --member-parallel: cuda = '
                         'cuda:LOCAL_RANK)')
parser.add_argument('--devices', default='', type=str, metavar='DEV[,DEV...]',
                    help='run SplitNet members concurrently, member i on device i mod n (e.g. cuda:0,cuda:1)')
parser.add_argument('--streams', action='store_true', default=False,
                    help='with --devices: every device slot runs on its own CUDA stream')
parser.add_argument('--amp', action='store_true', default=False,
                    help='mixed precision: run the forward pass under autocast in --amp-dtype')
parser.add_argument('--amp-dtype', default=None, type=str,
                    help='autocast type of --amp: float16 (half) or bfloat16 (default: bfloat16 on a CPU, float16 '
                         'on a GPU)')
parser.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                    help='torch.compile with this backend (inductor if the flag has no value); not with --devices')
parser.add_argument('--ensemble', default='all', choices=['all'] + list(ENSEMBLE_MANNERS),
                    help='ensemble manner of top1/top5 (all: the model\'s configured manner, plus all four reported)')
parser.add_argument('--reliability-plot', default='', type=str, metavar='FILE',
                    help='write a reliability diagram (ensemble and mean member, 15 bins) to FILE (.png / .pdf / .svg)')
parser.add_argument('--num-samples', default=None, type=positive_int, metavar='N',
                    help='number of samples of an iterable data set (tfds/, wds/, hfids/), which cannot count them')
parser.add_argument('--seed', type=int, default=42, metavar='S',
                    help='seed of the random streams, e.g. of a model evaluated without weights (default: 42)')
parser.add_argument('--use-train-size', action='store_true', default=False,
                    help='evaluate at the model\'s train input size even where its cfg names a larger test size')
parser.add_argument('--valid-labels', default='', type=str, metavar='FILE',
                    help='file of class indices, one per line: keep only these logits, in this order (a data set '
                         'with a subset of the model\'s classes, e.g. ImageNet-A / -R)')
parser.add_argument('--real-labels', default='', type=str, metavar='FILE',
                    help='ImageNet ReaL labels JSON: also report real_top1 / real_top5 of the model\'s output '
                         'against them (files named ILSVRC2012_val_*.JPEG)')
parser.add_argument('--test-pool', dest='test_pool', action='store_true',
                    help='timm\'s test-time pooling for a plain timm model evaluated above its train size '
                         '(not for a SplitNet)')
add_model_args(parser)
add_input_args(parser)
add_member_parallel_args(parser)
add_results_args(parser)


# ----- metrics -----

def ensemble_output(logits: torch.Tensor, manner: str) -> torch.Tensor:
    """Combine member logits [S, B, C] into [B, C] under a Table 9 manner (see `ENSEMBLE_MANNERS`)."""
    reduce, softmax = ENSEMBLE_MANNERS[manner]
    x = logits.float().softmax(dim=-1) if softmax else logits.float()
    return x.mean(0) if reduce == 'mean' else x.amax(0)


def split_accuracies(
        logits: torch.Tensor,
        target: torch.Tensor,
        manners: Sequence[str] = tuple(ENSEMBLE_MANNERS),
        topk: Sequence[int] = (1, 5),
) -> Dict[str, List[float]]:
    """Top-k accuracies (%) of every member and of the ensemble under each manner, from one set of logits.

    Args:
        logits: Member logits [S, B, C].
        target: Class indices [B].
        manners: Ensemble manners to evaluate (keys of `ENSEMBLE_MANNERS`).
        topk: The k of the accuracies (capped at C).

    Returns:
        {'member0': [top1, top5], ..., 'ens_mean': [...], 'ens_max': [...], ...}.
    """
    keys, values = split_accuracy_tensor(logits, target, manners, topk)
    values = values.tolist()  # one host sync for all of them (not one per accuracy)
    k = len(values) // len(keys)
    return OrderedDict((key, values[j * k:(j + 1) * k]) for j, key in enumerate(keys))


def split_accuracy_tensor(
        logits: torch.Tensor,
        target: torch.Tensor,
        manners: Sequence[str] = tuple(ENSEMBLE_MANNERS),
        topk: Sequence[int] = (1, 5),
) -> Tuple[List[str], torch.Tensor]:
    """`split_accuracies` left on the device (no host sync): the keys and their accuracies, flattened key-major.

    Returns:
        `['ens_mean', ..., 'member0', ...]` and the float32 tensor `[acc@k1, acc@k2, ...]` of each key in turn.
    """
    topk = tuple(min(k, logits.shape[-1]) for k in topk)
    accs = OrderedDict()
    for name in manners:
        accs[f'ens_{name}'] = accuracy(ensemble_output(logits, name), target, topk=topk)
    for i in range(logits.shape[0]):
        accs[f'member{i}'] = accuracy(logits[i].float(), target, topk=topk)
    return list(accs), torch.stack([torch.as_tensor(a, device=logits.device) for v in accs.values() for a in v])


class DeviceMeters:
    """`AverageMeter`s whose running sums stay on the device: no host sync per batch, one per `sync`.

    `sync` sets every meter's `val`, `sum`, `count` and `avg` to exactly what per-batch `AverageMeter.update(value,
    n)` calls with the values read as Python floats would have given (the same float64 products and sums).
    """

    def __init__(self, meters: Sequence[AverageMeter], device: torch.device):
        """
        Args:
            meters: The meters, in the order of the values passed to `update`.
            device: Device of the batch values.
        """
        self.meters = list(meters)
        dtype = torch.float32 if torch.device(device).type == 'mps' else torch.float64  # MPS has no float64
        self.sums = torch.zeros(len(self.meters), dtype=dtype, device=device)
        self.last = torch.zeros_like(self.sums)
        self.count = 0

    def update(self, values: torch.Tensor, n: int) -> None:
        """Add one batch: `values` (one per meter, on the device) weighted by the batch size `n`."""
        self.last = values.detach().to(self.sums.dtype)
        self.sums += self.last * n
        self.count += n

    def sync(self) -> None:
        """Read the sums and the last values (one host sync) into the meters."""
        if not self.count:
            return
        values = torch.cat([self.sums, self.last]).tolist()
        k = len(self.meters)
        for meter, total, last in zip(self.meters, values[:k], values[k:]):
            meter.val, meter.sum, meter.count = last, total, self.count
            meter.avg = total / self.count


def ensemble_loss(output: torch.Tensor, target: torch.Tensor, softmax: bool) -> torch.Tensor:
    """Cross-entropy of an ensemble output: of logits, or of (renormalised) probabilities."""
    if not softmax:
        return F.cross_entropy(output.float(), target)
    probs = output.float()
    probs = probs / probs.sum(-1, keepdim=True)
    return F.nll_loss(probs.clamp_min(1e-12).log(), target)


# ----- validation -----

def load_weights(model: nn.Module, checkpoint: str, use_ema: bool = False) -> None:
    """Load a .pth.tar / .pth (timm's loader, EMA with use_ema) or a .safetensors file, errors as CliError."""
    if not os.path.isfile(checkpoint):
        raise CliError(f'checkpoint file not found: {checkpoint}')
    try:
        if is_authors_checkpoint(checkpoint):  # the paper authors' zip / .pth.tar: converted on the fly
            _logger.info(f'--checkpoint: loaded {load_authors_checkpoint(model, checkpoint)}.')
        elif checkpoint.endswith('.safetensors') and isinstance(model, SplitNet):
            if use_ema:
                _logger.warning('--use-ema ignored: a .safetensors file holds one set of weights.')
            load_safetensors(model, checkpoint)
        else:
            load_checkpoint(model, checkpoint, use_ema=use_ema)
    except ValueError as e:
        raise CliError(str(e)) from e
    except (RuntimeError, KeyError, OSError) as e:
        lines = str(e).strip().splitlines()
        detail = ' '.join(line.strip() for line in lines[:4]) + (' ...' if len(lines) > 4 else '')
        raise CliError(f'could not load {checkpoint} into {type(model).__name__}: {detail}') from e


def check_data_root(args) -> str:
    """The dataset root; for folder datasets it must exist (checked before any model is built)."""
    root = resolve_data_dir(args.data, args.data_dir)
    if args.dataset and args.dataset.lower() == 'sklearn/digits':
        return root  # bundled with scikit-learn: no folder
    if not root and args.dataset and not args.dataset.startswith(('folder', 'imagefolder', 'tar')):
        raise CliError(f'--dataset {args.dataset!r} needs DIR / --data-dir (the download root of torch/ datasets); '
                       f'only sklearn/digits comes without one.')
    if not args.dataset or args.dataset.startswith(('folder', 'imagefolder', 'tar')):
        if not root:
            raise CliError('no dataset given: pass the data folder as DIR or --data-dir DIR.')
        if not os.path.exists(root):
            raise CliError(f'data dir not found: {root}')
        if os.path.isdir(root):
            # timm falls back to the root itself when the split folder is missing: the split folders would become
            # classes, so a root with split folders must have the requested one (or one of its synonyms)
            present = {d for d in os.listdir(root) if d in _SPLIT_FOLDERS and os.path.isdir(os.path.join(root, d))}
            split = args.split.split('[')[0]
            synonyms = next((group for group in _SPLIT_SYNONYMS if split in group), {split})
            if present and not present & synonyms:
                raise CliError(f'split {args.split!r} not found in {root} (it has {", ".join(sorted(present))}).')
    return root


def _create_loader(args, data_config: Dict[str, Any], device: torch.device):
    root = check_data_root(args)
    check_num_samples('--num-samples', args.num_samples, args.dataset)
    if args.dataset and args.dataset.lower() == 'sklearn/digits':
        options = dict(img_size=data_config['input_size'][-1])  # the size its 8x8 images are rendered at
    else:
        options = dict(download=args.dataset_download, load_bytes=False, class_map=args.class_map,
                       input_img_mode='RGB' if data_config['input_size'][0] == 3 else 'L')
        if args.num_samples:
            options['num_samples'] = args.num_samples
    try:
        dataset = create_dataset(args.dataset, root=root, split=args.split, **options)
    except (RuntimeError, OSError, ValueError, TypeError, ImportError, AssertionError) as e:
        raise CliError(f'could not read dataset {args.dataset or "folder"} at {root} (split {args.split}): {e}') from e
    if len(dataset) == 0:
        raise CliError(f'no images in {root} (split {args.split}).')
    transform_keys = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
    loader = create_loader(
        dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=args.pin_mem, device=device,
        use_prefetcher=not args.no_prefetcher, **{k: data_config.get(k) for k in transform_keys})
    return dataset, loader


def _ensemble_manner(model: nn.Module) -> Optional[str]:
    """The ensemble manner a SplitNet is configured with (a key of `ENSEMBLE_MANNERS`), None for plain models."""
    if not isinstance(model, SplitNet):
        return None
    return ('softmax_' if model.ensemble_softmax else '') + model.ensemble


def _shard_samples(loader, num_samples: int) -> Optional[int]:
    """The samples of this rank's shard that are not padding of a distributed eval sampler (None: all are real).

    timm's `OrderedDistributedSampler` pads the last shard with the first samples to give every replica as many;
    validation counts each sample once, as a single process does.
    """
    sampler = getattr(getattr(loader, 'loader', loader), 'sampler', None)
    if not isinstance(sampler, OrderedDistributedSampler):
        return None
    return max(0, min(sampler.num_samples, num_samples - sampler.rank * sampler.num_samples))


def _reduce_meters(meters: Sequence[AverageMeter], plan, device: torch.device) -> None:
    """Sum the meters over the replicas of a member-parallel run (every replica validated its own shard)."""
    if plan is None or plan.member_group is None:
        return
    sums = torch.tensor([v for m in meters for v in (m.sum, m.count)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(sums, group=plan.member_group)
    for m, (total, count) in zip(meters, sums.view(-1, 2).tolist()):
        m.sum, m.count = total, count
        m.avg = total / max(count, 1)


def _significant(value: float, digits: int = 6) -> float:
    """`value` rounded to `digits` significant digits (calibration and diversity metrics can be small)."""
    return float(f'{value:.{digits}g}')


def _plot_reliability(calibration, path: str, model_name: str, configured: str | None) -> str:
    """Draw the reliability diagram of a finished `EnsembleMetrics` / `CalibrationMeter`, errors as CliError."""
    if isinstance(calibration, EnsembleMetrics):
        curves = calibration.reliability()
        curves = OrderedDict([(f'ensemble ({_MANNER_LABELS[configured]})', curves['ensemble']),
                              ('mean member', curves['mean member'])])
    else:
        curves = OrderedDict(model=calibration.reliability())
    try:
        from timm_splitnet.plots import plot_reliability
        plot_reliability(curves, path, title=f'{model_name}: reliability (top-1, {calibration.num_bins} bins)')
    except ImportError as e:
        raise CliError(f'--reliability-plot needs matplotlib ({e}).') from e
    except (OSError, ValueError) as e:
        raise CliError(f'cannot write the reliability diagram {path}: {e}') from e
    _logger.info(f'Reliability diagram: {path}')
    return path


# label, format of the last value, format of the running mean
_PROGRESS_FIELDS = (('Loss', '>7.4f', '>6.4f'), ('Acc@1', '>7.3f', '>7.3f'), ('Acc@5', '>7.3f', '>7.3f'))


def progress_line(
        step: int,
        num_steps: int,
        batch_time: AverageMeter,
        images: int,
        losses: AverageMeter,
        top1: AverageMeter,
        top5: AverageMeter,
) -> str:
    """A progress log line; its fields and layout are those of timm's validate.py, so log readers keep working."""
    parts = [f'Test: [{step:>4d}/{num_steps}]',
             f'Time: {batch_time.val:.3f}s ({batch_time.avg:.3f}s, {images / batch_time.avg:>7.2f}/s)']
    for (label, last_spec, mean_spec), meter in zip(_PROGRESS_FIELDS, (losses, top1, top5)):
        parts.append(f'{label}: {meter.val:{last_spec}} ({meter.avg:{mean_spec}})')
    return '  '.join(parts)


def _read_valid_labels(path: str, num_classes: Optional[int], device: torch.device) -> torch.Tensor:
    """The class indices of --valid-labels (one per line) as an index tensor, checked against the model's classes."""
    try:
        with open(path) as f:
            labels = [int(line) for line in f if line.strip()]
    except OSError as e:
        raise CliError(f'cannot read --valid-labels {path}: {e}') from e
    except ValueError as e:
        raise CliError(f'--valid-labels {path} must hold one class index per line: {e}') from e
    wrong = [i for i in labels if i < 0 or (num_classes and i >= num_classes)]
    if not labels or wrong:
        raise CliError(f'--valid-labels {path}: expected class indices of the model (0 to {(num_classes or 0) - 1}), '
                       f'got {"none" if not labels else ", ".join(map(str, wrong[:5]))}.')
    return torch.tensor(labels, device=device)


def _real_labels(path: str, dataset, plan):
    """timm's ReaL labels evaluator over the data set's files, in the loader's order."""
    from timm.data import RealLabelsImagenet
    if plan is not None:
        raise CliError('--real-labels follows the files in order in one process; it does not run with '
                       '--member-parallel.')
    if not hasattr(dataset, 'filenames'):
        raise CliError(f'--real-labels needs a data set of image files; {type(dataset).__name__} names none.')
    filenames = dataset.filenames(basename=True)
    try:
        return RealLabelsImagenet(filenames, real_json=path)
    except (OSError, ValueError) as e:
        raise CliError(f'cannot read --real-labels {path}: {e}') from e
    except AssertionError:
        raise CliError(f'--real-labels {path} does not hold one entry per image of the data set ({len(filenames)} '
                       f'images); ReaL labels cover the 50,000 ImageNet validation images.') from None


def _apply_test_pool(model: nn.Module, data_config: Dict[str, Any], model_name: str):
    """--test-pool: timm's test-time pooling head for a plain timm model above its train size (crop 1.0 then)."""
    from timm.layers import apply_test_time_pool
    if isinstance(model, SplitNet):
        raise CliError(f'--test-pool replaces a model\'s single classifier with a pooled one; {model_name} has one '
                       f'classifier per member. Evaluate it without --test-pool.')
    model, pooled = apply_test_time_pool(model, data_config)
    if pooled:
        data_config = dict(data_config, crop_pct=1.0)
    else:
        _logger.info('--test-pool: the input is not larger than the model\'s train size, no test-time pooling.')
    return model, data_config


def validate(args, model_name: Optional[str] = None, reliability_plot: str | None = None) -> Dict[str, Any]:
    """Validate one model; returns the result row (an OrderedDict).

    With `args.member_parallel` every rank calls it for the same model (a collective) and returns the same row.
    `reliability_plot` (default `args.reliability_plot`) is the image file of the reliability diagram (rank 0).
    """
    model_name = model_name or args.model
    if reliability_plot is None:
        reliability_plot = getattr(args, 'reliability_plot', '')
    devices = parse_devices_checked(args.devices) if args.devices else None
    device = devices[0] if devices else resolve_device_checked(args.device)
    amp_dtype = resolve_amp_dtype(args.amp_dtype, device) if args.amp else None
    if device.type == 'cuda':  # as timm's validate.py: latencies comparable with timm's
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True

    kwargs = model_kwargs(args)
    pretrained = args.pretrained or bool(args.pretrained_path)
    create_kwargs = dict(kwargs)
    weights_file = args.checkpoint or args.pretrained_path  # the weights evaluated (a checkpoint replaces pretrained)
    file_classes, recorded_data_config = None, None
    # the model gets the file's classifier, never a random one (an authors' file: its converter checks the classes)
    if weights_file and not is_authors_checkpoint(weights_file):
        shapes, recorded_data_config = peek_weights_checked(weights_file, args.use_ema)
        flag = '--checkpoint' if args.checkpoint else '--pretrained-path'
        file_classes = weights_classes(model_name, flag, weights_file, shapes, args.num_classes, bool(args.checkpoint))
        if file_classes is not None:
            create_kwargs['num_classes'] = file_classes
    if args.pretrained_path:
        overlay = dict(file=args.pretrained_path)
        if file_classes is not None and not args.checkpoint:
            overlay['num_classes'] = file_classes  # timm keeps a classifier of the cfg's class count
        create_kwargs['pretrained_cfg_overlay'] = overlay
    elif args.pretrained and not args.checkpoint:
        check_pretrained_classes(model_name, args.num_classes)
    random_seed(args.seed)  # without weights to load: the same random model every run (and on every rank)
    if args.checkpoint:  # a converted or authors' checkpoint: the model settings its weights need
        try:
            create_kwargs = checkpoint_build_kwargs(args.checkpoint, create_kwargs)
        except ValueError as e:
            raise CliError(f'--checkpoint: {e}') from e
    model = create_model_checked(model_name, pretrained=pretrained, **create_kwargs)
    if args.checkpoint:
        load_weights(model, args.checkpoint, args.use_ema)
    is_split = isinstance(model, SplitNet)
    if is_split and args.ensemble != 'all':
        reduce, softmax = ENSEMBLE_MANNERS[args.ensemble]
        model.set_ensemble(reduce, softmax)
    if args.member_parallel:
        if args.split_backend not in (None, '', 'loop'):
            _logger.warning(f'--split-backend {args.split_backend} ignored: with --member-parallel the members of a '
                            f'rank run one after the other (loop).')
        split_backend = 'loop' if is_split else None
    else:
        split_backend = set_split_backend(model, args.split_backend)
    if not devices:
        check_compile_backend(args.torchcompile, split_backend)
    if devices and not is_split:
        raise CliError(f'--devices needs a SplitNet model, {model_name} is a {type(model).__name__}.')

    param_count = count_params(model)
    num_classes = getattr(model, 'num_classes', None)
    split_factor = model.split_factor if is_split else None
    configured = _ensemble_manner(model)
    data_config, data_sources = resolve_eval_data_config(
        args, model, recorded_data_config, use_test_size=not args.use_train_size)
    _logger.info(f'Data config: {data_sources}')
    if args.test_pool:
        model, data_config = _apply_test_pool(model, data_config, model_name)
    gmacs = model_gmacs(model_name, data_config['input_size'], model=model, **kwargs)
    _logger.info(f'{model_name}: {param_count} parameters, {gmacs} GMACs')

    plan = None
    if args.member_parallel:  # takes the model apart: this rank keeps its members
        model, plan, device = init_member_parallel_checked(
            model, args.device, backend=args.dist_backend, timeout=args.dist_timeout, name=model_name)
        _logger.info(f'Member-parallel: {model.describe()}')
    dataset, loader = _create_loader(args, data_config, device)
    dataset_classes = len(getattr(getattr(dataset, 'reader', None), 'class_to_idx', None) or {}) or None
    valid_labels = _read_valid_labels(args.valid_labels, num_classes, device) if args.valid_labels else None
    if valid_labels is not None:
        num_classes = len(valid_labels)  # the model's output, restricted to them
    if num_classes and dataset_classes and dataset_classes > num_classes:
        raise CliError(f'the dataset has {dataset_classes} classes but {model_name} predicts {num_classes}; '
                       f'set --num-classes (and load weights with that head).')
    real_labels = _real_labels(args.real_labels, dataset, plan) if args.real_labels else None
    real_samples = None
    if plan is not None:
        from timm_splitnet.parallel.member_parallel import member_parallel_loader
        loader = member_parallel_loader(loader, plan, is_training=False)  # a replica's ranks: the same batches
        real_samples = _shard_samples(loader, len(dataset))

    model.eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    runner = None
    if devices:
        runner = ConcurrentMembers(model, devices, amp_dtype=amp_dtype, streams=args.streams)
        _logger.info(f'Concurrent members: {runner}')
        forward = runner.forward_members
        if args.torchcompile:
            _logger.warning('--torchcompile is not applied with --devices (concurrent members).')
    elif plan is not None:
        from timm_splitnet.parallel.member_parallel import member_parallel_forward
        if args.torchcompile:
            for member in model.owned:  # the logits gather stays eager
                member.compile(backend=args.torchcompile)
        forward = partial(member_parallel_forward, model, members=True)
    else:
        model.to(device)
        forward = model.forward_members if is_split else model
        if args.torchcompile:
            if is_split:
                model.prepare_split_backend()  # the packed programs built eagerly, not inside the compiled frame
            forward = torch.compile(forward, backend=args.torchcompile)
    amp_autocast = autocast_factory(device, amp_dtype)

    manners = list(ENSEMBLE_MANNERS) if args.ensemble == 'all' else [args.ensemble]
    batch_time = AverageMeter()
    losses = AverageMeter()
    top1 = AverageMeter()
    top5 = AverageMeter()
    meters: Dict[str, List[AverageMeter]] = OrderedDict(
        (key, [AverageMeter(), AverageMeter()])
        for key in [f'ens_{m}' for m in manners] + [f'member{i}' for i in range(split_factor or 0)])
    # calibration of the configured ensemble (plain keys), of every evaluated manner and member; diversity
    calibration = EnsembleMetrics(split_factor, configured, manners, device=device) if is_split else \
        CalibrationMeter(device=device)
    # loss, top1, top5 and (in the key order of split_accuracy_tensor) every manner's and member's top1 / top5, summed
    # on the device and read at log lines and at the end
    device_meters = DeviceMeters(
        [losses, top1, top5] + ([m for pair in meters.values() for m in pair] if is_split else []), device)
    start = end = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch_idx, (images, target) in enumerate(loader):
                if args.no_prefetcher:
                    images = images.to(device)
                    target = target.to(device)
                images = prepare_batch(images, args.channels_last)  # CUDA: valid until queued kernels finish
                with amp_autocast():
                    out = forward(images)
                if valid_labels is not None:
                    out = out.index_select(-1, valid_labels)
                if real_samples is not None:  # after the forward: every rank of the replica runs every batch
                    keep = min(target.shape[0], real_samples)
                    real_samples -= keep
                    out, target = out[:, :keep], target[:keep]
                    if keep == 0:
                        continue
                batch_size = target.shape[0]
                if is_split:
                    keys, accs = split_accuracy_tensor(out, target, manners)  # on the device: no host sync
                    j = keys.index(f'ens_{configured}')
                    output = ensemble_output(out, configured)
                    loss = ensemble_loss(output, target, softmax=configured.startswith('softmax'))
                    values = torch.cat([loss.detach().float().reshape(1), accs[2 * j:2 * j + 2], accs])
                    calibration.update(out, target)
                else:
                    output = out
                    accs = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
                    loss = F.cross_entropy(output.float(), target)
                    values = torch.stack([loss.detach().float(), *accs])
                    calibration.update(output, target)
                if real_labels is not None:
                    real_labels.add_result(output)
                device_meters.update(values, batch_size)
                now = time.perf_counter()
                batch_time.update(now - end)
                end = now
                if args.log_freq and (batch_idx % args.log_freq == 0 or batch_idx == len(loader) - 1):
                    device_meters.sync()  # the one host sync of a log interval
                    _logger.info(progress_line(batch_idx, len(loader), batch_time, batch_size, losses, top1, top5))
    finally:
        if runner is not None:
            runner.close()
    device_meters.sync()
    _reduce_meters([losses, top1, top5] + [m for pair in meters.values() for m in pair], plan, device)
    if plan is not None and plan.member_group is not None:
        calibration.all_reduce(plan.member_group)
    calibration_metrics = calibration.compute()
    elapsed = time.perf_counter() - start
    num_images = int(top1.count)

    results = OrderedDict(model=model_name)
    results['top1'] = round(top1.avg, 4)
    results['top1_err'] = round(100 - top1.avg, 4)
    results['top5'] = round(top5.avg, 4)
    results['top5_err'] = round(100 - top5.avg, 4)
    results['loss'] = round(losses.avg, 4)
    for key in ('nll', 'brier', 'ece'):
        results[key] = _significant(calibration_metrics.pop(key))
    if is_split:
        results['ensemble'] = configured
        for key, (m1, m5) in meters.items():
            results[f'{key}_top1'] = round(m1.avg, 4)
            results[f'{key}_top5'] = round(m5.avg, 4)
        member_top1 = [meters[f'member{i}'][0].avg for i in range(split_factor)]
        results['member_avg_top1'] = round(sum(member_top1) / len(member_top1), 4)
        # ens_{manner}_{nll,brier,ece}, member{i}_{nll,brier,ece}, disagreement, pairwise_kl
        results.update((key, _significant(value)) for key, value in calibration_metrics.items())
    if real_labels is not None:
        results['real_top1'] = round(real_labels.get_accuracy(k=1), 4)
        results['real_top5'] = round(real_labels.get_accuracy(k=5), 4)
    results['param_count'] = round(param_count / 1e6, 4)
    results['gmacs'] = gmacs
    results['samples_per_sec'] = round(num_images / elapsed, 2) if elapsed > 0 else None
    results['num_images'] = num_images
    results['img_size'] = data_config['input_size'][-1]
    results['crop_pct'] = data_config['crop_pct']
    results['interpolation'] = data_config['interpolation']
    if is_split:
        results['split_factor'] = split_factor
        results['split_backend'] = split_backend
        results['split_mode'] = 'member_parallel' if plan is not None else 'concurrent' if devices else 'sequential'
    if plan is not None:
        results['world_size'] = plan.world_size
        results['device'] = rank_devices(plan, device)
    else:
        results['device'] = ','.join(str(d) for d in devices) if devices else str(device)
    if args.checkpoint:
        results['checkpoint'] = args.checkpoint
    if reliability_plot and (plan is None or plan.rank == 0):
        results['reliability_plot'] = _plot_reliability(calibration, reliability_plot, model_name, configured)
    _logger.info(
        f' * Acc@1 {results["top1"]:.3f} ({results["top1_err"]:.3f}) Acc@5 {results["top5"]:.3f} '
        f'({results["top5_err"]:.3f})')
    return results


def format_results(results: Dict[str, Any]) -> str:
    """A readable table of one result row: ensemble manners and members, then the model facts."""
    lines = [f'{results["model"]}  ({results.get("num_images")} images, {results.get("img_size")} px, '
             f'crop {results.get("crop_pct")}, {results.get("interpolation")})']
    lines.append(f'  {"":<28} {"top1":>8} {"top5":>8} {"nll":>8} {"brier":>8} {"ece":>8}')

    def row(label: str, prefix: str) -> str:
        calibration = ''.join(
            f' {results[prefix + k]:>8.4f}' if isinstance(results.get(prefix + k), float) else f' {"-":>8}'
            for k in ('nll', 'brier', 'ece'))
        return f'  {label:<28} {results[prefix + "top1"]:>8.3f} {results[prefix + "top5"]:>8.3f}{calibration}'

    configured = results.get('ensemble')
    if configured is None:
        lines.append(row('model', ''))
    else:
        for manner in ENSEMBLE_MANNERS:
            if f'ens_{manner}_top1' in results:
                mark = ' *' if manner == configured else ''
                lines.append(row(f'ensemble {_MANNER_LABELS[manner]}{mark}', f'ens_{manner}_'))
        i = 0
        while f'member{i}_top1' in results:
            lines.append(row(f'member {i}', f'member{i}_'))
            i += 1
        lines.append(f'  (* = top1/top5/nll/brier/ece, the model\'s ensemble manner; member average top1 '
                     f'{results["member_avg_top1"]:.3f})')
        if 'disagreement' in results:
            lines.append(f'  member diversity: disagreement {results["disagreement"]:.4f}  pairwise KL '
                         f'{results["pairwise_kl"]:.4g}')
    lines.append(
        f'  loss {results["loss"]:.4f}  params {results["param_count"]:.3f} M  GMACs {results["gmacs"]}  '
        f'{results["samples_per_sec"]} img/s' +
        (f'  S={results["split_factor"]} {results["split_mode"]} ({results["device"]})'
         if 'split_factor' in results else f'  ({results["device"]})'))
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Command line entry point; returns the result rows (raises SystemExit with a message on bad input).

    With `--member-parallel` (under torchrun) every rank runs it and returns the rows; rank 0 prints and writes them.
    """
    args = parser.parse_args(argv)
    with cli_session('validate.py', args.member_parallel) as rank:
        if args.member_parallel and args.devices:
            raise CliError('--devices (member threads in one process) and --member-parallel (one process per '
                           'member) exclude each other.')
        model_names = expand_model_names(args.model, args.model_list)
        if len(model_names) > 1 and args.checkpoint:
            raise CliError('--checkpoint applies to a single model, but several models were given.')
        check_data_root(args)
        results = []
        for name in model_names:
            plot = args.reliability_plot
            if plot and len(model_names) > 1:  # one diagram per model: FILE-<model>.png
                stem, ext = os.path.splitext(plot)
                plot = f'{stem}-{name}{ext or ".png"}'
            try:
                results.append(validate(args, name, reliability_plot=plot))
            except CliError as e:
                if len(model_names) == 1:
                    raise
                _logger.error(f'{name}: {e}')
                results.append(OrderedDict(model=name, error=str(e)))
                continue
            if rank == 0:
                print(format_results(results[-1]))
        if args.member_parallel:
            finish_member_parallel()
    if rank == 0:
        # the tables above and this summary; every key of every row goes to --results-file
        print_results(results, args, table=summary_table(results) if len(results) > 1 else '', show_json=False)
    if any('error' in r for r in results):
        raise SystemExit(1)
    return results


def summary_table(results: List[Dict[str, Any]]) -> str:
    """One line per model (several models), errors included."""
    lines = [f'{"model":<36} {"top1":>8} {"top5":>8} {"params(M)":>10} {"GMACs":>8}']
    for r in results:
        if 'error' in r:
            lines.append(f'{r["model"]:<36} error: {r["error"]}')
        else:
            lines.append(f'{r["model"]:<36} {r["top1"]:>8.3f} {r["top5"]:>8.3f} {r["param_count"]:>10.3f} '
                         f'{r["gmacs"] if r["gmacs"] is not None else "-":>8}')
    return '\n'.join(lines)


if __name__ == '__main__':
    from torch.distributed.elastic.multiprocessing.errors import record
    record(main)()  # under torchrun: the failing rank's traceback in torchrun's summary
