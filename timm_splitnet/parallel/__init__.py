""" Execution of the members: split backends (loop / packed / vmap / auto), concurrent devices, member-parallel ranks """
from .backends import (
    SPLIT_BACKENDS, AutoBackend, LoopBackend, PackedBackend, SplitBackend, VmapBackend, clear_auto_cache,
    register_per_member_function, register_per_member_module, resolve_backend,
)
from .concurrent import ConcurrentMembers, cuda_devices, parse_devices, resolve_device, synchronize_devices
