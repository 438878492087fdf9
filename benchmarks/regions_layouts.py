"""A picture of the region layouts on the toy zoo: for 8 ordered style pairs, the whole image of A, of B,
the two-region image A | B (whole-canvas views, one decode) and the same with `region_window="native"` and
`region_decode=True`. Same prompt and seed per row, the zoo's sampler (DPM-Solver++ 15 steps, CFG 5), 64x32.

  python benchmarks/regions_layouts.py --model $DMM_HOME/outputs/dmm-toy/merged --zoo $DMM_HOME/zoo/full --out docs/regions_layouts.png
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

# benchmarks/regions.py (imported in main): on the path however this file is run, not only as
# `python benchmarks/regions_layouts.py` (runpy, as tests/test_benchmarks.py runs it, adds no folder)
sys.path.insert(0, str(Path(__file__).resolve().parent))

COLUMNS = ["A (whole image)", "B (whole image)", "regions A | B", "+ windows + regional decode"]


def main(argv=None):
    from PIL import Image, ImageDraw
    from regions import GUIDANCE, NEGATIVE, STEPS, H, W, _load  # benchmarks/regions.py: the same model, zoo and sampler

    from dmm_ray.console import refuse_models_being_replaced
    from dmm_ray.regions import Region

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="merged-model folder (the toy zoo's merge)")
    ap.add_argument("--zoo", required=True, help="the zoo the model was merged from (prompts, the 'distinct' styles)")
    ap.add_argument("--out", default="outputs/regions_layouts.png")
    args = ap.parse_args(argv)
    refuse_models_being_replaced(ap, args, "model")  # refused while a running job's save may replace it
    pipe, _, prompts, styles, _ = _load(args.model, Path(args.zoo))
    ordered = list(itertools.permutations(styles, 2))
    pairs = (ordered[::3][:4] + ordered[1::3][:4])[:8]  # 8 of the 12 pairs, each style on each side
    kw = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, negative_prompt=[NEGATIVE], height=H, width=W, output_type="pt")

    def to_pil(t):
        return Image.fromarray((t.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")).resize((256, 128), Image.NEAREST)

    sheet = Image.new("RGB", (8 + len(COLUMNS) * 264, 24 + len(pairs) * 150), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(COLUMNS):
        draw.text((8 + c * 264, 6), name, fill="black")
    for r, (a, b) in enumerate(pairs):
        regions = [Region(box=(0, 0, 0.5, 1), style=a), Region(box=(0.5, 0, 1, 1), style=b)]
        calls = [dict(style=a), dict(style=b), dict(regions=regions), dict(regions=regions, region_window="native", region_decode=True)]
        y = 24 + r * 150
        draw.text((8, y), f"{a} | {b}, seed {r}", fill="black")
        for c, call in enumerate(calls):
            image = pipe([prompts[r]], generator=[torch.Generator().manual_seed(r)], **call, **kw).images[0]
            sheet.paste(to_pil(image), (8 + c * 264, y + 14))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
