#!/usr/bin/env python
"""Bounded load + fault check of the style server (loopback only).

Sends N requests (default 500) at concurrency C (default 32), 10% of them malformed and 5% poisoned
(weights that overflow: [1e308, 1e308, 0, ...]), to the real Serve app (router -> batched StyleModel,
default ONE replica); kills a StyleModel replica after a third of the requests; then an overload
phase: an open loop at 10x the throughput the first phase sustained. Checks / reports:
  * 5xx for valid requests outside the kill window (kill -> replacement + 5 s): target 0;
    zero transport errors; every malformed or poisoned request is a 4xx with a message;
  * the killed replica is replaced and requests sent after the replacement succeed;
  * overload: the excess is shed as 503 + Retry-After (no other 5xx), requests admitted still succeed;
  * p50/p99 latency of valid requests; the router replica's RSS before and after.

    python benchmarks/serve_load_fault.py                 # tiny model built in code, one replica
    python benchmarks/serve_load_fault.py --model $DMM_HOME/outputs/dmm-toy/merged --requests 1000 --replicas 2
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmm_ray.console import (  # noqa: E402
    fraction,
    non_negative_float,
    positive_float,
    positive_int,
    refuse_models_being_replaced,
)
from serve.loadgen import dumps, latency_summary, run_calls, run_open_loop, style_stream  # noqa: E402

KILL_WINDOW_MARGIN_S = 5.0  # after the replacement is RUNNING, requests already queued may still fail


def router_rss_bytes(app_name: str) -> int:
    """Resident memory of the app's router replica process(es) on this machine (loopback benchmark)."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(f"ServeReplica:{app_name}:StyleRouter" in part for part in proc.info["cmdline"] or ()):
                total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def model_replicas(app_name: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#StyleModel#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def running_model_replicas(app_name: str) -> int:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return 0
    return app.deployments["StyleModel"].replica_states.get("RUNNING", 0)


def run_load_fault(
    base_url: str,
    app_name: str,
    styles: list[str],
    requests: int = 500,
    concurrency: int = 32,
    malformed_fraction: float = 0.1,
    kill_at: float = 1 / 3,
    replicas: int = 2,
    seed: int = 0,
    size: int = 32,
    steps: int = 2,
    replace_timeout_s: float = 120.0,
    poisoned_fraction: float = 0.0,
    overload_factor: float = 0.0,
    overload_s: float = 10.0,
    overload_max_requests: int = 3000,
) -> dict:
    """Run the stream against a deployed app, kill a replica mid-run, then (overload_factor > 0) an
    open-loop phase at overload_factor x the sustained throughput; return a report (no asserts)."""
    import ray

    calls = style_stream(
        styles, requests, seed=seed, malformed_fraction=malformed_fraction, steps=steps, size=size, poisoned_fraction=poisoned_fraction
    )
    before = model_replicas(app_name)
    events: dict = {"replicas_before": before}
    rss_before = router_rss_bytes(app_name)
    killed = threading.Event()

    def kill_one():
        victim = before[0]
        events["killed"] = victim
        events["killed_at_s"] = time.perf_counter() - t0
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        deadline = time.time() + replace_timeout_s
        while time.time() < deadline:
            now = model_replicas(app_name)
            if victim not in now and len(now) >= replicas and running_model_replicas(app_name) >= replicas:
                events["replaced_after_s"] = time.perf_counter() - t0 - events["killed_at_s"]
                events["replicas_after"] = now
                events["replaced_at_s"] = time.perf_counter() - t0
                return
            time.sleep(0.25)
        events["replicas_after"] = model_replicas(app_name)

    kill_thread = threading.Thread(target=kill_one, daemon=True)

    def on_progress(done: int):
        if not killed.is_set() and done >= int(requests * kill_at):
            killed.set()
            kill_thread.start()

    t0 = time.perf_counter()
    results = asyncio.run(run_calls(base_url, calls, concurrency, on_progress=on_progress))
    kill_thread.join(timeout=replace_timeout_s)

    # Requests after the replacement: a short second wave, so "after" is never empty.
    after_calls = style_stream(styles, 2 * concurrency, seed=seed + 1, steps=steps, size=size)
    after = asyncio.run(run_calls(base_url, after_calls, concurrency))

    valid = [r for r in results if r.call.valid]
    bad = [r for r in results if not r.call.valid]
    replaced_at = events.get("replaced_at_s")
    killed_at = events.get("killed_at_s", float("inf"))
    window_end = (replaced_at if replaced_at is not None else float("inf")) + KILL_WINDOW_MARGIN_S

    def in_kill_window(r) -> bool:  # in flight at any moment of [kill, replacement + margin]
        return r.started_s <= window_end and r.started_s + r.latency_s >= killed_at

    overload = None
    if overload_factor > 0:
        sustained = latency_summary(valid).get("throughput_rps") or 1.0
        rate = overload_factor * sustained
        n = min(overload_max_requests, max(1, int(rate * overload_s)))
        ocalls = style_stream(styles, n, seed=seed + 2, steps=steps, size=size)
        oresults = asyncio.run(run_open_loop(base_url, ocalls, rate))
        shed = [r for r in oresults if r.status == 503]
        overload = {
            "sustained_rps": sustained,
            "offered_rps": rate,
            "sent": len(oresults),
            "status_counts": {str(x): sum(r.status == x for r in oresults) for x in sorted({r.status for r in oresults})},
            "503": len(shed),
            "503_with_retry_after": sum(r.retry_after is not None for r in shed),
            "other_5xx": sum(r.status >= 500 and r.status != 503 for r in oresults),
            "transport_errors": sum(r.status == 0 for r in oresults),
            "ok": sum(r.status == 200 for r in oresults),
            "shed_latency_p50_s": float(np.percentile([r.latency_s for r in shed], 50)) if shed else None,
            "admitted_latency": latency_summary(oresults),
            "errors_sample": [(r.status, r.error[:160]) for r in oresults if r.status >= 500 and r.status != 503][:5],
        }
        # after the overload, the server serves normally again
        recover = asyncio.run(run_calls(base_url, style_stream(styles, concurrency, seed=seed + 3, steps=steps, size=size), concurrency))
        overload["after_ok"] = sum(r.status == 200 for r in recover)
        overload["after_sent"] = len(recover)
    rss_after = router_rss_bytes(app_name)
    return {
        "requests": len(results),
        "concurrency": concurrency,
        "malformed": sum(r.call.kind != "poisoned" for r in bad),
        "status_counts": {str(s): sum(r.status == s for r in results) for s in sorted({r.status for r in results})},
        "5xx": sum(r.status >= 500 for r in results + after),
        "valid_5xx": sum(r.status >= 500 for r in valid + after),
        "valid_5xx_in_kill_window": sum(r.status >= 500 and in_kill_window(r) for r in valid),
        "valid_5xx_outside_kill_window": sum(r.status >= 500 and not in_kill_window(r) for r in valid + after),
        "kill_window_s": [killed_at, window_end],
        "poisoned": sum(r.call.kind == "poisoned" for r in results),
        "poisoned_422": sum(r.call.kind == "poisoned" and r.status == 422 for r in results),
        "overload": overload,
        "router_rss_mb": {"before": rss_before / 2**20, "after": rss_after / 2**20},
        "transport_errors": sum(r.status == 0 for r in results + after),
        "valid_ok_png": sum(r.status == 200 and r.content_type == "image/png" for r in valid),
        "valid": len(valid),
        "malformed_4xx": sum(400 <= r.status < 500 for r in bad if r.call.kind != "poisoned"),
        "malformed_statuses": sorted({(r.call.kind, r.status) for r in bad}),
        "sent_after_replacement": (sum(r.started_s > replaced_at for r in valid) if replaced_at else 0) + len(after),
        "after_replacement_ok": (
            (sum(r.status == 200 for r in valid if r.started_s > replaced_at) if replaced_at else 0) + sum(r.status == 200 for r in after)
        ),
        "after_wave": {"sent": len(after), "ok": sum(r.status == 200 for r in after)},
        "fault": events,
        "latency": latency_summary(valid),
        "valid_status_counts": {str(x): sum(r.status == x for r in valid) for x in sorted({r.status for r in valid})},
        "errors_sample": [(r.status, r.call.kind, r.error[:160]) for r in results if r.status >= 500 or r.status == 0][:5],
    }


def check(report: dict) -> list[str]:
    """Every failed expectation as a sentence (empty = pass). With one model replica, the requests in
    flight while it is dead (the kill window) may fail; with more, none may."""
    problems = []
    single = len(report["fault"].get("replicas_before", [])) <= 1
    if single:
        if report["valid_5xx_outside_kill_window"]:
            problems.append(f"{report['valid_5xx_outside_kill_window']} valid requests outside the kill window were 5xx: {report['errors_sample']}")
    elif report["5xx"]:
        problems.append(f"{report['5xx']} responses were 5xx: {report['errors_sample']}")
    if report["transport_errors"]:
        problems.append(f"{report['transport_errors']} transport errors: {report['errors_sample']}")
    expected_ok = report["valid"] - (report["valid_5xx_in_kill_window"] if single else 0)
    if report["valid_ok_png"] < expected_ok:
        problems.append(f"only {report['valid_ok_png']} of {report['valid']} valid requests got a PNG")
    if report["malformed_4xx"] != report["malformed"]:
        problems.append(f"only {report['malformed_4xx']} of {report['malformed']} malformed requests got a 4xx")
    if report["poisoned_422"] != report["poisoned"]:
        problems.append(f"only {report['poisoned_422']} of {report['poisoned']} poisoned requests got a 422")
    fault = report["fault"]
    if "replaced_after_s" not in fault:
        problems.append(f"killed replica {fault.get('killed')} was not replaced: replicas now {fault.get('replicas_after')}")
    if report["after_wave"]["ok"] != report["after_wave"]["sent"]:
        problems.append(f"after the replacement {report['after_wave']['ok']} of {report['after_wave']['sent']} requests succeeded")
    if not single and report["after_replacement_ok"] != report["sent_after_replacement"]:
        problems.append(f"after the replacement {report['after_replacement_ok']} of {report['sent_after_replacement']} valid requests succeeded")
    o = report.get("overload")
    if o is not None:
        if o["503"] == 0:
            problems.append(f"overload at {o['offered_rps']:.1f} req/s shed nothing (no 503): {o['status_counts']}")
        if o["503_with_retry_after"] != o["503"]:
            problems.append(f"{o['503'] - o['503_with_retry_after']} of {o['503']} overload 503s lack Retry-After")
        if o["other_5xx"] or o["transport_errors"]:
            problems.append(f"overload: {o['other_5xx']} non-503 5xx, {o['transport_errors']} transport errors: {o['errors_sample']}")
        if o["after_ok"] != o["after_sent"]:
            problems.append(f"after the overload only {o['after_ok']} of {o['after_sent']} requests succeeded")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="merged-model folder (default: a tiny 3-style model built in code)")
    p.add_argument("--requests", type=positive_int, default=500)
    p.add_argument("--concurrency", type=positive_int, default=32)
    p.add_argument("--malformed", type=fraction, default=0.1, help="fraction of malformed requests")
    p.add_argument("--poisoned", type=fraction, default=0.05, help="fraction of poisoned requests (overflowing weights)")
    p.add_argument("--overload", type=non_negative_float, default=10.0, help="overload phase at this x the sustained rate (0: none)")
    p.add_argument("--overload-s", type=positive_float, default=10.0, help="length of the overload phase in seconds")
    p.add_argument("--replicas", type=positive_int, default=1, help="StyleModel replicas (one is killed)")
    p.add_argument("--steps", type=positive_int, default=2)
    p.add_argument("--size", type=positive_int, default=32)
    p.add_argument("--num-cpus", type=positive_int, default=4, help="CPUs of the local Ray instance")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    # (the replicas refuse it too, but one by one as Serve restarts them: said here at once)
    refuse_models_being_replaced(p, args, "model")  # refused while a running job's save may replace it
    from serve.config import ServeConfig
    from serve.model import ModelLoadError, is_mlflow_uri, resolve_model_location

    if args.model and not is_mlflow_uri(args.model):  # (a URI or models:/: the replica downloads it)
        try:  # the replica's own check, before Ray starts, on the folder the app gives it ($DMM_HOME, ~, the repo root)
            resolve_model_location(ServeConfig(model=args.model).model_location())
        except ModelLoadError as error:
            p.error(f"--model: {error}")

    import ray
    from ray import serve

    sys.path.insert(0, str(REPO / "tests"))
    from serve_helpers import free_port, tiny_model_dir

    from serve.app import build_app

    model = args.model or str(tiny_model_dir())
    ray.init(
        address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False
    )  # a private cluster, never one left by `ray start`
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})  # as serve/config.yaml
        app = "dmm-load"
        serve.run(build_app({"model": model, "num_replicas": args.replicas, "num_cpus": 0.5}), name=app, route_prefix="/")
        styles = [s["name"] for s in __import__("httpx").get(f"http://127.0.0.1:{port}/styles").json()["styles"]]
        report = run_load_fault(
            f"http://127.0.0.1:{port}",
            app,
            styles,
            args.requests,
            args.concurrency,
            args.malformed,
            replicas=args.replicas,
            steps=args.steps,
            size=args.size,
            poisoned_fraction=args.poisoned,
            overload_factor=args.overload,
            overload_s=args.overload_s,
        )
        problems = check(report)
        report["problems"] = problems
        print(dumps(report))
        if args.out:  # a folder not there yet is made: writing into it failed after the whole run
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(dumps(report))
        return 1 if problems else 0
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
