"""Progress on rank 0: a live bar on a terminal, nothing extra when stdout is a file or a pipe.

Logs and CI get the plain one-line-per-log-step reports the trainer prints anyway; a person at a
terminal also gets a bar with rate and ETA for reference building, training and evaluation.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, desc: str, unit: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = tqdm(
                total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, file=sys.stdout
            )

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
