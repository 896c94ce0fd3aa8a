"""Small things a newcomer hits in the first hour: the testing extra, folded tree rows, show --common's names."""

import subprocess
import sys

from opendelta.cli import main
from opendelta.testing import tiny_model

HIDE_PYTEST = "import sys; sys.modules['pytest'] = None; import opendelta.testing"


def test_importing_opendelta_testing_without_pytest_names_the_extra():
    run = subprocess.run([sys.executable, "-c", HIDE_PYTEST], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: opendelta.testing needs pytest")
    assert "pip install 'opendelta-core[testing]'" in last


def test_new_plugin_next_steps_install_the_testing_extra(tmp_path, capsys):
    assert main(["new-plugin", "my_newcomer", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    install = next(line for line in out.splitlines() if "pip install -e" in line)
    assert "'opendelta-core[testing]'" in install
    assert out.index("pip install -e") < out.index("pytest ")


def test_folded_rows_keep_the_space_before_the_class(tmp_path, capsys):
    tiny_model("bert").save_pretrained(tmp_path / "bert")
    assert main(["show", str(tmp_path / "bert")]) == 0
    out = capsys.readouterr().out
    assert "0-1 (BertLayer)" in out and "query,key,value (Linear) weight:[32, 32]" in out
    assert "(BertLayer)" not in out.replace(" (BertLayer)", "")


def test_log_folds_with_the_space_too(toy, capsys):
    toy(tiny_model("bert")).log()
    assert "0-1 (BertLayer)" in capsys.readouterr().out


def test_show_common_names_every_row_of_a_block_relative_to_the_block(tmp_path, capsys):
    tiny_model("bert").save_pretrained(tmp_path / "bert")
    assert main(["show", str(tmp_path / "bert"), "--common"]) == 0
    out = capsys.readouterr().out
    assert "0-1 (BertLayer)" in out  # the blocks still fold
    assert "q (Linear: attention.self.query), k (Linear: attention.self.key)" in out
    assert "w1 (Linear: intermediate.dense)" in out and "w2 (Linear: output.dense)" in out
    assert "layer_norm (LayerNorm: attention.output.LayerNorm)" in out
