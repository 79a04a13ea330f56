"""Packaging: every package is listed for the wheel, and the recipes ship with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsectl.recipe_files import recipe_dir, shipped_recipe

REPO = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vsectl").rglob("__init__.py")}
    assert found | set(recipe_packages()) == listed


def recipe_packages() -> dict[str, Path]:
    """recipes/ and every folder under it that holds recipes, by the package name it gets in an installed vsectl."""
    folders = {p.parent for p in (REPO / "recipes").rglob("*.yaml")}
    return {".".join(("vsectl", *f.relative_to(REPO).parts)): f for f in folders}


def test_every_recipe_folder_ships_its_yaml_files():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {name: ["*.yaml"] for name in recipe_packages()} | {"vsectl.native": ["*.c"]} == data


def test_the_native_kernel_sources_ship_in_the_wheel(tmp_path: Path):
    """An installed vsectl compiles its C kernels from the package: the .c files must be in the wheel."""
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    src = tmp_path / "src"                                # a copy: the build leaves no build/ in the checkout
    for name in ("vsectl", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    names = zipfile.ZipFile(next((tmp_path / "wheel").glob("vsectl-*.whl"))).namelist()
    sources = {p.name for p in (REPO / "vsectl" / "native").glob("*.c")}
    assert sources and {f"vsectl/native/{n}" for n in sources} <= set(names)


def test_shipped_recipes_are_found_through_the_package():
    assert (recipe_dir() / "tiny.yaml").is_file() and (recipe_dir() / "patterns" / "default.yaml").is_file()
    assert shipped_recipe("tiny.yaml").read_text() == (REPO / "recipes" / "tiny.yaml").read_text()
