"""Yardstick: the just-in-time check a short script would make, in front of the upstream.

    python bench/naive.py --port 8083 --upstream http://127.0.0.1:8081 --redis-port 6379

Per request: decode an HS256 JWT, one Redis EXISTS on the user's grant key, one XADD of
an audit record, two prometheus updates; then forward exactly as bench/passthrough.py
does. No spool, no HMAC chain, no policy, no fail-closed handling: it is only a yardstick
for what jitgate's full enforcement must beat.
"""

from __future__ import annotations

import argparse
import json
import time

import jwt
import passthrough  # bench/ is the script's directory, so first on sys.path
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.asyncio import Redis

SECRET = web.AppKey("secret", str)
REDIS = web.AppKey("redis", Redis)
GRANT_KEY = "naive:grant:{user}:{scope}"
SCOPE = "recording:1/demo-1"
REGISTRY = CollectorRegistry()
REQUESTS = Counter("naive_requests", "requests", registry=REGISTRY)
LATENCY = Histogram("naive_seconds", "latency", registry=REGISTRY)


async def check(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    token = request.headers.get("Authorization", "").removeprefix("Bearer ")
    try:
        claims = jwt.decode(token, request.app[SECRET], algorithms=["HS256"], audience="jitgate")
    except jwt.PyJWTError:
        return web.Response(status=401, text="naive: bad token\n")
    user = str(claims["sub"])
    redis = request.app[REDIS]
    if not await redis.exists(GRANT_KEY.format(user=user, scope=SCOPE)):
        return web.Response(status=403, text="naive: no grant\n")
    response = await passthrough.proxy(request)
    record = {"user": user, "path": request.path, "status": response.status, "ts": time.time()}
    await redis.xadd("naive:audit", {"record": json.dumps(record)}, maxlen=200_000)
    REQUESTS.inc()
    LATENCY.observe(time.perf_counter() - started)
    return response


def build_app(upstream: str, redis_port: int, secret: str) -> web.Application:
    app = passthrough.build_app(upstream, check)
    app[SECRET] = secret
    app[REDIS] = Redis(host="127.0.0.1", port=redis_port)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    app = build_app(args.upstream, args.redis_port, args.secret)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
