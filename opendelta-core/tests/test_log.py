from bigmodelvis import Visualization

from opendelta import count_parameters
from opendelta.testing import tiny_model


def test_log_prints_tree_deltas_and_ratios(toy, capsys):
    model = tiny_model("bert")
    delta_model = toy(model)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    delta_model.log()
    out = capsys.readouterr().out
    assert "toy (Scale)" in out and "s:[32]" in out
    assert "Trainable Ratio" in out and "Delta Parameter Ratio" in out


def test_ratios_count_unique_parameters_including_deltas_and_head(toy):
    model = tiny_model("gpt2", "GPT2LMHeadModel")  # lm_head is tied to wte: counted once
    total = sum(p.numel() for p in model.parameters())
    delta_model = toy(model)
    delta = sum(p.numel() for p in delta_model.parameters())
    delta_model.freeze_module()
    counts = count_parameters(model)
    assert counts.total == total + delta and counts.delta == delta and counts.trainable == delta
    assert counts.delta_ratio == delta / (total + delta)


def test_bigmodelvis_still_works_on_a_modified_model(toy, capsys):
    model = tiny_model("t5")
    toy(model)
    tree = Visualization(model).structure_graph()
    assert tree is not None and "toy" in capsys.readouterr().out
