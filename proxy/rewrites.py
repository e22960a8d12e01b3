"""Several response rewrites on one response, applied in turn on the body held once.

A request can have more than one (the status bar on a page, a list or references to
check in JSON, presigned URLs to re-sign): the gate hands the forwarder one `Rewrites`,
which holds the body for those that want the response and applies them in the order given.
"""

from __future__ import annotations

from multidict import CIMultiDict, MultiMapping

from .forward import AsyncBodyRewrite, BodyRewrite, apply_rewrite


class Rewrites:
    """An AsyncBodyRewrite made of others (forward.py's protocols)."""

    def __init__(self, *parts: BodyRewrite | AsyncBodyRewrite | None) -> None:
        self.parts = [p for p in parts if p is not None]
        self.wanted: list[BodyRewrite | AsyncBodyRewrite] = []

    @classmethod
    def of(
        cls, *parts: BodyRewrite | AsyncBodyRewrite | None
    ) -> BodyRewrite | AsyncBodyRewrite | None:
        """None for no rewrite, the one rewrite as it is, or a Rewrites of several."""
        present = [p for p in parts if p is not None]
        return None if not present else present[0] if len(present) == 1 else cls(*present)

    @property
    def limit(self) -> int:
        return min((p.limit for p in self.wanted), default=0)

    def wants(self, status: int, headers: MultiMapping[str]) -> bool:
        self.wanted = [p for p in self.parts if p.wants(status, headers)]
        return bool(self.wanted)

    async def rewrite(
        self, headers: CIMultiDict[str], body: bytes
    ) -> tuple[CIMultiDict[str], bytes] | None:
        changed = False
        for part in self.wanted:
            out = await apply_rewrite(part, headers, body)
            if out is not None:
                (headers, body), changed = out, True
        return (headers, body) if changed else None

    def fell_back(self, why: str) -> None:
        for part in self.wanted:
            if isinstance(part, AsyncBodyRewrite):
                part.fell_back(why)
