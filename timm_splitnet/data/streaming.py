""" Streaming data sets: timm's iterable readers (wds/, hfids/, tfds/) and the Hugging Face map-style hfds/ reader

What each reader needs installed (and the extra of this package that installs it), the epoch length of an iterable
data set (`--epoch-repeats` and `--train-num-samples`), and the per-epoch reseeding that makes the order of an epoch a
function of (seed, epoch, rank). See docs/data.md.
"""
import importlib
import importlib.util
import math
import os
from typing import Any, Optional

import torch.utils.data

__all__ = [
    'ITERABLE_PREFIXES', 'READER_PACKAGES', 'check_reader_installed', 'check_shard_root', 'dataset_prefix',
    'is_iterable', 'scale_epoch_length', 'set_data_epoch', 'set_loader_workers', 'WDS_LAYOUT',
]

# data set prefix -> (modules to import, pip packages, extra of timm-splitnet that installs them or None)
READER_PACKAGES = {
    'wds': (('webdataset',), ('webdataset',), 'wds'),
    'hfds': (('datasets',), ('datasets',), 'hf'),
    'hfids': (('datasets',), ('datasets',), 'hf'),
    'tfds': (('tensorflow', 'tensorflow_datasets'), ('tensorflow', 'tensorflow-datasets'), None),
}
# prefixes whose data sets are iterable (streamed, no random access)
ITERABLE_PREFIXES = ('wds', 'hfids', 'tfds')

WDS_LAYOUT = ('a folder (or URL) of tar shards, each sample a <key>.jpg (or .png / .webp) with its class index in '
              '<key>.cls, and an _info.json naming every split\'s shards and sample count')


def dataset_prefix(name: str) -> str:
    """The reader prefix of a timm data set name ('wds/imagenet' -> 'wds'; '' for an image folder)."""
    prefix, sep, _ = (name or '').partition('/')
    return prefix.lower() if sep else ''


def check_reader_installed(name: str, packages_only: bool = False) -> None:
    """Import what the reader of data set `name` needs, with an error naming the extra that installs it.

    Args:
        name: Data set name ('wds/...', 'hfids/...', ...); other prefixes need nothing.
        packages_only: Check the packages only, not whether timm's reader works with them (e.g. to write shards).

    Raises:
        ImportError: A package of the reader is missing (or fails to import), or the installed timm cannot read with
            it.
    """
    prefix = dataset_prefix(name)
    if prefix not in READER_PACKAGES:
        return
    modules, packages, extra = READER_PACKAGES[prefix]
    how = f"pip install 'timm-splitnet[{extra}]'" if extra else f'pip install {" ".join(packages)}'
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(
                f'data set {name!r} is read by timm\'s {prefix}/ reader, which needs the {module} package '
                f'({e}): {how}.') from e
    if prefix in ('hfds', 'hfids') and not packages_only:
        import datasets
        import timm
        # timm < 1.0.31 passes trust_remote_code to datasets, whose 4.0 release removed it (timm's _hfds module
        # came with the fix)
        if int(datasets.__version__.split('.')[0]) >= 4 and importlib.util.find_spec('timm.data.readers._hfds') is None:
            raise ImportError(
                f'data set {name!r}: the Hugging Face readers of timm {timm.__version__} do not work with datasets '
                f'{datasets.__version__} (timm 1.0.31 or newer does): {how}.')


def check_shard_root(name: str, root: Optional[str]) -> None:
    """A local wds/ root must be a folder that exists (URLs, e.g. s3:// or https://, are left to webdataset).

    Raises:
        FileNotFoundError: No root, or a local root that is not a folder.
    """
    if not root:
        raise FileNotFoundError(f'data set {name!r} needs a data directory: {WDS_LAYOUT}.')
    if '://' in root or root.startswith('pipe:'):
        return
    if not os.path.isdir(root):
        raise FileNotFoundError(f'shard folder {root} of data set {name!r} does not exist; expected {WDS_LAYOUT}.')


def is_iterable(dataset: Any) -> bool:
    """True for an iterable (streaming) data set: no indices, no sampler; the reader splits it by rank and worker."""
    return isinstance(dataset, torch.utils.data.IterableDataset)


def scale_epoch_length(dataset: Any, repeats: float) -> None:
    """Make an epoch of a wds/ or hfids/ data set `repeats` times its sample count (e.g. 2.0 or 0.5).

    The readers draw ``num_samples`` samples per epoch (from ``--train-num-samples`` or the data set's own count),
    spread over ranks and loader workers. timm's wds/ reader ignores its ``repeats`` argument and its hfids/ reader
    cannot shorten an epoch; scaling ``num_samples`` gives both the same meaning. A reader without ``num_samples``
    is left alone.
    """
    reader = getattr(dataset, 'reader', None)
    if not repeats or repeats <= 0 or not getattr(reader, 'num_samples', None):
        return
    reader.num_samples = max(1, int(math.ceil(reader.num_samples * repeats)))


def set_loader_workers(dataset: Any, num_workers: int) -> None:
    """Tell an iterable data set how many loader workers will read it, at least one (without workers the training
    process reads), so that its length, and the loader's, count its samples.

    Call it after ``timm.data.create_loader``, before the length is used. create_loader passes the worker count as it
    is, which timm < 1.0.31 takes for zero readers: with ``--workers 0`` an epoch of a wds/ data set would have no
    batches. Data sets without ``set_loader_cfg`` are left alone.
    """
    if hasattr(dataset, 'set_loader_cfg'):
        dataset.set_loader_cfg(num_workers=max(1, int(num_workers)))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank) * 104_729 + 17) % (2 ** 31)


def set_data_epoch(dataset: Any, epoch: int) -> None:
    """Tell a data set which epoch comes next (call before iterating it, like a sampler's ``set_epoch``).

    The wds/, hfids/ and tfds/ readers shuffle their shards by (seed, epoch), so every epoch reads another shard order
    and a restarted epoch reads the one it had. timm's wds/ reader also keeps a buffer of samples that it shuffles with
    a stream seeded once; in loader workers that seed is drawn anew each epoch from the training process's
    (checkpointed) torch generator, but read in the training process itself (``--workers 0``) the stream would run on
    from one epoch to the next and a resumed run would draw other batches. There the buffer's stream is reseeded here
    from (seed, epoch, rank). Data sets without ``set_epoch`` are left alone.
    """
    if not hasattr(dataset, 'set_epoch'):
        return
    dataset.set_epoch(epoch)
    reader = getattr(dataset, 'reader', None)
    if type(reader).__name__ == 'ReaderWds' and getattr(reader, 'worker_info', True) is None:
        reader.worker_seed = _epoch_seed(reader.common_seed, epoch, getattr(reader, 'dist_rank', 0))
        reader.ds = None  # rebuilt at the next iteration, with the new seed
