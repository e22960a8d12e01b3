"""Path tricks sent as raw bytes: no protected upstream path is reached without a grant."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp.test_utils import TestClient
from conftest import Upstream, make_token

from proxy.state import STATE

TOKEN = make_token("alice")


async def raw_request(client: TestClient, target: str) -> tuple[int, str]:
    """Send a request line exactly as given, bypassing any client-side URL cleaning."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: {client.host}:{client.port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode("latin-1")
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    head = data.split(b"\r\n", 1)[0].decode()
    return int(head.split()[1]), data.decode("latin-1")


TRICKS = [
    # (raw target, expected status without a grant)
    ("/api/projects/1/session_recordings/demo-1%2fsnapshots", 400),  # encoded slash
    ("/api/projects/1/session_recordings%2Fdemo-1", 400),
    ("/api/projects/1/session_recordings/demo-1%5csnapshots", 400),  # encoded backslash
    ("/api/projects/1/session_recordings/demo-1\\snapshots", 400),  # raw backslash
    ("/api/projects/1/session_recordings/demo-1%00/snapshots", 400),  # NUL
    ("/api/projects/1/session_recordings/demo-1%23/snapshots", 400),  # encoded '#'
    ("/api/projects/1/session_recordings/demo-1#frag", 400),  # fragment
    ("/api/projects/1/session_recordings/demo-1;jsessionid=1/snapshots", 400),  # ; params
    ("/api/projects/1/session_recordings;x=1/demo-1", 400),
    ("/api;/projects/1/session_recordings/demo-1", 400),
    ("/api/projects/1/session_recordings/demo-1%3bx", 400),
    ("/api/projects/1/session_recordings/%252e%252e/demo-1", 400),  # double encoding
    ("/api/projects/1/session_recordings/demo-1%0d%0aX: y", 400),
    ("http://evil.example/api/projects/1/session_recordings/demo-1", 400),  # absolute form
    # Escapes that are not UTF-8: servers replace, re-escape or pass them, so two
    # recording ids could meet as one upstream (found by tests/test_pathfuzz.py).
    ("/api/projects/1/session_recordings/%C0%AEdemo-1", 400),  # overlong '.'
    ("/api/projects/1/session_recordings/demo-1/%C0%AF..%C0%AF", 400),  # overlong '/'
    ("/replay/%DAdemo-1", 400),  # a lead byte without its continuation
    ("/api/projects/1%FE/session_recordings/demo-1", 400),  # never UTF-8
    ("/api/projects/1/session_recordings/demo%ED%A0%80-1", 400),  # a surrogate
    ("/api/projects/1/session_recordings/demo%F4%90%80%80-1", 400),  # past U+10FFFF
    ("/api/projects/1/x/../session_recordings/demo-1/snapshots", 403),  # dot segments
    ("/api/projects/1/x/%2e%2e/session_recordings/demo-1/snapshots", 403),
    ("/api/projects/1/x/%2E%2e/session_recordings/demo-1", 403),
    ("/api/projects/1/session_recordings/demo-1/.", 403),
    ("/./api/projects/1/session_recordings/demo-1", 403),
    ("/../api/projects/1/session_recordings/demo-1", 403),
    ("//api//projects/1//session_recordings/demo-1", 403),  # empty segments
    ("/api/projects/1/session_recordings//demo-1/snapshots", 403),
    ("/API/Projects/1/Session_Recordings/demo-1", 403),  # mixed case
    ("/%61pi/projects/1/session_recordings/demo-1", 403),  # encoded unreserved
    ("/api/projects/1/session_recordings/%64emo-1/snapshots", 403),
    ("/api/projects/1/session_recordings/demo-1/snapshots?x=/../../replay", 403),  # query
    ("/api/projects/1/session_recordings/demo-1/", 403),  # trailing slash
]


def tricks_on(project: str, collection: str, recording: str) -> list[tuple[str, int]]:
    """The corpus moved onto another tool's recording route: `projects/1/` becomes
    `project`, `session_recordings` becomes `collection` and `demo-1` becomes `recording`."""
    out = []
    for target, status in TRICKS:
        moved = re.sub("(?i)projects/1/+", project, target)
        moved = re.sub("(?i)session_recordings", collection, moved).replace("demo-1", recording)
        out.append((moved, status))
    return out


@pytest.mark.parametrize(("target", "status"), TRICKS, ids=[t for t, _ in TRICKS])
async def test_trick_never_reaches_upstream(
    proxy: TestClient, upstream: Upstream, target: str, status: int
) -> None:
    got, _ = await raw_request(proxy, target)
    assert got == status
    assert upstream.hits == []


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (
            "/api/projects/1/x/%2e%2E/session_recordings/%64emo-1//snapshots?a=%2F",
            "/api/projects/1/session_recordings/demo-1/snapshots?a=%2F",
        ),
        ("/API/projects/1/session_recordings/demo-1", "/API/projects/1/session_recordings/demo-1"),
        (
            "/api/projects/1/session_recordings/demo-1/snapshots/%c3%a9",
            "/api/projects/1/session_recordings/demo-1/snapshots/%C3%A9",
        ),
    ],
)
async def test_the_decided_path_is_the_forwarded_path(
    proxy: TestClient, upstream: Upstream, target: str, forwarded: str
) -> None:
    await proxy.app[STATE].grants.add("alice", "recording:1/demo-1", 60, "test", "pytest")
    got, _ = await raw_request(proxy, target)
    assert got == 200
    assert upstream.paths() == [forwarded]


async def test_case_variant_parameter_is_a_different_scope(
    proxy: TestClient, upstream: Upstream
) -> None:
    await proxy.app[STATE].grants.add("alice", "recording:1/demo-1", 60, "test", "pytest")
    got, _ = await raw_request(proxy, "/api/projects/1/session_recordings/DEMO-1")
    assert got == 403
    assert upstream.hits == []
