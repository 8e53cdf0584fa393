""" End-to-end tests of train.py (CPU, tiny settings)

`train.main(argv)` runs in-process on the 200-image `image_folder` (digits as 32x32 JPEGs, tests/conftest.py).
The 2-epoch run that the export and resume tests share uses the registered `splitnet_resnet110_s2` as it is; the
other runs give its members one block per stage (`--model-kwargs layers=(1,1,1)`) so that an epoch takes about a
second.
"""
import csv
import importlib.util
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import timm
import timm_splitnet  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
MODEL = 'splitnet_resnet110_s2'
TINY = ['--model', MODEL, '--model-kwargs', 'layers=(1,1,1)', '-b', '32', '--workers', '0', '--device', 'cpu',
        '--log-interval', '100', '--lr', '0.05', '--warmup-epochs', '0', '--checkpoint-hist', '1']
TINY_KWARGS = dict(layers=(1, 1, 1))  # TINY's --model-kwargs
# augmentation that draws from every random stream: RandAugment 'inc1' (python random), per-view random erasing
# (torch), mixup + cutmix (numpy)
AUGMENT = ['--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.5', '--remode', 'const', '--mixup', '0.2', '--cutmix', '1.0',
           '--cot-warmup-epochs', '2']

pytestmark = pytest.mark.slow


def _load_train():
    spec = importlib.util.spec_from_file_location('splitnet_train_script', ROOT / 'train.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_train()


def _run(*argv):
    return train.main([str(a) for a in argv])


def _summary(folder):
    with open(Path(folder) / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def _error(*argv) -> str:
    with pytest.raises(SystemExit) as e:
        _run(*argv)
    assert e.value.code not in (0, None)
    return str(e.value.code)


@pytest.fixture(scope='module')
def trained_run(image_folder, tmp_path_factory):
    """A 2-epoch run of splitnet_resnet110_s2 at one block per stage with multi-view augmentation and mixup (prefetcher
    on), and what the co-training loss got in every training step: (epoch, member logits, targets, co-training
    weight). The full-depth network trains in the README's main job (tests/test_learning.py)."""
    from timm_splitnet.loss import CoTrainingLoss
    out = tmp_path_factory.mktemp('train')
    steps = []
    forward = CoTrainingLoss.forward

    def spy_forward(criterion, logits, target):
        result = forward(criterion, logits, target)
        if logits.requires_grad:  # training steps
            steps.append((criterion.epoch, logits.detach().double().clone(), target.clone(), result.cot_weight))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CoTrainingLoss, 'forward', spy_forward)
        _run('--data-dir', image_folder, *TINY, *AUGMENT, '--epochs', 2, '--output', out, '--experiment', 'full')
    return out / 'full', steps


@pytest.fixture(scope='module')
def trained(trained_run):
    return trained_run[0]


def _step_losses(logits: torch.Tensor, target: torch.Tensor):
    """CE summed over the members (soft or hard targets) and the JS divergence in float64, written out here."""
    num_classes = logits.shape[-1]
    soft = target.double() if target.ndim == 2 else torch.nn.functional.one_hot(target, num_classes).double()
    log_p = logits.log_softmax(-1)
    ce = sum(-(soft * log_p[i]).sum(-1).mean() for i in range(logits.shape[0]))
    p = log_p.exp()
    m = p.mean(0)
    js = (-(m * m.log()).sum(-1) + (p * log_p).sum(-1).mean(0)).mean()  # H(mean p) - mean H(p)
    return ce.item(), js.item()


def test_end_to_end(trained_run, capsys):
    trained, steps = trained_run
    rows = _summary(trained)
    assert [r['epoch'] for r in rows] == ['0', '1']
    for row in rows:
        for key in ('train_loss', 'train_loss_ce', 'train_loss_cot', 'train_cot_weight', 'eval_loss'):
            assert float(row[key]) >= 0, key
        for key in ('eval_top1', 'eval_top5', 'eval_member0_top1', 'eval_member1_top1', 'eval_member0_top5',
                    'eval_member1_top5', 'eval_member_avg_top1'):
            assert 0 <= float(row[key]) <= 100, key
        # calibration and diversity of the per-epoch eval (timm_splitnet.utils.metrics)
        for key in ('eval_nll', 'eval_brier', 'eval_member0_nll', 'eval_member1_brier', 'eval_pairwise_kl'):
            assert float(row[key]) >= 0, key
        for key in ('eval_ece', 'eval_member0_ece', 'eval_member1_ece', 'eval_disagreement'):
            assert 0 <= float(row[key]) <= 1, key
        assert float(row['eval_nll']) == pytest.approx(float(row['eval_loss']), rel=1e-5)  # the same ensemble
        assert int(row['train_bad_images']) == 0
    # the epoch's train losses are the means over its steps of the CE sum and the JS divergence, recomputed here from
    # the member logits and (mixed) targets of every step
    for epoch, row in enumerate(rows):
        epoch_steps = [s for s in steps if s[0] == epoch]
        assert len(epoch_steps) == 6  # 200 images, batch 32
        parts = [_step_losses(logits, target) for _, logits, target, _ in epoch_steps]
        weight = epoch_steps[0][3]
        assert all(s[3] == weight for s in epoch_steps) and float(row['train_cot_weight']) == pytest.approx(weight)
        ce, js = (sum(p[k] for p in parts) / len(parts) for k in (0, 1))
        assert float(row['train_loss_ce']) == pytest.approx(ce, rel=1e-5)
        assert float(row['train_loss_cot']) == pytest.approx(js, rel=1e-4) and js > 0
        assert float(row['train_loss']) == pytest.approx(ce + weight * js, rel=1e-5)
        assert all(target.ndim == 2 for _, _, target, _ in epoch_steps)  # mixup: soft targets
    # co-training weight warm-up over 2 epochs: floor 0.005 at epoch 0, 0.25 at epoch 1
    assert [float(r['train_cot_weight']) for r in rows] == pytest.approx([0.005, 0.25])
    # weight decay on conv / linear weights only (BN and biases not), undivided by default
    groups = torch.load(trained / 'last.pth.tar', map_location='cpu', weights_only=True)['optimizer']['param_groups']
    decays = {g['weight_decay']: len(g['params']) for g in groups}
    model = timm.create_model(MODEL, num_classes=10, **TINY_KWARGS)
    params = list(model.parameters())
    assert decays == {0.: sum(p.ndim <= 1 for p in params), 1e-4: sum(p.ndim > 1 for p in params)}
    for name in ('last.pth.tar', 'model_best.pth.tar', 'model.safetensors', 'config.json', 'args.yaml', 'curves.png'):
        assert (trained / name).is_file(), name
    assert not [p for p in os.listdir(trained) if p.endswith('.tmp')]


def test_export_reloads_through_timm(trained):
    checkpoint = torch.load(trained / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    reference = timm.create_model(MODEL, num_classes=10, **TINY_KWARGS)
    reference.load_state_dict(checkpoint['state_dict'])
    weights = str(trained / 'model.safetensors')
    model = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=weights), **TINY_KWARGS)
    assert model.num_classes == 10
    reference.eval()
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        members = model.forward_members(x)
    assert members.shape == (2, 4, 10)


def test_resume_continues_exactly(image_folder, tmp_path):
    """Stop after epoch 0, resume: epoch 1 and the final weights equal the uninterrupted run's."""
    common = ['--data-dir', image_folder, *TINY, *AUGMENT, '--epochs', 2, '--output', tmp_path]
    _run(*common, '--experiment', 'full')
    trained = tmp_path / 'full'
    common += ['--experiment', 'part']
    _run(*common, '--stop-epoch', 0)
    part = tmp_path / 'part'
    assert [r['epoch'] for r in _summary(part)] == ['0']
    assert not (part / 'model.safetensors').exists()  # stopped runs are not finished
    _run(*common, '--resume', part / 'last.pth.tar')
    full_rows, part_rows = _summary(trained), _summary(part)
    assert [r['epoch'] for r in part_rows] == ['0', '1']
    for full_row, part_row in zip(full_rows, part_rows):
        for key, value in full_row.items():
            assert float(part_row[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-9), key
    full = torch.load(trained / 'last.pth.tar', map_location='cpu', weights_only=True)
    resumed = torch.load(part / 'last.pth.tar', map_location='cpu', weights_only=True)
    for key, value in full['state_dict'].items():
        torch.testing.assert_close(resumed['state_dict'][key], value, rtol=1e-6, atol=1e-7, msg=key)


class TrainSpy:
    """What a train.py run in this process does, step by step, recorded through wrappers of the task and backend.

    Attributes:
        member_inputs_equal: Per train forward, whether every member got the same input as member 0.
        grad_norms: Per optimizer step with --clip-grad, the gradient norm over all parameters (computed here)
            before and after the task clips.
        ema_sources: Per EMA update, a copy of the model's state dict at that update (after the optimizer step).
    """

    def __init__(self, monkeypatch):
        from timm_splitnet.models._backends import LoopBackend
        from timm_splitnet.task import CoTrainingTask
        self.member_inputs_equal, self.grad_norms, self.ema_sources = [], [], []
        forward_members, clip_grad, update_ema = (
            LoopBackend.forward_members, CoTrainingTask.clip_grad, CoTrainingTask.update_ema)

        def spy_forward_members(backend, members, views):
            if members[0].training:
                self.member_inputs_equal.append(all(torch.equal(v, views[0]) for v in views[1:]))
            return forward_members(backend, members, views)

        def spy_clip_grad(task, value, mode='norm'):
            params = [p for p in task.get_trainable_module().parameters() if p.grad is not None]
            before = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in params])).item()
            out = clip_grad(task, value, mode)
            after = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in params])).item()
            self.grad_norms.append((before, after))
            return out

        def spy_update_ema(task, step=None):
            state = task.get_trainable_module().state_dict()
            self.ema_sources.append({k: v.detach().clone() for k, v in state.items()})
            return update_ema(task, step=step)

        monkeypatch.setattr(LoopBackend, 'forward_members', spy_forward_members)
        monkeypatch.setattr(CoTrainingTask, 'clip_grad', spy_clip_grad)
        monkeypatch.setattr(CoTrainingTask, 'update_ema', spy_update_ema)


def test_no_prefetcher_same_view_ema_accum(image_folder, tmp_path, monkeypatch):
    """Without the prefetcher (collate_views): one shared view, EMA, gradient accumulation and clipping, each checked
    against what this test records and recomputes."""
    spy = TrainSpy(monkeypatch)
    clip, decay = 0.5, 0.9
    _run('--data-dir', image_folder, *TINY, *AUGMENT, '--epochs', 1, '--no-prefetcher', '--same-view',
         '--model-ema', '--model-ema-decay', decay, '--grad-accum-steps', '2', '--clip-grad', clip,
         '--channels-last', '--output', tmp_path, '--experiment', 'x')
    rows = _summary(tmp_path / 'x')
    assert len(rows) == 1
    assert (tmp_path / 'x' / 'model.safetensors').is_file()
    checkpoint = torch.load(tmp_path / 'x' / 'last.pth.tar', map_location='cpu', weights_only=True)
    # shared view: both members got the same (augmented) image in every training forward
    assert spy.member_inputs_equal == [True] * 6  # 200 images, batch 32: 6 batches
    # accumulation: 6 batches, an optimizer step after every second one
    assert len(spy.grad_norms) == len(spy.ema_sources) == checkpoint['num_updates'] == 3
    # clipping: the norm over all gradients after the task's clip is min(norm before, clip); some steps were clipped
    for before, after in spy.grad_norms:
        assert after == pytest.approx(min(before, clip), rel=1e-5), spy.grad_norms
    assert any(before > clip * 1.01 for before, _ in spy.grad_norms), spy.grad_norms
    # EMA: recomputed here from the weights after every step (timm's ModelEmaV3 with a step count: the first update
    # copies the weights, then ema = decay * ema + (1 - decay) * weights)
    expected = dict(spy.ema_sources[0])
    for source in spy.ema_sources[1:]:
        expected = {k: decay * v + (1 - decay) * source[k] if v.is_floating_point() else source[k]
                    for k, v in expected.items()}
    ema, weights = checkpoint['state_dict_ema'], checkpoint['state_dict']
    assert set(ema) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(ema[key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(weights['models.0.fc.weight'], spy.ema_sources[-1]['models.0.fc.weight'])
    assert max((ema[k] - weights[k]).abs().max().item() for k in ema if ema[k].is_floating_point()) > 1e-4
    # the EMA weights are evaluated on their own
    assert 0 <= float(rows[0]['eval_ema_top1']) <= 100 and rows[0]['eval_ema_loss'] != rows[0]['eval_loss']


def test_no_prefetcher_multi_view(image_folder, tmp_path, monkeypatch):
    spy = TrainSpy(monkeypatch)
    _run('--data-dir', image_folder, *TINY, '--epochs', 1, '--no-prefetcher', '--reprob', '0.5', '--mixup', '0.2',
         '--split-views', '--cot-loss', 'kl', '--wd-divide', 'exp', '--no-plot', '--output', tmp_path,
         '--experiment', 'x')
    rows = _summary(tmp_path / 'x')
    assert float(rows[0]['train_loss_cot']) > 0
    assert spy.member_inputs_equal == [False] * 6  # every member its own view
    groups = torch.load(tmp_path / 'x' / 'last.pth.tar', map_location='cpu', weights_only=True)['optimizer']
    assert max(g['weight_decay'] for g in groups['param_groups']) == pytest.approx(1e-4 * math.exp(1 / 2 - 1))  # eq. 6


def test_rrc_pipeline(image_folder, tmp_path, monkeypatch):
    """timm's RandomResizedCrop pipeline (ImageNet recipes) with AutoAugment and per-view erasing on the device: every
    view goes through AutoAugment, and the prefetcher erases each view of a sample on its own."""
    import numpy as np
    from timm.data.auto_augment import AutoAugment
    from timm_splitnet.task import CoTrainingTask
    augment_calls, batches = [], []
    augment, forward = AutoAugment.__call__, CoTrainingTask.forward

    def spy_augment(self, img):
        out = augment(self, img)
        augment_calls.append(not np.array_equal(np.asarray(img), np.asarray(out)))
        return out

    def spy_forward(task, input, target):
        if task.get_trainable_module().training:
            batches.append(input.detach().clone())
        return forward(task, input, target)

    monkeypatch.setattr(AutoAugment, '__call__', spy_augment)
    monkeypatch.setattr(CoTrainingTask, 'forward', spy_forward)
    _run('--data-dir', image_folder, *TINY, '--epochs', 1, '--train-crop-mode', 'rrc', '--aa', 'original',
         '--reprob', '0.5', '--remode', 'const', '--smoothing', '0.1', '--no-plot', '--output', tmp_path,
         '--experiment', 'x')
    assert len(_summary(tmp_path / 'x')) == 1
    # AutoAugment ran once per view (2 views of the 6 x 32 images trained on) and changed most of them
    assert len(augment_calls) == 2 * 6 * 32
    assert sum(augment_calls) > 0.5 * len(augment_calls)
    # erasing: 'const' fills zeros after normalisation, a value no normalised pixel of the data takes; the batch is
    # split-major [S * B, 3, H, W], so row s * B + b is view s of sample b
    assert len(batches) == 6 and all(b.shape == (2 * 32, 3, 32, 32) for b in batches)
    erased = torch.cat([(b == 0).all(dim=1).flatten(1).any(dim=1).view(2, 32) for b in batches], dim=1)  # [S, N]
    assert 0.3 < erased.float().mean().item() < 0.7  # --reprob 0.5 per view
    differ = (erased[0] != erased[1]).float().mean().item()  # drawn per view: independent, differ half the time
    assert 0.3 < differ < 0.7, differ


def test_digits_config_parses():
    args, _ = train._parse_args(['-c', str(ROOT / 'configs' / 'digits_cpu.yaml')])
    assert args.dataset == 'sklearn/digits'
    # defaults set by a config do not leak into the next parse
    args, _ = train._parse_args([])
    assert args.dataset == ''


@pytest.mark.parametrize('config', sorted(p.name for p in (ROOT / 'configs').glob('*.yaml')))
def test_configs_are_valid(config):
    args, _ = train._parse_args(['-c', str(ROOT / 'configs' / config)])
    assert args.model.startswith('splitnet_')
    assert args.model in timm.list_models('splitnet_*')


def test_config_with_unknown_key(tmp_path):
    config = tmp_path / 'bad.yaml'
    config.write_text('lr: 0.1\nlearning_rate: 0.1\n')
    assert 'learning_rate' in _error('-c', config)


def test_missing_data_dir(tmp_path):
    message = _error('--data-dir', tmp_path / 'nowhere', *TINY, '--epochs', 1)
    assert 'does not exist' in message and 'nowhere' in message
    assert 'needs --data-dir' in _error(*TINY, '--epochs', 1)


def test_empty_data_dir(tmp_path):
    (tmp_path / 'train').mkdir()
    message = _error('--data-dir', tmp_path, *TINY, '--epochs', 1)
    assert 'No image files' in message


def test_resume_checkpoint_of_another_model(trained, image_folder, tmp_path):
    message = _error(
        '--data-dir', image_folder, *TINY, '--model', 'splitnet_wrn16_8_s2', '--model-kwargs', 'widen_factor=1',
        '--resume', trained / 'last.pth.tar', '--epochs', 1, '--output', tmp_path)
    assert MODEL in message and 'splitnet_wrn16_8_s2' in message


def test_resume_unreadable_checkpoint(image_folder, tmp_path):
    bad = tmp_path / 'last.pth.tar'
    bad.write_bytes(b'not a checkpoint')
    assert 'not a readable training checkpoint' in _error(
        '--data-dir', image_folder, *TINY, '--resume', bad, '--epochs', 1, '--output', tmp_path)


def test_split_views_needs_a_splitnet(image_folder, tmp_path):
    message = _error('--data-dir', image_folder, *TINY, '--model', 'resnet10t', '--split-views', '--epochs', 1,
                     '--output', tmp_path)
    assert '--split-views needs a SplitNet' in message and 'resnet10t' in message


def test_nan_loss_stops_and_keeps_last_good_checkpoint(image_folder, tmp_path, monkeypatch):
    from timm_splitnet.task import CoTrainingTask
    forward = CoTrainingTask.forward

    def nan_in_epoch_1(self, input, target):
        result = forward(self, input, target)
        if self.criterion.epoch >= 1:
            result['loss'] = result['loss'] * float('nan')
        return result

    monkeypatch.setattr(CoTrainingTask, 'forward', nan_in_epoch_1)
    message = _error('--data-dir', image_folder, *TINY, '--epochs', 3, '--output', tmp_path, '--experiment', 'x')
    assert 'NaN or infinite' in message and 'epoch 1' in message and 'last.pth.tar' in message
    last = torch.load(tmp_path / 'x' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert last['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in last['state_dict'].values() if v.is_floating_point())
    assert [r['epoch'] for r in _summary(tmp_path / 'x')] == ['0']


def test_unreadable_images_are_skipped_and_counted(image_folder, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(image_folder, data)
    good = sorted((data / 'train' / '0').iterdir())[0]
    (data / 'train' / '0' / 'truncated.jpg').write_bytes(good.read_bytes()[:300])
    _run('--data-dir', data, *TINY, '--epochs', 1, '--no-plot', '--output', tmp_path, '--experiment', 'x')
    rows = _summary(tmp_path / 'x')
    assert int(rows[0]['train_bad_images']) == 1


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous last.pth.tar intact and no temporary file behind."""
    from timm_splitnet.utils import train_state
    keeper = train_state.CheckpointKeeper(str(tmp_path), max_history=1)
    keeper.save(0, dict(epoch=0, state_dict={'w': torch.ones(3)}), metric=10.)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(train_state.torch, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        keeper.save(1, dict(epoch=1, state_dict={'w': torch.zeros(3)}), metric=20.)
    monkeypatch.undo()
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar'):
        checkpoint = train_state.load_checkpoint_file(str(tmp_path / name))
        assert checkpoint['epoch'] == 0
        torch.testing.assert_close(checkpoint['state_dict']['w'], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']


def test_checkpoint_keeper_history(tmp_path):
    from timm_splitnet.utils.train_state import CheckpointKeeper
    keeper = CheckpointKeeper(str(tmp_path), max_history=2)
    for epoch, metric in enumerate([10., 30., 20., 5.]):
        keeper.save(epoch, dict(epoch=epoch, state_dict={}), metric=metric)
    assert keeper.best_epoch == 1 and keeper.best_metric == 30.
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith('checkpoint-')) == [
        'checkpoint-1.pth.tar', 'checkpoint-2.pth.tar']
    assert torch.load(tmp_path / 'model_best.pth.tar', weights_only=True)['epoch'] == 1
    assert torch.load(tmp_path / 'last.pth.tar', weights_only=True)['epoch'] == 3


def test_checkpoint_keeper_resumed_into_another_folder(tmp_path):
    """Resumed elsewhere, the keeper forgets the old best (its file is not there) and picks the new folder's best."""
    from timm_splitnet.utils.train_state import CheckpointKeeper
    old = CheckpointKeeper(str(tmp_path / 'a'))
    old.save(0, dict(epoch=0, state_dict={}), metric=90.)
    new = CheckpointKeeper(str(tmp_path / 'b'))
    new.load_state_dict(old.state_dict())
    assert new.best_metric is None
    assert new.save(1, dict(epoch=1, state_dict={}), metric=50.)
    assert torch.load(tmp_path / 'b' / 'model_best.pth.tar', weights_only=True)['epoch'] == 1
    same = CheckpointKeeper(str(tmp_path / 'a'))
    same.load_state_dict(old.state_dict())
    assert (same.best_metric, same.best_epoch) == (90., 0)


def test_rng_state_round_trip():
    import random

    import numpy as np
    from timm_splitnet.utils.train_state import get_rng_state, set_rng_state
    state = get_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_plot_curves(tmp_path, monkeypatch):
    """The curves PNG: the accuracy panel draws every member and the ensemble, the loss panel the loss parts, each
    against the epochs of summary.csv (read back from the figure before it is saved), and the image has ink in both
    panels."""
    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image
    from timm_splitnet.plots import plot_curves
    summary = tmp_path / 'summary.csv'
    columns = dict(train_loss=[4.0, 3.0, 2.5], train_loss_ce=[3.9, 2.9, 2.4], train_loss_cot=[0.2, 0.1, 0.05],
                   eval_loss=[2.0, 1.5, 1.2], eval_top1=[30., 50., 60.], eval_member0_top1=[25., 45., 52.],
                   eval_member1_top1=[26., 44., 55.], lr=[0.1, 0.05, 0.01])
    lines = ['epoch,' + ','.join(columns)] + [
        ','.join([str(epoch)] + [str(v[epoch]) for v in columns.values()]) for epoch in range(3)]
    summary.write_text('\n'.join(lines) + '\n')
    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, 'savefig', lambda fig, *a, **k: figures.append(fig) or savefig(fig, *a, **k))
    png = plot_curves(str(summary), str(tmp_path / 'curves.png'))

    assert len(figures) == 1
    ax_acc, ax_loss = figures[0].axes
    acc = {line.get_label(): line for line in ax_acc.get_lines()}
    assert set(acc) == {'member 0', 'member 1', 'ensemble'}
    for label, key in (('member 0', 'eval_member0_top1'), ('member 1', 'eval_member1_top1'), ('ensemble', 'eval_top1')):
        assert list(acc[label].get_xdata()) == [0, 1, 2] and list(acc[label].get_ydata()) == columns[key], label
    loss = {line.get_label(): list(line.get_ydata()) for line in ax_loss.get_lines()}
    assert sorted(loss.values()) == sorted(columns[k] for k in ('train_loss', 'train_loss_ce', 'train_loss_cot',
                                                                 'eval_loss'))
    assert ax_loss.get_yscale() == 'log' and ax_acc.get_xlabel() == ax_loss.get_xlabel() == 'epoch'

    image = np.asarray(Image.open(png).convert('RGB')).astype(int)
    assert image.shape == (450, 1200, 3)  # 12 x 4.5 inches at 100 dpi
    # coloured ink (lines, not the grey axes and text) in the plot area of each panel
    coloured = (image.max(axis=2) - image.min(axis=2)) > 60
    assert coloured[:, :600].sum() > 500 and coloured[:, 600:].sum() > 500


def test_task_mixes_all_views_alike():
    """One lambda, partner and CutMix box for all views: identical views stay identical after mixing."""
    from timm.data import Mixup
    from timm_splitnet.loss import CoTrainingLoss
    from timm_splitnet.task import CoTrainingTask
    model = timm.create_model(MODEL, num_classes=10, layers=(1, 1, 1))
    mixup = Mixup(mixup_alpha=1., cutmix_alpha=1., num_classes=10)
    task = CoTrainingTask(model, CoTrainingLoss(), num_views=2, mixup_fn=mixup)
    view = torch.randn(8, 3, 32, 32)
    target = torch.arange(8)
    for _ in range(4):
        x, soft = task.split_batch(torch.cat([view, view]), target.repeat(2))
        assert x.shape == (8, 6, 32, 32) and soft.shape == (8, 10)
        torch.testing.assert_close(x[:, :3], x[:, 3:])
    x = torch.randn(16, 3, 32, 32)
    task.mixup_fn = None  # the loss against independently computed values (hard targets)
    result = task(x, target.repeat(2))
    assert result['batch_size'] == 8 and result['output'].shape == (8, 10)
    with torch.no_grad():
        members = model.forward_members(torch.cat([x[:8], x[8:]], dim=1))  # view i -> member i
    ce, js = _step_losses(members.double(), target)
    assert result['loss_ce'].item() == pytest.approx(ce, rel=1e-5)
    assert result['loss'].item() == pytest.approx(ce + result['cot_weight'] * js, rel=1e-5)
    torch.testing.assert_close(result['output'], members.mean(0))


def test_validate_members_matches_the_model():
    from timm_splitnet.task import validate_members
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=10, layers=(1, 1, 1)).eval()
    data = [(torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))) for _ in range(3)]
    metrics = validate_members(model, data, log_interval=0)
    x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    with torch.no_grad():
        ensemble, members = model(x), model.forward_members(x)
    assert metrics['top1'] == pytest.approx(100. * (ensemble.argmax(1) == y).float().mean().item())
    for i in range(2):
        assert metrics[f'member{i}_top1'] == pytest.approx(100. * (members[i].argmax(1) == y).float().mean().item())
    assert metrics['loss'] == pytest.approx(torch.nn.functional.cross_entropy(ensemble, y).item(), rel=1e-5)
    assert metrics['nll'] == pytest.approx(metrics['loss'], rel=1e-5)
    for i in range(2):
        assert metrics[f'member{i}_nll'] == pytest.approx(
            torch.nn.functional.cross_entropy(members[i], y).item(), rel=1e-5)
    probs = members.softmax(-1)
    disagreement = (members[0].argmax(1) != members[1].argmax(1)).float().mean().item()
    assert metrics['disagreement'] == pytest.approx(disagreement)
    kl = (probs[0] * (probs[0].log() - probs[1].log())).sum(-1).mean() + (
        probs[1] * (probs[1].log() - probs[0].log())).sum(-1).mean()
    assert metrics['pairwise_kl'] == pytest.approx(kl.item() / 2, rel=1e-4)
    assert not model.training
