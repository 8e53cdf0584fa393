#!/usr/bin/env python3
""" One prepared evidence run on a GPU: speed, accuracy and every CUDA-only path of timm_splitnet

    python scripts/gpu_evidence.py --data PATH/cifar10-jpg.tar.gz --out evidence/ [--budget-min 10] [--smoke]

Parts, in this order, each written to `--out` as soon as it finishes (a run cut short keeps the finished parts):

1. environment (device, versions, CPU count) and the CIFAR-10 JPEG tarball extracted once (`train/`, `test/`);
2. speed: `benchmark.py` (one process per input group, `--results-file`): WRN-16-8 / WRN-28-10 at S=1/2/4 (32 px,
   b128) and WRN-50-3 S=1/2 (224 px, b64), train and inference img/s with bf16 AMP and channels_last, backends
   loop / packed / auto timed in the same paired rounds (and packed + torch.compile in a process of its own if the
   budget allows), each as the median ratio to the undivided network with its interquartile range, peak memory;
3. data: `benchmark.py --bench data`, views/s of the CPU multi-view loader and of `--views-on-device`;
4. accuracy: `train.py` on the CIFAR-10 folder, WRN-16-8 at S=1, 2, 4, one short recipe and seed, epochs scaled to
   the budget: member and ensemble top-1, img/s, epoch time;
5. CUDA paths: float16 AMP + GradScaler, bfloat16, channels_last + prefetcher, pinned memory, packed, auto,
   torch.compile, concurrent members on one GPU, SyncBN over a 1-process NCCL group, `--views-on-device`,
   `validate.py`: each ok / failed with its error ("skipped: no CUDA" without a GPU);
6. if time is left, the Table 5 ablations at S=2 (`--same-view`, `--cot-weight 0`).

Outputs: `results.json` (every raw number), `BENCHMARKS.md`, `RESULTS.md`, `speed_ratio.png`, `accuracy_vs_s.png`,
the logs of every step in `logs/`. Every step has a timeout derived from the remaining budget. Nothing is installed.
`--smoke` runs the same code paths on the CPU at toy scale (tiny models, a few hundred images, one epoch).
"""
import argparse
import concurrent.futures
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's timm_splitnet, as the benchmark.py / train.py it runs

from timm_splitnet.utils.benchmarking import Band, row_band  # noqa: E402
PY = sys.executable
NUM_CPUS = os.cpu_count() or 1

# share of the time left at a part's start that the part may use (later parts get what earlier ones leave)
PART_WEIGHTS = OrderedDict(speed=0.30, data=0.05, accuracy=0.40, checks=0.15, ablations=0.10)
# Table 5 at S=2: (run name, extra train.py flags)
ABLATIONS = [('abl_s2_same_view', ['--same-view']), ('abl_s2_cot0', ['--cot-weight', '0'])]


def full_plan(cpus: int) -> Dict[str, Any]:
    workers = max(1, min(16, cpus - 1))
    return dict(
        speed_groups=[
            dict(name='cifar32', models=['splitnet_wrn16_8_s2', 'splitnet_wrn16_8_s4', 'splitnet_wrn28_10_s2',
                                         'splitnet_wrn28_10_s4'], batch=128, extra=[]),
            dict(name='imagenet224', models=['splitnet_wrn50_3_s2'], batch=64, extra=[]),
        ],
        backends=['loop', 'packed', 'auto'], compile_backend='packed', warm=10, iters=30, rounds=10,
        data=dict(views=[2, 4], batch=256, warm=3, iters=20, workers=workers),
        acc=dict(model='splitnet_wrn16_8_s{}', splits=[1, 2, 4], batch=128, lr=0.1, wd=5e-4, workers=workers,
                 max_epochs=30, extra=[], train_images=50000, eval_images=10000),
        check_model=['--model', 'splitnet_wrn16_8_s2'], check_batch=32, check_workers=min(4, workers),
        mini=(20, 10), parallel_checks=4, min_step_s=20., min_part_s=45.,
        ablations=[name for name, _ in ABLATIONS],
    )


def smoke_plan(cpus: int) -> Dict[str, Any]:
    tiny = ['--model-kwargs', 'layers=(1,1,1)']
    return dict(
        speed_groups=[dict(name='cifar32', models=['splitnet_resnet110_s2'], batch=8, extra=tiny)],
        backends=['loop', 'packed', 'auto'], compile_backend=None, warm=1, iters=2, rounds=2,
        data=dict(views=[2], batch=16, warm=1, iters=2, workers=1),
        acc=dict(model='splitnet_resnet110_s{}', splits=[1, 2, 4], batch=32, lr=0.05, wd=5e-4, workers=0,
                 max_epochs=1, extra=tiny, train_images=300, eval_images=100),
        check_model=['--model', 'splitnet_resnet110_s2', *tiny], check_batch=16, check_workers=0,
        mini=(10, 5), parallel_checks=2, min_step_s=8., min_part_s=12.,
        extract_per_class=(30, 10),
        ablations=['abl_s2_same_view'],  # the code path once; the second ablation differs only in its flag
    )


# ----- running steps -----

class Evidence:
    """The run's state: deadline, results (rewritten to `--out` after every step) and the subprocess runner."""

    def __init__(self, out: Path, budget_s: float, smoke: bool):
        self.out = out
        self.logs = out / 'logs'
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.deadline = self.start + budget_s
        self.smoke = smoke
        self.results: Dict[str, Any] = OrderedDict(
            mode='smoke (CPU, toy scale: the numbers mean nothing)' if smoke else 'full', budget_s=budget_s,
            started=time.strftime('%Y-%m-%d %H:%M:%S'), env={}, steps=OrderedDict(), speed=[], data=[],
            accuracy=[], ablations=[], checks=OrderedDict(), parts=OrderedDict())

    def remaining(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, cmd: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None
            ) -> Dict[str, Any]:
        """Run `cmd` in the repository root with `timeout` (its whole process group is killed then), log to logs/."""
        timeout = max(1., min(timeout, self.remaining()))
        log = self.logs / f'{name}.log'
        cmd = [str(c) for c in cmd]
        print(f'[{time.time() - self.start:6.0f}s] {name} (timeout {timeout:.0f}s): {shlex.join(cmd)}', flush=True)
        t0 = time.time()
        with open(log, 'w') as f:
            f.write(f'$ {shlex.join(cmd)}\n')
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, **(env or {})))
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        seconds = round(time.time() - t0, 1)
        text = log.read_text(errors='replace')
        if rc is None:
            status, error = 'timeout', f'timed out after {timeout:.0f}s'
        elif rc != 0:
            status, error = 'failed', _last_error(text)
        else:
            status, error = 'ok', None
        step = OrderedDict(status=status, rc=rc, seconds=seconds, error=error, log=str(log.relative_to(self.out)),
                           command=shlex.join(cmd))
        self.results['steps'][name] = step
        print(f'[{time.time() - self.start:6.0f}s] {name}: {status} in {seconds}s' + (f': {error}' if error else ''),
              flush=True)
        return dict(step, output=text)

    def skip(self, name: str, reason: str) -> Dict[str, Any]:
        step = OrderedDict(status='skipped', error=reason)
        self.results['steps'][name] = step
        print(f'[{time.time() - self.start:6.0f}s] {name}: skipped ({reason})', flush=True)
        return step

    def save(self) -> None:
        """results.json, BENCHMARKS.md, RESULTS.md and the plots, from what is finished so far."""
        self.results['elapsed_s'] = round(time.time() - self.start, 1)
        _write(self.out / 'results.json', json.dumps(self.results, indent=2, default=str))
        _write(self.out / 'BENCHMARKS.md', benchmarks_md(self.results))
        _write(self.out / 'RESULTS.md', results_md(self.results))
        try:
            plot_speed(self.results, self.out / 'speed_ratio.png')
            plot_accuracy(self.results, self.out / 'accuracy_vs_s.png')
        except Exception as e:  # matplotlib missing or a plot of partial results: the tables are what counts
            self.results['plot_error'] = f'{type(e).__name__}: {e}'


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def _last_error(text: str) -> str:
    """The most telling line of a failed step's output: the last error / exception line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r'(Error|Exception|error:|failed|Traceback)', line) and not line.startswith('$ '):
            return line[:500]
    return lines[-1][:500] if lines else 'no output'


# ----- 1. environment and data -----

def environment() -> Dict[str, Any]:
    import torch
    import torchvision
    import timm
    env = OrderedDict(
        python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
        timm=timm.__version__, cpus=NUM_CPUS, platform=platform.platform(), cuda=torch.cuda.is_available(),
        cuda_version=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None)
    try:
        env['commit'] = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env['commit'] = None
    if env['cuda']:
        env['device'] = torch.cuda.get_device_name(0)
        env['device_count'] = torch.cuda.device_count()
        env['device_memory_gib'] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        env['nccl'] = '.'.join(str(v) for v in torch.cuda.nccl.version()) if hasattr(torch.cuda, 'nccl') else None
    else:
        env['device'] = 'cpu'
    return env


def extract(tarball: Path, dest: Path, per_class: Optional[Sequence[int]] = None) -> Path:
    """Extract `tarball` (train/<class>/*.jpg, test/<class>/*.jpg) into `dest` once; `per_class`: (train, test)
    images per class only. Returns the data root (the folder holding train/ and test/)."""
    marker = dest / '.extracted'
    want = json.dumps(dict(tarball=str(tarball.resolve()), per_class=list(per_class) if per_class else None))
    if marker.exists() and marker.read_text() == want:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    counts: Dict[tuple, int] = {}
    with tarfile.open(tarball, 'r:*') as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in ('train', 'test') or '..' in parts:
                continue
            split, cls = parts[-3], parts[-2]
            if per_class:
                key = (split, cls)
                if counts.get(key, 0) >= per_class[0 if split == 'train' else 1]:
                    continue
                counts[key] = counts.get(key, 0) + 1
            target = dest / split / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, 'wb') as dst:
                shutil.copyfileobj(src, dst)
    for split in ('train', 'test'):
        if not (dest / split).is_dir():
            raise SystemExit(f'gpu_evidence.py: {tarball} has no {split}/<class>/*.jpg files.')
    marker.write_text(want)
    return dest


def make_mini(root: Path, dest: Path, per_class: Sequence[int]) -> Path:
    """A small copy (hard links where possible) of the data: `per_class` (train, test) images per class."""
    if (dest / '.done').exists():
        return dest
    for split, n in zip(('train', 'test'), per_class):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            (dest / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                target = dest / split / cls.name / f.name
                if not target.exists():
                    try:
                        os.link(f, target)
                    except OSError:
                        shutil.copy2(f, target)
    (dest / '.done').write_text('')
    return dest


# ----- 2. speed -----

def _read_rows(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return data.get('results', []) if isinstance(data, dict) else data


def speed_command(plan: Dict[str, Any], group: Dict[str, Any], backends: Sequence[str], results: Path,
                  compile_: bool, device: str) -> List[str]:
    """One benchmark.py process for a group: its models, their S=1 network and every backend in the same rounds."""
    cmd = [PY, 'benchmark.py', '--model-list', ','.join(group['models']), '--bench', 'both', '-b', group['batch'],
           '--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--split-backend', ','.join(backends),
           '--num-warm-iter', plan['warm'], '--num-bench-iter', plan['iters'], '--rounds', plan['rounds'],
           '--device', device, '--results-file', results, '--results-format', 'json', *group['extra']]
    return cmd + (['--torchcompile'] if compile_ else [])


def with_ratios(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Add `train_ratio` / `infer_ratio` with `_lo` / `_hi`: the ratio to the undivided network that benchmark.py
    measured in the same paired rounds (median and interquartile range); 1 for the S=1 rows themselves."""
    for r in rows:
        for kind in ('train', 'infer'):
            band = row_band(r, f'{kind}_vs_s1')
            if band is None and r.get('split_factor') == 1 and r.get(f'{kind}_samples_per_sec'):
                band = Band(1., 1., 1.)
            r[f'{kind}_ratio'] = band and band.median
            r[f'{kind}_ratio_lo'], r[f'{kind}_ratio_hi'] = (band.lo, band.hi) if band else (None, None)
    return rows


def part_speed(ev: Evidence, plan: Dict[str, Any], part_s: float, device: str) -> None:
    runs = [(g, plan['backends'], False) for g in plan['speed_groups']]
    if plan['compile_backend']:
        runs += [(g, [plan['compile_backend']], True) for g in plan['speed_groups']]
    end = time.time() + part_s
    for i, (group, backends, compile_) in enumerate(runs):
        backend = ','.join(backends)
        name = f'speed_{group["name"]}' + ('_compile' if compile_ else '')
        left = end - time.time()
        runs_left = len(runs) - i
        # compiled runs only in what the eager ones leave; each eager run gets its share of the rest
        timeout = left if compile_ else left / max(1, sum(1 for r in runs[i:] if not r[2]))
        if timeout < plan['min_step_s'] or (compile_ and left < 3 * plan['min_step_s']):
            ev.skip(name, f'budget ({left:.0f}s left in the speed part, {runs_left} run(s) to go)')
            continue
        results = ev.logs / f'{name}.json'
        step = ev.run(name, speed_command(plan, group, backends, results, compile_, device), timeout)
        for row in with_ratios(_read_rows(results)):
            row.update(backend_requested=backend, torchcompile=compile_, input_group=group['name'])
            ev.results['speed'].append(row)
        if step['status'] != 'ok' and not results.exists():
            ev.results['speed'].append(dict(input_group=group['name'], backend_requested=backend,
                                            torchcompile=compile_, error=step['error']))
        ev.save()


# ----- 3. data loading -----

def part_data(ev: Evidence, plan: Dict[str, Any], part_s: float, data_root: Path, device: str) -> None:
    cfg = plan['data']
    end = time.time() + part_s
    for i, views in enumerate(cfg['views']):
        name = f'data_views{views}'
        timeout = (end - time.time()) / (len(cfg['views']) - i)
        if timeout < plan['min_step_s']:
            ev.skip(name, 'budget')
            continue
        results = ev.logs / f'{name}.json'
        step = ev.run(name, [
            PY, 'benchmark.py', '--bench', 'data', '--views', views, '-b', cfg['batch'], '-j', cfg['workers'],
            '--num-warm-iter', cfg['warm'], '--num-bench-iter', cfg['iters'], '--img-size', 32, '--device', device,
            '--data-dir', data_root / 'train', '--results-file', results, '--results-format', 'json'], timeout)
        ev.results['data'] += _read_rows(results)
        ev.results['checks']['bench_data'] = _check_result(step)
        ev.save()


# ----- 4. accuracy (and 6. ablations) -----

_TRAIN_LINE = re.compile(r'Train: (\d+) \[\s*(\d+)/(\d+).*?Time: ([\d.]+)s,\s+([\d.]+) images/s')


def parse_train_log(text: str) -> Dict[str, Any]:
    """Per epoch: the last progress line's time since the epoch's start and images/s (over the epoch but its first
    batch, when the log interval exceeds the batches of an epoch)."""
    epochs: Dict[int, Dict[str, float]] = {}
    for m in _TRAIN_LINE.finditer(text):
        epoch, idx, num = int(m[1]), int(m[2]), int(m[3])
        if idx == num - 1 or epoch not in epochs:
            epochs[epoch] = dict(time_s=float(m[4]), images_per_s=float(m[5]))
    times = [v['time_s'] for k, v in sorted(epochs.items())]
    rates = [v['images_per_s'] for k, v in sorted(epochs.items())]
    steady = times[1:] or times  # epoch 0 holds cudnn autotuning / the auto trial
    return dict(epoch_times_s=times, epoch_time_s=round(sorted(steady)[len(steady) // 2], 2) if steady else None,
                images_per_s=round(sorted(rates[1:] or rates)[len(rates[1:] or rates) // 2], 1) if rates else None)


def read_summary(folder: Path) -> Optional[Dict[str, Any]]:
    import csv
    path = folder / 'summary.csv'
    if not path.exists():
        return None
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    last = rows[-1]
    members = sorted((int(m[1]), float(v)) for k, v in last.items() if (m := re.match(r'eval_member(\d+)_top1$', k)))
    return OrderedDict(
        epochs_done=len(rows), ensemble_top1=float(last['eval_top1']), member_top1=[v for _, v in members],
        member_mean_top1=round(sum(v for _, v in members) / len(members), 3) if members else float(last['eval_top1']),
        train_loss=float(last['train_loss']), best_ensemble_top1=max(float(r['eval_top1']) for r in rows))


def train_command(plan: Dict[str, Any], data_root: Path, out: Path, split: int, epochs: int, name: str,
                  device: str, extra: Sequence[str] = (), views_on_device: bool = False) -> List[str]:
    acc = plan['acc']
    cmd = [PY, 'train.py', '--data-dir', data_root, '--val-split', 'test', '--model', acc['model'].format(split),
           *acc['extra'], '--epochs', epochs, '-b', acc['batch'], '--lr', acc['lr'], '--weight-decay', acc['wd'],
           '--wd-divide', 'exp', '--sched', 'cosine', '--warmup-epochs', 1 if epochs > 2 else 0,
           '--cot-weight', 0.5, '--cot-warmup-epochs', round(epochs * 40 / 300, 2), '--seed', 0,
           '--workers', acc['workers'], '--log-interval', 100000, '--device', device, '--checkpoint-hist', 1,
           '--output', out, '--experiment', name, '--no-plot']
    if device != 'cpu':
        cmd += ['--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--pin-mem']
    if views_on_device:
        cmd += ['--views-on-device']
    return cmd + list(extra)


def _speed_of(ev: Evidence, model: str) -> Optional[float]:
    """The best train img/s measured for `model` (its undivided / sequential rows of the speed part)."""
    rates = [r.get('train_samples_per_sec') for r in ev.results['speed'] if r.get('model') == model
             and not r.get('torchcompile') and r.get('train_samples_per_sec')]
    return max(rates) if rates else None


def plan_epochs(ev: Evidence, plan: Dict[str, Any], part_s: float) -> Dict[str, Any]:
    """Epochs that fit the accuracy part: the slowest split's epoch time estimated from the speed and data parts."""
    acc = plan['acc']
    if ev.smoke:
        return dict(epochs=acc['max_epochs'], views_on_device=False, reason='smoke: one epoch')
    per_run = part_s / len(acc['splits']) - 30.  # process start, data set scan, cudnn autotuning
    slowest = None
    for s in acc['splits']:
        rate = _speed_of(ev, acc['model'].format(s)) or 2000.
        slowest = rate if slowest is None else min(slowest, rate)
    views_on_device, reason = False, 'CPU views'
    cpu_rate = {r['views']: r['cpu_views_per_sec'] / r['views'] for r in ev.results['data'] if 'views' in r}
    dev_rate = {r['views']: r['device_views_per_sec'] / r['views'] for r in ev.results['data'] if 'views' in r}
    s_max = max(acc['splits'])
    if s_max in cpu_rate and cpu_rate[s_max] < slowest and dev_rate.get(s_max, 0) > 1.5 * cpu_rate[s_max]:
        views_on_device, reason = True, (f'--views-on-device: the CPU loader gives {cpu_rate[s_max]:.0f} img/s at '
                                         f'S={s_max}, the device views {dev_rate[s_max]:.0f}')
    feed = dev_rate.get(s_max) if views_on_device else cpu_rate.get(s_max)
    rate = min(slowest, feed) if feed else slowest
    epoch_s = acc['train_images'] / rate * 1.15 + acc['eval_images'] / (3 * slowest) + 1.
    epochs = int(max(1, min(acc['max_epochs'], per_run // epoch_s)))
    return dict(epochs=epochs, views_on_device=views_on_device, estimated_epoch_s=round(epoch_s, 1),
                reason=reason)


def _train_run(ev: Evidence, plan: Dict[str, Any], data_root: Path, split: int, epochs: int, name: str,
               timeout: float, device: str, extra: Sequence[str] = (), views_on_device: bool = False,
               ) -> Dict[str, Any]:
    out = ev.out / 'train'
    step = ev.run(name, train_command(plan, data_root, out, split, epochs, name, device, extra, views_on_device),
                  timeout)
    row = OrderedDict(name=name, split_factor=split, model=plan['acc']['model'].format(split), epochs=epochs,
                      extra=' '.join(extra), views_on_device=views_on_device, status=step['status'],
                      error=step['error'], seconds=step['seconds'])
    row.update(read_summary(out / name) or {})
    row.update(parse_train_log(step['output']))
    return row


def part_accuracy(ev: Evidence, plan: Dict[str, Any], part_s: float, data_root: Path, device: str) -> None:
    acc = plan['acc']
    choice = plan_epochs(ev, plan, part_s)
    ev.results['accuracy_plan'] = choice
    end = time.time() + part_s
    for i, split in enumerate(acc['splits']):
        name = f'acc_s{split}'
        timeout = (end - time.time()) / (len(acc['splits']) - i) * 1.25  # a little of the next runs' slack
        if timeout < plan['min_step_s']:
            ev.skip(name, 'budget')
            continue
        ev.results['accuracy'].append(_train_run(ev, plan, data_root, split, choice['epochs'], name, timeout, device,
                                                 views_on_device=choice['views_on_device']))
        ev.save()


def part_ablations(ev: Evidence, plan: Dict[str, Any], part_s: float, data_root: Path, device: str) -> None:
    """Table 5 at S=2: the same view for both members; no co-training loss (lambda_cot = 0)."""
    choice = ev.results.get('accuracy_plan') or dict(epochs=1, views_on_device=False)
    runs = [(name, extra) for name, extra in ABLATIONS if name in plan['ablations']]
    end = time.time() + part_s
    for i, (name, extra) in enumerate(runs):
        timeout = (end - time.time()) / (len(runs) - i)
        estimate = (choice.get('estimated_epoch_s') or 0) * choice['epochs'] + 30
        if timeout < max(plan['min_step_s'], 0.8 * estimate if not ev.smoke else 0):
            ev.skip(name, f'budget ({timeout:.0f}s for a run of about {estimate:.0f}s)')
            continue
        ev.results['ablations'].append(_train_run(ev, plan, data_root, 2, choice['epochs'], name, timeout, device,
                                                  extra, choice['views_on_device']))
        ev.save()


# ----- 5. CUDA paths -----

NCCL_CHECK = '''
import os, torch, torch.distributed as dist, timm, timm_splitnet
from timm.layers import convert_sync_batchnorm
dist.init_process_group('nccl')
torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
model = timm.create_model('splitnet_wrn16_8_s2', num_classes=10).cuda()
model = convert_sync_batchnorm(model)
assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()), 'no SyncBatchNorm after conversion'
ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
x = torch.randn(8, 3, 32, 32, device='cuda')
with torch.autocast('cuda', dtype=torch.bfloat16):
    loss = ddp(x).float().logsumexp(-1).mean()
loss.backward()
t = torch.ones(1, device='cuda')
dist.all_reduce(t)
torch.cuda.synchronize()
assert t.item() == dist.get_world_size()
print('SyncBN + NCCL ok, world size', dist.get_world_size())
dist.destroy_process_group()
'''


def _check_result(step: Dict[str, Any]) -> Dict[str, Any]:
    status = step['status']
    return OrderedDict(status=status if status in ('ok', 'skipped') else 'failed',
                       error=step.get('error'), seconds=step.get('seconds'))


def check_commands(ev: Evidence, plan: Dict[str, Any], mini: Path, cuda: bool) -> Dict[str, Any]:
    """name -> (command, needs CUDA)."""
    out = ev.out / 'checks'
    base = [PY, 'train.py', '--data-dir', mini, '--val-split', 'test', *plan['check_model'], '--epochs', 1,
            '-b', plan['check_batch'], '--workers', plan['check_workers'], '--lr', 0.05, '--log-interval', 100000,
            '--checkpoint-hist', 1, '--no-plot', '--output', out, '--device', 'cuda' if cuda else 'cpu']

    def train(name: str, *extra: Any) -> List[Any]:
        return base + ['--experiment', name, *extra]

    bf16 = ['--amp', '--amp-dtype', 'bfloat16']
    nccl_script = ev.logs / 'nccl_check.py'
    nccl_script.write_text(NCCL_CHECK)
    bench = [PY, 'benchmark.py', *plan['check_model'], '-b', plan['check_batch'], '--num-warm-iter', 2,
             '--num-bench-iter', 5, '--bench', 'both']
    return OrderedDict([
        ('amp_float16_gradscaler', (train('fp16', '--amp', '--amp-dtype', 'float16', '--clip-grad', 5), True)),
        ('amp_bfloat16', (train('bf16', *bf16), True)),
        ('channels_last_prefetcher', (train('cl', '--channels-last', *bf16), True)),
        ('prefetcher_pinned_memory', (train('pin', '--pin-mem', '--workers', max(1, plan['check_workers'])), True)),
        ('packed_cuda', (train('packed', '--split-backend', 'packed', '--channels-last', *bf16), True)),
        ('auto_cuda', (train('auto', '--split-backend', 'auto', *bf16), True)),
        ('torch_compile_packed', (train('compile', '--torchcompile', '--split-backend', 'packed', *bf16), True)),
        ('concurrent_one_gpu', (bench + ['--devices', 'cuda:0,cuda:0', '--device', 'cuda:0', *bf16], True)),
        ('syncbn_nccl_1proc', ([PY, '-m', 'torch.distributed.run', '--nproc_per_node=1', '--master_port=29533',
                                nccl_script], True)),
        ('views_on_device', (train('vod', '--views-on-device', '--reprob', 0.25, '--mixup', 0.2,
                                   *(['--channels-last', *bf16] if cuda else [])), False)),
    ])


def part_checks(ev: Evidence, plan: Dict[str, Any], part_s: float, mini: Path, cuda: bool) -> None:
    commands = check_commands(ev, plan, mini, cuda)
    end = time.time() + part_s
    todo = []
    for name, (cmd, needs_cuda) in commands.items():
        if needs_cuda and not cuda:
            ev.results['checks'][name] = OrderedDict(status='skipped: no CUDA', error=None, seconds=None)
        else:
            todo.append((name, cmd))
    ev.save()

    def one(item):
        name, cmd = item
        return name, ev.run(f'check_{name}', cmd, max(1., end - time.time()))

    # small independent runs: several at once (one GPU holds them all)
    with concurrent.futures.ThreadPoolExecutor(max_workers=plan['parallel_checks']) as pool:
        for name, step in pool.map(one, todo):
            ev.results['checks'][name] = _check_result(step)
            ev.save()
    # validate.py (AMP, channels_last, the device-side metric sums) on the S=2 accuracy run's weights
    ckpt = ev.out / 'train' / 'acc_s2' / 'model_best.pth.tar'
    if not ckpt.exists():
        ckpt = ev.out / 'checks' / 'vod' / 'model_best.pth.tar'
    if ckpt.exists() and end - time.time() > plan['min_step_s']:
        model = plan['acc']['model'].format(2) if 'acc_s2' in str(ckpt) else plan['check_model'][1]
        extra = plan['acc']['extra'] if 'acc_s2' in str(ckpt) else plan['check_model'][2:]
        cmd = [PY, 'validate.py', '--data-dir', mini, '--split', 'test', '--model', model, *extra, '--checkpoint',
               ckpt, '-b', 64, '--workers', plan['check_workers'], '--num-classes', 10,
               '--device', 'cuda' if cuda else 'cpu'] + (['--amp', '--amp-dtype', 'bfloat16', '--channels-last']
                                                           if cuda else [])
        ev.results['checks']['validate'] = _check_result(ev.run('check_validate', cmd, end - time.time()))
    else:
        ev.results['checks']['validate'] = OrderedDict(status='skipped', error='no checkpoint or no time', seconds=None)
    ev.save()


# ----- reports -----

def _fmt(value: Any, fmt: str = '{:.1f}') -> str:
    if value is None or value == '':
        return '-'
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _ratio(row: Dict[str, Any], kind: str) -> str:
    """'0.88 (0.85-0.91)': the paired ratio with its interquartile range."""
    ratio = row_band(row, f'{kind}_ratio')
    return '-' if ratio is None else (ratio.format() if ratio.lo != ratio.hi else f'{ratio.median:.2f}')


def _header(results: Dict[str, Any], title: str) -> List[str]:
    env = results.get('env', {})
    lines = [f'# {title}', '']
    if results['mode'] != 'full':
        lines += [f'**{results["mode"]}**', '']
    lines += [f'Written by `scripts/gpu_evidence.py` ({results["started"]}, {results.get("elapsed_s")} s of a '
              f'{results["budget_s"]:.0f} s budget).', '',
              f'Device: {env.get("device")} ({env.get("device_memory_gib", "-")} GiB), {env.get("cpus")} CPUs; '
              f'python {env.get("python")}, torch {env.get("torch")} (CUDA {env.get("cuda_version")}, cuDNN '
              f'{env.get("cudnn")}), torchvision {env.get("torchvision")}, timm {env.get("timm")}; commit '
              f'{env.get("commit")}.', '']
    return lines


def benchmarks_md(results: Dict[str, Any]) -> str:
    lines = _header(results, 'Benchmarks: SplitNet speed on one device')
    lines += ['## Speed (benchmark.py, bf16 AMP, channels_last)', '',
              'Ratio: img/s of the row over the undivided network (`splitnet_<arch>_s1`), taken per round of paired, '
              'interleaved rounds (every model and backend of a group in each round, the order rotating): the median '
              'with the interquartile range in brackets. A ratio of 1 means the S members cost exactly what the '
              'network they replace costs. Noise: how much S=1\'s own train img/s moved between rounds (IQR / '
              'median).', '',
              '| group | model | S | backend | compile | train img/s | train ratio | infer img/s | infer ratio | '
              'FLOP bound | rounds | noise | train peak MiB | infer peak MiB |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in results['speed']:
        if 'error' in r:
            lines.append(f'| {r.get("input_group")} | {r.get("model", "-")} | - | {r.get("backend_requested")} | '
                         f'{r.get("torchcompile")} | error: {r["error"]} | | | | | | | | |')
            continue
        lines.append(
            f'| {r.get("input_group")} | {r.get("model")} | {r.get("split_factor") or 1} | '
            f'{r.get("split_backend") or r.get("backend_requested")} | {"yes" if r.get("torchcompile") else "no"} | '
            f'{_fmt(r.get("train_samples_per_sec"))} | {_ratio(r, "train")} | '
            f'{_fmt(r.get("infer_samples_per_sec"))} | {_ratio(r, "infer")} | '
            f'{_fmt(r.get("flop_bound_vs_s1"), "{:.2f}")} | {_fmt(r.get("train_rounds"), "{}")} | '
            f'{_fmt(r.get("train_noise"), "{:.0%}")} | '
            f'{_fmt(r.get("train_peak_mem_mb"), "{:.0f}")} | {_fmt(r.get("infer_peak_mem_mb"), "{:.0f}")} |')
    lines += ['', '## Data loading (benchmark.py --bench data)', '',
              '| S | img | batch | workers | CPU views/s | device views/s | speedup | device |',
              '|---|---|---|---|---|---|---|---|']
    for r in results['data']:
        lines.append(f'| {r.get("views")} | {r.get("img_size")} | {r.get("batch_size")} | {r.get("workers")} | '
                     f'{_fmt(r.get("cpu_views_per_sec"))} | {_fmt(r.get("device_views_per_sec"))} | '
                     f'{_fmt(r.get("speedup"), "{:.2f}")} | {r.get("device")} |')
    lines += ['', '## Paths exercised (the CUDA-only ones are skipped without CUDA)', '',
              '| path | result | seconds | error |', '|---|---|---|---|']
    for name, c in results['checks'].items():
        lines.append(f'| {name} | {c["status"]} | {_fmt(c.get("seconds"))} | {c.get("error") or ""} |')
    lines += ['', '## Disagreements with the paper / our goal', '']
    lines += [f'- {t}' for t in speed_findings(results)] or ['- none found in the finished parts']
    lines += _commands(results, ('speed_', 'data_', 'check_'))
    return '\n'.join(lines) + '\n'


def speed_findings(results: Dict[str, Any]) -> List[str]:
    """Where S divided networks cost more time than the one they replace (our goal: ratio >= ~0.9)."""
    found = []
    for r in results['speed']:
        if r.get('split_mode') != 'sequential' or not r.get('train_ratio'):
            continue
        for kind in ('train', 'infer'):
            ratio = row_band(r, f'{kind}_ratio')
            if ratio is not None and ratio.median < 0.9:
                found.append(f'{r["model"]} ({r.get("split_backend")}{", compiled" if r.get("torchcompile") else ""}) '
                             f'{kind}s at {ratio.format()}x the undivided network\'s img/s.')
    return found


def results_md(results: Dict[str, Any]) -> str:
    lines = _header(results, 'Results: SplitNet accuracy on CIFAR-10 (JPEG copy), short recipe')
    plan = results.get('accuracy_plan') or {}
    lines += [f'Recipe: one seed, {plan.get("epochs", "-")} epoch(s) (scaled to the budget; {plan.get("reason", "")}),'
              f' SGD lr {results["plan"]["acc"]["lr"]} cosine, weight decay 5e-4 divided by exp (eq. 6), '
              f'co-training weight 0.5, crop + flip.',
              '', '| run | S | epochs | ensemble top-1 | member top-1 | mean member | img/s | epoch time (s) | '
              'status |', '|---|---|---|---|---|---|---|---|---|']
    for r in results['accuracy'] + results['ablations']:
        members = ', '.join(f'{v:.2f}' for v in r.get('member_top1', []))
        lines.append(f'| {r["name"]} {r.get("extra", "")} | {r["split_factor"]} | {r.get("epochs_done", "-")} | '
                     f'{_fmt(r.get("ensemble_top1"), "{:.2f}")} | {members or "-"} | '
                     f'{_fmt(r.get("member_mean_top1"), "{:.2f}")} | {_fmt(r.get("images_per_s"))} | '
                     f'{_fmt(r.get("epoch_time_s"), "{:.2f}")} | {r["status"]}'
                     f'{": " + r["error"] if r["error"] else ""} |')
    by_s = {r['split_factor']: r for r in results['accuracy'] if r.get('epoch_time_s')}
    if 1 in by_s and 4 in by_s:
        lines += ['', f'Epoch time S=4 / S=1: {by_s[4]["epoch_time_s"] / by_s[1]["epoch_time_s"]:.2f}.']
    lines += ['', '## Disagreements with the paper', '']
    lines += [f'- {t}' for t in accuracy_findings(results)] or ['- none found in the finished parts']
    lines += _commands(results, ('acc_', 'abl_'))
    return '\n'.join(lines) + '\n'


def accuracy_findings(results: Dict[str, Any]) -> List[str]:
    """The paper's claims checked on the finished runs: ensembles of S > 1 beat S = 1 (Fig. 5); Table 5: different
    views and the co-training loss each help at S = 2."""
    found = []
    acc = {r['split_factor']: r.get('ensemble_top1') for r in results['accuracy'] if r.get('ensemble_top1') is not None}
    if 1 in acc:
        for s, top1 in acc.items():
            if s > 1 and top1 < acc[1]:
                found.append(f'S={s} ensemble top-1 {top1:.2f} < S=1 {acc[1]:.2f} (paper: dividing helps; here with '
                             f'a short recipe).')
    for r in results['ablations']:
        if 2 in acc and r.get('ensemble_top1') is not None and r['ensemble_top1'] > acc[2]:
            found.append(f'{r["name"]} ({r["extra"]}) {r["ensemble_top1"]:.2f} > S=2 default {acc[2]:.2f} '
                         f'(paper Table 5: the ablated variant is worse).')
    return found


def _commands(results: Dict[str, Any], prefixes: Sequence[str]) -> List[str]:
    lines = ['', '## Commands', '', '```']
    for name, step in results['steps'].items():
        if name.startswith(prefixes) and step.get('command'):
            lines.append(f'# {name}: {step["status"]}')
            lines.append(step['command'])
    return lines + ['```']


def _backend_label(row: Dict[str, Any]) -> str:
    return (row.get('split_backend') or '-') + (' +compile' if row.get('torchcompile') else '')


def plot_speed(results: Dict[str, Any], path: Path) -> None:
    rows = [r for r in results['speed'] if r.get('split_mode') == 'sequential' and r.get('train_ratio')]
    if not rows:
        return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, kind in zip(axes, ('train', 'infer')):
        labels = list(dict.fromkeys(r['model'].replace('splitnet_', '') for r in rows))
        backends = list(dict.fromkeys(_backend_label(r) for r in rows))
        width = 0.8 / max(1, len(backends))
        for j, backend in enumerate(backends):
            values, errors = [], [[], []]
            for label in labels:
                match = [row_band(r, f'{kind}_ratio') for r in rows if r['model'].replace('splitnet_', '') == label
                         and _backend_label(r) == backend]
                ratio = match[0] if match and match[0] else Band(0., 0., 0.)
                values.append(ratio.median)
                errors[0].append(ratio.median - ratio.lo)
                errors[1].append(ratio.hi - ratio.median)
            ax.bar([i + j * width for i in range(len(labels))], values, width, yerr=errors, capsize=2, label=backend)
        ax.axhline(1.0, color='k', lw=0.8, ls='--')
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=20, fontsize=8)
        ax.set_title(f'{kind}: img/s relative to the undivided network (median, IQR)')
        ax.legend(fontsize=8)
    axes[0].set_ylabel('ratio (1 = same cost)')
    fig.suptitle(f'{results["env"].get("device")}, bf16 AMP, channels_last' +
                 (' [SMOKE: meaningless]' if results['mode'] != 'full' else ''))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(results: Dict[str, Any], path: Path) -> None:
    rows = sorted((r for r in results['accuracy'] if r.get('ensemble_top1') is not None),
                  key=lambda r: r['split_factor'])
    if not rows:
        return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [r['split_factor'] for r in rows]
    ax.plot(xs, [r['ensemble_top1'] for r in rows], 'o-', label='ensemble')
    ax.plot(xs, [r['member_mean_top1'] for r in rows], 's--', label='mean member')
    ax.set_xscale('log', base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel('S (number of members)')
    ax.set_ylabel('top-1 (%)')
    ax.set_title(f'{rows[0]["model"].rsplit("_s", 1)[0]}, CIFAR-10, {rows[0]["epochs"]} epoch(s)' +
                 (' [SMOKE]' if results['mode'] != 'full' else ''))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- main -----

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('--data', required=True, type=Path, help='cifar10-jpg.tar.gz (train/<class>/*.jpg, test/...)')
    parser.add_argument('--out', required=True, type=Path, help='output folder')
    parser.add_argument('--budget-min', type=float, default=None,
                        help='wall-clock budget in minutes (default: 10; --smoke: 2)')
    parser.add_argument('--smoke', action='store_true', help='the same code paths on the CPU at toy scale')
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f'--data {args.data}: no such file')
    budget_s = 60. * (args.budget_min if args.budget_min is not None else (2. if args.smoke else 10.))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ev = Evidence(out, budget_s, args.smoke)
    env = environment()
    ev.results['env'] = env
    print('gpu_evidence: ' + ', '.join(f'{k}={v}' for k, v in env.items()), flush=True)
    cuda = bool(env['cuda']) and not args.smoke
    device = 'cuda' if cuda else 'cpu'
    plan = smoke_plan(NUM_CPUS) if args.smoke else full_plan(NUM_CPUS)
    if not cuda and not args.smoke:
        print('gpu_evidence: no CUDA device: the full plan runs on the CPU and the CUDA-only checks are skipped.')
    ev.results['plan'] = plan

    t0 = time.time()
    data_root = extract(args.data, out / 'data' / ('smoke' if args.smoke else 'cifar10'),
                        plan.get('extract_per_class'))
    mini = make_mini(data_root, out / 'data' / 'mini', plan['mini'])
    ev.results['parts']['data_extracted'] = dict(seconds=round(time.time() - t0, 1), root=str(data_root))
    ev.save()

    parts = OrderedDict(
        speed=lambda s: part_speed(ev, plan, s, device),
        data=lambda s: part_data(ev, plan, s, data_root, device),
        accuracy=lambda s: part_accuracy(ev, plan, s, data_root, device),
        checks=lambda s: part_checks(ev, plan, s, mini, cuda),
        ablations=lambda s: part_ablations(ev, plan, s, data_root, device),
    )
    names = list(parts)
    for i, name in enumerate(names):
        weight = PART_WEIGHTS[name] / sum(PART_WEIGHTS[n] for n in names[i:])
        part_s = max(0., min(ev.remaining(), max(ev.remaining() * weight, plan['min_part_s'])))
        t_part = time.time()
        try:
            parts[name](part_s)
            status = 'done'
        except Exception as e:  # a part's own bug must not cost the parts after it
            status = f'error: {type(e).__name__}: {e}'
            print(f'gpu_evidence: part {name} failed: {status}', flush=True)
        ev.results['parts'][name] = dict(status=status, budget_s=round(part_s, 1),
                                         seconds=round(time.time() - t_part, 1))
        ev.save()
    failed = [n for n, c in ev.results['checks'].items() if c['status'] == 'failed']
    print(f'gpu_evidence: done in {time.time() - ev.start:.0f}s; outputs in {out}; failed checks: '
          f'{", ".join(failed) or "none"}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
