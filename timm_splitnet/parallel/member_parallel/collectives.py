""" Member-parallel collectives: failures named, batch checks, the autograd-aware gather of the member logits """
from contextlib import contextmanager
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from .plan import GRAD_MODES, MemberParallelError, MemberParallelPlan

__all__ = ['gather_member_logits', 'collective', 'check_same', 'batch_fingerprint', 'gather_objects']


@contextmanager
def collective(plan: MemberParallelPlan, what: str, ranks: Sequence[int]):
    """Re-raise a failed collective as a MemberParallelError that names it, the ranks and the timeout."""
    try:
        yield
    except MemberParallelError:
        raise
    except RuntimeError as e:  # DistBackendError, DistNetworkError, gloo / NCCL timeouts are RuntimeErrors
        timeout = f'{plan.timeout.total_seconds():g} s' if plan.timeout is not None else 'default'
        peers = [r for r in ranks if r != plan.rank]
        raise MemberParallelError(
            f'member-parallel {what} over ranks {list(ranks)} failed on rank {plan.rank} waiting for rank(s) '
            f'{peers}: one of them died, stalled longer than the timeout ({timeout}) or is in another collective. '
            f'{type(e).__name__}: {e}') from e


def check_same(plan: MemberParallelPlan, what: str, fingerprint: torch.Tensor) -> None:
    """Raise MemberParallelError unless every rank of the cross-member group has the same fingerprint."""
    if plan.cross_group is None:
        return
    fingerprint = fingerprint.detach().double().reshape(-1)
    parts = [torch.empty_like(fingerprint) for _ in plan.cross_group_ranks]
    with collective(plan, f'check of the {what}', plan.cross_group_ranks):
        dist.all_gather(parts, fingerprint.contiguous(), group=plan.cross_group)
    parts = torch.stack(parts).cpu()
    differ = [r for r, p in zip(plan.cross_group_ranks, parts) if not torch.allclose(p, parts[plan.slot],
                                                                                      rtol=1e-6, atol=1e-6)]
    if differ:
        raise MemberParallelError(
            f'member-parallel: the {what} differs between rank {plan.rank} and rank(s) {differ} of its replica '
            f'(ranks {list(plan.cross_group_ranks)}): every rank of a replica must load the same samples (use '
            f'member_parallel_sampler / member_parallel_loader, not a DistributedSampler over all ranks) and draw '
            f'the same mixup (SharedRandomMixup). Fingerprints (shape..., sum, weighted sum): '
            f'{parts.tolist()}.')


def batch_fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A few numbers that tell batches apart: the shape (5 dims, zero-padded), the sum and a position-weighted sum."""
    shape = list(t.shape) + [0] * (5 - t.ndim)
    flat = t.detach().reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder_(97)
    return torch.cat([torch.tensor(shape[:5], dtype=torch.float64, device=flat.device),
                      torch.stack([flat.sum(), (flat * weights).sum()])])


# ----- autograd-aware gather of the member logits -----

class _GatherMembers(torch.autograd.Function):
    """All-gather [k, B, C] from the M ranks of the cross-member group into [M, k, B, C].

    Backward: 'local' returns this rank's slice of the output gradient (every rank computed the same loss), 'sum'
    all-reduces the output gradient first (the adjoint of the all-gather, for rank-dependent losses).
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, plan: MemberParallelPlan, reduce_grad: bool) -> torch.Tensor:
        ctx.plan = plan
        ctx.reduce_grad = reduce_grad
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in plan.cross_group_ranks]
        with collective(plan, 'all-gather of the member logits', plan.cross_group_ranks):
            dist.all_gather(parts, local, group=plan.cross_group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        if ctx.reduce_grad:
            grad = grad.contiguous()
            with collective(plan, 'all-reduce of the member logit gradients', plan.cross_group_ranks):
                dist.all_reduce(grad, group=plan.cross_group)
        return grad[plan.slot].contiguous(), None, None


def gather_member_logits(local: torch.Tensor, plan: MemberParallelPlan, grad_mode: str = 'local') -> torch.Tensor:
    """All member outputs [S, B, ...] in member order from this rank's members' outputs [k, B, ...].

    Every rank of the cross-member group receives all members' outputs; gradients flow back to the owned slice.

    Args:
        local: Outputs of `plan.members`, in that order, [k, B, ...]; the same shape on every rank.
        plan: The layout.
        grad_mode: 'local': every rank back-propagates the same loss (the full co-training loss) and keeps the
            gradient of its own slice, which is exactly the gradient of the single-process loss. 'sum': the
            gradients of all ranks are summed (the adjoint of an all-gather): back-propagate per rank only that
            rank's share of the loss (e.g. own CE terms + w * JS / M), otherwise the gradients are M times too large.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f'gather_member_logits: grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}.')
    plan.check_ready()
    if local.shape[0] != len(plan.members):
        raise ValueError(f'gather_member_logits: expected the outputs of {len(plan.members)} member(s) '
                         f'{list(plan.members)}, got {local.shape[0]}.')
    if plan.cross_group is None:
        return local  # this rank holds every member
    stacked = _GatherMembers.apply(local, plan, grad_mode == 'sum')  # [M, k, B, ...]; [j, l] is member j + l * M
    return stacked.transpose(0, 1).reshape(plan.split_factor, *local.shape[1:])


def gather_objects(obj: Any, plan: MemberParallelPlan, dst: Optional[int], what: str) -> Optional[List[Any]]:
    """Every rank's picklable `obj` in rank order, on `dst` (None elsewhere) or on every rank (`dst` None)."""
    if not plan.distributed:
        return [obj]
    plan.check_ready()
    ranks = range(plan.world_size)
    with collective(plan, what, ranks):
        if dst is None:
            parts = [None] * plan.world_size
            dist.all_gather_object(parts, obj, group=plan.group)
            return parts
        parts = [None] * plan.world_size if plan.rank == dst else None
        dist.gather_object(obj, parts, dst=dst, group=plan.group)
    return parts
