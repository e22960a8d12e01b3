"""Upstream faults (tests/faultkit.py): each answered as it should be, audited, logged as one
WARNING line and no ERROR, and no file descriptor left open. harden/check_faults.py runs
the same with 10,000 requests."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import RedisServer
from faultkit import FAULTS, FaultyUpstream, Tally, ask, closed_port_url, run_faults
from proxykit import running


async def test_400_faulted_requests_leave_nothing_behind(redis_server: RedisServer) -> None:
    figures = await run_faults(redis_server.url, 400, 16)
    assert figures.problems() == []
    assert {f: sorted(c) for f, c in figures.tally.statuses.items()} == {
        f: [status] for f, status in FAULTS.items()
    }
    assert figures.failures_sent == 300


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_each_fault_alone(redis_server: RedisServer, fault: str) -> None:
    async with (
        FaultyUpstream(slow=1.0).running() as up,
        running(closed_port_url() if fault == "refused" else up.url, redis_server.url,
                read_timeout=0.3) as (server, _, _),
        aiohttp.ClientSession() as session,
    ):  # fmt: skip
        tally = Tally()
        for n in range(2):  # JSON, then a page
            await ask(session, str(server.make_url("")).rstrip("/"), fault, n, tally)
    assert tally.wrong == []
    assert tally.statuses[fault][FAULTS[fault]] == 2
