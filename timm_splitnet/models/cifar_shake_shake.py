""" CIFAR Shake-Shake ResNet member backbone

Shake-Shake 26 2x96d for 32x32 inputs in the original (Gastaldi) layout; SplitNet divides the base width and keeps
the 16-channel stem. See docs/models.md.

Papers:
* `Shake-Shake regularization` - https://arxiv.org/abs/1705.07485
* `SplitNet: Divide and Co-training` - https://arxiv.org/abs/2011.14660
"""
from typing import Any, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath
from timm.models import build_model_with_cfg, register_model, generate_default_cfgs
from timm.models._manipulate import checkpoint_seq

from ._backends import register_per_member_function, register_per_member_module
from ._cifar_common import CifarBackbone, cifar_cfg, init_weights_cifar

__all__ = ['CifarShakeShake', 'ShakeShakeBlock', 'ShakeShake', 'shake_shake']  # @register_model appends the entrypoints


class _ShakeShakeFunction(torch.autograd.Function):
    """y = alpha * x1 + (1 - alpha) * x2 forward; gradients beta * g and (1 - beta) * g backward."""

    @staticmethod
    def forward(
            ctx,
            x1: torch.Tensor,
            x2: torch.Tensor,
            alpha: torch.Tensor,
            beta: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(beta)
        return alpha * x1 + (1. - alpha) * x2

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        beta, = ctx.saved_tensors
        return beta * grad_output, (1. - beta) * grad_output, None, None


@register_per_member_function
def shake_shake(
        x1: torch.Tensor,
        x2: torch.Tensor,
        training: bool = False,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Shake-Shake-Image mixing of two branch outputs (per-sample forward and backward coefficients).

    Args:
        x1: Output of the first branch.
        x2: Output of the second branch.
        training: Draw random coefficients; otherwise average the branches.
        generator: Optional generator on the branches' device to draw the coefficients from (default: torch's
            global stream).
    """
    if not training:
        return 0.5 * (x1 + x2)
    shape = (x1.shape[0],) + (1,) * (x1.ndim - 1)
    alpha = torch.rand(shape, device=x1.device, dtype=x1.dtype, generator=generator)
    beta = torch.rand(shape, device=x1.device, dtype=x1.dtype, generator=generator)
    return _ShakeShakeFunction.apply(x1, x2, alpha, beta)


@register_per_member_module
class ShakeShake(nn.Module):
    """The Shake-Shake mixing of a block's two branches (see `shake_shake`), as a parameter-free module.

    `generator` (None: torch's global stream) may be set to a generator on the activations' device to seed this
    block's draws on their own; every backend runs each member's own module, so seeded draws do not depend on it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.generator: Optional[torch.Generator] = None

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return shake_shake(x1, x2, self.training, self.generator)


class ShakeShortcut(nn.Module):
    """Projection shortcut: ReLU -> two strided 1x1 convs (second on the one-pixel shifted input) -> concat -> BN."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_chs: Channels coming in.
            out_chs: Channels going out; even, each 1x1 path makes half of them.
            stride: Subsampling stride.
            act_layer: Activation module class.
            norm_layer: Norm module class (BatchNorm2d).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert out_chs % 2 == 0
        self.stride = stride
        self.act = act_layer()
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, kernel_size=1, stride=stride, bias=False, **dd)
        self.conv2 = nn.Conv2d(in_chs, out_chs // 2, kernel_size=1, stride=stride, bias=False, **dd)
        self.bn = norm_layer(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        x1 = self.conv1(x)
        # shift by one pixel (right/down, zero fill) so that the two paths see complementary pixels when strided
        x2 = self.conv2(F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1)))
        return self.bn(torch.cat([x1, x2], dim=1))


class ShakeShakeBlock(nn.Module):
    """Residual block with two ReLU-conv-BN-ReLU-conv-BN branches mixed by Shake-Shake."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            drop_path: Optional[nn.Module] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_chs: Channels coming in.
            out_chs: Channels going out.
            stride: Stride of the first conv of each branch.
            drop_path: Optional DropPath module on the mixed residual branches.
            act_layer: Activation module class.
            norm_layer: Norm module class (BatchNorm2d).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.branch1 = self._make_branch(in_chs, out_chs, stride, act_layer, norm_layer, dd)
        self.branch2 = self._make_branch(in_chs, out_chs, stride, act_layer, norm_layer, dd)
        self.shake = ShakeShake()
        self.drop_path = drop_path if drop_path is not None else nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = ShakeShortcut(in_chs, out_chs, stride, act_layer=act_layer, norm_layer=norm_layer, **dd)
        else:
            self.shortcut = nn.Identity()

    @staticmethod
    def _make_branch(
            in_chs: int,
            out_chs: int,
            stride: int,
            act_layer: Type[nn.Module],
            norm_layer: Type[nn.Module],
            dd: Dict[str, Any],
    ) -> nn.Sequential:
        # the first ReLU must not be in-place: it reads the block input, which the shortcut uses as well
        return nn.Sequential(
            act_layer(),
            nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False, **dd),
            norm_layer(out_chs, **dd),
            act_layer(inplace=True),
            nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False, **dd),
            norm_layer(out_chs, **dd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shake(self.branch1(x), self.branch2(x))
        return self.shortcut(x) + self.drop_path(out)


class CifarShakeShake(CifarBackbone):
    """Shake-Shake ResNet for 32x32 inputs (three stages of [b, 2b, 4b] channels, strides 1, 2, 2, 8x8 maps)."""

    def __init__(
            self,
            layers: Tuple[int, ...] = (4, 4, 4),
            base_width: int = 96,
            stem_width: int = 16,
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
            layers: Blocks per stage (three stages).
            base_width: Channels of the first stage (b); the stages have [b, 2b, 4b].
            stem_width: Output channels of the stem conv.
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

        # Stem: conv3x3 (with bias) + BN, no activation (every branch and shortcut starts with ReLU)
        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=True, **dd)
        self.bn1 = norm_layer(stem_width, **dd)
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='bn1')]
        self.feature_levels = [('conv1', 'bn1')]

        # Stages
        in_chs = stem_width
        net_num_blocks = sum(layers)
        net_block_idx = 0
        net_stride = 1
        for stage_idx, num_blocks in enumerate(layers):
            stride = 1 if stage_idx == 0 else 2
            net_stride *= stride
            out_chs = base_width * 2 ** stage_idx
            blocks = []
            for block_idx in range(num_blocks):
                dpr = drop_path_rate * net_block_idx / max(net_num_blocks - 1, 1)
                blocks.append(ShakeShakeBlock(
                    in_chs,
                    out_chs,
                    stride=stride if block_idx == 0 else 1,
                    drop_path=DropPath(dpr) if dpr > 0. else None,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    **dd,
                ))
                in_chs = out_chs
                net_block_idx += 1
            stage_name = f'layer{stage_idx + 1}'
            self.add_module(stage_name, nn.Sequential(*blocks))
            self.feature_info += [dict(num_chs=out_chs, reduction=net_stride, module=stage_name)]
            self.feature_levels += [(stage_name,)]

        # the blocks end without an activation: one ReLU, then the classifier head
        self.act_final = act_layer(inplace=True)
        self.final_modules = ('act_final',)
        self._init_head(in_chs, global_pool=global_pool, drop_rate=drop_rate, **dd)

        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Kaiming (fan_out) convs, BN weight 1 / bias 0, conv and fc biases 0."""
        init_weights_cifar(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups (stem, blocks) for layer-wise optimizer settings."""
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and final ReLU, returns the unpooled NCHW feature map."""
        x = self.conv1(x)
        x = self.bn1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
        x = self.act_final(x)
        return x


def _create_cifar_shake_shake(variant: str, pretrained: bool = False, **kwargs) -> CifarShakeShake:
    return build_model_with_cfg(
        CifarShakeShake, variant, pretrained, feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs)


default_cfgs = generate_default_cfgs({
    'shake_shake26_2x96d_cifar': cifar_cfg(),
})


@register_model
def shake_shake26_2x96d_cifar(pretrained: bool = False, **kwargs) -> CifarShakeShake:
    """Shake-Shake 26 2x96d for CIFAR, divided by `base_width` (96 / 64 / 48 for S=1/2/4)."""
    model_args = dict(layers=(4, 4, 4), base_width=96, stem_width=16)
    return _create_cifar_shake_shake('shake_shake26_2x96d_cifar', pretrained, **dict(model_args, **kwargs))
