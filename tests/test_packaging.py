"""The distribution installs under one namespace: recfm.foundation, recfm.scenarios, recfm.heads, ...

`foundation`, `scenarios` and `kernels` are names of other PyPI distributions, so nothing may install as a
top-level module of those names, from a wheel or from an editable install.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import recfm

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["recfm.foundation", "recfm.scenarios", "recfm.heads", "recfm.kernels", "recfm.configs"]
PROBE = (
    "import importlib, importlib.util, sys\n"
    "for name in {subpackages!r}:\n"
    "    importlib.import_module(name)\n"
    "for name in ['foundation', 'scenarios', 'heads', 'kernels', 'configs']:\n"
    "    assert importlib.util.find_spec(name) is None, f'top-level module {{name}} is importable'\n"
    "from recfm.configs import config_path\n"
    "assert config_path('world', 'default.yaml').is_file()\n"
    "assert config_path('presets', 'tiny.yaml').is_file()\n"
    "from recfm.scenarios.loader import load_world\n"
    "for parts in [('world', 'default.yaml'), ('real', 'retailrocket', 'world.yaml'), ('real', 'douban', 'world.yaml')]:\n"
    "    assert load_world(config_path(*parts)).scenarios  # scenario files found beside the world file\n"
    "import recfm.foundation\n"
    "print(recfm.foundation.__file__)\n"
)


def _probe(env_path: str | None, cwd: Path) -> str:
    env = {"PATH": "/usr/bin:/bin"}
    if env_path is not None:
        env["PYTHONPATH"] = env_path
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(subpackages=SUBPACKAGES)],
        cwd=cwd, env=env, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True, capture_output=True,
    )
    (path,) = out.glob("recfm-*.whl")
    return path


def test_wheel_holds_only_the_recfm_namespace(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"recfm", f"recfm-{recfm.__version__}.dist-info"}, tops
    for sub in ("foundation", "scenarios", "heads", "kernels", "configs"):
        assert f"recfm/{sub}/__init__.py" in names
    shipped = {f"recfm/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert {"recfm/configs/world/default.yaml", "recfm/configs/presets/tiny.yaml"} <= shipped
    assert any(n.startswith("recfm/configs/real/") for n in shipped)
    assert shipped <= set(names), sorted(shipped - set(names))  # every config, at any depth
    assert not any(n.startswith("recfm/tests/") or n.startswith("tests/") for n in names)


def test_wheel_installs_and_imports_under_recfm(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    deps = [p for p in sys.path if p.endswith("site-packages")]  # numpy, pyarrow, ... of this environment
    where = _probe(":".join([str(target), *deps]), cwd=tmp_path)
    assert where.startswith(str(target))


def test_editable_install_imports_the_same_way(tmp_path: Path):
    """The environment running the tests has recfm installed editable (README): same names, repo files."""
    where = _probe(None, cwd=tmp_path)
    assert Path(where).resolve() == (ROOT / "foundation" / "__init__.py").resolve()
