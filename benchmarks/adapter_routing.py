"""Style adapters: the one-style run path vs the dense N-style path, in one process.

    python benchmarks/adapter_routing.py --model $DMM_HOME/outputs/dmm-toy/merged

For each case (a training batch laid out by style, as a packed worker builds it; one style for
the whole batch, as a single-style request; a batch fragmented into runs shorter than 4 rows,
which keeps the dense path), times the student's forward (and forward + backward for the
training case) both ways, interleaved, and prints the median seconds and the speed-up. Also
checks that both paths give the same output (max relative difference).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from dmm_ray.console import positive_int, refuse_models_being_replaced

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="merged model folder with style adapters")
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    refuse_models_being_replaced(p, args, "model")  # refused while a running job's save may replace it
    torch.set_num_threads(args.threads)
    from dmm_ray.models.style_unet import StyleEmbedding, StyleUNet

    unet = StyleUNet.from_pretrained(Path(args.model) / "unet")
    if not unet.config.get("style_adapter_rank"):
        raise SystemExit(f"{args.model} has no style adapters (student.style_adapters.rank: 0); nothing to compare")
    n, size = len(unet.config.style_names), unet.config.sample_size
    routed = StyleEmbedding.adapter_runs
    g = torch.Generator().manual_seed(0)
    cases = [  # name, style ids, with backward
        (f"train batch 256, {n} styles x {256 // n} rows, fwd+bwd", torch.arange(n).repeat_interleave(256 // n), True),
        ("one style, batch 16 (CFG 8 + 8), forward", torch.full((16,), n - 1), False),
        (f"fragmented batch 16 ({n} styles interleaved), forward", torch.arange(16) % n, False),
    ]
    print(f"{args.model}: {n} styles, rank {unet.config.style_adapter_rank}, {len(unet.config.style_adapter_modules)} adapted layers")
    print(f"{'case':<52} {'dense s':>9} {'routed s':>9} {'speed-up':>9} {'max rel diff':>13}")
    for name, ids, backward in cases:
        b = ids.shape[0]
        x, t = torch.randn(b, 4, size, size, generator=g), torch.randint(0, 1000, (b,), generator=g)
        ctx = torch.randn(b, 77, unet.config.cross_attention_dim, generator=g)

        def run(dense: bool) -> torch.Tensor:
            StyleEmbedding.adapter_runs = (lambda self, batch: None) if dense else routed
            unet.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(backward):
                out = unet(x, t, ctx, style_ids=ids).sample
                if backward:
                    out.pow(2).mean().backward()
            return out.detach()

        diff = ((run(True) - run(False)).abs().max() / run(True).abs().max()).item()
        times = {True: [], False: []}
        for _ in range(args.reps):
            for dense in (True, False):
                t0 = time.perf_counter()
                run(dense)
                times[dense].append(time.perf_counter() - t0)
        d, r = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name:<52} {d:>9.3f} {r:>9.3f} {d / r:>8.2f}x {diff:>13.1e}", flush=True)
    StyleEmbedding.adapter_runs = routed
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
