"""The exception taxonomy.

Every spotd error is a :class:`SpotdError`; each also inherits the built-in it means, so callers that
only know the standard library (``except ConnectionError``) still catch it. Messages say what is
wrong *and* how to fix it.
"""

from __future__ import annotations

import errno

__all__ = [
    "AwsError",
    "ChecksumMismatch",
    "CommitError",
    "ConfigError",
    "DaemonAlreadyRunning",
    "DiskFull",
    "ImdsError",
    "ImdsMalformed",
    "ImdsUnavailable",
    "PathEscape",
    "ProtocolError",
    "RestoreError",
    "SpotdError",
    "StoreAccessError",
    "StoreError",
    "UploadError",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; systemd shows it as "CONFIG"


class SpotdError(Exception):
    """Base of every error spotd raises on purpose."""

    exit_code = EXIT_FAILURE


class ConfigError(SpotdError, ValueError):
    """A configuration key is unknown, of the wrong type, or impossible."""

    exit_code = EXIT_CONFIG

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"config key {key!r}: {problem}; fix: {fix}")


class ImdsError(SpotdError):
    """The instance metadata service misbehaved."""


class ImdsUnavailable(ImdsError, ConnectionError):
    """IMDS did not answer (refused, timeout, 5xx after retries)."""


class ImdsMalformed(ImdsError, ValueError):
    """IMDS answered with a body spotd cannot parse; it is never acted on."""


class ProtocolError(SpotdError, ValueError):
    """A socket frame is not valid NDJSON of the spotd protocol."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class DaemonAlreadyRunning(SpotdError, RuntimeError):
    """Another spotd answers on the configured socket."""


class AwsError(SpotdError, ConnectionError):
    """An EC2 or Price List call failed (after botocore's retries); the message names the call and the fix."""


class StoreError(SpotdError):
    """The checkpoint store failed."""


class StoreAccessError(StoreError, PermissionError):
    """The store cannot be reached or a permission is missing."""


class UploadError(StoreError, OSError):
    """Uploading a checkpoint file failed after retries."""


class CommitError(StoreError):
    """Writing MANIFEST.json or LATEST failed; the checkpoint is not committed."""


class RestoreError(StoreError):
    """No committed checkpoint could be downloaded and verified."""


class NothingToRestore(RestoreError):
    """The store holds no complete checkpoint (none at all, or only steps some rank never committed)."""


class DiskFull(RestoreError, OSError):
    """The restore's destination has no room for the checkpoint (``errno`` is ENOSPC). Not the store's
    fault, and no older checkpoint is tried instead: the disk must be freed or grown."""

    def __init__(
        self, *, directory: str, need: int, free: int, checkpoint: str, checkpoint_bytes: int
    ) -> None:
        self.directory = directory
        self.need = need  # the checkpoint's bytes, filesystem blocks and a margin
        self.free = free
        self.fix = (
            f"free space in {directory}, restore elsewhere (spotd restore --to DIR), or give the instance "
            "a larger volume"
        )
        super().__init__(
            f"disk full: need {_size(checkpoint_bytes)} for checkpoint {checkpoint} ({_size(need)} with "
            f"blocks and a margin), {_size(free)} free in {directory}; fix: {self.fix}"
        )
        self.errno = errno.ENOSPC


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class ChecksumMismatch(RestoreError):
    """A restored file's size or checksum differs from its manifest."""


class PathEscape(StoreError, PermissionError):
    """A reported checkpoint path resolves outside ``checkpoint_dir``."""
