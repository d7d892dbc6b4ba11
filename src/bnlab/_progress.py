"""A dependency-free progress bar with rate and ETA, written to stderr (quiet when disabled)."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


class Progress:
    """``for item in Progress(items, total=n, desc="phase"):`` — redraws at most ~5 times a second."""

    def __init__(self, iterable: Optional[Iterable[T]] = None, total: Optional[int] = None,
                 desc: str = "", enabled: bool = True, stream=None, unit: str = "it") -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.unit = unit
        self.n = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._drawn_n = -1
        self.postfix = ""

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw > 0.2 or (self.total and self.n >= self.total)):
            self._last_draw = now
            self._draw(now)

    def set_postfix(self, text: str) -> None:
        self.postfix = text

    def _draw(self, now: float) -> None:
        self._drawn_n = self.n
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(1.0, self.n / self.total)
            bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            line = (f"\r{self.desc} [{bar}] {self.n}/{self.total} {rate:,.1f} {self.unit}/s "
                    f"elapsed {format_seconds(elapsed)} eta {format_seconds(eta)}")
        else:
            line = f"\r{self.desc} {self.n} {self.unit} {rate:,.1f} {self.unit}/s elapsed {format_seconds(elapsed)}"
        if self.postfix:
            line += f" {self.postfix}"
        self.stream.write(line[:160])
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.n:
            if self._drawn_n != self.n:
                self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False


def format_seconds(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"
