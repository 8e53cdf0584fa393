""" SplitNet: S width-divided member networks in one timm classifier

`SplitNet` holds S members built by `timm.create_model` with the kwargs of `division.member_kwargs`: their ensemble
[B, C] by default, the member logits [S, B, C] in train mode once co-training is switched on (`set_cotraining`, as
timm's `VisionTransformerDistilled.set_distilled_training`). `create_splitnet(arch, S)` builds any S the division
rule defines; the registered `splitnet_<arch>_s<S>` entrypoints are in `splitnet_entrypoints.py`. See docs/models.md.

Paper: `SplitNet: Divide and Co-training` - https://arxiv.org/abs/2011.14660
"""
import json
import logging
import os
import re
import warnings
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Swish
from timm.models import build_model_with_cfg
from timm.models._features import FeatureGetterNet, FeatureInfo

from ._backends import dense_view, resolve_backend
from .division import SPLIT_ARCHS, divide_drop_rate, get_split_arch, member_kwargs

__all__ = [
    'SplitNet', 'create_splitnet', 'create_model', 'parse_splitnet_name', 'splitnet_cfg', 'splitnet_name',
    'ensemble_training_message', 'ENSEMBLE_MODES', 'REGISTERED_SPLIT_FACTORS', 'BUILD_ARGS_KEY', 'DATA_CFG_KEY',
    'MEMBER_ACT_LAYERS', 'resolve_member_act_layer',
]

# `act_layer` names of this package for the members, beside timm's: 'swish_mul' is x * sigmoid(x) as two ops (timm's
# Swish), the way the authors' EfficientNet code computes it; timm's 'swish' / 'silu' is torch's fused SiLU, the same
# function rounded otherwise in float32
MEMBER_ACT_LAYERS = {'swish_mul': Swish}


def resolve_member_act_layer(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """`kwargs` for a member's `timm.create_model`, an `act_layer` name of MEMBER_ACT_LAYERS replaced by its layer."""
    act_layer = kwargs.get('act_layer')
    if isinstance(act_layer, str) and act_layer in MEMBER_ACT_LAYERS:
        kwargs = dict(kwargs, act_layer=MEMBER_ACT_LAYERS[act_layer])
    return kwargs


_logger = logging.getLogger(__name__)

ENSEMBLE_MODES = ('mean', 'max')
# the S whose `splitnet_<arch>_s<S>` entrypoints are written out in splitnet_entrypoints.py; every other S a division
# rule defines is registered there too, by a loop
REGISTERED_SPLIT_FACTORS = (1, 2, 4)
# safetensors metadata keys (JSON dicts) of converted weights: the member kwargs they need (e.g. the authors' BN eps)
# and the pretrained-cfg entries of the run that trained them (input size, normalisation)
BUILD_ARGS_KEY = 'build_args'
DATA_CFG_KEY = 'data_config'


def ensemble_training_message(name: str) -> str:
    """The one-line warning of a SplitNet trained without co-training (its train-mode forward is the ensemble)."""
    return (f'{name} is in train mode without co-training: forward returns the mean of the member logits [B, C], so '
            f'the members are trained as one averaged model, without views or co-training loss. To co-train, use '
            f"timm_splitnet's train.py, or call model.set_cotraining(True) and train the member logits [S, B, C] "
            f'with timm_splitnet.CoTrainingLoss.')


class SplitNet(nn.Module):
    """S independently initialised member networks trained together and ensembled at inference.

    The state dict holds the members as `models.{i}.<member keys>`, whatever the execution backend.

    Like timm's `VisionTransformerDistilled`, the model answers timm's training contract (`loss_fn(model(x),
    target)`) with one output unless the trainer asks for the members': without co-training (the default) forward
    returns the mean of the member logits [B, C] in train mode too (and warns once, in train mode with gradients);
    `set_cotraining(True)` makes train-mode forward return the member logits [S, B, C] for `CoTrainingLoss`.
    """

    def __init__(
            self,
            member_name: str,
            split_factor: int,
            member_kwargs: Optional[Dict[str, Any]] = None,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            ensemble: str = 'mean',
            ensemble_softmax: bool = False,
            split_backend: str = 'loop',
            **kwargs,
    ):
        """
        Args:
            member_name: timm model name of one member.
            split_factor: Number of members S.
            member_kwargs: Divided kwargs of every member (`timm_splitnet.models.division.member_kwargs`).
            num_classes: Number of classes of every member.
            in_chans: Input channels of one view.
            global_pool: Global pool type of every member.
            drop_rate: Classifier dropout of the undivided network, divided by sqrt(S) for each member.
            drop_path_rate: Stochastic depth of the undivided network, divided by sqrt(S) for each member.
            ensemble: How eval mode combines the members: 'mean' (default, eq. 10) or 'max'.
            ensemble_softmax: Combine softmax probabilities instead of logits (Table 9).
            split_backend: Execution backend of the members (see `set_split_backend`).
            **kwargs: Passed to every member's `timm.create_model` (e.g. bn_momentum).
        """
        super().__init__()
        if not isinstance(split_factor, int) or split_factor < 1:
            raise ValueError(f'SplitNet: split_factor must be a positive integer, got {split_factor!r}.')
        self.member_name = member_name
        self.split_factor = split_factor
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.grad_checkpointing = False
        member_args = resolve_member_act_layer(dict(member_kwargs or {}, **kwargs))
        member_args['drop_rate'] = divide_drop_rate(drop_rate, split_factor)
        if drop_path_rate:
            member_args['drop_path_rate'] = divide_drop_rate(drop_path_rate, split_factor)
        # every create_model call draws its own random init: the members are initialised independently
        self.models = nn.ModuleList([
            timm.create_model(member_name, num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
                              **member_args)
            for _ in range(split_factor)
        ])
        member = self.models[0]
        self.num_features = split_factor * member.num_features
        self.head_hidden_size = split_factor * getattr(member, 'head_hidden_size', member.num_features)
        self.ensemble = ensemble
        self.ensemble_softmax = ensemble_softmax
        self.set_ensemble(ensemble, ensemble_softmax)
        self.split_backend = 'loop'
        self.set_split_backend(split_backend)
        self.cotraining = False  # must be set True (set_cotraining) to train the member logits [S, B, C]
        self._warned_ensemble_training = False
        self.feature_info = self._splitnet_feature_info()

    # ----- configuration -----

    def set_ensemble(self, ensemble: str = 'mean', ensemble_softmax: bool = False) -> None:
        """Select how eval mode combines the members (Table 9): mean or max, of logits or of probabilities."""
        if ensemble not in ENSEMBLE_MODES:
            raise ValueError(f'SplitNet: unknown ensemble {ensemble!r}, expected one of {ENSEMBLE_MODES}.')
        self.ensemble = ensemble
        self.ensemble_softmax = bool(ensemble_softmax)

    @torch.jit.ignore
    def set_cotraining(self, enable: bool = True) -> None:
        """Return the member logits [S, B, C] in train mode (co-training), or their mean [B, C] (default).

        Eval mode always returns the ensemble and `forward_members` always the member logits.
        """
        self.cotraining = bool(enable)

    def set_split_backend(self, name: str = 'loop') -> None:
        """Select how the members are executed; every backend gives the same outputs and gradients.

        Args:
            name: A registered split backend: 'loop', 'packed', 'vmap', 'auto' (see docs/backends.md).
        """
        self.split_backend = resolve_backend(name, self.models)

    def prepare_split_backend(self) -> None:
        """Build the backend's programs for train and eval mode now; call before `torch.compile` (docs/backends.md)."""
        self.split_backend.prepare(self.models)

    def __prepare_scriptable__(self) -> 'SplitNet':
        """Called by `torch.jit.script` before it compiles a module: refuse with what works instead."""
        raise RuntimeError(
            f'{self.describe()}: TorchScript (torch.jit.script) is not supported; use torch.export.export, '
            f'torch.jit.trace (a fixed input layout) or torch.compile.')

    # ----- timm model API -----

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The member's matcher applied to every member: layer i of all members share one layer-decay group."""
        def prefix(pattern: str) -> str:
            return r'^models\.\d+\.(?:' + pattern.lstrip('^') + ')'

        matcher = {}
        for group, spec in self.models[0].group_matcher(coarse=coarse).items():
            if isinstance(spec, str):
                matcher[group] = prefix(spec)
            else:
                matcher[group] = [(prefix(pattern), ordinal) for pattern, ordinal in spec]
        return matcher

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for m in self.models:
            m.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        names = set()
        for i, m in enumerate(self.models):
            if hasattr(m, 'no_weight_decay'):
                names.update(f'models.{i}.{n}' for n in m.no_weight_decay())
        return names

    @torch.jit.ignore
    def get_classifier(self) -> nn.ModuleList:
        return nn.ModuleList([m.get_classifier() for m in self.models])

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        for m in self.models:
            if global_pool is None:
                m.reset_classifier(num_classes)
            else:
                m.reset_classifier(num_classes, global_pool)

    # ----- forward -----

    def split_views(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The input of every member: the same image [B, C, H, W], or view i of [B, S*C, H, W]."""
        channels = _static_channels(x)
        if channels == self.in_chans:
            return [x] * self.split_factor
        if channels == self.in_chans * self.split_factor:
            return list(x.chunk(self.split_factor, dim=1))
        raise ValueError(
            f'SplitNet({self.member_name} x {self.split_factor}): expected an input [B, {self.in_chans}, H, W] '
            f'(every member sees the same image) or [B, {self.split_factor * self.in_chans}, H, W] '
            f'(member i sees its own view), got {list(x.shape)}.')

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every member, [S, B, num_classes], in train and eval mode alike."""
        return self.split_backend.forward_members(self.models, self.split_views(x))

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """Ensemble member outputs [S, B, C] into [B, C] the configured way (eq. 10 by default)."""
        if self.ensemble_softmax:
            logits = logits.float().softmax(dim=-1)
        return logits.mean(0) if self.ensemble == 'mean' else logits.amax(0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features of the members concatenated along channels, [B, S * member.num_features, h, w]."""
        return torch.cat([m.forward_features(dense_view(v)) for m, v in zip(self.models, self.split_views(x))], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Each member's head on its channel slice of `forward_features`; pre-logits are concatenated."""
        outs = [m.forward_head(f, pre_logits=pre_logits) for m, f in zip(self.models, x.chunk(self.split_factor, 1))]
        return self._finish(outs, pre_logits)

    def _finish(self, outs: Iterable[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        outs = list(outs)
        if pre_logits or self.num_classes == 0:
            return torch.cat(outs, dim=1)
        logits = torch.stack(outs)
        if not self.training:
            return self.combine(logits)
        if self.cotraining:
            return logits
        self._warn_ensemble_training()
        return logits.mean(0)  # the trained model is the mean of the logits, whatever the eval ensemble

    def _warn_ensemble_training(self) -> None:
        if self._warned_ensemble_training or not torch.is_grad_enabled():
            return
        if torch.jit.is_scripting() or torch.compiler.is_compiling():
            return
        self._warned_ensemble_training = True
        _logger.warning(ensemble_training_message(self.describe()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble [B, C]; member logits [S, B, C] in train mode with co-training on. Without classifier:
        the members' pooled features concatenated."""
        return self._finish(self.forward_members(x).unbind(0))

    # ----- feature extraction (timm's forward_intermediates API) -----

    def _splitnet_feature_info(self) -> List[Dict[str, Any]]:
        """Every feature level of the members: S x the member's channels, the member's reduction and module."""
        info = self.models[0].feature_info
        dicts = info.get_dicts() if isinstance(info, FeatureInfo) else info
        return [dict(d, num_chs=self.split_factor * d['num_chs']) for d in dicts]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The members' `forward_intermediates`, each level concatenated along channels (member i on view i).

        Args:
            x: Input image [B, C, H, W] (every member) or views [B, S*C, H, W] (member i sees view i).
            indices: Take the last n levels if int, all if None, the listed levels if a sequence.
            norm: Apply the members' final norm to compatible intermediates.
            stop_early: Stop after the last requested level.
            output_fmt: Shape of the intermediates ('NCHW').
            intermediates_only: Return the intermediates only.

        Returns:
            The concatenated final features and the list of concatenated intermediates, or the intermediates only.
        """
        cat_dim = -1 if output_fmt == 'NHWC' else 1
        outs = [
            m.forward_intermediates(
                dense_view(v), indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                intermediates_only=intermediates_only)
            for m, v in zip(self.models, self.split_views(x))]
        if intermediates_only:
            return [torch.cat(level, dim=cat_dim) for level in zip(*outs)]
        final = torch.cat([out[0] for out in outs], dim=cat_dim)
        return final, [torch.cat(level, dim=cat_dim) for level in zip(*(out[1] for out in outs))]

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune every member to the layers the requested levels need (the members' `prune_intermediate_layers`).

        Returns:
            The absolute indices of the kept levels.
        """
        take_indices = [
            m.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head) for m in self.models]
        member = self.models[0]
        self.num_classes = member.num_classes
        member_features = member.num_features
        if prune_head and take_indices[0]:
            # the last kept level's channels: timm < 1.0.31 leaves a pruned ResNet's / EfficientNet's num_features
            member_features = member.feature_info[max(take_indices[0])]['num_chs']
        self.num_features = self.split_factor * member_features
        self.head_hidden_size = self.split_factor * getattr(member, 'head_hidden_size', member.num_features)
        if prune_head:
            self.head_hidden_size = self.num_features
        self.set_split_backend(str(self.split_backend))  # the members changed: rebuild the backend's caches
        return take_indices[0]

    # ----- weights -----

    def describe(self) -> str:
        """`name (S=.., N classes)` for messages."""
        name = getattr(self, 'pretrained_cfg', {}).get('architecture') or f'SplitNet({self.member_name})'
        return f'{name} (S={self.split_factor}, {self.num_classes} classes)'

    def check_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True, source: str = '') -> None:
        """Raise a ValueError naming both sides when `state_dict` is not a state dict of this SplitNet.

        With `strict=False` only the classifier may be missing (timm drops it to adapt the head).
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if not strict:
            heads = {f'models.{i}.{n}' for i, m in enumerate(self.models) for n, _ in _classifier_params(m)}
            missing = [k for k in missing if k not in heads]
            unexpected = []
        if not (missing or unexpected or mismatched):
            return
        members = sorted({int(k.split('.')[1]) for k in state_dict if k.startswith('models.') and
                          k.split('.')[1].isdigit()})
        found = f'{len(members)} member(s)' if members else 'no SplitNet members (keys like ' + \
            ', '.join(repr(k) for k in list(state_dict)[:2]) + ')'
        head_name = next((n for n, _ in _classifier_params(self.models[0]) if n.endswith('weight')), None)
        head_key = f'models.0.{head_name}' if head_name else None
        if head_key in state_dict:
            found += f', {state_dict[head_key].shape[0]} classes'
        lines = [f'Weights{" from " + source if source else ""} do not fit {self.describe()}: they hold {found}.']
        if mismatched:
            k = mismatched[0]
            lines.append(f'{len(mismatched)} shape mismatch(es), e.g. {k}: weights {list(state_dict[k].shape)} '
                         f'vs model {list(own[k].shape)}.')
        if missing:
            lines.append(f'{len(missing)} key(s) missing from the weights, e.g. {missing[0]}.')
        if unexpected:
            lines.append(f'{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}.')
        raise ValueError(' '.join(lines))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, but a state dict of another (arch, S, num_classes) raises a clear error."""
        self.check_state_dict(state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _static_channels(x: torch.Tensor) -> Optional[int]:
    """The channel count of an image batch [B, C, H, W] (None for other shapes).

    Under `torch.jit.trace` the count is read as a constant: a trace is specialised to the example's layout (one
    image or S views) by design, so the conversion's TracerWarning would only be noise.
    """
    if x.ndim != 4:
        return None
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            return int(x.shape[1])
    return x.shape[1]


def _classifier_params(member: nn.Module) -> List[tuple]:
    classifier = member.get_classifier()
    names = {id(p): n for n, p in member.named_parameters()}
    return [(names[id(p)], p) for p in classifier.parameters() if id(p) in names]


# ----- factory -----

def splitnet_name(arch: str, split_factor: int) -> str:
    """Registry name of `arch` divided into `split_factor` members."""
    return f'splitnet_{arch}_s{split_factor}'


_SPLITNET_NAME = re.compile(r'^splitnet_(?P<arch>.+)_s(?P<split_factor>\d+)$')


def parse_splitnet_name(name: str) -> Optional[Tuple[str, int]]:
    """(arch, S) of a `splitnet_<arch>_s<S>` name whose arch is in `SPLIT_ARCHS` (whatever S), else None."""
    match = _SPLITNET_NAME.match(name)
    if match is None or match['arch'] not in SPLIT_ARCHS:
        return None
    return match['arch'], int(match['split_factor'])


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """`timm.create_model`, with the division rule's message for a SplitNet whose S the rule does not define.

    Every S a rule defines is registered in timm; for another S timm only says "Unknown model". This names the
    supported S instead, for plain names and for `local-dir:` / `hf-hub:` configs alike.

    Raises:
        ValueError: `splitnet_<arch>_s<S>` of a known arch and an S its rule does not define.
    """
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        unknown = re.fullmatch(r'Unknown model \((.+)\)', str(e))
        parsed = parse_splitnet_name(unknown[1]) if unknown else None
        if parsed is None:
            raise
        try:
            member_kwargs(*parsed)
        except ValueError as rule:  # the rule's message, not timm's
            raise rule from None
        raise


def splitnet_cfg(arch: str, split_factor: int) -> Dict[str, Any]:
    """Pretrained cfg of `arch` divided into `split_factor` members, derived from the member model's cfg."""
    spec = get_split_arch(arch)
    member_cfg = timm.models.get_pretrained_cfg(spec.member)
    if member_cfg is None:
        raise RuntimeError(f'{arch}: its member model {spec.member!r} is not registered in timm.')
    first_conv = spec.first_conv or member_cfg.first_conv
    classifier = member_cfg.classifier
    cfg = dict(
        url='',
        num_classes=member_cfg.num_classes,
        input_size=member_cfg.input_size,
        pool_size=member_cfg.pool_size,
        crop_pct=member_cfg.crop_pct,
        interpolation=member_cfg.interpolation,
        mean=member_cfg.mean,
        std=member_cfg.std,
        first_conv=tuple(f'models.{i}.{first_conv}' for i in range(split_factor)),
        classifier=tuple(f'models.{i}.{classifier}' for i in range(split_factor)),
        paper_ids='arXiv:2011.14660',
        paper_name='SplitNet: Divide and Co-training',
        description=f'{spec.description} divided into {split_factor} co-trained member(s)',
        license='apache-2.0',
    )
    if spec.dataset == 'imagenet':
        # the paper's ImageNet evaluation: resize to 1.15x the crop (bicubic), center crop
        cfg.update(
            num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=round(1 / 1.15, 4),
            interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return cfg


def _safetensors_metadata(path: str) -> Dict[str, str]:
    if not (isinstance(path, str) and path.endswith('.safetensors') and os.path.isfile(path)):
        return {}
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        return dict(f.metadata() or {})


def create_splitnet(arch: str, split_factor: int, pretrained: bool = False, **kwargs) -> SplitNet:
    """Build `arch` divided into `split_factor` members (any S its division rule defines).

    Args:
        arch: Architecture name, e.g. 'wrn28_10' (see `timm_splitnet.models.division.SPLIT_ARCHS`).
        split_factor: Number of members S.
        pretrained: Load weights from the pretrained cfg, e.g. `pretrained_cfg_overlay=dict(file='x.safetensors')`.
        **kwargs: `SplitNet` / `timm.create_model` kwargs (num_classes, in_chans, drop_rate, drop_path_rate, ...).
    """
    spec = get_split_arch(arch)
    divided = member_kwargs(arch, split_factor)
    variant = splitnet_name(arch, split_factor)
    kwargs.pop('pretrained_model_args', None)  # timm >= 1.0.31 hub/local-dir loading
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    if pretrained_cfg is None and not timm.is_model(variant):
        pretrained_cfg = splitnet_cfg(arch, split_factor)
        pretrained_cfg['architecture'] = variant
    meta = _safetensors_metadata(overlay.get('file', '')) if pretrained else {}
    if meta.get('architecture') and meta['architecture'] != variant:
        raise ValueError(
            f'{overlay["file"]} holds weights of {meta["architecture"]} (S={meta.get("split_factor", "?")}, '
            f'{meta.get("num_classes", "?")} classes), not of {variant}.')
    if meta.get('num_classes'):
        # exported weights know their head: build it unless the caller asks for another head (then timm adapts it)
        overlay.setdefault('num_classes', int(meta['num_classes']))
        kwargs.setdefault('num_classes', int(meta['num_classes']))
    for key, value in json.loads(meta.get(BUILD_ARGS_KEY) or '{}').items():
        # settings without weights that the file's weights need (e.g. converted from the authors' code)
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f'{overlay["file"]} needs {variant} built with {key}={value!r}, not {kwargs[key]!r}.')
        kwargs[key] = value
    # the input the weights were trained at (size, crop, mean / std), unless the caller's overlay says otherwise
    for key, value in json.loads(meta.get(DATA_CFG_KEY) or '{}').items():
        overlay.setdefault(key, tuple(value) if isinstance(value, list) else value)
    feature_cls = kwargs.get('feature_cls', 'getter')
    if kwargs.get('features_only') and feature_cls not in ('getter', FeatureGetterNet):
        raise ValueError(
            f"{variant}: features_only supports feature_cls='getter' (the default) only, not {feature_cls!r}: a "
            f"SplitNet's feature level is the members' outputs concatenated, which timm's hook / fx / list "
            f"extractors cannot take from single modules.")
    model_args = dict(kwargs)  # what rebuilds this model (exported to config.json, as timm.create_model records it)
    kwargs.setdefault('drop_rate', spec.drop_rate)
    model = build_model_with_cfg(
        SplitNet,
        variant,
        pretrained,
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=overlay or None,
        # features_only: timm's FeatureGetterNet over forward_intermediates, every level of the members by default
        feature_cfg=dict(feature_cls='getter', out_indices=None),
        member_name=spec.member,
        split_factor=split_factor,
        member_kwargs=divided,
        **kwargs,
    )
    model._model_args = dict(getattr(model, '_model_args', {}), **model_args)
    return model

