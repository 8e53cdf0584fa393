"""SplitNet wrapper, division rules, registry and weights (CPU)."""
import ast
import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F

import timm
import timm_splitnet  # noqa: F401
from timm.optim import create_optimizer_v2
from timm_splitnet import SplitNet, create_splitnet, load_safetensors, save_safetensors
from timm_splitnet.models.division import (
    EFFICIENTNET_CHANNELS, SPLIT_ARCHS, densenet_growth_rate, divide_drop_rate, divide_weight_decay, member_kwargs,
    pyramidnet_alpha, resnext_cardinality, shakedrop_prob, supported_split_factors, wrn_widen_factor,
)
from timm_splitnet.models import division, splitnet_entrypoints
from timm_splitnet.models.splitnet import REGISTERED_SPLIT_FACTORS, splitnet_name

torch.set_num_threads(2)


def tiny(split_factor=2, num_classes=5, **kwargs):
    """A fast SplitNet of timm's tiny test ResNet."""
    torch.manual_seed(0)
    return SplitNet('test_resnet', split_factor, num_classes=num_classes, **kwargs)


# ----- division rules (paper Appendix A) -----

def test_cifar_resnet_stage_widths():
    widths = {s: [member_kwargs('resnet110', s)['stem_width'] * m for m in (1, 2, 4)] for s in (1, 2, 4)}
    assert widths == {1: [16, 32, 64], 2: [12, 24, 48], 4: [8, 16, 32]}
    assert member_kwargs('seresnet164', 2) == member_kwargs('resnet164', 2)


@pytest.mark.parametrize('w,expected', [(10, (10, 7, 5)), (8, (8, 6, 4)), (12, (12, 8, 6)), (2, (2, 1, 1))])
def test_wrn_widen_factor_eq11(w, expected):
    assert tuple(wrn_widen_factor(w, s) for s in (1, 2, 4)) == expected
    assert tuple(max(math.floor(w / math.sqrt(s) + 0.4), 1) for s in (1, 2, 4)) == expected


def test_resnext_cardinality_eq12():
    assert [resnext_cardinality(8, s) for s in (1, 2, 4, 16)] == [8, 4, 2, 1]
    assert member_kwargs('resnext101_64x4d', 2)['cardinality'] == 32
    assert member_kwargs('resnext29_8x64d', 4) == dict(cardinality=2)


def test_efficientnet_channel_tables():
    assert EFFICIENTNET_CHANNELS[1] == (32, 16, 24, 40, 80, 112, 192, 320, 1280)
    assert member_kwargs('efficientnet_b7', 2)['stage_channels'] == (24, 12, 16, 24, 56, 80, 136, 224, 920)
    assert member_kwargs('efficientnet_b0_cifar', 4)['stage_channels'] == (16, 12, 16, 20, 40, 56, 96, 160, 640)


def test_densenet_pyramidnet_shake_shake_rules():
    assert [densenet_growth_rate(40, s) for s in (1, 2, 4)] == [40, 28, 20]  # eq. 13
    assert member_kwargs('densenet_bc190', 2) == dict(growth_rate=28)
    assert pyramidnet_alpha(200, 2) == pytest.approx(200 / math.sqrt(2))  # eq. 14
    assert shakedrop_prob(0.5, 4) == pytest.approx(0.25)  # eq. 15
    assert member_kwargs('pyramidnet272', 4) == dict(alpha=pytest.approx(100.), shakedrop_prob=pytest.approx(0.25))
    assert [member_kwargs('shake_shake26_2x96d', s)['base_width'] for s in (1, 2, 4)] == [96, 64, 48]


def test_imagenet_resnet_rules():
    assert member_kwargs('resnet50', 2) == dict(stem_type='deep', stem_width=44, avg_down=True,
                                                channels=(44, 88, 176, 352))
    assert member_kwargs('wrn50_3', 2)['base_width'] == 128 and member_kwargs('wrn50_3', 1)['base_width'] == 192
    assert member_kwargs('wrn50_2', 2)['base_width'] == 64
    assert member_kwargs('wrn50_2', 4)['stem_width'] == 32 and member_kwargs('wrn50_2', 4)['base_width'] == 128


def test_drop_and_weight_decay_division():
    assert divide_drop_rate(0.2, 4) == pytest.approx(0.1)
    assert divide_weight_decay(1e-4, 2, 'exp') == pytest.approx(1e-4 * 0.60653, rel=1e-4)  # eq. 6
    assert divide_weight_decay(1e-4, 4, 'exp') == pytest.approx(1e-4 * 0.47237, rel=1e-4)
    assert divide_weight_decay(1e-4, 4, 'linear') == pytest.approx(0.25e-4)  # eq. 16
    assert divide_weight_decay(1e-4, 4, 'none') == 1e-4
    with pytest.raises(ValueError, match='linear'):
        divide_weight_decay(1e-4, 2, 'sqrt')


def test_unsupported_split_factor_names_arch_and_supported():
    with pytest.raises(ValueError, match=r'efficientnet_b7.*S=3.*1, 2, 4'):
        create_splitnet('efficientnet_b7', 3)
    with pytest.raises(ValueError, match=r'resnet110.*S=3.*1, 2, 4, 8, 16'):
        member_kwargs('resnet110', 3)
    with pytest.raises(ValueError, match='Unknown SplitNet architecture'):
        create_splitnet('vgg16', 2)


def test_general_split_factor():
    with torch.device('meta'):
        m = create_splitnet('wrn16_8', 3)
    assert m.split_factor == 3 and len(m.models) == 3
    assert m.models[0].num_features == 16 * 5 * 4  # widen factor 8/sqrt(3)+0.4 -> 5
    assert m.pretrained_cfg['architecture'] == 'splitnet_wrn16_8_s3'


# ----- registry -----

def test_registry_lists_every_entrypoint():
    names = set(timm.list_models('splitnet_*'))
    expected = {f'splitnet_{a}_s{s}' for a in SPLIT_ARCHS for s in (1, 2, 4)}
    assert expected <= names
    assert len(SPLIT_ARCHS) == 22
    # the tables' S (e.g. CIFAR ResNets 1, 2, 4, 8, 16) and 1 to 16 for the formula rules (e.g. WRN)
    assert timm.list_models('splitnet_resnet110_s*') == [f'splitnet_resnet110_s{s}' for s in (1, 2, 4, 8, 16)]
    assert set(timm.list_models('splitnet_wrn16_8_s*')) == {f'splitnet_wrn16_8_s{s}' for s in range(1, 17)}
    assert not timm.is_model('splitnet_wrn16_8_s17') and not timm.is_model('splitnet_efficientnet_b7_s8')


def test_every_split_factor_of_a_rule_is_in_timms_registry(tmp_path):
    """timm.create_model, and local-dir: of an exported S=3 model, reach any S a division rule defines."""
    with torch.device('meta'):
        model = timm.create_model('splitnet_wrn16_8_s3')
    assert isinstance(model, SplitNet) and model.split_factor == 3
    assert model.models[0].num_features == 16 * 5 * 4  # widen factor floor(8 / sqrt(3) + 0.4) = 5
    assert model.pretrained_cfg['architecture'] == 'splitnet_wrn16_8_s3' and model.num_classes == 100
    torch.manual_seed(0)
    model = timm.create_model('splitnet_wrn16_8_s3', num_classes=10, layers=(1, 1, 1)).eval()
    timm_splitnet.export_model(model, str(tmp_path))
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert isinstance(reloaded, SplitNet) and reloaded.split_factor == 3 and reloaded.num_classes == 10
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def test_an_s_the_rule_does_not_define_gives_the_rules_message(tmp_path):
    with pytest.raises(ValueError, match=r'^resnet110: its division rule does not define S=5; supported S: 1, 2, 4, '
                                         r'8, 16\.$'):
        timm_splitnet.create_model('splitnet_resnet110_s5')
    with pytest.raises(ValueError, match='wrn16_8: .* S=17; supported S: 1 to 16'):
        timm_splitnet.create_model('splitnet_wrn16_8_s17')
    (tmp_path / 'config.json').write_text('{"architecture": "splitnet_resnet110_s5", "num_classes": 10, '
                                          '"pretrained_cfg": {}}')
    with pytest.raises(ValueError, match='does not define S=5'):
        timm_splitnet.create_model(f'local-dir:{tmp_path}')
    with pytest.raises(RuntimeError, match='Unknown model'):  # not a SplitNet name: timm's own error
        timm_splitnet.create_model('splitnet_nonesuch_s2')
    with torch.device('meta'):  # registered names go straight to timm
        assert timm_splitnet.create_model('splitnet_resnet110_s8').split_factor == 8


def test_split_arch_rows_use_keyword_fields():
    rows = [n for n in ast.walk(ast.parse(inspect.getsource(division)))
            if isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'SplitArch']
    assert len(rows) == len(SPLIT_ARCHS)
    assert all(not row.args and {k.arg for k in row.keywords} >= {'name', 'member', 'divide'} for row in rows)


def test_every_registered_name_is_defined_in_source():
    # the registry holds exactly one name per (arch, S the rule defines); S = 1, 2, 4 are a `def` that grep finds,
    # the others are registered by the module's loop in the same form
    names = set(timm.list_models('splitnet_*'))
    assert names == {splitnet_name(a, s) for a in SPLIT_ARCHS for s in supported_split_factors(a)}
    written = {splitnet_name(a, s) for a in SPLIT_ARCHS for s in REGISTERED_SPLIT_FACTORS}
    source = inspect.getsource(splitnet_entrypoints)
    defined = set(re.findall(r'^def (splitnet_\w+)\(pretrained: bool = False, \*\*kwargs\) -> SplitNet:', source, re.M))
    assert defined == written
    cfg_keys = set(re.findall(r"^    '(splitnet_\w+)': splitnet_cfg\(", source, re.M))
    assert cfg_keys == written
    for name in names:
        fn = timm.models.model_entrypoint(name)
        assert fn is getattr(splitnet_entrypoints, name) and fn.__name__ == name and fn.__doc__
        assert timm.models.get_pretrained_cfg(name).architecture == name


@pytest.mark.parametrize('name', sorted(f'splitnet_{a}_s{s}' for a in SPLIT_ARCHS for s in (1, 2, 4)))
def test_every_model_builds(name):
    with torch.device('meta'):
        m = timm.create_model(name)
    s = int(name.rsplit('_s', 1)[1])
    assert isinstance(m, SplitNet) and len(m.models) == s
    cfg = m.pretrained_cfg
    assert m.num_classes == cfg['num_classes'] == (1000 if SPLIT_ARCHS[name[9:].rsplit('_s', 1)[0]].dataset ==
                                                   'imagenet' else 100)
    keys = set(m.state_dict())
    for n in (*cfg['first_conv'], *cfg['classifier']):
        assert f'{n}.weight' in keys


# ----- wrapper behaviour -----

def test_train_mode_member_logits_and_views():
    m = tiny(2).train()
    m.set_cotraining(True)
    x = torch.randn(4, 3, 32, 32)
    assert m(x).shape == (2, 4, 5)
    views = torch.randn(4, 6, 32, 32)
    m.eval()  # deterministic BN to compare with the members run directly
    out = m.forward_members(views)
    assert torch.allclose(out[0], m.models[0](views[:, :3]), atol=1e-6)
    assert torch.allclose(out[1], m.models[1](views[:, 3:]), atol=1e-6)
    with pytest.raises(ValueError, match=r'\[B, 3, H, W\].*\[B, 6, H, W\]'):
        m(torch.randn(2, 4, 32, 32))


@pytest.mark.parametrize('ensemble,softmax', [('mean', False), ('max', False), ('mean', True), ('max', True)])
def test_ensemble_manners(ensemble, softmax):
    m = tiny(3, ensemble=ensemble, ensemble_softmax=softmax).eval()
    x = torch.randn(2, 3, 32, 32)
    members = [net(x) for net in m.models]
    vals = [F.softmax(z, -1) for z in members] if softmax else members
    if ensemble == 'mean':
        expected = (vals[0] + vals[1] + vals[2]) / 3
    else:
        expected = torch.maximum(torch.maximum(vals[0], vals[1]), vals[2])
    assert torch.allclose(m(x), expected, atol=1e-6)
    assert m.forward_members(x).shape == (3, 2, 5)
    with pytest.raises(ValueError, match='ensemble'):
        m.set_ensemble('median')


def test_forward_backward_and_independent_init():
    m = tiny(2).train()
    out = m(torch.randn(2, 6, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    w0, w1 = (net.conv1[0].weight for net in m.models)
    assert not torch.equal(w0, w1)


def test_timm_model_api():
    m = tiny(2).eval()
    member = m.models[0]
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape[1] == m.num_features == 2 * member.num_features
    assert torch.allclose(m.forward_head(feats), m(x), atol=1e-6)
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.head_hidden_size)
    m.set_grad_checkpointing(True)
    assert all(net.grad_checkpointing for net in m.models)
    m.reset_classifier(0)
    assert m(x).shape == (2, m.num_features)
    m.reset_classifier(0, '')
    assert m(x).ndim == 4
    m.reset_classifier(7, 'avg')
    assert m(x).shape == (2, 7) and m.num_classes == 7


def test_layer_decay_groups_members_by_depth():
    m = tiny(2)
    opt = create_optimizer_v2(m, 'sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.5)
    scale_of = {}
    for group in opt.param_groups:
        for p in group['params']:
            scale_of[id(p)] = group['lr_scale']
    named = dict(m.named_parameters())
    assert scale_of[id(named['models.0.conv1.0.weight'])] == scale_of[id(named['models.1.conv1.0.weight'])]
    assert scale_of[id(named['models.0.conv1.0.weight'])] < scale_of[id(named['models.1.layer4.0.conv1.weight'])]
    assert scale_of[id(named['models.0.fc.weight'])] == scale_of[id(named['models.1.fc.weight'])] == 1.0


def test_create_model_kwargs_are_divided():
    m = timm.create_model('splitnet_resnet110_s4', num_classes=10, in_chans=1, drop_rate=0.2, drop_path_rate=0.1)
    first_conv = m.get_submodule(m.pretrained_cfg['first_conv'][0])
    assert m.num_classes == 10 and first_conv.in_channels == 1
    assert m.models[0].drop_rate == pytest.approx(0.1)
    m.set_cotraining(True)
    assert m(torch.randn(2, 4, 32, 32)).shape == (4, 2, 10)


# ----- weights -----

def test_safetensors_round_trip_through_create_model(tmp_path):
    m = timm.create_model('splitnet_resnet110_s2', num_classes=10).eval()
    path = str(tmp_path / 'w.safetensors')
    save_safetensors(m, path)
    m2 = timm.create_model(
        'splitnet_resnet110_s2', pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    assert m2.num_classes == 10
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x), m2(x))
    loaded = m2.state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded[k]), k


def test_wrong_weights_raise_naming_both_sides(tmp_path):
    m2 = timm.create_model('splitnet_resnet110_s2', num_classes=10)
    path = str(tmp_path / 'w.safetensors')
    save_safetensors(m2, path)
    with pytest.raises(ValueError, match=r'splitnet_resnet110_s2.*S=2.*splitnet_resnet110_s4'):
        timm.create_model('splitnet_resnet110_s4', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    m4 = timm.create_model('splitnet_resnet110_s4', num_classes=10)
    with pytest.raises(ValueError, match=r'S=2.*S=4'):
        load_safetensors(m4, path)
    m_cls = timm.create_model('splitnet_resnet110_s2', num_classes=100)
    with pytest.raises(ValueError, match=r'10 classes.*100 classes'):
        load_safetensors(m_cls, path)
    with pytest.raises(ValueError, match=r'splitnet_resnet110_s4 \(S=4.*2 member\(s\)'):
        m4.load_state_dict(m2.state_dict())
    with pytest.raises(ValueError, match=r'no SplitNet members'):
        m4.load_state_dict(m2.models[0].state_dict())
    with pytest.raises(ValueError, match='shape mismatch'):
        m_cls.load_state_dict(m2.state_dict())
