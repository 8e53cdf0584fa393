""" scripts/gpu_evidence.py --smoke on a small tarball built here (the layout of the shared CIFAR-10 JPEG copy) """
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
    assert any(r.get('train_ratio') for r in results['speed'])
    assert [r['split_factor'] for r in results['accuracy']] == [1, 2, 4]
    assert all(r['status'] == 'ok' and r['ensemble_top1'] is not None for r in results['accuracy'])
    assert results['checks']['amp_bfloat16']['status'] == 'skipped: no CUDA'
    assert results['checks']['views_on_device']['status'] == 'ok'
    assert 'splitnet_resnet110_s2' in (out / 'BENCHMARKS.md').read_text()
    # a second run reuses the extracted data
    assert (out / 'data' / 'smoke' / '.extracted').is_file()
