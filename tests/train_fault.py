""" train.py with a fault injected on one rank, for tests/test_train_member_parallel.py (tests only)

    python -m torch.distributed.run --nproc_per_node=2 tests/train_fault.py MODE RANK STEP -- TRAIN_ARGS...

Runs train.py (as `__main__`, so torchrun's `record` is in place) with TRAIN_ARGS; on global rank RANK the
training forward number STEP (counting from 0) raises `RuntimeError('injected failure on rank RANK')` (MODE 'die')
or sleeps for 10 minutes (MODE 'stall'), after its members' forward and before the logits gather: the other ranks
are then waiting for it in a collective. The fault is patched into the task class here; train.py and the package
have no fault-injection code.
"""
import os
import runpy
import sys
import time
from pathlib import Path

from timm_splitnet.parallel.member_parallel import MemberParallelSplitNet

TRAIN = Path(__file__).resolve().parents[1] / 'train.py'


def main() -> None:
    mode, fault_rank, fault_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode not in ('die', 'stall') or sys.argv[4] != '--':
        raise SystemExit(f'usage: {sys.argv[0]} die|stall RANK STEP -- TRAIN_ARGS...')
    forward_local = MemberParallelSplitNet.forward_local
    steps = [0]

    def failing_forward_local(self, x):
        out = forward_local(self, x)
        if self.training and int(os.environ.get('RANK', 0)) == fault_rank:
            if steps[0] == fault_step:
                if mode == 'die':
                    raise RuntimeError(f'injected failure on rank {fault_rank}')
                time.sleep(600)  # the other ranks time out (--dist-timeout); torchrun then ends this one
            steps[0] += 1
        return out

    MemberParallelSplitNet.forward_local = failing_forward_local
    sys.argv = [str(TRAIN)] + sys.argv[5:]
    runpy.run_path(str(TRAIN), run_name='__main__')


if __name__ == '__main__':
    main()
