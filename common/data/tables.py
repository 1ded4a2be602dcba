"""What the dataset converters share: one CSV reader and one seeded split of grouped items.

:func:`read_csv` reads a CSV or gzipped CSV (BOM tolerated, cells stripped) into its header and ``(line, row)`` pairs,
``line`` being where the row starts, so a converter's skip report points at the right line even when quoted cells
span lines. :func:`match_columns` maps wanted column names to the header's spelling. :func:`assign_splits` draws
whole groups (a patient's volumes, a report's images, connected reports) into test and validation in a seeded order
until each holds its share, by items or by groups, and leaves the rest to training; sorting the groups first makes
the split independent of row order.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["assign_splits", "check_split", "match_columns", "read_csv", "validation_groups"]


def read_csv(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, row)`` pairs of a CSV (``.gz``: gzipped); the header is line 1.

    Raises:
        FileNotFoundError: no such file. ValueError: the file is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found.")
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
    if reader.fieldnames is None:
        raise ValueError(f"{path}: empty CSV file.")
    header = [name.strip() for name in reader.fieldnames]
    reader.fieldnames = header
    rows, start = [], 2
    for row in reader:
        rows.append((start, {k: (v or "").strip() for k, v in row.items() if k is not None}))
        start = reader.line_num + 1  # DictReader counts physical lines: the next row starts after this one's last
    return header, rows


def match_columns(header: Sequence[str], wanted: Sequence[str], path: str | Path,
                  aliases: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each wanted name -> the header's spelling, matched case-insensitively (and through ``aliases``, header
    spelling in lower case -> wanted name).

    Raises:
        ValueError: a wanted column is missing; the message names the file and the columns found.
    """
    by_lower: dict[str, str] = {}
    for name in header:
        by_lower[name.lower()] = name
        alias = (aliases or {}).get(name.lower())
        if alias is not None:
            by_lower.setdefault(alias.lower(), name)
    missing = [w for w in wanted if w.lower() not in by_lower]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found {list(header)}.")
    return {w: by_lower[w.lower()] for w in wanted}


def check_split(val_fraction: float, split_seed: int, test_fraction: float = 0.0) -> None:
    """ValueError unless the fractions are in [0, 1] (together at most 1) and the seed a non-negative integer."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} should be in [0, 1], got {value}.")
    if val_fraction + test_fraction > 1.0:
        raise ValueError(f"val_fraction + test_fraction should be at most 1, got {val_fraction} + {test_fraction}.")
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)) or split_seed < 0:
        raise ValueError(f"split_seed should be a non-negative integer, got {split_seed}.")


def assign_splits(groups: Sequence[str], val_fraction: float, test_fraction: float = 0.0, seed: int = 0,
                  count: str = "items") -> list[str]:
    """``"training"``, ``"validation"`` or ``"test"`` for each item, whole groups at a time.

    The distinct groups, sorted, are visited in the order of a permutation seeded with ``seed``; each goes to test
    until test holds ``round(total * test_fraction)``, then to validation until it holds
    ``round(total * val_fraction)``, then to training. ``count="items"`` counts items (a group adds its size), and
    ``"groups"`` counts groups; with one item per group the two agree.

    Example:
        >>> assign_splits(["a", "a", "b", "c"], val_fraction=0.25, seed=0, count="groups")
        ['training', 'training', 'training', 'validation']
    """
    if count not in ("items", "groups"):
        raise ValueError(f"count should be 'items' or 'groups', got {count!r}.")
    sizes = Counter(groups)
    order = sorted(sizes)
    total = len(groups) if count == "items" else len(order)
    targets = {"test": round(total * test_fraction), "validation": round(total * val_fraction)}
    filled, split_of = {"test": 0, "validation": 0}, {}
    for i in np.random.default_rng(seed).permutation(len(order)):
        split = next((s for s in ("test", "validation") if filled[s] < targets[s]), "training")
        split_of[order[i]] = split
        if split != "training":
            filled[split] += sizes[order[i]] if count == "items" else 1
    return [split_of[g] for g in groups]


def validation_groups(groups: Sequence[str], val_fraction: float, seed: int = 0, count: str = "items") -> set[str]:
    """The groups :func:`assign_splits` (no test split) draws for validation, for converters that keep one
    training/validation split and read it group by group.

    Example:
        >>> validation_groups(["a", "a", "b", "c"], val_fraction=0.25, seed=0, count="groups")
        {'c'}
    """
    return {g for g, split in zip(groups, assign_splits(groups, val_fraction, seed=seed, count=count))
            if split == "validation"}
