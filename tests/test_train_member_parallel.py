""" train.py --member-parallel under torchrun: 2 CPU processes (gloo), one member per process

The runs use the tiny `splitnet_resnet110_s2 --model-kwargs layers=(1,1,1)` on the 200-image `image_folder`:

* a member-parallel run with mixup + cutmix, gradient clipping and EMA writes the summary, the checkpoints and an
  export that timm loads;
* member-parallel trains as ordinary single-process train.py: with one full batch per epoch and views without
  randomness (`ALIKE`), a step on two processes from the same weights gives the single process's losses, accuracies,
  weights, BN statistics, EMA weights and optimizer state;
* checkpoints are interchangeable: the member-parallel checkpoint of epoch 0 resumed by single-process train.py gives
  the epoch 1 the member-parallel run made from it, and the single-process one resumed member-parallel the
  single-process run's epoch 1 (summary rows, weights, EMA, momentum);
* errors: no torchrun, a number of processes that does not fit S, a rank that dies or stalls mid-step (the job
  stops in bounded time naming the rank; `tests/train_fault.py` injects the fault).
"""
import csv
import json
import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import timm
import timm_splitnet  # noqa: F401
from timm_splitnet.cli import TORCHRUN_ENV

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / 'train.py'
FAULT = ROOT / 'tests' / 'train_fault.py'
MODEL = 'splitnet_resnet110_s2'
TINY = ['--model', MODEL, '--model-kwargs', 'layers=(1,1,1)', '-b', '16', '--workers', '0', '--device', 'cpu',
        '--log-interval', '100', '--no-plot', '--checkpoint-hist', '1']
# every per-step path of the member-parallel loop: shared mixup / cutmix draws, the clip over all members, EMA
FEATURES = ['--mixup', '0.2', '--cutmix', '1.0', '--clip-grad', '1.0', '--model-ema', '--model-ema-decay', '0.9']

requires_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load_train():
    spec = importlib.util.spec_from_file_location('splitnet_train_script_mp', TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_train()


def _run(*argv):
    return train.main([str(a) for a in argv])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(*argv, nproc: int = 2, cwd: Path, timeout: float = 120, script: Path = TRAIN):
    """Run `script` under torchrun with `nproc` CPU processes; returns (process, output, seconds)."""
    python_path = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=python_path)
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
           f'--master_port={_free_port()}', str(script), *[str(a) for a in argv]]
    start = time.time()
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr, time.time() - start


def _summary(folder: Path):
    with open(folder / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def _checkpoint(path: Path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _group_layout(optimizer_state):
    """Param groups without their changing values (lr): sizes and the hyper-parameter names."""
    return [(len(g['params']), sorted(k for k in g if k != 'params'), g['weight_decay'])
            for g in optimizer_state['param_groups']]


# ----- runs shared by the tests -----

# Runs that member-parallel and single-process train.py can make alike: one full batch per epoch (all 200 images, so
# the two samplers' different orders only permute the batch) and views without randomness (the whole image: scale
# and ratio 1, no flip, no colour jitter); gradient clipping (engaged: the gradient norm is above 1) and EMA on; the
# classifier's initial weights scaled up so that the logits are of order one and every layer gets a real gradient.
ALIKE = ['--model', MODEL, '--model-kwargs', 'layers=(1,1,1)', '--drop', '0', '-b', '200', '--workers', '0',
         '--device', 'cpu', '--log-interval', '100', '--no-plot', '--split-backend', 'loop', '--train-crop-mode', 'rrc',
         '--scale', '1', '1', '--ratio', '1', '1', '--hflip', '0', '--color-jitter', '0', '--head-init-scale', '100',
         '--lr', '0.2', '--clip-grad', '1.0', '--model-ema', '--model-ema-decay', '0.9', '--epochs', '2',
         '--checkpoint-hist', '2']
# Tolerances. The two modes sum the same numbers in another order (the permuted batch in the BN statistics and the
# loss mean, the clip norm as a sum of per-rank sums). In float32 that changes one training step's update of a
# tensor by up to ~1e-3 of the update itself (measured: 8e-4 for the first conv of a member, whose gradient passes
# BN backward's cancellations; below 2e-4 for every other tensor; the same size as between two single-process steps
# on the batch in two orders). Such differences grow several-fold with every further step, so every comparison
# starts both modes from the same state and compares one step: each tensor of the state (weights, BN statistics,
# EMA weights, momentum) must change alike within STEP_RTOL of its change, 20x the largest difference measured and
# far below what a wrong gradient, a per-rank clip (a factor ~sqrt(2)) or a skipped step would change.
STEP_RTOL = 2e-2
# summary.csv: the train losses are computed before the step (from the same state): float32 rounding only; the eval
# metrics after it (the step's difference, ~1e-5 relative); counts over the 100 validation images (top-k, member
# disagreement, ECE bins) may move by one image, which a near tie could flip
TRAIN_RTOL, EVAL_RTOL = 1e-5, 1e-3
ONE_IMAGE = {'top1': 1.0, 'top5': 1.0, 'disagreement': 0.01, 'ece': 0.02}


@pytest.fixture(scope='module')
def mp_run(image_folder, tmp_path_factory):
    """One epoch of member-parallel training on 2 processes with every per-step path that differs from the single
    process: mixup / cutmix drawn alike on both ranks, the clip over all members, EMA."""
    out = tmp_path_factory.mktemp('train_mp')
    proc, output, _ = _torchrun('--data-dir', image_folder, *TINY, *FEATURES, '--epochs', 1, '--output', out,
                                '--experiment', 'mp', '--member-parallel', cwd=out)
    assert proc.returncode == 0, output[-4000:]
    return out / 'mp', output


@pytest.fixture(scope='module')
def single_alike(image_folder, tmp_path_factory):
    """Epochs 0 and 1 of single-process train.py (in this process), each epoch's checkpoint kept, and the state the
    run started from (the model's state dict at its first training step)."""
    from timm_splitnet.task import CoTrainingTask
    out = tmp_path_factory.mktemp('train_single')
    initial = {}
    forward = CoTrainingTask.forward

    def spy_forward(task, input, target):
        if not initial:
            initial.update({k: v.detach().clone() for k, v in task.get_trainable_module().state_dict().items()})
        return forward(task, input, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CoTrainingTask, 'forward', spy_forward)
        _run('--data-dir', image_folder, *ALIKE, '--output', out, '--experiment', 'sp')
    return out / 'sp', initial


@pytest.fixture(scope='module')
def mp_alike(image_folder, tmp_path_factory):
    """Epochs 0 and 1 of the same run, member-parallel on 2 processes."""
    out = tmp_path_factory.mktemp('train_mp_alike')
    proc, output, _ = _torchrun('--data-dir', image_folder, *ALIKE, '--output', out, '--experiment', 'mp',
                                '--member-parallel', cwd=out)
    assert proc.returncode == 0, output[-4000:]
    assert '2 member-parallel training processes' in output and 'member(s) [0] of S=2' in output
    return out / 'mp'


def assert_row_alike(row, reference):
    """One epoch's summary.csv row against the reference run's (tolerances above)."""
    assert set(row) == set(reference)
    for key, value in reference.items():
        count = next((tol for name, tol in ONE_IMAGE.items() if key.endswith(name)), 0.)
        rel = TRAIN_RTOL if key.startswith('train_') or key == 'lr' else EVAL_RTOL
        assert float(row[key]) == pytest.approx(float(value), rel=rel, abs=count + 1e-9), (row['epoch'], key)


def _momentum(checkpoint):
    return {f'momentum.{i}': s['momentum_buffer'] for i, s in checkpoint['optimizer']['state'].items()}


def _state(checkpoint):
    """Everything a training step changes, by name: weights and BN statistics, EMA, momentum buffers."""
    state = {f'model.{k}': v for k, v in checkpoint['state_dict'].items()}
    state.update({f'ema.{k}': v for k, v in checkpoint['state_dict_ema'].items()})
    state.update(_momentum(checkpoint))
    return state


def assert_step_alike(after, reference_after, before):
    """One step from the common state `before`: every tensor changed alike (within STEP_RTOL of its change)."""
    assert list(after) == list(reference_after)  # the same names in the same order: the single-process layout
    changed = 0
    for key, reference in reference_after.items():
        value = after[key]
        if not reference.is_floating_point():
            assert torch.equal(value, reference), key  # BN batch counters
            continue
        start = before.get(key, torch.zeros_like(reference))  # no momentum before the first step
        change = (reference.double() - start.double()).abs().max().item()
        diff = (value.double() - reference.double()).abs().max().item()
        assert diff <= STEP_RTOL * change + 1e-7, f'{key}: differs by {diff:.3g}, the step changed it by {change:.3g}'
        changed += change > 0
    assert changed > 0.5 * len(reference_after)  # a real step: most tensors moved


def initial_state(initial):
    """`_state` of the run's starting point: the model's weights, the EMA's copy of them, no momentum yet."""
    state = {f'model.{k}': v for k, v in initial.items()}
    state.update({f'ema.{k}': v for k, v in initial.items()})
    return state


# ----- (a) member-parallel trains as the single process -----

@pytest.mark.slow
@requires_dist
def test_member_parallel_run(mp_run):
    folder, output = mp_run
    assert '2 member-parallel training processes' in output
    assert 'member(s) [0] of S=2' in output and 'Final' in output
    rows = _summary(folder)
    assert [r['epoch'] for r in rows] == ['0']
    for key in ('eval_top1', 'eval_top5', 'eval_member0_top1', 'eval_member1_top1', 'eval_member_avg_top1',
                'eval_ema_top1', 'eval_ema_member0_top1', 'eval_ema_member1_top1'):
        assert 0 <= float(rows[0][key]) <= 100, key
    assert float(rows[0]['train_loss_cot']) > 0
    for name in ('last.pth.tar', 'model_best.pth.tar', 'model.safetensors', 'config.json', 'args.yaml'):
        assert (folder / name).is_file(), name
    state = _checkpoint(folder / 'last.pth.tar')
    assert state['epoch'] == 0 and len(state['rng']) == 2 and 'shared_mixup' in state['task_state']

    # the export is the full SplitNet (the EMA weights of the best epoch), loadable through timm
    best = _checkpoint(folder / 'model_best.pth.tar')
    reference = timm.create_model(MODEL, num_classes=10, layers=(1, 1, 1))
    reference.load_state_dict(best['state_dict_ema'])
    model = timm.create_model(MODEL, pretrained=True, layers=(1, 1, 1),
                              pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors')))
    reference.eval(), model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    # config.json records the model kwargs and the input size, so `local-dir:` rebuilds the trained network alone
    config = json.loads((folder / 'config.json').read_text())
    assert config['model_args'] == {'num_classes': 10, 'layers': [1, 1, 1]}
    local = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(local(x), reference(x), rtol=0, atol=0)


@pytest.mark.slow
@requires_dist
def test_member_parallel_trains_like_the_single_process(mp_alike, single_alike):
    """Two processes, one member each, against ordinary single-process train.py from the same initial weights: the
    same losses, accuracies and calibration, and the same weights, BN statistics, EMA weights and optimizer state
    after the step (the gathered checkpoint in the single-process layout, optimizer groups included)."""
    single, initial = single_alike
    assert_row_alike(_summary(mp_alike)[0], _summary(single)[0])
    mp_state = _checkpoint(mp_alike / 'checkpoint-0.pth.tar')
    single_state = _checkpoint(single / 'checkpoint-0.pth.tar')
    assert mp_state['epoch'] == single_state['epoch'] == 0 and mp_state['num_updates'] == single_state['num_updates']
    assert _group_layout(mp_state['optimizer']) == _group_layout(single_state['optimizer'])
    assert list(initial) == list(single_state['state_dict'])
    assert_step_alike(_state(mp_state), _state(single_state), initial_state(initial))
    assert len(mp_state['rng']) == 2 and len(single_state['rng']) == 1


# ----- (b) checkpoint interchange -----

@pytest.mark.slow
@requires_dist
def test_member_parallel_checkpoint_resumes_in_single_process(mp_alike, image_folder, tmp_path):
    """The member-parallel checkpoint of epoch 0, resumed by single-process train.py: its epoch 1 is the one the
    member-parallel run made from that checkpoint (summary row, weights, EMA, momentum)."""
    _run('--data-dir', image_folder, *ALIKE, '--resume', mp_alike / 'checkpoint-0.pth.tar', '--output', tmp_path,
         '--experiment', 'x')
    rows = _summary(tmp_path / 'x')
    assert [r['epoch'] for r in rows] == ['1']
    assert_row_alike(rows[0], _summary(mp_alike)[1])
    resumed, reference = _checkpoint(tmp_path / 'x' / 'last.pth.tar'), _checkpoint(mp_alike / 'checkpoint-1.pth.tar')
    assert resumed['epoch'] == 1 and resumed['num_updates'] == reference['num_updates'] == 2
    assert_step_alike(_state(resumed), _state(reference), _state(_checkpoint(mp_alike / 'checkpoint-0.pth.tar')))


@pytest.mark.slow
@requires_dist
def test_single_process_checkpoint_resumes_member_parallel(single_alike, image_folder, tmp_path):
    """The single-process checkpoint of epoch 0 resumed member-parallel (without the prefetcher: collate_views): its
    epoch 1 is the single-process run's (summary row, weights, EMA, momentum), and it exports the best EMA weights."""
    single = single_alike[0]
    proc, output, _ = _torchrun('--data-dir', image_folder, *ALIKE, '--no-prefetcher', '--resume',
                                single / 'checkpoint-0.pth.tar', '--output', tmp_path, '--experiment', 'x',
                                '--member-parallel', cwd=tmp_path)
    assert proc.returncode == 0, output[-4000:]
    assert 'continuing at epoch 1' in output
    rows = _summary(tmp_path / 'x')
    assert [r['epoch'] for r in rows] == ['1']
    assert_row_alike(rows[0], _summary(single)[1])
    resumed, reference = _checkpoint(tmp_path / 'x' / 'last.pth.tar'), _checkpoint(single / 'checkpoint-1.pth.tar')
    assert resumed['epoch'] == 1 and resumed['num_updates'] == reference['num_updates'] == 2
    assert_step_alike(_state(resumed), _state(reference), _state(_checkpoint(single / 'checkpoint-0.pth.tar')))
    best = _checkpoint(tmp_path / 'x' / 'model_best.pth.tar')['state_dict_ema']  # the export: best epoch's EMA
    exported = load_file(str(tmp_path / 'x' / 'model.safetensors'))
    assert set(exported) == set(best)
    for key, value in best.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)


# ----- (c) errors -----

def test_member_parallel_needs_torchrun(image_folder, tmp_path, monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as e:
        _run('--data-dir', image_folder, *TINY, '--epochs', 1, '--output', tmp_path, '--member-parallel')
    message = str(e.value.code)
    assert 'launch train.py with torchrun' in message and '--nproc_per_node=N' in message


@pytest.mark.slow
@requires_dist
def test_process_count_that_does_not_fit(image_folder, tmp_path):
    proc, output, _ = _torchrun('--data-dir', image_folder, *TINY, '--epochs', 1, '--output', tmp_path,
                                '--member-parallel', nproc=3, cwd=tmp_path)
    assert proc.returncode != 0
    assert 'train.py: error: member-parallel: 3 processes do not fit S=2 members' in output, output[-4000:]
    assert 'Valid N for S=2: 1, 2, 4' in output


@pytest.mark.slow
@requires_dist
@pytest.mark.parametrize('mode', ['die', 'stall'])
def test_failing_rank_stops_the_job(image_folder, tmp_path, mode):
    """Rank 1 dies (or hangs) in its third training step: the job ends non-zero in bounded time, naming rank 1."""
    # with the default --preempt-signals a stalled rank catches torchrun's SIGTERM (it would checkpoint after its
    # step) and ends only with torchrun's SIGKILL, 30 s later; 'none' lets the SIGTERM end it at once
    proc, output, elapsed = _torchrun(
        mode, 1, 2, '--', '--data-dir', image_folder, *TINY, '--epochs', 1, '--output', tmp_path,
        '--member-parallel', '--dist-timeout', 5, '--preempt-signals', 'none', script=FAULT, cwd=tmp_path,
        timeout=120)
    assert proc.returncode != 0, output[-4000:]
    assert elapsed < 60, f'took {elapsed:.0f} s'
    if mode == 'die':  # torchrun's summary names the failed rank with its traceback (record)
        assert 'RuntimeError: injected failure on rank 1' in output and re.search(r'rank\s*:\s*1 ', output)
    else:  # rank 0 gives up after --dist-timeout, naming the rank it waited for
        assert 'MemberParallelError' in output and 'waiting for rank(s) [1]' in output, output[-4000:]
    assert 'Final' not in output


# ----- hooks -----

def test_sync_bn_keeps_timm_norm_act():
    """--sync-bn converts timm's BatchNormAct2d with its activation (torch's converter drops it)."""
    from timm.layers import BatchNormAct2d, SyncBatchNormAct
    from timm_splitnet.parallel.member_parallel import MemberParallelPlan, convert_member_sync_batchnorm
    from timm_splitnet.task.distributed import DataParallelTraining

    def norm_act():
        return nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU6))

    hooks = DataParallelTraining()
    hooks.distributed = True
    model, _ = hooks.setup_model(norm_act(), torch.device('cpu'), sync_bn=True)
    assert isinstance(model[1], SyncBatchNormAct) and isinstance(model[1].act, nn.ReLU6)
    replicas = MemberParallelPlan(4, 0, 2)  # 2 members x 2 replicas: SyncBatchNorm among a member's replicas
    model = convert_member_sync_batchnorm(norm_act(), replicas)
    assert isinstance(model[1], SyncBatchNormAct) and isinstance(model[1].act, nn.ReLU6)


def test_fp16_clip_grad_is_refused_member_parallel():
    from timm_splitnet.task.distributed import MemberParallelTraining
    hooks = MemberParallelTraining()
    assert hooks.create_loss_scaler(torch.device('cpu'), torch.float16, 1.0) is None  # no scaler on the CPU
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # GradScaler on a machine without CUDA warns that it is disabled
        assert hooks.create_loss_scaler(torch.device('cuda'), torch.float16, None) is not None
        with pytest.raises(ValueError, match='clip_grad with float16 AMP'):
            hooks.create_loss_scaler(torch.device('cuda'), torch.float16, 1.0)
