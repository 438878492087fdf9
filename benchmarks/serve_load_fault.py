#!/usr/bin/env python
"""Bounded load + fault check of the style server (loopback only).

Sends N requests (default 500) at concurrency C (default 32), 10% of them malformed, to the
real Serve app (router -> batched StyleModel with 2 replicas); kills one StyleModel replica
after a third of the requests and checks:
  * zero 5xx and zero transport errors; every malformed request is a 4xx with a message;
  * every valid request gets a PNG;
  * the killed replica is replaced (a new replica actor RUNNING, the count back to 2);
  * requests sent after the replacement succeed.

    python benchmarks/serve_load_fault.py                 # tiny model built in code
    python benchmarks/serve_load_fault.py --model outputs/toy/merged --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serve.loadgen import dumps, latency_summary, run_calls, style_stream  # noqa: E402


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
    base_url: str, app_name: str, styles: list[str], requests: int = 500, concurrency: int = 32,
    malformed_fraction: float = 0.1, kill_at: float = 1 / 3, replicas: int = 2, seed: int = 0,
    size: int = 32, steps: int = 2, replace_timeout_s: float = 120.0,
) -> dict:
    """Run the stream against a deployed app, kill a replica mid-run; return a report (no asserts)."""
    import ray

    calls = style_stream(styles, requests, seed=seed, malformed_fraction=malformed_fraction, steps=steps, size=size)
    before = model_replicas(app_name)
    events: dict = {"replicas_before": before}
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
    return {
        "requests": len(results),
        "concurrency": concurrency,
        "malformed": len(bad),
        "status_counts": {str(s): sum(r.status == s for r in results) for s in sorted({r.status for r in results})},
        "5xx": sum(r.status >= 500 for r in results + after),
        "transport_errors": sum(r.status == 0 for r in results + after),
        "valid_ok_png": sum(r.status == 200 and r.content_type == "image/png" for r in valid),
        "valid": len(valid),
        "malformed_4xx": sum(400 <= r.status < 500 for r in bad),
        "malformed_statuses": sorted({(r.call.kind, r.status) for r in bad}),
        "sent_after_replacement": (sum(r.started_s > replaced_at for r in valid) if replaced_at else 0) + len(after),
        "after_replacement_ok": (
            (sum(r.status == 200 for r in valid if r.started_s > replaced_at) if replaced_at else 0)
            + sum(r.status == 200 for r in after)
        ),
        "after_wave": {"sent": len(after), "ok": sum(r.status == 200 for r in after)},
        "fault": events,
        "latency": latency_summary(valid),
        "errors_sample": [(r.status, r.call.kind, r.error[:160]) for r in results if r.status >= 500 or r.status == 0][:5],
    }


def check(report: dict) -> list[str]:
    """Every failed expectation as a sentence (empty = pass)."""
    problems = []
    if report["5xx"]:
        problems.append(f"{report['5xx']} responses were 5xx: {report['errors_sample']}")
    if report["transport_errors"]:
        problems.append(f"{report['transport_errors']} transport errors: {report['errors_sample']}")
    if report["valid_ok_png"] != report["valid"]:
        problems.append(f"only {report['valid_ok_png']} of {report['valid']} valid requests got a PNG")
    if report["malformed_4xx"] != report["malformed"]:
        problems.append(f"only {report['malformed_4xx']} of {report['malformed']} malformed requests got a 4xx")
    fault = report["fault"]
    if "replaced_after_s" not in fault:
        problems.append(f"killed replica {fault.get('killed')} was not replaced: replicas now {fault.get('replicas_after')}")
    if report["after_replacement_ok"] != report["sent_after_replacement"] or report["after_wave"]["ok"] == 0:
        problems.append(
            f"after the replacement {report['after_replacement_ok']} of {report['sent_after_replacement']} valid requests succeeded"
        )
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="merged-model folder (default: a tiny 3-style model built in code)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--malformed", type=float, default=0.1, help="fraction of malformed requests")
    p.add_argument("--replicas", type=int, default=2, help="StyleModel replicas (one is killed)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray instance")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    sys.path.insert(0, str(REPO / "tests"))
    from serve.app import build_app
    from serve_helpers import free_port, tiny_model_dir

    model = args.model or str(tiny_model_dir())
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)  # a private cluster, never one left by `ray start`
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = "dmm-load"
        serve.run(build_app({"model": model, "num_replicas": args.replicas, "num_cpus": 0.5}), name=app, route_prefix="/")
        styles = [s["name"] for s in __import__("httpx").get(f"http://127.0.0.1:{port}/styles").json()["styles"]]
        report = run_load_fault(f"http://127.0.0.1:{port}", app, styles, args.requests, args.concurrency,
                                args.malformed, replicas=args.replicas, steps=args.steps, size=args.size)
        problems = check(report)
        report["problems"] = problems
        print(dumps(report))
        if args.out:
            args.out.write_text(dumps(report))
        return 1 if problems else 0
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
