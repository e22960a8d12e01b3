"""The JWT attack table, end to end: each forged token against a running jitgate.

jitgate runs in-process on a real socket, with a real redis-server, a real upstream and
two kinds of issuer: the local one (HS256 with `identity.hs_secret`) and a JWKS issuer
whose keys a real key server publishes (tests/jwtkit.py, RS256). An attacker's key server
offers its own keys and must never be contacted. Every attack is sent as a bearer token
to its own protected path (the recording id is the attack's name), so its audit record
can be found: each must be answered 401, reach nothing upstream, and leave an
`unauthenticated` record whose reasons carry the attack's reason and whose `reason_code`
is the attack's code, the same code as the JSON refusal's, whose WWW-Authenticate says
`invalid_token`. A control token of the
same issuer, under a grant, gets 200 first. Then a burst of made-up kids: every one is
refused while the key server sees at most one more JWKS fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import AUDIENCE, ISSUER, SECRET, RedisServer, make_token, write_config
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwtkit import KeyServer, b64, from_now, key_server, public_jwk, unsigned

from proxy import settings as settings_mod
from proxy.app import build_app
from proxy.state import STATE

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # the JWKS issuer's
ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWKS_AUD = "jitgate-jwks"
KID = "issuer-1"
REFETCH = 1.0  # identity.jwks_min_refetch_interval, seconds
INVALID_TOKEN = 'Bearer realm="jitgate", error="invalid_token"'  # RFC 6750 section 3.1


@dataclass
class Ctx:
    issuer: KeyServer  # the trusted JWKS issuer
    attacker: KeyServer  # must never be contacted
    pem: bytes  # the issuer's public key, which anyone can fetch

    def claims(self, **over: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.issuer.url, "aud": JWKS_AUD, "sub": "mallory", "iat": now}
        claims.update(exp=now + 300)
        claims.update(over)
        return {k: v for k, v in claims.items() if v is not None}

    def local_claims(self, **over: Any) -> dict[str, Any]:
        return self.claims(iss=ISSUER, aud=AUDIENCE, **over)


def by_attacker(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """RS256 over any header, signed with the attacker's key (written by hand)."""
    head = unsigned({"alg": "RS256", **header}, claims)
    return f"{head}.{b64(ATTACKER_KEY.sign(head.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def hmac_signed(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    head = unsigned({"alg": "HS256", **header}, claims)
    return f"{head}.{b64(hmac.new(key, head.encode(), hashlib.sha256).digest())}"


def by_issuer(c: Ctx, **over: Any) -> str:
    """Signed with the trusted issuer's own key: only the claims are off."""
    return jwt.encode(c.claims(**over), KEY, "RS256", headers={"kid": KID})


def nested(c: Ctx, outer_alg: str) -> str:
    """A valid token of the issuer as the payload of another (`cty: JWT`)."""
    inner = by_issuer(c).encode()
    head = f"{b64(json.dumps({'alg': outer_alg, 'cty': 'JWT', 'kid': KID}).encode())}.{b64(inner)}"
    if outer_alg == "none":
        return head + "."
    return f"{head}.{b64(ATTACKER_KEY.sign(head.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


# (name, token builder, and the reason and reason code that the refusal and its audit
# record must give)
ATTACKS: list[tuple[str, Callable[[Ctx], str], str, str]] = [
    ("alg-none", lambda c: unsigned({"alg": "none", "kid": KID}, c.claims()) + ".",
     "algorithm none not allowed", "alg_none"),
    ("alg-none-local", lambda c: unsigned({"alg": "none"}, c.local_claims()) + ".",
     "token algorithm 'none' is not allowed", "alg_none"),
    ("alg-missing", lambda c: unsigned({"kid": KID}, c.claims()) + ".",
     "token names no algorithm", "alg_missing"),
    ("crit-extension", lambda c: by_attacker({"kid": KID, "crit": ["b64"], "b64": False},
                                             c.claims()),
     "critical header extensions not supported", "crit_unsupported"),
    ("alg-NoNe", lambda c: unsigned({"alg": "NoNe", "kid": KID}, c.claims()) + ".",
     "algorithm none not allowed", "alg_none"),
    ("hs256-keyed-with-rs-public-key", lambda c: hmac_signed({"kid": KID}, c.claims(), c.pem),
     "algorithm HS256 not allowed for issuer", "alg_not_allowed"),
    ("hs256-rs-key-as-local-issuer", lambda c: hmac_signed({}, c.local_claims(), c.pem),
     "token signature does not verify", "signature_invalid"),
    ("rs256-attacker-key-real-kid", lambda c: by_attacker({"kid": KID}, c.claims()),
     "signature does not verify", "signature_invalid"),
    ("kid-path", lambda c: by_attacker({"kid": "../../../../etc/passwd"}, c.claims()),
     "kid is not a plain key id", "kid_invalid"),
    ("kid-dev-null", lambda c: by_attacker({"kid": "/dev/null"}, c.claims()),
     "kid is not a plain key id", "kid_invalid"),
    ("kid-sql", lambda c: by_attacker({"kid": "x' UNION SELECT 'key'--"}, c.claims()),
     "kid is not a plain key id", "kid_invalid"),
    ("kid-sql-or", lambda c: by_attacker({"kid": "1' OR '1'='1"}, c.claims()),
     "kid is not a plain key id", "kid_invalid"),
    ("kid-not-a-string", lambda c: by_attacker({"kid": {"$ne": None}}, c.claims()),
     "kid is not a string", "kid_invalid"),
    ("jku-ignored", lambda c: by_attacker(
        {"kid": "attacker-1", "jku": c.attacker.jwks_uri}, c.claims()),
     "unknown kid 'attacker-1'", "kid_unknown"),
    ("x5u-ignored", lambda c: by_attacker(
        {"kid": KID, "x5u": f"{c.attacker.url}/cert.pem"}, c.claims()),
     "signature does not verify", "signature_invalid"),
    ("jwk-embedded-ignored", lambda c: by_attacker(
        {"kid": KID, "jwk": public_jwk(ATTACKER_KEY, KID)}, c.claims()),
     "signature does not verify", "signature_invalid"),
    ("expired", lambda c: by_issuer(c, **from_now(iat=-900, exp=-600)),
     "token expired", "token_expired"),
    ("nbf-in-the-future", lambda c: by_issuer(c, **from_now(nbf=600)),
     "not yet valid (nbf)", "token_not_yet_valid"),
    ("wrong-iss", lambda c: by_attacker({"kid": KID}, c.claims(iss="https://evil.example")),
     "unknown issuer https://evil.example", "issuer_unknown"),
    ("wrong-aud", lambda c: by_issuer(c, aud="someone-else"),
     "audience not accepted", "audience_invalid"),
    ("local-aud-for-jwks-issuer", lambda c: by_issuer(c, aud=AUDIENCE),
     "audience not accepted", "audience_invalid"),
    ("wrong-aud-local", lambda c: make_token("mallory", aud="someone-else"),
     "token audience not accepted", "audience_invalid"),
    ("expired-local", lambda c: make_token("mallory", **from_now(exp=-600)),
     "token expired", "token_expired"),
    # Over identity.max_token_bytes (4096 here), under the 8 KB header line limit.
    ("huge-token", lambda c: by_issuer(c, pad="x" * 3500), "token too large", "token_too_large"),
    ("nested-jwt-in-none", lambda c: nested(c, "none"), "malformed token", "token_malformed"),
    ("nested-jwt-signed", lambda c: nested(c, "RS256"), "malformed token", "token_malformed"),
    ("jwe-shaped", lambda c: "e30.e30.e30.e30.e30", "malformed token", "token_malformed"),
]  # fmt: skip


def recording_path(name: str) -> str:
    return f"/api/projects/1/session_recordings/{name}/snapshots"


@dataclass
class Outcome:
    name: str
    status: int
    reasons: list[str] = field(default_factory=list)  # from the audit record
    expected: str = ""
    code: str | None = None  # the audit record's reason_code
    expected_code: str = ""
    answered_code: str | None = None  # the refusal's own reason_code
    challenge: str = ""  # the refusal's WWW-Authenticate

    @property
    def ok(self) -> bool:
        return (
            self.status == 401
            and any(self.expected in r for r in self.reasons)
            and self.code == self.answered_code == self.expected_code
            and self.challenge == INVALID_TOKEN
        )


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    control: int = 0  # the genuine token's status under a grant
    upstream_hits: int = 0  # requests that reached the upstream (only the control's)
    attacker_requests: int = 0
    burst: int = 0  # made-up kids sent at once
    burst_refused: int = 0
    burst_fetches: int = 0  # JWKS fetches the key server saw during the burst

    @property
    def failures(self) -> list[str]:
        out = [
            f"{o.name}: status {o.status}, audit reasons {o.reasons} and code {o.code!r}, "
            f"answered code {o.answered_code!r} and {o.challenge!r}; "
            f"wanted 401, {o.expected!r}, {o.expected_code!r}"
            for o in self.outcomes
            if not o.ok
        ]
        if self.control != 200:
            out.append(f"the control token got {self.control}, not 200")
        if self.upstream_hits != 1:
            out.append(f"{self.upstream_hits} requests reached the upstream, not only the control")
        if self.attacker_requests:
            out.append(f"the attacker's key server was asked {self.attacker_requests} times")
        if self.burst_refused != self.burst or self.burst_fetches > 1 or not self.burst:
            out.append(
                f"burst: {self.burst_refused} of {self.burst} refused, "
                f"{self.burst_fetches} JWKS fetches (at most 1)"
            )
        return out

    def line(self) -> str:
        good = sum(o.ok for o in self.outcomes)
        return (
            f"{good} of {len(self.outcomes)} attacks refused 401 with reason and code audited, "
            f"control {self.control}, {self.burst_refused} of {self.burst} random kids refused "
            f"with {self.burst_fetches} JWKS fetch(es), attacker contacted "
            f"{self.attacker_requests} times"
        )


def _config(issuer: KeyServer) -> str:
    return f"""
identity:
  algorithms: [HS256]
  hs_secret: {SECRET}
  issuer: {ISSUER}
  audience: {AUDIENCE}
  max_token_bytes: 4096
  jwks_min_refetch_interval: {REFETCH}
  issuers:
    - issuer: "{issuer.url}"
      audience: {JWKS_AUD}
      algorithms: [RS256]
      jwks_uri: "{issuer.jwks_uri}"
"""


@contextlib.asynccontextmanager
async def counting_upstream() -> AsyncIterator[tuple[str, list[str]]]:
    hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(request.raw_path)
        return web.Response(text="recording")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), hits
    finally:
        await server.close()


def audit_reasons(path: Path) -> dict[str, tuple[list[str], str | None]]:
    """The reasons and reason code of each `unauthenticated` decision in an audit file, by
    path."""
    out: dict[str, tuple[list[str], str | None]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("decision") == "unauthenticated":
            out[record["path"]] = (record.get("reasons", []), record.get("reason_code"))
    return out


async def run(redis_url: str, *, burst: int = 200) -> Report:
    """Send every attack and the burst to a fresh jitgate; return what happened."""
    report = Report()
    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    async with (
        key_server() as issuer,
        key_server() as attacker,
        counting_upstream() as (upstream_url, hits),
    ):
        issuer.add_key(KID, KEY)
        attacker.add_key("attacker-1", ATTACKER_KEY)
        ctx = Ctx(issuer, attacker, pem)
        tmp = Path(tempfile.mkdtemp(prefix="jitgate-jwt-"))
        cfg = write_config(
            tmp, upstream_url=upstream_url, redis_url=redis_url, extra=_config(issuer)
        )
        server = TestServer(build_app(settings_mod.load(cfg, environ={})), host="127.0.0.1")
        await server.start_server()
        started = time.monotonic()
        try:
            grants = server.app[STATE].grants
            async with aiohttp.ClientSession(str(server.make_url(""))) as http:

                async def answer(path: str, token: str) -> tuple[int, str | None, str]:
                    """The status, a JSON refusal's reason code, and WWW-Authenticate."""
                    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
                    async with http.get(path, headers=headers) as r:
                        body = await r.read()
                    challenge = r.headers.get("WWW-Authenticate", "")
                    if r.content_type != "application/json":
                        return r.status, None, challenge
                    return r.status, json.loads(body).get("reason_code"), challenge

                async def status(path: str, token: str) -> int:
                    return (await answer(path, token))[0]

                await grants.add("mallory", "project:1", 300, "harden", "jwtattack")
                report.control = await status(recording_path("control"), by_issuer(ctx))
                answers = {}
                for name, build, _, _ in ATTACKS:
                    answers[name] = await answer(recording_path(name), build(ctx))
                # A burst of well-formed, made-up kids, all at once, once a refetch is
                # allowed again: one fetch answers them all.
                await asyncio.sleep(max(0.0, started + REFETCH * 1.2 - time.monotonic()))
                fetches = issuer.requests.count("/jwks")
                kids = [secrets.token_urlsafe(12) for _ in range(burst)]
                tokens = [by_attacker({"kid": k}, ctx.claims()) for k in kids]
                results = await asyncio.gather(
                    *(status(recording_path("burst"), t) for t in tokens)
                )
                report.burst = burst
                report.burst_refused = sum(s == 401 for s in results)
                report.burst_fetches = issuer.requests.count("/jwks") - fetches
        finally:
            await server.close()  # flushes the audit file
        reasons = audit_reasons(tmp / "audit.jsonl")
        for name, _, expected, code in ATTACKS:
            got, got_code = reasons.get(recording_path(name), ([], None))
            status, answered, challenge = answers[name]
            outcome = Outcome(name, status, got, expected, got_code, code, answered, challenge)
            report.outcomes.append(outcome)
        report.upstream_hits = len(hits)
        report.attacker_requests = len(attacker.requests)
    return report


async def run_with_own_redis(*, burst: int = 200) -> Report:
    redis = RedisServer()
    redis.start()
    try:
        return await run(redis.url, burst=burst)
    finally:
        redis.close()
