"""The API reference's parser reads every docstring without a warning.

The strict documentation build fails on any warning of griffe, the parser
mkdocstrings uses (a documented parameter the signature lacks, a malformed
section); this finds those in the suite, in seconds, instead of at the end of a
docs build that runs every example.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

griffe = pytest.importorskip("griffe")


def _parse_all(obj, seen: list[str]) -> None:
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.docstring is not None:
            member.docstring.parsed  # noqa: B018 (parsing is what emits the warnings)
            seen.append(member.path)
        if member.is_module or member.is_class:
            _parse_all(member, seen)


def test_every_docstring_parses_without_a_warning(caplog):
    root = Path(__file__).resolve().parents[1]
    package = griffe.load("geoconnect", docstring_parser="numpy", search_paths=[str(root)])
    seen: list[str] = []
    with caplog.at_level(logging.WARNING, logger="griffe"):
        _parse_all(package, seen)
    assert len(seen) > 100  # the walk reached the package's members
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []
