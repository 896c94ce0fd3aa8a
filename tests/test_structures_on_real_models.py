"""Every path of every registered mapping exists on tiny models of its architectures (run under 4.57 and 5.x)."""

import pytest
import transformers

from opendelta import list_structures
from opendelta.testing.check_structures import check
from opendelta.testing.tiny_models import ARCHITECTURES


def test_all_seven_architectures_are_mapped():
    assert {s.model_type for s in list_structures()} >= set(ARCHITECTURES)


@pytest.mark.parametrize("structure", list_structures(), ids=lambda s: s.model_type)
def test_every_mapped_path_exists(structure):
    assert check(structure) == [], f"under transformers {transformers.__version__}"
