"""python -m compare.bench: the suite's training loop against a textbook loop, side by side.

For each framework, one worker runs, alternately and in the same process, one
epoch of the suite (common.loop) and one epoch of the framework's textbook loop
(frameworks/<fw>/textbook.py: the loop a reader of the textbook would write)
with the same model, batch size and data, and prints examples/s and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common.config import VARIANTS
from common.data import find_data_dir
from common.errors import BNCompareError
from common.registry import FRAMEWORKS, parse_frameworks

from . import envs
from .run import parse_pythons

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compare.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--variant", choices=VARIANTS, default=None,
                   help="default: builtin for torch, scratch for the others (the figures their issues ask for)")
    p.add_argument("--repeats", type=int, default=3, help="epochs of each loop, alternating; the median is reported")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--train-limit", type=int, default=0, help="first N training images (0 = all 60,000)")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"))
    p.add_argument("--data-dir")
    p.add_argument("--no-verify-data", action="store_true")
    p.add_argument("--python", action="append", default=[], metavar="FW=PATH")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        frameworks = parse_frameworks(args.frameworks)
        explicit = parse_pythons(args.python)
        data_dir = str(find_data_dir(args.data_dir))
    except BNCompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results, status = [], 0
    for framework in frameworks:
        variant = args.variant or ("builtin" if framework == "torch" else "scratch")
        try:
            python = envs.resolve(framework, explicit, log=lambda m: print(m, file=sys.stderr))
        except BNCompareError as exc:
            print(f"[{framework}] skipped: {exc}", file=sys.stderr)
            status = 1
            continue
        job = {"mode": "bench", "framework": framework, "variant": variant, "repeats": args.repeats, "batch_size": args.batch_size,
               "train_limit": args.train_limit, "device": args.device, "data_dir": data_dir,
               "verify": not args.no_verify_data}
        env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([python, "-m", "compare.worker"], input=json.dumps(job), cwd=ROOT, env=env,
                              text=True, capture_output=True)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"[{framework}] benchmark failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            status = 1
            continue
        result = lines[-1]
        results.append(result)
        print(f"{framework:>10} {variant:<10} suite {result['suite_examples_per_s']:>9,.0f} ex/s   "
              f"textbook {result['textbook_examples_per_s']:>9,.0f} ex/s   "
              f"ratio {result['suite_examples_per_s'] / result['textbook_examples_per_s']:.2f}x   "
              f"({result['textbook']}; {result['device_name']}; median of {args.repeats})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
