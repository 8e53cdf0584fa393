""" Member-parallel BatchNorm (SyncBatchNorm, running statistics) and gradient clipping over all members """
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .collectives import collective
from .module import unwrap_member_parallel
from .plan import MemberParallelPlan

__all__ = ['convert_member_sync_batchnorm', 'distribute_member_bn', 'clip_grad']


def convert_member_sync_batchnorm(model: nn.Module, plan: MemberParallelPlan) -> nn.Module:
    """SyncBatchNorm among the replicas of the same members (`--sync-bn`): batch statistics are never shared
    between different members. Without replicas every member's BN already sees its whole batch: unchanged.
    SyncBatchNorm runs on GPUs (and XPU / HPU) only."""
    if plan.num_replicas == 1:
        return model
    from timm.layers import convert_sync_batchnorm  # keeps timm's BatchNormAct2d activation (torch's drops it)
    return convert_sync_batchnorm(model, process_group=plan.member_group)


def distribute_member_bn(model: nn.Module, plan: MemberParallelPlan, reduce: bool = True) -> None:
    """timm's `distribute_bn` restricted to the member group: average (`reduce`) or broadcast from the first
    replica the BN running statistics of the replicas of each member. Nothing to do without replicas."""
    if plan.num_replicas == 1:
        return
    mp = unwrap_member_parallel(model)
    with collective(plan, 'BN statistics sync', plan.member_group_ranks):
        for name, buf in mp.named_buffers(recurse=True):
            if 'running_mean' in name or 'running_var' in name:
                if reduce:
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=plan.member_group)
                    buf /= float(plan.num_replicas)
                else:
                    dist.broadcast(buf, plan.member_group_ranks[0], group=plan.member_group)


def _device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (or buffer); the CPU for a module without tensors."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device('cpu')


def clip_grad(model: nn.Module, value: float, mode: str = 'norm', norm_type: float = 2.0) -> Optional[torch.Tensor]:
    """timm's `dispatch_clip_grad` for a member-parallel model, equal to clipping the single-process SplitNet.

    'norm' clips by the total norm over *all* members' gradients (the squared norms are summed over the replica's
    ranks; replicas hold averaged, identical gradients), returning that norm; 'value' and 'agc' are per element /
    per parameter, hence local. Call it on every rank (with 'norm' it is a collective), after backward (and after
    `GradScaler.unscale_`).
    """
    mp = unwrap_member_parallel(model)
    params = [p for p in mp.parameters() if p.grad is not None]
    if mode == 'value':
        torch.nn.utils.clip_grad_value_(params, value)
        return None
    if mode == 'agc':
        from timm.utils import adaptive_clip_grad
        adaptive_clip_grad(params, value, norm_type=norm_type)
        return None
    if mode != 'norm':
        raise ValueError(f'clip_grad: unknown mode {mode!r}, expected norm, value or agc.')
    # a rank without gradients still joins the all-reduce, with a tensor on its own device (NCCL takes no CPU tensor)
    device = params[0].grad.device if params else _device_of(mp)
    if math.isinf(norm_type):
        local = torch.stack([p.grad.detach().abs().max().float() for p in params]).max() if params else \
            torch.zeros((), device=device)
        op = dist.ReduceOp.MAX
    else:
        local = torch.stack([p.grad.detach().float().norm(norm_type) ** norm_type for p in params]).sum() \
            if params else torch.zeros((), device=device)
        op = dist.ReduceOp.SUM
    if mp.plan.cross_group is not None:
        with collective(mp.plan, 'all-reduce of the gradient norm', mp.plan.cross_group_ranks):
            dist.all_reduce(local, op=op, group=mp.plan.cross_group)
    total = local if math.isinf(norm_type) else local ** (1. / norm_type)
    coef = (value / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return total

