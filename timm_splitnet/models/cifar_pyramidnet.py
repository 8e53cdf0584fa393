""" CIFAR PyramidNet with ShakeDrop member backbone

Bottleneck PyramidNet-272 (alpha 200) for 32x32 inputs with ShakeDrop on every residual branch; SplitNet divides
alpha and the ShakeDrop probability by sqrt(S). See docs/models.md.

Papers:
* `Deep Pyramidal Residual Networks` - https://arxiv.org/abs/1610.02915
* `ShakeDrop Regularization for Deep Residual Learning` - https://arxiv.org/abs/1802.02375
* `SplitNet: Divide and Co-training` - https://arxiv.org/abs/2011.14660
"""
from typing import Any, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath
from timm.models import build_model_with_cfg, register_model, generate_default_cfgs
from timm.models._manipulate import checkpoint_seq

from ._backends import register_per_member_module
from ._cifar_common import CifarBackbone, cifar_cfg, init_weights_cifar

__all__ = ['CifarPyramidNet', 'PyramidBottleneck', 'ShakeDrop', 'shake_drop']  # + entrypoints (model registry)


class _ShakeDropFunction(torch.autograd.Function):
    """y = x * (gate + (1 - gate) * alpha) forward, dy/dx taken as gate + (1 - gate) * beta backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, beta)
        return x * (gate + (1. - gate) * alpha)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        gate, beta = ctx.saved_tensors
        return grad_output * (gate + (1. - gate) * beta), None, None, None


def shake_drop(
        x: torch.Tensor,
        drop_prob: float = 0.5,
        training: bool = False,
        alpha_range: Tuple[float, float] = (-1., 1.),
        beta_range: Tuple[float, float] = (0., 1.),
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Functional ShakeDrop of a residual branch output `x` (NCHW or any [B, ...] tensor).

    Args:
        x: Residual branch output.
        drop_prob: Probability p of perturbing the branch (the gate keeps it unchanged with probability 1 - p).
        training: Apply the stochastic training behaviour; otherwise scale by 1 - p.
        alpha_range: Range of the uniform forward coefficient.
        beta_range: Range of the uniform backward coefficient.
        generator: Optional generator on `x`'s device to draw the gate and coefficients from (default: torch's
            global stream).
    """
    if drop_prob == 0.:
        return x
    if not training:
        return x * (1. - drop_prob)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    # one gate per batch, coefficients per sample; all on x's device, no host synchronisation
    gate = torch.empty((1,) * x.ndim, device=x.device, dtype=x.dtype).bernoulli_(1. - drop_prob, generator=generator)
    alpha = torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(*alpha_range, generator=generator)
    beta = torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(*beta_range, generator=generator)
    return _ShakeDropFunction.apply(x, gate, alpha, beta)


@register_per_member_module
class ShakeDrop(nn.Module):
    """ShakeDrop regularization of a residual branch (see `shake_drop`).

    `generator` (None: torch's global stream) may be set to a generator on the activations' device to seed this
    layer's draws on their own; every backend runs each member's own module, so seeded draws do not depend on it.
    """

    def __init__(
            self,
            drop_prob: float = 0.5,
            alpha_range: Tuple[float, float] = (-1., 1.),
            beta_range: Tuple[float, float] = (0., 1.),
    ) -> None:
        """
        Args:
            drop_prob: Probability of perturbing the branch.
            alpha_range: Range of the uniform forward coefficient.
            beta_range: Range of the uniform backward coefficient.
        """
        super().__init__()
        self.drop_prob = drop_prob
        self.alpha_range = alpha_range
        self.beta_range = beta_range
        self.generator: Optional[torch.Generator] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shake_drop(x, self.drop_prob, self.training, self.alpha_range, self.beta_range, self.generator)

    def extra_repr(self) -> str:
        return f'drop_prob={round(self.drop_prob, 4)}'


class PyramidBottleneck(nn.Module):
    """PyramidNet bottleneck (BN first, no ReLU before conv1, BN last) with a zero-padded, avg-pooled shortcut."""
    expansion = 4

    def __init__(
            self,
            in_chs: int,
            planes: int,
            stride: int = 1,
            shakedrop_prob: float = 0.,
            drop_path: Optional[nn.Module] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_chs: Channels coming in.
            planes: Bottleneck width, the block outputs planes * 4 channels.
            stride: Stride of the 3x3 conv (and of the shortcut pooling).
            shakedrop_prob: ShakeDrop probability of this block.
            drop_path: Optional DropPath module on the residual branch.
            act_layer: Activation module class.
            norm_layer: Norm module class (BatchNorm2d).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        out_chs = planes * self.expansion
        self.out_chs = out_chs
        self.pad = out_chs - in_chs  # zero channels appended to the shortcut (a Python int: FX-traceable)
        self.bn1 = norm_layer(in_chs, **dd)
        self.conv1 = nn.Conv2d(in_chs, planes, kernel_size=1, bias=False, **dd)
        self.bn2 = norm_layer(planes, **dd)
        self.act2 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False, **dd)
        self.bn3 = norm_layer(planes, **dd)
        self.act3 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, kernel_size=1, bias=False, **dd)
        self.bn4 = norm_layer(out_chs, **dd)
        self.shake_drop = ShakeDrop(shakedrop_prob)
        self.drop_path = drop_path if drop_path is not None else nn.Identity()
        self.downsample = nn.AvgPool2d(2, stride, ceil_mode=True) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        if self.pad > 0:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))

        x = self.bn1(x)
        x = self.conv1(x)
        x = self.bn2(x)
        x = self.act2(x)
        x = self.conv2(x)
        x = self.bn3(x)
        x = self.act3(x)
        x = self.conv3(x)
        x = self.bn4(x)
        x = self.shake_drop(x)
        x = self.drop_path(x)
        return x + shortcut


class CifarPyramidNet(CifarBackbone):
    """Bottleneck PyramidNet with ShakeDrop for 32x32 inputs (three stages, strides 1, 2, 2, 8x8 final maps)."""

    def __init__(
            self,
            layers: Tuple[int, ...] = (30, 30, 30),
            alpha: float = 200.,
            base_width: int = 16,
            shakedrop_prob: float = 0.5,
            num_classes: int = 100,
            in_chans: int = 3,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            layers: Bottleneck blocks per stage, three stages (PyramidNet-272: 30 each).
            alpha: Total widening of the bottleneck width over all blocks (added linearly, alpha / sum(layers) per
                block).
            base_width: Stem output channels and initial bottleneck width.
            shakedrop_prob: ShakeDrop probability of the last block, block l of L gets shakedrop_prob * l / L.
            num_classes: Size of the classifier output.
            in_chans: Channels of the input images.
            act_layer: Activation module class.
            norm_layer: Norm module class (BatchNorm2d).
            global_pool: Pool type of the head, e.g. 'avg', 'max' or 'avgmax'.
            drop_rate: Dropout probability of the pooled features, in front of the classifier.
            drop_path_rate: Drop-path probability of the last block; it grows linearly from 0 at the first block.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        # Stem: conv3x3 + BN, no activation (every block starts with BN)
        self.conv1 = nn.Conv2d(in_chans, base_width, kernel_size=3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(base_width, **dd)
        self.feature_info = [dict(num_chs=base_width, reduction=1, module='bn1')]
        self.feature_levels = [('conv1', 'bn1')]

        # Stages: the bottleneck width grows by add_rate per block, rounded to an integer
        net_num_blocks = sum(layers)
        add_rate = alpha / net_num_blocks
        width = float(base_width)
        in_chs = base_width
        net_block_idx = 0
        net_stride = 1
        for stage_idx, num_blocks in enumerate(layers):
            stride = 1 if stage_idx == 0 else 2
            net_stride *= stride
            blocks = []
            for block_idx in range(num_blocks):
                width += add_rate
                dpr = drop_path_rate * net_block_idx / max(net_num_blocks - 1, 1)
                block = PyramidBottleneck(
                    in_chs,
                    int(round(width)),
                    stride=stride if block_idx == 0 else 1,
                    shakedrop_prob=shakedrop_prob * (net_block_idx + 1) / net_num_blocks,
                    drop_path=DropPath(dpr) if dpr > 0. else None,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    **dd,
                )
                blocks.append(block)
                in_chs = block.out_chs
                net_block_idx += 1
            stage_name = f'layer{stage_idx + 1}'
            self.add_module(stage_name, nn.Sequential(*blocks))
            self.feature_info += [dict(num_chs=in_chs, reduction=net_stride, module=stage_name)]
            self.feature_levels += [(stage_name,)]

        # the pre-activation stack ends in BN-ReLU; then the classifier head
        self.bn_final = norm_layer(in_chs, **dd)
        self.act_final = act_layer(inplace=True)
        self.final_modules = ('bn_final', 'act_final')
        self._init_head(in_chs, global_pool=global_pool, drop_rate=drop_rate, **dd)

        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Kaiming (fan_out) convs, BN weight 1 / bias 0, fc bias 0."""
        init_weights_cifar(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups (stem, blocks) for layer-wise optimizer settings."""
        return dict(
            stem=r'^conv1|bn1',
            blocks=[
                (r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)', None),
                (r'^bn_final', (99999,)),
            ],
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and final BN-ReLU, returns the unpooled NCHW feature map."""
        x = self.conv1(x)
        x = self.bn1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
        x = self.bn_final(x)
        x = self.act_final(x)
        return x


def _create_cifar_pyramidnet(variant: str, pretrained: bool = False, **kwargs) -> CifarPyramidNet:
    return build_model_with_cfg(
        CifarPyramidNet, variant, pretrained, feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs)


default_cfgs = generate_default_cfgs({
    'pyramidnet272_cifar': cifar_cfg(),
})


@register_model
def pyramidnet272_cifar(pretrained: bool = False, **kwargs) -> CifarPyramidNet:
    """PyramidNet-272 (bottleneck, alpha 200) + ShakeDrop (p 0.5) for CIFAR, divided by `alpha` and `shakedrop_prob`
    (both / sqrt(S)).
    """
    model_args = dict(layers=(30, 30, 30), alpha=200., base_width=16, shakedrop_prob=0.5)
    return _create_cifar_pyramidnet('pyramidnet272_cifar', pretrained, **dict(model_args, **kwargs))
