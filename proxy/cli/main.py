"""`jitgate <noun> <verb>`: serve the proxy, check and test policy, mint tokens, manage grants.

Exit codes: 0 ok, 1 a finding (invalid config, grant not found, a request `policy explain`
does not allow, a failing `policy test` case), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from .. import redisd
from ..errors import ConfigError, ConfigErrors
from ..settings import Settings, load
from ..settings.read import parse_duration

if TYPE_CHECKING:
    from .. import policy

# Modules for one command each are imported by that command: every `jitgate` call (an
# `audit query` included) starts faster.

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


def _parser() -> argparse.ArgumentParser:
    from . import audit as auditcli  # it builds on this module

    parser = argparse.ArgumentParser(prog="jitgate", description=__doc__)
    nouns = parser.add_subparsers(dest="noun", required=True, metavar="COMMAND")

    p = nouns.add_parser("serve", help="run the proxy")
    config_arg(p)
    p.add_argument("--log-level", default="INFO")

    p = nouns.add_parser("check", help="validate the config and its policy")
    config_arg(p)

    pol = nouns.add_parser("policy", help="policy files").add_subparsers(
        dest="verb", required=True, metavar="VERB"
    )
    p = pol.add_parser("check", help="validate a policy file")
    p.add_argument("file", type=Path)
    p = pol.add_parser("explain", help="show how the config's policy decides one request")
    config_arg(p)
    p.add_argument("--user", default=None, help="who asks (default: an anonymous request)")
    p.add_argument("--groups", default="", help="comma-separated groups")
    p.add_argument("--no-redis", action="store_true", help="do not read grants from Redis")
    p.add_argument("--json", action="store_true")
    p.add_argument("method", metavar="METHOD")
    p.add_argument("path", metavar="PATH", help="raw request target, e.g. /api/x?y=1")
    p = pol.add_parser("test", help="run a policy's test cases (YAML)")
    p.add_argument("file", type=Path)
    p.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="policy to test (default: the file's `policy:`, else policy.yaml beside it)",
    )
    p.add_argument("--json", action="store_true")

    tok = nouns.add_parser("token", help="development tokens").add_subparsers(
        dest="verb", required=True, metavar="VERB"
    )
    p = tok.add_parser("mint", help="sign a token with the configured dev key")
    config_arg(p)
    p.add_argument("--sub", required=True, help="subject (user name)")
    p.add_argument("--groups", default="", help="comma-separated groups")
    p.add_argument("--ttl", default=None, help="lifetime, e.g. 1h (default: identity.mint_ttl)")

    gr = nouns.add_parser(
        "grants",
        help="request, approve and manage grants",
        description="With a token (--token or $JITGATE_TOKEN) the commands go through "
        "jitgate's API as that user; without one, add, revoke, list and show go straight "
        "to Redis (admin access).",
    )
    verbs = gr.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("request", help="ask for access to a scope (API)")
    api_args(p)
    p.add_argument("--scope", required=True, help="e.g. recording:1/demo-1 or project:1")
    p.add_argument("--reason", required=True)
    p.add_argument("--ticket", default=None)
    p.add_argument("--duration", default=None, help="one the policy offers, e.g. 1h")
    p.add_argument("--break-glass", action="store_true", help="emergency access (if allowed)")
    for verb, text in (
        ("approve", "approve a pending request"),
        ("deny", "deny (or withdraw) a pending request"),
        ("relinquish", "give up your own active grant"),
        ("review", "review break-glass access afterwards"),
    ):
        p = verbs.add_parser(verb, help=f"{text} (API)")
        api_args(p)
        p.add_argument("grant_id")
        p.add_argument("--comment", default="")
    p = verbs.add_parser("extend", help="extend your own active grant (API)")
    api_args(p)
    p.add_argument("grant_id")
    p.add_argument("--duration", required=True, help="how much longer, e.g. 30m")
    p.add_argument("--comment", default="")
    p = verbs.add_parser("show", help="show one grant")
    api_args(p)
    p.add_argument("grant_id")
    p = verbs.add_parser("add", help="grant a user access to a scope for a limited time (Redis)")
    config_arg(p)
    p.add_argument("--user", required=True)
    p.add_argument("--scope", required=True, help="e.g. recording:1/demo-1 or project:1")
    p.add_argument("--ttl", required=True, help="e.g. 30m, 2h")
    p.add_argument("--reason", required=True)
    p.add_argument("--by", default=None, help="who grants it (default: the OS user)")
    p.add_argument("--json", action="store_true")
    p = verbs.add_parser("revoke", help="end a grant at once")
    api_args(p)
    p.add_argument("grant_id")
    p.add_argument("--by", default=None, help="who revokes it (Redis mode; default: OS user)")
    p.add_argument("--comment", default=None)
    p = verbs.add_parser("list", help="list grants")
    api_args(p)
    p.add_argument("--user", default=None, help="only this user's grants")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--pending", action="store_true", help="requests you may decide (API)")
    which.add_argument("--all", action="store_true", help="every grant (API, admins)")
    which.add_argument(
        "--unreviewed", action="store_true", help="break-glass grants awaiting review (API)"
    )
    p.add_argument("--state", default=None, help="with --all: comma-separated states")

    auditcli.add_parser(nouns)
    return parser


def api_args(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("--token", default=None, help="your token (default: $JITGATE_TOKEN)")
    p.add_argument(
        "--url", default=None, help="jitgate's URL (default: $JITGATE_URL, else from the config)"
    )
    p.add_argument("--json", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigErrors as exc:
        for err in exc.errors:
            print(f"error: {err}", file=sys.stderr)
        return EXIT_FINDING
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FINDING
    except UsageError as exc:
        print(f"jitgate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    from .. import policy  # auditcli builds on this module
    from . import audit as auditcli

    if args.noun == "serve":
        return _serve(args)
    if args.noun == "check":
        settings = load(args.config)
        compiled = policy.load(settings.policy_file)
        print(f"ok: {settings.file} and {settings.policy_file} (policy version {compiled.version})")
        return EXIT_OK
    if args.noun == "policy" and args.verb == "explain":
        return asyncio.run(_explain(args, load(args.config)))
    if args.noun == "policy" and args.verb == "test":
        return asyncio.run(_policy_test(args))
    if args.noun == "policy":
        compiled = policy.load(args.file)
        print(f"ok: {args.file}: {len(compiled.routes)} routes, version {compiled.version}")
        return EXIT_OK
    if args.noun == "audit":
        return asyncio.run(auditcli.run(args, load(args.config)))
    if args.noun == "token":
        from ..identity import MintError, mint

        settings = load(args.config)
        ttl = _duration(args.ttl) if args.ttl else None
        groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
        try:
            print(mint(settings.identity, args.sub, groups=groups, ttl=ttl))
        except MintError as exc:
            raise UsageError(str(exc)) from None
        return EXIT_OK
    settings = load(args.config)
    token = getattr(args, "token", None) or os.environ.get("JITGATE_TOKEN")
    if token and args.verb != "add":  # add is an admin action straight on Redis
        return asyncio.run(_grants_api(args, settings, token))
    if args.verb not in ("add", "revoke", "list", "show"):
        raise UsageError(f"grants {args.verb} acts as you: pass --token or set JITGATE_TOKEN")
    if args.verb == "list" and (args.pending or args.all or args.unreviewed):
        raise UsageError("--pending, --all and --unreviewed need a token (they use the API)")
    return asyncio.run(_grants(args, settings))


def _serve(args: argparse.Namespace) -> int:
    from .. import policy
    from ..app import run  # aiohttp app wiring is only needed here

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = load(args.config)
    policy.load(settings.policy_file)  # a bad policy is a start-up error
    if settings.redis.url is None and shutil.which("redis-server") is None:
        raise UsageError(str(redisd.RedisServerMissing()))
    run(settings)
    return EXIT_OK


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def redis_url_for(settings: Settings) -> str:
    """Return the configured Redis URL, or the embedded server's socket if it is running."""
    if settings.redis.url:
        return settings.redis.url
    sock = redisd.socket_path(settings.state_dir)
    if not sock.exists():
        raise UsageError(
            f"jitgate's embedded Redis is not running (no socket at {sock}); "
            "start `jitgate serve` first, or set redis.url in the config"
        )
    return redisd.redis_url(settings.state_dir)


def _actor(by: str | None) -> str:
    return by or f"{getpass.getuser()}@{socket.gethostname()} (cli)"


async def _grants(args: argparse.Namespace, settings: Settings) -> int:
    from .. import policy
    from ..app import make_audit_log
    from ..grants import RedisGrants
    from ..metrics import Metrics
    from ..redisd import connect_redis
    from ..workflow import grant_record

    compiled = policy.load(settings.policy_file)  # every audit record names its version
    redis = connect_redis(redis_url_for(settings), max(settings.redis.timeout, 5.0))
    store = RedisGrants(redis, settings.redis.key_prefix)
    audit_log = make_audit_log(settings, redis, Metrics())
    await audit_log.start()  # through the spool: a record survives Redis failing right after
    try:
        if args.verb == "add":
            ttl = _duration(args.ttl)
            if ttl > settings.grant_max_ttl:
                raise UsageError(
                    f"--ttl {args.ttl} exceeds grant_max_ttl ({settings.grant_max_ttl:.0f}s)"
                )
            if not args.reason.strip():
                raise UsageError("--reason must not be empty")
            grant = await store.add(args.user, args.scope, ttl, args.reason, _actor(args.by))
            audit_log.emit(
                grant_record(
                    "grant.activated",
                    grant,
                    actor=grant.granted_by,
                    policy_version=compiled.version,
                    recording=compiled.recording_of(grant.scope),
                )
            )
            print(json.dumps(grant.to_dict()) if args.json else grant.id)
            return EXIT_OK
        if args.verb == "revoke":
            revoked = await store.revoke(
                args.grant_id, by=_actor(args.by), comment=args.comment or ""
            )
            if revoked is None:
                print(f"no active grant {args.grant_id}", file=sys.stderr)
                return EXIT_FINDING
            audit_log.emit(
                grant_record(
                    "grant.revoked",
                    revoked,
                    actor=_actor(args.by),
                    comment=args.comment,
                    policy_version=compiled.version,
                    recording=compiled.recording_of(revoked.scope),
                )
            )
            print(json.dumps(revoked.to_dict()) if args.json else f"revoked {revoked.id}")
            return EXIT_OK
        if args.verb == "show":
            found = await store.get(args.grant_id)
            if found is None:
                print(f"no grant {args.grant_id}", file=sys.stderr)
                return EXIT_FINDING
            _show(found.to_dict(), args.json)
            return EXIT_OK
        grants = await store.list(args.user)
        _listing([g.to_dict() for g in grants], args.json)
        return EXIT_OK
    finally:
        await audit_log.close()
        await redis.aclose()


async def _explain(args: argparse.Namespace, settings: Settings) -> int:
    from .. import policy, policytest
    from ..grants import RedisGrants
    from ..identity import Identity
    from ..redisd import connect_redis

    if not policytest.METHOD.match(args.method):
        raise UsageError(f"invalid METHOD {args.method!r}")
    method = args.method.upper()
    compiled = policy.load(settings.policy_file)
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    ident = Identity(args.user, groups) if args.user else None
    redis = store = None
    reject = settings.forward.reject_semicolons
    if (
        not args.no_redis
        and ident is not None
        and _needs_grant(compiled, method, args.path, reject)
    ):
        try:
            url = redis_url_for(settings)
        except UsageError as exc:
            raise UsageError(f"{exc}; or pass --no-redis") from None
        redis = connect_redis(url, max(settings.redis.timeout, 5.0))
        store = RedisGrants(redis, settings.redis.key_prefix)
    try:
        found = await policytest.explain(
            compiled,
            method,
            args.path,
            ident,
            store,
            reject_semicolons=reject,
            prefix=settings.prefix,
        )
    finally:
        if redis is not None:
            await redis.aclose()
    if args.json:
        print(json.dumps(found.to_dict(), indent=2))
    else:
        print("\n".join(found.lines()))
    return EXIT_OK if found.verdict.allow else EXIT_FINDING


def _needs_grant(compiled: policy.Policy, method: str, target: str, reject: bool) -> bool:
    from ..errors import BadPath
    from ..paths import normalise, split_target
    from ..policy import Access

    # Redis is only needed (and must only be running) when grants decide the request.
    try:
        path = normalise(split_target(target)[0], reject_semicolons=reject)
    except BadPath:
        return False
    return compiled.match(method, path).access is Access.PROTECTED


async def _policy_test(args: argparse.Namespace) -> int:
    from .. import policy, policytest

    suite = policytest.load_suite(args.file, args.policy)
    compiled = policy.load(suite.policy_file)
    results = await policytest.run_suite(suite, compiled)
    failed = sum(not r.passed for r in results)
    if args.json:
        report = {
            "file": suite.file,
            "policy": {"file": compiled.file, "version": compiled.version},
            "passed": len(results) - failed,
            "failed": failed,
            "cases": [r.to_dict() for r in results],
        }
        print(json.dumps(report, indent=2))
    else:
        for r in results:
            print(r.line())
        print(f"{len(results) - failed} passed, {failed} failed")
    return EXIT_FINDING if failed else EXIT_OK


def api_url(settings: Settings) -> str:
    """Return the API base URL: $JITGATE_URL, else jitgate's own listen address."""
    env = os.environ.get("JITGATE_URL")
    if env:
        return env.rstrip("/") + settings.prefix
    host = settings.listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.listen.port}{settings.prefix}"


async def _grants_api(args: argparse.Namespace, settings: Settings, token: str) -> int:
    import aiohttp

    from .client import ApiClient, ApiError

    base = (args.url.rstrip("/") + settings.prefix) if args.url else api_url(settings)
    verb, comment = args.verb, {"comment": getattr(args, "comment", None) or ""}
    async with ApiClient(base, token) as api:
        try:
            if verb == "request":
                body: dict[str, Any] = {"scope": args.scope, "reason": args.reason}
                if args.ticket:
                    body["ticket"] = args.ticket
                if args.duration:
                    body["duration"] = args.duration
                if args.break_glass:
                    body["break_glass"] = True
                result = await api.call("POST", "/requests", body)
            elif verb == "extend":
                body = {**comment, "duration": args.duration}
                result = await api.call("POST", f"/grants/{args.grant_id}/extend", body)
            elif verb in ("approve", "deny", "relinquish", "revoke", "review"):
                result = await api.call("POST", f"/grants/{args.grant_id}/{verb}", comment)
            elif verb == "show":
                result = await api.call("GET", f"/grants/{args.grant_id}")
            else:
                path = "/grants/pending" if args.pending else "/grants/mine"
                if args.unreviewed:
                    path = "/grants/unreviewed"
                if args.all:
                    query = {k: v for k, v in (("user", args.user), ("state", args.state)) if v}
                    path = "/grants" + (f"?{urlencode(query)}" if query else "")
                grants = (await api.call("GET", path))["grants"]
                if args.user and not args.all:
                    grants = [g for g in grants if g["user"] == args.user]
                _listing(grants, args.json)
                return EXIT_OK
        except ApiError as exc:
            print(f"jitgate: {exc}", file=sys.stderr)
            return EXIT_USAGE if exc.status in (400, 401) else EXIT_FINDING
        except aiohttp.ClientError as exc:
            raise UsageError(f"cannot reach jitgate at {base}: {exc}") from None
    if verb == "show" or args.json:
        _show(result, args.json)
    elif result.get("kind") == "extension":
        print(f"{result['id']}  {result['state']}  (extension of {result['extends']})")
    else:
        print(f"{result['id']}  {result['state']}")
    return EXIT_OK


def _show(grant: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(grant, indent=2))
        return
    for key, value in grant.items():
        if value in (None, "", [], 0, False) and key not in ("state",):
            continue
        if key == "kind" and value == "grant":
            continue
        if key.endswith("_at") or key == "pending_until":
            value = _when(value)
        elif key == "approvals":
            value = ", ".join(f"{a['by']} ({_when(a['at'])})" for a in value)
        print(f"{key:<14} {value}")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _listing(grants: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(grants, indent=2))
    else:
        _table(grants)


def _table(grants: list[dict[str, Any]]) -> None:
    now = time.time()
    rows = [("ID", "USER", "SCOPE", "STATE", "EXPIRES (UTC)", "LEFT", "GRANTED BY", "REASON")]
    for g in grants:
        expires = g.get("expires_at") or 0
        left = int(max(0, expires - now)) if g.get("state") == "active" else 0
        rows.append(
            (
                g["id"],
                g["user"],
                g["scope"],
                g.get("state", ""),
                datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M:%S")
                if expires
                else "-",
                f"{left // 3600}h{left % 3600 // 60:02d}m{left % 60:02d}s" if left else "-",
                g.get("granted_by") or "-",
                g.get("reason", ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if len(rows) == 1:
        print("(no grants)")
