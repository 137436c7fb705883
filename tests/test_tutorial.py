"""docs/tutorial.md works as written: its files are extracted and their tests run."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from conftest import ROOT, run

TUTORIAL = ROOT / "docs" / "tutorial.md"
BLOCK = re.compile(r"```python\n# file: (\S+)\n(.*?)```", re.S)


def tutorial_files() -> dict[str, str]:
    return {name: f"# file: {name}\n{body}" for name, body in BLOCK.findall(TUTORIAL.read_text())}


def test_tutorial_has_a_plugin_a_filter_and_tests():
    assert sorted(tutorial_files()) == ["pattern.py", "test_tutorial_components.py", "xor.py"]


def test_tutorial_code_passes_its_own_tests(tmp: Path):
    for name, text in tutorial_files().items():
        (tmp / name).write_text(text)
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp,
                tmp / "test_tutorial_components.py"], timeout=120, check=False)
    output = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    assert "3 passed" in output
