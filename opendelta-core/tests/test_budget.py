"""Core's memory budget (``opendelta.budget``) with a test-only method whose delta grows with ``width``.

The per-method cases (every installed plugin's size fields) are in ``tests/test_resource_bounds.py``; these need
no plugin, so they run in the core-only session too.
"""

import pytest
import torch
from torch import nn
from toy_method import Scale, ToyModel

import opendelta.budget
from opendelta import ResourceLimitError
from opendelta.testing import Pristine, tiny_model

MiB = 2**20


class Widened(nn.Module):
    """``Scale`` plus a ``[width, features]`` matrix that does nothing at zero: a delta whose size is a setting."""

    def __init__(self, features: int, width: int) -> None:
        super().__init__()
        self.scale = Scale(features)
        self.down = nn.Parameter(torch.zeros(width, features))

    def forward(self, hidden):
        return self.scale(hidden) + hidden @ self.down.T @ self.down


class WideToy(ToyModel):
    def _build_delta(self, target):
        return Widened(self.features(target.module)[1], self.config.width)


def test_an_absurd_width_is_refused_before_allocating_naming_the_setting(toy):
    model = tiny_model("bert")
    pristine = Pristine.of(model)
    with pytest.raises(ResourceLimitError, match=r"refused before allocating.*width=1000000000000"):
        WideToy(model, width=10**12)  # 128 TB of float32
    pristine.assert_unchanged(model)
    assert isinstance(ResourceLimitError("x"), MemoryError), "callers that catch MemoryError catch it too"


def test_a_size_that_fits_once_but_not_on_every_target_stops_after_the_first(toy, monkeypatch):
    seen = []

    def limit(device):
        seen.append(device)
        return 1 * MiB

    monkeypatch.setattr(opendelta.budget, "memory_limit", limit)
    model = tiny_model("bert")  # 2 layers: 4 targets (attn.proj, ff.w2); each delta [width, 32] floats
    pristine = Pristine.of(model)
    width = (1 * MiB // 3) // (32 * 4)  # a third of the limit per delta: the first fits, four do not
    with pytest.raises(ResourceLimitError, match=rf"for its deltas on 4 modules.*width={width}"):
        WideToy(model, width=width)
    pristine.assert_unchanged(model)
    assert seen == [torch.device("cpu")], "the limit is read once per device, before anything is built"
    WideToy(model, width=width // 4).detach()  # a quarter of that fits everywhere: the control case


def test_no_known_limit_and_meta_tensors_refuse_nothing(toy, monkeypatch):
    monkeypatch.setattr(opendelta.budget, "memory_limit", lambda device: None)
    WideToy(tiny_model("bert"), width=4096).detach()  # 2 MiB: built, nothing to compare it with
    monkeypatch.undo()
    assert opendelta.budget.memory_limit(torch.device("meta")) is None
    real = opendelta.budget.memory_limit(torch.device("cpu"))
    assert real is None or real > 0
