""" A repo-root script with a known delay in every CIFAR ResNet member forward, for the timing tests (tests only)

    python -m torch.distributed.run --nproc_per_node=2 tests/delayed_members.py DELAY_MS SCRIPT -- SCRIPT_ARGS...

Every forward of a `CifarResNet` member (the members of `splitnet_resnet110_s*`) first sleeps DELAY_MS, then SCRIPT
(e.g. benchmark.py) runs as `__main__` with SCRIPT_ARGS. A sleep uses no CPU, so the delay is the same on a busy
machine, and members that run at the same time (other processes, other threads) overlap their delays. With
SPLITNET_TEST_SLEEP_LOG=FILE every sleep appends `RANK START END` (wall-clock seconds) to FILE.rank<RANK>. The delay
is patched into the member class here; the package has no such code.
"""
import os
import runpy
import sys
import time
from pathlib import Path

from timm_splitnet.models.cifar_resnet import CifarResNet

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[3] != '--':
        raise SystemExit(f'usage: {sys.argv[0]} DELAY_MS SCRIPT -- SCRIPT_ARGS...')
    delay_s, script = float(sys.argv[1]) / 1000., ROOT / sys.argv[2]
    forward = CifarResNet.forward

    rank = os.environ.get('RANK', '0')
    log = os.environ.get('SPLITNET_TEST_SLEEP_LOG')

    def delayed_forward(self, x):
        start = time.time()
        time.sleep(delay_s)
        if log:
            with open(f'{log}.rank{rank}', 'a') as f:
                f.write(f'{rank} {start} {time.time()}\n')
        return forward(self, x)

    CifarResNet.forward = delayed_forward
    sys.argv = [str(script)] + sys.argv[4:]
    runpy.run_path(str(script), run_name='__main__')


if __name__ == '__main__':
    main()
