"""compare.bench and each framework's textbook loop, smoke-tested on tiny data."""
import json
import sys

import numpy as np

from compare.bench import main as bench_main
from tests.helpers import make_idx_dir

# The fields README.md documents for `compare.bench --json`.
FIELDS = {"kind", "framework", "variant", "suite_examples_per_s", "textbook_examples_per_s", "suite_all", "textbook_all",
          "textbook", "device_name", "execution"}


def test_bench_runs_the_suite_and_the_textbook_loop(framework, tmp_path, capsys):
    data = make_idx_dir(tmp_path / "data", 640, 100)
    out = tmp_path / "bench.json"
    code = bench_main(["--frameworks", framework, "--variant", "scratch", "--repeats", "3", "--batch-size", "64",
                       "--train-limit", "640", "--device", "cpu", "--data-dir", str(data), "--no-verify-data",
                       "--python", f"{framework}={sys.executable}", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    (result,) = json.loads(out.read_text())
    assert set(result) == FIELDS, f"bench JSON fields differ from README: {sorted(set(result) ^ FIELDS)}"
    assert (result["framework"], result["variant"]) == (framework, "scratch")
    for loop in ("suite", "textbook"):
        figures = result[f"{loop}_all"]
        assert len(figures) == 3 and all(f > 0 for f in figures), f"{loop}: one figure per repeat"
        assert result[f"{loop}_examples_per_s"] == np.median(figures), f"{loop}_examples_per_s is the median"
    assert f"{framework:>10} scratch" in capsys.readouterr().out
