""" Worker of tests/test_member_parallel.py: run under torchrun with 2 CPU processes (gloo)

    python -m torch.distributed.run --nproc_per_node=2 --master_port=PORT tests/mp_worker.py MODE OUT_DIR

MODE 'check' runs every scenario and writes `OUT_DIR/rank<r>.json` (losses, max differences, flags) for the test
to assert on; every scenario compares a member-parallel run with the single-process loop that each rank also runs
on the same seed and the same (precomputed) views.
"""
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
from timm.data import Mixup  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import timm_splitnet  # noqa: E402,F401
from timm_splitnet.utils.checkpoint import export_model, load_safetensors  # noqa: E402
from timm_splitnet.data import channels_to_views  # noqa: E402
from timm_splitnet.loss import CoTrainingLoss, js_divergence  # noqa: E402
from timm_splitnet.parallel.member_parallel import (  # noqa: E402
    MemberParallelError, MemberParallelPlan, MemberParallelSplitNet, SharedRandomMixup, clip_grad,
    distribute_member_bn, gather_optimizer_state_dict, gather_state_dict, init_member_parallel,
    load_optimizer_state_dict, member_parallel_forward)
from timm_splitnet.task import CoTrainingTask, MemberParallelTask, validate_members  # noqa: E402

BATCH = 8
# a large co-training weight and spread-out logits: the JS term moves the parameters as much as the CE terms
COT_WEIGHT = 5.
HEAD_SCALE = 30.


def make_model(split_factor: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(f'splitnet_resnet110_s{split_factor}', layers=(1, 1, 1), num_classes=5, drop_rate=0.)
    model.set_cotraining(True)  # train mode: the member logits [S, B, C] (the member-parallel model keeps it)
    with torch.no_grad():
        for member in model.models:
            member.get_classifier().weight.mul_(HEAD_SCALE)
    return model


def make_batch(split_factor: int, step: int):
    """Views [B, S*3, 16, 16] (member i: channels 3i..3i+2) and targets [B], the same on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 3 * split_factor, 16, 16, generator=gen), torch.randint(0, 5, (BATCH,), generator=gen)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return create_optimizer_v2(model, opt='sgd', lr=0.1, momentum=0.9, weight_decay=1e-3)


def make_mixup() -> Mixup:
    return Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=5)


def criterion() -> CoTrainingLoss:
    return CoTrainingLoss(cot_weight=COT_WEIGHT)


def own_batch(views: torch.Tensor, target: torch.Tensor, members) -> tuple:
    """What this rank's loader yields: split-major views of its members [k*B, 3, H, W], targets repeated k times."""
    own = torch.cat([views[:, 3 * i:3 * i + 3] for i in members], dim=1)
    return channels_to_views(own, len(members)), target.repeat(len(members))


def train_step(task, optimizer, input, target, clip=None) -> dict:
    result = task(input, target)
    optimizer.zero_grad()
    result['loss'].backward()
    if clip is not None:
        clip()
    optimizer.step()
    return {k: float(result[k].detach()) for k in ('loss', 'loss_ce', 'loss_cot')}


def max_param_diff(mp_model, ref) -> float:
    ref_params = dict(ref.named_parameters())
    return max((p.detach() - ref_params[n].detach()).abs().max().item() for n, p in mp_model.named_parameters())


def max_state_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0. for k in a)


def optimizer_state_diff(a: dict, b: dict) -> dict:
    """Structure equality and the largest tensor difference of two optimizer state dicts."""
    same_groups = a['param_groups'] == b['param_groups']
    same_keys = sorted(a['state']) == sorted(b['state'])
    diff = 0.
    if same_keys:
        for k in a['state']:
            for name, v in a['state'][k].items():
                if isinstance(v, torch.Tensor):
                    diff = max(diff, (v - b['state'][k][name]).abs().max().item())
    return dict(same_groups=same_groups, same_keys=same_keys, max_diff=diff)


def scenario_step(split_factor: int, steps: int = 2) -> dict:
    """Member-parallel SGD steps vs the single-process loop: losses, parameters, gathered state / optimizer state."""
    plan = MemberParallelPlan.from_process_group(split_factor, timeout=60)
    ref = make_model(split_factor)
    mp_model = MemberParallelSplitNet(copy.deepcopy(ref), plan)
    ref_task = CoTrainingTask(
        ref, criterion(), num_views=split_factor, mixup_fn=SharedRandomMixup(make_mixup(), 7), verbose=False)
    mp_task = MemberParallelTask(mp_model, criterion(), mixup_fn=make_mixup(), mixup_seed=7, verbose=False)
    ref_opt, mp_opt = make_optimizer(ref), make_optimizer(mp_model)
    out = dict(members=list(plan.members), ref_losses=[], mp_losses=[], owned_params=sum(
        p.numel() for p in mp_model.parameters()), full_params=sum(p.numel() for p in ref.parameters()))
    for step in range(steps):
        views, target = make_batch(split_factor, step)
        # the single-process clip: total norm over all members; the member-parallel one sums over the ranks
        out['ref_losses'].append(train_step(
            ref_task, ref_opt, channels_to_views(views, split_factor), target.repeat(split_factor),
            clip=lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)))
        out['mp_losses'].append(train_step(
            mp_task, mp_opt, *own_batch(views, target, plan.members), clip=lambda: clip_grad(mp_model, 1.0)))
    out['param_diff'] = max_param_diff(mp_model, ref)
    state = gather_state_dict(mp_model, dst=0)
    opt_state = gather_optimizer_state_dict(mp_opt, mp_model, dst=0)
    if plan.rank == 0:
        ref_state = ref.state_dict()
        out['same_keys'] = list(state) == list(ref_state)
        out['state_diff'] = max_state_diff(ref_state, state)
        out['optimizer'] = optimizer_state_diff(ref_opt.state_dict(), opt_state)
    else:
        out['gathered_elsewhere'] = state is None and opt_state is None
    return out


def scenario_grad_modes() -> dict:
    """Gradient scale of the logits gather: 'local' with the full loss and 'sum' with the rank's share are exact;
    'sum' with the full loss on every rank is M times too large. Checked for the co-training loss and for its JS
    term alone (which couples the members)."""
    split_factor = 2
    plan = MemberParallelPlan.from_process_group(split_factor, timeout=60)
    views, target = make_batch(split_factor, 0)
    out = {}
    for term in ('full', 'js'):
        def full_loss(logits, term=term):
            return criterion()(logits, target).loss if term == 'full' else js_divergence(logits)

        def share_loss(logits, term=term):
            ce = sum(torch.nn.functional.cross_entropy(logits[i], target) for i in plan.members)
            js = js_divergence(logits) / plan.slots
            return ce + COT_WEIGHT * js if term == 'full' else js

        ref = make_model(split_factor)
        full_loss(ref(views)).backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}

        def grads(grad_mode: str, loss_fn) -> dict:
            mp_model = MemberParallelSplitNet(make_model(split_factor), plan, grad_mode=grad_mode)
            loss_fn(mp_model(views)).backward()
            return {n: p.grad for n, p in mp_model.named_parameters()}

        def ratio(g: dict, ref_grads=ref_grads) -> float:
            num = sum((g[n] * ref_grads[n]).sum() for n in g)
            return float(num / sum((ref_grads[n] * ref_grads[n]).sum() for n in g))

        def rel_err(g: dict, ref_grads=ref_grads) -> float:
            num = sum(((g[n] - ref_grads[n]) ** 2).sum() for n in g)
            return float((num / sum((ref_grads[n] ** 2).sum() for n in g)).sqrt())

        local, share, naive = grads('local', full_loss), grads('sum', share_loss), grads('sum', full_loss)
        out[term] = dict(local_err=rel_err(local), sum_share_err=rel_err(share), sum_naive_ratio=ratio(naive),
                         local_ratio=ratio(local))
    return out


def scenario_resume(tmp_dir: str) -> dict:
    """Checkpoint interchange: single-process checkpoint -> member-parallel resume, and back; export."""
    split_factor = 2
    plan = MemberParallelPlan.from_process_group(split_factor, timeout=60)
    ref = make_model(split_factor)
    ref_task = CoTrainingTask(ref, criterion(), num_views=split_factor, verbose=False)
    ref_opt = make_optimizer(ref)

    def ref_step(task, opt, step):
        views, target = make_batch(split_factor, step)
        return train_step(task, opt, channels_to_views(views, split_factor), target.repeat(split_factor))

    ref_step(ref_task, ref_opt, 0)
    checkpoint = copy.deepcopy(dict(state_dict=ref.state_dict(), optimizer=ref_opt.state_dict()))

    # single-process checkpoint -> member-parallel (other init, so everything must come from the checkpoint)
    mp_model = MemberParallelSplitNet(make_model(split_factor, seed=123), plan)
    mp_opt = make_optimizer(mp_model)
    mp_model.load_state_dict(checkpoint['state_dict'])
    load_optimizer_state_dict(mp_opt, mp_model, checkpoint['optimizer'])
    mp_task = MemberParallelTask(mp_model, criterion(), verbose=False)
    ref_losses = ref_step(ref_task, ref_opt, 1)
    views, target = make_batch(split_factor, 1)
    mp_losses = train_step(mp_task, mp_opt, *own_batch(views, target, plan.members))
    out = dict(resume_mp_loss_diff=abs(ref_losses['loss'] - mp_losses['loss']),
               resume_mp_param_diff=max_param_diff(mp_model, ref))

    # member-parallel checkpoint -> single process
    state, opt_state = gather_state_dict(mp_model, dst=None), gather_optimizer_state_dict(mp_opt, mp_model, dst=None)
    ref2 = make_model(split_factor, seed=321)
    ref2_opt = make_optimizer(ref2)
    ref2.load_state_dict(state)
    ref2_opt.load_state_dict(opt_state)
    ref2_task = CoTrainingTask(ref2, criterion(), num_views=split_factor, verbose=False)
    ref2_losses = ref_step(ref2_task, ref2_opt, 2)
    views, target = make_batch(split_factor, 2)
    mp_losses = train_step(mp_task, mp_opt, *own_batch(views, target, plan.members))
    out.update(resume_single_loss_diff=abs(ref2_losses['loss'] - mp_losses['loss']),
               resume_single_param_diff=max_param_diff(mp_model, ref2))

    # a checkpoint of another model: clear errors, nothing loaded
    other = make_model(4).state_dict()
    try:
        mp_model.load_state_dict(other)
        out['wrong_model_error'] = ''
    except ValueError as e:
        out['wrong_model_error'] = str(e)
    try:
        load_optimizer_state_dict(mp_opt, mp_model, make_optimizer(make_model(4)).state_dict())
        out['wrong_optimizer_error'] = ''
    except ValueError as e:
        out['wrong_optimizer_error'] = str(e)

    # export the gathered weights and load them back through timm
    if plan.rank == 0:
        final = gather_state_dict(mp_model, dst=0)
        weights = export_model(mp_model.to_splitnet(final), os.path.join(tmp_dir, 'export'))
        loaded = make_model(split_factor, seed=5)
        load_safetensors(loaded, weights)
        out['export_diff'] = max_state_diff(final, loaded.state_dict())
    else:
        gather_state_dict(mp_model, dst=0)
    return out


def scenario_inference(split_factor: int) -> dict:
    """member_parallel_forward and validate_members across the processes vs the single-process model."""
    plan = MemberParallelPlan.from_process_group(split_factor, timeout=60)
    ref = make_model(split_factor).eval()
    mp_model = MemberParallelSplitNet(copy.deepcopy(ref), plan).eval()
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(6, 3, 16, 16, generator=gen), torch.randint(0, 5, (6,), generator=gen))
               for _ in range(3)]
    with torch.no_grad():
        x = batches[0][0]
        ensemble_diff = (member_parallel_forward(mp_model, x) - ref(x)).abs().max().item()
        members_diff = (member_parallel_forward(mp_model, x, members=True) - ref.forward_members(x)).abs().max().item()
    ref_metrics = validate_members(ref, batches, distributed=False, verbose=False)
    mp_metrics = validate_members(mp_model, batches, distributed=True, verbose=False)
    metric_diff = max(abs(ref_metrics[k] - mp_metrics[k]) for k in ref_metrics)
    return dict(ensemble_diff=ensemble_diff, members_diff=members_diff, metric_diff=metric_diff)


def scenario_replicas() -> dict:
    """S=1 on 2 processes: two replicas of one member, data parallel (DDP over the member group)."""
    plan = MemberParallelPlan.from_process_group(1, timeout=60)
    ref = make_model(1)
    mp_model = MemberParallelSplitNet(copy.deepcopy(ref), plan)
    task = MemberParallelTask(mp_model, criterion(), verbose=False)
    task.prepare_distributed()
    opt = make_optimizer(task.get_trainable_module())
    views, target = make_batch(1, 10 + plan.replica)
    train_step(task, opt, views, target)
    # reference: the average of the two replicas' gradients, one SGD step
    ref_opt = make_optimizer(ref)
    grads = []
    for replica in range(plan.num_replicas):
        ref.zero_grad()
        views, target = make_batch(1, 10 + replica)
        criterion()(ref(views), target).loss.backward()
        grads.append([p.grad.clone() for p in ref.parameters()])
    for p, *gs in zip(ref.parameters(), *grads):
        p.grad = sum(gs) / len(gs)
    ref_opt.step()
    # BN running statistics: different per replica after the step, averaged among the member's replicas
    mean = dict(mp_model.named_buffers())['models.0.bn1.running_mean']
    before = [torch.empty_like(mean) for _ in range(plan.world_size)]
    dist.all_gather(before, mean.clone())
    distribute_member_bn(mp_model, plan, reduce=True)
    bn_diff = (mean - sum(before) / len(before)).abs().max().item()
    return dict(replica=plan.replica, param_diff=max_param_diff(mp_model, ref), bn_diff=bn_diff,
                bn_replicas_differed=(before[0] - before[1]).abs().max().item() > 1e-6)


def scenario_misaligned() -> dict:
    """Ranks of a replica that load different samples (e.g. a DistributedSampler over all ranks) are stopped."""
    plan = MemberParallelPlan.from_process_group(2, timeout=60)
    task = MemberParallelTask(MemberParallelSplitNet(make_model(2), plan), criterion(), verbose=False)
    views, target = make_batch(2, 0)
    target = (target + plan.rank) % 5
    try:
        task(*own_batch(views, target, plan.members))
        return dict(error='')
    except MemberParallelError as e:
        return dict(error=str(e))


def run_check(out_dir: str) -> None:
    plan, _ = init_member_parallel(2, device='cpu', timeout=60)
    results = dict(rank=plan.rank)
    timings = {}
    for name, fn in (
            ('step_s2', lambda: scenario_step(2)),
            ('step_s4', lambda: scenario_step(4)),
            ('grad_modes', scenario_grad_modes),
            ('resume', lambda: scenario_resume(out_dir)),
            ('inference_s2', lambda: scenario_inference(2)),
            ('inference_s4', lambda: scenario_inference(4)),
            ('replicas', scenario_replicas),
            ('misaligned', scenario_misaligned),
    ):
        start = time.time()
        results[name] = fn()
        timings[name] = round(time.time() - start, 2)
    results['timings'] = timings
    with open(os.path.join(out_dir, f'rank{plan.rank}.json'), 'w') as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


@record
def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == 'check':
        run_check(out_dir)
    else:
        raise SystemExit(f'unknown mode {mode!r}')


if __name__ == '__main__':
    main()
