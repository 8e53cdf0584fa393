"""timm's feature API on SplitNets and their members: `features_only=True`, `forward_intermediates`,
`prune_intermediate_layers`, `feature_info` and `out_indices` (CPU, small configurations of each family)."""
import pytest
import torch

import timm
from timm.models._features import FeatureGetterNet

import timm_splitnet  # noqa: F401 (registers the models)

# one registered SplitNet of every member family (S=2), made small through the members' kwargs, and its input size
FAMILIES = {
    'splitnet_resnet110_s2': (dict(layers=(1, 1, 1)), 16),
    'splitnet_seresnet110_s2': (dict(layers=(1, 1, 1)), 16),
    'splitnet_wrn16_8_s2': (dict(layers=(1, 1, 1)), 16),
    'splitnet_resnext29_8x64d_s2': (dict(layers=(1, 1, 1), base_width=4), 16),
    'splitnet_densenet_bc190_s2': (dict(block_config=(2, 2, 2)), 16),
    'splitnet_pyramidnet272_s2': (dict(layers=(2, 2, 2)), 16),
    'splitnet_shake_shake26_2x96d_s2': (dict(layers=(1, 1, 1)), 16),
    'splitnet_efficientnet_b0_cifar_s2': (dict(), 16),
    'splitnet_resnet50_s2': (dict(layers=(1, 1, 1, 1)), 64),
}
BATCH = 2


@pytest.fixture(autouse=True)
def one_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def build(name: str, **kwargs):
    member_kwargs, _ = FAMILIES[name]
    torch.manual_seed(0)
    return timm.create_model(name, **dict(member_kwargs, **kwargs)).eval()


def views(name: str, split_factor: int = 2) -> torch.Tensor:
    size = FAMILIES[name][1]
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3 * split_factor, size, size, generator=g)


def member_intermediates(model, x, **kwargs):
    """Every member's own `forward_intermediates` on its view."""
    return [m.forward_intermediates(v, **kwargs) for m, v in zip(model.models, x.chunk(model.split_factor, dim=1))]


@pytest.mark.parametrize('name', list(FAMILIES))
def test_features_only_shapes_and_feature_info(name):
    model = build(name)
    member_info = model.models[0].feature_info
    features = build(name, features_only=True)
    assert isinstance(features, FeatureGetterNet)
    x = views(name)
    with torch.no_grad():
        outs = features(x)
    info = features.feature_info
    assert len(outs) == len(member_info) == len(info)
    assert info.channels() == [2 * d['num_chs'] for d in member_info]
    assert info.reduction() == [d['reduction'] for d in member_info]
    assert info.module_name() == [d['module'] for d in member_info]
    size = x.shape[-1]
    for out, chs, red in zip(outs, info.channels(), info.reduction()):
        assert tuple(out.shape) == (BATCH, chs, size // red, size // red)
    with torch.no_grad():  # the features_only model holds the same weights: its features are the model's
        for out, ref in zip(outs, model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(out, ref)


@pytest.mark.parametrize('name', list(FAMILIES))
def test_intermediates_are_the_members_concatenated(name):
    model = build(name)
    x = views(name)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        members = member_intermediates(model, x)
        assert len(intermediates) == len(model.feature_info)
        for level, feats in enumerate(intermediates):
            torch.testing.assert_close(feats, torch.cat([m[1][level] for m in members], dim=1))
            assert feats.shape[1] == model.feature_info[level]['num_chs']
        torch.testing.assert_close(final, torch.cat([m[0] for m in members], dim=1))
        torch.testing.assert_close(final, model.forward_features(x))  # consistent with forward_features
        for member, (member_final, _) in zip(model.models, members):  # each member: its own forward_features
            assert member_final.shape[1] == member.num_features
        # one image for every member: the same features as S copies of the view
        shared = model.forward_intermediates(x[:, :3], intermediates_only=True)
        doubled = model.forward_intermediates(torch.cat([x[:, :3]] * 2, dim=1), intermediates_only=True)
        for a, b in zip(shared, doubled):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', list(FAMILIES))
def test_out_indices_and_prune(name):
    model = build(name)
    num_levels = len(model.feature_info)
    x = views(name)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        selected = (1, num_levels - 1)
        features = build(name, features_only=True, out_indices=selected)
        outs = features(x)
        assert len(outs) == 2 and features.feature_info.channels() == [model.feature_info[i]['num_chs']
                                                                       for i in selected]
        for out, i in zip(outs, selected):
            torch.testing.assert_close(out, full[i])
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two[0], full[-2])
        early_final, early = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
        torch.testing.assert_close(early[1], full[1])

        pruned = build(name)
        num_params = sum(p.numel() for p in pruned.parameters())
        assert pruned.prune_intermediate_layers([0, 1]) == [0, 1]
        assert sum(p.numel() for p in pruned.parameters()) < num_params
        assert pruned.num_classes == 0 and pruned.num_features == model.feature_info[1]['num_chs']
        kept = pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        torch.testing.assert_close(kept[0], full[0])
        torch.testing.assert_close(kept[1], full[1])
        out = pruned(x)  # no head (timm: no classifier, no pooling): the members' last kept maps concatenated
        assert out.shape == full[1].shape


def test_prune_keeps_the_last_level_and_drops_the_head():
    model = build('splitnet_pyramidnet272_s2')
    x = views('splitnet_pyramidnet272_s2')
    with torch.no_grad():
        ref = model.forward_intermediates(x, intermediates_only=True)
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], model.forward_features(x))  # norm: the final BN-ReLU on the last level
        assert model.prune_intermediate_layers(indices=2, prune_norm=True) == [2, 3]
        assert model.num_classes == 0 and model.num_features == model.feature_info[-1]['num_chs']
        out = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(out[1], ref[3])
        torch.testing.assert_close(model.forward_features(x), ref[3])  # the final norm is pruned


@pytest.mark.parametrize('member', ['resnet110_cifar', 'densenet_bc190_cifar', 'pyramidnet272_cifar',
                                    'shake_shake26_2x96d_cifar'])
def test_cifar_member_intermediates_and_grad_checkpointing(member):
    kwargs = {
        'resnet110_cifar': dict(layers=(1, 1, 1)),
        'densenet_bc190_cifar': dict(growth_rate=4, block_config=(2, 2, 2)),
        'pyramidnet272_cifar': dict(layers=(1, 1, 1), alpha=12.),
        'shake_shake26_2x96d_cifar': dict(layers=(1, 1, 1), base_width=8),
    }[member]
    torch.manual_seed(0)
    model = timm.create_model(member, **kwargs).eval()
    x = torch.randn(BATCH, 3, 16, 16)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        for feats, info in zip(intermediates, model.feature_info):
            assert tuple(feats.shape) == (BATCH, info['num_chs'], 16 // info['reduction'], 16 // info['reduction'])
    model.train()
    torch.manual_seed(1)
    ref = model.forward_intermediates(x, intermediates_only=True)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    out[-1].mean().backward()
    assert model.get_submodule(model.feature_levels[0][0]).weight.grad is not None


@pytest.mark.parametrize('name', ['splitnet_densenet_bc190_s2', 'splitnet_pyramidnet272_s2'])
def test_features_only_of_the_full_size_models(name):
    features = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        outs = features(torch.randn(1, 3, 16, 16))
    assert [o.shape[1] for o in outs] == features.feature_info.channels()
    assert [16 // o.shape[-1] for o in outs] == features.feature_info.reduction() == [1, 1, 2, 4]


@pytest.mark.parametrize('feature_cls', ['hook', 'fx', 'list', 'dict'])
def test_feature_classes_other_than_getter_are_refused_by_name(feature_cls):
    # a SplitNet level is the members' outputs concatenated: only timm's getter (forward_intermediates) builds it
    with pytest.raises(ValueError, match=f"feature_cls='getter'.*not '{feature_cls}'"):
        build('splitnet_resnet110_s2', features_only=True, feature_cls=feature_cls)
    features = build('splitnet_resnet110_s2', features_only=True, feature_cls='getter')
    assert isinstance(features, FeatureGetterNet)
