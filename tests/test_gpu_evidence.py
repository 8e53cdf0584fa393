""" scripts/gpu_evidence.py --smoke on a small tarball built here (the layout of the shared CIFAR-10 JPEG copy) """
import csv
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tarball(image_folder, tmp_path_factory) -> Path:
    """train/<class>/*.jpg and test/<class>/*.jpg (the fixture's validation split as test/)."""
    path = tmp_path_factory.mktemp('evidence_data') / 'cifar10-jpg.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        for split, name in (('train', 'train'), ('validation', 'test')):
            for f in sorted((Path(image_folder) / split).rglob('*.jpg')):
                tar.add(f, arcname=f'{name}/{f.parent.name}/{f.name}')
    return path


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_smoke_run_writes_every_output(tarball, tmp_path):
    out = tmp_path / 'ev'
    proc = subprocess.run(
        [sys.executable, 'scripts/gpu_evidence.py', '--smoke', '--data', str(tarball), '--out', str(out),
         '--budget-min', '4'], cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ('BENCHMARKS.md', 'RESULTS.md', 'results.json', 'speed_ratio.png', 'accuracy_vs_s.png'):
        assert (out / name).is_file(), name
    results = json.loads((out / 'results.json').read_text())
    assert results['env']['torch'] and results['env']['cpus'] >= 1
    results_md, benchmarks_md = (out / 'RESULTS.md').read_text(), (out / 'BENCHMARKS.md').read_text()

    # accuracy: every S ran, and the report's numbers are those of the run's own summary.csv
    assert [r['split_factor'] for r in results['accuracy']] == [1, 2, 4]
    for row in results['accuracy']:
        assert row['status'] == 'ok', row
        with open(out / 'train' / row['name'] / 'summary.csv', newline='') as f:
            epochs = list(csv.DictReader(f))
        last = epochs[-1]
        assert row['epochs_done'] == len(epochs) == row['epochs']
        assert row['ensemble_top1'] == float(last['eval_top1']) and row['train_loss'] == float(last['train_loss'])
        members = [float(last[f'eval_member{i}_top1']) for i in range(row['split_factor'])]
        assert row['member_top1'] == members and row['member_mean_top1'] == pytest.approx(sum(members) / len(members))
        line = next(line for line in results_md.splitlines() if line.startswith(f'| {row["name"]} '))
        assert f'| {row["ensemble_top1"]:.2f} |' in line and f'| {row["member_mean_top1"]:.2f} |' in line
    # the smoke runs one Table 5 ablation (the full run both): its row comes from its own summary.csv too
    assert [(r['name'], r['extra'], r['status']) for r in results['ablations']] == [
        ('abl_s2_same_view', '--same-view', 'ok')]
    ablation = results['ablations'][0]
    with open(out / 'train' / 'abl_s2_same_view' / 'summary.csv', newline='') as f:
        assert ablation['ensemble_top1'] == float(list(csv.DictReader(f))[-1]['eval_top1'])
    assert any(line.startswith('| abl_s2_same_view --same-view | 2 |') for line in results_md.splitlines())

    # speed: the rows are benchmark.py's results (one process per group, every backend in the same paired rounds),
    # each with benchmark.py's ratio to the undivided network of its rounds (1 for the undivided rows themselves)
    speed = [r for r in results['speed'] if 'error' not in r]
    assert any(r['split_factor'] > 1 and r['train_ratio'] for r in speed)
    for row in speed:
        name = f'speed_{row["input_group"]}' + ('_compile' if row['torchcompile'] else '')
        data = json.loads((out / 'logs' / f'{name}.json').read_text())
        run = data.get('results', []) if isinstance(data, dict) else data
        key = (row['model'], row['split_mode'], row['split_backend'])
        source = next(r for r in run if (r['model'], r['split_mode'], r['split_backend']) == key)
        assert all(row[k] == v for k, v in source.items()), key
        for kind in ('train', 'infer'):
            assert row[f'{kind}_ratio'] == pytest.approx(1. if row['split_factor'] == 1 else source[f'{kind}_vs_s1'])
        line = next(line for line in benchmarks_md.splitlines()
                    if line.startswith(f'| {row["input_group"]} | {row["model"]} | {row["split_factor"]} | '
                                       f'{row["split_backend"]} |'))
        assert f'| {row["train_samples_per_sec"]:.1f} |' in line and f'| {row["infer_samples_per_sec"]:.1f} |' in line

    # the paths: CUDA-only ones skipped on the CPU, the views on the device ran
    cuda_only = ('amp_float16_gradscaler', 'amp_bfloat16', 'packed_cuda', 'syncbn_nccl_1proc')
    assert all(results['checks'][name]['status'] == 'skipped: no CUDA' for name in cuda_only)
    assert results['checks']['views_on_device']['status'] == 'ok'
    # a second run reuses the extracted data
    assert (out / 'data' / 'smoke' / '.extracted').is_file()
