#!/usr/bin/env python3
""" Write an image data set as shards for streamed training: webdataset tars or a Hugging Face data set folder

    # an ImageNet-layout folder (train/<class>/*.JPEG, validation/<class>/*.JPEG) as webdataset shards
    python scripts/write_shards.py --data-dir /data/imagenet --output /data/imagenet-wds --format wds
    python train.py -c configs/imagenet_resnet50_s2.yaml --dataset wds/imagenet --data-dir /data/imagenet-wds
    # the same as a Hugging Face data set (data/<split>-*.parquet and a README.md card, uploadable to the Hub)
    python scripts/write_shards.py --data-dir /data/imagenet --output /data/imagenet-hf --format hf
    python train.py -c configs/imagenet_resnet50_s2.yaml --dataset hfids//data/imagenet-hf --data-dir /data/hf-cache

Image files are copied into the shards as they are (no decoding, no re-encoding); the training split is shuffled
before it is cut into shards (a streaming reader only shuffles shards and a buffer of samples). `--dataset` takes
train.py's names of map-style data sets, e.g. `sklearn/digits` (no --data-dir) or `torch/cifar10`, whose decoded
images are stored as JPEG. See docs/data.md ("Streamed data sets").
"""
import argparse
import logging
import sys

from timm_splitnet.cli import CliError, cli_session
from timm_splitnet.data import create_dataset, is_iterable, write_hf_shards, write_wds_shards

_logger = logging.getLogger('write_shards')

parser = argparse.ArgumentParser(description='Write a data set as webdataset or Hugging Face shards')
parser.add_argument('--data-dir', default=None, type=str, metavar='DIR',
                    help='the data set to shard: an image folder in the ImageNet layout (or the root of --dataset)')
parser.add_argument('--dataset', default='', type=str, metavar='NAME',
                    help='train.py\'s name of a map-style data set: "" (image folder, default), "torch/cifar10", '
                         '"sklearn/digits", ...')
parser.add_argument('--splits', default=['train', 'validation'], nargs='+', metavar='SPLIT',
                    help='splits to write, each under its own name (default: train validation)')
parser.add_argument('--output', required=True, type=str, metavar='DIR', help='folder the shards are written to')
parser.add_argument('--format', default='wds', choices=('wds', 'hf'),
                    help='wds: <split>-NNNNN.tar + _info.json (train.py --dataset wds/<name>); hf: '
                         'data/<split>-*.parquet + README.md (--dataset hfids/<folder> or hfds/<folder>) '
                         '(default: wds)')
parser.add_argument('--shard-size', default=1000, type=int, metavar='N',
                    help='samples per shard; ImageNet\'s 110 kB JPEGs make 1000 about 110 MB (default: 1000)')
parser.add_argument('--hf-file-format', default='parquet', choices=('parquet', 'arrow'),
                    help='--format hf: parquet, as the Hub serves data sets, or uncompressed Arrow streams '
                         '(default: parquet)')
parser.add_argument('--seed', default=0, type=int, help='seed of the shuffle of the training split (default: 0)')
parser.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                    help='image folders: file mapping class folder names to indices, as train.py takes it')
parser.add_argument('--img-size', default=None, type=int, metavar='N',
                    help='sklearn/digits: side of the stored images (default: 32; the README demo trains at 8)')


def main(argv=None) -> int:
    args = parser.parse_args(argv)
    with cli_session('write_shards.py'):
        kwargs = {}
        if args.class_map:
            kwargs['class_map'] = args.class_map
        if args.img_size:
            kwargs['img_size'] = args.img_size
        if args.format == 'hf':
            try:
                import datasets
                datasets.disable_progress_bars()  # one bar per shard otherwise; this script logs its own progress
            except ImportError:
                pass  # write_hf_shards names the extra to install
        for split in args.splits:
            try:
                dataset = create_dataset(args.dataset, root=args.data_dir, split=split, **kwargs)
            except (OSError, ValueError, ImportError, RuntimeError, AssertionError) as e:
                raise CliError(f'cannot read the {split!r} split of --dataset {args.dataset!r} '
                               f'(--data-dir {args.data_dir}): {e}') from e
            if is_iterable(dataset):
                raise CliError(f'--dataset {args.dataset} is streamed already; give a map-style data set.')
            _logger.info(f'{split}: {len(dataset)} samples to {args.output} ({args.format}, '
                         f'{args.shard_size} per shard)')
            try:
                if args.format == 'wds':
                    entry = write_wds_shards(dataset, args.output, split, shard_size=args.shard_size, seed=args.seed)
                    _logger.info(f'{split}: {entry["num_samples"]} samples in {len(entry["filenames"])} shards.')
                else:
                    counts = write_hf_shards(dataset, args.output, split, shard_size=args.shard_size, seed=args.seed,
                                             file_format=args.hf_file_format)
                    _logger.info(f'{split}: {counts[split]} samples; the folder holds {counts}.')
            except (OSError, ValueError, ImportError) as e:
                raise CliError(f'cannot write the {split!r} shards to {args.output}: {e}') from e
    return 0


if __name__ == '__main__':
    sys.exit(main())
