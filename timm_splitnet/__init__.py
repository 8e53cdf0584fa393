""" timm-splitnet: SplitNet (divide and co-train) as a timm extension

`import timm_splitnet` registers `splitnet_<arch>_s<S>` models (and the CIFAR member backbones) in timm's registry:

    import timm, timm_splitnet
    model = timm.create_model('splitnet_wrn28_10_s4')
"""
from .version import __version__
from . import data
from .models import SPLIT_ARCHS, SplitNet, convert_authors_state_dict, create_model, create_splitnet, \
    divide_weight_decay, member_kwargs, splitnet_name, supported_split_factors
from .parallel import SPLIT_BACKENDS
from .utils import count_macs, count_params, export_model, load_safetensors, save_safetensors
from .loss import CoTrainingLoss, js_divergence
