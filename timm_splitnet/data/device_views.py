""" Multi-view augmentation on the training device

With `--views-on-device` every image is decoded once on the CPU (:func:`create_decode_transform`: a fixed-size uint8
tensor, no random op) and :class:`DeviceViewAugment` makes the S views of a batch as batched tensor ops on the
training device: random crop with padding (CIFAR) or random-resized crop (timm's scale / ratio), flips, random erasing
(timm's semantics, per view) and normalisation. Every sample and view draws independently from a `torch.Generator`
seeded by the run's seed, rank and epoch. The output is the split-major `[S * B, C, H, W]` batch of the CPU path, so
Mixup / CutMix (shared by the views) and the co-training task are unchanged. AutoAugment / RandAugment and colour
jitter stay on the CPU path. See docs/data.md.
"""
import math
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torchvision import transforms

from timm.data.transforms import MaybePILToTensor

from .transforms import CIFAR_RE_RATIO, CIFAR_RE_SCALE

__all__ = ['DeviceViewAugment', 'DeviceViewLoader', 'create_decode_transform', 'device_view_seed']

_ATTEMPTS = 10  # tries of a random-resized crop / erasing box, as torchvision and timm


def device_view_seed(seed: int, epoch: int = 0, rank: int = 0) -> int:
    """The generator seed of an epoch of one process (distinct streams per seed, epoch and rank)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank) * 104_729) % (2 ** 63)


def create_decode_transform(
        input_size: Union[int, Sequence[int]],
        crop_mode: str = 'pad',
        source_crop_pct: float = 0.875,
) -> transforms.Compose:
    """CPU half of `--views-on-device`: a PIL image to a fixed-size uint8 ``[3, H, W]`` tensor (no random op).

    'pad': the image resized (shorter side) and center-cropped to the input size (a CIFAR image passes unchanged);
    'rrc': to a square of ``input_size / source_crop_pct`` (256 px for 224), from which the device draws its crops.
    """
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size[-2:])
    if crop_mode == 'rrc':
        size = tuple(int(math.ceil(s / source_crop_pct)) for s in size)
    elif crop_mode != 'pad':
        raise ValueError(f'views on the device support crop modes pad and rrc, not {crop_mode!r}.')
    return transforms.Compose([transforms.Resize(min(size)), transforms.CenterCrop(size), MaybePILToTensor()])


class DeviceViewAugment:
    """S augmented views of a uint8 image batch, made with batched tensor ops on the batch's device.

    ``augment(images)`` takes ``[B, C, H0, W0]`` (uint8, or float in 0..255) and returns normalised float32 views
    ``[S * B, C, H, W]``, split-major (row ``i + s * B`` is view s of sample i), as timm's ``fast_collate`` stacks a
    :class:`MultiViewDataset` batch. ``sample_params`` / ``apply`` split the draws from the pixel work (tests check
    the draws' distributions).

    * 'pad': crop offsets uniform over the zero-padded image (``RandomCrop(size, padding)``, padding in black);
    * 'rrc': timm's / torchvision's ``RandomResizedCrop`` box (area in ``scale``, log-uniform aspect in ``ratio``,
      ten tries then a center crop), resampled bilinearly with ``grid_sample``;
    * flips with ``hflip`` / ``vflip`` probability; random erasing as timm's ``RandomErasing`` after normalisation
      (``re_prob`` per view, up to ``re_count`` boxes, fill 'const' 0 / 'rand' / 'pixel' normal).
    """

    def __init__(
            self,
            num_views: int,
            input_size: Union[int, Sequence[int]],
            crop_mode: str = 'pad',
            padding: int = 4,
            scale: Sequence[float] = (0.08, 1.0),
            ratio: Sequence[float] = (3. / 4., 4. / 3.),
            hflip: float = 0.5,
            vflip: float = 0.,
            re_prob: float = 0.,
            re_mode: str = 'const',
            re_count: int = 1,
            re_scale: Optional[Sequence[float]] = None,
            re_ratio: Optional[Sequence[float]] = None,
            mean: Sequence[float] = (0.485, 0.456, 0.406),
            std: Sequence[float] = (0.229, 0.224, 0.225),
            seed: int = 0,
    ):
        """
        Args:
            num_views: Views per image S (1: one view, shared by all members).
            input_size: Output size, an int or (..., H, W).
            crop_mode: 'pad' (CIFAR) or 'rrc' (random-resized crop).
            padding: Zero padding on each side ('pad').
            scale: Area fraction range of the crop ('rrc').
            ratio: Aspect ratio range of the crop ('rrc').
            hflip: Chance of a left-right flip.
            vflip: Chance of an upside-down flip.
            re_prob: Chance that a view is erased, drawn for every view.
            re_mode: Erasing fill: 'const' (0 after normalisation), 'rand' (normal per box), 'pixel' (per pixel).
            re_count: Largest number of boxes (drawn uniformly in 1..re_count).
            re_scale: Box area fraction range (default: CIFAR's box in 'pad' mode, timm's (0.02, 1/3) else).
            re_ratio: Box aspect range (default: CIFAR's in 'pad' mode, timm's (0.3, 1/0.3) else).
            mean: Normalisation mean (of 0..1 pixels).
            std: Normalisation std.
            seed: Seed of the generator (see `set_epoch`).

        Raises:
            ValueError: A bad number of views, crop mode or erasing mode.
        """
        if num_views < 1:
            raise ValueError(f'num_views must be >= 1, got {num_views}.')
        if crop_mode not in ('pad', 'rrc'):
            raise ValueError(f'views on the device support crop modes pad and rrc, not {crop_mode!r}.')
        if re_mode not in ('const', 'rand', 'pixel', ''):
            raise ValueError(f'unknown random-erasing mode {re_mode!r} (const, rand, pixel).')
        self.num_views = num_views
        self.size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size[-2:])
        self.crop_mode = crop_mode
        self.padding = int(padding)
        self.scale = tuple(scale)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.hflip = hflip
        self.vflip = vflip
        self.re_prob = re_prob
        self.re_mode = re_mode or 'const'
        self.re_count = max(1, int(re_count))
        pad = crop_mode == 'pad'
        self.re_scale = tuple(re_scale or (CIFAR_RE_SCALE if pad else (0.02, 1 / 3)))
        re_ratio = tuple(re_ratio or (CIFAR_RE_RATIO if pad else (0.3, 1 / 0.3)))
        self.re_log_ratio = (math.log(re_ratio[0]), math.log(re_ratio[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = seed
        self._seed_value = device_view_seed(seed)
        self._generators: Dict[torch.device, torch.Generator] = {}

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Restart the random stream at the seed of (seed, epoch, rank): an epoch's views do not depend on the last."""
        self._seed_value = device_view_seed(self.seed, epoch, rank)
        self._generators.clear()

    def generator(self, device: Union[str, torch.device]) -> torch.Generator:
        """The generator of `device` (created at the current seed on first use)."""
        device = torch.device(device)
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', torch.cuda.current_device())
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed_value)
        return self._generators[device]

    # ----- draws -----

    def _rand(self, shape: Tuple[int, ...], g: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, generator=g, device=g.device)

    def _randint_upto(self, high: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Uniform integers in 0..high (inclusive), elementwise."""
        return (self._rand(tuple(high.shape), g) * (high + 1)).floor().clamp_(max=high).long()

    def _first_valid(self, valid: torch.Tensor, *values: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(any valid, values at the first valid try) over the last dim."""
        first = valid.int().argmax(-1, keepdim=True)
        return (valid.any(-1),) + tuple(v.gather(-1, first).squeeze(-1) for v in values)

    def _crop_params(self, n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
        """[n, 4] crop boxes (top, left, h, w) in source pixels ('pad': in the padded image)."""
        out_h, out_w = self.size
        if self.crop_mode == 'pad':
            p = self.padding
            top = self._randint_upto(torch.full((n,), height + 2 * p - out_h, device=g.device), g)
            left = self._randint_upto(torch.full((n,), width + 2 * p - out_w, device=g.device), g)
            return torch.stack([top, left, torch.full_like(top, out_h), torch.full_like(top, out_w)], 1)
        area = height * width
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * self._rand((n, _ATTEMPTS), g))
        aspect = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * self._rand((n, _ATTEMPTS), g))
        w = torch.sqrt(target * aspect).round().long()
        h = torch.sqrt(target / aspect).round().long()
        valid = (w > 0) & (h > 0) & (w <= width) & (h <= height)
        ok, h, w = self._first_valid(valid, h, w)
        # fallback of torchvision: the largest center crop within the ratio range
        in_ratio = width / height
        lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        if in_ratio < lo:
            fb_w, fb_h = width, int(round(width / lo))
        elif in_ratio > hi:
            fb_h, fb_w = height, int(round(height * hi))
        else:
            fb_w, fb_h = width, height
        h = torch.where(ok, h, torch.full_like(h, fb_h))
        w = torch.where(ok, w, torch.full_like(w, fb_w))
        top = torch.where(ok, self._randint_upto(height - h, g), (height - h) // 2)
        left = torch.where(ok, self._randint_upto(width - w, g), (width - w) // 2)
        return torch.stack([top, left, h, w], 1)

    def _erase_params(self, n: int, g: torch.Generator) -> torch.Tensor:
        """[n, re_count, 4] erasing boxes (top, left, h, w) in output pixels; h = w = 0 where none is erased."""
        height, width = self.size
        k = self.re_count
        boxes = torch.zeros((n, k, 4), dtype=torch.long, device=g.device)
        if self.re_prob <= 0:
            return boxes
        erase = self._rand((n,), g) < self.re_prob
        count = 1 + (self._rand((n,), g) * k).floor().clamp_(max=k - 1).long()
        for i in range(k):
            frac = self.re_scale[0] + (self.re_scale[1] - self.re_scale[0]) * self._rand((n, _ATTEMPTS), g)
            target = frac * (height * width) / count[:, None]
            log_aspect = self.re_log_ratio[0] + (self.re_log_ratio[1] - self.re_log_ratio[0]) * self._rand(
                (n, _ATTEMPTS), g)
            aspect = torch.exp(log_aspect)
            h = torch.sqrt(target * aspect).round().long()
            w = torch.sqrt(target / aspect).round().long()
            ok, h, w = self._first_valid((w < width) & (h < height), h, w)
            top = self._randint_upto(height - h, g)
            left = self._randint_upto(width - w, g)
            ok = ok & erase & (i < count)
            boxes[:, i] = torch.stack([top, left, h, w], 1) * ok[:, None]
        return boxes

    def sample_params(self, batch_size: int, source_hw: Tuple[int, int], device: Union[str, torch.device]
                      ) -> Dict[str, torch.Tensor]:
        """The draws of one batch: per view row (split-major, ``S * batch_size`` rows) `sample` (its image),
        `crop` [N, 4], `hflip` / `vflip` [N] and `erase` [N, re_count, 4]."""
        g = self.generator(device)
        n = batch_size * self.num_views
        return dict(
            sample=torch.arange(batch_size, device=g.device).repeat(self.num_views),
            crop=self._crop_params(n, source_hw[0], source_hw[1], g),
            hflip=self._rand((n,), g) < self.hflip,
            vflip=self._rand((n,), g) < self.vflip,
            erase=self._erase_params(n, g),
        )

    # ----- pixels -----

    def _crop_pad(self, images: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        out_h, out_w = self.size
        p = self.padding
        padded = F.pad(images, (p, p, p, p)) if p else images
        crop = params['crop']
        ys = torch.arange(out_h, device=images.device)
        xs = torch.arange(out_w, device=images.device)
        ys = torch.where(params['vflip'][:, None], out_h - 1 - ys, ys) + crop[:, :1]
        xs = torch.where(params['hflip'][:, None], out_w - 1 - xs, xs) + crop[:, 1:2]
        rows = params['sample'][:, None, None]
        out = padded[rows, :, ys[:, :, None], xs[:, None, :]]  # [N, H, W, C]
        return out.permute(0, 3, 1, 2)

    def _crop_resize(self, images: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        height, width = images.shape[-2:]
        top, left, h, w = params['crop'].to(torch.float32).unbind(1)
        sx = torch.where(params['hflip'], -w, w) / width
        sy = torch.where(params['vflip'], -h, h) / height
        theta = torch.zeros((top.shape[0], 2, 3), device=images.device)
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = sy
        theta[:, 1, 2] = (2 * top + h) / height - 1
        grid = F.affine_grid(theta, [top.shape[0], images.shape[1], *self.size], align_corners=False)
        return F.grid_sample(images[params['sample']], grid, mode='bilinear', padding_mode='border',
                             align_corners=False)

    def _erase(self, x: torch.Tensor, boxes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c, height, width = x.shape
        ys = torch.arange(height, device=x.device)[None, :, None]
        xs = torch.arange(width, device=x.device)[None, None, :]
        for i in range(boxes.shape[1]):
            top, left, h, w = (v[:, None, None] for v in boxes[:, i].unbind(1))
            mask = ((ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w))[:, None]
            if self.re_mode == 'pixel':
                fill = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype)
            elif self.re_mode == 'rand':
                fill = torch.randn((n, c, 1, 1), generator=g, device=g.device, dtype=x.dtype)
            else:
                fill = x.new_zeros(())
            x = torch.where(mask, fill, x)
        return x

    def apply(self, images: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The views of `images` ``[B, C, H0, W0]`` (0..255) for the draws `params`: normalised ``[N, C, H, W]``."""
        x = images.to(torch.float32)
        x = self._crop_pad(x, params) if self.crop_mode == 'pad' else self._crop_resize(x, params)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1) * 255
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1) * 255
        x = (x - mean) / std
        if self.re_prob > 0:
            x = self._erase(x, params['erase'], self.generator(images.device))
        return x.contiguous()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f'expected an image batch [B, C, H, W], got shape {tuple(images.shape)}.')
        params = self.sample_params(images.shape[0], tuple(images.shape[-2:]), images.device)
        return self.apply(images, params)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_views={self.num_views}, size={self.size}, crop_mode={self.crop_mode}, '
                f'hflip={self.hflip}, vflip={self.vflip}, re_prob={self.re_prob}, re_mode={self.re_mode})')


class DeviceViewLoader:
    """A loader of decoded uint8 batches whose iterator yields the device views ``[S * B, C, H, W]`` and targets.

    Wraps a plain (no prefetcher) timm / torch loader over a data set with :func:`create_decode_transform`; batches
    are copied to `device` (non-blocking: pin the loader's memory) and augmented there. `dataset`, `sampler` and
    ``len()`` are those of the wrapped loader; `set_epoch` re-seeds the augmentation.
    """

    def __init__(self, loader: Any, augment: DeviceViewAugment, device: Union[str, torch.device], rank: int = 0):
        self.loader = loader
        self.augment = augment
        self.device = torch.device(device)
        self.rank = rank

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def set_epoch(self, epoch: int) -> None:
        """Seed the views of `epoch` (call before iterating it, as a sampler's `set_epoch`)."""
        self.augment.set_epoch(epoch, self.rank)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for images, target in self.loader:
            images = images.to(self.device, non_blocking=True)
            target = target.to(self.device, non_blocking=True)
            yield self.augment(images), target
