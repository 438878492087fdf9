"""Paper Table 1 on the toy zoo: score only -> + feature -> + adversarial -> + synthesized data.

  python benchmarks/table1.py --config jobs/configs/toy.yaml --out outputs/table1
  python benchmarks/table1.py --config jobs/configs/toy_quality.yaml --out outputs/table1_quality

Each row is one merge at the preset's budget (via benchmarks/fidelity_curve.py, so every row has
its own fresh output folder, shares the latents and the teacher-statistics cache, and is a nested
MLflow run). Rows switch terms off with `--set`: the preset's own settings are the last row.
Writes `<out>/table1.md` and prints it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = [
    ("score distillation only", ["distill.lambda_feat=0", "distill.lambda_adv=0", "synthesis.enabled=false", "data.synthetic_fraction=0"]),
    ("+ feature imitation", ["distill.lambda_adv=0", "synthesis.enabled=false", "data.synthetic_fraction=0"]),
    ("+ multi-class adversarial", ["synthesis.enabled=false", "data.synthetic_fraction=0"]),
    ("+ synthesized data (the preset)", []),
]


def main(argv=None) -> int:
    import fidelity_curve as fc

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/toy.yaml")
    p.add_argument("--out", default="outputs/table1")
    p.add_argument("--rows", default="1,2,3,4", help="which rows to run (1-4), e.g. --rows 1,2,3 when the preset's own merge is row 4")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="passed to every row")
    args = p.parse_args(argv)
    from dmm_ray.config import load_config

    config = str(Path(args.config).resolve())
    cfg = load_config(config, args.overrides)
    lines = ["| row | FIDt | FIDt_ref | ratio | diagonal = row minimum | merge s |", "|---|---|---|---|---|---|"]
    wanted = {int(r) for r in args.rows.split(",")}
    if not wanted <= set(range(1, len(ROWS) + 1)):
        p.error(f"--rows takes numbers 1-{len(ROWS)}, got {args.rows!r}")
    for i, (name, sets) in enumerate(ROWS):
        if i + 1 not in wanted:
            continue
        label = f"row{i + 1}"
        folder = (Path(args.out) / label).resolve()
        point = fc._merge(config, folder / f"steps_{cfg.distill.steps}", cfg.distill.steps, f"{cfg.name}-table1", args.overrides + sets)
        lines.append(
            f"| {name} | {point['FIDt']:.1f} | {point['FIDt_ref']:.1f} | {point['ratio']:.3f} | "
            f"{point['row_min']}/{len(point['diag'])} | {point['wall_s']:.0f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    Path(args.out, "table1.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
