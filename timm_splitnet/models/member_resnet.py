""" ImageNet ResNet member backbones that timm's ResNet kwargs cannot express (plain timm models, not SplitNets)

`seresnext101_64x4d_splitnet`: SE-ResNeXt-101 64x4d with a 64-64-64 deep stem, avg-pool shortcuts and SE after the
last BN, built with timm's `ResNet`; `seresnext101_64x4d_b_splitnet` the same with timm's 64-64-128 deep stem (the
authors' "_B" variant) and `seresnet50_splitnet` SE-ResNet-50 with the flat stem (the authors' SE-ResNet-50).
`stem_pool='ceil'` selects the stem max-pool of the SENet code the paper's authors trained with (Cadene's: no padding,
ceil mode) instead of timm's. See docs/models.md.

Paper: `SplitNet: Divide and Co-training` - https://arxiv.org/abs/2011.14660
"""
from functools import partial

import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.layers import SEModule
from timm.models.resnet import Bottleneck, ResNet

__all__ = ['STEM_POOLS']

# stem max-pool variants: timm's MaxPool2d(3, 2, padding=1), or Cadene's SENet MaxPool2d(3, 2, ceil_mode=True)
STEM_POOLS = ('pad', 'ceil')


def _flat_deep_stem(model: ResNet, in_chans: int, stem_width: int) -> None:
    """Widen timm's deep stem (w/2, w/2, w) to (w, w, w) in place, keeping its module names."""
    stem = model.conv1
    norm = type(stem[1])
    stem[0] = nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False)
    stem[1] = norm(stem_width)
    stem[3] = nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False)
    stem[4] = norm(stem_width)
    stem[6] = nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False)
    for m in stem.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')


def _set_stem_pool(model: ResNet, stem_pool: str) -> None:
    """Select the stem max-pool: 'pad' (timm's, padding 1) or 'ceil' (no padding, ceil mode, as Cadene's SENet).

    Both halve an even input; they differ in where the 3x3 windows sit, so weights trained with one give other
    outputs with the other.
    """
    if stem_pool == 'ceil':
        model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)


def _create_flat_stem_resnet(
        variant: str, pretrained: bool = False, stem_width: int = 64, stem_pool: str = 'pad', **kwargs) -> ResNet:
    kwargs.setdefault('in_chans', 3)
    if stem_pool not in STEM_POOLS:
        raise ValueError(f'{variant}: stem_pool must be one of {STEM_POOLS}, got {stem_pool!r}.')
    model = build_model_with_cfg(
        ResNet, variant, pretrained, stem_type='deep', stem_width=stem_width // 2, avg_down=True, **kwargs)
    _flat_deep_stem(model, kwargs['in_chans'], stem_width)
    _set_stem_pool(model, stem_pool)
    return model


def _create_deep_stem_resnet(
        variant: str, pretrained: bool = False, stem_width: int = 64, stem_pool: str = 'pad', **kwargs) -> ResNet:
    """timm's deep stem (w, w, 2w) and avg-pool shortcuts, with the stem max-pool of `stem_pool`."""
    if stem_pool not in STEM_POOLS:
        raise ValueError(f'{variant}: stem_pool must be one of {STEM_POOLS}, got {stem_pool!r}.')
    model = build_model_with_cfg(
        ResNet, variant, pretrained, stem_type='deep', stem_width=stem_width, avg_down=True, **kwargs)
    _set_stem_pool(model, stem_pool)
    return model


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.87,
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1.0', 'classifier': 'fc', 'paper_ids': 'arXiv:2011.14660', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'seresnext101_64x4d_splitnet.untrained': _cfg(),
    'seresnext101_64x4d_b_splitnet.untrained': _cfg(),
    'seresnet50_splitnet.untrained': _cfg(),
})


@register_model
def seresnext101_64x4d_splitnet(pretrained: bool = False, **kwargs) -> ResNet:
    """SE-ResNeXt-101 64x4d with the SplitNet paper's 64-64-64 deep stem. SplitNet divides `cardinality`.

    `stem_pool='ceil'` builds the authors' stem max-pool (their released weights need it).
    """
    model_args = dict(
        block=Bottleneck, layers=(3, 4, 23, 3), cardinality=64, base_width=4, block_args=dict(attn_layer='se'))
    return _create_flat_stem_resnet('seresnext101_64x4d_splitnet', pretrained, **dict(model_args, **kwargs))


@register_model
def seresnext101_64x4d_b_splitnet(pretrained: bool = False, **kwargs) -> ResNet:
    """SE-ResNeXt-101 64x4d with timm's 64-64-128 deep stem (the authors' "_B" variant). SplitNet divides
    `cardinality`; `stem_pool='ceil'` builds the authors' stem max-pool."""
    model_args = dict(
        block=Bottleneck, layers=(3, 4, 23, 3), cardinality=64, base_width=4, block_args=dict(attn_layer='se'))
    return _create_deep_stem_resnet('seresnext101_64x4d_b_splitnet', pretrained, **dict(model_args, **kwargs))


@register_model
def seresnet50_splitnet(pretrained: bool = False, **kwargs) -> ResNet:
    """SE-ResNet-50 with a flat deep stem (`stem_width` x 3) and SE reduced to exactly 1/16 of the channels (timm's
    default rounds to multiples of 8). SplitNet divides `stem_width` and the stage widths; `stem_pool='ceil'` builds
    the authors' stem max-pool."""
    model_args = dict(
        block=Bottleneck, layers=(3, 4, 6, 3), block_args=dict(attn_layer=partial(SEModule, rd_divisor=1)))
    return _create_flat_stem_resnet('seresnet50_splitnet', pretrained, **dict(model_args, **kwargs))
