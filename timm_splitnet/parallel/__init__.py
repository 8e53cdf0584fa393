""" Execution of the members: split backends (loop / packed / vmap / auto), concurrent devices, member-parallel ranks

Importing this package registers the 'packed', 'vmap' and 'auto' backends ('loop' lives in `models._backends`).
"""
from ..models._backends import (
    SPLIT_BACKENDS, LoopBackend, SplitBackend, register_per_member_function, register_per_member_module,
    register_split_backend, resolve_backend,
)
from .packed import PackedBackend  # registers 'packed'
from .vmap import VmapBackend  # registers 'vmap'
from .auto import AutoBackend, clear_auto_cache  # registers 'auto'
from .concurrent import ConcurrentMembers, cuda_devices, parse_devices, resolve_device, synchronize_devices
