""" The CUDA paths: tests marked `cuda` skip without a GPU; `python -m pytest -m cuda` runs them on a GPU machine

Every check is a function of the device. The `cuda` cases run it on the GPU; where the same code means something on
the CPU, an unmarked `cpu` case runs it in the CPU suite too, so the logic and the tolerances are exercised before a
GPU ever sees them:

* 'packed' equals 'loop' in float32 and under bfloat16 autocast: train-mode outputs, every gradient, BN statistics;
* an AMP train step (float16 with timm's NativeScaler, i.e. torch's GradScaler, on CUDA; bfloat16 without a scaler
  on the CPU, where train.py makes no scaler) updates the weights as the float32 step does;
* channels_last: a train step of the task with `channels_last` (NHWC views) equals the contiguous one, the members
  get NHWC input and the conv weight gradients are NHWC;
* a process group of one process (NCCL on CUDA, gloo on the CPU): a DDP train step (SyncBatchNorm on CUDA) equals the
  plain step, BN statistics survive `distribute_bn`, distributed validation equals the local one.

The `--views-on-device` train.py run on CUDA is `tests/test_device_views.py::test_train_views_on_device[cuda]`.
"""
import copy
import socket
from contextlib import contextmanager
from typing import Dict

import pytest
import torch
import torch.distributed as dist

import timm_splitnet  # noqa: F401 (registers the models)
from timm_splitnet import CoTrainingLoss, SplitNet
from timm_splitnet.task import CoTrainingTask, validate_members
from timm_splitnet.task.distributed import DataParallelTraining

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)]
MEMBER, MEMBER_KWARGS = 'wrn16_8_cifar', dict(widen_factor=1)


@contextmanager
def exact_float32():
    """No TF32 in CUDA convolutions and matmuls (cuDNN's default allows it): float32 means float32 here."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_model(device: str, backend: str = 'loop', seed: int = 0) -> SplitNet:
    """A small WRN SplitNet (S=2); every BN weight 1 (not the zero-init of the residual branches' last BN), so that
    every layer gets a gradient in the first step."""
    torch.manual_seed(seed)
    model = SplitNet(MEMBER, 2, member_kwargs=MEMBER_KWARGS, num_classes=10, split_backend=backend)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.fill_(1.)
    return model.to(device)


def batch(device: str, size: int = 8, seed: int = 1):
    """Split-major views [2 * size, 3, 32, 32] (the loader's layout) and targets [2 * size]."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2 * size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)
    return x.to(device), y.repeat(2).to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of the reference `b`."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def grads(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_tensors_close(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], tol: float, what: str) -> None:
    """Gradients (or updates) of all parameters: the L2 error over all of them within `tol` of their L2 norm, and
    every tensor's within 10 x `tol` of its own norm, floored at 1e-2 of the whole norm (the classifier carries most
    of it; a tensor holding 1e-4 of it shows the rounding of its long sums at their full relative size)."""
    assert got.keys() == ref.keys()
    total = sum(r.double().pow(2).sum() for r in ref.values()).sqrt().item()
    error = sum((got[n].double() - r.double()).pow(2).sum() for n, r in ref.items()).sqrt().item()
    assert error < tol * total, f'{what}: relative L2 error {error / total:.2e} (tolerance {tol})'
    errors = {n: (got[n].double() - r.double()).norm().item() / max(r.double().norm().item(), 1e-2 * total)
              for n, r in ref.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 10 * tol, f'{what}: {worst} off by {errors[worst]:.2e} (tolerance {10 * tol})'


def train_step(task: CoTrainingTask, x: torch.Tensor, y: torch.Tensor, amp_dtype=None, scaler=None,
               optimizer=None) -> torch.Tensor:
    """One co-training step as train.py runs it (autocast forward; the scaler owns backward and step when given)."""
    device_type = x.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = task(x, y)['loss']
    if scaler is not None:
        scaler(loss, optimizer, parameters=task.get_trainable_module().parameters())
        return loss.detach()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss.detach()


# ----- packed == loop -----

# float32: the two backends add the same products in another order (grouped vs single convolutions): ~1e-6 of the
# logits and ~1e-6 relative L2 error of the gradients on the CPU; bfloat16 autocast: both round every convolution to
# 8 bits of mantissa, not at the same intermediate values: ~1e-2 of the logits, ~6e-3 relative L2 error of the
# gradients (as far from the float64 gradients as from each other)
PACKED_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 5e-2)}  # (logits and BN statistics, gradients)


@pytest.mark.parametrize('amp_dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('device', DEVICES)
def test_packed_matches_loop_on_the_device(device, amp_dtype):
    """Train mode, three steps of forward and backward: member logits, every gradient and the BN running statistics
    of 'packed' against 'loop' (float32, or bfloat16 autocast as `--amp --amp-dtype bfloat16` runs them)."""
    out_tol, grad_tol = PACKED_TOL[amp_dtype]
    autocast = amp_dtype if amp_dtype != torch.float32 else None
    model, ref = make_model(device, 'packed'), make_model(device, 'loop')
    model.set_cotraining(True), ref.set_cotraining(True)
    model.train(), ref.train()
    with exact_float32():
        for step in range(3):
            x, _ = batch(device, seed=step)
            views = torch.cat(x.chunk(2), dim=1)  # [B, 6, H, W]: member i sees view i
            assert model.split_backend.supports(model.models, list(views.chunk(2, dim=1)))  # no fallback to the loop
            with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                out, ref_out = model(views), ref(views)
            assert rel_err(out, ref_out) < out_tol, f'step {step}: logits'
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(step)).to(device)
            (out.float() * w).sum().backward()
            (ref_out.float() * w).sum().backward()
            assert_tensors_close(grads(model), grads(ref), grad_tol, f'{device} {amp_dtype} step {step}')
            model.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
    for (name, b), ref_b in zip(model.named_buffers(), ref.buffers()):
        if b.is_floating_point():
            assert rel_err(b, ref_b) < out_tol, name
        else:
            assert torch.equal(b, ref_b), name


# ----- AMP train step -----

AMP_CASES = [
    pytest.param('cpu', torch.bfloat16, id='cpu-bfloat16'),
    pytest.param('cuda', torch.bfloat16, id='cuda-bfloat16', marks=pytest.mark.cuda),
    pytest.param('cuda', torch.float16, id='cuda-float16-gradscaler', marks=pytest.mark.cuda),
]


@pytest.mark.parametrize('device,amp_dtype', AMP_CASES)
def test_amp_train_step_matches_float32(device, amp_dtype):
    """One SGD step under autocast (float16: with the loss scaler train.py makes, timm's NativeScaler over torch's
    GradScaler) changes every weight as the float32 step does, within the precision of the half type; the scaler
    took the step (no overflow: its scale is unchanged)."""
    hooks = DataParallelTraining()
    scaler = hooks.create_loss_scaler(torch.device(device), amp_dtype)
    assert (scaler is not None) == (device == 'cuda' and amp_dtype == torch.float16)  # as train.py decides
    models, updates, losses = {}, {}, {}
    with exact_float32():
        for kind in ('float32', 'amp'):
            model = make_model(device)
            task = CoTrainingTask(model, CoTrainingLoss(), num_views=2, verbose=False)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            x, y = batch(device)
            losses[kind] = train_step(task, x, y, amp_dtype if kind == 'amp' else None,
                                      scaler if kind == 'amp' else None, optimizer)
            updates[kind] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
            models[kind] = model
    assert torch.isfinite(losses['amp']) and losses['amp'].item() == pytest.approx(losses['float32'].item(), rel=2e-2)
    if scaler is not None:
        assert scaler._scaler.get_scale() == 2. ** 16  # GradScaler's initial scale: no inf / NaN, the step was taken
    # the update is -lr x the gradient: bfloat16 rounds it ~6e-3 (relative L2) away from the float32 one, float16 less
    assert_tensors_close(updates['amp'], updates['float32'], 5e-2, f'{device} {amp_dtype} update')
    assert all(u.abs().max().item() > 0 for u in updates['amp'].values())  # every parameter moved


# ----- channels_last -----

@pytest.mark.parametrize('backend', ['loop', 'packed'])
@pytest.mark.parametrize('device', DEVICES)
def test_channels_last_train_step(device, backend, monkeypatch):
    """The task with `channels_last` (train.py --channels-last) on a channels_last model: the members' input is NHWC,
    the logits, loss and gradients equal those of the contiguous model, the conv weight gradients are NHWC."""
    from timm_splitnet.parallel.packed.program import PackedProgram
    model = make_model(device, backend).to(memory_format=torch.channels_last)
    ref = make_model(device, backend)
    tasks = [CoTrainingTask(m, CoTrainingLoss(), num_views=2, verbose=False) for m in (model, ref)]
    tasks[0].channels_last = True
    seen = []  # what the members (loop) or the packed program get, in the channels_last model's step
    if backend == 'loop':
        for member in model.models:
            member.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    else:
        call = PackedProgram.__call__
        monkeypatch.setattr(PackedProgram, '__call__', lambda self, x: seen.append(x) or call(self, x))
    x, y = batch(device)
    with exact_float32():
        losses = [train_step(tasks[0], x, y)]
        monkeypatch.undo()
        losses.append(train_step(tasks[1], x, y))
    assert len(seen) == (2 if backend == 'loop' else 1)
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in seen)
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    # float32 channels_last kernels sum in yet another order: ~1e-6 relative L2 error on the CPU
    assert_tensors_close(grads(model), grads(ref), 1e-4, f'{device} {backend} channels_last')
    conv_grads = [p.grad for p in model.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert conv_grads and all(g.is_contiguous(memory_format=torch.channels_last) for g in conv_grads)


# ----- a process group of one process -----

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextmanager
def one_process_group(backend: str):
    assert not dist.is_initialized()
    dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{_free_port()}', world_size=1, rank=0)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('device', DEVICES)
def test_one_process_group(device):
    """train.py's data-parallel hooks in a real process group of one process (NCCL on CUDA, gloo on the CPU): the
    DDP-wrapped step (SyncBatchNorm on CUDA, as --sync-bn makes it) gives the plain step's loss and gradients,
    `distribute_bn` ('reduce': a mean over one process) keeps the BN statistics, and distributed validation (sums
    all-reduced) gives the local metrics."""
    backend = 'nccl' if device == 'cuda' else 'gloo'
    dev = torch.device('cuda', 0) if device == 'cuda' else torch.device('cpu')  # as train.py's (cuda:LOCAL_RANK)
    if device == 'cuda':
        torch.cuda.set_device(dev)
        assert dist.is_nccl_available()
    hooks = DataParallelTraining(world_size=1)
    hooks.distributed = True  # as init_device sets it under torchrun
    ref = make_model(device)
    with one_process_group(backend), exact_float32():
        model, _ = hooks.setup_model(copy.deepcopy(ref), dev, split_backend='loop', sync_bn=device == 'cuda')
        if device == 'cuda':
            assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        task = hooks.create_task(model, CoTrainingLoss(), num_views=2, device=dev, verbose=False)
        ref_task = CoTrainingTask(ref, CoTrainingLoss(), num_views=2, verbose=False)
        hooks.prepare_distributed(task, dev)
        assert isinstance(task.get_trainable_module(), torch.nn.parallel.DistributedDataParallel)
        x, y = batch(device)
        loss, ref_loss = train_step(task, x, y), train_step(ref_task, x, y)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        assert_tensors_close({n.removeprefix('module.'): g for n, g in grads(task.get_trainable_module()).items()},
                             grads(ref), 1e-5, f'DDP over {backend}')
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        hooks.distribute_bn([model], 'reduce')
        for name, b in model.named_buffers():
            torch.testing.assert_close(b, buffers[name], msg=name)
        model.eval(), ref.eval()
        data = [(torch.cat(batch(device, seed=s)[0].chunk(2), dim=1)[:, :3], batch(device, seed=s)[1][:8])
                for s in range(2)]
        metrics = validate_members(model, data, device=dev, distributed=True, log_interval=0, verbose=False)
        local = validate_members(ref, data, device=dev, log_interval=0, verbose=False)
    assert not dist.is_initialized()
    for key, value in local.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
