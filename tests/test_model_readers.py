"""A process loading a merged model while a save replaces it (dmm_ray/output_lock.py `reading` / `replacing`):
the save waits for the load that began before it, or gives up keeping the previous model; a folder replaced under
a load anyway is said to be. Two real processes: a reader slowed after its first component, and this one saving."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from export_helpers import save_merged, tiny_merged

from dmm_ray import output_lock
from dmm_ray.merged_model import staged
from dmm_ray.output_lock import OutputDirBusyError

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ("vae", "text_encoder", "unet")

# load_dmm_pipeline in a process of its own, paused after its first component with weights (diffusers' order varies)
# until the test writes `go`; prints which of the two models each component came from, or the error the load raised
READER = """
import json, sys, time
from pathlib import Path
import diffusers.pipelines.pipeline_utils as pu
from dmm_ray.pipeline import load_dmm_pipeline
folder, flags = Path(sys.argv[1]), Path(sys.argv[2])
real = pu.load_sub_model
def slow(*args, **kwargs):
    loaded = real(*args, **kwargs)
    if kwargs.get("name") in ("vae", "text_encoder", "unet") and not (flags / "paused").exists():
        (flags / "paused").touch()
        while not (flags / "go").exists():
            time.sleep(0.02)
    return loaded
pu.load_sub_model = slow
prints = json.loads((flags / "prints.json").read_text())
try:
    pipe = load_dmm_pipeline(folder)
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}), flush=True)
    sys.exit(1)
def fingerprint(module):
    return float(sum(p.detach().double().sum() for p in module.parameters()))
got = {name: [w for w, values in prints.items() if abs(values[name] - fingerprint(getattr(pipe, name))) < 1e-6] for name in prints["old"]}
print(json.dumps(got), flush=True)
"""


def _fingerprint(module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny merged models (`old`, `new`: other weights) and their component fingerprints."""
    root = tmp_path_factory.mktemp("readers")
    prints = {}
    for which, seed in (("old", 0), ("new", 7)):
        pipe = tiny_merged(seed=seed)
        save_merged(pipe, root / which)
        prints[which] = {name: _fingerprint(getattr(pipe, name)) for name in COMPONENTS}
    assert all(prints["old"][n] != prints["new"][n] for n in COMPONENTS)
    (root / "prints.json").write_text(json.dumps(prints))
    return root


def _start_reader(models: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`<tmp>/out/merged` (the old model) and a reader process paused in the middle of loading it."""
    dest, flags = tmp_path / "out" / "merged", tmp_path / "flags"
    shutil.copytree(models / "old", dest)
    flags.mkdir()
    shutil.copy(models / "prints.json", flags)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", READER, str(dest), str(flags)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (flags / "paused").exists():
        assert proc.poll() is None and time.time() < deadline, "the reader never started loading"
        time.sleep(0.05)
    return proc, dest, flags


def _finish(proc: subprocess.Popen, flags: Path) -> dict:
    (flags / "go").touch()
    out, _ = proc.communicate(timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def _save_new(models: Path, dest: Path) -> None:
    """A merge's save of a new model (merge.save_merged): the output_dir's lock held, merged.tmp written, swapped in."""
    with output_lock.hold(dest.parent, warn=lambda line: None):
        with staged(dest) as tmp:
            shutil.rmtree(tmp)
            shutil.copytree(models / "new", tmp)


def test_a_save_waits_for_a_load_that_began_before_it(models, tmp_path, monkeypatch):
    """The merge's save swapped in its model in the middle of the reader's load: the reader got one component of
    the old model and the others of the new one, without a word. Now the save waits, saying for whom, and the load is whole."""
    proc, dest, flags = _start_reader(models, tmp_path)
    said, errors = [], []
    original = getattr(output_lock, "replacing", None)
    # its progress lines, kept (raising=False: the code before it swapped at once, and this test says so below)
    monkeypatch.setattr(output_lock, "replacing", lambda model, say=print: original(model, say=said.append), raising=False)

    def save():
        try:
            _save_new(models, dest)
        except BaseException as error:  # noqa: BLE001 - the save's failure, asserted below
            errors.append(error)

    saver = threading.Thread(target=save)
    try:
        saver.start()
        deadline = time.time() + 60
        while not said and saver.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert saver.is_alive(), "the save swapped in its model while the reader was still loading the old one"
        assert f"pid {proc.pid}" in said[0] and "to finish loading" in said[0] and str(dest) in said[0]
    finally:
        got = _finish(proc, flags)
        saver.join(120)
    assert not errors
    assert got == {name: ["old"] for name in COMPONENTS}  # the whole old model, nothing of the new one
    assert sorted(p.name for p in dest.parent.iterdir()) == ["merged"]  # no marker, no merged.tmp / .old left
    from dmm_ray.pipeline import load_dmm_pipeline

    assert _fingerprint(load_dmm_pipeline(dest).unet) == json.loads((models / "prints.json").read_text())["new"]["unet"]


def test_a_save_that_waits_too_long_keeps_the_previous_model_and_says_why(models, tmp_path, monkeypatch):
    proc, dest, flags = _start_reader(models, tmp_path)
    monkeypatch.setattr(output_lock, "REPLACE_WAIT_S", 1.0)
    try:
        with pytest.raises(OutputDirBusyError) as error:
            _save_new(models, dest)
        before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    finally:
        got = _finish(proc, flags)
    message = str(error.value)
    assert f"{dest} was not replaced: still being loaded after 1 s by reader" in message and f"pid {proc.pid}" in message
    assert "Nothing is lost" in message and "run this job again once that load is done" in message
    assert before == {p.relative_to(models / "old"): p.read_bytes() for p in (models / "old").rglob("*") if p.is_file()}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["merged"]  # merged.tmp removed, the save's marker too
    assert got == {name: ["old"] for name in COMPONENTS}


def test_a_load_whose_folder_was_replaced_under_it_says_so(models, tmp_path):
    """A replacement that does not wait (by hand, or a reader that could not write its marker): the reader mixed the
    two models silently. Now it fails, saying the model was replaced while it was loading and to run it again."""
    proc, dest, flags = _start_reader(models, tmp_path)
    try:
        os.replace(dest, dest.with_name("merged.old"))
        shutil.copytree(models / "new", dest)
        shutil.rmtree(dest.with_name("merged.old"))
    finally:
        got = _finish(proc, flags)
    assert got.get("error") == "ModelReplacedError", f"the reader loaded {got}"
    assert f"{dest} was replaced" in got["message"] and "while this job was loading it" in got["message"] and "Run it again" in got["message"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["merged"]  # its marker removed


def test_markers_of_killed_readers_are_removed_and_a_live_save_is_waited_for(tmp_path, monkeypatch):
    dest = tmp_path / "merged"
    dest.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".merged.reading-{dead.pid}-0"
    stale.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": time.time() - 60, "job": "reader"}))
    said = []
    with output_lock.replacing(dest, say=said.append):  # a reader killed mid-load holds nothing up
        assert (tmp_path / ".merged.replacing").is_file()
    assert not stale.exists() and not said and not (tmp_path / ".merged.replacing").exists()

    # a load starting while a save swaps waits until it is done (and loads the new model)
    monkeypatch.setattr(output_lock, "_POLL_S", 0.02)
    with output_lock.replacing(dest):
        timer = threading.Timer(0.5, lambda: (tmp_path / ".merged.replacing").unlink())
        timer.start()
        t0 = time.time()
        with output_lock.reading(dest):
            waited = time.time() - t0
        timer.join()
    assert waited >= 0.4


def test_a_load_from_a_read_only_mount_loads(tmp_path, monkeypatch):
    """A merged/ on a read-only mount (a read-only NFS export, a Serve replica's ro volume): the reader cannot write
    its marker, and on such a mount even unlink(missing_ok=True) of the marker it never made raises EROFS, which
    failed every load after it had loaded (and while a save on another host swapped, before). It loads unannounced."""
    import errno
    import pathlib

    dest = tmp_path / "merged"
    dest.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    real_unlink = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        if self.parent == tmp_path:
            read_only()
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(output_lock, "_create", read_only)
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    with output_lock.reading(dest):
        pass

    # a save swapping there from a host that can write (its marker): waited for, then loaded
    monkeypatch.setattr(output_lock, "_POLL_S", 0.02)
    flag = tmp_path / ".merged.replacing"
    flag.write_text(json.dumps({"host": "another-host", "pid": 1, "started": time.time(), "job": "save"}))
    timer = threading.Timer(0.3, lambda: os.remove(flag))
    timer.start()
    t0 = time.time()
    with output_lock.reading(dest):
        waited = time.time() - t0
    timer.join()
    assert waited >= 0.2
