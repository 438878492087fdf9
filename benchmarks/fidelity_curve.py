"""Fidelity against training budget: FIDt / FIDt_ref of merges at increasing distill steps.

  python benchmarks/fidelity_curve.py --config jobs/configs/toy.yaml --steps 150,300,600 --out outputs/curve
  python benchmarks/fidelity_curve.py --config jobs/configs/toy.yaml --steps 300 --label zero-init \
      --set student.style_init=zero --set distill.style_lr_mult=10 --out outputs/ablation
  python benchmarks/fidelity_curve.py --config jobs/configs/toy_quality.yaml --steps 1200 --seed-sets 2 ...

Each budget is one full `jobs/merge.py` run in its own fresh output folder (`<out>/<label>/steps_<S>`;
a folder that already holds a finished evaluation of a merge with the same config and --set is read
back, not re-run; one of other settings is refused, naming them). All of them share the
config's latent shards and the teacher-statistics cache, so only the merge and the student are
recomputed. Every merge is a nested run under ONE MLflow parent run (project `<name>-curve-<label>`),
which also gets the curve's CSV and PNG. `--seed-sets 2` re-evaluates each merged model on a second,
disjoint pair of seed sets and reports both ratios (the spread of the measurement); it reads the
merge's own config, --set overrides applied (written as `merge_config.yaml` in the point's folder).

Writes `<out>/<label>/curve.csv` (one row per budget: steps, wall seconds by stage, FIDt, FIDt_ref,
ratio, rows where the diagonal is the row minimum, per-style diagonal) and `curve.png` (ratio against
distill steps and against merge wall time, one line per style: M(i,i) / M_ref(i,i)).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dmm_ray.console import cli_main, int_list, refuse_empty  # noqa: E402

SECOND_SEEDS = ("seed_a=2000000", "seed_b=3000000")  # a disjoint second pair of seed sets


def shared_latents(base) -> list[str]:
    """Every point reads the preset's latents (encoded once), not its own output folder's."""
    return [f"data.shards={base.data.shards}"]


def _merge_sets(out: Path, steps: int, project: str, overrides: list[str]) -> list[str]:
    """The `--set` list of one point's merge: its own folder, budget and project, then the curve's overrides."""
    return [f"output_dir={out}", f"distill.steps={steps}", f"name={project}", f"tracking.project={project}", *overrides]


def _merge_config(config: str, out: Path, steps: int, project: str, overrides: list[str]):
    """The MergeConfig the point's merge runs (or ran) with."""
    from dmm_ray.config import load_config

    return load_config(config, _merge_sets(out, steps, project, overrides))


def same_merge(cfg, out: Path) -> bool:
    """Whether the merge recorded in `out` (its merge_complete.json, the whole config) ran with `cfg`;
    its merged model need not be kept: the point holds the numbers."""
    from dmm_ray.completion import finished
    from dmm_ray.merge import COMPLETE_RECORD, _merge_request, _same_request

    # compared as the merge compares it: a record written before its teachers' checksums were is by its config
    return finished(out, COMPLETE_RECORD, _merge_request(cfg), models=[], same=_same_request) is not None


def _check_same_merge(cfg, out: Path) -> None:
    """A point is read back only when the merge in its folder ran with the config asked now (its
    merge_complete.json records the whole config): a re-run with another --set and the same
    --out/--label read back the other merge's numbers under the new settings' title."""
    from dmm_ray.merge import COMPLETE_RECORD, _merge_request
    from dmm_ray.tracking import flatten

    if same_merge(cfg, out):
        return
    asked = _merge_request(cfg)
    try:
        recorded = flatten(json.loads((out / COMPLETE_RECORD).read_text())["asked"]["config"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SystemExit(f"error: {out} holds a point without its merge's {COMPLETE_RECORD}; remove it or use another --out/--label") from None
    checksums = {k: v for k, v in json.loads(json.dumps(asked)).items() if k != "config"}  # the teachers' (merge.TEACHERS)...
    asked = flatten(json.loads(json.dumps(asked["config"])))
    changed = [f"{k} {recorded.get(k)!r} -> {asked.get(k)!r}" for k in sorted(set(recorded) | set(asked)) if recorded.get(k) != asked.get(k)]
    was = json.loads((out / COMPLETE_RECORD).read_text())["asked"]
    changed += [f"{k} {was[k]!r} -> {v!r}" for k, v in checksums.items() if k in was and was[k] != v]  # ...re-made in place
    raise SystemExit(f"error: {out} holds the point of another merge ({'; '.join(changed)}); remove it or use another --out/--label")


def _merge(config: str, out: Path, steps: int, project: str, overrides: list[str]) -> dict:
    """One merge + its evaluation; returns the point (read back if it is already done, by this merge)."""
    record = out / "point.json"
    if record.exists():
        _check_same_merge(_merge_config(config, out, steps, project, overrides), out)
        return json.loads(record.read_text())
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists without a finished point; remove it or use another --out/--label")
    cmd = [sys.executable, str(REPO / "jobs" / "merge.py"), "--config", config]
    for o in _merge_sets(out, steps, project, overrides):
        cmd += ["--set", o]
    print("+ " + " ".join(cmd[1:]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(out / "merge.log", "w") as logf:
        proc = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"error: the merge at {steps} steps failed (exit {proc.returncode}); see {out / 'merge.log'}")
    wall = time.time() - started
    evaluation = json.loads((out / "evaluation" / "fid_matrix.json").read_text())
    stages = {}
    for line in (out / "merge.log").read_text().splitlines():  # "... merged model saved: ... (N s since start: distill 12 s, ...)"
        if "since start:" in line:
            stages["merge"] = float(line.split("(")[-1].split()[0])
            for part in line.split("since start:")[1].rstrip(")").split(","):
                name, seconds, _ = part.split()
                stages[name] = float(seconds)
    point = {"steps": steps, "wall_s": stages.get("merge", wall), "with_eval_s": wall, "stage_s": stages, **_summary(evaluation)}
    _write_point(record, point)
    return point


def _summary(evaluation: dict) -> dict:
    import numpy as np

    m, ref = np.array(evaluation["M"]), np.array(evaluation["M_ref"])
    styles = evaluation["styles"]
    return {
        "FIDt": float(np.trace(m)),
        "FIDt_ref": float(np.trace(ref)),
        "ratio": float(np.trace(m) / np.trace(ref)),
        "row_min": int(sum(int(np.argmin(m[i]) == i) for i in range(len(styles)))),
        "diag": {s: float(m[i, i]) for i, s in enumerate(styles)},
        "ref_diag": {s: float(ref[i, i]) for i, s in enumerate(styles)},
    }


def _second_seed_set(config: str, out: Path, steps: int, project: str, overrides: list[str]) -> dict:
    record = out / "point_seeds2.json"
    if record.exists():
        return json.loads(record.read_text())
    # The merge's own config, --set overrides applied (its teachers, zoo and evaluation: section): given
    # `config` itself, evaluate.py read it without them, and the second seed sets were measured with
    # the preset's prompts and sampler (or failed on a zoo only an override named).
    merge_config = out / "merge_config.yaml"
    merge_config.write_text(yaml.safe_dump(_merge_config(config, out, steps, project, overrides).model_dump(mode="json"), sort_keys=False))
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "evaluate.py"),
        "--model",
        str(out / "merged"),
        "--teachers",
        str(merge_config),
        "--section",
        "evaluation",
        "--config",
        str(merge_config),
        "--out",
        str(out / "evaluation_seeds2"),
    ]
    for s in SECOND_SEEDS:
        cmd += ["--set", s]
    with open(out / "evaluate_seeds2.log", "w") as logf:
        proc = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"error: the second seed-set evaluation at {steps} steps failed (exit {proc.returncode}); see {out / 'evaluate_seeds2.log'}")
    point = _summary(json.loads((out / "evaluation_seeds2" / "fid_matrix.json").read_text()))
    _write_point(record, point)
    return point


def _write_point(record: Path, point: dict) -> None:
    """Via a temporary file and a rename: a run read back a point.json it finds, and one stopped during
    the write (Ctrl-C, a full disk) left a cut-short file that every later run failed to parse."""
    from dmm_ray.data import fs as fsu

    fsu.write_bytes_atomic(*fsu.resolve(str(record)), json.dumps(point, indent=1).encode())


def write_outputs(points: list[dict], folder: Path, title: str) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = list(points[0]["diag"])
    csv_path = folder / "curve.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        stage_names = sorted({k for p in points for k in p["stage_s"]})
        w.writerow(
            [
                "steps",
                "wall_s",
                *[f"{k}_s" for k in stage_names],
                "FIDt",
                "FIDt_ref",
                "ratio",
                "row_min",
                "ratio_seeds2",
                *[f"diag_{s}" for s in styles],
                *[f"ref_diag_{s}" for s in styles],
            ]
        )
        for p in points:
            w.writerow(
                [
                    p["steps"],
                    round(p["wall_s"], 1),
                    *[round(p["stage_s"].get(k, 0.0), 1) for k in stage_names],
                    round(p["FIDt"], 2),
                    round(p["FIDt_ref"], 2),
                    round(p["ratio"], 4),
                    p["row_min"],
                    round(p["seeds2"]["ratio"], 4) if p.get("seeds2") else "",
                    *[round(p["diag"][s], 2) for s in styles],
                    *[round(p["ref_diag"][s], 2) for s in styles],
                ]
            )
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "steps", "distill steps"), (axes[1], "wall_s", "merge wall time (s)")):
        xs = [p[key] for p in points]
        ax.plot(xs, [p["ratio"] for p in points], "k-o", lw=2.5, label="FIDt / FIDt_ref")
        if any(p.get("seeds2") for p in points):
            ax.plot(
                [p[key] for p in points if p.get("seeds2")],
                [p["seeds2"]["ratio"] for p in points if p.get("seeds2")],
                "k--s",
                lw=1.5,
                label="FIDt / FIDt_ref (seed sets 2)",
            )
        for s in styles:
            ax.plot(xs, [p["diag"][s] / max(p["ref_diag"][s], 1e-9) for p in points], "-", alpha=0.6, label=f"{s}: M(i,i)/M_ref(i,i)")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(label)
        ax.set_ylabel("ratio to the teacher reference")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    png_path = folder / "curve.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return csv_path, png_path


def _log_to_mlflow(config: str, project: str, points: list[dict], files: tuple[Path, Path], label: str, overrides: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    from dmm_ray.config import load_config
    from dmm_ray.tracking import MergeTracker, param_value

    cfg = load_config(config, [*overrides, f"name={project}", f"tracking.project={project}"])  # the zoo / tracking the points used
    tracker = MergeTracker(cfg.tracking)
    if not tracker.enabled:
        return
    import mlflow

    with tracker.project():
        # Tags, not params: the parent run is the project's, which every curve of this --label shares (another
        # --out, another --set), and MLflow refuses a param a second value: the second curve failed here, after
        # all its merges, with "Changing param values is not allowed". A tag holds the curve logged last, as
        # the curve's CSV and PNG below do.
        mlflow.set_tags({"dmm.curve.label": label, "dmm.curve.overrides": param_value(json.dumps(overrides))})
        for p in points:
            tracker.log_metrics(
                {
                    "curve/FIDt": p["FIDt"],
                    "curve/FIDt_ratio": p["ratio"],
                    "curve/wall_s": p["wall_s"],
                    "curve/row_min": p["row_min"],
                    **{f"curve/diag/{s}": v for s, v in p["diag"].items()},
                    **({"curve/FIDt_ratio_seeds2": p["seeds2"]["ratio"]} if p.get("seeds2") else {}),
                },
                step=p["steps"],
            )
        for f in files:
            mlflow.log_artifact(str(f), "curve")


@cli_main  # a bad --config or --set: one `error:` line and exit 2, as the jobs do
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "jobs/configs/toy.yaml"))
    p.add_argument("--steps", type=int_list, default="150,300,600", help="comma-separated distill budgets")
    p.add_argument("--out", default="outputs/fidelity_curve")
    p.add_argument("--label", default="default", help="names this curve (sub-folder and MLflow project suffix)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="passed to every merge")
    p.add_argument("--seed-sets", type=int, choices=(1, 2), default=1, help="2: also evaluate on a second pair of seed sets")
    args = p.parse_args(argv)
    refuse_empty(p, args, "config", "out", "label")
    steps = args.steps
    from dmm_ray.config import load_config

    config = str(Path(args.config).resolve())
    base = load_config(config, args.overrides, build_zoo=True)
    folder = (Path(args.out) / args.label).resolve()  # made only once the config is known to load
    folder.mkdir(parents=True, exist_ok=True)
    project = f"{base.name}-curve-{args.label}"
    shared = shared_latents(base)
    points = []
    for s in steps:
        point = _merge(config, folder / f"steps_{s}", s, project, shared + args.overrides)
        if args.seed_sets == 2:
            point["seeds2"] = _second_seed_set(config, folder / f"steps_{s}", s, project, shared + args.overrides)
        points.append(point)
        extra = f", seed sets 2: ratio {point['seeds2']['ratio']:.3f}" if point.get("seeds2") else ""
        print(
            f"steps {s}: FIDt {point['FIDt']:.1f} / FIDt_ref {point['FIDt_ref']:.1f} = ratio {point['ratio']:.3f}, "
            f"diagonal row minimum {point['row_min']}/{len(point['diag'])}, merge {point['wall_s']:.0f} s{extra}",
            flush=True,
        )
    files = write_outputs(points, folder, f"{project}: {' '.join(args.overrides) or 'preset'}")
    _log_to_mlflow(config, project, points, files, args.label, args.overrides)
    print(f"curve: {files[0]}\nplot:  {files[1]}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
