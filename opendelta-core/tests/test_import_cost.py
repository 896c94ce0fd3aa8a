"""Start-up: what ``import opendelta`` and ``opendelta --help`` import (modules, never times: those are measured).

Each check runs in a fresh interpreter, since this one has imported everything already.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torch._dynamo", "transformers", "huggingface_hub", "jsonschema", "bigmodelvis", "http.server")


def _modules_after(code: str) -> dict[str, bool]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {list(HEAVY)!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_opendelta_imports_none_of_the_heavy_modules():
    assert _modules_after("import opendelta") == dict.fromkeys(HEAVY, False)


def test_the_top_level_help_imports_no_torch():
    code = (
        "import contextlib, io\nfrom opendelta.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])"
    )
    assert _modules_after(code) == dict.fromkeys(HEAVY, False)


def test_building_a_delta_model_imports_no_dynamo_and_no_web_server():
    code = "import opendelta\nfrom opendelta.plugin_api import DeltaModel, Target"
    loaded = _modules_after(code)
    assert loaded["torch"] and not loaded["torch._dynamo"] and not loaded["http.server"]


def test_the_compile_guard_is_applied_when_dynamo_is_imported_later():
    code = "import opendelta, torch._dynamo\nprint(json.dumps(torch._dynamo.config.skip_nnmodule_hook_guards))\n"
    out = subprocess.run(
        [sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) is False


def test_the_compile_guard_is_applied_at_once_when_dynamo_came_first():
    code = "import torch._dynamo, opendelta.insertion\nprint(torch._dynamo.config.skip_nnmodule_hook_guards)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_public_names_still_resolve_and_are_listed():
    import opendelta

    assert opendelta.DeltaModel.__module__ == "opendelta.base"
    assert opendelta.freeze_module.__module__ == "opendelta.freezing"
    assert set(opendelta.__all__) <= set(dir(opendelta))
    assert opendelta.logging.__name__ == "opendelta.utils.logging"
    assert opendelta.plugins.__name__ == "opendelta.plugins"  # a submodule, imported on access
    with pytest.raises(AttributeError):
        opendelta.no_such_name


def test_each_command_module_gives_the_help_the_light_table_shows():
    import argparse

    from opendelta.cli import COMMANDS, build_parser

    parser = build_parser()
    actions = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    shown = {choice.dest: choice.help for choice in actions._choices_actions}
    assert shown == {name: help_text for name, (_module, help_text) in COMMANDS.items()}
