"""Unreadable files: which image a sample takes instead, and the record of what was skipped.

A sample whose image cannot be read takes the next readable image of the folder (in the sorted order of
the files, wrapping around), with the same position in the stream and so the same random draws for its
crop and flip. The rule depends only on the files, so the data are the same with any number of workers
and on both loaders. Each process remembers the files it found unreadable; the training process
counts each file once (:class:`SkipLog`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from .decode import UnreadableImage

Skipped = Tuple[str, str]  # (path, why it was skipped)
T = TypeVar("T")


def first_readable(i: int, paths: Sequence, load: Callable[[int], T], bad: Dict[int, str]
                   ) -> Tuple[Optional[int], Optional[T], List[Skipped], str]:
    """(index, load(index), files skipped now, error): the first image from ``i`` on (wrapping around)
    that ``load`` reads without UnreadableImage. ``bad`` holds the indices found unreadable before (and
    gets the new ones); error is set, index None, when no image of the folder is readable."""
    skipped: List[Skipped] = []
    n = len(paths)
    for k in range(n):
        j = (i + k) % n
        if j in bad:
            continue
        try:
            return j, load(j), skipped, ""
        except UnreadableImage as e:
            bad[j] = str(e)
            skipped.append((str(paths[j]), str(e)))
    first = next(iter(bad.values()), "")
    return None, None, skipped, f"none of the {n} images can be read ({first})"


class SkipLog:
    """The training process's record of the unreadable files the batches reported, each counted once."""

    def __init__(self):
        self.files: Dict[str, str] = {}

    def add(self, skipped: Sequence[Skipped]) -> List[Skipped]:
        """Record a batch's reports; returns the files not seen before."""
        new = [(path, why) for path, why in skipped if path not in self.files]
        for path, why in new:
            self.files[path] = why
        return new

    def __len__(self) -> int:
        return len(self.files)
