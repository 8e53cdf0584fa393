""" State shared by the lowering rules while one member graph is lowered, and the per-member rule

The rules for modules (`module_rules`) and functions (`function_rules`) read the values of the nodes lowered so far
from a `LoweringContext`; ops registered as per-member (see `timm_splitnet.models._backends`) run member by member.
"""
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .batch_norm import PendingStats
from .values import Env, Lowered, Step, Unpackable, Value, ValueKind, nodes_in

__all__ = ['LoweringContext', 'lower_per_member']


class LoweringContext:
    """What the rules know while lowering the graph of member 0 for S members."""

    def __init__(self, members: List[nn.Module], module_uses: Dict[str, int]):
        """
        Args:
            members: The S members (same structure).
            module_uses: How often the graph calls each submodule (by qualified name).
        """
        self.members = members
        self.split_factor = len(members)
        self.module_uses = module_uses
        self.values: Dict[fx.Node, Value] = {}
        # BN layers called once per forward: counters and statistics are handled once per forward for all of them
        self.batched_bns: List[List[nn.Module]] = []
        self.pending: List[PendingStats] = []  # one list object for the program's life: the BN steps hold it

    def packed_inputs(self, node: fx.Node) -> List[fx.Node]:
        """The packed tensors among the inputs of `node`."""
        return [n for n in node.all_input_nodes if self.values[n].packed]

    def submodules(self, target: str) -> List[nn.Module]:
        """The submodule `target` of every member."""
        return [m.get_submodule(target) for m in self.members]


def lower_per_member(ctx: LoweringContext, fns: Sequence[Callable], args: tuple, kwargs: dict) -> Lowered:
    """Run member i's op `fns[i]` on member i's channel block of the packed tensor arguments, concatenate the outputs.

    `fns` holds one callable per member: each member's own module for a per-member module (so the op sees that
    member's settings and state, e.g. a ShakeDrop `generator`, as in the loop), the same function S times for a
    per-member function. The members run in order 0..S-1 at every call.
    """
    S = ctx.split_factor
    values = ctx.values
    if len(fns) != S:
        raise Unpackable(f'per-member op has {len(fns)} callables for {S} members')
    packed = [n for n in nodes_in(args, kwargs) if values[n].packed]
    ndim_set = {values[n].ndim for n in packed}
    if len(ndim_set) > 1:
        raise Unpackable(f'per-member op {getattr(fns[0], "__name__", fns[0])} gets packed tensors of different ranks')
    ndim = ndim_set.pop() if ndim_set else None

    def member_getter(arg: Any) -> Callable[[Env], list]:
        """env -> the S per-member values of `arg`."""
        if isinstance(arg, fx.Node):
            i = values[arg].slot
            if values[arg].packed:
                return lambda env: env[i].chunk(S, dim=1)
            return lambda env: [env[i]] * S
        if isinstance(arg, (tuple, list)):
            getters = [member_getter(a) for a in arg]
            kind = type(arg)
            return lambda env: [kind(v) for v in zip(*(g(env) for g in getters))] if getters else [kind()] * S
        if isinstance(arg, dict):
            keys = list(arg)
            getters = [member_getter(arg[k]) for k in keys]
            return lambda env: [dict(zip(keys, v)) for v in zip(*(g(env) for g in getters))] if keys else [{}] * S
        return lambda env: [arg] * S

    args_g, kwargs_g = member_getter(tuple(args)), member_getter(dict(kwargs))

    def make(o: int) -> Step:
        def step(env: Env) -> None:
            outs = [fn(*a, **k) for fn, a, k in zip(fns, args_g(env), kwargs_g(env))]
            env[o] = torch.cat(outs, dim=1)
        return step
    return Lowered(make, ValueKind.PACKED, ndim)
