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
    setuptools_cfg = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(base).parts)
        for top, base in (("aaclip_core", ROOT), ("aaclip_cli", ROOT), ("aaclip_score", ROOT / "scorer"))
        for p in (base / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == {"aaclip_core.recipes"}
    # The scorer is one package (its wheel lists it alone) that the full install maps from scorer/.
    assert setuptools_cfg["package-dir"]["aaclip_score"] == "scorer/aaclip_score"
    scorer_cfg = tomllib.loads((ROOT / "scorer" / "pyproject.toml").read_text())
    assert scorer_cfg["tool"]["setuptools"]["packages"] == ["aaclip_score"]
    assert {p for p in on_disk if p.startswith("aaclip_score")} == {"aaclip_score"}


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
    _copy_sources(src)
    return _build(src, tmp_path / "dist", "aaclip-*.whl")


def _copy_sources(src: Path) -> None:
    for name in ("aaclip_core", "aaclip_cli", "recipes", "scorer"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))


def _build(src: Path, dist: Path, pattern: str) -> Path:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(dist), "-q"],
        cwd=dist.parent, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (built,) = dist.glob(pattern)
    return built


@pytest.fixture(scope="module")
def scorer_wheel(tmp_path_factory) -> Path:
    """The aaclip-score wheel, built offline (pip wheel --no-deps) from a copy of scorer/."""
    pytest.importorskip("setuptools", reason="building a wheel offline needs setuptools (in the test extra)")
    tmp_path = tmp_path_factory.mktemp("scorer-wheel")
    shutil.copytree(ROOT / "scorer", tmp_path / "scorer", ignore=shutil.ignore_patterns("__pycache__", "build",
                                                                                        "*.egg-info"))
    return _build(tmp_path / "scorer", tmp_path / "dist", "aaclip_score-*.whl")


def test_the_scorer_wheel_holds_the_scorer_alone_and_requires_no_torch(scorer_wheel):
    names = zipfile.ZipFile(scorer_wheel).namelist()
    outside = [n for n in names if not n.startswith(("aaclip_score/", "aaclip_score-"))]
    assert not outside, outside
    assert {"aaclip_score/detector.py", "aaclip_score/cli.py", "aaclip_score/fonts/DejaVuSans.ttf",
            "aaclip_score/fonts/LICENSE_DEJAVU"} <= set(names)
    shipped = {Path(n).name for n in names if n.startswith("aaclip_score/") and n.endswith(".py")}
    assert shipped == {p.name for p in (ROOT / "scorer" / "aaclip_score").glob("*.py")}
    requires = sorted(line.split(":", 1)[1].strip().split(">")[0].split("<")[0].split("=")[0].strip().lower()
                      for line in _metadata(scorer_wheel) if line.startswith("Requires-Dist:"))
    assert requires == ["numpy", "onnxruntime", "pillow"]
    with zipfile.ZipFile(scorer_wheel) as z:
        (entry,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        assert "aaclip-score = aaclip_score.cli:main" in z.read(entry).decode()


def test_the_full_wheel_ships_the_scorer_too(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"aaclip_score/detector.py", "aaclip_score/fonts/DejaVuSans.ttf"} <= names
    with zipfile.ZipFile(wheel) as z:
        (entry,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        assert "aaclip-score = aaclip_score.cli:main" in z.read(entry).decode()


@pytest.mark.integration  # a real pip install into a fresh environment: CI's second step
def test_an_editable_install_maps_the_scorer_from_scorer_folder(tmp_path):
    """`pip install -e .` (offline, into a fresh environment that borrows this one's packages)
    makes `aaclip_score` importable from anywhere, from the checkout's scorer/ folder."""
    pytest.importorskip("setuptools", reason="an offline editable install needs setuptools (in the test extra)")
    import sysconfig
    import venv

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _copy_sources(src)
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # pip and setuptools from this environment (a path line: its own .pth files, editable finders
    # among them, are not run there).
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-e", str(src)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shown = subprocess.run([str(python), "-c", "import aaclip_score, aaclip_score.options as o; "
                            "print(aaclip_score.__file__, o.__file__)"],
                           capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == [str(src / "scorer" / "aaclip_score" / "__init__.py"),
                                    str(src / "scorer" / "aaclip_score" / "options.py")]


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
