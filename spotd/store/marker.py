"""The disk marker: which committed checkpoint ``checkpoint_dir`` already holds, so a restart (or the
restore on boot) does not download it again.

It lives in ``<checkpoint_dir>/.spotd/restored.json`` and names a checkpoint of the store; the store
package owns what the disk holds. Both functions block (small file I/O): callers run them off the loop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

from spotd.logs import get_logger
from spotd.store.localfs import STATE_DIR

if TYPE_CHECKING:
    from spotd.store import Manifest

__all__ = ["RESTORED_MARKER", "STATE_DIR", "read_disk_marker", "write_disk_marker"]

log = get_logger("spotd.store")

#: Where the daemon remembers, inside checkpoint_dir (in STATE_DIR), which committed checkpoint the disk
#: already holds.
RESTORED_MARKER: Final = "restored.json"


def write_disk_marker(checkpoint_dir: Path, manifest: Manifest) -> None:
    """Remember that the disk holds this committed checkpoint, so a restart does not download it again."""
    try:
        state = checkpoint_dir / STATE_DIR
        state.mkdir(exist_ok=True)
        tmp = state / (RESTORED_MARKER + ".tmp")
        tmp.write_text(json.dumps({"name": manifest.name, "step": manifest.step}))
        os.replace(tmp, state / RESTORED_MARKER)
    except OSError as exc:
        # A missing marker costs one needless download at the next boot, never a wrong restore.
        log.warning("marker.write_failed", error=str(exc))


def read_disk_marker(checkpoint_dir: Path) -> str | None:
    """Name of the committed checkpoint the disk holds, or None when unknown."""
    try:
        data = json.loads((checkpoint_dir / STATE_DIR / RESTORED_MARKER).read_text())
    except (OSError, ValueError):
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None
