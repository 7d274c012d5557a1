""".env.example and docs/configuration.md must match what `make settings-docs` writes from mds_grpc/config.py."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATED = (".env.example", "docs/configuration.md")


def test_settings_docs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_settings_docs.py"), str(tmp_path)], check=True)
    stale = [name for name in GENERATED if (tmp_path / name).read_text() != (REPO / name).read_text()]
    assert not stale, f"{stale} differ from the settings in mds_grpc/config.py: run `make settings-docs`"
