""" SplitNet weights on disk: safetensors with metadata, timm hub export, atomic writes

Weights of another (arch, S, num_classes) fail with a message naming both sides instead of a partial load.
"""
import json
import os
import tempfile
from typing import Any, Callable, Dict, Optional

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ['atomic_save', 'save_safetensors', 'load_safetensors', 'export_model', 'weights_metadata']


def atomic_save(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then atomically rename the temporary file to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def weights_metadata(model: nn.Module) -> Dict[str, str]:
    """What the weights are: architecture, S, classes (safetensors metadata values are strings)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    meta = {'format': 'pt', 'num_classes': str(getattr(model, 'num_classes', ''))}
    if cfg.get('architecture'):
        meta['architecture'] = cfg['architecture']
    if hasattr(model, 'split_factor'):
        meta['split_factor'] = str(model.split_factor)
        meta['member'] = model.member_name
    return meta


def save_safetensors(model: nn.Module, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write the model's state dict (contiguous CPU tensors) and its metadata to `path` atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = dict(weights_metadata(model), **(metadata or {}))
    atomic_save(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_safetensors(model: nn.Module, path: str, strict: bool = True) -> Dict[str, str]:
    """Load `path` into `model`; raise a ValueError naming both sides if the file holds another model.

    Returns:
        The file's metadata.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'No weights file at {path}.')
    try:
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            meta = dict(f.metadata() or {})
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f'{path} is not a readable safetensors file: {e}') from e
    own = weights_metadata(model)
    for key in ('architecture', 'split_factor', 'num_classes'):
        if strict and meta.get(key) and own.get(key) and meta[key] != own[key]:
            raise ValueError(
                f'{path} holds {meta.get("architecture", "?")} (S={meta.get("split_factor", "?")}, '
                f'{meta.get("num_classes", "?")} classes) but the model is {own.get("architecture", "?")} '
                f'(S={own.get("split_factor", "?")}, {own.get("num_classes", "?")} classes).')
    if hasattr(model, 'check_state_dict'):
        model.check_state_dict(state, strict=strict, source=path)
    model.load_state_dict(state, strict=strict)
    return meta


def export_model(model: nn.Module, directory: str, extra_config: Optional[Dict[str, Any]] = None) -> str:
    """Write `model.safetensors` and `config.json` (architecture, num_classes, pretrained_cfg) to `directory`.

    Returns:
        The path of the weights file.
    """
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, 'model.safetensors')
    save_safetensors(model, weights)
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    cfg = {k: v for k, v in cfg.items() if k not in ('url', 'file', 'hf_hub_id', 'state_dict')}
    cfg['num_classes'] = model.num_classes
    config = dict(
        architecture=cfg.get('architecture'),
        num_classes=model.num_classes,
        num_features=getattr(model, 'num_features', None),
        pretrained_cfg=cfg,
        **(extra_config or {}),
    )

    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(config, f, indent=2, default=str)

    atomic_save(os.path.join(directory, 'config.json'), write)
    return weights
