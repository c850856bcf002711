"""Driver-side progress of a stage: a tqdm bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import logging
import os
import sys
import time

__all__ = ["StageProgress"]


class StageProgress:
    """Driver-side progress of a stage: whole units done, percent (fractions inside units
    count), time elapsed and left.

    On a terminal: one tqdm bar, drawn from the first update on (so what an executor prints
    while it starts, such as Ray's token-authentication notice, comes before the bar, not
    through it); while it is drawn, log records go through tqdm (each on its own line, the
    bar redrawn below them).
    Elsewhere (a pod's log, CI, a pipe): one plain line every ``line_step`` percent instead
    of a redraw every second. The time left is estimated from progress since the first
    report, so a long start-up (workers, data, teachers) does not inflate it, and it is
    shown only once there is enough progress to estimate it.
    """

    line_step = 5  # percent
    _min_progress = 0.02  # of the stage, before a time-left estimate is shown
    _min_seconds = 1.0

    def __init__(self, label: str, total: int, enabled: bool = True, file=None,
                 tty: bool | None = None, clock=time.monotonic):
        self.label, self.total, self.enabled = label, max(int(total), 1), enabled
        self._file, self._tty, self._clock = file, tty, clock
        self.start = clock()
        self.done = 0.0
        self._first: tuple[float, float] | None = None  # (time, fraction) of first progress
        self._bar = None
        self._redirect = None
        self._drawn = 0.0
        self._next_line = 0.0  # percent at which the next plain line is due

    @property
    def file(self):
        return self._file if self._file is not None else sys.stderr

    @property
    def tty(self) -> bool:
        if self._tty is None:
            isatty = getattr(self.file, "isatty", None)
            self._tty = bool(isatty and isatty())
        return self._tty

    def update(self, done: float) -> None:
        """``done``: units finished, with the running units' fractions."""
        if not self.enabled:
            return
        done = min(float(done), self.total)
        now = self._clock()
        if done < self.done or (done == self.done and self._first is not None):
            if self.tty and self._bar is not None and now - self._drawn >= 1.0:
                self._draw(now)  # no progress: the elapsed time still moves
            return
        if self._first is None or (self._first[1] == 0 and done > 0):
            self._first = (now, done / self.total)
        self.done = done
        if self.tty:
            self._draw(now)
        else:
            self._line(now)

    def seconds_left(self, now: float | None = None) -> float | None:
        now = self._clock() if now is None else now
        fraction = self.done / self.total
        if fraction >= 1:
            return 0.0
        if self._first is None:
            return None
        t0, f0 = self._first
        if fraction - f0 < self._min_progress or now - t0 < self._min_seconds:
            return None
        return (now - t0) * (1 - fraction) / (fraction - f0)

    def text(self, now: float | None = None) -> str:
        """``3/10 units, 0:42 elapsed, ~1:10 left``."""
        now = self._clock() if now is None else now
        left = self.seconds_left(now)
        units = int(self.done + 1e-9)  # whole units: a running unit's fraction is in the %
        out = f"{units}/{self.total} units, {_clock_text(now - self.start)} elapsed"
        if left is not None and self.done < self.total:
            out += f", ~{_clock_text(left)} left"
        return out

    def _draw(self, now: float) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            try:  # a terminal that reports no size (0 columns) gets a fixed width
                sized = os.get_terminal_size(self.file.fileno()).columns > 0
            except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                sized = False
            # The root logger's console output, and Ray's (its own handler, once Ray runs).
            ray_log = logging.getLogger("ray")
            console = [lg for lg in (logging.root, ray_log) if lg is logging.root or any(
                type(h) is logging.StreamHandler for h in lg.handlers)]
            self._redirect = logging_redirect_tqdm(loggers=console, tqdm_class=tqdm)
            self._redirect.__enter__()
            self._bar = tqdm(total=1000, desc=f"{self.label:>10}", file=self.file,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix[0]}",
                             postfix=[""], dynamic_ncols=sized, ncols=None if sized else 100,
                             nrows=None if sized else 20)
        if self.done < self.total and now - self._drawn < 0.1:
            return  # at most ten redraws a second
        self._drawn = now
        self._bar.n = int(1000 * self.done / self.total + 1e-9)
        self._bar.postfix = [self.text(now)]  # a list: tqdm prints it as is (no ", ")
        self._bar.refresh()

    def _line(self, now: float) -> None:
        percent = 100 * self.done / self.total
        if percent < self._next_line and self.done < self.total:
            return
        print(f"{self.label}: {int(percent):3d}% ({self.text(now)})", file=self.file,
              flush=True)
        self._next_line = (percent // self.line_step + 1) * self.line_step
        if self.done >= self.total:
            self._next_line = float("inf")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def _clock_text(seconds: float) -> str:
    seconds = int(max(seconds, 0) + 0.5)
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours
            else f"{rest // 60}:{rest % 60:02d}")
