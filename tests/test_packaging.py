"""The package builds (sdist and wheel) and the wheel works in a fresh virtualenv."""

from __future__ import annotations

import sys
import tarfile
import zipfile

from conftest import ROOT, run


def test_build_and_install_wheel_in_fresh_venv(tmp_path):
    run([sys.executable, "-m", "build", "--outdir", tmp_path / "dist", ROOT], timeout=600)
    wheels = list((tmp_path / "dist").glob("nbdformats-*.whl"))
    sdists = list((tmp_path / "dist").glob("nbdformats-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    for module in ("nbdformats/cli.py", "nbdformats/server/connection.py", "nbdformats/plugins/memory.py",
                   "nbdformats/filters/luks.py", "nbdformats/formats/luks/header.py"):
        assert module in names, module
    assert any(n.endswith("entry_points.txt") for n in names)
    with tarfile.open(sdists[0]) as sdist:
        assert any(n.endswith("/README.md") for n in sdist.getnames())
    venv = tmp_path / "venv"
    run(["/usr/bin/python3", "-m", "venv", venv])  # fresh: no system site packages, no editable install
    run([venv / "bin" / "pip", "install", "-q", wheels[0]], timeout=900)
    out = run([venv / "bin" / "nbdformats", "-U", "-", "memory", "1M", "--run", 'nbdinfo --size "$uri"'])
    assert out.stdout.strip() == b"1048576"
    listing = run([venv / "bin" / "nbdformats", "--list"]).stdout
    assert b"luks" in listing and b"tar" in listing
