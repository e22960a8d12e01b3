"""Forward-auth: decide a request that nginx, Traefik or Envoy forwards itself.

`{prefix}/authz` answers nginx's `auth_request`, Traefik's `forwardAuth` and Envoy's HTTP
`ext_authz` with the decision the gate would make for the same request: the caller is
identified once from the headers the proxy passes on, the path goes through the same
`paths.normalise`, the same `Authorizer.decide` decides, and the same audit record is
written (with `mode: forward_auth`).

The original request is named, only by a peer in `forward_auth.trusted_proxies`, by
- `X-Original-Method` and `X-Original-URI` (nginx),
- `X-Forwarded-Method` and `X-Forwarded-Uri` (Traefik),
- or the request's own method and the target after `{prefix}/authz` (Envoy, whose
  `http_service.path_prefix` is `{prefix}/authz`).
Where several are given they must agree.

One path: these proxies forward the URI as the client sent it, so the decision is made on
that raw URI, and a URI whose path `paths.normalise` would change (dot segments, `//`,
encoded unreserved characters, lower-case escapes) is refused with 400, like anything
`normalise` refuses (encoded `/`, `\\`, `#`, NUL, ...). The path decided on is then byte
for byte the path the upstream receives.

Answers: 200 with the identity headers to set upstream (`vouch.py`; each name it may set,
empty when there is nothing to vouch for); 401, 403 or 503 with the refusal as JSON, in
the body and in `X-Jitgate-Refusal` (nginx keeps no body of an auth response), and for a
browser a `Location` to sign in (401) or to ask for access (403), as a 302 when the proxy
asks for one (`REDIRECT_HEADER`); 400 for a request it cannot decide. Never 2xx when in
doubt.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from dataclasses import replace
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import audit
from .accesslog import AccessLog, underscore_header
from .authorize import Decision
from .errors import BadPath
from .hygiene import TrustedPeers, wants_html
from .metrics import Metrics
from .paths import normalise, split_target
from .settings import Settings
from .state import State
from .vouch import Vouch

# Who names the original request: (method header, URI header) per proxy.
SOURCES = (
    ("X-Original-Method", "X-Original-URI"),  # nginx auth_request
    ("X-Forwarded-Method", "X-Forwarded-Uri"),  # Traefik forwardAuth
)
REFUSAL_HEADER = "X-Jitgate-Refusal"
# `X-Jitgate-Browser: redirect` (Envoy) or `{prefix}/authz?browser=redirect` (Traefik): a
# browser's refusal is a 302 to sign in or to ask for access, for proxies that relay it.
REDIRECT_HEADER = "X-Jitgate-Browser"
_METHOD = re.compile(r"[A-Z]{1,20}")
_MAX_URI = 8192


class BadAuthzRequest(Exception):
    """The forward-auth request does not name one original request that can be decided."""


class ForwardAuth:
    """The handler of `{prefix}/authz` and `{prefix}/authz/{original target}`."""

    def __init__(
        self,
        settings: Settings,
        *,
        state: State,
        audit_log: audit.AuditLog,
        metrics: Metrics,
        vouch: Vouch,
    ) -> None:
        self.state = state
        self.vouch = vouch
        self.prefix = settings.prefix
        self.base = f"{settings.prefix}/authz"
        self.trusted = TrustedPeers(settings.forward_auth.trusted_proxies)
        self.reject_underscores = settings.forward.reject_underscore_headers
        self.reject_semicolons = settings.forward.reject_semicolons
        self.strict = settings.audit.strict
        self.oidc = settings.identity.oidc is not None
        self.log = AccessLog(audit_log, metrics.authz, state, mode="forward_auth")

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        if not self.trusts(request.remote):
            reason = (
                f"forward-auth: peer {request.remote or 'unknown'} is not in "
                "forward_auth.trusted_proxies; only those proxies may name the request "
                "to decide"
            )
            self.log.refused(
                request, reason, started, status=403, outcome="deny", route="_untrusted"
            )
            return _answer(403, {"error": "untrusted_proxy", "reasons": [reason]})
        client_ip = self._client_ip(request)
        if self.reject_underscores:
            odd = underscore_header(request)
            if odd is not None:
                return self._bad(request, odd, started, None, None, client_ip)
        try:
            method, target = self._original(request)
        except BadAuthzRequest as exc:
            return self._bad(request, str(exc), started, None, None, client_ip)
        try:
            raw_path, query = split_target(target)
            path = normalise(raw_path, reject_semicolons=self.reject_semicolons)
        except BadPath as exc:
            return self._bad(request, str(exc), started, method, target, client_ip)
        if path != raw_path:
            # The proxy forwards raw_path as it is: deciding on `path` would decide on a
            # path the upstream may read differently.
            reason = (
                f"the path is not in canonical form ({path} once normalised); forward-auth "
                "decides only on a path the upstream receives as decided"
            )
            return self._bad(request, reason, started, method, target, client_ip)
        low = path.lower()
        if low == self.prefix.lower() or low.startswith(self.prefix.lower() + "/"):
            reason = f"paths under {self.prefix} belong to jitgate and are never decided here"
            return self._bad(request, reason, started, method, target, client_ip)

        state = self.state
        decision = await state.config.authorizer.decide(
            method, path, lambda: state.identify(request), query
        )
        if decision.allow and decision.scope is not None and self.strict:
            decision = self.log.strict(decision)
        if decision.allow and decision.blobs is not None:
            # Its answer would carry presigned URLs that only the proxy can rewrite.
            reason = (
                f"route {decision.route!r} hands out presigned URLs (blobs:), which "
                "forward-auth cannot rewrite: serve it through jitgate's proxy"
            )
            decision = replace(
                decision, allow=False, status=403, outcome="blocked", reasons=(reason,)
            )
        if decision.allow:
            response = web.Response(status=200, headers=_NO_STORE)
            vouched = self.vouch.headers(decision) or {}
            for name in self.vouch.names:
                # Every name, empty if need be: Traefik and Envoy replace the client's copy
                # of a header only with one this answer carries.
                response.headers[name] = vouched.get(name, "")
        else:
            response = self._refusal(request, decision, method, target)
        if decision.allow and state.metadata is not None:
            state.metadata.prefetch(decision.scope)  # whose recording, for the record
        self.log.decision(
            request,
            decision,
            path,
            response.status,
            0,
            None,
            started,
            method=method,
            client_ip=client_ip,
            subject=await self.log.subject(decision),
        )
        return response

    def trusts(self, peer: str | None) -> bool:
        """Whether `peer` (the TCP peer) is a proxy allowed to name a request to decide."""
        return peer in self.trusted

    def _original(self, request: web.Request) -> tuple[str, str]:
        """Return the original (method, raw target) the proxy asks about."""
        raw = request.raw_path
        if not raw.startswith(self.base):
            # Routed here from a spelling such as /_jit/%61uthz: the target is unclear.
            raise BadAuthzRequest(f"spell the forward-auth path as {self.base}")
        rest = raw[len(self.base) :]
        methods, uris = [], []
        if rest.startswith("/"):  # Envoy: path_prefix + the original target
            methods.append(("the request's method", request.method))
            uris.append((f"the path after {self.base}", rest))
        elif rest and not rest.startswith("?"):
            raise BadAuthzRequest(f"no such forward-auth path; use {self.base}")
        headers = request.headers
        for method_name, uri_name in SOURCES:
            for name, into in ((method_name, methods), (uri_name, uris)):
                values = headers.getall(name, ())
                if len(values) > 1:
                    raise BadAuthzRequest(f"{name} is given {len(values)} times")
                if values:
                    into.append((name, values[0]))
        if not uris:
            raise BadAuthzRequest(
                "no original request: send X-Original-URI and X-Original-Method (nginx), "
                f"X-Forwarded-Uri and X-Forwarded-Method (Traefik), or the target after "
                f"{self.base} (Envoy)"
            )
        if not methods:
            raise BadAuthzRequest(f"{uris[0][0]} is given without the original method")
        for kind, found in (("method", methods), ("URI", uris)):
            if len({v for _, v in found}) > 1:
                named = ", ".join(n for n, _ in found)
                raise BadAuthzRequest(f"the original {kind} is named differently by {named}")
        method, target = methods[0][1], uris[0][1]
        if not _METHOD.fullmatch(method):
            raise BadAuthzRequest(f"{method[:32]!r} is not an HTTP method")
        if len(target) > _MAX_URI:
            raise BadAuthzRequest(f"the original URI is longer than {_MAX_URI} characters")
        if not target.isascii() or not target.isprintable():
            raise BadAuthzRequest("the original URI has characters outside printable ASCII")
        return method, target

    def _client_ip(self, request: web.Request) -> str | None:
        """The client the trusted proxy names: the last X-Forwarded-For entry, if an address."""
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded:
            last = forwarded.rsplit(",", 1)[-1].strip()
            try:
                return str(ipaddress.ip_address(last))
            except ValueError:
                pass
        return request.remote

    def _refusal(
        self, request: web.Request, decision: Decision, method: str, target: str
    ) -> web.Response:
        payload = decision.refusal()
        location = None
        if decision.status == 401:
            login = f"{self.prefix}/oidc/login" if self.oidc else f"{self.prefix}/login"
            payload["login_url"] = location = str(URL(login).with_query(next=target))
        elif decision.status == 403 and decision.outcome == "deny" and decision.scope:
            ask = URL(f"{self.prefix}/request").with_query(scope=decision.scope, next=target)
            payload["request_url"] = location = str(ask)
        headers = CIMultiDict(_NO_STORE)
        if decision.status == 401:
            headers["WWW-Authenticate"] = decision.challenge
        # Only a browser's page load is sent on: a script gets the status and the JSON.
        status = decision.status
        if location and method in ("GET", "HEAD") and wants_html(request):
            headers["Location"] = location
            if self._redirects(request):
                status = 302  # Traefik and Envoy relay it; nginx redirects a 401 or 403 itself
        return _answer(status, payload, headers)

    def _redirects(self, request: web.Request) -> bool:
        """Whether the proxy asked for a 302 rather than a 401/403 with a Location."""
        if request.headers.get(REDIRECT_HEADER, "").lower() == "redirect":
            return True
        return request.raw_path[len(self.base) :].startswith("?") and (
            request.query.get("browser") == "redirect"
        )

    def _bad(
        self,
        request: web.Request,
        reason: str,
        started: float,
        method: str | None,
        target: str | None,
        client_ip: str | None,
    ) -> web.Response:
        self.log.refused(
            request,
            reason,
            started,
            method=method,
            path=target if target is not None else request.raw_path,
            client_ip=client_ip,
        )
        return _answer(400, {"error": "bad_request", "reasons": [reason]})


_NO_STORE = {"Cache-Control": "no-store"}


def _answer(
    status: int, payload: dict[str, Any], headers: CIMultiDict[str] | None = None
) -> web.Response:
    """A refusal: JSON in the body, and the same JSON (ASCII) in X-Jitgate-Refusal."""
    text = json.dumps(payload, separators=(",", ":"))
    out = CIMultiDict(headers or _NO_STORE)
    out[REFUSAL_HEADER] = text
    return web.Response(status=status, text=text, content_type="application/json", headers=out)
