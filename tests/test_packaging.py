"""The project installs as one import root, ``lolax``, and works from the installed wheel alone."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = {"ops": "lolax.ops", "models": "lolax.models", "optim": "lolax.optim", "parallelism": "lolax.parallelism"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                                "__pycache__", "docs", "notebooks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(out)], check=True, cwd=out)
    (path,) = out.glob("lolax-*.whl")
    return path


def test_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"lolax", next(t for t in top if t.endswith(".dist-info"))}, sorted(top)
    packages = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("__init__.py")}
    expected = {"lolax"} | {
        LIBRARY[path.parts[0]] + "".join("." + p for p in path.parts[1:])
        for folder in LIBRARY for path in (p.parent.relative_to(ROOT) for p in (ROOT / folder).rglob("__init__.py"))}
    assert packages == expected
    assert not any(n.startswith(("experiments", "tests")) for n in names)


def test_installed_wheel_imports_without_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                    str(wheel)], check=True)
    code = ("import importlib, pkgutil, lolax\n"
            "for sub in ('ops', 'models', 'optim', 'parallelism'):\n"
            "    pkg = importlib.import_module('lolax.' + sub)\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n"
            f"assert lolax.__file__.startswith({str(target)!r}), lolax.__file__\n"
            "import lolax.ops as ops\n"
            f"assert ops.__file__.startswith({str(target)!r}), ops.__file__\n"
            "print(lolax.__version__)\n")
    env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == __import__("lolax").__version__
