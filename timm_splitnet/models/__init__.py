""" timm-style backbones of the SplitNet experiments

Importing this package registers the undivided CIFAR backbones and the table-driven EfficientNets in timm's model
registry (`timm.create_model('wrn28_10_cifar', widen_factor=5)`, ...). The keyword that SplitNet divides is listed in
each entrypoint's docstring; `timm_splitnet.division` maps S to its value.
"""
from .cifar_densenet import *
from .cifar_pyramidnet import *
from .cifar_resnet import *
from .cifar_shake_shake import *
from .splitnet_efficientnet import *
from .splitnet_resnet import *
