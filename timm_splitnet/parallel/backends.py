""" Execution backends of SplitNet members

A backend decides how the S members of a `SplitNet` run; it never changes the parameters, their names or the
state dict (always the member layout `models.{i}.*`), so checkpoints do not depend on the backend.

- 'loop': the members one after another (the paper's execution), every family, every device.
- 'packed': the S members as ONE network (Packed-Ensembles style): every conv runs with groups = S x member groups
  on the members' channels stacked along dim 1 ([B, S*C, H, W], member i in block i; a shared image goes through
  the first conv as one dense conv with the S filter banks stacked), BN runs over S*C channels (= per-member
  statistics), Linear layers as one batched matmul, channel concatenation / padding within every member's block.
  The members' own parameters are concatenated inside autograd at every forward, so gradients land in the member
  parameters, and every member's BN running statistics are updated exactly as the loop does. Random masks
  (dropout, drop path) are drawn per member. The packed program is built once per model (and per train/eval mode
  and input kind) from a torch.fx trace of one member and rebuilt when the members' module tree changes
  (e.g. `reset_classifier`); a family with an op the packer does not know (custom autograd functions, random
  numbers drawn once for all members, channel slicing, direct parameter reads, ...) runs with 'loop' instead, and
  the reason is logged once. Ops that must run member by member (ShakeDrop, shake-shake mixing) can be registered
  with `register_per_member_module` / `register_per_member_function`.
- 'vmap': torch.func.functional_call + vmap over the stacked member parameters, eval mode only (train mode, whose
  BN running-statistics updates vmap cannot write back, runs with 'loop').
- 'auto': the fastest of the above for the device, dtype and input shape, picked by a short timed trial that is
  cached per process and leaves the model state (BN statistics, RNG, .grad) untouched.

Hacked together by the timm-splitnet authors
"""
import logging
import operator
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..models import SplitNet

__all__ = [
    'SplitBackend', 'LoopBackend', 'PackedBackend', 'VmapBackend', 'AutoBackend', 'SPLIT_BACKENDS', 'resolve_backend',
    'clear_auto_cache', 'register_per_member_module', 'register_per_member_function',
]

_logger = logging.getLogger(__name__)


class SplitBackend:
    """How the members of a SplitNet are executed."""
    name = ''

    def forward_members(self, model: 'SplitNet', views: List[torch.Tensor]) -> torch.Tensor:
        """Member logits [S, B, C] for member inputs `views` (one tensor per member)."""
        raise NotImplementedError

    def attach(self, model: 'SplitNet') -> None:
        """Called once when the backend is selected for `model` (prepare caches, report unsupported models)."""

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        return str(self) == str(other)

    def __hash__(self) -> int:
        return hash(self.name)


class LoopBackend(SplitBackend):
    """The members one after another in a Python loop."""
    name = 'loop'

    def forward_members(self, model: 'SplitNet', views: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack([m(v) for m, v in zip(model.models, views)])


def _model_label(model: 'SplitNet') -> str:
    return f'{getattr(model, "member_name", type(model).__name__)} x{len(model.models)}'


def _shared(views: Sequence[torch.Tensor]) -> bool:
    """True when every member sees the same tensor (the shared image, not S views)."""
    return all(v is views[0] for v in views)


# ----- packed: members as one grouped network -----

class _Unpackable(Exception):
    """The member graph holds an op the packer cannot run packed."""


# kinds of values in the packed program: P = packed tensor (member i's channels in block i of dim 1),
# I = member-invariant value (the shared image, Python numbers, member shapes, ...)
_P, _I = 'P', 'I'

_Env = List[Any]
_Step = Callable[[_Env], None]


def _optional_types(module: str, names: Sequence[str]) -> Tuple[type, ...]:
    import importlib
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


# parameter-free modules applied to the packed tensor as they are: elementwise or per-channel spatial ops
_ELEMENTWISE_MODULES = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Hardtanh,
) + _optional_types('timm.layers.activations', (
    'Swish', 'Mish', 'Sigmoid', 'Tanh', 'HardSwish', 'HardSigmoid', 'HardMish', 'GELU', 'GELUTanh', 'QuickGELU',
)) + _optional_types('timm.layers.activations_me', ('SwishMe', 'MishMe', 'HardSigmoidMe', 'HardSwishMe', 'HardMishMe'))
_SPATIAL_MODULES = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
) + _optional_types('timm.layers.pool2d_same', ('AvgPool2dSame', 'MaxPool2dSame'))
# random elementwise / per-channel modules: fine on packed tensors (independent per element), a member-invariant
# input must be repeated first so that every member draws its own mask
_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_CONV_SAME = _optional_types('timm.layers.conv2d_same', ('Conv2dSame',))
# per-channel batch norms; the timm ones apply their `drop` and `act` submodules after the norm
_BN_ACT = _optional_types('timm.layers.norm_act', ('BatchNormAct2d', 'SyncBatchNormAct'))
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm) + _BN_ACT
_SELECT_POOL = _optional_types('timm.layers.adaptive_avgmax_pool', ('SelectAdaptivePool2d',))
_DROP_PATH = _optional_types('timm.layers.drop', ('DropPath',))

_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.sigmoid, torch.tanh, torch.relu, torch.exp,
    torch.clamp, torch.clip, torch.abs, torch.sqrt, torch.rsqrt, torch.square, torch.pow, torch.maximum,
    torch.minimum, torch.where,
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.mish, F.leaky_relu, F.elu, F.celu, F.selu,
    F.softplus, F.hardtanh, F.sigmoid, F.tanh,
}
_RANDOM_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_SPATIAL_FUNCTIONS = {
    F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
}
_ELEMENTWISE_METHODS = {
    'add', 'add_', 'sub', 'sub_', 'mul', 'mul_', 'div', 'div_', 'neg', 'neg_', 'pow', 'pow_', 'sigmoid', 'sigmoid_',
    'tanh', 'tanh_', 'relu', 'relu_', 'exp', 'exp_', 'clamp', 'clamp_', 'clamp_min', 'clamp_min_', 'clamp_max',
    'clamp_max_', 'clip', 'clip_', 'abs', 'sqrt', 'rsqrt', 'square', 'float', 'half', 'bfloat16', 'double', 'to',
    'type_as', 'contiguous', 'clone', 'detach',
}
_REDUCE_FUNCTIONS = {torch.mean: 'mean', torch.sum: 'sum', torch.amax: 'amax', torch.amin: 'amin'}
_REDUCE_METHODS = {'mean', 'sum', 'amax', 'amin'}
_RANDOM_NAMES = {
    'rand', 'randn', 'randint', 'rand_like', 'randn_like', 'randint_like', 'bernoulli', 'bernoulli_', 'normal',
    'normal_', 'uniform_', 'random_', 'exponential_', 'geometric_', 'cauchy_', 'log_normal_', 'multinomial',
    'randperm',
}


# parameter-free modules / functions that must run on every member's channel block separately (e.g. they draw one
# random number per batch, or per sample, that each member must draw for itself); their outputs are concatenated
_PER_MEMBER_MODULES = set()
_PER_MEMBER_FUNCTIONS = set()


def register_per_member_module(module_type: Type[nn.Module]) -> Type[nn.Module]:
    """Let the 'packed' backend run parameter-free `module_type` on each member's channels separately.

    For modules whose forward torch.fx cannot trace or that draw random numbers per batch / per sample (ShakeDrop):
    the packed tensor is split into the S member blocks, the module runs on each, and the results are concatenated.
    Usable as a class decorator.
    """
    _PER_MEMBER_MODULES.add(module_type)
    return module_type


def register_per_member_function(fn: Callable) -> Callable:
    """Like `register_per_member_module` for a module-level function (traced as one call, run per member)."""
    _PER_MEMBER_FUNCTIONS.add(fn)
    return fn


def _register_package_ops() -> None:
    """Per-member ops of this package's models (registered here so that the model files stay backend-agnostic)."""
    import importlib
    for module, names, register in (
            ('timm_splitnet.models.cifar_pyramidnet', ('ShakeDrop',), register_per_member_module),
            ('timm_splitnet.models.cifar_shake_shake', ('shake_shake',), register_per_member_function),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for n in names:
            if hasattr(mod, n):
                register(getattr(mod, n))


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, '__name__', str(target))


def _tile(x: torch.Tensor, split_factor: int) -> torch.Tensor:
    """A member-invariant tensor [B, C, ...] as a packed tensor [B, S*C, ...] (every member gets a copy)."""
    reps = [1] * x.ndim
    reps[1] = split_factor
    return x.repeat(reps)


def _align(t: Any, ndim: int, split_factor: int) -> Any:
    """A member-invariant operand broadcast against a packed tensor of `ndim` dims (repeat its channel dim)."""
    if not isinstance(t, torch.Tensor):
        return t
    d = t.ndim - (ndim - 1)  # the dim of `t` that broadcasting aligns with the packed dim 1
    if d < 0 or t.shape[d] == 1:
        return t
    reps = [1] * t.ndim
    reps[d] = split_factor
    return t.repeat(reps)


def _member_size(x: torch.Tensor, split_factor: int, dim: Optional[int] = None):
    size = list(x.shape)
    size[1] //= split_factor
    return torch.Size(size) if dim is None else size[dim]


def _resolve_dims(dims: Any, ndim: int) -> Tuple[int, ...]:
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        raise _Unpackable(f'dims {dims!r} are not constant')
    return tuple(d % ndim for d in dims)


def _getter(arg: Any, slots: Dict[fx.Node, int]) -> Callable[[_Env], Any]:
    """A function env -> value of an fx argument (nodes replaced by their runtime values)."""
    if isinstance(arg, fx.Node):
        i = slots[arg]
        return lambda env: env[i]
    if isinstance(arg, (tuple, list)):
        if not _has_node(arg):
            return lambda env: arg
        getters = [_getter(a, slots) for a in arg]
        kind = type(arg)
        if kind is tuple or kind is list:
            return lambda env: kind(g(env) for g in getters)
        return lambda env: kind(*(g(env) for g in getters))  # named tuples
    if isinstance(arg, dict):
        if not _has_node(arg):
            return lambda env: arg
        getters_kv = [(k, _getter(v, slots)) for k, v in arg.items()]
        return lambda env: {k: g(env) for k, g in getters_kv}
    return lambda env: arg


def _nodes(*args: Any) -> List[fx.Node]:
    """The fx nodes inside (nested) arguments."""
    found = []
    fx.node.map_arg(args, lambda n: found.append(n))
    return found


def _has_node(arg: Any) -> bool:
    return bool(_nodes(arg))


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps the modules the packer runs (and timm's no-trace modules) as leaves."""

    def __init__(self):
        _register_package_ops()
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules
            self._notrace = tuple(get_notrace_modules())
            autowrap = tuple(get_notrace_functions())
        except ImportError:
            self._notrace, autowrap = (), ()
        autowrap = tuple(f for f in autowrap if callable(f)) + tuple(_PER_MEMBER_FUNCTIONS)
        super().__init__(autowrap_functions=autowrap)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in _LEAF_TYPES or type(m) in _PER_MEMBER_MODULES or isinstance(m, self._notrace):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _Structure:
    """Identity of the module tree of the members: a packed program is valid while it is unchanged."""

    def __init__(self, model: 'SplitNet'):
        dicts = [model._modules] + [m._modules for m in model.models.modules() if m._modules]
        self.dicts = dicts
        self.snapshot = [tuple(d.values()) for d in dicts]

    def valid(self) -> bool:
        # C-level loops: the check costs ~0.1 us per module with children
        return list(map(tuple, map(dict.values, self.dicts))) == self.snapshot


class _PackedProgram:
    """The S members compiled into one packed computation (built from an fx trace of member 0)."""

    def __init__(self, model: 'SplitNet', shared: bool, in_ndim: int):
        members = list(model.models)
        self.split_factor = len(members)
        self.members = members
        self.steps: List[Tuple[_Step, Tuple[int, ...]]] = []
        self._check_members(members)
        try:
            graph = _Tracer().trace(members[0])
        except Exception as e:  # noqa: BLE001 (any trace failure means: run the loop)
            raise _Unpackable(f'torch.fx cannot trace {type(members[0]).__name__} ({type(e).__name__}: '
                              f'{str(e).splitlines()[0] if str(e) else ""})') from e
        # BN layers called once per forward increment their counters and write their running statistics back
        # once per forward for all layers (a layer called twice does both at its call, like the loop)
        self._module_uses: Dict[str, int] = {}
        for node in graph.nodes:
            if node.op == 'call_module':
                self._module_uses[node.target] = self._module_uses.get(node.target, 0) + 1
        self._batched_bns: List[List[nn.Module]] = []
        self._pending: List[tuple] = []  # one list object for the program's life: the BN steps hold it
        slots: Dict[fx.Node, int] = {}
        kinds: Dict[fx.Node, str] = {}
        ndims: Dict[fx.Node, Optional[int]] = {}
        num_slots = 0
        out_slot, out_kind = None, None
        self.input_slot = 0
        for node in graph.nodes:
            if node.op == 'output':
                out = node.args[0]
                if not isinstance(out, fx.Node):
                    raise _Unpackable(f'the member returns {type(out).__name__}, not one tensor')
                out_slot, out_kind = slots[out], kinds[out]
                continue
            if node.op == 'placeholder':
                if not slots:
                    slots[node], kinds[node], ndims[node] = 0, (_I if shared else _P), in_ndim
                    num_slots = 1
                    continue
                if not node.args:
                    raise _Unpackable(f'forward takes a second input {node.name!r}')
                value = node.args[0]
                step, kind, ndim, alias = self._const(value), _I, None, None
            elif node.op == 'get_attr':
                raise _Unpackable(f'forward reads attribute {node.target!r} directly')
            elif node.op == 'call_module':
                mods = [m.get_submodule(node.target) for m in members]
                step, kind, ndim, alias = self._module(node, mods, slots, kinds, ndims)
            elif node.op in ('call_function', 'call_method'):
                step, kind, ndim, alias = self._function(node, slots, kinds, ndims)
            else:
                raise _Unpackable(f'unsupported fx node {node.op}')
            if alias is not None:
                slots[node] = slots[alias]
            else:
                slots[node] = num_slots
                num_slots += 1
                ins = tuple(sorted({slots[n] for n in node.all_input_nodes}))
                self.steps.append((step(slots[node]), ins))
            kinds[node], ndims[node] = kind, ndim
        if out_slot is None:
            raise _Unpackable('the member graph has no output')
        self.num_slots = num_slots
        self.out_slot, self.out_kind = out_slot, out_kind
        # free every value after its last use (the member's generated code does the same with `del`)
        last_use: Dict[int, int] = {}
        for idx, (_, ins) in enumerate(self.steps):
            for i in ins:
                last_use[i] = idx
        frees: List[List[int]] = [[] for _ in self.steps]
        for i, idx in last_use.items():
            if i != out_slot:
                frees[idx].append(i)
        self.steps = [(step, tuple(free)) for (step, _), free in zip(self.steps, frees)]

    # ----- checks -----

    @staticmethod
    def _check_members(members: List[nn.Module]) -> None:
        ref = repr(members[0])
        shapes = [(n, tuple(p.shape)) for n, p in members[0].named_parameters()]
        for i, m in enumerate(members[1:], 1):
            if type(m) is not type(members[0]) or repr(m) != ref or \
                    [(n, tuple(p.shape)) for n, p in m.named_parameters()] != shapes:
                raise _Unpackable(f'member {i} differs in structure from member 0')
        for name, module in members[0].named_modules():
            if module._forward_hooks or module._forward_pre_hooks:
                raise _Unpackable(f'module {name or "<member>"} has forward hooks')

    # ----- step builders: each returns (make_step(out_slot), kind, ndim, alias) -----

    @staticmethod
    def _const(value: Any):
        def make(o: int) -> _Step:
            def step(env: _Env) -> None:
                env[o] = value
            return step
        return make

    def _module(self, node: fx.Node, mods: List[nn.Module], slots, kinds, ndims):
        S = self.split_factor
        m0 = mods[0]
        kind_type = type(m0)
        where = f'{kind_type.__name__} at {node.target!r}'
        if kind_type in _PER_MEMBER_MODULES:
            if any(True for _ in m0.parameters()):
                raise _Unpackable(f'{where} has parameters (per-member ops must be parameter-free)')
            return self._per_member(m0, node.args, node.kwargs, slots, kinds, ndims)
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            raise _Unpackable(f'{where} is called with several inputs')
        arg = node.args[0]
        i, in_kind, in_ndim = slots[arg], kinds[arg], ndims[arg]

        if kind_type in _ELEMENTWISE_MODULES:
            if kind_type is nn.Identity:
                return None, in_kind, in_ndim, arg
            return self._apply(m0.forward, i), in_kind, in_ndim, None
        if kind_type in _SPATIAL_MODULES:
            if getattr(m0, 'return_indices', False):
                raise _Unpackable(f'{where} returns indices')
            return self._apply(m0.forward, i), in_kind, in_ndim, None
        if kind_type in _RANDOM_MODULES:
            return self._apply(m0.forward, i, tile=in_kind == _I, split_factor=S), _P, in_ndim, None
        if kind_type is nn.Flatten:
            if in_ndim is None or m0.start_dim % in_ndim == 0:
                raise _Unpackable(f'{where} flattens the batch / member dim')
            start, end = m0.start_dim % in_ndim, m0.end_dim % in_ndim
            return self._apply(m0.forward, i), in_kind, in_ndim - (end - start), None
        if kind_type in _SELECT_POOL:
            if 'cat' in str(m0.pool_type).lower():
                raise _Unpackable(f'{where} concatenates pooled features along channels')
            out_ndim = m0(torch.zeros((1, 1, 2, 2))).ndim if in_ndim == 4 else None
            return self._apply(m0.forward, i), in_kind, out_ndim, None
        if kind_type in _DROP_PATH:
            return self._drop_path(m0, i, tile=in_kind == _I), _P, in_ndim, None
        if kind_type is nn.Conv2d or kind_type in _CONV_SAME:
            if in_ndim != 4:
                raise _Unpackable(f'{where} gets a {in_ndim}-D input')
            return self._conv(mods, i, in_kind), _P, 4, None
        if kind_type in _BATCH_NORMS:
            post = []
            if kind_type in _BN_ACT:
                for sub in (getattr(m0, 'drop', None), getattr(m0, 'act', None)):
                    if sub is None or type(sub) is nn.Identity:
                        continue
                    if type(sub) not in _ELEMENTWISE_MODULES + _RANDOM_MODULES:
                        raise _Unpackable(f'{where} applies {type(sub).__name__}')
                    post.append(sub.forward)
            batched = self._module_uses[node.target] == 1
            return self._batch_norm(mods, i, in_kind, post, batched), _P, in_ndim, None
        if kind_type is nn.Linear:
            if in_ndim != 2:
                raise _Unpackable(f'{where} gets a {in_ndim}-D input (packed Linear needs [B, features])')
            return self._linear(mods, i, in_kind), _P, 2, None
        raise _Unpackable(f'no packed form for module {where}')

    @staticmethod
    def _apply(fn: Callable, i: int, tile: bool = False, split_factor: int = 1):
        def make(o: int) -> _Step:
            if tile:
                def step(env: _Env) -> None:
                    env[o] = fn(_tile(env[i], split_factor))
            else:
                def step(env: _Env) -> None:
                    env[o] = fn(env[i])
            return step
        return make

    def _drop_path(self, m0: nn.Module, i: int, tile: bool):
        S = self.split_factor

        def make(o: int) -> _Step:
            def step(env: _Env) -> None:
                x = env[i]
                p = m0.drop_prob
                if tile:
                    x = _tile(x, S)
                if p == 0. or not m0.training:
                    env[o] = x
                    return
                # timm's drop_path with one mask per (sample, member) instead of per sample
                keep = 1 - p
                B, C = x.shape[0], x.shape[1] // S
                mask = x.new_empty((B, S, 1)).bernoulli_(keep)
                if keep > 0. and getattr(m0, 'scale_by_keep', True):
                    mask.div_(keep)
                mask = mask.expand(B, S, C).reshape((B, S * C) + (1,) * (x.ndim - 2))
                env[o] = x * mask
            return step
        return make

    def _conv(self, mods: List[nn.Module], i: int, in_kind: str):
        S = self.split_factor
        m0 = mods[0]
        stride, padding, dilation = m0.stride, m0.padding, m0.dilation
        # a member-invariant input through a plain conv: one dense conv with the members' filters stacked
        dense = in_kind == _I and m0.groups == 1
        tile = in_kind == _I and not dense
        groups = m0.groups if dense else m0.groups * S
        same = type(m0) in _CONV_SAME
        pre_pad = None
        if m0.padding_mode != 'zeros':
            pre_pad, pad_mode, padding = m0._reversed_padding_repeated_twice, m0.padding_mode, 0
        if same:
            from timm.layers.conv2d_same import conv2d_same

        def make(o: int) -> _Step:
            def step(env: _Env) -> None:
                x = env[i]
                if tile:
                    x = _tile(x, S)
                weight = torch.cat([m.weight for m in mods])
                bias = torch.cat([m.bias for m in mods]) if m0.bias is not None else None
                if same:
                    env[o] = conv2d_same(x, weight, bias, stride, (0, 0), dilation, groups)
                    return
                if pre_pad is not None:
                    x = F.pad(x, pre_pad, mode=pad_mode)
                env[o] = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
            return step
        return make

    def _batch_norm(self, mods: List[nn.Module], i: int, in_kind: str, post: List[Callable], batched: bool):
        S = self.split_factor
        tile = in_kind == _I
        pending = self._pending if batched else None
        if batched:
            self._batched_bns.append(mods)

        def make(o: int) -> _Step:
            def step(env: _Env) -> None:
                x = env[i]
                if tile:
                    x = _tile(x, S)
                env[o] = _packed_batch_norm(x, mods, post, pending)
            return step
        return make

    def _linear(self, mods: List[nn.Module], i: int, in_kind: str):
        S = self.split_factor
        m0 = mods[0]
        dense = in_kind == _I

        def make(o: int) -> _Step:
            def step(env: _Env) -> None:
                x = env[i]
                has_bias = m0.bias is not None
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
        return make

    def _function(self, node: fx.Node, slots, kinds, ndims):
        S = self.split_factor
        name = _target_name(node)
        target = node.target
        is_method = node.op == 'call_method'
        tensor_args = node.all_input_nodes
        packed = [n for n in tensor_args if kinds[n] == _P]
        where = f'{"method" if is_method else "function"} {name!r} ({node.name})'
        args_g = _getter(tuple(node.args), slots)
        kwargs_g = _getter(dict(node.kwargs), slots)
        fn = (lambda obj, *a, **k: getattr(obj, target)(*a, **k)) if is_method else target

        if target in _PER_MEMBER_FUNCTIONS:
            return self._per_member(target, node.args, node.kwargs, slots, kinds, ndims)
        if name in _RANDOM_NAMES and target not in _RANDOM_FUNCTIONS and not packed:
            raise _Unpackable(f'{where} draws random numbers shared by all members')
        if not packed:
            if target in _RANDOM_FUNCTIONS:
                # every member draws its own mask: repeat the member-invariant input first
                src = node.args[0] if node.args else None
                if not isinstance(src, fx.Node):
                    raise _Unpackable(f'{where} has no tensor input')
                i = slots[src]
                rest_g = _getter(tuple(node.args[1:]), slots)

                def make_rand(o: int) -> _Step:
                    def step(env: _Env) -> None:
                        env[o] = target(_tile(env[i], S), *rest_g(env), **kwargs_g(env))
                    return step
                return make_rand, _P, ndims.get(src), None
            # member-invariant computation: the same in every member, computed once
            return self._call(fn, args_g, kwargs_g), _I, None, None

        x = node.args[0] if node.args else None
        x_ndim = ndims.get(x) if isinstance(x, fx.Node) else None

        # shapes of packed tensors are reported as the member's shape
        if target is getattr and x in packed:
            attr = node.args[1]
            if attr == 'shape':
                i = slots[x]
                return self._call(lambda t: _member_size(t, S), lambda env: (env[i],), lambda env: {}), _I, None, None
            if attr in ('ndim', 'dtype', 'device', 'is_cuda', 'requires_grad'):
                return self._call(fn, args_g, kwargs_g), _I, None, None
            raise _Unpackable(f'{where} reads {attr!r} of a packed tensor')
        if is_method and target in ('size', 'dim') and x in packed and len(packed) == 1:
            if target == 'dim':
                return self._call(fn, args_g, kwargs_g), _I, None, None
            return self._call(lambda t, *a, **k: _member_size(t, S, *a, **k), args_g, kwargs_g), _I, None, None

        if target in _ELEMENTWISE_FUNCTIONS or target in _RANDOM_FUNCTIONS or \
                (is_method and target in _ELEMENTWISE_METHODS):
            ndim_set = {ndims[n] for n in packed}
            if len(ndim_set) != 1 or None in ndim_set:
                raise _Unpackable(f'{where} broadcasts packed tensors of different ranks')
            ndim = ndim_set.pop()
            if is_method and x not in packed:
                raise _Unpackable(f'{where} is called on a member-invariant tensor with packed arguments')
            invariant = [n for n in tensor_args if kinds[n] == _I]
            if invariant:
                aligned = {slots[n] for n in invariant}
                args_g = self._aligned_getter(node.args, slots, aligned, ndim)
                kwargs_g = self._aligned_getter(node.kwargs, slots, aligned, ndim)
            return self._call(fn, args_g, kwargs_g), _P, ndim, None

        if target in _SPATIAL_FUNCTIONS:
            if len(packed) != 1 or node.args[0] is not packed[0]:
                raise _Unpackable(f'{where} mixes packed tensors')
            return self._call(fn, args_g, kwargs_g), _P, x_ndim, None

        reduce_name = name if is_method and name in _REDUCE_METHODS else _REDUCE_FUNCTIONS.get(target)
        if reduce_name is not None:
            if len(packed) != 1 or x is not packed[0] or x_ndim is None:
                raise _Unpackable(f'{where} mixes packed tensors')
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim', None)
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get('keepdim', False)
            if dims is None or (isinstance(dims, (tuple, list)) and not dims):
                raise _Unpackable(f'{where} reduces over all dims')
            resolved = _resolve_dims(dims, x_ndim)
            if 0 in resolved or 1 in resolved or not isinstance(keepdim, bool):
                raise _Unpackable(f'{where} reduces over the batch / member dim')
            return self._call(fn, args_g, kwargs_g), _P, (x_ndim if keepdim else x_ndim - len(resolved)), None

        if name == 'flatten' and (is_method or target is torch.flatten):
            if len(packed) != 1 or x is not packed[0] or x_ndim is None:
                raise _Unpackable(f'{where} mixes packed tensors')
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get('start_dim', 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get('end_dim', -1)
            if not isinstance(start, int) or not isinstance(end, int) or start % x_ndim == 0:
                raise _Unpackable(f'{where} flattens the batch dim')
            start, end = start % x_ndim, end % x_ndim
            return self._call(fn, args_g, kwargs_g), _P, x_ndim - (end - start), None

        if target is torch.cat:
            return self._cat(node, slots, kinds, ndims, where)

        if target is operator.getitem and x is packed[0] and len(packed) == 1 and x_ndim is not None:
            index = node.args[1]
            if not isinstance(index, tuple) or len(index) < 2 or _has_node(index) or \
                    any(i != slice(None) for i in index[:2]) or \
                    not all(isinstance(i, (slice, int)) or i is Ellipsis for i in index[2:]):
                raise _Unpackable(f'{where} indexes the batch / member dims')
            return self._call(fn, args_g, kwargs_g), _P, x_ndim - sum(isinstance(i, int) for i in index), None

        if target is F.pad and x is packed[0] and len(packed) == 1 and x_ndim is not None:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get('pad')
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get('mode', 'constant')
            if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad) or len(pad) % 2:
                raise _Unpackable(f'{where} has dynamic padding')
            padded_dims = len(pad) // 2
            if padded_dims < x_ndim - 1:
                return self._call(fn, args_g, kwargs_g), _P, x_ndim, None
            if padded_dims > x_ndim - 1 or mode != 'constant':
                raise _Unpackable(f'{where} pads the batch dim or pads channels with mode {mode!r}')
            # channel padding: pad every member's channel block, [B, S*C] -> [B, S, C] -> pad -> [B, S*C']
            i = slots[x]
            rest_g = _getter(tuple(node.args[1:]), slots)

            def make_pad(o: int) -> _Step:
                def step(env: _Env) -> None:
                    env[o] = F.pad(env[i].unflatten(1, (S, -1)), *rest_g(env), **kwargs_g(env)).flatten(1, 2)
                return step
            return make_pad, _P, x_ndim, None

        raise _Unpackable(f'no packed form for {where}')

    def _cat(self, node: fx.Node, slots, kinds, ndims, where: str):
        """torch.cat of packed tensors; along channels it concatenates within every member (DenseNet)."""
        S = self.split_factor
        tensors = node.args[0] if node.args else node.kwargs.get('tensors')
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim', 0)
        if not isinstance(tensors, (tuple, list)) or not all(isinstance(t, fx.Node) for t in tensors) or \
                not isinstance(dim, int) or set(node.kwargs) - {'tensors', 'dim'}:
            raise _Unpackable(f'{where} has dynamic arguments')
        ndim_set = {ndims[t] for t in tensors if kinds[t] == _P}
        if len(ndim_set) != 1 or None in ndim_set:
            raise _Unpackable(f'{where} concatenates packed tensors of different ranks')
        ndim = ndim_set.pop()
        dim %= ndim
        ins = [(slots[t], kinds[t] == _I) for t in tensors]

        def make(o: int) -> _Step:
            def step(env: _Env) -> None:
                parts = [_tile(env[i], S) if inv else env[i] for i, inv in ins]
                if dim == 1:
                    # [B, S*C_k, ...] -> [B, S, C_k, ...], concatenate per member, back to [B, S*sum(C_k), ...]
                    env[o] = torch.cat([p.unflatten(1, (S, -1)) for p in parts], dim=2).flatten(1, 2)
                else:
                    env[o] = torch.cat(parts, dim=dim)
            return step
        return make, _P, ndim, None

    def _per_member(self, fn: Callable, args: tuple, kwargs: dict, slots, kinds, ndims):
        """Run `fn` on each member's channel block of its packed tensor arguments and concatenate the outputs."""
        S = self.split_factor
        packed = [n for n in _nodes(args, kwargs) if kinds[n] == _P]
        ndim_set = {ndims[n] for n in packed}
        if len(ndim_set) > 1:
            raise _Unpackable(f'per-member op {getattr(fn, "__name__", fn)} gets packed tensors of different ranks')
        ndim = ndim_set.pop() if ndim_set else None

        def member_getter(arg: Any) -> Callable:
            if isinstance(arg, fx.Node):
                i = slots[arg]
                if kinds[arg] == _P:
                    return lambda env: env[i].chunk(S, dim=1)
                return lambda env: [env[i]] * S
            if isinstance(arg, (tuple, list)):
                getters = [member_getter(a) for a in arg]
                kind = type(arg)
                return lambda env: [kind(v) for v in zip(*(g(env) for g in getters))] if getters else [kind()] * S
            if isinstance(arg, dict):
                keys = list(arg)
                getters = [member_getter(arg[k]) for k in keys]
                return lambda env: [dict(zip(keys, v)) for v in zip(*(g(env) for g in getters))] if keys \
                    else [{}] * S
            return lambda env: [arg] * S

        args_g, kwargs_g = member_getter(tuple(args)), member_getter(dict(kwargs))

        def make(o: int) -> _Step:
            def step(env: _Env) -> None:
                outs = [fn(*a, **k) for a, k in zip(args_g(env), kwargs_g(env))]
                env[o] = torch.cat(outs, dim=1)
            return step
        return make, _P, ndim, None

    def _aligned_getter(self, arg: Any, slots, aligned: set, ndim: int):
        S = self.split_factor
        if isinstance(arg, fx.Node):
            i = slots[arg]
            if i in aligned:
                return lambda env: _align(env[i], ndim, S)
            return lambda env: env[i]
        if isinstance(arg, (tuple, list)):
            getters = [self._aligned_getter(a, slots, aligned, ndim) for a in arg]
            kind = type(arg)
            return lambda env: kind(g(env) for g in getters)
        if isinstance(arg, dict):
            getters_kv = [(k, self._aligned_getter(v, slots, aligned, ndim)) for k, v in arg.items()]
            return lambda env: {k: g(env) for k, g in getters_kv}
        return lambda env: arg

    @staticmethod
    def _call(fn: Callable, args_g: Callable, kwargs_g: Callable):
        def make(o: int) -> _Step:
            def step(env: _Env) -> None:
                env[o] = fn(*args_g(env), **kwargs_g(env))
            return step
        return make

    # ----- run -----

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        env: _Env = [None] * self.num_slots
        env[self.input_slot] = x
        tracked = [m.num_batches_tracked for mods in self._batched_bns if mods[0].training and
                   mods[0].track_running_stats for m in mods if m.num_batches_tracked is not None]
        if tracked:
            torch._foreach_add_(tracked, 1)
        pending = self._pending
        pending.clear()
        try:
            for step, free in self.steps:
                step(env)
                for j in free:
                    env[j] = None
        finally:
            if pending:
                # the running statistics of all BN layers, updated in the packed buffers, back into the members
                dst = [t for mods, _, _ in pending for m in mods for t in (m.running_mean, m.running_var)]
                src = [t for _, mean, var in pending for pair in zip(mean.chunk(self.split_factor),
                                                                     var.chunk(self.split_factor)) for t in pair]
                torch._foreach_copy_(dst, src)
                pending.clear()
        out = env[self.out_slot]
        S = self.split_factor
        if self.out_kind == _I:
            return torch.stack([out] * S)
        # [B, S*N, ...] -> [S, B, N, ...]
        return out.unflatten(1, (S, -1)).transpose(0, 1)


def _packed_batch_norm(
        x: torch.Tensor,
        bns: List[nn.Module],
        post: List[Callable],
        pending: Optional[List[tuple]] = None,
) -> torch.Tensor:
    """BatchNorm of the packed tensor with the members' parameters and running statistics (updated like the loop).

    Args:
        x: Packed input [B, S*C, ...].
        bns: The S member BN modules.
        post: Parameter-free modules applied after the norm (BatchNormAct2d's drop and act).
        pending: Collects the updated statistics for a write-back after the forward, with the counters already
            incremented; None: increment and write back here.
    """
    bn = bns[0]
    S = len(bns)
    factor = 0. if bn.momentum is None else bn.momentum
    counts = None
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if pending is None:
            torch._foreach_add_([m.num_batches_tracked for m in bns], 1)
        if bn.momentum is None:  # cumulative moving average
            counts = [float(m.num_batches_tracked) for m in bns]
            factor = 1. / counts[0]
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_stats = (not bn.training or bn.track_running_stats) and bn.running_mean is not None
    if counts is not None and len(set(counts)) > 1:
        # members with different histories (cumulative averages with different counts): one BN per member
        norm = _batch_norm_fn(bn, True)
        outs = [norm(xi, m.running_mean, m.running_var, m.weight, m.bias, True, 1. / c, m.eps)
                for xi, m, c in zip(x.chunk(S, dim=1), bns, counts)]
        x = torch.cat(outs, dim=1)
    else:
        weight = bias = running_mean = running_var = None
        if bn.weight is not None and bn.bias is not None:
            weight, bias = torch.cat([m.weight for m in bns] + [m.bias for m in bns]).chunk(2)
        elif bn.weight is not None or bn.bias is not None:
            name = 'weight' if bn.weight is not None else 'bias'
            packed = torch.cat([getattr(m, name) for m in bns])
            weight, bias = (packed, None) if name == 'weight' else (None, packed)
        if use_stats:
            # one cat for both statistics (never mixed with the parameters: F.batch_norm updates them in place)
            running_mean, running_var = torch.cat([m.running_mean for m in bns] + [m.running_var for m in bns]).chunk(2)
        x = _batch_norm_fn(bn, bn_training)(x, running_mean, running_var, weight, bias, bn_training, factor, bn.eps)
        if use_stats and bn_training:  # F.batch_norm updated the packed statistics in place: write them back
            if pending is not None:
                pending.append((bns, running_mean, running_var))
            else:
                torch._foreach_copy_(
                    [m.running_mean for m in bns] + [m.running_var for m in bns],
                    list(running_mean.chunk(S)) + list(running_var.chunk(S)))
    for fn in post:
        x = fn(x)
    return x


def _batch_norm_fn(bn: nn.Module, bn_training: bool) -> Callable:
    """F.batch_norm, or for a SyncBatchNorm in a multi-process train step the statistics synchronising function."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn_training and bn.training and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        return F.batch_norm
    process_group = bn.process_group or torch.distributed.group.WORLD
    world_size = torch.distributed.get_world_size(process_group)
    if world_size <= 1:
        return F.batch_norm
    from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm

    def sync_fn(x, running_mean, running_var, weight, bias, training, momentum, eps):
        # statistics are per channel: syncing the packed S*C channels syncs every member's own statistics
        return sync_batch_norm.apply(x, weight, bias, running_mean, running_var, eps, momentum, process_group,
                                     world_size)
    return sync_fn


_LEAF_TYPES = set(
    _ELEMENTWISE_MODULES + _SPATIAL_MODULES + _RANDOM_MODULES + _CONV_SAME + _BATCH_NORMS + _SELECT_POOL + _DROP_PATH +
    (nn.Flatten, nn.Conv2d, nn.Linear))


class PackedBackend(SplitBackend):
    """The S members as one network: grouped convs, BN over S*C channels, one batched matmul per Linear.

    Falls back to 'loop' (one log line naming the model and the reason) for members the packer cannot run, and for
    members with gradient checkpointing enabled.
    """
    name = 'packed'

    def __init__(self):
        self._model_ref: Optional[weakref.ref] = None
        self._structure: Optional[_Structure] = None
        self._programs: Dict[tuple, Any] = {}
        self._logged = set()
        self._loop = LoopBackend()

    def __getstate__(self) -> Dict[str, Any]:
        # compiled programs hold references to the member modules: never copy or pickle them
        return {'_logged': set(self._logged)}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()
        self._logged = state.get('_logged', set())

    def attach(self, model: 'SplitNet') -> None:
        self.program(model, shared=True, in_ndim=4)

    def _log_fallback(self, model: 'SplitNet', reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            _logger.info(f"SplitNet '{self.name}' backend: {_model_label(model)} runs with 'loop': {reason}.")

    def program(self, model: 'SplitNet', shared: bool, in_ndim: int) -> Optional[_PackedProgram]:
        """The packed program of `model` for the current mode and input kind, None when it cannot be packed."""
        model_ref = self._model_ref() if self._model_ref is not None else None
        if model_ref is not model or self._structure is None or not self._structure.valid():
            self._model_ref = weakref.ref(model)
            self._structure = _Structure(model)
            self._programs = {}
        key = (model.training, shared, in_ndim)
        program = self._programs.get(key)
        if program is None:
            try:
                program = _PackedProgram(model, shared, in_ndim)
            except _Unpackable as e:
                program = str(e)
            self._programs[key] = program
        if isinstance(program, str):
            self._log_fallback(model, program)
            return None
        return program

    def supports(self, model: 'SplitNet', views: List[torch.Tensor]) -> bool:
        """True when `model` runs packed for these inputs in its current mode."""
        if any(getattr(m, 'grad_checkpointing', False) for m in model.models):
            return False
        return self.program(model, _shared(views), views[0].ndim) is not None

    def forward_members(self, model: 'SplitNet', views: List[torch.Tensor]) -> torch.Tensor:
        if any(getattr(m, 'grad_checkpointing', False) for m in model.models):
            self._log_fallback(model, 'gradient checkpointing is enabled (the loop checkpoints every member)')
            return self._loop.forward_members(model, views)
        shared = _shared(views)
        program = self.program(model, shared, views[0].ndim)
        if program is None:
            return self._loop.forward_members(model, views)
        x = views[0] if shared else torch.cat(views, dim=1)
        return program(x)


# ----- vmap: torch.func over the stacked member parameters (eval mode) -----

class VmapBackend(SplitBackend):
    """torch.func.functional_call + vmap over the members' stacked parameters and buffers, eval mode only.

    Train mode (BN running statistics cannot be written back from vmap) and members vmap cannot run use 'loop'.
    """
    name = 'vmap'

    def __init__(self):
        self._loop = LoopBackend()
        self._failed: Dict[tuple, str] = {}
        self._logged = set()

    def __getstate__(self) -> Dict[str, Any]:
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()

    def _log_fallback(self, model: 'SplitNet', reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            _logger.info(f"SplitNet '{self.name}' backend: {_model_label(model)} runs with 'loop': {reason}.")

    def supports(self, model: 'SplitNet', views: List[torch.Tensor]) -> bool:
        return not model.training and (type(model.models[0]), _shared(views)) not in self._failed

    def forward_members(self, model: 'SplitNet', views: List[torch.Tensor]) -> torch.Tensor:
        if model.training:
            self._log_fallback(model, 'train mode (vmap cannot update the members\' BN running statistics)')
            return self._loop.forward_members(model, views)
        shared = _shared(views)
        key = (type(model.models[0]), shared)
        if key in self._failed:
            return self._loop.forward_members(model, views)
        try:
            return self._forward(model, views, shared)
        except Exception as e:  # noqa: BLE001 (eval mode has no state to restore: run the loop instead)
            self._failed[key] = f'vmap failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
            self._log_fallback(model, self._failed[key])
            return self._loop.forward_members(model, views)

    def _forward(self, model: 'SplitNet', views: List[torch.Tensor], shared: bool) -> torch.Tensor:
        from torch.func import functional_call, vmap
        members = list(model.models)
        skeleton = members[0]
        names = [n for n, _ in skeleton.named_parameters()]
        buffer_names = [n for n, _ in skeleton.named_buffers()]
        per_member = [dict(m.named_parameters()) for m in members]
        per_member_buffers = [dict(m.named_buffers()) for m in members]
        # stacked inside autograd: gradients (if any) reach the member parameters
        params = {n: torch.stack([d[n] for d in per_member]) for n in names}
        buffers = {n: torch.stack([d[n] for d in per_member_buffers]) for n in buffer_names}

        def run(p, b, x):
            return functional_call(skeleton, (p, b), (x,))

        if shared:
            return vmap(run, in_dims=(0, 0, None))(params, buffers, views[0])
        return vmap(run, in_dims=(0, 0, 0))(params, buffers, torch.stack(views))


# ----- auto: a timed trial per (member, S, device, dtype, input shape, mode) -----

_AUTO_CHOICES: Dict[tuple, str] = {}
_AUTO_CANDIDATES = ('loop', 'packed', 'vmap')


def clear_auto_cache() -> None:
    """Forget the process-wide choices of the 'auto' backend."""
    _AUTO_CHOICES.clear()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # older torch: device-less autocast queries
        if device_type == 'cuda' and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype


def _arch_key(model: 'SplitNet') -> tuple:
    member = model.models[0]
    return (getattr(model, 'member_name', type(member).__name__), sum(p.numel() for p in member.parameters()),
            len(model.models))


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class AutoBackend(SplitBackend):
    """The fastest supported backend for the device, dtype and input shape, chosen by a short timed trial.

    The trial runs a few train steps (forward + backward, gradients taken with torch.autograd.grad so .grad is not
    touched) or eval forwards of every candidate on the real model; BN buffers and the RNG state are restored
    afterwards. Choices are cached per process (`clear_auto_cache` forgets them).
    """
    name = 'auto'
    warmup_steps = 1
    timed_steps = 3

    def __init__(self):
        self._backends: Dict[str, SplitBackend] = {n: SPLIT_BACKENDS[n]() for n in _AUTO_CANDIDATES}
        self._arch: Optional[Tuple[weakref.ref, tuple]] = None
        self.last_choice: Optional[str] = None
        self.last_timings: Dict[str, float] = {}

    def key(self, model: 'SplitNet', views: List[torch.Tensor]) -> tuple:
        """(member arch, member params, S, device type, compute dtype, input shape, shared, channels_last, train,
        grad enabled): the trial's cache key."""
        if self._arch is None or self._arch[0]() is not model:
            self._arch = (weakref.ref(model), _arch_key(model))
        x = views[0]
        return self._arch[1] + (
            x.device.type, _compute_dtype(x), tuple(x.shape), _shared(views),
            x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last), model.training,
            torch.is_grad_enabled())

    def __getstate__(self) -> Dict[str, Any]:
        return {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()

    def forward_members(self, model: 'SplitNet', views: List[torch.Tensor]) -> torch.Tensor:
        choice = self.choose(model, views)
        return self._backends[choice].forward_members(model, views)

    def candidates(self, model: 'SplitNet', views: List[torch.Tensor]) -> List[str]:
        names = ['loop']
        for name in ('packed', 'vmap'):
            backend = self._backends[name]
            if backend.supports(model, views):
                names.append(name)
        return names

    def choose(self, model: 'SplitNet', views: List[torch.Tensor]) -> str:
        """The backend for these inputs (runs the trial the first time a key is seen in this process)."""
        key = self.key(model, views)
        choice = _AUTO_CHOICES.get(key)
        if choice is None:
            names = self.candidates(model, views)
            if len(names) == 1:
                choice, self.last_timings = names[0], {}
            else:
                self.last_timings = self._trial(model, views, names)
                choice = min(self.last_timings, key=self.last_timings.get)
                if model.training and _distributed_world() > 1:
                    # every rank must run the same backend in train mode (SyncBatchNorm collectives): rank 0 decides
                    decision = [choice]
                    device = views[0].device if views[0].device.type == 'cuda' else None
                    torch.distributed.broadcast_object_list(decision, src=0, device=device)
                    choice = decision[0]
                timings = ', '.join(f'{n} {t * 1e3:.2f} ms' for n, t in self.last_timings.items())
                _logger.info(
                    f"SplitNet 'auto' backend: {_model_label(model)} on {views[0].device.type} "
                    f"{_compute_dtype(views[0])} input {list(views[0].shape)} "
                    f"{'train' if model.training else 'eval'}: {timings} -> {choice}.")
            _AUTO_CHOICES[key] = choice
        self.last_choice = choice
        return choice

    def _trial(self, model: 'SplitNet', views: List[torch.Tensor], names: List[str]) -> Dict[str, float]:
        device = views[0].device
        views = [v.detach() for v in views] if not _shared(views) else [views[0].detach()] * len(views)
        params = [p for p in model.parameters() if p.requires_grad]
        backward = model.training and torch.is_grad_enabled() and bool(params)
        buffers = [b for b in model.buffers()]
        saved = [b.detach().clone() for b in buffers]
        devices = [device] if device.type == 'cuda' else []
        timings = {}
        try:
            with torch.random.fork_rng(devices=devices):
                for name in names:
                    backend = self._backends[name]

                    def step():
                        out = backend.forward_members(model, views)
                        if backward:
                            torch.autograd.grad(out.float().sum(), params, allow_unused=True)

                    for _ in range(self.warmup_steps):
                        step()
                    times = []
                    for _ in range(self.timed_steps):
                        _synchronize(device)
                        start = time.perf_counter()
                        step()
                        _synchronize(device)
                        times.append(time.perf_counter() - start)
                    timings[name] = sorted(times)[len(times) // 2]
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
        return timings


SPLIT_BACKENDS: Dict[str, Type[SplitBackend]] = {
    'loop': LoopBackend,
    'packed': PackedBackend,
    'vmap': VmapBackend,
    'auto': AutoBackend,
}


def resolve_backend(model: 'SplitNet', name: str) -> SplitBackend:
    """The backend called `name` for `model`."""
    name = str(name)
    if name not in SPLIT_BACKENDS:
        raise ValueError(f'Unknown split backend {name!r}, expected one of {sorted(SPLIT_BACKENDS)}.')
    backend = SPLIT_BACKENDS[name]()
    if model is not None:
        backend.attach(model)
    return backend
