"""gen/ (Python, Go, Node stubs, descriptor set, OpenAPI) must match what `make gen` produces from protos/."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEPT_BY_HAND = {"go.mod", "go.sum", "package.json"}  # package manifests of gen/go and gen/ts


def test_generated_code_is_fresh(tmp_path):
    subprocess.run(
        [str(REPO / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(REPO / "gen")
        for p in (REPO / "gen").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name not in KEPT_BY_HAND
    )
    assert committed == fresh, "gen/ has other files than protos/ produce: run `make gen`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, REPO / "gen" / p, shallow=False)]
    assert not stale, f"gen/ is stale against protos/ ({stale}): run `make gen`"
