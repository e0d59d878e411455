"""What installs and imports: the engine's model side without `datasets`, and the declared bounds."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_engine_imports_without_datasets() -> None:
    """`datasets` is imported where rows are read, so forward, trainer, bench and the entry point
    import on a machine without it (the GPU check machine has none)."""
    code = (
        "import sys; sys.modules['datasets'] = None\n"  # any `import datasets` now raises ImportError
        "import engine.forward, engine.trainer, engine.bench, engine.plan, torchrun_train\n"
        "print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
