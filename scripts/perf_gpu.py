"""The throughput targets, measured in one call on one GPU at the churches shape (random weights):

    python scripts/perf_gpu.py                          # CUDA, churches shape, about 5 minutes
    python scripts/perf_gpu.py --device cpu --shape tiny --budget 60    # a smoke run anywhere

Targets (one H100): absorbing 256 steps >= 35 img/s, 50 steps >= 175 img/s; cached autoregressive
>= 300 img/s; end to end (sampling, decoding, Inception features) within 15% of sampling alone at
256 steps. Rows run in order of importance; a row that would start after --budget seconds is listed
as not run, and a row that fails (a compiler error, out of memory) is recorded with its error, so
one call always leaves a table: results/perf/<device>/results.{md,json,csv}.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.execution import Execution  # noqa: E402
from bench.perf import (PerfRow, attach_extractor, matmul_peaks, perf_result, random_models,  # noqa: E402
                        time_row, write_perf)
from bench.results import Row  # noqa: E402
from bench.samplers.registry import sampler_class  # noqa: E402
from bench.timing import device_name  # noqa: E402

FAST = "bf16+skip-idle+head-where-drawn+compile"
# (sampler, steps, execution, batch, warm-up, repeats), most important first
PLAN = [
    ("absorbing", 256, FAST, 256, 1, 2),
    ("absorbing", 50, FAST, 256, 1, 3),
    ("autoregressive", None, "bf16+compile", 512, 1, 3),
    ("autoregressive", None, "bf16", 512, 1, 3),
    ("absorbing", 50, "plain", 64, 1, 2),           # the official sampler's execution, for the speed-ups
    ("absorbing", 256, "plain", 64, 0, 1),          # (cuBLAS already warm from the row above)
    ("autoregressive", None, "plain", 64, 1, 2),
    ("absorbing", 256, "bf16+skip-idle+head-where-drawn+cuda-graphs", 256, 1, 2),
    ("autoregressive", None, "bf16+cuda-graphs", 512, 1, 3),
    ("absorbing", 256, "bf16", 256, 1, 2),          # what each switch adds, one at a time
    ("absorbing", 256, "bf16+skip-idle", 256, 1, 2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="churches")
    ap.add_argument("--budget", type=float, default=270.0,
                    help="seconds after set-up after which no new row starts (the first row always runs)")
    ap.add_argument("--no-features", action="store_true", help="do not time Inception features")
    ap.add_argument("--batch-scale", type=float, default=1.0, help="multiply every batch size (smoke runs)")
    ap.add_argument("--out", default=None, help="[default: results/perf/<device>]")
    args = ap.parse_args()
    device = torch.device(args.device)
    models = random_models(args.shape, device)
    if not args.no_features:
        attach_extractor(models, "inception-v3-compat", device)
    peaks = matmul_peaks(device)
    started = time.perf_counter()
    rows = []
    seq_len = models.priors["absorbing"].seq_len
    for sampler, steps, spec, batch, warmup, repeats in PLAN:
        settings = sampler_class(sampler).settings(min(steps, seq_len) if steps else None, 1.0)  # tiny: <= 64 steps
        batch = max(1, int(batch * args.batch_scale))
        base = dict(label=settings.label(), sampler=sampler, steps=steps, switches=spec, batch_size=batch)
        elapsed = time.perf_counter() - started
        if rows and elapsed > args.budget:
            rows.append(Row(**base, error=f"not run: {elapsed:.0f} s of the {args.budget:.0f} s budget spent"))
            continue
        try:
            row = time_row(models, PerfRow(settings, Execution.parse(spec), batch), warmup, repeats, device, peaks)
        except Exception as e:  # recorded, so that one failing switch leaves the rest of the table
            row = Row(**base, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        row.wall_s = time.perf_counter() - started - elapsed
        rows.append(row)
        print(f"{row.label} [{spec}] batch {batch}: "
              + (f"{row.sampling_img_per_s:.2f} img/s sampling" if row.error is None else row.error),
              flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    out = Path(args.out) if args.out else Path("results") / "perf" / name
    result = perf_result(models, device, peaks, rows, warmup="per row", repeats="per row", plan=PLAN,
                         total_s=time.perf_counter() - started)
    print(write_perf(result, out, estimate_samples=50000))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
