""" Shared pytest fixtures

``cifar_folder``: a small CIFAR-10 image folder in the ImageNet layout, extracted from ``../shared/data`` (the
checkout's sibling ``shared/`` folder): ``root/train/<class>/*.jpg`` (20 per class) and
``root/validation/<class>/*.jpg`` (10 per class, from CIFAR-10's test split), 10 classes. Tests that use it are
skipped when the tarball is absent.
"""
import tarfile
from pathlib import Path

import pytest

CIFAR_TARBALL = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'
CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR_TRAIN_PER_CLASS = 20
CIFAR_VAL_PER_CLASS = 10


def extract_cifar_subset(tarball: Path, root: Path, train_per_class: int, val_per_class: int) -> Path:
    """Extract the first images per class: tar ``train/`` to ``root/train``, tar ``test/`` to ``root/validation``."""
    wanted = {'train': ('train', train_per_class), 'test': ('validation', val_per_class)}
    counts = {}
    with tarfile.open(tarball) as tf:
        for member in tf:
            parts = member.name.split('/')
            if not member.isfile() or len(parts) != 3 or parts[0] not in wanted or not parts[2].endswith('.jpg'):
                continue
            split, cls, fname = parts
            out_split, limit = wanted[split]
            if cls not in CIFAR_CLASSES or counts.get((split, cls), 0) >= limit:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            out = root / out_split / cls / fname
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tf.extractfile(member).read())
            if len(counts) == 2 * len(CIFAR_CLASSES) and all(
                    counts[(s, c)] >= wanted[s][1] for s in wanted for c in CIFAR_CLASSES):
                break
    return root


@pytest.fixture(scope='session')
def cifar_folder(tmp_path_factory) -> Path:
    """Root of a small CIFAR-10 folder data set with ``train/`` and ``validation/`` splits (see module docstring)."""
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f'CIFAR-10 tarball not found at {CIFAR_TARBALL} (the shared/ folder beside the checkout)')
    root = tmp_path_factory.mktemp('cifar10')
    return extract_cifar_subset(CIFAR_TARBALL, root, CIFAR_TRAIN_PER_CLASS, CIFAR_VAL_PER_CLASS)
