""" Where a training epoch stands (for mid-epoch checkpoints) and the checks of skipped non-finite steps

See docs/training.md ("Preemption, auto-resume and faults").
"""
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ['EpochProgress', 'NonFiniteLoss', 'nonfinite_ranks', 'nonfinite_buffers', 'skip_nonfinite_step']


class NonFiniteLoss(ValueError):
    """The training loss was NaN or infinite in a step that cannot be skipped."""


class EpochProgress:
    """The position inside an epoch and the epoch's running loss sums, as a mid-epoch checkpoint stores them.

    `batch` counts the batches of the epoch already trained (the next one to train has that index); `num_batches` is
    the epoch's full length. `sums` are the image-weighted sums of (loss, CE, co-training loss) over `num_images`
    images, so the epoch's mean loss is that of an unbroken epoch. `skipped_steps` counts the optimizer steps of the
    run skipped for a non-finite loss (`--nan-skip`). `stopped` is set when the epoch ended early for a stop request.
    """

    def __init__(self, epoch: int = 0, num_batches: Optional[int] = None):
        self.epoch = epoch
        self.num_batches = num_batches
        self.batch = 0
        self.sums = [0., 0., 0.]
        self.num_images = 0
        self.cot_weight: Optional[float] = None
        self.skipped_steps = 0
        self.stopped = False

    def next_epoch(self, num_batches: Optional[int] = None) -> 'EpochProgress':
        """The progress at the start of the next epoch (the run's skipped-step count carries over)."""
        progress = EpochProgress(self.epoch + 1, self.num_batches if num_batches is None else num_batches)
        progress.skipped_steps = self.skipped_steps
        return progress

    @property
    def finished(self) -> bool:
        """Every batch of the epoch is trained."""
        return self.num_batches is not None and self.batch >= self.num_batches

    def state_dict(self) -> Dict[str, Any]:
        """What every rank shares: the epoch, the batches trained, the skipped steps."""
        return dict(epoch=self.epoch, batch=self.batch, num_batches=self.num_batches, cot_weight=self.cot_weight,
                    skipped_steps=self.skipped_steps)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = int(state['epoch'])
        self.batch = int(state['batch'])
        self.num_batches = state.get('num_batches', self.num_batches)
        self.cot_weight = state.get('cot_weight')
        self.skipped_steps = int(state.get('skipped_steps', 0))

    def rank_state(self) -> Dict[str, Any]:
        """What differs between ranks: this rank's loss sums and image count (summed over the ranks at the end)."""
        return dict(sums=list(self.sums), num_images=self.num_images)

    def load_rank_state(self, state: Optional[Dict[str, Any]]) -> None:
        state = state or {}
        self.sums = [float(v) for v in state.get('sums', (0., 0., 0.))]
        self.num_images = int(state.get('num_images', 0))

    def __repr__(self) -> str:
        return f'EpochProgress(epoch={self.epoch}, batch={self.batch}/{self.num_batches})'


def nonfinite_ranks(loss: torch.Tensor, distributed: bool = False) -> List[int]:
    """Ranks whose `loss` is NaN or infinite (a collective when `distributed`: every rank calls it, every rank gets
    the same list). Waits for the loss (one host synchronisation)."""
    bad = ~torch.isfinite(loss.detach()).all()
    if not distributed:
        return [0] if bool(bad) else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.float32, device=loss.device)
    flags[dist.get_rank()] = bad.float()
    dist.all_reduce(flags)
    return [int(r) for r in torch.nonzero(flags.cpu()).flatten()]


def nonfinite_buffers(model: nn.Module, distributed: bool = False) -> List[str]:
    """Names of this rank's floating-point buffers (BatchNorm statistics) that hold NaN or infinity; distributed, an
    empty list only when no rank has one (a collective)."""
    names = [name for name, buf in model.named_buffers() if buf.is_floating_point() and not bool(buf.isfinite().all())]
    if distributed:
        flag = torch.tensor([1. if names else 0.], device=next(iter(model.parameters())).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and not names:
            names = ['(on another rank)']
    return names


def skip_nonfinite_step(progress: EpochProgress, model: nn.Module, limit: int, batch: int,
                        distributed: bool = False) -> None:
    """Count an optimizer step skipped for a non-finite loss (`--nan-skip`; a collective when `distributed`).

    Raises:
        NonFiniteLoss: More than `limit` steps of the run were skipped, or the model's buffers (BatchNorm statistics,
            updated by the forward pass already) are no longer finite, so skipping the step cannot undo the damage.
    """
    progress.skipped_steps += 1
    where = f'epoch {progress.epoch}, batch {batch}'
    if progress.skipped_steps > limit:
        raise NonFiniteLoss(
            f'the training loss became NaN or infinite in {progress.skipped_steps} optimizer steps, more than '
            f'--nan-skip {limit} (the last in {where})')
    buffers = nonfinite_buffers(model, distributed)
    if buffers:
        more = ', ...' if len(buffers) > 3 else ''
        raise NonFiniteLoss(
            f'the training loss became NaN or infinite in {where} and the model\'s buffers '
            f'({", ".join(buffers[:3])}{more}) are no longer finite, so the step cannot be skipped')
