"""Paper Table 1 on the toy zoo: score only -> + feature -> + adversarial -> + synthesized data.

  python benchmarks/table1.py --config jobs/configs/toy.yaml --out outputs/table1
  python benchmarks/table1.py --config jobs/configs/toy_quality.yaml --out outputs/table1_quality

Each row is one merge at the preset's budget (via benchmarks/fidelity_curve.py, so every row has
its own fresh output folder, shares the latents and the teacher-statistics cache, and is a nested
MLflow run). Rows set each term's weight with `--set` (the preset's weight, or the paper's where the
preset switches the term off); a preset that differs from the full recipe is a fifth row.
Writes `<out>/table1.md` and prints it: the rows run now and those an earlier run with the same --out,
config and --set measured (`--rows 1`, then `--rows 2`, ... builds the table up; each row's point is
read back from its folder, `<out>/row<N>/steps_<S>`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]

from dmm_ray.console import cli_main, int_list, refuse_empty  # noqa: E402  (needs no torch: --help stays fast)


def table_rows(cfg) -> list[tuple[str, list[str]]]:
    """The paper's rows as `--set` lists, each term at the preset's weight or, where the preset
    switches it off, at the paper's (the config's default): a preset without the adversarial term
    must not turn row 3 into a copy of row 2. When the preset differs from the full recipe (row 4),
    it is a fifth row of its own."""
    from dmm_ray.config import DistillConfig

    paper = DistillConfig.model_fields
    feat = cfg.distill.lambda_feat or paper["lambda_feat"].default
    adv = cfg.distill.lambda_adv or paper["lambda_adv"].default
    paper_only = ["distill.mixture_fraction=0"]  # mixture rows are an extension: not in the paper's four rows
    no_synth = ["synthesis.enabled=false", "data.synthetic_fraction=0", *paper_only]
    rows = [
        ("score distillation only", ["distill.lambda_feat=0", "distill.lambda_adv=0", *no_synth]),
        (f"+ feature imitation (λ {feat:g})", [f"distill.lambda_feat={feat}", "distill.lambda_adv=0", *no_synth]),
        (f"+ multi-class adversarial (λ {adv:g})", [f"distill.lambda_feat={feat}", f"distill.lambda_adv={adv}", *no_synth]),
        ("+ synthesized data (all four terms)", [f"distill.lambda_feat={feat}", f"distill.lambda_adv={adv}", *paper_only]),
    ]
    mixture = cfg.distill.mixture_fraction
    if (cfg.distill.lambda_feat, cfg.distill.lambda_adv) != (feat, adv) or mixture > 0:
        extra = f", mixture rows {mixture:g}" if mixture > 0 else ""
        rows.append((f"the preset (λ_feat {cfg.distill.lambda_feat:g}, λ_adv {cfg.distill.lambda_adv:g}{extra})", []))
    return rows


def _line(name: str, point: dict) -> str:
    return (
        f"| {name} | {point['FIDt']:.1f} | {point['FIDt_ref']:.1f} | {point['ratio']:.3f} | "
        f"{point['row_min']}/{len(point['diag'])} | {point['wall_s']:.0f} |"
    )


@cli_main  # a bad --config or --set: one `error:` line and exit 2, as the jobs do
def main(argv=None) -> int:
    import fidelity_curve as fc

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "jobs/configs/toy.yaml"))
    p.add_argument("--out", default="outputs/table1")
    p.add_argument(
        "--rows",
        type=int_list,
        default=None,
        help="which rows to run (default: all), e.g. --rows 1,2,3,4 when the preset's own merge is the last row",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="passed to every row")
    args = p.parse_args(argv)
    refuse_empty(p, args, "config", "out")
    from dmm_ray.config import load_config

    config = str(Path(args.config).resolve())
    cfg = load_config(config, args.overrides, build_zoo=True)
    shared = fc.shared_latents(cfg) + args.overrides
    rows = table_rows(cfg)
    wanted = set(range(1, len(rows) + 1)) if args.rows is None else set(args.rows)
    if not wanted <= set(range(1, len(rows) + 1)):
        p.error(f"--rows takes numbers 1-{len(rows)} for this preset, got {args.rows!r}")
    project, points = f"{cfg.name}-table1", {}
    for i, (name, sets) in enumerate(rows, 1):
        folder = (Path(args.out) / f"row{i}").resolve() / f"steps_{cfg.distill.steps}"
        if i in wanted:
            points[i] = fc._merge(config, folder, cfg.distill.steps, project, shared + sets)
            print(_line(name, points[i]), flush=True)
        elif (folder / "point.json").exists():
            # A row measured by an earlier run (--rows 1, then --rows 2, ...) stays in the table, but
            # only one of this config and --set: another merge's numbers under this table's title would mislead.
            if fc.same_merge(fc._merge_config(config, folder, cfg.distill.steps, project, shared + sets), folder):
                points[i] = json.loads((folder / "point.json").read_text())
            else:
                print(f"row {i}: {folder} holds the point of another merge (other --config or --set); left out of the table", flush=True)
    lines = ["| row | FIDt | FIDt_ref | ratio | diagonal = row minimum | merge s |", "|---|---|---|---|---|---|"]
    table = "\n".join(lines + [_line(rows[i - 1][0], point) for i, point in sorted(points.items())])
    # whole or not at all: an interrupted write must not leave a table without the rows it had
    tmp = Path(args.out, "table1.md.tmp")
    tmp.write_text(table + "\n")
    tmp.replace(Path(args.out, "table1.md"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
