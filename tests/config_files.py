"""Editing a configuration file in a test: one exact text replaced, which must be there once."""

from __future__ import annotations

from pathlib import Path


def edit_once(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} not found exactly once in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
