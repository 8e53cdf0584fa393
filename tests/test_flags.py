""" timm flags on the three scripts (issue 18): implemented where they apply, refused with the reason where not;
bad values are one-line errors; output without duplicates or JSON floods; AMP in bfloat16 on a CPU.

CPU, tiny models (one block per stage), in-process `main(argv)` calls.
"""
import json
import logging
import shutil
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch

import timm
import timm_splitnet  # noqa: F401
from timm_splitnet.cli import CliError, check_num_samples, resolve_amp_dtype, resolve_eval_data_config
from timm_splitnet.task.schedule import lr_warnings, resolve_warmup_lr, restore_scheduler_state

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repo-root scripts

import benchmark  # noqa: E402
import validate  # noqa: E402
from test_train import train  # noqa: E402  (train.py, loaded once)

MODEL = 'splitnet_resnet110_s2'
TINY = ['--model-kwargs', 'layers=(1,1,1)', '--num-classes', '10']
FAST_BENCH = ['-b', '2', '--num-warm-iter', '0', '--num-bench-iter', '1', '--device', 'cpu', '--bench', 'infer']
TRAIN = ['--dataset', 'sklearn/digits', '--img-size', '8', '--workers', '0', '--device', 'cpu', '--model', MODEL,
         '--model-kwargs', 'layers=(1,1,1)']


class Stop(CliError):
    """Raised by a stand-in to end a run once the value under test has been seen."""


def _error(main, argv, capsys=None) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code not in (0, None)
    if isinstance(e.value.code, int):  # argparse: its usage, then the one-line error
        err = capsys.readouterr().err
        assert 'Traceback' not in err, err
        return err.strip().splitlines()[-1]
    message = str(e.value.code)
    assert '\n' not in message and 'Traceback' not in message, message
    return message


def _validate(folder, *extra):
    argv = [str(folder), '--model', MODEL, '-b', '50', '-j', '0', '--device', 'cpu', '--log-freq', '0', *TINY]
    return validate.main(argv + [str(a) for a in extra])[0]


# ----- one-line errors -----

def test_bad_values_are_one_line_errors(image_folder, capsys):
    for main in (train.main, validate.main, benchmark.main):
        message = _error(main, [str(image_folder), '--model', MODEL, '-b', '0'], capsys)
        assert message.endswith('argument -b/--batch-size: must be at least 1, got 0'), message
    message = _error(train.main, TRAIN + ['--aa', 'foo-bar'])
    assert message.startswith('train.py: error: unknown auto-augment policy') and 'rand-m9-mstd0.5-inc1' in message
    message = _error(train.main, TRAIN + ['--sched', 'foo', '--epochs', '1'])
    assert message.startswith('train.py: error: cannot build the LR schedule of --sched foo') and "'foo'" in message


def test_sample_counts_are_for_iterable_data_sets(image_folder, monkeypatch):
    check_num_samples('--num-samples', 1000, 'wds/imagenet')
    with pytest.raises(CliError, match='iterable data set .*an image folder knows its own length'):
        check_num_samples('--num-samples', 1000, '')
    assert 'image folder knows its own length' in _error(validate.main, [image_folder, '--model', MODEL,
                                                                          '--num-samples', 10])
    assert '--dataset sklearn/digits knows its own length' in _error(train.main, TRAIN + ['--train-num-samples', 5])

    seen = {}

    def create_dataset(name, **kwargs):  # a stand-in for timm's streaming readers
        seen.update(kwargs, name=name)
        raise Stop('stop')

    monkeypatch.setattr(train, 'create_dataset', create_dataset)
    assert 'stop' in _error(train.main, TRAIN[2:] + ['--dataset', 'wds/x', '--data-dir', image_folder,
                                                     '--train-num-samples', 5])
    assert seen['name'] == 'wds/x' and seen['num_samples'] == 5


# ----- validate.py flags -----

def test_validate_seed_gp_in_chans_and_train_size(image_folder):
    first, again, other = _validate(image_folder), _validate(image_folder), _validate(image_folder, '--seed', 1)
    # a model without weights, seeded by --seed (its near-uniform outputs differ in the members' KL)
    assert first['pairwise_kl'] == again['pairwise_kl'] != other['pairwise_kl']
    assert _validate(image_folder, '--gp', 'max')['pairwise_kl'] != first['pairwise_kl']
    grey = _validate(image_folder, '--in-chans', '1')
    assert grey['num_images'] == 100 and grey['gmacs'] < first['gmacs']
    # --use-train-size: the cfg's train size instead of its test size
    model = timm.create_model('resnet18', pretrained_cfg_overlay=dict(test_input_size=(3, 288, 288)))
    for flags, size in (([], 288), (['--use-train-size'], 224)):
        args = validate.parser.parse_args(['--model', 'resnet18', *flags])
        assert resolve_eval_data_config(args, model, use_test_size=not args.use_train_size)[0]['input_size'] == \
            (3, size, size)


def test_validate_valid_labels_and_test_pool(image_folder, tmp_path):
    labels = tmp_path / 'labels.txt'
    labels.write_text('\n'.join(str(i) for i in range(10)))
    full, subset = _validate(image_folder), _validate(image_folder, '--valid-labels', labels)
    assert subset['top1'] == full['top1'] and subset['loss'] == full['loss']  # all 10 classes, in order
    # a 12-class model restricted to the 10 classes of the data set
    twelve = _validate(image_folder, '--num-classes', '12', '--valid-labels', labels)
    assert twelve['num_images'] == 100
    labels.write_text('0\n12\n')
    assert 'expected class indices of the model (0 to 9), got 12' in _error(
        validate.main, [image_folder, '--model', MODEL, *TINY, '--valid-labels', labels])
    assert 'one classifier per member' in _error(validate.main, [image_folder, '--model', MODEL, *TINY, '--test-pool'])
    # timm's test-time pooling on a plain timm model above its train size (160 px), one image per class
    small = tmp_path / 'small'
    for path in sorted((image_folder / 'validation').glob('*/*.jpg')):
        if not (small / 'validation' / path.parent.name).exists():
            (small / 'validation' / path.parent.name).mkdir(parents=True)
            shutil.copy(path, small / 'validation' / path.parent.name)
    pooled = validate.main([str(small), '--model', 'test_resnet', '--num-classes', '10', '--img-size', '192',
                            '--test-pool', '-b', '10', '-j', '0', '--device', 'cpu', '--log-freq', '0'])[0]
    assert pooled['crop_pct'] == 1.0 and pooled['img_size'] == 192 and pooled['num_images'] == 10


def test_validate_real_labels(image_folder, tmp_path):
    """ReaL labels equal to the folder's own labels give real_top1 == top1; a file of another length is refused."""
    folder = tmp_path / 'val'
    real = []
    for cls in sorted(p.name for p in (image_folder / 'validation').iterdir()):
        (folder / 'validation' / cls).mkdir(parents=True)
        for path in sorted((image_folder / 'validation' / cls).iterdir())[:2]:
            real.append([int(cls)])
            shutil.copy(path, folder / 'validation' / cls / f'ILSVRC2012_val_{len(real):08d}.JPEG')
    (tmp_path / 'real.json').write_text(json.dumps(real))
    row = _validate(folder, '--real-labels', tmp_path / 'real.json')
    assert row['num_images'] == 20 and row['real_top1'] == pytest.approx(row['top1'])
    assert row['real_top5'] == pytest.approx(row['top5'])
    (tmp_path / 'short.json').write_text(json.dumps(real[:5]))
    assert 'does not hold one entry per image of the data set (20 images)' in _error(
        validate.main, [folder, '--model', MODEL, *TINY, '--real-labels', tmp_path / 'short.json'])


def test_validate_prints_a_summary_not_the_json(image_folder, tmp_path, capsys):
    out = tmp_path / 'r.json'
    row = _validate(image_folder, '--results-file', out, '--results-format', 'json')
    printed = capsys.readouterr().out
    assert '--result' not in printed and '"member0_nll"' not in printed
    assert len(printed.strip().splitlines()) <= 15 and f'All results (json): {out}' in printed
    assert json.loads(out.read_text())[0] == json.loads(json.dumps(row))  # every key in the file


# ----- benchmark.py flags and rows -----

def test_benchmark_flags_reach_the_model_optimizer_and_compiler(monkeypatch):
    args = benchmark.parser.parse_args(['--model', MODEL, *TINY, '--gp', 'max', '--grad-checkpointing',
                                        '--drop-path', '0.2', '--torchcompile', 'eager', '--torchcompile-mode',
                                        'reduce-overhead', '--split-backend', 'loop'])
    compiled = {}
    monkeypatch.setattr(torch, 'compile', lambda model, **kwargs: compiled.update(kwargs) or model)
    setup = benchmark.BenchSetup(MODEL, 'sequential', args, torch.device('cpu'), None)
    member = setup.model.models[0]
    assert member.global_pool.pool_type == 'max' and member.grad_checkpointing
    assert compiled == dict(backend='eager', mode='reduce-overhead')
    rates = [b.drop_path.drop_prob for b in member.modules() if hasattr(b, 'drop_path') and b.drop_path is not None
             and hasattr(b.drop_path, 'drop_prob')]
    assert rates and max(rates) == pytest.approx(0.2 / 2 ** 0.5)  # the undivided rate over sqrt(S)
    grey = benchmark.BenchSetup(MODEL, 'sequential', benchmark.parser.parse_args(['--model', MODEL, *TINY,
                                                                                 '--in-chans', '1']),
                                torch.device('cpu'), None)
    grey.train(False)
    with torch.no_grad():
        assert grey.input(2).shape == (2, 1, 32, 32) and grey.forward(grey.input(2)).shape == (2, 10)
    made = {}
    real = timm.optim.create_optimizer_v2
    monkeypatch.setattr(timm.optim, 'create_optimizer_v2', lambda *a, **kw: made.update(kw) or real(*a, **kw))
    rows = benchmark.main(['--model', MODEL, *TINY, *FAST_BENCH[:-2], '--bench', 'train', '--opt', 'adamw',
                           '--opt-eps', '1e-6', '--opt-betas', '0.8', '0.9', '--opt-kwargs', 'amsgrad=True'])
    assert made == dict(opt='adamw', lr=1e-4, eps=1e-6, betas=[0.8, 0.9], amsgrad=True) and rows


def test_benchmark_wildcard_lists_each_model_once():
    rows = benchmark.main(['--model', 'splitnet_resnet110_s[124]', *TINY, *FAST_BENCH])
    assert [(r['model'], r['split_mode']) for r in rows] == [
        ('splitnet_resnet110_s1', 'sequential'), (MODEL, 'sequential'), ('splitnet_resnet110_s4', 'sequential')]
    rows = benchmark.main(['--model-list', f'{MODEL},splitnet_resnet110_s4', *TINY, *FAST_BENCH])
    assert [(r['model'], r['split_mode']) for r in rows] == [
        ('splitnet_resnet110_s1', 'undivided'), (MODEL, 'sequential'), ('splitnet_resnet110_s4', 'sequential')]
    assert rows[2]['infer_vs_s1'] > 0  # still compared with the one undivided row


# ----- AMP dtype -----

def test_amp_is_bfloat16_on_a_cpu(caplog):
    with caplog.at_level(logging.INFO):
        assert resolve_amp_dtype(None, torch.device('cpu')) == torch.bfloat16
        assert resolve_amp_dtype(None, torch.device('cuda')) == torch.float16
        assert resolve_amp_dtype('bfloat16', torch.device('cpu')) == torch.bfloat16
        assert resolve_amp_dtype('float16', torch.device('cpu')) == torch.float16
    assert 'bfloat16 autocast' in caplog.text and 'float16 autocast is usually far slower' in caplog.text
    rows = benchmark.main(['--model', MODEL, *TINY, *FAST_BENCH, '--amp', '--no-compare-undivided'])
    assert rows[0]['precision'] == 'amp_bfloat16'
    with pytest.raises(CliError, match='unknown --amp-dtype'):
        resolve_amp_dtype('int8', torch.device('cpu'))


# ----- train.py flags -----

def test_warmup_lr_default_and_warnings():
    args, _ = train._parse_args(['--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '1'])
    assert args.warmup_lr is None  # resolved against the peak once --lr is known
    assert resolve_warmup_lr(None, 1e-3) == 1e-5  # timm's
    assert resolve_warmup_lr(None, 5e-5) == pytest.approx(5e-6)  # never above a tenth of the peak
    assert resolve_warmup_lr(5e-3, 0.1) == 5e-3  # the paper recipes' value, given
    assert lr_warnings(1e-3, 5e-3, 1, 1e-4)[0].startswith('--warmup-lr 0.005 is above the peak --lr 0.001')
    assert lr_warnings(1e-3, 5e-3, 0, 1e-4) == []  # no warm-up
    assert lr_warnings(1e-5, 1e-6, 1, 1e-4)[0].startswith('--min-lr 0.0001 is above the peak --lr 1e-05')


def test_restore_scheduler_state_keeps_a_changed_schedule():
    from timm.scheduler import create_scheduler_v2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    old, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=2, min_lr=1e-4)
    saved = old.state_dict()
    same, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=2, min_lr=1e-4)
    same.metric = 'fresh'  # loading the checkpoint's state overwrites it
    assert restore_scheduler_state(same, saved) == [] and same.metric is None
    longer, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=6, min_lr=1e-4)
    assert restore_scheduler_state(longer, saved) == ['t_initial: 2 -> 6'] and longer.t_initial == 6


def test_train_flags_reach_optimizer_and_wandb(monkeypatch, tmp_path):
    seen = {}

    def create_optimizer(model, **kwargs):
        seen.update(kwargs)
        raise Stop('stop')

    monkeypatch.setattr(train, 'create_optimizer_v2', create_optimizer)
    assert 'stop' in _error(train.main, TRAIN + ['--layer-decay', '0.7', '--layer-decay-min-scale', '0.1'])
    assert seen['layer_decay'] == 0.7 and seen['layer_decay_min_scale'] == 0.1
    monkeypatch.undo()

    wandb = types.ModuleType('wandb')
    wandb.__spec__ = ModuleSpec('wandb', None)
    wandb.init = lambda **kwargs: (seen.update(kwargs), (_ for _ in ()).throw(Stop('stop')))
    monkeypatch.setitem(sys.modules, 'wandb', wandb)
    assert 'stop' in _error(train.main, TRAIN + ['--log-wandb', '--wandb-project', 'splitnets', '--wandb-tags', 'a',
                                                 'b', '--output', tmp_path, '--epochs', '1'])
    assert seen['project'] == 'splitnets' and seen['tags'] == ['a', 'b']


def test_own_args_yaml_gives_no_warning(tmp_path, caplog):
    _, args_text = train._parse_args(TRAIN)
    path = tmp_path / 'args.yaml'
    path.write_text(args_text)
    with caplog.at_level(logging.WARNING):
        args, _ = train._parse_args(['-c', str(path)])
    assert not [r for r in caplog.records if 'do not apply' in r.getMessage()]
    assert args.model == MODEL and args.img_size == 8
