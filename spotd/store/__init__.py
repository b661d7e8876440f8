"""The checkpoint store: upload with an atomic commit, list, restore verified, retention.

Layout under the store URI (design.md)::

    <job_id>/checkpoints/<name>/<files…>        data first
    <job_id>/checkpoints/<name>/MANIFEST.json   written last, never overwritten: the commit point
    <job_id>/LATEST                             name of the newest commit (for people and tools)
    <job_id>/events/<time>-<instance>.json      one record per interruption handled

A checkpoint without a parseable MANIFEST.json does not exist. Names sort chronologically
(``20261125T040000.123456Z-s000000500-train-r0-1a2b``), so listing is authoritative and LATEST is only a hint.

Two backends share the protocol in :class:`_BaseStore`: ``file://`` (:mod:`spotd.store.file`) and ``s3://``
(:mod:`spotd.store.s3`). Pick one with :func:`open_store`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import enum
import hashlib
import json
import os
import secrets
import shutil
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from spotd.errors import ChecksumMismatch, CommitError, PathEscape, RestoreError, StoreError, UploadError
from spotd.events import InterruptionRecord
from spotd.logs import get_logger

if TYPE_CHECKING:
    from spotd.config import Config
    from spotd.metrics import Metrics

__all__ = [
    "CheckpointStore",
    "CommitInfo",
    "FileEntry",
    "Manifest",
    "Priority",
    "RestoreResult",
    "open_store",
    "resolve_inside",
]

log = get_logger("spotd.store")

T = TypeVar("T")

MANIFEST: Final = "MANIFEST.json"
MANIFEST_FORMAT: Final = 1
#: Read size for hashing and copying: large enough to amortise syscalls, small enough to stay in cache.
CHUNK: Final = 8 * 1024 * 1024
#: Prefix of half-written names; skipped by list and removed by recover().
TMP_PREFIX: Final = ".spotd-tmp-"
RESTORE_PREFIX: Final = ".spotd-restore-"


# --------------------------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One data file of a checkpoint; ``path`` is posix and relative to checkpoint_dir."""

    path: str
    size: int
    checksum: str  # "<algorithm>:<base64 of the big-endian digest>", S3's encoding


@dataclass(frozen=True, slots=True)
class CommitInfo:
    job_id: str
    step: int | None
    trainer: str
    rank: int | None
    world_size: int | None
    request_id: str | None
    reason: str
    instance_id: str
    final: bool


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    job_id: str
    step: int | None
    created_at: datetime
    instance_id: str
    trainer: str
    rank: int | None
    world_size: int | None
    request_id: str | None
    reason: str
    files: tuple[FileEntry, ...]
    format: int = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        body = {
            "format": self.format,
            "name": self.name,
            "job_id": self.job_id,
            "step": self.step,
            "created_at": self.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "instance_id": self.instance_id,
            "trainer": self.trainer,
            "rank": self.rank,
            "world_size": self.world_size,
            "request_id": self.request_id,
            "reason": self.reason,
            "total_bytes": self.total_bytes,
            "files": [{"path": f.path, "size": f.size, "checksum": f.checksum} for f in self.files],
        }
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate; any problem is a :class:`StoreError` saying what is wrong."""

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

        def field(key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
            value = raw.get(key)
            if value is None and optional:
                return None
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise bad(f"field {key!r} is {value!r}")
            return value

        files = field("files", list)
        entries: list[FileEntry] = []
        for item in files:
            if not isinstance(item, dict):
                raise bad("a files entry is not an object")
            path, size, checksum = item.get("path"), item.get("size"), item.get("checksum")
            if not isinstance(path, str) or not _safe_relative(path):
                raise bad(f"file path {path!r} is not a relative path inside the checkpoint")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad(f"file {path!r} has size {size!r}")
            if not isinstance(checksum, str) or checksum.split(":", 1)[0] not in _ALGORITHMS:
                raise bad(f"file {path!r} has checksum {checksum!r}")
            entries.append(FileEntry(path=path, size=size, checksum=checksum))
        try:
            created = datetime.fromisoformat(field("created_at", str).replace("Z", "+00:00"))
        except ValueError:
            raise bad(f"created_at {raw.get('created_at')!r} is not an ISO time") from None
        return cls(
            name=field("name", str),
            job_id=field("job_id", str),
            step=field("step", int, optional=True),
            created_at=created if created.tzinfo else created.replace(tzinfo=UTC),
            instance_id=field("instance_id", str),
            trainer=field("trainer", str),
            rank=field("rank", int, optional=True),
            world_size=field("world_size", int, optional=True),
            request_id=field("request_id", str, optional=True),
            reason=field("reason", str),
            files=tuple(entries),
        )


@dataclass(frozen=True, slots=True)
class RestoreResult:
    manifest: Manifest
    files: int
    bytes: int
    seconds: float
    skipped: tuple[str, ...]  # names that failed verification and were fallen back from


class Priority(enum.Enum):
    EMERGENCY = "emergency"
    BACKGROUND = "background"


class CheckpointStore(Protocol):
    uri: str

    async def check_access(self) -> None: ...
    async def recover(self) -> int: ...
    async def commit(
        self,
        source: Path,
        *,
        checkpoint_dir: Path,
        info: CommitInfo,
        priority: Priority = Priority.BACKGROUND,
        progress: Callable[[int], None] | None = None,
    ) -> Manifest: ...
    async def list(self) -> list[Manifest]: ...
    async def restore(
        self, dest: Path, *, name: str | None = None, progress: Callable[[int, int], None] | None = None
    ) -> RestoreResult: ...
    async def write_event(self, record: InterruptionRecord) -> str: ...
    async def close(self) -> None: ...


# --------------------------------------------------------------------------------------------- paths


def _safe_relative(path: str) -> bool:
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and "\x00" not in path and path != "."


def resolve_inside(checkpoint_dir: Path, path: str) -> Path:
    """Resolve ``path`` (relative to ``checkpoint_dir``, or absolute inside it) and refuse escapes.

    Refused with :class:`PathEscape`: any ``..`` component, absolute paths elsewhere, symlinks that lead
    out, and for a directory any symlink inside it that leads out. Blocking (stat calls): run it on an
    executor for big directory trees.
    """
    root = checkpoint_dir.resolve()
    fix = f"save checkpoints inside checkpoint_dir {str(checkpoint_dir)!r} and report them relative to it"
    if not path or "\x00" in path:
        raise PathEscape(f"checkpoint path {path!r} is empty or contains NUL; fix: {fix}")
    pure = PurePosixPath(path)
    if ".." in pure.parts:
        raise PathEscape(
            f"checkpoint path {path!r} contains '..' (checkpoint_dir {str(checkpoint_dir)!r}); fix: {fix}"
        )
    candidate = Path(path) if pure.is_absolute() else root / path
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise PathEscape(
            f"checkpoint path {path!r} resolves to {str(resolved)!r}, outside checkpoint_dir "
            f"{str(checkpoint_dir)!r}; fix: {fix} (and make symlinks point inside it)"
        )
    if resolved.is_dir():
        for dirpath, dirnames, filenames in os.walk(resolved):
            for entry in (*dirnames, *filenames):
                p = Path(dirpath, entry)
                if p.is_symlink() and not p.resolve().is_relative_to(root):
                    raise PathEscape(
                        f"symlink {str(p)!r} in checkpoint {path!r} leads to {str(p.resolve())!r}, outside "
                        f"checkpoint_dir {str(checkpoint_dir)!r}; fix: copy the file in instead of linking it"
                    )
    return resolved


@dataclass(frozen=True, slots=True)
class _LocalFile:
    rel: str  # posix, relative to checkpoint_dir
    path: Path  # what to read (a symlink inside is read through)
    size: int


def _collect_files(checkpoint_dir: Path, source: Path) -> list[_LocalFile]:
    """The data files of a checkpoint; symlinked directories are not followed (they could loop)."""
    root = checkpoint_dir.resolve()
    src = resolve_inside(checkpoint_dir, str(source))
    if src.is_file():
        paths = [src]
    elif src.is_dir():
        paths = []
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath, name)
                if p.is_file():  # skips sockets, fifos and dangling links
                    paths.append(p)
    else:
        raise UploadError(
            f"checkpoint {str(source)!r} does not exist; fix: report a path the trainer has saved"
        )
    files = [_LocalFile(rel=p.relative_to(root).as_posix(), path=p, size=p.stat().st_size) for p in paths]
    if not files:
        raise UploadError(
            f"checkpoint {str(source)!r} holds no files; fix: save the checkpoint before reporting it"
        )
    if any(f.rel == MANIFEST for f in files):
        raise UploadError(
            f"a checkpoint file may not be named {MANIFEST} at the top of checkpoint_dir; fix: rename it"
        )
    return files


# --------------------------------------------------------------------------------------------- checksums


class _Hasher:
    __slots__ = ("_algo", "_crc", "_h")

    def __init__(self, algo: str) -> None:
        self._algo = algo
        self._crc = 0
        self._h: Any = hashlib.sha256() if algo == "sha256" else None

    def update(self, data: bytes | memoryview) -> None:
        if self._h is not None:
            self._h.update(data)
        else:
            self._crc = crc_update(self._algo, data, self._crc)

    def value(self) -> str:
        if self._h is not None:
            return f"sha256:{base64.b64encode(self._h.digest()).decode()}"
        return encode_crc(self._algo, self._crc)


_ALGORITHMS: Final = ("crc32", "crc32c", "crc64nvme", "sha256")


def _have_awscrt() -> bool:
    try:
        import awscrt.checksums  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def crc_update(algo: str, data: bytes | memoryview, crc: int = 0) -> int:
    """Continue a CRC over ``data`` without copying it. crc32 uses zlib (faster than awscrt's crc32);
    crc32c and crc64nvme need awscrt (~28 GB/s on one core, so hashing is never the bottleneck)."""
    if algo == "crc32":
        return zlib.crc32(data, crc)
    from awscrt import checksums  # type: ignore[import-untyped,unused-ignore]  # optional dependency (boto3[crt])

    fn = checksums.crc32c if algo == "crc32c" else checksums.crc64nvme
    return int(fn(data, crc))


def can_combine(algo: str) -> bool:
    """Whether per-part CRCs can be joined into the whole file's (awscrt has the combine functions); when
    not, the whole-file checksum needs a sequential pass over the file."""
    return algo in ("crc32", "crc32c", "crc64nvme") and _have_awscrt()


def crc_combine(algo: str, crc1: int, crc2: int, len2: int) -> int:
    """CRC of A+B from CRC(A), CRC(B) and len(B); needs :func:`can_combine`."""
    from awscrt import checksums  # type: ignore[import-untyped,unused-ignore]

    fn = {
        "crc32": checksums.combine_crc32,
        "crc32c": checksums.combine_crc32c,
        "crc64nvme": checksums.combine_crc64nvme,
    }[algo]
    return int(fn(crc1, crc2, len2))


def encode_crc(algo: str, crc: int) -> str:
    """S3's encoding (base64 of the big-endian digest) behind our ``<algorithm>:`` tag."""
    digest = crc.to_bytes(8 if algo == "crc64nvme" else 4, "big")
    return f"{algo}:{base64.b64encode(digest).decode()}"


def choose_checksum(setting: str) -> str:
    """``auto`` → crc64nvme with awscrt installed (S3's default; full-object checksums on multipart uploads),
    else crc32 (zlib; botocore's CRC32C and CRC64NVME both need awscrt). An explicit crc32c/crc64nvme
    without awscrt is a clear error."""
    if setting == "auto":
        return "crc64nvme" if _have_awscrt() else "crc32"
    if setting in ("crc32c", "crc64nvme") and not _have_awscrt():
        raise StoreError(
            f"store.checksum = {setting!r} needs the awscrt package; fix: pip install 'boto3[crt]', or set "
            'store.checksum = "crc32" (or "auto")'
        )
    return setting


def hash_file(path: Path, algo: str, *, fsync: bool = False) -> tuple[int, str]:
    """(size, checksum) of a file, in one read pass; blocking."""
    hasher = _Hasher(algo)
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            hasher.update(view[:n])
            size += n
        if fsync:
            os.fsync(fh.fileno())
    return size, hasher.value()


# --------------------------------------------------------------------------------------------- naming


def _sanitize(text: str, limit: int = 40) -> str:
    out = "".join(c if c.isalnum() or c in "_.-" else "_" for c in text)[:limit]
    return out or "x"


def checkpoint_name(info: CommitInfo, now: datetime) -> str:
    step = f"s{info.step:09d}" if info.step is not None else "s---------"
    rank = f"-r{info.rank}" if info.rank is not None else ""
    # The random tail makes names unique across instances that commit in the same microsecond.
    return (
        f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{step}-{_sanitize(info.trainer)}{rank}-{secrets.token_hex(2)}"
    )


def _candidate_sets(manifests: Sequence[Manifest]) -> list[list[Manifest]]:
    """Restore candidates, newest first. A multi-rank checkpoint (world_size > 1) is restorable only as a
    consistent set: every rank's newest checkpoint of that same step; a step with a rank missing is skipped,
    which falls back to an older step."""
    sets: list[list[Manifest]] = []
    seen: set[tuple[int | None, int]] = set()
    for m in manifests:
        if not m.world_size or m.world_size <= 1:
            sets.append([m])
            continue
        key = (m.step, m.world_size)
        if key in seen:
            continue
        seen.add(key)
        by_rank: dict[int | None, Manifest] = {}
        for other in manifests:  # newest first, so the first per rank is the newest
            if other.step == m.step and other.world_size == m.world_size:
                by_rank.setdefault(other.rank, other)
        if all(r in by_rank for r in range(m.world_size)):
            sets.append([by_rank[r] for r in range(m.world_size)])
        else:
            log.warning(
                "restore.incomplete_step",
                step=m.step,
                world_size=m.world_size,
                ranks=sorted(r for r in by_rank if r is not None),
            )
    return sets


# --------------------------------------------------------------------------------------------- base


class _Exists(Exception):
    """A conditional write found the key already there."""


class _BaseStore(ABC):
    """The commit/list/restore/retention protocol over a few storage primitives."""

    __slots__ = ("_algo", "_executor", "_inflight", "_job", "_keep", "_metrics", "_owns_executor", "uri")

    def __init__(
        self,
        *,
        uri: str,
        job_id: str,
        keep: int,
        checksum: str,
        executor: concurrent.futures.Executor | None,
        metrics: Metrics | None,
        workers: int,
    ) -> None:
        self.uri = uri
        self._job = job_id
        self._keep = keep
        self._algo = choose_checksum(checksum)
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="spotd-store"
        )
        self._metrics = metrics
        self._inflight: set[str] = set()

    # ---- primitives: keys are relative to the store root and include the job id

    @abstractmethod
    async def _put(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...
    @abstractmethod
    async def _get(self, key: str) -> bytes | None: ...
    @abstractmethod
    async def _list(self, prefix: str) -> list[str]: ...
    @abstractmethod
    async def _delete(self, keys: Sequence[str]) -> None: ...
    @abstractmethod
    async def _upload(
        self, file: _LocalFile, key: str, priority: Priority, progress: Callable[[int], None] | None
    ) -> str:
        """Upload one file; returns its checksum (computed from the bytes read)."""

    @abstractmethod
    async def _download(
        self, key: str, dest: Path, *, size: int, algo: str, progress: Callable[[int], None] | None
    ) -> tuple[int, str] | None:
        """Download one object into ``dest``, fsynced. Returns (size, checksum) when the backend hashed the
        bytes as they arrived (no second read), or None to have the file hashed from disk afterwards."""

    def _preempt_begin(self) -> None:  # noqa: B027  (backends without preemption keep the default)
        pass

    def _preempt_end(self) -> None:  # noqa: B027
        pass

    # ---- helpers

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def _prefix(self) -> str:
        return f"{self._job}/checkpoints/"

    def _url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    # ---- protocol

    async def commit(
        self,
        source: Path,
        *,
        checkpoint_dir: Path,
        info: CommitInfo,
        priority: Priority = Priority.BACKGROUND,
        progress: Callable[[int], None] | None = None,
    ) -> Manifest:
        """Upload data files, then MANIFEST.json (never overwriting), then LATEST; then retention.

        A failure before the manifest is written leaves only an orphan directory that list() ignores
        and a later retention pass removes. Nothing local is deleted.
        """
        started = time.monotonic()
        files = await self._run(_collect_files, checkpoint_dir, source)
        created = datetime.now(UTC)
        name = checkpoint_name(info, created)
        base = f"{self._prefix}{name}/"
        self._inflight.add(name)
        if priority is Priority.EMERGENCY:
            self._preempt_begin()
        try:
            checksums = await _gather_or_cancel(
                [self._upload(f, base + f.rel, priority, progress) for f in files]
            )
            manifest = Manifest(
                name=name,
                job_id=info.job_id,
                step=info.step,
                created_at=created,
                instance_id=info.instance_id,
                trainer=info.trainer,
                rank=info.rank,
                world_size=info.world_size,
                request_id=info.request_id,
                reason=info.reason,
                files=tuple(
                    FileEntry(path=f.rel, size=f.size, checksum=c)
                    for f, c in zip(files, checksums, strict=True)
                ),
            )
            try:
                await self._put(base + MANIFEST, manifest.to_json(), if_absent=True)
            except _Exists:
                # A retried PUT whose first try reached the server finds its own manifest: that is success.
                if await self._get(base + MANIFEST) != manifest.to_json():
                    raise CommitError(
                        f"{self._url(base + MANIFEST)} already exists; not overwritten"
                    ) from None
            except StoreError as exc:
                raise CommitError(f"writing {self._url(base + MANIFEST)} failed: {exc}") from exc
            await self._update_latest(name)
        except BaseException as exc:
            # Not counted in spotd_upload_failures_total: a failed attempt may yet be retried, and the
            # coordinator counts a commit once it gives up.
            log.error(
                "store.commit_failed",
                name=name,
                source=str(source),
                error=str(exc),
                error_type=type(exc).__name__,
            )
            raise
        finally:
            if priority is Priority.EMERGENCY:
                self._preempt_end()
            self._inflight.discard(name)
        seconds = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.upload_bytes.inc(manifest.total_bytes)
            self._metrics.upload_seconds.observe(seconds)
        log.info(
            "store.committed",
            name=name,
            url=self._url(base),
            files=len(files),
            bytes=manifest.total_bytes,
            seconds=round(seconds, 3),
            priority=priority.value,
            step=info.step,
            rank=info.rank,
        )
        try:
            await self._retention()
        except Exception as exc:  # a failed cleanup never fails a commit that already happened
            log.warning("store.retention_failed", error=str(exc))
        return manifest

    async def _update_latest(self, name: str) -> None:
        key = f"{self._job}/LATEST"
        try:
            current = await self._get(key)
            # Concurrent ranks commit out of order; LATEST only moves forward.
            if current is not None and current.decode(errors="replace").strip() >= name:
                return
            await self._put(key, name.encode() + b"\n")
        except StoreError as exc:
            raise CommitError(
                f"writing {self._url(key)} failed (the checkpoint itself is committed): {exc}"
            ) from exc

    async def _manifests(self) -> tuple[list[Manifest], set[str]]:
        """Committed manifests newest first, and every name present (committed or not)."""
        keys = await self._list(self._prefix)
        names: set[str] = set()
        manifest_names: list[str] = []
        for key in keys:
            rest = key[len(self._prefix) :]
            name, _, tail = rest.partition("/")
            if not name or name.startswith("."):
                continue
            names.add(name)
            if tail == MANIFEST:
                manifest_names.append(name)
        bodies = await asyncio.gather(*(self._get(f"{self._prefix}{n}/{MANIFEST}") for n in manifest_names))
        out: list[Manifest] = []
        for name, body in zip(manifest_names, bodies, strict=True):
            if body is None:
                continue
            try:
                m = Manifest.from_json(body)
            except StoreError as exc:
                log.warning("store.bad_manifest", name=name, error=str(exc))
                continue
            if m.name != name:
                log.warning("store.bad_manifest", name=name, error=f"manifest names {m.name!r}")
                continue
            out.append(m)
        out.sort(key=lambda m: m.name, reverse=True)
        return out, names

    async def list(self) -> list[Manifest]:
        """Committed checkpoints (MANIFEST.json present and parseable), newest first."""
        manifests, _ = await self._manifests()
        return manifests

    async def _retention(self) -> None:
        """Keep ``store.keep`` commits per rank; delete older ones manifest first (so a crash mid-delete
        leaves an invisible orphan, never a half checkpoint). Orphans older than every kept commit and not
        being uploaded by this process are removed too."""
        manifests, names = await self._manifests()
        per_rank: dict[int | None, int] = {}
        kept: list[str] = []
        doomed: list[str] = []
        for m in manifests:
            per_rank[m.rank] = per_rank.get(m.rank, 0) + 1
            (kept if per_rank[m.rank] <= self._keep else doomed).append(m.name)
        if not kept:
            return
        oldest_kept = min(kept)
        committed = {m.name for m in manifests}
        orphans = [n for n in names - committed if n < oldest_kept and n not in self._inflight]
        if not doomed and not orphans:
            return
        all_keys = await self._list(self._prefix)
        for name in [*doomed, *orphans]:
            base = f"{self._prefix}{name}/"
            if name in committed:
                await self._delete([base + MANIFEST])
            await self._delete([k for k in all_keys if k.startswith(base) and k != base + MANIFEST])
        log.info("store.retention", deleted=doomed, orphans=orphans, keep=self._keep)

    async def restore(
        self, dest: Path, *, name: str | None = None, progress: Callable[[int, int], None] | None = None
    ) -> RestoreResult:
        """Download a committed checkpoint into ``dest``, verify every file, then move it into place.

        ``name`` None means the newest; if its newest manifest has world_size > 1, every rank's newest
        checkpoint of that step is restored together (a step with a rank missing is skipped). When a
        download or verification fails, the previous candidate is tried and the failed names are returned
        in ``skipped``. :class:`RestoreError` when nothing could be restored.
        """
        started = time.monotonic()
        manifests = await self.list()
        if name is not None:
            if not _safe_relative(name) or "/" in name:
                raise RestoreError(
                    f"checkpoint name {name!r} is not a name; fix: use one shown by `spotd list`"
                )
            chosen = [m for m in manifests if m.name == name]
            if not chosen:
                raise RestoreError(
                    f"no committed checkpoint {name!r} under {self._url(self._prefix)}; "
                    "fix: pick one from `spotd list`"
                )
            candidates = [chosen]
            # An explicit name still falls back to older commits of the same rank when it fails to verify.
            candidates += [[m] for m in manifests if m.name < name and m.rank == chosen[0].rank]
        else:
            candidates = _candidate_sets(manifests)
        if not candidates:
            raise RestoreError(f"no committed checkpoint under {self._url(self._prefix)}; nothing to restore")
        skipped: list[str] = []
        await self._run(lambda: dest.mkdir(parents=True, exist_ok=True))
        for group in candidates:
            try:
                nfiles, nbytes = await self._restore_group(group, dest, progress)
            except StoreError as exc:
                names = [m.name for m in group]
                skipped.extend(names)
                log.warning("restore.fallback", failed=names, error=str(exc), error_type=type(exc).__name__)
                continue
            seconds = time.monotonic() - started
            if self._metrics is not None:
                self._metrics.restore_seconds.observe(seconds)
            log.info(
                "store.restored",
                names=[m.name for m in group],
                files=nfiles,
                bytes=nbytes,
                seconds=round(seconds, 3),
                dest=str(dest),
                skipped=skipped,
            )
            return RestoreResult(
                manifest=group[0], files=nfiles, bytes=nbytes, seconds=seconds, skipped=tuple(skipped)
            )
        raise RestoreError(
            f"no committed checkpoint under {self._url(self._prefix)} could be downloaded and verified "
            f"(tried {', '.join(skipped)}); see the restore.fallback log lines"
        )

    async def _restore_group(
        self, group: Sequence[Manifest], dest: Path, progress: Callable[[int, int], None] | None
    ) -> tuple[int, int]:
        staging = dest / f"{RESTORE_PREFIX}{secrets.token_hex(4)}"
        staging.mkdir()
        total = sum(m.total_bytes for m in group)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        try:
            jobs = []
            for m in group:
                for f in m.files:
                    target = staging / f.path
                    if not target.resolve().is_relative_to(staging.resolve()):
                        raise RestoreError(f"{m.name}: file {f.path!r} would land outside {dest}")
                    jobs.append(
                        self._fetch_verified(f"{self._prefix}{m.name}/{f.path}", target, f, m.name, advance)
                    )
            await _gather_or_cancel(jobs)
            await self._run(_move_into_place, staging, dest)
        finally:
            await self._run(shutil.rmtree, staging, True)
        return sum(len(m.files) for m in group), total

    async def _fetch_verified(
        self, key: str, target: Path, entry: FileEntry, name: str, advance: Callable[[int], None]
    ) -> None:
        await self._run(lambda: target.parent.mkdir(parents=True, exist_ok=True))
        algo = entry.checksum.split(":", 1)[0]
        hashed = await self._download(key, target, size=entry.size, algo=algo, progress=advance)
        if hashed is None:
            hashed = await self._run(lambda: hash_file(target, algo, fsync=True))
        size, checksum = hashed
        if size != entry.size or checksum != entry.checksum:
            raise ChecksumMismatch(
                f"{name}: {entry.path} has size {size} and {checksum}, the manifest says {entry.size} and "
                f"{entry.checksum}; the stored object is damaged"
            )

    async def write_event(self, record: InterruptionRecord) -> str:
        """Store one interruption record; returns its key."""
        instance = _sanitize(record.instance_id or "unknown", 64)
        key = f"{self._job}/events/{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}-{instance}.json"
        await self._put(key, record.to_json())
        return key

    async def close(self) -> None:
        if self._owns_executor:
            self._executor.shutdown(wait=True)


async def _gather_or_cancel(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """All results in order; on the first failure the others are cancelled (not left writing into a
    staging directory that is about to be removed) and that failure is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(staging: Path, dest: Path) -> None:
    """Replace each top-level entry of ``dest`` by the verified one; an existing directory of the same name
    is moved aside first (os.replace cannot replace a non-empty directory) and removed after."""
    for entry in sorted(staging.iterdir()):
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            aside = staging / f".old-{entry.name}"
            os.replace(target, aside)
            os.replace(entry, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(entry, target)
    _fsync_dir(dest)


def open_store(
    cfg: Config, *, executor: concurrent.futures.Executor | None = None, metrics: Metrics | None = None
) -> CheckpointStore:
    """The store named by ``cfg.store.uri`` (``s3://bucket/prefix`` or ``file:///path``)."""
    uri = cfg.store.uri
    if uri.startswith("file://"):
        from spotd.store.file import FileStore

        return FileStore(
            uri=uri,
            job_id=cfg.job_id,
            keep=cfg.store.keep,
            checksum=cfg.store.checksum,
            executor=executor,
            metrics=metrics,
        )
    if uri.startswith("s3://"):
        from spotd.store.s3 import S3Store

        return S3Store.from_config(cfg, executor=executor, metrics=metrics)
    raise StoreError(
        f'store.uri {uri!r} is neither s3:// nor file://; fix: set store.uri = "s3://bucket/prefix"'
    )
