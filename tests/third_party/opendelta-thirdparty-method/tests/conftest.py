"""The conformance battery's fixtures, opted in as any third-party plugin does."""

pytest_plugins = ["opendelta.testing.fixtures"]
