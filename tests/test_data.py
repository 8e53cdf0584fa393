import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from timm.data import Mixup, create_loader
from timm.data import auto_augment as timm_auto_augment
from timm.data.auto_augment import AugmentOp

from timm_splitnet.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DigitsDataset,
    MultiViewDataset,
    SkipBadSamples,
    channels_to_views,
    collate_views,
    create_dataset,
    create_eval_transform,
    create_random_erasing,
    create_train_transform,
    mixup_split_batch,
    mixup_views,
    posterize_safe,
    use_safe_posterize,
    views_to_channels,
)
from timm_splitnet.data import transforms as splitnet_transforms

CPU = torch.device('cpu')


def _cifar_train(use_prefetcher=False, **kwargs):
    return create_train_transform(
        (3, 32, 32), 'pad', use_prefetcher=use_prefetcher, mean=CIFAR10_MEAN, std=CIFAR10_STD, **kwargs)


class _CountingTransform:
    """Deterministic transform: a uint8 image filled with the number of calls so far (tracks view order)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, img):
        out = torch.full((3, 32, 32), self.calls % 256, dtype=torch.uint8)
        self.calls += 1
        return out


# --- multi-view data set, collation, layout --------------------------------------------------------------------


def test_views_are_independent(image_folder):
    torch.manual_seed(0)
    ds = MultiViewDataset(create_dataset('', root=str(image_folder), split='train'), num_views=2)
    ds.transform = _cifar_train()
    for i in range(5):
        (v0, v1), target = ds[i]
        assert v0.shape == (3, 32, 32) and v0.dtype == torch.float32
        assert not torch.equal(v0, v1), f'views of sample {i} are identical'
        assert target == ds.dataset[i][1]


def test_same_view_repeats_one_view(image_folder):
    ds = MultiViewDataset(create_dataset('', root=str(image_folder), split='train'), num_views=3, same_view=True)
    ds.transform = _cifar_train(auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.5)
    views, _ = ds[0]
    assert len(views) == 3 and all(torch.equal(views[0], v) for v in views[1:])


def test_transform_setter_rejects_split_transforms(image_folder):
    ds = MultiViewDataset(create_dataset('', root=str(image_folder), split='train'), num_views=2)
    with pytest.raises(TypeError, match='num_aug_splits'):
        ds.transform = (None, None, None)


@pytest.mark.parametrize('use_prefetcher', [True, False])
def test_loader_layout_is_split_major(image_folder, use_prefetcher):
    num_views, batch_size = 2, 4
    ds = MultiViewDataset(create_dataset('', root=str(image_folder), split='validation'), num_views=num_views)
    loader = create_loader(
        ds, (3, 32, 32), batch_size, is_training=False, use_prefetcher=use_prefetcher, device=CPU, num_workers=0,
        collate_fn=None if use_prefetcher else collate_views, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    ds.transform = _CountingTransform()  # replaces the transform create_loader built, as train.py does for 'pad'
    x, y = next(iter(loader))
    assert x.shape == (num_views * batch_size, 3, 32, 32)
    assert y.shape == (num_views * batch_size,)
    expected_targets = torch.tensor([ds.dataset[i][1] for i in range(batch_size)])
    assert torch.equal(y, expected_targets.repeat(num_views))
    # the transform ran for sample 0 view 0, sample 0 view 1, sample 1 view 0, ...: call 2 * i + s is view s of i
    calls = x[:, 0, 0, 0] if not use_prefetcher else None
    if use_prefetcher:  # undo the prefetcher's normalization
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) * 255
        calls = (x * std + mean)[:, 0, 0, 0].round()
    expected_calls = torch.tensor([2. * i + s for s in range(num_views) for i in range(batch_size)])
    torch.testing.assert_close(calls.float(), expected_calls)
    xc = views_to_channels(x, num_views)
    assert xc.shape == (batch_size, num_views * 3, 32, 32)
    for s in range(num_views):
        assert torch.equal(xc[:, 3 * s:3 * (s + 1)], x[s * batch_size:(s + 1) * batch_size])
    assert torch.equal(channels_to_views(xc, num_views), x)


@pytest.mark.parametrize('use_prefetcher', [True, False])
def test_train_loader_shapes_with_real_transform(image_folder, use_prefetcher):
    num_views, batch_size = 3, 4
    ds = MultiViewDataset(create_dataset('', root=str(image_folder), split='train'), num_views=num_views)
    loader = create_loader(
        ds, (3, 32, 32), batch_size, is_training=True, use_prefetcher=use_prefetcher, device=CPU,
        num_workers=1 if use_prefetcher else 0, collate_fn=None if use_prefetcher else collate_views,
        mean=CIFAR10_MEAN, std=CIFAR10_STD, re_prob=0.25)
    ds.transform = _cifar_train(use_prefetcher, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25)
    x, y = next(iter(loader))
    assert x.shape == (num_views * batch_size, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(y[:batch_size], y[batch_size:2 * batch_size])
    assert views_to_channels(x, num_views).shape == (batch_size, num_views * 3, 32, 32)


def test_collate_views_dense_targets():
    batch = [((torch.zeros(3, 2, 2) + i, torch.ones(3, 2, 2) * 10 + i), torch.tensor([i, -i])) for i in range(3)]
    x, y = collate_views(batch)
    assert x[:, 0, 0, 0].tolist() == [0, 1, 2, 10, 11, 12]
    assert y.tolist() == [[0, 0], [1, -1], [2, -2]] * 2


# --- mixup ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('mixup_kwargs', [
    dict(mixup_alpha=0.2, cutmix_alpha=0.),
    dict(mixup_alpha=0., cutmix_alpha=1.),
    dict(mixup_alpha=0.8, cutmix_alpha=1., mode='elem'),
    dict(mixup_alpha=0.8, cutmix_alpha=1., mode='pair'),
])
def test_mixup_views_shares_lambda_partner_and_box(mixup_kwargs):
    num_views, batch_size, num_classes = 3, 6, 5
    mixup_fn = Mixup(label_smoothing=0.1, num_classes=num_classes, **mixup_kwargs)
    torch.manual_seed(0)
    x = torch.randn(num_views * batch_size, 3, 8, 8)
    target = torch.randint(0, num_classes, (batch_size,))
    np.random.seed(0)
    mixed, soft = mixup_split_batch(mixup_fn, x.clone(), target.repeat(num_views), num_views)
    assert mixed.shape == x.shape and soft.shape == (batch_size, num_classes)
    assert not torch.equal(mixed, x)
    for s in range(num_views):
        view = x[s * batch_size:(s + 1) * batch_size].clone()
        np.random.seed(0)  # the same draws: lambda, partner and box of view s mixed on its own
        expected, expected_target = mixup_fn(view, target)
        torch.testing.assert_close(mixed[s * batch_size:(s + 1) * batch_size], expected)
        torch.testing.assert_close(soft, expected_target)


def test_mixup_views_odd_batch():
    mixup_fn = Mixup(mixup_alpha=1., label_smoothing=0.1, num_classes=4)
    x = torch.randn(5, 6, 4, 4)
    target = torch.tensor([0, 1, 2, 3, 1])
    last = x[-1].clone()
    mixed, soft = mixup_views(mixup_fn, x, target)
    assert mixed.shape == (5, 6, 4, 4) and soft.shape == (5, 4)
    assert torch.equal(mixed[-1], last)
    torch.testing.assert_close(soft[-1], torch.tensor([0.025, 0.925, 0.025, 0.025]))
    torch.testing.assert_close(soft.sum(-1), torch.ones(5))


def test_mixup_views_rejects_repeated_targets():
    with pytest.raises(ValueError, match=r'target\[:B\]'):
        mixup_views(Mixup(num_classes=4), torch.randn(4, 6, 2, 2), torch.zeros(8, dtype=torch.long))


# --- transforms -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('aa', [None, 'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'original', 'v0', 'cifar10'])
def test_cifar_train_transform(aa):
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    out = _cifar_train(auto_augment=aa, re_prob=0.5)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    out = _cifar_train(use_prefetcher=True, auto_augment=aa, re_prob=0.5)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_eval_transforms():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    cifar = create_eval_transform((3, 32, 32), 'pad', mean=CIFAR10_MEAN, std=CIFAR10_STD)(img)
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255. - torch.tensor(CIFAR10_MEAN)[:, None, None])
    torch.testing.assert_close(cifar, expected / torch.tensor(CIFAR10_STD)[:, None, None])
    assert create_eval_transform((3, 32, 32), 'pad', use_prefetcher=True)(img).dtype == torch.uint8
    assert create_eval_transform((3, 24, 24), None, crop_pct=0.875)(img).shape == (3, 24, 24)


def test_imagenet_pipeline_and_torchvision_policy():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 40, 3), dtype=np.uint8))
    for aa in (None, 'rand-m9-mstd0.5-inc1', 'cifar10'):
        t = create_train_transform((3, 32, 32), None, auto_augment=aa, re_prob=0.25, scale=(0.1, 1.), color_jitter=0.4)
        assert t(img).shape == (3, 32, 32)
    t = create_train_transform((3, 32, 32), 'rrc', auto_augment='cifar10', use_prefetcher=True)
    assert t(img).dtype == torch.uint8 and t(img).shape == (3, 32, 32)
    assert not any('ColorJitter' in repr(tt) for tt in t.transforms)


def test_random_erasing_uses_cifar_box():
    random.seed(0)
    erase = create_random_erasing(1.0)
    for _ in range(20):
        x = erase(torch.ones(3, 32, 32))
        fraction = (x[0] == 0).float().mean().item()
        assert 0.1 <= fraction <= 0.23
        assert torch.equal(x[0] == 0, x[1] == 0)  # the same box in every channel, value 0 (= the mean)


def test_rand_augment_inc1_posterize_never_raises():
    # cause: PosterizeIncreasing keeps 4 - int(m / 10 * 4) bits, 0 at the clamped magnitude 10 (m9, mstd0.5 reaches
    # it in ~2.3% of the calls), and Pillow >= 13 rejects 0 bits
    assert timm_auto_augment._posterize_increasing_level_to_arg(10., {}) == (0,)
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    if int(PIL.__version__.split('.')[0]) >= 13:
        with pytest.raises(ValueError):
            PIL.ImageOps.posterize(img, 0)
    assert np.asarray(posterize_safe(img, 0)).max() == 0  # Pillow < 13's (and TF's) result: all bits cleared
    assert np.array_equal(np.asarray(posterize_safe(img, 3)), np.asarray(PIL.ImageOps.posterize(img, 3)))
    op = use_safe_posterize(AugmentOp('PosterizeIncreasing', prob=1., magnitude=10.))
    assert op(img).getextrema() == ((0, 0),) * 3

    # the fix lives in the built transform's ops: count the 0-bit calls there
    random.seed(1)
    np.random.seed(1)  # RandAugment picks its ops with np.random
    rng = np.random.RandomState(1)
    transform = splitnet_transforms.create_auto_augment('rand-m9-mstd0.5-inc1', 32)
    posterize_ops = [op for op in transform.ops if op.name in splitnet_transforms.POSTERIZE_OPS]
    assert posterize_ops and all(op.aug_fn is posterize_safe for op in posterize_ops)
    zero_bit_calls = []

    def counting_posterize(img, bits_to_keep, **kwargs):
        zero_bit_calls.append(bits_to_keep == 0)
        return posterize_safe(img, bits_to_keep, **kwargs)

    for op in posterize_ops:
        op.aug_fn = counting_posterize
    for _ in range(1500):
        transform(Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)))
    assert sum(zero_bit_calls) > 0  # the crashing case was exercised


@pytest.mark.parametrize('aa', ['rand-m9-mstd0.5-inc1', 'rand-m1', 'augmix-m5-w4-d2', 'original', 'v0'])
@pytest.mark.parametrize('crop_mode', ['pad', 'rrc'])
def test_every_built_auto_augment_posterizes_safely(aa, crop_mode):
    # timm's own pipeline (create_transform, 'rrc') and ours ('pad') get the fix on their own ops
    transform = create_train_transform((3, 32, 32), crop_mode, auto_augment=aa)
    ops = []

    def collect(t):
        if isinstance(t, AugmentOp):
            ops.append(t)
        for child in (t if isinstance(t, (list, tuple)) else
                      [getattr(t, a) for a in ('transforms', 'ops', 'policy') if hasattr(t, a)]):
            collect(child)

    collect(transform)
    posterize_ops = [op for op in ops if op.name in splitnet_transforms.POSTERIZE_OPS]
    assert ops and posterize_ops and all(op.aug_fn is posterize_safe for op in posterize_ops)
    assert all(timm_auto_augment.NAME_TO_OP[n] is not posterize_safe for n in splitnet_transforms.POSTERIZE_OPS)
    img = Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8))
    for op in posterize_ops:
        for magnitude in (0., 10.):
            op.magnitude, op.prob, op.magnitude_std = magnitude, 1., 0.
            op(img)


def test_import_leaves_timm_tables_untouched():
    code = (
        'import timm.data.auto_augment as a; before = dict(a.NAME_TO_OP); levels = dict(a.LEVEL_TO_ARG); '
        'import timm_splitnet; assert a.NAME_TO_OP == before and a.LEVEL_TO_ARG == levels, "timm patched"')
    subprocess.run([sys.executable, '-c', code], check=True, env=dict(os.environ, OMP_NUM_THREADS='1'))


# --- data sets --------------------------------------------------------------------------------------------------


def _small_copy(image_folder: Path, dst: Path, classes=('0', '1')) -> Path:
    for cls in classes:
        shutil.copytree(image_folder / 'train' / cls, dst / 'train' / cls)
    return dst


def test_bad_images_are_skipped_with_warning(image_folder, tmp_path, caplog):
    root = _small_copy(image_folder, tmp_path)
    good = sorted((root / 'train' / '0').glob('*.jpg'))[0].read_bytes()
    truncated = root / 'train' / '0' / '0000_truncated.jpg'  # header intact: opens, fails only when decoded
    truncated.write_bytes(good[:int(len(good) * 0.8)])
    garbage = root / 'train' / '1' / '0000_garbage.jpg'
    garbage.write_bytes(b'this is not an image' * 10)

    ds = create_dataset('', root=str(root), split='train')
    assert isinstance(ds, SkipBadSamples) and len(ds) == 42
    names = [Path(n).name for n in ds.filenames()]
    bad_idx = [names.index('0000_truncated.jpg'), names.index('0000_garbage.jpg')]
    with caplog.at_level(logging.WARNING):
        samples = [ds[i] for i in range(len(ds))]
        again = ds[bad_idx[0]]  # known bad: skipped without a second warning
    assert ds.bad_samples == 2 and ds.num_seen == 42
    warnings = [r.getMessage() for r in caplog.records if 'unreadable image' in r.getMessage()]
    assert len(warnings) == 2
    assert any(str(truncated) in w for w in warnings) and any(str(garbage) in w for w in warnings)
    for i in bad_idx:  # replaced by the next good sample
        assert samples[i][1] == samples[i + 1][1]
        assert np.array_equal(np.asarray(samples[i][0]), np.asarray(samples[i + 1][0]))
    assert np.array_equal(np.asarray(again[0]), np.asarray(samples[bad_idx[0]][0]))

    # through a multi-view loader, transforms assigned by create_loader
    mv = MultiViewDataset(ds, num_views=2)
    loader = create_loader(mv, (3, 32, 32), 6, is_training=True, use_prefetcher=True, device=CPU, num_workers=0)
    assert sum(x.shape[0] for x, _ in loader) == 2 * 6 * (42 // 6)


def test_too_many_bad_images_raise(image_folder, tmp_path):
    root = _small_copy(image_folder, tmp_path, classes=('0',))
    for i in range(3):
        (root / 'train' / '0' / f'broken_{i}.jpg').write_bytes(b'\x00' * 64)
    ds = create_dataset('', root=str(root), split='train', skip_bad_samples=False)
    guarded = SkipBadSamples(ds, max_bad_fraction=0.05, min_samples=10)
    with pytest.raises(RuntimeError, match='broken_'):
        for i in range(len(guarded)):
            guarded[i]


def test_missing_and_empty_data_dirs(tmp_path):
    missing = tmp_path / 'nope'
    with pytest.raises(FileNotFoundError, match='root/train/<class>') as e:
        create_dataset('', root=str(missing), split='train')
    assert str(missing) in str(e.value)
    empty = tmp_path / 'empty'
    (empty / 'train' / 'cat').mkdir(parents=True)
    (empty / 'train' / 'cat' / 'notes.txt').write_text('no images here')
    with pytest.raises(FileNotFoundError, match='No image files') as e:
        create_dataset('', root=str(empty), split='train')
    assert str(empty / 'train') in str(e.value)
    # a missing split next to other split folders is an error, not a silent read of the whole root
    with pytest.raises(FileNotFoundError, match="split 'validation'"):
        create_dataset('', root=str(empty), split='validation')


def test_image_folder_splits(image_folder):
    train = create_dataset('', root=str(image_folder), split='train')
    val = create_dataset('', root=str(image_folder), split='validation')
    assert len(train) == 200 and len(val) == 100
    assert len(set(train.reader.class_to_idx)) == 10
    img, target = val[0]
    assert img.size == (32, 32) and img.mode == 'RGB' and 0 <= target < 10
    # class folders '0'..'9' map to the digit labels; the grayscale JPEG (last of each class) is read as RGB
    assert train.reader.class_to_idx == {str(c): c for c in range(10)}
    names = [Path(n).name for n in train.filenames()]
    gray_file = sorted((image_folder / 'train' / '0').glob('*.jpg'))[-1]
    assert Image.open(gray_file).mode == 'L'
    gray, gray_target = train[names.index(gray_file.name)]
    assert gray.mode == 'RGB' and gray_target == 0
    assert np.array_equal(np.asarray(gray)[..., 0], np.asarray(gray)[..., 2])


def test_digits_dataset():
    train = create_dataset('sklearn/digits', split='train')
    val = create_dataset('sklearn/digits', split='validation')
    assert isinstance(train, DigitsDataset)
    assert len(train) == 1437 and len(val) == 360 and len(train) + len(val) == 1797
    assert train.classes == [str(c) for c in range(10)]
    assert set(train.indices).isdisjoint(val.indices)
    val_counts = np.bincount(val.targets, minlength=10)
    assert val_counts.min() >= 35 and val_counts.max() <= 37  # stratified 20% of ~180 per class
    img, target = train[0]
    assert img.size == (32, 32) and img.mode == 'RGB' and isinstance(target, int)
    again = create_dataset('sklearn/digits', split='val')
    assert np.array_equal(again.indices, val.indices) and np.array_equal(again.images, val.images)
    # CIFAR pipelines apply
    val.transform = create_eval_transform((3, 32, 32), 'pad')
    assert val[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match='split'):
        DigitsDataset(split='test')
    with pytest.raises(ValueError, match='sklearn/digits'):
        create_dataset('sklearn/iris', split='train')
