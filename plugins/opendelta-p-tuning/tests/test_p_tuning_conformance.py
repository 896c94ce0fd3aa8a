"""P-tuning passes the core conformance battery on all seven mapped architectures, with either encoder."""

from opendelta.testing import DeltaMethodSuite


class TestPTuningConformance(DeltaMethodSuite):
    method_name = "p_tuning"
    config_kwargs = {"num_virtual_tokens": 4, "encoder_hidden_size": 8}


class TestLstmPTuningConformance(DeltaMethodSuite):
    method_name = "p_tuning"
    config_kwargs = {"num_virtual_tokens": 3, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8}
