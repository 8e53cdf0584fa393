""" train.py under torchrun: 2 CPU processes (gloo), DDP of the SplitNet, one short epoch """
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
def test_ddp_two_cpu_processes(image_folder, tmp_path):
    python_path = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=python_path)
    cmd = [
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
        str(ROOT / 'train.py'), '--data-dir', str(image_folder), '--model', 'splitnet_resnet110_s2',
        '--model-kwargs', 'layers=(1,1,1)', '-b', '16', '--workers', '0', '--device', 'cpu', '--epochs', '1',
        '--mixup', '0.2', '--reprob', '0.25', '--log-interval', '100', '--no-plot', '--output', str(tmp_path),
        '--experiment', 'ddp',
    ]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert '2 distributed training processes' in output
    out = tmp_path / 'ddp'
    with open(out / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for key in ('eval_top1', 'eval_member0_top1', 'eval_member1_top1'):
        assert 0 <= float(rows[0][key]) <= 100
    assert float(rows[0]['train_loss_cot']) > 0
    checkpoint = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert len(checkpoint['rng']) == 2  # every rank's random streams, for an exact resume
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])
    assert (out / 'model.safetensors').is_file()
    assert 'Final' in proc.stdout
