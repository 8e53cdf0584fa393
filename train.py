#!/usr/bin/env python3
""" SplitNet divide-and-co-train training script on timm

Trains a SplitNet (`splitnet_<arch>_s<S>`, S width-divided members) with the paper's recipe: every member sees its
own augmented view of each image, the loss is the sum of the members' cross-entropies plus a warmed-up
Jensen-Shannon co-training term, and the members are averaged at inference. Everything else is timm: data sets and
loaders, Mixup / CutMix, optimizers, LR schedulers, EMA, AMP, DDP (torchrun), torch.compile.

Paper: "SplitNet: Divide and Co-training" (Zhao et al.), https://arxiv.org/abs/2011.14660

Examples:
    # the README demo: scikit-learn's digits on the CPU, no data dir needed
    python train.py -c configs/digits_cpu.yaml
    # a paper recipe (CIFAR-100 folder in ImageNet layout, or --dataset torch/cifar100 --dataset-download)
    python train.py -c configs/cifar100_wrn28_10_s4.yaml --data-dir /data/cifar100
    # 8 GPUs, DDP: every process holds the whole SplitNet
    torchrun --nproc_per_node=8 train.py -c configs/imagenet_resnet50_s2.yaml --data-dir /data/imagenet
    # member-parallel: member i on GPU i mod N (N divides S, or N = S x replicas); checkpoints as single-process
    torchrun --nproc_per_node=2 train.py -c configs/imagenet_resnet50_s2.yaml --data-dir /data/imagenet \
        --member-parallel

Per epoch, `summary.csv` in the output folder holds the train loss and its CE / co-training parts and the eval top-1
/ top-5 of the ensemble (`eval_top1`, `eval_top5`) and of every member (`eval_member<i>_top1`, ...), their
calibration (`eval_nll`, `eval_brier`, `eval_ece`, `eval_member<i>_nll`, ...) and the members' diversity
(`eval_disagreement`, `eval_pairwise_kl`); see the README's "Calibration and diversity".
`model_best.pth.tar` is the epoch with the best ensemble top-1, `last.pth.tar` the latest epoch; at the end the best
weights are exported as `model.safetensors` + `config.json` and the curves plotted to `curves.png`.

Hacked together by the timm-splitnet authors
"""
import argparse
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import yaml

from timm.data import Mixup, resolve_data_config, create_loader
from timm.data.random_erasing import RandomErasing
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler, ParseKwargs, get_outdir, random_seed, update_summary

from timm_splitnet import divide_weight_decay, export_model  # importing timm_splitnet registers the splitnet_* models
from timm_splitnet.cli import (
    CliError, add_member_parallel_args, as_cli_error, autocast_factory, check_rank_device, check_torchrun_env,
    cli_errors, create_model_checked, resolve_amp_dtype, setup_logging, torchrun_rank)
from timm_splitnet.data import (
    MultiViewDataset, collate_views, create_dataset, create_eval_transform, create_random_erasing,
    create_train_transform)
from timm_splitnet.loss import CoTrainingLoss
from timm_splitnet.task import (
    CoTrainingTask, DataParallelTraining, MemberParallelTraining, is_splitnet, validate_members)
from timm_splitnet.utils.train_state import CheckpointKeeper, gather_rng_states, load_checkpoint_file, set_rng_state

_logger = logging.getLogger('train')


class NonFiniteLossError(CliError):
    """The training loss became NaN or infinite."""


# The first arg parser parses out only the --config argument, this argument is used to
# load a yaml file containing key-values that override the defaults for the main parser below
config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments')


def create_parser() -> argparse.ArgumentParser:
    """The main argument parser (a new one per call: `--config` defaults never leak into the next run)."""
    parser = argparse.ArgumentParser(description='SplitNet divide-and-co-train training on timm')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file (keys: the options\' dest names) setting the defaults of this run')
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', default=None,
                       help='path to dataset (ImageNet layout: <dir>/train/<class>/*.jpg, <dir>/validation/...)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>"): "" image folder (default), "torch/cifar10", '
                            '"torch/cifar100", "sklearn/digits" (bundled, no data dir)')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='dataset validation split (default: validation; "" to train without evaluation)')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='Allow download of dataset for torch/ and tfds/ datasets that support it.')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='splitnet_resnet110_s2', type=str, metavar='MODEL',
                       help='Name of model to train, "splitnet_<arch>_s<S>" (default: "splitnet_resnet110_s2")')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='Start with pretrained version of specified network (if avail)')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='Resume full model and optimizer state from checkpoint (default: none)')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='prevent resume of optimizer state when resuming model')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of label classes (default: the number of classes of the dataset)')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='Image size (default: None => model default)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar=('D', 'H', 'W'),
                       help='Input all image dimensions (d h w, e.g. --input-size 3 224 224), model default if empty')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='Input image center crop percent (for validation only)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='Override mean pixel value of dataset')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help='Override std deviation of dataset')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='Image resize interpolation type (overrides model)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='Input batch size per process, in images (each image gives S views) (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='Validation batch size override (default: None)')
    group.add_argument('--channels-last', action='store_true', default=False, help='Use channels_last memory layout')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='The number of steps to accumulate gradients (default: 1)')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='Enable gradient checkpointing through model blocks/stages')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra model kwargs, key=value (passed to every member)')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='Enable compilation w/ specified backend (default: inductor).')
    group.add_argument('--torchcompile-mode', type=str, default=None,
                       help='torch.compile mode (default: None).')

    group = parser.add_argument_group('Divide and co-train (SplitNet)')
    group.add_argument('--split-views', nargs='?', type=int, default=None, const=-1, metavar='S',
                       help='Give every member its own augmented view of each image (the default for a SplitNet; '
                            'optional value: the number of views, must equal the number of members)')
    group.add_argument('--same-view', action='store_true', default=False,
                       help='All members train on the same augmented view (Table 5 ablation)')
    group.add_argument('--split-backend', type=str, default=None, metavar='NAME',
                       help='How the members run: loop, packed, auto (SplitNet.set_split_backend) (default: loop)')
    group.add_argument('--cot-weight', type=float, default=0.5, metavar='W',
                       help='Weight of the co-training loss (paper: 0.5)')
    group.add_argument('--cot-warmup-epochs', type=float, default=0., metavar='N',
                       help='Linear warm-up epochs of the co-training weight (paper: 40/300 CIFAR, 60/120 ImageNet)')
    group.add_argument('--cot-loss', type=str, default='js', choices=('js', 'kl'),
                       help='Co-training divergence: js (Jensen-Shannon, paper) or kl (pairwise, detached peers)')
    group.add_argument('--wd-divide', type=str, default='none', choices=('none', 'exp', 'linear'),
                       help='Divide the weight decay by S: none, exp (eq. 6: wd * exp(1/S - 1)), linear (eq. 16: wd/S)')
    group.add_argument('--stop-epoch', type=int, default=None, metavar='N',
                       help='End this run after epoch N (checkpointed); continue with --resume (time-limited jobs)')

    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default=None, type=str,
                       help='Device (accelerator) to use (default: cuda if available, else cpu).')
    group.add_argument('--amp', action='store_true', default=False,
                       help='use PyTorch Native AMP for mixed precision training')
    group.add_argument('--amp-dtype', default='float16', type=str,
                       help='lower precision AMP dtype (default: float16)')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='Force broadcast buffers for native DDP to off.')
    group.add_argument('--sync-bn', action='store_true', default=False, help='Enable synchronized BatchNorm.')
    group.add_argument('--dist-bn', type=str, default='reduce',
                       help='Distribute BatchNorm stats between nodes after each epoch ("broadcast", "reduce", or "")')
    add_member_parallel_args(parser)

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER',
                       help='Optimizer (default: "sgd", Nesterov momentum as in the paper)')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                       help='Optimizer Epsilon (default: None, use opt default)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                       help='Optimizer Betas (default: None, use opt default)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='Optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=1e-4,
                       help='weight decay of conv / linear weights, before --wd-divide (default: 1e-4)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='Clip gradient norm (default: None, no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm',
                       help='Gradient clipping mode. One of ("norm", "value", "agc")')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler (default: "cosine")')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='Apply LR scheduler step on update instead of epoch end (per-iteration warm-up, paper).')
    group.add_argument('--lr', type=float, default=0.1, metavar='LR', help='learning rate (default: 0.1)')
    group.add_argument('--warmup-lr', type=float, default=5e-3, metavar='LR',
                       help='warmup learning rate (default: 5e-3)')
    group.add_argument('--min-lr', type=float, default=1e-4, metavar='LR',
                       help='lower lr bound for cyclic schedulers that hit 0 (default: 1e-4)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='list of decay epoch indices for multistep lr. must be increasing')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=0, metavar='N',
                       help='epochs to warmup LR, if scheduler supports')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='Exclude warmup period from decay schedule.')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs to cooldown LR at min_lr, after cyclic schedule ends (paper: 1, its E+1 epochs)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='LR decay rate (default: 0.1)')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--train-crop-mode', type=str, default=None, choices=('pad', 'rrc', 'rkrc', 'rkrr'),
                       help='Training crop: pad (CIFAR RandomCrop, padding 1/8 of the side, + flip) or timm\'s '
                            'rrc / rkrc / rkrr (default: pad for inputs up to 64 px, else rrc)')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='Random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='Random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='Horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0., help='Vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                       help='Color jitter factor of the rrc pipeline (default: 0.4)')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='AutoAugment policy: timm\'s "v0", "original", "rand-m9-mstd0.5-inc1", ... or '
                            'torchvision\'s "cifar10" / "svhn". (default: None)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT',
                       help='Random erase prob, per view (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel', help='Random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='Random erase count (default: 1)')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='Probability of performing mixup or cutmix when either/both is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='Probability of switching to cutmix when both mixup and cutmix enabled')
    group.add_argument('--mixup-mode', type=str, default='batch',
                       help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='Turn off mixup after this epoch, disabled if 0 (default: 0)')
    group.add_argument('--smoothing', type=float, default=0.0, help='Label smoothing (default: 0.0)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='Training interpolation (random, bilinear, bicubic default: "random")')
    group.add_argument('--drop', type=float, default=None, metavar='PCT',
                       help='Dropout rate of the undivided network, divided by sqrt(S) (default: the architecture\'s)')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT',
                       help='Drop path rate of the undivided network, divided by sqrt(S) (default: None)')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='Track an EMA of the model weights; checkpoints are then selected and exported by the EMA')
    group.add_argument('--model-ema-decay', type=float, default=0.9998,
                       help='Decay factor for model weights moving average')
    group.add_argument('--model-ema-warmup', action='store_true', help='Enable warmup for model EMA decay.')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='how many batches to wait before logging training status')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of best checkpoint-<epoch>.pth.tar files to keep (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='how many training processes to use (default: 4)')
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='path to output folder (default: none, current dir)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of train experiment, name of sub-folder for output')
    group.add_argument('--no-plot', action='store_true', default=False, help='Do not plot curves.png at the end.')

    return parser


def _parse_args(argv=None):
    parser = create_parser()
    # Do we have a config file to parse?
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        with open(args_config.config, 'r') as f:
            cfg = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(k for k in cfg if k not in known)
        if unknown:
            raise CliError(f'Config {args_config.config} sets unknown option(s): {", ".join(unknown)}.')
        parser.set_defaults(**cfg)

    # The main arg parser parses the rest of the args, the usual
    # defaults will have been overridden if config file specified.
    args = parser.parse_args(remaining)
    args.config = args_config.config

    # Cache the args as a text string to save them in the output dir later
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    return args, args_text


def main(argv=None) -> int:
    """Run a training; `argv` defaults to `sys.argv[1:]`.

    Returns:
        0 on success. Bad inputs (missing data, a checkpoint of another model, a NaN loss, ...) raise `SystemExit`
        with a one-line message (exit status 1).
    """
    rank = torchrun_rank()
    setup_logging(rank)
    with cli_errors('train.py' if rank == 0 else f'train.py (rank {rank})'):
        return _train(argv)


def _plain(value: Any) -> Any:
    """Args as plain containers (the checkpoint stays loadable with `torch.load(weights_only=True)`)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _dataset_classes(dataset) -> Optional[int]:
    """Number of classes of a timm / torchvision / digits data set, if it says."""
    while dataset is not None:
        classes = getattr(dataset, 'classes', None)
        if classes is not None:
            return len(classes)
        reader = getattr(dataset, 'reader', None)
        class_to_idx = getattr(reader, 'class_to_idx', None)
        if class_to_idx:
            return len(class_to_idx)
        dataset = getattr(dataset, 'dataset', None)
    return None


def _bad_samples(dataset) -> Optional[int]:
    """Unreadable images skipped so far (timm_splitnet.data.SkipBadSamples), None if the data set does not count."""
    while dataset is not None:
        if hasattr(dataset, 'bad_samples'):
            return int(dataset.bad_samples)
        dataset = dataset.__dict__.get('dataset') if hasattr(dataset, '__dict__') else None
    return None


def _create_datasets(args):
    digits = args.dataset.lower() == 'sklearn/digits'
    if not digits and not args.data_dir:
        raise CliError(f'--dataset {args.dataset!r} needs --data-dir (the image folder root, or the download root of '
                       f'torch/ datasets); only sklearn/digits comes without one.')
    kwargs = dict(download=args.dataset_download)
    if digits:
        kwargs = dict(img_size=args.input_size[-1] if args.input_size else (args.img_size or 32))
    datasets = []
    for split, is_training in ((args.train_split, True), (args.val_split, False)):
        if not split:
            datasets.append(None)
            continue
        try:
            datasets.append(create_dataset(
                args.dataset, root=args.data_dir, split=split, is_training=is_training,
                batch_size=args.batch_size, **kwargs))
        except (OSError, RuntimeError, ValueError, TypeError, ImportError, AssertionError) as e:
            where = f' in --data-dir {args.data_dir}' if args.data_dir else ''
            raise CliError(f'cannot load the {split!r} split of --dataset {args.dataset!r}{where}: {e}') from e
        if len(datasets[-1]) == 0:
            raise CliError(f'the {split!r} split of --dataset {args.dataset!r} is empty.')
    return datasets


def _create_model(args, num_classes: int) -> nn.Module:
    model_kwargs = dict(args.model_kwargs or {})
    if args.drop is not None:
        model_kwargs['drop_rate'] = args.drop
    if args.drop_path is not None:
        model_kwargs['drop_path_rate'] = args.drop_path
    return create_model_checked(args.model, pretrained=args.pretrained, num_classes=num_classes, **model_kwargs)


def _resolve_views(args, model: nn.Module) -> int:
    """Views per sample: S (one per member, the paper) or 1 (--same-view, or a model that is not a SplitNet)."""
    split_factor = model.split_factor if is_splitnet(model) else 1
    if args.split_views is not None:
        if not is_splitnet(model):
            raise CliError(
                f'--split-views needs a SplitNet (--model splitnet_<arch>_s<S>); {args.model} is a '
                f'{type(model).__name__} with a single network.')
        views = split_factor if args.split_views == -1 else args.split_views
        if views not in (1, split_factor):
            raise CliError(
                f'--split-views {args.split_views}: {args.model} has {split_factor} members, so the number of views '
                f'must be {split_factor} (one per member) or 1 (--same-view).')
        if args.same_view and views > 1:
            raise CliError('--same-view and --split-views ask for different things; pass one of them.')
    return 1 if args.same_view else split_factor


def _create_loaders(
        args, data_config, dataset_train, dataset_eval, num_views: int, device: torch.device,
        parallel: DataParallelTraining):
    input_size = data_config['input_size']
    crop_mode = args.train_crop_mode or ('pad' if max(input_size[1:]) <= 64 else 'rrc')
    train_interpolation = args.train_interpolation or data_config['interpolation']
    dataset_train = parallel.train_dataset(dataset_train, num_views)
    common = dict(
        input_size=input_size,
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=args.workers,
        distributed=parallel.sampler_distributed,
        pin_memory=args.pin_mem,
        device=device,
        use_prefetcher=args.prefetcher,
    )
    # timm's loader (sampler, collation, prefetcher); the transforms are set below, the random erasing of the
    # prefetcher too (no_aug / re_prob=0 keep create_loader from building its own)
    loader_train = create_loader(
        dataset_train,
        batch_size=args.batch_size,
        is_training=True,
        no_aug=True,
        collate_fn=collate_views if isinstance(dataset_train, MultiViewDataset) and not args.prefetcher else None,
        persistent_workers=False,  # fresh workers every epoch: seeded from the (checkpointed) torch RNG
        **common,
    )
    transform_kwargs = dict(
        use_prefetcher=args.prefetcher, mean=data_config['mean'], std=data_config['std'])
    loader_train.dataset.transform = create_train_transform(
        input_size,
        train_crop_mode=crop_mode,
        padding=max(1, input_size[-1] // 8),  # 'pad' mode: 4 px at 32 px, as CIFAR
        auto_augment=args.aa,
        interpolation=train_interpolation,
        hflip=args.hflip,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        scale=args.scale,
        ratio=args.ratio,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        **transform_kwargs,
    )
    if args.prefetcher and args.reprob > 0:
        # erasing runs per row of the [S * B] batch: every view gets its own box
        if crop_mode == 'pad':
            loader_train.random_erasing = create_random_erasing(
                args.reprob, re_mode=args.remode, re_count=args.recount, device=device)
        else:
            loader_train.random_erasing = RandomErasing(
                probability=args.reprob, mode=args.remode, max_count=args.recount, device=device)

    loader_eval = None
    if dataset_eval is not None:
        loader_eval = create_loader(
            dataset_eval,
            batch_size=args.validation_batch_size or args.batch_size,
            is_training=False,
            crop_pct=data_config['crop_pct'],
            interpolation=data_config['interpolation'],
            **common,
        )
        loader_eval.dataset.transform = create_eval_transform(
            input_size,
            train_crop_mode=crop_mode,
            interpolation=data_config['interpolation'],
            crop_pct=data_config['crop_pct'],
            crop_mode=data_config.get('crop_mode'),
            **transform_kwargs,
        )
        loader_eval = parallel.loader(loader_eval, is_training=False)
    return parallel.loader(loader_train, is_training=True), loader_eval, crop_mode


def _resume(args, checkpoint: Dict[str, Any], task: CoTrainingTask, ema: bool = False) -> None:
    """Load the checkpoint's weights into the task's model, with an error naming both models when they do not fit."""
    suffix = '_ema' if ema else ''
    try:
        task.load_checkpoint_state(checkpoint['state_dict' + suffix], checkpoint.get('task_state' + suffix), ema=ema)
    except (ValueError, RuntimeError) as e:
        written_by = checkpoint.get('arch', 'an unknown model')
        raise CliError(
            f'--resume {args.resume} holds weights of {written_by}, which do not fit --model {args.model}: {e}') from e


def _train(argv=None) -> int:
    args, args_text = _parse_args(argv)
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.member_parallel:  # one process per member (group), launched by torchrun, one GPU each
        check_torchrun_env('train.py')
        check_rank_device(args.device)
    parallel = MemberParallelTraining(args.seed, args.dist_timeout, args.dist_backend) if args.member_parallel \
        else DataParallelTraining(args.seed)
    device = parallel.init_device(args)
    primary = args.rank == 0
    if not primary:
        logging.getLogger().setLevel(logging.WARNING)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.distributed:
        _logger.info(
            f'Training in {"member-parallel" if args.member_parallel else "distributed"} mode with '
            f'{args.world_size} processes, rank {args.rank}, device {device}.')
    else:
        _logger.info(f'Training with a single process on {device}.')

    amp_dtype = resolve_amp_dtype(args.amp_dtype)
    amp_autocast = autocast_factory(device, amp_dtype if args.amp else None)
    random_seed(args.seed, 0)  # every rank builds the model of a single-process run (member-parallel: its members)

    # ----- data sets (first: the model's head follows the data set's classes) -----
    dataset_train, dataset_eval = _create_datasets(args)
    num_classes = _dataset_classes(dataset_train)
    if args.num_classes is None:
        if num_classes is None:
            raise CliError(f'cannot tell the number of classes of --dataset {args.dataset!r}; pass --num-classes.')
        args.num_classes = num_classes
    elif num_classes is not None and args.num_classes < num_classes:
        raise CliError(f'--num-classes {args.num_classes} but the data set has {num_classes} classes.')

    # ----- model -----
    model = _create_model(args, args.num_classes)
    if args.rank:
        random_seed(args.seed, args.rank)  # then every rank its own random streams
    num_views = _resolve_views(args, model)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    split_factor = model.split_factor if is_splitnet(model) else 1
    num_params = sum(p.numel() for p in model.parameters())
    with as_cli_error():  # a bad --split-backend, a model or process count that does not fit --member-parallel
        model, backend = parallel.setup_model(
            model, device, split_backend=args.split_backend, sync_bn=args.sync_bn, channels_last=args.channels_last)
    _logger.info(
        f'Model {args.model}: {split_factor} member(s), {num_params:,} parameters, {args.num_classes} classes, '
        f'{num_views} view(s) per image, split backend {backend}.')

    # ----- data loaders, mixup, loss, task -----
    loader_train, loader_eval, crop_mode = _create_loaders(
        args, data_config, dataset_train, dataset_eval, num_views, device, parallel)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
    # with mixup the smoothing is in the soft targets, the members' loss is then soft-target CE
    criterion = CoTrainingLoss(
        cot_weight=args.cot_weight, cot_loss=args.cot_loss, warmup_epochs=args.cot_warmup_epochs,
        smoothing=0. if mixup_fn is not None else args.smoothing)
    task = parallel.create_task(model, criterion, num_views, mixup_fn=mixup_fn, device=device, verbose=primary)

    # ----- optimizer (conv / linear weights decayed, BN and biases not: timm's filter_bias_and_bn) -----
    weight_decay = divide_weight_decay(args.weight_decay, split_factor, args.wd_divide)
    opt_kwargs = dict(args.opt_kwargs or {})
    if args.opt_eps is not None:
        opt_kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs['betas'] = args.opt_betas
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=weight_decay, momentum=args.momentum, **opt_kwargs)
    _logger.info(
        f'Optimizer {args.opt}: lr {args.lr}, weight decay {weight_decay:.3g} '
        f'({args.weight_decay:g} divided by S={split_factor}: {args.wd_divide}).')
    with as_cli_error():  # --member-parallel refuses float16 AMP with --clip-grad
        loss_scaler = parallel.create_loss_scaler(device, amp_dtype if args.amp else None, args.clip_grad)

    # ----- resume -----
    checkpoint = None
    start_epoch = 0
    if args.resume:
        try:
            checkpoint = load_checkpoint_file(args.resume)
        except (FileNotFoundError, ValueError) as e:
            raise CliError(f'--resume: {e}') from e
        _resume(args, checkpoint, task)
        start_epoch = checkpoint.get('epoch', -1) + 1
        if not args.no_resume_opt:
            if 'optimizer' in checkpoint:
                with as_cli_error():
                    task.load_optimizer_state_dict(optimizer, checkpoint['optimizer'])
            if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
                loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
        _logger.info(f'Resumed {args.resume} (epoch {checkpoint.get("epoch")}), continuing at epoch {start_epoch}.')

    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup, device=device)
        if checkpoint is not None and 'state_dict_ema' in checkpoint:
            _resume(args, checkpoint, task, ema=True)

    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if args.model_ema:
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    parallel.prepare_distributed(task, device, broadcast_buffers=not args.no_ddp_bb)
    model = task.get_trainable_module()
    model_ema = task.get_trainable_module(ema=True)

    # ----- LR schedule -----
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=False), updates_per_epoch=updates_per_epoch)
    if checkpoint is not None and not args.no_resume_opt and checkpoint.get('scheduler'):
        lr_scheduler.load_state_dict(checkpoint['scheduler'])
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    _logger.info(f'Scheduled epochs: {num_epochs}, {updates_per_epoch} updates per epoch.')

    # ----- output -----
    keeper = None
    output_dir = summary_csv = None
    if primary:
        exp_name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'), str(data_config['input_size'][-1])])
        output_dir = get_outdir(args.output or './output/train', exp_name)
        keeper = CheckpointKeeper(output_dir, max_history=args.checkpoint_hist)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)
        summary_csv = os.path.join(output_dir, 'summary.csv')
        if checkpoint is not None:
            keeper.load_state_dict(checkpoint.get('keeper'))
            _truncate_summary(summary_csv, start_epoch)
        elif os.path.exists(summary_csv):
            os.remove(summary_csv)  # a fresh run in an existing folder: a new summary
        _logger.info(f'Output folder: {output_dir}')

    # the random streams continue exactly where the checkpointed run left them (sampler order, augmentation, mixup)
    if checkpoint is not None and checkpoint.get('rng'):
        states = checkpoint['rng']
        if len(states) == args.world_size:
            set_rng_state(states[args.rank])
        else:
            _logger.warning(f'Checkpoint RNG states are of {len(states)} process(es), not {args.world_size}: '
                            f'the run continues with fresh random streams.')
            random_seed(args.seed + start_epoch, args.rank)

    # ----- epochs -----
    eval_metrics = None
    best_eval_metrics = None
    if checkpoint is not None and keeper is not None and keeper.best_metric is not None:
        best_eval_metrics = checkpoint.get('best_eval_metrics')
    num_updates = start_epoch * updates_per_epoch
    last_epoch = start_epoch - 1
    for epoch in range(start_epoch, num_epochs):
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        task.set_epoch(epoch)
        if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup_fn.mixup_enabled = False

        try:
            train_metrics, num_updates = train_one_epoch(
                epoch, task, loader_train, optimizer, args, device, lr_scheduler, amp_autocast, loss_scaler,
                num_updates, parallel)
        except NonFiniteLossError as e:
            kept = f'; the last good checkpoint is {keeper.last_path}' if keeper and os.path.exists(
                keeper.last_path) else ''
            raise CliError(f'{e}{kept}') from e
        bad = _bad_samples(loader_train.dataset)
        if bad is not None and (args.workers == 0 or bad > 0):  # counts made in loader workers may not come back
            train_metrics['bad_images'] = bad
            if bad:
                _logger.warning(f'Epoch {epoch}: {bad} unreadable image(s) skipped so far.')

        parallel.distribute_bn((model, model_ema), args.dist_bn)

        metric = None
        if loader_eval is not None:
            eval_metrics = validate_members(
                model, loader_eval, device=device, amp_autocast=amp_autocast, channels_last=args.channels_last,
                distributed=args.distributed, log_interval=args.log_interval, forward_members=task.eval_members_fn,
                verbose=primary)
            metric = eval_metrics['top1']
            if model_ema is not None:
                ema_metrics = validate_members(
                    model_ema, loader_eval, device=device, amp_autocast=amp_autocast,
                    channels_last=args.channels_last, distributed=args.distributed, log_interval=args.log_interval,
                    log_prefix='Test (EMA)', verbose=primary)
                eval_metrics.update(('ema_' + k, v) for k, v in ema_metrics.items())
                metric = ema_metrics['top1']
            _log_eval(epoch, eval_metrics)

        # collectives where the model is split over the processes: every rank takes part
        rng_states = gather_rng_states(args.distributed)
        model_state = task.get_checkpoint_state()
        if model_ema is not None:
            model_state.update(task.get_checkpoint_state(ema=True))
        optimizer_state = task.optimizer_state_dict(optimizer)
        if primary:
            lrs = [group['lr'] for group in optimizer.param_groups]
            update_summary(
                epoch, train_metrics, eval_metrics, filename=summary_csv, lr=sum(lrs) / len(lrs),
                write_header=not os.path.exists(summary_csv) or os.path.getsize(summary_csv) == 0)
            if metric is not None and (keeper.best_metric is None or metric > keeper.best_metric):
                best_eval_metrics = dict(eval_metrics, epoch=epoch)
            state = dict(
                epoch=epoch, arch=args.model, version=2, args=_plain(vars(args)), **model_state,
                optimizer=optimizer_state, scheduler=lr_scheduler.state_dict(), num_updates=num_updates,
                rng=rng_states, eval_metrics=eval_metrics, best_eval_metrics=best_eval_metrics)
            if loss_scaler is not None:
                state[loss_scaler.state_dict_key] = loss_scaler.state_dict()
            try:
                keeper.save(epoch, state, metric)
            except OSError as e:
                raise CliError(f'cannot write the checkpoint of epoch {epoch} to {output_dir}: {e}') from e
            if keeper.best_epoch is not None:
                _logger.info(f'*** Best ensemble top-1 so far: {keeper.best_metric:.3f} (epoch {keeper.best_epoch})')

        lr_scheduler.step(epoch + 1, metric)
        last_epoch = epoch
        if args.stop_epoch is not None and epoch >= args.stop_epoch and epoch + 1 < num_epochs:
            _logger.info(f'Stopping after epoch {epoch} (--stop-epoch); continue with --resume '
                         f'{keeper.last_path if keeper else "last.pth.tar"}.')
            break

    if primary and last_epoch + 1 >= num_epochs:
        _finish(args, task, keeper, output_dir, summary_csv, best_eval_metrics or eval_metrics)
    parallel.finish()
    return 0


def _truncate_summary(summary_csv: str, start_epoch: int) -> None:
    """Drop summary rows of epochs >= start_epoch (written after the checkpoint a run resumes from)."""
    if not os.path.exists(summary_csv):
        return
    with open(summary_csv) as f:
        lines = f.readlines()
    kept = lines[:1] + [line for line in lines[1:] if line.split(',', 1)[0].strip().isdigit() and
                        int(line.split(',', 1)[0]) < start_epoch]
    if len(kept) != len(lines):
        with open(summary_csv, 'w') as f:
            f.writelines(kept)


def _member_text(metrics: Dict[str, Any], prefix: str = '') -> str:
    """'a, b, ...': top-1 of every member."""
    pattern = re.compile(rf'^{prefix}member(\d+)_top1$')
    return ', '.join(f'{v:.2f}' for k, v in metrics.items() if pattern.match(k))


def _log_eval(epoch: int, metrics: Dict[str, Any]) -> None:
    text = f'Epoch {epoch} eval: ensemble top-1 {metrics["top1"]:.3f}  top-5 {metrics["top5"]:.3f}  loss ' \
           f'{metrics["loss"]:.4f}'
    if 'ece' in metrics:
        text += f'  ECE {metrics["ece"]:.4f}'
    if 'member_avg_top1' in metrics:
        text += f'  | members top-1 {_member_text(metrics)} (mean {metrics["member_avg_top1"]:.3f})'
    if 'disagreement' in metrics:
        text += f'  disagreement {metrics["disagreement"]:.3f}'
    if 'ema_top1' in metrics:
        text += f'  | EMA ensemble top-1 {metrics["ema_top1"]:.3f}'
    _logger.info(text)


def _finish(
        args, task: CoTrainingTask, keeper, output_dir: str, summary_csv: str,
        final: Optional[Dict[str, Any]]) -> None:
    """Export the best weights (safetensors + config.json), plot the curves, print the final accuracies."""
    ema = args.model_ema
    source = keeper.best_path if os.path.exists(keeper.best_path) else keeper.last_path
    checkpoint = load_checkpoint_file(source)
    key = 'state_dict_ema' if ema and 'state_dict_ema' in checkpoint else 'state_dict'
    model = task.full_model(checkpoint[key])
    weights = export_model(model, output_dir, extra_config=dict(
        source_checkpoint=os.path.basename(source), source_epoch=checkpoint.get('epoch'),
        weights='ema' if key == 'state_dict_ema' else 'model'))
    which = f'{"EMA weights" if key == "state_dict_ema" else "weights"} of epoch {checkpoint.get("epoch")}'
    _logger.info(f'Exported the {which} ({os.path.basename(source)}) to {weights} and config.json.')
    if not args.no_plot:
        try:
            from timm_splitnet.plots import plot_curves
            png = plot_curves(summary_csv, os.path.join(output_dir, 'curves.png'))
            _logger.info(f'Curves: {png}')
        except ImportError as e:
            _logger.warning(f'Not plotting the curves ({e}).')
    if final:
        prefix = 'ema_' if key == 'state_dict_ema' else ''
        text = f'Final ({which}): ensemble top-1 {final[prefix + "top1"]:.2f}'
        if prefix + 'member_avg_top1' in final:
            text += f' | members top-1 {_member_text(final, prefix)} (mean {final[prefix + "member_avg_top1"]:.2f})'
        print(text, flush=True)


def train_one_epoch(
        epoch: int,
        task: CoTrainingTask,
        loader,
        optimizer: torch.optim.Optimizer,
        args,
        device: torch.device,
        lr_scheduler,
        amp_autocast=nullcontext,
        loss_scaler: Optional[NativeScaler] = None,
        num_updates: int = 0,
        parallel: Optional[DataParallelTraining] = None,
):
    """One epoch of co-training (`parallel`: the hooks of the run's mode, default single process / DDP).

    Returns:
        (metrics, num_updates): mean `loss`, `loss_ce`, `loss_cot` per image and the epoch's `cot_weight`.
    """
    model = task.get_trainable_module()
    model.train()
    accum_steps = args.grad_accum_steps
    num_batches = len(loader)
    last_batch_idx = num_batches - 1
    last_accum_steps = num_batches % accum_steps or accum_steps
    last_batch_idx_to_accum = num_batches - last_accum_steps
    parallel = parallel or DataParallelTraining(args.seed, args.world_size if args.distributed else 1)

    # running sums of loss, CE, co-training loss on the device (read at log steps only), images on the host
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    num_images = 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    cot_weight = task.criterion.current_cot_weight
    start = last_log = time.time()
    images_since_log = 0
    data_time = 0.
    optimizer.zero_grad()
    data_end = time.time()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps
        if not args.prefetcher:
            input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        data_time += time.time() - data_end

        with (task.no_sync() if args.distributed and not need_update else nullcontext()):
            with amp_autocast():
                result = task(input, target)
            loss = result['loss']
            if loss_scaler is not None:
                loss_scaler(
                    loss / accum_steps, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                    parameters=model.parameters(), need_update=need_update)
            else:
                (loss / accum_steps).backward()
                if need_update:
                    if args.clip_grad is not None:
                        task.clip_grad(args.clip_grad, args.clip_mode)
                    optimizer.step()
        if need_update:
            optimizer.zero_grad()
            num_updates += 1
            task.update_ema(step=num_updates)
            lr_scheduler.step_update(num_updates=num_updates)

        batch_size = result['batch_size']  # images, not S x images
        nonfinite |= ~torch.isfinite(loss.detach())
        sums += torch.stack([loss.detach(), result['loss_ce'], result['loss_cot']]).double() * batch_size
        num_images += batch_size
        cot_weight = result['cot_weight']
        images_since_log += batch_size * parallel.data_parallel_size

        if last_batch or batch_idx % max(1, args.log_interval) == 0:
            _check_finite(nonfinite, epoch, batch_idx, args.distributed)
            now = time.time()
            loss_avg, ce_avg, cot_avg = (v / num_images for v in sums.tolist())
            lrs = [group['lr'] for group in optimizer.param_groups]
            _logger.info(
                f'Train: {epoch} [{batch_idx:>4d}/{num_batches} ({100. * (batch_idx + 1) / num_batches:>3.0f}%)]  '
                f'Loss: {loss_avg:#.3g} (CE {ce_avg:#.3g} + {cot_weight:.3g} x CoT {cot_avg:#.3g})  '
                f'Time: {now - start:.1f}s, {images_since_log / max(now - last_log, 1e-6):>7.1f} images/s  '
                f'LR: {sum(lrs) / len(lrs):.3e}  Data: {data_time:.1f}s')
            last_log, images_since_log = now, 0
        data_end = time.time()

    _check_finite(nonfinite, epoch, last_batch_idx, args.distributed)
    sums = torch.cat([sums, torch.tensor([num_images], dtype=torch.float64, device=device)])
    if args.distributed:
        torch.distributed.all_reduce(sums)
    loss_sum, ce_sum, cot_sum, count = sums.tolist()
    count = max(count, 1.)
    metrics = OrderedDict(
        loss=loss_sum / count, loss_ce=ce_sum / count, loss_cot=cot_sum / count, cot_weight=cot_weight)
    return metrics, num_updates


def _check_finite(nonfinite: torch.Tensor, epoch: int, batch_idx: int, distributed: bool) -> None:
    flag = nonfinite.to(torch.float32)
    if distributed:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0:
        raise NonFiniteLossError(
            f'the training loss became NaN or infinite in epoch {epoch} (by batch {batch_idx}); stopping. '
            f'Lower --lr, add --clip-grad or check the data')


if __name__ == '__main__':
    from torch.distributed.elastic.multiprocessing.errors import record
    sys.exit(record(main)())  # under torchrun: the failing rank's traceback in torchrun's summary
