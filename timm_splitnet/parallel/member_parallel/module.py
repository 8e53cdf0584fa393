""" `MemberParallelSplitNet`: the members of a SplitNet that one rank owns, with the forward over all members """
import copy
import logging
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from timm.utils import unwrap_model

from ...models.splitnet import ensemble_training_message
from .collectives import batch_fingerprint, check_same, gather_member_logits
from .plan import GRAD_MODES, MemberParallelPlan

__all__ = ['MemberParallelSplitNet', 'member_parallel_forward', 'unwrap_member_parallel', 'member_index']

_logger = logging.getLogger(__name__)


def member_index(key: str) -> Optional[int]:
    """The member of a SplitNet state dict key (`models.{i}.*`), None for other keys."""
    parts = key.split('.', 2)
    if len(parts) >= 2 and parts[0] == 'models' and parts[1].isdigit():
        return int(parts[1])
    return None


class MemberParallelSplitNet(nn.Module):
    """The members of a SplitNet that this rank owns, with the SplitNet forward over all members.

    Only the owned members are submodules (`models.{i}` for i in `plan.members`): they alone are moved to the
    device, run, receive gradients, appear in `parameters()` (optimizer, DDP, EMA) and in `state_dict()` (whose keys
    are the single-process keys of these members). Wrapping takes the SplitNet apart: its owned members move here,
    the others are released (moved to the meta device), and what is left is kept as a weightless skeleton for
    `to_splitnet` and for checking full state dicts. Build the SplitNet with the same seed on every rank to start
    from the weights a single-process run with that seed starts from.

    Forward (train and eval): `forward_members(x)` runs the owned members on their inputs and all-gathers the
    logits of all S members, [S, B, C] on every rank (a collective: every rank of the replica calls it with a batch
    of the same samples). `forward` returns them in train mode with co-training on (`set_cotraining`, taken from the
    SplitNet) and their ensemble [B, C] otherwise, like `SplitNet.forward`. The input is `[B, C, H, W]` (every
    member sees the same image), `[B, k*C, H, W]` (the views of the k owned members, in member order) or
    `[B, S*C, H, W]` (all views; each member takes its own).
    """

    def __init__(
            self,
            model: nn.Module,
            plan: MemberParallelPlan,
            device: Optional[Union[str, torch.device]] = None,
            grad_mode: str = 'local',
    ):
        """
        Args:
            model: A `SplitNet` (not wrapped); taken apart, see above.
            plan: The layout, with its groups created (`init_groups`).
            device: Device of the owned members (default: where they are).
            grad_mode: Backward of the logits gather (see `gather_member_logits`); 'local' for the co-training
                loss computed alike on every rank (`MemberParallelTask`).
        """
        super().__init__()
        if not (hasattr(model, 'models') and hasattr(model, 'split_factor') and hasattr(model, 'combine')):
            raise TypeError(f'MemberParallelSplitNet needs a SplitNet, got {type(model).__name__}.')
        if model.split_factor != plan.split_factor:
            raise ValueError(f'MemberParallelSplitNet: the model has S={model.split_factor} members but the plan is '
                             f'for S={plan.split_factor}.')
        if grad_mode not in GRAD_MODES:
            raise ValueError(f'MemberParallelSplitNet: grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}.')
        plan.check_ready()
        self.plan = plan
        self.grad_mode = grad_mode
        self.members = plan.members
        self.split_factor = model.split_factor
        self.member_name = model.member_name
        self.num_classes = model.num_classes
        self.in_chans = model.in_chans
        self.num_features = model.num_features
        self.head_hidden_size = getattr(model, 'head_hidden_size', model.num_features)
        self.ensemble = model.ensemble
        self.ensemble_softmax = model.ensemble_softmax
        self.grad_checkpointing = getattr(model, 'grad_checkpointing', False)
        self.cotraining = getattr(model, 'cotraining', False)
        self._warned_ensemble_training = False
        for attr in ('pretrained_cfg', 'default_cfg', 'pretrained_cfg_overlay'):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

        # a CPU copy of one member: non-persistent buffers and structure for to_splitnet
        template = copy.deepcopy(model.models[self.members[0]]).cpu()
        owned = OrderedDict()
        for i in range(self.split_factor):
            member = model.models[i]
            if i in self.members:
                owned[str(i)] = member
                model.models[i] = copy.deepcopy(template).to('meta')
            else:
                model.models[i] = member.to('meta')
        model.set_split_backend('loop')
        self.models = nn.ModuleDict(owned)
        if device is not None:
            self.models.to(device)
        self._skeleton = [model]  # in lists: not submodules (no parameters, not in state_dict / .to())
        self._template = [template]
        self._checked_modes = set()

    # ----- configuration -----

    @property
    def owned(self) -> List[nn.Module]:
        """The owned member modules, in `members` order."""
        return [self.models[str(i)] for i in self.members]

    def describe(self) -> str:
        name = (getattr(self, 'pretrained_cfg', None) or {}).get('architecture') or f'SplitNet({self.member_name})'
        return f'{name} (S={self.split_factor}, {self.num_classes} classes), member-parallel {self.plan.describe()}'

    @torch.jit.ignore
    def set_cotraining(self, enable: bool = True) -> None:
        """Return all members' logits [S, B, C] in train mode (co-training), or their mean [B, C] (as SplitNet)."""
        self.cotraining = bool(enable)
        self._skeleton[0].set_cotraining(enable)

    def set_ensemble(self, ensemble: str = 'mean', ensemble_softmax: bool = False) -> None:
        self._skeleton[0].set_ensemble(ensemble, ensemble_softmax)
        self.ensemble = ensemble
        self.ensemble_softmax = bool(ensemble_softmax)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return self._skeleton[0].group_matcher(coarse=coarse)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for m in self.owned:
            m.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = set()
        for i, m in zip(self.members, self.owned):
            if hasattr(m, 'no_weight_decay'):
                names.update(f'models.{i}.{n}' for n in m.no_weight_decay())
        return names

    @torch.jit.ignore
    def get_classifier(self) -> nn.ModuleList:
        return nn.ModuleList([m.get_classifier() for m in self.owned])

    # ----- forward -----

    def local_views(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The input of every owned member (see the class docstring for the accepted layouts)."""
        channels = x.shape[1] if x.ndim == 4 else None
        k = len(self.members)
        if channels == self.in_chans:
            return [x] * k
        if channels == self.in_chans * k:
            return list(x.chunk(k, dim=1))
        if channels == self.in_chans * self.split_factor:
            views = x.chunk(self.split_factor, dim=1)
            return [views[i] for i in self.members]
        raise ValueError(
            f'{self.describe()}: expected an input [B, {self.in_chans}, H, W] (every member sees the same image), '
            f'[B, {k * self.in_chans}, H, W] (the views of the {k} owned member(s)) or '
            f'[B, {self.split_factor * self.in_chans}, H, W] (all views), got {list(x.shape)}.')

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the owned members only, [k, B, C]; no communication."""
        return torch.stack([m(v) for m, v in zip(self.owned, self.local_views(x))])

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of all S members [S, B, C], on every rank (a collective over the replica's ranks)."""
        mode = 'train' if self.training else 'eval'
        if mode not in self._checked_modes and self.plan.cross_group is not None:
            # the first batch in each mode: same shapes everywhere; in eval (shared input) the same images too
            shared = x.ndim == 4 and x.shape[1] in (self.in_chans, self.split_factor * self.in_chans)
            fingerprint = batch_fingerprint(x) if shared and not self.training else batch_fingerprint(x)[:5]
            check_same(self.plan, f'{mode} input batch', fingerprint)
            self._checked_modes.add(mode)
        return gather_member_logits(self.forward_local(x), self.plan, self.grad_mode)

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """Ensemble member outputs [S, B, C] into [B, C] the configured way (as `SplitNet.combine`)."""
        if self.ensemble_softmax:
            logits = logits.float().softmax(dim=-1)
        return logits.mean(0) if self.ensemble == 'mean' else logits.amax(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble [B, C]; member logits [S, B, C] in train mode with co-training on. Without classifier:
        features."""
        outs = self.forward_members(x)
        if self.num_classes == 0:
            return torch.cat(outs.unbind(0), dim=1)
        if not self.training:
            return self.combine(outs)
        if self.cotraining:
            return outs
        if not self._warned_ensemble_training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._warned_ensemble_training = True
            _logger.warning(ensemble_training_message(self.describe()))
        return outs.mean(0)

    # ----- weights -----

    def check_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True, source: str = '') -> None:
        """Raise a ValueError naming both sides when `state_dict` is not a full state dict of this SplitNet."""
        self._skeleton[0].check_state_dict(state_dict, strict=strict, source=source)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load the owned members from a full SplitNet state dict (`models.{i}.*` for all i), or from one that
        holds exactly the owned members. A state dict of another (arch, S, num_classes) raises a clear error."""
        present = {member_index(k) for k in state_dict}
        if present - set(self.members):
            self.check_state_dict(state_dict, strict=strict)
            state_dict = OrderedDict((k, v) for k, v in state_dict.items() if member_index(k) in self.members)
        elif strict and set(state_dict) != set(self.state_dict()):
            self.check_state_dict(state_dict, strict=True)  # raises with both sides named
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def to_splitnet(self, state_dict: Dict[str, torch.Tensor], device: Union[str, torch.device] = 'cpu') -> nn.Module:
        """A full `SplitNet` on `device` holding `state_dict` (e.g. from `gather_state_dict`), for export / eval.

        The SplitNet has this model's pretrained cfg, ensemble settings and train / eval mode. No communication:
        call it where the gathered state dict is (rank 0).
        """
        model = copy.deepcopy(self._skeleton[0])  # members on the meta device: nothing is copied
        model.models = nn.ModuleList([copy.deepcopy(self._template[0]) for _ in range(self.split_factor)])
        model.set_split_backend('loop')
        model.set_ensemble(self.ensemble, self.ensemble_softmax)
        model.load_state_dict(state_dict)
        return model.to(device).train(self.training)

    def extra_repr(self) -> str:
        return f'{self.plan.describe()}, grad_mode={self.grad_mode}'


def unwrap_member_parallel(model: nn.Module) -> MemberParallelSplitNet:
    """The MemberParallelSplitNet inside DDP / torch.compile / EMA wrappers (TypeError for any other model)."""
    base = unwrap_model(model)
    if not isinstance(base, MemberParallelSplitNet):
        raise TypeError(f'Expected a MemberParallelSplitNet (possibly in DDP / EMA), got {type(base).__name__}.')
    return base


@torch.no_grad()
def member_parallel_forward(
        model: nn.Module,
        x: torch.Tensor,
        members: bool = False,
) -> torch.Tensor:
    """Inference over the processes (validate / benchmark): every rank of a replica runs its members on the same
    batch and receives all members' logits; returns the ensemble [B, C] (or the members [S, B, C]) on every rank.

    A collective: every rank of the replica calls it with the same batch (`member_parallel_loader(...,
    is_training=False)` gives every rank of a replica the same samples).
    """
    mp = unwrap_member_parallel(model)
    logits = mp.forward_members(x)
    return logits if members else mp.combine(logits)

