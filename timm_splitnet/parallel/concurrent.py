""" Concurrent execution of SplitNet members on several devices (paper §5, Fig. 3 / Fig. 6)

`ConcurrentMembers` keeps a copy of member i on device i mod n and runs one host thread per device entry, gathering
the logits on the first device. Notes on threads, streams and autocast: `docs/training.md`.
"""
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ['ConcurrentMembers', 'cuda_devices', 'parse_devices', 'resolve_device', 'synchronize_devices']

DeviceLike = Union[str, torch.device]


def resolve_device(device: DeviceLike) -> torch.device:
    """`torch.device(device)`, checked to exist on this machine.

    Raises:
        ValueError: The string is not a device, or the device does not exist here (e.g. 'cuda:3' with 2 GPUs).
    """
    name = str(device).strip()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f'{name!r} is not a torch device (expected e.g. cpu, cuda, cuda:1, mps).') from e
    if dev.type == 'cpu':
        return dev
    if dev.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f'Device {name!r} requested but CUDA is not available on this machine.')
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise ValueError(f'Device {name!r} does not exist: this machine has {count} CUDA device(s) '
                             f'(cuda:0 .. cuda:{count - 1}).')
        return torch.device('cuda', index)
    backend = getattr(torch, dev.type, None)
    is_available = getattr(backend, 'is_available', None)
    if dev.type == 'mps':
        is_available = torch.backends.mps.is_available
    if is_available is None or not is_available():
        raise ValueError(f'Device {name!r} is not available on this machine.')
    return dev


def parse_devices(devices: Union[str, Sequence[DeviceLike]]) -> List[torch.device]:
    """Devices from a comma separated string ('cuda:0,cuda:1') or a sequence; every device is checked to exist."""
    if isinstance(devices, str):
        devices = [d for d in devices.split(',') if d.strip()]
    devices = [resolve_device(d) for d in devices]
    if not devices:
        raise ValueError('Expected at least one device.')
    return devices


def cuda_devices(devices: Iterable[DeviceLike]) -> List[torch.device]:
    """The distinct CUDA devices in `devices`, sorted (empty for CPU-only lists)."""
    return sorted({torch.device(d) for d in devices if torch.device(d).type == 'cuda'}, key=str)


def synchronize_devices(devices: Iterable[DeviceLike]) -> None:
    """Wait for all queued work on every CUDA device in `devices` (nothing to do for CPU)."""
    for d in cuda_devices(devices):
        torch.cuda.synchronize(d)


class ConcurrentMembers:
    """Run the members of a SplitNet concurrently, member i on `devices[i % len(devices)]`.

    Every placement is a deep copy of the member, so the wrapped model is left where it is (it may stay on the CPU)
    and the copies do not follow later changes of its weights (call `sync_weights()`). The copies take the model's
    train / eval mode at construction; `train()` / `eval()` switch them.

    Example:
        >>> runner = ConcurrentMembers(model.eval(), ['cuda:0', 'cuda:1'])
        >>> with torch.inference_mode():
        ...     probs = runner(images)  # ensemble on cuda:0, the way `model.combine` ensembles
    """

    def __init__(
            self,
            model: nn.Module,
            devices: Union[str, Sequence[DeviceLike]],
            amp_dtype: Optional[torch.dtype] = None,
            streams: bool = False,
    ):
        """
        Args:
            model: A `SplitNet` (anything with `models`, `split_views` and `combine`).
            devices: Device of every slot; member i runs in slot i mod n. A device may be named several times.
            amp_dtype: Run the members under autocast with this dtype (None: follow the caller's autocast state).
            streams: On CUDA, every slot issues its work on its own side stream.
        """
        if not (hasattr(model, 'models') and hasattr(model, 'split_views') and hasattr(model, 'combine')):
            raise TypeError(f'ConcurrentMembers needs a SplitNet, got {type(model).__name__}.')
        self.model = model
        self.devices = parse_devices(devices)
        self.amp_dtype = amp_dtype
        self.streams = streams
        self.split_factor = len(model.models)
        # slot -> [(member index, member copy)]
        self.slots: List[List[Tuple[int, nn.Module]]] = [[] for _ in self.devices]
        for i, member in enumerate(model.models):
            slot = i % len(self.devices)
            self.slots[slot].append((i, copy.deepcopy(member).to(self.devices[slot])))
        self.slots = [s for s in self.slots if s]
        self.slot_devices = [self.devices[i] for i in range(len(self.slots))]
        self._streams: Dict[int, torch.cuda.Stream] = {}
        self._executor: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    # ----- configuration -----

    @property
    def device(self) -> torch.device:
        """The first device: inputs are expected and outputs are gathered there."""
        return self.devices[0]

    @property
    def used_devices(self) -> List[torch.device]:
        """The distinct devices that hold at least one member (timers synchronise all of them)."""
        return list(dict.fromkeys(self.slot_devices + [self.device]))

    def members(self) -> Iterator[Tuple[int, torch.device, nn.Module]]:
        """(member index, device, member copy) of every placement, in member order."""
        placed = [(i, d, m) for slot, d in zip(self.slots, self.slot_devices) for i, m in slot]
        return iter(sorted(placed, key=lambda t: t[0]))

    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of all member copies (e.g. for an optimizer of a concurrent train benchmark)."""
        for _, _, m in self.members():
            yield from m.parameters()

    def train(self, mode: bool = True) -> 'ConcurrentMembers':
        for _, _, m in self.members():
            m.train(mode)
        return self

    def eval(self) -> 'ConcurrentMembers':
        return self.train(False)

    def to(self, dtype: Optional[torch.dtype] = None, memory_format: Optional[torch.memory_format] = None):
        """Cast or re-layout every member copy in place (devices are fixed by the placement)."""
        for _, _, m in self.members():
            if dtype is not None:
                m.to(dtype=dtype)
            if memory_format is not None:
                m.to(memory_format=memory_format)
        return self

    def sync_weights(self) -> None:
        """Copy the wrapped model's current member weights into the placed copies."""
        with torch.no_grad():
            for i, _, m in self.members():
                m.load_state_dict(self.model.models[i].state_dict())

    def synchronize(self) -> None:
        """Wait for all queued work on every device used (CUDA; nothing to do for CPU)."""
        synchronize_devices(self.used_devices)

    def close(self) -> None:
        """Stop the worker threads (a later call starts new ones)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> 'ConcurrentMembers':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        placement = ', '.join(f'{i}:{d}' for i, d, _ in self.members())
        return f'ConcurrentMembers(S={self.split_factor}, members on [{placement}], streams={self.streams})'

    # ----- forward -----

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix='splitnet-member')
            return self._executor

    def _autocast(self, device: torch.device, caller_autocast: Dict[str, Optional[torch.dtype]]):
        dtype = self.amp_dtype or caller_autocast.get(device.type)
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def _run_slot(
            self,
            slot: int,
            views: Sequence[torch.Tensor],
            grad_mode: Tuple[bool, bool],
            caller_autocast: Dict[str, Optional[torch.dtype]],
    ) -> List[Tuple[int, torch.Tensor]]:
        device = self.slot_devices[slot]
        inference, grad = grad_mode
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode() if inference else torch.set_grad_enabled(grad))
            stream = None
            if device.type == 'cuda':
                stack.enter_context(torch.cuda.device(device))
                if self.streams:
                    if slot not in self._streams:
                        self._streams[slot] = torch.cuda.Stream(device)
                    stream = self._streams[slot]
                    stream.wait_stream(torch.cuda.default_stream(device))  # inputs made on the default stream
                    stack.enter_context(torch.cuda.stream(stream))
            stack.enter_context(self._autocast(device, caller_autocast))
            outs = []
            for i, member in self.slots[slot]:
                x = views[i].to(device, non_blocking=True)
                if stream is not None and x.device == views[i].device:
                    x.record_stream(stream)
                outs.append((i, member(x)))
            if stream is not None:
                # results are consumed on the default stream of this device by the gathering thread
                default = torch.cuda.default_stream(device)
                default.wait_stream(stream)
                for _, out in outs:
                    out.record_stream(default)
        return outs

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every member, [S, B, num_classes], gathered on the first device.

        Args:
            x: [B, C, H, W] (every member sees it) or [B, S*C, H, W] (member i sees view i), on any device.
        """
        views = self.model.split_views(x)
        grad_mode = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        caller_autocast = _caller_autocast({d.type for d in self.slot_devices})
        if len(self.slots) == 1:
            results = [self._run_slot(0, views, grad_mode, caller_autocast)]
        else:
            pool = self._pool()
            futures = [
                pool.submit(self._run_slot, slot, views, grad_mode, caller_autocast) for slot in range(len(self.slots))]
            results = [f.result() for f in futures]
        outs = dict(pair for result in results for pair in result)
        return torch.stack([outs[i].to(self.device) for i in range(self.split_factor)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble [B, num_classes] on the first device, combined the model's way (`model.combine`)."""
        return self.model.combine(self.forward_members(x))


def _caller_autocast(device_types: Iterable[str]) -> Dict[str, Optional[torch.dtype]]:
    """The autocast dtype active in the calling thread for each device type, or None where it is off."""
    state = {}
    for device_type in device_types:
        try:
            enabled = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type) if enabled else None
        except (TypeError, AttributeError, RuntimeError):  # older torch: no per-device-type query
            enabled = torch.is_autocast_enabled() if device_type == 'cuda' else torch.is_autocast_cpu_enabled()
            dtype = (torch.get_autocast_gpu_dtype() if device_type == 'cuda' else torch.get_autocast_cpu_dtype()) \
                if enabled else None
        state[device_type] = dtype
    return state
