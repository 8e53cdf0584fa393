""" Lowering rules of function and method calls: one small handler per kind of op, looked up by target

Calls without packed inputs compute a member-invariant value once; calls on packed tensors are dispatched on the
function (`FUNCTION_RULES`) or method name (`METHOD_RULES`) to a handler that checks the op keeps every member's
channels in its own block and returns how the packed program runs it.
"""
import operator
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...models._backends import is_per_member_function
from .context import LoweringContext, lower_per_member
from .ops import (
    ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, RANDOM_FUNCTIONS, RANDOM_NAMES, REDUCE_FUNCTIONS, REDUCE_METHODS,
    SHAPE_ATTRIBUTES, SPATIAL_FUNCTIONS,
)
from .values import (
    Env, Getter, Lowered, Step, Unpackable, Value, ValueKind, align, call_step, getter, has_node, member_size,
    resolve_dims, target_name, tile,
)

__all__ = ['FunctionCall', 'FUNCTION_RULES', 'METHOD_RULES', 'lower_function']

PACKED, INVARIANT = ValueKind.PACKED, ValueKind.INVARIANT


class FunctionCall(NamedTuple):
    """A `call_function` / `call_method` node, as the handlers see it."""
    node: fx.Node
    name: str  # function or method name
    is_method: bool
    fn: Callable  # calls the function or method with the node's runtime arguments
    packed: List[fx.Node]  # the packed tensor inputs
    x: Any  # the first argument (the tensor a method is called on)
    x_ndim: Optional[int]  # its rank, when it is a tensor node of known rank
    where: str  # for error messages
    args: Getter
    kwargs: Getter

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The fx argument at position `index` or keyword `name`."""
        node = self.node
        return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)

    def single_packed(self) -> None:
        """Check the op runs on one packed tensor of known rank, its first argument."""
        if len(self.packed) != 1 or self.x is not self.packed[0] or self.x_ndim is None:
            raise Unpackable(f'{self.where} mixes packed tensors')


def _invariant(ctx: LoweringContext, call: FunctionCall) -> Lowered:
    """No packed input: the same in every member, computed once (random draws: once per member)."""
    target = call.node.target
    if call.name in RANDOM_NAMES and target not in RANDOM_FUNCTIONS:
        raise Unpackable(f'{call.where} draws random numbers shared by all members')
    if target not in RANDOM_FUNCTIONS:
        return Lowered(call_step(call.fn, call.args, call.kwargs), INVARIANT, None)
    # every member draws its own mask: repeat the member-invariant input first
    if not isinstance(call.x, fx.Node):
        raise Unpackable(f'{call.where} has no tensor input')
    S, i = ctx.split_factor, ctx.values[call.x].slot
    rest = getter(tuple(call.node.args[1:]), ctx.values)
    kwargs = call.kwargs

    def make(o: int) -> Step:
        def step(env: Env) -> None:
            env[o] = target(tile(env[i], S), *rest(env), **kwargs(env))
        return step
    return Lowered(make, PACKED, ctx.values[call.x].ndim)


def _attribute(ctx: LoweringContext, call: FunctionCall) -> Lowered:
    """getattr of a packed tensor: its shape is reported as the member's."""
    if call.x not in call.packed:
        raise Unpackable(f'no packed form for {call.where}')
    attr = call.node.args[1]
    if attr == 'shape':
        S, i = ctx.split_factor, ctx.values[call.x].slot
        return Lowered(call_step(lambda t: member_size(t, S), lambda env: (env[i],), lambda env: {}), INVARIANT, None)
    if attr in SHAPE_ATTRIBUTES:
        return Lowered(call_step(call.fn, call.args, call.kwargs), INVARIANT, None)
    raise Unpackable(f'{call.where} reads {attr!r} of a packed tensor')


def _size(ctx: LoweringContext, call: FunctionCall) -> Lowered:
    """`x.size()` / `x.dim()` of a packed tensor, as the member's."""
    if call.x not in call.packed or len(call.packed) != 1:
        raise Unpackable(f'no packed form for {call.where}')
    if call.name == 'dim':
        return Lowered(call_step(call.fn, call.args, call.kwargs), INVARIANT, None)
    S = ctx.split_factor
    return Lowered(call_step(lambda t, *a, **k: member_size(t, S, *a, **k), call.args, call.kwargs), INVARIANT, None)


def _elementwise(ctx: LoweringContext, call: FunctionCall) -> Lowered:
    """Elementwise ops (and dropout) on packed tensors; invariant operands are repeated along the member dim."""
    values = ctx.values
    ndim_set = {values[n].ndim for n in call.packed}
    if len(ndim_set) != 1 or None in ndim_set:
        raise Unpackable(f'{call.where} broadcasts packed tensors of different ranks')
    ndim = ndim_set.pop()
    if call.is_method and call.x not in call.packed:
        raise Unpackable(f'{call.where} is called on a member-invariant tensor with packed arguments')
    args, kwargs = call.args, call.kwargs
    if any(values[n].kind is INVARIANT for n in call.node.all_input_nodes):
        S = ctx.split_factor

        def aligned(value: Value) -> Optional[Callable]:
            return (lambda t: align(t, ndim, S)) if value.kind is INVARIANT else None
        args = getter(tuple(call.node.args), values, aligned)
        kwargs = getter(dict(call.node.kwargs), values, aligned)
    return Lowered(call_step(call.fn, args, kwargs), PACKED, ndim)


def _spatial(ctx: LoweringContext, call: FunctionCall) -> Lowered:
    if len(call.packed) != 1 or call.node.args[0] is not call.packed[0]:
        raise Unpackable(f'{call.where} mixes packed tensors')
    return Lowered(call_step(call.fn, call.args, call.kwargs), PACKED, call.x_ndim)


def _reduce(ctx: LoweringContext, call: FunctionCall) -> Lowered:
    """mean / sum / amax / amin over spatial or feature dims (never the batch or the member channels)."""
    call.single_packed()
    dims, keepdim = call.arg(1, 'dim'), call.arg(2, 'keepdim', False)
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        raise Unpackable(f'{call.where} reduces over all dims')
    resolved = resolve_dims(dims, call.x_ndim)
    if 0 in resolved or 1 in resolved or not isinstance(keepdim, bool):
        raise Unpackable(f'{call.where} reduces over the batch / member dim')
    ndim = call.x_ndim if keepdim else call.x_ndim - len(resolved)
    return Lowered(call_step(call.fn, call.args, call.kwargs), PACKED, ndim)


def _flatten(ctx: LoweringContext, call: FunctionCall) -> Lowered:
    call.single_packed()
    ndim = call.x_ndim
    start, end = call.arg(1, 'start_dim', 0), call.arg(2, 'end_dim', -1)
    if not isinstance(start, int) or not isinstance(end, int) or start % ndim == 0:
        raise Unpackable(f'{call.where} flattens the batch dim')
    start, end = start % ndim, end % ndim
    return Lowered(call_step(call.fn, call.args, call.kwargs), PACKED, ndim - (end - start))


def _cat(ctx: LoweringContext, call: FunctionCall) -> Lowered:
    """torch.cat of packed tensors; along channels it concatenates within every member (DenseNet)."""
    node, values, S = call.node, ctx.values, ctx.split_factor
    tensors, dim = call.arg(0, 'tensors'), call.arg(1, 'dim', 0)
    if not isinstance(tensors, (tuple, list)) or not all(isinstance(t, fx.Node) for t in tensors) or \
            not isinstance(dim, int) or set(node.kwargs) - {'tensors', 'dim'}:
        raise Unpackable(f'{call.where} has dynamic arguments')
    ndim_set = {values[t].ndim for t in tensors if values[t].packed}
    if len(ndim_set) != 1 or None in ndim_set:
        raise Unpackable(f'{call.where} concatenates packed tensors of different ranks')
    ndim = ndim_set.pop()
    dim %= ndim
    ins = [(values[t].slot, values[t].kind is INVARIANT) for t in tensors]

    def make(o: int) -> Step:
        def step(env: Env) -> None:
            parts = [tile(env[i], S) if invariant else env[i] for i, invariant in ins]
            if dim == 1:
                # [B, S*C_k, ...] -> [B, S, C_k, ...], concatenate per member, back to [B, S*sum(C_k), ...]
                env[o] = torch.cat([p.unflatten(1, (S, -1)) for p in parts], dim=2).flatten(1, 2)
            else:
                env[o] = torch.cat(parts, dim=dim)
        return step
    return Lowered(make, PACKED, ndim)


def _getitem(ctx: LoweringContext, call: FunctionCall) -> Lowered:
    """Indexing that keeps the batch and channel dims whole (`x[:, :, 0]`, `x[..., 1:]`)."""
    if call.x is not call.packed[0] or len(call.packed) != 1 or call.x_ndim is None:
        raise Unpackable(f'no packed form for {call.where}')
    index = call.node.args[1]
    if not isinstance(index, tuple) or len(index) < 2 or has_node(index) or \
            any(i != slice(None) for i in index[:2]) or \
            not all(isinstance(i, (slice, int)) or i is Ellipsis for i in index[2:]):
        raise Unpackable(f'{call.where} indexes the batch / member dims')
    ndim = call.x_ndim - sum(isinstance(i, int) for i in index)
    return Lowered(call_step(call.fn, call.args, call.kwargs), PACKED, ndim)


def _pad(ctx: LoweringContext, call: FunctionCall) -> Lowered:
    """F.pad of spatial dims as it is; constant padding of channels within every member's block."""
    if call.x is not call.packed[0] or len(call.packed) != 1 or call.x_ndim is None:
        raise Unpackable(f'no packed form for {call.where}')
    pad, mode = call.arg(1, 'pad'), call.arg(2, 'mode', 'constant')
    if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad) or len(pad) % 2:
        raise Unpackable(f'{call.where} has dynamic padding')
    padded_dims = len(pad) // 2
    if padded_dims < call.x_ndim - 1:
        return Lowered(call_step(call.fn, call.args, call.kwargs), PACKED, call.x_ndim)
    if padded_dims > call.x_ndim - 1 or mode != 'constant':
        raise Unpackable(f'{call.where} pads the batch dim or pads channels with mode {mode!r}')
    # channel padding: [B, S*C] -> [B, S, C] -> pad -> [B, S*C']
    S, i = ctx.split_factor, ctx.values[call.x].slot
    rest, kwargs = getter(tuple(call.node.args[1:]), ctx.values), call.kwargs

    def make(o: int) -> Step:
        def step(env: Env) -> None:
            env[o] = F.pad(env[i].unflatten(1, (S, -1)), *rest(env), **kwargs(env)).flatten(1, 2)
        return step
    return Lowered(make, PACKED, call.x_ndim)


FunctionRule = Callable[[LoweringContext, FunctionCall], Lowered]
# rules of calls with packed inputs, by function ...
FUNCTION_RULES: Dict[Callable, FunctionRule] = {
    **{f: _elementwise for f in ELEMENTWISE_FUNCTIONS | RANDOM_FUNCTIONS},
    **{f: _spatial for f in SPATIAL_FUNCTIONS},
    **{f: _reduce for f in REDUCE_FUNCTIONS},
    getattr: _attribute,
    torch.flatten: _flatten,
    torch.cat: _cat,
    operator.getitem: _getitem,
    F.pad: _pad,
}
# ... and by tensor method name
METHOD_RULES: Dict[str, FunctionRule] = {
    **{m: _elementwise for m in ELEMENTWISE_METHODS},
    **{m: _reduce for m in REDUCE_METHODS},
    'flatten': _flatten,
    'size': _size,
    'dim': _size,
}


def lower_function(ctx: LoweringContext, node: fx.Node) -> Lowered:
    """Lower a `call_function` / `call_method` node (Unpackable when it has no packed form)."""
    target = node.target
    if is_per_member_function(target):
        return lower_per_member(ctx, [target] * ctx.split_factor, node.args, node.kwargs)
    is_method = node.op == 'call_method'
    name = target_name(node)
    x = node.args[0] if node.args else None
    call = FunctionCall(
        node=node,
        name=name,
        is_method=is_method,
        fn=(lambda obj, *a, **k: getattr(obj, target)(*a, **k)) if is_method else target,
        packed=ctx.packed_inputs(node),
        x=x,
        x_ndim=ctx.values[x].ndim if isinstance(x, fx.Node) else None,
        where=f'{"method" if is_method else "function"} {name!r} ({node.name})',
        args=getter(tuple(node.args), ctx.values),
        kwargs=getter(dict(node.kwargs), ctx.values),
    )
    if not call.packed:
        return _invariant(ctx, call)
    try:
        rule = METHOD_RULES.get(target) if is_method else FUNCTION_RULES.get(target)
    except TypeError:  # unhashable call target
        rule = None
    if rule is None:
        raise Unpackable(f'no packed form for {call.where}')
    return rule(ctx, call)
