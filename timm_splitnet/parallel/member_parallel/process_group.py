""" Process group setup from torchrun's environment, for member-parallel scripts """
import os
from datetime import timedelta
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from .plan import MemberParallelPlan, as_timedelta

__all__ = ['init_distributed_from_env', 'init_member_parallel']


def init_distributed_from_env(
        device: Optional[str] = None,
        backend: Optional[str] = None,
        timeout: Union[None, float, timedelta] = None,
) -> torch.device:
    """Initialise the default process group from torchrun's environment (if not done yet), with `timeout`.

    Without torchrun (or with WORLD_SIZE=1) no process group is created.

    Args:
        device: 'cuda' (one GPU per process: cuda:LOCAL_RANK), 'cpu', or None (cuda if available).
        backend: nccl on CUDA, gloo otherwise, unless given.
        timeout: Timeout of the default group's collectives (seconds or timedelta, default 10 minutes).

    Returns:
        This process's device.
    """
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if torch.device(device).type == 'cuda':
        dev = torch.device('cuda', local_rank if torch.device(device).index is None else torch.device(device).index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if not dist.is_initialized() and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        backend = backend or ('nccl' if dev.type == 'cuda' else 'gloo')
        store = _restart_store(as_timedelta(timeout))
        if store is None:
            dist.init_process_group(backend=backend, timeout=as_timedelta(timeout))
        else:
            dist.init_process_group(backend=backend, timeout=as_timedelta(timeout), store=store,
                                    rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))
    return dev


def _restart_store(timeout: timedelta) -> Optional[dist.Store]:
    """After a torchrun restart on one node: torchrun's store, with the keys of this restart apart from those of the
    previous start (None otherwise).

    torchrun shares its store with the workers and keeps it over restarts, with the previous start's keys in it:
    a restarted worker may read a peer's address of the last start and fail to connect (pytorch/pytorch#167288). On
    one node the restart count is the same in every worker and serves as a prefix (across nodes it is not).
    """
    restart = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))
    if (restart == 0 or os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True'
            or os.environ.get('GROUP_WORLD_SIZE') != '1'):
        return None
    store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), int(os.environ['WORLD_SIZE']),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f'timm_splitnet/restart_{restart}/', store)


def init_member_parallel(
        split_factor: int,
        device: Optional[str] = None,
        backend: Optional[str] = None,
        timeout: Union[None, float, timedelta] = None,
) -> Tuple[MemberParallelPlan, torch.device]:
    """Initialise the default process group from torchrun's environment (if not done yet) and create the plan.

    For scripts without timm's `init_distributed_device` (validate.py, benchmark.py). The default group and the
    member-parallel groups get `timeout`.

    Args:
        split_factor: S.
        device: 'cuda' (one GPU per process: cuda:LOCAL_RANK), 'cpu', or None (cuda if available).
        backend: nccl on CUDA, gloo otherwise, unless given.
        timeout: Collective timeout (seconds or timedelta, default 10 minutes).

    Returns:
        (plan, device).
    """
    dev = init_distributed_from_env(device, backend=backend, timeout=timeout)
    plan = MemberParallelPlan.from_process_group(split_factor, timeout)
    return plan, dev
