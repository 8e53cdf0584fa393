""" SplitNet models: the `SplitNet` wrapper, the division table and the member backbones timm lacks

Importing this package registers the member backbones first (the SplitNet cfgs derive from theirs), then the
`splitnet_<arch>_s<S>` entrypoints (`splitnet_entrypoints.py`).
"""
from .cifar_densenet import *
from .cifar_pyramidnet import *
from .cifar_resnet import *
from .cifar_shake_shake import *
from .member_efficientnet import *
from .member_resnet import *
from .division import (
    SPLIT_ARCHS, SplitArch, divide_weight_decay, get_split_arch, member_kwargs, supported_split_factors,
)
from .splitnet import (
    ENSEMBLE_MODES, REGISTERED_SPLIT_FACTORS, SplitNet, create_model, create_splitnet, parse_splitnet_name,
    splitnet_cfg, splitnet_name,
)
from .splitnet_entrypoints import *
from .authors import (
    AuthorsCheckpoint, authors_build_kwargs, authors_model_name, convert_authors_state_dict,
    export_authors_checkpoint, load_authors_checkpoint, read_authors_checkpoint,
)
