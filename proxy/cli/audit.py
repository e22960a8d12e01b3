"""`jitgate audit verify | query | summary | subject`: prove the trail untouched, ask it.

`query` and `summary` read the Redis audit stream directly, or, given a token, go through
`GET {prefix}/api/audit` as an admin; both ways take the same filters (audit/query.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from redis.exceptions import RedisError

from ..audit import query as auditquery
from ..audit import subjects
from ..audit.sinks import JsonlFileSink
from ..audit.store import AuditStore, Page, Query, store_for
from ..settings import Settings
from .common import (
    EXIT_FINDING,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    api_args,
    api_url,
    config_arg,
    redis_for,
)

if TYPE_CHECKING:
    from ..audit.chain import Verifier


def add_parser(nouns: Any) -> None:
    """Add `audit` and its verbs to the command-line parser."""
    aud = nouns.add_parser("audit", help="the audit trail").add_subparsers(
        dest="verb", required=True, metavar="VERB"
    )
    p = aud.add_parser(
        "verify",
        help="check the audit trail's HMAC chains for edits, deletions and insertions",
        description="Without --file or --redis, every trail the config writes is verified. "
        "Exit 0 if every chain is intact, 1 if a problem is found, 2 if the "
        "trail cannot be read or no audit.hmac_key is configured.",
    )
    config_arg(p)
    # Neither: every sink the config writes (the file, the Redis stream), each on its own.
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--file",
        type=Path,
        nargs="+",
        default=None,
        help="JSON-lines audit files, oldest first (rotated files, then the live one)",
    )
    src.add_argument("--redis", action="store_true", help="the Redis audit stream")
    p.add_argument(
        "--stream", default=None, help="stream key (default: redis.key_prefix + audit.redis.stream)"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="every writer has shut down: a chain without a closing checkpoint is an error",
    )
    p.add_argument("--json", action="store_true")

    p = aud.add_parser(
        "query",
        help="find audit records: who viewed a recording, what a user viewed, and why",
        description="Every given filter must hold. Times: 2026-10-01, 2026-10-01T12:00:00Z, "
        "unix seconds, or a duration ago (30d). Exit 0 with records, 1 with none.",
    )
    api_args(p)
    p.add_argument("--user", help="whose access (the subject)")
    p.add_argument("--scope", help="exact scope, e.g. recording:1/demo-1")
    p.add_argument("--recording", help="recording id")
    p.add_argument("--grant", help="grant id")
    p.add_argument("--subject", help="whose recording: the data subject's id, or hmac:...")
    p.add_argument("--event", action="append", help="event type (repeat for several)")
    p.add_argument("--since", help="from this time on")
    p.add_argument("--until", help="before this time")
    p.add_argument("--limit", type=int, default=1000, help="records per page (default 1000)")
    p.add_argument("--order", choices=("asc", "desc"), default="asc")
    p.add_argument("--cursor", help="continue after a previous page")
    p.add_argument("--all", action="store_true", help="follow every page to the end")
    p.add_argument("--format", choices=auditquery.FORMATS, default=None, help="default: table")

    p = aud.add_parser(
        "subject",
        help="who viewed one person's recordings, when, under which grant and why (a DSAR)",
        description="SUBJECT is the person's id in the replay tool (metadata.subject.field), "
        "or the hmac:... form audit records carry. csv starts with # lines that explain the "
        "columns: a report to hand over. Exit 0 with views, 1 with none.",
    )
    api_args(p)
    p.add_argument("subject")
    p.add_argument("--since", help="from this time on")
    p.add_argument("--until", help="before this time")
    p.add_argument("--format", choices=("table", "csv", "json"), default=None)

    p = aud.add_parser(
        "reindex",
        help="index stream records that have no index entries yet (safe to run again)",
        description="Records written to the stream by jitgate before its audit indexes "
        "existed, or by another tool, are not found by queries until indexed.",
    )
    config_arg(p)

    p = aud.add_parser(
        "summary",
        help="what was done under one grant: requests, resources, bytes, first and last access",
    )
    api_args(p)
    p.add_argument("grant_id")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.verb == "verify":
        return await _verify(args, settings)
    if args.verb == "reindex":
        async with _RedisSource(settings) as source:
            count = await source.store.reindex()
        print(f"indexed {count} records")
        return EXIT_OK
    token = args.token or os.environ.get("JITGATE_TOKEN")
    base = (args.url.rstrip("/") + settings.prefix) if args.url else api_url(settings)
    if args.verb == "subject":
        return await _subject(args, settings, _ApiSource(base, token) if token else None)
    if args.verb == "query":
        fmt = args.format or ("json" if args.json else "table")
        try:
            q = auditquery.from_mapping(vars(args))
            q = subjects.with_subject(q, subjects.form_for(settings))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if token:
            return await _query(_ApiSource(base, token), q, fmt, args.all)
        async with _RedisSource(settings) as source:
            return await _query(source, q, fmt, args.all)
    if token:
        summary = await _ApiSource(base, token).summary(args.grant_id)
    else:
        async with _RedisSource(settings) as source:
            summary = await source.summary(args.grant_id)
    if summary is None:
        print(f"no audit records for grant {args.grant_id}", file=sys.stderr)
        return EXIT_FINDING
    print(json.dumps(summary, indent=2) if args.json else auditquery.summary_text(summary), end="")
    return EXIT_OK


async def _query(source: _RedisSource | _ApiSource, q: Query, fmt: str, follow: bool) -> int:
    records: list[dict[str, Any]] = []
    count, first = 0, True
    while True:
        page: Page = await source.page(q)
        count += len(page.records)
        if fmt in ("jsonl", "csv"):  # streamed page by page: an export of any size
            text = auditquery.render(page.records, fmt)
            if fmt == "csv" and not first:
                text = text.split("\n", 1)[1]  # the header once
            sys.stdout.write(text)
        else:
            records.extend(page.records)
        first = False
        if not (follow and page.next):
            break
        q = dataclasses.replace(q, cursor=page.next)
    if fmt in ("table", "json"):
        sys.stdout.write(auditquery.render(records, fmt, page.next))
    return EXIT_OK if count else EXIT_FINDING


async def _subject(args: argparse.Namespace, settings: Settings, api: _ApiSource | None) -> int:
    fmt = args.format or ("json" if args.json else "table")
    try:
        since, until = (auditquery.parse_time(t) if t else None for t in (args.since, args.until))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if api is not None:
        params = urlencode({k: v for k, v in (("since", since), ("until", until)) if v})
        rep = await api.subject(args.subject, params)
    else:
        form = subjects.form_for(settings)
        if form is None:
            raise UsageError(f"no metadata section in {settings.file}: records name no subject")
        async with _RedisSource(settings) as source:
            stored = form.stored(args.subject)
            try:
                rep = await subjects.report(
                    source.store, args.subject, stored, since=since, until=until
                )
            except RedisError as exc:
                raise UsageError(f"cannot read the audit stream: {exc}") from None
    sys.stdout.write(subjects.render(rep, fmt))
    return EXIT_OK if rep["views"] else EXIT_FINDING


class _RedisSource:
    """Read the trail straight from Redis (for operators with access to it)."""

    def __init__(self, settings: Settings) -> None:
        if settings.audit.redis is None:
            raise UsageError("the Redis audit stream is off (audit.redis: null): nothing to query")
        self.redis = redis_for(settings)
        store = store_for(settings, self.redis)
        assert store is not None
        self.store: AuditStore = store

    async def __aenter__(self) -> _RedisSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.redis.aclose()

    async def page(self, q: Query) -> Page:
        try:
            page = await self.store.query(q)
            ids = (str(r["grant_id"]) for r in page.records if "grant_id" in r)
            auditquery.annotate(page.records, await self.store.grant_reasons(ids))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except RedisError as exc:
            raise UsageError(f"cannot read the audit stream: {exc}") from None
        return page

    async def summary(self, grant_id: str) -> dict[str, Any] | None:
        try:
            return await self.store.summary(grant_id)
        except RedisError as exc:
            raise UsageError(f"cannot read the audit stream: {exc}") from None


class _ApiSource:
    """Read the trail through jitgate's API, as the admin the token names."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token

    async def _call(self, path: str) -> Any:
        import aiohttp  # only this way needs it

        from .client import ApiClient, ApiError

        try:
            async with ApiClient(self.base, self.token) as api:
                return await api.call("GET", path)
        except ApiError as exc:
            if exc.status == 404 and exc.code == "not_found" and "/summary" in path:
                return None
            raise UsageError(str(exc)) from None
        except aiohttp.ClientError as exc:
            raise UsageError(f"cannot reach jitgate at {self.base}: {exc}") from None

    async def page(self, q: Query) -> Page:
        data = await self._call("/audit?" + urlencode(auditquery.to_params(q), doseq=True))
        return Page(data["records"], data.get("next"))

    async def subject(self, subject: str, params: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            f"/audit/subjects/{quote(subject, safe='')}" + (f"?{params}" if params else "")
        )
        return result

    async def summary(self, grant_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._call(
            f"/audit/grants/{quote(grant_id, safe='')}/summary"
        )
        return result


async def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from ..audit.chain import Verifier

    a = settings.audit
    if a.hmac_key is None:
        raise UsageError(f"no audit.hmac_key in {settings.file}: the audit trail is not chained")
    if args.stream and not args.redis:
        raise UsageError("--stream goes with --redis")
    key = a.hmac_key.reveal().encode()

    def verifier() -> Verifier:
        return Verifier(key, a.key_id, a.checkpoint_interval, args.strict)

    stream = settings.redis.key_prefix + (a.redis.stream if a.redis else "audit")
    trails: list[tuple[str, list[Path] | None]]  # (source, its files, or None: the stream)
    if args.file is not None:
        trails = [(" ".join(str(f) for f in args.file), list(args.file))]
    elif args.redis:
        trails = [(args.stream or stream, None)]
    else:  # every sink the config writes
        trails = []
        if a.file is not None:
            written = JsonlFileSink(a.file.path).files()  # rotated ones oldest first, then live
            trails.append((" ".join(str(f) for f in written) or str(a.file.path), written))
        if a.redis is not None:
            trails.append((stream, None))
        if not trails and not a.http:
            raise UsageError(f"{settings.file} names no audit file or Redis stream to verify")
    reports, lines, errors = [], [], 0
    every = args.file is None and not args.redis
    failed: list[str] = []  # trails that could not be read (with every trail: go on)
    for source, files in trails:
        v = verifier()
        try:
            if files is None:
                await _feed_stream(v, settings, source)
            else:
                _feed_files(v, files)
        except UsageError as exc:
            if not every:
                raise
            failed.append(source)
            lines.append(f"{source}: cannot be verified: {exc}")
            continue
        v.finish()
        errors += v.errors
        reports.append(v.report(source))
        lines.extend(v.text(source))
    unread = []
    if every:
        unread = [f"http:{h.name}" for h in a.http]
        lines.extend(
            f"{name}: an HTTP collector cannot be read back: verify the copy it holds there"
            for name in unread
        )
    if args.json:
        if len(reports) == 1 and not unread and not failed:
            print(json.dumps(reports[0], indent=2))
        else:
            out = {
                "clean": errors == 0 and not failed, "errors": errors, "sources": reports,
                "failed": failed, "unread": unread,
            }  # fmt: skip
            print(json.dumps(out, indent=2))
    else:
        print("\n".join(lines))
    if errors:
        return EXIT_FINDING
    return EXIT_USAGE if failed else EXIT_OK


def _feed_files(v: Verifier, files: list[Path]) -> None:
    from ..audit.chain import file_lines

    for path in files:  # one trail across rotated files: chains continue between them
        try:
            for loc, text in file_lines(path):
                v.feed(loc, text)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


async def _feed_stream(v: Verifier, settings: Settings, key: str) -> None:
    from ..audit.chain import stream_entries

    redis = redis_for(settings)
    try:
        async for loc, text in stream_entries(redis, key):
            v.feed(loc, text)
    except RedisError as exc:
        raise UsageError(f"cannot read the stream {key}: {exc}") from None
    finally:
        await redis.aclose()
