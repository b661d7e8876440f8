"""file://-only behaviour: crash leftovers, and the conditional writes S3 has and a directory does not."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from spotd.store.file import TMP_PREFIX, FileStore
from tests.store.helpers import JOB


async def test_recover_logs_what_it_swept_once(tmp_path: Path) -> None:
    """recover() removes the temp files a crash left, returns how many, and logs store.recovered once, as the s3 store does; a clean store logs nothing."""
    ck = tmp_path / "store" / JOB / "checkpoints" / "x"
    ck.mkdir(parents=True)
    (ck / f"{TMP_PREFIX}1234-model.pt").write_bytes(b"half")
    (ck / f"{TMP_PREFIX}5678-MANIFEST.json").write_bytes(b"{")
    (ck / "model.pt").write_bytes(b"whole")
    store = FileStore(uri=f"file://{tmp_path / 'store'}", job_id=JOB)
    try:
        with capture_logs() as logs:
            assert await store.recover() == 2
            assert await store.recover() == 0
    finally:
        await store.close()
    recovered = [e for e in logs if e["event"] == "store.recovered"]
    assert recovered == [{"event": "store.recovered", "log_level": "info", "temp_files": 2}]
    assert sorted(p.name for p in ck.iterdir()) == ["model.pt"]
