"""What jitgate vouches for upstream, and the client headers that could pass for it.

The gate sends every forwarded request through `hygiene` (the maintained list of identity
and routing headers, `forward.drop_headers` and `drop_headers`, the names jitgate reads or
sets for identity; hygiene.py), strips `drop_cookies`, then adds `headers(decision)`;
forward-auth hands `headers(decision)` to the proxy in front, which sets them on the
request it forwards (and clears the client's copies itself).
"""

from __future__ import annotations

from .authorize import Decision
from .hygiene import Hygiene, header_key
from .identity.assertion import AssertionSigner
from .settings import ForwardSettings
from .settings.identity import IdentitySettings

USER_HEADERS = ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups")


class Vouch:
    def __init__(
        self,
        forward: ForwardSettings,
        identity: IdentitySettings,
        assertion: AssertionSigner | None = None,
    ) -> None:
        self.assertion = assertion
        self.user_headers = forward.user_headers
        # The names `headers` may set: forward-auth always answers each of them (empty when
        # there is nothing to vouch for), so a proxy that copies them replaces a client's.
        self.names = ((forward.assertion.header,) if forward.assertion is not None else ()) + (
            USER_HEADERS if forward.user_headers else ()
        )
        # Every header jitgate reads or sets for identity: a client's copy never goes up.
        names = set(forward.identity_headers)
        trusted = identity.trusted_headers
        if trusted is not None:
            names.update(trusted.names())
        if forward.assertion is not None:
            names.add(forward.assertion.header)
        if forward.user_headers:
            names.update(USER_HEADERS)
        if not forward.pass_authorization:
            names.add("authorization")
        # Compared as the forwarder compares them: lower case, "_" read as "-".
        self.drop_headers = frozenset(header_key(n) for n in names)
        # Compiled once: the one set and prefix list every forwarded request is checked by.
        self.hygiene = Hygiene.build(
            forward.drop_headers,
            also_exact=self.drop_headers,
            trusted_proxies=forward.trusted_proxies,
            preserve_host=forward.preserve_host,
            allowed_hosts=forward.allowed_hosts,
        )
        cookie = identity.cookie
        drop: set[str] = set()
        if cookie is not None and not forward.pass_identity_cookie:
            drop.add(cookie)
        if identity.session is not None:
            # The session is jitgate's alone: never the upstream's, whatever pass_* says.
            drop.add(identity.session.cookie)
        self.drop_cookies = frozenset(drop)

    def headers(self, decision: Decision) -> dict[str, str] | None:
        """The identity jitgate vouches for upstream: its assertion, plain headers if asked."""
        ident = decision.identity
        if ident is None:
            return None
        out: dict[str, str] = {}
        if self.assertion is not None:
            out[self.assertion.header] = self.assertion.sign(ident)
        if self.user_headers:
            out["X-Forwarded-User"] = ident.subject
            if ident.email:
                out["X-Forwarded-Email"] = ident.email
            if ident.groups:
                out["X-Forwarded-Groups"] = ",".join(ident.groups)
        return out or None
