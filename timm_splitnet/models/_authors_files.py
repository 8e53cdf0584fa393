""" Reading the SplitNet authors' checkpoint files: release zips (md5, hparams_train.json) and bare .pth(.tar)

`read_authors_checkpoint(path)` returns an `AuthorsCheckpoint`: their wrapper's tensors (`models.{i}.*`, DataParallel's
`module.` removed), their arch name, hparams and md5; `is_authors_checkpoint(path)` tells their files from others.
"""
import hashlib
import json
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

from ._authors_layouts import AUTHORS_ARCHS, AUTHORS_NOT_COVERED, classifier_key, detect_layout

__all__ = ['AuthorsCheckpoint', 'read_authors_checkpoint', 'is_authors_checkpoint', 'unwrap_authors_checkpoint']

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


def unwrap_authors_checkpoint(checkpoint: Any) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
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
            expected, md5_name = None, None
            for name in md5_names:
                found = _expected_md5(archive.read(name).decode('utf-8', 'replace'), base)
                if found:
                    expected, md5_name = found, name
            with tempfile.TemporaryDirectory() as tmp:
                extracted = os.path.join(tmp, base)
                with archive.open(member) as src, open(extracted, 'wb') as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                md5 = _md5(extracted)
                if expected is not None and md5 != expected:
                    raise ValueError(f'{source}: md5 {md5} differs from the {expected} in {md5_name}; the download '
                                     f'is damaged (the extracted {base} is taken without this check).')
                data = _load_torch(extracted, source)
                state, arch = unwrap_authors_checkpoint(data)
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
        state, arch = unwrap_authors_checkpoint(data)
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
        state, arch = unwrap_authors_checkpoint(data)
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
