""" Semantics of train.py's training step and schedule, checked by hand on a tiny SplitNet (CPU, fixed batches)

`train_one_epoch` (the loop train.py runs) is driven with fixed split-major batches and an SGD that records the
gradients each step applies (tests/ddp_worker.py): gradient accumulation (steps per epoch, loss scaling of full and
short groups), gradient clipping (the norm bound and the direction), EMA (the recurrence of timm's ModelEmaV3 as
train.py updates it), the paper's schedule (warm-up prefix + cosine + cool-down) as train.py builds it from the
configs, and DDP over 2 gloo processes against one process on the same samples.
"""
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm.scheduler import create_scheduler_v2, scheduler_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_worker import (  # noqa: E402
    DDP_KWARGS, global_batches, load_train, make_batches, make_model, run_epoch)

ROOT = Path(__file__).resolve().parents[1]
train = load_train()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions run fastest on one thread (and many times slower with two on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _norm(grads) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def _assert_grads_close(got, expected, **tol):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **(tol or dict(rtol=1e-4, atol=1e-6)))


# --- gradient accumulation ------------------------------------------------------------------------------------------


def test_grad_accum_steps_and_loss_scaling():
    """5 batches, --grad-accum-steps 2: 3 optimizer steps; each applies the mean gradient of its batches (loss / 2),
    the last, short group of one batch its full gradient (loss / 1); the reported loss is the unscaled mean."""
    batches = make_batches(5)
    init = make_model()
    _, opt, sched, metrics, num_updates = run_epoch(train, copy.deepcopy(init), batches, grad_accum_steps=2)
    assert num_updates == 3 and len(opt.grads) == 3 and sched.updates == [1, 2, 3]
    # per-batch gradients at the initial weights (lr 0: the weights never move; BN uses batch statistics)
    single, losses = [], []
    for batch in batches:
        _, o, _, m, n = run_epoch(train, copy.deepcopy(init), [batch])
        assert n == 1
        single.append(o.grads[0])
        losses.append(m['loss'])
    mean = lambda a, b: [(x + y) / 2 for x, y in zip(a, b)]  # noqa: E731
    for got, expected in zip(opt.grads, [mean(single[0], single[1]), mean(single[2], single[3]), single[4]]):
        _assert_grads_close(got, expected)
    assert metrics['loss'] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    # the accumulated gradient is not the sum: a group of 2 applies half of g1 + g2
    assert _norm(opt.grads[0]) < 0.75 * _norm([x + y for x, y in zip(single[0], single[1])])


def test_grad_accum_updates_per_epoch_in_the_schedule():
    """train.py steps the scheduler per optimizer update: ceil(batches / accum) updates per epoch."""
    for num_batches, accum, expected in ((4, 1, 4), (4, 2, 2), (5, 2, 3), (5, 4, 2), (3, 8, 1)):
        _, opt, sched, _, n = run_epoch(train, make_model(), make_batches(num_batches, batch=2), grad_accum_steps=accum)
        assert n == expected == len(opt.grads) and sched.updates == list(range(1, expected + 1))


# --- gradient clipping ----------------------------------------------------------------------------------------------


def test_clip_grad_norm_bounds_the_norm_and_keeps_the_direction():
    batches = make_batches(2)
    init = make_model()
    _, free, *_ = run_epoch(train, copy.deepcopy(init), batches)
    norms = [_norm(g) for g in free.grads]
    max_norm = 0.1 * min(norms)
    _, clipped, *_ = run_epoch(train, copy.deepcopy(init), batches, clip_grad=max_norm)
    for g_free, g_clip, n_free in zip(free.grads, clipped.grads, norms):
        assert _norm(g_clip) <= max_norm * (1 + 1e-5)
        assert _norm(g_clip) == pytest.approx(max_norm, rel=1e-4)
        _assert_grads_close(g_clip, [g * (max_norm / n_free) for g in g_free], rtol=1e-4, atol=1e-8)
    # a bound above the norm leaves the gradients as they are
    _, loose, *_ = run_epoch(train, copy.deepcopy(init), batches, clip_grad=2 * max(norms))
    for g_free, g_loose in zip(free.grads, loose.grads):
        _assert_grads_close(g_loose, g_free, rtol=0, atol=0)


def test_clip_grad_value_bounds_every_element():
    batches = make_batches(1)
    init = make_model()
    _, free, *_ = run_epoch(train, copy.deepcopy(init), batches)
    largest = max(g.abs().max().item() for g in free.grads[0])
    bound = 0.05 * largest
    _, clipped, *_ = run_epoch(train, copy.deepcopy(init), batches, clip_grad=bound, clip_mode='value')
    for g_free, g_clip in zip(free.grads[0], clipped.grads[0]):
        torch.testing.assert_close(g_clip, g_free.clamp(-bound, bound))
    assert max(g.abs().max().item() for g in clipped.grads[0]) == pytest.approx(bound)


# --- EMA ------------------------------------------------------------------------------------------------------------


def test_model_ema_follows_the_decay():
    """--model-ema as train.py runs it (`task.update_ema(step=num_updates)` after every optimizer step, timm's
    ModelEmaV3): update 1 copies the weights (decay 0 while step <= update_after_step + 1), every later update is
    ema = decay * ema + (1 - decay) * w, for the parameters and the float buffers (BN statistics) alike."""
    decay = 0.9
    task, opt, *_ = run_epoch(train, make_model(), make_batches(4), lr=0.5, ema_decay=decay)
    ema = task.get_trainable_module(ema=True).module.state_dict()
    states = opt.states  # the model's state after steps 1..4
    assert len(states) == 4
    expected = dict(states[0])
    for state in states[1:]:
        expected = {k: decay * v + (1 - decay) * state[k] if v.is_floating_point() else state[k]
                    for k, v in expected.items()}
    for key, value in expected.items():
        torch.testing.assert_close(ema[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # the EMA lags the model: it differs from the last weights and from the first update
    weights = [k for k in ema if k.endswith('.weight')]
    assert max((ema[k] - states[-1][k]).abs().max().item() for k in weights) > 1e-3
    assert max((ema[k] - states[0][k]).abs().max().item() for k in weights) > 1e-3


# --- schedule -------------------------------------------------------------------------------------------------------

PAPER_CONFIGS = ['cifar10_wrn28_10_s4.yaml', 'cifar100_wrn28_10_s4.yaml', 'imagenet_wrn50_3_s2.yaml',
                 'imagenet_resnet50_s2.yaml', 'cifar10_folder_wrn16_8_s2_quick.yaml']


@pytest.mark.parametrize('config', PAPER_CONFIGS)
def test_paper_schedule_warmup_prefix_and_cooldown(config):
    """The recipe's schedule as train.py builds it: per-update linear warm-up from warmup_lr over the prefix, cosine
    from lr to min_lr over `epochs` more, then one cool-down epoch at min_lr: E + 1 epochs (E = warm-up + cosine)."""
    args, _ = train._parse_args(['-c', str(ROOT / 'configs' / config)])
    assert args.warmup_prefix and args.sched == 'cosine' and args.sched_on_updates and args.cooldown_epochs == 1
    warmup, cosine, per_epoch = args.warmup_epochs, args.epochs, 10
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=args.lr)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=False), updates_per_epoch=per_epoch)
    assert num_epochs == warmup + cosine + 1

    def lr_at(update):
        scheduler.step_update(update)
        return optimizer.param_groups[0]['lr']

    warm_end, cos_end, total = warmup * per_epoch, (warmup + cosine) * per_epoch, num_epochs * per_epoch
    assert lr_at(0) == pytest.approx(args.warmup_lr)
    assert lr_at(warm_end // 2) == pytest.approx(args.warmup_lr + (args.lr - args.warmup_lr) / 2, rel=1e-6)
    assert lr_at(warm_end) == pytest.approx(args.lr)  # the cosine starts at the peak after the whole prefix
    mid = warm_end + (cos_end - warm_end) // 2
    assert lr_at(mid) == pytest.approx(args.min_lr + (args.lr - args.min_lr) / 2, rel=1e-3)
    lrs = [lr_at(t) for t in range(warm_end, cos_end + 1, max(1, per_epoch))]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # non-increasing after the warm-up
    for t in range(cos_end, total):  # the cool-down epoch stays at the minimum
        assert lr_at(t) == pytest.approx(args.min_lr, rel=1e-6)


# --- DDP ------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
def test_ddp_two_processes_equal_one_process(tmp_path):
    """2 gloo processes (DDP, each on its half of every global batch, SGD momentum, clipping) end with the weights
    and epoch metrics of one process that accumulates the two halves (the mean of the per-process gradients)."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
           str(ROOT / 'tests' / 'ddp_worker.py'), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ddp = torch.load(tmp_path / 'ddp.pt', map_location='cpu', weights_only=True)

    model = make_model()
    init = copy.deepcopy(model.state_dict())
    sequence = [half for halves in global_batches() for half in halves]
    _, _, _, metrics, num_updates = run_epoch(train, model, sequence, grad_accum_steps=2, **DDP_KWARGS)
    assert ddp['num_updates'] == num_updates == 3
    moved = 0.
    for name, param in model.named_parameters():
        torch.testing.assert_close(ddp['state_dict'][name], param.detach(), rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, (param.detach() - init[name]).abs().max().item())
    assert moved > 1e-2  # the steps were not no-ops
    for key in ('loss', 'loss_ce', 'loss_cot', 'cot_weight'):
        assert ddp['metrics'][key] == pytest.approx(metrics[key], rel=1e-4), key
