"""Live progress on the driver: one bar per fold (training iterations, then images predicted).

On a terminal, tqdm bars; elsewhere (CI logs, files) one summary line at most every few seconds,
so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .._backend import Progress


class ProgressBoard:
    def __init__(self, k: int, *, enabled: bool = True, stream: TextIO | None = None,
                 interval_s: float = 10.0) -> None:
        self.k = k
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.state: dict[int, str] = {f: "waiting" for f in range(k)}
        self._bars: dict[int, object] = {}
        self._tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_line = 0.0

    def update(self, event: Progress) -> None:
        loss = f" loss {event.loss:.3f}" if event.loss is not None else ""
        self.state[event.fold] = f"{event.stage} {event.step}/{event.total}{loss}"
        if self._tty:
            self._update_bar(event)
        else:
            self._maybe_print()

    def note(self, fold: int, text: str) -> None:
        self.state[fold] = text
        if self.enabled and not self._tty:
            print(f"[kfold-ray] fold {fold}: {text}", file=self.stream, flush=True)
        elif self._tty:
            bar = self._bars.get(fold)
            if bar is not None:
                bar.set_postfix_str(text)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        if self.enabled and not self._tty:
            self._print_line()

    def _update_bar(self, event: Progress) -> None:
        from tqdm import tqdm

        bar = self._bars.get(event.fold)
        desc = f"fold {event.fold} {event.stage}"
        if bar is None or bar.desc != desc:
            if bar is not None:
                bar.close()
            bar = tqdm(total=event.total, desc=desc, position=event.fold, leave=False,
                       file=self.stream, dynamic_ncols=True)
            self._bars[event.fold] = bar
        bar.n = event.step
        if event.loss is not None:
            bar.set_postfix(loss=f"{event.loss:.3f}", refresh=False)
        bar.refresh()

    def _maybe_print(self) -> None:
        now = time.monotonic()
        if self.enabled and now - self._last_line >= self.interval_s:
            self._last_line = now
            self._print_line()

    def _print_line(self) -> None:
        parts = "; ".join(f"fold {f}: {s}" for f, s in sorted(self.state.items()))
        print(f"[kfold-ray] {parts}", file=self.stream, flush=True)
