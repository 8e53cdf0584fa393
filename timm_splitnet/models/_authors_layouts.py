""" Key layouts of the SplitNet authors' member networks and how they map onto this package's members

The paper's authors (mzhaoshuai/SplitNet-Divide-and-Co-training) name the layers of their networks their own way:
`layer0.*` stems, `[conv, bn]` stride-1 shortcuts, `se_module` / `last_linear`, Shake-Shake `stage_k` / `fc_out`, and
two EfficientNet code bases (`mod{k}.block{j}.*` and lukemelas' `_blocks.{n}.*`). `AUTHORS_ARCHS` lists, per
architecture of this package, the authors' name for it and the layouts their code writes; `map_member_keys` renames
one member's keys. Written from the key names and shapes of their networks, no code of theirs. See docs/models.md.
"""
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

__all__ = [
    'AuthorsArch', 'AUTHORS_ARCHS', 'AUTHORS_NOT_COVERED', 'LAYOUTS', 'authors_arch_for', 'detect_layout',
    'map_member_keys', 'classifier_key',
]


@dataclass(frozen=True)
class AuthorsArch:
    """One architecture of this package as the authors' code defines it.

    Attributes:
        arch: Architecture name here (`splitnet_<arch>_s<S>`).
        authors_arch: The authors' `--arch` name.
        dataset: 'imagenet' or 'cifar' (the authors' `--dataset` is cifar10 / cifar100 / svhn).
        layouts: Key layouts their code writes for it; the first is what their training scripts use.
        build: Per layout, the member kwargs our model needs to compute their function (recorded in converted files).
    """
    arch: str
    authors_arch: str
    dataset: str
    layouts: Tuple[str, ...]
    build: Dict[str, Dict[str, Any]] = field(default_factory=dict)


# BN eps and Swish (x * sigmoid(x), rounded as theirs) of both of the authors' EfficientNet code bases; lukemelas' one
# also pads like TensorFlow ("SAME")
_EFFICIENTNET_LIGHTNET = {'bn_eps': 1e-3, 'act_layer': 'swish_mul'}
_EFFICIENTNET_LUKEMELAS = {'bn_eps': 1e-3, 'pad_type': 'same', 'act_layer': 'swish_mul'}

AUTHORS_ARCHS: Dict[str, AuthorsArch] = {a.arch: a for a in (
    AuthorsArch('resnet50', 'resnet50', 'imagenet', ('resnet',)),
    AuthorsArch('resnet101', 'resnet101', 'imagenet', ('resnet',)),
    AuthorsArch('wrn50_2', 'wide_resnet50_2', 'imagenet', ('resnet',)),
    AuthorsArch('wrn50_3', 'wide_resnet50_3', 'imagenet', ('resnet',)),
    AuthorsArch('resnext101_64x4d', 'resnext101_64x4d', 'imagenet', ('resnet',)),
    AuthorsArch('seresnext101_64x4d', 'se_resnext101_64x4d', 'imagenet', ('senet',),
                build={'senet': {'stem_pool': 'ceil'}}),
    AuthorsArch('seresnext101_64x4d_b', 'se_resnext101_64x4d_B', 'imagenet', ('senet',),
                build={'senet': {'stem_pool': 'ceil'}}),
    AuthorsArch('seresnet50', 'se_resnet50', 'imagenet', ('senet',), build={'senet': {'stem_pool': 'ceil'}}),
    AuthorsArch('efficientnet_b7', 'efficientnetb7', 'imagenet', ('lukemelas', 'lightnet'),
                build={'lukemelas': _EFFICIENTNET_LUKEMELAS, 'lightnet': _EFFICIENTNET_LIGHTNET}),
    AuthorsArch('resnet110', 'resnet110', 'cifar', ('resnet',)),
    AuthorsArch('resnet164', 'resnet164', 'cifar', ('resnet',)),
    AuthorsArch('seresnet110', 'se_resnet110', 'cifar', ('senet',)),
    AuthorsArch('seresnet164', 'se_resnet164', 'cifar', ('senet',)),
    AuthorsArch('wrn16_8', 'wide_resnet16_8', 'cifar', ('resnet',)),
    AuthorsArch('wrn28_10', 'wide_resnet28_10', 'cifar', ('resnet',)),
    AuthorsArch('wrn40_10', 'wide_resnet40_10', 'cifar', ('resnet',)),
    AuthorsArch('resnext29_8x64d', 'resnext29_8x64d', 'cifar', ('resnet',)),
    AuthorsArch('densenet_bc190', 'densenet190', 'cifar', ('same',)),
    AuthorsArch('pyramidnet272', 'pyramidnet272', 'cifar', ('same',)),
    AuthorsArch('shake_shake26_2x96d', 'shake_resnet26_2x96d', 'cifar', ('shake',)),
    AuthorsArch('efficientnet_b0_cifar', 'efficientnetb0', 'cifar', ('lightnet',),
                build={'lightnet': _EFFICIENTNET_LIGHTNET}),
    AuthorsArch('efficientnet_b3_cifar', 'efficientnetb3', 'cifar', ('lightnet',),
                build={'lightnet': _EFFICIENTNET_LIGHTNET}),
)}

# the authors' networks with released weights that have no architecture here, and why
AUTHORS_NOT_COVERED = {
    'resnexst50_4x16d': 'ResNeXSt (ResNeXt with split attention) is not an architecture of this package',
    'resnexst50_8x16d': 'ResNeXSt (ResNeXt with split attention) is not an architecture of this package',
    'resnexst50_4x32d': 'ResNeXSt (ResNeXt with split attention) is not an architecture of this package',
}

LAYOUTS = ('resnet', 'senet', 'shake', 'same', 'lightnet', 'lukemelas')

# a key that only the given layout writes (for telling a file's layout apart)
_LAYOUT_MARKERS = (
    ('lukemelas', re.compile(r'^_conv_stem\.')),
    ('lightnet', re.compile(r'^mod1\.conv_block\.')),
    ('senet', re.compile(r'^layer0\.conv1\.')),
    ('resnet', re.compile(r'^layer0\.0\.')),
    ('shake', re.compile(r'^conv_1\.')),
    ('densenet3', re.compile(r'^block1\.layer\.')),
)


def authors_arch_for(authors_arch: str, dataset: Optional[str] = None) -> Optional[AuthorsArch]:
    """Our architecture for the authors' `--arch` name (and dataset: 'imagenet' or 'cifar'), or None."""
    found = [a for a in AUTHORS_ARCHS.values() if a.authors_arch == authors_arch]
    if dataset is not None:
        found = [a for a in found if a.dataset == dataset]
    return found[0] if len(found) == 1 else None


def detect_layout(keys: Iterable[str]) -> Optional[str]:
    """The authors' layout a member's keys are written in ('same' for names equal to ours), None if unknown."""
    keys = list(keys)
    for layout, pattern in _LAYOUT_MARKERS:
        if any(pattern.match(k) for k in keys):
            return layout
    return 'same'


def classifier_key(layout: str) -> str:
    """The authors' classifier weight in a layout."""
    return {
        'senet': 'last_linear.weight', 'shake': 'fc_out.weight', 'lightnet': 'classifier.weight',
        'lukemelas': '_fc.weight',
    }.get(layout, 'fc.weight')


# ----- renaming rules, one member at a time -----

_IMAGENET_RESNET_STEM = {'0': 'conv1.0', '1': 'conv1.1', '3': 'conv1.3', '4': 'conv1.4', '6': 'conv1.6', '7': 'bn1'}
_CIFAR_RESNET_STEM = {'0': 'conv1', '1': 'bn1'}
_IMAGENET_SENET_STEM = {
    'conv1': 'conv1.0', 'bn1': 'conv1.1', 'conv2': 'conv1.3', 'bn2': 'conv1.4', 'conv3': 'conv1.6', 'bn3': 'bn1'}
_CIFAR_SENET_STEM = {'conv1': 'conv1', 'bn1': 'bn1'}
_DOWNSAMPLE = re.compile(r'^(layer\d+\.\d+\.downsample\.)(\d+)\.(.+)$')


def _shift_downsample(key: str, keys: set) -> str:
    """A shortcut without pooling is [conv, bn] in their blocks and [Identity, conv, bn] in timm's: index + 1."""
    m = _DOWNSAMPLE.match(key)
    if m and f'{m.group(1)}0.weight' in keys:
        return f'{m.group(1)}{int(m.group(2)) + 1}.{m.group(3)}'
    return key


def _map_resnet(key: str, keys: set, imagenet: bool) -> Optional[str]:
    m = re.match(r'^layer0\.(\d+)\.(.+)$', key)
    if m:
        stem = (_IMAGENET_RESNET_STEM if imagenet else _CIFAR_RESNET_STEM).get(m.group(1))
        return f'{stem}.{m.group(2)}' if stem else None
    return _shift_downsample(key, keys)


def _map_senet(key: str, keys: set, imagenet: bool) -> Optional[str]:
    m = re.match(r'^layer0\.([a-z]+\d)\.(.+)$', key)
    if m:
        stem = (_IMAGENET_SENET_STEM if imagenet else _CIFAR_SENET_STEM).get(m.group(1))
        return f'{stem}.{m.group(2)}' if stem else None
    if key.startswith('last_linear.'):
        return 'fc.' + key[len('last_linear.'):]
    return _shift_downsample(key, keys).replace('.se_module.', '.se.')


def _map_shake(key: str) -> str:
    for old, new in (('conv_1.', 'conv1.'), ('bn_1.', 'bn1.'), ('fc_out.', 'fc.')):
        if key.startswith(old):
            return new + key[len(old):]
    return re.sub(r'^stage_(\d+)\.', r'layer\1.', key)


# inside an EfficientNet block: (their name, ours in an inverted-residual block, ours in a depthwise-separable one)
_LIGHTNET_BLOCK = (
    ('expansion.conv_block.conv.', 'conv_pw.', None),
    ('expansion.conv_block.norm.', 'bn1.', None),
    ('depth_wise.conv_block.conv.', 'conv_dw.', 'conv_dw.'),
    ('depth_wise.conv_block.norm.', 'bn2.', 'bn1.'),
    ('se_block.channel_se.linear1.', 'se.conv_reduce.', 'se.conv_reduce.'),
    ('se_block.channel_se.linear2.', 'se.conv_expand.', 'se.conv_expand.'),
    ('point_wise.conv.', 'conv_pwl.', 'conv_pw.'),
    ('point_wise.norm.', 'bn3.', 'bn2.'),
)
_LUKEMELAS_BLOCK = (
    ('_expand_conv.', 'conv_pw.', None),
    ('_bn0.', 'bn1.', None),
    ('_depthwise_conv.', 'conv_dw.', 'conv_dw.'),
    ('_bn1.', 'bn2.', 'bn1.'),
    ('_se_reduce.', 'se.conv_reduce.', 'se.conv_reduce.'),
    ('_se_expand.', 'se.conv_expand.', 'se.conv_expand.'),
    ('_project_conv.', 'conv_pwl.', 'conv_pw.'),
    ('_bn2.', 'bn3.', 'bn2.'),
)
_LIGHTNET_ENDS = (
    ('mod1.conv_block.conv.', 'conv_stem.'), ('mod1.conv_block.norm.', 'bn1.'),
    ('last_feat.conv_block.conv.', 'conv_head.'), ('last_feat.conv_block.norm.', 'bn2.'),
    ('classifier.', 'classifier.'),
)
_LUKEMELAS_ENDS = (
    ('_conv_stem.', 'conv_stem.'), ('_bn0.', 'bn1.'), ('_conv_head.', 'conv_head.'), ('_bn1.', 'bn2.'),
    ('_fc.', 'classifier.'),
)


def _map_block(rest: str, rules, expanded: bool) -> Optional[str]:
    for old, inverted, separable in rules:
        if rest.startswith(old):
            new = inverted if expanded else separable
            return new + rest[len(old):] if new else None
    return None


def _map_ends(key: str, rules) -> Optional[str]:
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _map_lightnet(key: str, keys: set) -> Optional[str]:
    m = re.match(r'^mod(\d+)\.block(\d+)\.(.+)$', key)
    if not m or m.group(1) == '1':
        return _map_ends(key, _LIGHTNET_ENDS)
    stage, index, rest = int(m.group(1)) - 2, int(m.group(2)) - 1, m.group(3)
    expanded = f'mod{m.group(1)}.block{m.group(2)}.expansion.conv_block.conv.weight' in keys
    new = _map_block(rest, _LIGHTNET_BLOCK, expanded)
    return f'blocks.{stage}.{index}.{new}' if new and stage >= 0 and index >= 0 else None


def _map_lukemelas(key: str, keys: set, blocks: List[Tuple[int, int]]) -> Optional[str]:
    m = re.match(r'^_blocks\.(\d+)\.(.+)$', key)
    if not m:
        return _map_ends(key, _LUKEMELAS_ENDS)
    n = int(m.group(1))
    if n >= len(blocks):
        return None
    expanded = f'_blocks.{n}._expand_conv.weight' in keys
    new = _map_block(m.group(2), _LUKEMELAS_BLOCK, expanded)
    stage, index = blocks[n]
    return f'blocks.{stage}.{index}.{new}' if new else None


def _efficientnet_blocks(our_keys: Iterable[str]) -> List[Tuple[int, int]]:
    """(stage, index) of every block of our EfficientNet, in order (their lukemelas blocks are one flat list)."""
    found = set()
    for k in our_keys:
        m = re.match(r'^blocks\.(\d+)\.(\d+)\.', k)
        if m:
            found.add((int(m.group(1)), int(m.group(2))))
    return sorted(found)


def map_member_keys(
        layout: str, keys: Iterable[str], our_keys: Iterable[str], imagenet: bool) -> Dict[str, Optional[str]]:
    """Our key for every key of one of the authors' members; None where the rules know no name for it.

    Args:
        layout: The authors' layout (`LAYOUTS`).
        keys: Their member's state-dict keys (no `module.` / `models.{i}.` prefix).
        our_keys: Our member's state-dict keys (for the EfficientNet block order and the unused Shake-Shake
            shortcuts, which map to '' so the caller can drop them).
        imagenet: The ImageNet stem (resnet / senet layouts) instead of the CIFAR one.
    """
    keys = list(keys)
    key_set, our = set(keys), list(our_keys)
    our_set = set(our)
    if layout == 'lukemelas':
        blocks = _efficientnet_blocks(our)
    mapped = {}
    for k in keys:
        if layout == 'resnet':
            new = _map_resnet(k, key_set, imagenet)
        elif layout == 'senet':
            new = _map_senet(k, key_set, imagenet)
        elif layout == 'shake':
            new = _map_shake(k)
            # their Shake-Shake blocks hold a shortcut even where in == out channels (never called): drop it
            if new and '.shortcut.' in new and new not in our_set and \
                    not any(o.startswith(new.split('.shortcut.')[0] + '.shortcut.') for o in our):
                new = ''
        elif layout == 'lightnet':
            new = _map_lightnet(k, key_set)
        elif layout == 'lukemelas':
            new = _map_lukemelas(k, key_set, blocks)
        elif layout == 'same':
            new = k
        else:
            raise ValueError(f'Unknown layout {layout!r}, expected one of {LAYOUTS}.')
        mapped[k] = new
    return mapped
