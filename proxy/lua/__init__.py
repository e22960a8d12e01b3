"""The Redis Lua scripts of grants.py and audit/store.py, one file each (package data).

Each transition or index operation is one script, so Redis runs it atomically. A
script's file may start with a `#!lua` line (with flags such as `no-writes`); `compose`
puts a shared library after that line and before the script's own code.
"""

from __future__ import annotations

from importlib import resources


def read(name: str) -> str:
    """Return the text of `name`.lua."""
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def compose(name: str, library: str) -> str:
    """Return `name`.lua with `library` (already read) in front of its code."""
    text = read(name)
    if text.startswith("#!"):
        shebang, _, code = text.partition("\n")
        return f"{shebang}\n{library}{code}"
    return library + text
