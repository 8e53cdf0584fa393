""" Co-training losses of SplitNet: `loss = sum_i CE(z_i, y) + w(epoch) * cot(z_1, ..., z_S)`

`cot` is the Jensen-Shannon divergence of the members' softmax outputs (paper eq. 4) or a deep-mutual-learning sum
of pairwise KL divergences with detached peers; `w` ramps up linearly over the first epochs.

Papers: SplitNet, https://arxiv.org/abs/2011.14660; Deep Mutual Learning, https://arxiv.org/abs/1706.00384
"""
import logging
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

__all__ = [
    'js_divergence', 'pairwise_kl', 'CoTrainingLoss', 'CoTrainingLossOutput',
    'COT_LOSSES',
]

_logger = logging.getLogger(__name__)

COT_LOSSES = ('js', 'kl')

# Lower bound of the co-training weight during warm-up (reference implementation: max(w * epoch / warmup, 0.005)).
_COT_WEIGHT_FLOOR = 0.005


def _stack_logits(logits: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """Stack per-member logits into one tensor of shape [S, B, C], upcast to fp32 (fp64 stays fp64)."""
    if not isinstance(logits, torch.Tensor):
        logits = torch.stack(list(logits))
    if logits.ndim != 3:
        raise ValueError(f'Expected member logits of shape [S, B, C], got {tuple(logits.shape)}.')
    return logits if logits.dtype == torch.float64 else logits.float()


def _log_probs(logits: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """fp32 log-softmax over classes with autocast disabled, so that half-precision inputs are safe."""
    logits = _stack_logits(logits)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.log_softmax(logits, dim=-1)


def js_divergence(logits: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of S members' predictions, averaged over the batch.

    ``JS = H(mean_i p_i) - mean_i H(p_i)`` with ``p_i = softmax(z_i)`` (natural log), evaluated in the equivalent
    form ``mean_i KL(p_i || m)``, ``m = mean_i p_i``, which avoids the cancellation of two large entropies. All
    arithmetic is in fp32 (autocast off); ``log m`` is a logsumexp of the members' log-probabilities, so confident
    (one-hot like) predictions give neither ``log(0)`` nor NaN. No temperature and no detach: every member receives
    gradients, as in the paper.

    Args:
        logits: Member logits of shape [S, B, C] (or a sequence of S tensors of shape [B, C]), any float dtype.

    Returns:
        Scalar fp32 tensor, zero for S == 1 or identical members.
    """
    log_p = _log_probs(logits)  # [S, B, C]
    num_members = log_p.shape[0]
    with torch.autocast(device_type=log_p.device.type, enabled=False):
        log_m = torch.logsumexp(log_p, dim=0) - math.log(num_members)  # log of the mean probability, [B, C]
        kl = (log_p.exp() * (log_p - log_m)).sum(-1)  # KL(p_i || m), [S, B]
        return kl.mean(0).mean()


def pairwise_kl(logits: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """Deep-mutual-learning style co-training loss with detached peers.

    ``sum_{i != j} KL(p_j.detach() || p_i) / (S - 1)``, each KL summed over classes and averaged over the batch:
    member i is pulled towards each peer's (fixed) prediction. Computed in fp32 with autocast off.

    Args:
        logits: Member logits of shape [S, B, C] (or a sequence of S tensors of shape [B, C]), any float dtype.

    Returns:
        Scalar fp32 tensor, zero for S == 1.
    """
    log_p = _log_probs(logits)  # [S, B, C]
    num_members = log_p.shape[0]
    if num_members < 2:
        return log_p.new_zeros(())
    with torch.autocast(device_type=log_p.device.type, enabled=False):
        log_q = log_p.detach()  # peers as fixed targets
        q = log_q.exp()
        neg_entropy_q = (q * log_q).sum(-1)  # [S(j), B]
        cross = torch.einsum('jbc,ibc->jib', q, log_p)  # sum_c q_j * log p_i, [S(j), S(i), B]
        kl = neg_entropy_q.unsqueeze(1) - cross  # KL(q_j || p_i), [S(j), S(i), B]
        off_diagonal = ~torch.eye(num_members, dtype=torch.bool, device=kl.device)
        return kl[off_diagonal].sum(0).mean() / (num_members - 1)


class CoTrainingLossOutput(NamedTuple):
    """Result of :class:`CoTrainingLoss`; ``loss == loss_ce + cot_weight * loss_cot``.

    Attributes:
        loss: Total loss to back-propagate.
        loss_ce: Sum over members of the classification (base criterion) losses.
        loss_cot: Unweighted co-training divergence (zero for a single member).
        cot_weight: Weight applied to ``loss_cot`` for the current epoch.
    """
    loss: torch.Tensor
    loss_ce: torch.Tensor
    loss_cot: torch.Tensor
    cot_weight: float


class CoTrainingLoss(nn.Module):
    """Sum of the members' classification losses plus a weighted co-training divergence.

    ``loss = sum_i base_criterion(z_i, target) + w * cot(z)``. The classification losses are summed, not averaged,
    over the S members as in the reference implementation (so their gradient scale grows with S at a fixed learning
    rate). ``w`` warms up linearly: ``max(cot_weight * epoch / warmup_epochs, 0.005)`` while
    ``epoch < warmup_epochs``, then ``cot_weight``; call :meth:`set_epoch` at the start of each epoch.

    Without an explicit ``base_criterion`` the criterion follows the target: hard labels [B] use cross-entropy
    (``LabelSmoothingCrossEntropy`` when ``smoothing > 0``), soft targets [B, C] (mixup / cutmix / smoothed one-hot,
    e.g. from :func:`timm_splitnet.data.mixup_views`) use ``SoftTargetCrossEntropy``. All losses are evaluated in
    fp32 with autocast off.
    """

    def __init__(
            self,
            base_criterion: Optional[nn.Module] = None,
            cot_weight: float = 0.5,
            cot_loss: str = 'js',
            warmup_epochs: float = 0.,
            smoothing: float = 0.,
    ):
        """
        Args:
            base_criterion: Per-member classification loss ``criterion(logits [B, C], target)``, used for every
                target kind. None picks cross-entropy / label smoothing / soft-target cross-entropy per target.
            cot_weight: Weight of the co-training term after warm-up (paper: 0.5).
            cot_loss: 'js' (Jensen-Shannon divergence, paper default) or 'kl' (pairwise KL with detached peers).
            warmup_epochs: Epochs in which the co-training weight ramps up linearly (reference: 40 CIFAR, 60 ImageNet).
            smoothing: Label smoothing of the default hard-label criterion; ignored with ``base_criterion``.
        """
        super().__init__()
        if cot_loss not in COT_LOSSES:
            raise ValueError(f'Unknown cot_loss {cot_loss!r}, expected one of {COT_LOSSES}.')
        if cot_weight < 0:
            raise ValueError(f'cot_weight must be >= 0, got {cot_weight}.')
        if warmup_epochs < 0:
            raise ValueError(f'warmup_epochs must be >= 0, got {warmup_epochs}.')
        self.base_criterion = base_criterion
        if base_criterion is None:
            self.hard_criterion = LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()
            self.soft_criterion = SoftTargetCrossEntropy()
        self.cot_weight = float(cot_weight)
        self.cot_loss = cot_loss
        self.warmup_epochs = float(warmup_epochs)
        self.epoch: float = 0.
        self._epoch_set = False

    def cot_weight_at(self, epoch: float) -> float:
        """Co-training weight at ``epoch`` (may be fractional): linear warm-up with a floor of 0.005.

        The floor is capped at ``cot_weight`` so that ``cot_weight=0`` really disables the term.
        """
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            return max(self.cot_weight * epoch / self.warmup_epochs, min(_COT_WEIGHT_FLOOR, self.cot_weight))
        return self.cot_weight

    def set_epoch(self, epoch: float):
        """Set the epoch that selects the co-training weight (call at the start of every epoch, also on resume)."""
        self.epoch = float(epoch)
        self._epoch_set = True

    @property
    def current_cot_weight(self) -> float:
        return self.cot_weight_at(self.epoch)

    def divergence(self, logits: torch.Tensor) -> torch.Tensor:
        """Unweighted co-training divergence of member logits [S, B, C]."""
        return js_divergence(logits) if self.cot_loss == 'js' else pairwise_kl(logits)

    def _criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.base_criterion is not None:
            return self.base_criterion(logits, target)
        if target.ndim == 2:
            return self.soft_criterion(logits, target.float())
        return self.hard_criterion(logits, target)

    def forward(
            self,
            logits: Union[torch.Tensor, Sequence[torch.Tensor]],
            target: torch.Tensor,
    ) -> CoTrainingLossOutput:
        """
        Args:
            logits: Member logits [S, B, C] (or a sequence of S tensors [B, C]).
            target: Class indices [B] or soft targets [B, C], shared by all members. With timm's ``fast_collate``
                the targets arrive repeated S times ([S * B]): pass ``target[:B]``.

        Returns:
            :class:`CoTrainingLossOutput` with ``loss``, ``loss_ce``, ``loss_cot`` and ``cot_weight``.
        """
        if self.warmup_epochs > 0 and not self._epoch_set and self.training:
            _logger.warning('CoTrainingLoss has a cot-weight warm-up but set_epoch() was never called; using epoch 0.')
            self._epoch_set = True  # warn once
        logits = _stack_logits(logits)
        num_members, batch_size = logits.shape[:2]
        if target.shape[0] != batch_size:
            raise ValueError(
                f'target has {target.shape[0]} rows but the member logits have batch size {batch_size}; '
                f'with repeated (split-major) targets pass target[:{batch_size}].')
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss_ce = sum(self._criterion(logits[i], target) for i in range(num_members))
            if num_members > 1:
                loss_cot = self.divergence(logits)
            else:
                loss_cot = logits.new_zeros(())
            weight = self.current_cot_weight
            loss = loss_ce + weight * loss_cot
        return CoTrainingLossOutput(loss=loss, loss_ce=loss_ce, loss_cot=loss_cot, cot_weight=weight)

    def extra_repr(self) -> str:
        return f'cot_loss={self.cot_loss}, cot_weight={self.cot_weight}, warmup_epochs={self.warmup_epochs}'
