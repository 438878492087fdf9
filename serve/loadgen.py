"""Bounded HTTP load generation for the style server (loopback only): request streams, a
fixed-concurrency async client, latency statistics. Used by benchmarks/serve_*.py and tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional
from urllib.parse import urlparse

import numpy as np

PROMPT_WORDS = ("red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "ring", "cross")


def check_loopback(url: str) -> None:
    """Refuse any target that is not this machine: load and fault traffic stays on loopback."""
    host = urlparse(url).hostname or ""
    try:  # an address, never a name that merely starts with "127." (127.example.com resolves wherever its DNS says)
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"load target {url!r} is not a loopback address (127.0.0.0/8, localhost, ::1)")


@dataclass
class Call:
    """One HTTP call to make: method, path, JSON body (or raw bytes), headers, and whether it is valid."""

    path: str
    body: Optional[dict] = None
    raw: Optional[bytes] = None
    headers: dict = field(default_factory=dict)
    valid: bool = True
    kind: str = "valid"
    style: Optional[str] = None


def random_prompt(rng: random.Random) -> str:
    return f"a {rng.choice(PROMPT_WORDS[:4])} {rng.choice(PROMPT_WORDS[4:])}"


MALFORMED_KINDS = (
    "broken_json",
    "unknown_style",
    "negative_weights",
    "zero_weights",
    "size_not_multiple_of_8",
    "steps_too_many",
    "empty_prompt",
    "unknown_field",
    "wrong_type",
    "too_many_images",
)


def malformed_call(kind: str, rng: random.Random, base: dict) -> Call:
    body = dict(base)
    if kind == "broken_json":
        return Call("/generate", raw=b'{"prompt": "a red circle", "style": ', valid=False, kind=kind)
    if kind == "unknown_style":
        body["style"] = "no-such-style"
    elif kind == "negative_weights":
        body.pop("style", None)
        body["weights"] = [-1.0] + [1.0] * 2
    elif kind == "zero_weights":
        body.pop("style", None)
        body["weights"] = {}
    elif kind == "size_not_multiple_of_8":
        body["width"] = 33
    elif kind == "steps_too_many":
        body["steps"] = 10_000
    elif kind == "empty_prompt":
        body["prompt"] = "  "
    elif kind == "unknown_field":
        body["sampler"] = "euler"
    elif kind == "wrong_type":
        body["seed"] = "lucky"
    elif kind == "too_many_images":
        body["num_images"] = 1000
    return Call("/generate", body=body, valid=False, kind=kind)


def poisoned_call(styles: list[str], base: dict) -> Call:
    """Weights that each are finite but sum to infinity: once a 500 for a whole shared batch, now a 422."""
    body = {k: v for k, v in base.items() if k != "style"}
    body["weights"] = [1e308, 1e308] + [0.0] * (len(styles) - 2)
    return Call("/generate", body=body, valid=False, kind="poisoned")


def style_stream(
    styles: list[str],
    n: int,
    seed: int = 0,
    malformed_fraction: float = 0.0,
    steps: int = 2,
    size: int = 32,
    poisoned_fraction: float = 0.0,
) -> list[Call]:
    """`n` generate calls, each with a uniformly random style; every 1/fraction-th one malformed, and
    (at other positions) every 1/poisoned_fraction-th one poisoned (overflowing weights)."""
    rng = random.Random(seed)
    every = int(round(1 / malformed_fraction)) if malformed_fraction > 0 else 0
    every_p = int(round(1 / poisoned_fraction)) if poisoned_fraction > 0 else 0
    calls = []
    for i in range(n):
        style = rng.choice(styles)
        body = {"prompt": random_prompt(rng), "style": style, "seed": rng.randrange(2**31 - 2048), "steps": steps, "width": size, "height": size}
        if every and i % every == every - 1:
            calls.append(malformed_call(MALFORMED_KINDS[(i // every) % len(MALFORMED_KINDS)], rng, body))
        elif every_p and i % every_p == every_p // 2:
            calls.append(poisoned_call(styles, body))
        else:
            calls.append(Call("/generate", body=body, style=style))
    return calls


@dataclass
class Result:
    index: int
    call: Call
    status: int  # 0 = transport error
    latency_s: float
    started_s: float
    content_type: str = ""
    error: str = ""
    retry_after: Optional[str] = None


async def _post(client, i: int, call: "Call", t0: float) -> "Result":
    """One timed POST (raw bytes or JSON body) -> its Result; a transport error is status 0."""
    import httpx

    start = time.perf_counter()
    try:
        if call.raw is not None:
            r = await client.post(call.path, content=call.raw, headers={"Content-Type": "application/json", **call.headers})
        else:
            r = await client.post(call.path, json=call.body, headers=call.headers)
        res = Result(
            i,
            call,
            r.status_code,
            time.perf_counter() - start,
            start - t0,
            r.headers.get("content-type", ""),
            retry_after=r.headers.get("retry-after"),
        )
        if r.status_code >= 400:
            res.error = r.text[:300]
    except httpx.HTTPError as exc:
        res = Result(i, call, 0, time.perf_counter() - start, start - t0, error=repr(exc))
    return res


async def run_calls(
    base_url: str,
    calls: list[Call],
    concurrency: int,
    timeout_s: float = 120.0,
    on_progress: Optional[Callable[[int], None]] = None,
    transform: Optional[Callable[[Call], Call]] = None,
) -> list[Result]:
    """Send `calls` with at most `concurrency` in flight; bounded: each call once, with a timeout."""
    import httpx

    check_loopback(base_url)
    queue: asyncio.Queue = asyncio.Queue()
    for i, c in enumerate(calls):
        queue.put_nowait((i, c))
    results: list[Optional[Result]] = [None] * len(calls)
    t0 = time.perf_counter()
    done = 0

    async def worker(client):
        nonlocal done
        while True:
            try:
                i, call = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if transform is not None:
                call = transform(call)
            results[i] = await _post(client, i, call, t0)
            done += 1
            if on_progress is not None:
                on_progress(done)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results  # type: ignore[return-value]


async def run_open_loop(base_url: str, calls: list[Call], rate_rps: float, timeout_s: float = 120.0) -> list[Result]:
    """Open loop: start call k at k / rate_rps seconds whatever the answers (a closed loop would slow
    down with the server and never overload it); each call once, bounded by `len(calls)`."""
    import httpx

    check_loopback(base_url)
    results: list[Optional[Result]] = [None] * len(calls)
    t0 = time.perf_counter()

    async def one(client, i, call):
        await asyncio.sleep(max(0.0, t0 + i / rate_rps - time.perf_counter()))
        results[i] = await _post(client, i, call, t0)

    limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(one(client, i, c) for i, c in enumerate(calls)))
    return results  # type: ignore[return-value]


def latency_summary(results: list[Result]) -> dict:
    ok = [r for r in results if r.status == 200]
    if not ok:
        return {"ok": 0}
    lat = np.array([r.latency_s for r in ok])
    span = max(r.started_s + r.latency_s for r in ok) - min(r.started_s for r in ok)
    return {
        "ok": len(ok),
        "throughput_rps": len(ok) / span if span > 0 else float("nan"),
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
        "mean_s": float(lat.mean()),
        "wall_s": span,
    }


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
