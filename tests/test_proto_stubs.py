"""The generated protobuf modules must match the .proto sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "proto").glob("*_pb2*.py*"))
    assert generated, "gen_proto.sh produced nothing"
    stale = [
        str(rel) for rel in generated
        if (tmp_path / rel).read_bytes() != (ROOT / rel).read_bytes()
    ]
    assert not stale, f"stale generated stubs, run scripts/gen_proto.sh: {stale}"
