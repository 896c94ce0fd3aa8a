"""The conformance battery's fixtures, and the tiny StableLM registered before tests are parametrized over it."""

from opendelta_stablelm_structure.testing import register_tiny_stablelm

pytest_plugins = ["opendelta.testing.fixtures"]

register_tiny_stablelm()
