"""One adapter per replay tool: where its API describes one recording, and how to read it.

Each reads the tool's own answer (shapes from the tools' source, named per adapter) into a
`Metadata`: the data subject's id, the start URL, the visited URLs and the chosen person
properties. An adapter only knows the recording scopes of its preset.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..settings.metadata import MetadataSettings


class MetadataError(Exception):
    """The tool's answer cannot be had or read; the message says why."""


@dataclass(frozen=True)
class Metadata:
    """What jitgate knows of one recording: whose it is and where it went."""

    scope: str
    subject: str | None
    start_url: str | None = None
    urls: tuple[str, ...] = ()
    properties: dict[str, Any] = field(default_factory=dict)
    fetched_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope, "subject": self.subject, "start_url": self.start_url,
            "urls": list(self.urls), "properties": self.properties, "fetched_at": self.fetched_at,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Metadata:
        return cls(
            scope=str(data["scope"]),
            subject=_str(data.get("subject")),
            start_url=_str(data.get("start_url")),
            urls=tuple(u for u in data.get("urls") or () if isinstance(u, str)),
            properties=dict(data.get("properties") or {}),
            fetched_at=float(data.get("fetched_at") or 0.0),
        )


@dataclass(frozen=True)
class Adapter:
    """Where one tool describes a recording (`path`), for which scopes, and how to read it."""

    name: str
    scope: re.Pattern[str]  # groups: owner (project, org) and id
    path: str  # with {owner} and {id}, percent-encoded when filled in
    settings: MetadataSettings

    def target(self, scope: str) -> str | None:
        """Return the API path that describes the recording `scope` names, or None."""
        m = self.scope.fullmatch(scope)
        if m is None:
            return None
        return self.path.format(owner=quote(m["owner"], safe=""), id=quote(m["id"], safe=""))

    def urls_query(self, scope: str) -> tuple[str, dict[str, Any]] | None:
        """The second request, (path, JSON body), that names a recording's visited URLs,
        where the tool's description of a recording does not (PostHog): None if none."""
        m = self.scope.fullmatch(scope)
        if self.name != "posthog" or m is None:
            return None
        # The URLs replay itself recorded for the session (`all_urls` of HogQL's
        # raw_session_replay_events, which PostHog's own "visited page" filter reads:
        # posthog/session_recordings/queries/session_replay_url_values.py @3ca3413b),
        # asked of the query API (`POST /api/projects/{id}/query/`, a HogQLQuery with the
        # id as a `values` placeholder, never spliced into the text).
        query = {"kind": "HogQLQuery", "query": _POSTHOG_URLS, "values": {"session_id": m["id"]}}
        return f"/api/projects/{quote(m['owner'], safe='')}/query/", {"query": query}

    def read_urls(self, body: Any) -> tuple[str, ...]:
        """Read the URLs query's answer (HogQLQueryResponse: `results`, one row per URL)."""
        rows = body.get("results") if isinstance(body, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, list) and r for r in rows):
            raise MetadataError(f"{self.name}: the visited URLs query answered no results rows")
        if body.get("hasMore") or len(rows) >= 10_000:  # the query's LIMIT: a rule could
            # miss the URLs not read, so the metadata is not known
            raise MetadataError(f"{self.name}: at least {len(rows)} visited URLs, not all read")
        return tuple(r[0] for r in rows if isinstance(r[0], str) and r[0])

    def headers(self) -> dict[str, str]:
        out = {"Accept": "application/json"}
        if self.settings.token is not None:
            out["Authorization"] = f"Bearer {self.settings.token.reveal()}"
        if self.settings.host_header:
            out["Host"] = self.settings.host_header
        return out

    def read(self, scope: str, body: Any) -> Metadata:
        """Read the tool's answer into Metadata, or raise MetadataError."""
        if not isinstance(body, dict):
            raise MetadataError(f"{self.name}: the answer is not a JSON object")
        reader = _READERS[self.name]
        subject, start, urls, props = reader(body, self.settings.subject.field)
        wanted = {k: props[k] for k in self.settings.properties if k in props}
        if start is not None and start not in urls:
            urls = (start, *urls)
        return Metadata(scope, subject, start, urls, wanted, time.time())


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


Read = tuple[str | None, str | None, tuple[str, ...], dict[str, Any]]


def _posthog(body: dict[str, Any], subject: str) -> Read:
    # SessionRecordingSerializer (posthog/session_recordings/session_recording_api.py
    # @004ffdf6): distinct_id, start_url, person (MinimalPersonSerializer: id, distinct_ids,
    # properties). The answer names no visited URLs beyond the start URL: `urls_query`.
    person = _obj(body.get("person"))
    props = _obj(person.get("properties"))
    ids = {
        "distinct_id": _str(body.get("distinct_id")),
        "person_id": _str(person.get("uuid")) or _str(person.get("id")),
        "email": _str(props.get("email")),
    }
    start = _str(body.get("start_url"))
    return ids[subject], start, (), dict(props)


def _demo(body: dict[str, Any], subject: str) -> Read:
    # The demo app answers as PostHog does, and adds the pages its recording visited.
    found, start, _, props = _posthog(body, subject)
    urls = tuple(u for u in body.get("visited_urls") or () if isinstance(u, str))
    return found, start, urls, props


def _sentry(body: dict[str, Any], subject: str) -> Read:
    # ReplayDetailsResponse (src/sentry/replays/post_process.py @002d8e67), under "data":
    # user {id, username, email, ip, display_name}, urls (in visit order), tags {k: [v]}.
    data = body.get("data")
    if not isinstance(data, dict):
        raise MetadataError("sentry: the answer has no data object")
    user = _obj(data.get("user"))
    ids = {
        "user_id": _str(user.get("id")),
        "email": _str(user.get("email")),
        "username": _str(user.get("username")),
    }
    urls = tuple(u for u in data.get("urls") or () if isinstance(u, str))
    tags = _obj(data.get("tags"))
    props: dict[str, Any] = {**tags, **{k: v for k, v in user.items() if v is not None}}
    return ids[subject], urls[0] if urls else None, urls, props


def _openreplay(body: dict[str, Any], subject: str) -> Read:
    # SessionReplay (backend/pkg/session/session.go, v1.27), under "data": userId, userUuid,
    # metadata {key: value} (the project's metadata keys). No URLs are in this answer.
    data = body.get("data")
    if not isinstance(data, dict):
        raise MetadataError("openreplay: the answer has no data object")
    ids = {"user_id": _str(data.get("userId")), "user_uuid": _str(data.get("userUuid"))}
    meta = _obj(data.get("metadata"))
    props = {
        "userCountry": data.get("userCountry"), "userCity": data.get("userCity"),
        "userBrowser": data.get("userBrowser"), "userOs": data.get("userOs"), **meta,
    }  # fmt: skip
    return ids[subject], None, (), props


_READERS = {"posthog": _posthog, "demo": _demo, "sentry": _sentry, "openreplay": _openreplay}

# The recording scope of each tool's preset, and the API path that describes it.
_POSTHOG = (
    r"recording:(?P<owner>[^/]+)/(?P<id>.+)",
    "/api/projects/{owner}/session_recordings/{id}",
)
_POSTHOG_URLS = (
    "SELECT DISTINCT url FROM (SELECT arrayJoin(all_urls) AS url FROM raw_session_replay_events"
    " WHERE session_id = {session_id}) WHERE url != '' LIMIT 10000"
)
_ROUTES = {
    "posthog": _POSTHOG,
    "demo": _POSTHOG,  # the demo app answers as PostHog does
    "sentry": (r"replay:(?P<owner>[^/]+)/(?P<id>.+)", "/api/0/organizations/{owner}/replays/{id}/"),
    "openreplay": (r"session:(?P<owner>[^/]+)/(?P<id>.+)", "/v2/api/{owner}/sessions/{id}/replay"),
}


def adapter_for(settings: MetadataSettings) -> Adapter:
    """Return the configured tool's adapter."""
    pattern, path = _ROUTES[settings.adapter]
    return Adapter(settings.adapter, re.compile(pattern), path, settings)
