"""LoRA passes the core conformance battery on all seven mapped architectures."""

from opendelta.testing import DeltaMethodSuite


class TestLoraConformance(DeltaMethodSuite):
    method_name = "lora"


class TestLoraRank1Conformance(DeltaMethodSuite):
    method_name = "lora"
    config_kwargs = {"lora_r": 1, "lora_alpha": 4, "lora_dropout": 0.1}


class TestLoraDoraConformance(DeltaMethodSuite):
    method_name = "lora"
    config_kwargs = {"lora_r": 2, "use_dora": True}


class TestLoraMaxRankConformance(DeltaMethodSuite):
    method_name = "lora"
    config_kwargs = {"lora_r": 2, "max_rank": 4, "use_rslora": True}
