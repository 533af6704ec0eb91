"""The committed generated code matches protos/ and the generator pinned for it."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "gen-protos"), str(tmp_path)], check=True)
    committed = ROOT / "src" / "convsvc" / "v1"
    generated = tmp_path / "convsvc" / "v1"
    names = sorted(p.name for p in generated.iterdir() if p.is_file())
    assert names == sorted(
        p.name for p in committed.iterdir() if p.is_file() and p.suffix != ".pyc"
    )
    for name in names:
        assert (generated / name).read_bytes() == (committed / name).read_bytes(), (
            f"{name} is stale: run scripts/gen-protos"
        )


def test_generated_code_names_the_generator_that_keeps_protobuf_4_compatibility() -> None:
    header = (ROOT / "src" / "convsvc" / "v1" / "conversation_service_pb2.py").read_text()
    # grpcio-tools 1.62.x emits code importable from protobuf 4.25 to 7.x (OpenHands 0.41: <5).
    assert "# Protobuf Python Version: 4.25" in header
