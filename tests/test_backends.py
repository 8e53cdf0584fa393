"""Execution backends: 'packed' / 'vmap' / 'auto' give the loop's outputs, gradients and BN statistics (CPU)."""
import copy
import io
import logging
from typing import List

import pytest
import torch

import timm
import timm_splitnet  # noqa: F401 (registers the SplitNet and CIFAR models)
from timm_splitnet import SplitNet
from timm_splitnet.models._backends import SPLIT_BACKENDS, LoopBackend
from timm_splitnet.models.cifar_pyramidnet import ShakeDrop
from timm_splitnet.models.cifar_shake_shake import ShakeShake
from timm_splitnet.parallel import auto, vmap
from timm_splitnet.parallel.packed import backend as packed_backend


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and immune to OpenMP spinning on a loaded CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# small instances of every family the packed backend runs: (member, S, member kwargs)
PACKED_FAMILIES = {
    'test_resnet': ('test_resnet', 2, {}),
    'resnet_deep_avgdown_se_grouped': (
        'resnet26d', 2, dict(stem_width=8, channels=(8, 16, 16, 16), cardinality=2, base_width=16,
                             block_args=dict(attn_layer='se'))),
    'test_efficientnet': ('test_efficientnet', 2, {}),
    'efficientnet_tf_same_padding': ('test_efficientnet', 2, dict(pad_type='same')),
    # the build settings of the authors' converted EfficientNets: BN eps 1e-3, x * sigmoid(x) as timm's Swish layer
    'efficientnet_authors_build': ('test_efficientnet', 2, dict(pad_type='same', bn_eps=1e-3, act_layer='swish_mul')),
    'resnet110_cifar': ('resnet110_cifar', 2, dict(stem_width=4)),
    'wrn16_8_cifar': ('wrn16_8_cifar', 4, dict(widen_factor=1)),
    'seresnet110_cifar': ('seresnet110_cifar', 2, dict(stem_width=4)),
    'resnext29_8x64d_cifar': ('resnext29_8x64d_cifar', 2, dict(stem_width=8, cardinality=2, base_width=16)),
    'densenet_bc190_cifar': ('densenet_bc190_cifar', 2, dict(growth_rate=4, block_config=(2, 2, 2))),
    # random per-member ops in train mode: ShakeDrop (gate per batch, coefficients per sample) and Shake-Shake
    'pyramidnet272_cifar': ('pyramidnet272_cifar', 2, dict(layers=(1, 1, 1), alpha=8, shakedrop_prob=0.9)),
    'shake_shake26_2x96d_cifar': ('shake_shake26_2x96d_cifar', 2, dict(layers=(1, 1, 1), base_width=8)),
}
RANDOM_MEMBER_OPS = (ShakeDrop, ShakeShake)


def seed_random_ops(model: SplitNet, seed: int) -> List[torch.Generator]:
    """Give every ShakeDrop / Shake-Shake layer of every member its own generator, seeded by (seed, member, layer).

    Both backends then draw the same coefficients for member i's layer l, whatever order they run the layers in
    (the loop: member by member; packed: layer by layer, member i's own module on member i's channels).
    """
    generators = []
    for i, member in enumerate(model.models):
        layers = [m for m in member.modules() if isinstance(m, RANDOM_MEMBER_OPS)]
        for j, layer in enumerate(layers):
            layer.generator = torch.Generator().manual_seed(10_000 * seed + 100 * i + j)
            generators.append(layer.generator)
    return generators


def make_pair(member, split_factor, member_kwargs, backend='packed', num_classes=5, dtype=torch.float64, **kwargs):
    """A SplitNet on `backend` and a loop SplitNet with identical weights.

    float64 by default: the backends compute the same sums in another order, which deep float32 nets with random BN
    parameters amplify into visible differences, while in float64 packed and loop agree to ~1e-15.
    """
    torch.manual_seed(0)
    model = SplitNet(member, split_factor, member_kwargs=member_kwargs, num_classes=num_classes, **kwargs).to(dtype)
    ref = SplitNet(member, split_factor, member_kwargs=member_kwargs, num_classes=num_classes, **kwargs).to(dtype)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():  # non-trivial BN affine params and classifier so that every path shows in the outputs
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if p.ndim == 1 or 'fc' in name or 'classifier' in name:
                p.normal_(0.5 if name.endswith('weight') and p.ndim == 1 else 0., 0.3)
                q.copy_(p)
    model.set_split_backend(backend)
    model.set_cotraining(True)  # train mode: the member logits [S, B, C], compared member by member
    ref.set_cotraining(True)
    return model, ref


def assert_close(a, b, rtol=1e-9, what=''):
    scale = b.abs().max().clamp_min(1e-6)
    err = ((a - b).abs().max() / scale).item()
    assert err < rtol, f'{what}: relative error {err:.2e}'


def inputs(split_factor, shared, batch=4, size=32, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3 if shared else 3 * split_factor, size, size, generator=g).to(dtype)


# ----- packed == loop -----

@pytest.mark.parametrize('family', list(PACKED_FAMILIES))
def test_packed_matches_loop(family):
    """Train mode (outputs, every gradient, BN statistics) and eval mode; ShakeDrop and Shake-Shake draw their random
    coefficients from per-layer generators seeded alike in both models, so both backends draw the same numbers."""
    member, split_factor, kwargs = PACKED_FAMILIES[family]
    model, ref = make_pair(member, split_factor, kwargs)
    params = dict(model.named_parameters())
    ref_params = dict(ref.named_parameters())
    # train: outputs, gradients of every member parameter, and BN statistics over a few steps, both input kinds
    model.train()
    ref.train()
    for shared in (False, True):  # the members really run packed in train mode (no fallback to the loop)
        assert model.split_backend.supports(model.models, [inputs(split_factor, shared)] * split_factor), family
    for step, shared in enumerate((False, True, False)):
        x = inputs(split_factor, shared, batch=4 + step)
        generators, ref_generators = seed_random_ops(model, step), seed_random_ops(ref, step)
        start = [g.get_state() for g in generators]
        out, ref_out = model(x), ref(x)
        # every member's random layer drew in both models, and drew as many numbers in each
        assert [torch.equal(g.get_state(), r.get_state()) for g, r in zip(generators, ref_generators)] == \
            [True] * len(generators)
        assert not any(torch.equal(g.get_state(), s) for g, s in zip(generators, start))
        assert out.shape == ref_out.shape == (split_factor, x.shape[0], 5)
        assert_close(out, ref_out, what=f'{family} train output (shared={shared})')
        w = torch.randn_like(out)
        (out * w).sum().backward()
        (ref_out * w).sum().backward()
        # per-tensor relative error, floored at 1e-6 of the largest gradient (some BN biases get ~0 gradients)
        floor = 1e-6 * max(q.grad.abs().max().item() for q in ref_params.values() if q.grad is not None)
        for name, p in params.items():
            q = ref_params[name]
            if q.grad is None:
                assert p.grad is None or not p.grad.any(), name
                continue
            assert p.grad is not None, f'{family}: no gradient for {name}'
            err = (p.grad - q.grad).abs().max().item() / max(q.grad.abs().max().item(), floor)
            assert err < 1e-9, f'{family} grad {name}: relative error {err:.2e}'
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    for (name, b), rb in zip(model.named_buffers(), ref.buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, rb), name
        else:
            assert_close(b, rb, what=f'{family} buffer {name}')
    # eval: member logits and the ensemble, both input kinds
    model.eval()
    ref.eval()
    with torch.no_grad():
        for shared in (False, True):
            x = inputs(split_factor, shared)
            assert_close(model.forward_members(x), ref.forward_members(x), what=f'{family} eval (shared={shared})')
            assert_close(model(x), ref(x), what=f'{family} eval ensemble')


@pytest.mark.parametrize('member,convert', [
    ('test_resnet', torch.nn.SyncBatchNorm.convert_sync_batchnorm),
    ('test_efficientnet', timm.layers.convert_sync_batchnorm),
])
def test_packed_sync_batch_norm(member, convert):
    """train.py converts BN to SyncBatchNorm after selecting the backend: the packed program follows."""
    model, ref = make_pair(member, 2, {})
    x = inputs(2, False)
    model.train()
    model(x)
    model, ref = convert(model), convert(ref)
    ref.load_state_dict(model.state_dict())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert model.split_backend.supports(model.models, list(x.chunk(2, dim=1)))
    for train in (True, False):
        model.train(train)
        ref.train(train)
        assert_close(model(x), ref(x), what=f'{member} sync BN (train={train})')
    for b, rb in zip(model.buffers(), ref.buffers()):
        torch.testing.assert_close(b, rb)


def test_packed_state_dict_round_trip():
    model, _ = make_pair('wrn16_8_cifar', 2, dict(widen_factor=1))
    model.train()
    model(inputs(2, False)).sum().backward()
    loop = SplitNet('wrn16_8_cifar', 2, member_kwargs=dict(widen_factor=1), num_classes=5).double()
    sd = model.state_dict()
    assert [(k, v.shape) for k, v in sd.items()] == [(k, v.shape) for k, v in loop.state_dict().items()]
    assert all(k.startswith('models.') for k in sd)
    loop.load_state_dict(sd)
    model.eval()
    loop.eval()
    x = inputs(2, False)
    with torch.no_grad():
        assert_close(model(x), loop(x), what='round trip')


def test_packed_dropout_and_drop_path_are_per_member():
    """Members with the same weights on the same image differ only by their own random masks."""
    torch.manual_seed(0)
    model = SplitNet('wrn16_8_cifar', 2, member_kwargs=dict(widen_factor=1), num_classes=5, drop_rate=0.5,
                     drop_path_rate=0.5, split_backend='packed')
    model.models[1].load_state_dict(model.models[0].state_dict())
    x = inputs(2, True, batch=8, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model.forward_members(x)
    torch.testing.assert_close(out[0], out[1])
    model.train()
    out = model.forward_members(x)
    assert not torch.allclose(out[0], out[1])
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('family', ['pyramidnet272_cifar', 'shake_shake26_2x96d_cifar'])
def test_shakedrop_and_shake_shake_draw_per_member(family, caplog):
    """Unseeded (torch's global stream), packed members with the same weights on the same image still differ in
    train mode: each member draws its own ShakeDrop / Shake-Shake coefficients; in eval mode they agree."""
    member, split_factor, kwargs = PACKED_FAMILIES[family]
    with caplog.at_level(logging.INFO, logger=packed_backend.__name__):
        model, _ = make_pair(member, split_factor, kwargs)
        model.models[1].load_state_dict(model.models[0].state_dict())
        x = inputs(split_factor, True)
        model.eval()
        with torch.no_grad():
            out = model.forward_members(x)
        assert_close(out[1], out[0], what=f'{family} eval')
        model.train()
        torch.manual_seed(0)
        out = model.forward_members(x)
    assert "runs with 'loop'" not in caplog.text
    assert (out[0] - out[1]).abs().max() > 1e-3 * out[0].abs().max()
    # and the draws follow torch's seed: the same seed, the same member outputs (train-mode BN: batch statistics)
    torch.manual_seed(0)
    torch.testing.assert_close(model.forward_members(x)[0], out[0], rtol=0, atol=0)


# ----- fallback, selection, caching -----

def test_unsupported_family_falls_back_to_loop_with_one_log_line(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger=packed_backend.__name__):
        model = SplitNet('test_vit', 2, num_classes=5, split_backend='packed')
        ref = copy.deepcopy(model)
        ref.set_split_backend('loop')
        x = torch.randn(2, 6, 160, 160)
        for train in (True, False):
            model.train(train)
            ref.train(train)
            with torch.no_grad():
                torch.testing.assert_close(model.forward_members(x), ref.forward_members(x))
    lines = [r for r in caplog.records if r.name == packed_backend.__name__]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert 'test_vit' in lines[0].getMessage() and "'loop'" in lines[0].getMessage()


def test_grad_checkpointing_runs_the_loop(caplog):
    model, ref = make_pair('test_resnet', 2, {})
    model.set_grad_checkpointing(True)
    model.train()
    ref.train()
    x = inputs(2, False)
    with caplog.at_level(logging.INFO, logger=packed_backend.__name__):
        assert_close(model(x), ref(x), what='checkpointing')
    assert 'checkpointing' in caplog.text


def test_set_split_backend_and_create_model():
    model = timm.create_model('splitnet_resnet110_s2', split_backend='packed', num_classes=5, stem_width=4)
    assert str(model.split_backend) == 'packed' and model.split_backend == 'packed'
    x = inputs(2, False, batch=2, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        packed = model(x)
        model.set_split_backend('loop')
        assert isinstance(model.split_backend, LoopBackend)
        assert_close(packed, model(x), rtol=1e-5, what='create_model packed')
    assert set(SPLIT_BACKENDS) >= {'loop', 'packed', 'vmap', 'auto'}


def test_unknown_backend_lists_valid_names():
    model = SplitNet('test_resnet', 2, num_classes=5)
    with pytest.raises(ValueError, match=r"'fast'.*'auto'.*'loop'.*'packed'.*'vmap'"):
        model.set_split_backend('fast')
    with pytest.raises(ValueError, match='packed'):
        SplitNet('test_resnet', 2, num_classes=5, split_backend='fast')


def test_packed_recompiles_after_reset_classifier():
    model, ref = make_pair('test_resnet', 2, {})
    x = inputs(2, False)
    model.eval()
    model.forward_members(x)
    model.reset_classifier(3)
    ref.reset_classifier(3)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    with torch.no_grad():
        out = model.forward_members(x)
        assert out.shape == (2, 4, 3)
        assert_close(out, ref.forward_members(x), what='after reset_classifier')
        model.reset_classifier(0)
        ref.reset_classifier(0)
        assert_close(model.forward_members(x), ref.forward_members(x), what='no classifier')


def test_packed_backend_copies_and_pickles():
    model, _ = make_pair('test_resnet', 2, {})
    model.eval()
    x = inputs(2, False)
    with torch.no_grad():
        out = model(x)
        twin = copy.deepcopy(model)  # e.g. timm's ModelEma
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(0.5)
        assert not torch.allclose(twin(x), out)  # the copy runs its own parameters, not the original's
        torch.testing.assert_close(model(x), out)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        torch.testing.assert_close(loaded(x), out)


def test_vmap_matches_loop_in_eval_and_falls_back_in_train(caplog):
    model, ref = make_pair('test_efficientnet', 2, {}, backend='vmap')
    model.eval()
    ref.eval()
    with torch.no_grad():
        for shared in (False, True):
            x = inputs(2, shared)
            assert_close(model.forward_members(x), ref.forward_members(x), what=f'vmap eval (shared={shared})')
    model.train()
    ref.train()
    x = inputs(2, False)
    with caplog.at_level(logging.INFO, logger=vmap.__name__):
        assert_close(model(x), ref(x), what='vmap train')
    assert 'train mode' in caplog.text
    for b, rb in zip(model.buffers(), ref.buffers()):
        torch.testing.assert_close(b, rb)


def test_auto_picks_a_backend_caches_it_and_keeps_the_state(monkeypatch):
    auto.clear_auto_cache()
    model, ref = make_pair('test_resnet', 2, {}, backend='auto')
    trials = []
    original = auto.AutoBackend._trial

    def counting_trial(self, *args, **kwargs):
        trials.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(auto.AutoBackend, '_trial', counting_trial)
    model.train()
    ref.train()
    x = inputs(2, False)
    rng = torch.get_rng_state()
    out = model(x)
    assert len(trials) == 1
    assert model.split_backend.last_choice in ('loop', 'packed')
    assert set(model.split_backend.last_timings) == {'loop', 'packed'}
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert_close(out, ref(x), what='auto train')
    for (name, b), rb in zip(model.named_buffers(), ref.buffers()):  # the trial steps left no trace in BN stats
        torch.testing.assert_close(b, rb, msg=name)
    model(x)
    assert len(trials) == 1  # cached per process
    other = SplitNet('test_resnet', 2, num_classes=5, split_backend='auto').double()
    other.train()
    other(x)
    assert len(trials) == 1  # same key: member arch, S, device, dtype, input shape, mode
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(trials) == 2 and model.split_backend.last_choice in ('loop', 'packed', 'vmap')
    assert len(auto._AUTO_CHOICES) == 2
    auto.clear_auto_cache()


@pytest.mark.parametrize('different_histories', [False, True])
def test_packed_cumulative_batch_norm_matches_loop_without_host_sync(monkeypatch, different_histories):
    """BN with momentum=None (cumulative average): the factors 1 / num_batches_tracked stay on the device."""
    model, ref = make_pair('wrn16_8_cifar', 2, dict(widen_factor=1))
    for net in (model, ref):
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        net.train()
        if different_histories:  # member 1 has seen more batches than member 0: each keeps its own average
            with torch.no_grad():
                net.models[1](inputs(1, False))
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item

    def no_sync(*args):
        raise AssertionError('host sync in the packed forward')
    for step in range(3):
        x = inputs(2, False, batch=4 + step)
        ref_out = ref(x)
        monkeypatch.setattr(torch.Tensor, '__float__', no_sync)
        monkeypatch.setattr(torch.Tensor, 'item', no_sync)
        out = model(x)
        monkeypatch.setattr(torch.Tensor, '__float__', real_float)
        monkeypatch.setattr(torch.Tensor, 'item', real_item)
        assert_close(out, ref_out, what=f'cumulative BN train output {step}')
    for (name, b), rb in zip(model.named_buffers(), ref.buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, rb), name
        else:
            assert_close(b, rb, what=f'cumulative BN buffer {name}')
    counts = {int(m.num_batches_tracked) for m in model.models[1].modules() if hasattr(m, 'num_batches_tracked')}
    assert counts == ({4} if different_histories else {3})


# ----- channels_last: the views reach the members without extra copies -----

def _first_conv(member):
    return next(m for m in member.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize('backend', ['loop', 'packed'])
def test_channels_last_views_reach_the_members_channels_last(monkeypatch, backend):
    """A channels_last split-major batch through the task's layout change: every member's first conv (loop), or the
    packed program (the packed batch itself, not a copy), gets channels_last-contiguous input; outputs are those of
    the contiguous path."""
    from timm_splitnet.data import views_to_channels
    from timm_splitnet.parallel.packed.program import PackedProgram
    model, ref = make_pair('wrn16_8_cifar', 2, dict(widen_factor=1), backend=backend)
    ref.set_split_backend(backend)
    model = model.to(memory_format=torch.channels_last)
    seen = []
    if backend == 'loop':
        for member in model.models:
            _first_conv(member).register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    else:
        call = PackedProgram.__call__
        monkeypatch.setattr(PackedProgram, '__call__', lambda self, x: seen.append(x) or call(self, x))
    split_major = torch.randn(2 * 4, 3, 16, 16, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        ref.train(train)
        packed = views_to_channels(split_major, 2, torch.channels_last)
        assert packed.is_contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(train):
            ref_out = ref.forward_members(views_to_channels(split_major, 2))
            seen.clear()
            out = model.forward_members(packed)
        assert len(seen) == (2 if backend == 'loop' else 1)
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in seen)
        if backend == 'packed':
            assert seen[0].data_ptr() == packed.data_ptr()  # the batch itself: no cat of its channel blocks
        assert_close(out, ref_out, what=f'{backend} channels_last (train={train})')


def test_join_views_returns_the_packed_batch_without_a_copy():
    from timm_splitnet.models._backends import join_views
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 6, 4, 5).contiguous(memory_format=fmt)
        joined = join_views(list(x.chunk(3, dim=1)))
        assert joined.data_ptr() == x.data_ptr() and torch.equal(joined, x) and joined.stride() == x.stride()
        swapped = list(x.chunk(3, dim=1))[::-1]
        assert torch.equal(join_views(swapped), torch.cat(swapped, dim=1))  # not in order: concatenated
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(join_views([a, b]), torch.cat([a, b], dim=1))
    y = torch.randn(2, 6, 4, 4, requires_grad=True)
    joined = join_views(list(y.chunk(2, dim=1)))  # inputs that need gradients: cat, gradients reach every block
    joined.sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))


def test_task_builds_the_channels_last_input_in_one_copy():
    """CoTrainingTask(channels_last): an NCHW split-major loader batch becomes the NHWC [B, S*C, H, W] input (the
    layout change's one copy), with or without mixup; a channels_last batch keeps its layout too."""
    from timm.data import Mixup
    from timm_splitnet import CoTrainingLoss
    from timm_splitnet.task import CoTrainingTask
    model = SplitNet('wrn16_8_cifar', 2, member_kwargs=dict(widen_factor=1), num_classes=5)
    x, target = torch.randn(2 * 4, 3, 8, 8), torch.arange(4).repeat(2)
    for mixup in (None, Mixup(mixup_alpha=0.8, num_classes=5)):
        task = CoTrainingTask(model, CoTrainingLoss(), num_views=2, mixup_fn=mixup, verbose=False)
        plain, _ = task.split_batch(x.clone(), target)
        assert plain.is_contiguous()
        task.channels_last = True
        for batch in (x.clone(), x.contiguous(memory_format=torch.channels_last)):
            packed, _ = task.split_batch(batch, target)
            assert packed.is_contiguous(memory_format=torch.channels_last) and not packed.is_contiguous()
            if mixup is None:
                assert torch.equal(packed, plain)


@pytest.mark.slow  # dynamo tracing: ~10 s on 2 cores
def test_compiled_packed_task_matches_eager_loop(monkeypatch):
    """CoTrainingTask.compile on 'packed': the programs of both modes are built eagerly before torch.compile (no fx
    trace inside the compiled frames), and the compiled train / eval forwards give the loop's outputs and BN stats."""
    import torch._dynamo
    from timm_splitnet import CoTrainingLoss
    from timm_splitnet.task import CoTrainingTask
    torch._dynamo.reset()
    model, ref = make_pair('wrn16_8_cifar', 2, dict(widen_factor=1), dtype=torch.float32)
    task = CoTrainingTask(model, CoTrainingLoss(), num_views=2, verbose=False)
    ref_task = CoTrainingTask(ref, CoTrainingLoss(), num_views=2, verbose=False)
    task.compile(backend='eager')
    assert len(model.split_backend._programs) == 4  # train / eval x views / shared image

    def no_lowering(*args, **kwargs):
        raise AssertionError('a packed program was built inside the compiled frame')
    monkeypatch.setattr(packed_backend, 'lower_members', no_lowering)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x, target = torch.randn(2 * 4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g).repeat(2)
        task.train()
        ref_task.train()
        out, ref_out = task(x, target), ref_task(x, target)
        torch.testing.assert_close(out['loss'], ref_out['loss'], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out['output'], ref_out['output'], rtol=1e-5, atol=1e-5)
        out['loss'].backward()
        ref_out['loss'].backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), rb in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, rb, rtol=1e-5, atol=1e-5, msg=name)
    model.eval()
    ref.eval()
    with torch.no_grad():
        image = torch.randn(4, 3, 16, 16, generator=g)
        torch.testing.assert_close(task.eval_members_fn(image), ref.forward_members(image), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(task.trainable_module(image), ref(image), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
