"""Testing helpers: tiny models of every mapped architecture and the conformance battery for delta methods."""

try:
    import pytest  # noqa: F401  (the battery is a pytest suite; core itself does not depend on pytest)
except ModuleNotFoundError as exc:
    if exc.name != "pytest":
        raise
    raise ModuleNotFoundError(
        "opendelta.testing needs pytest (its conformance battery is a pytest suite), which opendelta-core does not "
        "install: pip install 'opendelta-core[testing]'",
        name="pytest",
    ) from exc

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
