"""The benchmark scripts the README quotes numbers from must not rot between the sessions that run them.

Every script parses `--help` (its argument parser and module-level imports, in this process); the
ones with no other test of their own run their cheapest real path here. The others are run by
tests/test_fast.py (fast_speed), test_packing.py (gpu_distill, packing_equivalence), test_regions.py
(regions), test_serve_load.py (serve_load_fault) and test_training_options.py (table1)."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name != "step_setup.py")  # step_setup: a module, no CLI


def test_every_benchmark_script_is_covered():
    assert len(SCRIPTS) >= 14 and all(s.read_text().count('if __name__ == "__main__":') == 1 for s in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and script.name in out.splitlines()[0]


class _Parsed(BaseException):  # BaseException: passes the scripts' own error handlers
    pass


def _usage_examples(script: Path) -> list[list[str]]:
    """The argument lists of the `python benchmarks/<script> ...` lines in the script's docstring (its --help);
    `[--flag value]` usage brackets dropped, a trailing `...` (more flags) ignored."""
    doc = re.sub(r"\\\n\s*", " ", ast.get_docstring(ast.parse(script.read_text())) or "")
    examples = []
    for line in doc.splitlines():
        if line.strip().startswith(f"python benchmarks/{script.name} "):  # (prose lines may hold a lone apostrophe)
            words = [w[1:] if w.startswith("[-") else w for w in shlex.split(line, comments=True)[2:] if w != "..."]
            examples.append([w[:-1] if w.endswith("]") and "[" not in w else w for w in words])
    return examples


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_the_usage_examples_in_a_benchmarks_help_parse(script, monkeypatch, capsys):
    """A command the --help shows must get past the script's own parser (fast_fidt.py's four examples lacked
    its required --out: each one was a usage error). Only parsed: main() stops right after parse_args."""
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    for argv in _usage_examples(script):
        monkeypatch.setattr(sys, "argv", [str(script), *argv])
        try:
            runpy.run_path(str(script), run_name="__main__")
        except _Parsed:
            continue
        except SystemExit:
            pytest.fail(f"{script.name} {shlex.join(argv)} (from its --help): {capsys.readouterr().err.strip()}")
        pytest.fail(f"{script.name} {shlex.join(argv)} (from its --help) returned without parsing its arguments")


def test_serve_styles_refuses_a_merged_model_it_would_not_measure(tmp_path, monkeypatch, capsys):
    """serve_styles.py --merged M without --zoo measured the tiny models built in code (M ignored); with
    --zoo and no --merged it read REPO/outputs/toy/merged, which nothing writes. Both are usage errors
    now, before Ray starts; the default is the demo's $DMM_HOME/outputs/dmm-toy/merged."""
    monkeypatch.setenv("DMM_HOME", str(tmp_path))
    for argv, message in [
        (["--merged", str(tmp_path)], "--merged needs --zoo"),
        (["--zoo", str(tmp_path)], f"--merged {tmp_path}/outputs/dmm-toy/merged is not a merged model folder"),
    ]:
        monkeypatch.setattr(sys, "argv", ["serve_styles.py", *argv])
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(REPO / "benchmarks/serve_styles.py"), run_name="__main__")
        assert stop.value.code == 2 and message in capsys.readouterr().err, argv


@pytest.mark.parametrize(
    "script, argv", [("fidelity_curve", ["--steps", "100,abc"]), ("fast_fidt", ["--model", "m", "--steps", "0"]), ("table1", ["--rows", "x"])]
)
def test_a_bad_number_list_is_a_usage_error(script, argv, monkeypatch, capsys):
    """`--steps 100,abc` was a ValueError traceback (after the output folder was made): a usage error now."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / f"benchmarks/{script}.py"), run_name="__main__")
    assert stop.value.code == 2 and "expected comma-separated positive integers" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("serve_load_fault", ["--concurrency", "0"], "argument --concurrency: expected a positive integer"),
        ("serve_load_fault", ["--requests", "-5"], "argument --requests: expected a positive integer"),
        ("serve_load_fault", ["--malformed", "1.5"], "argument --malformed: expected a share between 0 and 1"),
        ("serve_load_fault", ["--overload", "-1"], "argument --overload: expected a number of 0 or more"),
        ("serve_load_fault", ["--overload-s", "0"], "argument --overload-s: expected a number above 0"),
        ("serve_load_fault", ["--model", "{tmp}/nowhere"], "--model: merged-model folder '{tmp}/nowhere' does not exist"),
        ("serve_load_fault", ["--model", "{tmp}"], "is not a merged-model folder"),
        # $DMM_HOME (and ~) expanded as the app expands it for its replicas: refused as '$DMM_HOME/nowhere' before
        ("serve_load_fault", ["--model", "$DMM_HOME/nowhere"], "--model: merged-model folder '{tmp}/home/nowhere' does not exist"),
        ("serve_styles", ["--concurrency", "0"], "argument --concurrency: expected a positive integer"),
        ("serve_styles", ["--max-models", "0"], "argument --max-models: expected a positive integer"),
        ("serve_styles", ["--num-cpus", "-2"], "argument --num-cpus: expected a positive integer"),
    ],
)
def test_serve_benchmarks_refuse_bad_numbers_and_models_before_ray_starts(script, argv, message, tmp_path, monkeypatch, capsys):
    """`--concurrency 0` started Ray and Serve, deployed the model, sent nothing and failed on the missing results
    (an AttributeError traceback); negative counts, a --malformed share above 1 (silently no malformed requests)
    and a --model folder that is not there (each replica's start failed in turn) likewise got past the parser.
    Each is a usage error (exit 2) now, before Ray starts."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *(a.format(tmp=tmp_path) for a in argv)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / f"benchmarks/{script}.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message.format(tmp=tmp_path) in err, err


def test_train_throughput_dry_run_plans_the_sd15_step_on_meta_tensors():
    """The SD1.5 architecture on meta tensors: no weights, no Ray; it must still build the real step."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--dry-run"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the SD1.5 UNet (859.5M), and the style codebook + MLP the README counts for 8 styles (3,289,600)
    assert '"teacher_params": 859520964' in proc.stdout and '"extra_style_params": 3289600' in proc.stdout, proc.stdout[-2000:]


def _fake_curve_runs(monkeypatch, tmp_path, fail_evaluation: bool = False) -> tuple:
    """benchmarks/fidelity_curve.py on a tiny merge config, its subprocesses faked (no Ray, no torch): a
    merge records its config as jobs/merge.py does (merge_complete.json) and writes an evaluation whose
    M(i, i) is 1 + its distill.lambda_feat; an evaluation (jobs/evaluate.py) writes one with M(i, i) = 3, or
    fails with `fail_evaluation`. Every command line is recorded."""
    import json

    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray.completion import record_finished
    from dmm_ray.config import load_config
    from dmm_ray.merge import COMPLETE_RECORD, _merge_request

    sys.path.insert(0, str(REPO / "benchmarks"))
    import fidelity_curve

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    world = {"base": str(tmp_path / "base"), "teachers": [{"name": n, "source": str(tmp_path / n)} for n in "ab"], "shards": str(tmp_path / "shards")}
    config = tmp_path / "c.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "unused") | {"tracking": {"enabled": False}}))
    runs = []
    real_run = subprocess.run

    def run(cmd, *args, stdout=None, **kwargs):
        if not (isinstance(cmd, list) and len(cmd) > 1 and str(cmd[1]).endswith(("merge.py", "evaluate.py"))):
            # not a job: e.g. matplotlib's first import runs `fc-list` (through subprocess.run) to build its font
            # cache, and got a fake result with no output (a TypeError) on a machine without that cache yet
            return real_run(cmd, *args, stdout=stdout, **kwargs)
        runs.append(cmd)
        if cmd[1].endswith("merge.py"):
            cfg = load_config(cmd[3], cmd[5::2])
            out = Path(cfg.output_dir)
            (out / "merged").mkdir(parents=True)
            (out / "merged" / "model_index.json").write_text("{}")
            (out / "evaluation").mkdir()
            m = 1 + cfg.distill.lambda_feat
            (out / "evaluation" / "fid_matrix.json").write_text(json.dumps({"styles": ["a", "b"], "M": [[m, 9], [9, m]], "M_ref": [[1, 9], [9, 1]]}))
            record_finished(out, COMPLETE_RECORD, _merge_request(cfg), location=str(out / "merged"))
            stdout.write("merged model saved: x (5 s since start: distill 4 s)\n")
        elif cmd[1].endswith("evaluate.py") and not fail_evaluation:
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "fid_matrix.json").write_text(json.dumps({"styles": ["a", "b"], "M": [[3, 9], [9, 3]], "M_ref": [[1, 9], [9, 1]]}))
        else:
            return subprocess.CompletedProcess(cmd, 1)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fidelity_curve.subprocess, "run", run)
    return fidelity_curve, config, runs


def test_fidelity_curve_reads_back_a_point_only_of_the_same_merge(tmp_path, monkeypatch, capsys):
    """Finding: a point folder holding a finished point was read back whatever was asked now, so a re-run
    with another --set (distill.lambda_feat=3) and the same --out/--label printed, plotted and logged the
    first merge's numbers under the new settings. Read back now only when the folder's merge ran with
    this config (its merge_complete.json); else refused, naming what differs."""
    fc, config, runs = _fake_curve_runs(monkeypatch, tmp_path)
    argv = ["--config", str(config), "--steps", "2", "--out", str(tmp_path / "curve"), "--label", "x"]
    assert fc.main([*argv, "--set", "distill.lambda_feat=1"]) == 0 and len(runs) == 1
    assert "ratio 2.000" in capsys.readouterr().out
    assert fc.main([*argv, "--set", "distill.lambda_feat=1"]) == 0 and len(runs) == 1  # the same merge: read back
    assert "ratio 2.000" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "curve" / "x" / "steps_2" / "merged")  # a point outlives its model (pruned to save disk)
    assert fc.main([*argv, "--set", "distill.lambda_feat=1"]) == 0 and len(runs) == 1
    record = tmp_path / "curve" / "x" / "steps_2" / "merge_complete.json"
    written = json.loads(record.read_text())
    del written["asked"]["teachers"]  # a point whose merge recorded no teachers' checksums yet: compared by its config
    record.write_text(json.dumps(written))
    assert fc.main([*argv, "--set", "distill.lambda_feat=1"]) == 0 and len(runs) == 1
    with pytest.raises(SystemExit, match=r"steps_2 holds the point of another merge \(distill\.lambda_feat 1\.0 -> 3\.0\); remove it"):
        fc.main([*argv, "--set", "distill.lambda_feat=3"])
    assert len(runs) == 1


def test_a_curve_point_stopped_while_it_was_written_is_not_read_back_cut_short(tmp_path, monkeypatch, capsys):
    """Finding: point.json was written in place, and a run reads back the point.json it finds: one stopped
    during that write (Ctrl-C, a full disk) left a cut-short file, and every later run stopped with
    'error: Unterminated string starting at: line 4 column 2' (no file named). A stop now leaves no
    point.json; the next run says what to do."""
    from dmm_ray.data import fs as fsu

    fc, config, runs = _fake_curve_runs(monkeypatch, tmp_path)

    def stopped_half_way(path, data: bytes):
        Path(path).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    class Stopping:  # a filesystem whose writes stop half-way (the new write goes through fsu)
        def __init__(self, fs):
            self.fs = fs

        def open_output_stream(self, path):
            class Stream:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return False

                def write(self, data):
                    stopped_half_way(path, data)

            return Stream()

        def __getattr__(self, name):
            return getattr(self.fs, name)

    resolve = fsu.resolve
    with monkeypatch.context() as patch:
        patch.setattr(
            Path,
            "write_text",
            lambda self, text, *a, **k: stopped_half_way(self, text.encode()) if self.name == "point.json" else Path.write_bytes(self, text.encode()),
        )
        patch.setattr(fsu, "resolve", lambda location: (Stopping(resolve(location)[0]), resolve(location)[1]))
        argv = ["--config", str(config), "--steps", "2", "--out", str(tmp_path / "curve"), "--label", "x"]
        with pytest.raises(KeyboardInterrupt):
            fc.main(argv)
    assert not (tmp_path / "curve" / "x" / "steps_2" / "point.json").exists()
    with pytest.raises(SystemExit, match=r"steps_2 exists without a finished point; remove it"):
        fc.main(argv)


def test_fidelity_curves_second_seed_sets_evaluate_the_merge_as_it_ran(tmp_path, monkeypatch, capsys):
    """Finding: --seed-sets 2 ran jobs/evaluate.py on the bare --config, without the curve's --set
    overrides: the second pair of seed sets was measured with the preset's prompts, images and
    sampler (or failed when only an override named the zoo), and a failure was a traceback. It now
    reads the merge's own config (merge_config.yaml in the point folder, overrides applied), and a
    failed evaluation stops naming its log."""
    from dmm_ray.evaluation.config import load_eval_config
    from dmm_ray.evaluation.sources import load_eval_setup

    fc, config, runs = _fake_curve_runs(monkeypatch, tmp_path)
    argv = ["--config", str(config), "--steps", "2", "--out", str(tmp_path / "curve"), "--seed-sets", "2", "--set", "evaluation.num_prompts=3"]
    assert fc.main(argv) == 0 and [Path(cmd[1]).name for cmd in runs] == ["merge.py", "evaluate.py"]
    assert "ratio 1.001, diagonal row minimum 2/2, merge 5 s, seed sets 2: ratio 3.000" in capsys.readouterr().out
    cmd = runs[1]
    ev = load_eval_config(cmd[cmd.index("--config") + 1], cmd[cmd.index("--set") + 1 :: 2], cmd[cmd.index("--section") + 1])
    assert (ev.max_prompts, ev.seed_a, ev.seed_b) == (3, 2_000_000, 3_000_000)  # the merge's evaluation, on the second seed sets
    assert [t.name for t in load_eval_setup(cmd[cmd.index("--teachers") + 1]).teachers] == ["a", "b"]

    fc, config, runs = _fake_curve_runs(monkeypatch, tmp_path / "again", fail_evaluation=True)
    with pytest.raises(SystemExit, match=r"the second seed-set evaluation at 2 steps failed \(exit 1\); see .*steps_2/evaluate_seeds2\.log"):
        fc.main(["--config", str(config), *argv[2:5], str(tmp_path / "again" / "curve"), *argv[6:]])


def test_a_second_curve_of_one_label_logs_to_its_mlflow_project_with_other_settings(tmp_path, monkeypatch, capsys):
    """Finding: the curve's label and --set list were params of the project's parent run, which every curve
    of one --label shares; a second curve with other settings (another --out and --set) failed at its very
    end, after all its merges, with MLflow's "Changing param values is not allowed". They are tags now,
    the curve logged last's, beside its metrics and files."""
    from mlflow import MlflowClient

    fc, config, runs = _fake_curve_runs(monkeypatch, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--config", str(config), "--steps", "2", "--label", "x", "--set", "tracking.enabled=true", "--set", f"tracking.uri={uri}"]
    assert fc.main([*argv, "--out", str(tmp_path / "one"), "--set", "distill.lambda_feat=1"]) == 0
    assert fc.main([*argv, "--out", str(tmp_path / "two"), "--set", "distill.lambda_feat=2"]) == 0
    assert "ratio 3.000" in capsys.readouterr().out and len(runs) == 2
    (parent,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("dmm-ray").experiment_id])
    assert parent.data.tags["dmm.curve.label"] == "x" and "distill.lambda_feat=2" in parent.data.tags["dmm.curve.overrides"]
    assert [m.value for m in MlflowClient(uri).get_metric_history(parent.info.run_id, "curve/FIDt_ratio")] == [2.0, 3.0]


@pytest.mark.parametrize("script", ["fidelity_curve", "table1"])
def test_a_bad_config_is_one_error_line_and_makes_no_folder(script, tmp_path, monkeypatch, capsys):
    """A missing or invalid --config was a ConfigError traceback (exit 1), and fidelity_curve.py made
    `<out>/<label>` first: now one `error:` line and exit 2, as the jobs give, and nothing under --out."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    module = __import__(script)
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: {steps: abc}\n")
    for config, message in [(tmp_path / "missing.yaml", "missing.yaml does not exist"), (bad, "distill.steps: Input should be a valid integer")]:
        assert module.main(["--config", str(config), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()


def test_table1_rows_run_one_at_a_time_build_up_one_table(tmp_path, monkeypatch, capsys):
    """Finding: `table1.py --rows 2` rewrote table1.md with row 2 alone, dropping row 1 measured before
    with the same --out. The table now holds every row whose folder has a point of this config and
    --set (read back, not re-run); a row of another merge is left out, said so."""
    fc, config, runs = _fake_curve_runs(monkeypatch, tmp_path)
    import table1

    out = tmp_path / "t1"
    argv = ["--config", str(config), "--out", str(out)]
    assert table1.main([*argv, "--rows", "1"]) == 0 and len(runs) == 1
    assert table1.main([*argv, "--rows", "2"]) == 0 and len(runs) == 2
    table = (out / "table1.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| score distillation only", "| + feature imitation (λ 0.001)"], table
    assert table[2].split(" | ")[3] == "1.000" and table[3].split(" | ")[3] == "1.001"  # M(i, i) = 1 + lambda_feat
    capsys.readouterr()

    # another --set: rows 1 and 2 are another merge's points, not this table's
    assert table1.main([*argv, "--rows", "3", "--set", "distill.lr=0.001"]) == 0 and len(runs) == 3
    assert "row 1: " in capsys.readouterr().out
    table = (out / "table1.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| + multi-class adversarial (λ 0.01)"], table
    assert not (out / "table1.md.tmp").exists()


def test_fast_fidt_takes_the_teachers_the_few_step_folder_records_when_its_merged_model_moved(tmp_path, capsys):
    """Finding: fast_fidt.py read the teachers only from the merged folder the few-step model's fast.json
    names; once that folder moved it used --config's teachers without a word, though the few-step
    folder carries its merge's dmm_merge.json. Now: that record, else the merged folder's, else the
    config's with a note."""
    import json
    from types import SimpleNamespace

    model_teachers = runpy.run_path(str(REPO / "benchmarks" / "fast_fidt.py"))["model_teachers"]
    fast = tmp_path / "fast" / "model"
    (fast / "unet").mkdir(parents=True)
    (fast / "unet" / "config.json").write_text(json.dumps({"style_names": ["ink", "neon"]}))
    (fast / "fast.json").write_text(json.dumps({"distilled_from": str(tmp_path / "moved" / "merged")}))
    recorded = [{"name": n, "source": str(tmp_path / "zoo" / n)} for n in ("ink", "neon")]
    (fast / "dmm_merge.json").write_text(json.dumps({"name": "m", "styles": ["ink", "neon"], "teachers": recorded}))
    cfg = SimpleNamespace(teachers=["the config's teachers"])
    assert [(t.name, str(t.source)) for t in model_teachers(cfg, fast)] == [(t["name"], t["source"]) for t in recorded]
    assert capsys.readouterr().err == ""
    (fast / "dmm_merge.json").unlink()
    assert model_teachers(cfg, fast) == ["the config's teachers"]
    assert f"neither {fast} nor the merged model it came from ({tmp_path / 'moved' / 'merged'}) record its teachers" in capsys.readouterr().err


def test_gpu_distill_refuses_a_bad_k_before_building_and_makes_the_json_folder(tmp_path, monkeypatch, capsys):
    """`--ks 1,x` was a ValueError traceback and `--ks 0` a ZeroDivisionError in the first build: usage errors
    now; `--lora-ks ''` still skips. `--json` into a folder not there yet failed with FileNotFoundError after
    every k had been measured (minutes of GPU time lost): the folder is made."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_distill

    for argv in (["--ks", "1,x"], ["--ks", "0"], ["--lora-ks", "2,-1"]):
        with pytest.raises(SystemExit) as stop:
            gpu_distill.main(["--tiny", *argv])
        assert stop.value.code == 2 and "expected comma-separated positive integers" in capsys.readouterr().err, argv
    measured = []

    def fake_measure(k, args, device, kind="full"):
        measured.append((k, kind))
        return {
            "k": k,
            "teachers": kind,
            "rows_per_style": 1,
            "rows_per_step": k,
            "samples_per_s": 1.0,
            "s_per_step": 1.0,
            "peak_gib": 1.0,
            "build_s": 0.0,
        }

    monkeypatch.setattr(gpu_distill, "measure", fake_measure)
    out = tmp_path / "not" / "yet" / "r.json"
    assert gpu_distill.main(["--tiny", "--ks", "1,2", "--lora-ks", "", "--offload-ks", "2", "--json", str(out)]) == 0
    assert measured == [(1, "full"), (2, "full"), (2, "offload")]
    assert [r["k"] for r in json.loads(out.read_text())["results"]] == [1, 2, 2]


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"], ["--latent", "0"], ["--batch", "0"], ["--rows-per-style", "0"]])
def test_gpu_distill_refuses_a_count_below_one(argv, monkeypatch, capsys):
    """`gpu_distill.py --steps 0` timed the default 10 steps (`args.steps or 10`) and `--steps -3` none,
    printing negative samples/s; `--latent 0` meant 64, `--batch 0` one row, `--rows-per-style 0` the
    --batch split. Each is a usage error now, before anything is built."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_distill

    monkeypatch.setattr(gpu_distill, "measure", lambda *a, **k: pytest.fail("measured before the counts were checked"))
    with pytest.raises(SystemExit) as stop:
        gpu_distill.main(["--tiny", *argv])
    assert stop.value.code == 2 and f"argument {argv[0]}: expected a positive integer" in capsys.readouterr().err


def _packing_equivalence_merges_started(monkeypatch, tmp_path, argv) -> list[int]:
    """packing_equivalence.main(argv) with its merge subprocesses faked: the k of each merge started."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import packing_equivalence

    started = []

    def fake_run(cmd, check, env):
        k = int(cmd[cmd.index("--one") + 1])
        started.append(k)
        (tmp_path / f"k{k}.json").write_text(json.dumps({"k": k}))

    monkeypatch.setattr(packing_equivalence.subprocess, "run", fake_run)
    monkeypatch.setattr(packing_equivalence, "compare", lambda results: {"reference_k": 8, "layouts": []})
    with pytest.raises(SystemExit) as stop:
        packing_equivalence.main(["--out", str(tmp_path), *argv])
    assert stop.value.code == 2
    return started


@pytest.mark.parametrize(
    "ks, message", [("8,3", "--ks: 3 does not divide"), ("8,x", "expected comma-separated"), ("8,0", "expected comma-separated")]
)
def test_packing_equivalence_refuses_a_bad_k_before_the_first_merge(ks, message, tmp_path, monkeypatch, capsys):
    """`--ks 8,3` ran the k = 8 merge (minutes) before refusing 3; `--ks 8,x` was a ValueError traceback and
    `--ks 8,0` a ZeroDivisionError after the k = 8 merge. All are usage errors before any merge starts."""
    assert _packing_equivalence_merges_started(monkeypatch, tmp_path, ["--ks", ks]) == []
    assert message in capsys.readouterr().err


def test_packing_equivalence_names_each_layouts_own_worker_count():
    """The throughput line said 'k=4 (W=1) / k=1 (W=8)' for --ks 4,1, whose k = 4 merge ran on W = 2."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import packing_equivalence

    runs = [
        {
            "k": k,
            "workers": w,
            "steps": 2,
            "samples_per_s": s,
            "peak_rss_mb_rank0": 1.0,
            "curves": {},
            "FIDt": None,
            "ratio": None,
            "distill_seconds": 1.0,
        }
        for k, w, s in ((4, 2, 3.0), (1, 8, 1.5))
    ]
    assert packing_equivalence.table(packing_equivalence.compare(runs)).splitlines()[-1] == "throughput k=4 (W=2) / k=1 (W=8): 2.00x"


@pytest.mark.parametrize("fractions", ["0,half", "0,1.5", ""])
def test_serve_styles_refuses_bad_lora_fractions_before_ray_starts(fractions, monkeypatch, capsys):
    """`--lora-fractions 0,half` was read after Ray and Serve had started (about a minute on a busy machine),
    then a ValueError traceback; `0,1.5` (a share of requests above 1) was taken as is. Usage errors now."""
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before --lora-fractions was checked")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(sys, "argv", ["serve_styles.py", "--lora-fractions", fractions])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "benchmarks/serve_styles.py"), run_name="__main__")
    assert stop.value.code == 2 and "expected comma-separated shares of requests between 0 and 1" in capsys.readouterr().err


@pytest.mark.parametrize("fail", [False, True], ids=["done", "failed"])
def test_serve_styles_lora_run_leaves_no_adapter_folder_behind(fail, tmp_path, monkeypatch):
    """`serve_styles.py --lora-fractions` wrote its LoRA adapter to a mkdtemp folder (/tmp/dmm-bench-lora-*)
    and never removed it. The folder lives while the deployments and the in-process cost read the file,
    and goes at the end, on failure too. Serve, the model and the measurements are faked: only the files
    are real."""
    import tempfile

    import httpx
    from ray import serve as ray_serve

    import dmm_ray.models.style_unet as style_unet
    import dmm_ray.tiny_plugins as tiny_plugins

    serve_app = importlib.import_module("serve.app")  # the module: the package's `app` attribute is the Serve app
    sys.path.insert(0, str(REPO / "benchmarks"))
    import serve_styles

    def fake_make_lora(unet, out, seed):
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"x")
        return out / "pytorch_lora_weights.safetensors"

    def in_process_cost(merged, lora, steps, size):
        assert Path(lora).is_file(), "the adapter was removed while still in use"
        if fail:
            raise RuntimeError("measurement failed")
        return {}

    async def no_calls(*a, **k):
        return None

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(style_unet.StyleUNet, "from_pretrained", lambda path: None)
    monkeypatch.setattr(tiny_plugins, "make_lora", fake_make_lora)
    for name in ("start", "run", "delete"):
        monkeypatch.setattr(ray_serve, name, lambda *a, **k: None)
    monkeypatch.setattr(serve_app, "build_app", lambda config: None)
    monkeypatch.setattr(httpx, "get", lambda url: argparse.Namespace(json=lambda: {"styles": [{"name": "warm"}]}))
    monkeypatch.setattr(serve_styles, "run_calls", no_calls)
    monkeypatch.setattr(serve_styles, "run_stream", lambda base, calls, concurrency: {"throughput_rps": 1.0})
    monkeypatch.setattr(serve_styles, "replica_stats", lambda *a: [{"batch_sizes": {}, "lora_split_batches": 0}])
    monkeypatch.setattr(serve_styles, "lora_forward_cost", in_process_cost)
    args = argparse.Namespace(lora_fractions=[0.0, 1.0], lora_repeats=1, replicas=1, max_batch_size=4, size=32, requests=4, steps=1, concurrency=1)
    if fail:
        with pytest.raises(RuntimeError, match="measurement failed"):
            serve_styles.lora_cost(args, tmp_path / "merged")
    else:
        assert serve_styles.lora_cost(args, tmp_path / "merged")["throughput_relative_to_no_lora"] == {"0.0": 1.0, "1.0": 1.0}
    assert list(tmp_path.iterdir()) == []


def test_the_benchmarks_read_zoo_yaml_paths_by_the_jobs_rule(tiny_base_dir, tmp_path, monkeypatch):
    """zoo.yaml's paths expand `~` and `$DMM_HOME` (README, as in a merge config), but serve_styles.py
    (the zoo's base, for a file teacher without its own), export_check.py, regions.py and the zoo report's
    load_base_pipeline joined them to the zoo folder as written: <zoo>/$DMM_HOME/base. They all read
    zoo.yaml through dmm_ray.zoo.manifest.load_zoo_manifest now."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import serve_styles

    from dmm_ray.zoo.report import load_base_pipeline

    home, zoo = tmp_path / "home", tmp_path / "zoo"
    home.mkdir(), zoo.mkdir()
    (home / "base").symlink_to(tiny_base_dir)
    monkeypatch.setenv("DMM_HOME", str(home))
    (zoo / "zoo.yaml").write_text("base: $DMM_HOME/base\nteachers: [{name: cool, format: lora, source: $DMM_HOME/cool.safetensors}]\n")
    assert serve_styles.zoo_teachers(zoo)["cool"]["base"] == str(home / "base")
    assert load_base_pipeline(zoo).unet.config.in_channels == 4
    for script in ("export_check", "regions"):  # both need a merged model and a trained feature net to run
        source = (REPO / "benchmarks" / f"{script}.py").read_text()
        assert "load_zoo_manifest(" in source and 'manifest["' not in source and 'zoo["' not in source, script


def test_serve_load_fault_writes_out_into_a_folder_not_there_yet(tmp_path, monkeypatch):
    """`--out DIR/r.json` with DIR missing ran the whole load and fault run (minutes), then failed with
    FileNotFoundError and no report; serve_styles.py and export_check.py make the folder, so does it now.
    Ray, Serve and the run itself are faked here: only what main() does with the report is real."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import httpx
    import ray
    import serve_load_fault
    from ray import serve as ray_serve

    serve_app = importlib.import_module("serve.app")  # the module: the package's `app` attribute is the Serve app
    serve_model = importlib.import_module("serve.model")

    for module, name in [
        (serve_model, "resolve_model_location"),  # tmp_path stands for the model: no merged folder
        (ray, "init"),
        (ray, "shutdown"),
        (ray_serve, "start"),
        (ray_serve, "run"),
        (ray_serve, "shutdown"),
        (serve_app, "build_app"),
    ]:
        monkeypatch.setattr(module, name, lambda *a, **k: None)
    monkeypatch.setattr(httpx, "get", lambda url: argparse.Namespace(json=lambda: {"styles": [{"name": "a"}]}))
    monkeypatch.setattr(serve_load_fault, "run_load_fault", lambda *a, **k: {"requests": 1})
    monkeypatch.setattr(serve_load_fault, "check", lambda report: [])
    out = tmp_path / "not" / "yet" / "r.json"
    assert serve_load_fault.main(["--model", str(tmp_path), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"requests": 1, "problems": []}


def test_export_check_leaves_no_baked_files_behind(tmp_path, monkeypatch):
    """export_check.py baked every style into a whole single-file model under /tmp/dmm-export-check-* and
    never removed them (GBs per style at SD1.5 size, every run). Each file goes once measured, the folder
    at the end. The model, the bake and the sampling are faked: only the files are real."""
    import tempfile

    import diffusers
    import torch

    import dmm_ray.evaluation.extractors as extractors
    import dmm_ray.evaluation.fid as fid
    import dmm_ray.evaluation.generation as generation
    import dmm_ray.export as export
    import dmm_ray.pipeline as pipeline
    import dmm_ray.zoo.manifest as manifest

    (tmp_path / "prompts.txt").write_text("a\nb\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    fake_pipe = argparse.Namespace(styles=["warm", "cool"], scheduler=None, set_progress_bar_config=lambda **k: None)
    monkeypatch.setattr(manifest, "load_zoo_manifest", lambda zoo: argparse.Namespace(eval_prompts=tmp_path / "prompts.txt", feature_net=None))
    monkeypatch.setattr(extractors, "ZooFeatureExtractor", lambda path, device: lambda x: x.flatten(1))
    monkeypatch.setattr(pipeline, "load_dmm_pipeline", lambda model: fake_pipe)
    monkeypatch.setattr(export, "bake", lambda pipe, style: argparse.Namespace())
    monkeypatch.setattr(export, "provenance", lambda *a, **k: {})
    monkeypatch.setattr(export, "export_pipeline", lambda plain, path, metadata: path.write_bytes(b"x" * 16) and path)
    monkeypatch.setattr(export, "write_config_folder", lambda plain, folder: folder.mkdir() or folder)
    monkeypatch.setattr(
        diffusers.StableDiffusionPipeline, "from_single_file", lambda *a, **k: argparse.Namespace(set_progress_bar_config=lambda **k: None)
    )
    monkeypatch.setattr(generation, "generate_images", lambda pipe, prompts, seeds, sampler, call: torch.rand(len(prompts), 3, 2, 2))
    monkeypatch.setattr(fid, "fid_from_features", lambda a, b: 0.0)
    sys.path.insert(0, str(REPO / "benchmarks"))
    import export_check

    assert export_check.main(["--model", str(tmp_path), "--zoo", str(tmp_path), "--prompts", "2", "--images-per-prompt", "1"]) == 0
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    "prompts_in_zoo, argv, message",
    [
        (5, ["--prompts", "1", "--images-per-prompt", "1"], "1 prompt(s) x images_per_prompt=1 is 1 image per set; FID needs at least 2"),
        (1, ["--images-per-prompt", "1"], "--prompts 32: 1 of the zoo's eval_prompts"),  # the zoo holds fewer than asked
        (5, ["--prompts", "0"], "expected a positive integer"),  # [:0] left no prompt, [:-1] all but the last
        (5, ["--seed-b", "3"], "seed sets overlap"),
        # a negative seed was pydantic's several-line dump naming seed_a, not the option
        (5, ["--seed-a", "-1"], "argument --seed-a: expected an integer of 0 or more, e.g. 0; got '-1'"),
        (5, ["--seed-b", "-5"], "argument --seed-b: expected an integer of 0 or more, e.g. 0; got '-5'"),
    ],
)
def test_export_check_refuses_too_few_images_for_fid_before_any_work(prompts_in_zoo, argv, message, tmp_path, monkeypatch, capsys):
    """`export_check.py --prompts 1 --images-per-prompt 1` loaded and baked the model and sampled three
    image sets, then died in fid.py: a covariance needs two feature vectors. The evaluation's rule is
    checked right after the zoo's prompts are read now: a usage error, before the model is loaded."""
    import dmm_ray.pipeline as pipeline
    import dmm_ray.zoo.manifest as manifest

    (tmp_path / "prompts.txt").write_text("".join(f"p{i}\n" for i in range(prompts_in_zoo)))
    monkeypatch.setattr(manifest, "load_zoo_manifest", lambda zoo: argparse.Namespace(eval_prompts=tmp_path / "prompts.txt", feature_net=None))
    monkeypatch.setattr(pipeline, "load_dmm_pipeline", lambda model: pytest.fail("the model was loaded before the image count was checked"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import export_check

    with pytest.raises(SystemExit) as stop:
        export_check.main(["--model", str(tmp_path), "--zoo", str(tmp_path), *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "script, argv",
    [
        ("fast_speed", ["--arch", "tiny", "--repeats", "0"]),
        ("fast_speed", ["--arch", "tiny", "--batch", "0"]),
        ("adapter_routing", ["--model", "m", "--reps", "0"]),
        ("regions", ["--model", "m", "--reps", "-1"]),
        ("serve_styles", ["--lora-fractions", "0,1", "--lora-repeats", "0"]),
        ("train_throughput", ["--steps", "0"]),
        ("data_throughput", ["--steps", "0"]),
        ("data_throughput", ["--epochs", "0"]),
        ("data_throughput", ["--epochs", "-1"]),
        ("data_throughput", ["--shard-size", "0"]),
        ("data_throughput", ["--rows", "0"]),
        ("data_throughput", ["--batch-size", "0"]),
    ],
)
def test_a_timing_count_below_one_is_a_usage_error(script, argv, monkeypatch, capsys):
    """`fast_speed.py --repeats 0` (and adapter_routing/regions --reps 0, serve_styles --lora-repeats 0)
    built and warmed up the models, then died of StatisticsError: no median of zero timed runs;
    train_throughput/data_throughput --steps 0 of an UnboundLocalError in step_setup.timed_steps;
    data_throughput --epochs 0 timed no batch and printed "stream: 0.00 batches/s ... BELOW target";
    data_throughput --shard-size 0 died in make_world of "range() arg 3 must not be zero"."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the count was checked"))
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / f"benchmarks/{script}.py"), run_name="__main__")
    assert stop.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


# The benchmarks' options that name a model folder to read: what each needs besides it to get past its parser
MODEL_READERS = {
    "adapter_routing": (["--model", "{merged}"], []),
    "export_check": (["--model", "{merged}"], ["--zoo", "{zoo}"]),
    "fast_fidt": (["--model", "{few}"], ["--config", "{zoo}/m.yaml", "--out", "{zoo}/fidt"]),
    "fast_speed": (["--merged", "{merged}", "--fast", "{few}"], []),
    "regions": (["--model", "{merged}"], ["--zoo", "{zoo}", "--out", "{zoo}/regions"]),
    "regions_layouts": (["--model", "{merged}"], ["--zoo", "{zoo}"]),
    "serve_load_fault": (["--model", "{merged}"], []),
    "serve_styles": (["--merged", "{merged}"], ["--zoo", "{zoo}"]),
}


def test_a_benchmark_refuses_a_model_folder_a_running_job_may_be_replacing(tmp_path, monkeypatch, capsys):
    """Finding: the benchmarks read a merge's <output_dir>/merged (a few-step <folder>/model) while a merge
    (jobs/fast.py), another process, held that folder's merge.lock (fast.lock), whose save replaces it: they
    measured half of one model and half of the next, where the jobs refuse. Each is a usage error now (exit 2),
    naming the option, the job's pid and the lock file (output_lock.check_not_being_replaced, the jobs' rule)."""
    from merge_fixtures import hold_in_another_process

    from dmm_ray.output_lock import FAST_LOCK

    readers = {s.stem for s in SCRIPTS if re.search(r'add_argument\(\s*"--(model|merged|fast)"', s.read_text())}
    assert readers == set(MODEL_READERS)  # a benchmark given a model option is checked here too
    paths = {"merged": tmp_path / "out" / "merged", "few": tmp_path / "fast" / "model", "zoo": tmp_path / "zoo"}
    for folder in paths.values():
        folder.mkdir(parents=True)
    (paths["merged"] / "model_index.json").write_text("{}")  # (serve_styles.py reads only a merged model folder)
    merge_proc = hold_in_another_process(tmp_path / "out")
    fast_proc = hold_in_another_process(tmp_path / "fast", name=FAST_LOCK, job="few-step job")
    pids = {"merged": merge_proc.pid, "few": fast_proc.pid}
    try:
        for script, (models, others) in MODEL_READERS.items():
            argv = [a.format(**paths) for a in models + others]
            monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
            with pytest.raises(SystemExit) as stop:
                runpy.run_path(str(REPO / f"benchmarks/{script}.py"), run_name="__main__")
            err = capsys.readouterr().err
            flag, kind = models[0], "merged" if "merged" in models[1] else "few"  # the first model option is refused first
            holder = "merge.lock a running merge" if kind == "merged" else "fast.lock a running few-step job"
            assert stop.value.code == 2 and f"error: {flag} {paths[kind]} is the " in err and f"whose {holder} holds" in err, (script, err)
            assert f"pid {pids[kind]}" in err and f"kill {pids[kind]}" in err, (script, err)
    finally:
        for proc in (merge_proc, fast_proc):
            proc.kill()
            proc.wait()
