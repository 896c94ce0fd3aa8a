"""IA3 passes the core conformance battery on the seven classic architectures, with its defaults and otherwise."""

from opendelta.testing import DeltaMethodSuite


class TestIa3(DeltaMethodSuite):
    method_name = "ia3"


class TestIa3RealNamesConformance(DeltaMethodSuite):
    """Real-name targets with an explicit feed-forward set: every attention value and feed-forward down projection.

    ``[r]`` patterns name each architecture's value projection (BERT's ``value``, DeBERTa's ``value_proj``, T5's
    ``v``, GPT-2's whole ``c_attn``, BART/OPT's ``v_proj``) and its feed-forward second projection; the latter are
    also ``feedforward_modules``, so this run places both kinds of delta through real names.
    """

    method_name = "ia3"
    _ff = r"[r].*(layer\.\d+\.output\.dense|DenseReluDense\.wo|mlp\.c_proj|fc2)"
    config_kwargs = {
        "modified_modules": [r"[r].*(self\.value|value_proj|SelfAttention\.v|attn\.c_attn|self_attn\.v_proj)", _ff],
        "feedforward_modules": [_ff],
    }
