"""Errors that name the place they come from."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration or policy problem, located as `file:line: field: message`."""

    def __init__(self, message: str, *, file: str = "", line: int = 0, field: str = "") -> None:
        self.file = file
        self.line = line
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        parts = [p for p in (where, self.field, self.message) if p]
        return ": ".join(parts)


class ConfigErrors(Exception):
    """Every problem found while loading one file, so a check can print them all."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class BadPath(ValueError):
    """A request path that cannot be normalised safely; answered with 400."""
