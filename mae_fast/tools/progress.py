"""Progress bars of the `mae-fast` commands: tqdm on stderr, with elapsed time and ETA.

One place for the settings every command shares. On a terminal the bar redraws in place; in a log
(stderr not a terminal) it is still written, at most every 10 s, so that a long run in a batch job shows
that it is alive. ``enabled=False`` (``--no-progress``) gives a bar that prints nothing.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


class Bar(tqdm):
    """tqdm whose ``set_description`` redraws at once on a terminal only (in a log it waits for the next
    update, so that a log gets no line per phase)."""

    def set_description(self, desc=None, refresh=None):
        super().set_description(desc, refresh=sys.stderr.isatty() if refresh is None else refresh)


def bar(total: int, desc: str, enabled: bool = True, unit: str = "step", **kwargs) -> Bar:
    """A progress bar over ``total`` items (use it as a context manager, or call ``close()``)."""
    tty = sys.stderr.isatty()
    return Bar(total=total, desc=f"{desc}: ", disable=not enabled, file=sys.stderr, unit=unit, dynamic_ncols=tty,
               ncols=None if tty else 100, mininterval=0.2 if tty else 10.0, bar_format=BAR_FORMAT, leave=True,
               **kwargs)
