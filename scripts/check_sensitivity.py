"""Does `bench check` tell noise from a regression? Runs the CI profile against the committed
baseline (results/digits/baseline/) once per case and checks each:

    seed 1          the same code, another draw of samples: must pass
    temperature 3   every sampler silently draws at temperature 3 while its rows say 1: must fail
    temperature 2   the regression size the CI check is meant to catch at N = 300: must fail
    temperature 1.3 a smaller regression of the same kind, below what N = 300 resolves on digits
                    (FID +1% to +40%, within the intervals): reported, not required to fail

    python scripts/check_sensitivity.py [--cases check-seed1,check-t2]

Exits 1 when a case's outcome is not the expected one.

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

# name, temperature factor (None: unchanged), extra `bench run` options, expected `bench check` exit
# (None: reported only)
CASES = [("check-seed1", None, ["--seeds", "1"], 0), ("check-t3", 3.0, [], 1), ("check-t2", 2.0, [], 1),
         ("check-t1.3", 1.3, [], None)]


def bench(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES), help="comma-separated case names")
    wanted = ap.parse_args().cases.split(",")
    unknown = sorted(set(wanted) - {c[0] for c in CASES})
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(c[0] for c in CASES)}")
    original = draw.draw_tokens
    wrong = []
    for name, temperature, extra, expected in (c for c in CASES if c[0] in wanted):
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
        verdict = "as expected" if expected in (None, code) else f"EXPECTED exit {expected}"
        print(f"=== {name}: bench check exit {code} ({verdict})\n{out}", flush=True)
        if expected not in (None, code):
            wrong.append(name)
    for module in (draw, ar, mg, ab):
        module.draw_tokens = original
    if wrong:
        raise SystemExit(f"bench check misjudged: {', '.join(wrong)}")


if __name__ == "__main__":
    main_()
