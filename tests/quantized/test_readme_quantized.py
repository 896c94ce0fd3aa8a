"""README's Quantized backbones example runs as written, with the real bitsandbytes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = [
    b
    for b in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    if "BitsAndBytesConfig" in b
]


def test_the_readme_has_a_quantized_example() -> None:
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_the_quantized_readme_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes", reason="the example loads a backbone in nf4 through bitsandbytes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(BLOCKS[index], f"README.md quantized block {index}", "exec"), namespace)
    from opendelta.quantization import quantized_modules

    plain = namespace["plain"]
    assert plain is namespace["model"] and not quantized_modules(plain) and not plain.is_quantized
