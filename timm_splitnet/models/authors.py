""" The SplitNet authors' released checkpoints in this package's models

`convert_authors_state_dict(state_dict, model)` renames a checkpoint of the paper's code (mzhaoshuai/SplitNet-Divide-
and-Co-training) to the keys of a `SplitNet`, strictly. `read_authors_checkpoint(path)` reads a release zip (its md5
checked, `hparams_train.json` read) or a bare `.pth(.tar)`; `load_authors_checkpoint` loads one into a model and
`export_authors_checkpoint` writes `model.safetensors` + `config.json`. Some of their networks compute another function
than timm's defaults with the same weights (BN eps, padding, a pooling variant): `authors_build_kwargs` names the
member kwargs that make ours compute theirs, and converted files record them. See docs/models.md.
"""
import json
import math
import os
import re
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

import timm
from timm.layers import Swish

from ..data.transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from ..utils.checkpoint import atomic_save, weights_metadata
from ._authors_files import AuthorsCheckpoint, is_authors_checkpoint, read_authors_checkpoint, unwrap_authors_checkpoint
from ._authors_layouts import AUTHORS_ARCHS, AUTHORS_NOT_COVERED, AuthorsArch, authors_arch_for, map_member_keys
from ._authors_releases import find_release
from .division import SPLIT_ARCHS, member_kwargs
from .splitnet import BUILD_ARGS_KEY, DATA_CFG_KEY, SplitNet, create_splitnet, resolve_member_act_layer, splitnet_name

__all__ = [
    'AuthorsCheckpoint', 'convert_authors_state_dict', 'read_authors_checkpoint', 'is_authors_checkpoint',
    'authors_model_name', 'authors_build_kwargs', 'check_authors_build', 'load_authors_checkpoint',
    'export_authors_checkpoint', 'checkpoint_build_kwargs', 'authors_data_cfg', 'check_authors_hparams',
]


def _model_arch(model: nn.Module) -> Tuple[str, AuthorsArch]:
    if not isinstance(model, SplitNet):
        raise ValueError(f'the authors\' checkpoints convert to a SplitNet, got a {type(model).__name__}.')
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or ''
    m = re.match(r'^splitnet_(.+)_s\d+$', name)
    arch = m.group(1) if m else None
    if arch not in AUTHORS_ARCHS:
        raise ValueError(
            f'{model.describe()}: no architecture of the authors\' code corresponds to it; convertible: '
            f'{", ".join(AUTHORS_ARCHS)}.')
    return arch, AUTHORS_ARCHS[arch]


def _mismatch(model: nn.Module, spec: AuthorsArch, holds: str, problem: str, source: str = '') -> ValueError:
    return ValueError(
        f'{source + ": " if source else ""}the authors\' checkpoint does not fit {model.describe()} '
        f'(their {spec.authors_arch}): {problem}. The file holds {holds}.')


def convert_authors_state_dict(
        state_dict: Dict[str, Any],
        model: nn.Module,
        source: str = '',
) -> Dict[str, torch.Tensor]:
    """Rename an authors' checkpoint to the state-dict keys of `model`, strictly.

    Args:
        state_dict: Their checkpoint (a dict with 'state_dict' or 'model') or its state dict, keys
            `models.{i}.<member key>`, with or without `module.` prefixes (DataParallel / DDP).
        model: The SplitNet the weights are for (e.g. `timm.create_model('splitnet_wrn28_10_s4', num_classes=10)`);
            only its keys, shapes and layer settings are read, so it may live on the meta device.
        source: Name of the file, for messages.

    Returns:
        The state dict of `model` (same tensors, our keys, our order).

    Raises:
        ValueError: Another architecture, S or number of classes, an unknown or missing key or a shape mismatch
            (the message names the key, what the model expects and what the file holds), or a model not built with
            the settings the weights need (`authors_build_kwargs`, e.g. EfficientNet's BN eps).
    """
    tensors, arch = unwrap_authors_checkpoint(state_dict)
    ckpt = AuthorsCheckpoint(path=source, source=source, state_dict=tensors, arch=arch)
    converted = _convert(ckpt, model)
    check_authors_build(model, authors_build_kwargs(_model_arch(model)[0], ckpt.layout))
    return converted


def _convert(ckpt: AuthorsCheckpoint, model: nn.Module) -> Dict[str, torch.Tensor]:
    arch, spec = _model_arch(model)
    source = ckpt.source
    members = ckpt.members
    holds = ckpt.describe()
    if ckpt.arch is not None and ckpt.arch != spec.authors_arch:
        reason = AUTHORS_NOT_COVERED.get(ckpt.arch)
        raise _mismatch(model, spec, holds, f'another architecture, {ckpt.arch}' + (f' ({reason})' if reason else ''),
                        source)
    if len(members) != model.split_factor:
        raise _mismatch(model, spec, holds, f'S={model.split_factor} members expected, the file has {len(members)}',
                        source)
    layout = ckpt.layout
    if layout not in spec.layouts:
        what = 'their densenet3.py DenseNet (no BN-ReLU after the stem conv; not convertible)' \
            if layout == 'densenet3' else f'their {layout!r} key layout'
        raise _mismatch(model, spec, holds, f'the networks are written by {what}, expected the '
                        f'{" or ".join(repr(x) for x in spec.layouts)} layout', source)
    classes = ckpt.num_classes
    if classes is not None and classes != model.num_classes:
        raise _mismatch(model, spec, holds, f'{model.num_classes} classes expected, the classifier has {classes}',
                        source)
    own = model.state_dict()
    converted = {}
    for i, member in members.items():
        prefix = f'models.{i}.'
        our_keys = [k[len(prefix):] for k in own if k.startswith(prefix)]
        mapping = map_member_keys(layout, member, our_keys, imagenet=spec.dataset == 'imagenet')
        for theirs, ours in mapping.items():
            if ours == '':
                continue  # a module their code builds but never calls (Shake-Shake shortcut where in == out)
            key = prefix + ours if ours is not None else None
            if key is None or key not in own:
                raise _mismatch(model, spec, holds, f'unknown key {prefix + theirs!r}', source)
            if key in converted:
                raise _mismatch(model, spec, holds, f'{prefix + theirs!r} and another key both name {key!r}', source)
            value = member[theirs]
            if tuple(value.shape) != tuple(own[key].shape):
                raise _mismatch(model, spec, holds, f'shape mismatch at {prefix + theirs!r} (ours {key!r}): file '
                                f'{list(value.shape)}, model {list(own[key].shape)}', source)
            converted[key] = value
    missing = [k for k in own if k not in converted]
    if missing:
        raise _mismatch(model, spec, holds, f'{len(missing)} key(s) of the model missing from the file, e.g. '
                        f'{missing[0]!r}', source)
    return OrderedDict((k, converted[k]) for k in own)


# ----- build settings -----

def authors_build_kwargs(arch: str, layout: Optional[str] = None) -> Dict[str, Any]:
    """The member kwargs with which our `arch` computes the function of the authors' network (their layout).

    E.g. `{'bn_eps': 1e-3, 'pad_type': 'same'}` for EfficientNet-B7 from their lukemelas code, `{'stem_pool': 'ceil'}`
    for SE-ResNeXt-101; {} where timm's defaults already compute it.
    """
    spec = AUTHORS_ARCHS.get(arch)
    if spec is None:
        raise ValueError(f'{arch}: not an architecture of the authors\' code; known: {", ".join(AUTHORS_ARCHS)}.')
    return dict(spec.build.get(layout or spec.layouts[0], {}))


def _build_signature(member: nn.Module) -> set:
    """What the build settings change, whatever the depth: BN eps, type and padding of strided convs, max-pools,
    the Swish layer."""
    sig = set()
    for m in member.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            sig.add(('BN eps', m.eps))
        elif isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
            sig.add(('strided conv', type(m).__name__, tuple(m.kernel_size), padding))
        elif isinstance(m, nn.MaxPool2d):
            sig.add(('max-pool padding, ceil_mode', m.padding, m.ceil_mode))
        elif isinstance(m, (nn.SiLU, Swish)):
            sig.add(('activation', type(m).__name__))
    return sig


def check_authors_build(model: nn.Module, build: Dict[str, Any]) -> None:
    """Raise a ValueError unless `model` was built with the `build` kwargs the authors' weights need."""
    arch, _ = _model_arch(model)
    with torch.device('meta'):
        reference = timm.create_model(
            SPLIT_ARCHS[arch].member, num_classes=model.num_classes,
            **resolve_member_act_layer(dict(member_kwargs(arch, model.split_factor), **build)))
    ours, ref = _build_signature(model.models[0]), _build_signature(reference)
    if ours != ref:
        settings = ', '.join(f'{k}={v!r}' for k, v in build.items()) or 'timm\'s default settings'
        found = sorted(map(str, ours - ref))[:1] or ['?']
        need = sorted(map(str, ref - ours))[:1] or ['?']
        raise ValueError(
            f'{model.describe()} was not built the way the authors\' weights need (it has {found[0]}, they need '
            f'{need[0]}); create it with {settings}.')


def authors_model_name(ckpt: AuthorsCheckpoint) -> str:
    """The registered model the checkpoint converts to, from its arch, number of members and classifier."""
    if not ckpt.arch:
        raise ValueError(f'{ckpt.source} does not name its architecture (no \'arch\' and no hparams_train.json): '
                         f'name the model (--model splitnet_<arch>_s<S>).')
    if ckpt.arch in AUTHORS_NOT_COVERED:
        raise ValueError(f'{ckpt.source} holds {ckpt.arch}: {AUTHORS_NOT_COVERED[ckpt.arch]}.')
    spec = authors_arch_for(ckpt.arch, ckpt.dataset)
    if spec is None:
        raise ValueError(f'{ckpt.source} holds {ckpt.describe()} ({ckpt.dataset or "unknown dataset"}), which no '
                         f'model here corresponds to; convertible: '
                         f'{", ".join(sorted({a.authors_arch for a in AUTHORS_ARCHS.values()}))}.')
    return splitnet_name(spec.arch, ckpt.split_factor)


def check_authors_hparams(ckpt: AuthorsCheckpoint, model: nn.Module) -> None:
    """Refuse a model that hparams_train.json contradicts (arch, split_factor, dataset, classes, code base)."""
    hp = ckpt.hparams
    if not hp:
        return
    arch, spec = _model_arch(model)
    problems = []
    if hp.get('arch') not in (None, spec.authors_arch):
        problems.append(f'arch {hp["arch"]} (the model is their {spec.authors_arch})')
    if hp.get('split_factor') not in (None, model.split_factor):
        problems.append(f'split_factor {hp["split_factor"]} (the model has S={model.split_factor})')
    if hp.get('loop_factor') not in (None, hp.get('split_factor')):
        problems.append(f'loop_factor {hp["loop_factor"]}: one divided network trained alone (is_train_sep)')
    if hp.get('dataset') and ('imagenet' if hp['dataset'] == 'imagenet' else 'cifar') != spec.dataset:
        problems.append(f'dataset {hp["dataset"]} (the model is for {spec.dataset})')
    if hp.get('num_classes') not in (None, model.num_classes):
        problems.append(f'num_classes {hp["num_classes"]} (the model has {model.num_classes})')
    if spec.arch == 'densenet_bc190' and hp.get('is_official_densenet') == 0:
        problems.append('is_official_densenet 0 (their densenet3.py network, which is not convertible)')
    if problems:
        raise ValueError(f'{ckpt.source}: hparams_train.json says {"; ".join(problems)}; it does not fit '
                         f'{model.describe()}.')


def _imagenet_crop(ckpt: AuthorsCheckpoint) -> Optional[int]:
    crop = ckpt.hparams.get('crop_size')
    if isinstance(crop, int) and ckpt.dataset == 'imagenet':
        return crop
    release = find_release(ckpt.path)
    return release.img_size if release and release.dataset == 'ImageNet' else None


def authors_data_cfg(ckpt: AuthorsCheckpoint) -> Dict[str, Any]:
    """The pretrained-cfg entries of the run's evaluation: CIFAR-10 / CIFAR-100 normalisation, ImageNet crop.

    ImageNet: their evaluation resizes to 1.15x the crop (bicubic) and center-crops, our ImageNet cfgs' crop_pct; the
    crop is the run's (`hparams_train.json`, else the release list). {} where the file does not tell.
    """
    dataset = ckpt.hparams.get('dataset') or {10: 'cifar10', 100: 'cifar100', 1000: 'imagenet'}.get(ckpt.num_classes)
    if dataset == 'cifar10':
        return dict(mean=CIFAR10_MEAN, std=CIFAR10_STD)
    if dataset == 'cifar100':
        return dict(mean=CIFAR100_MEAN, std=CIFAR100_STD)
    crop = _imagenet_crop(ckpt) if dataset == 'imagenet' else None
    if crop:  # EfficientNet: also the size their SAME padding was built for
        return dict(input_size=(3, crop, crop), pool_size=(math.ceil(crop / 32), math.ceil(crop / 32)))
    return {}


def _overlay(kwargs: Dict[str, Any], data_cfg: Dict[str, Any]) -> None:
    """Add `data_cfg` under the caller's own `pretrained_cfg_overlay` entries."""
    if data_cfg:
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
        for k, v in data_cfg.items():
            overlay.setdefault(k, tuple(v) if isinstance(v, list) else v)
        kwargs['pretrained_cfg_overlay'] = overlay


_LAST: Dict[str, Any] = {}


def _cached_read(path: str) -> AuthorsCheckpoint:
    """`read_authors_checkpoint`, kept for the next call with the same unchanged file (a script reads it for the
    build kwargs, then loads it)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if _LAST.get('key') != key:
        _LAST.clear()
        _LAST.update(key=key, ckpt=read_authors_checkpoint(path))
    return _LAST['ckpt']


def load_authors_checkpoint(model: nn.Module, path_or_ckpt: Any) -> str:
    """Convert an authors' zip / .pth(.tar) and load it into `model` (built with `authors_build_kwargs`).

    Returns:
        One line saying what was converted.
    """
    if isinstance(path_or_ckpt, AuthorsCheckpoint):
        ckpt = path_or_ckpt
    else:
        ckpt = _cached_read(path_or_ckpt)
        _LAST.clear()  # read for this load: do not keep the weights alive
    arch, _ = _model_arch(model)
    check_authors_hparams(ckpt, model)
    state = _convert(ckpt, model)
    check_authors_build(model, authors_build_kwargs(arch, ckpt.layout))
    model.load_state_dict(state, strict=True)
    md5 = 'md5 checked' if ckpt.md5_checked else f'md5 {ckpt.md5}' if ckpt.md5 else 'no md5'
    return f'{ckpt.source} (the authors\' {ckpt.describe()}, {md5}), converted to {model.describe()}'


def export_authors_checkpoint(
        path: str,
        out_dir: str,
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
) -> Tuple[str, Dict[str, str]]:
    """Convert an authors' checkpoint to `out_dir/model.safetensors` + `out_dir/config.json` (timm's HF layout).

    The safetensors metadata and config.json record the model, its build kwargs (`model_args`), the source file,
    its md5 and the authors' reported top-1 (their release table, else the checkpoint's best_acc1).

    Returns:
        The weights file and its metadata.
    """
    ckpt = read_authors_checkpoint(path)
    name = model_name or authors_model_name(ckpt)
    m = re.match(r'^splitnet_(.+)_s(\d+)$', name)
    if not m or m.group(1) not in AUTHORS_ARCHS:
        raise ValueError(f'{name}: not a SplitNet of an architecture the authors\' code defines '
                         f'({", ".join(splitnet_name(a, 1)[:-3] + "_s<S>" for a in AUTHORS_ARCHS)}).')
    arch, split_factor = m.group(1), int(m.group(2))
    build = authors_build_kwargs(arch, ckpt.layout)
    classes = num_classes if num_classes is not None else ckpt.num_classes
    with torch.device('meta'):
        model = create_splitnet(arch, split_factor, num_classes=classes, **build)
    check_authors_hparams(ckpt, model)
    state = _convert(ckpt, model)
    release = find_release(path)
    meta = dict(weights_metadata(model))
    meta.update({
        BUILD_ARGS_KEY: json.dumps(build, sort_keys=True),
        DATA_CFG_KEY: json.dumps(authors_data_cfg(ckpt), sort_keys=True),
        'source': ckpt.source,
        'source_md5': ckpt.md5 or '',
        'authors_arch': ckpt.arch or '',
    })
    if release is not None:
        meta['authors_top1'] = f'{release.top1:.2f}'
        meta['authors_release'] = release.url
    elif ckpt.best_acc1 is not None:
        meta['authors_top1'] = f'{ckpt.best_acc1:.2f}'
    if ckpt.best_acc1 is not None:
        meta['best_acc1'] = f'{ckpt.best_acc1:.4f}'
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, 'model.safetensors')
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_save(weights, lambda tmp: save_file(tensors, tmp, metadata=meta))
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in ('url', 'file', 'hf_hub_id', 'state_dict')}
    cfg['num_classes'] = model.num_classes
    data_cfg = authors_data_cfg(ckpt)
    cfg.update(data_cfg)
    authors = {k: v for k, v in meta.items() if k not in ('format', BUILD_ARGS_KEY, DATA_CFG_KEY)}
    config = dict(
        architecture=name, num_classes=model.num_classes, num_features=model.num_features, model_args=build,
        pretrained_cfg=cfg, authors=authors)

    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(config, f, indent=2, default=str)

    atomic_save(os.path.join(out_dir, 'config.json'), write)
    return weights, meta


def checkpoint_build_kwargs(path: str, kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """`kwargs` plus the model kwargs a weights file needs: its build kwargs, number of classes and (under
    `pretrained_cfg_overlay`) the input size and normalisation of the run that trained it.

    For a converted file (safetensors metadata) or an authors' checkpoint; other files add nothing. A kwarg the caller
    set to another value than the file needs raises a ValueError.
    """
    kwargs = dict(kwargs or {})
    if not path or not os.path.isfile(path):
        return kwargs
    need: Dict[str, Any] = {}
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        try:
            with safe_open(path, framework='pt') as f:
                meta = dict(f.metadata() or {})
        except Exception:  # not readable: the loader reports it
            return kwargs
        if BUILD_ARGS_KEY in meta:  # a converted authors' checkpoint: build its model, head and data cfg
            need.update(json.loads(meta[BUILD_ARGS_KEY]))
            if meta.get('num_classes', '').isdigit():
                kwargs.setdefault('num_classes', int(meta['num_classes']))
            _overlay(kwargs, json.loads(meta.get(DATA_CFG_KEY) or '{}'))
    elif is_authors_checkpoint(path):
        ckpt = _cached_read(path)
        arch = authors_arch_for(ckpt.arch, ckpt.dataset) if ckpt.arch else None
        if arch is not None:
            need.update(authors_build_kwargs(arch.arch, ckpt.layout))
        if ckpt.num_classes is not None:
            kwargs.setdefault('num_classes', ckpt.num_classes)
        _overlay(kwargs, authors_data_cfg(ckpt))
    for k, v in need.items():
        if k in kwargs and kwargs[k] != v:
            raise ValueError(f'{path} needs the model built with {k}={v!r}, but {k}={kwargs[k]!r} was asked for.')
        kwargs[k] = v
    return kwargs
