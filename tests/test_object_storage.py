"""output_dir, data.shards and merged models on object storage URIs (s3://, gs://, file://) through
pyarrow filesystems (dmm_ray/data/fs.py). S3 is stood in for by a pyarrow SubTreeFileSystem over a
local folder and by an fsspec in-memory filesystem; the end-to-end merge writes to a file:// URI."""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from dmm_ray.data import fs as fsu


def _pipeline_like(folder: Path, tag: str = "a") -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"tag": tag}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(3000))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DMMPipeline", "tag": tag}))
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stand_ins(tmp_path):
    """(name, filesystem, path in it): S3 stand-ins."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    yield "subtree", pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()), "merges/toy/merged"
    try:
        from fsspec.implementations.memory import MemoryFileSystem
    except ImportError:
        return
    memory = MemoryFileSystem()
    memory.store.clear()  # one process-wide store: start empty
    yield "fsspec-memory", pafs.PyFileSystem(pafs.FSSpecHandler(memory)), "bucket/merges/toy/merged"


def test_upload_then_download_round_trips_a_folder_through_s3_stand_ins(tmp_path):
    first, second = _pipeline_like(tmp_path / "first", "a"), _pipeline_like(tmp_path / "second", "b")
    (first / "stale.txt").write_text("only in the first model")
    for name, fs, path in _stand_ins(tmp_path):
        copied = fsu.upload_dir(first, fs, path)
        assert copied[-1] == "model_index.json", name  # what makes the folder loadable goes last
        got = fsu.download_dir(fs, path, tmp_path / f"dl-{name}")
        assert _tree(got) == _tree(first), name
        # a second upload replaces the folder (nothing of the first model is left behind) ...
        fsu.upload_dir(second, fs, path)
        # ... and a second download replaces the local copy
        got = fsu.download_dir(fs, path, tmp_path / f"dl-{name}")
        assert _tree(got) == _tree(second), name
        assert not list(tmp_path.glob(f"dl-{name}.part-*")), name
        with pytest.raises(FileNotFoundError):
            fsu.download_dir(fs, path + "-missing", tmp_path / f"never-{name}")
        assert not (tmp_path / f"never-{name}").exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_an_atomic_write_that_fails_part_way_leaves_no_temp_file(tmp_path, error):
    """write_bytes_atomic (shards, their markers, fingerprints.json, merge_complete.json): a write that
    failed or was interrupted part-way left `<path>.tmp` (an object store's stream publishes what it got
    on close), a half shard beside the folder's committed files; the earlier `path` is kept."""

    class FailingStream:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def write(self, data):
            self.inner.write(data[: len(data) // 2])
            raise error

    class FailingWrites:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_output_stream(self, path):
            return FailingStream(self.fs.open_output_stream(path))

    for name, fs, root in _stand_ins(tmp_path):
        root = fsu.join(root, "latents")  # a folder of its own (the in-memory store keeps earlier tests' folders)
        fs.create_dir(root, recursive=True)
        path = fsu.join(root, "shard-00000.parquet")
        fsu.write_bytes_atomic(fs, path, b"committed")
        with pytest.raises(type(error)):
            fsu.write_bytes_atomic(FailingWrites(fs), path, b"x" * 1000)
        assert [i.base_name for i in fs.get_file_info(pafs.FileSelector(root))] == ["shard-00000.parquet"], name
        assert fsu.read_bytes(fs, path) == b"committed", name


def _failing_store(error: BaseException, every: bool):
    """(an fsspec in-memory store, an S3 stand-in, and its handler class): with `Handler.after` = N > 0, the
    N-th file write from then on (an upload's or a server-side copy's) raises `error`, and with `every` each
    one after it and every delete too (the store is gone); `after` = 0: none fails."""
    from fsspec.implementations.memory import MemoryFileSystem

    class Handler(pafs.FSSpecHandler):
        writes = 0
        after = 0

        def _write(self):
            type(self).writes += 1
            if self.after and (self.writes == self.after or (every and self.writes > self.after)):
                raise error

        def open_output_stream(self, path, metadata):
            self._write()
            return super().open_output_stream(path, metadata)

        def copy_file(self, src, dest):
            self._write()
            return super().copy_file(src, dest)

        def delete_file(self, path):
            if every and self.after and self.writes >= self.after:  # a store that is gone deletes nothing either
                raise error
            return super().delete_file(path)

        def delete_dir(self, path):
            if every and self.after and self.writes >= self.after:
                raise error
            return super().delete_dir(path)

    memory = MemoryFileSystem()
    memory.store.clear()  # one process-wide store: start empty
    return pafs.PyFileSystem(Handler(memory)), Handler


@pytest.mark.parametrize("every", [False, True], ids=["one-failure", "store-gone"])
@pytest.mark.parametrize("error", [OSError("connection reset"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_model_upload_that_fails_at_any_point_keeps_the_previous_model_loadable(tmp_path, error, every):
    """Finding: the merge's upload of merged/ to a URI output_dir emptied the remote merged/ first, so an
    upload that failed or was interrupted left no model there (the README listed it as a limit). The new model
    now goes to merged.tmp, the previous one aside to merged.old, and only then is merged/ replaced: a failure
    at any file write, or Ctrl-C, keeps the previous model, byte-identical, at merged/ (put back at once, or by
    the next merge's recover_model when the store is gone), and readers load merged.old until then."""
    first, second = _pipeline_like(tmp_path / "first", "a"), _pipeline_like(tmp_path / "second", "b")
    parent, path = "bucket/merges/toy", "bucket/merges/toy/merged"

    def listed(fs):
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(parent)))

    fs, handler = _failing_store(error, every)
    fsu.upload_model(first, fs, path)
    handler.writes = 0
    fsu.upload_model(second, fs, path)
    writes = handler.writes
    assert writes == 3 * len(_tree(second))  # merged.tmp, the previous model aside, the new one in
    assert _tree(fsu.download_dir(fs, path, tmp_path / "second-copy")) == _tree(second) and listed(fs) == ["merged"]
    for after in range(1, writes + 1):
        fs, handler = _failing_store(error, every)
        fsu.upload_model(first, fs, path)
        handler.writes, handler.after = 0, after
        with pytest.raises(type(error)):
            fsu.upload_model(second, fs, path)
        handler.after = 0  # the store is back
        read = fsu.model_to_read(fs, path)  # what a reader (Serve, load_dmm_pipeline, jobs/export.py) downloads
        assert _tree(fsu.download_dir(fs, read, tmp_path / f"read-{after}")) == _tree(first), after
        # put back at once, unless the store went away while merged/ was being replaced: then merged.old is read
        assert (read == path) == (not every or after <= 2 * len(_tree(second))), after
        fsu.recover_model(fs, path)  # the next merge's start
        assert _tree(fsu.download_dir(fs, path, tmp_path / f"copy-{after}")) == _tree(first), after
        assert listed(fs) == ["merged"], after


def _evaluation_like(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True)
    for name in ("M.csv", "M_ref.csv", "fid_heatmaps.png", "fid_matrix.json"):
        (folder / name).write_text(f"{tag} {name}")
    return folder


@pytest.mark.parametrize("every", [False, True], ids=["one-failure", "store-gone"])
def test_an_evaluation_upload_that_fails_at_any_point_keeps_the_previous_evaluation(tmp_path, every):
    """Finding: the merge's uploads of evaluation/ and stages/<name> to a URI output_dir emptied the remote
    folder first (upload_dir), so one that failed part-way left less than the previous folder there (the
    earlier evaluation lost). They are replaced as merged/ is (upload_model, `marker` the file that marks the
    folder complete: fid_matrix.json): a failure at any file write keeps the previous evaluation, whole, at
    evaluation/ (put back at once, or by the next merge's start, recover_model, when the store is gone)."""
    from dmm_ray.evaluation.outputs import MATRIX_FILE

    first, second = _evaluation_like(tmp_path / "first", "first"), _evaluation_like(tmp_path / "second", "second")
    parent, path = "bucket/evals/toy", "bucket/evals/toy/evaluation"  # (not merges/toy: the model tests list that folder)
    fs, handler = _failing_store(OSError("connection reset"), every)
    fsu.upload_model(first, fs, path, marker=MATRIX_FILE)
    handler.writes = 0
    fsu.upload_model(second, fs, path, marker=MATRIX_FILE)
    writes = handler.writes
    assert writes == 3 * len(_tree(second))
    for after in range(1, writes + 1):
        fs, handler = _failing_store(OSError("connection reset"), every)
        fsu.upload_model(first, fs, path, marker=MATRIX_FILE)
        handler.writes, handler.after = 0, after
        with pytest.raises(OSError, match="connection reset"):
            fsu.upload_model(second, fs, path, marker=MATRIX_FILE)
        handler.after = 0  # the store is back
        fsu.recover_model(fs, path, marker=MATRIX_FILE)  # the next merge's start
        assert _tree(fsu.download_dir(fs, path, tmp_path / f"copy-{after}")) == _tree(first), after
        listed = [i.base_name for i in fs.get_file_info(pafs.FileSelector(parent))]  # (the store keeps earlier tests' folders)
        assert "evaluation" in listed and not [n for n in listed if n.startswith("evaluation.")], after
    with pytest.raises(FileNotFoundError, match=f"cannot upload .*: it has no {MATRIX_FILE}, the file that marks it complete"):
        fsu.upload_model(tmp_path, fs, path, marker=MATRIX_FILE)  # else the swap would leave no complete folder


def test_the_merges_uploads_of_evaluation_and_stages_that_fail_keep_the_previous_folder(tmp_path, monkeypatch):
    """The same through the merge's callers, at a file:// output_dir: _upload_result (evaluation/) and
    _stage_folder (stages/<name>, a student and a training state) failing at their second file write left one
    file of the new upload (evaluation/) or nothing; the previous folder is kept, and a whole upload replaces it."""
    from dmm_ray import merge
    from dmm_ray.distill.checkpointing import MANIFEST

    store, out = tmp_path / "store", tmp_path / "staging"
    store.mkdir()
    remote = store.as_uri()
    student = _pipeline_like(out / "stages" / "distill_student", "first")
    (student / "config.json").write_text("{}")
    state = out / "stages" / "distill_state"
    state.mkdir()
    (state / "train_state.pt").write_text("first")
    (state / MANIFEST).write_text("{}")
    uploads = [
        (lambda: merge._upload_result(out / "evaluation", remote, "evaluation"), _evaluation_like(out / "evaluation", "first"), store / "evaluation"),
        (lambda: merge._stage_folder(student, remote, "distill_student", merge.STUDENT_MARKER), student, store / "stages" / "distill_student"),
        (lambda: merge._stage_folder(state, remote, "distill_state", MANIFEST), state, store / "stages" / "distill_state"),
    ]
    real = pafs.copy_files
    for upload, local, uploaded in uploads:
        upload()
        previous = _tree(uploaded)
        assert previous == _tree(local)
        for f in local.rglob("*"):
            if f.is_file():
                f.write_text("second")
        calls = []

        def failing(*args, **kwargs):
            calls.append(args)
            if len(calls) == 2:
                raise OSError("connection reset")
            return real(*args, **kwargs)

        monkeypatch.setattr(pafs, "copy_files", failing)
        with pytest.raises(OSError, match="connection reset"):
            upload()
        monkeypatch.setattr(pafs, "copy_files", real)
        assert _tree(uploaded) == previous, uploaded
        upload()
        assert _tree(uploaded) == _tree(local) and not list(uploaded.parent.glob(uploaded.name + ".*")), uploaded  # no .tmp / .old left


def test_the_evaluation_uploaded_is_the_one_written_to_evaluation_output_dir(tmp_path, monkeypatch):
    """Finding: with a URI output_dir, the merge's evaluate stage wrote its results to evaluation.output_dir but
    uploaded <staging>/evaluation whatever that held: with evaluation.output_dir set to another folder, nothing,
    or an earlier run's evaluation left there (the default's), over the remote evaluation/ of this model. It
    uploads the folder the evaluation was written to."""
    from types import SimpleNamespace

    from dmm_ray import merge

    out, store, chosen = tmp_path / "staging", tmp_path / "store", tmp_path / "my-evaluation"
    store.mkdir()
    _evaluation_like(out / "evaluation", "an earlier run's")

    def evaluate_stage(cfg, merged_path, teachers=None):  # evaluate_merge writes the results to evaluation.output_dir
        _evaluation_like(Path(cfg.evaluation.output_dir), "this run's")
        return object()

    monkeypatch.setattr(merge, "evaluate_stage", evaluate_stage)
    cfg = SimpleNamespace(evaluation=SimpleNamespace(output_dir=str(chosen)))
    run = SimpleNamespace(cfg=cfg, out=out, remote=store.as_uri(), teachers=[], result=SimpleNamespace(merged_path=out / "merged", evaluation=None))
    merge._evaluate(run)
    assert _tree(store / "evaluation") == _tree(chosen)


def test_a_model_file_over_the_server_copy_limit_is_streamed(tmp_path, monkeypatch):
    """S3's CopyObject (pyarrow's copy_file) refuses a source over 5 GiB, as a shard of an fp32 SDXL UNet is:
    upload_model's copies stream such a file through this machine instead (the limit lowered to see it)."""
    monkeypatch.setattr(fsu, "SERVER_COPY_LIMIT", 100)  # the weights (3000 bytes) are streamed, the configs copied
    first, second = _pipeline_like(tmp_path / "first", "a"), _pipeline_like(tmp_path / "second", "b")
    for name, fs, path in _stand_ins(tmp_path):
        fsu.upload_model(first, fs, path)
        fsu.upload_model(second, fs, path)
        assert _tree(fsu.download_dir(fs, path, tmp_path / f"dl-{name}")) == _tree(second), name
        assert [i.base_name for i in fs.get_file_info(pafs.FileSelector(posixpath.dirname(path)))] == ["merged"], name


def test_a_model_file_over_the_s3_copy_limit_is_copied_server_side_on_gcs(tmp_path, monkeypatch):
    """Finding: every store streamed a file over SERVER_COPY_LIMIT (S3 CopyObject's 5 GiB) through this machine,
    GCS too, whose server-side copy (objects.rewrite, run to the end by pyarrow's GcsFileSystem and by gcsfs) has
    no size limit: a 10 GB UNet shard went through the driver twice. On GCS (an fsspec filesystem named and with
    the protocols of gcsfs's, here over memory; pyarrow's GcsFileSystem by its type) every file is copied there."""
    from fsspec.implementations.memory import MemoryFileSystem

    class GCSFileSystem(MemoryFileSystem):  # gcsfs.GCSFileSystem's name and protocols
        protocol = ("gs", "gcs")

    streamed = []

    class Handler(pafs.FSSpecHandler):
        def open_output_stream(self, path, metadata):
            streamed.append(path)
            return super().open_output_stream(path, metadata)

    monkeypatch.setattr(fsu, "SERVER_COPY_LIMIT", 100)  # the weights (3000 bytes) are over it
    first, second = _pipeline_like(tmp_path / "first", "a"), _pipeline_like(tmp_path / "second", "b")
    memory = GCSFileSystem()
    memory.store.clear()
    fs, path = pafs.PyFileSystem(Handler(memory)), "bucket/gcs/toy/merged"
    fsu.upload_model(first, fs, path)
    fsu.upload_model(second, fs, path)
    assert _tree(fsu.download_dir(fs, path, tmp_path / "dl")) == _tree(second)
    assert [p for p in streamed if "/merged.tmp/" not in p] == []  # only the upload itself (to merged.tmp) sends data
    assert not fsu._server_copy_limited(pafs.GcsFileSystem(anonymous=True))
    assert not fsu._server_copy_limited(pafs.SubTreeFileSystem("bucket/x", pafs.GcsFileSystem(anonymous=True)))
    assert fsu._server_copy_limited(pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem())))  # S3 and the rest: streamed


def test_local_copy_and_fetched_for_file_uris_and_plain_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    model = _pipeline_like(tmp_path / "store" / "merged")
    assert fsu.local_copy(str(model)) == model  # plain paths: used in place, nothing copied
    copy = fsu.local_copy(model.as_uri())
    assert copy != model and copy.is_relative_to(tmp_path / "home" / "cache" / "download") and _tree(copy) == _tree(model)
    with fsu.fetched(model.as_uri()) as folder:
        assert _tree(folder) == _tree(model)
    assert not folder.exists()  # a fetched URI's temporary copy is gone after use
    with pytest.raises(FileNotFoundError):
        fsu.local_copy((tmp_path / "nothing").as_uri())
    # a fetch that fails (nothing there; a model refused half-way) leaves no temporary folder: it left one per failure
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for uri, model in (((tmp_path / "nothing").as_uri(), False), ((tmp_path / "store").as_uri(), True)):  # store: no model_index.json
        with pytest.raises((FileNotFoundError, ValueError)):
            with fsu.fetched(uri, model=model):
                pass
    assert list((tmp_path / "tmp").iterdir()) == []


SECOND_DOWNLOAD = """
import sys
from dmm_ray.data import fs as fsu
fsu.local_copy(sys.argv[1])
"""


def test_two_downloads_of_one_location_at_once_both_end_with_the_copy(tmp_path, monkeypatch):
    """Finding: two processes on a node loading one URI (load_dmm_pipeline, local_copy) download into one folder,
    $DMM_HOME/cache/download/<name>-<hash>; each removed it in place and moved its copy in, and one whose move came
    after the other's failed ([Errno 39] Directory not empty). The earlier copy is moved aside in one step, and a copy
    another download moved in meanwhile is kept; nothing of either download is left beside it."""
    import subprocess
    import sys

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    model = _pipeline_like(tmp_path / "store" / "merged")
    first = fsu.local_copy(model.as_uri())
    real, env = fsu.os.replace, {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def replace(src, dst):
        if Path(dst) == first and ".part-" in Path(src).name:  # this download's copy moves in: the other's lands first
            subprocess.run([sys.executable, "-c", SECOND_DOWNLOAD, model.as_uri()], check=True, env=env, capture_output=True)
        return real(src, dst)

    monkeypatch.setattr(fsu.os, "replace", replace)
    assert fsu.local_copy(model.as_uri()) == first and _tree(first) == _tree(model)
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]


def test_location_join_never_turns_a_uri_into_a_path():
    assert fsu.location_join("s3://bucket/x/", "merged") == "s3://bucket/x/merged"
    assert fsu.location_join("/tmp/x", "ray_results", "a") == Path("/tmp/x/ray_results/a")


def test_a_uri_whose_hash_or_query_pyarrow_would_drop_is_refused_naming_the_escape(tmp_path):
    """pyarrow drops a URI's fragment ('#' on) and a file:// URI's query ('?' on): `file:///x/run#1/model`
    was the folder /x/run, which an upload emptied (the files of another run with it). They are refused,
    naming the escape; escaped, the same names are the folders meant."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "other.txt").write_text("not the upload's")
    model = _pipeline_like(tmp_path / "src")
    with pytest.raises(ValueError, match=r"'#' starts a URI fragment.*as %23"):
        fsu.upload(model, f"file://{tmp_path}/run#1/model")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["other.txt"]
    with pytest.raises(ValueError, match=r"output_dir 'file://.*/run\?v=2': '\?' starts a URI query.*as %3F"):
        fsu.check_location("output_dir", f"file://{tmp_path}/run?v=2")
    with pytest.raises(ValueError, match=r"data.shards 's3://bucket/a#b': .*as %23"):
        fsu.check_location("data.shards", "s3://bucket/a#b")
    fsu.check_location("data.shards", "s3://bucket/a?region=us-east-1")  # an object store's options: its query
    assert fsu.resolve(f"file://{tmp_path}?use_mmap=true")[1] == str(tmp_path)  # and a file:// URI's one option
    with pytest.raises(ValueError, match="a space in a name as %20"):
        fsu.resolve(f"file://{tmp_path}/a b")
    fsu.upload(model, f"file://{tmp_path}/run%231%20%3F/model")
    assert _tree(tmp_path / "run#1 ?" / "model") == _tree(model) and (tmp_path / "run" / "other.txt").exists()


def test_uri_strings_never_become_a_local_folder_named_s3(tmp_path, monkeypatch):
    """Everything that takes output_dir before Ray starts, with an s3:// URI (no network touched):
    the URI stays a URI, local work goes to $DMM_HOME/staging, and no `s3:` folder appears."""
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray import merge, paths
    from dmm_ray.config import MergeConfig, load_config
    from dmm_ray.distill.trainer import storage_path
    from dmm_ray.fingerprint import state_paths

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    world = build_world(tmp_path / "world", rows=8)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    uri = "s3://bucket/merges/toy"
    tree = {**tiny_merge_config(world, Path("unused")), "output_dir": None}
    tree["data"] = {k: v for k, v in tree["data"].items() if k != "shards"}  # default: <output_dir>/latents
    (work / "c.yaml").write_text(json.dumps(tree))
    cfg = load_config(work / "c.yaml", [f"output_dir={uri}"])
    assert cfg.output_dir == uri and cfg.data.shards == uri + "/latents"
    cfg = cfg.with_absolute_paths()
    assert cfg.output_dir == uri
    where = merge.locations(cfg)
    assert where["merged model"] == uri + "/merged" and where["local staging"] == str(paths.staging_dir(uri))
    assert f"DMM_MODEL={uri}/merged" in merge.format_locations(cfg, "locations")
    assert merge.output_location(cfg) == (paths.staging_dir(uri), uri)
    assert storage_path(cfg.output_dir) == uri + "/ray_results"
    assert state_paths(cfg, cfg.output_dir, "distill") == [uri + "/ray_results/test-merge-distill"]
    assert Path(cfg.evaluation.output_dir) == paths.staging_dir(uri) / "evaluation"

    seen = {}
    monkeypatch.setattr(
        merge, "_merge", lambda cfg, out, tracker, restart, started, encode_plan=None: seen.update(out=out, remote=merge.output_location(cfg)[1])
    )
    merge.run_merge(cfg)  # up to the point where Ray would start: lock + staging folder
    assert seen == {"out": paths.staging_dir(uri), "remote": uri} and seen["out"].is_dir()
    # a second merge into the URI while one runs: refused naming the URI (it named the staging folder its output_dir)
    from merge_fixtures import hold_in_another_process

    from dmm_ray.output_lock import OutputDirBusyError

    first = hold_in_another_process(paths.staging_dir(uri))
    try:
        for attempt in (lambda: merge.run_merge(cfg), lambda: merge.check_before_run(cfg)):  # the run, and --dry-run
            with pytest.raises(OutputDirBusyError, match=f"^output_dir {uri} \\(its local staging folder {paths.staging_dir(uri)}\\) is in use by"):
                attempt()
    finally:
        first.kill()
    assert not list(tmp_path.rglob("s3:")), "a local folder named s3: was created"

    # a URI that lost a slash is refused, naming the setting, before anything is created
    for bad in ("s3:/bucket/x", "s3:"):
        with pytest.raises(ValueError, match=r"output_dir .*lost a slash.*s3://bucket/path"):
            MergeConfig.model_validate(tiny_merge_config(world, Path("x"), output_dir=bad))
        with pytest.raises(ValueError, match="lost a slash"):
            paths.resolve(bad, work)
    with pytest.raises(ValueError, match=r"output_dir 'ftp://host/x': scheme 'ftp://' is not supported.*s3://"):
        MergeConfig.model_validate(tiny_merge_config(world, Path("x"), output_dir="ftp://host/x"))
    with pytest.raises(ValueError, match=r"data.shards .*lost a slash"):
        MergeConfig.model_validate(tiny_merge_config(world, Path("x"), data={"shards": "gs:/bucket/latents"}))
    with pytest.raises(ValueError, match="incremental.base_merged .* is a URI, but incremental.base_merged must be a local folder"):
        MergeConfig.model_validate(tiny_merge_config(world, Path("x"), incremental={"base_merged": "s3://bucket/old/merged"}))
    with pytest.raises(ValueError, match="evaluation.output_dir .* must be a local folder"):
        MergeConfig.model_validate(tiny_merge_config(world, Path("x"), evaluation={"output_dir": "s3://bucket/eval"}))
    from dmm_ray.evaluation.outputs import write_outputs

    with pytest.raises(ValueError, match="must be a local folder"):
        write_outputs(None, "s3://bucket/eval")
    assert not list(tmp_path.rglob("s3:")) and not list(tmp_path.rglob("gs:"))


def test_fingerprints_and_restart_work_on_a_uri_output_dir(tmp_path):
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray import fingerprint
    from dmm_ray.config import MergeConfig
    from dmm_ray.fingerprint import StaleStateError

    world = build_world(tmp_path / "world", rows=8)
    out = (tmp_path / "remote" / "out").as_uri()

    def cfg(**sections):
        return MergeConfig.model_validate(tiny_merge_config(world, Path("x"), output_dir=out, **sections)).with_absolute_paths()

    fingerprint.record(cfg(), out, "distill")
    assert "distill" in json.loads((tmp_path / "remote" / "out" / "fingerprints.json").read_text())
    state = tmp_path / "remote" / "out" / "ray_results" / "test-merge-distill" / "checkpoint_000001"
    state.mkdir(parents=True)
    (state / "state.pt").write_bytes(b"x")
    fingerprint.check_resume(cfg(), out, ["distill"])  # same settings: resume
    with pytest.raises(StaleStateError, match="distill.lr"):
        fingerprint.check_resume(cfg(distill={"lr": 1e-3}), out, ["distill"])
    removed = fingerprint.discard_state(cfg(), out)
    assert out + "/ray_results/test-merge-distill" in removed and out + "/fingerprints.json" in removed
    assert not state.exists()
    fingerprint.check_resume(cfg(distill={"lr": 1e-3}), out, ["distill"])


def test_serve_downloads_a_merged_model_from_a_uri(tmp_path):
    from serve.config import ServeConfig
    from serve.model import ModelLoadError, resolve_model_location

    model = _pipeline_like(tmp_path / "store" / "merged")
    assert ServeConfig(model=model.as_uri()).model_location() == model.as_uri()
    got = resolve_model_location(model.as_uri(), tmp_path / "download")
    assert got.is_relative_to(tmp_path / "download") and _tree(got) == _tree(model)
    with pytest.raises(ModelLoadError, match="could not download"):
        resolve_model_location((tmp_path / "missing").as_uri(), tmp_path / "download2")


def test_readers_never_load_a_half_uploaded_model_and_read_the_previous_one_kept_aside(tmp_path, monkeypatch, caplog):
    """Finding: Serve, load_dmm_pipeline and jobs/export.py downloaded whatever a cut-short upload left at a model
    URI and failed on it without saying why or what to do. A folder without model_index.json is refused naming
    the fix (re-run the merge); while an interrupted upload left the previous model complete as merged.old, that
    is what they load (a warning), as a local merged.old is read in place."""
    from dmm_ray.export_tracking import resolve_model
    from dmm_ray.tracking import TrackingError
    from serve.model import ModelLoadError, resolve_model_location

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    store = tmp_path / "bucket" / "merges" / "toy"
    merged = _pipeline_like(store / "merged", "new")
    (merged / "model_index.json").unlink()  # an upload cut short: every file but the one written last
    uri = merged.as_uri()
    fix = "re-run the merge that writes it"
    with pytest.raises(ModelLoadError, match=f"could not download .*not a complete model: it has no model_index.json.*{fix}"):
        resolve_model_location(uri, tmp_path / "serve")
    with pytest.raises(TrackingError, match=f"not a complete model.*{fix}"):
        with resolve_model(uri):
            pass
    with pytest.raises(FileNotFoundError, match=fix):
        fsu.local_copy(uri, model=True)

    previous = _tree(_pipeline_like(store / "merged.old", "previous"))  # the upload stopped while it replaced the model
    with caplog.at_level("WARNING", logger="dmm_ray.data.fs"):
        assert _tree(resolve_model_location(uri, tmp_path / "serve2")) == previous
    assert "loading the previous model from " + uri + ".old" in caplog.text
    with resolve_model(uri) as (folder, _, _):
        assert _tree(folder) == previous
    assert sorted(p.name for p in store.iterdir()) == ["merged", "merged.old"]  # readers write nothing there
    fs, path = fsu.resolve(uri)
    assert fsu.recover_model(fs, path) == [f"restored {path} from merged.old (an upload that replaced it was interrupted)"]
    assert _tree(store / "merged") == previous and sorted(p.name for p in store.iterdir()) == ["merged"]


def test_the_dry_run_says_what_an_interrupted_upload_left_at_a_uri_output_dir(tmp_path, monkeypatch):
    """Finding: the merge puts back, at its start, a model an interrupted upload left only as merged.old at the
    output_dir URI (and removes evaluation.tmp and the like), but jobs/merge.py --dry-run, which says what a run
    would put back and remove in the folder, said nothing of it. It says it, changing nothing."""
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray import merge
    from dmm_ray.config import MergeConfig

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    world = build_world(tmp_path / "world", rows=8)
    remote = tmp_path / "bucket" / "merges" / "toy"
    _pipeline_like(remote / "merged.old", "previous")
    (_pipeline_like(remote / "merged", "half") / "model_index.json").unlink()
    _evaluation_like(remote / "evaluation.tmp", "half")
    cfg = MergeConfig.model_validate(tiny_merge_config(world, Path("x"), output_dir=remote.as_uri()))
    before = {p: p.read_bytes() for p in remote.rglob("*") if p.is_file()}
    assert merge.check_before_run(cfg) == [
        f"a run would first restore {remote / 'merged'} from merged.old (an upload that replaced it was interrupted)",
        f"a run would first remove {remote / 'evaluation.tmp'} left behind by an interrupted upload",
    ]
    assert {p: p.read_bytes() for p in remote.rglob("*") if p.is_file()} == before  # nothing changed
    fs, path = fsu.resolve(str(remote / "merged"))
    assert fsu.recover_model(fs, path) == [f"restored {path} from merged.old (an upload that replaced it was interrupted)"]


@pytest.mark.ray
@pytest.mark.slow  # 60 s on 2 cores; the default run merges at a file URI in test_packed_merge_with_synthetic_mixing_*
def test_merge_to_a_file_uri_writes_a_loadable_model_there(ray_cluster, tmp_path, capsys):
    """A tiny merge (2 distill steps, synthesis and evaluation off) with output_dir=file://...:
    checkpoints, fingerprints and the merged model land at the URI; local work in the staging folder. An
    earlier upload cut short while it replaced the model (merged/ half-written, the previous model in
    merged.old/) is undone at the start, and the new model replaces it through merged.tmp/ and merged.old/,
    both gone at the end."""
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray import paths
    from dmm_ray.config import MergeConfig
    from dmm_ray.merge import run_merge
    from dmm_ray.pipeline import load_dmm_pipeline

    world = build_world(tmp_path / "world")
    remote = tmp_path / "bucket" / "merges" / "toy"
    uri = remote.as_uri()
    cfg = MergeConfig.model_validate(tiny_merge_config(world, Path("x"), output_dir=uri, synthesis={"enabled": False}))
    _pipeline_like(remote / "merged.old", "previous")
    (_pipeline_like(remote / "merged", "half") / "model_index.json").unlink()
    result = run_merge(cfg)
    assert "restored " + str(remote / "merged") + " from merged.old" in capsys.readouterr().out
    assert sorted(p.name for p in remote.iterdir() if p.name.startswith("merged")) == ["merged"]
    assert result.location == uri + "/merged" and result.stage_metrics["distill"]["step"] == 2
    assert (remote / "merged" / "model_index.json").is_file() and (remote / "merged" / "dmm_merge.json").is_file()
    assert "distill" in json.loads((remote / "fingerprints.json").read_text())
    assert list((remote / "ray_results" / "test-merge-distill").glob("**/checkpoint_*")), "checkpoints went through Ray Train's storage"
    staging = paths.staging_dir(uri)
    assert result.merged_path == staging / "merged" and not (staging / "merge.lock").exists()
    assert not (staging / "ray_results").exists()
    pipe = load_dmm_pipeline(uri + "/merged")
    assert pipe.styles == ["style0", "style1"]


@pytest.mark.ray
@pytest.mark.slow  # synthesis actors + two Train stages: minutes on 2 cores
def test_synthesis_and_finetune_read_and_write_at_a_file_uri(ray_cluster, tmp_path):
    """Synthesized shards go to <output_dir>/synthesized and the fine-tune's workers read the distilled
    student and training state from <output_dir>/stages (never the driver's staging folder)."""
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray import paths
    from dmm_ray.config import MergeConfig
    from dmm_ray.merge import run_merge
    from dmm_ray.pipeline import load_dmm_pipeline

    world = build_world(tmp_path / "world")
    remote = tmp_path / "bucket" / "merges" / "toy"
    uri = remote.as_uri()
    cfg = MergeConfig.model_validate(tiny_merge_config(world, Path("x"), output_dir=uri, synthesis={"finetune_continue": True}))
    result = run_merge(cfg)
    assert result.stage_metrics["finetune"]["step"] == 2
    assert sorted(p.name for p in (remote / "synthesized").iterdir()) == ["style_0", "style_1"]
    assert (remote / "stages" / "distill_student" / "config.json").is_file() and (remote / "stages" / "distill_state").is_dir()
    assert not (paths.staging_dir(uri) / "synthesized").exists()
    assert set(json.loads((remote / "fingerprints.json").read_text())) == {"synthesize", "distill", "finetune", "training_run"}
    assert load_dmm_pipeline(uri + "/merged").styles == ["style0", "style1"]


SAVE_AGAIN = """
import shutil, sys
from pathlib import Path
from dmm_ray.merged_model import staged
with staged(Path(sys.argv[1])) as tmp:  # a local merge's save: merged.tmp, its two renames, the previous model removed
    shutil.copytree(sys.argv[2], tmp, dirs_exist_ok=True, copy_function=shutil.copyfile)  # new files, as a save writes them
"""


@pytest.mark.parametrize("reader", ["local_copy", "serve", "export"])
def test_a_file_uri_model_saved_again_while_it_is_downloaded_is_refused_not_taken_mixed(reader, tmp_path, monkeypatch):
    """Finding: a file:// model (Serve's model, jobs/export.py --model, load_dmm_pipeline) was downloaded file by
    file, and the copy passed when it held model_index.json, which both models of a local merge's save have (it
    swaps the folder with two renames, not an upload's marker-last copy): a save in another process part-way
    through the download gave a copy of two models' files (and one whose previous model was removed under it, a copy
    that lost files), loaded as the model. A model is downloaded as an upload writes it now, model_index.json last,
    and refused, nothing moved into place, when the folder listed again is not the one it copied."""
    import subprocess
    import sys

    from dmm_ray.export_tracking import resolve_model
    from serve.model import resolve_model_location

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    merged = _pipeline_like(tmp_path / "out" / "merged", "first")
    second = _pipeline_like(tmp_path / "second", "second")
    real, env, saved = pafs.copy_files, {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, []

    def copy_files(source, dest, **kwargs):
        if not saved:  # a merge in another process saves its model there after the download's first file
            subprocess.run([sys.executable, "-c", SAVE_AGAIN, str(merged), str(second)], check=True, env=env, capture_output=True)
            saved.append(source)
        return real(source, dest, **kwargs)

    monkeypatch.setattr(pafs, "copy_files", copy_files)
    changed = f"{merged.as_uri()} changed while it was downloaded .*load it again"
    if reader == "local_copy":
        with pytest.raises(FileNotFoundError, match=changed):
            fsu.local_copy(merged.as_uri(), tmp_path / "copy", model=True)
    elif reader == "serve":
        from serve.model import ModelLoadError

        with pytest.raises(ModelLoadError, match=f"could not download the merged model .*{changed}"):
            resolve_model_location(merged.as_uri(), tmp_path / "serve")
    else:
        from dmm_ray.tracking import TrackingError

        with pytest.raises(TrackingError, match=f"cannot read --model .*{changed}"):
            with resolve_model(merged.as_uri()):
                pass
    assert saved and _tree(merged) == _tree(second)  # the save did land part-way
    assert not (tmp_path / "copy").exists() and not list(tmp_path.glob("copy.part-*"))  # nothing of the copy left
    saved.append("done")  # no merge saves now: the same download is the model
    assert _tree(fsu.local_copy(merged.as_uri(), tmp_path / "again", model=True)) == _tree(second)
