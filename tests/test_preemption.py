""" Training that survives the cluster: preemption signals, --resume auto, --max-time, full disks, dead workers

The end-to-end tests run train.py on the 200-image `image_folder` with the tiny `splitnet_resnet110_s2
--model-kwargs layers=(1,1,1)` (12 steps per epoch) and send real signals to real processes: `tests/train_preempt.py`
only tells the test when the run reached a given step (or is writing its checkpoint), so that the signal lands
there. A stopped run exits with code 75 (`PREEMPTED_EXIT_CODE`) after writing `recovery-<epoch>-<batch>.pth.tar`;
the same command with `--resume auto` then ends with the weights of an uninterrupted run, bit for bit.
"""
import csv
import importlib.util
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.data

import timm_splitnet  # noqa: F401
from timm_splitnet.data.resumable import describe_worker_failure, make_resumable, restore_loader_position
from timm_splitnet.data.resumable import loader_position_state
from timm_splitnet.utils.preemption import (
    PREEMPTED_EXIT_CODE, PreemptionGuard, format_duration, parse_duration, parse_signals)
from timm_splitnet.utils.train_state import (
    CheckpointKeeper, describe_write_failure, find_resume_checkpoint, get_rng_state, load_checkpoint_file,
    set_rng_state)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / 'train.py'
RUNNER = ROOT / 'tests' / 'train_preempt.py'
TINY = ['--model', 'splitnet_resnet110_s2', '--model-kwargs', 'layers=(1,1,1)', '-b', '16', '--workers', '0',
        '--device', 'cpu', '--log-interval', '100', '--lr', '0.05', '--checkpoint-hist', '1', '--no-plot']
# draws from every random stream (python: RandAugment, torch: erasing in the prefetcher, numpy: mixup), EMA and a
# learning rate that moves at every step
EXACT = ['--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.5', '--mixup', '0.2', '--cutmix', '1.0', '--model-ema',
         '--model-ema-decay', '0.9', '--sched-on-updates', '--warmup-epochs', '1', '--epochs', '2']


def _load_train():
    spec = importlib.util.spec_from_file_location('splitnet_train_preemption', TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict:
    python_path = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=python_path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.) -> str:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f'the run ended (code {proc.returncode}) before {path.name} appeared')
        if time.time() > end:
            raise AssertionError(f'{path.name} did not appear within {timeout:.0f} s')
        time.sleep(0.02)
    return path.read_text()


def _start(hooks: Path, *argv, pause_rank=0, pause_step=-1, hold_save=False, torchrun_args=()):
    """train.py through tests/train_preempt.py (under torchrun when `torchrun_args` are given); output in a file."""
    hooks.mkdir(parents=True, exist_ok=True)
    runner = [str(RUNNER), str(hooks), str(pause_rank), str(pause_step), '1' if hold_save else '0', '--']
    if torchrun_args:
        cmd = [sys.executable, '-m', 'torch.distributed.run', *torchrun_args, f'--master_port={_free_port()}', *runner]
    else:
        cmd = [sys.executable, *runner]
    log = open(hooks / 'output.log', 'w')
    proc = subprocess.Popen(cmd + [str(a) for a in argv], cwd=str(hooks), env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


def _finish(proc: subprocess.Popen, hooks: Path, timeout: float = 240.):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError('the run did not end in time:\n' + (hooks / 'output.log').read_text()[-4000:]) from None
    return proc.returncode, (hooks / 'output.log').read_text()


def _summary(folder: Path):
    with open(folder / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def _assert_same_run(folder: Path, reference: Path) -> None:
    """The same final weights (model and EMA, bit for bit) and the same summary.csv as the reference run."""
    ours = load_checkpoint_file(str(folder / 'last.pth.tar'))
    theirs = load_checkpoint_file(str(reference / 'last.pth.tar'))
    assert ours['epoch'] == theirs['epoch']
    for key in ('state_dict', 'state_dict_ema'):
        if key not in theirs:
            continue
        assert ours[key].keys() == theirs[key].keys()
        for name, value in theirs[key].items():
            assert torch.equal(ours[key][name], value), f'{key}.{name}'
    assert _summary(folder) == _summary(reference)


# ----- the pieces, in one process -----

def test_parse_signals_and_duration():
    assert parse_signals(['TERM', 'sigusr1', '12']) == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    assert parse_signals('TERM,USR1') == (signal.SIGTERM, signal.SIGUSR1)  # the form of --preempt-signals
    assert parse_signals('none') == ()
    with pytest.raises(ValueError, match='cannot be caught'):
        parse_signals(['KILL'])
    with pytest.raises(ValueError, match='unknown signal'):
        parse_signals(['TERMINATE'])
    assert parse_duration('01:30:00') == 5400
    assert parse_duration('2-00:00:05') == 2 * 86400 + 5
    for bad in ('90', '1:60:00', '00:00:00', 'soon'):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_guard_records_signals_and_restores_handlers():
    """A real SIGUSR1 to this process: recorded, the stop is decided at the next poll; a second one is only recorded;
    the previous handler is back afterwards."""
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard([signal.SIGUSR1]) as guard:
        assert not guard.poll()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.poll() and 'SIGUSR1 received' in guard.reason
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.poll() and len(guard.received) == 2
    assert signal.getsignal(signal.SIGUSR1) is before


def test_guard_budget_keeps_a_reserve():
    guard = PreemptionGuard([], max_time=10., start_time=time.time() - 5.)
    guard.note_save(1.)
    assert not guard.poll()  # 5 s left, reserve 1 s
    guard.step_seconds = 1.5
    assert not guard.time_up()  # reserve 2 x 1.5 + 1 = 4 s
    guard.note_save(2.)
    assert guard.poll() and '--max-time budget of 0:00:10' in guard.reason  # reserve 5 s


def test_find_resume_checkpoint(tmp_path):
    assert find_resume_checkpoint(str(tmp_path / 'missing')) is None
    keeper = CheckpointKeeper(str(tmp_path), max_history=2)
    keeper.save(0, dict(epoch=0, state_dict={}), metric=1.)
    keeper.save(1, dict(epoch=1, state_dict={}), metric=0.)
    assert find_resume_checkpoint(str(tmp_path))[0] == str(tmp_path / 'last.pth.tar')
    recovery = keeper.save_recovery(2, 5, dict(epoch=1, state_dict={}, position=dict(epoch=2, batch=5)))
    path, checkpoint = find_resume_checkpoint(str(tmp_path))
    assert path == recovery and checkpoint['position']['batch'] == 5
    # a checkpoint cut short (a copy) is passed over for the next newest
    with open(recovery, 'r+b') as f:
        f.truncate(40)
    assert find_resume_checkpoint(str(tmp_path))[0] == str(tmp_path / 'last.pth.tar')
    (tmp_path / 'last.pth.tar').unlink()  # a hard link of checkpoint-1.pth.tar: replaced, not truncated
    (tmp_path / 'last.pth.tar').write_bytes(b'')
    assert find_resume_checkpoint(str(tmp_path))[0] == str(tmp_path / 'checkpoint-1.pth.tar')
    keeper.save(2, dict(epoch=2, state_dict={}), metric=0.)  # an epoch's end removes the mid-epoch checkpoints
    assert keeper.recovery_files() == []


class _Noisy(torch.utils.data.Dataset):
    """Samples that draw from all three host random streams, as augmentations do."""

    def __len__(self):
        return 40

    def __getitem__(self, index):
        import random
        return torch.tensor([float(index), torch.rand(()).item(), np.random.rand(), random.random()])


def _batches(loader, epoch, stop=None, consumed=0):
    """Iterate like timm's PrefetchLoader (one batch fetched ahead) and draw from the streams between batches."""
    loader.sampler.set_epoch(epoch)
    out, iterator, ahead = [], iter(loader), None
    ahead = next(iterator, None)
    batch = consumed
    while ahead is not None:
        current, ahead = ahead, next(iterator, None)
        out.append(current)
        torch.rand(3), np.random.rand()  # the training step's own draws (dropout, mixup)
        batch += 1
        if batch == stop:
            return out, loader_position_state(loader, batch), get_rng_state()
    return out, None, get_rng_state()


def test_resumable_loader_continues_mid_epoch():
    """Stopped after batch 3 of epoch 1 with a batch fetched ahead, a new loader continues with the same batches, the
    same draws and the same random state at the end of the epoch as an uninterrupted one."""
    def loader():
        return make_resumable(torch.utils.data.DataLoader(_Noisy(), batch_size=4, shuffle=True, drop_last=True), 7)

    start = get_rng_state()
    full = loader()
    _batches(full, 0)
    reference, _, reference_end = _batches(full, 1)
    set_rng_state(start)
    part = loader()
    _batches(part, 0)
    first, position, state = _batches(part, 1, stop=3)
    assert len(position['replay']) == 1  # the batch fetched ahead
    torch.manual_seed(123), np.random.seed(123)  # a new process: other streams until the checkpoint's are restored
    resumed = loader()
    set_rng_state(state)
    resumed.sampler.set_epoch(1)
    assert restore_loader_position(resumed, 3, position, state)
    rest, _, end = _batches(resumed, 1, consumed=3)
    assert len(resumed) == 10
    torch.testing.assert_close(torch.cat(first + rest), torch.cat(reference), rtol=0, atol=0)
    assert end['torch'].equal(reference_end['torch']) and end['numpy'] == reference_end['numpy']
    assert end['python'] == reference_end['python']


def test_write_failure_message(tmp_path):
    error = OSError(28, 'No space left on device')
    message = describe_write_failure('the checkpoint of epoch 3', str(tmp_path), error)
    assert str(tmp_path) in message and 'free)' in message and 'the disk is full' in message


def test_worker_failure_message():
    message = describe_worker_failure(RuntimeError('DataLoader worker (pid 4242) is killed by signal: Killed. '))
    assert 'worker (pid 4242) was killed by signal Killed' in message and '--workers' in message
    assert describe_worker_failure(RuntimeError('CUDA out of memory')) is None


# ----- end to end -----

@pytest.fixture(scope='module')
def train():
    return _load_train()


@pytest.fixture(scope='module')
def reference(image_folder, tmp_path_factory, train):
    """An uninterrupted 2-epoch run (in this process) and its duration."""
    out = tmp_path_factory.mktemp('reference')
    start = time.time()
    argv = ['--data-dir', str(image_folder), *TINY, *EXACT, '--output', str(out), '--experiment', 'ref']
    assert train.main(argv) == 0
    return out / 'ref', time.time() - start


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_auto_is_exact(image_folder, tmp_path, train, reference):
    """SIGTERM in epoch 0, a second SIGTERM while the checkpoint is written: exit 75 with a complete mid-epoch
    checkpoint; the same command with --resume auto ends with the uninterrupted run's weights and summary."""
    argv = ['--data-dir', image_folder, *TINY, *EXACT, '--output', tmp_path, '--experiment', 'run', '--resume', 'auto']
    hooks = tmp_path / 'hooks'
    proc = _start(hooks, *argv, pause_step=4, hold_save=True)
    pid = int(_wait_for(hooks / 'paused-0', proc))
    os.kill(pid, signal.SIGTERM)
    (hooks / 'go').touch()
    _wait_for(hooks / 'saving', proc)
    os.kill(pid, signal.SIGTERM)  # during the save
    (hooks / 'go-save').touch()
    code, output = _finish(proc, hooks)
    assert code == PREEMPTED_EXIT_CODE, output[-4000:]
    assert 'Stopping in epoch 0 after batch 5 of 12: SIGTERM received' in output
    assert re.search(r'Signals received: SIGTERM at [\d:]+, SIGTERM at', output)
    run = tmp_path / 'run'
    assert sorted(p.name for p in run.iterdir()) == ['args.yaml', 'recovery-0-5.pth.tar']
    checkpoint = load_checkpoint_file(str(run / 'recovery-0-5.pth.tar'))
    assert checkpoint['position']['batch'] == 5 and checkpoint['num_updates'] == 5

    assert train.main([str(a) for a in argv]) == 0
    _assert_same_run(run, reference[0])
    assert not list(run.glob('recovery-*')) and not list(run.glob('.*.tmp'))


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
def test_sigterm_to_one_rank_under_torchrun_restarts_exactly(image_folder, tmp_path):
    """2 gloo processes (DDP) under torchrun --max-restarts 1: rank 1 alone gets SIGTERM mid-epoch; both ranks stop
    at the same step, checkpoint and exit 75; torchrun restarts them with the same command (--resume auto) and they
    end with the weights of an uninterrupted 2-process run (itself checked as DDP training of train.py)."""
    argv = ['--data-dir', image_folder, *TINY, '--epochs', '1', '--reprob', '0.5', '--mixup', '0.2', '--output',
            tmp_path, '--resume', 'auto']
    torchrun = ['--nproc_per_node=2', '--max-restarts=1']
    plain = _start(tmp_path / 'hooks-ref', *argv, '--experiment', 'ref', torchrun_args=torchrun)
    code, output = _finish(plain, tmp_path / 'hooks-ref')
    assert code == 0, output[-4000:]
    # the uninterrupted run is DDP training end to end: both members evaluated, every rank's random streams in the
    # checkpoint, the weights saved without DDP's 'module.' prefix and exported
    assert '2 distributed training processes' in output and 'Final' in output
    rows = _summary(tmp_path / 'ref')
    assert len(rows) == 1 and float(rows[0]['train_loss_cot']) > 0
    assert all(0 <= float(rows[0][k]) <= 100 for k in ('eval_top1', 'eval_member0_top1', 'eval_member1_top1'))
    checkpoint = load_checkpoint_file(str(tmp_path / 'ref' / 'last.pth.tar'))
    assert len(checkpoint['rng']) == 2 and not any(k.startswith('module.') for k in checkpoint['state_dict'])
    assert (tmp_path / 'ref' / 'model.safetensors').is_file()

    hooks = tmp_path / 'hooks'
    proc = _start(hooks, *argv, '--experiment', 'run', pause_rank=1, pause_step=2, torchrun_args=torchrun)
    os.kill(int(_wait_for(hooks / 'paused-1', proc)), signal.SIGTERM)
    (hooks / 'go').touch()
    code, output = _finish(proc, hooks)
    assert code == 0, output[-4000:]
    assert 'Stopping in epoch 0 after batch 4 of 6: SIGTERM received on rank 1' in output
    assert f'exiting with code {PREEMPTED_EXIT_CODE}' in output
    assert '--resume auto: continuing from' in output and 'recovery-0-4.pth.tar' in output
    _assert_same_run(tmp_path / 'run', tmp_path / 'ref')


@pytest.mark.slow
def test_max_time_checkpoints_before_the_limit(image_folder, tmp_path, train, reference, caplog):
    """--max-time of about half the reference run: exit 75 within the budget; --resume auto finishes exactly."""
    caplog.set_level(logging.INFO, logger='train')
    budget = max(2, int(reference[1] / 2))
    argv = ['--data-dir', str(image_folder), *TINY, *EXACT, '--output', str(tmp_path), '--experiment', 'run',
            '--resume', 'auto']
    start = time.time()
    assert train.main(argv + ['--max-time', format_duration(budget)]) == PREEMPTED_EXIT_CODE
    elapsed = time.time() - start
    assert elapsed < budget, f'{elapsed:.1f} s for a budget of {budget} s'
    assert f'the --max-time budget of {format_duration(budget)} is nearly spent' in caplog.text
    assert find_resume_checkpoint(str(tmp_path / 'run')) is not None
    assert train.main(argv) == 0
    _assert_same_run(tmp_path / 'run', reference[0])


@pytest.mark.slow
def test_full_disk_or_read_only_folder_keeps_the_previous_checkpoint(image_folder, tmp_path, train):
    """A file-size limit (ulimit -f) that the next checkpoint exceeds: a one-line error naming the folder and its free
    space; last.pth.tar of the epoch before still loads. A folder that turned read-only is reported the same way."""
    argv = ['--data-dir', str(image_folder), *TINY, '--epochs', '2', '--output', str(tmp_path), '--experiment', 'run',
            '--resume', 'auto']
    assert train.main(argv + ['--stop-epoch', '0']) == 0
    run = tmp_path / 'run'
    size = (run / 'last.pth.tar').stat().st_size
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, limits[1]))
    try:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    message = str(e.value.code)
    assert f'cannot write the checkpoint of epoch 1 to {run} (' in message and ' free)' in message, message
    assert 'File too large' in message and 'last.pth.tar is unchanged' in message
    assert load_checkpoint_file(str(run / 'last.pth.tar'))['epoch'] == 0
    assert not list(run.glob('.*.tmp'))

    with _unwritable(run):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
    message = str(e.value.code)
    assert f'cannot write the checkpoint of epoch 1 to {run} (' in message and ' free)' in message, message
    assert 'no permission to write there' in message and 'last.pth.tar is unchanged' in message
    assert load_checkpoint_file(str(run / 'last.pth.tar'))['epoch'] == 0


@contextmanager
def _unwritable(folder: Path):
    """Make `folder` refuse new files: read-only permissions, or for root (who ignores them) the immutable flag."""
    mode = folder.stat().st_mode
    os.chmod(folder, 0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):
            immutable = subprocess.run(['chattr', '+i', str(folder)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip('cannot make a folder unwritable here (root without chattr)')
        yield
    finally:
        if immutable:
            subprocess.run(['chattr', '-i', str(folder)], capture_output=True)
        os.chmod(folder, mode)


@pytest.mark.slow
def test_killed_loader_worker_stops_with_a_clear_error(image_folder, tmp_path):
    """SIGKILL to a loader worker (what the OOM killer sends): the run stops within seconds, naming the worker and
    what lowers memory."""
    hooks = tmp_path / 'hooks'
    proc = _start(hooks, '--data-dir', image_folder, *TINY, '--workers', '2', '--epochs', '1', '--output', tmp_path,
                  '--experiment', 'run', pause_step=2)
    pid = int(_wait_for(hooks / 'paused-0', proc))
    children = [int(p.name) for p in Path('/proc').iterdir() if p.name.isdigit() and _parent(p) == pid]
    assert children, 'no loader worker found'
    os.kill(children[0], signal.SIGKILL)
    start = time.time()
    (hooks / 'go').touch()
    code, output = _finish(proc, hooks, timeout=60)
    assert code == 1, output[-4000:]
    assert time.time() - start < 30
    assert f'data loader worker (pid {children[0]}) was killed by signal' in output, output[-4000:]
    assert '-j/--workers' in output and 'Traceback' not in output


def _parent(proc_dir: Path) -> int:
    try:
        return int((proc_dir / 'stat').read_text().rsplit(')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.slow
def test_nan_skip(image_folder, tmp_path, train, monkeypatch, caplog):
    """--nan-skip 1: the first step with a NaN loss is skipped and logged, the second stops the run."""
    from timm_splitnet.task import CoTrainingTask
    forward, calls = CoTrainingTask.forward, [0]

    def nan_at_steps_3_and_7(self, input, target):
        result = forward(self, input, target)
        if torch.is_grad_enabled():
            if calls[0] in (3, 7):
                result['loss'] = result['loss'] * float('nan')
            calls[0] += 1
        return result

    monkeypatch.setattr(CoTrainingTask, 'forward', nan_at_steps_3_and_7)
    with pytest.raises(SystemExit) as e:
        train.main(['--data-dir', str(image_folder), *TINY, '--epochs', '1', '--nan-skip', '1', '--output',
                    str(tmp_path), '--experiment', 'run'])
    message = str(e.value.code)
    assert 'NaN or infinite in 2 optimizer steps, more than --nan-skip 1 (the last in epoch 0, batch 7)' in message
    assert 'Epoch 0 batch 3: the loss is NaN or infinite on rank(s) 0' in caplog.text
