"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this folder is on
``sys.path``)."""

from __future__ import annotations


def parse_seeds(text: str) -> list[int]:
    """'0-9' -> [0, ..., 9]; '1,5,7' -> [1, 5, 7]; '0-2,7' -> [0, 1, 2, 7]."""
    seeds = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds
