"""A file uploaded while it is being written: the parts of an emergency checkpoint go to S3 as soon as they
are complete on disk, and only the tail and the completion are left once the trainer says ``saved``.

The trainer announces the file before writing it (the ``writing`` frame); :class:`GrowingUpload` then
creates the multipart upload under the key the checkpoint will be committed as (its name is chosen now, see
:meth:`~spotd.store.base.BaseStore.commit`, or given: a multi-rank run's step, whose node part
:meth:`~spotd.store.base.BaseStore.commit_part` finishes it), follows the file being written (by an open
descriptor, so through the rename of a temp file into place) and sends every ``part_size`` part whose last
byte is on disk. Nothing is committed by it: the object exists only once :meth:`GrowingUpload.finish`
completes it, which the store's ``commit`` (or ``commit_part``) does after ``saved``, and the manifest is
written after that, as for any file.

Every byte is checked at the end, from the final file: :meth:`~GrowingUpload.finish` reads each part of the
file as it is then (its size, and each part's CRC recomputed from disk), re-sends any part whose CRC or
length differs from what was sent, sends the parts not sent yet, and completes the upload with the whole
file's CRC (CRC combine of the parts', ``ChecksumType=FULL_OBJECT``), which S3 checks as well. A file that
changed after a part of it went out is therefore sent again where it changed, never committed wrong. A
stream nobody finishes (the trainer crashed, or its commit failed first) is aborted; ``recover()`` at the
next start sweeps one whose daemon died.

Only for CRC algorithms that combine (awscrt): without them the whole-file checksum needs a second pass,
and the plain upload is as fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import botocore.exceptions

from spotd.aws.session import error_code, tries_made
from spotd.logs import get_logger
from spotd.store.api import Priority
from spotd.store.base import gather_or_cancel
from spotd.store.checksums import encode_crc
from spotd.store.localfs import LocalFile
from spotd.store.manifest import Provenance
from spotd.store.s3_transfer import (
    S3_ALGORITHM,
    FileChanged,
    FileTransfers,
    Part,
    combined,
    parts_of,
    pread_exact,
)
from spotd.store.transfer_pool import early_parts

__all__ = ["POLL_S", "GrowingUpload", "early_parts"]

log = get_logger("spotd.store")

#: How often the size of a file being written is looked at (an fstat: microseconds).
POLL_S: Final = 0.02
#: S3's most parts of one upload; a file that would need more is uploaded plainly.
MAX_PARTS: Final = 10_000


class GrowingUpload:
    """One announced file's multipart upload, fed while the file grows. ``start()``, then ``finish(file)``
    (after ``saved``) or ``abort()``; both end it, and ``abort()`` after ``finish()`` does nothing."""

    __slots__ = (
        "_done",
        "_early",
        "_fd",
        "_files",
        "_follower",
        "_full",
        "_on_close",
        "_sends",
        "_stop",
        "_upload_id",
        "_watch",
        "algo",
        "created",
        "name",
        "rank",
        "rel",
        "resent",
        "sent_early",
        "step",
        "trainer",
    )

    def __init__(
        self,
        *,
        files: FileTransfers,
        algo: str,
        full: str,
        rel: str,
        watch: tuple[Path, ...],
        name: str,
        created: datetime,
        step: int | None,
        trainer: str,
        rank: int | None,
        on_close: Callable[[], None],
        early_parts: int = 2,
    ) -> None:
        """``full``: the bucket-relative key the file will be committed under; ``rel``: its path relative to
        checkpoint_dir (as the manifest lists it); ``watch``: where its bytes are written, tried in order
        (the temp name first, then the final one)."""
        self._files = files
        self.algo = algo
        self._full = full
        self.rel = rel
        self._watch = watch
        self.name = name
        self.created = created
        self.step = step
        self.trainer = trainer
        self.rank = rank
        self._on_close = on_close
        self._upload_id: str | None = None
        self._fd: int | None = None
        self._stop = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        self._sends: dict[int, asyncio.Task[tuple[int, dict[str, Any]] | None]] = {}
        self._done = False
        #: Parts in flight while the file is still being written: the trainer's save must keep its cores
        #: (with 16 parts at once on 2 cores its 1 GB torch.save took 4-5 s instead of 1); after saved,
        #: every slot of the pool.
        self._early = asyncio.Semaphore(early_parts)
        #: Bytes sent before ``finish`` (while the file was written), and parts sent again by it.
        self.sent_early = 0
        self.resent = 0

    @property
    def key(self) -> str:
        return self._full

    def matches(self, info: Provenance) -> bool:
        """Whether a commit of ``info`` is the save this stream was announced for (its name is this one's)."""
        return (info.step, info.trainer, info.rank) == (self.step, self.trainer, self.rank)

    async def start(self) -> None:
        """Create the multipart upload and start following the file."""
        name = S3_ALGORITHM[self.algo]
        client = self._files.client
        created = await self._files.request(
            f"create the upload of s3://{self._files.bucket}/{self._full}",
            Priority.EMERGENCY,
            lambda: client.create_multipart_upload(
                Bucket=self._files.bucket, Key=self._full, ChecksumAlgorithm=name, ChecksumType="FULL_OBJECT"
            ),
        )
        self._upload_id = str(created["UploadId"])
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    # ---- while the file is written

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        part_size = self._files.part_size
        try:
            while not self._stop.is_set():
                if self._fd is None:
                    self._fd = await loop.run_in_executor(self._files.executor, _open_first, self._watch)
                if self._fd is not None:
                    size = os.fstat(self._fd).st_size
                    number = len(self._sends) + 1
                    while number * part_size <= size and number <= MAX_PARTS:
                        part = Part(number, (number - 1) * part_size, part_size)
                        self._sends[number] = loop.create_task(self._send_early(part))
                        number += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await self._stop.wait()
        except BaseException:
            self._stop.set()
            raise

    async def _send_early(self, part: Part) -> tuple[int, dict[str, Any]] | None:
        """Send one complete part from the file being written; None when that failed (``finish`` sends it)."""
        fd = self._fd
        assert fd is not None and self._upload_id is not None
        upload_id = self._upload_id

        def put() -> tuple[int, dict[str, Any]]:
            if self._done:
                raise FileChanged(f"the stream of {self.rel} was aborted")
            data = pread_exact(fd, part.length, part.offset)
            if len(data) != part.length:
                raise FileChanged(f"{self.rel} shrank while it was being written")
            return self._put_part(upload_id, part, data)

        try:
            async with self._early:
                if self._stop.is_set():
                    return None  # saved meanwhile: finish sends it, at the pool's full concurrency
                out = await self._files.request(
                    f"upload part {part.number} of s3://{self._files.bucket}/{self._full} (being written)",
                    Priority.EMERGENCY,
                    put,
                    nbytes=part.length,
                )
        except Exception as exc:  # only an early start: the part is sent again at finish
            log.info("store.stream_part_deferred", key=self._full, part=part.number, error=str(exc))
            return None
        self.sent_early += part.length
        return out

    def _put_part(self, upload_id: str, part: Part, data: bytes) -> tuple[int, dict[str, Any]]:
        crc, entry = self._files.upload_part(self._full, upload_id, part, data)
        assert crc is not None  # a stream is only opened for an algorithm that combines
        return crc, {**entry, "_length": part.length}

    async def _stop_following(self) -> dict[int, tuple[int, dict[str, Any]]]:
        """Stop looking at the file; the parts that went out, by number (in-flight ones awaited)."""
        self._stop.set()
        if self._follower is not None:
            await asyncio.gather(self._follower, return_exceptions=True)
        sent: dict[int, tuple[int, dict[str, Any]]] = {}
        for number, task in self._sends.items():
            # Awaited, never cancelled: a part's thread may be reading the descriptor closed below.
            result = await asyncio.gather(task, return_exceptions=True)
            if isinstance(result[0], tuple):
                sent[number] = result[0]
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        return sent

    # ---- after saved

    async def finish(self, file: LocalFile, progress: Callable[[int], None] | None) -> str | None:
        """Check every part against ``file`` as it is now, re-send what differs, send the rest, complete the
        object; its checksum. None when nothing went out early (the caller uploads the file plainly; the
        upload is aborted). Raises :class:`UploadError` (the upload aborted) when it cannot complete."""
        if self._done:
            raise AssertionError(f"the stream of {self.rel} was already finished or aborted")
        sent = await self._stop_following()
        parts = parts_of(file.size, self._files.part_size)
        if not sent or len(parts) > MAX_PARTS or self._upload_id is None:
            await self.abort()
            return None
        upload_id = self._upload_id
        client = self._files.client
        what = f"upload s3://{self._files.bucket}/{self._full}"

        async def settle(part: Part) -> tuple[int, dict[str, Any]]:
            before = sent.get(part.number)

            def check_or_put() -> tuple[int, dict[str, Any]]:
                # The final file, read afresh: whatever was sent from the growing one counts only if equal.
                data = self._files.read_part(file, part)
                if before is not None and before[1]["_length"] == part.length:
                    crc, _ = self._files.checksum_args(data)
                    if crc == before[0]:
                        return before
                return self._put_part(upload_id, part, data)

            out = await self._files.request(
                f"{what} (part {part.number}/{len(parts)})",
                Priority.EMERGENCY,
                check_or_put,
                nbytes=part.length,
            )
            if before is not None and out is not before:
                self.resent += 1
                log.warning(
                    "store.stream_part_changed",
                    key=self._full,
                    part=part.number,
                    note="the file changed after this part was sent; sent again from the final file",
                )
            if progress is not None:
                progress(part.length)
            return out

        try:
            settled = await gather_or_cancel([settle(p) for p in parts])
            crcs: list[int | None] = [c for c, _ in settled]
            name = S3_ALGORITHM[self.algo]
            value = encode_crc(self.algo, combined(self.algo, crcs, parts))
            entries = [{k: v for k, v in e.items() if k != "_length"} for _, e in settled]

            def complete() -> None:
                try:
                    client.complete_multipart_upload(
                        Bucket=self._files.bucket,
                        Key=self._full,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": entries},
                        ChecksumType="FULL_OBJECT",
                        **{f"Checksum{name}": value.split(":", 1)[1]},
                    )
                except botocore.exceptions.ClientError as exc:
                    # As in s3_transfer: a completion retried after its first try landed finds it gone.
                    if (
                        error_code(exc) != "NoSuchUpload"
                        or tries_made(exc, self._files.request_attempts) == 1
                    ):
                        raise
                    head = client.head_object(Bucket=self._files.bucket, Key=self._full)
                    if head.get("ContentLength") != file.size:
                        raise

            await self._files.request(what, Priority.EMERGENCY, complete)
            size = (
                await asyncio.get_running_loop().run_in_executor(self._files.executor, os.stat, file.path)
            ).st_size
            if size != file.size:
                raise FileChanged(
                    f"{file.rel} changed size while it was committed; "
                    "fix: report a checkpoint only after it is fully written"
                )
        except BaseException:
            await self.abort()
            raise
        self._close()
        log.info(
            "store.stream_completed",
            key=self._full,
            bytes=file.size,
            sent_before_saved=self.sent_early,
            parts=len(parts),
            parts_resent=self.resent,
        )
        return value

    async def abort(self) -> None:
        """Stop following and abort the multipart upload (nothing of it becomes an object)."""
        if self._done:
            return
        self._close()  # parts not started yet see it and send nothing
        await self._stop_following()
        if self._upload_id is not None:
            self._files.abort_later(self._full, self._upload_id)
        log.info("store.stream_aborted", key=self._full, sent_before_abort=self.sent_early)

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._on_close()


def _open_first(paths: tuple[Path, ...]) -> int | None:
    """A read descriptor of the first of ``paths`` that exists, or None (not created yet). Blocking."""
    for path in paths:
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
    return None
