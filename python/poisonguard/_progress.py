"""A progress line for long passes: tqdm when it is installed, else one self-overwriting line on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """``update(rows)`` once per step (a batch or a chunk); ``close()`` at the end. Disabled: does nothing."""

    interval = 0.2  # seconds between redraws of the plain line

    def __init__(self, total: int | None, enabled: bool, desc: str, unit: str = "batch") -> None:
        self.total, self.enabled, self.desc, self.unit = total, enabled, desc, unit
        self.steps = self.rows = 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)

    def update(self, rows: int) -> None:
        self.steps += 1
        self.rows += rows
        if self.bar is not None:
            self.bar.update(rows if self.unit == "row" else 1)
        elif self.enabled and time.monotonic() - self.last >= self.interval:
            self._line("")

    def _line(self, end: str) -> None:
        self.last = time.monotonic()
        if self.unit == "row":
            of = f"/{self.total}" if self.total is not None else ""
            done = f"{self.rows}{of} rows"
        else:
            of = f"/{self.total}" if self.total is not None else ""
            done = f"{self.steps}{of} {self.unit}es, {self.rows} rows"
        elapsed = self.last - self.t0
        rate = f", {self.rows / elapsed / 1e6:.2f} M rows/s" if elapsed > 0 else ""
        sys.stderr.write(f"\r{self.desc}: {done}, {elapsed:.1f} s{rate}{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line("\n")
