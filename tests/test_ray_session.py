"""Joining Ray: a stale `ray_current_cluster` file (a cluster stopped without `ray stop`) never makes a
job or `serve run` wait for a GCS that is gone."""

import os
import socket

import pytest
import ray

from dmm_ray import ray_session


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens there


@pytest.fixture
def address_file(tmp_path, monkeypatch):
    """Ray's address file under a private RAY_TMPDIR, RAY_ADDRESS unset (restored afterwards) and Ray
    seen as not started, as in a fresh `serve run` or job process."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "")
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray" / "ray_current_cluster"


def test_stale_recorded_cluster_is_the_address_where_nothing_answers(address_file):
    assert ray_session.stale_recorded_cluster() is None  # no file
    address_file.write_text("not an address\n")
    assert ray_session.stale_recorded_cluster() is None
    port = _closed_port()
    address_file.write_text(f"127.0.0.1:{port}\n")
    assert ray_session.stale_recorded_cluster() == f"127.0.0.1:{port}"
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        address_file.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        assert ray_session.stale_recorded_cluster() is None


def test_serve_run_gets_a_local_ray_instead_of_waiting_for_a_stale_cluster(address_file, caplog):
    address_file.write_text(f"127.0.0.1:{_closed_port()}")
    ray_session.avoid_stale_cluster()
    assert os.environ["RAY_ADDRESS"] == "local"  # what Ray's bare init() reads: a new local Ray
    assert any(str(address_file) in r.getMessage() and "ray stop" in r.getMessage() for r in caplog.records)


def test_a_live_recorded_cluster_or_an_explicit_address_is_left_alone(address_file, monkeypatch):
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        address_file.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        ray_session.avoid_stale_cluster()
        assert "RAY_ADDRESS" not in os.environ
    address_file.write_text(f"127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ray_session.avoid_stale_cluster()
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"


def test_address_auto_with_a_stale_file_is_an_error_naming_the_file(address_file, monkeypatch):
    address_file.write_text(f"127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("Ray must not be started"))
    with pytest.raises(ConnectionError, match="ray_current_cluster names 127.0.0.1:.*ray stop"):
        ray_session.ensure_ray("auto")


def test_ray_address_local_gets_the_private_local_ray(address_file, monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_session.ensure_ray() is True
    assert calls[0]["address"] == "local" and calls[0]["include_dashboard"] is False and "runtime_env" in calls[0]


def test_an_explicit_address_where_nothing_answers_is_an_error_not_minutes_of_gcs_retries(address_file, monkeypatch):
    """`--address host:port` / RAY_ADDRESS=host:port with no cluster there: one quick check and an error
    naming the address, instead of ray.init retrying the GCS for minutes; a live one, `ray://` and
    `local` reach ray.init."""
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    closed = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(ConnectionError, match=f"address '{closed}'.*no Ray cluster answers there.*host:port"):
        ray_session.ensure_ray(closed)
    monkeypatch.setenv("RAY_ADDRESS", closed)
    with pytest.raises(ConnectionError, match=f"address '{closed}'"):
        ray_session.ensure_ray()
    assert calls == []
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        live_address = f"127.0.0.1:{live.getsockname()[1]}"
        assert ray_session.ensure_ray(live_address) is True
    assert ray_session.ensure_ray("ray://10.0.0.1:10001") is True
    assert [c["address"] for c in calls] == [live_address, "ray://10.0.0.1:10001"]
