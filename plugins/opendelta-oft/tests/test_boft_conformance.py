"""BOFT passes the core conformance battery on the seven classic architectures, with its defaults and otherwise."""

from opendelta.testing import DeltaMethodSuite


class TestBoft(DeltaMethodSuite):
    method_name = "boft"


class TestBoftButterflyConformance(DeltaMethodSuite):
    """Two butterfly factors of 8 x 8 blocks, on real-name value projections."""

    method_name = "boft"
    config_kwargs = {
        "modified_modules": [r"[r].*(self\.value|value_proj|SelfAttention\.v|attn\.c_attn|self_attn\.v_proj)"],
        "boft_block_size": 8,
        "boft_n_butterfly_factor": 2,
    }
