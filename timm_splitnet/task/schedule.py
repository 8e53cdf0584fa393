""" The learning-rate schedule of a run: where the warm-up starts, and what a resumed run keeps of the checkpoint's

timm's schedulers are used as they are; this decides their inputs. A resumed run whose schedule settings changed
(e.g. a larger --epochs) gets the schedule of its new settings, as timm's train.py builds it on --resume; one whose
settings are unchanged continues the checkpoint's scheduler state exactly.
"""
from typing import Any, Dict, List, Optional, Tuple

__all__ = ['TIMM_WARMUP_LR', 'resolve_warmup_lr', 'lr_warnings', 'restore_scheduler_state']

# timm's train.py starts its warm-up here
TIMM_WARMUP_LR = 1e-5

# the keys of a timm scheduler's state dict that change as it runs; the others describe the schedule itself
_RUN_STATE_KEYS = frozenset(('metric', 'best', 'last_epoch', 'lr_scheduler', 'restore_lr'))


def resolve_warmup_lr(warmup_lr: Optional[float], lr: float) -> float:
    """The LR the warm-up starts at: `warmup_lr` when given, else timm's 1e-5, and never above a tenth of the peak
    `lr` (a warm-up that starts at or above its peak would lower the LR instead of raising it)."""
    if warmup_lr is not None:
        return warmup_lr
    return min(TIMM_WARMUP_LR, 0.1 * lr)


def lr_warnings(lr: float, warmup_lr: float, warmup_epochs: float, min_lr: float) -> List[str]:
    """What is wrong with a schedule whose warm-up start or end point lies above its peak `lr`."""
    found = []
    if warmup_epochs and warmup_lr > lr:
        found.append(f'--warmup-lr {warmup_lr:g} is above the peak --lr {lr:g}: the warm-up lowers the LR to the '
                     f'peak instead of raising it.')
    if min_lr > lr:
        found.append(f'--min-lr {min_lr:g} is above the peak --lr {lr:g}: the schedule raises the LR towards its '
                     f'end instead of lowering it.')
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _schedule_changes(own: Dict[str, Any], saved: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    keys = [k for k in list(own) + [k for k in saved if k not in own] if k not in _RUN_STATE_KEYS]
    return [(k, _plain(saved.get(k)), _plain(own.get(k))) for k in keys if _plain(saved.get(k)) != _plain(own.get(k))]


def restore_scheduler_state(scheduler: Any, state: Dict[str, Any]) -> List[str]:
    """Continue a checkpoint's scheduler in `scheduler` (built for this run) when both describe one schedule.

    Args:
        scheduler: A timm scheduler built from this run's settings, before it has stepped.
        state: The checkpoint's `scheduler.state_dict()`.

    Returns:
        The settings that differ, e.g. `['t_initial: 2 -> 6']`. When empty the checkpoint's state was loaded;
        otherwise `scheduler` keeps this run's schedule (the caller then steps it to the resumed epoch).
    """
    changes = _schedule_changes(scheduler.state_dict(), state)
    if not changes:
        scheduler.load_state_dict(state)
    return [f'{key}: {old} -> {new}' for key, old, new in changes]
