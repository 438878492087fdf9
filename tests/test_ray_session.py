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


def test_an_address_other_than_the_connected_rays_is_an_error_not_a_silent_reuse(monkeypatch):
    """Ray already initialised in this process (e.g. a private Ray a failed job left behind) and a
    host:port naming another cluster: an error naming both, never training on the wrong cluster.
    The same cluster (loopback or this node's IP, same port), `auto`, `local`, `ray://` and no address
    reuse it."""

    class Context:
        gcs_address = "10.1.2.3:6379"

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.1.2.3")
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("Ray must not be started again"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for other in ("127.0.0.1:1", "10.1.2.3:6380", "10.9.9.9:6379"):
        with pytest.raises(ConnectionError, match=f"address '{other}'.*already connected to the Ray cluster at 10.1.2.3:6379"):
            ray_session.ensure_ray(other)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ConnectionError, match="already connected"):
        ray_session.ensure_ray()
    monkeypatch.delenv("RAY_ADDRESS")
    for same in ("10.1.2.3:6379", "127.0.0.1:6379", "localhost:6379", "auto", "local", "ray://10.9.9.9:10001", None):
        assert ray_session.ensure_ray(same) is False


def _stop_before_training(monkeypatch, module, started: bool) -> list:
    """`module`'s init_for_training reports `started`; ray.shutdown calls are recorded."""
    calls = []
    monkeypatch.setattr(module, "init_for_training", lambda address=None: started)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    return calls


@pytest.mark.parametrize("started", [True, False])
def test_a_failed_merge_or_fast_run_shuts_down_the_ray_it_started(tmp_path, monkeypatch, started):
    """A merge refused by the resource check (or any failure after Ray starts) stops the private Ray it
    started, as a successful one does; a Ray it found running is left alone. The same for the few-step job."""
    from dmm_ray import completion, fingerprint, merge
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast import job as fast_job
    from dmm_ray.resources import ResourceError

    cfg = MergeConfig.model_validate(
        {
            "student": {"base": "/nonexistent/b"},
            "data": {"base": "/nonexistent/b", "shards": str(tmp_path / "shards")},
            "teachers": [{"name": "a", "source": "/nonexistent/a"}],
            "output_dir": str(tmp_path / "out"),
        }
    )

    def refuse(*a, **k):
        raise ResourceError("the cluster cannot hold this merge")

    calls = _stop_before_training(monkeypatch, merge, started)
    monkeypatch.setattr(merge, "check_output_dir", lambda *a: None)
    monkeypatch.setattr(merge, "plan_cluster", refuse)
    with pytest.raises(ResourceError):
        merge._merge(cfg, tmp_path / "out", None, False, 0.0)
    assert calls == (["shutdown"] if started else [])

    calls = _stop_before_training(monkeypatch, fast_job, started)
    monkeypatch.setattr(fingerprint, "fast_inputs", lambda *a: {})
    monkeypatch.setattr(fingerprint, "check_fast_resume", lambda *a: None)
    monkeypatch.setattr(completion, "finished", lambda *a, **k: None)
    monkeypatch.setattr(fast_job, "ensure_latents", refuse)
    with pytest.raises(ResourceError):
        fast_job._run_fast(cfg, tmp_path / "model", ["a"], tmp_path / "fast", None, False, False, 0.0)
    assert calls == (["shutdown"] if started else [])
