"""The ``s3://`` store: the backend contract of :mod:`spotd.store.base` on one bucket and key prefix.

Small objects (MANIFEST.json, LATEST, event records) are single requests on the store's executor;
checkpoint files go through :mod:`spotd.store.s3_transfer` (parts, checksums, priorities). The client
comes from :mod:`spotd.aws.session`, which owns the retry of every request.

This deliberately is not the CRT transfer client (``awscrt.s3``) that boto3 picks on some instance types
when awscrt is installed: spotd builds its own boto3 client, and the transfers need per-part control for
priorities, checksum combining and the fault tests.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

import botocore.exceptions

from spotd.aws.session import (
    DEFAULT_REQUEST_ATTEMPTS,
    ClientSettings,
    error_code,
    request_attempts_from_env,
    s3_client,
    tries_made,
)
from spotd.errors import StoreAccessError, StoreError
from spotd.logs import get_logger
from spotd.store.api import FileStream, Gate, Priority
from spotd.store.base import AlreadyExists, BaseStore, Changed, Tagged
from spotd.store.checksums import can_combine
from spotd.store.localfs import LocalFile
from spotd.store.pacing import BACKGROUND_NICE, Niceness
from spotd.store.s3_transfer import BUFFER_CAP, S3_ALGORITHM, WHOLE_MAX, FileTransfers, read_all
from spotd.store.selection import valid_name
from spotd.store.stream import GrowingUpload
from spotd.store.trainer_yield import YIELD_SLOWDOWN, TrainerYield
from spotd.store.transfer_pool import TransferPool, early_parts

if TYPE_CHECKING:
    from spotd.config import Config
    from spotd.metrics import Metrics

__all__ = ["S3Store"]

T = TypeVar("T")

log = get_logger("spotd.store")

_REQUEST_ERRORS: Final = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError)


class S3Store(BaseStore):
    __slots__ = ("_bucket", "_client", "_files", "_key_prefix", "_pool", "_request_attempts")

    def __init__(
        self,
        *,
        uri: str,
        job_id: str,
        keep: int = 3,
        checksum: str = "auto",
        endpoint_url: str = "",
        region: str = "",
        part_size: int = 16 * 1024 * 1024,
        concurrency: int = 16,
        executor: concurrent.futures.Executor | None = None,
        metrics: Metrics | None = None,
        request_attempts: int = DEFAULT_REQUEST_ATTEMPTS,
        body_read_attempts: int = 3,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        background_rate: int | None = None,
        background_nice: Niceness | None = BACKGROUND_NICE,
        yield_to_trainer: float | None = YIELD_SLOWDOWN,
    ) -> None:
        """``request_attempts``: tries of one S3 request, botocore's retries included (the only request
        retry there is). ``body_read_attempts``: GETs of one object or range whose answer broke off
        mid-body (see :mod:`spotd.store.s3_transfer`). ``background_rate``: bytes/s all BACKGROUND
        transfers together may send (``store.background_rate``; None: no cap); EMERGENCY ones are never
        capped. ``background_nice``: the nice value background transfer threads run at
        (``store.background_nice``; "idle": SCHED_IDLE; None: the daemon's own, which benchmarks compare).
        ``yield_to_trainer``: how much slower periodic transfers may make the trainers :meth:`set_trainers`
        names (``store.yield_to_trainer``, see :mod:`spotd.store.trainer_yield`; None or 0: they do not
        give way)."""
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
        limit = max(1, min(concurrency, BUFFER_CAP // part_size))
        self._pool = TransferPool(
            limit=limit,
            thread_name="spotd-s3",
            background_rate=background_rate,
            background_nice=background_nice,
            yield_to_trainer=yield_to_trainer,
        )
        self._request_attempts = request_attempts
        self._client: Any = s3_client(
            ClientSettings(
                endpoint_url=endpoint_url,
                region=region,
                request_attempts=request_attempts,
                max_pool_connections=2 * limit + 8,  # every transfer thread, and small objects beside them
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
            )
        )
        self._files = FileTransfers(
            client=self._client,
            bucket=self._bucket,
            algo=self.algo,
            part_size=part_size,
            pool=self._pool,
            executor=self.executor,
            request_attempts=request_attempts,
            body_read_attempts=body_read_attempts,
        )

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
            request_attempts=request_attempts_from_env(),
            background_rate=s.background_bytes_per_second,
            background_nice=s.background_niceness,
            yield_to_trainer=s.yield_to_trainer,
        )

    def _full(self, key: str) -> str:
        return self._key_prefix + key

    @property
    def background_rate(self) -> int | None:
        return None if self._pool.pace is None else self._pool.pace.bytes_per_second

    @property
    def background_bytes_paced(self) -> int:
        """Bytes background transfers sent through the ``background_rate`` cap so far (0 without one)."""
        return 0 if self._pool.pace is None else self._pool.pace.granted

    def core_wait_totals(self) -> tuple[float, float]:
        return self._pool.core_wait.totals()

    async def run_reading(self, priority: Priority, fn: Callable[[], T], nbytes: int) -> T:
        if priority is not Priority.BACKGROUND:
            return await super().run_reading(priority, fn, nbytes)
        return await self._pool.run(priority, fn, nbytes=nbytes, sends=False)

    def yielded_seconds(self) -> float:
        return 0.0 if self._pool.yielding is None else self._pool.yielding.yielded_s

    def set_trainers(self, pids: Iterable[int]) -> None:
        yielding = self._pool.yielding
        if yielding is not None and yielding.trainers(pids):
            self._pool.detach(yielding.refresh)

    def background_view(self) -> dict[str, Any]:
        view = super().background_view()
        yielding = self._pool.yielding
        if yielding is not None:
            view["yielding"] = yielding.view()
        return view

    @property
    def yielding(self) -> TrainerYield | None:
        """The window periodic transfers are held to while trainers wait for a core (None: no yielding)."""
        return self._pool.yielding

    @property
    def pauses(self) -> int:
        """Background parts held back by an emergency so far."""
        return self._pool.pauses

    # ---- priorities

    def begin_emergency(self) -> None:
        if self._pool.emergencies == 0 and self._pool.background_in_flight:
            log.info("store.background_paused", parts_in_flight=self._pool.background_in_flight)
        self._pool.emergency(+1)

    def end_emergency(self) -> None:
        self._pool.emergency(-1)

    # ---- primitives

    def _failed(self, what: str, key: str, exc: BaseException) -> StoreError:
        n = tries_made(exc, self._request_attempts)
        return StoreError(
            f"{what} s3://{self._bucket}/{key} failed after {n} {'try' if n == 1 else 'tries'}: {exc}"
        )

    async def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return await self.run(lambda: fn(**kwargs))
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            where = f"s3://{self._bucket}/{kwargs.get('Key', '')}"
            if "IfMatch" in kwargs and code in ("PreconditionFailed", "NoSuchKey", "404"):
                raise Changed(f"{where} changed since it was read; not overwritten") from None
            if code == "PreconditionFailed":
                raise AlreadyExists(f"{where} already exists") from None
            if code == "ConditionalRequestConflict":  # 409: another conditional write on it is under way
                raise Changed(f"{where}: a concurrent conditional write; read it again") from None
            raise self._failed(what, kwargs.get("Key", kwargs.get("Prefix", "")), exc) from exc
        except _REQUEST_ERRORS as exc:
            raise self._failed(what, kwargs.get("Key", kwargs.get("Prefix", "")), exc) from exc

    async def put_bytes(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> None:
        if if_absent and if_match is not None:
            raise ValueError("put_bytes: if_absent and if_match exclude each other")
        extra: dict[str, Any] = {}
        if if_absent:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        await self._call(
            "put",
            self._client.put_object,
            Bucket=self._bucket,
            Key=self._full(key),
            Body=data,
            ChecksumAlgorithm=S3_ALGORITHM[self.algo],
            **extra,
        )

    async def get_tagged(self, key: str) -> Tagged | None:
        def get() -> Tagged | None:
            try:
                resp = self._client.get_object(Bucket=self._bucket, Key=self._full(key))
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) in ("NoSuchKey", "404"):
                    return None
                raise
            return Tagged(data=read_all(resp), tag=str(resp["ETag"]))

        try:
            return await self.run(get)
        except _REQUEST_ERRORS as exc:
            raise self._failed("get", self._full(key), exc) from exc

    async def get_bytes(self, key: str) -> bytes | None:
        def get() -> bytes | None:
            try:
                resp = self._client.get_object(Bucket=self._bucket, Key=self._full(key))
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) in ("NoSuchKey", "404"):
                    return None
                raise
            return read_all(resp)

        try:
            return await self.run(get)
        except _REQUEST_ERRORS as exc:
            raise self._failed("get", self._full(key), exc) from exc

    async def list_keys(self, prefix: str) -> list[str]:
        def walk() -> list[str]:
            out: list[str] = []
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=self._full(prefix)
            ):
                out += [obj["Key"][len(self._key_prefix) :] for obj in page.get("Contents", [])]
            return out

        try:
            return await self.run(walk)
        except _REQUEST_ERRORS as exc:
            raise self._failed("list", self._full(prefix), exc) from exc

    async def delete_keys(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._full(k)} for k in keys[i : i + 1000]]
            await self._call(
                "delete",
                self._client.delete_objects,
                Bucket=self._bucket,
                Delete={"Objects": batch, "Quiet": True},
            )

    async def upload_file(
        self,
        file: LocalFile,
        key: str,
        priority: Priority,
        progress: Callable[[int], None] | None,
        gate: Gate | None = None,
        siblings: int = 1,
    ) -> str:
        # With files enough to fill every transfer slot (a DCP checkpoint's shards), a file of up to
        # WHOLE_MAX goes in one PutObject: multipart's create and complete requests (and a server's
        # concatenation of the parts) would buy no parallelism the other files do not give already. Every
        # slot may then hold a whole file in memory: still at most BUFFER_CAP in all.
        limit = self._pool.limit
        whole_max = min(WHOLE_MAX, BUFFER_CAP // limit) if siblings >= limit else 0
        return await self._files.upload(file, self._full(key), priority, progress, gate, whole_max)

    async def copy_object(
        self, src: str, key: str, *, size: int, checksum: str, priority: Priority
    ) -> str | None:
        return await self._files.copy(self._full(src), self._full(key), size=size, priority=priority)

    @property
    def early_transfers(self) -> int:
        return early_parts(self._pool.limit)

    async def open_stream(
        self,
        *,
        watch: Sequence[Path],
        rel: str,
        trainer: str,
        step: int | None,
        rank: int | None,
        name: str | None = None,
    ) -> FileStream | None:
        if not can_combine(self.algo):
            return None  # the whole-file checksum would need a second pass: nothing to gain
        created = datetime.now(UTC)
        if name is None:
            name = self.stream_name(trainer=trainer, step=step, rank=rank, now=created)
        elif not valid_name(name):
            raise StoreError(f"checkpoint name {name!r} is not a valid name; fix: use run_checkpoint_name")
        # Background transfers yield to it from now on, as to an emergency commit, until it ends.
        self.begin_emergency()
        stream = GrowingUpload(
            files=self._files,
            algo=self.algo,
            full=self._full(f"{self.checkpoints_prefix}{name}/{rel}"),
            rel=rel,
            watch=tuple(watch),
            name=name,
            created=created,
            step=step,
            trainer=trainer,
            rank=rank,
            on_close=self.end_emergency,
            early_parts=self.early_transfers,
        )
        try:
            await stream.start()
        except BaseException:
            await stream.abort()
            raise
        return stream

    async def download_file(
        self, key: str, dest: Path, *, size: int, algo: str, progress: Callable[[int], None] | None
    ) -> tuple[int, str] | None:
        return await self._files.download(self._full(key), dest, size=size, algo=algo, progress=progress)

    # ---- protocol

    async def check_access(self) -> None:
        """Probe every permission spotd needs on the prefix; the error names the first one missing."""
        probe = self._full(f"{self.job_id}/.spotd-access-probe")
        arn_obj = f"arn:aws:s3:::{self._bucket}/{self._key_prefix}*"
        steps: list[tuple[str, str, Callable[[], Any]]] = [
            (
                "s3:ListBucket",
                f"arn:aws:s3:::{self._bucket}",
                lambda: self._client.list_objects_v2(
                    Bucket=self._bucket, Prefix=self._full(self.job_id), MaxKeys=1
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
                    Bucket=self._bucket, Prefix=self._full(self.job_id), MaxUploads=1
                ),
            ),
        ]
        for permission, resource, call in steps:
            try:
                await self.run(call)
            except botocore.exceptions.ClientError as exc:
                code = error_code(exc)
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
                Bucket=self._bucket, Prefix=self._full(f"{self.job_id}/")
            ):
                for upload in page.get("Uploads", []):
                    self._client.abort_multipart_upload(
                        Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    count += 1
            return count

        try:
            count = await self.run(sweep)
        except _REQUEST_ERRORS as exc:
            raise StoreError(
                f"aborting leftover multipart uploads in s3://{self._bucket} failed: {exc}"
            ) from exc
        if count:
            log.info("store.recovered", aborted_uploads=count)
        return count

    async def close(self) -> None:
        await self.run(self._pool.shutdown)
        await self.run(self._client.close)
        await super().close()
