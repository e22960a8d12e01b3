"""Audit sinks: where serialised audit records end up (a JSON-lines file, stdout, a collector).

A sink takes a batch of JSON lines (compact objects, no trailing newline) with `write`,
and either takes all of it or raises: the caller then keeps the whole batch and sends it
again later, so every sink here is safe to retry. `maintain` is called now and then for
housekeeping (rotation and retention of files), `close` once at shutdown.

The file sink rotates by renaming, so a reader of the live file only ever sees complete
lines, and `files()` lists the whole trail in order for `jitgate audit verify`. The HTTP
sink speaks to the common collectors: any JSON-lines endpoint, Splunk HEC, the
Elasticsearch/OpenSearch bulk API and the Loki push API.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip as gzip_mod
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from ..settings.audit import AUDIT_HTTP_FORMATS as FORMATS
from ..settings.read import Secret

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STAMP = "%Y-%m-%dT%H-%M-%S"
_STAMP_RE = r"(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3})"
_BODY_SNIPPET = 200


class SinkError(Exception):
    """A sink did not take a batch; the caller keeps it and retries."""


def _stamp(ms: int) -> str:
    moment = _EPOCH + timedelta(milliseconds=ms)
    return f"{moment.strftime(_STAMP)}.{ms % 1000:03d}"


def _stamp_ms(stamp: str) -> int:
    moment = datetime.strptime(stamp, f"{_STAMP}.%f").replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


class JsonlFileSink:
    """Append records as JSON lines to a file, rotating it by size or by UTC day."""

    def __init__(
        self,
        path: Path,
        *,
        rotate_bytes: int | None = None,
        rotate_daily: bool = False,
        retention: float | None = None,
        fsync: bool = True,
        name: str = "file",
        now: Callable[[], float] = time.time,
    ) -> None:
        if rotate_bytes is not None and rotate_bytes <= 0:
            raise ValueError(f"rotate_bytes must be positive, not {rotate_bytes}")
        if retention is not None and retention <= 0:
            raise ValueError(f"retention must be positive, not {retention}")
        self.name = name
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self.rotate_daily = rotate_daily
        self.retention = retention
        self.fsync = fsync
        self._now = now
        self._rotated = re.compile(
            rf"{re.escape(self.path.stem)}-{_STAMP_RE}{re.escape(self.path.suffix)}"
        )
        # Worker threads of write and maintain may overlap; rotation must not race an append.
        self._lock = threading.Lock()

    async def write(self, lines: list[str]) -> None:
        """Append the batch whole, rotating first if it is due, or raise and append nothing."""
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode("utf-8")
        await asyncio.to_thread(self._append, data)

    async def maintain(self) -> None:
        """Rotate a live file whose day is over and delete rotated files past retention."""
        await asyncio.to_thread(self._maintain)

    async def close(self) -> None:
        return None  # no handle is held between batches

    def files(self) -> list[Path]:
        """Return the rotated files oldest first, then the live file if it exists."""
        out = [p for _, p in self._rotated_files()]
        if self.path.exists():
            out.append(self.path)
        return out

    def _rotated_files(self) -> list[tuple[str, Path]]:
        """Return (stamp, path) of this sink's rotated files, oldest first."""
        try:
            entries = list(self.path.parent.iterdir())
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            m = self._rotated.fullmatch(entry.name)
            if m and entry.is_file():
                found.append((m.group(1), entry))
        return sorted(found)  # fixed-width UTC stamps: name order is time order

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the file's lock: the workers of `serve --workers N` share one file, and a
        rotation, or the cut-back of a failed append, must not race another's append."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(
                self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o640
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _append(self, data: bytes) -> None:
        with self._exclusive():
            try:
                st: os.stat_result | None = self.path.stat()
            except FileNotFoundError:
                st = None
            if st is not None and st.st_size and self._due(st, len(data)):
                self._rotate(st)
                st = None
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                start = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    if self.fsync:
                        os.fsync(fd)
                except BaseException:
                    # Take all of the batch or none of it: a retry must not follow a torn line.
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
            if st is None and self.fsync:
                self._sync_dir()  # the new file's name must survive a crash like its content

    def _due(self, st: os.stat_result, incoming: int) -> bool:
        if self.rotate_bytes is not None and st.st_size + incoming > self.rotate_bytes:
            return True
        # The file's day is that of its last write (its mtime), which survives restarts.
        return self.rotate_daily and _utc_day(st.st_mtime) != _utc_day(self._now())

    def _rotate(self, st: os.stat_result) -> None:
        """Rename the live file to its stamped name; the next append starts a new one."""
        # Stamped with its last write, so a day's file carries that day; never earlier than
        # the newest rotated file, so names stay unique and in order if the clock steps back.
        ms = int(st.st_mtime * 1000)
        rotated = self._rotated_files()
        if rotated:
            ms = max(ms, _stamp_ms(rotated[-1][0]) + 1)
        while True:
            target = self.path.with_name(f"{self.path.stem}-{_stamp(ms)}{self.path.suffix}")
            if not target.exists():
                break
            ms += 1
        self.path.rename(target)
        if self.fsync:
            self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _maintain(self) -> None:
        with self._exclusive():
            if self.rotate_daily:
                # A quiet trail still turns over daily, so retention reaches its last day too.
                try:
                    st = self.path.stat()
                except FileNotFoundError:
                    pass
                else:
                    if st.st_size and _utc_day(st.st_mtime) != _utc_day(self._now()):
                        self._rotate(st)
            if self.retention is None:
                return
            cutoff = self._now() - self.retention
            for _, path in self._rotated_files():
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                except FileNotFoundError:
                    pass  # removed by someone else meanwhile: nothing left to do


class StdoutSink:
    """Print records as JSON lines on standard output."""

    def __init__(self, name: str = "stdout") -> None:
        self.name = name

    async def write(self, lines: list[str]) -> None:
        if not lines:
            return
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    async def maintain(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _parse(line: str) -> dict[str, Any]:
    rec = json.loads(line)
    return rec if isinstance(rec, dict) else {}


Position = tuple[str, int]  # writer, seq


def position(line: str) -> tuple[Position, str] | None:
    """Return ((writer, seq), mac) of a chained record line, or None."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    writer, seq, mac = rec.get("writer"), rec.get("seq"), rec.get("mac")
    if isinstance(writer, str) and type(seq) is int and isinstance(mac, str):
        return (writer, seq), mac
    return None


def batch_key(lines: list[str]) -> str | None:
    """Return `writer:first-last` for a batch of one writer's chained records, else None.

    A batch comes from one spool, so one writer: its first and last records say it all."""
    if not lines:
        return None
    first, last = position(lines[0]), position(lines[-1])
    if first is None or last is None or first[0][0] != last[0][0]:
        return None
    return f"{first[0][0]}:{first[0][1]}-{last[0][1]}"


def _ts_ns(rec: dict[str, Any]) -> str:
    """Return the record's ts in nanoseconds, exactly as written (no float rounding)."""
    try:
        return str(int(Decimal(str(rec["ts"])).scaleb(9)))
    except (KeyError, InvalidOperation, ValueError, TypeError):
        return str(time.time_ns())  # a record without a usable ts must not wedge the sink


def _bulk_result(item: Any) -> dict[str, Any]:
    """Return the result inside one bulk item ({"create": {...}})."""
    result = next(iter(item.values()), None) if isinstance(item, dict) else None
    return result if isinstance(result, dict) else {}


def _bulk_ok(result: dict[str, Any]) -> bool:
    status = result.get("status")
    # 409: the id is already there, from an earlier send of this very batch.
    return isinstance(status, int) and (200 <= status < 300 or status == 409)


class HttpSink:
    """POST each batch as one request to a log collector, in the collector's own format."""

    def __init__(
        self,
        name: str,
        url: str | Secret,
        *,
        format: str = "jsonl",
        headers: Mapping[str, str | Secret] | Iterable[tuple[str, str | Secret]] | None = None,
        timeout: float = 10.0,
        gzip: bool = False,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"audit sink {name}: unknown format {format!r}, not one of {FORMATS}")
        self.name = name
        # An ingest URL may carry a token (in its query or user info): kept out of repr.
        self._url = url.reveal() if isinstance(url, Secret) else url
        self.format = format
        self.timeout = timeout
        self.gzip = gzip
        self._headers: dict[str, str | Secret] = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None
        # Collectors may echo a rejected credential in their error body; those never get out.
        hidden = [v.reveal() if isinstance(v, Secret) else v for v in self._headers.values()]
        hidden += [v.split()[-1] for v in hidden if v.split()]  # "Splunk <token>": the token
        parsed = URL(self._url)
        hidden += [parsed.password or "", *parsed.query.values()]
        # Longest first, so a whole value goes before the token inside it.
        self._redact = sorted({s for s in hidden if len(s) >= 4}, key=len, reverse=True)

    async def write(self, lines: list[str]) -> None:
        """POST the batch as one request; raise unless the collector took all of it."""
        if not lines:
            return
        body, content_type = self._body(lines)
        headers = CIMultiDict({"Content-Type": content_type})
        if self.gzip:
            body = gzip_mod.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        for key, value in self._headers.items():
            headers[key] = value.reveal() if isinstance(value, Secret) else value
        idempotency = batch_key(lines)
        if idempotency is not None:
            # The same records sent again (a retry, a replay after a crash) carry the same
            # key; a receiver dedupes per record by writer and seq (docs/audit.md).
            headers.setdefault("Idempotency-Key", idempotency)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "jitgate"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        try:
            # A redirect is a misconfigured URL: following a 302 would turn the POST into a GET
            # and lose the batch while looking like success.
            post = self._session.post(self._url, data=body, headers=headers, allow_redirects=False)
            async with post as resp:
                status = resp.status
                text = (await resp.read()).decode("utf-8", errors="replace")
        except TimeoutError:
            raise SinkError(f"audit sink {self.name}: no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise SinkError(
                self._scrub(f"audit sink {self.name}: POST failed: {type(exc).__name__}: {exc}")
            ) from None
        if not 200 <= status < 300:
            raise SinkError(
                self._scrub(f"audit sink {self.name}: HTTP {status}: {text[:_BODY_SNIPPET]}")
            )
        if self.format == "splunk":
            self._check_splunk(status, text)
        elif self.format == "elastic":
            self._check_elastic(status, text)

    async def maintain(self) -> None:
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _body(self, lines: list[str]) -> tuple[bytes, str]:
        """Return the request body for this sink's format and its content type."""
        if self.format == "jsonl":
            return ("\n".join(lines) + "\n").encode(), "application/x-ndjson"
        if self.format == "splunk":
            # The record goes in verbatim: the exact bytes that were signed, and no re-dump.
            events = []
            for line in lines:
                ts = _parse(line).get("ts")
                if not isinstance(ts, int | float):
                    ts = round(time.time(), 3)
                events.append(
                    f'{{"time":{json.dumps(ts)},"event":{line},'
                    '"sourcetype":"jitgate:audit","source":"jitgate"}'
                )
            return "\n".join(events).encode(), "application/json"
        if self.format == "elastic":
            parts = []
            for line in lines:
                rid = _parse(line).get("id")
                # create, not index: a re-sent record answers 409 instead of being overwritten.
                action = {"create": {"_id": str(rid)}} if rid is not None else {"create": {}}
                parts.append(json.dumps(action, separators=(",", ":")))
                parts.append(line)
            return ("\n".join(parts) + "\n").encode(), "application/x-ndjson"
        streams: dict[str, list[list[str]]] = {}
        for line in lines:
            rec = _parse(line)
            streams.setdefault(str(rec.get("event") or "unknown"), []).append([_ts_ns(rec), line])
        push = {
            "streams": [
                {"stream": {"job": "jitgate-audit", "event": event}, "values": values}
                for event, values in streams.items()
            ]
        }
        return json.dumps(push, separators=(",", ":")).encode(), "application/json"

    def _check_splunk(self, status: int, text: str) -> None:
        try:
            code = json.loads(text).get("code")
        except (ValueError, AttributeError):
            code = None
        if code != 0:
            raise SinkError(
                self._scrub(
                    f"audit sink {self.name}: HTTP {status} but Splunk HEC did not accept "
                    f"the batch: {text[:_BODY_SNIPPET]}"
                )
            )

    def _check_elastic(self, status: int, text: str) -> None:
        try:
            answer = json.loads(text)
            items = answer.get("items", [])
            if not isinstance(items, list):
                raise TypeError
        except (ValueError, AttributeError, TypeError):
            raise SinkError(
                self._scrub(
                    f"audit sink {self.name}: HTTP {status}, not a bulk response: "
                    f"{text[:_BODY_SNIPPET]}"
                )
            ) from None
        if not items and answer.get("errors") is not False:
            raise SinkError(
                self._scrub(f"audit sink {self.name}: no bulk items: {text[:_BODY_SNIPPET]}")
            )
        rejected = [r for r in map(_bulk_result, items) if not _bulk_ok(r)]
        if rejected:
            first = rejected[0]
            error = first.get("error")
            if isinstance(error, dict):
                error = f"{error.get('type')}: {error.get('reason')}"
            detail = f"id {first.get('_id')}: status {first.get('status')}: {error}"
            raise SinkError(
                self._scrub(
                    f"audit sink {self.name}: {len(rejected)} of {len(items)} records "
                    f"rejected; first {detail[:_BODY_SNIPPET]}"
                )
            )

    def _scrub(self, message: str) -> str:
        for secret in self._redact:
            message = message.replace(secret, "********")
        return message
