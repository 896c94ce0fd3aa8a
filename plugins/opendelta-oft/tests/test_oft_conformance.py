"""OFT passes the core conformance battery on the seven classic architectures, with its defaults and otherwise."""

from opendelta.testing import DeltaMethodSuite


class TestOft(DeltaMethodSuite):
    method_name = "oft"


class TestOftExactCayleyConformance(DeltaMethodSuite):
    """Smaller blocks, the exact Cayley inverse and COFT's constraint, on real-name value projections."""

    method_name = "oft"
    config_kwargs = {
        "modified_modules": [r"[r].*(self\.value|value_proj|SelfAttention\.v|attn\.c_attn|self_attn\.v_proj)"],
        "oft_block_size": 8,
        "use_cayley_neumann": False,
        "coft": True,
    }
