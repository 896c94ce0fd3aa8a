"""AdaLoRA passes the core conformance battery on the seven classic architectures (no allocation: SVD-form LoRA)."""

from opendelta.testing import DeltaMethodSuite


class TestAdaLora(DeltaMethodSuite):
    method_name = "adalora"


class TestAdaLoraWithASchedule(DeltaMethodSuite):
    """A config that can allocate (``total_step`` set, a small rank) behaves the same until it does."""

    method_name = "adalora"
    config_kwargs = {"init_r": 3, "target_r": 1, "total_step": 10, "lora_dropout": 0.1}
