"""What people look at: labelled JSON/CSV matrices, the Fig. 4 heatmaps, the Fig. 5 grid, a table."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from dmm_ray.evaluation.matrix import EvalResult
from dmm_ray.output_lock import left_by_killed

MATRIX_FILE = "fid_matrix.json"  # in every evaluation folder: what marks an uploaded one complete (merge._upload_result)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: workers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def write_matrix_csv(path: Path, matrix: np.ndarray, rows: list[str], cols: list[str], corner: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([corner] + cols)
        for name, row in zip(rows, matrix):
            w.writerow([name] + [f"{v:.6f}" for v in row])


def plot_heatmaps(result: EvalResult, path: Path) -> Path:
    """M and M_ref side by side on one colour scale (paper Fig. 4)."""
    plt = _plt()
    n = len(result.style_names)
    size = max(4.0, 0.6 * n + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), constrained_layout=True)
    finite = np.concatenate([result.matrix[np.isfinite(result.matrix)], result.ref_matrix.ravel()])
    vmin, vmax = float(finite.min()), float(finite.max()) if finite.size else 1.0
    for ax, mat, title in (
        (axes[0], result.matrix, f"M (student)  FIDt={result.fidt:.3g}"),
        (axes[1], result.ref_matrix, f"M_ref (teachers)  FIDt_ref={result.fidt_ref:.3g}"),
    ):
        im = ax.imshow(mat, cmap="viridis_r", vmin=vmin, vmax=vmax)
        ax.set_title(title)
        ax.set_xticks(range(n), result.style_names, rotation=45, ha="right")
        ax.set_yticks(range(n), result.style_names)
        ax.set_xlabel("teacher j (seed set B)")
        ax.set_ylabel("style i (seed set A)")
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if np.isfinite(mat[i, j]):
                        ax.text(
                            j,
                            i,
                            f"{mat[i, j]:.2g}",
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if mat[i, j] > (vmin + vmax) / 2 else "black",
                        )
    fig.colorbar(im, ax=axes, shrink=0.8, label="FID")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_grid(result: EvalResult, path: Path) -> Path:
    """Style x prompt grid: for each style a student row above its teacher row (paper Fig. 5)."""
    plt = _plt()
    styles = [s for s in result.style_names if s in result.student_previews or s in result.teacher_previews]
    cols = max((len(v) for v in list(result.student_previews.values()) + list(result.teacher_previews.values())), default=0)
    if not styles or cols == 0:
        raise ValueError("no preview images to draw a grid from")
    rows = []
    for s in styles:
        if s in result.student_previews:
            rows.append((f"{s}\nstudent", result.student_previews[s]))
        if s in result.teacher_previews:
            rows.append((f"{s}\nteacher", result.teacher_previews[s]))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols + 1.2, 1.6 * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c], interpolation="nearest")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and c < len(result.prompts):
                ax.set_title(result.prompts[c][:28], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(result: EvalResult) -> str:
    """Terminal table: per-style diagonal FID (student vs reference) and FIDt, FIDt_ref, ratio."""
    w = max([len(s) for s in result.style_names] + [8])
    lines = [f"{'style':<{w}}  {'M(i,i)':>10}  {'M_ref(i,i)':>10}  {'ratio':>7}", "-" * (w + 33)]
    for i, s in enumerate(result.style_names):
        m, r = result.matrix[i, i], result.ref_matrix[i, i]
        lines.append(f"{s:<{w}}  {m:>10.4f}  {r:>10.4f}  {(m / r if r > 0 else float('inf')):>7.3f}")
    lines.append("-" * (w + 33))
    lines.append(f"{'FIDt':<{w}}  {result.fidt:>10.4f}  {result.fidt_ref:>10.4f}  {result.ratio:>7.3f}")
    lines.append(f"(FIDt = tr M; FIDt_ref = tr M_ref; {result.images_per_set} images per set, extractor {result.extractor})")
    return "\n".join(lines)


def write_outputs(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """fid_matrix.json, M.csv, M_ref.csv, fid_heatmaps.png, style_grid.png under out_dir.

    Every file is written to a hidden sibling first and all are renamed into place together at the
    end: written in place, a Ctrl-C (or a failure) during the plots, a second or two, left this run's
    JSON and CSVs beside the previous run's heatmaps and grid, and a cut-short file of either."""
    from dmm_ray.data import fs as fsu

    out = fsu.require_local("evaluation output_dir", out_dir)  # never a local folder named `s3:`
    out.mkdir(parents=True, exist_ok=True)
    names = {"json": MATRIX_FILE, "csv": "M.csv", "ref_csv": "M_ref.csv", "heatmaps": "fid_heatmaps.png", "grid": "style_grid.png"}
    if not (result.student_previews or result.teacher_previews):
        names.pop("grid")
    paths = {key: out / name for key, name in names.items()}
    with staged_files(paths) as staged:
        staged["json"].write_text(json.dumps(result.to_dict(), indent=1))
        styles = result.style_names
        write_matrix_csv(staged["csv"], result.matrix, [f"student:{s}" for s in styles], [f"teacher:{s}" for s in styles], "M")
        write_matrix_csv(staged["ref_csv"], result.ref_matrix, [f"teacher:{s}" for s in styles], [f"teacher:{s}" for s in styles], "M_ref")
        plot_heatmaps(result, staged["heatmaps"])
        if "grid" in staged:
            plot_grid(result, staged["grid"])
    return paths


@contextlib.contextmanager
def staged_files(paths: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Hidden siblings of `paths` (same keys) for the block to write; renamed onto `paths` together when
    it ends without error, and removed in any case: a failure or Ctrl-C part-way leaves the previous
    run's set whole, never some files of each run or a cut-short one."""
    staged = {key: p.with_name(f".{p.stem}.{os.getpid()}.tmp{p.suffix}") for key, p in paths.items()}  # the suffix: matplotlib's format
    for p in paths.values():  # what a killed run staged (its pid is not this one's: nothing else removes it)
        for stale in left_by_killed(
            p.parent, f".{glob.escape(p.stem)}.*.tmp{glob.escape(p.suffix)}", rf"\.{re.escape(p.stem)}\.(\d+)\.tmp{re.escape(p.suffix)}"
        ):
            stale.unlink(missing_ok=True)
    try:
        yield staged
        for key, path in paths.items():
            os.replace(staged[key], path)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
