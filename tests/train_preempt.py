""" train.py with hooks that let a test time its real signals, for tests/test_preemption.py (tests only)

    python tests/train_preempt.py DIR PAUSE_RANK PAUSE_STEP HOLD_SAVE -- TRAIN_ARGS...
    python -m torch.distributed.run --nproc_per_node=2 tests/train_preempt.py DIR ... -- TRAIN_ARGS...

Runs train.py (as `__main__`) with TRAIN_ARGS. On global rank PAUSE_RANK the training forward number PAUSE_STEP
(counting from 0; -1: never) writes DIR/paused-<rank> (holding the process id) and waits until DIR/go exists, so the
test can send its signal (or kill a loader worker) at a known step; with HOLD_SAVE 1 the first write of a mid-epoch
checkpoint writes DIR/saving and waits for DIR/go-save before it writes the file, so the test can signal during the
save. The hooks act in the first start only (not after a torchrun restart). Nothing here replaces what is under test:
the signals, the handlers, the checkpoint and the exit are train.py's own.
"""
import os
import runpy
import sys
import time
from pathlib import Path

import torch

from timm_splitnet.task import CoTrainingTask

TRAIN = Path(__file__).resolve().parents[1] / 'train.py'


def _mark(path: Path, text: str = '') -> None:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def _wait_for(path: Path, timeout: float = 120.) -> None:
    end = time.time() + timeout
    while not path.exists():
        if time.time() > end:
            raise RuntimeError(f'train_preempt: {path} did not appear within {timeout:.0f} s')
        time.sleep(0.02)


def main() -> None:
    folder, pause_rank, pause_step, hold_save = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if sys.argv[5] != '--':
        raise SystemExit(f'usage: {sys.argv[0]} DIR PAUSE_RANK PAUSE_STEP HOLD_SAVE -- TRAIN_ARGS...')
    rank = int(os.environ.get('RANK', 0))
    first_start = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'
    forward = CoTrainingTask.forward
    steps = [0]

    def pausing_forward(self, input, target):
        out = forward(self, input, target)
        if torch.is_grad_enabled() and first_start and rank == pause_rank:
            if steps[0] == pause_step:
                _mark(folder / f'paused-{rank}', str(os.getpid()))
                _wait_for(folder / 'go')
            steps[0] += 1
        return out

    save = torch.save
    held = [hold_save != '1' or not first_start]

    def holding_save(obj, f, *args, **kwargs):
        if not held[0] and 'recovery-' in os.path.basename(str(getattr(f, 'name', f))):
            held[0] = True
            _mark(folder / 'saving', str(os.getpid()))
            _wait_for(folder / 'go-save')
        return save(obj, f, *args, **kwargs)

    CoTrainingTask.forward = pausing_forward
    torch.save = holding_save
    sys.argv = [str(TRAIN)] + sys.argv[6:]
    runpy.run_path(str(TRAIN), run_name='__main__')


if __name__ == '__main__':
    main()
