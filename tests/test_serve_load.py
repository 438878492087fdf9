"""Bounded load + fault test (loopback): >= 500 requests at concurrency 32, 10% malformed,
one model replica killed mid-run. Zero 5xx; the replica is replaced; requests after succeed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from serve_helpers import STYLE_NAMES, serve_on_cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
@pytest.mark.ray
def test_load_with_malformed_requests_and_a_killed_replica(ray_cluster):
    from serve_load_fault import check, run_load_fault

    name = "dmm-test-load"
    with serve_on_cluster(name, num_replicas=2) as url:
        report = run_load_fault(url, name, STYLE_NAMES, requests=500, concurrency=32, malformed_fraction=0.1, replicas=2)
    assert report["requests"] == 500 and report["malformed"] == 50
    assert check(report) == [], report


def test_load_targets_must_be_loopback_addresses():
    """A host name that merely starts with "127." (127.example.com: wherever its DNS points) passed as loopback."""
    from serve.loadgen import check_loopback

    for url in ("http://127.0.0.1:8000", "http://127.8.9.10/", "http://[::1]:8000/x", "http://localhost:8000"):
        check_loopback(url)
    for url in ("http://127.example.com:8000", "http://127.0.0.1.nip.io/", "http://10.0.0.1:8000", "http://[::2]/"):
        with pytest.raises(ValueError, match="not a loopback address"):
            check_loopback(url)
