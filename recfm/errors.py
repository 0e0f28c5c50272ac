"""The one error type library code raises for bad input; the CLI prints it and exits with status 2."""

from __future__ import annotations


class RecfmError(Exception):
    """Bad input: a message naming the file, key, row or column at fault."""


class ConfigError(RecfmError):
    """One or more problems in YAML files, each as ``file: path.to.key: message``.

    All problems found are collected before raising, so a user fixes a file in one pass.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in configuration:"
        super().__init__("\n".join([head, *("  " + p for p in self.problems)]))


class DataError(RecfmError):
    """A data file that cannot be read as declared (names the file, row or column)."""
