""" Registered SplitNet models: `splitnet_<arch>_s<S>` for every architecture of `SPLIT_ARCHS` and every S its division
rule defines

Each entrypoint is `create_splitnet(arch, S)`; `default_cfgs` holds their pretrained cfgs, derived from the member
models' cfgs (the member modules must be imported first, as `timm_splitnet.models` does). The S = 1, 2, 4 entrypoints
are written out below; the other S of each rule (its table's, or 1 to 16 for a formula) are registered by the loop at
the end of the module, in the same form.
"""
from timm.models import generate_default_cfgs, register_model

from .division import SPLIT_ARCHS, supported_split_factors
from .splitnet import REGISTERED_SPLIT_FACTORS, SplitNet, create_splitnet, splitnet_cfg, splitnet_name

__all__ = []  # the entrypoints are reached through timm's registry

default_cfgs = generate_default_cfgs({
    # ImageNet (224 px, 1000 classes)
    'splitnet_resnet50_s1': splitnet_cfg('resnet50', 1),
    'splitnet_resnet50_s2': splitnet_cfg('resnet50', 2),
    'splitnet_resnet50_s4': splitnet_cfg('resnet50', 4),
    'splitnet_resnet101_s1': splitnet_cfg('resnet101', 1),
    'splitnet_resnet101_s2': splitnet_cfg('resnet101', 2),
    'splitnet_resnet101_s4': splitnet_cfg('resnet101', 4),
    'splitnet_wrn50_2_s1': splitnet_cfg('wrn50_2', 1),
    'splitnet_wrn50_2_s2': splitnet_cfg('wrn50_2', 2),
    'splitnet_wrn50_2_s4': splitnet_cfg('wrn50_2', 4),
    'splitnet_wrn50_3_s1': splitnet_cfg('wrn50_3', 1),
    'splitnet_wrn50_3_s2': splitnet_cfg('wrn50_3', 2),
    'splitnet_wrn50_3_s4': splitnet_cfg('wrn50_3', 4),
    'splitnet_resnext101_64x4d_s1': splitnet_cfg('resnext101_64x4d', 1),
    'splitnet_resnext101_64x4d_s2': splitnet_cfg('resnext101_64x4d', 2),
    'splitnet_resnext101_64x4d_s4': splitnet_cfg('resnext101_64x4d', 4),
    'splitnet_seresnext101_64x4d_s1': splitnet_cfg('seresnext101_64x4d', 1),
    'splitnet_seresnext101_64x4d_s2': splitnet_cfg('seresnext101_64x4d', 2),
    'splitnet_seresnext101_64x4d_s4': splitnet_cfg('seresnext101_64x4d', 4),
    'splitnet_seresnext101_64x4d_b_s1': splitnet_cfg('seresnext101_64x4d_b', 1),
    'splitnet_seresnext101_64x4d_b_s2': splitnet_cfg('seresnext101_64x4d_b', 2),
    'splitnet_seresnext101_64x4d_b_s4': splitnet_cfg('seresnext101_64x4d_b', 4),
    'splitnet_seresnet50_s1': splitnet_cfg('seresnet50', 1),
    'splitnet_seresnet50_s2': splitnet_cfg('seresnet50', 2),
    'splitnet_seresnet50_s4': splitnet_cfg('seresnet50', 4),
    'splitnet_efficientnet_b7_s1': splitnet_cfg('efficientnet_b7', 1),
    'splitnet_efficientnet_b7_s2': splitnet_cfg('efficientnet_b7', 2),
    'splitnet_efficientnet_b7_s4': splitnet_cfg('efficientnet_b7', 4),
    # CIFAR (32 px, 100 classes)
    'splitnet_resnet110_s1': splitnet_cfg('resnet110', 1),
    'splitnet_resnet110_s2': splitnet_cfg('resnet110', 2),
    'splitnet_resnet110_s4': splitnet_cfg('resnet110', 4),
    'splitnet_resnet164_s1': splitnet_cfg('resnet164', 1),
    'splitnet_resnet164_s2': splitnet_cfg('resnet164', 2),
    'splitnet_resnet164_s4': splitnet_cfg('resnet164', 4),
    'splitnet_seresnet110_s1': splitnet_cfg('seresnet110', 1),
    'splitnet_seresnet110_s2': splitnet_cfg('seresnet110', 2),
    'splitnet_seresnet110_s4': splitnet_cfg('seresnet110', 4),
    'splitnet_seresnet164_s1': splitnet_cfg('seresnet164', 1),
    'splitnet_seresnet164_s2': splitnet_cfg('seresnet164', 2),
    'splitnet_seresnet164_s4': splitnet_cfg('seresnet164', 4),
    'splitnet_wrn16_8_s1': splitnet_cfg('wrn16_8', 1),
    'splitnet_wrn16_8_s2': splitnet_cfg('wrn16_8', 2),
    'splitnet_wrn16_8_s4': splitnet_cfg('wrn16_8', 4),
    'splitnet_wrn28_10_s1': splitnet_cfg('wrn28_10', 1),
    'splitnet_wrn28_10_s2': splitnet_cfg('wrn28_10', 2),
    'splitnet_wrn28_10_s4': splitnet_cfg('wrn28_10', 4),
    'splitnet_wrn40_10_s1': splitnet_cfg('wrn40_10', 1),
    'splitnet_wrn40_10_s2': splitnet_cfg('wrn40_10', 2),
    'splitnet_wrn40_10_s4': splitnet_cfg('wrn40_10', 4),
    'splitnet_resnext29_8x64d_s1': splitnet_cfg('resnext29_8x64d', 1),
    'splitnet_resnext29_8x64d_s2': splitnet_cfg('resnext29_8x64d', 2),
    'splitnet_resnext29_8x64d_s4': splitnet_cfg('resnext29_8x64d', 4),
    'splitnet_densenet_bc190_s1': splitnet_cfg('densenet_bc190', 1),
    'splitnet_densenet_bc190_s2': splitnet_cfg('densenet_bc190', 2),
    'splitnet_densenet_bc190_s4': splitnet_cfg('densenet_bc190', 4),
    'splitnet_pyramidnet272_s1': splitnet_cfg('pyramidnet272', 1),
    'splitnet_pyramidnet272_s2': splitnet_cfg('pyramidnet272', 2),
    'splitnet_pyramidnet272_s4': splitnet_cfg('pyramidnet272', 4),
    'splitnet_shake_shake26_2x96d_s1': splitnet_cfg('shake_shake26_2x96d', 1),
    'splitnet_shake_shake26_2x96d_s2': splitnet_cfg('shake_shake26_2x96d', 2),
    'splitnet_shake_shake26_2x96d_s4': splitnet_cfg('shake_shake26_2x96d', 4),
    'splitnet_efficientnet_b0_cifar_s1': splitnet_cfg('efficientnet_b0_cifar', 1),
    'splitnet_efficientnet_b0_cifar_s2': splitnet_cfg('efficientnet_b0_cifar', 2),
    'splitnet_efficientnet_b0_cifar_s4': splitnet_cfg('efficientnet_b0_cifar', 4),
    'splitnet_efficientnet_b3_cifar_s1': splitnet_cfg('efficientnet_b3_cifar', 1),
    'splitnet_efficientnet_b3_cifar_s2': splitnet_cfg('efficientnet_b3_cifar', 2),
    'splitnet_efficientnet_b3_cifar_s4': splitnet_cfg('efficientnet_b3_cifar', 4),
})


# ----- ImageNet -----


@register_model
def splitnet_resnet50_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-50, undivided (S=1)."""
    return create_splitnet('resnet50', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnet50_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-50 divided into S=2 co-trained members."""
    return create_splitnet('resnet50', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnet50_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-50 divided into S=4 co-trained members."""
    return create_splitnet('resnet50', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnet101_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-101, undivided (S=1)."""
    return create_splitnet('resnet101', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnet101_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-101 divided into S=2 co-trained members."""
    return create_splitnet('resnet101', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnet101_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-101 divided into S=4 co-trained members."""
    return create_splitnet('resnet101', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn50_2_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-50-2, undivided (S=1)."""
    return create_splitnet('wrn50_2', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn50_2_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-50-2 divided into S=2 co-trained members."""
    return create_splitnet('wrn50_2', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn50_2_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-50-2 divided into S=4 co-trained members."""
    return create_splitnet('wrn50_2', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn50_3_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-50-3, undivided (S=1)."""
    return create_splitnet('wrn50_3', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn50_3_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-50-3 divided into S=2 co-trained members."""
    return create_splitnet('wrn50_3', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn50_3_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-50-3 divided into S=4 co-trained members."""
    return create_splitnet('wrn50_3', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnext101_64x4d_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNeXt-101 64x4d, undivided (S=1)."""
    return create_splitnet('resnext101_64x4d', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnext101_64x4d_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNeXt-101 64x4d divided into S=2 co-trained members."""
    return create_splitnet('resnext101_64x4d', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnext101_64x4d_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNeXt-101 64x4d divided into S=4 co-trained members."""
    return create_splitnet('resnext101_64x4d', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnext101_64x4d_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNeXt-101 64x4d (64-64-64 stem), undivided (S=1)."""
    return create_splitnet('seresnext101_64x4d', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnext101_64x4d_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNeXt-101 64x4d (64-64-64 stem) divided into S=2 co-trained members."""
    return create_splitnet('seresnext101_64x4d', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnext101_64x4d_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNeXt-101 64x4d (64-64-64 stem) divided into S=4 co-trained members."""
    return create_splitnet('seresnext101_64x4d', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnext101_64x4d_b_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNeXt-101 64x4d (64-64-128 stem, the authors' "_B"), undivided (S=1)."""
    return create_splitnet('seresnext101_64x4d_b', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnext101_64x4d_b_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNeXt-101 64x4d (64-64-128 stem, the authors' "_B") divided into S=2 co-trained members."""
    return create_splitnet('seresnext101_64x4d_b', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnext101_64x4d_b_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNeXt-101 64x4d (64-64-128 stem, the authors' "_B") divided into S=4 co-trained members."""
    return create_splitnet('seresnext101_64x4d_b', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnet50_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNet-50 (the authors' flat stem), undivided (S=1)."""
    return create_splitnet('seresnet50', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnet50_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNet-50 (the authors' flat stem) divided into S=2 co-trained members."""
    return create_splitnet('seresnet50', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnet50_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNet-50 (the authors' flat stem) divided into S=4 co-trained members."""
    return create_splitnet('seresnet50', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_efficientnet_b7_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet EfficientNet-B7, undivided (S=1)."""
    return create_splitnet('efficientnet_b7', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_efficientnet_b7_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet EfficientNet-B7 divided into S=2 co-trained members."""
    return create_splitnet('efficientnet_b7', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_efficientnet_b7_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet EfficientNet-B7 divided into S=4 co-trained members."""
    return create_splitnet('efficientnet_b7', 4, pretrained=pretrained, **kwargs)


# ----- CIFAR -----


@register_model
def splitnet_resnet110_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-110, undivided (S=1)."""
    return create_splitnet('resnet110', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnet110_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-110 divided into S=2 co-trained members."""
    return create_splitnet('resnet110', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnet110_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-110 divided into S=4 co-trained members."""
    return create_splitnet('resnet110', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnet164_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-164, undivided (S=1)."""
    return create_splitnet('resnet164', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnet164_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-164 divided into S=2 co-trained members."""
    return create_splitnet('resnet164', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnet164_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNet-164 divided into S=4 co-trained members."""
    return create_splitnet('resnet164', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnet110_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNet-110, undivided (S=1)."""
    return create_splitnet('seresnet110', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnet110_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNet-110 divided into S=2 co-trained members."""
    return create_splitnet('seresnet110', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnet110_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNet-110 divided into S=4 co-trained members."""
    return create_splitnet('seresnet110', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnet164_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNet-164, undivided (S=1)."""
    return create_splitnet('seresnet164', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnet164_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNet-164 divided into S=2 co-trained members."""
    return create_splitnet('seresnet164', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_seresnet164_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet SE-ResNet-164 divided into S=4 co-trained members."""
    return create_splitnet('seresnet164', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn16_8_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-16-8, undivided (S=1)."""
    return create_splitnet('wrn16_8', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn16_8_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-16-8 divided into S=2 co-trained members."""
    return create_splitnet('wrn16_8', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn16_8_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-16-8 divided into S=4 co-trained members."""
    return create_splitnet('wrn16_8', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn28_10_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-28-10, undivided (S=1)."""
    return create_splitnet('wrn28_10', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn28_10_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-28-10 divided into S=2 co-trained members."""
    return create_splitnet('wrn28_10', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn28_10_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-28-10 divided into S=4 co-trained members."""
    return create_splitnet('wrn28_10', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn40_10_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-40-10, undivided (S=1)."""
    return create_splitnet('wrn40_10', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn40_10_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-40-10 divided into S=2 co-trained members."""
    return create_splitnet('wrn40_10', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_wrn40_10_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet WRN-40-10 divided into S=4 co-trained members."""
    return create_splitnet('wrn40_10', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnext29_8x64d_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNeXt-29 8x64d, undivided (S=1)."""
    return create_splitnet('resnext29_8x64d', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnext29_8x64d_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNeXt-29 8x64d divided into S=2 co-trained members."""
    return create_splitnet('resnext29_8x64d', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_resnext29_8x64d_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet ResNeXt-29 8x64d divided into S=4 co-trained members."""
    return create_splitnet('resnext29_8x64d', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_densenet_bc190_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet DenseNet-BC-190 (k=40), undivided (S=1)."""
    return create_splitnet('densenet_bc190', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_densenet_bc190_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet DenseNet-BC-190 (k=40) divided into S=2 co-trained members."""
    return create_splitnet('densenet_bc190', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_densenet_bc190_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet DenseNet-BC-190 (k=40) divided into S=4 co-trained members."""
    return create_splitnet('densenet_bc190', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_pyramidnet272_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet PyramidNet-272 + ShakeDrop, undivided (S=1)."""
    return create_splitnet('pyramidnet272', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_pyramidnet272_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet PyramidNet-272 + ShakeDrop divided into S=2 co-trained members."""
    return create_splitnet('pyramidnet272', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_pyramidnet272_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet PyramidNet-272 + ShakeDrop divided into S=4 co-trained members."""
    return create_splitnet('pyramidnet272', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_shake_shake26_2x96d_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet Shake-Shake 26 2x96d, undivided (S=1)."""
    return create_splitnet('shake_shake26_2x96d', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_shake_shake26_2x96d_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet Shake-Shake 26 2x96d divided into S=2 co-trained members."""
    return create_splitnet('shake_shake26_2x96d', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_shake_shake26_2x96d_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet Shake-Shake 26 2x96d divided into S=4 co-trained members."""
    return create_splitnet('shake_shake26_2x96d', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_efficientnet_b0_cifar_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet EfficientNet-B0 (CIFAR strides), undivided (S=1)."""
    return create_splitnet('efficientnet_b0_cifar', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_efficientnet_b0_cifar_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet EfficientNet-B0 (CIFAR strides) divided into S=2 co-trained members."""
    return create_splitnet('efficientnet_b0_cifar', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_efficientnet_b0_cifar_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet EfficientNet-B0 (CIFAR strides) divided into S=4 co-trained members."""
    return create_splitnet('efficientnet_b0_cifar', 4, pretrained=pretrained, **kwargs)


@register_model
def splitnet_efficientnet_b3_cifar_s1(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet EfficientNet-B3 (CIFAR strides), undivided (S=1)."""
    return create_splitnet('efficientnet_b3_cifar', 1, pretrained=pretrained, **kwargs)


@register_model
def splitnet_efficientnet_b3_cifar_s2(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet EfficientNet-B3 (CIFAR strides) divided into S=2 co-trained members."""
    return create_splitnet('efficientnet_b3_cifar', 2, pretrained=pretrained, **kwargs)


@register_model
def splitnet_efficientnet_b3_cifar_s4(pretrained: bool = False, **kwargs) -> SplitNet:
    """SplitNet EfficientNet-B3 (CIFAR strides) divided into S=4 co-trained members."""
    return create_splitnet('efficientnet_b3_cifar', 4, pretrained=pretrained, **kwargs)


# ----- every other S a division rule defines -----


def _register_entrypoint(arch: str, split_factor: int) -> None:
    """Register `splitnet_<arch>_s<S>` as the written-out entrypoints above are (a named function, its cfg)."""
    name = splitnet_name(arch, split_factor)

    def entrypoint(pretrained: bool = False, **kwargs) -> SplitNet:
        return create_splitnet(arch, split_factor, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f'SplitNet {SPLIT_ARCHS[arch].description} divided into S={split_factor} co-trained members.'
    default_cfgs.update(generate_default_cfgs({name: splitnet_cfg(arch, split_factor)}))  # read by register_model
    globals()[name] = register_model(entrypoint)


for _arch in SPLIT_ARCHS:
    for _split_factor in supported_split_factors(_arch):
        if _split_factor not in REGISTERED_SPLIT_FACTORS:
            _register_entrypoint(_arch, _split_factor)
