"""The paper authors' checkpoints in our models: key mapping from fixtures of their key names and shapes, strict
conversion, release zips (md5, hparams_train.json), converted exports, loading hooks, and every error path.

The fixtures (`tests/fixtures/authors/<arch>.json.gz`) hold the key names and shapes of one member of the authors'
networks per S, written by `scripts/check_authors_conformance.py --write-fixtures` from their code; none of their code
is needed here. Checkpoints in their format are built from those facts with random tensors (meta tensors for the
large networks).
"""
import gzip
import hashlib
import io
import json
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

import timm
from timm.layers import Swish
from timm_splitnet.models import SPLIT_ARCHS, create_splitnet, member_kwargs
from timm_splitnet.models.splitnet import resolve_member_act_layer
from timm_splitnet.models._authors_layouts import AUTHORS_ARCHS, map_member_keys
from timm_splitnet.models._weights import load_weights
from timm_splitnet.data.transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from timm_splitnet.models.authors import (
    AuthorsCheckpoint, authors_build_kwargs, authors_data_cfg, authors_model_name, checkpoint_build_kwargs,
    convert_authors_state_dict, export_authors_checkpoint, is_authors_checkpoint, load_authors_checkpoint,
    read_authors_checkpoint)

FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'authors'
ROOT = Path(__file__).resolve().parents[1]


def load_fixture(arch: str) -> dict:
    with gzip.open(FIXTURES / f'{arch}.json.gz', 'rt') as f:
        return json.load(f)


def expand(entries: List[list]) -> List[Tuple[str, List[int]]]:
    """The fixture's module entries as (key, shape) of every tensor, in their order."""
    out = []
    for name, kind, shape in entries:
        if kind == 'bn':
            out += [(f'{name}.{leaf}', shape) for leaf in ('weight', 'bias', 'running_mean', 'running_var')]
            out.append((f'{name}.num_batches_tracked', []))
        elif kind == 'wb':
            out += [(f'{name}.weight', shape), (f'{name}.bias', shape[:1])]
        elif kind == 'w':
            out.append((f'{name}.weight', shape))
        else:
            out.append((name, shape))
    return out


def their_checkpoint(arch: str, layout: str, split_factor: int, device: str = 'meta', seed: int = 0,
                     num_classes: int = None) -> dict:
    """A checkpoint as their training script writes it: {'arch', 'state_dict': module.models.<i>.<key>, ...}."""
    fixture = load_fixture(arch)
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for i in range(split_factor):
        for key, shape in expand(fixture['layouts'][layout][str(split_factor)]):
            if num_classes is not None and len(shape) and shape[0] == fixture['num_classes'] and \
                    key.rsplit('.', 2)[-2] in ('fc', 'last_linear', 'fc_out', 'classifier', '_fc'):
                shape = [num_classes] + shape[1:]
            if device == 'meta':
                t = torch.empty(shape, device='meta')
            elif key.endswith('num_batches_tracked'):
                t = torch.randint(0, 1000, shape, generator=g)
            elif key.endswith('running_var'):
                t = torch.rand(shape, generator=g) + 0.5
            else:
                t = torch.randn(shape, generator=g)
            state[f'module.models.{i}.{key}'] = t
    return {'epoch': 300, 'arch': fixture['authors_arch'], 'state_dict': state, 'best_acc1': 85.5,
            'optimizer': {'state': {}, 'param_groups': []}}


def fixture_cases():
    for arch in AUTHORS_ARCHS:
        for layout in load_fixture(arch)['layouts']:
            for s in (1, 2, 4):
                yield arch, layout, s


# ----- the fixtures themselves -----

def test_every_authors_arch_has_a_fixture_from_their_code():
    for arch, spec in AUTHORS_ARCHS.items():
        fixture = load_fixture(arch)
        assert fixture['authors_arch'] == spec.authors_arch
        assert set(fixture['layouts']) == set(spec.layouts)
        assert 'check_authors_conformance.py' in fixture['produced_by']
        for layout in spec.layouts:
            assert set(fixture['layouts'][layout]) == {'1', '2', '4'}


# ----- key mapping: every key of theirs lands on exactly one of ours, same shape (meta device) -----

@pytest.mark.parametrize('arch,layout,split_factor', list(fixture_cases()))
def test_member_keys_map_one_to_one_with_equal_shapes(arch, layout, split_factor):
    fixture = load_fixture(arch)
    spec = SPLIT_ARCHS[arch]
    with torch.device('meta'):
        member = timm.create_model(spec.member, num_classes=fixture['num_classes'], **resolve_member_act_layer(
            dict(member_kwargs(arch, split_factor), **authors_build_kwargs(arch, layout))))
    ours = {k: list(v.shape) for k, v in member.state_dict().items()}
    theirs = OrderedDict(expand(fixture['layouts'][layout][str(split_factor)]))
    mapping = map_member_keys(layout, theirs, ours, imagenet=fixture['dataset'] == 'imagenet')
    unmapped = [k for k, v in mapping.items() if v is None]
    assert not unmapped
    dropped = [k for k, v in mapping.items() if v == '']
    kept = {v: k for k, v in mapping.items() if v}
    assert len(kept) == len(mapping) - len(dropped), 'two of their keys map to one of ours'
    assert set(kept) == set(ours)
    for our_key, their_key in kept.items():
        assert theirs[their_key] == ours[our_key], (their_key, our_key)
    if layout == 'shake':
        # their Shake-Shake blocks with in == out channels hold an unused 7-tensor shortcut: 3 stages x 3 blocks
        assert len(dropped) == 9 * 7 and all('.shortcut.' in k for k in dropped)
    else:
        assert not dropped


@pytest.mark.parametrize('arch', ['resnet50', 'seresnext101_64x4d', 'efficientnet_b7', 'pyramidnet272'])
def test_convert_whole_checkpoint_on_meta(arch):
    """The full path on a large network: their checkpoint dict, module. prefixes, S members (no memory)."""
    spec = AUTHORS_ARCHS[arch]
    ckpt = their_checkpoint(arch, spec.layouts[0], 2)
    with torch.device('meta'):
        model = create_splitnet(arch, 2, **authors_build_kwargs(arch, spec.layouts[0]))
    state = convert_authors_state_dict(ckpt, model)
    own = model.state_dict()
    assert list(state) == list(own)
    ids = {id(v) for v in ckpt['state_dict'].values()}
    assert all(id(v) in ids for v in state.values()) and len({id(v) for v in state.values()}) == len(state)
    build = authors_build_kwargs(arch, spec.layouts[0])
    if build:  # a default-built model would compute another function with these weights: refused
        with torch.device('meta'):
            default = create_splitnet(arch, 2)
        setting = next(iter(build))
        with pytest.raises(ValueError, match=f'not built the way the authors.*{setting}='):
            convert_authors_state_dict(ckpt, default)


# ----- real tensors on small networks: strict load and round trip -----

@pytest.mark.parametrize('arch,split_factor,num_classes', [
    ('resnet110', 2, 100), ('seresnet110', 4, 10), ('efficientnet_b0_cifar', 2, 100), ('wrn16_8', 1, 10)])
def test_convert_loads_strictly_and_keeps_every_tensor(arch, split_factor, num_classes):
    spec = AUTHORS_ARCHS[arch]
    ckpt = their_checkpoint(arch, spec.layouts[0], split_factor, device='cpu', num_classes=num_classes)
    model = create_splitnet(arch, split_factor, num_classes=num_classes, **authors_build_kwargs(arch))
    model.load_state_dict(convert_authors_state_dict(ckpt, model), strict=True)
    loaded = model.state_dict()
    mapping = {}
    for i in range(split_factor):
        member_keys = [k for k in loaded if k.startswith(f'models.{i}.')]
        theirs = [k[len(f'module.models.{i}.'):] for k in ckpt['state_dict'] if k.startswith(f'module.models.{i}.')]
        for t, o in map_member_keys(spec.layouts[0], theirs, [k.split('.', 2)[2] for k in member_keys],
                                    imagenet=False).items():
            mapping[f'module.models.{i}.{t}'] = f'models.{i}.{o}'
    assert len(set(mapping.values())) == len(loaded)
    for their_key, our_key in mapping.items():
        assert torch.equal(ckpt['state_dict'][their_key], loaded[our_key]), their_key


def test_shake_shake_drops_only_their_unused_shortcuts():
    ckpt = their_checkpoint('shake_shake26_2x96d', 'shake', 4, device='cpu', num_classes=10)
    model = create_splitnet('shake_shake26_2x96d', 4, num_classes=10)
    state = convert_authors_state_dict(ckpt, model)
    model.load_state_dict(state, strict=True)
    assert len(ckpt['state_dict']) - len(state) == 4 * 9 * 7
    assert torch.equal(state['models.3.layer3.0.shortcut.conv2.weight'],
                       ckpt['state_dict']['module.models.3.stage_3.0.shortcut.conv2.weight'])


def test_bare_state_dict_and_model_key_and_no_prefix():
    ckpt = their_checkpoint('resnet110', 'resnet', 2, device='cpu', num_classes=10)
    bare = {k[len('module.'):]: v for k, v in ckpt['state_dict'].items()}
    model = create_splitnet('resnet110', 2, num_classes=10)
    expected = convert_authors_state_dict(ckpt, model)
    for source in (bare, {'model': bare}, {'state_dict': ckpt['state_dict']}):
        state = convert_authors_state_dict(source, model)
        assert all(state[k] is expected[k] for k in expected)


# ----- errors: the message names the key, the model and what the file holds -----

@pytest.fixture(scope='module')
def resnet110_s2():
    return create_splitnet('resnet110', 2, num_classes=10)


def _ckpt(**kw):
    return their_checkpoint('resnet110', 'resnet', 2, device='cpu', num_classes=10, **kw)


def test_wrong_arch(resnet110_s2):
    ckpt = _ckpt()
    ckpt['arch'] = 'resnet164'
    with pytest.raises(ValueError, match=r'splitnet_resnet110_s2 \(S=2, 10 classes\).*another architecture, resnet164'):
        convert_authors_state_dict(ckpt, resnet110_s2)
    # the same keys without an arch name: the shapes say it (resnet164 has 18 blocks per stage)
    ckpt = their_checkpoint('resnet164', 'resnet', 2, device='cpu', num_classes=10)
    del ckpt['arch']
    with pytest.raises(ValueError, match=r"unknown key 'models\.0\.layer1\.1[2-7]\..*holds an unnamed network"):
        convert_authors_state_dict(ckpt, resnet110_s2)


def test_wrong_split_factor(resnet110_s2):
    ckpt = their_checkpoint('resnet110', 'resnet', 4, device='cpu', num_classes=10)
    with pytest.raises(ValueError, match=r'S=2 members expected, the file has 4.*holds resnet110 with S=4 member'):
        convert_authors_state_dict(ckpt, resnet110_s2)


def test_wrong_classes(resnet110_s2):
    with pytest.raises(ValueError, match=r'10 classes expected, the classifier has 100.*100 classes'):
        convert_authors_state_dict(their_checkpoint('resnet110', 'resnet', 2, device='cpu'), resnet110_s2)


def test_missing_unknown_and_mismatched_keys(resnet110_s2):
    ckpt = _ckpt()
    del ckpt['state_dict']['module.models.1.layer2.3.bn2.running_var']
    with pytest.raises(ValueError, match=r"missing from the file, e\.g\. 'models\.1\.layer2\.3\.bn2\.running_var'"):
        convert_authors_state_dict(ckpt, resnet110_s2)
    ckpt = _ckpt()
    ckpt['state_dict']['module.models.0.extra.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unknown key 'models\.0\.extra\.weight'"):
        convert_authors_state_dict(ckpt, resnet110_s2)
    ckpt = _ckpt()
    ckpt['state_dict']['module.models.0.layer1.0.conv1.weight'] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(ValueError, match=r"shape mismatch at 'models\.0\.layer1\.0\.conv1\.weight'.*\[3, 3, 1, 1\]"):
        convert_authors_state_dict(ckpt, resnet110_s2)
    with pytest.raises(ValueError, match=r"unknown key 'fc\.weight'.*models\.<i>\.<key>"):
        convert_authors_state_dict({'fc.weight': torch.zeros(10, 4)}, resnet110_s2)


def test_not_convertible_models_and_layouts():
    with pytest.raises(ValueError, match='convert to a SplitNet'):
        convert_authors_state_dict(_ckpt(), timm.create_model('resnet18'))
    ckpt = {'arch': 'densenet190', 'state_dict': {'module.models.0.conv1.weight': torch.zeros(80, 3, 3, 3),
                                                  'module.models.0.block1.layer.0.bn1.weight': torch.zeros(80)}}
    with pytest.raises(ValueError, match='densenet3.py DenseNet'):
        convert_authors_state_dict(ckpt, create_splitnet('densenet_bc190', 1, num_classes=100))


def test_model_built_without_the_authors_settings_is_refused(tmp_path):
    ckpt = their_checkpoint('efficientnet_b0_cifar', 'lightnet', 1, device='cpu')
    path = tmp_path / 'b0.pth.tar'
    torch.save(ckpt, path)
    model = create_splitnet('efficientnet_b0_cifar', 1)  # timm's BN eps 1e-5
    with pytest.raises(ValueError, match=r'not built the way.*eps.*bn_eps=0\.001'):
        load_authors_checkpoint(model, str(path))
    model = create_splitnet('efficientnet_b0_cifar', 1, bn_eps=1e-3)  # torch's fused SiLU
    with pytest.raises(ValueError, match=r"has \('activation', 'SiLU'\).*need \('activation', 'Swish'\).*"
                                         r"act_layer='swish_mul'"):
        load_authors_checkpoint(model, str(path))
    model = create_splitnet('efficientnet_b0_cifar', 1, bn_eps=1e-3, act_layer='swish_mul')
    assert 'converted to splitnet_efficientnet_b0_cifar_s1' in load_authors_checkpoint(model, str(path))


# ----- release zips -----

def write_release(path: Path, ckpt: dict, hparams: dict = None, md5: str = None, md5_name='model_best.md5') -> Path:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    data = buf.getvalue()
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as z:
        z.writestr(f'{path.stem}/model_best.pth.tar', data)
        digest = md5 or hashlib.md5(data).hexdigest()
        z.writestr(f'{path.stem}/{md5_name}', f'{digest}  model_best.pth.tar\n')
        if hparams is not None:
            z.writestr(f'{path.stem}/hparams_train.json', json.dumps(hparams))
        z.writestr(f'{path.stem}/val/events.out.tfevents.0', b'logs')
    return path


HPARAMS = {'arch': 'resnet110', 'split_factor': 2, 'loop_factor': 2, 'dataset': 'cifar10', 'num_classes': 10,
           'crop_size': 32}


@pytest.fixture(scope='module')
def release_zip(tmp_path_factory):
    root = tmp_path_factory.mktemp('release')
    return write_release(root / 'resnet110_split2_cifar10_128_01.zip', _ckpt(), HPARAMS)


def test_read_release_zip(release_zip):
    ckpt = read_authors_checkpoint(str(release_zip))
    assert ckpt.md5_checked and len(ckpt.md5) == 32
    assert ckpt.hparams['dataset'] == 'cifar10'
    assert (ckpt.arch, ckpt.split_factor, ckpt.num_classes, ckpt.best_acc1) == ('resnet110', 2, 10, 85.5)
    assert ckpt.source.endswith(':resnet110_split2_cifar10_128_01/model_best.pth.tar')
    assert authors_model_name(ckpt) == 'splitnet_resnet110_s2'
    assert is_authors_checkpoint(str(release_zip))


def test_export_then_timm_create_model_and_local_dir(release_zip, tmp_path):
    weights, meta = export_authors_checkpoint(str(release_zip), str(tmp_path / 'out'))
    assert meta['architecture'] == 'splitnet_resnet110_s2' and meta['source_md5'] and meta['authors_top1'] == '85.50'
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['architecture'] == 'splitnet_resnet110_s2' and config['num_classes'] == 10
    assert config['authors']['source'].endswith('model_best.pth.tar')
    model = timm.create_model('splitnet_resnet110_s2', pretrained=True, pretrained_cfg_overlay=dict(file=weights))
    assert (model.num_classes, model.pretrained_cfg['mean'], model.pretrained_cfg['std']) == (
        10, CIFAR10_MEAN, CIFAR10_STD)  # their CIFAR-10 normalisation, recorded in the file
    reference = create_splitnet('resnet110', 2, num_classes=10)
    load_authors_checkpoint(reference, str(release_zip))
    loaded = model.state_dict()
    for k, v in reference.state_dict().items():
        assert torch.equal(v, loaded[k]), k
    local = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert torch.equal(local.models[1].fc.weight, reference.models[1].fc.weight)


def test_export_records_build_settings(tmp_path):
    ckpt = their_checkpoint('efficientnet_b0_cifar', 'lightnet', 2, device='cpu')
    path = tmp_path / 'efficientnetb0_split2_cifar100_128_01.pth.tar'
    torch.save(ckpt, path)
    weights, meta = export_authors_checkpoint(str(path), str(tmp_path / 'out'))
    assert json.loads(meta['build_args']) == {'bn_eps': 1e-3, 'act_layer': 'swish_mul'}
    assert meta['authors_top1'] == '85.50'  # no release of that name: the checkpoint's own best_acc1
    model = timm.create_model('splitnet_efficientnet_b0_cifar_s2', pretrained=True,
                              pretrained_cfg_overlay=dict(file=weights))
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    assert not any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    assert sum(isinstance(m, Swish) for m in model.modules()) > 0  # x * sigmoid(x), as the authors' code computes it
    with pytest.raises(ValueError, match=r'needs splitnet_efficientnet_b0_cifar_s2 built with bn_eps=0\.001'):
        timm.create_model('splitnet_efficientnet_b0_cifar_s2', pretrained=True, bn_eps=1e-5,
                          pretrained_cfg_overlay=dict(file=weights))
    c100 = {'mean': CIFAR100_MEAN, 'std': CIFAR100_STD}
    build = {'bn_eps': 1e-3, 'act_layer': 'swish_mul'}
    assert checkpoint_build_kwargs(weights) == dict(build, num_classes=100, pretrained_cfg_overlay=c100)
    assert checkpoint_build_kwargs(str(path), {'num_classes': 100, 'pretrained_cfg_overlay': {'mean': (0, 0, 0)}}) \
        == dict(build, num_classes=100, pretrained_cfg_overlay=dict(c100, mean=(0, 0, 0)))
    with pytest.raises(ValueError, match='needs the model built with bn_eps=0.001'):
        checkpoint_build_kwargs(str(path), {'bn_eps': 1e-5})


def test_imagenet_crop_from_hparams_or_release_list():
    state = {'models.0.fc.weight': torch.zeros(1000, 8)}
    ckpt = AuthorsCheckpoint(path='run.pth.tar', source='run.pth.tar', state_dict=state,
                             hparams={'dataset': 'imagenet', 'crop_size': 416})
    assert authors_data_cfg(ckpt) == {'input_size': (3, 416, 416), 'pool_size': (13, 13)}
    ckpt = AuthorsCheckpoint(path='/dl/efficientnetb7_split2_imagenet_128_02.zip', source='x', state_dict=state)
    assert authors_data_cfg(ckpt)['input_size'] == (3, 320, 320)  # their release list: 320 px
    ckpt = AuthorsCheckpoint(path='model_best.pth.tar', source='x', state_dict=state)
    assert authors_data_cfg(ckpt) == {}  # nothing says the crop: the model's own cfg


def test_zip_errors(tmp_path, release_zip):
    data = release_zip.read_bytes()
    corrupt = tmp_path / 'corrupt.zip'
    corrupt.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='not a readable zip|damaged zip'):
        read_authors_checkpoint(str(corrupt))
    bad_md5 = write_release(tmp_path / 'bad_md5.zip', _ckpt(), HPARAMS, md5='0' * 32)
    with pytest.raises(ValueError, match=r'md5 [0-9a-f]{32} differs from the 0{32}.*damaged'):
        read_authors_checkpoint(str(bad_md5))
    no_ckpt = tmp_path / 'empty.zip'
    with zipfile.ZipFile(no_ckpt, 'w') as z:
        z.writestr('hparams_train.json', '{}')
    with pytest.raises(ValueError, match='expected one model_best.pth.tar'):
        read_authors_checkpoint(str(no_ckpt))


@pytest.mark.parametrize('change,message', [
    ({'arch': 'resnet164'}, r'arch resnet164 \(the model is their resnet110\)'),
    ({'split_factor': 4}, r'split_factor 4 \(the model has S=2\)'),
    ({'num_classes': 100}, r'num_classes 100 \(the model has 10\)'),
    ({'dataset': 'imagenet'}, r'dataset imagenet \(the model is for cifar\)'),
])
def test_hparams_mismatch_is_refused(tmp_path, change, message):
    path = write_release(tmp_path / 'x.zip', _ckpt(), dict(HPARAMS, **change))
    model = create_splitnet('resnet110', 2, num_classes=10)
    with pytest.raises(ValueError, match=message):
        load_authors_checkpoint(model, str(path))


def test_train_loader_converts_and_refuses_other_files(release_zip, tmp_path):
    """`load_weights` (train.py --initial-checkpoint / --pretrained-path) converts the authors' zip."""
    model = create_splitnet('resnet110', 2, num_classes=10)
    message = load_weights(model, str(release_zip), strict=True)
    assert 'the authors\' resnet110 with S=2 member(s), 10 classes, md5 checked' in message
    ours = tmp_path / 'ours.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'arch': 'splitnet_resnet110_s2'}, ours)
    assert not is_authors_checkpoint(str(ours))
    assert not is_authors_checkpoint(str(tmp_path / 'missing.pth'))


# ----- SE-ResNeXt stem pool -----

def test_seresnext_stem_pool_variants():
    with torch.device('meta'):
        ceil = timm.create_model('seresnext101_64x4d_splitnet', stem_pool='ceil')
        pad = timm.create_model('seresnext101_64x4d_splitnet')
    assert (ceil.maxpool.padding, ceil.maxpool.ceil_mode) == (0, True)
    assert (pad.maxpool.padding, pad.maxpool.ceil_mode) == (1, False)
    # the two pools see different windows: a lone maximum in the first row/column shows it
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 0, 0] = 1.
    x[0, 0, 2, 2] = 2.
    assert ceil.maxpool.to_empty(device='cpu')(x)[0, 0, 0, 0] == 2.
    assert pad.maxpool.to_empty(device='cpu')(x)[0, 0, 0, 0] == 1.
    with pytest.raises(ValueError, match='stem_pool must be one of'):
        timm.create_model('seresnext101_64x4d_splitnet', stem_pool='avg')


# ----- scripts -----

@pytest.mark.slow
def test_convert_script_and_validate_on_authors_zip(release_zip, tmp_path, image_folder):
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / 'scripts'))
    import convert_authors_checkpoint
    import validate
    out = tmp_path / 'converted'
    assert convert_authors_checkpoint.main([str(release_zip), '--model', 'splitnet_resnet110_s2', '--out',
                                            str(out)]) == 0
    with pytest.raises(SystemExit, match='hparams_train.json says split_factor 2'):
        convert_authors_checkpoint.main([str(release_zip), '--model', 'splitnet_resnet110_s4', '--out', str(out)])
    common = [str(image_folder), '--model', 'splitnet_resnet110_s2', '-b', '50', '-j', '0', '--device', 'cpu',
              '--log-freq', '0']
    rows = [validate.main(common + ['--checkpoint', str(p)]) for p in (release_zip, out / 'model.safetensors')]
    assert rows[0][0]['top1'] == rows[1][0]['top1']
    assert rows[0][0]['checkpoint'] == str(release_zip)


@pytest.mark.slow
def test_train_initial_checkpoint_authors_zip(image_folder, tmp_path, caplog):
    """train.py --initial-checkpoint takes their zip (a ResNet-110 cut to one block per stage, as the tiny model)."""
    import importlib.util
    import re
    ckpt = _ckpt()
    one_block = re.compile(r'\.layer[1-9]\.[1-9]\d*\.')  # blocks 1.. of the stages: the tiny model has block 0 only
    ckpt['state_dict'] = OrderedDict((k, v) for k, v in ckpt['state_dict'].items() if not one_block.search(k))
    path = write_release(tmp_path / 'resnet110_split2_cifar10_128_09.zip', ckpt, HPARAMS)
    spec = importlib.util.spec_from_file_location('splitnet_train_script_authors', ROOT / 'train.py')
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    caplog.set_level('INFO')
    train.main([str(a) for a in (
        '--data-dir', image_folder, '--model', 'splitnet_resnet110_s2', '--model-kwargs', 'layers=(1,1,1)', '-b', 32,
        '--workers', 0, '--device', 'cpu', '--epochs', 1, '--warmup-epochs', 0, '--output', tmp_path / 'out',
        '--experiment', 'authors', '--initial-checkpoint', path)])
    lines = [r.getMessage() for r in caplog.records if 'converted to splitnet_resnet110_s2' in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith('--initial-checkpoint: loaded resnet110_split2_cifar10_128_09.zip:')
