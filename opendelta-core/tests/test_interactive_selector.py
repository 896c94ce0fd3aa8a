"""Interactive selection without a browser: the folded module tree, the HTTP endpoints, timeouts, and
``DeltaModel(interactive_modify=...)`` fed by a real HTTP client (urllib) against the real server.

The page itself is driven in headless Chromium by ``tests/test_interactive_browser.py``.
"""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from torch import nn
from transformers import T5ForConditionalGeneration

from opendelta import DeltaConfigError, OpenDeltaError
from opendelta.interactive import (
    DEFAULT_TIMEOUT,
    TIMEOUT_ENV,
    InteractiveSelectionCancelled,
    InteractiveSelectionError,
    InteractiveSelectionTimeout,
    ModuleNode,
    SelectionServer,
    build_tree,
    resolve_timeout,
    select_modules,
)
from opendelta.interactive.tree import range_label
from opendelta.targets import backbone_module_names
from opendelta.testing import tiny_model
from opendelta.testing.tiny_models import tiny_config

LAYER = "bert.encoder.layer"
SERVER_THREAD = "opendelta-interactive-server"


# ------------------------------------------------------------------------------------------------------ helpers
def child(node: ModuleNode, *labels: str) -> ModuleNode:
    """Follow row labels down the (folded) tree."""
    for label in labels:
        found = [c for c in node.children if c.label == label]
        assert found, f"no row {label!r} under {node.label!r}: {[c.label for c in node.children]}"
        node = found[0]
    return node


def all_nodes(node: ModuleNode) -> list[ModuleNode]:
    out = [node]
    for sub in [*node.children, *(node.repeats or [])]:
        out.extend(all_nodes(sub))
    return out


def request(url: str, body: object = None, *, content_type: str = "application/json", host: str | None = None):
    """(status, decoded JSON or text) of a GET (body None) or POST."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", content_type)
    if host is not None:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            status, raw, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read(), err.headers.get_content_type()
    return status, json.loads(raw) if kind == "application/json" else raw.decode()


def server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == SERVER_THREAD]


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny_model("bert")


# ------------------------------------------------------------------------------------------------- the tree
def test_repeated_layers_and_same_shaped_projections_fold_into_one_row(bert):
    tree = build_tree(bert)
    layers = child(tree, "bert", "encoder", "layer", "0-1")
    assert layers.type == "BertLayer"
    assert layers.paths == [f"{LAYER}.0", f"{LAYER}.1"]
    assert [r.label for r in layers.repeats] == ["0", "1"]
    assert [r.paths for r in layers.repeats] == [[f"{LAYER}.0"], [f"{LAYER}.1"]]

    qkv = child(layers, "attention", "self", "query,key,value")
    assert qkv.type == "Linear" and qkv.params == ["weight:[32, 32]", "bias:[32]"]
    assert [r.label for r in qkv.repeats] == ["query", "key", "value"]
    # a row inside a folded block stands for the same module in every repeat
    assert qkv.repeats[0].paths == [f"{LAYER}.0.attention.self.query", f"{LAYER}.1.attention.self.query"]
    # and inside one repeat, for that repeat's module only
    one = child(layers.repeats[1], "attention", "self", "query,key,value")
    assert one.repeats[2].paths == [f"{LAYER}.1.attention.self.value"]
    dense = child(layers, "intermediate", "dense")
    assert dense.paths == [f"{LAYER}.0.intermediate.dense", f"{LAYER}.1.intermediate.dense"]


def test_modules_without_parameters_are_left_out_and_every_path_is_a_real_module(bert):
    nodes = all_nodes(build_tree(bert))
    types = {n.type for n in nodes}
    assert "Dropout" not in types and "GELUActivation" not in types and "Tanh" not in types
    real = dict(bert.named_modules())
    paths = {p for n in nodes for p in n.paths}
    assert paths <= set(real)
    with_params = {n for n in real if n and any(True for _ in real[n].parameters())}
    assert paths == with_params  # nothing that holds a parameter is missing


@pytest.mark.parametrize("arch", ["gpt2", "opt", "t5"])
def test_other_architectures_fold_their_blocks_and_keep_every_module(arch):
    if arch == "t5":  # block 0 alone holds the relative position bias: blocks 1-2 fold, 0 stays apart
        model = T5ForConditionalGeneration(tiny_config("t5", num_layers=3, num_decoder_layers=3))
        stack, label = ("encoder", "block"), "1-2"
    else:
        model = tiny_model(arch)
        stack, label = {"gpt2": ("transformer", "h"), "opt": ("model", "decoder", "layers")}[arch], "0-1"
    tree = build_tree(model)
    nodes = all_nodes(tree)
    assert label in [c.label for c in child(tree, *stack).children]
    plain = {p for n in all_nodes(build_tree(model, fold=False)) for p in n.paths}
    assert {p for n in nodes for p in n.paths} == plain
    assert not any(n.repeats for n in all_nodes(build_tree(model, fold=False)))


def test_range_label():
    assert range_label(["0", "1", "2", "5", "7", "8"]) == "0-2,5,7-8"
    assert range_label(["3"]) == "3"
    assert range_label(["query", "key", "value"]) == "query,key,value"
    assert range_label(["01", "1"]) == "01,1"  # not numbers: kept as written


def test_selectable_predicate_marks_rows(bert):
    tree = build_tree(bert, selectable=lambda m: isinstance(m, nn.Linear))
    layers = child(tree, "bert", "encoder", "layer", "0-1")
    assert not tree.selectable and tree.paths == []  # the root: no name addresses it
    assert not layers.selectable and not child(layers, "attention").selectable
    assert child(layers, "attention", "self", "query,key,value").selectable


def test_attached_deltas_are_not_in_the_tree(toy):
    model = tiny_model("bert")
    before = build_tree(model).to_dict()
    toy(model, modified_modules=["attention.output.dense"])
    after = build_tree(model)
    assert after.to_dict() == before
    assert not any("toy" in p for n in all_nodes(after) for p in n.paths)


# ---------------------------------------------------------------------------------------------- the server
def test_page_tree_and_unknown_path(bert):
    tree = build_tree(bert)
    with SelectionServer(tree, order=backbone_module_names(bert), method="LoraModel") as server:
        assert server.url == f"http://127.0.0.1:{server.port}/" and server.port > 0
        status, page = request(server.url)
        assert status == 200 and "<script>" in page and 'id="submit"' in page
        status, data = request(server.url + "api/tree")
        assert status == 200
        assert data["tree"] == tree.to_dict()
        assert data["method"] == "LoraModel" and data["model"] == "BertForSequenceClassification"
        order = data["modules"]
        assert order.index(f"{LAYER}.0.attention.self.query") < order.index(f"{LAYER}.0.attention.self.key")
        assert "bert.embeddings.dropout" not in order
        status, data = request(server.url + "nothing/here")
        assert status == 404 and "/" in data["error"]
    assert not server_threads()


def test_submit_is_checked_and_returned_in_module_order(bert):
    tree = build_tree(bert, selectable=lambda m: isinstance(m, nn.Linear))
    with SelectionServer(tree, order=backbone_module_names(bert), method="LoraModel") as server:
        submit = server.url + "api/submit"
        assert request(submit, {"modules": ["classifier"]}, content_type="text/plain")[0] == 415
        status, data = request(submit, b"{not json")
        assert status == 400 and data["error"]
        status, data = request(submit, {"modules": []})
        assert status == 400 and "nothing is selected" in data["error"]
        status, data = request(submit, {"modules": "classifier"})
        assert status == 400 and '{"modules"' in data["error"]
        status, data = request(submit, {"modules": ["bert.encoder.layer.9.output.dense"]})
        assert status == 400 and "bert.encoder.layer.9.output.dense" in data["error"]
        status, data = request(submit, {"modules": [f"{LAYER}.0.attention"]})
        assert status == 400 and "LoraModel cannot modify" in data["error"] and f"{LAYER}.0.attention" in data["error"]

        chosen = ["classifier", f"{LAYER}.1.attention.self.query", f"{LAYER}.0.attention.self.value"]
        status, data = request(submit, {"modules": [*chosen, "classifier"]})
        expected = [f"{LAYER}.0.attention.self.value", f"{LAYER}.1.attention.self.query", "classifier"]
        assert status == 200 and data["modified_modules"] == expected
        assert server.wait(5) == expected
        status, data = request(submit, {"modules": chosen})
        assert status == 400 and "already submitted" in data["error"]


def test_foreign_host_header_is_refused(bert):
    with SelectionServer(build_tree(bert)) as server:
        status, data = request(server.url + "api/tree", host=f"attacker.example:{server.port}")
        assert status == 403 and server.url in data["error"]
        assert request(server.url + "api/tree", host=f"localhost:{server.port}")[0] == 200


def test_validate_errors_are_shown_and_the_page_can_try_again(bert):
    def validate(names):
        if "classifier" in names:
            raise DeltaConfigError("the head is trained whole; pick something else")

    with SelectionServer(build_tree(bert), validate=validate) as server:
        status, data = request(server.url + "api/submit", {"modules": ["classifier"]})
        assert status == 400 and data["error"] == "the head is trained whole; pick something else"
        status, _ = request(server.url + "api/submit", {"modules": ["bert.pooler.dense"]})
        assert status == 200
        assert server.wait(5) == ["bert.pooler.dense"]


def test_cancel_raises(bert):
    with SelectionServer(build_tree(bert)) as server:
        status, data = request(server.url + "api/cancel", {})
        assert status == 200 and data == {"cancelled": True}
        with pytest.raises(InteractiveSelectionCancelled, match="cancelled"):
            server.wait(5)


def test_timeout_is_clean(bert):
    out = io.StringIO()
    threads_before = threading.active_count()
    with pytest.raises(InteractiveSelectionTimeout, match=rf"within 0\.3 s.*{TIMEOUT_ENV}") as info:
        select_modules(bert, timeout=0.3, stream=out)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, OpenDeltaError)
    url = re.search(r"http://127\.0\.0\.1:(\d+)/", out.getvalue())
    assert url, out.getvalue()
    assert not server_threads() and threading.active_count() == threads_before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(url.group(1))), timeout=2).close()


def test_timeout_from_the_environment(monkeypatch, bert):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert resolve_timeout() == DEFAULT_TIMEOUT
    monkeypatch.setenv(TIMEOUT_ENV, "0.2")
    assert resolve_timeout() == 0.2 and resolve_timeout(5) == 5
    with pytest.raises(InteractiveSelectionTimeout, match=r"within 0\.2 s"):
        select_modules(bert, stream=io.StringIO())
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(DeltaConfigError, match=f"{TIMEOUT_ENV}='soon'"):
        resolve_timeout()
    with pytest.raises(DeltaConfigError, match="timeout=-1"):
        resolve_timeout(-1)


def test_port_in_use_and_bad_ports(bert):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InteractiveSelectionError, match=f"port {port} on 127.0.0.1 is in use.*True"):
            select_modules(bert, port=port, timeout=5, stream=io.StringIO())
    for bad in (-1, 70000, "8080", 1.5):
        with pytest.raises(DeltaConfigError, match="port"):
            select_modules(bert, port=bad, timeout=5, stream=io.StringIO())
    assert not server_threads()


# ------------------------------------------------------------------------------ DeltaModel(interactive_modify)
def wait_for_link(capsys, deadline: float = 20.0) -> tuple[str, str]:
    """The link the selector printed (read from the captured stdout), and everything printed so far."""
    seen = ""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        seen += capsys.readouterr().out
        found = re.search(r"http://127\.0\.0\.1:\d+/", seen)
        if found:
            return found.group(0), seen
        time.sleep(0.05)
    raise AssertionError(f"no link printed within {deadline} s: {seen!r}")


def test_delta_model_gets_the_submitted_modules(toy, capsys):
    model = tiny_model("bert")
    result: dict[str, object] = {}

    def build():
        try:
            result["delta"] = toy(model, interactive_modify=True)
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    worker = threading.Thread(target=build)
    worker.start()
    try:
        url, printed = wait_for_link(capsys)
        assert "ToyModel should modify" in printed and "BertForSequenceClassification" in printed
        chosen = [f"{LAYER}.1.output.dense", f"{LAYER}.0.attention.output.dense"]
        status, data = request(url + "api/submit", {"modules": chosen})
        assert status == 200, data
    finally:
        worker.join(30)
    assert "error" not in result, result.get("error")
    delta = result["delta"]
    expected = [f"{LAYER}.0.attention.output.dense", f"{LAYER}.1.output.dense"]
    assert [t.name for t in delta.targets] == expected
    assert delta.config.modified_modules == expected and delta.config.common_structure is False
    assert f"modified_modules: {expected}" in capsys.readouterr().out
    # the saved config needs no page: the same modules are found again from the names
    again = type(delta).from_config(delta.config.to_dict(), tiny_model("bert"))
    assert [t.name for t in again.targets] == expected
    assert not server_threads()


def test_interactive_modify_refuses_conflicts_before_serving(toy, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "5")  # a page served by mistake would fail the test by timing out, not hang it
    model = tiny_model("bert")
    with pytest.raises(DeltaConfigError, match="pass one of them"):
        toy(model, modified_modules=["query"], interactive_modify=True)
    with pytest.raises(DeltaConfigError, match=r"True \(a free port\) or a port number"):
        toy(model, interactive_modify="8888")
    with pytest.raises(DeltaConfigError, match="unknown field"):
        toy(model, interactive_modify=True, widht=3)
    assert not server_threads()


def test_the_page_offers_the_layer_types_of_a_method_that_names_them_by_a_function(bert):
    """``supported_layer_types = linear_types`` (a function, as LoRA's is) makes the linear rows clickable."""
    from opendelta.interactive.selector import selectable_for
    from opendelta.plugin_api import DeltaConfig, DeltaModel, linear_types

    class _Config(DeltaConfig):
        delta_type = "page_probe"

    class _ByFunction(DeltaModel):
        config_class = _Config
        supported_layer_types = linear_types

        def _build_delta(self, target):
            return nn.Identity()

    class _ByTuple:  # a 0.3.2-style class: a plain tuple and no layer_types()
        supported_layer_types = (nn.LayerNorm,)

    by_function, by_tuple = selectable_for(_ByFunction), selectable_for(_ByTuple)
    query = bert.get_submodule("bert.encoder.layer.0.attention.self.query")
    norm = bert.get_submodule("bert.encoder.layer.0.output.LayerNorm")
    assert by_function(query) and not by_function(norm)
    assert by_tuple(norm) and not by_tuple(query)
    assert selectable_for(object) is None
