"""Progress output that reads well both in a terminal and in a log.

In a terminal a tqdm bar redraws in place. Under `flwr run` the ServerApp's and ClientApps' output is
a log stream (stderr is a pipe or a file), where every redraw of a bar would arrive as a line of its
own: there the same progress is one line per finished unit instead (an epoch, a phase).
`interactive()` is the one place that decides which.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

from tqdm import tqdm


def interactive() -> bool:
    """True when stderr is a terminal, where a redrawing bar is shown instead of lines."""
    return sys.stderr.isatty()


class Progress:
    """A tqdm bar over `total` units in a terminal; elsewhere silent but for `line()`.

    `enabled=False` silences both. Callers report finished units with `line()`, which prints only
    where no bar is shown, so a terminal never gets a line that the bar already says."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, leave: bool = True):
        self.enabled = enabled
        self.bar = (
            tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave)
            if enabled and interactive()
            else None
        )

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)

    def track(self, items: Iterable) -> Iterator:
        """Yield `items`, one unit of progress each."""
        for item in items:
            self.update()
            yield item

    def line(self, text: str) -> None:
        if self.enabled and self.bar is None:
            # stderr, like the bar it stands in for; flushed so that it reaches the log at once
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
