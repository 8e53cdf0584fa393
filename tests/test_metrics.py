"""timm_splitnet.utils.metrics against hand computations in plain Python: NLL, Brier, ECE, disagreement, pairwise KL."""
import math

import pytest
import torch

import timm
import timm_splitnet  # noqa: F401
from timm_splitnet.utils.metrics import ENSEMBLE_MANNERS, CalibrationMeter, EnsembleMetrics, ensemble_manner

NUM_BINS = 15


# ----- the hand computations (lists of floats, no torch) -----

def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=lambda c: (row[c], -c))  # the first of ties, like torch


def hand_calibration(probs: list[list[float]], target: list[int]) -> dict[str, float]:
    n = len(target)
    nll = sum(-math.log(p[t]) for p, t in zip(probs, target)) / n
    brier = sum(sum((pc - (c == t)) ** 2 for c, pc in enumerate(p)) for p, t in zip(probs, target)) / n
    ece = 0.
    for b in range(NUM_BINS):
        lo, hi = b / NUM_BINS, (b + 1) / NUM_BINS
        members = [(max(p), argmax(p) == t) for p, t in zip(probs, target) if lo < max(p) <= hi]
        if members:
            conf = sum(c for c, _ in members) / len(members)
            acc = sum(ok for _, ok in members) / len(members)
            ece += len(members) / n * abs(acc - conf)
    return dict(nll=nll, brier=brier, ece=ece)


def hand_ensemble(member_logits: list[list[list[float]]], manner: str) -> list[list[float]]:
    """The ensemble distribution of every sample (the module docstring's definition, written out)."""
    num_members, num_samples = len(member_logits), len(member_logits[0])
    out = []
    for n in range(num_samples):
        rows = [member_logits[s][n] for s in range(num_members)]
        if manner in ('mean', 'max'):
            reduce = (lambda v: sum(v) / len(v)) if manner == 'mean' else max
            out.append(softmax([reduce(col) for col in zip(*rows)]))
        else:
            probs = [softmax(r) for r in rows]
            if manner == 'softmax_mean':
                out.append([sum(col) / num_members for col in zip(*probs)])
            else:
                top = [max(col) for col in zip(*probs)]
                out.append([v / sum(top) for v in top])
    return out


def hand_disagreement(member_probs: list[list[list[float]]]) -> float:
    pairs = [(i, j) for i in range(len(member_probs)) for j in range(i + 1, len(member_probs))]
    return sum(
        sum(argmax(a) != argmax(b) for a, b in zip(member_probs[i], member_probs[j])) / len(member_probs[i])
        for i, j in pairs) / len(pairs)


def hand_pairwise_kl(member_probs: list[list[list[float]]]) -> float:
    pairs = [(i, j) for i in range(len(member_probs)) for j in range(len(member_probs)) if i != j]
    total = 0.
    for i, j in pairs:
        kl = [sum(p * math.log(p / q) for p, q in zip(a, b)) for a, b in zip(member_probs[i], member_probs[j])]
        total += sum(kl) / len(kl)
    return total / len(pairs)


def fixed_batch(num_members: int = 3, num_samples: int = 24, num_classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_members, num_samples, num_classes, generator=g, dtype=torch.float64) * 2.5
    target = torch.randint(0, num_classes, (num_samples,), generator=g)
    target[: num_samples // 2] = logits.mean(0).argmax(-1)[: num_samples // 2]  # half right: a mid-range accuracy
    return logits, target


# ----- one distribution -----

def test_calibration_meter_matches_hand_computation():
    logits, target = fixed_batch()
    meter = CalibrationMeter()
    meter.update(logits[0], target)
    hand = hand_calibration([softmax(r) for r in logits[0].tolist()], target.tolist())
    got = meter.compute()
    assert list(got) == ['nll', 'brier', 'ece']
    for key, value in hand.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-14), key
    # probabilities in: the same numbers
    probs = CalibrationMeter()
    probs.update(logits[0].softmax(-1), target, probs=True)
    for key, value in hand.items():
        assert probs.compute()[key] == pytest.approx(value, rel=1e-12, abs=1e-14), key
    assert meter.state.dtype == torch.float64


def test_one_bin_only():
    """All confidences in (0.6, 2/3] (bin 9): ECE = |accuracy - mean confidence| of that bin."""
    confidences = [0.61, 0.62, 0.65, 0.66]
    probs = torch.tensor([[c, 1 - c] for c in confidences], dtype=torch.float64)
    target = torch.tensor([0, 0, 0, 1])
    meter = CalibrationMeter()
    meter.update(probs, target, probs=True)
    got = meter.compute()
    assert got['ece'] == pytest.approx(abs(3 / 4 - sum(confidences) / 4), abs=1e-15)
    hand = hand_calibration(probs.tolist(), target.tolist())
    for key, value in hand.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    rel = meter.reliability()
    assert rel['count'] == [0.] * 9 + [4.] + [0.] * 5
    assert rel['accuracy'][9] == 0.75 and rel['confidence'][9] == pytest.approx(sum(confidences) / 4)
    assert all(math.isnan(a) for i, a in enumerate(rel['accuracy']) if i != 9)
    assert rel['edges'][0] == 0 and rel['edges'][-1] == 1 and len(rel['edges']) == NUM_BINS + 1


def test_perfect_calibration():
    # confidence 0.75 and 3 of 4 right: accuracy = confidence in the one bin
    probs = torch.tensor([[0.75, 0.25, 0.]] * 4, dtype=torch.float64)
    meter = CalibrationMeter()
    meter.update(probs, torch.tensor([0, 0, 0, 2]), probs=True)
    assert meter.compute()['ece'] == pytest.approx(0., abs=1e-15)
    # certain and right: every metric 0
    certain = CalibrationMeter()
    certain.update(torch.eye(4, dtype=torch.float64), torch.arange(4), probs=True)
    assert certain.compute() == {'nll': 0., 'brier': 0., 'ece': 0.}


def test_worst_calibration():
    """Certain and always wrong: ECE 1 and Brier 2 (their maxima)."""
    meter = CalibrationMeter()
    meter.update(torch.eye(4, dtype=torch.float64), torch.tensor([1, 2, 3, 0]), probs=True)
    got = meter.compute()
    assert got['ece'] == 1. and got['brier'] == 2.
    assert got['nll'] > 700  # -log of the smallest positive float64
    # from logits: a huge margin on the wrong class
    logits = CalibrationMeter()
    logits.update(torch.tensor([[60., 0.], [0., 60.]]), torch.tensor([1, 0]))
    assert logits.compute()['ece'] == pytest.approx(1.) and logits.compute()['nll'] == pytest.approx(60.)


def test_no_samples_is_nan():
    assert all(math.isnan(v) for v in CalibrationMeter().compute().values())
    assert all(math.isnan(v) for v in EnsembleMetrics(2).compute().values())


# ----- ensembles, members, diversity -----

@pytest.mark.parametrize('manner', list(ENSEMBLE_MANNERS))
def test_ensemble_metrics_match_hand_computation(manner):
    logits, target = fixed_batch()
    metrics = EnsembleMetrics(3, ensemble=manner, manners=list(ENSEMBLE_MANNERS))
    metrics.update(logits, target)
    got = metrics.compute()
    member_probs = [[softmax(r) for r in member] for member in logits.tolist()]
    for name in ENSEMBLE_MANNERS:
        hand = hand_calibration(hand_ensemble(logits.tolist(), name), target.tolist())
        for key, value in hand.items():
            assert got[f'ens_{name}_{key}'] == pytest.approx(value, rel=1e-12, abs=1e-14), (name, key)
            if name == manner:  # the configured manner: the unprefixed keys
                assert got[key] == got[f'ens_{name}_{key}']
    for i, probs in enumerate(member_probs):
        for key, value in hand_calibration(probs, target.tolist()).items():
            assert got[f'member{i}_{key}'] == pytest.approx(value, rel=1e-12, abs=1e-14), (i, key)
    assert 0 < got['disagreement'] < 1
    assert got['disagreement'] == pytest.approx(hand_disagreement(member_probs), rel=1e-12)
    assert got['pairwise_kl'] == pytest.approx(hand_pairwise_kl(member_probs), rel=1e-10)


def test_key_names_and_order():
    logits, target = fixed_batch(num_members=2)
    metrics = EnsembleMetrics(2, ensemble='softmax_mean', manners=['mean', 'softmax_mean'])
    metrics.update(logits, target)
    calib = ('nll', 'brier', 'ece')
    assert list(metrics.compute()) == [
        *calib, *(f'ens_mean_{k}' for k in calib), *(f'ens_softmax_mean_{k}' for k in calib),
        *(f'member0_{k}' for k in calib), *(f'member1_{k}' for k in calib), 'disagreement', 'pairwise_kl']
    # one member: no diversity
    single = EnsembleMetrics(1)
    single.update(logits[:1], target)
    assert list(single.compute()) == [*calib, *(f'member0_{k}' for k in calib)]


def test_the_ensemble_distribution_is_the_models_output():
    """Logit manners: softmax of the model's combined logits; softmax_mean: the model's output itself; softmax_max:
    the model's output renormalised."""
    model = timm.create_model('splitnet_resnet110_s2', num_classes=10, layers=(1, 1, 1)).eval()
    logits = torch.randn(2, 16, 10, dtype=torch.float64) * 3
    target = torch.randint(0, 10, (16,))
    for manner, (reduce, softmax_) in ENSEMBLE_MANNERS.items():
        model.set_ensemble(reduce, softmax_)
        assert ensemble_manner(model.ensemble, model.ensemble_softmax) == manner
        output = model.combine(logits).double()
        probs = output / output.sum(-1, keepdim=True) if softmax_ else output.softmax(-1)
        metrics = EnsembleMetrics(2, ensemble=manner)
        metrics.update(logits, target)
        reference = CalibrationMeter()
        reference.update(probs, target, probs=True)
        for key, value in reference.compute().items():  # combine() takes the softmax in float32
            assert metrics.compute()[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (manner, key)


def test_identical_members():
    logits, target = fixed_batch(num_members=1)
    metrics = EnsembleMetrics(3)
    metrics.update(logits.expand(3, -1, -1), target)
    got = metrics.compute()
    assert got['disagreement'] == 0.
    assert got['pairwise_kl'] == pytest.approx(0., abs=1e-14)
    for key in ('nll', 'brier', 'ece'):  # every member is the ensemble
        assert got[key] == pytest.approx(got[f'member0_{key}'], rel=1e-12, abs=1e-15)
        assert got[f'member0_{key}'] == got[f'member2_{key}']


def test_members_that_always_disagree():
    logits = torch.tensor([[[4., 0., 0.], [0., 4., 0.]], [[0., 4., 0.], [0., 0., 4.]]])
    target = torch.tensor([0, 1])
    metrics = EnsembleMetrics(2)
    metrics.update(logits, target)
    got = metrics.compute()
    assert got['disagreement'] == 1.
    member_probs = [[softmax(r) for r in member] for member in logits.tolist()]
    assert got['pairwise_kl'] == pytest.approx(hand_pairwise_kl(member_probs), rel=1e-12)
    assert got['member0_ece'] == pytest.approx(1 - softmax([4., 0., 0.])[0])  # right, confidence e^4 / (e^4 + 2)
    # three members, two of which agree: 1 of 3 pairs agrees on every sample
    three = EnsembleMetrics(3)
    three.update(torch.cat([logits, logits[:1]]), target)
    assert three.compute()['disagreement'] == pytest.approx(2 / 3)


def test_streaming_equals_one_batch():
    logits, target = fixed_batch(num_samples=40, seed=3)
    whole = EnsembleMetrics(3, manners=list(ENSEMBLE_MANNERS))
    whole.update(logits, target)
    streamed = EnsembleMetrics(3, manners=list(ENSEMBLE_MANNERS))
    for lo, hi in ((0, 7), (7, 8), (8, 30), (30, 40)):
        streamed.update(logits[:, lo:hi].float(), target[lo:hi])  # float32 in: accumulated in float64
    reference = whole.compute()
    got = streamed.compute()
    assert list(got) == list(reference)
    for key, value in reference.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    whole_rel, streamed_rel = whole.reliability(), streamed.reliability()
    for curve in ('ensemble', 'mean member'):
        assert streamed_rel[curve]['count'] == whole_rel[curve]['count']
    meter, streamed_meter = CalibrationMeter(), CalibrationMeter()
    meter.update(logits[0], target)
    for lo, hi in ((0, 13), (13, 40)):
        streamed_meter.update(logits[0, lo:hi], target[lo:hi])
    for key, value in meter.compute().items():
        assert streamed_meter.compute()[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_mean_member_reliability_pools_the_members():
    logits, target = fixed_batch(num_members=2, num_samples=30)
    metrics = EnsembleMetrics(2)
    metrics.update(logits, target)
    pooled = CalibrationMeter()
    for member in logits:
        pooled.update(member, target)
    rel, ref = metrics.reliability()['mean member'], pooled.reliability()
    assert rel['count'] == [n / 2 for n in ref['count']] and sum(rel['count']) == 30
    assert rel['ece'] == pytest.approx(ref['ece'], rel=1e-12)
    ens = metrics.reliability()['ensemble']
    assert ens['ece'] == pytest.approx(metrics.compute()['ece'], rel=1e-12) and sum(ens['count']) == 30


def test_one_state_tensor_and_reset():
    logits, target = fixed_batch()
    metrics = EnsembleMetrics(3, manners=['mean', 'max'])
    metrics.update(logits, target)
    # ensembles 'mean' (configured and listed: once) and 'max', 3 members; 48 numbers each, + 2 diversity sums
    assert metrics.state.shape == ((2 + 3) * (3 * NUM_BINS + 3) + 2,) and metrics.state.dtype == torch.float64
    storage = metrics.state.untyped_storage().data_ptr()  # the meters accumulate into views of it
    assert all(m.state.untyped_storage().data_ptr() == storage for m in [*metrics.ensembles.values(), *metrics.members])
    assert metrics.compute()['member0_nll'] > 0
    metrics.reset()
    assert all(math.isnan(v) for v in metrics.compute().values())


def test_bad_input():
    with pytest.raises(ValueError, match='manner'):
        EnsembleMetrics(2, ensemble='median')
    with pytest.raises(ValueError, match='member logits'):
        EnsembleMetrics(2).update(torch.randn(3, 4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match='class indices'):
        CalibrationMeter().update(torch.randn(4, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match='num_bins'):
        CalibrationMeter(num_bins=0)
