"""`make demo`: the most complete path available end to end (replaced by zoo -> merge when those land)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    from diffusers.utils import make_image_grid

    from dmm_ray import DMMPipeline, StyleUNet
    from dmm_ray.tiny import tiny_sd_components

    c = tiny_sd_components(seed=0)
    student = StyleUNet.from_unet(c["unet"], ["noir", "neon", "pastel"])
    pipe = DMMPipeline.from_components(student, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"])
    images = [pipe("a red circle", style=s, num_inference_steps=4, height=32, width=32,
                   generator=torch.Generator().manual_seed(0)).images[0] for s in pipe.styles]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out / "merged")
    make_image_grid(images, rows=1, cols=len(images)).save(out / "styles.png")
    print(f"merged pipeline: {out / 'merged'}\nstyle grid: {out / 'styles.png'}")


if __name__ == "__main__":
    main()
