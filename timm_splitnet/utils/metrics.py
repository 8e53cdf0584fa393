""" Streaming calibration and diversity metrics: NLL, Brier score, ECE (15 bins), disagreement, pairwise KL

`CalibrationMeter` measures one predictive distribution, `EnsembleMetrics` an ensemble (one or more manners), every
member and the members' diversity from member logits [S, B, C]; sums stay on the device in float64 and `compute()`
syncs once. Definitions: `docs/training.md` (and README, "Calibration and diversity").
"""
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

__all__ = ['ENSEMBLE_MANNERS', 'CalibrationMeter', 'EnsembleMetrics', 'ensemble_log_probs', 'ensemble_manner']

# Table 9 manners: name -> (reduction over members, on softmax probabilities)
ENSEMBLE_MANNERS = OrderedDict([
    ('mean', ('mean', False)),
    ('max', ('max', False)),
    ('softmax_mean', ('mean', True)),
    ('softmax_max', ('max', True)),
])

_STATS = 3  # nll sum, brier sum, sample count (after the 3 per-bin sums)


def ensemble_manner(ensemble: str = 'mean', ensemble_softmax: bool = False) -> str:
    """The name (a key of `ENSEMBLE_MANNERS`) of a SplitNet's `ensemble` / `ensemble_softmax` configuration."""
    name = ('softmax_' if ensemble_softmax else '') + ensemble
    if name not in ENSEMBLE_MANNERS:
        raise ValueError(f'Unknown ensemble {ensemble!r}, expected one of mean, max.')
    return name


def ensemble_log_probs(
        member_log_probs: torch.Tensor, manner: str, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Log of the ensemble's predictive distribution [B, C] under a manner (see the module docstring).

    Args:
        member_log_probs: Log-softmax of the member logits, [S, B, C].
        manner: A key of `ENSEMBLE_MANNERS`.
        logits: The member logits [S, B, C] (needed by the logit manners; default: the log-probabilities, which give
            the same `mean` ensemble but not the same `max` one).

    Returns:
        Normalised log-probabilities [B, C] in the dtype of `member_log_probs`.
    """
    if manner not in ENSEMBLE_MANNERS:
        raise ValueError(f'Unknown ensemble manner {manner!r}, expected one of {list(ENSEMBLE_MANNERS)}.')
    reduce, softmax = ENSEMBLE_MANNERS[manner]
    if softmax:
        if reduce == 'mean':  # log of the mean probability, exactly: logsumexp over members - log S
            return torch.logsumexp(member_log_probs, dim=0) - math.log(member_log_probs.shape[0])
        return member_log_probs.amax(0).log_softmax(dim=-1)  # max of the probabilities, renormalised
    x = member_log_probs if logits is None else logits.to(member_log_probs.dtype)
    return (x.mean(0) if reduce == 'mean' else x.amax(0)).log_softmax(dim=-1)


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == 'mps' else torch.float64  # MPS has no float64


def _calibration(state: list[float], num_bins: int) -> dict[str, float]:
    """nll / brier / ece of a host copy of a meter's state (NaN without samples)."""
    count = state[3 * num_bins + 2]
    if count <= 0:
        return OrderedDict(nll=math.nan, brier=math.nan, ece=math.nan)
    conf_sums, correct_sums = state[num_bins:2 * num_bins], state[2 * num_bins:3 * num_bins]
    ece = sum(abs(a - c) for a, c in zip(correct_sums, conf_sums)) / count
    return OrderedDict(nll=state[3 * num_bins] / count, brier=state[3 * num_bins + 1] / count, ece=ece)


def _reliability(state: list[float], num_bins: int, scale: float = 1.) -> dict[str, list[float]]:
    counts = state[:num_bins]
    return dict(
        edges=[b / num_bins for b in range(num_bins + 1)],
        count=[n / scale for n in counts],
        confidence=[s / n if n > 0 else math.nan for s, n in zip(state[num_bins:2 * num_bins], counts)],
        accuracy=[s / n if n > 0 else math.nan for s, n in zip(state[2 * num_bins:3 * num_bins], counts)],
        **_calibration(state, num_bins),
    )


class _DeviceSums:
    """Sums kept in one tensor `state` on the device: reset, summed over processes, read on the host once."""

    state: torch.Tensor
    _host: list[float] | None = None

    @property
    def device(self) -> torch.device:
        return self.state.device

    def reset(self) -> None:
        self.state.zero_()
        self._host = None

    def all_reduce(self, group=None) -> None:
        """Sum the accumulators over the processes of `group` (torch.distributed, every process calls it)."""
        torch.distributed.all_reduce(self.state, group=group)
        self._host = None

    def _host_state(self) -> list[float]:
        if self._host is None:
            self._host = self.state.tolist()  # the one host sync
        return self._host


class CalibrationMeter(_DeviceSums):
    """Streaming NLL, Brier score and top-1 expected calibration error of one predictive distribution.

    Accumulates per-bin sample counts, confidence sums and correct counts, and NLL and Brier sums, on the device
    without host syncs; `compute()` syncs once. Definitions in the module docstring.
    """

    def __init__(
            self,
            num_bins: int = 15,
            device: str | torch.device | None = None,
            state: torch.Tensor | None = None,
    ):
        """
        Args:
            num_bins: Equal-width confidence bins of the ECE.
            device: Device of the accumulators (default: cpu, or the device of `state`).
            state: A zeroed tensor of `3 * num_bins + 3` elements to accumulate into (a view of a larger state, as
                `EnsembleMetrics` shares one tensor between its meters); default: a new one.
        """
        if num_bins < 1:
            raise ValueError(f'CalibrationMeter: num_bins must be positive, got {num_bins}.')
        self.num_bins = num_bins
        if state is None:
            device = torch.device(device or 'cpu')
            state = torch.zeros(3 * num_bins + _STATS, dtype=_accumulator_dtype(device), device=device)
        elif state.shape != (3 * num_bins + _STATS,):
            raise ValueError(f'CalibrationMeter: state must have {3 * num_bins + _STATS} elements, got '
                             f'{list(state.shape)}.')
        self.state = state
        # inner bin edges: bucketize(conf, edges) = b for conf in (b / n, (b + 1) / n]
        self._edges = torch.linspace(0, 1, num_bins + 1, dtype=state.dtype, device=state.device)[1:-1]
        self._host: list[float] | None = None

    def update(self, scores: torch.Tensor, target: torch.Tensor, probs: bool = False) -> None:
        """Add a batch.

        Args:
            scores: Logits [B, C], or probabilities [B, C] with `probs` (normalised here; zeros are clamped to the
                smallest positive float in the log).
            target: Class indices [B].
            probs: `scores` are probabilities.
        """
        scores = scores.to(device=self.device, dtype=self.state.dtype)
        if probs:
            scores = scores.clamp_min(torch.finfo(scores.dtype).tiny).log()
        self.update_log_probs(scores.log_softmax(dim=-1), target)

    def update_log_probs(self, log_probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of normalised log-probabilities [B, C] (accumulator dtype and device) and class indices [B]."""
        if log_probs.ndim != 2 or target.shape != log_probs.shape[:1]:
            raise ValueError(f'CalibrationMeter: expected scores [B, C] and class indices [B], got '
                             f'{list(log_probs.shape)} and {list(target.shape)}.')
        target = target.to(self.device).long()
        n = self.num_bins
        probs = log_probs.exp()
        log_conf, pred = log_probs.max(dim=-1)
        conf = log_conf.exp()
        correct = (pred == target).to(probs.dtype)
        bins = torch.bucketize(conf, self._edges)
        self.state[:n].index_add_(0, bins, torch.ones_like(conf))
        self.state[n:2 * n].index_add_(0, bins, conf)
        self.state[2 * n:3 * n].index_add_(0, bins, correct)
        p_target = probs.gather(1, target[:, None]).squeeze(1)
        nll = -log_probs.gather(1, target[:, None]).sum()
        brier = (probs.square().sum(-1) - 2 * p_target + 1).sum()
        self.state[3 * n:].add_(torch.stack([nll, brier, probs.new_full((), len(target))]))  # a fill, not a copy
        self._host = None

    def compute(self) -> dict[str, float]:
        """`nll`, `brier`, `ece` over the samples seen (NaN without samples)."""
        return _calibration(self._host_state(), self.num_bins)

    def reliability(self) -> dict[str, list[float]]:
        """Reliability diagram data: bin `edges` (num_bins + 1), per bin `count`, mean `confidence` and top-1
        `accuracy` (NaN for empty bins), and `nll`, `brier`, `ece`."""
        return _reliability(self._host_state(), self.num_bins)


class EnsembleMetrics(_DeviceSums):
    """Streaming calibration of an ensemble, of its members, and the members' diversity, in one pass.

    `update(member_logits [S, B, C], target [B])` per batch; `compute()` returns flat keys (definitions in the module
    docstring):

    * `nll`, `brier`, `ece`: the ensemble under `ensemble` (the model's configured manner);
    * `ens_{manner}_nll`, `ens_{manner}_brier`, `ens_{manner}_ece` for every manner of `manners`;
    * `member{i}_nll`, `member{i}_brier`, `member{i}_ece` for every member;
    * `disagreement`, `pairwise_kl` (with at least two members).

    All accumulators share one float64 tensor on the device (one host sync in `compute()`, one `all_reduce`).
    """

    def __init__(
            self,
            num_members: int,
            ensemble: str = 'mean',
            manners: Sequence[str] = (),
            num_bins: int = 15,
            device: str | torch.device | None = None,
    ):
        """
        Args:
            num_members: Number of members S.
            ensemble: Manner of the unprefixed keys (a key of `ENSEMBLE_MANNERS`).
            manners: Manners reported as `ens_{manner}_*` keys as well.
            num_bins: Equal-width confidence bins of the ECE.
            device: Device of the accumulators (default: cpu).
        """
        if num_members < 1:
            raise ValueError(f'EnsembleMetrics: num_members must be positive, got {num_members}.')
        for name in [ensemble, *manners]:
            if name not in ENSEMBLE_MANNERS:
                raise ValueError(f'EnsembleMetrics: unknown ensemble manner {name!r}, expected one of '
                                 f'{list(ENSEMBLE_MANNERS)}.')
        self.num_members = num_members
        self.num_bins = num_bins
        self.ensemble = ensemble
        self.manners = list(OrderedDict.fromkeys(manners))
        evaluated = list(OrderedDict.fromkeys([ensemble, *self.manners]))
        device = torch.device(device or 'cpu')
        size = 3 * num_bins + _STATS
        # [ensemble manners..., members..., disagreement sum, KL sum]
        self.state = torch.zeros((len(evaluated) + num_members) * size + 2, dtype=_accumulator_dtype(device),
                                 device=device)
        views = self.state[:-2].view(-1, size)
        self.ensembles = OrderedDict(
            (name, CalibrationMeter(num_bins, state=view)) for name, view in zip(evaluated, views))
        self.members = [CalibrationMeter(num_bins, state=view) for view in views[len(evaluated):]]
        self._host: list[float] | None = None

    def update(self, member_logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of member logits [S, B, C] and class indices [B]."""
        if member_logits.ndim != 3 or member_logits.shape[0] != self.num_members:
            raise ValueError(f'EnsembleMetrics: expected member logits [{self.num_members}, B, C], got '
                             f'{list(member_logits.shape)}.')
        logits = member_logits.to(device=self.device, dtype=self.state.dtype)
        log_probs = logits.log_softmax(dim=-1)
        for name, meter in self.ensembles.items():
            meter.update_log_probs(ensemble_log_probs(log_probs, name, logits=logits), target)
        for meter, member_log_probs in zip(self.members, log_probs):
            meter.update_log_probs(member_log_probs, target)
        if self.num_members > 1:
            preds = log_probs.argmax(dim=-1)  # [S, B]
            disagree = (preds[:, None] != preds[None, :]).sum().to(self.state.dtype) / 2  # unordered pairs
            flat_log_probs = log_probs.flatten(1)
            flat_probs = flat_log_probs.exp()
            # sum_n KL(p_i || p_j) = sum p_i log p_i - sum p_i log p_j, for all (i, j) at once
            cross = flat_probs @ flat_log_probs.T
            kl = cross.diagonal()[:, None] - cross
            self.state[-2:].add_(torch.stack([disagree, kl.sum() - kl.diagonal().sum()]))
        self._host = None

    def _meter_states(self) -> list[list[float]]:
        size = 3 * self.num_bins + _STATS
        host = self._host_state()
        return [host[i * size:(i + 1) * size] for i in range((len(host) - 2) // size)]

    def compute(self) -> dict[str, float]:
        """The metrics as flat keys (see the class docstring); NaN without samples."""
        states = self._meter_states()
        num_ensembles = len(self.ensembles)
        ensembles = dict(zip(self.ensembles, states[:num_ensembles]))
        out = OrderedDict(_calibration(ensembles[self.ensemble], self.num_bins))
        for name in self.manners:
            out.update((f'ens_{name}_{k}', v) for k, v in _calibration(ensembles[name], self.num_bins).items())
        for i, state in enumerate(states[num_ensembles:]):
            out.update((f'member{i}_{k}', v) for k, v in _calibration(state, self.num_bins).items())
        if self.num_members > 1:
            count = states[0][-1]
            disagree_sum, kl_sum = self._host_state()[-2:]
            pairs = self.num_members * (self.num_members - 1)
            out['disagreement'] = disagree_sum / (pairs / 2 * count) if count > 0 else math.nan
            out['pairwise_kl'] = kl_sum / (pairs * count) if count > 0 else math.nan
        return out

    def reliability(self) -> dict[str, dict[str, list[float]]]:
        """Reliability diagram data (see `CalibrationMeter.reliability`) of the ensemble (`ensemble`, its configured
        manner) and of the mean member (`mean member`: the members' bins summed and divided by S, i.e. all member
        predictions pooled; its `ece` is that of the pooled predictions)."""
        states = self._meter_states()
        num_ensembles = len(self.ensembles)
        ensemble = states[list(self.ensembles).index(self.ensemble)]
        pooled = [sum(values) for values in zip(*states[num_ensembles:])]
        return OrderedDict([
            ('ensemble', _reliability(ensemble, self.num_bins)),
            ('mean member', _reliability(pooled, self.num_bins, scale=self.num_members)),
        ])
