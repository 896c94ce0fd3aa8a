"""Prefix tuning passes the core conformance battery on all seven mapped architectures, both parameterisations."""

from opendelta.testing import DeltaMethodSuite


class TestPrefixConformance(DeltaMethodSuite):
    method_name = "prefix"


class TestPlainPrefixConformance(DeltaMethodSuite):
    method_name = "prefix"
    config_kwargs = {"prefix_token_num": 3, "reparameterize": False}


class TestPeftPositionsConformance(DeltaMethodSuite):
    """PEFT's positions (``peft_positions``): the decoder-only and encoder models it serves."""

    method_name = "prefix"
    config_kwargs = {"prefix_token_num": 3, "reparameterize": False, "peft_positions": True}
    architectures = ("bert", "gpt2", "opt", "llama")
