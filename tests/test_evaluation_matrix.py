"""FID matrix with tiny pipelines, in-process (no Ray): labels, outputs, teacher-statistics cache."""

import csv
import json
from functools import partial

import numpy as np
import pytest
from eval_helpers import SeededConvExtractor, routing_student, tiny_teacher_pipeline

from dmm_ray.evaluation.config import EvalConfig, SamplerConfig
from dmm_ray.evaluation.matrix import StudentSource, evaluate_sources
from dmm_ray.evaluation.outputs import format_table, write_outputs
from dmm_ray.evaluation.stats import ModelSource

NAMES = ["watercolor", "pixel art"]
SEEDS = [0, 7]


class CountingFactory:
    """Pipeline factory that counts how often a pipeline was built (in-process mode)."""

    def __init__(self, seed):
        self.seed, self.calls = seed, 0

    def __call__(self):
        self.calls += 1
        return tiny_teacher_pipeline(self.seed)


def _config(tmp_path, **kw):
    base = dict(
        prompts=["a red circle", "a blue square"],
        images_per_prompt=1,
        sampler=SamplerConfig(num_inference_steps=2),
        batch_size=4,
        use_ray=False,
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        grid_prompts=2,
    )
    base.update(kw)
    return EvalConfig(**base)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    factories = [CountingFactory(s) for s in SEEDS]
    teachers = [ModelSource(n, f, checksum=f"tiny-{s}") for n, f, s in zip(NAMES, factories, SEEDS)]
    student = StudentSource(partial(routing_student, NAMES, SEEDS), NAMES)
    extractor = SeededConvExtractor(seed=0)
    cfg = _config(tmp)
    result = evaluate_sources(student, teachers, cfg, extractor)
    return dict(tmp=tmp, factories=factories, teachers=teachers, student=student, extractor=extractor, cfg=cfg, result=result)


def test_matrix_shape_labels_and_perfect_student(first_run):
    r = first_run["result"]
    assert r.style_names == NAMES
    assert r.matrix.shape == r.ref_matrix.shape == (2, 2)
    assert np.isfinite(r.matrix).all() and (r.ref_matrix >= 0).all()
    # The routing student *is* the teachers, on the same seed set A: M must equal M_ref exactly.
    np.testing.assert_allclose(r.matrix, r.ref_matrix, rtol=0, atol=1e-12)
    assert r.fidt == pytest.approx(np.trace(r.ref_matrix)) and r.ratio == pytest.approx(1.0)
    # Teachers are different networks: off-diagonal FID exceeds the diagonal's on average.
    assert r.ref_matrix[0, 1] + r.ref_matrix[1, 0] > r.ref_matrix[0, 0] + r.ref_matrix[1, 1]
    assert r.images_per_set == 2
    assert sorted(r.generated) == sorted(
        ["teacher/watercolor/A", "teacher/watercolor/B", "teacher/pixel art/A", "teacher/pixel art/B", "student/watercolor", "student/pixel art"]
    )
    assert r.student_previews["watercolor"].shape[0] == 2 and r.student_previews["watercolor"].dtype == np.uint8


def test_outputs_are_labelled_with_style_names(first_run):
    r = first_run["result"]
    paths = write_outputs(r, first_run["tmp"] / "out")
    data = json.loads(paths["json"].read_text())
    assert data["styles"] == NAMES and np.allclose(data["M"], r.matrix) and data["FIDt"] == pytest.approx(r.fidt)
    assert set(data["diagonal"]) == set(NAMES)
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == ["M", "teacher:watercolor", "teacher:pixel art"]
    assert [row[0] for row in rows[1:]] == ["student:watercolor", "student:pixel art"]
    assert float(rows[1][2]) == pytest.approx(r.matrix[0, 1], abs=1e-6)
    for key in ("heatmaps", "grid"):
        assert paths[key].stat().st_size > 1000 and paths[key].read_bytes()[:4] == b"\x89PNG"
    table = format_table(r)
    assert "FIDt" in table and "watercolor" in table and "1.000" in table


def test_outputs_interrupted_while_plotting_leave_the_previous_set_whole(first_run, monkeypatch):
    """Finding: write_outputs wrote fid_matrix.json and the CSVs in place before the plots (a second or
    two), so a Ctrl-C there left this run's matrices beside the previous run's heatmaps and grid (a
    2-style evaluation's JSON with an 8-style fid_heatmaps.png). Every file is staged now and all are
    renamed in at the end: the previous set stays whole, and nothing staged is left behind."""
    import dataclasses

    import dmm_ray.evaluation.outputs as outputs

    out = first_run["tmp"] / "out_interrupted"
    write_outputs(first_run["result"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = dataclasses.replace(first_run["result"], matrix=first_run["result"].matrix + 1.0)  # another run's numbers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "plot_grid", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(other, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    paths = write_outputs(other, out)
    assert json.loads(paths["json"].read_text())["FIDt"] == pytest.approx(other.fidt) and sorted(p.name for p in out.iterdir()) == sorted(before)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_style_mixing_outputs_interrupted_while_plotting_leave_the_previous_set_whole(tmp_path, monkeypatch, error):
    """mixing.{json,csv,png} and interpolation.{json,csv,png} (jobs/style_mixing.py) were written in place,
    JSON and CSV before the plot: a failure or Ctrl-C while plotting left this run's numbers beside the
    previous run's figure. They are staged and renamed in together now, as write_outputs' set is."""
    import matplotlib.figure
    import numpy as np

    from dmm_ray.evaluation.mixing import MixingResult, SweepResult

    def mixing(v):
        return MixingResult(rows=["DMM mix", "weighted merge"], columns=["a", "b", "union"], table=np.full((2, 3), v), group=["a", "b"])

    def sweep(v):
        return SweepResult(style_a="a", style_b="b", weights=[0.0, 1.0], fid_a=[v, 2 * v], fid_b=[2 * v, v])

    for result in (mixing, sweep):
        result(1.0).write(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(before) == 6

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    for result in (mixing, sweep):
        with pytest.raises(type(error)):
            result(7.0).write(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    for result in (mixing, sweep):
        paths = result(7.0).write(tmp_path)
        assert "7.0" in paths["csv"].read_text() and all(p.is_file() for p in paths.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_cache_hit_generates_no_teacher_images(first_run):
    assert [f.calls for f in first_run["factories"]] == [1, 1]
    again = evaluate_sources(first_run["student"], first_run["teachers"], first_run["cfg"], first_run["extractor"])
    assert [f.calls for f in first_run["factories"]] == [1, 1]  # no teacher pipeline was even built
    assert sorted(again.generated) == ["student/pixel art", "student/watercolor"]
    np.testing.assert_allclose(again.ref_matrix, first_run["result"].ref_matrix, rtol=0, atol=0)
    np.testing.assert_allclose(again.matrix, first_run["result"].matrix, atol=1e-12)
    # The teacher previews for the style grid come from the cache too.
    np.testing.assert_array_equal(again.teacher_previews["watercolor"], first_run["result"].teacher_previews["watercolor"])


def test_cache_key_changes_with_extractor(first_run):
    other = SeededConvExtractor(seed=1)
    r = evaluate_sources(None, first_run["teachers"][:1], first_run["cfg"], other, prompts=["a red circle", "a green star"])
    assert sorted(r.generated) == ["teacher/watercolor/A", "teacher/watercolor/B"]
    assert first_run["factories"][0].calls == 2
    assert np.isnan(r.matrix).all() and r.ref_matrix.shape == (1, 1)


def test_student_must_have_every_teacher_style(first_run):
    student = StudentSource(first_run["student"].pipeline_factory, ["watercolor", "oil"])
    with pytest.raises(ValueError, match="no style named \\['pixel art'\\]"):
        evaluate_sources(student, first_run["teachers"], first_run["cfg"], first_run["extractor"])


def test_teacher_statistics_are_cached_as_each_job_finishes(tmp_path):
    """Finding: teacher statistics were saved to the cache only after every job had finished, so a
    Ctrl-C during the student's sampling (or a student that failed) kept none of the teachers already
    sampled, although evaluate.py's interrupt line says they stay in cache_dir, and the re-run sampled
    them all again. Each job's statistics are cached as it finishes now."""
    factories = [CountingFactory(s) for s in SEEDS]
    teachers = [ModelSource(n, f, checksum=f"tiny-{s}") for n, f, s in zip(NAMES, factories, SEEDS)]

    def interrupted_student():
        raise KeyboardInterrupt

    cfg = _config(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # the teachers' jobs run first (in-process: in request order), then the student's
        evaluate_sources(StudentSource(interrupted_student, NAMES), teachers, cfg, SeededConvExtractor(seed=0))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # two teachers x seed sets A and B
    again = evaluate_sources(StudentSource(partial(routing_student, NAMES, SEEDS), NAMES), teachers, cfg, SeededConvExtractor(seed=0))
    assert [f.calls for f in factories] == [1, 1] and sorted(again.generated) == ["student/pixel art", "student/watercolor"]
