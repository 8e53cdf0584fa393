#!/usr/bin/env python3
"""Convert a checkpoint the SplitNet paper's authors released to this package's model (timm's HF layout).

    python scripts/convert_authors_checkpoint.py wide_resnet28_10_split4_cifar100_128_03_acc85.74.zip \\
        --model splitnet_wrn28_10_s4 --out weights/wrn28_10_s4_c100
    python validate.py /data/cifar100 --dataset torch/cifar100 --split test --model splitnet_wrn28_10_s4 \\
        --checkpoint weights/wrn28_10_s4_c100/model.safetensors

INPUT is a release zip (`model_best.pth.tar`, its md5, `hparams_train.json`; the md5 is checked and the hparams must
agree with the model) or a bare `model_best.pth.tar` / `.pth`. Without --model the model comes from the checkpoint's
architecture, its number of networks and its classifier. Writes OUT/model.safetensors and OUT/config.json; the
metadata records the source file, its md5, the authors' reported top-1 and the model settings the weights need, so
`timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file='OUT/model.safetensors'))` and
`timm.create_model('local-dir:OUT', pretrained=True)` build the right model. The release list is in the README.
"""
import argparse
import os
import sys
from typing import List, Optional

import timm_splitnet  # noqa: F401  registers the splitnet_* models
from timm_splitnet.models.authors import export_authors_checkpoint


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('input', metavar='INPUT', help='the authors\' release zip or model_best.pth.tar')
    parser.add_argument('--model', '-m', default=None, metavar='NAME',
                        help='model to convert to, splitnet_<arch>_s<S> (default: from the checkpoint)')
    parser.add_argument('--num-classes', type=int, default=None, metavar='N',
                        help='number of classes (default: the checkpoint\'s classifier)')
    parser.add_argument('--out', required=True, metavar='DIR',
                        help='output folder for model.safetensors and config.json')
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        raise SystemExit(f'{parser.prog}: error: no file at {args.input}')
    try:
        weights, meta = export_authors_checkpoint(args.input, args.out, args.model, args.num_classes)
    except ValueError as e:
        raise SystemExit(f'{parser.prog}: error: {e}') from None
    top1 = f', the authors report top-1 {meta["authors_top1"]} %' if meta.get('authors_top1') else ''
    settings = meta.get('build_args', '{}')
    print(f'{meta["source"]} (md5 {meta["source_md5"]}) -> {weights}: {meta["architecture"]}, '
          f'{meta["num_classes"]} classes, model settings {settings}{top1}.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
