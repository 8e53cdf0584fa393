""" SplitNet weights on disk: safetensors with metadata, timm hub export, atomic writes

Weights of another (arch, S, num_classes) fail with a message naming both sides instead of a partial load. An export
records the preprocessing the weights were trained and evaluated with (`data_config`), so timm's
`resolve_data_config` gives it back.
"""
import json
import os
import tempfile
from typing import Any, Callable, Dict, Optional

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    'atomic_save', 'save_safetensors', 'load_safetensors', 'export_model', 'weights_metadata', 'DATA_CONFIG_KEYS',
    'with_data_config', 'exportable_model_args',
]

# the keys of timm's data config (`resolve_data_config`) that describe how a model's input is prepared
DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


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


def with_data_config(cfg: Dict[str, Any], data_config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A pretrained cfg whose preprocessing is `data_config` (its `DATA_CONFIG_KEYS`); the cfg's test-time size and
    crop are dropped, so that the recorded ones are what timm resolves, and its pool size where the size changed."""
    if not data_config:
        return dict(cfg)
    out = dict(cfg, **{k: data_config[k] for k in DATA_CONFIG_KEYS if data_config.get(k) is not None})
    for key in ('test_input_size', 'test_crop_pct', 'test_pool_size'):
        out.pop(key, None)
    if cfg.get('input_size') and tuple(cfg['input_size'][1:]) != tuple(out['input_size'][1:]):
        out.pop('pool_size', None)
    return out


def exportable_model_args(model: nn.Module) -> Dict[str, Any]:
    """The factory kwargs that rebuild `model` (timm's `_model_args`), JSON-serialisable ones only; drop rates and
    loading options are left out (they do not change the weights' shapes)."""
    skip = ('drop_rate', 'drop_path_rate', 'drop_block_rate', 'pretrained_cfg', 'pretrained_cfg_overlay',
            'pretrained_model_args', 'checkpoint_path', 'cache_dir', 'features_only', 'out_indices', 'feature_cls')
    args = {}
    for key, value in (getattr(model, '_model_args', None) or {}).items():
        if key in skip or value is None:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        args[key] = value
    return args


def export_model(
        model: nn.Module,
        directory: str,
        extra_config: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
) -> str:
    """Write `model.safetensors` and `config.json` (architecture, num_classes, model_args, pretrained_cfg) to
    `directory`, in the layout timm's `create_model('local-dir:<directory>')` reads.

    Args:
        model: The model.
        directory: Output folder (created).
        extra_config: More top-level keys of config.json.
        data_config: The preprocessing the weights were trained and evaluated with (`DATA_CONFIG_KEYS`); it
            replaces the pretrained cfg's in config.json and is recorded in the safetensors metadata.

    Returns:
        The path of the weights file.
    """
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, 'model.safetensors')
    recorded = {k: data_config[k] for k in DATA_CONFIG_KEYS if data_config.get(k) is not None} if data_config else {}
    save_safetensors(model, weights, metadata=dict(data_config=json.dumps(recorded)) if recorded else None)
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    cfg = {k: v for k, v in cfg.items() if k not in ('url', 'file', 'hf_hub_id', 'state_dict')}
    cfg = with_data_config(cfg, recorded)
    cfg['num_classes'] = model.num_classes
    config = dict(
        architecture=cfg.get('architecture'),
        num_classes=model.num_classes,
        num_features=getattr(model, 'num_features', None),
    )
    model_args = exportable_model_args(model)
    if model_args:
        config['model_args'] = model_args
    config.update(pretrained_cfg=cfg, **(extra_config or {}))

    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(config, f, indent=2, default=str)

    atomic_save(os.path.join(directory, 'config.json'), write)
    return weights
