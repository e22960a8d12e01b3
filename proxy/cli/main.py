"""`jitgate <noun> <verb>`: serve the proxy, check and test policy, mint tokens, manage grants.

Exit codes: 0 ok, 1 a finding (invalid config, grant not found, a request `policy explain`
does not allow, a failing `policy test` case), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import redisd
from ..errors import ConfigError, ConfigErrors
from ..settings import Settings, load
from ..settings.config import workers_count
from .common import (
    EXIT_FINDING,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    api_args,
    config_arg,
    duration,
    redis_for,
)

if TYPE_CHECKING:
    from .. import policy

# Modules for one command each are imported by that command: every `jitgate` call (an
# `audit query` included) starts faster.


def _parser() -> argparse.ArgumentParser:
    from . import audit as auditcli

    parser = argparse.ArgumentParser(prog="jitgate", description=__doc__)
    nouns = parser.add_subparsers(dest="noun", required=True, metavar="COMMAND")

    p = nouns.add_parser("serve", help="run the proxy")
    config_arg(p)
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N",
        help="worker processes sharing the port, or auto (one per usable core); "
        "default: listen.workers, 1",
    )
    # Set by the supervisor of `--workers N` for each worker it starts.
    p.add_argument("--worker-slot", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)

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
    body = p.add_mutually_exclusive_group()
    body.add_argument("--body", type=Path, help="the request body, from a file (body rules)")
    body.add_argument("--json-body", help="the request body, given as JSON text (body rules)")
    p.add_argument(
        "--metadata",
        type=Path,
        help="what the recording holds, for sensitivity rules: a JSON or YAML file of "
        "start_url, urls and properties",
    )
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
    from .. import policyfile
    from . import audit as auditcli

    if args.noun == "serve":
        return _serve(args)
    if args.noun == "check":
        settings = load(args.config)
        compiled = policyfile.load(settings.policy_file)
        print(f"ok: {settings.file} and {settings.policy_file} (policy version {compiled.version})")
        return EXIT_OK
    if args.noun == "policy" and args.verb == "explain":
        return asyncio.run(_explain(args, load(args.config)))
    if args.noun == "policy" and args.verb == "test":
        return asyncio.run(_policy_test(args))
    if args.noun == "policy":
        compiled = policyfile.load(args.file)
        print(f"ok: {args.file}: {len(compiled.routes)} routes, version {compiled.version}")
        return EXIT_OK
    if args.noun == "audit":
        return asyncio.run(auditcli.run(args, load(args.config)))
    if args.noun == "token":
        from ..identity import MintError, mint

        settings = load(args.config)
        ttl = duration(args.ttl) if args.ttl else None
        groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
        try:
            print(mint(settings.identity, args.sub, groups=groups, ttl=ttl))
        except MintError as exc:
            raise UsageError(str(exc)) from None
        return EXIT_OK
    from . import grants

    return asyncio.run(grants.run(args, load(args.config)))


def _workers(text: str) -> int:
    count = workers_count("auto" if text == "auto" else int(text) if text.isdigit() else None)
    if count is None:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, not {text!r}")
    return count


def _serve(args: argparse.Namespace) -> int:
    from .. import policyfile

    # aiohttp app wiring (and prometheus-client, which must load after the supervisor set
    # PROMETHEUS_MULTIPROC_DIR) is only imported below.
    name = "%(name)s" if args.worker_slot is None else f"%(name)s[worker {args.worker_slot}]"
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s {name}: %(message)s"
    )
    settings = load(args.config)
    policyfile.load(settings.policy_file)  # a bad policy is a start-up error, reported once
    if args.worker_slot is not None:
        from ..workers import serve_worker

        serve_worker(settings, args.worker_slot, args.ready_fd)
        return EXIT_OK
    if settings.redis.embedded and shutil.which("redis-server") is None:
        raise UsageError(str(redisd.RedisServerMissing()))
    count = args.workers or settings.listen.workers
    if count > 1:
        from ..workers import supervise, worker_command

        argv = [*worker_command(), "serve", "--log-level", args.log_level, "--workers", "1"]
        if args.config is not None:
            argv += ["--config", str(args.config)]
        return supervise(settings, count, argv)
    from ..serve import run

    run(settings)
    return EXIT_OK


async def _explain(args: argparse.Namespace, settings: Settings) -> int:
    from .. import policyfile, policytest
    from ..grantstore import RedisGrants
    from ..identity import Identity

    if not policytest.METHOD.match(args.method):
        raise UsageError(f"invalid METHOD {args.method!r}")
    method = args.method.upper()
    compiled = policyfile.load(settings.policy_file)
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
            redis = redis_for(settings)
        except UsageError as exc:
            raise UsageError(f"{exc}; or pass --no-redis") from None
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
            body=_explain_body(args),
            metadata=_explain_metadata(args),
        )
    finally:
        if redis is not None:
            await redis.aclose()
    if args.json:
        print(json.dumps(found.to_dict(), indent=2))
    else:
        print("\n".join(found.lines()))
    return EXIT_OK if found.verdict.allow else EXIT_FINDING


def _explain_metadata(args: argparse.Namespace) -> dict[str, object] | None:
    """--metadata FILE: what the recording holds, for the policy's sensitivity rules."""
    from ..sensitivity import read_metadata

    if args.metadata is None:
        return None
    try:
        return dict(read_metadata(Path(args.metadata)))
    except ValueError as exc:
        raise UsageError(f"--metadata: {exc}") from None


def _explain_body(args: argparse.Namespace) -> bytes | None:
    """--body FILE or --json-body TEXT: the body a route's body rule decides on."""
    if args.json_body is not None:
        return str(args.json_body).encode()
    if args.body is not None:
        try:
            return Path(args.body).read_bytes()
        except OSError as exc:
            raise UsageError(f"--body: cannot read {args.body}: {exc.strerror}") from None
    return None


def _needs_grant(compiled: policy.Policy, method: str, target: str, reject: bool) -> bool:
    from ..errors import BadPath
    from ..paths import normalise, split_target
    from ..policy import Access

    # Redis is only needed (and must only be running) when grants decide the request.
    try:
        path = normalise(split_target(target)[0], reject_semicolons=reject)
    except BadPath:
        return False
    match = compiled.match(method, path, split_target(target)[1])
    return match.access is Access.PROTECTED or bool(match.body)


async def _policy_test(args: argparse.Namespace) -> int:
    from .. import policyfile, policytest

    suite = policytest.load_suite(args.file, args.policy)
    compiled = policyfile.load(suite.policy_file)
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
