"""From "the experts" of a sparse block to what a delta on them modifies, on either transformers line.

Model layer. ``modified_modules=["ff.experts"]`` (or the real ``mlp.experts``) designates one module per block; what
a method places its deltas on inside it depends on how the experts are stored (see :mod:`opendelta.expert_stacks`):

* transformers 5: the module holds the stacked expert weights; each 3-D parameter becomes a target of its own
  (:attr:`Target.parameter` set), placed with :func:`opendelta.parameter_insertion.insert_parameter_delta`;
* transformers 4.57: an ``nn.ModuleList`` of expert MLPs; every linear layer inside becomes an ordinary target.

So one line of user code modifies the same weights on both lines, and each token goes through the changed weights of
the experts it was routed to, by the model's own routing.
"""

from __future__ import annotations

import dataclasses

from opendelta.expert_stacks import is_expert_list, stacked_parameters
from opendelta.markers import backbone_submodules
from opendelta.shapes import is_linear
from opendelta.targets import Target

__all__ = ["expert_targets"]


def expert_targets(target: Target) -> list[Target]:
    """What a delta addressed to ``target`` modifies when its module holds experts; ``[]`` when it holds none.

    A method whose deltas can act on stacked expert weights calls this from its ``_expand_target`` (LoRA does).
    """
    stacked = stacked_parameters(target.module)
    if stacked:
        return [dataclasses.replace(target, parameter=name) for name in stacked]
    if is_expert_list(target.name, target.module):
        return [Target(name, module) for name, module in backbone_submodules(target.module, target.name, is_linear)]
    return []
