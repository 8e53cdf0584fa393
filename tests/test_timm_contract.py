"""timm's training contract on a SplitNet: `loss_fn(model(x), target)` in train mode, as timm's train.py runs it.

timm's scripts are not in the wheel, so `timm_train_step` reproduces the step of timm's `train_one_epoch` with timm's
loss classes. Without co-training (the default) a SplitNet trains as the mean of its members' logits and warns once;
`set_cotraining(True)` returns the member logits for `CoTrainingLoss` (as `set_distilled_training` in timm's DeiT).
"""
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import timm
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import timm_splitnet
from timm_splitnet.task import CoTrainingTask

MODEL = 'splitnet_resnet110_s2'
NUM_CLASSES = 5
BATCH = 4
LOGGER = 'timm_splitnet.models.splitnet'


@pytest.fixture(autouse=True)
def one_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def small_splitnet(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(MODEL, layers=(1, 1, 1), num_classes=NUM_CLASSES, drop_rate=0., **kwargs)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


def timm_train_step(model, loss_fn, optimizer, x, target, mixup_fn=None):
    """One step of timm's `train_one_epoch`: mixup, `loss_fn(model(input), target)`, backward, optimizer step."""
    model.train()
    if mixup_fn is not None:
        x, target = mixup_fn(x, target)
    output = model(x)
    loss = loss_fn(output, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return output, loss


def ensemble_warnings(caplog):
    return [r for r in caplog.records if r.name == LOGGER and 'without co-training' in r.getMessage()]


LOSSES = {
    'label_smoothing': lambda: (LabelSmoothingCrossEntropy(smoothing=0.1), None),
    'cross_entropy': lambda: (nn.CrossEntropyLoss(), None),
    'mixup_soft_target': lambda: (
        SoftTargetCrossEntropy(),
        Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES)),
    'bce': lambda: (BinaryCrossEntropy(smoothing=0.1), None),
}


@pytest.mark.parametrize('loss', list(LOSSES))
def test_timm_train_loop_trains_the_ensemble_and_warns_once(loss, caplog):
    model = small_splitnet()
    assert not model.cotraining  # a freshly created model answers timm's contract with one output
    loss_fn, mixup_fn = LOSSES[loss]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, target = batch()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            output, loss_value = timm_train_step(model, loss_fn, optimizer, x, target, mixup_fn)
            assert output.shape == (BATCH, NUM_CLASSES)
            assert torch.isfinite(loss_value)
    for i in range(model.split_factor):  # every member is trained
        changed = [n for n, p in model.named_parameters() if n.startswith(f'models.{i}.')
                   and not torch.equal(p, before[n])]
        assert changed, f'member {i} was not updated'
    records = ensemble_warnings(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert '\n' not in message
    assert 'train.py' in message and 'set_cotraining(True)' in message and 'CoTrainingLoss' in message


def test_ensemble_output_is_the_mean_of_the_member_logits(caplog):
    model = small_splitnet().train()
    x, _ = batch()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        torch.testing.assert_close(model(x), model.forward_members(x).mean(0))
        assert model.forward_members(x).shape == (2, BATCH, NUM_CLASSES)  # members stay [S, B, C]
        with torch.no_grad():  # no gradients: nothing is being trained, no warning
            model(x)
        model.eval()
        torch.testing.assert_close(model(x), model.forward_members(x).mean(0))  # eval mode unchanged
    assert len(ensemble_warnings(caplog)) == 1


def test_no_warning_without_gradients_or_in_eval(caplog):
    model = small_splitnet()
    x, _ = batch()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with torch.no_grad():
            assert model.train()(x).shape == (BATCH, NUM_CLASSES)
        assert model.eval()(x).shape == (BATCH, NUM_CLASSES)
    assert not ensemble_warnings(caplog)


def test_set_cotraining_returns_member_logits_for_the_cotraining_loss(caplog):
    model = small_splitnet()
    model.set_cotraining(True)
    criterion = timm_splitnet.CoTrainingLoss(cot_weight=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = batch()
    before = model.models[1].fc.weight.detach().clone()
    parts = []

    def loss_fn(logits, target):
        out = criterion(logits, target)
        parts.append(out)
        return out.loss

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        output, loss_value = timm_train_step(model, loss_fn, optimizer, x, target)
    assert output.shape == (2, BATCH, NUM_CLASSES)
    assert torch.isfinite(loss_value) and parts[0].loss_cot > 0
    assert not torch.equal(model.models[1].fc.weight, before)
    assert not ensemble_warnings(caplog)
    assert model.eval()(x).shape == (BATCH, NUM_CLASSES)  # eval mode: the ensemble, co-training or not
    model.set_cotraining(False)
    assert model.train()(x).shape == (BATCH, NUM_CLASSES)


def test_cotraining_task_switches_cotraining_on(caplog):
    model = small_splitnet()
    task = CoTrainingTask(model, timm_splitnet.CoTrainingLoss(), num_views=1, verbose=False)
    assert model.cotraining
    x, target = batch()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = task(x, target)
    assert out['output'].shape == (BATCH, NUM_CLASSES)
    assert out['loss_cot'] > 0  # the co-training term needs the member logits
    assert not ensemble_warnings(caplog)


@pytest.mark.slow
def test_torch_compile_in_train_mode():
    model = small_splitnet().train()
    x, _ = batch()
    compiled = torch.compile(model, backend='eager')
    assert compiled(x).shape == (BATCH, NUM_CLASSES)
    model.set_cotraining(True)
    assert torch.compile(model, backend='eager')(x).shape == (2, BATCH, NUM_CLASSES)


def test_benchmark_train_bench_measures_the_cotraining_step(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import benchmark
    seen = []
    forward = timm_splitnet.CoTrainingLoss.forward

    def spy(self, logits, target, *args, **kwargs):
        seen.append(tuple(logits.shape))
        return forward(self, logits, target, *args, **kwargs)

    monkeypatch.setattr(timm_splitnet.CoTrainingLoss, 'forward', spy)
    benchmark.main([
        '--model', MODEL, '--bench', 'train', '-b', '2', '--num-warm-iter', '1', '--num-bench-iter', '1',
        '--device', 'cpu', '--model-kwargs', 'layers=(1,1,1)', '--num-classes', '10'])
    assert seen and all(len(shape) == 3 for shape in seen)  # member logits [S, B, C]
    assert (2, 2, 10) in seen


def test_torchscript_is_refused_with_what_works_instead():
    model = small_splitnet().eval()
    with pytest.raises(RuntimeError, match='TorchScript .* not supported; use torch.export.export, torch.jit.trace'):
        torch.jit.script(model)


def test_trace_without_tracer_warnings_and_equal_outputs():
    import warnings
    model = small_splitnet().eval()
    x, _ = batch()
    views = torch.cat([x, x.flip(3)], dim=1)  # member i sees view i
    for example in (x, views):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            traced = torch.jit.trace(model, example)
        assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)], \
            [str(w.message) for w in caught]
        with torch.no_grad():
            torch.testing.assert_close(traced(example), model(example))
