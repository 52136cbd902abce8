"""The wheel holds everything pctop needs at run time, the BPF C included.

probes/ sits at the top of the tree (BPF C kept apart from Python) and ships as
pctop.probes; the package list in pyproject.toml is explicit, so a new package
that is not added there would be missing from installs. Built for real with pip
(no network: --no-build-isolation uses the venv's setuptools and Debian's wheel).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TMPDIR": str(build)})
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("pctop-*.whl")
    return whl


def test_wheel_holds_every_module_and_probe_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pctop").rglob("*.py")}
    tree |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "pctop").rglob("*.tcss")}
    probes = {f"pctop/probes/{p.name}" for p in (ROOT / "probes").iterdir() if p.suffix in (".c", ".h")}
    assert probes, "no probe sources in the tree"
    assert not (tree | probes) - names, sorted((tree | probes) - names)


def test_installed_copy_finds_its_probes_outside_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if k != "PCTOP_PROBES"}
    env["PYTHONPATH"] = str(target)
    r = subprocess.run([sys.executable, "-c", "from pctop.sources import ebpf; print(ebpf.PROBE_DIR);"
                        "print(len(ebpf.probe_text()))"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    where, size = r.stdout.split()
    assert Path(where) == target / "pctop" / "probes"
    assert int(size) > 10_000
