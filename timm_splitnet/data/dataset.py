""" Dataset factory: timm's datasets plus scikit-learn's digits, clear errors and skipping of unreadable images

:func:`create_dataset` wraps ``timm.data.create_dataset``; ``'sklearn/digits'`` is the CPU demo data set
(:class:`DigitsDataset`) and :class:`SkipBadSamples` replaces undecodable images. See docs/data.md.
"""
import logging
import os
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch.utils.data
from PIL import Image

from timm.data import ImageDataset
from timm.data import create_dataset as timm_create_dataset
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.data.readers.reader_image_in_tar import ReaderImageInTar
from timm.data.readers.img_extensions import get_img_extensions

from .streaming import check_reader_installed, check_shard_root, scale_epoch_length

__all__ = ['create_dataset', 'DigitsDataset', 'SkipBadSamples', 'FOLDER_LAYOUT']

_logger = logging.getLogger(__name__)

FOLDER_LAYOUT = 'root/train/<class>/*.jpg and root/validation/<class>/*.jpg (ImageNet folder layout)'

_TRAIN_SPLITS = ('train', 'training')
_EVAL_SPLITS = ('val', 'valid', 'validation', 'eval', 'evaluation')
_SPLIT_DIR_NAMES = _TRAIN_SPLITS + _EVAL_SPLITS + ('test',)
# errors PIL raises for unreadable, truncated or corrupt files (UnidentifiedImageError is an OSError)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's digits (UCI optical digits, 1797 8x8 gray images, 10 classes) as RGB PIL images.

    Images are scaled from [0, 16] to [0, 255], upscaled (bicubic) to ``img_size`` so that CIFAR pipelines apply,
    and split with a stratified, seeded ``train_test_split``: with the defaults 1437 'train' and 360 'validation'
    images. The data ship with scikit-learn, so nothing is downloaded.
    """

    def __init__(
            self,
            split: str = 'train',
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            val_fraction: float = 0.2,
            split_seed: int = 0,
            img_size: int = 32,
            input_img_mode: str = 'RGB',
    ):
        """
        Args:
            split: 'train' / 'training' or 'validation' / 'val' / 'valid' / 'eval' / 'evaluation'.
            transform: Transform of the PIL image.
            target_transform: Transform of the integer label.
            val_fraction: Fraction of each class held out for validation.
            split_seed: Seed of the split (fixed, independent of the training seed).
            img_size: Side of the upscaled square images.
            input_img_mode: PIL mode of the returned images.
        """
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as e:
            raise ImportError(
                "The 'sklearn/digits' data set needs scikit-learn: pip install scikit-learn "
                "(or timm-splitnet[extras]).") from e
        if split in _TRAIN_SPLITS:
            is_train = True
        elif split in _EVAL_SPLITS:
            is_train = False
        else:
            raise ValueError(
                f"Unknown split {split!r} for 'sklearn/digits', expected one of {_TRAIN_SPLITS + _EVAL_SPLITS}.")
        digits = load_digits()
        indices = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(
            indices, test_size=val_fraction, random_state=split_seed, stratify=digits.target)
        self.indices = np.sort(train_idx if is_train else val_idx)
        gray = np.round(digits.images[self.indices] * (255. / 16.)).clip(0, 255).astype(np.uint8)
        self.images = np.stack([
            np.asarray(Image.fromarray(g, mode='L').resize((img_size, img_size), Image.BICUBIC).convert('RGB'))
            for g in gray])
        self.targets = digits.target[self.indices].astype(np.int64)
        self.classes = [str(c) for c in digits.target_names]
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        self.input_img_mode = input_img_mode

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        img = Image.fromarray(self.images[index])
        if self.input_img_mode and self.input_img_mode != 'RGB':
            img = img.convert(self.input_img_mode)
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __len__(self) -> int:
        return len(self.targets)

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        return f'digits_{int(self.indices[index]):04d}'

    def filenames(self, basename: bool = False, absolute: bool = False) -> List[str]:
        return [self.filename(i) for i in range(len(self))]


class SkipBadSamples(torch.utils.data.Dataset):
    """Wrap a folder / tar ``ImageDataset`` so that unreadable images are skipped instead of crashing a run.

    Every image is fully decoded (``convert`` / ``load``), so truncated files are caught too (unless
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was set, which makes PIL pad them silently). A sample that fails to
    decode (``UnidentifiedImageError`` / ``OSError`` / truncation / corrupt data) is replaced by the next good
    sample; a warning names the file the first time it is found, and the index is remembered so that the file is
    not decoded again. ``bad_samples`` counts distinct bad samples, ``num_seen`` distinct samples read. Once at
    least ``min_samples`` samples have been read, more than ``max_bad_fraction`` of them being bad raises a
    ``RuntimeError`` naming the files: that many broken files means a broken data set, not a few bad downloads.

    The counters live in the process that reads the data: with ``num_workers > 0`` each loader worker keeps its
    own (persistent workers keep them across epochs), and the main process's copy stays at zero. Transform errors
    are not caught. Other attributes (``reader``, ``filenames``, ...) are those of the wrapped dataset.
    """

    def __init__(self, dataset: ImageDataset, max_bad_fraction: float = 0.01, min_samples: int = 100):
        """
        Args:
            dataset: timm ``ImageDataset`` reading local files (folder or tar reader), ``load_bytes=False``.
            max_bad_fraction: Largest tolerated fraction of bad samples among those read.
            min_samples: Number of distinct samples read before the fraction is enforced.
        """
        self.dataset = dataset
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.bad_samples = 0
        self.bad_files: List[str] = []
        self.num_seen = 0
        self._bad_indices = set()
        self._seen = bytearray(len(dataset))

    @property
    def transform(self) -> Optional[Callable]:
        return self.dataset.transform

    @transform.setter
    def transform(self, transform: Optional[Callable]):
        self.dataset.transform = transform

    @property
    def target_transform(self) -> Optional[Callable]:
        return self.dataset.target_transform

    @target_transform.setter
    def target_transform(self, target_transform: Optional[Callable]):
        self.dataset.target_transform = target_transform

    def __getattr__(self, name: str):
        # delegate everything else (reader, filename(s), ...) to the wrapped dataset; guard against recursion while
        # unpickling in loader workers, before 'dataset' is set
        dataset = self.__dict__.get('dataset')
        if dataset is None:
            raise AttributeError(name)
        return getattr(dataset, name)

    def _filename(self, index: int) -> str:
        try:
            return str(self.dataset.filename(index, absolute=True))
        except Exception:
            return f'<index {index}>'

    def _decode(self, index: int) -> Tuple[Image.Image, Any, list]:
        file, target, *features = self.dataset.reader[index]
        try:
            img = Image.open(file)
            mode = self.dataset.input_img_mode
            if mode:
                img = img.convert(mode)  # decodes all pixels
            else:
                img.load()
        finally:
            if hasattr(file, 'close'):
                file.close()
        return img, target, features

    def _mark_seen(self, index: int):
        if not self._seen[index]:
            self._seen[index] = 1
            self.num_seen += 1

    def _record_bad(self, index: int, error: BaseException):
        name = self._filename(index)
        self._bad_indices.add(index)
        self.bad_files.append(name)
        self.bad_samples += 1
        self._mark_seen(index)
        _logger.warning(f'Skipped unreadable image {name} (index {index}): {error!r}. Using the next sample instead.')
        if self.num_seen >= self.min_samples and self.bad_samples > self.max_bad_fraction * self.num_seen:
            shown = ', '.join(self.bad_files[:20]) + (' ...' if len(self.bad_files) > 20 else '')
            raise RuntimeError(
                f'{self.bad_samples} of {self.num_seen} images read could not be decoded (more than '
                f'{self.max_bad_fraction:.1%}); the data set looks broken. Unreadable files: {shown}')

    def __getitem__(self, index: int):
        num_samples = len(self)
        for _ in range(num_samples):
            if index not in self._bad_indices:
                try:
                    img, target, features = self._decode(index)
                except _DECODE_ERRORS as e:
                    self._record_bad(index, e)
                else:
                    self._mark_seen(index)
                    break
            index = (index + 1) % num_samples
        else:
            raise RuntimeError(f'No readable image among the {num_samples} samples; unreadable: {self.bad_files[:20]}')

        if self.dataset.transform is not None:
            img = self.dataset.transform(img)
        if target is None:
            target = -1
        elif self.dataset.target_transform is not None:
            target = self.dataset.target_transform(target)
        if getattr(self.dataset, 'additional_features', None) is None:
            return img, target
        return img, target, *features

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(bad_samples={self.bad_samples}, dataset={self.dataset!r})'


def _has_image(folder: str) -> bool:
    extensions = get_img_extensions(as_set=True)
    for _, _, files in os.walk(folder, followlinks=True):
        if any(os.path.splitext(f)[1].lower() in extensions for f in files):
            return True
    return False


def _resolve_folder_root(root: Optional[str], split: str, search_split: bool) -> str:
    """Check a folder / tar data set root and find its split folder, with errors that say what is expected."""
    if not root:
        raise FileNotFoundError(f'No data directory given; expected {FOLDER_LAYOUT}.')
    if not os.path.exists(root):
        raise FileNotFoundError(f'Data directory {root} does not exist; expected {FOLDER_LAYOUT}.')
    if os.path.isfile(root):
        return root  # image tar, timm's reader checks it
    split_root = root
    if search_split:
        # mirror timm's split search (split folder, then its synonyms), but refuse to fall back to the whole root
        # when that root clearly holds other splits: timm would silently read e.g. train/ and test/ as one split
        split_name = split.split('[')[0]
        candidates = [split_name]
        if split_name in _TRAIN_SPLITS:
            candidates += list(_TRAIN_SPLITS)
        elif split_name in _EVAL_SPLITS:
            candidates += list(_EVAL_SPLITS)
        found = [os.path.join(root, c) for c in candidates if os.path.isdir(os.path.join(root, c))]
        if found:
            split_root = found[0]
        else:
            present = sorted(d for d in _SPLIT_DIR_NAMES if os.path.isdir(os.path.join(root, d)))
            if present:
                raise FileNotFoundError(
                    f'No folder for split {split!r} in data directory {root} (looked for {candidates}; found the '
                    f'split folders {present}); expected {FOLDER_LAYOUT}.')
    if not _has_image(split_root):
        raise FileNotFoundError(
            f'No image files ({", ".join(sorted(get_img_extensions(as_set=True)))}) found in {split_root}; '
            f'expected {FOLDER_LAYOUT}.')
    return split_root


def create_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'validation',
        search_split: bool = True,
        skip_bad_samples: bool = True,
        max_bad_fraction: float = 0.01,
        **kwargs,
) -> torch.utils.data.Dataset:
    """Create a data set like ``timm.data.create_dataset``, plus 'sklearn/digits' and friendlier folder handling.

    Args:
        name: timm data set name ('' or a path-less name for an image folder / tar, 'torch/cifar10', 'hfds/...',
            ...) or 'sklearn/digits'.
        root: Data root; for folders the ImageNet layout ``root/<split>/<class>/<image>`` (not used by digits).
        split: Split name; 'train' or 'validation' / 'val' for digits.
        search_split: Look for the split's sub-folder in ``root`` (timm's behaviour).
        skip_bad_samples: Wrap local folder / tar data sets in :class:`SkipBadSamples`.
        max_bad_fraction: Largest tolerated fraction of unreadable images (see :class:`SkipBadSamples`).
        **kwargs: Passed to ``timm.data.create_dataset`` (class_map, is_training, input_img_mode, ...); digits uses
            ``input_img_mode``, ``val_fraction``, ``split_seed`` and ``img_size`` and ignores the rest. For the
            iterable wds/ and hfids/ readers, ``num_samples`` sets the samples of an epoch (default: the data set's
            count) and ``repeats`` multiplies it (:func:`~timm_splitnet.data.streaming.scale_epoch_length`).

    Raises:
        ImportError: The reader of `name` needs a package that is not installed (the message names the extra).
        FileNotFoundError: A missing folder / shard folder, or a folder without images.

    Returns:
        The data set; its ``transform`` attribute is set by ``timm.data.create_loader``.
    """
    prefix, sep, rest = name.partition('/')
    prefix = prefix.lower() if sep else ''
    if prefix == 'sklearn':
        if rest.lower() != 'digits':
            raise ValueError(f"Unknown scikit-learn data set {name!r}; only 'sklearn/digits' is supported.")
        digits_kwargs = {
            k: kwargs[k] for k in ('val_fraction', 'split_seed', 'img_size', 'input_img_mode')
            if kwargs.get(k) is not None}
        return DigitsDataset(split=split, **digits_kwargs)

    is_folder = prefix not in ('torch', 'hfds', 'hfids', 'tfds', 'wds')
    if is_folder:
        root = _resolve_folder_root(root, split, search_split)
        search_split = False  # resolved above
    check_reader_installed(name)
    if prefix == 'wds':
        check_shard_root(name, root)
    repeats = 0
    if prefix in ('wds', 'hfids'):  # the epoch length is scaled here, alike for both (see scale_epoch_length)
        repeats = kwargs.pop('repeats', 0) or 0
    dataset = timm_create_dataset(name, root=root, split=split, search_split=search_split, **kwargs)
    scale_epoch_length(dataset, repeats)
    if (
            skip_bad_samples
            and isinstance(dataset, ImageDataset)
            and isinstance(dataset.reader, (ReaderImageFolder, ReaderImageInTar))
            and not dataset.load_bytes
    ):
        dataset = SkipBadSamples(dataset, max_bad_fraction=max_bad_fraction)
    return dataset
