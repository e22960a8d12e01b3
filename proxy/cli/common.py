"""What the commands share: exit codes, usage errors, common options, where to reach things."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from redis.asyncio import Redis

from .. import redisd
from ..settings import Settings
from ..settings.read import parse_duration

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or an unusable environment; exit code 2."""


def config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: $JITGATE_CONFIG or config/jitgate.yaml)",
    )


def api_args(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("--token", default=None, help="your token (default: $JITGATE_TOKEN)")
    p.add_argument(
        "--url", default=None, help="jitgate's URL (default: $JITGATE_URL, else from the config)"
    )
    p.add_argument("--json", action="store_true")


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def redis_for(settings: Settings) -> Redis:
    """Return a client of the configured Redis (redis.url, redis.sentinel or redis.cluster),
    else of the embedded server if it is running."""
    embedded = None
    if settings.redis.embedded:
        sock = redisd.socket_path(settings.state_dir)
        if not sock.exists():
            raise UsageError(
                f"jitgate's embedded Redis is not running (no socket at {sock}); "
                "start `jitgate serve` first, or set redis.url in the config"
            )
        embedded = redisd.redis_url(settings.state_dir)
    return redisd.connect_redis(settings.redis, embedded, timeout=max(settings.redis.timeout, 5.0))


def api_url(settings: Settings) -> str:
    """Return the API base URL: $JITGATE_URL, else jitgate's own listen address."""
    env = os.environ.get("JITGATE_URL")
    if env:
        return env.rstrip("/") + settings.prefix
    host = settings.listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.listen.port}{settings.prefix}"
