"""validate.py / benchmark.py --member-parallel: 2 CPU processes under torchrun (gloo) against the single process

The torchrun runs launch the scripts themselves (`torchrun --nproc_per_node=2 validate.py ... --member-parallel`):
validation gives the single-process accuracies on the same checkpoint, with one replica (S=2, member i on rank i)
and with two replicas of one member (S=1, an odd number of images: the padded last shard is not counted twice);
the benchmark writes a member-parallel row beside the single-process ones. Only rank 0 reports. The input errors
(no torchrun, a world size that does not fit S, a plain model, --devices beside it) run in this process.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import timm
from timm_splitnet import save_safetensors
from timm_splitnet.cli import TORCHRUN_ENV

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repo-root scripts

import benchmark  # noqa: E402
import validate  # noqa: E402

MODEL = 'splitnet_resnet110_s2'
TINY_ARGS = ['--model-kwargs', 'layers=(1,1,1)', '--num-classes', '10']
# keys that differ between a member-parallel and a single-process row by design
RUN_KEYS = {'split_mode', 'device', 'world_size', 'samples_per_sec'}

requires_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')


def validate_single_process(argv):
    """The reference: validate.py in this process, on one intra-op thread like the torchrun workers
    (OMP_NUM_THREADS=1), so that the same kernels give the same logits."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return validate.main(argv)[0]
    finally:
        torch.set_num_threads(num_threads)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, cwd: Path) -> str:
    """Run a repo-root script in 2 CPU processes under torchrun; returns stdout + stderr (asserting success)."""
    python_path = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=python_path)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
           str(ROOT / script), *args, '--member-parallel', '--device', 'cpu', '--dist-timeout', '60']
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """Tiny S=2 and S=1 models (10 classes) saved as .safetensors."""
    root = tmp_path_factory.mktemp('mp_weights')
    paths = {}
    for name in (MODEL, 'splitnet_resnet110_s1'):
        torch.manual_seed(1)
        paths[name] = root / f'{name}.safetensors'
        save_safetensors(timm.create_model(name, layers=(1, 1, 1), num_classes=10).eval(), str(paths[name]))
    return paths


@pytest.fixture(scope='module')
def odd_folder(image_folder, tmp_path_factory) -> Path:
    """7 validation images (3 + 3 + 1 of three classes): two replicas get 4 + 3, the last shard padded by one."""
    root = tmp_path_factory.mktemp('odd')
    for cls, count in zip(sorted(p.name for p in (image_folder / 'validation').iterdir()), (3, 3, 1)):
        (root / 'validation' / cls).mkdir(parents=True)
        for image in sorted((image_folder / 'validation' / cls).iterdir())[:count]:
            shutil.copy(image, root / 'validation' / cls / image.name)
    return root


# ----- torchrun: the same accuracies as one process, one report -----

@pytest.mark.slow
@requires_dist
@pytest.mark.parametrize('model,data,batch_size,num_images', [
    (MODEL, 'digits', 50, 100),  # the digits image folder (tests/conftest.py); member i on rank i
    ('splitnet_resnet110_s1', 'odd', 4, 7),  # two replicas of one member, each validating half of the images
])
def test_validate_member_parallel_equals_single_process(
        image_folder, odd_folder, weights, tmp_path, model, data, batch_size, num_images):
    root = image_folder if data == 'digits' else odd_folder
    argv = [str(root), '--model', model, '--checkpoint', str(weights[model]), '-b', str(batch_size), '-j', '0',
            '--log-freq', '0'] + TINY_ARGS
    out = tmp_path / 'results.json'
    output = torchrun('validate.py', *argv, '--results-file', str(out), '--results-format', 'json', cwd=tmp_path)
    assert output.count('All results (json)') == 1 and output.count('* Acc@1') == 1, output[-4000:]  # rank 0 reports
    mp = json.loads(out.read_text())
    assert len(mp) == 1
    mp = mp[0]
    single = validate_single_process(argv + ['--device', 'cpu'])

    assert set(mp) == set(single) | {'world_size'}
    assert (mp['split_mode'], mp['world_size'], mp['device'], mp['num_images']) == (
        'member_parallel', 2, 'cpu,cpu', num_images)
    assert single['split_mode'] == 'sequential'
    for key in set(single) - RUN_KEYS:
        assert mp[key] == single[key], key  # accuracies of members and ensembles, loss, model facts


MEMBER_DELAY_MS = 40.


@pytest.mark.slow
@requires_dist
def test_benchmark_member_parallel_row(tmp_path, monkeypatch):
    """The member-parallel row times the members on their own processes: with a known delay in every member forward
    (tests/delayed_members.py), a step takes at least the delays of the members it runs one after the other (two in
    the sequential row, one per rank in the member-parallel row), and the two ranks' members run at the same time
    (their delays overlap): the README's latency of one member plus one gather."""
    out = tmp_path / 'results.json'
    monkeypatch.setenv('SPLITNET_TEST_SLEEP_LOG', str(tmp_path / 'sleeps'))
    output = torchrun(
        'tests/delayed_members.py', str(MEMBER_DELAY_MS), 'benchmark.py', '--', '--model', MODEL, '--bench', 'both',
        '-b', '2', '--num-warm-iter', '1', '--num-bench-iter', '3', '--split-backend', 'loop', '--clock', 'wall',
        '--results-file', str(out), '--results-format', 'json', *TINY_ARGS, cwd=tmp_path)  # wall: sleeps count
    assert output.count('--result') == 1, output[-4000:]
    rows = json.loads(out.read_text())
    assert [(r['model'], r['split_mode']) for r in rows] == [
        ('splitnet_resnet110_s1', 'undivided'), (MODEL, 'sequential'), (MODEL, 'member_parallel')]
    undivided, sequential, mp = rows
    assert (mp['world_size'], mp['devices'], mp['split_factor'], mp['split_backend'], mp['group']) == (
        2, 'cpu,cpu', 2, 'loop', MODEL)
    assert mp['infer_batch_size'] == 2
    for r, delays in ((undivided, 1), (sequential, 2), (mp, 1)):  # member forwards one after the other per step
        assert r['infer_clock'] == r['train_clock'] == 'wall'
        for bench in ('infer', 'train'):
            assert r[f'{bench}_step_time_median'] >= delays * MEMBER_DELAY_MS, (r['split_mode'], bench)
            assert 0 < r[f'{bench}_samples_per_sec'] <= 2 / (delays * MEMBER_DELAY_MS / 1000.), (r['split_mode'], bench)
    # rank 1 holds member 1 and runs only in member-parallel steps: its delays overlap rank 0's (timing-free)
    sleeps = {rank: [tuple(map(float, line.split()[1:])) for line in (tmp_path / f'sleeps.rank{rank}').open()]
              for rank in (0, 1)}
    assert len(sleeps[1]) >= 2 * (1 + 3)  # infer and train: warm-up and timed steps (and the setup's forwards)
    overlapping = [any(a < d and c < b for c, d in sleeps[0]) for a, b in sleeps[1]]
    assert sum(overlapping) >= 0.75 * len(overlapping), overlapping
    for key in ('param_count', 'infer_gmacs', 'infer_img_size', 'precision'):
        assert mp[key] == sequential[key], key
    assert 'world_size' not in sequential


# ----- bad input, in this process -----

def expect_error(main, argv, prog, *fragments):
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith(f'{prog}: error:'), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def torchrun_env(monkeypatch):
    """A torchrun-like environment for rank 0 of `WORLD_SIZE` processes (no process group is created)."""
    env = dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_member_parallel_needs_torchrun(image_folder, monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    validate_argv = [str(image_folder), '--model', MODEL, '-j', '0', '--device', 'cpu', '--member-parallel']
    expect_error(validate.main, validate_argv + TINY_ARGS, 'validate.py', 'launch validate.py with torchrun',
                 'torchrun --nproc_per_node=N validate.py ... --member-parallel', 'RANK')
    expect_error(benchmark.main, ['--model', MODEL, '--device', 'cpu', '--member-parallel'] + TINY_ARGS,
                 'benchmark.py', 'launch benchmark.py with torchrun')


def test_member_parallel_bad_inputs(image_folder, torchrun_env):
    base = [str(image_folder), '-j', '0', '--device', 'cpu', '--member-parallel']
    torchrun_env.setenv('WORLD_SIZE', '3')
    expect_error(validate.main, base + ['--model', MODEL] + TINY_ARGS, 'validate.py',
                 '3 processes do not fit S=2', 'Valid N for S=2: 1, 2, 4')
    expect_error(benchmark.main, ['--model', MODEL, '--device', 'cpu', '--member-parallel'] + TINY_ARGS,
                 'benchmark.py', '3 processes do not fit S=2')
    torchrun_env.setenv('WORLD_SIZE', '2')
    expect_error(validate.main, base + ['--model', 'resnet18', '--num-classes', '10', '--img-size', '32'],
                 'validate.py', 'needs a SplitNet model', 'resnet18')
    expect_error(benchmark.main, ['--model', 'resnet18', '--img-size', '32', '--device', 'cpu', '--member-parallel'],
                 'benchmark.py', 'needs a SplitNet model', 'resnet18')
    expect_error(validate.main, base + ['--model', MODEL, '--devices', 'cpu,cpu'] + TINY_ARGS, 'validate.py',
                 '--devices', 'exclude each other')
    assert not torch.distributed.is_initialized()
