"""Style mixing studies with the FID machinery: paper Table 3 (DMM equal-weight mix vs the
parameter-space weighted merge of the same teachers) and Fig. 10 (interpolating two styles)."""

from __future__ import annotations

import contextlib
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dmm_ray.evaluation.config import EvalConfig
from dmm_ray.evaluation.fid import FeatureStats, fid_from_stats
from dmm_ray.evaluation.matrix import StudentSource
from dmm_ray.evaluation.outputs import _plt, staged_files
from dmm_ray.evaluation.stats import ModelSource, StatsRequest, collect_stats

UNION = "union"
SWEEP_WEIGHTS = tuple(round(0.1 * k, 1) for k in range(11))  # paper Fig. 10


def _set_paths(out_dir: str | Path, stem: str) -> dict[str, Path]:
    """`<stem>.json`, `<stem>.csv` and `<stem>.png` in out_dir (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}


@contextlib.contextmanager
def _written_set(paths: dict[str, Path], data: dict, header: list[str], rows: list[list[str]]) -> Iterator[dict[str, Path]]:
    """`_set_paths`' files written as one set (`staged_files`): yields the staged paths, JSON and CSV
    written, for the block to draw the PNG into. Written in place, a failure or Ctrl-C while plotting
    left this run's JSON and CSV beside the previous run's PNG."""
    with staged_files(paths) as staged:
        staged["json"].write_text(json.dumps(data, indent=1))
        with open(staged["csv"], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        yield staged


@dataclass
class MixingResult:
    """FID of each mixed model (rows) to each teacher of the group and to their union (columns)."""

    rows: list[str]
    columns: list[str]
    table: np.ndarray  # (R, C)
    group: list[str]

    def to_dict(self) -> dict:
        return {"group": self.group, "rows": self.rows, "columns": self.columns, "fid": self.table.tolist()}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        header = ["model"] + [f"FID to {c}" for c in self.columns]
        rows = [[r] + [f"{v:.6f}" for v in row] for r, row in zip(self.rows, self.table)]
        paths = _set_paths(out_dir, "mixing")
        with _written_set(paths, self.to_dict(), header, rows) as staged:
            plt = _plt()
            fig, ax = plt.subplots(figsize=(1.2 * len(self.columns) + 3, 3.5), constrained_layout=True)
            x = np.arange(len(self.columns))
            width = 0.8 / len(self.rows)
            for k, (r, row) in enumerate(zip(self.rows, self.table)):
                ax.bar(x + k * width - 0.4 + width / 2, row, width, label=r)
            ax.set_xticks(x, self.columns, rotation=30, ha="right")
            ax.set_ylabel("FID (lower = closer)")
            ax.set_title("Style mixing: DMM equal-weight mix vs weighted merge")
            ax.legend(fontsize=8)
            fig.savefig(staged["png"], dpi=120)
            plt.close(fig)
        return paths

    def format_table(self) -> str:
        w = max(len(r) for r in self.rows + ["model"])
        head = f"{'model':<{w}}  " + "  ".join(f"{c:>12}" for c in self.columns)
        body = [f"{r:<{w}}  " + "  ".join(f"{v:>12.4f}" for v in row) for r, row in zip(self.rows, self.table)]
        return "\n".join([head, "-" * len(head)] + body)


def mixing_comparison(
    student: StudentSource,
    teachers: Sequence[ModelSource],
    group: Sequence[str],
    weighted_merge: ModelSource,
    config: EvalConfig,
    extractor,
    prompts: Sequence[str] | None = None,
    references: dict[str, ModelSource] | None = None,
) -> MixingResult:
    """Table 3: DMM with equal style weights over `group` vs the weighted merge of the same teachers.
    `references`: more mixed models to compare, {row name: source} (e.g. the teachers' score
    ensemble, `dmm_ray.baselines.score_ensemble`), sampled like the weighted merge.

    Rows: "DMM mix", "weighted merge", and "teachers (ref)" — the union of the group teachers'
    own seed-set-A images, the best a mixture could score against the union. Columns: each group
    teacher's seed-set-B distribution, then their union.
    """
    prompts = list(prompts) if prompts is not None else config.load_prompts()
    config.check_seed_sets(len(prompts))
    by_name = {t.name: t for t in teachers}
    unknown = [g for g in group if g not in by_name]
    if len(group) < 2 or unknown:
        raise ValueError(f"group must name >= 2 teachers from {list(by_name)}; unknown: {unknown}")
    missing = [g for g in group if g not in student.style_names]
    if missing:
        raise ValueError(f"student has no style {missing}; its styles are {student.style_names}")
    mix = {g: 1.0 / len(group) for g in group}
    reqs = [StatsRequest(key=f"teacher/{g}/B", source=by_name[g], seed_set="b") for g in group]
    reqs += [StatsRequest(key=f"teacher/{g}/A", source=by_name[g], seed_set="a", num_previews=min(config.grid_prompts, len(prompts))) for g in group]
    reqs.append(
        StatsRequest(key="dmm_mix", source=ModelSource(student.name, student.pipeline_factory), seed_set="a", call_kwargs={"style_weights": mix})
    )
    reqs.append(StatsRequest(key="weighted_merge", source=weighted_merge, seed_set="a"))
    references = dict(references or {})
    reqs += [StatsRequest(key=f"reference/{name}", source=source, seed_set="a") for name, source in references.items()]
    s = collect_stats(reqs, config, extractor, prompts).stats
    targets = [s[f"teacher/{g}/B"].stats for g in group]
    targets.append(FeatureStats.union(targets))
    samples = {
        "DMM mix": s["dmm_mix"].stats,
        "weighted merge": s["weighted_merge"].stats,
        **{name: s[f"reference/{name}"].stats for name in references},
        "teachers (ref)": FeatureStats.union([s[f"teacher/{g}/A"].stats for g in group]),
    }
    table = np.array([[fid_from_stats(x, t) for t in targets] for x in samples.values()])
    return MixingResult(rows=list(samples), columns=list(group) + [UNION], table=table, group=list(group))


@dataclass
class SweepResult:
    """Fig. 10: FID to teacher A and to teacher B as the mixture moves from A (w=0) to B (w=1)."""

    style_a: str
    style_b: str
    weights: list[float]  # weight of style_b; style_a gets 1 - w
    fid_a: list[float]
    fid_b: list[float]

    def to_dict(self) -> dict:
        return {"style_a": self.style_a, "style_b": self.style_b, "weight_b": self.weights, "fid_to_a": self.fid_a, "fid_to_b": self.fid_b}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        header = [f"weight_{self.style_b}", f"FID to {self.style_a}", f"FID to {self.style_b}"]
        rows = [[_weight_label(w), f"{a:.6f}", f"{b:.6f}"] for w, a, b in zip(self.weights, self.fid_a, self.fid_b)]
        paths = _set_paths(out_dir, "interpolation")
        with _written_set(paths, self.to_dict(), header, rows) as staged:
            plt = _plt()
            fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
            ax.plot(self.weights, self.fid_a, "o-", label=f"FID to {self.style_a}")
            ax.plot(self.weights, self.fid_b, "s-", label=f"FID to {self.style_b}")
            ax.set_xlabel(f"weight of {self.style_b}  (weight of {self.style_a} = 1 - w)")
            ax.set_ylabel("FID")
            ax.set_title("Style interpolation sweep")
            ax.legend()
            fig.savefig(staged["png"], dpi=120)
            plt.close(fig)
        return paths


def _weight_label(w: float) -> str:
    """A sweep weight for the csv: 0.10 as before, and a finer one whole (0.125, not 0.12 beside 0.115's 0.12)."""
    return f"{w:.2f}" if round(w, 2) == w else repr(float(w))


def interpolation_sweep(
    student: StudentSource,
    teacher_a: ModelSource,
    teacher_b: ModelSource,
    config: EvalConfig,
    extractor,
    weights: Sequence[float] = SWEEP_WEIGHTS,
    prompts: Sequence[str] | None = None,
) -> SweepResult:
    prompts = list(prompts) if prompts is not None else config.load_prompts()
    config.check_seed_sets(len(prompts))
    for t in (teacher_a, teacher_b):
        if t.name not in student.style_names:
            raise ValueError(f"student has no style '{t.name}'; its styles are {student.style_names}")
    bad = [w for w in weights if not 0.0 <= w <= 1.0]
    if bad:
        raise ValueError(f"sweep weights must lie in [0, 1], got {bad}")
    reqs = [StatsRequest(key=f"teacher/{t.name}/B", source=t, seed_set="b") for t in (teacher_a, teacher_b)]
    src = ModelSource(student.name, student.pipeline_factory)
    for k, w in enumerate(weights):
        mix = {teacher_a.name: 1.0 - w, teacher_b.name: w}
        reqs.append(
            StatsRequest(
                key=f"mix/{k}",  # by position: weights that agree to 4 decimals are still their own sets
                source=src,
                seed_set="a",
                call_kwargs={"style_weights": mix},
                worker_group=f"student/{k % config.num_student_workers}",
            )
        )
    s = collect_stats(reqs, config, extractor, prompts).stats
    ta, tb = s[f"teacher/{teacher_a.name}/B"].stats, s[f"teacher/{teacher_b.name}/B"].stats
    fa = [fid_from_stats(s[f"mix/{k}"].stats, ta) for k in range(len(weights))]
    fb = [fid_from_stats(s[f"mix/{k}"].stats, tb) for k in range(len(weights))]
    return SweepResult(teacher_a.name, teacher_b.name, [float(w) for w in weights], fa, fb)
