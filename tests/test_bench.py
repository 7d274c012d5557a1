"""Benchmarks are not tests: this only proves the harness runs end to end (a few seconds per workload)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_harness_smoke(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    targets = {(r["workload"], r["target"], r.get("call")) for r in rows}
    assert {
        ("a", "floor", "Predict"),
        ("a", "MDS", "Predict"),
        ("a", "MDS", "ModelInfer"),
        ("b", "MDS", "PredictStream"),
    } <= targets
    assert {r["workload"] for r in rows} == {"a", "b", "d", "e", "f", "g"}  # no peers, no heavy model in a smoke
    measured = {t["target"] for t in json.loads((tmp_path / "results.json").read_text())["targets"] if t["figures"]}
    assert {
        "restart → first prediction ≤ 1.3× the floor's, both models",
        "two serving processes with the big model ≤ 1.3× the PSS of one (weights shared)",
        "shared weights' predictions/s ≥ 0.9× prepacked at batch 1 / 8",
    } <= measured
    assert all(r.get("errors", 0) == 0 for r in rows)
    assert all(r[key] > 0 for r in rows for key in ("requests_per_s", "mb_per_s", "rows_per_s", "seconds") if key in r)
    assert all(r["ratios"]["× floor req/s"] > 0 for r in rows if r["workload"] == "a" and r["target"] == "MDS")
    markdown = (tmp_path / "results.md").read_text()
    assert "| MDS | Predict | 1 |" in markdown and "| MDS UploadModel | external data | 16 |" in markdown
    assert (tmp_path / "results.png").stat().st_size > 0
