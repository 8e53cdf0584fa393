""" Streamed data with SplitNet views: timm's wds/, hfids/ and hfds/ readers, the multi-view transform, train.py

The shards are written by the tests from scikit-learn's digits (tests/conftest.py: `digits8_folder`, 500 training and
200 validation images of 8x8 pixels, and the same files as `wds_shards` and `hf_shards`) and read by timm's own
readers through webdataset and Hugging Face datasets; nothing is mocked. A sample is recognised by the digest of its
decoded pixels (the shards hold the folder's JPEG files byte for byte).
"""
import collections
import csv
import hashlib
import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional

import pytest
import torch
from PIL import Image

from timm.data import create_loader

from timm_splitnet.data import (
    CIFAR10_MEAN, CIFAR10_STD, MultiViewTransform, collate_views, create_dataset, create_decode_transform,
    create_train_transform, set_data_epoch, set_loader_workers, set_views_transform, write_hf_shards)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device('cpu')
DECODE = create_decode_transform((3, 8, 8), 'pad')

pytest.importorskip('webdataset')
pytest.importorskip('datasets')


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def _folder_digests(folder: Path, split: str = 'train') -> collections.Counter:
    ds = create_dataset('', root=str(folder), split=split)
    ds.transform = DECODE
    return collections.Counter(_digest(ds[i][0]) for i in range(len(ds)))


def _hf_name(hf_shards: Path) -> str:
    return f'hfids/{hf_shards}'


def _hf_readers_or_skip():
    """Skip where timm's Hugging Face readers cannot read with the installed datasets (timm < 1.0.31, datasets 4+)."""
    from timm_splitnet.data import check_reader_installed
    try:
        check_reader_installed('hfids/any')
    except ImportError as e:
        pytest.skip(str(e))


def _streamed(kind: str, wds_shards: Path, hf_shards: Path, tmp_path: Path, **kwargs):
    if kind == 'wds':
        return create_dataset('wds/digits', root=str(wds_shards), **kwargs)
    _hf_readers_or_skip()
    return create_dataset(_hf_name(hf_shards), root=str(tmp_path / 'hf_cache'), **kwargs)


def _epoch_digests(dataset, epoch: int, limit: Optional[int] = None) -> list:
    """The samples of one epoch of a streamed data set read in this process, in order (the first `limit`)."""
    set_data_epoch(dataset, epoch)
    dataset.transform = DECODE
    return [_digest(img) for img, _ in itertools.islice(dataset, limit)]


class _CountingTransform:
    """Deterministic: a uint8 image filled with the number of calls so far (tracks which view is which)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, img):
        out = torch.full((3, 8, 8), self.calls % 256, dtype=torch.uint8)
        self.calls += 1
        return out


# --- the multi-view transform ----------------------------------------------------------------------------------


def test_multi_view_transform_draws_every_view(image_folder):
    img = Image.open(next((image_folder / 'train' / '3').iterdir())).convert('RGB')
    transform = create_train_transform((3, 32, 32), 'pad', mean=CIFAR10_MEAN, std=CIFAR10_STD, re_prob=0.5)
    torch.manual_seed(0)
    views = MultiViewTransform(transform, num_views=4)(img)
    assert len(views) == 4 and all(v.shape == (3, 32, 32) for v in views)
    assert len({_digest(v) for v in views}) == 4  # four draws of crop, flip and erasing
    same = MultiViewTransform(transform, num_views=3, same_view=True)(img)
    assert all(torch.equal(same[0], v) for v in same[1:])
    assert MultiViewTransform(None, 2)(img) == (img, img)
    with pytest.raises(TypeError, match='num_aug_splits'):
        MultiViewTransform((transform, transform, transform), 2)
    with pytest.raises(ValueError, match='num_views'):
        MultiViewTransform(transform, 0)


@pytest.mark.parametrize('use_prefetcher', [True, False])
@pytest.mark.parametrize('kind', ['folder', 'wds', 'hfds'])
def test_loader_layout_is_split_major(kind, use_prefetcher, digits8_folder, wds_shards, hf_shards, tmp_path):
    """timm's create_loader over a map-style folder, the streamed wds/ reader and the map-style hfds/ reader, with
    fast_collate (prefetcher) or collate_views: [S * B] rows split-major, the targets repeated per view."""
    batch_size = 5
    if kind == 'folder':
        ds = create_dataset('', root=str(digits8_folder), split='train')
    elif kind == 'wds':
        ds = create_dataset('wds/digits', root=str(wds_shards), split='train', is_training=True, batch_size=batch_size)
    else:
        _hf_readers_or_skip()
        ds = create_dataset(f'hfds/{hf_shards}', root=str(tmp_path / 'cache'), split='train')
    loader = create_loader(
        ds, (3, 8, 8), batch_size, is_training=True, no_aug=True, use_prefetcher=use_prefetcher, device=CPU,
        num_workers=0, collate_fn=None if use_prefetcher else collate_views, mean=CIFAR10_MEAN, std=CIFAR10_STD,
        persistent_workers=False)
    set_loader_workers(loader.dataset, 0)  # as train.py: the training process reads (timm < 1.0.31 counted none)
    assert len(loader) == 100  # 500 images, batches of 5
    set_views_transform(loader.dataset, _CountingTransform(), num_views=2)  # after create_loader set its own
    x, y = next(iter(loader))
    assert x.shape == (2 * batch_size, 3, 8, 8) and y.shape == (2 * batch_size,)
    assert torch.equal(y[:batch_size], y[batch_size:])
    if use_prefetcher:  # undo the prefetcher's normalization
        x = x * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) * 255 + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1) * 255
    # call 2 * i + s made view s of sample i, and row i + s * B holds it
    expected = torch.tensor([2. * i + s for s in range(2) for i in range(batch_size)])
    torch.testing.assert_close(x[:, 0, 0, 0].float().round(), expected)


@pytest.mark.slow
def test_streamed_loader_workers_split_the_shards(wds_shards, digits8_folder):
    """Two loader workers read two shards each: one epoch holds every sample once; the views, made in the workers,
    differ per member."""
    ds = create_dataset('wds/digits', root=str(wds_shards), split='train', is_training=True, batch_size=25)
    loader = create_loader(ds, (3, 8, 8), 25, is_training=True, no_aug=True, use_prefetcher=False, device=CPU,
                           num_workers=2, collate_fn=collate_views, persistent_workers=False)
    assert len(loader) == 20
    set_views_transform(loader.dataset, DECODE, num_views=2)  # no random op: the views identify the samples
    set_data_epoch(loader.dataset, 0)
    batches = list(loader)
    assert len(batches) == 20 and all(x.shape == (50, 3, 8, 8) and x.dtype == torch.uint8 for x, _ in batches)
    assert collections.Counter(_digest(img) for x, _ in batches for img in x[:25]) == _folder_digests(digits8_folder)
    transform = create_train_transform((3, 8, 8), 'pad', padding=1, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    set_views_transform(loader.dataset, transform, num_views=2)
    torch.manual_seed(0)  # the workers' seeds
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and torch.equal(y[:25], y[25:])
    assert sum(torch.equal(x[i], x[25 + i]) for i in range(25)) <= 5  # 18 crop / flip draws: ~6 % coincide


@pytest.mark.parametrize('kind', ['wds', 'hfids'])
def test_epoch_order_follows_seed_and_epoch(kind, wds_shards, hf_shards, digits8_folder, tmp_path):
    """Every epoch reads every sample once, in an order set by (seed, epoch): a restarted or resumed epoch (a new
    data set object, as after --resume) reads the same order, the next epoch and another seed others."""
    everything = _folder_digests(digits8_folder)

    def make(seed=42):
        return _streamed(kind, wds_shards, hf_shards, tmp_path, split='train', is_training=True, batch_size=25,
                         seed=seed)
    ds = make()
    epoch0, epoch1 = _epoch_digests(ds, 0), _epoch_digests(ds, 1)
    assert collections.Counter(epoch0) == everything and collections.Counter(epoch1) == everything
    assert epoch0 != epoch1
    assert _epoch_digests(ds, 0, 50) == epoch0[:50]  # the epoch restarted in the same process
    assert _epoch_digests(make(), 1, 50) == epoch1[:50]  # a resumed run
    assert _epoch_digests(make(seed=7), 0, 50) != epoch0[:50]


@pytest.mark.parametrize('kind', ['wds', 'hfids'])
def test_epoch_length_follows_repeats_and_num_samples(kind, wds_shards, hf_shards, tmp_path):
    """--epoch-repeats scales the samples of an epoch alike for wds/ and hfids/, --train-num-samples sets them; the
    count is rounded up to whole batches."""
    def length(**kwargs):
        ds = _streamed(kind, wds_shards, hf_shards, tmp_path, split='train', is_training=True, batch_size=25,
                       **kwargs)
        return len(ds), ds
    assert length()[0] == 500
    assert length(repeats=2.)[0] == 1000
    n, half = length(repeats=0.5)
    assert n == 250 and len(_epoch_digests(half, 0)) == 250
    assert length(num_samples=110)[0] == 125


def test_shards_hold_the_files(wds_shards, hf_shards, digits8_folder):
    info = json.loads((wds_shards / '_info.json').read_text())
    assert info['num_classes'] == 10 and info['classes'] == [str(c) for c in range(10)]
    train = info['splits']['train']
    assert train['num_samples'] == 500 and train['shard_lengths'] == [125] * 4
    assert train['filenames'] == [f'train-{i:05d}.tar' for i in range(4)]
    assert info['splits']['validation']['shard_lengths'] == [100, 100]
    originals = {p.read_bytes() for p in (digits8_folder / 'train').rglob('*.jpg')}
    with tarfile.open(wds_shards / 'train-00000.tar') as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    jpgs = {k[:-4]: v for k, v in members.items() if k.endswith('.jpg')}
    classes = {int(members[k + '.cls']) for k in jpgs}
    assert len(jpgs) == 125 and set(jpgs.values()) <= originals  # the files, byte for byte
    assert len(classes) >= 8  # shuffled before sharding: a shard holds many classes, not one or two
    card = (hf_shards / 'README.md').read_text()
    assert 'num_examples: 500' in card and 'num_examples: 200' in card and 'class_label' in card


def test_write_shards_script(digits8_folder, tmp_path):
    """scripts/write_shards.py: one command from the folder to shards that timm's wds/ reader reads."""
    spec = importlib.util.spec_from_file_location('splitnet_write_shards', ROOT / 'scripts' / 'write_shards.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / 'wds'
    assert script.main(['--data-dir', str(digits8_folder), '--output', str(out), '--splits', 'validation',
                        '--shard-size', '150']) == 0
    info = json.loads((out / '_info.json').read_text())
    assert info['splits']['validation']['shard_lengths'] == [150, 50]
    ds = create_dataset('wds/digits', root=str(out), split='validation')
    ds.transform = DECODE
    assert collections.Counter(_digest(img) for img, _ in ds) == _folder_digests(digits8_folder, 'validation')
    with pytest.raises(SystemExit, match='does not exist'):
        script.main(['--data-dir', str(tmp_path / 'nowhere'), '--output', str(out)])


def test_hf_parquet_shards_map_style_and_streamed(digits8_folder, tmp_path):
    """The Hub layout (parquet + card) through timm's hfds/ (map-style) and hfids/ (streamed) readers."""
    _hf_readers_or_skip()
    root = tmp_path / 'hf'
    counts = write_hf_shards(create_dataset('', root=str(digits8_folder), split='validation'), str(root),
                             'validation', shard_size=80)
    assert counts == {'validation': 200}
    assert sorted(p.name for p in (root / 'data').iterdir()) == [f'validation-{i:05d}-of-00003.parquet'
                                                                  for i in range(3)]
    folder = create_dataset('', root=str(digits8_folder), split='validation')
    folder.transform = DECODE
    expected = [(_digest(img), target) for img, target in (folder[i] for i in range(len(folder)))]
    hfds = create_dataset(f'hfds/{root}', root=str(tmp_path / 'cache'), split='validation')
    hfds.transform = DECODE
    assert len(hfds) == 200 and [(_digest(img), t) for img, t in (hfds[i] for i in range(200))] == expected
    hfids = create_dataset(f'hfids/{root}', root=str(tmp_path / 'cache'), split='validation')
    hfids.transform = DECODE
    assert len(hfids) == 200 and [(_digest(img), t) for img, t in hfids] == expected  # evaluation: in order


def test_missing_reader_package_names_the_extra(monkeypatch, tmp_path):
    from timm_splitnet.data import check_reader_installed
    monkeypatch.setitem(sys.modules, 'webdataset', None)  # what `import webdataset` finds when it is not installed
    with pytest.raises(ImportError, match=r"timm-splitnet\[wds\]"):
        create_dataset('wds/imagenet', root=str(tmp_path), split='train')
    monkeypatch.setitem(sys.modules, 'datasets', None)
    for name in ('hfids/timm/mini-imagenet', 'hfds/timm/mini-imagenet'):
        with pytest.raises(ImportError, match=r"timm-splitnet\[hf\]"):
            create_dataset(name, split='train')
    if importlib.util.find_spec('tensorflow_datasets') is None:
        with pytest.raises(ImportError, match='tensorflow-datasets'):
            check_reader_installed('tfds/imagenet2012')


def test_missing_shard_folder_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match='_info.json'):
        create_dataset('wds/imagenet', root=str(tmp_path / 'nowhere'), split='train')


# --- train.py -------------------------------------------------------------------------------------------------


def _load_train():
    spec = importlib.util.spec_from_file_location('splitnet_train_script_streaming', ROOT / 'train.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_train()

# a tiny S=2 SplitNet on the 8x8 digits; LEARN: the recipe of the learning comparison (3 epochs)
TINY = ['--model', 'splitnet_resnet110_s2', '--model-kwargs', 'layers=(1,1,1)', '--img-size', '8', '-b', '25',
        '--workers', '0', '--device', 'cpu', '--log-interval', '100', '--lr', '0.1', '--warmup-epochs', '0',
        '--checkpoint-hist', '1', '--no-plot', '--validation-batch-size', '200']
LEARN = TINY + ['--epochs', '3', '--hflip', '0', '--cot-warmup-epochs', '0', '--seed', '1']


def _summary(folder: Path):
    with open(folder / 'summary.csv', newline='') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope='module')
def wds_run(wds_shards, tmp_path_factory):
    """3 epochs of LEARN on wds/digits (CPU views, prefetcher on)."""
    out = tmp_path_factory.mktemp('wds_run')
    assert train.main(['--dataset', 'wds/digits', '--data-dir', str(wds_shards), *LEARN, '--output', str(out),
                       '--experiment', 'wds']) == 0
    return out / 'wds'


@pytest.mark.slow
def test_wds_learns_like_the_folder(wds_run, digits8_folder, tmp_path):
    """The same recipe on the same images, streamed from shards and read from the folder, lands in the same band."""
    assert train.main(['--data-dir', str(digits8_folder), *LEARN, '--output', str(tmp_path),
                       '--experiment', 'folder']) == 0
    streamed, folder = _summary(wds_run), _summary(tmp_path / 'folder')
    assert [r['epoch'] for r in streamed] == [0, 1, 2]
    assert all(r['train_loss_cot'] > 0 for r in streamed)
    assert streamed[-1]['train_loss'] < 0.6 * streamed[0]['train_loss']
    # seeds 1, 2 on two machines: folder 88.5-90.5 %, wds 85-89.5 % after 3 epochs
    assert streamed[-1]['eval_top1'] >= 70. and folder[-1]['eval_top1'] >= 70.
    assert abs(streamed[-1]['eval_top1'] - folder[-1]['eval_top1']) <= 12.


@pytest.mark.slow
def test_wds_resume_restarts_the_epoch(wds_run, wds_shards, tmp_path):
    """Stopped after epoch 0 and resumed: epoch 1 reads the shard order and samples of the uninterrupted run."""
    common = ['--dataset', 'wds/digits', '--data-dir', str(wds_shards), *LEARN, '--output', str(tmp_path),
              '--experiment', 'part']
    train.main(common + ['--stop-epoch', '0'])
    train.main(common + ['--stop-epoch', '1', '--resume', str(tmp_path / 'part' / 'last.pth.tar')])
    full, part = _summary(wds_run), _summary(tmp_path / 'part')
    assert [r['epoch'] for r in part] == [0, 1]
    for full_row, part_row in zip(full, part):
        for key, value in part_row.items():
            assert value == pytest.approx(full_row[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
@pytest.mark.parametrize('kind,views', [('wds', 'device'), ('hfids', 'cpu'), ('hfids', 'device'), ('hfds', 'cpu')])
def test_train_streamed_views(kind, views, wds_shards, hf_shards, tmp_path):
    """One short epoch per reader and way of making the views (hfds/: map-style, without the prefetcher)."""
    if kind != 'wds':
        _hf_readers_or_skip()
    data = {'wds': ['--dataset', 'wds/digits', '--data-dir', str(wds_shards)],
            'hfids': ['--dataset', _hf_name(hf_shards), '--data-dir', str(tmp_path / 'cache')],
            'hfds': ['--dataset', f'hfds/{hf_shards}', '--data-dir', str(tmp_path / 'cache'), '--no-prefetcher']}[kind]
    extra = ['--views-on-device'] if views == 'device' else []
    if kind != 'hfds':  # a short epoch; a map-style set knows its length and refuses a sample count
        extra += ['--train-num-samples', '100']
    assert train.main([*data, *TINY, *extra, '--epochs', '1', '--output', str(tmp_path), '--experiment', 'x']) == 0
    row, = _summary(tmp_path / 'x')
    assert row['train_loss_cot'] > 0 and 0 <= row['eval_top1'] <= 100 and row['eval_loss'] > 0
    assert (tmp_path / 'x' / 'model.safetensors').is_file()


@pytest.mark.slow
def test_train_refuses_what_streams_cannot_do(wds_shards, tmp_path):
    common = ['--dataset', 'wds/digits', *TINY, '--epochs', '1', '--output', str(tmp_path)]
    for argv, expected in (
            (['--data-dir', str(wds_shards), '--aug-repeats', '3'], '--aug-repeats'),
            (['--data-dir', str(tmp_path / 'nowhere')], '_info.json'),
            (['--data-dir', str(tmp_path)], 'split train not found')):
        with pytest.raises(SystemExit) as e:
            train.main(common + argv)
        assert expected in str(e.value.code), str(e.value.code)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
def test_two_gloo_ranks_split_every_epoch(wds_shards, hf_shards, digits8_folder, tmp_path):
    """torchrun, 2 processes (tests/stream_ddp_worker.py): train.py's loaders give each rank its own shards, every
    sample once per epoch over the ranks, a new order each epoch, different views per member; train.py then trains
    an epoch on wds/ (CPU views) and on hfids/ (views on the device)."""
    _hf_readers_or_skip()
    python_path = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=python_path)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
           str(ROOT / 'tests' / 'stream_ddp_worker.py'), str(tmp_path), str(wds_shards), str(hf_shards),
           str(digits8_folder), str(_free_port()), str(_free_port())]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / 'result.json').read_text())
    everything = collections.Counter(result['folder'])
    assert sum(everything.values()) == 500
    for key in ('wds_cpu', 'wds_device', 'hfids_device'):
        ranks = [r[key] for r in result['ranks']]
        assert [r['batches'] for r in ranks] == [10, 10], key  # 250 samples per rank, batches of 25
        for r in ranks:  # the two views of a sample differ (8x8 pad-crop and flip: 18 draws, ~6 % coincide)
            assert sum(r['equal_views']) / len(r['equal_views']) < 0.2, (key, r['equal_views'])
        if key.endswith('device'):  # the decoded images of every batch were recorded
            for epoch in (0, 1):
                read = [r['epochs'][epoch] for r in ranks]
                assert [len(d) for d in read] == [250, 250], key
                assert collections.Counter(read[0] + read[1]) == everything, (key, epoch)
            assert ranks[0]['epochs'][0] != ranks[0]['epochs'][1], key
    for name in ('wds_ddp', 'hfids_ddp'):
        row, = _summary(tmp_path / name)
        assert row['train_loss_cot'] > 0 and 0 <= row['eval_top1'] <= 100
    assert proc.stdout.count('Final') == 2 and '2 distributed training processes' in proc.stdout + proc.stderr


@pytest.mark.slow
def test_benchmark_data_streamed_beside_the_folder(wds_shards, digits8_folder):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import benchmark
    rows = benchmark.main(['--bench', 'data', '--dataset', 'wds/digits', '--data-dir', str(wds_shards),
                           '--compare-folder', str(digits8_folder / 'train'), '--img-size', '8', '--views', '2',
                           '-b', '25', '-j', '0', '--num-warm-iter', '1', '--num-bench-iter', '2', '--device', 'cpu'])
    assert [r['dataset'] for r in rows] == ['wds/digits', 'folder']
    for row in rows:
        assert row['views'] == 2 and row['crop_mode'] == 'pad'
        assert row['cpu_views_per_sec'] > 0 and row['device_views_per_sec'] > 0
