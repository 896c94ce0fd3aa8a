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
