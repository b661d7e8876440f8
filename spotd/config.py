"""Configuration: TOML file, then ``SPOTD_<SECTION>_<KEY>`` environment, then command-line overrides.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key and the fix
(the CLI turns it into exit code 78).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from spotd.errors import ConfigError
from spotd.protocol import DEFAULT_SOCKET

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "NOTIFY_FIELDS",
    "ON_COMPLETE",
    "Config",
    "load_config",
    "parse_nice",
    "parse_rate",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/spotd/spotd.toml")
#: sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH: Final = 107
#: SPOTD_* variables that are not config keys (read by the client and the CLI).
NON_CONFIG_ENV: Final = frozenset(
    {"SPOTD_SOCKET", "SPOTD_CONFIG", "SPOTD_HANDLE_SIGTERM", "SPOTD_SIGTERM_GRACE", "SPOTD_PEER_GRACE"}
)
#: How far ahead EC2 announces a spot interruption.
SPOT_NOTICE_S: Final = 120.0


_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_RATE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*(?:/\s*s)?\s*$", re.IGNORECASE)


def parse_nice(value: int | str) -> int | Literal["idle"]:
    """``store.background_nice``: 0-19 (a number, or its digits from the environment) or "idle";
    ValueError saying what is wrong otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "idle":
            return "idle"
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f'{value!r} is neither a nice value nor "idle"') from None
    if isinstance(value, bool) or not 0 <= value <= 19:
        raise ValueError(f"{value!r} is not a nice value from 0 to 19")
    return value


def parse_rate(value: int | str) -> int | None:
    """Bytes per second from ``50000000``, ``"50MB"``, ``"50 MiB/s"``, ``"1.5GB"``; None for 0 or "" (no
    cap). ValueError, saying what is accepted, for anything else (negative, an unknown unit)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a rate")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value or None
    if not value.strip():
        return None
    m = _RATE_RE.match(value)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a rate such as 50MB, 400MiB or 1GB (per second)")
    rate = int(float(m.group(1)) * _UNITS[unit])
    return rate or None


@dataclass(frozen=True, slots=True)
class ImdsConfig:
    endpoint: str = "http://169.254.169.254"
    poll_interval: float = 1.0
    timeout: float = 1.0
    token_ttl: int = 21600
    allow_v1: bool = True


@dataclass(frozen=True, slots=True)
class SocketConfig:
    path: str = DEFAULT_SOCKET
    group: str = ""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    uri: str = ""
    endpoint_url: str = ""
    region: str = ""
    keep: int = 3
    # 16 connections of 16 MiB parts saturate a 10 Gbit/s instance with 256 MiB in flight.
    part_size: int = 16 * 1024 * 1024
    concurrency: int = 16
    checksum: str = "auto"  # auto | crc64nvme | crc32c | crc32 | sha256
    #: Bytes/s every BACKGROUND (periodic) transfer together may send: 50000000, "50MB", "400MiB"; 0 or ""
    #: is no cap. Emergency uploads are never capped. s3:// only (a file:// store is a local copy).
    background_rate: int | str = 0
    #: The nice value (0-19) periodic transfer threads run at, or "idle" (SCHED_IDLE: a core only when
    #: nothing else wants one). Emergency uploads run at the daemon's own priority. s3:// only.
    background_nice: int | str = 0
    #: How much slower periodic uploads may make a connected trainer: 0.05 lets its threads wait for a core
    #: up to 5 % more of their time than before the upload; more, and fewer parts go at once
    #: (spotd.store.trainer_yield). 0 turns it off. Emergency uploads never yield. s3:// only.
    yield_to_trainer: float = 0.05
    #: Upload an emergency checkpoint's parts while the trainer writes it (it announces the file first):
    #: s3:// only; the commit still waits for ``saved`` and checks every byte against the final file.
    overlap: bool = True

    @property
    def background_bytes_per_second(self) -> int | None:
        """``background_rate`` in bytes/s, or None for no cap (validated when the config was built)."""
        return parse_rate(self.background_rate)

    @property
    def background_niceness(self) -> int | Literal["idle"]:
        """``background_nice`` as the store takes it (validated when the config was built)."""
        return parse_nice(self.background_nice)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = "0.0.0.0:9127"


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    on_rebalance: str = "checkpoint"  # checkpoint | notify | ignore
    restore_on_start: bool = True
    deadline_margin: float = 10.0
    maintenance_lead: float = 600.0
    shutdown_grace: float = 30.0
    drill_timeout: float = 300.0
    # Seconds a store failure at boot (check, crash recovery, list, restore) is retried before exiting 1:
    # first-boot S3/IAM trouble is waited out in one start instead of using up StartLimitBurst.
    boot_store_wait: float = 300.0
    #: What to do with the instance (and its spot request) once the job is Completed or Stopped.
    on_complete: str = "none"  # none | stop | terminate | cancel-request
    #: Seconds of training summed over every instance of the job (SageMaker's MaxRuntimeInSeconds); 0: none.
    max_run: float = 0.0
    #: Seconds since the job first started, waiting for capacity included (MaxWaitTimeInSeconds); 0: none.
    max_wait: float = 0.0


@dataclass(frozen=True, slots=True)
class OutputConfig:
    #: Uploaded to <uri>/<job_id>/output/ when the job completes (SageMaker's /opt/ml/model); "": nothing.
    dir: str = ""


@dataclass(frozen=True, slots=True)
class CostConfig:
    #: USD per hour on demand for this job's instance type; 0 asks the AWS Price List API.
    on_demand_hourly: float = 0.0
    #: The Price List API's endpoint (tests); "" is AWS's.
    pricing_endpoint_url: str = ""


@dataclass(frozen=True, slots=True)
class Ec2Config:
    #: EC2's endpoint (tests, moto); "" is AWS's.
    endpoint_url: str = ""
    #: "" is the instance's own region, from its availability zone.
    region: str = ""


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    #: Slack-compatible incoming webhook (a JSON ``{"text": ...}`` POST); "" sends nothing.
    webhook: str = ""
    #: The text, with {text} {event} {job_id} {instance_id} {instance_type} {phase} {detail}; "" is {text}.
    template: str = ""
    #: Seconds one POST may take.
    timeout: float = 5.0


#: The fields a ``[notify] template`` may name.
NOTIFY_FIELDS: Final = frozenset(
    {"text", "event", "job_id", "instance_id", "instance_type", "phase", "detail"}
)
ON_COMPLETE: Final = ("none", "stop", "terminate", "cancel-request")


@dataclass(frozen=True, slots=True)
class SyncConfig:
    mode: str = "client"  # client | watch
    settle: float = 5.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "auto"  # auto | json | console
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    job_id: str = "default"
    checkpoint_dir: str = "/opt/ml/checkpoints"
    imds: ImdsConfig = field(default_factory=ImdsConfig)
    socket: SocketConfig = field(default_factory=SocketConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    ec2: Ec2Config = field(default_factory=Ec2Config)
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> Config:
        """``cfg.replace(**{"store.uri": "file:///x", "job_id": "j"})`` with validation."""
        return _build(_merge(self.as_dict(), _dotted_to_nested(overrides), source="override"))


_SECTIONS: Final[dict[str, type]] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in fields(Config)
    if f.default_factory is not dataclasses.MISSING
}
_TOP_KEYS: Final = [f.name for f in fields(Config) if f.name not in _SECTIONS]


def _field_types(cls: type) -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(cls)}


def _a(kind: str) -> str:
    """ "an int", "a float": the article a person would write."""
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


#: What a value of an ``int | str`` key looks like, for the fix of a wrong type.
_EXAMPLES: Final = {"store.background_rate": '"50MB"', "store.background_nice": '0, 19 or "idle"'}


def _coerce(key: str, kind: str, value: Any, *, from_text: bool) -> Any:
    """Check (or, for environment strings, convert) a value against its declared type."""
    if kind == "int | str":  # a number, or a number with a unit ("50MB"): the field parses it
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ConfigError(
            key,
            f"expected a number or a string, got {type(value).__name__} {value!r}",
            f"write e.g. {key} = {_EXAMPLES.get(key, '1')}",
        )
    if from_text and isinstance(value, str):
        try:
            if kind == "bool":
                lowered = value.strip().lower()
                if lowered in {"1", "true", "yes", "on"}:
                    return True
                if lowered in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            if kind == "int":
                return int(value)
            if kind == "float":
                return float(value)
        except ValueError:
            raise ConfigError(key, f"{value!r} is not {_a(kind)}", f"give {key} {_a(kind)} value") from None
        return value
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(
            key, f"expected {_a(kind)}, got {type(value).__name__} {value!r}", f"write {key} as a TOML {kind}"
        )
    return float(value) if kind == "float" else value


def _known_keys() -> list[str]:
    keys = list(_TOP_KEYS)
    for section, cls in _SECTIONS.items():
        keys += [f"{section}.{name}" for name in _field_types(cls)]
    return keys


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, _known_keys(), n=1)
    if close:
        return f"did you mean {close[0]!r}? otherwise remove it"
    section = key.split(".", 1)[0]
    if "." in key and section in _SECTIONS:
        known = ", ".join(_field_types(_SECTIONS[section]))
        return f"remove it; [{section}] takes {known}"
    return f"remove it; known keys: {', '.join(_known_keys())}"


def _merge(
    base: dict[str, Any], update: Mapping[str, Any], *, source: str, from_text: bool = False
) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in update.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(
                    key, f"must be a table [{key}] in {source}", f"write it as [{key}] with keys below"
                )
            types = _field_types(_SECTIONS[key])
            for sub, subvalue in value.items():
                dotted = f"{key}.{sub}"
                if sub not in types:
                    raise ConfigError(dotted, f"unknown key in {source}", _suggest(dotted))
                out[key][sub] = _coerce(dotted, types[sub], subvalue, from_text=from_text)
        elif key in _TOP_KEYS:
            out[key] = _coerce(key, "str", value, from_text=from_text)
        else:
            raise ConfigError(key, f"unknown key in {source}", _suggest(key))
    return out


def _dotted_to_nested(values: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if "." in key:
            section, sub = key.split(".", 1)
            nested.setdefault(section, {})[sub] = value
        else:
            nested[key] = value
    return nested


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``SPOTD_STORE_URI`` → ``store.uri``; ``SPOTD_JOB_ID`` → ``job_id``."""
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith("SPOTD_") or name in NON_CONFIG_ENV:
            continue
        rest = name[len("SPOTD_") :].lower()
        if rest in _TOP_KEYS:
            out[rest] = value
            continue
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1 :]] = value
                break
        else:
            raise ConfigError(
                name, "environment variable names no config key", _suggest(rest.replace("_", ".", 1))
            )
    return out


def _build(data: dict[str, Any]) -> Config:
    cfg = Config(
        **{k: data[k] for k in _TOP_KEYS},
        **{section: cls(**data[section]) for section, cls in _SECTIONS.items()},
    )
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    def need(ok: bool, key: str, problem: str, fix: str) -> None:
        if not ok:
            raise ConfigError(key, problem, fix)

    need(bool(cfg.job_id.strip()), "job_id", "is empty", "set job_id to a stable name for this training job")
    need(
        "/" not in cfg.job_id and cfg.job_id not in {".", ".."},
        "job_id",
        f"{cfg.job_id!r} contains '/'",
        "use letters, digits, '-', '_' or '.'",
    )
    need(
        bool(cfg.checkpoint_dir),
        "checkpoint_dir",
        "is empty",
        "set it to the directory your trainer saves into",
    )
    need(
        cfg.imds.poll_interval > 0,
        "imds.poll_interval",
        f"{cfg.imds.poll_interval} is not > 0",
        "use e.g. 1.0",
    )
    need(cfg.imds.timeout > 0, "imds.timeout", f"{cfg.imds.timeout} is not > 0", "use e.g. 1.0")
    need(1 <= cfg.imds.token_ttl <= 21600, "imds.token_ttl", "must be 1..21600 seconds", "use 21600")
    scheme = urlsplit(cfg.imds.endpoint).scheme
    need(
        scheme in {"http", "https"},
        "imds.endpoint",
        f"{cfg.imds.endpoint!r} is not an http URL",
        "use http://169.254.169.254 or http://[fd00:ec2::254]",
    )
    path_len = len(os.fsencode(cfg.socket.path))
    need(
        0 < path_len <= MAX_SOCKET_PATH,
        "socket.path",
        f"is {path_len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}",
        "choose a shorter path such as /run/spotd/spotd.sock",
    )
    need(cfg.store.keep >= 1, "store.keep", f"{cfg.store.keep} keeps nothing", "keep at least 1 (default 3)")
    need(
        cfg.store.part_size >= 5 * 1024 * 1024,
        "store.part_size",
        "S3 parts must be at least 5 MiB",
        "use 16777216 (16 MiB)",
    )
    need(cfg.store.concurrency >= 1, "store.concurrency", "must be >= 1", "use 16")
    parsed: tuple[tuple[str, Callable[[Any], object], Any, str], ...] = (
        (
            "store.background_rate",
            parse_rate,
            cfg.store.background_rate,
            'use bytes per second such as "50MB" (10^6), "400MiB" (2^20) or 50000000; 0 or "" for no cap',
        ),
        (
            "store.background_nice",
            parse_nice,
            cfg.store.background_nice,
            "use 0 (the default: a plainly started trainer's), 10, 19 (the lowest that still runs), or "
            '"idle" (SCHED_IDLE)',
        ),
    )
    need(
        0 <= cfg.store.yield_to_trainer < 1,
        "store.yield_to_trainer",
        f"{cfg.store.yield_to_trainer} is not a share from 0 to 1",
        "use 0.05 (the default: a trainer at most 5 % slower while a periodic upload runs), or 0 to never "
        "hold periodic uploads back",
    )
    for key, parse, value, fix in parsed:
        try:
            parse(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc), fix) from None
    need(
        cfg.store.checksum in {"auto", "crc64nvme", "crc32c", "crc32", "sha256"},
        "store.checksum",
        f"{cfg.store.checksum!r} is not supported",
        "use auto, crc64nvme, crc32c, crc32 or sha256",
    )
    if cfg.store.uri:
        parts = urlsplit(cfg.store.uri)
        need(
            parts.scheme in {"s3", "file"},
            "store.uri",
            f"{cfg.store.uri!r} is neither s3:// nor file://",
            "use s3://bucket/prefix (or file:///path for a local store)",
        )
        need(
            parts.scheme != "s3" or bool(parts.netloc),
            "store.uri",
            f"{cfg.store.uri!r} names no bucket",
            "use s3://bucket/prefix, with the bucket the instance role may write to",
        )
        need(
            parts.scheme != "file" or parts.path not in ("", "/"),
            "store.uri",
            f"{cfg.store.uri!r} names no directory",
            "use file:///absolute/path",
        )
    if cfg.metrics.listen:
        _, sep, port = cfg.metrics.listen.rpartition(":")
        need(
            bool(sep) and port.isdigit() and 0 <= int(port) < 65536,
            "metrics.listen",
            f"{cfg.metrics.listen!r} is not host:port",
            'use 0.0.0.0:9127, or "" to turn metrics off',
        )
    need(
        cfg.policy.on_rebalance in {"checkpoint", "notify", "ignore"},
        "policy.on_rebalance",
        f"{cfg.policy.on_rebalance!r} is not an option",
        "use checkpoint, notify or ignore",
    )
    for key in ("deadline_margin", "maintenance_lead", "shutdown_grace", "drill_timeout", "boot_store_wait"):
        value = getattr(cfg.policy, key)
        need(value >= 0, f"policy.{key}", f"{value} is negative", "use a number of seconds >= 0")
    # A spot notice comes two minutes ahead: a margin that large makes every deadline "now".
    need(
        cfg.policy.deadline_margin < SPOT_NOTICE_S,
        "policy.deadline_margin",
        f"{cfg.policy.deadline_margin:g} s is not less than the {SPOT_NOTICE_S:g} s a spot notice gives, so "
        "every deadline would be now",
        "use e.g. 10 (seconds kept back from the notice for the upload to finish)",
    )
    need(
        cfg.policy.on_complete in ON_COMPLETE,
        "policy.on_complete",
        f"{cfg.policy.on_complete!r} is not an option",
        "use none, stop, terminate or cancel-request (cancels the persistent spot request, then terminates)",
    )
    for key in ("max_run", "max_wait"):
        value = getattr(cfg.policy, key)
        need(
            value >= 0, f"policy.{key}", f"{value} is negative", "use a number of seconds, or 0 for no limit"
        )
    # SageMaker's rule too: waiting included, the job cannot be allowed less time than its training.
    need(
        not (cfg.policy.max_wait and cfg.policy.max_run) or cfg.policy.max_wait >= cfg.policy.max_run,
        "policy.max_wait",
        f"{cfg.policy.max_wait:g} s is less than policy.max_run ({cfg.policy.max_run:g} s)",
        "make max_wait at least max_run (it counts the waiting for capacity too), or 0 for no limit",
    )
    need(
        not cfg.output.dir or os.path.isabs(cfg.output.dir),
        "output.dir",
        f"{cfg.output.dir!r} is not an absolute path",
        "use an absolute directory such as /opt/ml/model",
    )
    need(
        cfg.cost.on_demand_hourly >= 0,
        "cost.on_demand_hourly",
        f"{cfg.cost.on_demand_hourly} is negative",
        "use the on-demand USD price per hour (e.g. 1.212), or 0 to ask the AWS Price List API",
    )
    for key, url in (
        ("cost.pricing_endpoint_url", cfg.cost.pricing_endpoint_url),
        ("ec2.endpoint_url", cfg.ec2.endpoint_url),
    ):
        need(
            not url or urlsplit(url).scheme in {"http", "https"},
            key,
            f"{url!r} is not an http URL",
            'use http(s)://host:port, or "" for AWS itself',
        )
    need(
        not cfg.notify.webhook or urlsplit(cfg.notify.webhook).scheme in {"http", "https"},
        "notify.webhook",
        f"{cfg.notify.webhook!r} is not an http URL",
        'use the https:// URL of a Slack-compatible incoming webhook, or "" for none',
    )
    need(cfg.notify.timeout > 0, "notify.timeout", f"{cfg.notify.timeout} is not > 0", "use e.g. 5.0")
    if cfg.notify.template:
        try:
            cfg.notify.template.format(**{name: name for name in NOTIFY_FIELDS})
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                "notify.template",
                f"{cfg.notify.template!r} does not format ({type(exc).__name__}: {exc})",
                f"name only {', '.join('{' + f + '}' for f in sorted(NOTIFY_FIELDS))}; "
                "write {{ and }} for a brace",
            ) from None
    need(
        cfg.sync.mode in {"client", "watch"},
        "sync.mode",
        f"{cfg.sync.mode!r} is not an option",
        "use client (trainers report saves) or watch (spotd watches checkpoint_dir)",
    )
    need(cfg.sync.settle > 0, "sync.settle", f"{cfg.sync.settle} is not > 0", "use e.g. 5.0")
    need(
        cfg.log.format in {"auto", "json", "console"},
        "log.format",
        f"{cfg.log.format!r} is not an option",
        "use auto, json or console",
    )
    need(
        cfg.log.level.lower() in {"debug", "info", "warning", "error"},
        "log.level",
        f"{cfg.log.level!r} is not a level",
        "use debug, info, warning or error",
    )


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load the effective config.

    ``path`` None means ``$SPOTD_CONFIG`` or /etc/spotd/spotd.toml if it exists (a missing default file is
    fine: environment and defaults then apply). An explicitly named file must exist.
    """
    environ = os.environ if environ is None else environ
    data = Config().as_dict()
    explicit = path is not None or "SPOTD_CONFIG" in environ
    file = Path(path if path is not None else environ.get("SPOTD_CONFIG", DEFAULT_CONFIG_PATH))
    if file.exists() or explicit:
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                "--config", f"{file} does not exist", "create it or point --config at the right file"
            ) from None
        except PermissionError:
            raise ConfigError(
                "--config", f"{file} is not readable", "fix its permissions (chmod 0640)"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                "--config", f"{file} is not valid TOML ({exc})", "fix the syntax at that line"
            ) from None
        data = _merge(data, raw, source=str(file))
    data = _merge(data, _env_overrides(environ), source="environment", from_text=True)
    if overrides:
        data = _merge(data, _dotted_to_nested(overrides), source="command line")
    return _build(data)
