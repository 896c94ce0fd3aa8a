"""The conformance battery over every installed delta method: a new plugin is tested by installing it."""

from opendelta import list_methods
from opendelta.testing import DeltaMethodSuite


def test_at_least_one_method_is_installed():
    assert list_methods(), "no delta method plugin is installed in this environment"


class TestEveryInstalledMethod(DeltaMethodSuite):
    method_name = None  # parametrized over list_methods() by opendelta.testing.fixtures
