"""Who is asking: tokens, SSO headers and assertions, browser sessions and sign-in.

- `verifier`: `Verifier.identify` turns a request's credentials into an `Identity`.
- `caller`: `identify(request, ...)`, once per request, cached on it as a `Caller`.
- `jwks`: key sets of OpenID providers (discovery, rate-limited refetch).
- `claims`: claim paths and group aliases.
- `session`: encrypted browser sessions (cookie or Redis store).
- `oidc`: the browser sign-in (authorization code with PKCE).
- `assertion`: the signed identity assertion jitgate sends upstream.

It reads only its settings: it imports neither policy, grants nor audit.
"""

from .caller import NOBODY, Caller, identify
from .verifier import Identity, IdentityError, MintError, SessionLookup, Verifier, mint

__all__ = [
    "NOBODY",
    "Caller",
    "Identity",
    "IdentityError",
    "MintError",
    "SessionLookup",
    "Verifier",
    "identify",
    "mint",
]
