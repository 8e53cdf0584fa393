""" Lowering of one member into a packed program

`lower_members` traces member 0 with torch.fx (keeping the modules the packer runs as leaves), lowers every node
with the module / function rules into a step over a slot environment, and frees every value after its last use.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ...models._backends import get_per_member_functions, get_per_member_modules
from .context import LoweringContext
from .function_rules import lower_function
from .module_rules import lower_module
from .ops import LEAF_TYPES
from .program import PackedProgram, ProgramStep
from .values import Lowered, Step, Unpackable, Value, ValueKind, constant_step

__all__ = ['MemberTracer', 'check_members', 'lower_members']


class MemberTracer(fx.Tracer):
    """torch.fx tracer that keeps the modules the packer runs (and timm's no-trace modules) as leaves."""

    def __init__(self):
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules
            notrace, autowrap = tuple(get_notrace_modules()), tuple(get_notrace_functions())
        except ImportError:
            notrace, autowrap = (), ()
        self._leaves = LEAF_TYPES | get_per_member_modules()
        self._notrace = notrace
        autowrap = tuple(f for f in autowrap if callable(f)) + tuple(get_per_member_functions())
        super().__init__(autowrap_functions=autowrap)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self._leaves or isinstance(m, self._notrace):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def check_members(members: List[nn.Module]) -> None:
    """Raise Unpackable unless the members share one structure and have no forward hooks."""
    ref = repr(members[0])
    shapes = [(n, tuple(p.shape)) for n, p in members[0].named_parameters()]
    for i, m in enumerate(members[1:], 1):
        if type(m) is not type(members[0]) or repr(m) != ref or \
                [(n, tuple(p.shape)) for n, p in m.named_parameters()] != shapes:
            raise Unpackable(f'member {i} differs in structure from member 0')
    for name, module in members[0].named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            raise Unpackable(f'module {name or "<member>"} has forward hooks')


def _trace(member: nn.Module) -> fx.Graph:
    try:
        return MemberTracer().trace(member)
    except Exception as e:  # noqa: BLE001 (any trace failure means: run the loop)
        message = str(e).splitlines()[0] if str(e) else ''
        raise Unpackable(f'torch.fx cannot trace {type(member).__name__} ({type(e).__name__}: {message})') from e


def _lower_placeholder(node: fx.Node) -> Lowered:
    """A second forward input with a default value: a constant."""
    if not node.args:
        raise Unpackable(f'forward takes a second input {node.name!r}')
    return Lowered(constant_step(node.args[0]), ValueKind.INVARIANT, None)


def _lower_node(ctx: LoweringContext, node: fx.Node) -> Lowered:
    if node.op == 'placeholder':
        return _lower_placeholder(node)
    if node.op == 'get_attr':
        raise Unpackable(f'forward reads attribute {node.target!r} directly')
    if node.op == 'call_module':
        return lower_module(ctx, node)
    if node.op in ('call_function', 'call_method'):
        return lower_function(ctx, node)
    raise Unpackable(f'unsupported fx node {node.op}')


def _with_frees(steps: List[Tuple[Step, Tuple[int, ...]]], keep: int) -> List[ProgramStep]:
    """(step, input slots) -> program steps that free every slot but `keep` after its last use."""
    last_use: Dict[int, int] = {}
    for idx, (_, ins) in enumerate(steps):
        for i in ins:
            last_use[i] = idx
    frees: List[List[int]] = [[] for _ in steps]
    for i, idx in last_use.items():
        if i != keep:
            frees[idx].append(i)
    return [ProgramStep(step, tuple(free)) for (step, _), free in zip(steps, frees)]


@torch.compiler.disable
def lower_members(members: List[nn.Module], shared: bool, in_ndim: int) -> PackedProgram:
    """The S members compiled into one packed program (built from an fx trace of member 0).

    Never traced by dynamo: reached inside a compiled frame (a program not built by `PackedBackend.prepare`), it
    runs eagerly, behind a graph break.

    Args:
        members: The S members, same structure.
        shared: The input is one image for all members (member-invariant), else the packed views [B, S*C, ...].
        in_ndim: Rank of the input.

    Raises:
        Unpackable: The members hold an op the packer cannot run packed.
    """
    check_members(members)
    graph = _trace(members[0])
    module_uses: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == 'call_module':
            module_uses[node.target] = module_uses.get(node.target, 0) + 1
    ctx = LoweringContext(members, module_uses)
    values = ctx.values
    steps: List[Tuple[Step, Tuple[int, ...]]] = []
    out: Optional[Value] = None
    num_slots = 0
    for node in graph.nodes:
        if node.op == 'output':
            result = node.args[0]
            if not isinstance(result, fx.Node):
                raise Unpackable(f'the member returns {type(result).__name__}, not one tensor')
            out = values[result]
            continue
        if node.op == 'placeholder' and not values:  # the input: slot 0
            values[node] = Value(0, ValueKind.INVARIANT if shared else ValueKind.PACKED, in_ndim)
            num_slots = 1
            continue
        lowered = _lower_node(ctx, node)
        if lowered.alias is not None:
            slot = values[lowered.alias].slot
        else:
            slot, num_slots = num_slots, num_slots + 1
            ins = tuple(sorted({values[n].slot for n in node.all_input_nodes}))
            steps.append((lowered.make(slot), ins))
        values[node] = Value(slot, lowered.kind, lowered.ndim)
    if out is None:
        raise Unpackable('the member graph has no output')
    return PackedProgram(
        split_factor=len(members),
        steps=_with_frees(steps, keep=out.slot),
        num_slots=num_slots,
        out_slot=out.slot,
        out_kind=out.kind,
        batched_bns=ctx.batched_bns,
        pending=ctx.pending,
    )
