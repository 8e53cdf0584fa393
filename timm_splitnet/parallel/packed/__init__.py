""" The 'packed' backend: the S members lowered from an fx trace into one grouped network

`ops` (op tables) -> `values` / `batch_norm` / `program` (runtime) -> `context`, `module_rules`, `function_rules`
(lowering rules) -> `lowering` (trace and build) -> `backend` (`PackedBackend`, registered as 'packed').
See docs/backends.md.
"""
from .backend import PackedBackend
from .lowering import lower_members
from .program import PackedProgram
from .values import Unpackable, ValueKind
