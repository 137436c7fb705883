"""The package type-checks: mypy over nbdformats/ reports nothing (the code is annotated throughout)."""

from __future__ import annotations

import sys

from conftest import ROOT, run


def test_mypy_is_clean():
    out = run([sys.executable, "-m", "mypy", ROOT / "nbdformats"], timeout=600, check=False)
    assert out.returncode == 0, out.stdout.decode()[-4000:]
