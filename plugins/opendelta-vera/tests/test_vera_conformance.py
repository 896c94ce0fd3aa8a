"""VeRA passes the core conformance battery on the seven classic architectures, with its defaults and otherwise."""

from opendelta.testing import DeltaMethodSuite


class TestVera(DeltaMethodSuite):
    method_name = "vera"
    config_kwargs = {"r": 8}


class TestVeraSeedOnlyConformance(DeltaMethodSuite):
    """The shared matrices not saved (``save_projection=False``): a reload draws them again from the seed, exactly.

    ``[r]`` patterns name each architecture's value projection and feed-forward second projection, so the shared
    matrices are sized by layers of different shapes, through real names.
    """

    method_name = "vera"
    config_kwargs = {
        "r": 4,
        "save_projection": False,
        "projection_prng_key": 12345,
        "modified_modules": [
            r"[r].*(self\.value|value_proj|SelfAttention\.v|attn\.c_attn|self_attn\.v_proj)",
            r"[r].*(layer\.\d+\.output\.dense|DenseReluDense\.wo|mlp\.c_proj|fc2)",
        ],
    }
