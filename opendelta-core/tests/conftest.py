"""Registers the test-only toy method through a throwaway plugin, for one test at a time."""

import pytest
from toy_method import ToyModel, ToyPlugin

import opendelta
from opendelta.registry import reload


@pytest.fixture
def toy():
    """Register the toy method for one test; core's registry is restored afterwards."""
    reload()
    opendelta.plugins.load_plugins()
    opendelta.plugins.pm.register(ToyPlugin(), name="toy")
    try:
        yield ToyModel
    finally:
        reload()
