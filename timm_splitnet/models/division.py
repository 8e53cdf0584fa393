""" SplitNet division rules (paper §3.1, Appendix A)

`SPLIT_ARCHS` maps every SplitNet architecture to the timm model of one member and the rule that divides it into S
narrower members; `member_kwargs(arch, S)` gives one member's `timm.create_model` kwargs. See docs/models.md.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = [
    'CIFAR_RESNET_STEM_WIDTH', 'IMAGENET_RESNET_STEM_WIDTH', 'EFFICIENTNET_CHANNELS', 'EFFICIENTNET_DIVISOR',
    'SHAKE_SHAKE_BASE_WIDTH', 'WD_DIVIDE_MODES', 'SplitArch', 'SPLIT_ARCHS', 'wrn_widen_factor', 'resnext_cardinality',
    'densenet_growth_rate', 'pyramidnet_alpha', 'shakedrop_prob', 'divide_drop_rate', 'divide_weight_decay',
    'get_split_arch', 'member_kwargs', 'supported_split_factors', 'WRN50_STEM_WIDTH', 'MemberKwargs', 'DivisionRule',
    'FORMULA_SPLIT_FACTORS',
]

# ResNet / SE-ResNet on CIFAR: width W of the stem and of the first stage (stages are W*[1, 2, 4]), Appendix A.
CIFAR_RESNET_STEM_WIDTH = {1: 16, 2: 12, 4: 8, 8: 6, 16: 4}

# ImageNet ResNet (groups == 1): deep-stem width W, stages W*[1, 2, 4, 8] (the authors' code; GCD / sqrt(S), rounded).
IMAGENET_RESNET_STEM_WIDTH = {1: 64, 2: 44, 4: 32, 8: 24}

# EfficientNet [stem, 7 stage outputs, head] before the B-variant width multiplier, Appendix A.
EFFICIENTNET_CHANNELS = {
    1: (32, 16, 24, 40, 80, 112, 192, 320, 1280),
    2: (24, 12, 16, 24, 56, 80, 136, 224, 920),
    4: (16, 12, 16, 20, 40, 56, 96, 160, 640),
}
# channel rounding divisor of the tables above (the divided tables are multiples of 4, not 8)
EFFICIENTNET_DIVISOR = {1: 8, 2: 4, 4: 4}

# Shake-Shake 26 2x96d: base width b, channels [16, b, 2b, 4b] (stem 16 is not divided), Appendix A.
SHAKE_SHAKE_BASE_WIDTH = {1: 96, 2: 64, 4: 48, 8: 32, 16: 24}

# WRN-50-k on ImageNet (authors' code): S -> (stem width W, multiplier of the bottleneck base width 64 * k).
# S=2 divides the widen factor with eq. 11 and keeps the stem; S=4 halves the stem and keeps the widen factor.
WRN50_STEM_WIDTH = {1: 64, 2: 64, 4: 32}

WD_DIVIDE_MODES = ('none', 'exp', 'linear')

# the S a formula rule (a row without a table, split_factors=None) is defined for: 1 to 16, the largest S of the
# paper's division tables; every one of them is registered in timm
FORMULA_SPLIT_FACTORS = tuple(range(1, 17))

MemberKwargs = Dict[str, Any]
# a division rule: S -> the `timm.create_model` kwargs of one member
DivisionRule = Callable[[int], MemberKwargs]


def wrn_widen_factor(widen_factor: float, split_factor: int) -> int:
    """WRN widen factor after division, eq. 11: max(floor(w / sqrt(S) + 0.4), 1)."""
    return int(max(math.floor(widen_factor / math.sqrt(split_factor) + 0.4), 1))


def resnext_cardinality(cardinality: int, split_factor: int) -> int:
    """ResNeXt cardinality after division, eq. 12: max(floor(d / S), 1)."""
    return max(cardinality // split_factor, 1)


def densenet_growth_rate(growth_rate: int, split_factor: int) -> int:
    """DenseNet growth rate after division, eq. 13: floor(2k / sqrt(S)) / 2, floored to an integer as in the code."""
    return max(int(2 * growth_rate / math.sqrt(split_factor)) // 2, 1)


def pyramidnet_alpha(alpha: float, split_factor: int) -> float:
    """PyramidNet widening (add rate) after division, eq. 14: alpha / sqrt(S)."""
    return alpha / math.sqrt(split_factor)


def shakedrop_prob(prob: float, split_factor: int) -> float:
    """Final ShakeDrop probability after division, eq. 15: p / sqrt(S)."""
    return prob / math.sqrt(split_factor)


def divide_drop_rate(rate: float, split_factor: int) -> float:
    """Dropout and drop-path rates are divided by sqrt(S) (paper §3.1).

    Note: the authors' ImageNet ResNet code divides its fc dropout by S instead; we follow the paper everywhere.
    """
    return rate / math.sqrt(split_factor)


def divide_weight_decay(weight_decay: float, split_factor: int, mode: str = 'none') -> float:
    """Weight decay of each member: 'none', 'exp' (eq. 6: wd * exp(1/S - 1)) or 'linear' (eq. 16: wd / S)."""
    if split_factor < 1:
        raise ValueError(f'The split factor S must be >= 1, got {split_factor}.')
    if mode == 'none':
        return weight_decay
    if mode == 'exp':
        return weight_decay * math.exp(1. / split_factor - 1.)
    if mode == 'linear':
        return weight_decay / split_factor
    raise ValueError(f'Unknown weight-decay division {mode!r}, expected one of {WD_DIVIDE_MODES}.')


@dataclass(frozen=True)
class SplitArch:
    """One SplitNet architecture: the timm model of a member and how S divides it.

    Attributes:
        name: Architecture name used in `splitnet_<name>_s<S>`.
        member: timm model name of one (undivided) member network.
        divide: Maps S to the member's `timm.create_model` kwargs.
        split_factors: The S values the rule's table defines, or None for a formula (S in `FORMULA_SPLIT_FACTORS`).
        dataset: 'cifar' (32x32, 100 classes) or 'imagenet' (224x224, 1000 classes).
        drop_rate: Classifier dropout of the undivided network (divided by sqrt(S)).
        first_conv: Module name of the member's first conv, when it differs from the member's pretrained cfg.
        description: Human readable name.
    """
    name: str
    member: str
    divide: DivisionRule
    split_factors: Optional[Tuple[int, ...]] = None
    dataset: str = 'cifar'
    drop_rate: float = 0.
    first_conv: Optional[str] = None
    description: str = ''


def _divide_imagenet_resnet(split_factor: int) -> MemberKwargs:
    """ImageNet ResNet-50/101: deep stem and stage widths from `IMAGENET_RESNET_STEM_WIDTH`."""
    width = IMAGENET_RESNET_STEM_WIDTH[split_factor]
    return dict(stem_type='deep', stem_width=width, avg_down=True, channels=(width, 2 * width, 4 * width, 8 * width))


def _divide_flat_stem_resnet(split_factor: int) -> MemberKwargs:
    """ImageNet ResNet whose member model builds its own (flat) stem: stem and stage widths from
    `IMAGENET_RESNET_STEM_WIDTH`."""
    width = IMAGENET_RESNET_STEM_WIDTH[split_factor]
    return dict(stem_width=width, channels=(width, 2 * width, 4 * width, 8 * width))


def _divide_imagenet_wrn50(split_factor: int, widen_factor: int) -> MemberKwargs:
    """ImageNet WRN-50-k: S=2 divides the widen factor (eq. 11), S=4 halves the stem and stage widths."""
    width = WRN50_STEM_WIDTH[split_factor]
    k = wrn_widen_factor(widen_factor, split_factor) if split_factor == 2 else widen_factor
    return dict(
        stem_type='deep', stem_width=width, avg_down=True, channels=(width, 2 * width, 4 * width, 8 * width),
        base_width=64 * k)


def _divide_imagenet_resnext(split_factor: int, cardinality: int) -> MemberKwargs:
    """ImageNet ResNeXt with the paper's deep stem: the cardinality is divided (eq. 12)."""
    return dict(
        stem_type='deep', stem_width=64, avg_down=True, cardinality=resnext_cardinality(cardinality, split_factor))


def _divide_resnext_cardinality(split_factor: int, cardinality: int) -> MemberKwargs:
    """ResNeXt whose member model fixes its stem: only the cardinality is divided (eq. 12)."""
    return dict(cardinality=resnext_cardinality(cardinality, split_factor))


def _divide_efficientnet_channels(split_factor: int) -> MemberKwargs:
    """EfficientNet: the channel table and rounding divisor of `EFFICIENTNET_CHANNELS` / `EFFICIENTNET_DIVISOR`."""
    return dict(
        stage_channels=EFFICIENTNET_CHANNELS[split_factor], channel_divisor=EFFICIENTNET_DIVISOR[split_factor])


def _divide_cifar_resnet_width(split_factor: int) -> MemberKwargs:
    """CIFAR (SE-)ResNet-110/164: the stem width W from `CIFAR_RESNET_STEM_WIDTH` (stages W*[1, 2, 4])."""
    return dict(stem_width=CIFAR_RESNET_STEM_WIDTH[split_factor])


def _divide_cifar_wrn(split_factor: int, widen_factor: int) -> MemberKwargs:
    """CIFAR WRN-d-k: the widen factor k is divided (eq. 11)."""
    return dict(widen_factor=wrn_widen_factor(widen_factor, split_factor))


def _divide_cifar_densenet_bc190(split_factor: int) -> MemberKwargs:
    """CIFAR DenseNet-BC-190: the growth rate 40 is divided (eq. 13)."""
    return dict(growth_rate=densenet_growth_rate(40, split_factor))


def _divide_cifar_pyramidnet272(split_factor: int) -> MemberKwargs:
    """CIFAR PyramidNet-272: alpha 200 (eq. 14) and the final ShakeDrop probability 0.5 (eq. 15) are divided."""
    return dict(alpha=pyramidnet_alpha(200., split_factor), shakedrop_prob=shakedrop_prob(0.5, split_factor))


def _divide_cifar_shake_shake(split_factor: int) -> MemberKwargs:
    """CIFAR Shake-Shake 26 2x96d: the base width from `SHAKE_SHAKE_BASE_WIDTH`."""
    return dict(base_width=SHAKE_SHAKE_BASE_WIDTH[split_factor])


# the S values each table defines
_IMAGENET_RESNET_SPLIT_FACTORS = tuple(sorted(IMAGENET_RESNET_STEM_WIDTH))
_IMAGENET_WRN50_SPLIT_FACTORS = tuple(sorted(WRN50_STEM_WIDTH))
_CIFAR_RESNET_SPLIT_FACTORS = tuple(sorted(CIFAR_RESNET_STEM_WIDTH))
_EFFICIENTNET_SPLIT_FACTORS = tuple(sorted(EFFICIENTNET_CHANNELS))
_SHAKE_SHAKE_SPLIT_FACTORS = tuple(sorted(SHAKE_SHAKE_BASE_WIDTH))

SPLIT_ARCHS: Dict[str, SplitArch] = {a.name: a for a in (
    # ImageNet: members built from timm's ResNet with the paper's tweaks (deep 3x3 stem, avg-pool downsample,
    # zero-init last BN) and from this package's table-driven EfficientNet
    SplitArch(
        name='resnet50', member='resnet50', divide=_divide_imagenet_resnet,
        split_factors=_IMAGENET_RESNET_SPLIT_FACTORS, dataset='imagenet', drop_rate=0., first_conv='conv1.0',
        description='ResNet-50'),
    SplitArch(
        name='resnet101', member='resnet101', divide=_divide_imagenet_resnet,
        split_factors=_IMAGENET_RESNET_SPLIT_FACTORS, dataset='imagenet', drop_rate=0.1, first_conv='conv1.0',
        description='ResNet-101'),
    SplitArch(
        name='wrn50_2', member='wide_resnet50_2', divide=partial(_divide_imagenet_wrn50, widen_factor=2),
        split_factors=_IMAGENET_WRN50_SPLIT_FACTORS, dataset='imagenet', drop_rate=0., first_conv='conv1.0',
        description='WRN-50-2'),
    SplitArch(
        name='wrn50_3', member='wide_resnet50_2', divide=partial(_divide_imagenet_wrn50, widen_factor=3),
        split_factors=_IMAGENET_WRN50_SPLIT_FACTORS, dataset='imagenet', drop_rate=0., first_conv='conv1.0',
        description='WRN-50-3'),
    SplitArch(
        name='resnext101_64x4d', member='resnext101_64x4d', divide=partial(_divide_imagenet_resnext, cardinality=64),
        split_factors=None, dataset='imagenet', drop_rate=0., first_conv='conv1.0',
        description='ResNeXt-101 64x4d'),
    SplitArch(
        name='seresnext101_64x4d', member='seresnext101_64x4d_splitnet',
        divide=partial(_divide_resnext_cardinality, cardinality=64),
        split_factors=None, dataset='imagenet', drop_rate=0.2, first_conv='conv1.0',
        description='SE-ResNeXt-101 64x4d (64-64-64 stem)'),
    SplitArch(
        name='seresnext101_64x4d_b', member='seresnext101_64x4d_b_splitnet',
        divide=partial(_divide_resnext_cardinality, cardinality=64),
        split_factors=None, dataset='imagenet', drop_rate=0.2, first_conv='conv1.0',
        description='SE-ResNeXt-101 64x4d (64-64-128 stem, the authors\' "_B")'),
    SplitArch(
        name='seresnet50', member='seresnet50_splitnet', divide=_divide_flat_stem_resnet,
        split_factors=_IMAGENET_RESNET_SPLIT_FACTORS, dataset='imagenet', drop_rate=0.2, first_conv='conv1.0',
        description='SE-ResNet-50 (the authors\' flat stem)'),
    SplitArch(
        name='efficientnet_b7', member='efficientnet_b7_splitnet', divide=_divide_efficientnet_channels,
        split_factors=_EFFICIENTNET_SPLIT_FACTORS, dataset='imagenet', drop_rate=0.5, first_conv=None,
        description='EfficientNet-B7'),
    # CIFAR: members are this package's timm-style CIFAR models (timm_splitnet.models.cifar_*)
    SplitArch(
        name='resnet110', member='resnet110_cifar', divide=_divide_cifar_resnet_width,
        split_factors=_CIFAR_RESNET_SPLIT_FACTORS, dataset='cifar', description='ResNet-110'),
    SplitArch(
        name='resnet164', member='resnet164_cifar', divide=_divide_cifar_resnet_width,
        split_factors=_CIFAR_RESNET_SPLIT_FACTORS, dataset='cifar', description='ResNet-164'),
    SplitArch(
        name='seresnet110', member='seresnet110_cifar', divide=_divide_cifar_resnet_width,
        split_factors=_CIFAR_RESNET_SPLIT_FACTORS, dataset='cifar', description='SE-ResNet-110'),
    SplitArch(
        name='seresnet164', member='seresnet164_cifar', divide=_divide_cifar_resnet_width,
        split_factors=_CIFAR_RESNET_SPLIT_FACTORS, dataset='cifar', description='SE-ResNet-164'),
    SplitArch(
        name='wrn16_8', member='wrn16_8_cifar', divide=partial(_divide_cifar_wrn, widen_factor=8),
        split_factors=None, dataset='cifar', description='WRN-16-8'),
    SplitArch(
        name='wrn28_10', member='wrn28_10_cifar', divide=partial(_divide_cifar_wrn, widen_factor=10),
        split_factors=None, dataset='cifar', description='WRN-28-10'),
    SplitArch(
        name='wrn40_10', member='wrn40_10_cifar', divide=partial(_divide_cifar_wrn, widen_factor=10),
        split_factors=None, dataset='cifar', drop_rate=0.1, description='WRN-40-10'),
    SplitArch(
        name='resnext29_8x64d', member='resnext29_8x64d_cifar',
        divide=partial(_divide_resnext_cardinality, cardinality=8),
        split_factors=None, dataset='cifar', description='ResNeXt-29 8x64d'),
    SplitArch(
        name='densenet_bc190', member='densenet_bc190_cifar', divide=_divide_cifar_densenet_bc190,
        split_factors=None, dataset='cifar', description='DenseNet-BC-190 (k=40)'),
    SplitArch(
        name='pyramidnet272', member='pyramidnet272_cifar', divide=_divide_cifar_pyramidnet272,
        split_factors=None, dataset='cifar', description='PyramidNet-272 + ShakeDrop'),
    SplitArch(
        name='shake_shake26_2x96d', member='shake_shake26_2x96d_cifar', divide=_divide_cifar_shake_shake,
        split_factors=_SHAKE_SHAKE_SPLIT_FACTORS, dataset='cifar', description='Shake-Shake 26 2x96d'),
    SplitArch(
        name='efficientnet_b0_cifar', member='efficientnet_b0_cifar', divide=_divide_efficientnet_channels,
        split_factors=_EFFICIENTNET_SPLIT_FACTORS, dataset='cifar', drop_rate=0.2,
        description='EfficientNet-B0 (CIFAR strides)'),
    SplitArch(
        name='efficientnet_b3_cifar', member='efficientnet_b3_cifar', divide=_divide_efficientnet_channels,
        split_factors=_EFFICIENTNET_SPLIT_FACTORS, dataset='cifar', drop_rate=0.3,
        description='EfficientNet-B3 (CIFAR strides)'),
)}


def get_split_arch(arch: str) -> SplitArch:
    """The `SplitArch` of `arch`, with a clear error for unknown names."""
    if arch not in SPLIT_ARCHS:
        raise ValueError(f'Unknown SplitNet architecture {arch!r}; known: {", ".join(sorted(SPLIT_ARCHS))}.')
    return SPLIT_ARCHS[arch]


def supported_split_factors(arch: str) -> Tuple[int, ...]:
    """The S values the division rule of `arch` defines: its table's, or `FORMULA_SPLIT_FACTORS` for a formula."""
    return get_split_arch(arch).split_factors or FORMULA_SPLIT_FACTORS


def _format_split_factors(split_factors: Tuple[int, ...]) -> str:
    if split_factors == FORMULA_SPLIT_FACTORS:
        return f'{split_factors[0]} to {split_factors[-1]}'
    return ', '.join(str(s) for s in split_factors)


def member_kwargs(arch: str, split_factor: int) -> MemberKwargs:
    """The `timm.create_model` kwargs of one member of `arch` divided by `split_factor`.

    Raises:
        ValueError: The architecture is unknown or its rule does not define `split_factor`.
    """
    spec = get_split_arch(arch)
    if not isinstance(split_factor, int) or split_factor < 1:
        raise ValueError(f'{arch}: the split factor S must be a positive integer, got {split_factor!r}.')
    supported = supported_split_factors(arch)
    if split_factor not in supported:
        raise ValueError(
            f'{arch}: its division rule does not define S={split_factor}; supported S: '
            f'{_format_split_factors(supported)}.')
    return spec.divide(split_factor)
