"""Testing helpers: tiny models of every mapped architecture and the conformance battery for delta methods."""

from opendelta.testing.pristine import Pristine
from opendelta.testing.suites import DeltaMethodSuite, perturb
from opendelta.testing.tiny_models import (
    ARCHITECTURES,
    GENERATION_HEADS,
    TASK_HEADS,
    generation_inputs,
    model_output_tensor,
    tiny_inputs,
    tiny_model,
)

__all__ = [
    "ARCHITECTURES",
    "GENERATION_HEADS",
    "TASK_HEADS",
    "DeltaMethodSuite",
    "Pristine",
    "generation_inputs",
    "model_output_tensor",
    "perturb",
    "tiny_inputs",
    "tiny_model",
]
