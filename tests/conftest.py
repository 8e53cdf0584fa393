""" Shared pytest fixtures

``image_folder``: a small CIFAR-shaped image folder in the ImageNet layout (32x32 RGB JPEGs, 10 classes), built
from data that ships with scikit-learn, so that no test needs a file outside the repository:
``root/train/<class>/*.jpg`` (20 per class, from the train split of ``sklearn/digits``) and
``root/validation/<class>/*.jpg`` (10 per class, from its validation split), classes ``'0'`` .. ``'9'``. The images
are those of :class:`timm_splitnet.data.DigitsDataset` (the README demo's data set: the same stratified split, 8x8
digits upscaled bicubically to 32x32). The last training image of every class is written as a grayscale (mode L)
JPEG, so the folder readers' conversion to RGB is exercised; tests that need corrupt, truncated or zero-byte files
copy the folder and add them.

``digits8_folder``: the same kind of folder with digits at their native 8x8 pixels, 50 training and 20 validation
images per class; ``wds_shards`` and ``hf_shards``: its files as webdataset shards and as a Hugging Face data set
folder, written by ``timm_splitnet.data.write_wds_shards`` / ``write_hf_shards`` (tests/test_streaming.py).

Tests marked ``cuda`` (tests/test_cuda.py and the CUDA cases of other files) skip without a CUDA GPU.
"""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FOLDER_CLASSES = tuple(str(c) for c in range(10))
FOLDER_TRAIN_PER_CLASS = 20
FOLDER_VAL_PER_CLASS = 10
FOLDER_IMG_SIZE = 32


def build_digits_folder(root: Path, train_per_class: int, val_per_class: int, img_size: int = 32) -> Path:
    """Write the first images per class of the digits train / validation splits as JPEGs in the ImageNet layout."""
    from timm_splitnet.data.dataset import DigitsDataset
    for split, limit in (('train', train_per_class), ('validation', val_per_class)):
        ds = DigitsDataset(split=split, img_size=img_size)
        for cls_idx, cls in enumerate(FOLDER_CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            picks = np.flatnonzero(ds.targets == cls_idx)[:limit]
            assert len(picks) == limit, (split, cls)
            for n, i in enumerate(picks):
                img = Image.fromarray(ds.images[i])
                if split == 'train' and n == limit - 1:
                    img = img.convert('L')  # a grayscale file among RGB ones (sorted last in its class)
                img.save(folder / f'{int(ds.indices[i]):04d}.jpg', quality=95)
    return root


# the modules with the longest end-to-end runs, heaviest first: collected first, so that under `-n auto --dist
# loadscope --no-loadscope-reorder` they start at once and the workers finish together
HEAVY_MODULES = ('test_learning.py', 'test_gpu_evidence.py', 'test_train_member_parallel.py', 'test_preemption.py',
                 'test_member_parallel_inference.py', 'test_member_parallel.py', 'test_streaming.py', 'test_train.py')


def pytest_collection_modifyitems(config, items):
    """Heavy modules first (HEAVY_MODULES), otherwise the collection order; tests marked `cuda` skip on a machine
    without a CUDA GPU (`python -m pytest -m cuda` runs them on one)."""
    rank = {name: i for i, name in enumerate(HEAVY_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module is kept
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (run `python -m pytest -m cuda` on a GPU machine)')
    for item in items:
        if item.get_closest_marker('cuda') is not None:
            item.add_marker(skip)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory) -> Path:
    """Root of a small CIFAR-shaped folder data set with ``train/`` and ``validation/`` splits (module docstring)."""
    root = tmp_path_factory.mktemp('digits_folder')
    return build_digits_folder(root, FOLDER_TRAIN_PER_CLASS, FOLDER_VAL_PER_CLASS, FOLDER_IMG_SIZE)


@pytest.fixture(scope='session', autouse=True)
def _torch_threads():
    """Intra-op threads of the in-process tests: 1 by default (env ``SPLITNET_TEST_THREADS`` overrides).

    The tests run tiny models on tiny batches, where one thread is as fast as two on an idle 2-core machine and
    many times faster on a busy one (two spinning OpenMP threads per process). Subprocesses (train.py, validate.py,
    torchrun) inherit the same count through ``OMP_NUM_THREADS``, so parallel test workers do not oversubscribe.
    """
    import torch
    threads = torch.get_num_threads()
    test_threads = os.environ.get('SPLITNET_TEST_THREADS', '1')
    omp = os.environ.get('OMP_NUM_THREADS')
    torch.set_num_threads(int(test_threads))
    os.environ['OMP_NUM_THREADS'] = test_threads
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop('OMP_NUM_THREADS', None)
    else:
        os.environ['OMP_NUM_THREADS'] = omp



# the streamed data sets of tests/test_streaming.py: digits at their native 8x8 pixels (the README demo's size), so
# that a co-training run learns in a few seconds
DIGITS8_TRAIN_PER_CLASS = 50
DIGITS8_VAL_PER_CLASS = 20
STREAM_TRAIN_SHARD = 125  # 4 training shards: 2 per rank of a 2-process run
STREAM_VAL_SHARD = 100  # 2 validation shards


@pytest.fixture(scope='session')
def digits8_folder(tmp_path_factory) -> Path:
    """A folder data set of 8x8 digits (ImageNet layout): 500 training and 200 validation JPEGs."""
    root = tmp_path_factory.mktemp('digits8_folder')
    return build_digits_folder(root, DIGITS8_TRAIN_PER_CLASS, DIGITS8_VAL_PER_CLASS, img_size=8)


def _write_shards(folder: Path, root: Path, write, **kwargs) -> Path:
    from timm_splitnet.data import create_dataset
    for split, size in (('train', STREAM_TRAIN_SHARD), ('validation', STREAM_VAL_SHARD)):
        write(create_dataset('', root=str(folder), split=split), str(root), split, shard_size=size, **kwargs)
    return root


@pytest.fixture(scope='session')
def wds_shards(digits8_folder, tmp_path_factory) -> Path:
    """The ``digits8_folder`` images as webdataset shards (``--dataset wds/digits``): ``train-0000[0-3].tar`` of 125
    samples (the JPEG files themselves, shuffled before sharding), ``validation-0000[01].tar`` and ``_info.json``."""
    pytest.importorskip('webdataset')
    from timm_splitnet.data import write_wds_shards
    return _write_shards(digits8_folder, tmp_path_factory.mktemp('digits8_wds'), write_wds_shards)


@pytest.fixture(scope='session')
def hf_shards(digits8_folder, tmp_path_factory) -> Path:
    """The ``digits8_folder`` images as a Hugging Face data set folder (``--dataset hfids/<folder>`` or
    ``hfds/<folder>``): ``data/train-0000[0-3]-of-00004.arrow``, ``data/validation-...`` and the ``README.md`` card.

    Arrow files rather than parquet: datasets 5 pauses 5 s after every shuffled pass over parquet shards."""
    pytest.importorskip('datasets')
    from timm_splitnet.data import write_hf_shards
    return _write_shards(digits8_folder, tmp_path_factory.mktemp('digits8_hf'), write_hf_shards, file_format='arrow')
