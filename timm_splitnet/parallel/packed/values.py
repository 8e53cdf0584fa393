""" Values of a packed program: their kinds, slots and the small helpers the lowering rules share

A packed program runs on a list of slots (the environment); every fx node of the member graph gets a slot holding
either a packed tensor (member i's channels in block i of dim 1) or a member-invariant value.
"""
import enum
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.fx as fx

__all__ = [
    'Unpackable', 'ValueKind', 'Value', 'Env', 'Step', 'StepMaker', 'Lowered', 'Getter', 'tile', 'align',
    'member_size', 'resolve_dims', 'target_name', 'nodes_in', 'has_node', 'getter', 'constant_step', 'call_step',
    'apply_step',
]


class Unpackable(Exception):
    """The member graph holds an op the packer cannot run packed (the message says which and why)."""


class ValueKind(enum.Enum):
    """What a slot of the packed program holds."""
    PACKED = 'packed'  # a tensor [B, S*C, ...] with member i's channels in block i of dim 1
    INVARIANT = 'invariant'  # the same in every member: the shared image, Python numbers, member shapes, ...


class Value(NamedTuple):
    """Where and what the value of an fx node is: its slot, kind and (for tensors, when known) rank."""
    slot: int
    kind: ValueKind
    ndim: Optional[int]

    @property
    def packed(self) -> bool:
        return self.kind is ValueKind.PACKED


Env = List[Any]
Step = Callable[[Env], None]
StepMaker = Callable[[int], Step]  # output slot -> step writing it
Getter = Callable[[Env], Any]


class Lowered(NamedTuple):
    """The result of lowering one fx node.

    Attributes:
        make: Builds the step for the node's output slot (None for an alias).
        kind: Kind of the output.
        ndim: Rank of the output tensor (None when unknown or not a tensor).
        alias: A node whose value the node shares (no step, e.g. nn.Identity).
    """
    make: Optional[StepMaker]
    kind: ValueKind
    ndim: Optional[int]
    alias: Optional[fx.Node] = None


# ----- tensor helpers -----

def tile(x: torch.Tensor, split_factor: int) -> torch.Tensor:
    """A member-invariant tensor [B, C, ...] as a packed tensor [B, S*C, ...] (every member gets a copy)."""
    reps = [1] * x.ndim
    reps[1] = split_factor
    return x.repeat(reps)


def align(t: Any, ndim: int, split_factor: int) -> Any:
    """A member-invariant operand broadcast against a packed tensor of `ndim` dims (repeat its channel dim)."""
    if not isinstance(t, torch.Tensor):
        return t
    d = t.ndim - (ndim - 1)  # the dim of `t` that broadcasting aligns with the packed dim 1
    if d < 0 or t.shape[d] == 1:
        return t
    reps = [1] * t.ndim
    reps[d] = split_factor
    return t.repeat(reps)


def member_size(x: torch.Tensor, split_factor: int, dim: Optional[int] = None) -> Any:
    """The shape (or the size of `dim`) of one member's tensor inside the packed tensor `x`."""
    size = list(x.shape)
    size[1] //= split_factor
    return torch.Size(size) if dim is None else size[dim]


def resolve_dims(dims: Any, ndim: int) -> Tuple[int, ...]:
    """Constant dims as non-negative ints (Unpackable when they are computed at runtime)."""
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        raise Unpackable(f'dims {dims!r} are not constant')
    return tuple(d % ndim for d in dims)


# ----- fx helpers -----

def target_name(node: fx.Node) -> str:
    """The name of the function, method or module a node calls."""
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, '__name__', str(target))


def nodes_in(*args: Any) -> List[fx.Node]:
    """The fx nodes inside (nested) arguments."""
    found = []
    fx.node.map_arg(args, lambda n: found.append(n))
    return found


def has_node(arg: Any) -> bool:
    return bool(nodes_in(arg))


def getter(arg: Any, values: Dict[fx.Node, Value], transform: Optional[Callable[[Value], Callable]] = None) -> Getter:
    """A function env -> runtime value of an fx argument (nodes replaced by their slots' values).

    Args:
        arg: The (nested) fx argument.
        values: The values of the nodes lowered so far.
        transform: Optional map node value -> function applied to that node's runtime value (None: as it is).
    """
    if isinstance(arg, fx.Node):
        value = values[arg]
        i = value.slot
        fn = transform(value) if transform is not None else None
        if fn is not None:
            return lambda env: fn(env[i])
        return lambda env: env[i]
    if isinstance(arg, (tuple, list)):
        if not has_node(arg):
            return lambda env: arg
        getters = [getter(a, values, transform) for a in arg]
        kind = type(arg)
        if kind is tuple or kind is list:
            return lambda env: kind(g(env) for g in getters)
        return lambda env: kind(*(g(env) for g in getters))  # named tuples
    if isinstance(arg, dict):
        if not has_node(arg):
            return lambda env: arg
        getters_kv = [(k, getter(v, values, transform)) for k, v in arg.items()]
        return lambda env: {k: g(env) for k, g in getters_kv}
    return lambda env: arg


# ----- generic steps -----

def constant_step(value: Any) -> StepMaker:
    """A step writing a constant."""
    def make(o: int) -> Step:
        def step(env: Env) -> None:
            env[o] = value
        return step
    return make


def call_step(fn: Callable, args: Getter, kwargs: Getter) -> StepMaker:
    """A step calling `fn` on the runtime arguments."""
    def make(o: int) -> Step:
        def step(env: Env) -> None:
            env[o] = fn(*args(env), **kwargs(env))
        return step
    return make


def apply_step(fn: Callable, i: int, tile_to: int = 0) -> StepMaker:
    """A step applying `fn` to slot `i` (first tiled to `tile_to` members when non-zero)."""
    def make(o: int) -> Step:
        if tile_to:
            def step(env: Env) -> None:
                env[o] = fn(tile(env[i], tile_to))
        else:
            def step(env: Env) -> None:
                env[o] = fn(env[i])
        return step
    return make
