""" EfficientNet member backbones with a channel table (plain timm models, not SplitNets)

`efficientnet_b0_cifar`, `efficientnet_b3_cifar` and `efficientnet_b7_splitnet`: timm's `EfficientNet` whose widths
come from a table [stem, 7 stage outputs, head], so that a SplitNet member can take the divided table of the paper's
Appendix A (`division.EFFICIENTNET_CHANNELS`). The CIFAR variants use stride 1 in the stem and two stages. See
docs/models.md.

Papers:
* `EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks` - https://arxiv.org/abs/1905.11946
* `SplitNet: Divide and Co-training` - https://arxiv.org/abs/2011.14660
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Union

import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_conv2d
from timm.models import build_model_with_cfg, register_model, generate_default_cfgs
from timm.models._efficientnet_builder import (
    decode_arch_def, efficientnet_init_weights, resolve_act_layer, resolve_bn_args, round_channels)
from timm.models.efficientnet import EfficientNet

from .division import EFFICIENTNET_CHANNELS
from ._cifar_common import cifar_cfg, reset_classifier_head

__all__ = ['SplitNetEfficientNet', 'EFFICIENTNET_B0_CHANNELS']  # timm's @register_model appends the entrypoints

# undivided EfficientNet-B0 widths: [stem, 7 stage outputs, head] (the S=1 row of the division tables)
EFFICIENTNET_B0_CHANNELS = EFFICIENTNET_CHANNELS[1]

# standard B0 stages: (block type, repeats, kernel size, stride, expansion ratio), SE ratio 0.25 everywhere
_B0_STAGES = (
    ('ds', 1, 3, 1, 1),
    ('ir', 2, 3, 2, 6),
    ('ir', 2, 5, 2, 6),
    ('ir', 3, 3, 2, 6),
    ('ir', 3, 5, 1, 6),
    ('ir', 4, 5, 2, 6),
    ('ir', 1, 3, 1, 6),
)
_IMAGENET_STRIDES = tuple(s[3] for s in _B0_STAGES)  # (1, 2, 2, 2, 1, 2, 1)
_CIFAR_STRIDES = (1, 2, 1, 2, 1, 1, 1)  # stride 1 in the 40 and 192 channel stages (paper: "stage 4 & 7")


def _arch_def(stage_channels: Sequence[int], stage_strides: Sequence[int]) -> List[List[str]]:
    """B0 block strings with the output channels of `stage_channels[1:8]` and the given stage strides."""
    assert len(stage_channels) == 9, 'stage_channels must be [stem, 7 stage outputs, head]'
    assert len(stage_strides) == 7
    arch_def = []
    for (block, repeats, kernel, _, exp), stride, chs in zip(_B0_STAGES, stage_strides, stage_channels[1:8]):
        arch_def.append([f'{block}_r{repeats}_k{kernel}_s{stride}_e{exp}_c{int(chs)}_se0.25'])
    return arch_def


class SplitNetEfficientNet(EfficientNet):
    """timm's `EfficientNet` with a configurable stem stride (1 for 32x32 CIFAR inputs).

    `reset_classifier(num_classes, global_pool=None)` keeps the current pooling on every timm version.
    """

    def __init__(
            self,
            block_args: Any,
            stem_stride: int = 2,
            **kwargs,
    ) -> None:
        """
        Args:
            block_args: Decoded block arguments (`decode_arch_def`).
            stem_stride: Stride of the stem conv.
            **kwargs: `EfficientNet` arguments.
        """
        super().__init__(block_args, **kwargs)
        self.stem_stride = stem_stride
        if stem_stride != 2:
            conv = self.conv_stem
            self.conv_stem = create_conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size[0],
                stride=stem_stride,
                padding=kwargs.get('pad_type', ''),
                device=conv.weight.device,
                dtype=conv.weight.dtype,
            )
            efficientnet_init_weights(self.conv_stem)
            for info in self.feature_info:
                info['reduction'] = info['reduction'] * stem_stride // 2

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier head.

        Args:
            num_classes: Outputs of the new classifier; 0 leaves an identity (pooled features out).
            global_pool: Pool type of the new head; None keeps the present one.
        """
        reset_classifier_head(self, num_classes, global_pool, classifier_attr='classifier')
        self.global_pool.train(self.training)
        self.classifier.train(self.training)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
            extra_blocks: bool = False,
    ) -> List[int]:
        """timm's pruning, plus what timm < 1.0.31 misses: drop `conv_head` / `bn2` once the blocks are truncated.

        Args:
            indices: Indices of the levels to keep.
            prune_norm: Also remove the final norm (`bn2`).
            prune_head: Also remove the classifier.
            extra_blocks: Index every block instead of the stage ends.

        Returns:
            The kept indices.
        """
        num_blocks = len(self.blocks)
        take_indices = super().prune_intermediate_layers(
            indices, prune_norm=prune_norm, prune_head=prune_head, extra_blocks=extra_blocks)
        if len(self.blocks) < num_blocks or prune_norm or prune_head:
            self.conv_head = nn.Identity()
            self.bn2 = nn.Identity()
            if not extra_blocks and take_indices:
                self.num_features = self.head_hidden_size = self.feature_info[max(take_indices)]['num_chs']
        return take_indices


def _gen_splitnet_efficientnet(
        variant: str,
        channel_multiplier: float = 1.0,
        depth_multiplier: float = 1.0,
        stage_channels: Sequence[int] = EFFICIENTNET_B0_CHANNELS,
        channel_divisor: int = 8,
        stage_strides: Sequence[int] = _IMAGENET_STRIDES,
        stem_stride: int = 2,
        pretrained: bool = False,
        **kwargs,
) -> SplitNetEfficientNet:
    """Build an EfficientNet from a channel table.

    Args:
        variant: Model name (pretrained cfg key).
        channel_multiplier: Width multiplier of the variant, applied to every entry of `stage_channels`.
        depth_multiplier: Depth multiplier of the variant, applied to the B0 repeats (ceil).
        stage_channels: [stem, 7 stage outputs, head] before the width multiplier.
        channel_divisor: Channels are rounded to multiples of this.
        stage_strides: Stride of each of the 7 stages.
        stem_stride: Stride of the stem conv.
        pretrained: Load the weights named by the variant's pretrained cfg.
        **kwargs: `EfficientNet` arguments (num_classes, drop_rate, drop_path_rate, bn_eps, ...).
    """
    round_chs_fn = partial(round_channels, multiplier=channel_multiplier, divisor=channel_divisor)
    model_kwargs = dict(
        block_args=decode_arch_def(_arch_def(stage_channels, stage_strides), depth_multiplier),
        num_features=round_chs_fn(stage_channels[8]),
        stem_size=stage_channels[0],
        stem_stride=stem_stride,
        round_chs_fn=round_chs_fn,
        act_layer=resolve_act_layer(kwargs, 'swish'),
        norm_layer=kwargs.pop('norm_layer', None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        **kwargs,
    )
    # one feature level at the end of the last stage before each stride-2 stage, and at the end of the network
    num_feature_levels = sum(s > 1 for s in stage_strides) + 1
    return build_model_with_cfg(
        SplitNetEfficientNet,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(num_feature_levels))),
        **model_kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    imagenet = dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return _cifar_cfg(url, **{**imagenet, **kwargs})  # the CIFAR cfg's keys, with ImageNet values


def _cifar_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return cifar_cfg(url, first_conv='conv_stem', classifier='classifier', **kwargs)


default_cfgs = generate_default_cfgs({
    'efficientnet_b0_cifar': _cifar_cfg(),
    'efficientnet_b3_cifar': _cifar_cfg(),
    'efficientnet_b7_splitnet': _cfg(),
})


@register_model
def efficientnet_b0_cifar(pretrained: bool = False, **kwargs) -> SplitNetEfficientNet:
    """EfficientNet-B0 for CIFAR (stride 1 stem, stages 3 & 6), channels from `stage_channels`/`channel_divisor`."""
    model_args = dict(
        stage_channels=EFFICIENTNET_B0_CHANNELS, channel_divisor=8, stage_strides=_CIFAR_STRIDES, stem_stride=1,
        drop_rate=0.2)
    return _gen_splitnet_efficientnet(
        'efficientnet_b0_cifar', channel_multiplier=1.0, depth_multiplier=1.0, pretrained=pretrained,
        **dict(model_args, **kwargs))


@register_model
def efficientnet_b3_cifar(pretrained: bool = False, **kwargs) -> SplitNetEfficientNet:
    """EfficientNet-B3 for CIFAR (stride 1 stem, stages 3 & 6), channels from `stage_channels`/`channel_divisor`."""
    model_args = dict(
        stage_channels=EFFICIENTNET_B0_CHANNELS, channel_divisor=8, stage_strides=_CIFAR_STRIDES, stem_stride=1,
        drop_rate=0.3)
    return _gen_splitnet_efficientnet(
        'efficientnet_b3_cifar', channel_multiplier=1.2, depth_multiplier=1.4, pretrained=pretrained,
        **dict(model_args, **kwargs))


@register_model
def efficientnet_b7_splitnet(pretrained: bool = False, **kwargs) -> SplitNetEfficientNet:
    """EfficientNet-B7 (ImageNet) with channels from `stage_channels`/`channel_divisor` (default: timm's B7)."""
    model_args = dict(stage_channels=EFFICIENTNET_B0_CHANNELS, channel_divisor=8, drop_rate=0.5)
    return _gen_splitnet_efficientnet(
        'efficientnet_b7_splitnet', channel_multiplier=2.0, depth_multiplier=3.1, pretrained=pretrained,
        **dict(model_args, **kwargs))
