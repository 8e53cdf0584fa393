""" Split backends: how the S members of a SplitNet run, and the registries behind them

The lowest layer of the execution stack: the `SplitBackend` protocol, the 'loop' backend, the backend registry
(`register_split_backend` / `resolve_backend`) and the registry of ops that must run member by member
(`register_per_member_module` / `register_per_member_function`, in the manner of timm's `register_notrace_module`).
The other backends ('packed', 'vmap', 'auto') live in `timm_splitnet.parallel` and register themselves on import.
"""
from typing import Callable, Dict, List, Optional, Sequence, Set, Type, TypeVar

import torch
import torch.nn as nn

__all__ = [
    'SplitBackend', 'LoopBackend', 'SPLIT_BACKENDS', 'register_split_backend', 'resolve_backend',
    'register_per_member_module', 'register_per_member_function', 'is_per_member_module', 'is_per_member_function',
    'get_per_member_modules', 'get_per_member_functions', 'members_label', 'is_shared_input', 'dense_view',
    'join_views',
]

_B = TypeVar('_B', bound=Type['SplitBackend'])
_M = TypeVar('_M', bound=Type[nn.Module])
_F = TypeVar('_F', bound=Callable)


class SplitBackend:
    """How the members of a SplitNet are executed.

    A backend never changes the parameters, their names or the state dict. Its string (and equality) is its name.
    """
    name = ''

    def forward_members(self, members: Sequence[nn.Module], views: List[torch.Tensor]) -> torch.Tensor:
        """Member logits [S, B, C].

        Args:
            members: The S member networks (e.g. `SplitNet.models`).
            views: The input of every member (the same tensor S times when the members share one image).
        """
        raise NotImplementedError

    def attach(self, members: Sequence[nn.Module]) -> None:
        """Called once when the backend is selected for `members` (prepare caches, report unsupported members)."""

    def prepare(self, members: Sequence[nn.Module], in_ndim: int = 4) -> None:
        """Build now, eagerly, what the backend would build on its first call in train and in eval mode.

        Call it before `torch.compile` (`SplitNet.prepare_split_backend`): then no building (fx tracing, module
        reprs, weakrefs) runs inside a compiled frame, which traces only the cached execution.
        """

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        return str(self) == str(other)

    def __hash__(self) -> int:
        return hash(self.name)


SPLIT_BACKENDS: Dict[str, Type[SplitBackend]] = {}


def register_split_backend(name: str) -> Callable[[_B], _B]:
    """Class decorator registering a `SplitBackend` subclass under `name` (sets its `name` attribute)."""
    def register(cls: _B) -> _B:
        cls.name = name
        SPLIT_BACKENDS[name] = cls
        return cls
    return register


@register_split_backend('loop')
class LoopBackend(SplitBackend):
    """The members one after another in a Python loop (the paper's execution; every family, every device)."""

    def forward_members(self, members: Sequence[nn.Module], views: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack([m(dense_view(v)) for m, v in zip(members, views)])


def resolve_backend(name: str, members: Optional[Sequence[nn.Module]] = None) -> SplitBackend:
    """A new backend called `name`, attached to `members` when given.

    Raises:
        ValueError: `name` is not a registered backend (the message lists the registered names).
    """
    name = str(name)
    if name not in SPLIT_BACKENDS:
        raise ValueError(f'Unknown split backend {name!r}, expected one of {sorted(SPLIT_BACKENDS)}.')
    backend = SPLIT_BACKENDS[name]()
    if members is not None:
        backend.attach(members)
    return backend


# parameter-free modules / functions that must run on every member's channel block separately (e.g. they draw one
# random number per batch, or per sample, that each member must draw for itself)
_PER_MEMBER_MODULES: Set[Type[nn.Module]] = set()
_PER_MEMBER_FUNCTIONS: Set[Callable] = set()


def register_per_member_module(module_type: _M) -> _M:
    """Class decorator: the 'packed' backend runs the parameter-free `module_type` on each member's channels.

    For modules that torch.fx cannot trace or that draw random numbers per batch / per sample (ShakeDrop): the
    packed tensor is split into the S member blocks, the module runs on each, and the results are concatenated.
    """
    _PER_MEMBER_MODULES.add(module_type)
    return module_type


def register_per_member_function(fn: _F) -> _F:
    """Function decorator: like `register_per_member_module` for a module-level function (traced as one call)."""
    _PER_MEMBER_FUNCTIONS.add(fn)
    return fn


def is_per_member_module(module: nn.Module) -> bool:
    """True when the type of `module` is registered with `register_per_member_module`."""
    return type(module) in _PER_MEMBER_MODULES


def is_per_member_function(fn: Callable) -> bool:
    """True when `fn` is registered with `register_per_member_function`."""
    try:
        return fn in _PER_MEMBER_FUNCTIONS
    except TypeError:  # unhashable call targets
        return False


def get_per_member_modules() -> Set[Type[nn.Module]]:
    """The registered per-member module types."""
    return set(_PER_MEMBER_MODULES)


def get_per_member_functions() -> Set[Callable]:
    """The registered per-member functions."""
    return set(_PER_MEMBER_FUNCTIONS)


def members_label(members: Sequence[nn.Module]) -> str:
    """`<member architecture> xS` for log lines (the timm model name when the members come from create_model)."""
    member = members[0]
    cfg = getattr(member, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture') if isinstance(cfg, dict) else getattr(cfg, 'architecture', None)
    return f'{arch or type(member).__name__} x{len(members)}'


def is_shared_input(views: Sequence[torch.Tensor]) -> bool:
    """True when every member sees the same tensor (the shared image, not S views)."""
    return all(v is views[0] for v in views)


def dense_view(x: torch.Tensor) -> torch.Tensor:
    """`x` as a dense tensor in its own layout: a member's channel block of a packed batch `[B, S*C, H, W]` is copied
    once, channels_last when the batch is (a conv would copy it anyway, to the weights' layout or NCHW)."""
    if x.ndim != 4 or x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)


def join_views(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """The member views concatenated along dim 1, `[B, S*C, ...]`.

    Views that are the adjacent channel blocks of one tensor (`SplitNet.split_views` of a packed batch) are that
    tensor again, without a copy and in its layout (channels_last stays channels_last); other views are concatenated.
    """
    first = views[0]
    if len(views) > 1 and first.ndim >= 2 and not torch.compiler.is_compiling() and \
            not any(v.requires_grad for v in views):
        block = first.shape[1] * first.stride(1)
        storage = first.untyped_storage().data_ptr()
        if all(v.shape == first.shape and v.stride() == first.stride() and v.dtype == first.dtype and
               v.device == first.device and v.untyped_storage().data_ptr() == storage and
               v.storage_offset() == first.storage_offset() + i * block for i, v in enumerate(views)):
            shape = (first.shape[0], len(views) * first.shape[1], *first.shape[2:])
            return first.as_strided(shape, first.stride(), first.storage_offset())
    return torch.cat(list(views), dim=1)
