"""The ``s3://`` store: boto3 + s3transfer multipart uploads, flexible checksums, priorities, retries.

Blocking boto3 calls run on the store's executor; transfers run on s3transfer's own threads and report
back to the loop through a subscriber, so the event loop never blocks.

Checksums: S3 is asked to verify every part in transit (``ChecksumAlgorithm``), and the whole-file
checksum recorded in MANIFEST.json is computed locally *while* the upload runs (the file is read from page
cache a second time), so hashing overlaps the upload instead of adding a pass before it.

Priorities: an EMERGENCY commit cancels in-flight BACKGROUND transfers; they wait until no emergency is
running and start that file again (cancel and requeue).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions
from s3transfer.manager import TransferConfig, TransferManager
from s3transfer.subscribers import BaseSubscriber

from spotd.errors import StoreAccessError, StoreError, UploadError
from spotd.logs import get_logger
from spotd.store import Priority, _BaseStore, _Exists, _LocalFile, hash_file

if TYPE_CHECKING:
    from s3transfer.futures import TransferFuture

    from spotd.config import Config
    from spotd.metrics import Metrics

__all__ = ["S3Store"]

log = get_logger("spotd.store")

#: Errors no retry can fix: report them at once with the fix.
_FATAL_CODES: Final = frozenset(
    {"AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
)
_S3_ALGORITHM: Final = {"crc32": "CRC32", "crc32c": "CRC32C", "crc64nvme": "CRC64NVME", "sha256": "SHA256"}


def _code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class _Bridge(BaseSubscriber):
    """Hands s3transfer's thread callbacks to the event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        done: asyncio.Future[None],
        progress: Callable[[int], None] | None,
    ) -> None:
        self._loop = loop
        self._done = done
        self._progress = progress

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone (shutdown): nobody is waiting any more
            pass

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        if self._progress is not None:
            self._call(self._progress, bytes_transferred)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        try:
            future.result()
        except BaseException as exc:
            self._call(_settle, self._done, exc)
        else:
            self._call(_settle, self._done, None)


def _settle(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.done():
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)


class S3Store(_BaseStore):
    __slots__ = (
        "_background",
        "_bucket",
        "_client",
        "_commit_attempts",
        "_emergencies",
        "_idle",
        "_key_prefix",
        "_preempted",
        "_retry_base_s",
        "_tm",
        "requeues",
    )

    def __init__(
        self,
        *,
        uri: str,
        job_id: str,
        keep: int = 3,
        checksum: str = "auto",
        endpoint_url: str = "",
        region: str = "",
        part_size: int = 64 * 1024 * 1024,
        concurrency: int = 32,
        executor: concurrent.futures.Executor | None = None,
        metrics: Metrics | None = None,
        max_attempts: int = 6,
        commit_attempts: int = 3,
        retry_base_s: float = 0.5,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreError(
                f'store.uri {uri!r} is not s3://bucket/prefix; fix: set store.uri = "s3://bucket/prefix"'
            )
        super().__init__(
            uri=uri,
            job_id=job_id,
            keep=keep,
            checksum=checksum,
            executor=executor,
            metrics=metrics,
            workers=16,
        )
        self._bucket = parts.netloc
        prefix = parts.path.strip("/")
        self._key_prefix = f"{prefix}/" if prefix else ""
        config = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=concurrency + 8,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            s3={"addressing_style": "path"} if endpoint_url else None,
            user_agent_extra="spotd",
        )
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config
        )
        self._tm = TransferManager(
            self._client,
            TransferConfig(
                multipart_threshold=part_size,
                multipart_chunksize=part_size,
                max_request_concurrency=concurrency,
                max_io_queue_size=1000,
            ),
        )
        self._commit_attempts = commit_attempts
        self._retry_base_s = retry_base_s
        self._background: set[TransferFuture] = set()
        self._preempted: set[TransferFuture] = set()
        self._emergencies = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.requeues = 0  # background transfers restarted after an emergency (tests and status)

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        executor: concurrent.futures.Executor | None = None,
        metrics: Metrics | None = None,
    ) -> S3Store:
        s = cfg.store
        return cls(
            uri=s.uri,
            job_id=cfg.job_id,
            keep=s.keep,
            checksum=s.checksum,
            endpoint_url=s.endpoint_url,
            region=s.region,
            part_size=s.part_size,
            concurrency=s.concurrency,
            executor=executor,
            metrics=metrics,
        )

    def _full(self, key: str) -> str:
        return self._key_prefix + key

    # ---- priorities

    def _preempt_begin(self) -> None:
        self._emergencies += 1
        self._idle.clear()
        for fut in list(self._background):
            self._preempted.add(fut)
            fut.cancel()
        if self._background:
            log.info("store.background_preempted", transfers=len(self._background))

    def _preempt_end(self) -> None:
        self._emergencies -= 1
        if self._emergencies == 0:
            self._idle.set()

    # ---- primitives

    async def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return await self._run(lambda: fn(**kwargs))
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "PreconditionFailed":
                raise _Exists(kwargs.get("Key", "")) from None
            raise StoreError(
                f"{what} s3://{self._bucket}/{kwargs.get('Key', kwargs.get('Prefix', ''))} failed: {exc}"
            ) from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StoreError(
                f"{what} s3://{self._bucket}/{kwargs.get('Key', kwargs.get('Prefix', ''))} failed "
                f"after retries: {exc}"
            ) from exc

    async def _put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        await self._call(
            "put",
            self._client.put_object,
            Bucket=self._bucket,
            Key=self._full(key),
            Body=data,
            ChecksumAlgorithm=_S3_ALGORITHM[self._algo],
            **extra,
        )

    async def _get(self, key: str) -> bytes | None:
        def get() -> bytes | None:
            try:
                resp = self._client.get_object(Bucket=self._bucket, Key=self._full(key))
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404"):
                    return None
                raise
            with resp["Body"] as body:
                data: bytes = body.read()
            return data

        try:
            return await self._run(get)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            raise StoreError(f"get s3://{self._bucket}/{self._full(key)} failed: {exc}") from exc

    async def _list(self, prefix: str) -> list[str]:
        def walk() -> list[str]:
            out: list[str] = []
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=self._full(prefix)
            ):
                out += [obj["Key"][len(self._key_prefix) :] for obj in page.get("Contents", [])]
            return out

        try:
            return await self._run(walk)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            raise StoreError(f"list s3://{self._bucket}/{self._full(prefix)} failed: {exc}") from exc

    async def _delete(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._full(k)} for k in keys[i : i + 1000]]
            await self._call(
                "delete",
                self._client.delete_objects,
                Bucket=self._bucket,
                Delete={"Objects": batch, "Quiet": True},
            )

    async def _transfer(
        self,
        start: Callable[[_Bridge], TransferFuture],
        what: str,
        priority: Priority,
        bridge_progress: Callable[[int], None] | None,
    ) -> None:
        """Run one s3transfer job with our own retries on top of botocore's (multipart completion included),
        restarting it without counting an attempt when an emergency preempted it."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            if priority is Priority.BACKGROUND:
                await self._idle.wait()  # ends when the emergency commit ends; that one has bounded retries
            done: asyncio.Future[None] = loop.create_future()
            fut = start(_Bridge(loop, done, bridge_progress))
            if priority is Priority.BACKGROUND:
                self._background.add(fut)
            try:
                await done
                return
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except concurrent.futures.CancelledError:
                if fut in self._preempted:
                    self.requeues += 1
                    log.info("store.background_requeued", what=what)
                    continue
                raise UploadError(f"{what} was cancelled") from None
            except Exception as exc:
                attempt += 1
                if _code(exc) in _FATAL_CODES or attempt >= self._commit_attempts:
                    raise UploadError(f"{what} failed after {attempt} tries: {exc}") from exc
                delay = self._retry_base_s * 2 ** (attempt - 1) * (0.5 + random.random())
                log.warning(
                    "store.transfer_retry",
                    what=what,
                    attempt=attempt,
                    delay_s=round(delay, 2),
                    error=str(exc),
                )
                await asyncio.sleep(delay)
            finally:
                self._background.discard(fut)
                self._preempted.discard(fut)

    async def _upload(
        self, file: _LocalFile, key: str, priority: Priority, progress: Callable[[int], None] | None
    ) -> str:
        loop = asyncio.get_running_loop()
        hashing = loop.run_in_executor(self._executor, hash_file, file.path, self._algo)
        # Retrieve a failed hash's exception even when the upload failed first.
        hashing.add_done_callback(lambda f: f.cancelled() or f.exception())
        extra = {"ChecksumAlgorithm": _S3_ALGORITHM[self._algo]}
        await self._transfer(
            lambda bridge: self._tm.upload(
                str(file.path), self._bucket, self._full(key), extra_args=extra, subscribers=[bridge]
            ),
            f"upload {file.rel} to s3://{self._bucket}/{self._full(key)}",
            priority,
            progress,
        )
        try:
            size, checksum = await hashing
        except OSError as exc:
            raise UploadError(f"reading {file.path} failed: {exc}") from exc
        if size != file.size:
            raise UploadError(
                f"{file.rel} changed while uploading ({file.size} → {size} bytes); "
                "fix: report a checkpoint only after it is fully written"
            )
        return checksum

    async def _download(self, key: str, dest: Path, progress: Callable[[int], None] | None) -> None:
        try:
            await self._transfer(
                lambda bridge: self._tm.download(
                    self._bucket, self._full(key), str(dest), subscribers=[bridge]
                ),
                f"download s3://{self._bucket}/{self._full(key)}",
                Priority.EMERGENCY,
                progress,
            )
        except UploadError as exc:
            raise StoreError(str(exc)) from exc

    # ---- protocol

    async def check_access(self) -> None:
        """Probe every permission spotd needs on the prefix; the error names the first one missing."""
        probe = self._full(f"{self._job}/.spotd-access-probe")
        arn_obj = f"arn:aws:s3:::{self._bucket}/{self._key_prefix}*"
        steps: list[tuple[str, str, Callable[[], Any]]] = [
            (
                "s3:ListBucket",
                f"arn:aws:s3:::{self._bucket}",
                lambda: self._client.list_objects_v2(
                    Bucket=self._bucket, Prefix=self._full(self._job), MaxKeys=1
                ),
            ),
            (
                "s3:PutObject",
                arn_obj,
                lambda: self._client.put_object(Bucket=self._bucket, Key=probe, Body=b"ok"),
            ),
            (
                "s3:GetObject",
                arn_obj,
                lambda: self._client.get_object(Bucket=self._bucket, Key=probe)["Body"].close(),
            ),
            ("s3:DeleteObject", arn_obj, lambda: self._client.delete_object(Bucket=self._bucket, Key=probe)),
            (
                "s3:ListBucketMultipartUploads",
                f"arn:aws:s3:::{self._bucket}",
                lambda: self._client.list_multipart_uploads(
                    Bucket=self._bucket, Prefix=self._full(self._job), MaxUploads=1
                ),
            ),
        ]
        for permission, resource, call in steps:
            try:
                await self._run(call)
            except botocore.exceptions.ClientError as exc:
                code = _code(exc)
                if code in ("NoSuchBucket", "404"):
                    raise StoreAccessError(
                        f"bucket {self._bucket!r} does not exist; fix: create it or correct store.uri"
                    ) from exc
                raise StoreAccessError(
                    f"{permission} on {resource} failed ({code or exc}); fix: grant it to the instance role "
                    "(see docs/iam-policy.json)"
                ) from exc
            except botocore.exceptions.NoCredentialsError as exc:
                raise StoreAccessError(
                    "no AWS credentials found; fix: attach an instance profile with docs/iam-policy.json"
                ) from exc
            except (botocore.exceptions.BotoCoreError, OSError) as exc:
                raise StoreAccessError(
                    f"cannot reach S3 for bucket {self._bucket!r} ({exc}); "
                    "fix: check the network, the region and store.endpoint_url"
                ) from exc

    async def recover(self) -> int:
        """Abort the multipart uploads a crash left under this job's prefix; returns how many."""

        def sweep() -> int:
            count = 0
            for page in self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self._bucket, Prefix=self._full(f"{self._job}/")
            ):
                for upload in page.get("Uploads", []):
                    self._client.abort_multipart_upload(
                        Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    count += 1
            return count

        try:
            count = await self._run(sweep)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            raise StoreError(
                f"aborting leftover multipart uploads in s3://{self._bucket} failed: {exc}"
            ) from exc
        if count:
            log.info("store.recovered", aborted_uploads=count)
        return count

    async def close(self) -> None:
        await self._run(self._tm.shutdown, True)
        await self._run(self._client.close)
        await super().close()
