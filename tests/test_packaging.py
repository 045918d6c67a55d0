"""The wheel and the sdist, built as pip builds them, hold what an installed
evoxtral-stream needs and run outside the source tree.

CI installs the project editable, which reads the source tree: a data file left
out of the wheel, or a path computed from the tree, would pass every other test
and fail only for a user who installs the wheel.
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docs_schema import ROOT

pytest.importorskip("hatchling.build", reason="needs hatchling (the test extra)")

PACKAGE = ROOT / "src" / "evoxtral_stream"

# pip's PEP 517 calls, as `pip wheel --no-build-isolation` makes them.
_BUILD = """\
import sys
import hatchling.build as b
print(b.build_sdist(sys.argv[1]) if sys.argv[2] == "sdist" else b.build_wheel(sys.argv[1]))
"""


@dataclass(frozen=True)
class Built:
    wheel: Path
    sdist: Path


def _build(source: Path, kind: str, out: Path) -> Path:
    done = subprocess.run([sys.executable, "-c", _BUILD, str(out), kind], cwd=source,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("dist")
    return Built(wheel=_build(ROOT, "wheel", out), sdist=_build(ROOT, "sdist", out))


def _tree_files(folder: Path) -> set[str]:
    """The files under ``folder`` (relative to its parent) but caches and
    hidden files, which no build ships."""
    return {str(p.relative_to(folder.parent)) for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _wheel_contents(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as z:
        return {n: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist()}


def test_the_wheel_holds_every_file_of_the_package(built: Built) -> None:
    """Data files included: the config defaults, the sample, the page."""
    names = set(_wheel_contents(built.wheel))
    expected = _tree_files(PACKAGE)
    assert {"evoxtral_stream/config.toml", "evoxtral_stream/data/sample.ogg",
            "evoxtral_stream/server/web/index.html"} <= expected
    assert not expected - names, f"left out of the wheel: {sorted(expected - names)}"
    stray = [n for n in names if not n.startswith(("evoxtral_stream/", "evoxtral_stream-"))]
    assert not stray, f"the wheel holds files outside the package: {stray}"
    # The licence's text goes with the code (metadata says MIT).
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)


def test_the_installed_wheel_runs_outside_the_source_tree(built: Built,
                                                          tmp_path: Path) -> None:
    """Unpacked as pip installs it, imported first (before an editable install's
    path), from a folder that is not the checkout."""
    site = tmp_path / "site"
    with zipfile.ZipFile(built.wheel) as z:
        z.extractall(site)
    entry = configparser.ConfigParser()
    entry.read(next(site.glob("*.dist-info")) / "entry_points.txt")
    assert dict(entry["console_scripts"]) == {"evoxtral-stream": "evoxtral_stream.cli:main"}
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    script = f"""\
from importlib import resources
from pathlib import Path
import evoxtral_stream, evoxtral_stream.cli
from evoxtral_stream.config import load_config
from evoxtral_stream.data import sample_path, sample_text
assert Path(evoxtral_stream.__file__).is_relative_to({str(site)!r}), evoxtral_stream.__file__
assert callable(evoxtral_stream.cli.main)
load_config()
assert sample_path().is_file() and sample_text()
web = resources.files("evoxtral_stream").joinpath("server/web")
assert {{f.name for f in web.iterdir()}} >= {{"index.html", "app.js", "style.css", "worklet.js"}}
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    config = subprocess.run([sys.executable, "-m", "evoxtral_stream", "config"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert config.returncode == 0, config.stderr
    assert "[model.whisper]" in config.stdout


def test_the_sdist_holds_the_tree_and_builds_the_same_wheel(built: Built,
                                                            tmp_path: Path) -> None:
    """Tests, docs, clients and bench go in the sdist, so its tests run; the
    wheel built from it is the wheel built from the checkout, byte for byte."""
    with tarfile.open(built.sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (top,) = tmp_path.iterdir()
    names = {str(p.relative_to(top)) for p in top.rglob("*") if p.is_file()}
    expected = {"README.md", "LICENSE", "pyproject.toml", "config.toml"}
    expected |= {f"src/{n}" for n in _tree_files(PACKAGE)}
    for folder in ("tests", "docs", "clients", "bench"):
        expected |= _tree_files(ROOT / folder)
    assert not expected - names, f"left out of the sdist: {sorted(expected - names)}"
    again = _build(top, "wheel", tmp_path / "out")
    assert _wheel_contents(again) == _wheel_contents(built.wheel)


def test_the_package_reads_its_data_through_importlib_resources() -> None:
    """No module computes a path from ``__file__`` (it only holds in the source
    tree or an unzipped install) or imports what the wheel does not ship."""
    outside = {"clients", "bench", "tests", "shared"}
    bad: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Name) and node.id == "__file__":
                bad.append(f"{where}:{node.lineno}: __file__")
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if node.module and node.level == 0 else [])
                bad += [f"{where}:{node.lineno}: import {n}" for n in names
                        if n.split(".")[0] in outside]
    assert not bad, bad
