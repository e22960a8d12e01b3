"""A small client for jitgate's JSON API, used by the `jitgate grants` commands."""

from __future__ import annotations

from typing import Any

import aiohttp


class ApiError(Exception):
    """The API refused the call (status, code and message from its JSON error)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status = status
        self.code = code


class ApiClient:
    def __init__(self, base_url: str, token: str, *, timeout: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call one endpoint below /api and return its JSON, or raise ApiError."""
        url = f"{self.base_url}/api{path}"
        async with self._session.request(method, url, json=body) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                text = (await resp.text())[:200]
                raise ApiError(resp.status, "bad_response", f"not JSON: {text!r}") from None
            if resp.status >= 400:
                if isinstance(data, dict):
                    code, message = str(data.get("error")), str(data.get("message"))
                else:
                    code, message = "error", str(data)
                raise ApiError(resp.status, code, message)
            return data
