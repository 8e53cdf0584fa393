""" The checkpoints the SplitNet authors released, with the top-1 they report (their `miscs/checkpoints.md`)

Each release asset is `<name>.zip` (`model_best.pth.tar`, its md5, `hparams_train.json`, logs) on the GitHub releases
of mzhaoshuai/SplitNet-Divide-and-Co-training: tag 1.0.0 ImageNet, 1.0.1 CIFAR-100, 1.0.2 CIFAR-10. `model` is the
registered model the weights convert to, None where this package has no such architecture.
"""
import os
import re
from typing import NamedTuple, Optional, Tuple

__all__ = ['AuthorsRelease', 'AUTHORS_RELEASES', 'AUTHORS_REPO', 'find_release']

AUTHORS_REPO = 'https://github.com/mzhaoshuai/SplitNet-Divide-and-Co-training'


class AuthorsRelease(NamedTuple):
    name: str  # the zip's name without .zip
    model: Optional[str]  # registered model name here, None if not covered
    dataset: str
    num_classes: int
    img_size: int  # the crop the run trained and evaluated with
    top1: float  # the authors' reported top-1 (%)
    top5: Optional[float]
    tag: str  # GitHub release tag

    @property
    def url(self) -> str:
        return f'{AUTHORS_REPO}/releases/download/{self.tag}/{self.name}.zip'


def _imagenet(name, model, top1, top5, img_size=224):
    return AuthorsRelease(name, model, 'ImageNet', 1000, img_size, top1, top5, '1.0.0')


def _cifar(name, model, classes, top1):
    tag = '1.0.1' if classes == 100 else '1.0.2'
    return AuthorsRelease(name, model, f'CIFAR-{classes}', classes, 32, top1, None, tag)


AUTHORS_RELEASES: Tuple[AuthorsRelease, ...] = (
    _imagenet('resnet50_split1_imagenet_256_06', 'splitnet_resnet50_s1', 78.84, 94.47),
    _imagenet('se_resnet50_split1_imagenet_256_01', 'splitnet_seresnet50_s1', 79.47, 94.54),
    _imagenet('resnexst50_4x16d_split1_imagenet_256_01', None, 79.85, 94.98),
    _imagenet('resnexst50_8x16d_split1_imagenet_256_03', None, 80.90, 95.36),
    _imagenet('resnexst50_4x32d_split1_imagenet_256_05', None, 81.10, 95.49),
    _imagenet('resnet101_split1_imagenet_256_01', 'splitnet_resnet101_s1', 80.16, 94.54),
    _imagenet('wide_resnet50_2_split1_imagenet_256_01', 'splitnet_wrn50_2_s1', 80.66, 95.16),
    _imagenet('wide_resnet50_2_split2_imagenet_256_02', 'splitnet_wrn50_2_s2', 79.64, 94.82),
    _imagenet('wide_resnet50_3_split1_imagenet_256_01', 'splitnet_wrn50_3_s1', 80.74, 95.40),
    _imagenet('wide_resnet50_3_split2_imagenet_256_02', 'splitnet_wrn50_3_s2', 81.42, 95.62),
    _imagenet('resnext101_64x4d_split1_imagenet_256_01', 'splitnet_resnext101_64x4d_s1', 81.57, 95.73),
    _imagenet('resnext101_64x4d_split2_imagenet_256_02', 'splitnet_resnext101_64x4d_s2', 82.13, 95.98),
    _imagenet('efficientnetb7_split1_imagenet_128_03', 'splitnet_efficientnet_b7_s1', 81.83, 95.78, 320),
    _imagenet('efficientnetb7_split2_imagenet_128_02', 'splitnet_efficientnet_b7_s2', 82.74, 96.30, 320),
    _imagenet('se_resnext101_64x4d_split2_imagenet_128_02', 'splitnet_seresnext101_64x4d_s2', 83.34, 96.61, 416),
    _imagenet('se_resnext101_64x4d_B_split2_imagenet_128_05', 'splitnet_seresnext101_64x4d_b_s2', 83.60, 96.69, 320),
    _cifar('wide_resnet28_10_split1_cifar100_128_01_acc84.5', 'splitnet_wrn28_10_s1', 100, 84.50),
    _cifar('wide_resnet28_10_split2_cifar100_128_02_acc85.52', 'splitnet_wrn28_10_s2', 100, 85.52),
    _cifar('wide_resnet28_10_split4_cifar100_128_03_acc85.74', 'splitnet_wrn28_10_s4', 100, 85.74),
    _cifar('wide_resnet40_10_split1_cifar100_128_06_acc83.98', 'splitnet_wrn40_10_s1', 100, 83.98),
    _cifar('wide_resnet40_10_split2_cifar100_128_05_acc85.91', 'splitnet_wrn40_10_s2', 100, 85.91),
    _cifar('wide_resnet40_10_split4_cifar100_128_04_acc86.90', 'splitnet_wrn40_10_s4', 100, 86.90),
    _cifar('densenet190_split1_cifar100_64_01_acc85.90', 'splitnet_densenet_bc190_s1', 100, 85.90),
    _cifar('densenet190_split2_cifar100_128_02_acc87.36', 'splitnet_densenet_bc190_s2', 100, 87.36),
    _cifar('densenet190_split4_cifar100_64_03_acc87.44', 'splitnet_densenet_bc190_s4', 100, 87.44),
    _cifar('pyramidnet272_split1_cifar100_128_01_88.98', 'splitnet_pyramidnet272_s1', 100, 88.98),
    _cifar('pyramidnet272_split2_cifar100_128_06_acc89.25', 'splitnet_pyramidnet272_s2', 100, 89.25),
    _cifar('pyramidnet272_split4_cifar100_128_07_acc89.46', 'splitnet_pyramidnet272_s4', 100, 89.46),
    _cifar('wide_resnet28_10_split1_cifar10_128_08_acc97.59', 'splitnet_wrn28_10_s1', 10, 97.59),
    _cifar('wide_resnet28_10_split2_cifar10_128_07_acc98.19', 'splitnet_wrn28_10_s2', 10, 98.19),
    _cifar('wide_resnet28_10_split4_cifar10_128_24_acc98.32', 'splitnet_wrn28_10_s4', 10, 98.32),
    _cifar('wide_resnet40_10_split1_cifar10_128_04_acc97.81', 'splitnet_wrn40_10_s1', 10, 97.81),
    _cifar('wide_resnet40_10_split4_cifar10_128_05_acc98.38', 'splitnet_wrn40_10_s4', 10, 98.38),
    _cifar('shake_resnet26_2x96d_split1_cifar10_128_07_acc98.00', 'splitnet_shake_shake26_2x96d_s1', 10, 98.00),
    _cifar('shake_resnet26_2x96d_split2_cifar10_128_12_acc98.25', 'splitnet_shake_shake26_2x96d_s2', 10, 98.25),
    _cifar('shake_resnet26_2x96d_split4_cifar10_128_09_acc98.31', 'splitnet_shake_shake26_2x96d_s4', 10, 98.31),
    _cifar('pyramidnet272_split1_cifar10_128_01_acc98.67', 'splitnet_pyramidnet272_s1', 10, 98.67),
    _cifar('pyramidnet272_split4_cifar10_128_05_acc98.71', 'splitnet_pyramidnet272_s4', 10, 98.71),
)


def find_release(path: str) -> Optional[AuthorsRelease]:
    """The release a file comes from, by its name (`<name>.zip`, or a file or folder named after the release)."""
    base = os.path.basename(os.path.normpath(path))
    stem = re.sub(r'\.(zip|pth\.tar|pth|tar)$', '', base)
    return next((r for r in AUTHORS_RELEASES if r.name == stem), None)
