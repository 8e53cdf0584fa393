""" CIFAR DenseNet-BC member backbone

DenseNet-BC-190 (k=40) for 32x32 inputs with timm's dense layers and transitions; SplitNet divides the growth rate k.
See docs/models.md.

Papers:
* `Densely Connected Convolutional Networks` - https://arxiv.org/abs/1608.06993
* `Memory-Efficient Implementation of DenseNets` - https://arxiv.org/abs/1707.06990
* `SplitNet: Divide and Co-training` - https://arxiv.org/abs/2011.14660
"""
import math
from collections import OrderedDict
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from timm.layers import get_norm_act_layer
from timm.models import build_model_with_cfg, register_model, generate_default_cfgs
from timm.models._manipulate import MATCH_PREV_GROUP
from timm.models.densenet import DenseBlock, DenseLayer, DenseTransition

from ._cifar_common import CifarBackbone, cifar_cfg, init_weights_cifar

__all__ = ['CifarDenseNet']  # timm's @register_model appends the entrypoints


class CifarDenseNet(CifarBackbone):
    """DenseNet-BC for 32x32 inputs (3x3 stride-1 stem, three dense blocks, 8x8 final maps)."""
    classifier_attr = 'classifier'

    def __init__(
            self,
            growth_rate: int = 40,
            block_config: Tuple[int, ...] = (31, 31, 31),
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            bn_size: int = 4,
            compression: float = 0.5,
            act_layer: str = 'relu',
            norm_layer: str = 'batchnorm2d',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            memory_efficient: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            growth_rate: Channels added by each dense layer (k).
            block_config: Dense layers per block (three blocks).
            num_classes: Size of the classifier output.
            in_chans: Channels of the input images.
            global_pool: Pool type of the head, e.g. 'avg', 'max' or 'avgmax'.
            bn_size: Bottleneck width multiplier (the 1x1 conv outputs bn_size * k channels).
            compression: Channel reduction of the transitions (DenseNet-BC: 0.5).
            act_layer: Activation name, fused with the norm into one timm norm-act module.
            norm_layer: Norm name (e.g. 'batchnorm2d') of that norm-act module.
            drop_rate: Dropout probability of the pooled features, in front of the classifier.
            proj_drop_rate: Dropout probability of the k new channels of every dense layer.
            drop_path_rate: Not supported (DenseNet has no residual branches), must be 0.
            memory_efficient: Checkpoint the concatenation + bottleneck of each dense layer.
        """
        super().__init__()
        if drop_path_rate:
            raise ValueError('CifarDenseNet has no residual branches, drop_path_rate must be 0.')
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer=act_layer)

        # Stem
        num_features = 2 * growth_rate
        self.features = nn.Sequential(OrderedDict([
            ('conv0', nn.Conv2d(in_chans, num_features, kernel_size=3, stride=1, padding=1, bias=False, **dd)),
            ('norm0', norm_act_layer(num_features, **dd)),
        ]))
        self.feature_info = [dict(num_chs=num_features, reduction=1, module='features.norm0')]
        self.feature_levels = [('features.conv0', 'features.norm0')]

        # Dense blocks and transitions
        current_stride = 1
        block_kwargs = dict(
            bn_size=bn_size, growth_rate=growth_rate, norm_layer=norm_act_layer, drop_rate=proj_drop_rate,
            grad_checkpointing=memory_efficient, **dd)
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers=num_layers, num_input_features=num_features, **block_kwargs)
            module_name = f'denseblock{i + 1}'
            self.features.add_module(module_name, block)
            level = ([f'features.transition{i}'] if i else []) + ['features.' + module_name]
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                self.feature_info += [
                    dict(num_chs=num_features, reduction=current_stride, module='features.' + module_name)]
                self.feature_levels += [tuple(level)]
                current_stride *= 2
                num_out_features = int(math.floor(num_features * compression))
                trans = DenseTransition(
                    num_input_features=num_features,
                    num_output_features=num_out_features,
                    norm_layer=norm_act_layer,
                    **dd,
                )
                self.features.add_module(f'transition{i + 1}', trans)
                num_features = num_out_features

        # Final BN-ReLU
        self.features.add_module('norm_final', norm_act_layer(num_features, **dd))
        self.feature_info += [dict(num_chs=num_features, reduction=current_stride, module='features.norm_final')]
        self.feature_levels += [tuple(level) + ('features.norm_final',)]  # the last level ends with the final norm

        # classifier head: global pool, dropout, linear
        self._init_head(num_features, global_pool=global_pool, drop_rate=drop_rate, **dd)

        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Kaiming (fan_out) convs, BN weight 1 / bias 0, classifier bias 0."""
        init_weights_cifar(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups (stem, blocks) for layer-wise optimizer settings."""
        return dict(
            stem=r'^features\.conv0|features\.norm0',
            blocks=r'^features\.(?:denseblock|transition)(\d+)' if coarse else [
                (r'^features\.denseblock(\d+)\.denselayer(\d+)', None),
                (r'^features\.transition(\d+)', MATCH_PREV_GROUP),
                (r'^features\.norm_final', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Switch the memory-efficient mode of every dense layer on or off (its concat + bottleneck recomputed)."""
        for m in self.features.modules():
            if isinstance(m, DenseLayer):
                m.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, dense blocks and final BN-ReLU, returns the unpooled NCHW feature map."""
        return self.features(x)


def _create_cifar_densenet(variant: str, pretrained: bool = False, **kwargs) -> CifarDenseNet:
    return build_model_with_cfg(
        CifarDenseNet,
        variant,
        pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    'densenet_bc190_cifar': cifar_cfg(first_conv='features.conv0', classifier='classifier'),
})


@register_model
def densenet_bc190_cifar(pretrained: bool = False, **kwargs) -> CifarDenseNet:
    """DenseNet-BC-190 (k=40) for CIFAR, divided by `growth_rate` (40 / 28 / 20 for S=1/2/4)."""
    model_args = dict(growth_rate=40, block_config=(31, 31, 31), bn_size=4, compression=0.5)
    return _create_cifar_densenet('densenet_bc190_cifar', pretrained, **dict(model_args, **kwargs))
