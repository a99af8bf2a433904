"""Progress lines with a rate and an ETA for every phase that can take more than a few seconds.

    progress = Progress("Evaluating on test", total=1000, unit="images")
    for batch in batches:
        ...  # the batch's work, finished (not only queued) before it is counted
        progress.update(len(batch))
    progress.done()

logs, at most every `every_s` seconds (and not at all for a phase that ends sooner):
``Evaluating on test: 384/1000 images (38%), 41.2 images/s, ETA 15s``, and at the end
``Evaluating on test: 1000 images in 24.3 s (41.2 images/s)``.

The rate behind an ETA is the steady one, measured from the first update on: the first step,
batch or chunk of a phase usually includes compiling its program, and an ETA from it would be
far too long. Until a second update gives a steady rate, a line shows the rate so far and no
ETA. A count that reached the total logs nothing until `done()`: the work is over only then.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from absl import logging


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h01m: short and unambiguous."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts the units of a phase and logs how far it is, how fast, and how long is left.

    Args:
      what: the phase, e.g. "Caching train800val200".
      total: units in the phase (None: unknown, no ETA); may be set later (before updates).
      unit: what is counted, e.g. "images", "steps", "runs".
      every_s: seconds between two progress lines.
      log: where the lines go (absl INFO by default).
      clock: the time source (tests pass a fake one).
    """

    def __init__(self, what: str, total: int | None, unit: str = "examples",
                 every_s: float = 10.0, log: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self._log = log or (lambda msg: logging.info("%s", msg))
        self._clock = clock
        self.start = self._last = clock()
        self._first: tuple[float, int] | None = None  # (time, count) at the first update
        self.count = 0

    def line(self, now: float | None = None) -> str:
        """The current progress line."""
        now = self._clock() if now is None else now
        head = f"{self.what}: {self.count}" + (
            f"/{self.total} {self.unit} ({100 * self.count / self.total:.0f}%)" if self.total
            else f" {self.unit}")
        if self._first is not None and self.count > self._first[1] and now > self._first[0]:
            rate = (self.count - self._first[1]) / (now - self._first[0])
            eta = f", ETA {format_duration((self.total - self.count) / rate)}" if self.total else ""
            return f"{head}, {_rate(rate, self.unit)}{eta}"
        return f"{head}, {_rate(self.count / max(now - self.start, 1e-9), self.unit)}"

    def update(self, n: int = 1) -> None:
        """Adds `n` finished units; logs a line if `every_s` seconds passed since the last one."""
        self.count += n
        now = self._clock()
        self._first = self._first or (now, self.count)
        if now - self._last >= self.every_s and not (self.total and self.count >= self.total):
            self._last = now
            self._log(self.line(now))

    def done(self) -> float:
        """Logs the phase's total time and rate (if it took over a second); returns seconds."""
        elapsed = self._clock() - self.start
        if elapsed >= 1.0:
            self._log(f"{self.what}: {self.count} {self.unit} in {elapsed:.1f} s "
                      f"({_rate(self.count / max(elapsed, 1e-9), self.unit)})")
        return elapsed


def _rate(rate: float, unit: str) -> str:
    if rate >= 1 or rate == 0:
        return f"{rate:.1f} {unit}/s"
    return f"{1 / rate:.1f} s per {unit.rstrip('s')}"
