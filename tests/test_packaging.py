"""The install layout DESIGN.md requires: kernels/ only as fedlora.kernels, every subpackage shipped."""
import subprocess
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_installation():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"fedlora"} | {
        "fedlora." + ".".join(p.parent.relative_to(ROOT / "fedlora").parts)
        for p in (ROOT / "fedlora").rglob("__init__.py") if p.parent != ROOT / "fedlora"
    }
    listed = set(config["packages"])
    assert on_disk | {"fedlora.kernels"} == listed
    assert config["package-dir"]["fedlora.kernels"] == "kernels"


def test_kernels_import_as_fedlora_kernels_only(tmp_path):
    # Outside the checkout (so the current directory does not put kernels/ on sys.path).
    code = (
        "import importlib.util, fedlora.kernels.segmented as k;"
        "assert importlib.util.find_spec('kernels') is None, 'a top-level kernels module is importable';"
        "print(k.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fedlora.kernels.segmented"


def test_license_is_an_spdx_expression():
    """A string, not the deprecated {text = ...} table (setuptools >= 77 warns on every install about that)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["license"] == "Apache-2.0"
    assert any(req.replace(" ", "").startswith("setuptools>=77") for req in config["build-system"]["requires"])
