""" Starting weights from a file: a SplitNet's own, a timm-written checkpoint, a raw state dict, or one member's

`load_weights(model, path)` reads `.safetensors`, `.pth` / `.pth.tar` (timm's checkpoints: the weights under
'state_dict', 'state_dict_ema' or 'model', DDP's 'module.' prefixes dropped; or a bare state dict; the paper authors'
release zips and checkpoints, converted by `authors.py`) and loads them into `model`. For a SplitNet, a state dict
without `models.<i>.` keys whose keys and shapes fit one member (an undivided timm network of the member's width) is
loaded into every member. Errors are ValueErrors that say which file holds what. `peek_weights(path)` gives a file's
tensor shapes and the data config a training run recorded in it, without reading the tensors.
"""
import json
import os
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .authors import is_authors_checkpoint, load_authors_checkpoint
from .splitnet import SplitNet

__all__ = ['read_weights_file', 'peek_weights', 'is_training_checkpoint', 'load_weights']

_STATE_KEYS = ('state_dict', 'model', 'module')


def is_training_checkpoint(checkpoint: Any) -> bool:
    """True for the checkpoint of a training run (weights with an optimizer state and an epoch to continue from)."""
    return isinstance(checkpoint, dict) and 'state_dict' in checkpoint and 'optimizer' in checkpoint and \
        'epoch' in checkpoint


def _strip_prefix(state: Dict[str, torch.Tensor], prefix: str = 'module.') -> Dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return OrderedDict((k[len(prefix):], v) for k, v in state.items())
    return state


def read_weights_file(path: str, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], str]:
    """The tensors of a `.safetensors` or `.pth(.tar)` file, and where in the file they were found.

    Args:
        path: The file.
        use_ema: Take 'state_dict_ema' of a timm checkpoint when it has one.

    Raises:
        ValueError: No such file, an unreadable file, or no state dict in it.
    """
    if not os.path.isfile(path):
        raise ValueError(f'no weights file at {path}.')
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
            return dict(load_file(path)), 'safetensors'
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f'{path} is not a readable safetensors file: {e}') from e
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unpickling refused
        raise ValueError(f'{path} is not a readable weights file: {e}') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path} holds a {type(data).__name__}, not a state dict or checkpoint.')
    keys = (('state_dict_ema',) if use_ema else ()) + _STATE_KEYS
    where = next((k for k in keys if isinstance(data.get(k), dict)), None)
    state = data[where] if where else data
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f'{path} holds no weights (keys: {", ".join(map(str, list(data)[:6]))}).')
    return _strip_prefix(tensors), f"'{where}'" if where else 'state dict'


def _torch_load_lazily(path: str) -> Any:
    """`torch.load` memory-mapped (tensors are read only when touched), plain for files of the legacy format."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError as e:
        if 'mmap' not in str(e):
            raise
        return torch.load(path, map_location='cpu', weights_only=True)


def peek_weights(path: str, use_ema: bool = True) -> Tuple[Dict[str, Tuple[int, ...]], Optional[Dict[str, Any]]]:
    """The tensor shapes in a weights file and the data config recorded with them, without reading the tensors.

    Args:
        path: `.safetensors` (header and metadata) or `.pth(.tar)` (memory-mapped).
        use_ema: Take 'state_dict_ema' of a timm checkpoint when it has one (as timm's pretrained loading does).

    Returns:
        {key: shape} of the weights (DDP's 'module.' prefixes dropped) and the data config (`input_size`, `mean`,
        `std`, `crop_pct`, `crop_mode`, `interpolation`) that train.py records, or None.

    Raises:
        ValueError: No such file, or a file that is not a readable weights file.
    """
    if not os.path.isfile(path):
        raise ValueError(f'no weights file at {path}.')
    try:
        if path.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(path, framework='pt') as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                recorded = (f.metadata() or {}).get('data_config')
            return shapes, json.loads(recorded) if recorded else None
        data = _torch_load_lazily(path)
    except Exception as e:  # safetensors and torch raise their own error types
        raise ValueError(f'{path} is not a readable weights file: {e}') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path} holds a {type(data).__name__}, not a state dict or checkpoint.')
    keys = (('state_dict_ema', 'model_ema') if use_ema else ()) + _STATE_KEYS
    where = next((k for k in keys if isinstance(data.get(k), dict)), None)
    state = data[where] if where else data
    shapes = _strip_prefix({k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)})
    recorded = data.get('data_config') if where else None
    return shapes, dict(recorded) if isinstance(recorded, dict) else None


def _head_keys(module: nn.Module, prefix: str = '') -> List[str]:
    """State-dict keys of the module's classifier (`get_classifier()`), which a new head may replace."""
    if not hasattr(module, 'get_classifier'):
        return []
    head = module.get_classifier()
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return [prefix + n for n, p in module.named_parameters() if id(p) in ids]


def _compare(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str], List[str]]:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, mismatched


def _drop_head(
        state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], heads: Iterable[str]) -> List[str]:
    """Drop head tensors of another shape (another number of classes); returns the dropped keys."""
    dropped = [k for k in heads if k in state and k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    for k in dropped:
        del state[k]
    return dropped


def _fits_member(state: Dict[str, torch.Tensor], member: nn.Module, adapt_head: bool) -> bool:
    own = member.state_dict()
    candidate = dict(state)
    if adapt_head:
        _drop_head(candidate, own, _head_keys(member))
    missing, unexpected, mismatched = _compare(candidate, own)
    heads = set(_head_keys(member))
    return not unexpected and not mismatched and (not missing or (adapt_head and set(missing) <= heads))


def load_weights(
        model: nn.Module,
        path: str,
        strict: bool = True,
        adapt_head: bool = False,
        use_ema: bool = False,
) -> str:
    """Load the weights of `path` into `model`; returns a one-line account of what was loaded.

    Args:
        model: A SplitNet or any timm model.
        path: `.safetensors`, `.pth` or `.pth.tar` (timm checkpoint or bare state dict).
        strict: Every tensor of the model must come from the file (except a replaced head with `adapt_head`).
        adapt_head: Keep the model's own classifier where the file's has another shape (another number of
            classes), as timm does for pretrained weights.
        use_ema: Take the EMA weights of a timm checkpoint that has them.

    Raises:
        ValueError: The file is unreadable, or its weights do not fit the model (the message says what it holds).
    """
    if is_authors_checkpoint(path):  # the paper authors' release zip / .pth.tar, converted on the fly
        return load_authors_checkpoint(model, path)
    state, where = read_weights_file(path, use_ema=use_ema)
    note = ''
    is_split = isinstance(model, SplitNet)
    if is_split and not any(k.startswith('models.') for k in state):
        member = model.models[0]
        if not _fits_member(state, member, adapt_head):
            missing, unexpected, mismatched = _compare(state, member.state_dict())
            detail = f'e.g. {mismatched[0]}: file {list(state[mismatched[0]].shape)} vs member ' \
                f'{list(member.state_dict()[mismatched[0]].shape)}' if mismatched else \
                f'{len(missing)} missing / {len(unexpected)} unexpected key(s), e.g. ' \
                f'{(missing or unexpected)[0]!r}'
            raise ValueError(
                f'{path} holds an undivided network whose weights do not fit a member of {model.describe()} '
                f'({detail}); a member-shaped file is loaded into each of the S members, else pass weights of the '
                f'SplitNet itself (keys models.<i>.*).')
        own = member.state_dict()
        dropped = _drop_head(state, own, _head_keys(member)) if adapt_head else []
        state = OrderedDict((f'models.{i}.{k}', v) for i in range(model.split_factor) for k, v in state.items())
        note = f'; the undivided weights copied into each of the {model.split_factor} members'
        if dropped:
            note += f' (new {model.num_classes}-class heads)'
    else:
        own = model.state_dict()
        if adapt_head:
            dropped = _drop_head(state, own, _head_keys(model))
            if dropped:
                note = f'; new {getattr(model, "num_classes", "?")}-class head(s) instead of the file\'s'
    own = model.state_dict()
    missing, unexpected, mismatched = _compare(state, own)
    allowed_missing = set(_head_keys(model)) if adapt_head else set()
    if mismatched or (strict and (unexpected or set(missing) - allowed_missing)):
        if is_split and not note:
            model.check_state_dict(state, strict=strict and not adapt_head, source=path)  # its message: what is where
        k = (mismatched or [k for k in missing if k not in allowed_missing] or unexpected)[0]
        name = model.describe() if is_split else type(model).__name__
        kind = 'shape mismatch' if mismatched else ('missing from the file' if k in missing else 'unexpected')
        raise ValueError(
            f'the weights in {path} do not fit {name}: {len(mismatched)} shape mismatch(es), {len(missing)} missing, '
            f'{len(unexpected)} unexpected key(s); e.g. {k!r} ({kind}).')
    model.load_state_dict(state, strict=False)
    return f'{path} ({where}, {len(state)} tensors){note}'
