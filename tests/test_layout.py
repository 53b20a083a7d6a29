"""Package layout: the library stays pure, ``platform/`` never shadows the standard library, and the
built wheel installs and imports on its own."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from conftest import REPO

FORBIDDEN_IN_LIBRARY = {"ray", "mlflow", "deepspeed", "accelerate"}
UPPER_LAYERS = {"lmdm.pipelines", "lmdm.eval", "lmdm.serve"}
SUBPACKAGES = [
    "lmdm",
    "lmdm.config",
    "lmdm.audio",
    "lmdm.data",
    "lmdm.models",
    "lmdm.diffusion",
    "lmdm.streaming",
    "lmdm.training",
    "lmdm.text",
    "lmdm.checkpoints",
    "lmdm.pipelines",
    "lmdm.eval",
    "lmdm.serve",
    "lmdm.configs",
]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_library_imports_no_ray_mlflow_deepspeed_accelerate() -> None:
    offenders = []
    files = sorted((REPO / "platform").rglob("*.py"))
    assert len(files) > 5
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in FORBIDDEN_IN_LIBRARY or any(name == up or name.startswith(up + ".") for up in UPPER_LAYERS):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, "the library (platform/) must stay pure:\n" + "\n".join(offenders)


def test_purity_check_catches_an_offender(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import ray.data\n    from mlflow import log_metric\n")
    assert imported_modules(bad) == {"ray.data", "mlflow"}


def test_importing_the_library_loads_none_of_them() -> None:
    code = (
        "import sys, lmdm, lmdm.config, lmdm.audio.io, lmdm.audio.features, lmdm.data.corpus, lmdm.data.readers\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN_IN_LIBRARY)!r})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_platform_is_not_a_package_and_stdlib_platform_works() -> None:
    assert not (REPO / "platform" / "__init__.py").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system())"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "Linux"


@pytest.mark.slow
def test_built_wheel_installs_and_imports(tmp_path: Path) -> None:
    """``pip install .``: build the wheel, install it with --no-deps into a fresh venv that sees this
    environment's dependencies but not its editable install, import every subpackage, and find the
    shipped weights inside it with their recorded hashes."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    (wheel,) = wheels.glob("lmdm-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    # Dependencies come from this environment as a plain path entry: its .pth hooks (the editable
    # install of lmdm) are not processed there, so only the wheel can provide `lmdm`.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True)
    code = (
        "import importlib, lmdm\n"
        f"for name in {SUBPACKAGES!r}: importlib.import_module(name)\n"
        "from lmdm.config import default_config_dir, load_config\n"
        f"assert lmdm.__file__.startswith({str(site)!r}), lmdm.__file__\n"
        "assert (default_config_dir() / 'quickstart.yaml').is_file()\n"
        "assert load_config('quickstart').name == 'quickstart'\n"
        "import lmdm.pipelines.cli\n"
        "from lmdm.checkpoints.builtin import WEIGHTS, builtin_names, verify_builtin\n"
        f"assert str(WEIGHTS).startswith({str(site)!r}) and 'embedder' in builtin_names(), WEIGHTS\n"
        "for name in builtin_names(): verify_builtin(name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    entry = next(site.glob("lmdm-*.dist-info")) / "entry_points.txt"
    assert "lmdm = lmdm.pipelines.cli:app" in entry.read_text()
