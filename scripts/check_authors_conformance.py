#!/usr/bin/env python3
"""Check that this package's models compute the SplitNet authors' networks: same weights, same input, same logits.

    git clone https://github.com/mzhaoshuai/SplitNet-Divide-and-Co-training /tmp/splitnet-authors
    python scripts/check_authors_conformance.py --authors-src /tmp/splitnet-authors
    python scripts/check_authors_conformance.py --authors-src /tmp/splitnet-authors --arch wrn28_10 --split-factors 4

Their model code (CC-BY-NC) is imported from that folder at run time; nothing of it is copied into this package.
For every architecture both define (`timm_splitnet.models._authors_layouts.AUTHORS_ARCHS`) and every S: their
SplitNet is built with their own classes and argument names, every parameter is randomised and the BN statistics are
estimated on random images that include the checked batch (a well-conditioned network, so that float32 errors mean
something), its state dict is saved the way their training script saves it (`{'arch', 'state_dict':
module.models.<i>.*}`), converted with `convert_authors_state_dict` and loaded into ours, built with the conversion's
build kwargs. Both run in eval mode
on the same random batch, in float64 and in float32. A row passes when, in float64, the members' and the ensemble's
largest |difference| is at most 1e-8 x the largest |logit|, and in float32 our error (against their float64 logits)
is no larger than their own float32-vs-float64 error. Both compute every operation the same way (the EfficientNets
with the conversion's `act_layer='swish_mul'`, their x * sigmoid(x)), so the float32 logits are equal bit for bit.

`--write-fixtures DIR` writes, instead, the key names and shapes of their members (one gzipped JSON per
architecture, S = 1, 2, 4), the facts the CI tests of the converter run on.
"""
import argparse
import contextlib
import gc
import gzip
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import timm
import timm_splitnet
from timm_splitnet.models.authors import authors_build_kwargs, convert_authors_state_dict
from timm_splitnet.models._authors_layouts import AUTHORS_ARCHS, AuthorsArch
from timm_splitnet.models.splitnet import create_splitnet, splitnet_name

_ALIAS = '_splitnet_authors_model'
# pass: float64 logits within F64_TOL x the largest |logit|; our float32 error no larger than theirs
F64_TOL = 1e-8
# input size per dataset: the smallest that keeps every architecture's final map at least 2x2
_IMG_SIZE = {'imagenet': 64, 'cifar': 32}


def import_authors_models(src: str):
    """Their `model` package from `src`, imported under a private name (their code is not installed)."""
    root = os.path.join(src, 'model')
    if not os.path.isfile(os.path.join(root, 'splitnet.py')):
        raise SystemExit(f'--authors-src {src}: no model/splitnet.py; pass a clone of '
                         f'mzhaoshuai/SplitNet-Divide-and-Co-training.')
    if _ALIAS not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            _ALIAS, os.path.join(root, '__init__.py'), submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules[_ALIAS] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f'{_ALIAS}.splitnet')


def authors_commit(src: str) -> str:
    try:
        out = subprocess.run(['git', '-C', src, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True)
        return out.stdout.strip() or 'unknown'
    except OSError:
        return 'unknown'


def authors_args(spec: AuthorsArch, split_factor: int, layout: str, img_size: int) -> SimpleNamespace:
    """The arguments their SplitNet reads, as their parser would set them for evaluation."""
    return SimpleNamespace(
        arch=spec.authors_arch, split_factor=split_factor, loop_factor=split_factor, is_train_sep=0, epochs=300,
        dataset='imagenet' if spec.dataset == 'imagenet' else 'cifar100', num_classes=num_classes(spec),
        output_stride=8, pretrained=False, pretrained_dir=None, crop_size=img_size,
        is_lukemelas_efficientnet=int(layout == 'lukemelas'), is_efficientnet_user_crop=1,
        is_memory_efficient_swish=0, is_official_densenet=1, is_efficient_densenet=0, densenet_p_shakedrop=0.,
        is_identical_init=0, is_diff_data_train=1, is_mixup=0, mix_alpha=0.2, is_ensembled_loss=0,
        ensembled_loss_weight=0., is_ensembled_after_softmax=0, is_max_ensemble=0, is_cot_loss=1, cot_weight=0.5,
        is_cot_weight_warm_up=1, cot_weight_warm_up_epochs=40, cot_loss_choose='js_divergence')


def num_classes(spec: AuthorsArch) -> int:
    return 1000 if spec.dataset == 'imagenet' else 100


def build_authors(splitnet_module, spec: AuthorsArch, split_factor: int, layout: str, img_size: int) -> nn.Module:
    with contextlib.redirect_stdout(io.StringIO()):  # their constructors print INFO lines
        return splitnet_module.SplitNet(authors_args(spec, split_factor, layout, img_size)).eval()


@torch.no_grad()
def randomise(model: nn.Module, x: torch.Tensor, seed: int) -> None:
    """Random weights everywhere, BN affine parameters included (zero-init BNs would hide whole blocks), then BN
    statistics estimated on the random batch `x` (their BNs alone in train mode), so that the network is as well
    conditioned as a trained one and float32 errors stay meaningful."""
    g = torch.Generator().manual_seed(seed)
    bns = []  # (module, its momentum)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            m.reset_running_stats()
            bns.append((m, m.momentum))
            m.momentum = None  # a cumulative average
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2. / fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    model.eval()
    for m, _ in bns:
        m.train()  # only the BNs: their ShakeDrop / Shake-Shake train paths are CUDA-only
    run_theirs(model, x)
    for m, momentum in bns:
        m.momentum = momentum
    model.eval()


def authors_checkpoint(model: nn.Module, spec: AuthorsArch) -> Dict[str, Any]:
    """Their state dict as their training script saves it: DDP's `module.` before their wrapper's keys."""
    return {'arch': spec.authors_arch, 'epoch': 1, 'best_acc1': 0.,
            'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _CpuFloatTensor:
    """Stands in for `torch.cuda.FloatTensor` without a GPU: their PyramidNet makes the zero channels of its shortcut
    with it in every forward (`model/pyramidnet.py:183`), values that do not depend on the device."""

    def __new__(cls, *args):
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            return torch.tensor(args[0], dtype=torch.float32)
        return torch.empty(*args, dtype=torch.float32)


@contextlib.contextmanager
def cuda_tensors_on_cpu():
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.FloatTensor
    torch.cuda.FloatTensor = _CpuFloatTensor
    try:
        yield
    finally:
        torch.cuda.FloatTensor = saved


@torch.no_grad()
def run_theirs(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    with cuda_tensors_on_cpu():
        ensemble, members, _ = model(x, target=None, mode='val')
    return members, ensemble


@torch.no_grad()
def run_ours(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return model.forward_members(x), model(x)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check(splitnet_module, spec: AuthorsArch, split_factor: int, layout: str, batch_size: int, seed: int,
          img_size: Optional[int] = None, default_build: bool = False) -> Dict[str, Any]:
    img_size = img_size or _IMG_SIZE[spec.dataset]
    torch.manual_seed(seed)
    theirs = build_authors(splitnet_module, spec, split_factor, layout, img_size)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed + 1))
    # the checked batch is part of the calibration batch: at these small inputs the last stages see 2x2 maps, whose
    # statistics from other images would leave some channels unnormalised (the logits then carry float32 noise)
    extra = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    randomise(theirs, torch.cat([x, extra]), seed)
    build = authors_build_kwargs(spec.arch, layout)
    with torch.device('meta'):
        reference = create_splitnet(spec.arch, split_factor, num_classes=num_classes(spec), **build)
    state = convert_authors_state_dict(authors_checkpoint(theirs, spec), reference)
    if default_build:  # to show what the build settings change: timm's defaults, the same weights
        build = {}
    ours = create_splitnet(spec.arch, split_factor, num_classes=num_classes(spec), **build).eval()
    ours.load_state_dict(state, strict=True)
    row = dict(arch=spec.arch, authors_arch=spec.authors_arch, layout=layout, split_factor=split_factor,
               img_size=img_size, build=build, params_ours=count_params(ours), params_theirs=count_params(theirs))
    theirs32 = run_theirs(theirs, x)
    ours32 = run_ours(ours, x)
    theirs.double()
    ours.double()
    theirs64 = run_theirs(theirs, x.double())
    ours64 = run_ours(ours, x.double())
    scale = theirs64[0].abs().max().item()
    row['max_logit'] = scale
    row['f64_members'] = max_abs(ours64[0], theirs64[0]) / scale
    row['f64_ensemble'] = max_abs(ours64[1], theirs64[1]) / scale
    # float32: our error and theirs against their float64 logits, and ours against theirs
    row['f32_ours'] = max(max_abs(ours32[0], theirs64[0]), max_abs(ours32[1], theirs64[1])) / scale
    row['f32_theirs'] = max(max_abs(theirs32[0], theirs64[0]), max_abs(theirs32[1], theirs64[1])) / scale
    row['f32_ours_vs_theirs'] = max(max_abs(ours32[0], theirs32[0]), max_abs(ours32[1], theirs32[1])) / scale
    row['ok'] = max(row['f64_members'], row['f64_ensemble']) <= F64_TOL and \
        row['f32_ours'] <= row['f32_theirs']
    del theirs, ours
    gc.collect()
    return row


def key_shapes(splitnet_module, spec: AuthorsArch, split_factor: int, layout: str) -> List[List[Any]]:
    """Their first member's keys and shapes, one entry per module: [name, kind, shape]; kind 'bn' stands for
    weight / bias / running_mean / running_var of that shape plus num_batches_tracked, 'wb' for a weight and a bias
    of shape[0], 'w' for a weight alone, 't' for any other tensor."""
    args = authors_args(spec, split_factor, layout, _IMG_SIZE[spec.dataset])
    args.loop_factor = 1  # one member is enough: they all have the same keys
    with contextlib.redirect_stdout(io.StringIO()), torch.device('meta'):
        state = splitnet_module.SplitNet(args).models[0].state_dict()
    entries, seen = [], set()
    for key, value in state.items():
        name, _, leaf = key.rpartition('.')
        if key in seen:
            continue
        bn = [f'{name}.{s}' for s in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]
        if leaf == 'weight' and all(k in state for k in bn):
            entries.append([name, 'bn', list(value.shape)])
            seen.update(bn)
        elif leaf == 'weight' and f'{name}.bias' in state and \
                list(state[f'{name}.bias'].shape) == list(value.shape[:1]):
            entries.append([name, 'wb', list(value.shape)])
            seen.update((key, f'{name}.bias'))
        elif leaf == 'weight':
            entries.append([name, 'w', list(value.shape)])
            seen.add(key)
        else:
            entries.append([key, 't', list(value.shape)])
            seen.add(key)
    return entries


def write_fixtures(splitnet_module, out_dir: str, archs: List[str], split_factors: List[int], src: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    commit = authors_commit(src)
    for arch in archs:
        spec = AUTHORS_ARCHS[arch]
        data = dict(
            produced_by=f'python scripts/check_authors_conformance.py --authors-src <their repository at {commit}> '
                        f'--write-fixtures {out_dir}',
            source='key names and shapes of member 0 of the authors\' SplitNet (their model/ code, '
                   'mzhaoshuai/SplitNet-Divide-and-Co-training), one entry per module: [name, kind, shape]; '
                   'bn = weight, bias, running_mean, running_var [C] + num_batches_tracked []; '
                   'wb = weight + bias [shape[0]]; w = weight; t = that tensor',
            authors_commit=commit, arch=arch, authors_arch=spec.authors_arch, dataset=spec.dataset,
            num_classes=num_classes(spec), layouts={})
        for layout in spec.layouts:
            data['layouts'][layout] = {str(s): key_shapes(splitnet_module, spec, s, layout) for s in split_factors}
        path = os.path.join(out_dir, f'{arch}.json.gz')
        with gzip.GzipFile(path, 'wb', mtime=0) as f:
            f.write(json.dumps(data, separators=(',', ':')).encode())
        print(f'{path}: {os.path.getsize(path)} bytes')


def fmt(x: float) -> str:
    return f'{x:.1e}' if x else '0'


def _params(r: Dict[str, Any]) -> str:
    ours = f'{r["params_ours"] / 1e6:.2f}'
    return ours if r['params_ours'] == r['params_theirs'] else f'{ours} / {r["params_theirs"] / 1e6:.2f}'


def _f64(r: Dict[str, Any]) -> str:
    return f'{fmt(r["f64_members"])}, {fmt(r["f64_ensemble"])}'


def _f32(r: Dict[str, Any]) -> str:
    return f'{fmt(r["f32_ours"])} / {fmt(r["f32_theirs"])}' + ('' if r['f32_ours_vs_theirs'] else ' (equal)')


def markdown(rows: List[Dict[str, Any]]) -> str:
    """One line per architecture and key layout, the values for each S separated by ';'."""
    lines = [
        '| architecture | theirs (code) | S | params ours / theirs (M) | float64: max \\|diff\\| / max \\|logit\\| '
        '(members, ensemble) | float32 error (vs their float64): ours / theirs | pass |',
        '|---|---|---|---|---|---|---|',
    ]
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r['arch'], r['layout']), []).append(r)
    for (arch, layout), rs in groups.items():
        s, params, f64, f32 = (' ; '.join(fn(r) for r in rs) for fn in (
            lambda r: str(r['split_factor']), _params, _f64, _f32))
        lines.append(f'| {arch} | {rs[0]["authors_arch"]} ({layout}) | {s} | {params} | {f64} | {f32} | '
                     f'{"yes" if all(r["ok"] for r in rs) else "NO"} |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--authors-src', required=True, metavar='DIR',
                        help='a clone of mzhaoshuai/SplitNet-Divide-and-Co-training (their model/ is imported)')
    parser.add_argument('--arch', nargs='+', default=None, metavar='ARCH', choices=list(AUTHORS_ARCHS),
                        help='architectures to check (default: every one their code defines)')
    parser.add_argument('--split-factors', nargs='+', type=int, default=[1, 2, 4], metavar='S',
                        help='the S to check (default: 1 2 4)')
    parser.add_argument('--batch-size', type=int, default=2, help='images per check (default: 2)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the weights and the batch')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--json', default='', metavar='PATH', help='also write the rows to this JSON file')
    parser.add_argument('--default-build', action='store_true',
                        help='build ours with timm\'s defaults instead of the build settings the conversion records '
                             '(shows what the settings change)')
    parser.add_argument('--write-fixtures', default='', metavar='DIR',
                        help='write their key names and shapes (the CI fixtures) to DIR instead of checking')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    splitnet_module = import_authors_models(os.path.abspath(args.authors_src))
    archs = args.arch or list(AUTHORS_ARCHS)
    if args.write_fixtures:
        write_fixtures(splitnet_module, args.write_fixtures, archs, args.split_factors, args.authors_src)
        return 0
    print(f'their code: {args.authors_src} at {authors_commit(args.authors_src)}; torch {torch.__version__}, '
          f'timm {timm.__version__}, timm-splitnet {timm_splitnet.__version__}, python {platform.python_version()}, '
          f'{platform.machine()} CPU, {torch.get_num_threads()} threads', flush=True)
    rows = []
    for arch in archs:
        spec = AUTHORS_ARCHS[arch]
        for layout in spec.layouts:
            for s in args.split_factors:
                start = time.time()
                row = check(splitnet_module, spec, s, layout, args.batch_size, args.seed,
                            default_build=args.default_build)
                row['seconds'] = round(time.time() - start, 1)
                rows.append(row)
                print(f'{splitnet_name(arch, s):36s} {layout:9s} params {row["params_ours"]:>11,} / '
                      f'{row["params_theirs"]:>11,}  f64 {fmt(row["f64_members"])} / {fmt(row["f64_ensemble"])}  '
                      f'f32 {fmt(row["f32_ours"])} vs {fmt(row["f32_theirs"])} '
                      f'(ours - theirs {fmt(row["f32_ours_vs_theirs"])})  '
                      f'{"ok" if row["ok"] else "DIFFERENT"}  ({row["seconds"]} s)', flush=True)
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if not r['ok']]
    if failed:
        print(f'\n{len(failed)} of {len(rows)} checks differ.')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
