"""`make demo`: the toy world end to end on local Ray.

1. build the toy zoo (cached: instant the second time)      python jobs/build_zoo.py --out .zoo
2. merge its teachers into one model with the toy preset     python jobs/merge.py --config jobs/configs/toy.yaml
3. print where the merged model, the MLflow store and the sample images are, and the FIDt table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    print("+ " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=".zoo", help="zoo folder (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="passed to jobs/merge.py")
    args = parser.parse_args(argv)
    run("jobs/build_zoo.py", "--out", args.zoo)
    merge_args = ["jobs/merge.py", "--config", "jobs/configs/toy.yaml", "--set", f"zoo={args.zoo}/zoo.yaml"]
    for override in args.overrides:
        merge_args += ["--set", override]
    run(*merge_args)
    out = REPO / "outputs" / "toy"
    print("\nDemo finished.")
    print(f"  merged model:   {out / 'merged'}   (DMMPipeline.from_pretrained / serve run serve.app)")
    print(f"  evaluation:     {out / 'evaluation'}   (FID matrices, heatmaps, style x prompt grid)")
    print(f"  MLflow store:   {REPO / 'mlflow.db'}   (mlflow ui --backend-store-uri sqlite:///mlflow.db)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
