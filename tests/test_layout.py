"""The package layout: kernels/ is importable as fastazr.kernels and never as `kernels`."""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_as_fastazr_kernels():
    import fastazr.kernels

    assert Path(fastazr.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_no_top_level_kernels_module_is_installed():
    assert importlib.metadata.distribution("fastazr").read_text("top_level.txt").split() == ["fastazr"]
    # PyPI's `kernels` may be installed beside us (SGLang needs it); ours must never be found.
    code = "import importlib.util as u, sys; sys.path.remove(''); s = u.find_spec('kernels'); print(s and s.origin)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    # (a venv inside the checkout, as CI's, holds PyPI's under ROOT/.venv: only ROOT/kernels is ours)
    assert not out.stdout.strip().startswith(str(ROOT / "kernels"))


def test_extension_is_built():
    from fastazr import _sandbox

    assert {"configure", "confine_zygote", "spawn", "send_result", "Stash"} <= set(dir(_sandbox))
    assert importlib.util.find_spec("fastazr._sandbox").origin.endswith(".so")
