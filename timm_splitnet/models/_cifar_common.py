""" Shared pieces of the CIFAR member backbones

`CifarBackbone` (the timm classifier API: head, `get_classifier`, `reset_classifier`, `forward_head`, `forward`,
and timm's feature API `forward_intermediates` / `prune_intermediate_layers`), `init_weights_cifar`, `cifar_cfg`
(CIFAR-100, 32x32 inputs) and `reset_classifier_head`. See docs/models.md.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import create_classifier, get_device_dtype
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from ..data.transforms import CIFAR100_MEAN, CIFAR100_STD

__all__ = ['CifarBackbone', 'CIFAR100_MEAN', 'CIFAR100_STD', 'cifar_cfg', 'init_weights_cifar', 'reset_classifier_head']


def cifar_cfg(url: str = '', first_conv: str = 'conv1', classifier: str = 'fc', **kwargs) -> Dict[str, Any]:
    """Pretrained cfg of a CIFAR-100 model of the SplitNet experiments (32x32 inputs, 8x8 final maps).

    Args:
        url: Weights URL ('' for none).
        first_conv: Module name of the first conv.
        classifier: Module name of the classifier.
        **kwargs: Further cfg entries, override the defaults.
    """
    return {
        'url': url, 'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR100_MEAN, 'std': CIFAR100_STD,
        'first_conv': first_conv, 'classifier': classifier,
        'paper_ids': 'arXiv:2011.14660', 'paper_name': 'SplitNet: Divide and Co-training',
        **kwargs,
    }


def init_weights_cifar(model: nn.Module, linear_std: Optional[float] = None) -> None:
    """Kaiming (fan_out, ReLU) conv weights, conv biases 0, BN weight 1 / bias 0, Linear bias 0.

    Args:
        model: Module whose submodules are initialized in place.
        linear_std: Std of a normal init of the Linear weights, None keeps PyTorch's default init.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, std=linear_std)
            nn.init.zeros_(m.bias)


def reset_classifier_head(
        model: nn.Module,
        num_classes: int,
        global_pool: Optional[str] = None,
        classifier_attr: str = 'fc',
) -> None:
    """Replace `model.global_pool` and the classifier `model.<classifier_attr>` (timm's `reset_classifier`).

    Args:
        model: Model with `num_features` and a `global_pool` module; `num_classes` and `head_hidden_size` are set.
        num_classes: Outputs of the new classifier; 0 leaves an identity (pooled features out).
        global_pool: Pool type of the new head; None keeps the model's present one.
        classifier_attr: Module name of the classifier.
    """
    dd = get_device_dtype(model)
    model.num_classes = num_classes
    if global_pool is None:
        global_pool = model.global_pool.pool_type
    model.global_pool, classifier = create_classifier(model.num_features, num_classes, pool_type=global_pool, **dd)
    setattr(model, classifier_attr, classifier)
    model.head_hidden_size = model.num_features * model.global_pool.feat_mult()


class CifarBackbone(nn.Module):
    """timm classifier API of a backbone that ends in `global_pool` -> `head_drop` -> classifier.

    Subclasses set `num_classes` and build their layers in `__init__`, call `_init_head` once the number of output
    features is known, and implement `forward_features`. `set_grad_checkpointing` toggles `self.grad_checkpointing`,
    which `forward_features` of a staged model reads; models that checkpoint otherwise override it.

    timm's feature API (`forward_intermediates`, `prune_intermediate_layers`, `features_only=True` through
    `feature_cls='getter'`) is derived from `feature_levels`: the modules that run, in order, up to each entry of
    `feature_info`, and `final_modules`: those after the last level up to the `forward_features` output (the final
    norm / activation).
    """
    classifier_attr: str = 'fc'  # module name of the classifier (its state-dict key prefix)
    feature_levels: Sequence[Sequence[str]] = ()  # module names run up to each feature_info entry
    final_modules: Sequence[str] = ()  # module names after the last level (the `norm` of forward_intermediates)

    def _init_head(
            self,
            num_features: int,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """Create the head: `global_pool`, the classifier (`classifier_attr`) and `head_drop`, in that order.

        Args:
            num_features: Channels of the `forward_features` output.
            global_pool: Pool type, e.g. 'avg', 'max' or 'avgmax'.
            drop_rate: Dropout probability of the pooled features, in front of the classifier.
        """
        self.num_features = self.head_hidden_size = num_features
        self.global_pool, classifier = create_classifier(
            num_features, self.num_classes, pool_type=global_pool, device=device, dtype=dtype)
        setattr(self, self.classifier_attr, classifier)
        self.head_drop = nn.Dropout(drop_rate)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Switch gradient checkpointing of the block stages on or off (RNG state is replayed on recompute)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head."""
        return getattr(self, self.classifier_attr)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier head.

        Args:
            num_classes: Outputs of the new classifier; 0 leaves an identity (pooled features out).
            global_pool: Pool type of the new head; None keeps the present one.
        """
        reset_classifier_head(self, num_classes, global_pool, classifier_attr=self.classifier_attr)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled NCHW feature map, implemented by each model."""
        raise NotImplementedError

    def _run_modules(self, names: Sequence[str], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            module = self.get_submodule(name)
            if getattr(self, 'grad_checkpointing', False) and isinstance(module, nn.Sequential) \
                    and not torch.jit.is_scripting():
                x = checkpoint_seq(module, x)  # one checkpoint per block of the stage
            else:
                x = module(x)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns the intermediates of the `feature_info` levels.

        Args:
            x: Images, NCHW.
            indices: Take the last n levels if int, all if None, the listed levels if a sequence.
            norm: Apply the final norm / activation (`final_modules`) to the last level.
            stop_early: Stop after the last requested level.
            output_fmt: Shape of the intermediates, only 'NCHW'.
            intermediates_only: Return the intermediates only.

        Returns:
            The `forward_features` output and the list of intermediates, or the intermediates only.
        """
        assert output_fmt == 'NCHW', f"output_fmt {output_fmt!r}: these backbones give NCHW maps only"
        intermediates = []
        num_levels = len(self.feature_levels)
        take_indices, max_index = feature_take_indices(num_levels, indices)
        last_run = max_index if stop_early else num_levels - 1
        for level_idx, names in enumerate(self.feature_levels[:last_run + 1]):
            x = self._run_modules(names, x)
            if level_idx in take_indices:
                is_last = level_idx == num_levels - 1
                intermediates.append(self._run_modules(self.final_modules, x) if norm and is_last else x)
        if intermediates_only:
            return intermediates
        if last_run == num_levels - 1:
            x = self._run_modules(self.final_modules, x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune the layers the requested levels do not need (empty `nn.Sequential`s take their place).

        Args:
            indices: Levels to keep (as `forward_intermediates`).
            prune_norm: Prune the final norm / activation.
            prune_head: Prune the classifier head.

        Returns:
            The absolute indices of the kept levels.
        """
        num_levels = len(self.feature_levels)
        take_indices, max_index = feature_take_indices(num_levels, indices)
        prune_end = max_index < num_levels - 1
        pruned = [n for names in self.feature_levels[max_index + 1:] for n in names]
        if prune_norm or prune_end:
            pruned += list(self.final_modules)
        for name in pruned:
            parent, _, attr = name.rpartition('.')
            setattr(self.get_submodule(parent) if parent else self, attr, nn.Sequential())
        if prune_end:
            # num_features follows the new last level; a classifier built for the old width is useless: drop it
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling, dropout and classifier.

        Args:
            x: Feature map from `forward_features`.
            pre_logits: Return the pooled features instead of the logits.
        """
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else getattr(self, self.classifier_attr)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x
