import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax as np_log_softmax
from scipy.special import softmax as np_softmax

from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from timm_splitnet.loss import CoTrainingLoss, js_divergence, pairwise_kl


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p)).sum(-1)


def _np_js(z: np.ndarray) -> float:
    """H(mean_i p_i) - mean_i H(p_i), batch mean, in float64."""
    p = np_softmax(z.astype(np.float64), axis=-1)
    return float((_entropy(p.mean(0)) - _entropy(p).mean(0)).mean())


def _np_pairwise_kl(z: np.ndarray) -> float:
    log_p = np_log_softmax(z.astype(np.float64), axis=-1)
    p = np.exp(log_p)
    num_members = z.shape[0]
    total = 0.
    for i in range(num_members):
        for j in range(num_members):
            if i != j:
                total += (p[j] * (log_p[j] - log_p[i])).sum(-1).mean()
    return total / (num_members - 1)


def test_js_s2_matches_scipy():
    torch.manual_seed(0)
    z = torch.randn(2, 6, 7, dtype=torch.float64) * 2
    p = np_softmax(z.numpy(), axis=-1)
    expected = np.mean([jensenshannon(p[0, b], p[1, b], base=math.e) ** 2 for b in range(z.shape[1])])
    assert js_divergence(z).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_js_s4_matches_numpy_entropies():
    torch.manual_seed(1)
    z = torch.randn(4, 5, 11) * 3
    assert js_divergence(z).item() == pytest.approx(_np_js(z.numpy()), rel=1e-5, abs=1e-7)
    # a sequence of member logits works too
    assert js_divergence(list(z)).item() == pytest.approx(_np_js(z.numpy()), rel=1e-5, abs=1e-7)


def test_js_zero_for_identical_members():
    z = torch.randn(1, 4, 10).expand(3, 4, 10)
    assert abs(js_divergence(z).item()) < 1e-6
    assert abs(js_divergence(torch.randn(1, 4, 10)).item()) < 1e-6


def _np_js_grad_finite_differences(z: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the float64 NumPy JS (`_np_js`) in every logit."""
    grad = np.zeros_like(z, dtype=np.float64)
    for index in np.ndindex(*z.shape):
        up, down = z.astype(np.float64), z.astype(np.float64)
        up[index] += eps
        down[index] -= eps
        grad[index] = (_np_js(up) - _np_js(down)) / (2 * eps)
    return grad


def _np_js_grad_closed_form(z: np.ndarray) -> np.ndarray:
    """dJS/dz_i = p_i * (d_i - <p_i, d_i>) / (S B), d_i = log p_i - log m: from dJS/dp_i = (log p_i - log m) / S
    (the two +1 terms of the entropy derivatives cancel) through the softmax Jacobian, batch mean."""
    num_members, batch_size = z.shape[:2]
    p = np_softmax(z.astype(np.float64), axis=-1)
    d = np.log(p) - np.log(p.mean(0, keepdims=True))
    return p * (d - (p * d).sum(-1, keepdims=True)) / (num_members * batch_size)


@pytest.mark.parametrize('num_members', [2, 3])
def test_js_gradient_matches_finite_differences_and_closed_form(num_members):
    """Autograd through js_divergence (fp32) against central differences of an independent float64 JS and the
    closed-form gradient: every member gets the gradient of the full divergence (no detach)."""
    torch.manual_seed(6)
    z = (torch.randn(num_members, 3, 4) * 2).requires_grad_()
    js_divergence(z).backward()
    numeric = _np_js_grad_finite_differences(z.detach().numpy())
    closed = _np_js_grad_closed_form(z.detach().numpy())
    np.testing.assert_allclose(numeric, closed, rtol=1e-5, atol=1e-9)  # the two references agree
    np.testing.assert_allclose(z.grad.numpy(), closed, rtol=1e-4, atol=1e-7)
    assert all(np.abs(closed[i]).sum() > 1e-3 for i in range(num_members))


def test_pairwise_kl_matches_numpy_and_detaches_peers():
    torch.manual_seed(2)
    for num_members in (2, 3):
        z = (torch.randn(num_members, 6, 9) * 2).requires_grad_()
        loss = pairwise_kl(z)
        assert loss.item() == pytest.approx(_np_pairwise_kl(z.detach().numpy()), rel=1e-5, abs=1e-7)
        loss.backward()
        # the gradient equals the one with explicitly detached targets: sum_j (p_i - p_j) / (S - 1) / B per member
        p = F.softmax(z.detach(), -1)
        expected = (num_members * p - p.sum(0, keepdim=True)) / (num_members - 1) / z.shape[1]
        torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-6)
    assert pairwise_kl(torch.randn(1, 4, 5)).item() == 0.


def test_cotraining_loss_hard_targets_by_hand():
    torch.manual_seed(3)
    z = torch.randn(3, 8, 10)
    y = torch.randint(0, 10, (8,))
    crit = CoTrainingLoss(cot_weight=0.5)
    out = crit(z, y)
    ce = sum(F.cross_entropy(z[i], y) for i in range(3))
    js = _np_js(z.numpy())
    assert out.loss_ce.item() == pytest.approx(ce.item(), rel=1e-6)
    assert out.loss_cot.item() == pytest.approx(js, rel=1e-5)
    assert out.loss.item() == pytest.approx(ce.item() + 0.5 * js, rel=1e-5)
    assert out.cot_weight == 0.5


def test_cotraining_loss_soft_targets_by_hand():
    torch.manual_seed(4)
    z = torch.randn(2, 6, 5)
    y = torch.randint(0, 5, (6,))
    lam = 0.7
    one_hot = F.one_hot(y, 5).float()
    soft = lam * one_hot + (1 - lam) * one_hot.flip(0)  # what timm's Mixup produces (no smoothing)
    out = CoTrainingLoss(cot_weight=0.25)(z, soft)
    ce = sum(-(soft * F.log_softmax(z[i], -1)).sum(-1).mean() for i in range(2))
    assert out.loss_ce.item() == pytest.approx(ce.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(ce.item() + 0.25 * _np_js(z.numpy()), rel=1e-5)
    # with mixup the soft target equals lam * CE(y_a) + (1 - lam) * CE(y_b), the reference's mixup criterion
    ref = sum(lam * F.cross_entropy(z[i], y) + (1 - lam) * F.cross_entropy(z[i], y.flip(0)) for i in range(2))
    assert out.loss_ce.item() == pytest.approx(ref.item(), rel=1e-5)


def test_cotraining_loss_criteria_selection():
    crit = CoTrainingLoss(smoothing=0.1)
    assert isinstance(crit.hard_criterion, LabelSmoothingCrossEntropy)
    assert isinstance(crit.soft_criterion, SoftTargetCrossEntropy)
    z, y = torch.randn(2, 4, 6), torch.randint(0, 6, (4,))
    expected = sum(LabelSmoothingCrossEntropy(0.1)(z[i], y) for i in range(2))
    assert crit(z, y).loss_ce.item() == pytest.approx(expected.item(), rel=1e-6)
    # an explicit base criterion is used as given
    custom = CoTrainingLoss(base_criterion=nn.CrossEntropyLoss(reduction='sum'), cot_loss='kl', cot_weight=1.)
    out = custom(z, y)
    assert out.loss_ce.item() == pytest.approx(sum(F.cross_entropy(z[i], y, reduction='sum') for i in range(2)).item())
    assert out.loss_cot.item() == pytest.approx(_np_pairwise_kl(z.numpy()), rel=1e-5)


def test_cotraining_loss_single_member_has_no_cot_term():
    z, y = torch.randn(1, 4, 6), torch.randint(0, 6, (4,))
    out = CoTrainingLoss()(z, y)
    assert out.loss_cot.item() == 0.
    assert out.loss.item() == pytest.approx(F.cross_entropy(z[0], y).item())


def test_cot_weight_warmup():
    crit = CoTrainingLoss(cot_weight=0.5, warmup_epochs=40)
    assert crit.cot_weight_at(0) == 0.005
    assert crit.cot_weight_at(20) == pytest.approx(0.25)
    assert crit.cot_weight_at(40) == 0.5
    assert crit.cot_weight_at(100) == 0.5
    crit.set_epoch(10)
    z, y = torch.randn(2, 4, 6), torch.randint(0, 6, (4,))
    out = crit(z, y)
    assert out.cot_weight == pytest.approx(0.125)
    ce = sum(F.cross_entropy(z[i], y) for i in range(2)).item()  # computed here, not read from the output
    assert out.loss.item() == pytest.approx(ce + 0.125 * _np_js(z.numpy()), rel=1e-5)
    assert CoTrainingLoss(cot_weight=0.5).cot_weight_at(0) == 0.5  # no warm-up
    assert CoTrainingLoss(cot_weight=0., warmup_epochs=40).cot_weight_at(0) == 0.  # 0 stays off


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('cot_loss', ['js', 'kl'])
def test_confident_half_precision_logits_are_finite(dtype, cot_loss):
    torch.manual_seed(5)
    num_members, batch_size, num_classes = 3, 8, 10
    y = torch.randint(0, num_classes, (batch_size,))
    # one-hot like, confident and disagreeing logits (+-60): softmax underflows to exact zeros in every dtype
    z = torch.full((num_members, batch_size, num_classes), -60.)
    for i in range(num_members):
        z[i, torch.arange(batch_size), (y + i) % num_classes] = 60.
    z = z.to(dtype).requires_grad_()
    crit = CoTrainingLoss(cot_loss=cot_loss)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = crit(z, y)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(out.loss_cot)
    # members disagree completely (one-hot on different classes, exp(-120) is 0 in fp32): the exact limits are
    # JS = H(m) - mean H(p_i) = log 3 - 0, and for 'kl' every ordered pair gives KL = 60 - (-60) = 120, so
    # sum_{i != j} KL / (S - 1) = S * 120
    expected = math.log(num_members) if cot_loss == 'js' else 120. * num_members
    assert out.loss_cot.item() == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    assert torch.isfinite(z.grad).all()
    # identical confident members: zero divergence, no NaN
    same = z.detach()[:1].expand(num_members, -1, -1).clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        div = js_divergence(same) if cot_loss == 'js' else pairwise_kl(same)
    div.backward()
    assert abs(div.item()) < 1e-6 and torch.isfinite(same.grad).all()


def test_js_confident_disagreement_approaches_log_s():
    z = torch.tensor([[[60., -60.]], [[-60., 60.]]])
    assert js_divergence(z).item() == pytest.approx(math.log(2), rel=1e-6)


def test_target_batch_mismatch_raises():
    with pytest.raises(ValueError, match=r'target\[:4\]'):
        CoTrainingLoss()(torch.randn(2, 4, 6), torch.randint(0, 6, (8,)))


def test_unknown_cot_loss_raises():
    with pytest.raises(ValueError, match="'js', 'kl'"):
        CoTrainingLoss(cot_loss='mse')
