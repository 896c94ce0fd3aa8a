"""The README's Python examples run as written (in a temporary folder, so their files land there)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import opendelta

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS


QUANTIZED = "BitsAndBytesConfig"
"""Blocks with this name load a backbone through bitsandbytes: they run in tests/quantized (tests_quant has it)."""


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    if QUANTIZED in BLOCKS[index]:
        pytest.skip("needs bitsandbytes: tests/quantized/test_readme_quantized.py runs it (nox -s tests_quant)")
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme_example"})


TEXT = README.read_text(encoding="utf-8")
ROOT = README.parent
CPU_INDEX = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
CI_COMMAND = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]


def test_readme_starts_with_the_demo_and_the_test_command():
    first_block = TEXT.split("\n    ", 1)[1].split("\n\n", 1)[0]  # the first indented code block
    commands = [line.split("#", 1)[0].strip() for line in ("    " + first_block).splitlines()]
    assert commands == ["python3 -m pip install -q nox && python3 -m nox -s demo", CI_COMMAND]


def test_the_cpu_torch_build_comes_first():
    before = TEXT[: TEXT.index(CPU_INDEX)]
    after_the_two_commands = before.split(CI_COMMAND, 1)[1]
    assert "OPENDELTA_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in after_the_two_commands
    assert "pip install" not in after_the_two_commands.replace("`pip install torch`", "")  # nothing before torch
    assert "a GPU build works the same" in after_the_two_commands


def test_the_install_is_the_wheelhouse_one_and_never_thunlps_opendelta():
    assert "pip install --find-links wheelhouse opendelta-core opendelta-lora" in TEXT
    assert "nox -s wheels" in TEXT and "thunlp's 0.3.2" in TEXT
    assert not re.search(r"pip install (-U )?opendelta(\s|$)", TEXT)


def test_the_cost_figures_keep_their_format():
    figures = re.search(
        r"`nox -t ci` takes about (\d+) minutes on 2 cores.*?about (\d+) GB of virtualenvs.*?demo about (\d+) minutes",
        TEXT,
        flags=re.S,
    )
    assert figures, "README lost its `nox -t ci` time / disk / demo figures"
    assert "idle 2-core" in TEXT


def test_the_demo_help_line_names_an_interpreter_and_runs():
    line = re.search(r"`(\S*python) examples/demo.py --help`", TEXT)
    assert line and line.group(1) != "python", "say which interpreter runs the demo outside nox"
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--help"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "--quick" in run.stdout, run.stderr[-2000:]


def test_the_serving_claim_is_what_the_servers_accept():
    assert "vLLM rejects any adapter with `modules_to_save`" in TEXT
    assert "OpenDeltaServingWarning" in TEXT and hasattr(opendelta, "OpenDeltaServingWarning")
    assert not re.search(r"for PEFT, vLLM and TGI", TEXT)


def nox_sessions() -> dict[str, dict[str, object]]:
    """The noxfile's sessions and their decorator keywords, read without importing nox (not installed here)."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                if ast.unparse(target) == "nox.session":
                    keywords = deco.keywords if isinstance(deco, ast.Call) else []
                    found[node.name] = {k.arg: ast.literal_eval(k.value) for k in keywords}
    return found


def test_plain_nox_runs_only_safe_sessions_and_the_readme_says_so():
    sessions = nox_sessions()
    for unsafe in ("bench", "interactive", "wheels", "new_plugin"):
        assert sessions[unsafe].get("default") is False, unsafe
    assert "ci" in sessions["wheelhouse"]["tags"] and "ci" in sessions["interactive"]["tags"]
    assert "structures" not in sessions  # replaced by wheelhouse
    assert "Plain `nox` runs only the safe sessions" in TEXT
    assert "root to `apt-get install chromium`" in TEXT and "skipped with" in TEXT


def test_the_noxfile_no_longer_calls_the_public_pin_the_cpu_wheel():
    doc = ast.get_docstring(ast.parse((ROOT / "noxfile.py").read_text()))
    assert "the CPU\nwheel" not in doc and "the CPU wheel" not in doc and "CUDA build" in doc
    assert "tests_all-transformers-5" in doc and "tests_all-transformers-5" in TEXT.replace("\n", " ")


def test_interactive_says_why_it_cannot_install_chromium():
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "browser_install_problem")
    namespace: dict = {}
    exec(compile(ast.Module([function], []), "noxfile.py", "exec"), namespace)
    problem = namespace["browser_install_problem"]
    assert "needs root" in problem(1000, "/usr/bin/apt-get")
    assert "no apt-get" in problem(0, None)
    assert problem(0, "/usr/bin/apt-get") is None


@pytest.mark.parametrize("plugin", sorted(p.name for p in (ROOT / "plugins").glob("opendelta-*")))
def test_each_plugin_readme_gives_the_install_that_works_before_publishing(plugin):
    text = (ROOT / "plugins" / plugin / "README.md").read_text(encoding="utf-8")
    assert f"pip install --find-links wheelhouse opendelta-core {plugin}" in text
    assert f"pip install opendelta-core {plugin}" in text and "nox -s wheels" in text


def test_readme_gives_the_command_ci_runs():
    assert f"`{CI_COMMAND}`" in TEXT
