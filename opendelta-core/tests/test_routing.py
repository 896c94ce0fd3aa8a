"""Per-row routing in core, with the test-only toy method: rows go through their own delta only."""

import pytest
import torch
from toy_method import ToyModel

from opendelta import DeltaStateError, route_rows
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model


def run(model, inputs):
    with torch.no_grad():
        return model_output_tensor(model(**inputs))


def test_rows_get_their_own_delta_and_the_batch_may_repeat_rows(toy):
    model = tiny_model("bert")
    first, second = ToyModel(model), ToyModel(model)
    perturb(first, seed=1)
    perturb(second, seed=2)
    inputs = tiny_inputs("bert", batch=2)
    with route_rows(model, [first, second]) as routing:
        routed = run(model, inputs)
        doubled = run(model, {k: v.repeat_interleave(2, 0) for k, v in inputs.items()})
    second.detach()
    torch.testing.assert_close(routed[0], run(model, inputs)[0])
    second.attach()
    first.detach()
    torch.testing.assert_close(routed[1], run(model, inputs)[1])
    torch.testing.assert_close(doubled[::2], routed)
    assert routing.owners == [0, 1]


def test_a_batch_that_is_no_multiple_of_the_rows_is_refused(toy):
    model = tiny_model("bert")
    delta = ToyModel(model)
    with pytest.raises(DeltaStateError, match="multiple"), route_rows(model, [delta, None, None]):
        run(model, tiny_inputs("bert", batch=2))
    with pytest.raises(DeltaStateError, match="one entry per batch row"), route_rows(model, []):
        pass


def test_a_second_routing_on_the_same_model_is_refused_and_the_first_is_cleaned_up(toy):
    model = tiny_model("bert")
    delta = ToyModel(model)
    with route_rows(model, [delta]):
        with pytest.raises(DeltaStateError, match="already active"), route_rows(model, [None]):
            pass
    assert not any(hasattr(m, "_opendelta_routing") for m in model.modules())
