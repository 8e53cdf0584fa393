#!/usr/bin/env python3
"""Generate the README's table of registered SplitNet models: params / GMACs for S=1/2/4 beside the paper's.

    python scripts/model_table.py                  # print the markdown table
    python scripts/model_table.py --update README.md  # replace the table between the model-table markers

Counts are taken on the meta device (no memory). Where the paper reports the model, it is counted with the paper's
number of classes and resolution (and with BN running statistics where the paper's count includes them); otherwise
with its pretrained cfg (CIFAR: 32 px, 100 classes; ImageNet: 224 px, 1000 classes). GMACs are multiply-adds per
image, the paper's "GFLOPs".
"""
import argparse
import re
import sys

import torch

import timm
import timm_splitnet  # noqa: F401
from timm_splitnet.models.division import SPLIT_ARCHS
from timm_splitnet.utils.flops import count_macs, count_params
from timm_splitnet.models.paper_tables import PAPER_TABLE
from timm_splitnet.models.splitnet import REGISTERED_SPLIT_FACTORS, splitnet_name

START, END = '<!-- model-table:start -->', '<!-- model-table:end -->'


def paper_value(arch: str, split_factor: int):
    """The paper's row for (arch, S): CIFAR-100 before CIFAR-10, as in the paper's Table 2 / 3 order."""
    return next((e for e in PAPER_TABLE if (e.arch, e.split_factor) == (arch, split_factor)), None)


def model_table() -> str:
    lines = [
        '| architecture | S | registered name | classes | px | params (M) | GMACs | paper params (M) | paper GFLOPs |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for arch, spec in SPLIT_ARCHS.items():
        for s in REGISTERED_SPLIT_FACTORS:
            name = splitnet_name(arch, s)
            paper = paper_value(arch, s)
            with torch.device('meta'):
                model = timm.create_model(name, **(dict(num_classes=paper.num_classes) if paper else {}))
            size = (3, paper.img_size, paper.img_size) if paper else model.pretrained_cfg['input_size']
            params = count_params(model, include_buffers=bool(paper and paper.with_buffers)) / 1e6
            gmacs = count_macs(model, size) / 1e9
            paper_cells = f'{paper.params_m:g} | {paper.gflops:g}' if paper else '– | –'
            lines.append(
                f'| {spec.description} | {s} | `{name}` | {model.num_classes} | {size[-1]} | {params:.2f} | '
                f'{gmacs:.2f} | {paper_cells} |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--update', metavar='README', help='replace the table between the markers in this file')
    args = parser.parse_args(argv)
    table = model_table()
    if not args.update:
        print(table)
        return 0
    text = open(args.update).read()
    if START not in text or END not in text:
        print(f'{args.update} has no {START} ... {END} markers', file=sys.stderr)
        return 1
    text = re.sub(re.escape(START) + '.*?' + re.escape(END), lambda _: f'{START}\n{table}\n{END}', text, flags=re.S)
    with open(args.update, 'w') as f:
        f.write(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
