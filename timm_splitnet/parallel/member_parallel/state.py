""" Member-parallel checkpoints: the single-process SplitNet and optimizer state dicts, gathered and scattered """
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .collectives import gather_objects
from .module import MemberParallelSplitNet, member_index, unwrap_member_parallel
from .plan import MemberParallelError

__all__ = ['gather_state_dict', 'gather_optimizer_state_dict', 'load_optimizer_state_dict']


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def gather_state_dict(model: nn.Module, dst: Optional[int] = 0) -> Optional['OrderedDict[str, torch.Tensor]']:
    """The standard SplitNet state dict (`models.{i}.*` for every member, single-process key order, CPU tensors).

    A collective over all ranks (every rank calls it). Replica 0 contributes its members.

    Args:
        model: A MemberParallelSplitNet, possibly wrapped (DDP, torch.compile, EMA).
        dst: Rank that receives the state dict (None elsewhere), or None: every rank receives it.
    """
    mp = unwrap_member_parallel(model)
    local = None
    if mp.plan.replica == 0:
        local = OrderedDict((k, v.detach().cpu()) for k, v in mp.state_dict().items())
    parts = gather_objects(local, mp.plan, dst, 'gather of the state dict')
    if parts is None:
        return None
    per_member: Dict[int, 'OrderedDict[str, torch.Tensor]'] = {}
    for part in parts:
        for k, v in (part or {}).items():
            per_member.setdefault(member_index(k), OrderedDict())[k] = v
    missing = [i for i in range(mp.split_factor) if i not in per_member]
    if missing:
        raise MemberParallelError(f'gather_state_dict: no rank sent member(s) {missing}.')
    return OrderedDict((k, v) for i in range(mp.split_factor) for k, v in per_member[i].items())


def _named_param_groups(optimizer: torch.optim.Optimizer, mp: MemberParallelSplitNet) -> List[List[str]]:
    names = {id(p): n for n, p in mp.named_parameters()}
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        try:
            groups.append([names[id(p)] for p in group['params']])
        except KeyError:
            raise ValueError(f'param group {g} of the optimizer holds parameters that are not the owned members\' '
                             f'parameters of the member-parallel model.') from None
    return groups


def gather_optimizer_state_dict(
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        dst: Optional[int] = 0,
) -> Optional[Dict[str, Any]]:
    """The state dict that a single-process optimizer over the full SplitNet would have.

    Rule: the single-process optimizer has the same param groups (e.g. timm's no-decay / decay groups, or layer-decay
    groups) and lists the parameters of each group member-major, in the order of `named_parameters()` (what
    `timm.optim.create_optimizer_v2` builds). The member-parallel optimizer of a rank has the same groups over its
    own members. Group g of the result lists member 0's group-g parameters, then member 1's, ..., with the indices
    `torch.optim.Optimizer.state_dict` would give them; per-parameter state (momentum, Adam moments, step) moves
    along, hyper-parameters (lr, initial_lr, ...) are rank 0's. A collective over all ranks.

    Args:
        optimizer: Optimizer over the owned parameters of `model`.
        model: The MemberParallelSplitNet (possibly wrapped).
        dst: Rank that receives the result (None elsewhere), or None for every rank.
    """
    mp = unwrap_member_parallel(model)
    local = None
    if mp.plan.replica == 0:
        state_dict = optimizer.state_dict()
        names = _named_param_groups(optimizer, mp)
        index_name = {idx: name for group, group_names in zip(state_dict['param_groups'], names)
                      for idx, name in zip(group['params'], group_names)}
        local = dict(
            state={index_name[idx]: _cpu(s) for idx, s in state_dict['state'].items()},
            groups=[{k: v for k, v in g.items() if k not in ('params', 'param_names')}
                    for g in state_dict['param_groups']],
            param_names=['param_names' in g for g in state_dict['param_groups']],
            names=names)
    parts = gather_objects(local, mp.plan, dst, 'gather of the optimizer state')
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    num_groups = len(parts[0]['groups'])
    if any(len(p['groups']) != num_groups for p in parts):
        raise ValueError('gather_optimizer_state_dict: the ranks\' optimizers have different numbers of param '
                         f'groups: {[len(p["groups"]) for p in parts]}.')
    state, param_groups, index = {}, [], 0
    for g in range(num_groups):
        per_member: Dict[int, List[str]] = {}
        for part in parts:
            for name in part['names'][g]:
                per_member.setdefault(member_index(name), []).append(name)
        group_names = [n for i in sorted(per_member) for n in per_member[i]]
        group = dict(parts[0]['groups'][g], params=list(range(index, index + len(group_names))))
        if parts[0]['param_names'][g]:
            group['param_names'] = group_names
        name_index = dict(zip(group_names, group['params']))
        for part in parts:
            for name, s in part['state'].items():
                if name in name_index:
                    state[name_index[name]] = s
        param_groups.append(group)
        index += len(group_names)
    return {'state': dict(sorted(state.items())), 'param_groups': param_groups}


def load_optimizer_state_dict(
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        state_dict: Dict[str, Any],
) -> None:
    """Load a single-process optimizer state dict (over the full SplitNet) into this rank's optimizer.

    The inverse of `gather_optimizer_state_dict` under the same rule; every member of a SplitNet has the same
    parameters, so each group holds S x (one member's count) parameters, member-major. No communication.

    Raises:
        ValueError: The state dict has other param groups or group sizes (another model or optimizer setup).
    """
    mp = unwrap_member_parallel(model)
    own_groups = _named_param_groups(optimizer, mp)
    saved_groups = state_dict['param_groups']
    if len(saved_groups) != len(own_groups):
        raise ValueError(
            f'load_optimizer_state_dict: the saved optimizer has {len(saved_groups)} param group(s), this optimizer '
            f'{len(own_groups)}: it was built for another model or optimizer setup.')
    saved_state = state_dict['state']
    new_state, new_groups, own_index = {}, [], 0
    for g, (saved, names) in enumerate(zip(saved_groups, own_groups)):
        per_member: Dict[int, List[str]] = {}
        for name in names:
            per_member.setdefault(member_index(name), []).append(name)
        counts = {len(v) for v in per_member.values()}
        if len(counts) > 1:
            raise ValueError(f'load_optimizer_state_dict: the owned members have different parameter counts in '
                             f'param group {g}: {counts}.')
        count = counts.pop() if counts else 0
        if len(saved['params']) != mp.split_factor * count:
            raise ValueError(
                f'load_optimizer_state_dict: param group {g} of the saved optimizer holds {len(saved["params"])} '
                f'parameters, a SplitNet of S={mp.split_factor} members with this setup has '
                f'{mp.split_factor} x {count}: the state dict is of another model or optimizer setup.')
        ids = []
        for name in names:
            member = member_index(name)
            full_idx = saved['params'][member * count + per_member[member].index(name)]
            if full_idx in saved_state:
                new_state[own_index] = saved_state[full_idx]
            ids.append(own_index)
            own_index += 1
        group = {k: v for k, v in saved.items() if k not in ('params', 'param_names')}
        group['params'] = ids
        if 'param_names' in saved:
            group['param_names'] = names
        new_groups.append(group)
    optimizer.load_state_dict({'state': new_state, 'param_groups': new_groups})

