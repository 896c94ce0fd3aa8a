"""The conformance battery's fixtures, and the tiny LLaMA registered before tests are parametrized over it."""

from opendelta_llama_structure.testing import register_tiny_llama

pytest_plugins = ["opendelta.testing.fixtures"]

register_tiny_llama()
