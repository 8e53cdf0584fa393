""" Member-parallel SplitNet: layout, views, sampler, shared mixup (in process) and 2-process torchrun runs (gloo)

The torchrun runs (`tests/mp_worker.py`) compare member-parallel training with the single-process loop on the same
seed and the same precomputed views: losses, updated parameters, gathered state / optimizer state, resume in both
directions, inference. A rank dying or stalling mid-step is tested through train.py
(tests/test_train_member_parallel.py).
"""
import copy
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.data

import timm
from timm.data import Mixup
from timm.optim import create_optimizer_v2

import timm_splitnet  # noqa: F401
from timm_splitnet.parallel.member_parallel import (
    MemberParallelPlan, MemberParallelSampler, MemberParallelSplitNet, MemberViewDataset, SharedRandomMixup, ViewKey,
    gather_optimizer_state_dict, gather_state_dict, load_optimizer_state_dict, member_parallel_loader,
    member_parallel_sampler, valid_world_sizes)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / 'tests' / 'mp_worker.py'
TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(split_factor: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model(f'splitnet_resnet110_s{split_factor}', layers=(1, 1, 1), num_classes=5, drop_rate=0.)


# ----- layout -----

@pytest.mark.parametrize('world_size,split_factor', [(1, 4), (2, 4), (4, 4), (2, 2), (4, 2), (6, 2), (2, 1)])
def test_plan_layout(world_size, split_factor):
    plans = [MemberParallelPlan(world_size, r, split_factor) for r in range(world_size)]
    replicas = world_size // min(world_size, split_factor)
    for plan in plans:
        assert plan.num_replicas == replicas
        # member i lives on rank i mod N (and its replicas), the replica's ranks hold every member once
        assert all(plan.owner(i, plan.replica) % plan.slots == i % plan.slots for i in plan.members)
        assert all(i % world_size == plan.rank % world_size for i in plan.members) or replicas > 1
        owned = sorted(i for r in plan.cross_group_ranks for i in plans[r].members)
        assert owned == list(range(split_factor))
        assert all(plans[r].members == plan.members for r in plan.member_group_ranks)
        assert plan.rank in plan.member_group_ranks and plan.rank in plan.cross_group_ranks
        assert len(plan.member_group_ranks) == replicas


def test_plan_layout_examples():
    assert MemberParallelPlan(2, 1, 4).members == (1, 3)
    plan = MemberParallelPlan(4, 3, 2)  # S=2 x 2 replicas
    assert (plan.members, plan.replica, plan.member_group_ranks, plan.cross_group_ranks) == ((1,), 1, (1, 3), (2, 3))


@pytest.mark.parametrize('world_size,split_factor', [(3, 4), (4, 6), (3, 2)])
def test_plan_rejects_world_sizes(world_size, split_factor):
    with pytest.raises(ValueError) as e:
        MemberParallelPlan(world_size, 0, split_factor)
    message = str(e.value)
    assert f'{world_size} processes' in message and f'S={split_factor}' in message
    assert ', '.join(str(n) for n in valid_world_sizes(split_factor)) in message
    with pytest.raises(ValueError, match='rank 2'):
        MemberParallelPlan(2, 2, 2)


# ----- single process (N = 1): the member-parallel model is the SplitNet -----

def test_single_process_model_matches_splitnet():
    ref = _tiny(2)
    mp_model = MemberParallelSplitNet(copy.deepcopy(ref), MemberParallelPlan.from_process_group(2))
    x = torch.randn(3, 6, 16, 16)
    out = mp_model(x)  # train mode without co-training: the mean [B, C]
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, ref(x))
    ref.set_cotraining(True), mp_model.set_cotraining(True)
    out = mp_model(x)  # with co-training: the member logits [S, B, C] (same number of BN updates on both sides)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out, ref(x))
    ref.eval(), mp_model.eval()
    torch.testing.assert_close(mp_model(x[:, :3]), ref(x[:, :3]))
    state = gather_state_dict(mp_model)
    assert list(state) == list(ref.state_dict())
    full = mp_model.to_splitnet(state)
    assert type(full).__name__ == 'SplitNet' and not full.training
    torch.testing.assert_close(full(x[:, :3]), ref(x[:, :3]))
    with pytest.raises(ValueError, match='do not fit'):
        mp_model.load_state_dict(_tiny(4).state_dict())


def test_single_process_optimizer_state_round_trip():
    ref = _tiny(2)
    ref.set_cotraining(True)  # train mode: the member logits [S, B, C] (the member-parallel model keeps it)
    mp_model = MemberParallelSplitNet(copy.deepcopy(ref), MemberParallelPlan.from_process_group(2))
    opts = [create_optimizer_v2(m, opt='adamw', lr=1e-2, weight_decay=0.05) for m in (ref, mp_model)]
    x, y = torch.randn(4, 6, 16, 16), torch.randint(0, 5, (4,))
    for model, opt in zip((ref, mp_model), opts):
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.repeat(2)).backward()
        opt.step()
    gathered = gather_optimizer_state_dict(opts[1], mp_model)
    expected = opts[0].state_dict()
    assert gathered['param_groups'] == expected['param_groups']
    assert sorted(gathered['state']) == sorted(expected['state'])
    for k, v in expected['state'].items():
        for name, t in v.items():
            torch.testing.assert_close(gathered['state'][k][name], t)
    fresh = MemberParallelSplitNet(_tiny(2, seed=1), MemberParallelPlan.from_process_group(2))
    fresh_opt = create_optimizer_v2(fresh, opt='adamw', lr=1e-2, weight_decay=0.05)
    load_optimizer_state_dict(fresh_opt, fresh, expected)
    assert fresh_opt.state_dict()['param_groups'] == expected['param_groups']


# ----- data: views, sampler, loader, mixup -----

class _Images(torch.utils.data.Dataset):
    """Index-valued 'images'; the transform draws from Python, NumPy and torch RNGs."""
    transform = None

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.full((2,), float(index)), index % 3


def _random_transform(x):
    return x + torch.rand(2) + random.random() + float(np.random.rand())


def _views(members, seed=0, same_view=False):
    dataset = MemberViewDataset(_Images(), members, seed=seed, same_view=same_view)
    dataset.transform = _random_transform
    return dataset


def test_member_views_are_per_member_and_rank_independent():
    all_members, rank1 = _views((0, 1, 2, 3)), _views((1, 3))
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    views, target = all_members[4]
    own, _ = rank1[4]
    # member i's view does not depend on which rank computes it; different members get different views
    torch.testing.assert_close(own[0], views[1])
    torch.testing.assert_close(own[1], views[3])
    assert not torch.allclose(views[0], views[1])
    assert target == 1
    # the epoch changes the views; the sampler's ViewKey carries it
    rank1.set_epoch(1)
    assert not torch.allclose(rank1[4][0][0], own[0])
    torch.testing.assert_close(rank1[ViewKey(4, 0)][0][0], own[0])
    # another seed, other views; the process's random streams are untouched
    assert not torch.allclose(_views((1, 3), seed=1)[4][0][0], own[0])
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])
    # same_view: one view, shared by all members on every rank
    shared = _views((0, 2), same_view=True)[4][0]
    assert len(shared) == 1
    torch.testing.assert_close(_views((1, 3), same_view=True)[4][0][0], shared[0])


def test_sampler_gives_a_replica_the_same_indices():
    dataset = _views((0,))
    plans = [MemberParallelPlan(4, r, 2) for r in range(4)]  # 2 members x 2 replicas
    orders = []
    for plan in plans:
        sampler = member_parallel_sampler(dataset, plan, seed=3)
        assert isinstance(sampler, MemberParallelSampler)
        sampler.set_epoch(2)
        keys = list(sampler)
        assert all(isinstance(k, ViewKey) and k.epoch == 2 for k in keys)
        orders.append([k.index for k in keys])
    assert orders[0] == orders[1] and orders[2] == orders[3]  # the ranks of a replica
    assert not set(orders[0]) & set(orders[2])  # the replicas split the data
    eval_orders = [list(member_parallel_sampler(_Images(), p, is_training=False)) for p in plans]
    assert eval_orders[0] == eval_orders[1] and eval_orders[0] != eval_orders[2]
    assert member_parallel_sampler(_Images(), MemberParallelPlan(2, 0, 2), is_training=False) is None


def test_loader_rebuild_keeps_the_batches_aligned():
    batches = []
    for rank in range(2):
        plan = MemberParallelPlan(2, rank, 2)
        loader = torch.utils.data.DataLoader(
            _views(plan.members), batch_size=4, shuffle=True, drop_last=True)
        loader = member_parallel_loader(loader, plan, seed=5)
        loader.sampler.set_epoch(1)
        batches.append([target for _, target in loader])
    assert len(batches[0]) == 2 and all(torch.equal(a, b) for a, b in zip(*batches))


@pytest.mark.parametrize('norm_type', [2.0, float('inf')])
def test_clip_grad_of_a_rank_without_gradients_all_reduces_on_its_device(monkeypatch, norm_type):
    """A rank whose members got no gradients still joins the norm all-reduce with a tensor on the members' device
    (NCCL refuses CPU tensors); 'meta' stands for the accelerator here."""
    from timm_splitnet.parallel.member_parallel import norm

    class FakeMemberParallel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.member = torch.nn.Linear(3, 2, device='meta')  # parameters without .grad
            self.plan = type('Plan', (), dict(cross_group=object(), cross_group_ranks=[0, 1], rank=0, timeout=None))()

    reduced = []
    monkeypatch.setattr(norm, 'unwrap_member_parallel', lambda model: model)
    monkeypatch.setattr(norm.dist, 'all_reduce', lambda tensor, op=None, group=None: reduced.append(tensor.device))
    norm.clip_grad(FakeMemberParallel(), 1.0, norm_type=norm_type)
    assert reduced == [torch.device('meta')]


def test_shared_mixup_draws_alike_on_every_rank():
    x, y = torch.randn(4, 6, 8, 8), torch.arange(4)
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    mixups = [SharedRandomMixup(Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=5), seed=11) for _ in range(2)]
    np.random.rand()  # a rank's own NumPy stream moves on: the shared draws do not follow it
    outs = [m(x.clone(), y) for m in mixups]
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    assert not (np.random.get_state()[1] == before).all()  # only the one rand() above moved the global stream
    state = mixups[0].state_dict()
    a = mixups[0](x.clone(), y)
    mixups[1].load_state_dict(state)
    torch.testing.assert_close(mixups[1](x.clone(), y)[1], a[1])
    mixups[0].mixup_fn.mixup_enabled = False
    assert mixups[0].mixup_enabled is False and mixups[0].num_classes == 5


# ----- two processes -----

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(mode: str, out_dir: Path, timeout: float):
    python_path = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=python_path)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
           str(WORKER), mode, str(out_dir)]
    start = time.time()
    proc = subprocess.run(cmd, cwd=str(out_dir), env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - start


requires_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')


@pytest.fixture(scope='module')
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp('member_parallel')
    proc, _ = _torchrun('check', out, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return [json.loads((out / f'rank{r}.json').read_text()) for r in range(2)]


@pytest.mark.slow
@requires_dist
@pytest.mark.parametrize('scenario,members', [('step_s2', [[0], [1]]), ('step_s4', [[0, 2], [1, 3]])])
def test_member_parallel_step_matches_single_process(two_process_results, scenario, members):
    for rank, results in enumerate(two_process_results):
        r = results[scenario]
        assert r['members'] == members[rank]
        assert r['owned_params'] * 2 == r['full_params']  # each rank holds (and updates) only its members
        for ref, mp in zip(r['ref_losses'], r['mp_losses']):  # two SGD steps with mixup / cutmix, clipping
            for key in ('loss', 'loss_ce', 'loss_cot'):
                assert mp[key] == pytest.approx(ref[key], rel=TOL, abs=TOL), (rank, key)
        assert r['ref_losses'][0]['loss_cot'] > 1e-3  # the co-training term matters in this test
        assert r['param_diff'] < TOL
    root = two_process_results[0][scenario]
    assert root['same_keys'] and root['state_diff'] < TOL  # gathered state dict == single-process state dict
    assert root['optimizer']['same_groups'] and root['optimizer']['same_keys'] and root['optimizer']['max_diff'] < TOL
    assert two_process_results[1][scenario]['gathered_elsewhere']


@pytest.mark.slow
@requires_dist
def test_gather_gradient_scale(two_process_results):
    for results in two_process_results:
        for term in ('full', 'js'):
            r = results['grad_modes'][term]
            assert r['local_err'] < TOL and r['sum_share_err'] < TOL and r['local_ratio'] == pytest.approx(1.)
            # the trap: every rank back-propagating the full loss through a summing all-gather doubles the gradients
            assert r['sum_naive_ratio'] == pytest.approx(2., rel=1e-4)


@pytest.mark.slow
@requires_dist
def test_checkpoint_interchange(two_process_results):
    for results in two_process_results:
        r = results['resume']
        assert r['resume_mp_loss_diff'] < TOL and r['resume_mp_param_diff'] < TOL
        assert r['resume_single_loss_diff'] < TOL and r['resume_single_param_diff'] < TOL
        assert 'do not fit splitnet_resnet110_s2' in r['wrong_model_error'] and '4 member(s)' in r['wrong_model_error']
        assert 'another model or optimizer setup' in r['wrong_optimizer_error']
    assert two_process_results[0]['resume']['export_diff'] == 0.


@pytest.mark.slow
@requires_dist
def test_inference_and_replicas(two_process_results):
    for results in two_process_results:
        for scenario in ('inference_s2', 'inference_s4'):
            r = results[scenario]
            assert r['ensemble_diff'] < TOL and r['members_diff'] < TOL and r['metric_diff'] < 1e-4
        replicas = results['replicas']
        assert replicas['param_diff'] < TOL  # DDP between the two replicas of one member
        assert replicas['bn_replicas_differed'] and replicas['bn_diff'] < 1e-6  # distribute_member_bn averages
    assert sorted(r['replicas']['replica'] for r in two_process_results) == [0, 1]


@pytest.mark.slow
@requires_dist
def test_misaligned_batches_are_refused(two_process_results):
    for rank, results in enumerate(two_process_results):
        error = results['misaligned']['error']
        assert 'batch targets (after mixup) differs' in error and f'rank(s) [{1 - rank}]' in error
