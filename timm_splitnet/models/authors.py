""" The SplitNet authors' released checkpoints in this package's models

`convert_authors_state_dict(state_dict, model)` renames a checkpoint of the paper's code (mzhaoshuai/SplitNet-Divide-
and-Co-training) to the keys of a `SplitNet`, strictly. `read_authors_checkpoint(path)` reads a release zip (its md5
checked, `hparams_train.json` read) or a bare `.pth(.tar)`; `load_authors_checkpoint` loads one into a model and
`export_authors_checkpoint` writes `model.safetensors` + `config.json`. Some of their networks compute another function
than timm's defaults with the same weights (BN eps, padding, a pooling variant): `authors_build_kwargs` names the
member kwargs that make ours compute theirs, and converted files record them. See docs/models.md.
"""
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import timm

from ..utils.checkpoint import atomic_save, weights_metadata
from ._authors_layouts import (
    AUTHORS_ARCHS, AUTHORS_NOT_COVERED, AuthorsArch, authors_arch_for, classifier_key, detect_layout, map_member_keys)
from ._authors_releases import find_release
from .division import SPLIT_ARCHS, member_kwargs
from ..data.transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from .splitnet import BUILD_ARGS_KEY, DATA_CFG_KEY, SplitNet, create_splitnet, splitnet_name

__all__ = [
    'AuthorsCheckpoint', 'convert_authors_state_dict', 'read_authors_checkpoint', 'is_authors_checkpoint',
    'authors_model_name', 'authors_build_kwargs', 'check_authors_build', 'load_authors_checkpoint',
    'export_authors_checkpoint', 'checkpoint_build_kwargs', 'authors_data_cfg', 'check_authors_hparams',
]

_STATE_KEYS = ('state_dict', 'model')
_MEMBER = re.compile(r'^models\.(\d+)\.(.+)$')


@dataclass
class AuthorsCheckpoint:
    """What an authors' checkpoint file holds.

    Attributes:
        path: The file given (zip or .pth.tar).
        source: File name of the checkpoint (`<zip>:<member>` inside a release zip).
        state_dict: Their wrapper's tensors, `models.{i}.<member keys>` (DataParallel's `module.` removed).
        arch: Their `--arch` (the checkpoint's 'arch', else hparams_train.json), None if neither says.
        hparams: hparams_train.json of a release zip ({} without).
        md5: md5 of the checkpoint file; `md5_checked` says whether the zip's md5 file was compared.
        best_acc1: Their best validation top-1 stored in the checkpoint, if any.
        epoch: Their epoch counter stored in the checkpoint, if any.
    """
    path: str
    source: str
    state_dict: Dict[str, torch.Tensor]
    arch: Optional[str] = None
    hparams: Dict[str, Any] = field(default_factory=dict)
    md5: Optional[str] = None
    md5_checked: bool = False
    best_acc1: Optional[float] = None
    epoch: Optional[int] = None

    @property
    def members(self) -> Dict[int, Dict[str, torch.Tensor]]:
        return _split_members(self.state_dict, self.source)

    @property
    def split_factor(self) -> int:
        return len(self.members)

    @property
    def layout(self) -> Optional[str]:
        members = self.members
        return detect_layout(members[min(members)]) if members else None

    @property
    def num_classes(self) -> Optional[int]:
        return _num_classes(self.members)

    @property
    def dataset(self) -> Optional[str]:
        """'imagenet' or 'cifar' (from hparams_train.json, else from the number of classes)."""
        name = str(self.hparams.get('dataset', ''))
        if name:
            return 'imagenet' if name == 'imagenet' else 'cifar'
        classes = self.num_classes
        return None if classes is None else ('imagenet' if classes == 1000 else 'cifar')

    def describe(self) -> str:
        """`their_arch: S=.., N classes` for messages."""
        arch = self.arch or 'an unnamed network'
        classes = self.num_classes
        return f'{arch} with S={self.split_factor} member(s), {classes if classes is not None else "?"} classes'


# ----- state dicts -----

def _unwrap(checkpoint: Any) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """The tensors of a checkpoint dict (its 'state_dict' / 'model') or of a bare state dict, 'module.' removed."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f'expected a checkpoint or state dict, got a {type(checkpoint).__name__}.')
    arch = checkpoint.get('arch') if isinstance(checkpoint.get('arch'), str) else None
    state = next((checkpoint[k] for k in _STATE_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    tensors = OrderedDict()
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            k = str(k)
            while k.startswith('module.'):
                k = k[len('module.'):]
            tensors[k] = v
    if not tensors:
        raise ValueError(f'no tensors found (keys: {", ".join(map(str, list(checkpoint)[:6]))}).')
    return tensors, arch


def _split_members(state: Dict[str, torch.Tensor], source: str = '') -> Dict[int, Dict[str, torch.Tensor]]:
    members: Dict[int, Dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = _MEMBER.match(k)
        if not m:
            raise ValueError(
                f'{source or "the checkpoint"}: unknown key {k!r}; the authors\' SplitNet keeps its networks as '
                f'models.<i>.<key> (their `state_dict`, with or without module. prefixes).')
        members.setdefault(int(m.group(1)), OrderedDict())[m.group(2)] = v
    if sorted(members) != list(range(len(members))):
        raise ValueError(f'{source or "the checkpoint"}: member indices {sorted(members)} are not 0..S-1.')
    return members


def _num_classes(members: Dict[int, Dict[str, torch.Tensor]]) -> Optional[int]:
    if not members:
        return None
    first = members[min(members)]
    weight = first.get(classifier_key(detect_layout(first)))
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


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
    tensors, arch = _unwrap(state_dict)
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
    """What the build settings change, whatever the depth: BN eps, type and padding of strided convs, max-pools."""
    sig = set()
    for m in member.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            sig.add(('BN eps', m.eps))
        elif isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
            sig.add(('strided conv', type(m).__name__, tuple(m.kernel_size), padding))
        elif isinstance(m, nn.MaxPool2d):
            sig.add(('max-pool padding, ceil_mode', m.padding, m.ceil_mode))
    return sig


def check_authors_build(model: nn.Module, build: Dict[str, Any]) -> None:
    """Raise a ValueError unless `model` was built with the `build` kwargs the authors' weights need."""
    arch, _ = _model_arch(model)
    with torch.device('meta'):
        reference = timm.create_model(
            SPLIT_ARCHS[arch].member, num_classes=model.num_classes, **member_kwargs(arch, model.split_factor),
            **build)
    ours, ref = _build_signature(model.models[0]), _build_signature(reference)
    if ours != ref:
        settings = ', '.join(f'{k}={v!r}' for k, v in build.items()) or 'timm\'s default settings'
        found = sorted(map(str, ours - ref))[:1] or ['?']
        need = sorted(map(str, ref - ours))[:1] or ['?']
        raise ValueError(
            f'{model.describe()} was not built the way the authors\' weights need (it has {found[0]}, they need '
            f'{need[0]}); create it with {settings}.')


# ----- files -----

def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_md5(text: str, checkpoint_name: str) -> Optional[str]:
    """The md5 in an md5 file: the one on the checkpoint's line (`md5sum` format), else the only one."""
    found = re.findall(r'\b([0-9a-fA-F]{32})\b(?:\s+\*?(\S+))?', text)
    for digest, name in found:
        if name and os.path.basename(name) == checkpoint_name:
            return digest.lower()
    digests = {d.lower() for d, _ in found}
    return digests.pop() if len(digests) == 1 else None


def _load_torch(path: str, source: str) -> Any:
    try:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e):
                raise
            return torch.load(path, map_location='cpu', weights_only=True)  # torch's legacy (pre-1.6) format
    except Exception as e:  # truncated file, not a torch file, unpickling refused
        raise ValueError(f'{source} is not a readable checkpoint: {e}') from e


def _pick_checkpoint(names: List[str], path: str) -> str:
    files = [n for n in names if n.endswith(('.pth.tar', '.pth')) and not n.endswith('/')]
    best = [n for n in files if os.path.basename(n) == 'model_best.pth.tar']
    if len(best) == 1:
        return best[0]
    if len(files) == 1:
        return files[0]
    raise ValueError(f'{path}: expected one model_best.pth.tar (or a single .pth / .pth.tar) in the zip, found '
                     f'{files or "none"}.')


def _read_zip(path: str) -> AuthorsCheckpoint:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f'{path} is not a readable zip file: {e}') from e
    with archive:
        try:
            names = archive.namelist()
            member = _pick_checkpoint(names, path)
            base = os.path.basename(member)
            source = f'{os.path.basename(path)}:{member}'
            hparams: Dict[str, Any] = {}
            hparams_names = [n for n in names if os.path.basename(n) == 'hparams_train.json']
            if hparams_names:
                try:
                    hparams = json.loads(archive.read(hparams_names[0]).decode('utf-8'))
                except (ValueError, UnicodeDecodeError) as e:
                    raise ValueError(f'{path}: {hparams_names[0]} is not valid JSON: {e}') from e
            md5_names = [n for n in names if 'md5' in os.path.basename(n).lower() and n != member]
            expected = None
            for name in md5_names:
                expected = _expected_md5(archive.read(name).decode('utf-8', 'replace'), base) or expected
            with tempfile.TemporaryDirectory() as tmp:
                extracted = os.path.join(tmp, base)
                with archive.open(member) as src, open(extracted, 'wb') as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                md5 = _md5(extracted)
                if expected is not None and md5 != expected:
                    raise ValueError(f'{source}: md5 {md5} differs from the {expected} in the zip\'s md5 file; the '
                                     f'download is damaged.')
                data = _load_torch(extracted, source)
                state, arch = _unwrap(data)
                state = OrderedDict((k, v.clone()) for k, v in state.items())  # off the temporary file
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise ValueError(f'{path} is a damaged zip file: {e}') from e
    return AuthorsCheckpoint(
        path=path, source=source, state_dict=state, arch=arch or hparams.get('arch'), hparams=hparams, md5=md5,
        md5_checked=expected is not None, best_acc1=_number(data.get('best_acc1')), epoch=_int(data.get('epoch')))


def _number(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return float(value) if isinstance(value, (int, float)) else None


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) else None


def read_authors_checkpoint(path: str) -> AuthorsCheckpoint:
    """Read an authors' release zip (md5 checked when it has one, hparams_train.json read) or a bare .pth(.tar).

    Raises:
        ValueError: No such file, a damaged zip, an md5 mismatch, an unreadable checkpoint, or no authors' SplitNet
            in it.
    """
    if not os.path.isfile(path):
        raise ValueError(f'no file at {path}.')
    if (zipfile.is_zipfile(path) and not _is_torch_zip(path)) or path.endswith('.zip'):
        ckpt = _read_zip(path)
    else:
        data = _load_torch(path, path)
        state, arch = _unwrap(data)
        ckpt = AuthorsCheckpoint(
            path=path, source=os.path.basename(path), state_dict=state, arch=arch, md5=_md5(path),
            best_acc1=_number(data.get('best_acc1')), epoch=_int(data.get('epoch')))
    ckpt.members  # noqa: B018 -- raises a ValueError if the keys are not the authors' SplitNet's
    return ckpt


def is_authors_checkpoint(path: str) -> bool:
    """Whether `path` looks like an authors' checkpoint: a zip, or a torch file whose tensors are their SplitNet's
    (`[module.]models.{i}.*` in one of their key layouts). Cheap for other files: reads only what it must."""
    if not path or not os.path.isfile(path) or path.endswith('.safetensors'):
        return False
    if path.endswith('.zip') or (zipfile.is_zipfile(path) and not _is_torch_zip(path)):
        return True
    try:
        data = _load_torch(path, path)
        state, arch = _unwrap(data)
        members = _split_members(state)
    except ValueError:
        return False
    if not members:
        return False
    # DenseNet / PyramidNet keys are ours too: such a file is theirs when its 'arch' is one of their names
    return detect_layout(members[0]) != 'same' or arch in _AUTHORS_ARCH_NAMES


_AUTHORS_ARCH_NAMES = {a.authors_arch for a in AUTHORS_ARCHS.values()} | set(AUTHORS_NOT_COVERED)


def _is_torch_zip(path: str) -> bool:
    """torch.save writes zip files too: they hold a `<name>/data.pkl`."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith('data.pkl') for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


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
