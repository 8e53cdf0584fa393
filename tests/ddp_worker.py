""" train.py's `train_one_epoch` on fixed batches: helpers of tests/test_train_step.py and its DDP worker

    python -m torch.distributed.run --nproc_per_node=2 --master_port=PORT tests/ddp_worker.py OUT_DIR

Under torchrun every rank trains a copy of the same tiny SplitNet with `train_one_epoch` (DDP, gloo) on its half of
every global batch of `global_batches` (rank r: samples r*B .. r*B + B - 1) and rank 0 saves the parameters and the
epoch metrics to `OUT_DIR/ddp.pt`. The test compares them with one process that accumulates the two halves of every
global batch (`--grad-accum-steps 2`), which is what DDP computes: the mean of the per-process gradients.
"""
import copy
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import timm_splitnet  # noqa: E402,F401
from timm_splitnet.data import channels_to_views  # noqa: E402
from timm_splitnet.loss import CoTrainingLoss  # noqa: E402
from timm_splitnet.task import CoTrainingTask  # noqa: E402

S, BATCH, CLASSES, PX = 2, 4, 5, 8
CPU = torch.device('cpu')


def load_train():
    """train.py as a module (its `train_one_epoch` is the step under test)."""
    spec = importlib.util.spec_from_file_location('splitnet_train_script_step', ROOT / 'train.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('splitnet_resnet110_s2', layers=(1, 1, 1), num_classes=CLASSES)


def make_batches(num: int, batch: int = BATCH, seed: int = 0):
    """`num` loader batches as train.py's loader yields them: split-major views [S*B, 3, H, W], targets [S*B]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        views = torch.randn(batch, 3 * S, PX, PX, generator=gen)
        target = torch.randint(0, CLASSES, (batch,), generator=gen)
        out.append((channels_to_views(views, S), target.repeat(S)))
    return out


def global_batches(num: int = 3):
    """Global batches of 2 x BATCH samples, each as its two halves [(views, target) of rank 0, ... of rank 1]."""
    halves = []
    for views, target in make_batches(num, 2 * BATCH, seed=7):
        v, t = views.reshape(S, 2 * BATCH, *views.shape[1:]), target[:2 * BATCH]
        halves.append([(v[:, r * BATCH:(r + 1) * BATCH].reshape(-1, *views.shape[1:]),
                        t[r * BATCH:(r + 1) * BATCH].repeat(S)) for r in range(2)])
    return halves


def make_args(**kwargs) -> SimpleNamespace:
    """The attributes of train.py's args that `train_one_epoch` reads."""
    args = dict(grad_accum_steps=1, prefetcher=True, channels_last=False, distributed=False, clip_grad=None,
                clip_mode='norm', log_interval=100, seed=0, world_size=1)
    args.update(kwargs)
    return SimpleNamespace(**args)


class SpySGD(torch.optim.SGD):
    """SGD that records the gradients every step applies and the model's state dict after the step."""

    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(model.parameters(), **kwargs)
        self.model = model
        self.grads, self.states = [], []

    def step(self, closure=None):
        self.grads.append([
            torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for group in self.param_groups for p in group['params']])
        out = super().step(closure)
        self.states.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return out


class RecordingScheduler:
    def __init__(self):
        self.updates = []

    def step_update(self, num_updates: int, metric=None):
        self.updates.append(num_updates)


def run_epoch(train, model, batches, lr=0., momentum=0., ema_decay=None, cot_weight=0.5, parallel=None,
              distributed=False, **args):
    """One `train_one_epoch` over `batches`; returns (task, optimizer, scheduler, metrics, num_updates)."""
    task = CoTrainingTask(model, CoTrainingLoss(cot_weight=cot_weight), num_views=S, device=CPU, verbose=False)
    if ema_decay is not None:
        task.setup_ema(decay=ema_decay, device=CPU)
    if distributed:
        task.prepare_distributed()
    optimizer = SpySGD(model, lr=lr, momentum=momentum)
    scheduler = RecordingScheduler()
    args = make_args(distributed=distributed, world_size=2 if distributed else 1, **args)
    metrics, num_updates = train.train_one_epoch(
        0, task, batches, optimizer, args, CPU, scheduler, parallel=parallel)
    return task, optimizer, scheduler, metrics, num_updates


DDP_KWARGS = dict(lr=0.2, momentum=0.9, clip_grad=2.0)


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from timm_splitnet.task.distributed import DataParallelTraining
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    train = load_train()
    batches = [halves[rank] for halves in global_batches()]
    model = make_model()
    _, _, _, metrics, num_updates = run_epoch(
        train, model, batches, parallel=DataParallelTraining(0, 2), distributed=True, **DDP_KWARGS)
    if rank == 0:
        torch.save(dict(state_dict=copy.deepcopy(model.state_dict()), metrics=dict(metrics),
                        num_updates=num_updates), Path(out_dir) / 'ddp.pt')
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
