"""The one pattern language for module names (`modules_to_not_convert`); pure Python (the job schema uses it).

A pattern is an fnmatch glob (`*` matches any run of characters, dots included) over a module's full dotted
name. It matches a module when it matches the full name (`model.layers.0.mlp.down_proj`,
`model.layers.*.mlp.down_proj`), a tail of it after a dot (block-relative `mlp.down_proj`, or `down_proj`),
or the name of a module that contains it (`model.layers.0` or `model.layers.0.*` leave all of block 0 out).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

# Module names are dotted identifiers; a pattern adds the glob characters * ? [ ] (and ! inside brackets).
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,200}$")


def validate_pattern(pattern: str) -> str:
    """A pattern as given, or ValueError saying what is wrong with it."""
    p = pattern.strip()
    if not _PATTERN.match(p) or p.startswith(".") or p.endswith(".") or ".." in p:
        raise ValueError(
            f"module pattern {pattern!r} is not a dotted module name or glob (letters, digits, '_', '-', '.', "
            "and * ? [ ]), e.g. 'mlp.down_proj' or 'model.layers.*.mlp.down_proj'"
        )
    return p


def pattern_matches(name: str, pattern: str) -> bool:
    """Whether `pattern` matches the module with full dotted name `name` (see the module docstring)."""
    return (
        fnmatchcase(name, pattern)
        or fnmatchcase(name, f"*.{pattern}")
        or fnmatchcase(name, f"{pattern}.*")
        or fnmatchcase(name, f"*.{pattern}.*")
    )


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(pattern_matches(name, p) for p in patterns)


def unmatched_patterns(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The patterns that match none of the module `names`."""
    names = list(names)
    return [p for p in patterns if not any(pattern_matches(n, p) for n in names)]
