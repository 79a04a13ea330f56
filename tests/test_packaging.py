"""Packaging: every package is listed for the wheel, and the recipes ship with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsectl.science.experiment import recipe_dir, shipped_recipe

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


def test_shipped_recipes_are_found_through_the_package():
    assert (recipe_dir() / "tiny.yaml").is_file() and (recipe_dir() / "patterns" / "default.yaml").is_file()
    assert shipped_recipe("tiny.yaml").read_text() == (REPO / "recipes" / "tiny.yaml").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vsectl wheel, built once from a copy of the tree (the build leaves no build/ in the checkout)."""
    import shutil
    import subprocess
    import sys

    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in ("vsectl", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "wheel"), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return next((tmp / "wheel").glob("vsectl-*.whl"))


def test_the_native_kernel_sources_ship_in_the_wheel(wheel: Path):
    """An installed vsectl compiles its C kernels from the package: the .c files must be in the wheel."""
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    sources = {p.name for p in (REPO / "vsectl" / "native").glob("*.c")}
    assert sources and {f"vsectl/native/{n}" for n in sources} <= set(names)


def test_an_installed_wheel_runs_the_experiments_with_their_shipped_recipes(wheel: Path, tmp_path: Path):
    """From another folder, with only the wheel installed (no source tree on sys.path), the experiments' default
    recipes are found through the package: `bench-pooling --quick` and `gridsearch --quick` run."""
    import os
    import site
    import subprocess
    import sys
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, ...) come from this environment's site-packages, read through a .pth file: its own
    # .pth files (the editable install of the source tree among them) are not processed from there
    deps = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    Path(purelib, "deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    probe = "import sys, vsectl; print(vsectl.__file__); print(*sys.path, sep='\\n')"
    where = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                           check=True).stdout.splitlines()
    assert where[0].startswith(purelib), where
    assert REPO not in {Path(p or tmp_path).resolve() for p in where[1:]}, where  # the source tree is not importable
    vsectl = str(venv / "bin" / "vsectl")
    for argv in ([vsectl, "--quiet", "bench-pooling", "--quick", "--out", "bench"],
                 [vsectl, "--quiet", "gridsearch", "--quick", "--pool", "max", "--no-gpo", "--out", "grid",
                  "--device", "cpu"]):
        done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert done.returncode == 0, (argv, done.stderr[-3000:])
    assert (tmp_path / "bench" / "results.json").is_file() and (tmp_path / "grid" / "results.md").is_file()
