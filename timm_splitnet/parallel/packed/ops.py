""" Op tables of the packed lowering

Which modules and functions the packer knows, grouped by how they run on a packed tensor [B, S*C, ...]
(elementwise, per-channel spatial, random, reductions). timm layer types are looked up when timm provides them.
"""
import importlib
import operator
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'ELEMENTWISE_MODULES', 'SPATIAL_MODULES', 'RANDOM_MODULES', 'CONV_SAME', 'BN_ACT', 'BATCH_NORMS', 'SELECT_POOL',
    'DROP_PATH', 'LEAF_TYPES', 'ELEMENTWISE_FUNCTIONS', 'RANDOM_FUNCTIONS', 'SPATIAL_FUNCTIONS', 'ELEMENTWISE_METHODS',
    'REDUCE_FUNCTIONS', 'REDUCE_METHODS', 'RANDOM_NAMES', 'SHAPE_ATTRIBUTES',
]


def optional_types(module: str, names: Sequence[str]) -> Tuple[type, ...]:
    """The classes `names` of `module` that exist (none when the module cannot be imported)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


# ----- modules -----

# parameter-free modules applied to the packed tensor as they are: elementwise or per-channel spatial ops
ELEMENTWISE_MODULES = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Hardtanh,
) + optional_types('timm.layers.activations', (
    'Swish', 'Mish', 'Sigmoid', 'Tanh', 'HardSwish', 'HardSigmoid', 'HardMish', 'GELU', 'GELUTanh', 'QuickGELU',
)) + optional_types('timm.layers.activations_me', ('SwishMe', 'MishMe', 'HardSigmoidMe', 'HardSwishMe', 'HardMishMe'))
SPATIAL_MODULES = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
) + optional_types('timm.layers.pool2d_same', ('AvgPool2dSame', 'MaxPool2dSame'))
# random elementwise / per-channel modules: fine on packed tensors (independent per element); a member-invariant
# input is repeated first so that every member draws its own mask
RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
CONV_SAME = optional_types('timm.layers.conv2d_same', ('Conv2dSame',))
# per-channel batch norms; the timm ones apply their `drop` and `act` submodules after the norm
BN_ACT = optional_types('timm.layers.norm_act', ('BatchNormAct2d', 'SyncBatchNormAct'))
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm) + BN_ACT
SELECT_POOL = optional_types('timm.layers.adaptive_avgmax_pool', ('SelectAdaptivePool2d',))
DROP_PATH = optional_types('timm.layers.drop', ('DropPath',))

# the modules the tracer keeps as leaves (the packer runs them itself)
LEAF_TYPES = frozenset(
    ELEMENTWISE_MODULES + SPATIAL_MODULES + RANDOM_MODULES + CONV_SAME + BATCH_NORMS + SELECT_POOL + DROP_PATH +
    (nn.Flatten, nn.Conv2d, nn.Linear))

# ----- functions and tensor methods -----

ELEMENTWISE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.sigmoid, torch.tanh, torch.relu, torch.exp,
    torch.clamp, torch.clip, torch.abs, torch.sqrt, torch.rsqrt, torch.square, torch.pow, torch.maximum,
    torch.minimum, torch.where,
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.mish, F.leaky_relu, F.elu, F.celu, F.selu,
    F.softplus, F.hardtanh, F.sigmoid, F.tanh,
})
RANDOM_FUNCTIONS = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
})
SPATIAL_FUNCTIONS = frozenset({F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate})
ELEMENTWISE_METHODS = frozenset({
    'add', 'add_', 'sub', 'sub_', 'mul', 'mul_', 'div', 'div_', 'neg', 'neg_', 'pow', 'pow_', 'sigmoid', 'sigmoid_',
    'tanh', 'tanh_', 'relu', 'relu_', 'exp', 'exp_', 'clamp', 'clamp_', 'clamp_min', 'clamp_min_', 'clamp_max',
    'clamp_max_', 'clip', 'clip_', 'abs', 'sqrt', 'rsqrt', 'square', 'float', 'half', 'bfloat16', 'double', 'to',
    'type_as', 'contiguous', 'clone', 'detach',
})
REDUCE_FUNCTIONS = {torch.mean: 'mean', torch.sum: 'sum', torch.amax: 'amax', torch.amin: 'amin'}
REDUCE_METHODS = frozenset({'mean', 'sum', 'amax', 'amin'})
# functions / methods drawing random numbers: on member-invariant inputs they would draw one sample for all members
RANDOM_NAMES = frozenset({
    'rand', 'randn', 'randint', 'rand_like', 'randn_like', 'randint_like', 'bernoulli', 'bernoulli_', 'normal',
    'normal_', 'uniform_', 'random_', 'exponential_', 'geometric_', 'cauchy_', 'log_normal_', 'multinomial',
    'randperm',
})
# attributes of a packed tensor that are the same as the member tensor's
SHAPE_ATTRIBUTES = frozenset({'ndim', 'dtype', 'device', 'is_cuda', 'requires_grad'})
