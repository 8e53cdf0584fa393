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
"""
import argparse
import importlib
import importlib.util
import itertools
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from contextlib import ExitStack, nullcontext
from datetime import datetime
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import yaml

from timm.data import Mixup, resolve_data_config, create_loader
from timm.data.random_erasing import RandomErasing
from timm.loss import BinaryCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler, ParseKwargs, get_outdir, random_seed, update_summary

from timm_splitnet import divide_weight_decay, export_model  # importing timm_splitnet registers the splitnet_* models
from timm_splitnet.cli import (
    CliError, add_member_parallel_args, as_cli_error, autocast_factory, check_compile_backend, check_num_samples,
    check_rank_device, check_torchrun_env, cli_errors, create_model_checked, positive_int, resolve_amp_dtype,
    resolve_data_dir, setup_logging, torchrun_rank)
from timm_splitnet.data import (
    ITERABLE_PREFIXES, DeviceViewAugment, DeviceViewLoader, collate_views, create_auto_augment, create_dataset,
    create_decode_transform, create_eval_transform, create_random_erasing, create_train_transform, dataset_prefix,
    eval_data_config, is_iterable, set_data_epoch, set_loader_workers, set_views_transform)
from timm_splitnet.data.resumable import (
    describe_worker_failure, loader_position_state, make_resumable, restore_loader_position)
from timm_splitnet.data.streaming import WDS_LAYOUT
from timm_splitnet.loss import CoTrainingLoss
from timm_splitnet.task import (
    CoTrainingTask, DataParallelTraining, EpochProgress, MemberParallelTraining, NonFiniteLoss, is_splitnet,
    nonfinite_ranks, skip_nonfinite_step, validate_members)
from timm_splitnet.task.schedule import lr_warnings, resolve_warmup_lr, restore_scheduler_state
from timm_splitnet.utils import prepare_batch
from timm_splitnet.models._weights import is_training_checkpoint, load_weights
from timm_splitnet.models.authors import checkpoint_build_kwargs
from timm_splitnet.utils.preemption import (
    PREEMPTED_EXIT_CODE, PreemptionGuard, agree_all, format_duration, parse_duration, parse_signals)
from timm_splitnet.utils.train_state import (
    CheckpointKeeper, NotATrainingCheckpoint, describe_write_failure, find_resume_checkpoint, gather_rng_states,
    load_checkpoint_file, set_rng_state)

_logger = logging.getLogger('train')


class NonFiniteLossError(CliError):
    """The training loss became NaN or infinite."""


# `-c FILE` is read first, on its own: the YAML's keys become the defaults of the full parser, so that anything
# on the command line still wins over the file
config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML file of option defaults (keys: dest names, e.g. a timm args.yaml)')

# timm's train.py options that have no counterpart here: accepted as keys of a -c file (reported in one warning),
# never on the command line
TIMM_ONLY_KEYS = (
    'input_img_mode', 'input_key', 'target_key', 'dataset_trust_remote_code',
    'amp_impl', 'tta', 'wandb_resume_id', 'opt_foreach',
    'lr_decay_fn', 'lr_stable_timescale', 'sched_res_schedule', 'naflex_loader', 'naflex_train_seq_lens',
    'naflex_max_seq_len', 'naflex_patch_sizes', 'naflex_patch_size_probs', 'naflex_loss_scale', 'kd_model_name',
    'kd_distill_type', 'kd_loss_type', 'kd_alpha', 'kd_temperature', 'kd_token_weight', 'kd_checkpoint',
    'kd_model_kwargs', 'no_aug_train_epochs', 'dist_bn_eps',
    # newer timm train.py options (checked against timm's main-branch train.py): variable resolution / batch size
    # schedules, distillation weights, NaFlex and extra layer-decay / validation-interval knobs
    'layer_decay_no_opt_scale', 'train_img_sizes', 'train_batch_sizes',
    'train_size_probs', 'train_size_schedule', 'train_size_schedule_spread', 'train_size_random_mix',
    'train_batches_per_epoch', 'variable_batch_loss_scale', 'naflex_patchify_channels_first', 'distill_loss_weight',
    'task_loss_weight', 'kd_student_feature_dim', 'kd_teacher_feature_dim', 'kd_token_distill_type',
)

# timm flags that cannot apply to co-training a SplitNet: dest -> why; a value other than the default stops the run
REFUSED = {
    'torchscript': 'a SplitNet is trained eagerly or with --torchcompile; TorchScript export is not supported',
    'aug_splits': 'AugMix splits share one crop between views; a SplitNet gives each member its own view '
                  '(--split-views)',
    'jsd_loss': 'the co-training loss already ties the members\' views together (--cot-weight, --cot-loss)',
    'resplit': 'it acts on AugMix splits (--aug-splits), which a SplitNet does not use',
    'split_bn': 'every member has its own BatchNorm layers already; split BN would mix them up',
    'no_aug': 'the members\' different views are the method; use --same-view to give them one view',
    'model_dtype': 'the model trains in float32; use --amp --amp-dtype bfloat16 for lower precision',
    'recovery_interval': 'checkpoints are written atomically every epoch; stop early with --stop-epoch',
    'save_images': 'not implemented here',
}


def create_parser() -> argparse.ArgumentParser:
    """All options of a run; a new parser per call, so that a `-c` file never changes the next call's defaults."""
    parser = argparse.ArgumentParser(description='Divide-and-co-train training of a SplitNet (or any timm model)')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML file of option defaults (keys: dest names, e.g. a timm args.yaml)')
    group = parser.add_argument_group('Data')
    group.add_argument('data', nargs='?', metavar='DIR', const=None,
                       help='data folder, as timm\'s train.py takes it (same as --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', default=None,
                       help='data folder: <dir>/train/<class>/*.jpg and <dir>/validation/... (the ImageNet layout)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='"<type>/<name>": "" for an image folder (default), "torch/cifar10", "torch/cifar100", '
                            '"sklearn/digits" (ships with scikit-learn, needs no folder), or streamed from shards: '
                            '"wds/<name>" (webdataset tars in --data-dir), "hfids/<hub id or folder>" (Hugging Face, '
                            'streamed; "hfds/..." reads it map-style), "tfds/<name>"')
    group.add_argument('--train-split', metavar='NAME', default='train', help='split to train on (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='split evaluated after every epoch (default: validation; "" for none)')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='let torch/ and tfds/ data sets download themselves into the data folder')
    group.add_argument('--train-num-samples', default=None, type=positive_int, metavar='N',
                       help='streamed data sets (wds/, hfids/, tfds/): training samples per epoch, all processes '
                            'together (default: the count the shards record)')
    group.add_argument('--val-num-samples', default=None, type=positive_int, metavar='N',
                       help='streamed data sets: samples of the evaluation split (default: the recorded count)')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='class name -> index: a .txt with one name per line in index order, or a pickled dict '
                            '(.pkl) (default: the sorted folder names)')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='splitnet_resnet110_s2', type=str, metavar='MODEL',
                       help='what to train: "splitnet_<arch>_s<S>" (any S the arch\'s division rule defines) or '
                            'a timm model (default: splitnet_resnet110_s2)')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start from the weights of the model\'s pretrained cfg (or of --pretrained-path)')
    group.add_argument('--pretrained-path', default=None, type=str, metavar='FILE',
                       help='weights file used as the pretrained weights (implies --pretrained); a head of another '
                            'class count is replaced by a new one')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='weights to start from (.safetensors, .pth, .pth.tar; a member-shaped file goes into '
                            'every member); epochs, optimizer and schedule start fresh')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='continue a run of this script from its checkpoint (weights, optimizer, schedule, '
                            'random streams); "auto": from the newest checkpoint in the --experiment folder, or '
                            'from scratch when it has none')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='with --resume: take the weights only, start the optimizer and loss scaler afresh')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='size of the classifier (default: the data set\'s class count)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL',
                       help='global pooling of every member: fast, avg, max, avgmax, catavgmax (default: the model\'s)')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='side of the square training image (default: the model\'s)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='input channels of the images (default: 3, or the third value of --input-size)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar=('C', 'H', 'W'),
                       help='the full input shape, e.g. --input-size 3 32 32 (default: the model\'s)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='evaluation: fraction of the resized image kept by the centre crop')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='per-channel mean subtracted from the pixels (default: the model\'s)')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help='per-channel standard deviation the pixels are divided by (default: the model\'s)')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='resize filter of the evaluation images (default: the model\'s)')
    group.add_argument('-b', '--batch-size', type=positive_int, default=128, metavar='N',
                       help='images per process and step; a SplitNet sees S views of each (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=positive_int, default=None, metavar='N',
                       help='images per evaluation step (default: --batch-size)')
    group.add_argument('--channels-last', action='store_true', default=False,
                       help='keep activations in the channels_last (NHWC) layout')
    group.add_argument('--fuser', default='', type=str,
                       help='TorchScript fuser to select: te, old or nvfuser (rarely needed)')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='batches whose gradients are summed before each optimizer step (default: 1)')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='recompute activations in the backward pass to save memory (every member)')
    group.add_argument('--fast-norm', action='store_true', default=False,
                       help='timm\'s fast (lower precision) normalization layers where the model uses them')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='more model arguments as key=value (for a SplitNet: given to every member)')
    group.add_argument('--head-init-scale', default=None, type=float,
                       help='multiply the initial classifier weights by this factor')
    group.add_argument('--head-init-bias', default=None, type=float,
                       help='set the initial classifier bias to this value')
    group.add_argument('--torchcompile-mode', type=str, default=None,
                       help='mode for torch.compile, e.g. max-autotune (default: torch\'s)')
    scripting = group.add_mutually_exclusive_group()
    scripting.add_argument('--torchscript', action='store_true', default=False,
                           help='refused: ' + REFUSED['torchscript'])
    scripting.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                           help='compile the training module with torch.compile and this backend (default: inductor)')

    group = parser.add_argument_group('Divide and co-train (SplitNet)')
    group.add_argument('--split-views', nargs='?', type=int, default=None, const=-1, metavar='S',
                       help='Give every member its own augmented view of each image (the default for a SplitNet; '
                            'optional value: the number of views, must equal the number of members)')
    group.add_argument('--same-view', action='store_true', default=False,
                       help='All members train on the same augmented view (Table 5 ablation)')
    group.add_argument('--views-on-device', action='store_true', default=False,
                       help='Decode every image once on the CPU and make its views (crop, flip, erasing, '
                            'normalisation) as batched ops on the training device; not with --aa (CPU only)')
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

    group = parser.add_argument_group('Preemption and faults (see docs/training.md)')
    group.add_argument('--preempt-signals', default='TERM,USR1', type=str, metavar='SIGNALS',
                       help='comma-separated signals on which every process finishes its step, a mid-epoch checkpoint '
                            f'is written and the run exits with code {PREEMPTED_EXIT_CODE}; "none" leaves all signals '
                            'alone (default: TERM,USR1)')
    group.add_argument('--max-time', default=None, type=str, metavar='HH:MM:SS',
                       help='wall-clock budget of this process ([D-]HH:MM:SS): checkpoint and exit with code '
                            f'{PREEMPTED_EXIT_CODE} while there is still time to write the checkpoint')
    group.add_argument('--nan-skip', type=int, default=0, metavar='N',
                       help='skip up to N optimizer steps whose loss is NaN or infinite (logged) before stopping; '
                            'every step then waits for its loss (default: 0, stop at the first)')

    group = parser.add_argument_group('Device')
    group.add_argument('--device', default=None, type=str,
                       help='where to train: cuda, cuda:1, cpu, ... (default: cuda when there is one, else cpu)')
    group.add_argument('--amp', action='store_true', default=False,
                       help='mixed precision: autocast the forward pass (float16 adds a gradient scaler)')
    group.add_argument('--amp-dtype', default=None, type=str,
                       help='lower precision type of --amp: float16 or bfloat16 (default: bfloat16 on a CPU, float16 '
                            'on a GPU)')
    group.add_argument('--model-dtype', default=None, type=str,
                       help='refused: ' + REFUSED['model_dtype'])
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='DDP: do not broadcast buffers (BatchNorm statistics) from rank 0 at every forward')
    group.add_argument('--synchronize-step', action='store_true', default=False,
                       help='wait for the device at the end of every step (exact step timings, slower)')
    group.add_argument('--local_rank', default=0, type=int,
                       help='set by old launchers; torchrun\'s LOCAL_RANK is what counts here')
    group.add_argument('--device-modules', default=None, type=str, nargs='+',
                       help='Python modules to import before the device is set up (e.g. a vendor\'s torch backend)')
    group.add_argument('--sync-bn', action='store_true', default=False,
                       help='DDP: compute BatchNorm statistics over all processes (SyncBatchNorm)')
    group.add_argument('--dist-bn', type=str, default='reduce',
                       help='after every epoch, make the BatchNorm statistics of the processes equal: "reduce" '
                            '(average them), "broadcast" (rank 0\'s) or "" (leave them)')
    group.add_argument('--split-bn', action='store_true', default=False,
                       help='refused: ' + REFUSED['split_bn'])
    group.add_argument('--bn-momentum', type=float, default=None,
                       help='BatchNorm running-average momentum of every member (default: the model\'s)')
    group.add_argument('--bn-eps', type=float, default=None,
                       help='BatchNorm epsilon of every member (default: the model\'s)')
    add_member_parallel_args(parser)

    group = parser.add_argument_group('Optimizer')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER',
                       help='any timm optimizer name: sgd (Nesterov momentum, the paper\'s), adamw, lamb, ... '
                            '(default: sgd)')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                       help='epsilon of adaptive optimizers (default: the optimizer\'s)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                       help='betas of Adam-like optimizers (default: the optimizer\'s)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='SGD momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=1e-4,
                       help='decay of conv and linear weights, before --wd-divide; BatchNorm and biases get none '
                            '(default: 1e-4)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='clip gradients at this value (default: no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm',
                       help='what --clip-grad bounds: "norm" (global norm), "value" (each element) or "agc" '
                            '(adaptive, per unit)')
    group.add_argument('--layer-decay', type=float, default=None,
                       help='layer-wise LR decay: each layer group from the head down gets this factor once more '
                            '(groups of the members\' group_matcher)')
    group.add_argument('--layer-decay-min-scale', type=float, default=0., metavar='SCALE',
                       help='with --layer-decay: the LR factor of the lowest layer groups never drops below this '
                            '(default: 0, no floor)')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='more optimizer arguments as key=value')

    group = parser.add_argument_group('Learning rate schedule')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='timm schedule: cosine, tanh, step, multistep, plateau, poly (default: cosine)')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='move the LR after every optimizer step instead of every epoch (the paper\'s warm-up)')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='peak learning rate (default: --lr-base scaled to the global batch: 0.1 per 128 '
                            'images, the paper\'s CIFAR rate)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='rate at --lr-base-size images per step, scaled to the global batch when --lr is not '
                            'given (default: 0.1)')
    group.add_argument('--lr-base-size', type=int, default=128, metavar='N',
                       help='global batch size --lr-base belongs to (default: 128)')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='how --lr-base follows the batch: "linear" or "sqrt" (default: sqrt for adaptive '
                            'optimizers, else linear)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='add noise to the LR between these fractions of the run (one value: from it to the end)')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT',
                       help='largest relative change the LR noise makes (default: 0.67)')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV',
                       help='standard deviation of the LR noise (default: 1.0)')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT',
                       help='cyclic schedules: each cycle this many times longer than the last (default: 1.0)')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT',
                       help='cyclic schedules: peak LR of each cycle relative to the last (default: 0.5)')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N',
                       help='cyclic schedules: how many cycles (default: 1)')
    group.add_argument('--lr-k-decay', type=float, default=1.0,
                       help='k of the k-decay cosine / poly schedules (default: 1.0)')
    group.add_argument('--warmup-lr', type=float, default=None, metavar='LR',
                       help='LR at the start of the warm-up (default: 1e-5 as in timm, at most a tenth of --lr)')
    group.add_argument('--min-lr', type=float, default=1e-4, metavar='LR',
                       help='LR the schedule ends at (default: 1e-4)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='run length in epochs (default: 300)')
    group.add_argument('--epoch-repeats', type=float, default=0., metavar='N',
                       help='streamed data sets (wds/, hfids/): an epoch is this many times the training samples, '
                            'e.g. 2 or 0.5 (default: 0 = once)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='number the first epoch N (with --resume: instead of the checkpoint\'s next epoch)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='multistep: the epochs at which the LR drops (default: 90 180 270)')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N',
                       help='step: epochs between two LR drops (default: 90)')
    group.add_argument('--warmup-epochs', type=int, default=0, metavar='N',
                       help='epochs of linear LR warm-up from --warmup-lr (default: 0)')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='start the decay after the warm-up instead of counting the warm-up into it')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs at --min-lr after the schedule ends (the paper: 1)')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='plateau: epochs without progress before the LR drops (default: 10)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='step / multistep / plateau: factor of each LR drop (default: 0.1)')

    group = parser.add_argument_group('Augmentation, regularization and loss')
    group.add_argument('--no-aug', action='store_true', default=False, help='refused: ' + REFUSED['no_aug'])
    group.add_argument('--train-crop-mode', type=str, default=None, choices=('pad', 'rrc', 'rkrc', 'rkrr'),
                       help='crop of the training views: pad (CIFAR: pad by 1/8 of the side, random crop, flip) or '
                            'timm\'s rrc / rkrc / rkrr (default: pad up to 64 px, rrc above)')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='rrc: range of the crop\'s area relative to the image (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='rrc: range of the crop\'s aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='chance of a left-right flip (default: 0.5)')
    group.add_argument('--vflip', type=float, default=0., help='chance of an upside-down flip (default: 0)')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                       help='rrc: strength of the brightness / contrast / saturation jitter (default: 0.4)')
    group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT',
                       help='rrc: chance that a view is colour-jittered at all (default: always)')
    group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT',
                       help='rrc: chance that a view is turned grey (default: never)')
    group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT',
                       help='rrc: chance that a view is blurred (default: never)')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='automatic augmentation policy: timm\'s "rand-m9-mstd0.5-inc1", "v0", "original", ... '
                            'or torchvision\'s "cifar10" / "svhn" (default: none)')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='repeated augmentation: each image this many times per epoch, spread over the '
                            'processes (DDP only) (default: 0)')
    group.add_argument('--aug-splits', type=int, default=0, help='refused: ' + REFUSED['aug_splits'])
    group.add_argument('--jsd-loss', action='store_true', default=False, help='refused: ' + REFUSED['jsd_loss'])
    group.add_argument('--bce-loss', action='store_true', default=False,
                       help='train every member with binary cross-entropy (one-vs-all) instead of cross-entropy')
    group.add_argument('--bce-sum', action='store_true', default=False,
                       help='--bce-loss: sum over the classes instead of averaging')
    group.add_argument('--bce-target-thresh', type=float, default=None,
                       help='--bce-loss: soft targets at or above this value become 1, the rest 0')
    group.add_argument('--bce-pos-weight', type=float, default=None,
                       help='--bce-loss: weight of the positive class')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT',
                       help='chance of random erasing, drawn for every view (default: 0)')
    group.add_argument('--remode', type=str, default='pixel',
                       help='what fills an erased box: "pixel" (noise per pixel), "rand" (per channel), "const" '
                            '(zero) (default: pixel)')
    group.add_argument('--recount', type=int, default=1, help='erased boxes per view (default: 1)')
    group.add_argument('--resplit', action='store_true', default=False, help='refused: ' + REFUSED['resplit'])
    group.add_argument('--mixup', type=float, default=0.0,
                       help='mixup: alpha of the Beta distribution of the mixing weight; 0 turns it off (default: 0)')
    group.add_argument('--cutmix', type=float, default=0.0,
                       help='cutmix: alpha of the Beta distribution of the box area; 0 turns it off (default: 0)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix: box area drawn uniformly between these two fractions (replaces --cutmix alpha)')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='chance that a batch is mixed at all (default: 1.0)')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='with both on: chance of cutmix rather than mixup (default: 0.5)')
    group.add_argument('--mixup-mode', type=str, default='batch',
                       help='one mixing draw per "batch", per "pair" or per "elem"ent (default: batch)')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='stop mixing from this epoch on; 0 keeps it on (default: 0)')
    group.add_argument('--smoothing', type=float, default=0.0,
                       help='label smoothing of the members\' loss (default: 0, as the paper)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='resize filter of the training views: random, bilinear, bicubic (default: random)')
    group.add_argument('--drop', type=float, default=None, metavar='PCT',
                       help='dropout before the classifier, for the undivided network: divided by sqrt(S) '
                            '(default: the architecture\'s)')
    group.add_argument('--drop-connect', type=float, default=None, metavar='PCT',
                       help='old name of --drop-path, kept for timm configs')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT',
                       help='stochastic depth rate, for the undivided network: divided by sqrt(S) (default: none)')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT',
                       help='DropBlock rate of members that support it (timm ResNets) (default: none)')

    group = parser.add_argument_group('Weight averaging (EMA)')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='keep an exponential moving average of the weights; it then picks and exports the best '
                            'epoch')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the average on the CPU (saves device memory; the average is not evaluated then)')
    group.add_argument('--model-ema-decay', type=float, default=0.9998,
                       help='weight of the old average at every update (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true',
                       help='let the decay grow from small values over the first updates')

    group = parser.add_argument_group('Run, logging and output')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='seed of every random stream (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all',
                       help='how loader workers are seeded: "all" (torch, numpy, python) or "part" (torch only)')
    group.add_argument('--val-interval', type=positive_int, default=1, metavar='N',
                       help='evaluate after the first epoch, after every N-th and after the last one (default: 1)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='log the training loss every N batches (default: 50)')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='refused unless 0: ' + REFUSED['recovery_interval'])
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='how many of the best epochs keep a checkpoint-<epoch>.pth.tar (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='data loader processes per training process (default: 4)')
    group.add_argument('--save-images', action='store_true', default=False,
                       help='refused: ' + REFUSED['save_images'])
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='page-lock the loader\'s batches (faster copies to a GPU, more host memory)')
    group.add_argument('--no-prefetcher', action='store_true', default=False,
                       help='normalize and erase on the CPU in the workers instead of on the device')
    group.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                       help='keep the loader workers alive across epochs')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='parent folder of the run folder (default: ./output/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of the run folder (default: date-time, model and image size)')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help='ensemble metric that picks the best epoch: top1 or top5 (default: top1)')
    group.add_argument('--log-wandb', action='store_true', default=False,
                       help='also send the per-epoch metrics to Weights & Biases (needs the wandb package)')
    group.add_argument('--wandb-project', default=None, type=str, metavar='NAME',
                       help='--log-wandb: the W&B project of the run (default: --experiment)')
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+', metavar='TAG',
                       help='--log-wandb: tags of the W&B run')
    group.add_argument('--no-plot', action='store_true', default=False,
                       help='do not draw curves.png at the end')

    return parser


def _read_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The option defaults of a `-c` YAML file: keys of this parser are taken; keys of timm's train.py that do not
    apply here are dropped with one warning; any other key is an error."""
    try:
        with open(path, 'r') as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as e:
        raise CliError(f'cannot read the config file {path}: {e}') from e
    except yaml.YAMLError as e:
        raise CliError(f'config file {path} is not valid YAML: {e}') from e
    if not isinstance(cfg, dict):
        raise CliError(f'config file {path} must be a mapping of option names to values.')
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k not in known and k not in TIMM_ONLY_KEYS)
    if unknown:
        raise CliError(f'Config {path} sets unknown option(s): {", ".join(unknown)}.')
    defaults = {a.dest: a.default for a in parser._actions}
    timm_only = sorted(k for k in cfg if k in TIMM_ONLY_KEYS)
    if timm_only:
        _logger.warning(f'Config {path}: ignoring {len(timm_only)} timm option(s) that do not apply to this script: '
                        f'{", ".join(timm_only)}.')
    # refused options at their defaults change nothing (every args.yaml of this script holds them): dropped silently
    ignored = set(timm_only) | {k for k in cfg if k in REFUSED and cfg[k] == defaults[k]}
    return {k: v for k, v in cfg.items() if k in known and k not in ignored}


def _check_refused(args, parser: argparse.ArgumentParser) -> None:
    """Stop at a timm option that cannot apply here (set on the command line or in the config), with the reason."""
    for dest, reason in REFUSED.items():
        if getattr(args, dest) != parser.get_default(dest) and getattr(args, dest) not in (None, False, 0, ''):
            flag = next(a.option_strings[0] for a in parser._actions if a.dest == dest)
            raise CliError(f'{flag} does not apply to co-training: {reason}.')
    if args.log_wandb and importlib.util.find_spec('wandb') is None:
        raise CliError('--log-wandb needs the wandb package, which is not installed (pip install wandb).')
    if args.eval_metric not in ('top1', 'top5'):
        raise CliError(f'--eval-metric {args.eval_metric}: the best epoch is picked by the ensemble\'s top1 or top5.')
    if args.aug_repeats and args.member_parallel:
        raise CliError('--aug-repeats spreads repeats over DDP processes; --member-parallel has none to spread over.')
    if args.aa:  # a policy string timm cannot read stops here, before any data is loaded
        with as_cli_error():
            create_auto_augment(args.aa, 32)
    check_num_samples('--train-num-samples', args.train_num_samples, args.dataset)
    check_num_samples('--val-num-samples', args.val_num_samples, args.dataset)


def _parse_args(argv=None):
    parser = create_parser()
    # `-c FILE` first: its keys become defaults, so that the command line overrides them
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        parser.set_defaults(**_read_config(args_config.config, parser))
    args = parser.parse_args(remaining)
    args.config = args_config.config
    args.data_dir = resolve_data_dir(args.data, args.data_dir)
    args.data = None
    if args.drop_connect is not None and args.drop_path is None:  # timm's old name of the same rate
        args.drop_path = args.drop_connect
    _check_refused(args, create_parser())

    # the resolved options, written to the run folder as args.yaml (a valid -c file)
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    return args, args_text


def main(argv=None) -> int:
    """Run a training; `argv` defaults to `sys.argv[1:]`.

    Returns:
        0 on success; 75 (`PREEMPTED_EXIT_CODE`) when a preemption signal or --max-time stopped the run after a
        checkpoint (run the same command with --resume auto to continue). Bad inputs (missing data, a checkpoint of
        another model, a NaN loss, a full disk, ...) raise `SystemExit` with a one-line message (exit status 1).
    """
    rank = torchrun_rank()
    setup_logging(rank)
    with cli_errors('train.py' if rank == 0 else f'train.py (rank {rank})'), ExitStack() as cleanup:
        try:
            return _train(argv, cleanup)
        except RuntimeError as e:  # torch raises a dead loader worker wherever the main process is at that moment
            message = describe_worker_failure(e)
            if message is None:
                raise
            raise CliError(f'{message}. The checkpoints written so far are intact: continue with the same command '
                           f'and --resume auto.') from e


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
        info = getattr(reader, 'info', None)  # wds/: _info.json (timm_splitnet.data.write_wds_shards records it)
        if isinstance(info, dict) and info.get('num_classes'):
            return int(info['num_classes'])
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
    prefix = dataset_prefix(args.dataset)
    if not digits and not args.data_dir and prefix not in ('hfds', 'hfids'):  # Hugging Face has a default cache
        raise CliError(f'--dataset {args.dataset!r} needs --data-dir (the image folder root, the shard folder of wds/ '
                       f'data sets, or the download root of torch/ datasets); only sklearn/digits comes without one.')
    kwargs = dict(download=args.dataset_download, seed=args.seed)
    if args.class_map:
        kwargs['class_map'] = args.class_map
    if digits:
        kwargs = dict(img_size=args.input_size[-1] if args.input_size else (args.img_size or 32))
    streamed = prefix in ITERABLE_PREFIXES
    datasets = []
    for split, is_training in ((args.train_split, True), (args.val_split, False)):
        if not split:
            datasets.append(None)
            continue
        num_samples = args.train_num_samples if is_training else args.val_num_samples
        try:
            repeats = dict(repeats=args.epoch_repeats) if is_training and args.epoch_repeats and not digits else {}
            counts = dict(num_samples=num_samples) if streamed and num_samples else {}
            datasets.append(create_dataset(
                args.dataset, root=args.data_dir, split=split, is_training=is_training,
                batch_size=args.batch_size, **kwargs, **repeats, **counts))
        except (OSError, RuntimeError, ValueError, TypeError, ImportError, AssertionError) as e:
            where = f' in --data-dir {args.data_dir}' if args.data_dir else ''
            hint = f' (expected {WDS_LAYOUT})' if prefix == 'wds' and not isinstance(e, ImportError) else ''
            raise CliError(f'cannot load the {split!r} split of --dataset {args.dataset!r}{where}: {e}{hint}') from e
        if len(datasets[-1]) == 0:
            if streamed:
                flag = '--train-num-samples' if is_training else '--val-num-samples'
                raise CliError(f'the {split!r} split of --dataset {args.dataset!r} records no sample count; give it '
                               f'with {flag}.')
            raise CliError(f'the {split!r} split of --dataset {args.dataset!r} is empty.')
    if args.epoch_repeats and not streamed:
        _logger.warning(f'--epoch-repeats {args.epoch_repeats:g} applies to streamed data sets (wds/, hfids/) only; '
                        f'an epoch of --dataset {args.dataset!r} is one pass over its images.')
    return datasets


def _create_model(args, num_classes: int) -> nn.Module:
    """The model of --model with the options that are model arguments, then the starting weights (--pretrained-path,
    --initial-checkpoint) and the classifier's initial scale / bias."""
    model_kwargs = dict(args.model_kwargs or {})
    options = dict(drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
                   global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps)
    model_kwargs.update((k, v) for k, v in options.items() if v is not None)
    in_chans = args.input_size[0] if args.input_size else args.in_chans
    if in_chans is not None:
        model_kwargs['in_chans'] = in_chans
    pretrained = args.pretrained and not args.pretrained_path  # a --pretrained-path file is loaded below
    if args.initial_checkpoint:  # a converted or authors' checkpoint: the model settings its weights need
        with as_cli_error():
            model_kwargs = checkpoint_build_kwargs(args.initial_checkpoint, dict(model_kwargs, num_classes=num_classes))
        num_classes = model_kwargs.pop('num_classes')
    try:
        model = create_model_checked(args.model, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
    except CliError as e:
        if args.drop_block is not None and 'drop_block_rate' in str(e):
            raise CliError(f'--drop-block: the members of {args.model} have no DropBlock (drop_block_rate); it '
                           f'applies to timm ResNet members (e.g. splitnet_resnet50_s2).') from e
        raise
    for flag, path, strict_head in (('--pretrained-path', args.pretrained_path, False),
                                    ('--initial-checkpoint', args.initial_checkpoint, True)):
        if path:
            try:
                loaded = load_weights(model, path, strict=True, adapt_head=not strict_head)
            except ValueError as e:
                raise CliError(f'{flag}: {e}') from e
            _logger.info(f'{flag}: loaded {loaded}.')
    if args.head_init_scale is not None or args.head_init_bias is not None:
        _init_heads(model, args.head_init_scale, args.head_init_bias)
    return model


def _init_heads(model: nn.Module, scale: Optional[float], bias: Optional[float]) -> None:
    """--head-init-scale / --head-init-bias on the classifier (of every member of a SplitNet)."""
    head = model.get_classifier()
    linears = [m for m in head.modules() if isinstance(getattr(m, 'weight', None), torch.Tensor)]
    with torch.no_grad():
        for layer in linears:
            if scale is not None:
                layer.weight.mul_(scale)
            if bias is not None and getattr(layer, 'bias', None) is not None:
                layer.bias.fill_(bias)


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
    if args.views_on_device:
        _check_views_on_device(args, crop_mode)
    if is_iterable(dataset_train):
        _check_streamed(args)
    dataset_train = parallel.train_dataset(dataset_train, 1 if args.views_on_device else num_views)
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
        collate_fn=None if args.prefetcher and not args.views_on_device else collate_views,  # S views: split-major
        persistent_workers=False,  # fresh workers every epoch: seeded from the (checkpointed) torch RNG
        num_aug_repeats=int(args.aug_repeats) if args.aug_repeats else 0,
        use_multi_epochs_loader=args.use_multi_epochs_loader,
        worker_seeding=args.worker_seeding,
        **dict(common, use_prefetcher=args.prefetcher and not args.views_on_device),
    )
    set_loader_workers(loader_train.dataset, args.workers)  # streamed data: its length counts every reader
    transform_kwargs = dict(
        use_prefetcher=args.prefetcher, mean=data_config['mean'], std=data_config['std'])
    if args.views_on_device:  # uint8 images of a fixed size, no random op: the views are made on the device
        loader_train.dataset.transform = create_decode_transform(input_size, crop_mode)
    else:  # the full transform run once per view where the data set applies it (map-style and streamed alike)
        train_transform = create_train_transform(
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
            **{k: getattr(args, k) for k in ('color_jitter_prob', 'grayscale_prob', 'gaussian_blur_prob')
               if getattr(args, k) is not None},
            **transform_kwargs,
        )
        set_views_transform(loader_train.dataset, train_transform, num_views)
    if args.prefetcher and args.reprob > 0 and not args.views_on_device:
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
        set_loader_workers(loader_eval.dataset, args.workers)
        loader_eval.dataset.transform = create_eval_transform(
            input_size,
            train_crop_mode=crop_mode,
            interpolation=data_config['interpolation'],
            crop_pct=data_config['crop_pct'],
            crop_mode=data_config.get('crop_mode'),
            **transform_kwargs,
        )
        loader_eval = parallel.loader(loader_eval, is_training=False)
    loader_train = parallel.loader(loader_train, is_training=True)
    if args.views_on_device:
        augment = DeviceViewAugment(
            num_views, input_size, crop_mode=crop_mode, padding=max(1, input_size[-1] // 8), scale=args.scale,
            ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, mean=data_config['mean'], std=data_config['std'], seed=args.seed)
        loader_train = DeviceViewLoader(loader_train, augment, device, rank=args.rank)
    return loader_train, loader_eval, crop_mode


def _check_streamed(args) -> None:
    """Refuse what a streamed (iterable) training set cannot do: it has no indices for a sampler."""
    refused = dict(aug_repeats='--aug-repeats (its sampler repeats indices)',
                   use_multi_epochs_loader='--use-multi-epochs-loader (it wraps a sampler)',
                   member_parallel='--member-parallel (its views are seeded by sample index)')
    for dest, what in refused.items():
        if getattr(args, dest):
            raise CliError(f'--dataset {args.dataset} is streamed (no random access), which rules out {what}; use '
                           f'a map-style data set (an image folder, or hfds/ instead of hfids/).')


def _check_views_on_device(args, crop_mode: str) -> None:
    """Refuse what `--views-on-device` cannot do (AutoAugment / RandAugment run on PIL images, on the CPU)."""
    if args.aa:
        raise CliError(f'--views-on-device makes the views on the device, but --aa {args.aa} (AutoAugment / '
                       f'RandAugment) runs on the CPU only: drop one of the two.')
    if crop_mode not in ('pad', 'rrc'):
        raise CliError(f'--views-on-device supports --train-crop-mode pad or rrc, not {crop_mode}.')
    if args.member_parallel:
        raise CliError('--views-on-device is not supported with --member-parallel (its views are drawn per sample '
                       'and member on the CPU).')
    if crop_mode == 'rrc' and args.color_jitter:
        _logger.info('--views-on-device: colour jitter (--color-jitter) is not applied on the device.')


def _resume(args, checkpoint: Dict[str, Any], task: CoTrainingTask, ema: bool = False) -> None:
    """Load the checkpoint's weights into the task's model, with an error naming both models when they do not fit."""
    suffix = '_ema' if ema else ''
    try:
        task.load_checkpoint_state(checkpoint['state_dict' + suffix], checkpoint.get('task_state' + suffix), ema=ema)
    except (ValueError, RuntimeError) as e:
        written_by = checkpoint.get('arch', 'an unknown model')
        raise CliError(
            f'--resume {args.resume} holds weights of {written_by}, which do not fit --model {args.model}: {e}') from e


def scaled_lr(lr_base: float, global_batch: int, base_size: int, scale: str = '', opt: str = 'sgd') -> float:
    """timm's --lr-base rule: the rate of `base_size` images per step, grown with the global batch, linearly or (the
    default for adaptive optimizers: Ada*, LAMB) with its square root."""
    scale = scale or ('sqrt' if any(o in opt.lower() for o in ('ada', 'lamb')) else 'linear')
    if scale not in ('linear', 'sqrt'):
        raise CliError(f'--lr-base-scale {scale!r}: expected linear or sqrt.')
    ratio = global_batch / base_size
    return lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def _load_resume_checkpoint(path: str) -> Dict[str, Any]:
    """The training checkpoint of --resume (read once); weights without a run to continue point to
    --initial-checkpoint."""
    weights_only = CliError(f'--resume {path}: the file holds weights only (no optimizer state or epoch to continue '
                            f'from); start a new run from them with --initial-checkpoint {path}.')
    try:
        checkpoint = load_checkpoint_file(path)
    except NotATrainingCheckpoint:
        raise weights_only from None
    except (FileNotFoundError, ValueError) as e:
        raise CliError(f'--resume: {e}') from e
    if not is_training_checkpoint(checkpoint):
        raise weights_only
    return checkpoint


def _train(argv, cleanup: ExitStack) -> int:
    start_time = time.time()
    args, args_text = _parse_args(argv)
    with as_cli_error():
        preempt_signals = parse_signals(args.preempt_signals)
        max_time = parse_duration(args.max_time) if args.max_time else None
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    for name in args.device_modules or ():
        importlib.import_module(name)
    if args.fuser:
        from timm.utils import set_jit_fuser
        set_jit_fuser(args.fuser)
    if args.fast_norm:
        from timm.layers import set_fast_norm
        set_fast_norm()
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.member_parallel:  # one process per member (group), launched by torchrun, one GPU each
        check_torchrun_env('train.py')
        check_rank_device(args.device)
    parallel = MemberParallelTraining(args.seed, args.dist_timeout, args.dist_backend) if args.member_parallel \
        else DataParallelTraining(args.seed, timeout=args.dist_timeout, backend=args.dist_backend)
    device = parallel.init_device(args)
    primary = args.rank == 0
    guard = cleanup.enter_context(PreemptionGuard(
        preempt_signals, max_time, start_time, distributed=args.distributed, timeout=args.dist_timeout))
    if not primary:
        logging.getLogger().setLevel(logging.WARNING)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.distributed:
        _logger.info(
            f'{args.world_size} {"member-parallel" if args.member_parallel else "distributed"} training processes; '
            f'this one is rank {args.rank} on {device}.')
    else:
        _logger.info(f'One training process, on {device}.')

    amp_dtype = resolve_amp_dtype(args.amp_dtype, device) if args.amp else None
    amp_autocast = autocast_factory(device, amp_dtype)
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
    loader_train = make_resumable(loader_train, args.seed, args.rank)  # epochs that can start at any batch
    # the input the weights are trained and evaluated at: recorded in every checkpoint and in the export
    trained_data_config = eval_data_config(data_config, crop_mode)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
    # with mixup the smoothing is in the soft targets, the members' loss is then soft-target CE
    base_criterion = None
    if args.bce_loss:  # one-vs-all for every member; timm's BinaryCrossEntropy takes hard and mixed targets
        base_criterion = BinaryCrossEntropy(
            smoothing=0. if mixup_fn is not None else args.smoothing, target_threshold=args.bce_target_thresh,
            sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    criterion = CoTrainingLoss(
        base_criterion=base_criterion, cot_weight=args.cot_weight, cot_loss=args.cot_loss,
        warmup_epochs=args.cot_warmup_epochs, smoothing=0. if mixup_fn is not None else args.smoothing)
    task = parallel.create_task(model, criterion, num_views, mixup_fn=mixup_fn, device=device, verbose=primary)
    task.channels_last = args.channels_last  # multi-view batches: NHWC in the copy that concatenates the views

    # ----- optimizer (conv / linear weights decayed, BN and biases not: timm's filter_bias_and_bn) -----
    weight_decay = divide_weight_decay(args.weight_decay, split_factor, args.wd_divide)
    opt_kwargs = dict(args.opt_kwargs or {})
    if args.opt_eps is not None:
        opt_kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs['betas'] = args.opt_betas
    if args.layer_decay is not None:
        opt_kwargs['layer_decay'] = args.layer_decay
        if args.layer_decay_min_scale:
            opt_kwargs['layer_decay_min_scale'] = args.layer_decay_min_scale
    if args.lr is None:
        global_batch = args.batch_size * args.grad_accum_steps * getattr(parallel, 'data_parallel_size', 1)
        args.lr = scaled_lr(args.lr_base, global_batch, args.lr_base_size, args.lr_base_scale, args.opt)
        _logger.info(f'Learning rate {args.lr:.4g}: --lr-base {args.lr_base} at {args.lr_base_size} images, scaled '
                     f'to a global batch of {global_batch}.')
    args.warmup_lr = resolve_warmup_lr(args.warmup_lr, args.lr)
    for warning in lr_warnings(args.lr, args.warmup_lr, args.warmup_epochs, args.min_lr):
        _logger.warning(warning)
    with as_cli_error():  # e.g. --layer-decay on a model without a group_matcher
        optimizer = create_optimizer_v2(
            model, opt=args.opt, lr=args.lr, weight_decay=weight_decay, momentum=args.momentum, **opt_kwargs)
    _logger.info(
        f'Optimizer {args.opt}: lr {args.lr}, weight decay {weight_decay:.3g} '
        f'({args.weight_decay:g} divided by S={split_factor}: {args.wd_divide}).')
    with as_cli_error():  # --member-parallel refuses float16 AMP with --clip-grad
        loss_scaler = parallel.create_loss_scaler(device, amp_dtype, args.clip_grad)

    # ----- resume -----
    checkpoint = None
    start_epoch = 0
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'), str(data_config['input_size'][-1])])
    if args.resume == 'auto':
        args.resume, checkpoint = _find_auto_resume(args, exp_name, device)
    if args.resume:
        checkpoint = checkpoint or _load_resume_checkpoint(args.resume)
        _resume(args, checkpoint, task)
        start_epoch = checkpoint.get('epoch', -1) + 1
        if not args.no_resume_opt:
            if 'optimizer' in checkpoint:
                with as_cli_error():
                    task.load_optimizer_state_dict(optimizer, checkpoint['optimizer'])
            if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
                loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
        _logger.info(f'Resumed {args.resume} (epoch {checkpoint.get("epoch")}), continuing at epoch {start_epoch}.')
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    progress = EpochProgress(start_epoch, len(loader_train))
    position = checkpoint.get('position') if checkpoint is not None and args.start_epoch is None else None
    if position and len(checkpoint.get('rng') or ()) != args.world_size:
        _logger.warning(f'The mid-epoch checkpoint is of {len(checkpoint.get("rng") or ())} process(es), this run has '
                        f'{args.world_size}: epoch {start_epoch} starts again from its first batch.')
        position = None
    if position:  # a mid-epoch checkpoint: this epoch continues after its trained batches
        progress.load_state_dict(position)
        _logger.info(f'Continuing epoch {progress.epoch} after batch {progress.batch} of {progress.num_batches}.')

    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device=torch.device('cpu') if args.model_ema_force_cpu else device)
        if checkpoint is not None and 'state_dict_ema' in checkpoint:
            _resume(args, checkpoint, task, ema=True)

    check_compile_backend(args.torchcompile, 'auto' if 'auto' in (args.split_backend, backend) else backend)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if args.model_ema:
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    parallel.prepare_distributed(task, device, broadcast_buffers=not args.no_ddp_bb)
    model = task.get_trainable_module()
    model_ema = task.get_trainable_module(ema=True)

    # ----- LR schedule -----
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args, decreasing_metric=False), updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as e:
        raise CliError(f'cannot build the LR schedule of --sched {args.sched}: {e}') from e
    if lr_scheduler is None:  # older timm returns no scheduler for a name it does not know
        raise CliError(f"cannot build the LR schedule of --sched {args.sched}: Unknown scheduler '{args.sched}'.")
    if checkpoint is not None and not args.no_resume_opt and checkpoint.get('scheduler'):
        changed = restore_scheduler_state(lr_scheduler, checkpoint['scheduler'])
        if changed:  # e.g. a larger --epochs: the schedule of this run's settings, as timm's train.py resumes
            _logger.info(f'--resume: the LR schedule is rebuilt for this run\'s settings ({"; ".join(changed)}).')
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    num_updates = checkpoint['num_updates'] if position else start_epoch * updates_per_epoch
    if position:
        lr_scheduler.step_update(num_updates)  # per-update schedules move inside the epoch too
    _logger.info(f'Scheduled epochs: {num_epochs}, {updates_per_epoch} updates per epoch.')
    if start_epoch >= num_epochs:  # before any output folder is made
        if primary:
            print(f'nothing to train: the checkpoint is at epoch {start_epoch} of {num_epochs} (pass a larger '
                  f'--epochs to train on).', flush=True)
        parallel.finish()
        return 0

    # ----- output -----
    keeper = None
    output_dir = summary_csv = None
    if primary:
        output_dir = get_outdir(args.output or './output/train', exp_name)
        keeper = CheckpointKeeper(output_dir, max_history=args.checkpoint_hist)
        try:
            with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
                f.write(args_text)
        except OSError as e:
            raise CliError(describe_write_failure('args.yaml', output_dir, e)) from e
        summary_csv = os.path.join(output_dir, 'summary.csv')
        if checkpoint is not None:
            keeper.load_state_dict(checkpoint.get('keeper'))
            _truncate_summary(summary_csv, start_epoch)
        elif os.path.exists(summary_csv):
            os.remove(summary_csv)  # a fresh run in an existing folder: a new summary
        _logger.info(f'Output folder: {output_dir}')
        if args.log_wandb:
            import wandb
            wandb.init(project=args.wandb_project or args.experiment or None, tags=args.wandb_tags or None,
                       config=_plain(vars(args)))

    # the random streams continue exactly where the checkpointed run left them (sampler order, augmentation, mixup)
    rank_state = None
    if checkpoint is not None and checkpoint.get('rng'):
        states = checkpoint['rng']
        if len(states) == args.world_size:
            rank_state = states[args.rank]
            set_rng_state(rank_state)
            progress.load_rank_state(rank_state.get('epoch_state'))
        else:
            _logger.warning(f'Checkpoint RNG states are of {len(states)} process(es), not {args.world_size}: '
                            f'the run continues with fresh random streams.')
            random_seed(args.seed + start_epoch, args.rank)

    # ----- epochs -----
    eval_metrics = checkpoint.get('eval_metrics') if checkpoint is not None else None  # the last evaluation's
    best_eval_metrics = None
    if checkpoint is not None and keeper is not None and keeper.best_metric is not None:
        best_eval_metrics = checkpoint.get('best_eval_metrics')
    last_epoch = start_epoch - 1
    guard.eval_batches = len(loader_eval) if loader_eval is not None else 0
    guard.checkpoint_bytes = 3 * sum(p.numel() * p.element_size() for p in task.get_trainable_module().parameters())
    for epoch in range(start_epoch, num_epochs):
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        if hasattr(loader_train, 'set_epoch'):  # --views-on-device: the views' generator
            loader_train.set_epoch(epoch)
        set_data_epoch(loader_train.dataset, epoch)  # streamed data: the shard order of (seed, epoch)
        task.set_epoch(epoch)
        if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        if position and epoch == start_epoch and not progress.finished and not restore_loader_position(
                loader_train, progress.batch, (rank_state or {}).get('loader'), rank_state):
            remaining = progress.num_batches - progress.batch
            _logger.warning(f'The training loader cannot start mid-epoch: the remaining {remaining} batches of epoch '
                            f'{epoch} come from the start of its data.')

        try:
            train_metrics, num_updates = train_one_epoch(
                epoch, task, loader_train, optimizer, args, device, lr_scheduler, amp_autocast, loss_scaler,
                num_updates, parallel, guard=guard, progress=progress)
        except NonFiniteLossError as e:
            kept = f'; the last good checkpoint is {keeper.last_path}' if keeper and os.path.exists(
                keeper.last_path) else ''
            raise CliError(f'{e}{kept}') from e
        if progress.stopped:
            _logger.info(f'Stopping in epoch {epoch} after batch {progress.batch} of {progress.num_batches}: '
                         f'{guard.reason}.')
            state = _checkpoint_state(
                args, task, optimizer, lr_scheduler, loss_scaler, epoch - 1, num_updates,
                rank_extra=dict(loader=loader_position_state(loader_train, progress.batch),
                                epoch_state=progress.rank_state()),
                position=progress.state_dict(), eval_metrics=eval_metrics, best_eval_metrics=best_eval_metrics,
                data_config=trained_data_config)
            _write_on_primary(args, device, guard, f'the mid-epoch checkpoint of epoch {epoch}', output_dir, keeper,
                              keeper and keeper.save_recovery, epoch, progress.batch, state)
            return _exit_preempted(args, guard, keeper, parallel)
        bad = _bad_samples(loader_train.dataset)
        if bad is not None and (args.workers == 0 or bad > 0):  # counts made in loader workers may not come back
            train_metrics['bad_images'] = bad
            if bad:
                _logger.warning(f'Epoch {epoch}: {bad} unreadable image(s) skipped so far.')

        parallel.distribute_bn((model, model_ema), args.dist_bn)

        metric = None
        eval_start = time.time()
        evaluated = loader_eval is not None and evaluates_after(epoch, args.val_interval, num_epochs)
        if evaluated:
            eval_metrics = validate_members(
                model, loader_eval, device=device, amp_autocast=amp_autocast, channels_last=args.channels_last,
                distributed=args.distributed, log_interval=args.log_interval, forward_members=task.eval_members_fn,
                verbose=primary)
            metric = eval_metrics[args.eval_metric]
            if model_ema is not None and not args.model_ema_force_cpu:  # an average on the CPU is not evaluated
                ema_metrics = validate_members(
                    model_ema, loader_eval, device=device, amp_autocast=amp_autocast,
                    channels_last=args.channels_last, distributed=args.distributed, log_interval=args.log_interval,
                    log_prefix='Test (EMA)', verbose=primary)
                eval_metrics.update(('ema_' + k, v) for k, v in ema_metrics.items())
                metric = ema_metrics[args.eval_metric]
            _log_eval(epoch, eval_metrics)
        guard.note_eval(time.time() - eval_start)

        # collectives where the model is split over the processes: every rank takes part
        state = _checkpoint_state(
            args, task, optimizer, lr_scheduler, loss_scaler, epoch, num_updates, data_config=trained_data_config)

        if primary and metric is not None and (keeper.best_metric is None or metric > keeper.best_metric):
            best_eval_metrics = dict(eval_metrics, epoch=epoch)
        _write_on_primary(  # epochs without evaluation: empty eval columns in summary.csv (it keeps one header)
            args, device, guard, f'the checkpoint of epoch {epoch}', output_dir, keeper, _write_epoch, args, keeper,
            optimizer, summary_csv, epoch, train_metrics, eval_metrics if evaluated else _blank(eval_metrics), metric,
            primary and dict(state, eval_metrics=eval_metrics, best_eval_metrics=best_eval_metrics))

        lr_scheduler.step(epoch + 1, metric)
        last_epoch = epoch
        progress = progress.next_epoch()
        if args.stop_epoch is not None and epoch >= args.stop_epoch and epoch + 1 < num_epochs:
            _logger.info(f'Stopping after epoch {epoch} (--stop-epoch); continue with --resume '
                         f'{keeper.last_path if keeper else "last.pth.tar"}.')
            break
        if epoch + 1 < num_epochs and guard.agree():
            _logger.info(f'Stopping after epoch {epoch}: {guard.reason}.')
            return _exit_preempted(args, guard, keeper, parallel)

    if primary and last_epoch + 1 >= num_epochs:
        _finish(args, task, keeper, output_dir, summary_csv, best_eval_metrics or eval_metrics)
    parallel.finish()
    return 0


def _find_auto_resume(args, exp_name: str, device: torch.device) -> Tuple[str, Optional[Dict[str, Any]]]:
    """--resume auto: (path, checkpoint) of the newest complete checkpoint in the run folder, ('', None) for a fresh
    start."""
    if not args.experiment:
        raise CliError('--resume auto looks for checkpoints in the run folder, whose name must stay the same from one '
                       'start to the next: add --experiment NAME (e.g. the SLURM job id).')
    folder = os.path.join(args.output or './output/train', exp_name)
    found = find_resume_checkpoint(folder, args.distributed, device if device.type == 'cuda' else None)
    if not found:
        _logger.info(f'--resume auto: no checkpoint in {folder}, starting a new run.')
        return '', None
    _logger.info(f'--resume auto: continuing from {found[0]}.')
    return found


def _checkpoint_state(
        args, task: CoTrainingTask, optimizer, lr_scheduler, loss_scaler, epoch: int, num_updates: int,
        rank_extra: Optional[Dict[str, Any]] = None, **extra) -> Optional[Dict[str, Any]]:
    """The training checkpoint of the run after `epoch` (collectives: every rank calls it); None on ranks > 0.

    `rank_extra`: this rank's entries stored beside its random state; `extra`: more entries (e.g. `position`).
    """
    rng_states = gather_rng_states(args.distributed, extra=rank_extra)
    model_state = task.get_checkpoint_state()
    if args.model_ema:
        model_state.update(task.get_checkpoint_state(ema=True))
    optimizer_state = task.optimizer_state_dict(optimizer)
    if args.rank != 0:
        return None
    state = dict(
        epoch=epoch, arch=args.model, version=2, args=_plain(vars(args)), **model_state, optimizer=optimizer_state,
        scheduler=lr_scheduler.state_dict(), num_updates=num_updates, rng=rng_states, **extra)
    if loss_scaler is not None:
        state[loss_scaler.state_dict_key] = loss_scaler.state_dict()
    return state


def _write_on_primary(
        args, device, guard: PreemptionGuard, what: str, folder: Optional[str], keeper, write, *write_args) -> None:
    """Run `write(*write_args)` on rank 0; when it fails (full disk, read-only folder), every rank stops with an error
    (a collective). Signals that arrive meanwhile wait until the files are complete."""
    start = time.time()
    error = None
    if args.rank == 0:
        try:
            write(*write_args)
        except OSError as e:
            error = e
    if not agree_all(error is None, args.distributed, device if device.type == 'cuda' else None):
        if error is None:
            raise CliError(f'rank 0 could not write {what} (see its message); this rank stops too.')
        kept = f'; {keeper.last_path} is unchanged' if keeper and os.path.exists(keeper.last_path) else ''
        raise CliError(describe_write_failure(what, folder, error) + kept) from error
    guard.note_save(time.time() - start)
    guard.restart_step_clock()


def _write_epoch(args, keeper, optimizer, summary_csv: str, epoch: int, train_metrics, eval_metrics, metric,
                 state: Dict[str, Any]) -> None:
    """The summary.csv row and the checkpoints of an epoch (rank 0)."""
    lrs = [group['lr'] for group in optimizer.param_groups]
    update_summary(
        epoch, train_metrics, eval_metrics, filename=summary_csv, lr=sum(lrs) / len(lrs),
        write_header=not os.path.exists(summary_csv) or os.path.getsize(summary_csv) == 0, log_wandb=args.log_wandb)
    keeper.save(epoch, state, metric)
    if keeper.best_epoch is not None:
        _logger.info(f'*** Best ensemble top-1 so far: {keeper.best_metric:.3f} (epoch {keeper.best_epoch})')


def _exit_preempted(args, guard: PreemptionGuard, keeper, parallel: DataParallelTraining) -> int:
    """Log how to continue and end the processes of a run stopped by a signal or --max-time."""
    if guard.received:
        _logger.info(f'Signals received: {guard.describe_signals()}.')
    where = f' to {keeper.checkpoint_dir}' if keeper else ''
    _logger.info(f'Checkpoint written{where} in {guard.last_save_seconds:.1f} s; exiting with code '
                 f'{PREEMPTED_EXIT_CODE}: run the same command with --resume auto to continue '
                 f'({format_duration(guard.elapsed())} in this process).')
    guard.close()
    parallel.finish()
    return PREEMPTED_EXIT_CODE


def evaluates_after(epoch: int, val_interval: int, num_epochs: int) -> bool:
    """--val-interval: evaluate after the first epoch, after every `val_interval`-th and after the last. The choice
    depends on the epoch alone, so that a resumed run evaluates (and draws random numbers) as an uninterrupted one."""
    return epoch == 0 or (epoch + 1) % val_interval == 0 or epoch + 1 >= num_epochs


def _blank(metrics: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    return {k: '' for k in metrics} if metrics else None


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
    weights = export_model(model, output_dir, data_config=checkpoint.get('data_config'), extra_config=dict(
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


def accumulation_schedule(num_batches: int, accum_steps: int) -> Iterator[Tuple[int, bool]]:
    """How the batches of an epoch share optimizer steps under --grad-accum-steps.

    The batches form consecutive groups of `accum_steps` (the last group may be shorter). Yields, for every batch,
    the size of its group (each batch's loss is divided by it, so a step sees the group's mean gradient) and whether
    the optimizer steps after it (the group's last batch).
    """
    for first in range(0, num_batches, accum_steps):
        size = min(accum_steps, num_batches - first)
        for position in range(size):
            yield size, position == size - 1


def _backward(
        task: CoTrainingTask,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        loss_scaler: Optional[NativeScaler],
        args,
        step: bool,
) -> None:
    """Add the batch's gradients; with `step`, clip them (--clip-grad) and update the weights."""
    if loss_scaler is not None:  # float16: the scaler owns backward, unscaling, clipping and the step
        loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                    parameters=task.get_trainable_module().parameters(), need_update=step)
        return
    loss.backward()
    if not step:
        return
    if args.clip_grad is not None:
        task.clip_grad(args.clip_grad, args.clip_mode)
    optimizer.step()


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
        guard: Optional[PreemptionGuard] = None,
        progress: Optional[EpochProgress] = None,
):
    """One epoch of co-training (`parallel`: the hooks of the run's mode, default single process / DDP).

    `progress` says where the epoch starts (a batch after the first when resumed mid-epoch, with the loss sums so
    far) and records where it ends. `guard` is polled after every optimizer step: when it asks for a stop, the epoch
    ends there with `progress.stopped` set (also after the last batch, when the evaluation would not fit the budget).

    Returns:
        (metrics, num_updates): mean `loss`, `loss_ce`, `loss_cot` per image and the epoch's `cot_weight`; metrics
        is None when the epoch stopped early.
    """
    model = task.get_trainable_module()
    model.train()
    progress = progress if progress is not None else EpochProgress(epoch)
    num_batches = progress.num_batches = progress.num_batches or len(loader)
    start_batch = progress.batch
    last_batch_idx = num_batches - 1
    schedule = itertools.islice(accumulation_schedule(num_batches, args.grad_accum_steps), start_batch, None)
    parallel = parallel or DataParallelTraining(args.seed, args.world_size if args.distributed else 1)
    nan_skip = getattr(args, 'nan_skip', 0) or 0

    # running sums of loss, CE, co-training loss on the device (read at log steps only), images on the host
    sums = torch.tensor(progress.sums, dtype=torch.float64, device=device)
    num_images = progress.num_images
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    cot_weight = task.criterion.current_cot_weight if progress.cot_weight is None else progress.cot_weight
    start = last_log = time.time()
    images_since_log = 0
    data_time = 0.
    skip_group = False  # a batch of the current accumulation group had a non-finite loss (--nan-skip)
    optimizer.zero_grad()
    data_end = time.time()
    # the range comes first: zip stops before asking a loader that cannot start mid-epoch for a batch too many
    for batch_idx, (input, target), (group_size, step_after) in zip(range(start_batch, num_batches), loader, schedule):
        last_batch = batch_idx == last_batch_idx
        if not args.prefetcher:
            input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
        # CUDA: the raw batch stays valid for queued kernels; multi-view batches become channels_last in the task's
        # one copy to [B, S * C, H, W] (converting here too would copy the batch twice)
        input = prepare_batch(input, args.channels_last and task.num_views == 1)
        data_time += time.time() - data_end

        # DDP averages gradients only on the batch that ends a group; the others just add to .grad
        with (task.no_sync() if args.distributed and not step_after else nullcontext()):
            with amp_autocast():
                result = task(input, target)
            loss = result['loss']
            bad_ranks = nonfinite_ranks(loss, args.distributed) if nan_skip else []
            skip_group = skip_group or bool(bad_ranks)
            if not bad_ranks:
                _backward(task, loss / group_size, optimizer, loss_scaler, args, step=step_after and not skip_group)
        if step_after:
            optimizer.zero_grad()
            num_updates += 1
            if skip_group:
                try:
                    skip_nonfinite_step(progress, model, args.nan_skip, batch_idx, args.distributed)
                except NonFiniteLoss as e:
                    raise NonFiniteLossError(f'{e}; stopping. Lower --lr, add --clip-grad or check the data') from e
                if getattr(args, 'rank', 0) == 0:
                    _logger.warning(f'Skipped optimizer steps so far: {progress.skipped_steps} of --nan-skip '
                                    f'{args.nan_skip}.')
                skip_group = False
            else:
                task.update_ema(step=num_updates)
            lr_scheduler.step_update(num_updates=num_updates)
            if getattr(args, 'synchronize_step', False) and device.type == 'cuda':
                torch.cuda.synchronize(device)

        batch_size = result['batch_size']  # images, not S x images
        if not bad_ranks:
            nonfinite |= ~torch.isfinite(loss.detach())
            sums += torch.stack([loss.detach(), result['loss_ce'], result['loss_cot']]).double() * batch_size
            num_images += batch_size
        elif getattr(args, 'rank', 0) == 0:
            _logger.warning(f'Epoch {epoch} batch {batch_idx}: the loss is NaN or infinite on rank(s) '
                            f'{", ".join(map(str, bad_ranks))}; its optimizer step is skipped (--nan-skip).')
        cot_weight = result['cot_weight']
        images_since_log += batch_size * parallel.data_parallel_size

        if last_batch or batch_idx % max(1, args.log_interval) == 0:
            _check_finite(nonfinite, epoch, batch_idx, args.distributed)
            now = time.time()
            loss_avg, ce_avg, cot_avg = (v / max(num_images, 1) for v in sums.tolist())
            lrs = [group['lr'] for group in optimizer.param_groups]
            _logger.info(
                f'Train: {epoch} [{batch_idx:>4d}/{num_batches} ({100. * (batch_idx + 1) / num_batches:>3.0f}%)]  '
                f'Loss: {loss_avg:#.3g} (CE {ce_avg:#.3g} + {cot_weight:.3g} x CoT {cot_avg:#.3g})  '
                f'Time: {now - start:.1f}s, {images_since_log / max(now - last_log, 1e-6):>7.1f} images/s  '
                f'LR: {sum(lrs) / len(lrs):.3e}  Data: {data_time:.1f}s')
            last_log, images_since_log = now, 0
        if step_after:
            progress.batch = batch_idx + 1
            if guard is not None and guard.poll():
                progress.stopped = True
                break
        data_end = time.time()

    # after the last batch: stop before the evaluation too when the budget would not hold it
    if not progress.stopped and guard is not None and guard.agree(guard.eval_estimate()):
        progress.stopped = True
    _check_finite(nonfinite, epoch, progress.batch - 1, args.distributed)
    if progress.stopped:  # the checkpoint takes the sums so far
        progress.sums, progress.num_images, progress.cot_weight = sums.tolist(), num_images, cot_weight
        return None, num_updates
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
