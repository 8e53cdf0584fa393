"""validate.py on the digits image folder (`image_folder`: scikit-learn's digits as 32x32 JPEGs, tests/conftest.py),
on the CPU: checkpoints, metrics of members and ensemble manners, errors."""
import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import timm
import timm_splitnet
from timm.data import create_dataset, create_loader, resolve_data_config
from timm_splitnet import save_safetensors

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repo-root scripts

import validate  # noqa: E402


MODEL = 'splitnet_resnet110_s2'
# one bottleneck per stage and a 10-class head: the real SplitNet code path at a fraction of the cost
TINY = {'layers': (1, 1, 1), 'num_classes': 10}
TINY_ARGS = ['--model-kwargs', 'layers=(1,1,1)', '--num-classes', '10']
MANNERS = ('mean', 'max', 'softmax_mean', 'softmax_max')


@pytest.fixture(autouse=True, scope='module')
def one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads, and the concurrent runner adds host threads of its own."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def tiny_model(name: str = MODEL, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(TINY, **kwargs)).eval()


def run_validate(data, *extra, model=MODEL, tiny=True):
    argv = [str(data), '--model', model, '-b', '50', '-j', '0', '--device', 'cpu', '--log-freq', '0']
    return validate.main(argv + (TINY_ARGS if tiny else []) + list(extra))


@pytest.fixture(scope='module')
def tiny_weights(tmp_path_factory):
    """A tiny splitnet_resnet110_s2 saved as .safetensors and as a timm .pth.tar (weights under state_dict_ema)."""
    root = tmp_path_factory.mktemp('weights')
    model = tiny_model(seed=1)
    safetensors_path = root / 'model.safetensors'
    save_safetensors(model, str(safetensors_path))
    other = tiny_model(seed=2)
    pth_path = root / 'checkpoint.pth.tar'
    torch.save({
        'epoch': 3, 'arch': MODEL, 'state_dict': {f'module.{k}': v for k, v in other.state_dict().items()},
        'state_dict_ema': model.state_dict()}, pth_path)
    return model, safetensors_path, pth_path


# ----- the metric itself -----

def hand_topk(scores: torch.Tensor, target: torch.Tensor, k: int) -> float:
    hits = 0
    for row, t in zip(scores.tolist(), target.tolist()):
        ranked = sorted(range(len(row)), key=lambda c: -row[c])
        hits += t in ranked[:k]
    return 100. * hits / len(target)


def test_split_accuracies_match_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 64, 7) * 3
    target = torch.randint(0, 7, (64,))
    accs = validate.split_accuracies(logits, target)
    for i in range(3):
        assert accs[f'member{i}'][0] == pytest.approx(hand_topk(logits[i], target, 1))
        assert accs[f'member{i}'][1] == pytest.approx(hand_topk(logits[i], target, 5))
    probs = logits.softmax(-1)
    hand = {
        'mean': logits.mean(0), 'max': logits.max(0).values,
        'softmax_mean': probs.mean(0), 'softmax_max': probs.max(0).values}
    for manner, scores in hand.items():
        assert accs[f'ens_{manner}'][0] == pytest.approx(hand_topk(scores, target, 1)), manner
        assert accs[f'ens_{manner}'][1] == pytest.approx(hand_topk(scores, target, 5)), manner
    # the manners are the model's own ensembles (SplitNet.combine)
    model = tiny_model()
    for manner, (reduce, softmax) in validate.ENSEMBLE_MANNERS.items():
        model.set_ensemble(reduce, softmax)
        torch.testing.assert_close(validate.ensemble_output(logits, manner), model.combine(logits))
    # with fewer than 5 classes top-5 is capped at C (every prediction is a hit)
    assert validate.split_accuracies(logits[..., :3], target.clamp(max=2))['member0'][1] == 100.


def test_device_meters_equal_per_batch_average_meters():
    """validate.py sums on the device and reads once per log interval: the meters hold exactly what per-batch
    `AverageMeter.update(tensor.item(), n)` gives (values at log lines and at the end unchanged)."""
    from timm.utils import AverageMeter
    g = torch.Generator().manual_seed(0)
    ref = [AverageMeter() for _ in range(3)]
    meters = [AverageMeter() for _ in range(3)]
    device_meters = validate.DeviceMeters(meters, torch.device('cpu'))
    for step in range(7):
        values = (torch.rand(3, generator=g) * 100).float()
        n = int(torch.randint(1, 65, (1,), generator=g))
        for meter, v in zip(ref, values):
            meter.update(v.item(), n)
        device_meters.update(values, n)
        if step % 3 == 0 or step == 6:
            device_meters.sync()
            for meter, r in zip(meters, ref):
                assert (meter.val, meter.sum, meter.count, meter.avg) == (r.val, r.sum, r.count, r.avg)


# ----- end to end on the digits image folder -----

@pytest.fixture(scope='module')
def sequential_run(image_folder, tiny_weights, tmp_path_factory):
    """validate.py of the tiny .safetensors weights (sequential members), and its JSON results file."""
    _, safetensors_path, _ = tiny_weights
    out = tmp_path_factory.mktemp('results') / 'results.json'
    results = run_validate(
        image_folder, '--checkpoint', str(safetensors_path), '--results-file', str(out), '--results-format', 'json')
    return results, out


def test_validate_safetensors_metrics(image_folder, tiny_weights, sequential_run):
    model = tiny_weights[0]
    results, out = sequential_run
    assert len(results) == 1
    r = results[0]
    assert json.loads(out.read_text()) == [dict(r)]
    for key in ('top1', 'top5', 'top1_err', 'top5_err', 'loss', 'param_count', 'gmacs', 'samples_per_sec',
                'img_size', 'crop_pct', 'interpolation', 'split_factor', 'split_backend', 'member_avg_top1'):
        assert key in r, key
    assert r['model'] == MODEL and r['split_factor'] == 2 and r['split_mode'] == 'sequential'
    assert r['num_images'] == 100 and r['img_size'] == 32 and r['ensemble'] == 'mean'
    assert r['param_count'] == pytest.approx(timm_splitnet.count_params(model) / 1e6, abs=1e-4)
    assert r['gmacs'] == pytest.approx(timm_splitnet.count_macs(model, (3, 32, 32)) / 1e9, abs=1e-4)
    for name in [f'ens_{m}' for m in MANNERS] + ['member0', 'member1']:
        assert 0 <= r[f'{name}_top1'] <= r[f'{name}_top5'] <= 100, name
    assert (r['top1'], r['top5']) == (r['ens_mean_top1'], r['ens_mean_top5'])

    # independent computation from the same images: timm's loader + the loaded model's member logits
    config = resolve_data_config({}, model=model)
    loader = create_loader(
        create_dataset('', root=str(image_folder), split='validation'), config['input_size'], 100,
        interpolation=config['interpolation'], mean=config['mean'], std=config['std'], crop_pct=config['crop_pct'],
        num_workers=0, device=torch.device('cpu'))
    images, target = next(iter(loader))
    with torch.inference_mode():
        logits = model.forward_members(images)
    probs = logits.softmax(-1)
    hand = {'mean': logits.mean(0), 'max': logits.max(0).values, 'softmax_mean': probs.mean(0),
            'softmax_max': probs.max(0).values, 'member0': logits[0], 'member1': logits[1]}
    for name, scores in hand.items():
        key = name if name.startswith('member') else f'ens_{name}'
        assert r[f'{key}_top1'] == pytest.approx(hand_topk(scores, target, 1), abs=1e-3), name
        assert r[f'{key}_top5'] == pytest.approx(hand_topk(scores, target, 5), abs=1e-3), name
    assert r['loss'] == pytest.approx(F.cross_entropy(logits.mean(0), target).item(), abs=1e-3)

    # calibration and diversity, from the same logits by their definitions (15 bins of the top-1 confidence)
    logits, probs = logits.double(), probs.double()
    top = probs.amax(0)
    distributions = {
        'ens_mean': logits.mean(0).softmax(-1), 'ens_max': logits.amax(0).softmax(-1),
        'ens_softmax_mean': probs.mean(0), 'ens_softmax_max': top / top.sum(-1, keepdim=True),
        'member0': probs[0], 'member1': probs[1]}
    for name, p in distributions.items():
        for key, value in hand_calibration(p, target).items():
            assert r[f'{name}_{key}'] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, key)
    for key in ('nll', 'brier', 'ece'):
        assert r[key] == r[f'ens_mean_{key}'], key  # the configured manner
    assert r['nll'] == pytest.approx(r['loss'], abs=1e-3)
    assert r['disagreement'] == pytest.approx((logits[0].argmax(-1) != logits[1].argmax(-1)).double().mean().item())
    kl01 = (probs[0] * (probs[0].log() - probs[1].log())).sum(-1).mean().item()
    kl10 = (probs[1] * (probs[1].log() - probs[0].log())).sum(-1).mean().item()
    assert r['pairwise_kl'] == pytest.approx((kl01 + kl10) / 2, rel=1e-4)


def hand_calibration(probs: torch.Tensor, target: torch.Tensor, num_bins: int = 15) -> dict:
    """NLL, Brier score and ECE (equal-width bins of the top-1 confidence) of probabilities [N, C]."""
    conf, pred = probs.max(-1)
    correct = (pred == target).double()
    gaps = [(correct[in_bin].sum() - conf[in_bin].sum()).abs().item()
            for b in range(num_bins) for in_bin in [(conf > b / num_bins) & (conf <= (b + 1) / num_bins)]]
    return {
        'nll': -probs[torch.arange(len(target)), target].log().mean().item(),
        'brier': (probs - F.one_hot(target, probs.shape[-1])).square().sum(-1).mean().item(),
        'ece': sum(gaps) / len(target)}


def test_validate_calibration_keys_and_reliability_plot(image_folder, tmp_path):
    """`validate.py DATA --model splitnet_resnet110_s2 --num-classes 10 --results-format json --results-file r.json
    --reliability-plot rel.png`: the calibration and diversity keys, and a PNG reliability diagram."""
    results_file, png = tmp_path / 'r.json', tmp_path / 'rel.png'
    r = validate.main([
        str(image_folder), '--model', MODEL, '--num-classes', '10', '--results-format', 'json',
        '--results-file', str(results_file), '--reliability-plot', str(png), '-j', '0', '--device', 'cpu',
        '--log-freq', '0'])[0]
    assert json.loads(results_file.read_text()) == [dict(r)]
    calibration = ('nll', 'brier', 'ece')
    keys = [*calibration, 'disagreement', 'pairwise_kl'] + [
        f'{name}_{k}' for name in [f'ens_{m}' for m in MANNERS] + ['member0', 'member1'] for k in calibration]
    for key in keys:
        assert isinstance(r[key], float) and r[key] >= 0, key
        if key.endswith('ece') or key == 'disagreement':
            assert r[key] <= 1, key
        if key.endswith('brier'):
            assert r[key] <= 2, key
    assert r['reliability_plot'] == str(png)
    with Image.open(png) as image:
        assert image.format == 'PNG' and image.size[0] > 200 and image.size[1] > 200


def test_validate_concurrent_same_accuracies(image_folder, tiny_weights, sequential_run):
    """Members on two CPU "devices" in two threads: the sequential run's accuracies; --ensemble picks top1."""
    r = sequential_run[0][0]
    c = run_validate(  # the weights through timm's pretrained path this time
        image_folder, '--pretrained-path', str(tiny_weights[1]), '--devices', 'cpu,cpu', '--ensemble', 'softmax_max')[0]
    assert c['split_mode'] == 'concurrent' and c['device'] == 'cpu,cpu' and c['ensemble'] == 'softmax_max'
    assert 'ens_mean_top1' not in c
    assert (c['top1'], c['top5']) == (c['ens_softmax_max_top1'], c['ens_softmax_max_top5'])
    for key in ('ens_softmax_max_top1', 'ens_softmax_max_top5', 'member0_top1', 'member0_top5', 'member1_top1',
                'member1_top5'):
        assert c[key] == pytest.approx(r[key], abs=1e-3), key
    assert 'ens_mean_nll' not in c and (c['nll'], c['ece']) == (c['ens_softmax_max_nll'], c['ens_softmax_max_ece'])
    for key in ('ens_softmax_max_nll', 'ens_softmax_max_brier', 'ens_softmax_max_ece', 'member0_nll', 'member1_ece',
                'disagreement', 'pairwise_kl'):
        assert c[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5), key


def test_validate_pth_tar_ema(image_folder, tiny_weights, sequential_run, tmp_path):
    """A timm train checkpoint (DDP 'module.' keys, EMA weights) through timm's load_checkpoint; CSV results."""
    r = sequential_run[0][0]
    out = tmp_path / 'results.csv'
    ema = run_validate(image_folder, '--checkpoint', str(tiny_weights[2]), '--use-ema', '--results-file', str(out))[0]
    for key in r:
        if key.endswith(('top1', 'top5')) or key == 'loss':
            assert ema[key] == pytest.approx(r[key], abs=1e-3), key
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]['model'] == MODEL and float(rows[0]['top1']) == pytest.approx(ema['top1'])


def test_validate_model_list_csv(image_folder, tmp_path):
    out = tmp_path / 'results.csv'
    results = validate.main([
        '--data-dir', str(image_folder), '--model-list', 'splitnet_resnet110_s1,splitnet_resnet110_s4',
        '-b', '100', '-j', '0', '--device', 'cpu', '--log-freq', '0', '--results-file', str(out),
        '--reliability-plot', str(tmp_path / 'rel.png')] + TINY_ARGS)
    assert [r['model'] for r in results] == ['splitnet_resnet110_s1', 'splitnet_resnet110_s4']
    rows = list(csv.DictReader(out.open()))
    assert [r['model'] for r in rows] == ['splitnet_resnet110_s1', 'splitnet_resnet110_s4']
    assert rows[1]['member3_top1'] != '' and rows[0].get('member3_top1', '') == ''
    # one member: calibration, no diversity
    assert rows[0]['member0_ece'] != '' and rows[0].get('disagreement', '') == '' and rows[1]['disagreement'] != ''
    # several models: one reliability diagram each
    for name in ('splitnet_resnet110_s1', 'splitnet_resnet110_s4'):
        assert (tmp_path / f'rel-{name}.png').is_file(), name


def test_validate_plain_timm_model(image_folder):
    r = run_validate(image_folder, '--num-classes', '10', '--img-size', '32', model='resnet18', tiny=False)[0]
    assert r['model'] == 'resnet18' and 0 <= r['top1'] <= r['top5'] <= 100
    assert not any(k.startswith(('member', 'ens_', 'split_')) for k in r)
    assert 'disagreement' not in r and 'pairwise_kl' not in r
    assert r['nll'] == pytest.approx(r['loss'], abs=1e-3) and 0 <= r['ece'] <= 1 and 0 <= r['brier'] <= 2
    assert r['param_count'] == pytest.approx(11.18, abs=0.01) and r['img_size'] == 32


# ----- bad input: one clear message, no traceback -----

def expect_error(argv, *fragments):
    with pytest.raises(SystemExit) as e:
        validate.main(argv)
    message = str(e.value.code)
    assert message.startswith('validate.py: error:'), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_validate_bad_inputs(image_folder, tiny_weights, tmp_path):
    _, safetensors_path, _ = tiny_weights
    base = [str(image_folder), '-j', '0', '--device', 'cpu'] + TINY_ARGS
    expect_error(base + ['--model', 'splitnet_resnet11_s2'], 'unknown model', 'splitnet_resnet110_s2')
    expect_error([str(image_folder), '--model', 'resnet18', '--device', 'tpu'], 'tpu')
    expect_error([str(image_folder), '--model', 'resnet18', '--device', 'cuda:99'], 'cuda:99')
    expect_error(base + ['--model', MODEL, '--devices', 'cpu,cuda:99'], 'cuda:99')
    expect_error(base + ['--model', MODEL, '--split-backend', 'auto', '--torchcompile', 'eager'],
                 '--torchcompile with --split-backend auto')
    expect_error([str(tmp_path / 'missing'), '--model', MODEL] + TINY_ARGS, 'data dir not found')
    expect_error(base + ['--model', MODEL, '--split', 'test'], "split 'test' not found", 'train, validation')
    expect_error(base + ['--model', MODEL, '--checkpoint', str(tmp_path / 'nope.pth.tar')], 'not found')
    # weights of another S (safetensors) and of another architecture (.pth.tar)
    s4 = tiny_model('splitnet_resnet110_s4')
    s4_path = tmp_path / 's4.safetensors'
    save_safetensors(s4, str(s4_path))
    expect_error(base + ['--model', MODEL, '--checkpoint', str(s4_path)], 'splitnet_resnet110_s4', 'S=4')
    expect_error(base + ['--model', MODEL, '--pretrained-path', str(s4_path)], 'splitnet_resnet110_s4')
    r18_path = tmp_path / 'resnet18.pth.tar'
    torch.save({'state_dict': timm.create_model('resnet18', num_classes=100).state_dict()}, r18_path)
    expect_error(base + ['--model', MODEL, '--checkpoint', str(r18_path)], 'do not fit')
    # a SplitNet checkpoint loaded into a plain timm model: torch's message, shortened
    expect_error([str(image_folder), '-j', '0', '--device', 'cpu', '--model', 'resnet18', '--checkpoint',
                        str(safetensors_path)], 'could not load')


def test_validate_bundled_digits_and_datasets_that_need_a_folder():
    """sklearn/digits needs no folder (the README's main job validates); torch/ data sets say what is missing."""
    results = validate.main(['--dataset', 'sklearn/digits', '--model', MODEL, '--img-size', '8', '-b', '120', '-j', '0',
                             '--device', 'cpu', '--log-freq', '0'] + TINY_ARGS)
    assert results[0]['num_images'] == 360  # the 20 % held-out split train.py evaluates on
    assert 0 <= results[0]['top1'] <= 100 and results[0]['nll'] > 0
    expect_error(['--dataset', 'torch/cifar10', '--model', MODEL] + TINY_ARGS, "'torch/cifar10' needs", '--data-dir')


# ----- the weights and the input a run was trained with (issue 18) -----

def _metrics(row):
    return {k: v for k, v in row.items() if k.endswith(('top1', 'top5', '_nll')) or k in ('loss', 'nll', 'brier')}


def test_pretrained_path_evaluates_the_files_classifier(image_folder, tmp_path):
    """--pretrained-path of a train.py checkpoint with a 10-class head evaluates that head, as --checkpoint does;
    a class count that would leave the classifier random stops the run and names the flag."""
    model = tiny_model(seed=3)
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 1, 'arch': MODEL, 'state_dict': model.state_dict(), 'optimizer': {}}, path)
    by_checkpoint = run_validate(image_folder, '--checkpoint', str(path))[0]
    by_pretrained = run_validate(image_folder, '--pretrained-path', str(path))[0]
    assert _metrics(by_pretrained) == _metrics(by_checkpoint)
    without_num_classes = validate.main([str(image_folder), '--model', MODEL, '-b', '50', '-j', '0', '--device', 'cpu',
                                         '--log-freq', '0', '--model-kwargs', 'layers=(1,1,1)',
                                         '--pretrained-path', str(path)])[0]
    assert _metrics(without_num_classes) == _metrics(by_checkpoint)  # the file says 10 classes
    base = [str(image_folder), '--model', MODEL, '-j', '0', '--device', 'cpu', '--model-kwargs', 'layers=(1,1,1)']
    expect_error(base + ['--num-classes', '12', '--pretrained-path', str(path)],
                 'classifier of 10 classes', '--num-classes is 12', 'random classifier')
    # --pretrained with another class count than the pretrained classifier's: refused before any download
    expect_error([str(image_folder), '--model', 'resnet18', '--pretrained', '--num-classes', '10'],
                 '1000-class classifier of resnet18', '--num-classes 10', 'random')


RECORDED = dict(input_size=[3, 16, 16], interpolation='bilinear', mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                crop_pct=1.0, crop_mode='center')
RECORDED_FLAGS = ['--img-size', '16', '--interpolation', 'bilinear', '--mean', '0.5', '0.5', '0.5', '--std', '0.25',
                  '0.25', '0.25', '--crop-pct', '1.0', '--crop-mode', 'center']


def test_validate_takes_the_data_config_from_the_weights(image_folder, tmp_path, caplog):
    """The input size, mean / std, crop and interpolation recorded with the weights (train.py's checkpoints and
    exports) are what validate.py evaluates with unless the command line overrides them; the log says which."""
    model = tiny_model(seed=4)
    path = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 0, 'arch': MODEL, 'state_dict': model.state_dict(), 'data_config': RECORDED}, path)
    with caplog.at_level('INFO', logger='validate'):
        recorded = run_validate(image_folder, '--checkpoint', str(path))[0]
    assert 'input_size (3, 16, 16) (checkpoint)' in caplog.text and 'mean (0.5, 0.5, 0.5) (checkpoint)' in caplog.text
    explicit = run_validate(image_folder, '--checkpoint', str(path), *RECORDED_FLAGS)[0]
    assert recorded['img_size'] == 16 and _metrics(recorded) == _metrics(explicit)
    caplog.clear()
    with caplog.at_level('INFO', logger='validate'):
        overridden = run_validate(image_folder, '--checkpoint', str(path), '--img-size', '24')[0]
    assert overridden['img_size'] == 24 and 'input_size (3, 24, 24) (command line)' in caplog.text
    # the export: safetensors metadata, config.json for timm's local-dir:, pretrained_cfg_overlay
    export = tmp_path / 'export'
    timm_splitnet.export_model(model, str(export), data_config=RECORDED)
    from_export = run_validate(image_folder, '--checkpoint', str(export / 'model.safetensors'))[0]
    assert _metrics(from_export) == _metrics(explicit)
    local = timm.create_model(f'local-dir:{export}')
    overlay = timm.create_model(MODEL, pretrained=True, layers=(1, 1, 1),
                                pretrained_cfg_overlay=dict(file=str(export / 'model.safetensors')))
    for m in (local, overlay):
        config = resolve_data_config(model=m)
        assert tuple(config['input_size']) == (3, 16, 16) and tuple(config['mean']) == (0.5, 0.5, 0.5), config
        assert (config['crop_pct'], config['crop_mode'], config['interpolation']) == (1.0, 'center', 'bilinear')
