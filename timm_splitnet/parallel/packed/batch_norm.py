""" Packed batch norm: one F.batch_norm over the S*C channels of the packed tensor

Per-channel statistics over S*C channels are every member's own statistics; the members' parameters and running
statistics are concatenated inside autograd, and the updated statistics are written back into the members.
"""
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['PendingStats', 'packed_batch_norm', 'batch_norm_fn', 'write_back']


class PendingStats(NamedTuple):
    """Running statistics updated in a packed buffer, to be copied back into the member BN layers."""
    bns: List[nn.Module]
    running_mean: torch.Tensor
    running_var: torch.Tensor


def write_back(pending: List[PendingStats]) -> None:
    """Copy packed running statistics back into the members' buffers (one foreach copy for all layers)."""
    dst = [t for stats in pending for m in stats.bns for t in (m.running_mean, m.running_var)]
    src = [t for stats in pending
           for pair in zip(stats.running_mean.chunk(len(stats.bns)), stats.running_var.chunk(len(stats.bns)))
           for t in pair]
    torch._foreach_copy_(dst, src)


def packed_batch_norm(
        x: torch.Tensor,
        bns: List[nn.Module],
        post: List[Callable],
        pending: Optional[List[PendingStats]] = None,
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
    factor = 0. if bn.momentum is None else bn.momentum
    cumulative = None  # momentum=None: the per-channel factors 1 / num_batches_tracked, a device tensor (no sync)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if pending is None:
            torch._foreach_add_([m.num_batches_tracked for m in bns], 1)
        if bn.momentum is None:  # cumulative moving average, each member with its own count
            counts = torch.stack([m.num_batches_tracked for m in bns]).to(bn.running_mean.dtype)
            cumulative = counts.reciprocal().repeat_interleave(bn.running_mean.shape[0])
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_stats = (not bn.training or bn.track_running_stats) and bn.running_mean is not None
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
    if cumulative is None:
        x = batch_norm_fn(bn, bn_training)(x, running_mean, running_var, weight, bias, bn_training, factor, bn.eps)
    else:
        # F.batch_norm takes its momentum as a Python number: with momentum 1 it writes the batch statistics (the
        # unbiased variance, as nn.BatchNorm keeps) into scratch buffers, blended here with the tensor factors
        batch_mean, batch_var = torch.zeros_like(running_mean), torch.ones_like(running_var)
        x = batch_norm_fn(bn, bn_training)(x, batch_mean, batch_var, weight, bias, bn_training, 1., bn.eps)
        with torch.no_grad():
            running_mean.copy_(batch_mean * cumulative + running_mean * (1 - cumulative))
            running_var.copy_(batch_var * cumulative + running_var * (1 - cumulative))
    if use_stats and bn_training:  # the packed statistics were updated in place: write them back
        stats = PendingStats(bns, running_mean, running_var)
        if pending is not None:
            pending.append(stats)
        else:
            write_back([stats])
    for fn in post:
        x = fn(x)
    return x


def batch_norm_fn(bn: nn.Module, bn_training: bool) -> Callable:
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
