""" Multi-view data for SplitNet co-training

:class:`MultiViewTransform` gives each of the S members its own augmented view of every image (paper §3.3): set as the
``transform`` of any data set timm's ``create_dataset`` returns (image folders, torch/, hfds/, and the streaming wds/,
hfids/, tfds/ readers), it turns a sample into ``(views, target)``. Batches are stacked split-major ``[S * B, C, H, W]``
(timm's ``fast_collate`` or :func:`collate_views`), and :func:`mixup_views` mixes all views of a sample alike. See
docs/data.md.
"""
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.utils.data
from torch.utils.data import default_collate

from timm.data.mixup import mixup_target

__all__ = [
    'MultiViewTransform', 'MultiViewDataset', 'set_views_transform', 'collate_views', 'views_to_channels',
    'channels_to_views', 'mixup_views', 'mixup_split_batch',
]


class MultiViewTransform:
    """The S views of one image: the full transform run S times, each run with its own random draws.

    Every view goes through the whole pipeline (crop, flip, auto-augment, tensor conversion, normalization and erasing
    where the pipeline has them); no view is left "clean", unlike timm's AugMix splits. Because the views are made
    where the data set applies its ``transform``, this works the same for map-style data sets and for iterable
    readers, whose transform runs inside their reader loop (in the loader workers).

    The result is a tuple of S views. timm's ``fast_collate`` (prefetcher on; the transform must then end in a uint8
    tensor) flattens a batch of such tuples split-major into ``[S * B, C, H, W]`` with the targets repeated to
    ``[S * B]``; without the prefetcher use :func:`collate_views`, which gives the same layout.
    """

    def __init__(self, transform: Optional[Callable], num_views: int = 2, same_view: bool = False):
        """
        Args:
            transform: One full transform of an image (None: the image itself, S times).
            num_views: Number of views S (one per member); 1 gives 1-tuples.
            same_view: Run the transform once and repeat its output S times (the ablation of Table 5).

        Raises:
            TypeError: A tuple / list of split transforms (``create_loader(num_aug_splits > 0)``, for AugMix).
            ValueError: Fewer than one view.
        """
        if isinstance(transform, (tuple, list)):
            raise TypeError(
                'MultiViewTransform takes one full transform; got a tuple of split transforms '
                '(create_loader(num_aug_splits>0) is for AugMixDataset, keep num_aug_splits=0).')
        if num_views < 1:
            raise ValueError(f'num_views must be >= 1, got {num_views}.')
        self.transform = transform
        self.num_views = int(num_views)
        self.same_view = bool(same_view)

    def __call__(self, img: Any) -> Tuple[Any, ...]:
        if self.transform is None:
            return (img,) * self.num_views
        if self.same_view:
            return (self.transform(img),) * self.num_views
        return tuple(self.transform(img) for _ in range(self.num_views))

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(num_views={self.num_views}, same_view={self.same_view}, '
                f'transform={self.transform!r})')


def set_views_transform(
        dataset: Any,
        transform: Optional[Callable],
        num_views: int,
        same_view: bool = False,
) -> None:
    """Make `dataset` return `num_views` views of every sample, each drawn by `transform`.

    A data set that makes its views itself (a :class:`MultiViewDataset`, e.g. the member-parallel
    ``MemberViewDataset``) just gets `transform`; any other data set gets a :class:`MultiViewTransform` around it, or
    `transform` as it is for a single view. Call it after ``timm.data.create_loader`` (which sets a transform of its
    own) and before the first iteration of the loader.
    """
    if isinstance(dataset, MultiViewDataset):
        dataset.transform = transform
    elif num_views > 1 or same_view:
        dataset.transform = MultiViewTransform(transform, num_views, same_view)
    else:
        dataset.transform = transform


class MultiViewDataset(torch.utils.data.Dataset):
    """A map-style data set wrapped to return ``num_views`` views of each sample: a :class:`MultiViewTransform` applied
    outside the wrapped data set.

    The wrapped data set must return ``(image, target)`` with an untransformed image: the ``transform`` setter (which
    ``timm.data.create_loader`` calls with its single composed transform; keep ``num_aug_splits=0``) puts the
    transform into this wrapper's :class:`MultiViewTransform` and sets the wrapped data set's transform to None. For
    iterable data sets set a :class:`MultiViewTransform` as their transform instead (:func:`set_views_transform`).

    Samples are ``(tuple_of_views, target)``, collated split-major as described for :class:`MultiViewTransform`.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, num_views: int = 2, same_view: bool = False):
        """
        Args:
            dataset: Map-style dataset returning (image, target).
            num_views: Number of views S (one per member); 1 is allowed and yields 1-tuples.
            same_view: Run the transform once and repeat the view S times (ablation of different views, Table 5).
        """
        self.dataset = dataset
        self.views = MultiViewTransform(None, num_views, same_view)
        if getattr(dataset, 'transform', None) is not None:
            self.transform = dataset.transform

    @property
    def num_views(self) -> int:
        return self.views.num_views

    @property
    def same_view(self) -> bool:
        return self.views.same_view

    @property
    def transform(self) -> Optional[Callable]:
        return self.views.transform

    @transform.setter
    def transform(self, transform: Optional[Callable]):
        self.views = MultiViewTransform(transform, self.num_views, self.same_view)
        self.dataset.transform = None  # the wrapped dataset returns the raw image, every view is transformed here

    def __getitem__(self, index: int) -> Tuple[Tuple[Any, ...], Any]:
        img, target = self.dataset[index][:2]
        return self.views(img), target

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return (
            f'{self.__class__.__name__}(num_views={self.num_views}, same_view={self.same_view}, '
            f'dataset={self.dataset!r})')


def collate_views(batch: List[Tuple[Any, Any]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Collate function for samples of S views (:class:`MultiViewTransform`) without timm's prefetcher.

    Gives the same layout as ``timm.data.fast_collate`` (but keeps the transform's dtype, e.g. normalized float):
    images ``[S * B, C, H, W]`` split-major (row ``i + s * B`` is view s of sample i) and targets repeated S times
    (``[S * B]``, or ``[S * B, ...]`` for dense targets). Samples whose image is not a tuple of views are collated
    by ``default_collate``. Pass as ``create_loader(..., use_prefetcher=False, collate_fn=collate_views)``.
    """
    if not isinstance(batch[0][0], (tuple, list)):
        return default_collate(batch)
    num_views = len(batch[0][0])
    if any(len(sample[0]) != num_views for sample in batch):
        raise ValueError('All samples in a batch must have the same number of views.')
    images = torch.stack([torch.as_tensor(sample[0][s]) for s in range(num_views) for sample in batch])
    targets = default_collate([sample[1] for sample in batch])
    if targets.ndim == 1:
        targets = targets.long()
    targets = targets.repeat((num_views,) + (1,) * (targets.ndim - 1))
    return images, targets


def _is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D tensor laid out channels_last (NHWC) and not also NCHW-contiguous."""
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def views_to_channels(
        x: torch.Tensor,
        num_views: int,
        memory_format: Optional[torch.memory_format] = None,
) -> torch.Tensor:
    """Split-major ``[S * B, C, H, W]`` batch to the channel-concatenated ``[B, S * C, H, W]`` layout (one copy).

    Member (view) s occupies channels ``s * C .. (s + 1) * C - 1``, as in the reference implementation.

    Args:
        x: Split-major views ``[S * B, C, H, W]``.
        num_views: Number of views S.
        memory_format: Layout of the result, ``torch.channels_last`` or ``torch.contiguous_format``; None keeps the
            layout of ``x`` (channels_last when ``x`` is). A channels_last result is written in that layout by the one
            copy the permutation needs: its channel blocks (the members' views) go on to the members without another.
    """
    total, channels, height, width = x.shape
    if total % num_views:
        raise ValueError(f'Batch of {total} rows is not divisible into {num_views} views.')
    batch_size = total // num_views
    if memory_format is None:
        memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    x = x.reshape(num_views, batch_size, channels, height, width)
    if memory_format == torch.channels_last:  # [B, H, W, S, C] in memory
        return x.permute(1, 3, 4, 0, 2).reshape(batch_size, height, width, num_views * channels).permute(0, 3, 1, 2)
    return x.transpose(0, 1).reshape(batch_size, num_views * channels, height, width)


def channels_to_views(
        x: torch.Tensor,
        num_views: int,
        memory_format: Optional[torch.memory_format] = None,
) -> torch.Tensor:
    """Inverse of :func:`views_to_channels`: ``[B, S * C, H, W]`` to split-major ``[S * B, C, H, W]``.

    Args:
        x: Channel-concatenated views ``[B, S * C, H, W]``.
        num_views: Number of views S.
        memory_format: Layout of the result; None keeps the layout of ``x``.
    """
    batch_size, total_channels, height, width = x.shape
    if total_channels % num_views:
        raise ValueError(f'{total_channels} channels are not divisible into {num_views} views.')
    channels = total_channels // num_views
    if memory_format is None:
        memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    x = x.reshape(batch_size, num_views, channels, height, width)
    if memory_format == torch.channels_last:  # [S, B, H, W, C] in memory
        return x.permute(1, 0, 3, 4, 2).reshape(num_views * batch_size, height, width, channels).permute(0, 3, 1, 2)
    return x.transpose(0, 1).reshape(num_views * batch_size, channels, height, width)


def mixup_views(mixup_fn: Callable, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply a timm ``Mixup`` once to a channel-concatenated multi-view batch.

    Because every view of a sample sits in the channels of one row, each view gets the same lambda, the same
    partner (timm mixes row i with row B - 1 - i) and the same CutMix box, in all of timm's modes ('batch', 'pair',
    'elem'). Mixing the views separately would give each member a different target and break the co-training
    loss, which compares the members' predictions for the same (mixed) input.

    timm's ``Mixup`` asserts an even batch size (its 'pair' mode pairs rows i and B - 1 - i). Training loaders use
    ``drop_last=True``, so this only matters for an odd ``--batch-size`` (per process): then the first B - 1 rows
    are mixed and the last row is left unmixed, with its one-hot (label-smoothed) target.

    Args:
        mixup_fn: A ``timm.data.Mixup`` (not ``FastCollateMixup``, which cannot take multi-view samples).
        x: Batch ``[B, S * C, H, W]`` (see :func:`views_to_channels`); mixed in place, as timm does.
        target: Class indices ``[B]``.

    Returns:
        The mixed batch ``[B, S * C, H, W]`` and soft targets ``[B, num_classes]``.
    """
    if target.ndim != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(
            f'mixup_views expects class indices of shape [{x.shape[0]}], got {tuple(target.shape)}; '
            'with repeated (split-major) targets pass target[:B].')
    batch_size = x.shape[0]
    if batch_size % 2 == 0:
        return mixup_fn(x, target)
    mixed = x[:-1]  # a view: timm mixes in place, so x is updated too
    if batch_size > 1:
        mixed, mixed_target = mixup_fn(mixed, target[:-1])
    else:
        mixed_target = target.new_zeros((0, mixup_fn.num_classes), dtype=torch.float32)
    x[:-1] = mixed
    last_target = mixup_target(
        target[-1:], mixup_fn.num_classes, lam=1., smoothing=mixup_fn.label_smoothing).to(mixed_target.dtype)
    return x, torch.cat([mixed_target, last_target])


def mixup_split_batch(
        mixup_fn: Callable,
        x: torch.Tensor,
        target: torch.Tensor,
        num_views: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`mixup_views` for a split-major batch as it comes from the loader.

    Args:
        mixup_fn: A ``timm.data.Mixup``.
        x: Split-major batch ``[S * B, C, H, W]``.
        target: Class indices ``[S * B]`` (repeated per view, as collated) or ``[B]``.
        num_views: Number of views S.

    Returns:
        Mixed split-major batch ``[S * B, C, H, W]`` and soft targets ``[B, num_classes]`` (one per sample, shared by
        all members).
    """
    batch_size = x.shape[0] // num_views
    mixed, soft_target = mixup_views(mixup_fn, views_to_channels(x, num_views), target[:batch_size])
    return channels_to_views(mixed, num_views), soft_target
