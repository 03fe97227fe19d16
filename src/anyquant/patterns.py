"""Module-name patterns, as `--keep`, `--only` and plan files give them: an exact module name,
or `re:` and a regular expression searched in the name. Checked and matched here, without
torch, so that the command line refuses a bad pattern before anything heavy is imported."""

from __future__ import annotations

import re

from anyquant.errors import AnyquantError


def check_pattern(pattern: str, what: str) -> None:
    """A `re:` pattern compiles; otherwise one line naming where it came from."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise AnyquantError(f"{what} {pattern!r}: invalid regular expression ({e}); "
                                "fix the pattern (escape ( ) [ ] . * + ? with a backslash to match them literally)"
                                ) from None


def matches(pattern: str, name: str) -> bool:
    """Whether module `name` is what `pattern` names."""
    if pattern.startswith("re:"):
        check_pattern(pattern, "pattern")
        return re.search(pattern[3:], name) is not None
    return name == pattern
