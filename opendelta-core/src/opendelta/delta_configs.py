"""``opendelta.delta_configs``: OpenDelta 0.3.2's module of the base config class (manual section 1.20.1).

``BaseDeltaConfig`` is :class:`opendelta.DeltaConfig` itself, not a copy or a subclass: every method's config is one
(``isinstance(LoraConfig(), BaseDeltaConfig)``), and a 0.3.2-style subclass with an ``__init__`` of its own gets its
extra hyper-parameters serialised (see :mod:`opendelta.classic_config`).
"""

from __future__ import annotations

from opendelta.config import DeltaConfig as BaseDeltaConfig

__all__ = ["BaseDeltaConfig"]
