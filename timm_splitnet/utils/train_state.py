""" Training state for exact resumption (every RNG stream), an atomic checkpoint keeper, finding the checkpoint to
resume from

See `docs/training.md` for what a resumed run restores.
"""
import errno
import logging
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .checkpoint import atomic_save

__all__ = [
    'get_rng_state', 'set_rng_state', 'gather_rng_states', 'CheckpointKeeper', 'load_checkpoint_file',
    'NotATrainingCheckpoint', 'find_resume_checkpoint', 'checkpoint_progress', 'describe_write_failure',
]

_logger = logging.getLogger(__name__)


def get_rng_state() -> Dict[str, Any]:
    """The Python, NumPy, torch CPU and (initialised) CUDA random states of this process.

    Only plain containers, numbers, strings and tensors: the result survives `torch.load(weights_only=True)`.
    """
    np_state = np.random.get_state()
    state = dict(
        python=random.getstate(),
        numpy=(np_state[0], [int(k) for k in np_state[1]], int(np_state[2]), int(np_state[3]), float(np_state[4])),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore a state from `get_rng_state` (CUDA states only when the device count matches)."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'].cpu())
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            _logger.warning(
                f'Checkpoint holds CUDA RNG states of {len(cuda)} device(s), this machine has '
                f'{torch.cuda.device_count()}: CUDA random streams are not restored.')


def gather_rng_states(distributed: bool = False, extra: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The RNG state of every rank (index = rank), with this rank's `extra` entries; a list of one without
    distributed training."""
    state = get_rng_state()
    state.update(extra or {})
    if not distributed:
        return [state]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


class NotATrainingCheckpoint(ValueError):
    """A readable file that holds weights (a state dict, safetensors) but no training checkpoint."""


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a training checkpoint on the CPU (`weights_only=True`: only tensors and plain containers).

    Raises:
        FileNotFoundError: No file at `path`.
        NotATrainingCheckpoint: The file holds weights only (safetensors, or a dict without `state_dict`).
        ValueError: The file cannot be read as a checkpoint (truncated, not a torch file, unpickling refused).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'No checkpoint at {path}.')
    if path.endswith('.safetensors'):
        raise NotATrainingCheckpoint(f'{path} is a safetensors weights file, not a training checkpoint.')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, unpickling refused
        raise ValueError(f'{path} is not a readable training checkpoint: {e}') from e
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise NotATrainingCheckpoint(f'{path} is not a training checkpoint of this script (no state_dict).')
    return checkpoint


def save_checkpoint_file(obj: Any, path: str) -> None:
    """`torch.save` to `path` through a Python file, so that a failed write (full disk, quota, file-size limit) raises
    the OSError with its errno instead of torch's RuntimeError."""
    try:
        with open(path, 'wb') as f:
            torch.save(obj, f)
    except RuntimeError as e:
        error = e.__context__
        while error is not None and not isinstance(error, OSError):
            error = error.__context__
        if error is None:
            raise
        raise OSError(error.errno, error.strerror, path) from e


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)  # the same inode: later replacements of src do not touch dst
    except OSError:
        shutil.copyfile(src, dst)


class CheckpointKeeper:
    """Write `last.pth.tar`, `model_best.pth.tar` and the best `checkpoint-<epoch>.pth.tar` files atomically.

    Higher metrics are better (ensemble top-1). The keeper's own state (best metric and epoch, history) is stored
    in every checkpoint under 'keeper' so a resumed run continues the same bookkeeping.
    """

    def __init__(self, checkpoint_dir: str, max_history: int = 10):
        """
        Args:
            checkpoint_dir: Output folder.
            max_history: Number of `checkpoint-<epoch>.pth.tar` files kept (best metrics first); 0 keeps none.
        """
        self.checkpoint_dir = checkpoint_dir
        self.max_history = max_history
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.history: List[Tuple[str, float]] = []  # (file name, metric), best first

    @property
    def last_path(self) -> str:
        return os.path.join(self.checkpoint_dir, 'last.pth.tar')

    @property
    def best_path(self) -> str:
        return os.path.join(self.checkpoint_dir, 'model_best.pth.tar')

    def recovery_files(self) -> List[str]:
        """Paths of the mid-epoch checkpoints (`recovery-<epoch>-<batch>.pth.tar`) in the folder."""
        if not os.path.isdir(self.checkpoint_dir):
            return []
        return [os.path.join(self.checkpoint_dir, n) for n in sorted(os.listdir(self.checkpoint_dir))
                if _RECOVERY.match(n)]

    def save_recovery(self, epoch: int, batch: int, state: Dict[str, Any]) -> str:
        """Write the mid-epoch checkpoint of `epoch` after `batch` batches, then remove older mid-epoch ones.

        Returns:
            Its path.
        """
        path = os.path.join(self.checkpoint_dir, f'recovery-{epoch}-{batch}.pth.tar')
        state = dict(state, keeper=self.state_dict())
        atomic_save(path, lambda tmp: save_checkpoint_file(state, tmp))
        self._remove_recovery(keep=path)
        return path

    def _remove_recovery(self, keep: Optional[str] = None) -> None:
        for path in self.recovery_files():
            if path != keep:
                try:
                    os.remove(path)
                except OSError as e:  # the newer checkpoint is written; a stale one only costs space
                    _logger.warning(f'Could not remove the old mid-epoch checkpoint {path}: {e}')

    def state_dict(self) -> Dict[str, Any]:
        return dict(best_metric=self.best_metric, best_epoch=self.best_epoch, history=[list(h) for h in self.history])

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        if os.path.isfile(self.best_path):
            self.best_metric = state.get('best_metric')
            self.best_epoch = state.get('best_epoch')
        # else: resumed into another output folder, whose best checkpoint is chosen anew
        history = [(name, metric) for name, metric in state.get('history', [])]
        # files of another output folder (resume elsewhere) are not ours to manage
        self.history = [h for h in history if os.path.isfile(os.path.join(self.checkpoint_dir, h[0]))]

    def save(self, epoch: int, state: Dict[str, Any], metric: Optional[float] = None) -> bool:
        """Write the checkpoint of `epoch`.

        Args:
            epoch: Epoch just finished.
            state: Checkpoint content (model, optimizer, ...); the keeper adds 'keeper' and 'metric'.
            metric: Selection metric of this epoch (higher is better), or None without evaluation.

        Returns:
            True if this epoch is the new best.
        """
        is_best = metric is not None and (self.best_metric is None or metric > self.best_metric)
        if is_best:
            self.best_metric, self.best_epoch = metric, epoch
        name = f'checkpoint-{epoch}.pth.tar'
        evicted = []
        keep = (
            metric is not None and self.max_history > 0 and
            (len(self.history) < self.max_history or metric > self.history[-1][1]))
        if keep:
            history = sorted([h for h in self.history if h[0] != name] + [(name, metric)], key=lambda h: -h[1])
            self.history, evicted = history[:self.max_history], history[self.max_history:]
        state = dict(state, keeper=self.state_dict(), metric=metric)
        atomic_save(self.last_path, lambda tmp: save_checkpoint_file(state, tmp))
        if is_best:
            atomic_save(self.best_path, lambda tmp: _link_or_copy(self.last_path, tmp))
        if keep:
            atomic_save(os.path.join(self.checkpoint_dir, name), lambda tmp: _link_or_copy(self.last_path, tmp))
        for old, _ in evicted:
            path = os.path.join(self.checkpoint_dir, old)
            if os.path.exists(path):
                os.remove(path)
        self._remove_recovery()  # the end of this epoch supersedes every mid-epoch checkpoint
        return is_best


_RECOVERY = re.compile(r'^recovery-(\d+)-(\d+)\.pth\.tar$')
_HISTORY = re.compile(r'^checkpoint-(\d+)\.pth\.tar$')


def checkpoint_progress(checkpoint: Dict[str, Any]) -> Tuple[int, int]:
    """(epoch, batches done in it) where a checkpoint continues: its `position` (mid-epoch), else the epoch after
    its `epoch`, from batch 0."""
    position = checkpoint.get('position')
    if position:
        return int(position['epoch']), int(position['batch'])
    return int(checkpoint.get('epoch', -1)) + 1, 0


def find_resume_checkpoint(
        folder: str,
        distributed: bool = False,
        device: Optional[torch.device] = None,
) -> Optional[Tuple[str, Optional[Dict[str, Any]]]]:
    """The newest complete training checkpoint in `folder`: (path, checkpoint), None when there is none.

    Candidates are the mid-epoch `recovery-<epoch>-<batch>.pth.tar`, `last.pth.tar` and the kept
    `checkpoint-<epoch>.pth.tar`; the one that continues latest (`checkpoint_progress`) wins. A file that cannot be
    read (cut short by a copy, not a checkpoint) is skipped with a warning and the next newest is taken.

    With `distributed` (a collective), rank 0 looks and the other ranks get its path, with None for the checkpoint
    (they load the file themselves); `device`: that of the broadcast (the rank's GPU under NCCL).
    """
    if not distributed:
        return _find_resume_checkpoint(folder)
    found = _find_resume_checkpoint(folder) if torch.distributed.get_rank() == 0 else None
    shared = [found[0] if found else '']
    torch.distributed.broadcast_object_list(shared, src=0, device=device)
    if not shared[0]:
        return None
    return found if found else (shared[0], None)


def _find_resume_checkpoint(folder: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    if not os.path.isdir(folder):
        return None
    candidates = []  # (progress, preference, path); the progress of last.pth.tar is read from the file
    loaded: Dict[str, Dict[str, Any]] = {}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        recovery, history = _RECOVERY.match(name), _HISTORY.match(name)
        if recovery:
            candidates.append(((int(recovery[1]), int(recovery[2])), 2, path))
        elif history:
            candidates.append(((int(history[1]) + 1, 0), 0, path))
        elif name == 'last.pth.tar':
            try:
                loaded[path] = load_checkpoint_file(path)
            except (ValueError, OSError) as e:
                _logger.warning(f'Not resuming from {path}: {e}')
                continue
            candidates.append((checkpoint_progress(loaded[path]), 1, path))
    for _, _, path in sorted(candidates, reverse=True):
        if path in loaded:
            return path, loaded[path]
        try:
            return path, load_checkpoint_file(path)
        except (ValueError, OSError) as e:
            _logger.warning(f'Not resuming from {path}: {e}')
    return None


_WRITE_HINTS = {
    errno.ENOSPC: 'the disk is full',
    errno.EDQUOT: 'the disk quota is used up',
    errno.EROFS: 'the file system is read-only',
    errno.EACCES: 'no permission to write there',
    errno.EPERM: 'no permission to write there',
    errno.EFBIG: 'the file exceeds the file-size limit of this process (ulimit -f)',
}


def _size_text(num_bytes: float) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if num_bytes < 1024 or unit == 'TiB':
            return f'{num_bytes:.0f} {unit}' if unit == 'B' else f'{num_bytes:.1f} {unit}'
        num_bytes /= 1024
    return ''


def describe_write_failure(what: str, folder: str, error: OSError) -> str:
    """One line for a failed write into `folder`: what, where, the free space there, the cause."""
    try:
        free = f'{_size_text(shutil.disk_usage(folder).free)} free'
    except OSError:
        free = 'free space unknown'
    cause = error.strerror or str(error)
    hint = _WRITE_HINTS.get(error.errno)
    return f'cannot write {what} to {folder} ({free}): {cause}' + (f' ({hint})' if hint else '')
