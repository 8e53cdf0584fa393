""" Data of timm_splitnet: multi-view loading, CIFAR / ImageNet transforms, data sets (folders and streaming readers)

Importing this package changes nothing in timm (the posterize fix is applied to each transform built here).
See docs/data.md.
"""
from .device_views import DeviceViewAugment, DeviceViewLoader, create_decode_transform, device_view_seed
from .dataset import FOLDER_LAYOUT, DigitsDataset, SkipBadSamples, create_dataset
from .shards import dataset_class_names, write_hf_shards, write_wds_shards
from .streaming import (
    ITERABLE_PREFIXES, check_reader_installed, dataset_prefix, is_iterable, scale_epoch_length, set_data_epoch,
    set_loader_workers)
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
    eval_data_config,
    posterize_safe,
    transforms_cifar_eval,
    transforms_cifar_train,
    use_safe_posterize,
)
from .views import (
    MultiViewDataset,
    MultiViewTransform,
    set_views_transform,
    channels_to_views,
    collate_views,
    mixup_split_batch,
    mixup_views,
    views_to_channels,
)
