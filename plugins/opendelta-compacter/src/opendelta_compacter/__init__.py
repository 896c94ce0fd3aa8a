"""Compacter (hypercomplex PHM adapters) for OpenDelta: ``from opendelta import CompacterModel`` once installed."""

from opendelta_compacter.config import CompacterConfig
from opendelta_compacter.layer import HyperComplexAdapterLayer, PHMLinear, new_phm_rule, new_phm_weight
from opendelta_compacter.model import CompacterModel

__all__ = [
    "CompacterConfig",
    "CompacterModel",
    "HyperComplexAdapterLayer",
    "PHMLinear",
    "new_phm_rule",
    "new_phm_weight",
]
