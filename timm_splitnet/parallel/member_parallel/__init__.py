""" Member-parallel SplitNet: the members spread over the processes of a torchrun job, logits gathered between them

Member i lives on rank i mod N when N divides S, or N = S x R ranks hold R data-parallel replicas of every member.
The layout and the process groups are `plan`, the collectives `collectives`, the model wrapper `module`, the data
pipeline `data`, the checkpoints `state`, BatchNorm and gradient clipping `norm`, the torchrun setup
`process_group`. The training task is `timm_splitnet.task.MemberParallelTask`. See docs/member_parallel.md.
"""
from .collectives import gather_member_logits
from .data import (
    MemberParallelSampler, MemberViewDataset, SharedRandomMixup, ViewKey, member_parallel_loader,
    member_parallel_sampler,
)
from .module import MemberParallelSplitNet, member_parallel_forward
from .norm import clip_grad, convert_member_sync_batchnorm, distribute_member_bn
from .plan import DEFAULT_TIMEOUT, GRAD_MODES, MemberParallelError, MemberParallelPlan, valid_world_sizes
from .process_group import init_distributed_from_env, init_member_parallel
from .state import gather_optimizer_state_dict, gather_state_dict, load_optimizer_state_dict

__all__ = [
    'MemberParallelPlan', 'MemberParallelSplitNet', 'MemberParallelError', 'MemberViewDataset',
    'MemberParallelSampler', 'ViewKey', 'SharedRandomMixup', 'DEFAULT_TIMEOUT', 'GRAD_MODES', 'gather_member_logits',
    'member_parallel_forward', 'member_parallel_sampler', 'member_parallel_loader', 'gather_state_dict',
    'gather_optimizer_state_dict', 'load_optimizer_state_dict', 'distribute_member_bn', 'clip_grad',
    'convert_member_sync_batchnorm', 'init_distributed_from_env', 'init_member_parallel', 'valid_world_sizes',
]
