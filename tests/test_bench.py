"""Benchmarks are not tests: this only proves the harness runs end to end (a few seconds per target)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_harness_smoke(tmp_path):
    subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    targets = {(r["target"], r["call"]) for r in rows}
    assert {("floor", "Predict"), ("MDS", "Predict"), ("MDS", "ModelInfer"), ("MDS", "PredictStream")} <= targets
    assert all(r["errors"] == 0 and r["requests_per_s"] > 0 for r in rows)
    assert "| MDS | Predict | 1 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 0
