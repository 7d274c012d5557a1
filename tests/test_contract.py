"""The contract's gate: buf lint, and no breaking change since the previous commit (buf breaking)."""

import subprocess
from pathlib import Path

from harness import REPO, edited_contract
from local_machine import BIN

BUF = BIN / "buf"


def buf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BUF), *args, "--config", str(REPO / "buf.yaml")], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def breaking(new: Path, old: Path) -> subprocess.CompletedProcess:
    return buf("breaking", f"{new}#format=binpb", "--against", f"{old}#format=binpb")


def test_buf_lint():
    result = buf("lint", "gen/mds.protoset#format=binpb", "--path", "mds")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_since_the_previous_commit(tmp_path):
    previous = subprocess.run(["git", "show", "HEAD~1:gen/mds.protoset"], cwd=REPO, capture_output=True)
    assert previous.returncode == 0, previous.stderr.decode()
    (tmp_path / "previous.protoset").write_bytes(previous.stdout)
    result = breaking(REPO / "gen" / "mds.protoset", tmp_path / "previous.protoset")
    assert result.returncode == 0, "breaks clients of the previous commit (use mds.v2):\n" + result.stdout


def test_the_gate_catches_a_breaking_change(tmp_path):
    edited_contract(
        tmp_path,
        "  // 0 selects the latest version.\n  int64 version = 2;",
        "  // 0 selects the latest version.\n  string version = 2;",
        "--include_imports",
        "--include_source_info",
        "--descriptor_set_out={out}/changed",
    )
    result = breaking(tmp_path / "changed", REPO / "gen" / "mds.protoset")
    assert result.returncode != 0
    assert 'Field "2" with name "version" on message "GetModelRequest" changed type' in result.stdout
