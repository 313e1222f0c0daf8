"""What a wheel built from the project holds: every package, and the shipped recipes inside the
package, so an installed `aaclip --recipe demo` works away from the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("aaclip_core", "aaclip_cli")
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == {"aaclip_core.recipes"}


def test_pyproject_takes_a_torch_range_and_ci_pins_the_tested_set():
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip(): d for d in _pyproject()["project"]["dependencies"]}
    for name in ("torch", "torchvision"):
        assert "==" not in deps[name] and ">=" in deps[name] and "<" in deps[name], deps[name]
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout (an in-place build would leave build/ and *.egg-info)."""
    pytest.importorskip("setuptools", reason="building a wheel offline needs setuptools (in the test extra)")
    tmp_path = tmp_path_factory.mktemp("wheel")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("aaclip_core", "aaclip_cli", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(dist), "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (built,) = dist.glob("aaclip-*.whl")
    return built


def _metadata(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return z.read(name).decode("utf-8").splitlines()


def test_the_wheel_claims_the_python_the_pinned_set_needs(wheel):
    """constraints.txt pins numpy and pandas releases that need Python 3.11, so the wheel says so,
    and needs no tomli (a 3.10 backport of tomllib)."""
    metadata = _metadata(wheel)
    assert "Requires-Python: >=3.11" in metadata
    assert not [line for line in metadata if line.startswith("Requires-Dist: tomli") and "tomli-w" not in line
                and "tomli_w" not in line]
    assert _pyproject()["project"]["requires-python"] == ">=3.11"


def _python_310() -> str | None:
    """A Python 3.10 that runs (a pyenv shim on PATH may name one that is not selected)."""
    for exe in ("/root/.pyenv/versions/3.10.13/bin/python3", shutil.which("python3.10")):
        if exe and Path(exe).is_file():
            probe = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                                   capture_output=True, text=True, timeout=60)
            if probe.stdout.strip() == "True":
                return exe
    return None


def test_python_310_refuses_the_wheel_with_pips_own_message(wheel, tmp_path):
    python_310 = _python_310()
    if python_310 is None:
        pytest.skip("no Python 3.10 here to try the wheel with")
    done = subprocess.run(
        [python_310, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--target", str(tmp_path / "t"),
         str(wheel)], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0, done.stdout
    assert "requires a different Python" in done.stderr and ">=3.11" in done.stderr, done.stderr


def test_the_wheel_ships_the_recipes_and_runs_from_outside_the_checkout(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).name for n in names if n.startswith("aaclip_core/recipes/"))
    assert shipped == sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # the unpacked wheel only, not the checkout
    code = "import sys, aaclip_core; from aaclip_cli.main import main; print(aaclip_core.__file__, file=sys.stderr); main()"
    shown = subprocess.run([sys.executable, "-c", code, "recipes", "show", "demo"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert str(site) in shown.stderr and 'name = "demo"' in shown.stdout
