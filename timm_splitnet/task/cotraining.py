""" Co-training task (a `timm.task.TrainingTask`) and member-wise evaluation

`CoTrainingTask` turns a multi-view batch into the SplitNet layout, applies shared mixup and returns the co-training
loss and its parts; `validate_members` evaluates the ensemble and every member in one pass. Details:
`docs/training.md`.
"""
import logging
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.task import TrainingTask
from timm.utils import accuracy, dispatch_clip_grad, unwrap_model

from ..data import mixup_views, views_to_channels
from ..loss import CoTrainingLoss
from ..utils.batch import prepare_batch
from ..utils.metrics import CalibrationMeter, EnsembleMetrics, ensemble_manner

__all__ = ['CoTrainingTask', 'validate_members', 'is_splitnet', 'prepare_split_backend']

_logger = logging.getLogger(__name__)


def is_splitnet(model: nn.Module) -> bool:
    """True for a SplitNet (possibly wrapped in DDP / torch.compile / EMA)."""
    return hasattr(unwrap_model(model), 'forward_members')


def prepare_split_backend(model: nn.Module) -> None:
    """Build the split backend's programs of a SplitNet (possibly wrapped) eagerly, before `torch.compile`."""
    base = unwrap_model(model)
    if hasattr(base, 'prepare_split_backend'):
        base.prepare_split_backend()


class CoTrainingTask(TrainingTask):
    """Divide-and-co-train training task (paper eq. 8-9) on timm's task layer.

    `forward(input, target)` returns a dict with `loss` (to back-propagate), `loss_ce` (sum of the members'
    classification losses), `loss_cot` (unweighted co-training divergence), `cot_weight` and `output` (ensemble
    logits, mean over members). A model that is not a SplitNet is trained as a single member (plain CE). The task
    switches co-training on for the SplitNet it trains (`set_cotraining(True)`: member logits in train mode).

    EMA, checkpoint state and `no_sync` come from `TrainingTask`; `prepare_distributed` wraps the model in DDP and
    `compile` compiles it, like timm's `ClassificationTask`. What else depends on where the members live is here
    too: `clip_grad`, `optimizer_state_dict` / `load_optimizer_state_dict` (checkpoints) and `full_model` (export).

    Subclasses that place the members elsewhere (`MemberParallelTask`) override the hooks `batch_members` (members
    whose views a sample carries), `wrap_ddp` (the DDP step of `prepare_distributed`) and `describe`.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: CoTrainingLoss,
            num_views: Optional[int] = 1,
            mixup_fn: Optional[Callable] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        """
        Args:
            model: The SplitNet (or any timm classifier) to train.
            criterion: Co-training loss applied to member logits [S, B, C].
            num_views: Views per sample in the batch: S (or None) for one view per member (split-major
                `[S * B, C, H, W]` batches), 1 when every member sees the same image `[B, C, H, W]`.
            mixup_fn: Optional `timm.data.Mixup`, applied once per batch to all views alike.
            device: Device of the task.
            dtype: Dtype of the task.
            verbose: Log the configuration.

        Raises:
            ValueError: `num_views` is neither 1 nor the number of members whose views a sample carries.
        """
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        members = self.batch_members(model)
        if num_views is None:
            num_views = members
        if num_views not in (1, members):
            raise ValueError(
                f'{type(self).__name__}: num_views must be 1 (same view for every member) or the number of members '
                f'whose views a sample carries ({members}), got {num_views}.')
        base = unwrap_model(model)
        if hasattr(base, 'set_cotraining'):
            base.set_cotraining(True)  # train mode: the member logits [S, B, C] for the co-training loss
        self.trainable_module = model
        self.criterion = criterion
        self.num_views = num_views
        self.mixup_fn = mixup_fn
        self.split_factor = getattr(model, 'split_factor', 1)
        # multi-view batches: build the [B, S * C, H, W] input in channels_last in the one copy the layout change
        # needs (pass the loader's batch as it is; train.py sets this with --channels-last)
        self.channels_last = False
        self.eval_members_fn: Optional[Callable] = None
        if self.verbose:
            _logger.info(f'{type(self).__name__}: {self.describe()}')

    # ----- hooks of subclasses -----

    def batch_members(self, model: nn.Module) -> int:
        """Number of members whose views one sample of a batch carries: every member (S, 1 for a plain model)."""
        return getattr(model, 'split_factor', 1)

    def wrap_ddp(self, module: nn.Module, device_ids: Optional[list] = None, **ddp_kwargs) -> nn.Module:
        """The DDP step of `prepare_distributed`: the whole model, gradients averaged over all processes."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(module, device_ids=device_ids, **ddp_kwargs)

    def describe(self) -> str:
        """The configuration, in one line (logged when verbose)."""
        return (f'{self.split_factor} member(s), {self.num_views} view(s) per sample, criterion={self.criterion}, '
                f'mixup={"on" if self.mixup_fn is not None else "off"}')

    def set_epoch(self, epoch: float) -> None:
        """Set the epoch of the co-training weight warm-up (call at the start of every epoch)."""
        self.criterion.set_epoch(epoch)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'CoTrainingTask':
        """Wrap the model for distributed training (`wrap_ddp`: DDP, every member receives gradients every step)."""
        self.trainable_module = self.wrap_ddp(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the model (before DDP); the member-wise eval forward is compiled too.

        The split backend is prepared first (`SplitNet.prepare_split_backend`): the packed programs of both modes are
        built eagerly, so the compiled frames trace their execution only.
        """
        model = self.trainable_module
        prepare_split_backend(model)
        if is_splitnet(model):
            self.eval_members_fn = torch.compile(model.forward_members, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(model, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = self.trainable_module
        return self.trainable_module

    def compile_ema(
            self,
            backend: str = 'inductor',
            mode: Optional[str] = None,
            **compile_kwargs,
    ) -> Optional[nn.Module]:
        """Compile the EMA eval model (its split backend prepared first, as in `compile`)."""
        if self.has_ema():
            prepare_split_backend(self.get_eval_model(ema=True))
        return super().compile_ema(backend=backend, mode=mode, **compile_kwargs)

    def clip_grad(self, value: float, mode: str = 'norm') -> Optional[torch.Tensor]:
        """Clip the gradients of the trained model (timm's `dispatch_clip_grad`), after backward."""
        dispatch_clip_grad(self.get_trainable_module().parameters(), value=value, mode=mode)
        return None

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
        """The optimizer state dict for a checkpoint: that of an optimizer over the full SplitNet."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: Dict[str, Any]) -> None:
        """Load a checkpoint's optimizer state (over the full SplitNet).

        Raises:
            ValueError: The state dict is of another model or optimizer setup.
        """
        try:
            optimizer.load_state_dict(state_dict)
        except (ValueError, KeyError) as e:
            raise ValueError(f'the optimizer state of the checkpoint does not fit this optimizer: {e}') from e

    def full_model(self, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
        """The trained model holding `state_dict` (a checkpoint's full state dict), for the export."""
        model = unwrap_model(self.get_trainable_module())
        model.load_state_dict(state_dict)
        return model

    def split_batch(self, input: torch.Tensor, target: torch.Tensor):
        """Loader batch to model input and one target per sample.

        `[S * B, C, H, W]` split-major views become `[B, S * C, H, W]` (channels_last with `channels_last` set or a
        channels_last batch) and repeated targets `[S * B]` become `[B]`; single-view batches pass through. Mixup
        (when enabled) is applied here, once for all views.
        """
        if self.num_views > 1:
            batch_size = input.shape[0] // self.num_views
            input = views_to_channels(input, self.num_views, torch.channels_last if self.channels_last else None)
            if target.shape[0] == batch_size * self.num_views:
                target = target[:batch_size]
        if self.mixup_fn is not None and target.ndim == 1:
            # also after mixup is switched off (mixup_enabled=False): timm's Mixup then returns the label-smoothed
            # one-hot targets the soft-target criterion expects
            input, target = mixup_views(self.mixup_fn, input, target)
        return input, target

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        """Co-training forward.

        Args:
            input: Split-major views `[S * B, C, H, W]` (or `[B, C, H, W]` with one view per sample).
            target: Class indices `[S * B]` / `[B]`, or soft targets `[B, num_classes]`.

        Returns:
            Dict with `loss`, `loss_ce`, `loss_cot`, `cot_weight`, `output` (ensemble logits) and `batch_size`.
        """
        input, target = self.split_batch(input, target)
        logits = self.trainable_module(input)
        if logits.ndim == 2:  # not a SplitNet: one member
            logits = logits.unsqueeze(0)
        out = self.criterion(logits, target)
        return {
            'loss': out.loss,
            'loss_ce': out.loss_ce.detach(),
            'loss_cot': out.loss_cot.detach(),
            'cot_weight': out.cot_weight,
            'output': logits.detach().mean(0),
            'batch_size': input.shape[0],
        }


@torch.no_grad()
def validate_members(
        model: nn.Module,
        loader,
        device: Optional[torch.device] = None,
        amp_autocast: Callable = nullcontext,
        channels_last: bool = False,
        distributed: bool = False,
        log_interval: int = 50,
        log_prefix: str = 'Test',
        forward_members: Optional[Callable] = None,
        verbose: bool = True,
) -> Dict[str, float]:
    """Ensemble and member accuracy of a SplitNet (or a plain classifier) on `loader`.

    Args:
        model: SplitNet or classifier, possibly wrapped (DDP, torch.compile, EMA).
        loader: Eval loader of single images `[B, C, H, W]` (prefetcher or not).
        device: Device of the model (default: the CPU).
        amp_autocast: Autocast context factory.
        channels_last: Convert inputs to channels-last.
        distributed: Sum the counts over all processes.
        log_interval: Log every this many batches.
        log_prefix: Prefix of the progress lines.
        forward_members: Callable returning member logits [S, B, C] (e.g. a compiled `forward_members`); defaults to
            the unwrapped model's `forward_members`.
        verbose: Log progress lines.

    Returns:
        `loss` (CE of the ensemble), `top1`, `top5`, `nll`, `brier`, `ece` (ensemble) and, for a SplitNet,
        `member{i}_top1`, `member{i}_top5`, `member{i}_nll`, `member{i}_brier`, `member{i}_ece` for every member,
        `member_avg_top1` and, with two members or more, `disagreement` and `pairwise_kl`; accuracies in percent,
        the other metrics as defined in `timm_splitnet.utils.metrics` (the ensemble's distribution is that of the
        model's configured manner).
    """
    device = device if device is not None else torch.device('cpu')
    base = unwrap_model(model)
    splitnet = hasattr(base, 'forward_members')
    if splitnet and forward_members is None:
        forward_members = base.forward_members
    was_training = model.training
    model.eval()
    num_members = base.split_factor if splitnet else 1
    # device sums (no host sync per batch): [loss, ens top1, ens top5, m0 top1, m0 top5, m1 top1, ...]; images on host
    sums = torch.zeros(3 + 2 * num_members, dtype=torch.float64, device=device)
    if splitnet:
        calibration = EnsembleMetrics(
            num_members, ensemble_manner(getattr(base, 'ensemble', 'mean'), getattr(base, 'ensemble_softmax', False)),
            device=device)
    else:
        calibration = CalibrationMeter(device=device)
    count = 0
    start = time.time()
    last_idx = len(loader) - 1
    for batch_idx, (input, target) in enumerate(loader):
        input = input.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        input = prepare_batch(input, channels_last)
        with amp_autocast():
            if splitnet:
                members = forward_members(input)
                output = base.combine(members)
            else:
                output = model(input)
                if isinstance(output, (tuple, list)):
                    output = output[0]
                members = output.unsqueeze(0)
        output = output.float()
        batch_size = input.shape[0]
        stats = [F.cross_entropy(output, target), *accuracy(output, target, topk=(1, 5))]
        if splitnet:
            for member_logits in members.float():
                stats += accuracy(member_logits, target, topk=(1, 5))
            calibration.update(members, target)
        else:
            stats += stats[1:3]
            calibration.update(output, target)
        sums += torch.stack(stats).double() * batch_size  # accuracies in percent
        count += batch_size
        if verbose and log_interval and (batch_idx % log_interval == 0 or batch_idx == last_idx):
            loss, top1, top5 = (v / count for v in sums[:3].tolist())
            _logger.info(
                f'{log_prefix}: [{batch_idx:>4d}/{last_idx}]  Time: {time.time() - start:.1f}s  '
                f'Loss: {loss:>7.3f}  Acc@1: {top1:>7.3f}  Acc@5: {top5:>7.3f}')
    sums = torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=device)])
    if distributed:
        torch.distributed.all_reduce(sums)
        calibration.all_reduce()
    model.train(was_training)
    *sums, count = sums.tolist()
    count = max(count, 1.)
    metrics = OrderedDict(loss=sums[0] / count, top1=sums[1] / count, top5=sums[2] / count)
    if splitnet:
        for i in range(num_members):
            metrics[f'member{i}_top1'] = sums[3 + 2 * i] / count
            metrics[f'member{i}_top5'] = sums[4 + 2 * i] / count
        metrics['member_avg_top1'] = sum(metrics[f'member{i}_top1'] for i in range(num_members)) / num_members
    metrics.update(calibration.compute())
    return metrics
