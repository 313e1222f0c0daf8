"""The import direction of pyproject.toml's [tool.importlinter] contracts holds for the code as it is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is part of the test extra: pip install -e '.[test]'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scorer"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _layer_rooms() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    main = config["contracts"][0]
    assert main["type"] == "layers"
    return [room.strip() for layer in main["layers"] for room in layer.replace(":", "|").split("|")]


def test_every_library_module_belongs_to_a_layer():
    rooms = _layer_rooms()
    modules = []
    for path in sorted((ROOT / "aaclip_core").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if dotted != "aaclip_core":
            modules.append(dotted)
    assert len(modules) > 50
    outside = [m for m in modules if not any(m == r or m.startswith(r + ".") for r in rooms)]
    assert not outside, f"modules in no layer of the import contract (add them to pyproject.toml): {outside}"
