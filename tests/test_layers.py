"""The layers the code promises: services share only ``faas.core`` and the HTTP contracts of
``faas/core/wire.py``; the shared layer and the services import no tool (CLI, launcher).

Checked by import-linter against ``.importlinter`` (kopf's model), so CI keeps it so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint_imports, "import-linter is missing: it is a dev dependency (pip install -e '.[dev]')"
    out = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout
