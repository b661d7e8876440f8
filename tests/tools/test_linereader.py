"""LineReader, which every end-to-end test reads a subprocess's events through."""

from __future__ import annotations

import subprocess
import sys

from spotd.tools.testing import LineReader


def test_event_after_another_writers_unfinished_line_is_found() -> None:
    """torchrun's ranks share one stdout: rank 0's print() writes its text, rank 1 writes a whole event line,
    then rank 0 writes its newline. The event ends the merged line and is still read (a CI run lost it)."""
    script = (
        "import os\n"
        "os.write(1, b\"{'train_runtime': '1.343', 'epoch': '2'}\")\n"
        'os.write(1, b\'{"event": "stopped", "rank": 1, "step": 16}\\n\')\n'
        "os.write(1, b'\\n')\n"
        'os.write(1, b\'{"event": "stopped", "rank": 0, "step": 16}\\n\')\n'
        'os.write(1, b\'Writing {shards}: 1/1 {"not": "an event"} and more\\n\')\n'
        'os.write(1, b\'{"event": "nested", "inner": {"a": 1}}\\n\')\n'
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    reader = LineReader(proc.stdout)
    assert proc.wait(30) == 0
    reader.join()
    assert [(e["rank"], e["step"]) for e in reader.events("stopped")] == [(1, 16), (0, 16)]
    assert reader.events("nested") == [{"event": "nested", "inner": {"a": 1}}]
    assert len(reader.json()) == 3  # the object inside the progress line is not the end of it
