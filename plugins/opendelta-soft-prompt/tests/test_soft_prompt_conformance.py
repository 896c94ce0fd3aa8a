"""Soft prompt tuning passes the core conformance battery on all seven mapped architectures."""

from opendelta.testing import DeltaMethodSuite


class TestSoftPromptConformance(DeltaMethodSuite):
    method_name = "soft_prompt"


class TestShortRandomPromptConformance(DeltaMethodSuite):
    method_name = "soft_prompt"
    config_kwargs = {"soft_token_num": 3, "token_init": False, "init_range": 0.1}
