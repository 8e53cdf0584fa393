""" Train / eval transforms for SplitNet recipes

`create_train_transform` / `create_eval_transform`: the paper's CIFAR pipeline (``train_crop_mode='pad'``) or timm's
ImageNet pipeline, with timm ``--aa`` strings or torchvision's 'cifar10' / 'svhn' AutoAugment policies. Every
auto-augment built here posterizes with :func:`posterize_safe` (Pillow >= 13 rejects 0 bits); timm's global op table
is left untouched. See docs/data.md.
"""
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from PIL import Image, ImageOps
from torchvision import transforms

from timm.data import create_transform
from timm.data.auto_augment import AugmentOp, augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor, str_to_pil_interp

__all__ = [
    'CIFAR10_MEAN', 'CIFAR10_STD', 'CIFAR100_MEAN', 'CIFAR100_STD', 'CIFAR_RE_SCALE', 'CIFAR_RE_RATIO',
    'TV_AUTO_AUGMENT_POLICIES', 'create_auto_augment', 'create_random_erasing', 'transforms_cifar_train',
    'transforms_cifar_eval', 'create_train_transform', 'create_eval_transform', 'eval_data_config', 'posterize_safe',
    'use_safe_posterize',
]

# normalization constants of the reference implementation
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# random-erasing box of the reference CIFAR-10 recipe (area fraction, aspect ratio); CIFAR-100 used (0.0625, 0.1)
CIFAR_RE_SCALE = (0.125, 0.2)
CIFAR_RE_RATIO = (0.99, 1.0)

TV_AUTO_AUGMENT_POLICIES = {
    'cifar10': transforms.AutoAugmentPolicy.CIFAR10,
    'svhn': transforms.AutoAugmentPolicy.SVHN,
}

Size = Union[int, Tuple[int, int], Tuple[int, int, int]]


def posterize_safe(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """Posterize that accepts 0 bits, like Pillow < 13 did.

    Keeps the ``bits_to_keep`` most significant bits of every channel. 0 bits gives an all-zero image, exactly what
    Pillow < 13 computed (``i & ~255 == 0``) and what TF's posterize (``(x >> 8) << 8``) gives; Pillow 13 raises
    ``ValueError: bits must be between or equal to 1 and 8`` instead.
    """
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits >= 1:
        return ImageOps.posterize(img, bits)
    return img.point([0] * 256 * len(img.getbands()))


# timm's posterize ops (names in `timm.data.auto_augment.NAME_TO_OP`)
POSTERIZE_OPS = ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal')


def use_safe_posterize(transform: Any) -> Any:
    """Make the posterize ops inside ``transform`` use :func:`posterize_safe`; returns ``transform``.

    timm's posterize ops ask Pillow for 0 bits at some magnitudes ('PosterizeIncreasing' at the clamped magnitude 10,
    e.g. ~2.3% of its calls with ``rand-m9-mstd0.5-inc1``; 'Posterize' below magnitude 2.5), which Pillow >= 13
    rejects with a ValueError that ends the run. Only the ``AugmentOp`` instances of this transform are changed
    (each op holds its own function, looked up when it was built), never timm's ``NAME_TO_OP``. Walks
    ``Compose.transforms``, ``RandAugment.ops``, ``AugMixAugment.ops``, ``AutoAugment.policy`` and lists / tuples.
    """
    seen = set()

    def visit(t: Any) -> None:
        if id(t) in seen:
            return
        seen.add(id(t))
        if isinstance(t, AugmentOp):
            if t.name in POSTERIZE_OPS:
                t.aug_fn = posterize_safe
            return
        if isinstance(t, (list, tuple)):
            children = t
        else:
            children = [getattr(t, attr) for attr in ('transforms', 'ops', 'policy') if hasattr(t, attr)]
        for child in children:
            visit(child)

    visit(transform)
    return transform


def _to_size(input_size: Size) -> Tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    return tuple(input_size[-2:])


def create_auto_augment(
        auto_augment: str,
        img_size: Size,
        mean: Sequence[float] = CIFAR10_MEAN,
        interpolation: str = 'bilinear',
) -> Callable:
    """Build a PIL auto-augment transform from a timm ``--aa`` string or a torchvision policy name.

    Args:
        auto_augment: 'cifar10' / 'svhn' (torchvision ``AutoAugment`` policies), 'rand-...' (RandAugment),
            'augmix-...' (AugMix) or a timm AutoAugment policy ('original', 'originalr', 'v0', 'v0r', '3a').
        img_size: Image size, sets the translation range (45% of the shorter side) as timm does.
        mean: Normalization mean, used as the fill color of geometric ops.
        interpolation: Interpolation of geometric ops ('random' for timm's random choice).

    Raises:
        ValueError: A policy string that names none of these.
    """
    fill = tuple(min(255, round(255 * x)) for x in mean)
    if auto_augment in TV_AUTO_AUGMENT_POLICIES:
        return transforms.AutoAugment(TV_AUTO_AUGMENT_POLICIES[auto_augment], fill=list(fill))
    aa_params = dict(translate_const=int(min(_to_size(img_size)) * 0.45), img_mean=fill)
    if interpolation and interpolation != 'random':
        aa_params['interpolation'] = str_to_pil_interp(interpolation)
    try:
        if auto_augment.startswith('rand'):
            return use_safe_posterize(rand_augment_transform(auto_augment, aa_params))
        if auto_augment.startswith('augmix'):
            aa_params['translate_pct'] = 0.3
            return use_safe_posterize(augment_and_mix_transform(auto_augment, aa_params))
        return use_safe_posterize(auto_augment_transform(auto_augment, aa_params))
    except (AssertionError, KeyError, ValueError, IndexError) as e:  # timm's parsers assert on what they cannot read
        detail = f' ({e})' if str(e) else ''
        raise ValueError(
            f'unknown auto-augment policy {auto_augment!r}{detail}: expected "cifar10" or "svhn" '
            f'(torchvision), a RandAugment string such as "rand-m9-mstd0.5-inc1", an AugMix string such as '
            f'"augmix-m5-w3", or an AutoAugment policy: original, originalr, v0, v0r, 3a.') from e


def create_random_erasing(
        re_prob: float,
        re_scale: Tuple[float, float] = CIFAR_RE_SCALE,
        re_ratio: Tuple[float, float] = CIFAR_RE_RATIO,
        re_mode: str = 'const',
        re_count: int = 1,
        device: Union[str, torch.device] = 'cpu',
) -> RandomErasing:
    """timm ``RandomErasing`` with a box area fraction in ``re_scale`` and aspect ratio in ``re_ratio``.

    'const' mode fills zeros after normalization, i.e. the mean pixel (the reference's ``value=0``). With timm's
    prefetcher erasing runs on the device inside ``PrefetchLoader`` with timm's default box; to use the CIFAR box
    there, replace it after ``create_loader``: ``loader.random_erasing = create_random_erasing(..., device=device)``.
    """
    return RandomErasing(
        probability=re_prob,
        min_area=re_scale[0],
        max_area=re_scale[1],
        min_aspect=re_ratio[0],
        max_aspect=re_ratio[1],
        mode=re_mode,
        max_count=re_count,
        device=device,
    )


def transforms_cifar_train(
        img_size: Size = 32,
        padding: int = 4,
        hflip: float = 0.5,
        auto_augment: Optional[str] = None,
        interpolation: str = 'bilinear',
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        re_prob: float = 0.,
        re_scale: Tuple[float, float] = CIFAR_RE_SCALE,
        re_ratio: Tuple[float, float] = CIFAR_RE_RATIO,
        re_mode: str = 'const',
        re_count: int = 1,
        use_prefetcher: bool = False,
) -> transforms.Compose:
    """CIFAR train transform: pad-and-crop, flip, optional auto-augment, then tensor conversion.

    Args:
        img_size: Output size.
        padding: Zero padding on each side before the random crop.
        hflip: Chance of a left-right flip.
        auto_augment: Optional auto-augment string (see :func:`create_auto_augment`).
        interpolation: Interpolation of auto-augment geometric ops.
        mean: Per-channel mean subtracted from the 0..1 pixels.
        std: Per-channel std the pixels are then divided by.
        re_prob: Chance of erasing (ignored with the prefetcher, which erases on the device).
        re_scale: Range of the erased box's area, as a fraction of the image.
        re_ratio: Range of the erased box's aspect ratio.
        re_mode: Fill of the erased boxes ('const' = mean pixel).
        re_count: Most boxes erased in one image.
        use_prefetcher: Output a uint8 CHW tensor and leave normalization and erasing to timm's ``PrefetchLoader``.
    """
    tfl = [transforms.RandomCrop(_to_size(img_size), padding=padding, pad_if_needed=True)]
    if hflip > 0:
        tfl += [transforms.RandomHorizontalFlip(p=hflip)]
    if auto_augment:
        tfl += [create_auto_augment(auto_augment, img_size, mean=mean, interpolation=interpolation)]
    if use_prefetcher:
        tfl += [MaybePILToTensor()]
    else:
        tfl += [transforms.ToTensor(), transforms.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))]
        if re_prob > 0:
            tfl += [create_random_erasing(re_prob, re_scale, re_ratio, re_mode, re_count)]
    return transforms.Compose(tfl)


def transforms_cifar_eval(
        img_size: Size = 32,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        use_prefetcher: bool = False,
) -> transforms.Compose:
    """CIFAR eval transform: the full image (resize + center crop only if it is not ``img_size`` already)."""
    size = _to_size(img_size)
    tfl = [transforms.Resize(min(size)), transforms.CenterCrop(size)]
    if use_prefetcher:
        tfl += [MaybePILToTensor()]
    else:
        tfl += [transforms.ToTensor(), transforms.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))]
    return transforms.Compose(tfl)


def create_train_transform(
        input_size: Size,
        train_crop_mode: Optional[str] = None,
        auto_augment: Optional[str] = None,
        use_prefetcher: bool = False,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        interpolation: str = 'bilinear',
        hflip: float = 0.5,
        re_prob: float = 0.,
        re_mode: str = 'const',
        re_count: int = 1,
        padding: int = 4,
        re_scale: Optional[Tuple[float, float]] = None,
        re_ratio: Optional[Tuple[float, float]] = None,
        **kwargs,
) -> Callable:
    """Train transform for ``--train-crop-mode pad`` (CIFAR recipe) or timm's ImageNet pipeline.

    Args:
        input_size: (C, H, W), (H, W) or an int.
        train_crop_mode: 'pad' for the CIFAR recipe; otherwise passed to ``timm.data.create_transform``.
        auto_augment: timm ``--aa`` string or 'cifar10' / 'svhn' (torchvision policies, both pipelines).
        use_prefetcher: uint8 output, normalization and erasing done by timm's ``PrefetchLoader``.
        mean: Per-channel mean subtracted from the 0..1 pixels.
        std: Per-channel std the pixels are then divided by.
        interpolation: Interpolation (auto-augment ops; also resizing in timm's pipeline).
        hflip: Chance of a left-right flip.
        re_prob: Chance of erasing.
        re_mode: Fill of the erased boxes ('const', 'rand' or 'pixel').
        re_count: Most boxes erased in one image.
        padding: Crop padding of the 'pad' mode.
        re_scale: Random-erasing area range of the 'pad' mode (default ``CIFAR_RE_SCALE``); timm's default box
            (0.02, 1/3) elsewhere.
        re_ratio: Random-erasing aspect range of the 'pad' mode (default ``CIFAR_RE_RATIO``).
        **kwargs: Passed to ``timm.data.create_transform`` (scale, ratio, color_jitter, vflip, ...); ignored in
            'pad' mode, so a training script can pass the same arguments for both modes.
    """
    if train_crop_mode == 'pad':
        return transforms_cifar_train(
            img_size=input_size,
            padding=padding,
            hflip=hflip,
            auto_augment=auto_augment,
            interpolation=interpolation,
            mean=mean,
            std=std,
            re_prob=re_prob,
            re_scale=re_scale or CIFAR_RE_SCALE,
            re_ratio=re_ratio or CIFAR_RE_RATIO,
            re_mode=re_mode,
            re_count=re_count,
            use_prefetcher=use_prefetcher,
        )
    timm_kwargs = dict(
        is_training=True,
        train_crop_mode=train_crop_mode,
        use_prefetcher=use_prefetcher,
        mean=mean,
        std=std,
        interpolation=interpolation,
        hflip=hflip,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        **kwargs,
    )
    if auto_augment not in TV_AUTO_AUGMENT_POLICIES:
        return use_safe_posterize(create_transform(input_size, auto_augment=auto_augment, **timm_kwargs))
    # torchvision policy: insert it between timm's crop/flip and its tensor conversion; color jitter off, as timm
    # does when auto-augment is on
    timm_kwargs['color_jitter'] = None
    primary, secondary, final = create_transform(input_size, separate=True, **timm_kwargs)
    aa = create_auto_augment(auto_augment, input_size, mean=mean, interpolation=interpolation)
    return transforms.Compose([primary, aa, secondary, final])


def create_eval_transform(
        input_size: Size,
        train_crop_mode: Optional[str] = None,
        use_prefetcher: bool = False,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        interpolation: str = 'bilinear',
        crop_pct: Optional[float] = None,
        **kwargs,
) -> Callable:
    """Eval transform matching :func:`create_train_transform`.

    'pad' mode gives :func:`transforms_cifar_eval` (the whole 32x32 image, no ``crop_pct`` resize; ``crop_pct``,
    ``interpolation`` and ``kwargs`` are ignored); otherwise ``timm.data.create_transform(is_training=False, ...)``
    with ``crop_pct`` and ``kwargs`` (crop_mode, ...).
    """
    if train_crop_mode == 'pad':
        return transforms_cifar_eval(input_size, mean=mean, std=std, use_prefetcher=use_prefetcher)
    return create_transform(
        input_size,
        is_training=False,
        use_prefetcher=use_prefetcher,
        mean=mean,
        std=std,
        interpolation=interpolation,
        crop_pct=crop_pct,
        **kwargs,
    )


def eval_data_config(data_config: Dict[str, Any], train_crop_mode: Optional[str] = None) -> Dict[str, Any]:
    """What :func:`create_eval_transform` does to an image, as timm data-config keys (`input_size`, `interpolation`,
    `mean`, `std`, `crop_pct`, `crop_mode`): timm's eval loader given them prepares the image the same way.

    'pad' mode evaluates the whole image (resize to the input size, bilinear: ``crop_pct`` 1, ``crop_mode``
    'center'); the other modes use ``data_config``'s crop and interpolation.
    """
    out = {k: data_config.get(k) for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')}
    if train_crop_mode == 'pad':
        out.update(interpolation='bilinear', crop_pct=1.0, crop_mode='center')
    out['crop_mode'] = out['crop_mode'] or 'center'
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
