"""Repository-wide pytest setup: the conformance battery's fixtures (opt-in, as a third-party plugin would do)."""

pytest_plugins = ["opendelta.testing.fixtures"]
