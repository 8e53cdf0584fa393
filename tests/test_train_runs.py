""" train.py runs as a timm user drives them (issue 18): the input size a run records, resuming with a longer
schedule or with nothing left to train, the warm-up's start, --val-interval.

In-process runs of `train.main` on the 200-image `image_folder` (tests/conftest.py) with one block per stage, at
16 px: about a second per epoch.
"""
import csv
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

import timm
import timm_splitnet  # noqa: F401
from timm.data import resolve_data_config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repo-root scripts

import validate  # noqa: E402
from test_train import train  # noqa: E402  (train.py, loaded once)

pytestmark = pytest.mark.slow

MODEL = 'splitnet_resnet110_s2'
TINY = ['--model', MODEL, '--model-kwargs', 'layers=(1,1,1)', '-b', '50', '--workers', '0', '--device', 'cpu',
        '--log-interval', '100', '--checkpoint-hist', '1', '--img-size', '16', '--no-plot']
# a timm-style AdamW run with a one-epoch warm-up and the default --warmup-lr
ADAMW = ['--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '1', '--min-lr', '1e-4']


def _run(*argv):
    return train.main([str(a) for a in argv])


def _summary(folder):
    with open(Path(folder) / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def _cosine(epoch: int, epochs: int, peak: float = 1e-3, low: float = 1e-4) -> float:
    """timm's cosine LR of `epoch` of `epochs` (warm-up counted in, one cycle)."""
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * epoch / epochs))


@pytest.fixture(scope='module')
def run(image_folder, tmp_path_factory):
    """Two epochs at 16 px (not the model's 32), AdamW with a warm-up from the default --warmup-lr."""
    out = tmp_path_factory.mktemp('runs')
    _run('--data-dir', image_folder, *TINY, *ADAMW, '--epochs', 2, '--output', out, '--experiment', 'base')
    return out / 'base'


def test_warmup_starts_below_the_peak(run):
    """timm's --opt adamw --lr 1e-3 --warmup-epochs 1: the warm-up starts at timm's 1e-5, not above the peak."""
    rows = _summary(run)
    assert float(rows[0]['lr']) == pytest.approx(1e-5)
    assert float(rows[1]['lr']) == pytest.approx(_cosine(1, 2))


def test_the_run_records_its_input_size(run, image_folder):
    """Checkpoint, config.json and safetensors hold the trained size (16 px), crop, interpolation, mean and std;
    timm's local-dir: + resolve_data_config and validate.py without --img-size use them."""
    checkpoint = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=True)
    recorded = checkpoint['data_config']
    assert recorded['input_size'] == [3, 16, 16]
    assert (recorded['crop_pct'], recorded['crop_mode'], recorded['interpolation']) == (1.0, 'center', 'bilinear')
    config = json.loads((run / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 16, 16] and config['model_args']['layers'] == [1, 1, 1]
    model = timm.create_model(f'local-dir:{run}', pretrained=True)
    data_config = resolve_data_config(model=model)
    assert tuple(data_config['input_size']) == (3, 16, 16)
    assert tuple(data_config['mean']) == tuple(recorded['mean']) and data_config['crop_pct'] == 1.0
    argv = [str(image_folder), '--model', MODEL, '--model-kwargs', 'layers=(1,1,1)', '-b', '50', '-j', '0',
            '--device', 'cpu', '--log-freq', '0', '--checkpoint', str(run / 'model_best.pth.tar')]
    recorded_size = validate.main(argv)[0]
    explicit = validate.main(argv + ['--img-size', '16'])[0]
    assert recorded_size['img_size'] == 16 and recorded_size['top1'] == explicit['top1']
    assert recorded_size['loss'] == explicit['loss']
    from_export = validate.main(argv[:-1] + [str(run / 'model.safetensors')])[0]
    assert from_export['img_size'] == 16


def test_resume_with_more_epochs_rebuilds_the_schedule(run, image_folder, tmp_path, caplog):
    """--resume of the 2-epoch run with --epochs 4: the cosine of 4 epochs, as timm's train.py builds it, not the LR
    floor where the checkpoint's 2-epoch schedule ended."""
    folder = tmp_path / 'base'
    shutil.copytree(run, folder)
    with caplog.at_level('INFO', logger='train'):
        _run('--data-dir', image_folder, *TINY, *ADAMW, '--output', tmp_path, '--experiment', 'base', '--epochs', 4,
             '--resume', folder / 'last.pth.tar')
    rows = _summary(folder)
    assert [r['epoch'] for r in rows] == ['0', '1', '2', '3']
    assert [float(r['lr']) for r in rows[2:]] == pytest.approx([_cosine(2, 4), _cosine(3, 4)])
    assert float(rows[2]['lr']) > 4e-4  # the old schedule had ended at --min-lr 1e-4
    assert 'the LR schedule is rebuilt' in caplog.text and 't_initial: 2 -> 4' in caplog.text


def test_resuming_a_finished_run_trains_nothing(run, image_folder, tmp_path, capsys):
    """--resume of a finished run, and -c of the args.yaml a resumed run writes: one line, exit 0, no folder."""
    out = tmp_path / 'out'
    argv = ['--data-dir', image_folder, *TINY, *ADAMW, '--epochs', 2, '--output', out, '--resume', run / 'last.pth.tar']
    capsys.readouterr()
    assert _run(*argv) == 0
    assert 'nothing to train: the checkpoint is at epoch 2 of 2' in capsys.readouterr().out
    _, args_text = train._parse_args([str(a) for a in argv])  # what the resumed run wrote as its args.yaml
    (tmp_path / 'args.yaml').write_text(args_text)
    assert _run('-c', tmp_path / 'args.yaml') == 0
    assert 'nothing to train: the checkpoint is at epoch 2 of 2' in capsys.readouterr().out
    assert not out.exists() or not list(out.iterdir())  # no empty dated folder
    assert [r['epoch'] for r in _summary(run)] == ['0', '1']


def test_val_interval(image_folder, tmp_path):
    """--val-interval 3 over 4 epochs: evaluated after the first, the third and the last epoch; the others have
    empty eval columns in summary.csv and no say in model_best."""
    _run('--data-dir', image_folder, *TINY, '--lr', '0.05', '--warmup-epochs', '0', '--epochs', 4,
         '--val-interval', 3, '--output', tmp_path, '--experiment', 'x')
    rows = _summary(tmp_path / 'x')
    assert [r['eval_top1'] != '' for r in rows] == [True, False, True, True]
    assert rows[1]['eval_member0_top1'] == '' and float(rows[1]['train_loss']) > 0
    best = torch.load(tmp_path / 'x' / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    assert best['epoch'] in (0, 2, 3)
