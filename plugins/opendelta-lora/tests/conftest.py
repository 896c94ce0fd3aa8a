pytest_plugins = ["opendelta.testing.fixtures"]
