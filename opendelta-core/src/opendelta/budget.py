"""A memory budget for building deltas: absurd sizes (a rank of 10**9) fail at once with a message.

Without it, ``lora_r=10**9`` either dies in the allocator with "you tried to allocate 3072000000000 bytes" (which
names no setting), or, under memory overcommit, gets its pages one by one until the kernel kills the process. The
budget is the memory available where the tensors would live (the host's available memory, within the container's
limit; a GPU's free memory), read when the delta model starts building, and checked twice:

* every tensor a delta's constructor asks for is added up *before* it is allocated (a dispatch mode sees the
  factory call with its size), so an impossible tensor never reaches the allocator;
* after each delta is built, its size times the number of targets is checked, so a size that fits once but not
  for every layer stops after the first layer instead of exhausting memory on the last.

Either way a :class:`~opendelta.errors.ResourceLimitError` names the delta model's largest size settings, and the
deltas already placed are taken out again by the caller.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from opendelta.errors import ResourceLimitError

__all__ = ["DeltaMemoryBudget", "memory_limit"]

_FACTORIES = frozenset({"empty", "empty_strided", "empty_permuted", "zeros", "ones", "full", "rand", "randn"})
_NEW_FACTORIES = frozenset({"new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full"})


def _cgroup_room() -> int | None:
    """What the container's memory limit leaves (cgroup v2, then v1); ``None`` outside a limited container."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = (Path(f).read_text().strip() for f in (limit_file, usage_file))
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:  # "max" or v1's "unlimited" value
            return max(int(limit) - int(usage), 0)
    return None


def _host_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def memory_limit(device: torch.device) -> int | None:
    """The bytes new tensors on ``device`` can occupy now; ``None`` when unknown (then nothing is refused)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":  # meta tensors take no memory; other devices: unknown
        return None
    room = [r for r in (_host_available(), _cgroup_room()) if r is not None]
    return min(room) if room else None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _requested(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, torch.device] | None:
    """``(bytes, device)`` of the tensor a factory call is about to allocate; ``None`` for any other op."""
    name = func.overloadpacket.__name__
    if name in _FACTORIES:
        size, like = args[0], None
    elif name in _NEW_FACTORIES:
        size, like = args[1], args[0]
    else:
        return None
    dtype = kwargs.get("dtype") or (like.dtype if like is not None else torch.get_default_dtype())
    device = kwargs.get("device") or (like.device if like is not None else torch.device("cpu"))
    return math.prod(int(s) for s in size) * dtype.itemsize, torch.device(device)


class DeltaMemoryBudget(TorchDispatchMode):
    """Checks the tensors a delta model creates against the memory they would live in (see the module docstring).

    Use as a context manager around each ``_build_delta`` call, and call :meth:`built` after each.
    """

    def __init__(self, delta_model: nn.Module, num_targets: int) -> None:
        super().__init__()
        self.owner = type(delta_model).__name__
        self.config = getattr(delta_model, "config", None)
        self.num_targets = num_targets
        self.limits: dict[torch.device, int | None] = {}  # read once per device, before anything is built
        self.requested: dict[torch.device, int] = {}  # asked for so far, transients included
        self.bytes_built = 0

    def _limit(self, device: torch.device) -> int | None:
        if device not in self.limits:
            self.limits[device] = memory_limit(device)
        return self.limits[device]

    def _refuse(self, needed: float, limit: int, what: str) -> None:
        raise ResourceLimitError(
            f"{self.owner} would need {_gib(needed)} for {what}, more than the {_gib(limit)} of memory available; "
            f"it was refused before allocating, and the backbone is unchanged. Check the size settings: "
            f"{self._size_settings()}"
        )

    def _size_settings(self) -> str:
        values = [(getattr(self.config, f.name), f.name) for f in fields(self.config)] if self.config else []
        largest = sorted((v, n) for v, n in values if type(v) is int)[::-1][:3]
        return ", ".join(f"{name}={value}" for value, name in largest) or "(no integer settings)"

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        request = _requested(func, args, kwargs)
        if request is not None:
            size, device = request
            limit = self._limit(device)
            total = self.requested.get(device, 0) + size
            if limit is not None and total > limit:
                self._refuse(total, limit, "its delta's tensors")
            self.requested[device] = total
        return func(*args, **kwargs)

    def built(self, delta: nn.Module, count: int) -> None:
        """After the ``count``-th delta: refuse if building all of them at this rate would exceed memory."""
        tensors = [*delta.parameters(), *delta.buffers()]
        self.bytes_built += sum(t.numel() * t.element_size() for t in tensors)
        if not tensors or count >= self.num_targets:
            return
        limit = self._limit(tensors[0].device)
        projected = self.bytes_built / count * self.num_targets
        if limit is not None and projected > limit:
            self._refuse(projected, limit, f"its deltas on {self.num_targets} modules")
