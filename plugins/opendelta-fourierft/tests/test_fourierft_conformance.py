"""FourierFT passes the core conformance battery on the seven classic architectures, with its defaults and otherwise."""

from opendelta.testing import DeltaMethodSuite


class TestFourierFT(DeltaMethodSuite):
    """The defaults: 1000 coefficients (PEFT's), a zero spectrum at first (the identity, checked), scaling 150."""

    method_name = "fourierft"


class TestFourierFTFromZeroOnRealNames(DeltaMethodSuite):
    """PEFT's random start (not the identity), per-layer sizes, and every attention value by real name.

    ``[r]`` patterns name each architecture's value projection (BERT's ``value``, DeBERTa's ``value_proj``, T5's
    ``v``, GPT-2's whole ``c_attn``, BART/OPT's ``v_proj``).
    """

    method_name = "fourierft"
    config_kwargs = {
        "modified_modules": [r"[r].*(self\.value|value_proj|SelfAttention\.v|attn\.c_attn|self_attn\.v_proj)"],
        "init_weights": False,
        "n_frequency": 300,
        "n_frequency_pattern": {r"(h|layers?)\.1\..*": 120},
        "scaling": 20.0,
        "random_loc_seed": 5,
    }
