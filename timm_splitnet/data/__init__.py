""" Data pipeline of timm_splitnet: multi-view loading, CIFAR / ImageNet transforms and data sets

Importing this package patches timm's auto-augment posterize ops for Pillow >= 13
(:func:`~timm_splitnet.data.transforms.patch_timm_posterize`).
"""
from .dataset import FOLDER_LAYOUT, DigitsDataset, SkipBadSamples, create_dataset
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_RE_RATIO,
    CIFAR_RE_SCALE,
    TV_AUTO_AUGMENT_POLICIES,
    create_auto_augment,
    create_eval_transform,
    create_random_erasing,
    create_train_transform,
    patch_timm_posterize,
    posterize_safe,
    transforms_cifar_eval,
    transforms_cifar_train,
)
from .views import (
    MultiViewDataset,
    channels_to_views,
    collate_views,
    mixup_split_batch,
    mixup_views,
    views_to_channels,
)
