"""Prefix tuning passes the core conformance battery on all seven mapped architectures, both parameterisations."""

from opendelta.testing import DeltaMethodSuite


class TestPrefixConformance(DeltaMethodSuite):
    method_name = "prefix"


class TestPlainPrefixConformance(DeltaMethodSuite):
    method_name = "prefix"
    config_kwargs = {"prefix_token_num": 3, "reparameterize": False}
