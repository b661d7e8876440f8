"""What a checkpoint is: its files, who saved it, and MANIFEST.json, the commit point that records both.

MANIFEST.json, format 1 (one JSON object, ``indent=1``, keys in this order)::

    format, name, job_id, step, created_at, instance_id, trainer, rank, world_size, request_id, reason,
    total_bytes, files: [{path, size, checksum}, ...]

then, only when set (added for the multi-node commit; a manifest without them is byte for byte what
every spotd before wrote, and an older spotd reading one with them ignores the extra keys):

    nodes        a checkpoint committed by node parts: how many nodes (the global MANIFEST.json has it)
    node, ranks  a part (``checkpoints/<name>/parts/node-<k>.json``): which node, which global ranks

The fields a trainer's save brings (job_id … instance_id) are declared once, in :class:`Provenance`:
:class:`CommitInfo` (what a commit is asked with) and :class:`Manifest` (what a commit recorded) both extend
it, and the codec reads and writes exactly those fields.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Final

from spotd.errors import StoreError
from spotd.store.checksums import ALGORITHMS

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "PARTS_DIR",
    "CommitInfo",
    "FileEntry",
    "Manifest",
    "Provenance",
    "safe_relative",
]

MANIFEST: Final = "MANIFEST.json"
MANIFEST_FORMAT: Final = 1
#: Where the node parts of a multi-node checkpoint go, inside its directory.
PARTS_DIR: Final = "parts"


def safe_relative(path: str) -> bool:
    """Whether ``path`` is a relative posix path that stays below where it is joined (no ``..``, no NUL)."""
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and "\x00" not in path and path != "."


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEntry:
    """One data file of a checkpoint; ``path`` is posix and relative to checkpoint_dir."""

    path: str
    size: int
    checksum: str  # "<algorithm>:<base64 of the big-endian digest>", S3's encoding


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    """Who saved a checkpoint, at which step and why: recorded in its MANIFEST.json as given."""

    job_id: str
    step: int | None
    trainer: str
    rank: int | None
    world_size: int | None
    request_id: str | None
    reason: str
    instance_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitInfo(Provenance):
    """What a commit is asked with. ``final`` (the instance is going away) steers the daemon, not the
    manifest: format 1 does not record it."""

    final: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest(Provenance):
    """A committed checkpoint as its MANIFEST.json records it."""

    name: str
    created_at: datetime
    files: tuple[FileEntry, ...]
    format: int = MANIFEST_FORMAT
    #: Set on a checkpoint committed from node parts (and on each part): the number of nodes.
    nodes: int | None = None
    #: Set on a part only: the node that wrote it and the global ranks whose files it holds.
    node: int | None = None
    ranks: tuple[int, ...] | None = None

    @property
    def is_part(self) -> bool:
        return self.node is not None

    @property
    def covers_every_rank(self) -> bool:
        """Restorable on its own: one process, or one manifest for every rank of every node (a committed
        part set). A per-rank manifest of a multi-rank run (world_size > 1) is not."""
        if self.is_part:
            return False
        return self.nodes is not None or not self.world_size or self.world_size <= 1

    @classmethod
    def of_commit(
        cls,
        info: Provenance,
        *,
        name: str,
        created_at: datetime,
        files: tuple[FileEntry, ...],
        nodes: int | None = None,
        node: int | None = None,
        ranks: tuple[int, ...] | None = None,
    ) -> Manifest:
        """The manifest a commit of ``info`` writes (with ``nodes``/``node``/``ranks``: a node's part)."""
        return cls(
            name=name,
            created_at=created_at,
            files=files,
            nodes=nodes,
            node=node,
            ranks=ranks,
            **_provenance(info),
        )

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        values: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "created_at": self.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "total_bytes": self.total_bytes,
            "files": [{"path": f.path, "size": f.size, "checksum": f.checksum} for f in self.files],
            **_provenance(self),
        }
        # Format 1's key order, so the bytes stay what every spotd so far wrote; a key not in the list
        # (a field added later) goes last rather than being dropped.
        body = {key: values.pop(key) for key in _KEY_ORDER}
        body.update(values)
        for key, value in (("nodes", self.nodes), ("node", self.node), ("ranks", self.ranks)):
            if value is not None:
                body[key] = list(value) if isinstance(value, tuple) else value
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate; any problem is a :class:`StoreError` saying what is wrong and the fix."""

        def bad(problem: str) -> StoreError:
            return StoreError(
                f"MANIFEST.json is not valid: {problem}; "
                "fix: delete that checkpoint's directory in the store (it is ignored until then)"
            )

        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise bad("not a JSON object")
        fmt = raw.get("format")
        if fmt != MANIFEST_FORMAT:
            raise StoreError(
                f"MANIFEST.json has format {fmt!r}, this spotd reads format {MANIFEST_FORMAT}; "
                "fix: upgrade spotd on this instance"
            )

        def field(key: str, kind: type, optional: bool = False) -> Any:
            value = raw.get(key)
            if value is None and optional:
                return None
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise bad(f"field {key!r} is {value!r}")
            return value

        entries: list[FileEntry] = []
        for item in field("files", list):
            if not isinstance(item, dict):
                raise bad("a files entry is not an object")
            path, size, checksum = item.get("path"), item.get("size"), item.get("checksum")
            if not isinstance(path, str) or not safe_relative(path):
                raise bad(f"file path {path!r} is not a relative path inside the checkpoint")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad(f"file {path!r} has size {size!r}")
            if not isinstance(checksum, str) or checksum.split(":", 1)[0] not in ALGORITHMS:
                raise bad(f"file {path!r} has checksum {checksum!r}")
            entries.append(FileEntry(path=path, size=size, checksum=checksum))
        try:
            created = datetime.fromisoformat(field("created_at", str).replace("Z", "+00:00"))
        except ValueError:
            raise bad(f"created_at {raw.get('created_at')!r} is not an ISO time") from None
        nodes, node = field("nodes", int, True), field("node", int, True)
        if nodes is not None and nodes < 1:
            raise bad(f"field 'nodes' is {nodes!r}")
        if node is not None and (nodes is None or not 0 <= node < nodes):
            raise bad(f"field 'node' is {node!r} with nodes {nodes!r}")
        ranks = raw.get("ranks")
        if ranks is not None and (
            not isinstance(ranks, list)
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)
            or len(set(ranks)) != len(ranks)
        ):
            raise bad(f"field 'ranks' is {ranks!r}")
        return cls(
            name=field("name", str),
            created_at=created if created.tzinfo else created.replace(tzinfo=UTC),
            files=tuple(entries),
            nodes=nodes,
            node=node,
            ranks=tuple(ranks) if ranks is not None else None,
            **{key: field(key, kind, optional) for key, (kind, optional) in _PROVENANCE_KINDS.items()},
        )


def _provenance(value: Provenance) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in fields(Provenance)}


def _json_kind(hint: Any) -> tuple[type, bool]:
    """``str`` → (str, required); ``int | None`` → (int, optional)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if not args:
        return hint, False
    (kind,) = args
    return kind, True


#: The JSON type each Provenance field must have, derived from its annotation (one declaration).
_PROVENANCE_KINDS: Final = {
    name: _json_kind(hint) for name, hint in typing.get_type_hints(Provenance).items()
}
_KEY_ORDER: Final = (
    "format",
    "name",
    "job_id",
    "step",
    "created_at",
    "instance_id",
    "trainer",
    "rank",
    "world_size",
    "request_id",
    "reason",
    "total_bytes",
    "files",
)
