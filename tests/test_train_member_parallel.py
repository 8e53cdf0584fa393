""" train.py --member-parallel under torchrun: 2 CPU processes (gloo), one member per process

The runs use the tiny `splitnet_resnet110_s2 --model-kwargs layers=(1,1,1)` on the 200-image `image_folder`:

* a 2-epoch member-parallel run (mixup + cutmix, gradient clipping, EMA) writes the summary, the checkpoints in the
  single-process layout and an export that timm loads; one process holding both members (`--nproc_per_node=1`,
  the same sample order, views and mixup draws) gives the same losses and accuracies;
* checkpoints are interchangeable: the member-parallel `last.pth.tar` resumes in single-process train.py and a
  single-process checkpoint in member-parallel train.py, both continuing at the next epoch;
* errors: no torchrun, a number of processes that does not fit S, a rank that dies or stalls mid-step (the job
  stops in bounded time naming the rank; `tests/train_fault.py` injects the fault).
"""
import csv
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

@pytest.fixture(scope='module')
def mp_run(image_folder, tmp_path_factory):
    """A 2-epoch member-parallel run on 2 processes."""
    out = tmp_path_factory.mktemp('train_mp')
    proc, output, _ = _torchrun('--data-dir', image_folder, *TINY, *FEATURES, '--epochs', 2, '--output', out,
                                '--experiment', 'mp', '--member-parallel', cwd=out)
    assert proc.returncode == 0, output[-4000:]
    return out / 'mp', output


@pytest.fixture(scope='module')
def single_run(image_folder, tmp_path_factory):
    """Epoch 0 of 2 of a single-process run (in this process)."""
    out = tmp_path_factory.mktemp('train_single')
    _run('--data-dir', image_folder, *TINY, '--epochs', 2, '--stop-epoch', 0, '--output', out, '--experiment', 'sp')
    return out / 'sp'


# ----- (a) a member-parallel run -----

@pytest.mark.slow
@requires_dist
def test_member_parallel_run(mp_run):
    folder, output = mp_run
    assert 'member-parallel mode with 2 processes' in output
    assert 'member(s) [0] of S=2' in output and 'Final' in output
    rows = _summary(folder)
    assert [r['epoch'] for r in rows] == ['0', '1']
    for row in rows:
        for key in ('eval_top1', 'eval_top5', 'eval_member0_top1', 'eval_member1_top1', 'eval_member_avg_top1',
                    'eval_ema_top1', 'eval_ema_member0_top1', 'eval_ema_member1_top1'):
            assert 0 <= float(row[key]) <= 100, key
        assert float(row['train_loss_cot']) > 0
        assert float(row['train_loss']) == pytest.approx(
            float(row['train_loss_ce']) + float(row['train_cot_weight']) * float(row['train_loss_cot']), rel=1e-4)
    for name in ('last.pth.tar', 'model_best.pth.tar', 'model.safetensors', 'config.json', 'args.yaml'):
        assert (folder / name).is_file(), name

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


@pytest.mark.slow
@requires_dist
def test_member_parallel_checkpoint_layout(mp_run, single_run):
    """The gathered checkpoint has the single-process keys, in order, and the single-process optimizer layout."""
    mp_state, single = _checkpoint(mp_run[0] / 'last.pth.tar'), _checkpoint(single_run / 'last.pth.tar')
    assert list(mp_state['state_dict']) == list(single['state_dict'])
    assert list(mp_state['state_dict_ema']) == list(single['state_dict'])
    for k, v in single['state_dict'].items():
        assert mp_state['state_dict'][k].shape == v.shape, k
    assert _group_layout(mp_state['optimizer']) == _group_layout(single['optimizer'])
    assert sorted(mp_state['optimizer']['state']) == sorted(single['optimizer']['state'])
    assert mp_state['epoch'] == 1 and len(mp_state['rng']) == 2 and 'shared_mixup' in mp_state['task_state']


@pytest.mark.slow
@requires_dist
def test_one_process_holding_both_members_trains_alike(mp_run, image_folder, tmp_path):
    """The same run on one process (both members, the same samples, views and mixup draws): equal metrics."""
    proc, output, _ = _torchrun('--data-dir', image_folder, *TINY, *FEATURES, '--epochs', 2, '--output', tmp_path,
                                '--experiment', 'one', '--member-parallel', nproc=1, cwd=tmp_path)
    assert proc.returncode == 0, output[-4000:]
    # abs 1e-4: the small co-training loss, ECE (bin edges) and pairwise KL differ in the 5th decimal between one and
    # two processes (float reduction order of the gathered logits)
    for mp_row, one_row in zip(_summary(mp_run[0]), _summary(tmp_path / 'one')):
        for key, value in mp_row.items():
            assert float(one_row[key]) == pytest.approx(float(value), rel=1e-4, abs=1e-4), key


# ----- (b) checkpoint interchange -----

@pytest.mark.slow
@requires_dist
def test_member_parallel_checkpoint_resumes_in_single_process(mp_run, image_folder, tmp_path):
    _run('--data-dir', image_folder, *TINY, '--model-ema', '--epochs', 3, '--resume', mp_run[0] / 'last.pth.tar',
         '--output', tmp_path, '--experiment', 'x')
    assert [r['epoch'] for r in _summary(tmp_path / 'x')] == ['2']
    resumed = _checkpoint(tmp_path / 'x' / 'last.pth.tar')
    assert resumed['epoch'] == 2
    assert list(resumed['state_dict']) == list(_checkpoint(mp_run[0] / 'last.pth.tar')['state_dict'])
    assert (tmp_path / 'x' / 'model.safetensors').is_file()


@pytest.mark.slow
@requires_dist
def test_single_process_checkpoint_resumes_member_parallel(single_run, image_folder, tmp_path):
    """Without the prefetcher (collate_views) and, at the end, the export of the resumed run."""
    proc, output, _ = _torchrun('--data-dir', image_folder, *TINY, '--no-prefetcher', '--epochs', 2, '--resume',
                                single_run / 'last.pth.tar', '--output', tmp_path, '--experiment', 'x',
                                '--member-parallel', cwd=tmp_path)
    assert proc.returncode == 0, output[-4000:]
    assert 'continuing at epoch 1' in output
    assert [r['epoch'] for r in _summary(tmp_path / 'x')] == ['1']
    resumed, single = _checkpoint(tmp_path / 'x' / 'last.pth.tar'), _checkpoint(single_run / 'last.pth.tar')
    assert resumed['epoch'] == 1 and resumed['num_updates'] == 2 * single['num_updates']
    assert list(resumed['state_dict']) == list(single['state_dict'])
    assert _group_layout(resumed['optimizer']) == _group_layout(single['optimizer'])
    assert (tmp_path / 'x' / 'model.safetensors').is_file()


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
    proc, output, elapsed = _torchrun(
        mode, 1, 2, '--', '--data-dir', image_folder, *TINY, '--epochs', 1, '--output', tmp_path,
        '--member-parallel', '--dist-timeout', 5, script=FAULT, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0, output[-4000:]
    # a stalled rank catches torchrun's SIGTERM (a preemption signal: it would checkpoint after its step) and ends
    # with torchrun's SIGKILL, 30 s later
    assert elapsed < (60 if mode == 'die' else 100), f'took {elapsed:.0f} s'
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
