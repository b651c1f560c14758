"""
Progress bars that suit both a terminal and a log file. On a terminal: a tqdm bar redrawn in place. Piped to a file
(`python data.py ... > data.log 2>&1`, a cluster's job log) the redraws of a tqdm bar pile up as one endless line
of carriage returns; there the same bar prints a plain line of its state at most every LOG_EVERY_S seconds, and one
at the end. Every long loop of the library (latent caching, teacher pairs, sampling, the quality table) uses it.
"""
import sys

from tqdm import tqdm

LOG_EVERY_S = 30.0   # seconds between two lines of a bar in a log file


class _Lines:
    """A file for tqdm that writes each redraw as a line of its own: carriage returns dropped, blank writes (the
    clearing a bar does before its neighbour prints) skipped."""

    def __init__(self, f):
        self.f = f

    def write(self, s):
        s = s.replace("\r", "").strip()
        if s:
            self.f.write(s + "\n")

    def flush(self):
        self.f.flush()


def bar(iterable=None, file=None, **kw):
    """tqdm(iterable, **kw) drawn on `file` (default stderr): in place on a terminal, as a line every LOG_EVERY_S
    seconds otherwise. disable=True draws nothing, as in tqdm."""
    f = file or sys.stderr
    if kw.get("disable"):
        return tqdm(iterable, file=f, **kw)
    if getattr(f, "isatty", lambda: False)():
        return tqdm(iterable, file=f, dynamic_ncols=True, **kw)
    return tqdm(iterable, file=_Lines(f), mininterval=LOG_EVERY_S, maxinterval=max(LOG_EVERY_S, 10.0), ascii=True,
                ncols=100, **kw)
