"""pytest fixtures for :class:`~opendelta.testing.DeltaMethodSuite` (opt in with ``pytest_plugins``).

``arch`` is parametrized over the test class's ``architectures``; ``method_name`` is the class's, or, when the
class leaves it ``None``, parametrized over every installed method.
"""

from __future__ import annotations

from typing import Any

import pytest

from opendelta.registry import list_methods
from opendelta.testing.tiny_models import ARCHITECTURES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``arch`` (and ``method_name`` when the class names none) for conformance-suite classes.

    Other tests keep their own ``arch`` parametrization.
    """
    from opendelta.testing.suites import DeltaMethodSuite

    cls = metafunc.cls
    if cls is None or not issubclass(cls, DeltaMethodSuite):
        return
    if "arch" in metafunc.fixturenames:
        metafunc.parametrize("arch", getattr(cls, "architectures", ARCHITECTURES))
    if "method_name" in metafunc.fixturenames and getattr(cls, "method_name", None) is None:
        metafunc.parametrize("method_name", [spec.name for spec in list_methods()])


@pytest.fixture
def method_name(request: pytest.FixtureRequest) -> str:
    """The method under test, from the test class."""
    name = getattr(request.cls, "method_name", None)
    if name is None:
        pytest.fail("set method_name on the test class, or leave it None to run over every installed method")
    return str(name)


@pytest.fixture
def config_kwargs(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Hyper-parameters for the method, from the test class (a copy, so tests cannot leak changes)."""
    return dict(getattr(request.cls, "config_kwargs", {}) or {})
