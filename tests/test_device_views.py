""" Views made on the training device (`timm_splitnet.data.device_views`, `train.py --views-on-device`), on the CPU """
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from timm_splitnet.data import DeviceViewAugment, create_decode_transform

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = dict(mean=(0., 0., 0.), std=(1 / 255,) * 3)  # views in 0..255, unnormalised


def _images(batch_size=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g)


def test_pad_crop_offsets_uniform_and_pixels_match():
    aug = DeviceViewAugment(4, 32, 'pad', padding=4, hflip=0., seed=1, **IDENTITY)
    params = aug.sample_params(5000, (32, 32), 'cpu')
    top, left = params['crop'][:, 0], params['crop'][:, 1]
    for offsets in (top, left):
        assert offsets.min() == 0 and offsets.max() == 8
        counts = torch.bincount(offsets, minlength=9).double()
        expected = offsets.numel() / 9
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 30, chi2  # 8 dof: p ~ 2e-4
        assert abs(offsets.double().mean().item() - 4) < 0.1
    # the pixels are the padded image's window at the drawn offsets
    x = _images(3)
    params = aug.sample_params(3, (32, 32), 'cpu')
    views = aug.apply(x, params)
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4))
    for row in range(views.shape[0]):
        t, left_, h, w = params['crop'][row].tolist()
        ref = padded[params['sample'][row], :, t:t + h, left_:left_ + w]
        assert torch.equal(views[row], ref)


def test_flip_rate_and_pixels():
    aug = DeviceViewAugment(2, 32, 'pad', padding=0, hflip=0.5, seed=2, **IDENTITY)
    params = aug.sample_params(4000, (32, 32), 'cpu')
    assert abs(params['hflip'].double().mean().item() - 0.5) < 0.03
    assert not params['vflip'].any()
    x = _images(4)
    params = aug.sample_params(4, (32, 32), 'cpu')
    views = aug.apply(x, params)
    for row in range(8):
        img = x[params['sample'][row]].float()
        assert torch.equal(views[row], img.flip(-1) if params['hflip'][row] else img)


@pytest.mark.parametrize('crop_mode,re_scale,re_ratio', [('pad', (0.125, 0.2), (0.99, 1.0)),
                                                         ('rrc', (0.02, 1 / 3), (0.3, 1 / 0.3))])
def test_erasing_boxes_follow_the_configuration(crop_mode, re_scale, re_ratio):
    size = 32
    aug = DeviceViewAugment(2, size, crop_mode, re_prob=0.25, re_mode='const', seed=3)
    boxes = aug.sample_params(4000, (size, size), 'cpu')['erase'][:, 0]
    erased = boxes[:, 2] > 0
    assert abs(erased.double().mean().item() - 0.25) < 0.03
    top, left, h, w = boxes[erased].double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= size).all() and (left + w <= size).all()
    # h, w are rounded to pixels: bounds within the rounding of sqrt(area * aspect)
    area = h * w / size ** 2
    slack = 2 * (h + w) / size ** 2
    assert (area >= re_scale[0] - slack).all() and (area <= re_scale[1] + slack).all()
    aspect = h / w
    assert (aspect >= re_ratio[0] * (1 - 1 / h.clamp(min=1)) - 0.05).all()
    assert (aspect <= re_ratio[1] / (1 - 1 / w.clamp(min=2)) + 0.05).all()
    # the erased pixels are zero after normalisation ('const'), the box outside untouched
    aug = DeviceViewAugment(1, size, crop_mode, re_prob=1., re_mode='const', hflip=0., seed=4,
                            scale=(1., 1.), ratio=(1., 1.), padding=0)
    x = _images(4) | 1  # no pixel equals the mean exactly
    params = aug.sample_params(4, (size, size), 'cpu')
    views = aug.apply(x, params)
    for row in range(4):
        t, left_, bh, bw = params['erase'][row, 0].tolist()
        assert bh > 0
        assert (views[row, :, t:t + bh, left_:left_ + bw] == 0).all()
        assert (views[row] == 0).sum() == 3 * bh * bw


def test_rrc_boxes_follow_scale_and_ratio():
    aug = DeviceViewAugment(2, 24, 'rrc', scale=(0.25, 1.0), ratio=(0.75, 4 / 3), seed=5)
    crop = aug.sample_params(3000, (28, 28), 'cpu')['crop'].double()
    top, left, h, w = crop.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    area = h * w / 28 ** 2
    assert area.min() >= 0.25 - 0.08 and area.max() <= 1.0
    assert (h / w).min() >= 0.75 * 0.85 and (h / w).max() <= 4 / 3 / 0.85
    assert area.std() > 0.1  # varied


def test_views_differ_and_seed_reproduces():
    x = _images(6)
    for crop_mode in ('pad', 'rrc'):
        a = DeviceViewAugment(4, 32, crop_mode, re_prob=0.5, re_mode='pixel', seed=7)
        b = DeviceViewAugment(4, 32, crop_mode, re_prob=0.5, re_mode='pixel', seed=7)
        va, vb = a(x), b(x)
        assert va.shape == (24, 3, 32, 32) and va.dtype == torch.float32
        assert torch.equal(va, vb)
        views = va.view(4, 6, 3, 32, 32)
        for i in range(6):
            assert len({views[s, i].sum().item() for s in range(4)}) > 1
        assert not torch.equal(a(x), va)  # the stream moves on
        b.set_epoch(1)
        a.set_epoch(1)
        assert torch.equal(a(x), b(x))
        a.set_epoch(2)
        assert not torch.equal(a(x), b(x))


def test_normalisation_matches_the_cpu_path():
    x = _images(2)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    aug = DeviceViewAugment(1, 32, 'pad', padding=0, hflip=0., mean=mean, std=std)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(aug(x), ref)


def test_decode_transform_and_bad_arguments():
    from PIL import Image
    img = Image.new('RGB', (40, 30), (10, 20, 30))
    assert tuple(create_decode_transform((3, 32, 32), 'pad')(img).shape) == (3, 32, 32)
    out = create_decode_transform((3, 224, 224), 'rrc')(img)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 256, 256)
    with pytest.raises(ValueError, match="crop modes pad and rrc, not 'rkrc'"):
        DeviceViewAugment(2, 32, 'rkrc')
    with pytest.raises(ValueError, match='num_views must be >= 1, got 0'):
        DeviceViewAugment(0, 32)
    with pytest.raises(ValueError, match=r'expected an image batch \[B, C, H, W\], got shape \(3, 32, 32\)'):
        DeviceViewAugment(2, 32)(torch.zeros(3, 32, 32))


def _train_module():
    spec = importlib.util.spec_from_file_location('splitnet_train_device_views', ROOT / 'train.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ['--model', 'splitnet_resnet110_s2', '--model-kwargs', 'layers=(1,1,1)', '-b', '32', '--workers', '0',
        '--device', 'cpu', '--log-interval', '100', '--lr', '0.05', '--checkpoint-hist', '1', '--no-plot']


@pytest.mark.slow
@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)])
def test_train_views_on_device(image_folder, tmp_path, monkeypatch, device):
    """train.py --views-on-device: the training steps get the views made on the device from the decoded images
    (each view a padded crop, maybe flipped, of its own image; the views of an image differ; about half of the views
    erased, each on its own), and the run trains on them. On CUDA with bfloat16 AMP, as a GPU run would."""
    from timm_splitnet.task import CoTrainingTask
    train = _train_module()
    made, trained_on = [], []
    augment, forward = DeviceViewAugment.__call__, CoTrainingTask.forward

    def spy_augment(self, images):
        views = augment(self, images)
        assert images.device.type == views.device.type == device  # made on the training device
        made.append((images.cpu(), views.cpu(), self.mean, self.std))
        return views

    def spy_forward(task, input, target):
        if task.get_trainable_module().training:
            trained_on.append(input.cpu())
        return forward(task, input, target)

    monkeypatch.setattr(DeviceViewAugment, '__call__', spy_augment)
    monkeypatch.setattr(CoTrainingTask, 'forward', spy_forward)
    on_device = ['--device', 'cuda', '--amp', '--amp-dtype', 'bfloat16', '--pin-mem'] if device == 'cuda' else []
    argv = ['--data-dir', str(image_folder), *TINY, *on_device, '--epochs', '1', '--views-on-device', '--reprob',
            '0.5', '--remode', 'const', '--mixup', '0.2', '--output', str(tmp_path), '--experiment', 'dv']
    assert train.main(argv) == 0
    rows = (tmp_path / 'dv' / 'summary.csv').read_text().splitlines()
    header, values = rows[0].split(','), [float(v) for v in rows[1].split(',')]
    summary = dict(zip(header, values))
    assert len(rows) == 2 and math.isfinite(summary['train_loss']) and summary['train_loss_cot'] > 0

    assert len(made) == len(trained_on) == 6  # 200 images, batch 32: every step on the device views
    erased_views, views_total, differing = 0, 0, 0
    for (images, views, mean, std), batch in zip(made, trained_on):
        assert images.dtype == torch.uint8 and images.shape == (32, 3, 32, 32)  # decoded once, not augmented
        assert torch.equal(batch, views) and views.shape == (2 * 32, 3, 32, 32) and views.dtype == torch.float32
        pixels = views * (255 * torch.tensor(std).view(1, 3, 1, 1)) + 255 * torch.tensor(mean).view(1, 3, 1, 1)
        # every crop of the zero-padded image (4 px, offsets 0..8) and its flip: [B, 162, 3, 32, 32]
        padded = torch.nn.functional.pad(images.float(), (4,) * 4)
        crops = padded.unfold(2, 32, 1).unfold(3, 32, 1).permute(0, 2, 3, 1, 4, 5).flatten(1, 2)
        candidates = torch.cat([crops, crops.flip(-1)], dim=1)
        for i in range(32):
            pair = []
            for s in range(2):  # row i + s * B is view s of sample i
                erased = views[i + s * 32].eq(0).all(0)  # 'const' erasing: 0 after normalisation, no data pixel is
                erased_views += bool(erased.any())
                diff = (candidates[i] - pixels[i + s * 32]).abs().masked_fill(erased, 0.).flatten(1).amax(1)
                assert diff.min() < 0.01, f'view {s} of sample {i} is no padded crop / flip of its image'
                pair.append(int(diff.argmin()))
            views_total += 2
            differing += pair[0] != pair[1]
    assert 0.3 < erased_views / views_total < 0.7  # --reprob 0.5, drawn per view
    assert differing > 0.8 * views_total / 2  # each view its own crop and flip

    with pytest.raises(SystemExit) as e:
        train.main(argv[:-2] + ['--experiment', 'aa', '--aa', 'rand-m9-mstd0.5'])
    assert '--views-on-device' in str(e.value.code) and '--aa' in str(e.value.code)


@pytest.mark.slow
def test_benchmark_data_reports_both_paths(image_folder, tmp_path):
    import json
    import sys
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import benchmark
    results = tmp_path / 'data.json'
    rows = benchmark.main(['--bench', 'data', '--views', '2', '-b', '16', '-j', '0', '--num-warm-iter', '1',
                           '--num-bench-iter', '2', '--device', 'cpu', '--data-dir', str(image_folder / 'train'),
                           '--results-file', str(results), '--results-format', 'json'])
    assert len(rows) == 1 and rows[0]['views'] == 2
    assert rows[0]['cpu_views_per_sec'] > 0 and rows[0]['device_views_per_sec'] > 0
    assert json.loads(results.read_text())[0]['device_views_per_sec'] == rows[0]['device_views_per_sec']
    rows = benchmark.main(['--bench', 'data', '--views', '2', '-b', '4', '-j', '0', '--num-warm-iter', '1',
                           '--num-bench-iter', '1', '--device', 'cpu', '--img-size', '96'])  # synthetic, rrc
    assert rows[0]['crop_mode'] == 'rrc' and rows[0]['device_views_per_sec'] > 0


def test_prepare_batch_channels_last_on_cpu():
    from timm_splitnet.utils import prepare_batch
    x = torch.randn(2, 3, 8, 8)
    y = prepare_batch(x, channels_last=True)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    assert prepare_batch(x) is x


@pytest.mark.slow
def test_torchcompile_with_auto_backend_is_refused(image_folder, tmp_path):
    train = _train_module()
    with pytest.raises(SystemExit) as e:
        train.main(['--data-dir', str(image_folder), *TINY, '--epochs', '1', '--split-backend', 'auto',
                    '--torchcompile', '--output', str(tmp_path)])
    assert '--torchcompile' in str(e.value.code) and 'auto' in str(e.value.code)
