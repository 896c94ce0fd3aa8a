"""From a config to targets: common-name scopes, exclusions inside broadcast targets, unknown arguments."""

import pytest
from toy_method import ToyModel

from opendelta import DeltaConfigError, ModuleNotFoundInStructureError, Target
from opendelta.targets import resolve_targets
from opendelta.testing import tiny_model


def test_a_common_scope_covers_modules_no_single_module_holds():
    model = tiny_model("bart")
    with pytest.raises(ModuleNotFoundInStructureError, match="'ff'"):
        resolve_targets(model, ["ff"], None, (), True, "Test")
    names = [t.name for t in resolve_targets(model, ["ff"], None, (), True, "Test", cover_scopes=True)]
    assert names == [
        f"model.{s}.layers.{i}.{fc}"
        for s in ("encoder", "decoder")
        for i in range(2)
        for fc in ("fc1", "fc2", "final_layer_norm")
    ]


def test_a_scope_covers_a_fused_module_whole():
    targets = resolve_targets(tiny_model("gpt2"), ["attn"], None, (), True, "Test", cover_scopes=True)
    c_attn = [t for t in targets if t.name.endswith("c_attn")]
    assert len(c_attn) == 2 and all(t.parts is None for t in c_attn)
    only_q = resolve_targets(tiny_model("gpt2"), ["attn.q"], None, (), True, "Test", cover_scopes=True)
    assert {t.parts for t in only_q} == {(0,)}


class Broadcast(ToyModel):
    """Broadcasts to every linear layer inside each target, like BitFit."""

    def _expand_target(self, target):
        return [
            Target(f"{target.name}.{name}", module)
            for name, module in target.module.named_modules()
            if name and type(module).__name__ == "Linear"
        ]


def test_core_drops_excluded_submodules_of_a_broadcast_target(toy):
    model = tiny_model("bert")
    delta_model = Broadcast(model, modified_modules=["attention"], exclude_modules=["self.key", "output.dense"])
    names = sorted(t.name.rsplit(".", 2)[-2] + "." + t.name.rsplit(".", 1)[-1] for t in delta_model.targets)
    assert names == ["self.query", "self.query", "self.value", "self.value"]


def test_unknown_constructor_argument_is_named_with_the_known_ones(toy):
    with pytest.raises(DeltaConfigError, match=r"unknown field\(s\) \['bottleneck_dim'\].*width"):
        ToyModel(tiny_model("bert"), bottleneck_dim=8)


def test_a_gated_feed_forward_answers_to_its_own_names_and_to_w1_w2():
    model = tiny_model("llama")
    by_alias = resolve_targets(model, ["ff.w1", "ff.w2"], None, (), True, "Test")
    by_name = resolve_targets(model, ["ff.up", "ff.down"], None, (), True, "Test")
    assert (
        [t.name for t in by_alias]
        == [t.name for t in by_name]
        == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("up_proj", "down_proj")]
    )
    gate = resolve_targets(model, ["ff.gate"], None, (), True, "Test")
    assert [t.name for t in gate] == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    both = resolve_targets(model, ["ff.up", "ff.w1"], None, (), True, "Test")
    assert len(both) == 2  # one module under two names is one target


def test_a_mapping_that_fits_only_partly_names_what_it_could_not_place():
    """A T5 config with the gated feed-forward has no DenseReluDense.wi, which the t5 mapping calls ff.w1."""
    import transformers

    from opendelta import OpenDeltaAddressingWarning
    from opendelta.testing.tiny_models import tiny_config

    model = transformers.T5ForConditionalGeneration(tiny_config("t5", feed_forward_proj="gated-gelu"))
    with pytest.warns(OpenDeltaAddressingWarning, match=r"'t5' fits T5ForConditionalGeneration only partly") as seen:
        targets = resolve_targets(model, ["ff.w1", "ff.w2"], None, (), True, "Test")
    message = str(seen[0].message)
    assert "encoder.block.N.ff.w1 (DenseReluDense.wi)" in message and "decoder.block.N.ff.w1" in message
    assert "ff.w2" not in message.split("only partly:")[1].split("name no module")[0]
    assert {t.name.rsplit(".", 1)[-1] for t in targets} == {"wo"}


def test_a_mapping_that_fits_needs_no_word(recwarn):
    import transformers

    from opendelta.testing.tiny_models import tiny_config

    gated = transformers.T5ForConditionalGeneration(tiny_config("t5", feed_forward_proj="gated-gelu"))
    resolve_targets(gated, ["attn.q"], None, (), True, "Test")  # the unplaced ff.w1 was not asked for
    resolve_targets(tiny_model("t5"), ["ff.w1"], None, (), True, "Test")
    assert not recwarn.list
