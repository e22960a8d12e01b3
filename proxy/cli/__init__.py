"""`jitgate <noun> <verb>`: the command line (the console script is `proxy.cli:main`).

- `main`: the parser and dispatch; `serve`, `check`, `policy` and `token`.
- `grants`: `jitgate grants …`, through the API or on Redis.
- `common`: exit codes, usage errors and the options several commands share.
- `audit`: `jitgate audit query|verify`.
- `client`: the HTTP client for jitgate's API, used by the commands that go through it.
"""

from .main import main

__all__ = ["main"]
