"""A read-only sequence that loads its items on access, so a stage can hand thousands of images to
a consumer that streams over them (e.g. the U-Net's one-pass resize) without holding them all."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable


class LazySequence(Sequence):
    """items[k] = load(keys[k]), computed on every access (nothing is cached)."""

    def __init__(self, keys, load: Callable[[Any], Any]):
        self.keys, self.load = list(keys), load

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.load(key) for key in self.keys[k]]
        return self.load(self.keys[k])

    def __add__(self, other: "LazySequence") -> "LazySequence":
        parts = [(self, k) for k in range(len(self))] + [(other, k) for k in range(len(other))]
        return LazySequence(parts, lambda part: part[0][part[1]])
