""" A SplitNet in every timm tool (issue 13): the scripts' side

* any S a division rule defines is reachable by name from the scripts (`splitnet_<arch>_s<S>`, not only 1/2/4);
* a bare `python benchmark.py` compares the undivided network with its S=2 and S=4 divisions;
* the data folder as timm's positional DIR or as --data-dir.

CPU, tiny models (one block per stage, 10 classes).
"""
import sys
from pathlib import Path

import pytest
import torch

import timm_splitnet
from timm_splitnet.cli import CliError, check_model_name, create_model_checked, parse_splitnet_name, resolve_data_dir

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repo-root scripts

import benchmark  # noqa: E402
import validate  # noqa: E402

TINY_ARGS = ['--model-kwargs', 'layers=(1,1,1)', '--num-classes', '10']
FAST_BENCH = ['-b', '2', '--num-warm-iter', '1', '--num-bench-iter', '1', '--device', 'cpu']


def _error(main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    return str(e.value.code)


# ----- any S of a division rule, by name -----

def test_parse_splitnet_name():
    assert parse_splitnet_name('splitnet_wrn16_8_s3') == ('wrn16_8', 3)
    assert parse_splitnet_name('splitnet_resnext101_64x4d_s16') == ('resnext101_64x4d', 16)
    assert parse_splitnet_name('splitnet_nonesuch_s3') is None
    assert parse_splitnet_name('resnet50') is None


def test_unregistered_split_factor_builds():
    check_model_name('splitnet_wrn16_8_s3')
    model = create_model_checked('splitnet_wrn16_8_s3', num_classes=10, drop_rate=None)
    assert isinstance(model, timm_splitnet.SplitNet) and model.split_factor == 3 and model.num_classes == 10
    reference = timm_splitnet.create_splitnet('wrn16_8', 3, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


def test_split_factor_the_rule_does_not_define():
    with pytest.raises(CliError, match='does not define S=3.*1, 2, 4, 8'):
        check_model_name('splitnet_resnet50_s3')
    with pytest.raises(CliError, match='unknown model'):
        check_model_name('splitnet_nonesuch_s3')
    message = _error(benchmark.main, ['--model', 'splitnet_resnet50_s3', *FAST_BENCH])
    assert message.startswith('benchmark.py: error:') and 'supported S: 1, 2, 4, 8' in message


def test_unregistered_split_factor_in_benchmark_and_validate(image_folder):
    name = 'splitnet_resnet110_s8'  # the rule of resnet110 defines S up to 16; timm registers 1, 2, 4
    rows = benchmark.main(['--model', name, '--bench', 'infer', '--no-compare-undivided', *FAST_BENCH, *TINY_ARGS])
    assert [(r['model'], r['split_factor']) for r in rows] == [(name, 8)]
    rows = validate.main([str(image_folder), '--model', name, '-b', '50', '-j', '0', '--device', 'cpu',
                          '--log-freq', '0', *TINY_ARGS])
    assert rows[0]['model'] == name and 0 <= rows[0]['top1'] <= 100
    assert {f'member{i}_top1' for i in range(8)} <= set(rows[0])


# ----- bare benchmark.py -----

def test_default_comparison_resolution():
    args = benchmark.parser.parse_args([])
    names = benchmark.resolve_default_comparison(args, torch.device('cpu'), benchmark.explicit_dests([]))
    assert names == ['splitnet_wrn16_8_s1', 'splitnet_wrn16_8_s2', 'splitnet_wrn16_8_s4']
    assert (args.img_size, args.batch_size, args.num_classes, args.compare_undivided) == (32, 8, 100, False)
    # about a minute on 2 cores: 10 paired rounds of one step per model, one intra-op thread
    assert (args.num_warm_iter, args.num_bench_iter, args.rounds, args.num_threads) == (1, 10, 10, 1)

    argv = ['-b', '3', '--img-size', '64']
    args = benchmark.parser.parse_args(argv)
    names = benchmark.resolve_default_comparison(args, torch.device('cuda'), benchmark.explicit_dests(argv))
    assert names == ['splitnet_wrn50_3_s1', 'splitnet_wrn50_3_s2', 'splitnet_wrn50_3_s4']
    assert (args.img_size, args.batch_size, args.num_classes) == (64, 3, 1000)  # given settings are kept
    assert benchmark.explicit_dests(argv) == {'batch_size', 'img_size'}


def test_bare_benchmark_prints_the_comparison(capsys):
    # the no-model path at the smallest size: the same three models in paired rounds, the ratios to S=1
    rows = benchmark.main(['-b', '1', '--num-warm-iter', '1', '--num-bench-iter', '1', '--rounds', '2',
                           '--device', 'cpu'])
    assert [(r['model'], r['split_factor']) for r in rows] == [
        ('splitnet_wrn16_8_s1', 1), ('splitnet_wrn16_8_s2', 2), ('splitnet_wrn16_8_s4', 4)]
    assert all(r['infer_img_size'] == 32 and r['infer_batch_size'] == 1 and r['train_rounds'] == 2 for r in rows)
    for row in rows[1:]:
        for kind in ('infer', 'train'):
            assert 0 < row[f'{kind}_vs_s1_lo'] <= row[f'{kind}_vs_s1'] <= row[f'{kind}_vs_s1_hi']
        assert row['flop_bound_vs_s1'] == pytest.approx(rows[0]['infer_gmacs'] / row['infer_gmacs'], abs=1e-3)
    summary = capsys.readouterr().out.split('--result')[1]
    assert 'FLOP bound' in summary and 'splitnet_wrn16_8_s4' in summary
    assert f'wrn16_8 S=4 (loop) infers at {rows[2]["infer_vs_s1"]:.2f}x ({rows[2]["infer_vs_s1_lo"]:.2f}-' in summary


# ----- the data folder: positional DIR or --data-dir -----

def test_resolve_data_dir(tmp_path):
    assert resolve_data_dir(str(tmp_path), None) == str(tmp_path)
    assert resolve_data_dir(None, str(tmp_path)) == str(tmp_path)
    assert resolve_data_dir(str(tmp_path), str(tmp_path) + '/') == str(tmp_path) + '/'
    assert resolve_data_dir(None, None) is None
    with pytest.raises(CliError, match='two data folders'):
        resolve_data_dir(str(tmp_path / 'a'), str(tmp_path / 'b'))


def test_validate_data_dir_forms(image_folder, tmp_path):
    base = ['--model', 'splitnet_resnet110_s2', '-b', '50', '-j', '0', '--device', 'cpu', '--log-freq', '0',
            *TINY_ARGS]
    both = validate.main([str(image_folder), '--data-dir', str(image_folder), *base])
    option = validate.main(['--data-dir', str(image_folder), *base])
    assert both[0]['num_images'] == option[0]['num_images'] == 100
    message = _error(validate.main, [str(image_folder), '--data-dir', str(tmp_path), *base])
    assert message.startswith('validate.py: error: two data folders')


# ----- starting weights: --initial-checkpoint, --pretrained-path, --resume refusal -----

import importlib.util  # noqa: E402

import timm  # noqa: E402
import yaml  # noqa: E402

from timm_splitnet import save_safetensors  # noqa: E402
from timm_splitnet.models._weights import load_weights  # noqa: E402

MODEL = 'splitnet_resnet110_s2'


def _tiny(name=MODEL, seed=0, num_classes=10):
    torch.manual_seed(seed)
    return timm.create_model(name, layers=(1, 1, 1), num_classes=num_classes)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize('layout', ['state_dict', 'state_dict_ema', 'model', 'module_prefix', 'raw', 'safetensors'])
def test_load_weights_formats(tmp_path, layout):
    source, target = _tiny(seed=1), _tiny(seed=2)
    state = source.state_dict()
    path = tmp_path / ('w.safetensors' if layout == 'safetensors' else 'w.pth.tar')
    if layout == 'safetensors':
        save_safetensors(source, str(path))
    elif layout == 'raw':
        torch.save(state, path)
    elif layout == 'module_prefix':
        torch.save({'epoch': 1, 'state_dict': {f'module.{k}': v for k, v in state.items()}}, path)
    elif layout == 'state_dict_ema':
        torch.save({'state_dict': _tiny(seed=3).state_dict(), 'state_dict_ema': state}, path)
    else:
        torch.save({layout: state}, path)
    message = load_weights(target, str(path), use_ema=layout == 'state_dict_ema')
    assert _same(source, target) and str(path) in message


def test_load_weights_member_copies_and_errors(tmp_path):
    member = _tiny(seed=1).models[0]  # an undivided network of a member's width: resnet110_cifar
    path = tmp_path / 'member.pth'
    torch.save(member.state_dict(), path)
    target = _tiny(seed=2)
    message = load_weights(target, str(path))
    assert 'copied into each of the 2 members' in message
    for m in target.models:
        assert _same(m, member)
    # another class count: refused strictly, a new head with adapt_head (as --pretrained-path)
    seven = _tiny(seed=2, num_classes=7)
    with pytest.raises(ValueError, match='do not fit a member'):
        load_weights(seven, str(path))
    assert 'new 7-class heads' in load_weights(seven, str(path), adapt_head=True)
    # a member of another width (S=4) and a file of another S
    with pytest.raises(ValueError, match='do not fit a member of splitnet_resnet110_s4'):
        load_weights(_tiny('splitnet_resnet110_s4'), str(path))
    s2 = tmp_path / 's2.safetensors'
    save_safetensors(_tiny(), str(s2))
    with pytest.raises(ValueError, match='S=4'):
        load_weights(_tiny('splitnet_resnet110_s4'), str(s2))
    with pytest.raises(ValueError, match='no weights file'):
        load_weights(target, str(tmp_path / 'missing.pth'))


# ----- train.py's command line (timm's flags) -----

def _load_train():
    spec = importlib.util.spec_from_file_location('splitnet_train_for_cli_tests', ROOT / 'train.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_train()

# every flag added for timm's command line, with a value it accepts
TIMM_FLAGS = [
    'DIR', '--class-map', 'map.txt', '--pretrained-path', 'w.safetensors', '--initial-checkpoint', 'w.pth',
    '--gp', 'avg', '--in-chans', '3', '--fuser', 'te', '--fast-norm', '--head-init-scale', '0.5',
    '--head-init-bias', '0', '--synchronize-step', '--local_rank', '0', '--device-modules', 'json', 'math',
    '--bn-momentum', '0.1', '--bn-eps', '1e-5', '--layer-decay', '0.7', '--lr-base', '0.2', '--lr-base-size', '256',
    '--lr-base-scale', 'sqrt', '--lr-noise', '0.4', '0.9', '--lr-noise-pct', '0.5', '--lr-noise-std', '0.9',
    '--lr-cycle-mul', '2', '--lr-cycle-decay', '0.3', '--lr-cycle-limit', '2', '--lr-k-decay', '2',
    '--epoch-repeats', '2', '--start-epoch', '3', '--patience-epochs', '5', '--color-jitter-prob', '0.5',
    '--grayscale-prob', '0.1', '--gaussian-blur-prob', '0.1', '--aug-repeats', '3', '--bce-loss', '--bce-sum',
    '--bce-target-thresh', '0.2', '--bce-pos-weight', '2', '--resplit', '--drop-connect', '0.1', '--drop-block',
    '0.1', '--model-ema-force-cpu', '--worker-seeding', 'part', '--recovery-interval', '0',
    '--use-multi-epochs-loader', '--eval-metric', 'top5', '--torchcompile', 'eager',
]
TIMM_REFUSED = {
    '--torchscript': [], '--aug-splits': ['3'], '--jsd-loss': [], '--resplit': [], '--split-bn': [], '--no-aug': [],
    '--model-dtype': ['bfloat16'], '--recovery-interval': ['5'], '--save-images': [],
}


def test_every_timm_flag_parses():
    parser = train.create_parser()
    args = parser.parse_args(TIMM_FLAGS)
    assert args.data == 'DIR' and args.layer_decay == 0.7 and args.lr_noise == [0.4, 0.9]
    assert args.device_modules == ['json', 'math'] and args.bce_loss and args.eval_metric == 'top5'
    for flag, values in TIMM_REFUSED.items():  # a flag here (timm's command lines parse), refused when the run starts
        dest = flag.lstrip('-').replace('-', '_')
        value = getattr(parser.parse_args([flag, *values]), dest)
        assert value == (type(value)(values[0]) if values else True) != parser.get_default(dest), flag


@pytest.mark.parametrize('flag', list(TIMM_REFUSED))
def test_refused_flags_say_why(flag):
    message = _error(train.main, ['--dataset', 'sklearn/digits', flag, *TIMM_REFUSED[flag]])
    assert message.startswith(f'train.py: error: {flag} does not apply to co-training: ') and '\n' not in message


def test_lr_base_scaling_is_timms():
    assert train.scaled_lr(0.1, 1024, 256, '', 'sgd') == pytest.approx(0.4)  # linear for SGD
    assert train.scaled_lr(0.1, 1024, 256, '', 'adamw') == pytest.approx(0.2)  # sqrt for Ada* / LAMB
    assert train.scaled_lr(0.1, 64, 128, 'linear', 'lamb') == pytest.approx(0.05)
    args, _ = train._parse_args(['--dataset', 'sklearn/digits'])
    assert args.lr is None and args.lr_base == 0.1 and args.lr_base_size == 128  # 0.1 at 128 images: the paper
    with pytest.raises(CliError, match='lr-base-scale'):
        train.scaled_lr(0.1, 64, 128, 'cubic')


def test_log_wandb_without_wandb():
    if importlib.util.find_spec('wandb') is not None:
        pytest.skip('wandb is installed')
    message = _error(train.main, ['--dataset', 'sklearn/digits', '--log-wandb'])
    assert 'needs the wandb package' in message


def test_train_data_dir_forms(tmp_path):
    args, _ = train._parse_args([str(tmp_path)])
    assert args.data_dir == str(tmp_path)
    message = _error(train.main, [str(tmp_path / 'a'), '--data-dir', str(tmp_path / 'b')])
    assert message.startswith('train.py: error: two data folders')


# the dests of timm 1.0's train.py and their defaults: what its args.yaml holds
TIMM_ARGS_YAML = dict(
    data=None, data_dir=None, dataset='', train_split='train', val_split='validation', train_num_samples=None,
    val_num_samples=None, dataset_download=False, class_map='', input_img_mode=None, input_key=None,
    target_key=None, dataset_trust_remote_code=False, model='resnet50', pretrained=False, pretrained_path=None,
    initial_checkpoint='', resume='', no_resume_opt=False, num_classes=None, gp=None, img_size=None, in_chans=None,
    input_size=None, crop_pct=None, mean=None, std=None, interpolation='', batch_size=128,
    validation_batch_size=None, channels_last=False, fuser='', grad_accum_steps=1, grad_checkpointing=False,
    fast_norm=False, model_kwargs={}, head_init_scale=None, head_init_bias=None, torchcompile_mode=None,
    torchscript=False, torchcompile=None, device='cuda', amp=False, amp_dtype='float16', model_dtype=None,
    no_ddp_bb=False, synchronize_step=False, local_rank=0, device_modules=None, opt='sgd', opt_eps=None,
    opt_betas=None, momentum=0.9, weight_decay=2e-05, clip_grad=None, clip_mode='norm', layer_decay=None,
    opt_kwargs={}, sched='cosine', sched_on_updates=False, lr=None, lr_base=0.1, lr_base_size=256,
    lr_base_scale='', lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0, lr_cycle_mul=1.0, lr_cycle_decay=0.5,
    lr_cycle_limit=1, lr_k_decay=1.0, warmup_lr=1e-05, min_lr=0, epochs=300, epoch_repeats=0.0, start_epoch=None,
    decay_milestones=[90, 180, 270], decay_epochs=90, warmup_epochs=5, warmup_prefix=False, cooldown_epochs=0,
    patience_epochs=10, decay_rate=0.1, no_aug=False, train_crop_mode=None, scale=[0.08, 1.0],
    ratio=[0.75, 1.3333333333333333], hflip=0.5, vflip=0.0, color_jitter=0.4, color_jitter_prob=None,
    grayscale_prob=None, gaussian_blur_prob=None, aa=None, aug_repeats=0, aug_splits=0, jsd_loss=False,
    bce_loss=False, bce_sum=False, bce_target_thresh=None, bce_pos_weight=None, reprob=0.0, remode='pixel',
    recount=1, resplit=False, mixup=0.0, cutmix=0.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5,
    mixup_mode='batch', mixup_off_epoch=0, smoothing=0.1, train_interpolation='random', drop=0.0,
    drop_connect=None, drop_path=None, drop_block=None, bn_momentum=None, bn_eps=None, sync_bn=False,
    dist_bn='reduce', split_bn=False, model_ema=False, model_ema_force_cpu=False, model_ema_decay=0.9998,
    model_ema_warmup=False, seed=42, worker_seeding='all', log_interval=50, recovery_interval=0,
    checkpoint_hist=10, workers=4, save_images=False, pin_mem=False, no_prefetcher=False, output='',
    experiment='', eval_metric='top1', tta=0, log_wandb=False, wandb_project=None, wandb_tags=[],
    wandb_resume_id='',
)


def test_timm_args_yaml_is_accepted(tmp_path, caplog):
    path = tmp_path / 'args.yaml'
    path.write_text(yaml.safe_dump(TIMM_ARGS_YAML))
    with caplog.at_level('WARNING'):
        args, _ = train._parse_args(['-c', str(path), '--dataset', 'sklearn/digits'])
    warnings = [r.getMessage() for r in caplog.records if 'do not apply' in r.getMessage()]
    assert len(warnings) == 1
    for key in ('tta', 'wandb_resume_id', 'input_img_mode'):
        assert key in warnings[0], key
    # options of this script (refused ones at their defaults change nothing) are not listed
    for key in ('lr_base', 'smoothing', 'torchscript', 'jsd_loss', 'split_bn', 'wandb_project', 'train_num_samples',
                'val_num_samples'):
        assert key not in warnings[0], key
    # timm's values became the defaults
    assert (args.smoothing, args.weight_decay, args.warmup_epochs, args.lr_base_size, args.drop) == \
        (0.1, 2e-05, 5, 256, 0.0)
    path.write_text(yaml.safe_dump(dict(TIMM_ARGS_YAML, no_such_option=1)))
    message = _error(train.main, ['-c', str(path)])
    assert 'unknown option(s): no_such_option' in message
    path.write_text(yaml.safe_dump(dict(TIMM_ARGS_YAML, jsd_loss=True)))
    assert '--jsd-loss does not apply' in _error(train.main, ['-c', str(path)])


def test_resume_from_weights_points_to_initial_checkpoint(tmp_path):
    path = tmp_path / 'model.safetensors'
    save_safetensors(_tiny(), str(path))
    raw = tmp_path / 'raw.pth'
    torch.save(_tiny().state_dict(), raw)
    for weights in (path, raw):
        message = _error(train.main, ['--dataset', 'sklearn/digits', '--workers', '0', '--resume', str(weights)])
        assert f'start a new run from them with --initial-checkpoint {weights}' in message and '\n' not in message


def test_drop_block_is_refused_clearly():
    message = _error(train.main, ['--dataset', 'sklearn/digits', '--model-kwargs', 'layers=(1,1,1)', '--workers', '0',
                                  '--device', 'cpu', '--drop-block', '0.1'])
    assert 'have no DropBlock' in message


def _validation_logits_and_digits(model, image_folder):
    """The ensemble logits of `model` (eval mode) on every validation image of the folder, preprocessed here as the
    prefetching loader does (uint8 -> float, minus 255 * mean, over 255 * std), and each image's folder (digit)."""
    import numpy as np
    from PIL import Image
    from timm.data import resolve_data_config
    config = resolve_data_config({}, model=model)
    mean = torch.tensor([255 * m for m in config['mean']]).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in config['std']]).view(1, 3, 1, 1)
    files = sorted((image_folder / 'validation').glob('*/*.jpg'))
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1) for f in files])
    model.eval()
    with torch.no_grad():
        logits = model(images.float().sub_(mean).div_(std))
    return logits, torch.tensor([int(f.parent.name) for f in files])


@pytest.mark.slow
def test_train_positional_dir_initial_checkpoint_layer_decay(image_folder, tmp_path, monkeypatch):
    """--initial-checkpoint: training starts from the file's weights, with --head-init-scale applied to the classifier
    weights; --class-map: the labels follow the map (the eval loss is the reversed labels' loss, recomputed here);
    --layer-decay, --lr-base scaling, --bce-loss and the positional data folder."""
    from timm_splitnet.task import CoTrainingTask
    weights = tmp_path / 'model.safetensors'
    start = _tiny(seed=5)
    with torch.no_grad():  # a head far from the near-zero initial one: logits that tell the labellings apart
        for layer in start.get_classifier():
            layer.weight.normal_(0., 30.)
    save_safetensors(start, str(weights))
    class_map = tmp_path / 'classes.txt'
    class_map.write_text('\n'.join(str(c) for c in reversed(range(10))))  # folder '9' is class 0, ..., '0' class 9
    first_weights = []
    forward = CoTrainingTask.forward

    def spy_forward(task, input, target):  # the weights the first training step starts from
        if not first_weights:
            first_weights.append({k: v.detach().clone() for k, v in task.get_trainable_module().state_dict().items()})
        return forward(task, input, target)

    monkeypatch.setattr(CoTrainingTask, 'forward', spy_forward)
    out = tmp_path / 'out'
    train.main([str(image_folder), '--model', MODEL, '--model-kwargs', 'layers=(1,1,1)', '--initial-checkpoint',
                str(weights), '--layer-decay', '0.7', '--class-map', str(class_map), '--bce-loss', '-b', '50',
                '--workers', '0', '--device', 'cpu', '--epochs', '1', '--output', str(out), '--experiment', 'x',
                '--no-plot', '--head-init-scale', '0.5'])
    checkpoint = torch.load(out / 'x' / 'last.pth.tar', map_location='cpu', weights_only=True)
    groups = checkpoint['optimizer']['param_groups']
    scales = {round(g['lr_scale'], 6) for g in groups if 'lr_scale' in g}
    assert len(scales) > 2 and max(scales) == 1.0  # per-layer groups, the head at full rate
    assert checkpoint['args']['lr'] == pytest.approx(0.1 * 50 / 128)  # --lr-base scaling
    assert checkpoint['args']['bce_loss'] and checkpoint['args']['data_dir'] == str(image_folder)

    # the starting weights: the file's, the classifier weights times --head-init-scale
    head_ids = {id(p) for p in start.get_classifier().parameters() if p.ndim > 1}
    head = {name for name, p in start.named_parameters() if id(p) in head_ids}
    assert len(head) == 2  # one classifier weight per member
    assert first_weights and list(first_weights[0]) == list(start.state_dict())
    for key, value in start.state_dict().items():
        expected = value * 0.5 if key in head else value
        torch.testing.assert_close(first_weights[0][key], expected, rtol=0, atol=0, msg=key)
    fresh = _tiny(seed=42).state_dict()  # what train.py would have started from without the file (--seed 42)
    assert not torch.equal(fresh['models.0.conv1.weight'], start.state_dict()['models.0.conv1.weight'])

    # the class map: the run's eval loss is the loss of its final weights against the mapped labels (9 - digit)
    trained = _tiny(seed=0)
    trained.load_state_dict(checkpoint['state_dict'])
    logits, digits = _validation_logits_and_digits(trained, image_folder)
    eval_loss = float(checkpoint['eval_metrics']['loss'])
    mapped = torch.nn.functional.cross_entropy(logits, 9 - digits).item()
    unmapped = torch.nn.functional.cross_entropy(logits, digits).item()
    assert eval_loss == pytest.approx(mapped, rel=1e-5)
    assert abs(unmapped - mapped) > 1e-3 * mapped, (mapped, unmapped)  # 100 x the tolerance above


@pytest.mark.parametrize('num_batches,accum', [(10, 1), (10, 3), (9, 3), (2, 4), (1, 1), (7, 2)])
def test_accumulation_schedule(num_batches, accum):
    schedule = list(train.accumulation_schedule(num_batches, accum))
    assert len(schedule) == num_batches
    # the rule it replaces: a step every accum batches and at the last; the last group divides by its own size
    last_group = num_batches % accum or accum
    for i, (size, step) in enumerate(schedule):
        assert step == (i == num_batches - 1 or (i + 1) % accum == 0)
        assert size == (last_group if i >= num_batches - last_group else accum)
    assert sum(1 / size for size, _ in schedule) == pytest.approx(sum(step for _, step in schedule))
