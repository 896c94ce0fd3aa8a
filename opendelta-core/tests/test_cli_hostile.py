"""Crafted input to ``opendelta inspect``, ``show`` and ``merge``: one line on stderr, status 1, within seconds.

``inspect`` reads what the loader reads, with the loader's own checks (a weights file or config linking out of the
folder, a Hub cache entry leading outside the cache, an invalid repo id) and ``safetensors``' own header parser,
and hashes the weights by streaming them (a 768 MiB file does not raise the process's peak memory by 768 MiB).
``show`` and ``merge`` check a config's sizes before building anything. Most cases run the real ``main()`` in
this process; the ones about a process (peak memory, the console script and its environment) run it in a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_hub import put_in_hub_cache

from opendelta.cli import main
from opendelta.cli.config_checks import MAX_LAYERS, check_config_sizes
from opendelta.testing.tiny_models import tiny_config

SCRIPT = shutil.which("opendelta", path=str(Path(sys.executable).parent))


def assert_one_line_error(err: str, command: str, *needles: str) -> None:
    assert err.startswith(f"opendelta {command}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _write_weights(folder: Path, data: bytes) -> None:
    """Replace the weights file with ``data``, and drop the recorded digest (so only the header is in question)."""
    config = _config(folder)
    (folder / config["weights_file"]).write_bytes(data)
    config.pop("weights_sha256")
    (folder / "config.json").write_text(json.dumps(config))


def _header(entries: object, data: bytes = b"\0" * 16) -> bytes:
    raw = json.dumps(entries).encode() if not isinstance(entries, bytes) else entries
    return struct.pack("<Q", len(raw)) + raw + data


CRAFTED_HEADERS = {
    "a length of 2**60": struct.pack("<Q", 2**60) + b"{}",
    "a length past the end of the file": struct.pack("<Q", 50 * 2**20) + b"{}",
    "bad JSON": _header(b"{not json"),
    "JSON nested 100,000 deep": _header(b"[" * 100_000 + b"]" * 100_000),
    "a list, not an object": _header([]),
    "offsets past the end of the file": _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4000]}}),
    "offsets that do not fit the shape": _header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}),
    "a negative shape": _header({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}),
    "a shape of strings": _header({"w": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 16]}}),
    "an unknown dtype": _header({"w": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}),
    "no data_offsets": _header({"w": {"dtype": "F32", "shape": [4]}}),
    "an empty file": b"",
}


@pytest.mark.parametrize("case", CRAFTED_HEADERS)
def test_inspect_reports_a_crafted_header_in_one_line(case, toy_checkpoint_dir, capsys):
    _write_weights(toy_checkpoint_dir, CRAFTED_HEADERS[case])
    assert main(["inspect", str(toy_checkpoint_dir)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line_error(err, "inspect", "is not a readable safetensors file")


def _weights_link_out(folder: Path) -> None:
    name = _config(folder)["weights_file"]
    outside = folder.parent / "outside.safetensors"
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)


def _config_link_out(folder: Path) -> None:
    shutil.move(folder / "config.json", folder.parent / "outside.json")
    (folder / "config.json").symlink_to(folder.parent / "outside.json")


def _empty_weights_name(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({**_config(folder), "weights_file": ""}))


def _weights_name_a_path(folder: Path) -> None:
    shutil.copy(folder / _config(folder)["weights_file"], folder.parent / "other.safetensors")
    (folder / "config.json").write_text(json.dumps({**_config(folder), "weights_file": "../other.safetensors"}))


REFUSED_PATHS = {
    "weights file linking out": (_weights_link_out, "is a link that leads outside the checkpoint folder"),
    "config.json linking out": (_config_link_out, "'config.json' in"),
    "an empty weights_file": (_empty_weights_name, "must be a plain file name"),
    "weights_file a path out": (_weights_name_a_path, "must be a plain file name"),
}


@pytest.mark.parametrize("case", REFUSED_PATHS)
def test_inspect_refuses_what_the_loader_refuses(case, toy_checkpoint_dir, capsys):
    tamper, message = REFUSED_PATHS[case]
    tamper(toy_checkpoint_dir)
    assert main(["inspect", str(toy_checkpoint_dir)]) == 1
    assert_one_line_error(capsys.readouterr().err, "inspect", message)


@pytest.mark.parametrize("repo_id", ["someone/toy--delta", "someone/toy..delta", "someone/toy.git", "a/b c"])
def test_inspect_of_an_invalid_repo_id_is_one_line(repo_id, capsys):
    assert main(["inspect", repo_id]) == 1
    assert_one_line_error(capsys.readouterr().err, "inspect", "not a Hub repo id")


def _sparse_checkpoint(folder: Path, size: int) -> None:
    """A weights file holding one float32 tensor of ``size`` bytes (a sparse file: no disk, but every byte is read)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    _write_weights(folder, struct.pack("<Q", len(header)) + header)
    with open(folder / _config(folder)["weights_file"], "r+b") as handle:
        handle.truncate(8 + len(header) + size)


_PEAK_SCRIPT = """
import resource, sys
from opendelta.cli import main
peaks = []
for folder in sys.argv[1:]:
    assert main(["inspect", folder, "--json"]) == 0
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print("PEAKS", *peaks, file=sys.stderr)
"""


def test_inspect_hashes_a_large_weights_file_without_holding_it_in_memory(toy_checkpoint_dir, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(toy_checkpoint_dir, big)
    size = 768 * 2**20
    _sparse_checkpoint(big, size)
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(toy_checkpoint_dir), str(big)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    small_peak, big_peak = map(int, result.stderr.split("PEAKS")[1].split())  # KiB
    assert (big_peak - small_peak) * 1024 < size / 4, (small_peak, big_peak)
    assert f'"parameters": {size // 4}' in result.stdout  # it did read the big file's header


# ----------------------------------------------------------------------------------------------- show / merge
def _model_folder(tmp_path: Path, arch: str = "bert", **fields: object) -> Path:
    folder = tmp_path / f"model-{arch}"
    folder.mkdir(exist_ok=True)
    document = {**tiny_config(arch).to_dict(), **fields}
    (folder / "config.json").write_text(json.dumps(document))
    return folder


HOSTILE_CONFIGS = {
    "20,000 layers": ("bert", {"num_hidden_layers": 20_000}, "num_hidden_layers=20,000"),
    "GPT-2 with 20,000 blocks": ("gpt2", {"n_layer": 20_000}, "n_layer=20,000"),
    "T5 with 20,000 decoder layers": ("t5", {"num_decoder_layers": 20_000}, "num_decoder_layers=20,000"),
    "a negative hidden size": ("bert", {"hidden_size": -32}, "hidden_size=-32, a negative size"),
    "a negative vocabulary": ("bert", {"vocab_size": -1}, "vocab_size=-1"),
    "a negative intermediate size": ("bert", {"intermediate_size": -64}, "intermediate_size=-64"),
    "a hidden size of 10**12": ("bert", {"hidden_size": 10**12}, "hidden_size=1,000,000,000,000"),
    "2**40 positions": ("bert", {"max_position_embeddings": 2**40}, "max_position_embeddings="),
    "a nested text config of 20,000 layers": (
        "bert",
        {
            "model_type": "llava",
            "architectures": None,
            "text_config": {"model_type": "llama", "num_hidden_layers": 20_000},
        },
        "text_config.num_hidden_layers=20,000",
    ),
    "zero heads": ("bert", {"num_attention_heads": 0}, "cannot build"),
    "heads that do not divide the hidden size": ("bert", {"num_attention_heads": 5}, "cannot build"),
    "a hidden size that is a string": ("bert", {"hidden_size": "wide"}, "hidden_size"),
    "a hidden size that is a float": ("bert", {"hidden_size": 1e30}, "hidden_size"),
}


@pytest.mark.parametrize("case", HOSTILE_CONFIGS)
def test_show_refuses_a_hostile_config_in_one_line_within_seconds(case, tmp_path, capsys):
    arch, fields, message = HOSTILE_CONFIGS[case]
    folder = _model_folder(tmp_path, arch, **fields)
    start = time.monotonic()
    assert main(["show", str(folder)]) == 1
    elapsed = time.monotonic() - start
    assert_one_line_error(capsys.readouterr().err, "show", message)
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_show_refuses_a_config_file_too_large_or_too_deep(tmp_path, capsys):
    (tmp_path / "huge.json").write_text(json.dumps({"model_type": "bert", "pad": "x" * (17 * 2**20)}))
    assert main(["show", str(tmp_path / "huge.json")]) == 1
    assert_one_line_error(capsys.readouterr().err, "show", "more than a model config holds")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["show", str(tmp_path / "deep.json")]) == 1
    assert_one_line_error(capsys.readouterr().err, "show", "transformers cannot read the config")


def test_show_still_builds_the_deepest_allowed_model(tmp_path, capsys):
    folder = _model_folder(tmp_path, num_hidden_layers=MAX_LAYERS)
    start = time.monotonic()
    assert main(["show", str(folder)]) == 0
    assert "parameters" in capsys.readouterr().out
    assert time.monotonic() - start < 60


def test_every_default_transformers_config_passes_the_size_checks():
    """The bounds refuse no real architecture: each config class's defaults (a published model's sizes) pass."""
    import transformers

    checked = 0
    for model_type, config_class in transformers.CONFIG_MAPPING.items():
        try:
            config = config_class()
        except Exception:  # some need arguments (composite configs): their parts are checked on their own
            continue
        check_config_sizes(config, model_type)
        checked += 1
    assert checked > 300


def test_merge_refuses_a_hostile_backbone_config_before_loading_anything(toy_checkpoint_dir, tmp_path, capsys):
    backbone, output = _model_folder(tmp_path, num_hidden_layers=20_000), tmp_path / "o"
    argv = ["merge", "--delta", str(toy_checkpoint_dir), "--backbone", str(backbone), "--output", str(output)]
    assert main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, "merge", "num_hidden_layers=20,000")
    assert not output.exists()


# ------------------------------------------------------------------------------------------ in a new process
def test_the_console_script_refuses_hostile_input_in_one_line(toy_checkpoint_dir, tmp_path):
    """The real console script, offline, with the Hub cache from the environment: every case one line, status 1."""
    cache = tmp_path / "hub-cache"
    snapshot = put_in_hub_cache(cache, "someone/toy-delta", toy_checkpoint_dir)
    blobs = snapshot.parent.parent / "blobs"
    shutil.move(blobs, tmp_path / "outside-blobs")
    blobs.symlink_to(tmp_path / "outside-blobs", target_is_directory=True)
    crafted = tmp_path / "crafted"
    shutil.copytree(toy_checkpoint_dir, crafted)
    _write_weights(crafted, CRAFTED_HEADERS["offsets past the end of the file"])
    deep = _model_folder(tmp_path, num_hidden_layers=20_000)
    env = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    cases = [
        (["inspect", "someone/toy-delta"], "'blobs' folder that is a link"),
        (["inspect", "someone/toy--delta"], "not a Hub repo id"),
        (["inspect", str(crafted)], "is not a readable safetensors file"),
        (["show", str(deep)], "num_hidden_layers=20,000"),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    start = time.monotonic()
    running = [
        (
            subprocess.Popen([SCRIPT, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment),
            a,
            m,
        )
        for a, m in cases
    ]
    for process, args, message in running:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 1 and out == "", (args, out, err)
        assert_one_line_error(err, args[0], message)
    assert time.monotonic() - start < 240


def test_merge_refuses_a_backbone_larger_than_memory_before_allocating(toy_checkpoint_dir, tmp_path, capsys):
    """Each size within bounds, together 12 TiB of weights: refused from the meta skeleton, nothing allocated."""
    huge = {"hidden_size": 2**16, "intermediate_size": 2**18, "num_attention_heads": 64, "num_hidden_layers": 64}
    backbone, output = _model_folder(tmp_path, **huge), tmp_path / "o"
    argv = ["merge", "--delta", str(toy_checkpoint_dir), "--backbone", str(backbone), "--output", str(output)]
    assert main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, "merge", "GiB for its weights", "it was not loaded")
    assert not output.exists()
