""" timm-splitnet: SplitNet (divide and co-train) as a timm extension

`import timm_splitnet` registers `splitnet_<arch>_s<S>` models (and the CIFAR member backbones) in timm's registry:

    import timm, timm_splitnet
    model = timm.create_model('splitnet_wrn28_10_s4')
"""
from .version import __version__
from . import data  # applies the RandAugment posterize fix before any timm transform is built
from .division import SPLIT_ARCHS, divide_weight_decay, member_kwargs, supported_split_factors
from .splitnet import SplitNet, create_splitnet, splitnet_name
from .checkpoint import export_model, load_safetensors, save_safetensors
from .flops import count_macs, count_params
from .loss import CoTrainingLoss, js_divergence
