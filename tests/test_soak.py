"""A short smoke of the soak (`make soak` runs it for minutes): mixed load, nothing fails, nothing grows."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_soak_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--seconds", "15", "--out", str(tmp_path / "soak.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (tmp_path / "soak.json").exists(), result.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert result.returncode == 0, report
    assert report["failure_count"] == 0 and all(count > 0 for count in report["requests"].values())
