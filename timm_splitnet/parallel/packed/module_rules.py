""" Lowering rules of module calls: one small handler per kind of module, looked up by module type

Every handler gets the S member submodules of one `call_module` node and returns how the packed program runs them
(convs as grouped convs, BN over S*C channels, Linear as one batched matmul, parameter-free modules as they are).
"""
from typing import Callable, Dict, List, NamedTuple, Tuple, Type

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...models._backends import is_per_member_module
from .batch_norm import packed_batch_norm
from .context import LoweringContext, lower_per_member
from .ops import (
    BATCH_NORMS, BN_ACT, CONV_SAME, DROP_PATH, ELEMENTWISE_MODULES, RANDOM_MODULES, SELECT_POOL, SPATIAL_MODULES,
)
from .values import Env, Lowered, Step, Unpackable, Value, ValueKind, apply_step, tile

__all__ = ['ModuleCall', 'MODULE_RULES', 'lower_module']

PACKED, INVARIANT = ValueKind.PACKED, ValueKind.INVARIANT


class ModuleCall(NamedTuple):
    """A `call_module` node with one input, as the handlers see it."""
    node: fx.Node
    mods: List[nn.Module]  # the submodule of every member
    src: fx.Node  # the input node
    value: Value  # the input's value
    where: str  # for error messages

    @property
    def module(self) -> nn.Module:
        return self.mods[0]


def _elementwise(ctx: LoweringContext, call: ModuleCall) -> Lowered:
    if type(call.module) is nn.Identity:
        return Lowered(None, call.value.kind, call.value.ndim, alias=call.src)
    return Lowered(apply_step(call.module.forward, call.value.slot), call.value.kind, call.value.ndim)


def _spatial(ctx: LoweringContext, call: ModuleCall) -> Lowered:
    if getattr(call.module, 'return_indices', False):
        raise Unpackable(f'{call.where} returns indices')
    return Lowered(apply_step(call.module.forward, call.value.slot), call.value.kind, call.value.ndim)


def _random(ctx: LoweringContext, call: ModuleCall) -> Lowered:
    # every member draws its own mask: a member-invariant input is repeated first
    tile_to = ctx.split_factor if call.value.kind is INVARIANT else 0
    return Lowered(apply_step(call.module.forward, call.value.slot, tile_to), PACKED, call.value.ndim)


def _flatten(ctx: LoweringContext, call: ModuleCall) -> Lowered:
    m, ndim = call.module, call.value.ndim
    if ndim is None or m.start_dim % ndim == 0:
        raise Unpackable(f'{call.where} flattens the batch / member dim')
    start, end = m.start_dim % ndim, m.end_dim % ndim
    return Lowered(apply_step(m.forward, call.value.slot), call.value.kind, ndim - (end - start))


def _select_pool(ctx: LoweringContext, call: ModuleCall) -> Lowered:
    m = call.module
    if 'cat' in str(m.pool_type).lower():
        raise Unpackable(f'{call.where} concatenates pooled features along channels')
    out_ndim = m(torch.zeros((1, 1, 2, 2))).ndim if call.value.ndim == 4 else None
    return Lowered(apply_step(m.forward, call.value.slot), call.value.kind, out_ndim)


def _drop_path(ctx: LoweringContext, call: ModuleCall) -> Lowered:
    """timm's drop_path with one mask per (sample, member) instead of one per sample."""
    S, m, i = ctx.split_factor, call.module, call.value.slot
    tile_input = call.value.kind is INVARIANT

    def make(o: int) -> Step:
        def step(env: Env) -> None:
            x = tile(env[i], S) if tile_input else env[i]
            p = m.drop_prob
            if p == 0. or not m.training:
                env[o] = x
                return
            keep = 1 - p
            B, C = x.shape[0], x.shape[1] // S
            mask = x.new_empty((B, S, 1)).bernoulli_(keep)
            if keep > 0. and getattr(m, 'scale_by_keep', True):
                mask.div_(keep)
            env[o] = x * mask.expand(B, S, C).reshape((B, S * C) + (1,) * (x.ndim - 2))
        return step
    return Lowered(make, PACKED, call.value.ndim)


def _conv(ctx: LoweringContext, call: ModuleCall) -> Lowered:
    """A grouped conv with S x the member's groups; a shared image goes through one dense conv of all filters."""
    if call.value.ndim != 4:
        raise Unpackable(f'{call.where} gets a {call.value.ndim}-D input')
    S, mods, m0, i = ctx.split_factor, call.mods, call.module, call.value.slot
    stride, padding, dilation = m0.stride, m0.padding, m0.dilation
    dense = call.value.kind is INVARIANT and m0.groups == 1
    tile_input = call.value.kind is INVARIANT and not dense
    groups = m0.groups if dense else m0.groups * S
    same = type(m0) in CONV_SAME
    pre_pad = None
    if m0.padding_mode != 'zeros':
        pre_pad, pad_mode, padding = m0._reversed_padding_repeated_twice, m0.padding_mode, 0
    if same:
        from timm.layers.conv2d_same import conv2d_same

    def make(o: int) -> Step:
        def step(env: Env) -> None:
            x = tile(env[i], S) if tile_input else env[i]
            weight = torch.cat([m.weight for m in mods])
            bias = torch.cat([m.bias for m in mods]) if m0.bias is not None else None
            if same:
                env[o] = conv2d_same(x, weight, bias, stride, (0, 0), dilation, groups)
                return
            if pre_pad is not None:
                x = F.pad(x, pre_pad, mode=pad_mode)
            env[o] = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return step
    return Lowered(make, PACKED, 4)


def _batch_norm(ctx: LoweringContext, call: ModuleCall) -> Lowered:
    """BN over the S*C packed channels (with BatchNormAct2d's drop and act after it)."""
    post: List[Callable] = []
    if type(call.module) in BN_ACT:
        for sub in (getattr(call.module, 'drop', None), getattr(call.module, 'act', None)):
            if sub is None or type(sub) is nn.Identity:
                continue
            if type(sub) not in ELEMENTWISE_MODULES + RANDOM_MODULES:
                raise Unpackable(f'{call.where} applies {type(sub).__name__}')
            post.append(sub.forward)
    S, mods, i = ctx.split_factor, call.mods, call.value.slot
    tile_input = call.value.kind is INVARIANT
    batched = ctx.module_uses[call.node.target] == 1
    pending = ctx.pending if batched else None
    if batched:
        ctx.batched_bns.append(mods)

    def make(o: int) -> Step:
        def step(env: Env) -> None:
            x = tile(env[i], S) if tile_input else env[i]
            env[o] = packed_batch_norm(x, mods, post, pending)
        return step
    return Lowered(make, PACKED, call.value.ndim)


def _linear(ctx: LoweringContext, call: ModuleCall) -> Lowered:
    """One batched matmul of the S members' [B, F] features; a shared input goes through one dense Linear."""
    if call.value.ndim != 2:
        raise Unpackable(f'{call.where} gets a {call.value.ndim}-D input (packed Linear needs [B, features])')
    S, mods, i = ctx.split_factor, call.mods, call.value.slot
    has_bias = call.module.bias is not None
    dense = call.value.kind is INVARIANT

    def make(o: int) -> Step:
        def step(env: Env) -> None:
            x = env[i]
            if dense:
                weight = torch.cat([m.weight for m in mods])
                bias = torch.cat([m.bias for m in mods]) if has_bias else None
                env[o] = F.linear(x, weight, bias)
                return
            B = x.shape[0]
            xs = x.reshape(B, S, -1).transpose(0, 1)  # [S, B, F]
            weight = torch.stack([m.weight for m in mods]).transpose(1, 2)  # [S, F, N]
            if has_bias:
                out = torch.baddbmm(torch.stack([m.bias for m in mods]).unsqueeze(1), xs, weight)
            else:
                out = torch.bmm(xs, weight)
            env[o] = out.transpose(0, 1).reshape(B, -1)
        return step
    return Lowered(make, PACKED, 2)


ModuleRule = Callable[[LoweringContext, ModuleCall], Lowered]
_RULES_BY_GROUP: Tuple[Tuple[Tuple[type, ...], ModuleRule], ...] = (
    (ELEMENTWISE_MODULES, _elementwise),
    (SPATIAL_MODULES, _spatial),
    (RANDOM_MODULES, _random),
    ((nn.Flatten,), _flatten),
    (SELECT_POOL, _select_pool),
    (DROP_PATH, _drop_path),
    ((nn.Conv2d,) + CONV_SAME, _conv),
    (BATCH_NORMS, _batch_norm),
    ((nn.Linear,), _linear),
)


def _by_type(groups: Tuple[Tuple[Tuple[type, ...], ModuleRule], ...]) -> Dict[Type[nn.Module], ModuleRule]:
    """Exact module type -> rule (the first group listing a type wins)."""
    rules: Dict[Type[nn.Module], ModuleRule] = {}
    for types, rule in groups:
        for t in types:
            rules.setdefault(t, rule)
    return rules


MODULE_RULES = _by_type(_RULES_BY_GROUP)


def lower_module(ctx: LoweringContext, node: fx.Node) -> Lowered:
    """Lower a `call_module` node (Unpackable when the module has no packed form)."""
    mods = ctx.submodules(node.target)
    m0 = mods[0]
    where = f'{type(m0).__name__} at {node.target!r}'
    if is_per_member_module(m0):
        if any(True for _ in m0.parameters()):
            raise Unpackable(f'{where} has parameters (per-member ops must be parameter-free)')
        return lower_per_member(ctx, mods, node.args, node.kwargs)  # member i runs its own module
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        raise Unpackable(f'{where} is called with several inputs')
    rule = MODULE_RULES.get(type(m0))
    if rule is None:
        raise Unpackable(f'no packed form for module {where}')
    src = node.args[0]
    return rule(ctx, ModuleCall(node, mods, src, ctx.values[src], where))
