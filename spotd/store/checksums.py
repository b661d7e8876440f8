"""Checksums as S3 encodes them: CRC32 (zlib), CRC32C and CRC64NVME (awscrt), SHA-256.

A checksum is written ``<algorithm>:<base64 of the big-endian digest>``: the value S3 returns in its
``Checksum<ALGORITHM>`` headers, behind a tag saying which algorithm made it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from pathlib import Path
from typing import Any, Final

from spotd.errors import StoreError

__all__ = [
    "ALGORITHMS",
    "CHUNK",
    "Hasher",
    "can_combine",
    "choose_checksum",
    "crc_combine",
    "crc_update",
    "encode_crc",
    "hash_file",
    "have_awscrt",
]

ALGORITHMS: Final = ("crc32", "crc32c", "crc64nvme", "sha256")
#: Read size for hashing and copying: large enough to amortise syscalls, small enough to stay in cache.
CHUNK: Final = 8 * 1024 * 1024


class Hasher:
    """An incremental checksum of one of :data:`ALGORITHMS`."""

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


def have_awscrt() -> bool:
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
    return algo in ("crc32", "crc32c", "crc64nvme") and have_awscrt()


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
        return "crc64nvme" if have_awscrt() else "crc32"
    if setting in ("crc32c", "crc64nvme") and not have_awscrt():
        raise StoreError(
            f"store.checksum = {setting!r} needs the awscrt package; fix: pip install 'boto3[crt]', or set "
            'store.checksum = "crc32" (or "auto")'
        )
    return setting


def hash_file(path: Path, algo: str, *, fsync: bool = False) -> tuple[int, str]:
    """(size, checksum) of a file, in one read pass; blocking."""
    hasher = Hasher(algo)
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
