"""Does `bench check` tell noise from a regression? Runs the CI profile three times against the
committed baseline (results/digits/baseline/) and checks each:

    seed 1          the same code, another draw of samples: must pass
    temperature 3   every sampler silently draws at temperature 3 while its rows say 1: must fail
    temperature 1.3 a real, smaller regression of the same kind: must fail

    python scripts/check_sensitivity.py [--results-dir results]

The degraded runs patch bench.samplers' shared token draw in this process only (nothing is changed
on disk); their rows are written under results/digits/check-*/ and judged by `bench check`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from click.testing import CliRunner  # noqa: E402

import bench.samplers.draw as draw  # noqa: E402
from bench.cli import main  # noqa: E402

CASES = [("check-seed1", None, ["--seeds", "1"]), ("check-t3", 3.0, []), ("check-t1.3", 1.3, [])]


def bench(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    original = draw.draw_tokens
    for name, temperature, extra in CASES:
        def degraded(logits, uniforms, t, top_k=None, top_p=None, finite=None, _t=temperature):
            return original(logits, uniforms, t * _t if t else t, top_k, top_p, finite)
        # every sampler imports the shared draw by name: patch it where they look it up
        import baselines.autoregressive as ar, baselines.maskgit as mg, bench.samplers.absorbing as ab  # noqa: E401
        for module in (draw, ar, mg, ab):
            module.draw_tokens = degraded if temperature else original
        code, out = bench("run", "--profile", "ci", "--run-name", name, "--force", "--quiet", *extra)
        if code != 0:
            raise SystemExit(f"{name}: bench run failed: {out}")
        code, out = bench("check", f"results/digits/{name}")
        print(f"=== {name}: bench check exit {code}\n{out}", flush=True)
    for module in (draw, ar, mg, ab):
        module.draw_tokens = original


if __name__ == "__main__":
    main_()
