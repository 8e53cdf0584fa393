""" CIFAR ResNet, SE-ResNet, Wide ResNet and ResNeXt member backbones

The 32x32-input residual networks of the SplitNet CIFAR experiments as one timm-style model class, with one width
knob per family that SplitNet divides (`stem_width`, `widen_factor` or `cardinality`). See docs/models.md.

Papers:
* `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385
* `Identity Mappings in Deep Residual Networks` (ResNet-110/164 on CIFAR) - https://arxiv.org/abs/1603.05027
* `Wide Residual Networks` - https://arxiv.org/abs/1605.07146
* `Aggregated Residual Transformations for Deep Neural Networks` - https://arxiv.org/abs/1611.05431
* `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507
* `SplitNet: Divide and Co-training` - https://arxiv.org/abs/2011.14660
"""
from functools import partial
from typing import Any, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.layers import DropPath, LayerType, SEModule
from timm.models import build_model_with_cfg, register_model, generate_default_cfgs
from timm.models._manipulate import checkpoint_seq
from timm.models.resnet import BasicBlock, Bottleneck, downsample_avg

from ._cifar_common import CIFAR100_MEAN, CIFAR100_STD, CifarBackbone, cifar_cfg, init_weights_cifar

__all__ = ['CifarResNet', 'CIFAR100_MEAN', 'CIFAR100_STD']  # timm's @register_model appends the entrypoints

BlockType = Union[Type[BasicBlock], Type[Bottleneck]]


class CifarResNet(CifarBackbone):
    """ResNet for 32x32 inputs: 3x3 stem, three stages (strides 1, 2, 2), post-activation blocks.

    Stage planes are `channels`, or `stem_width * widen_factor * [1, 2, 4]` when `channels` is None; stage outputs
    are planes * block.expansion.
    """

    def __init__(
            self,
            block: BlockType,
            layers: Tuple[int, ...],
            num_classes: int = 100,
            in_chans: int = 3,
            stem_width: int = 16,
            widen_factor: int = 1,
            channels: Optional[Tuple[int, ...]] = None,
            cardinality: int = 1,
            base_width: int = 64,
            attn_layer: Optional[LayerType] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            block: Residual block class (timm's `BasicBlock` or `Bottleneck`).
            layers: Blocks per stage (three stages).
            num_classes: Size of the classifier output.
            in_chans: Channels of the input images.
            stem_width: Output channels of the stem conv (and base of the stage planes).
            widen_factor: Multiplier of the stage planes (WRN k); the stem is not widened.
            channels: Explicit stage planes, overrides `stem_width * widen_factor * [1, 2, 4]`.
            cardinality: Groups of the 3x3 conv in bottleneck blocks (ResNeXt).
            base_width: Bottleneck width per group, the 3x3 conv width is planes * base_width / 64 * cardinality.
            attn_layer: Attention module after the last BN of each block (e.g. SE), None for none.
            act_layer: Activation module class.
            norm_layer: Norm module class (BatchNorm2d).
            global_pool: Pool type of the head, e.g. 'avg', 'max' or 'avgmax'.
            drop_rate: Dropout probability of the pooled features, in front of the classifier.
            drop_path_rate: Drop-path probability of the last block; it grows linearly from 0 at the first block.
            zero_init_last: Start every block's last BN at a zero scale, so each residual branch first adds nothing.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        if channels is None:
            channels = tuple(int(stem_width * widen_factor * 2 ** i) for i in range(len(layers)))
        assert len(channels) == len(layers)

        # Stem
        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(stem_width, **dd)
        self.act1 = act_layer(inplace=True)
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='act1')]
        self.feature_levels = [('conv1', 'bn1', 'act1')]

        # Stages
        inplanes = stem_width
        net_num_blocks = sum(layers)
        net_block_idx = 0
        net_stride = 1
        for stage_idx, (planes, num_blocks) in enumerate(zip(channels, layers)):
            stride = 1 if stage_idx == 0 else 2
            net_stride *= stride
            outplanes = planes * block.expansion
            blocks = []
            for block_idx in range(num_blocks):
                block_stride = stride if block_idx == 0 else 1
                downsample = None
                if block_stride != 1 or inplanes != outplanes:
                    downsample = downsample_avg(inplanes, outplanes, kernel_size=1, stride=block_stride, **dd)
                dpr = drop_path_rate * net_block_idx / max(net_num_blocks - 1, 1)
                blocks.append(block(
                    inplanes,
                    planes,
                    stride=block_stride,
                    downsample=downsample,
                    cardinality=cardinality,
                    base_width=base_width,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    attn_layer=attn_layer,
                    drop_path=DropPath(dpr) if dpr > 0. else None,
                    **dd,
                ))
                inplanes = outplanes
                net_block_idx += 1
            stage_name = f'layer{stage_idx + 1}'
            self.add_module(stage_name, nn.Sequential(*blocks))
            self.feature_info += [dict(num_chs=outplanes, reduction=net_stride, module=stage_name)]
            self.feature_levels += [(stage_name,)]

        # classifier head: global pool, dropout, linear
        self._init_head(inplanes, global_pool=global_pool, drop_rate=drop_rate, **dd)

        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """Kaiming (fan_out) convs, BN weight 1 / bias 0, fc N(0, 1e-3), optionally zero-init the last BN of blocks.

        Args:
            zero_init_last: Set the scale of every block's last BN to zero (residual branches start at zero).
        """
        init_weights_cifar(self, linear_std=1e-3)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups (stem, blocks) for layer-wise optimizer settings."""
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages, returns the unpooled NCHW feature map."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
        return x


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)), **kwargs)


default_cfgs = generate_default_cfgs({
    'resnet110_cifar': cifar_cfg(),
    'resnet164_cifar': cifar_cfg(),
    'seresnet110_cifar': cifar_cfg(),
    'seresnet164_cifar': cifar_cfg(),
    'wrn16_8_cifar': cifar_cfg(),
    'wrn28_10_cifar': cifar_cfg(),
    'wrn40_10_cifar': cifar_cfg(),
    'resnext29_8x64d_cifar': cifar_cfg(),
})

# SE for the CIFAR SE-ResNets: reduction ratio 4 without channel rounding (SplitNet keeps it for every S)
_se_cifar = partial(SEModule, rd_ratio=1. / 4, rd_divisor=1)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 (bottleneck, 12 blocks per stage) for CIFAR, divided by `stem_width` (16 / 12 / 8 for S=1/2/4)."""
    model_args = dict(block=Bottleneck, layers=(12, 12, 12), stem_width=16)
    return _create_cifar_resnet('resnet110_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet164_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-164 (bottleneck, 18 blocks per stage) for CIFAR, divided by `stem_width` (16 / 12 / 8 for S=1/2/4)."""
    model_args = dict(block=Bottleneck, layers=(18, 18, 18), stem_width=16)
    return _create_cifar_resnet('resnet164_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def seresnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """SE-ResNet-110 (SE reduction 4, no zero-init of the last BN) for CIFAR, divided by `stem_width`."""
    model_args = dict(
        block=Bottleneck, layers=(12, 12, 12), stem_width=16, attn_layer=_se_cifar, zero_init_last=False)
    return _create_cifar_resnet('seresnet110_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def seresnet164_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """SE-ResNet-164 (SE reduction 4, no zero-init of the last BN) for CIFAR, divided by `stem_width`."""
    model_args = dict(
        block=Bottleneck, layers=(18, 18, 18), stem_width=16, attn_layer=_se_cifar, zero_init_last=False)
    return _create_cifar_resnet('seresnet164_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_8_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """WRN-16-8 (post-activation basic blocks) for CIFAR, divided by `widen_factor` (8 / 6 / 4 for S=1/2/4)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2), stem_width=16, widen_factor=8)
    return _create_cifar_resnet('wrn16_8_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn28_10_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """WRN-28-10 (post-activation basic blocks) for CIFAR, divided by `widen_factor` (10 / 7 / 5 for S=1/2/4)."""
    model_args = dict(block=BasicBlock, layers=(4, 4, 4), stem_width=16, widen_factor=10)
    return _create_cifar_resnet('wrn28_10_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn40_10_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """WRN-40-10 (post-activation basic blocks, fc dropout 0.1) for CIFAR, divided by `widen_factor` (10 / 7 / 5).
    """
    model_args = dict(block=BasicBlock, layers=(6, 6, 6), stem_width=16, widen_factor=10, drop_rate=0.1)
    return _create_cifar_resnet('wrn40_10_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def resnext29_8x64d_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNeXt-29 8x64d for CIFAR (stem 64, 64 channels per group), divided by `cardinality` (8 / 4 / 2)."""
    model_args = dict(block=Bottleneck, layers=(3, 3, 3), stem_width=64, cardinality=8, base_width=64)
    return _create_cifar_resnet('resnext29_8x64d_cifar', pretrained, **dict(model_args, **kwargs))
