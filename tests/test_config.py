"""Configuration: TOML, then SPOTD_* environment, then command-line overrides; every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotd.config import Config, load_config
from spotd.errors import EXIT_CONFIG, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spotd.toml"
    path.write_text(text)
    return path


def test_defaults_match_design_md():
    """With nothing configured the defaults are design.md's."""
    cfg = load_config(environ={})
    assert cfg.checkpoint_dir == "/opt/ml/checkpoints"
    assert cfg.imds.endpoint == "http://169.254.169.254" and cfg.imds.poll_interval == 1.0
    assert cfg.socket.path == "/run/spotd/spotd.sock"
    assert cfg.store.keep == 3 and cfg.metrics.listen == "0.0.0.0:9127"
    assert cfg.policy.on_rebalance == "checkpoint" and cfg.policy.restore_on_start is True


def test_environment_overrides_the_file_and_overrides_win(tmp_path):
    """SPOTD_<SECTION>_<KEY> beats the file, and command-line overrides beat both."""
    path = write(
        tmp_path, 'job_id = "file"\n[store]\nuri = "s3://b/file"\nkeep = 5\n[imds]\npoll_interval = 2.0\n'
    )
    cfg = load_config(
        path,
        environ={
            "SPOTD_STORE_URI": "s3://b/env",
            "SPOTD_JOB_ID": "env",
            "SPOTD_POLICY_RESTORE_ON_START": "false",
        },
        overrides={"job_id": "flag"},
    )
    assert cfg.store.uri == "s3://b/env" and cfg.store.keep == 5
    assert cfg.job_id == "flag" and cfg.imds.poll_interval == 2.0
    assert cfg.policy.restore_on_start is False


def test_environment_values_are_converted_to_the_key_type():
    """Environment strings become ints, floats and booleans, and a bad one names the key."""
    cfg = load_config(
        environ={"SPOTD_STORE_KEEP": "7", "SPOTD_IMDS_TIMEOUT": "0.5", "SPOTD_IMDS_ALLOW_V1": "no"}
    )
    assert (cfg.store.keep, cfg.imds.timeout, cfg.imds.allow_v1) == (7, 0.5, False)
    with pytest.raises(ConfigError) as err:
        load_config(environ={"SPOTD_STORE_KEEP": "many"})
    assert err.value.key == "store.keep" and "int" in str(err.value)


def test_client_variables_are_not_config_keys():
    """SPOTD_SOCKET (read by the client) is not mistaken for an unknown config key."""
    assert load_config(environ={"SPOTD_SOCKET": "/tmp/x.sock"}).socket.path == "/run/spotd/spotd.sock"


@pytest.mark.parametrize(
    ("text", "key", "fix_mentions"),
    [
        ("[imds]\npoll_intervall = 1.0\n", "imds.poll_intervall", "imds.poll_interval"),
        ("[imds]\nxyzzy = 1\n", "imds.xyzzy", "poll_interval"),
        ("colour = 'red'\n", "colour", "job_id"),
        ("[imds]\npoll_interval = 'fast'\n", "imds.poll_interval", "float"),
        ("[imds]\npoll_interval = -1.0\n", "imds.poll_interval", "1.0"),
        ("[store]\nkeep = 0\n", "store.keep", "at least 1"),
        ("[store]\nuri = 'gs://bucket'\n", "store.uri", "s3://"),
        ("[store]\npart_size = 1024\n", "store.part_size", "MiB"),
        ("[metrics]\nlisten = 'localhost'\n", "metrics.listen", "0.0.0.0:9127"),
        ("[policy]\non_rebalance = 'panic'\n", "policy.on_rebalance", "notify"),
        ("[sync]\nmode = 'rsync'\n", "sync.mode", "watch"),
        ("job_id = 'a/b'\n", "job_id", "letters"),
        ("imds = 3\n", "imds", "[imds]"),
        (f"[socket]\npath = '/tmp/{'x' * 120}'\n", "socket.path", "shorter"),
        ("[store]\nuri = 's3://'\n", "store.uri", "s3://bucket/prefix"),
        ("[store]\nuri = 'file://'\n", "store.uri", "file:///absolute/path"),
        ("[policy]\ndeadline_margin = 120.0\n", "policy.deadline_margin", "e.g. 10"),
        ("[policy]\non_complete = 'shutdown'\n", "policy.on_complete", "cancel-request"),
        ("[policy]\nmax_run = -1.0\n", "policy.max_run", "0 for no limit"),
        ("[policy]\nmax_run = 7200.0\nmax_wait = 3600.0\n", "policy.max_wait", "at least max_run"),
        ("[output]\ndir = 'model'\n", "output.dir", "/opt/ml/model"),
        ("[cost]\non_demand_hourly = -1.0\n", "cost.on_demand_hourly", "Price List"),
        ("[cost]\npricing_endpoint_url = 'api.pricing'\n", "cost.pricing_endpoint_url", "http"),
        ("[ec2]\nendpoint_url = 'localhost:5000'\n", "ec2.endpoint_url", "http"),
        ("[notify]\nwebhook = 'hooks.slack.com/x'\n", "notify.webhook", "https://"),
        ("[notify]\ntemplate = '{job} was {phase}'\n", "notify.template", "{job_id}"),
        ("[notify]\ntimeout = 0.0\n", "notify.timeout", "5.0"),
        ("[store]\nbackground_rate = '50 furlongs'\n", "store.background_rate", '"50MB"'),
        ("[store]\nbackground_rate = -5\n", "store.background_rate", '0 or "" for no cap'),
        ("[store]\nbackground_rate = 1.5\n", "store.background_rate", '"50MB"'),
        ("[store]\nbackground_rate = true\n", "store.background_rate", '"50MB"'),
        ("[store]\nbackground_nice = 20\n", "store.background_nice", '"idle"'),
        ("[store]\nbackground_nice = -5\n", "store.background_nice", "19"),
        ("[store]\nbackground_nice = 'lowest'\n", "store.background_nice", '"idle"'),
        ("[store]\nbackground_nice = true\n", "store.background_nice", "19"),
    ],
)
def test_every_mistake_names_the_key_and_the_fix(tmp_path, text, key, fix_mentions):
    """Unknown keys, wrong types and impossible values raise ConfigError naming the key, with a fix."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), environ={})
    assert err.value.key == key
    assert fix_mentions in err.value.fix
    assert err.value.exit_code == EXIT_CONFIG


def test_type_errors_read_as_english(tmp_path):
    """An int key given a string says "expected an int", from the file and from the environment alike."""
    with pytest.raises(ConfigError, match="expected an int"):
        load_config(write(tmp_path, "[store]\nkeep = 'three'\n"), environ={})
    with pytest.raises(ConfigError, match="'three' is not an int"):
        load_config(environ={"SPOTD_STORE_KEEP": "three"})


def test_the_client_sigterm_variables_are_not_config_keys():
    """SPOTD_HANDLE_SIGTERM and SPOTD_SIGTERM_GRACE (read by the training side) do not stop the daemon."""
    load_config(environ={"SPOTD_HANDLE_SIGTERM": "0", "SPOTD_SIGTERM_GRACE": "30"})


def test_a_named_file_must_exist_and_parse(tmp_path):
    """An explicit --config that is missing or not TOML is a ConfigError that says so."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "job_id = \n"), environ={})


def test_replace_validates_like_loading():
    """Config.replace applies dotted overrides and refuses impossible values."""
    cfg = Config().replace(**{"store.uri": "file:///tmp/s", "imds.poll_interval": 0.25})
    assert cfg.store.uri == "file:///tmp/s" and cfg.imds.poll_interval == 0.25
    with pytest.raises(ConfigError):
        cfg.replace(**{"imds.poll_interval": 0})


def test_the_job_keys_of_the_issue_load_from_file_and_environment(tmp_path):
    """[policy] on_complete/max_run/max_wait, [output], [cost], [ec2], [notify]: from TOML and SPOTD_* alike."""
    path = write(
        tmp_path,
        "[policy]\non_complete = 'cancel-request'\nmax_run = 3600.0\nmax_wait = 7200.0\n"
        "[output]\ndir = '/opt/ml/model'\n[cost]\non_demand_hourly = 1.212\n"
        "[notify]\nwebhook = 'https://hooks.example/x'\ntemplate = '{job_id}: {text}'\n",
    )
    cfg = load_config(path, environ={"SPOTD_EC2_REGION": "us-west-2", "SPOTD_NOTIFY_TIMEOUT": "2.5"})
    assert (cfg.policy.on_complete, cfg.policy.max_run, cfg.policy.max_wait) == ("cancel-request", 3600, 7200)
    assert cfg.output.dir == "/opt/ml/model" and cfg.cost.on_demand_hourly == 1.212
    assert cfg.ec2.region == "us-west-2" and cfg.notify.timeout == 2.5
    assert cfg.notify.webhook == "https://hooks.example/x" and cfg.notify.template == "{job_id}: {text}"
    defaults = load_config(environ={})
    assert defaults.policy.on_complete == "none" and defaults.policy.max_run == 0 == defaults.policy.max_wait
    assert defaults.notify.webhook == "" and defaults.output.dir == "" and defaults.cost.on_demand_hourly == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, None),
        ("", None),
        ("0", None),
        (50_000_000, 50_000_000),
        ("50000000", 50_000_000),
        ("50MB", 50_000_000),
        ("50 mb/s", 50_000_000),
        ("400MiB", 400 * 1024 * 1024),
        ("1.5GB", 1_500_000_000),
        ("64KiB/s", 65536),
    ],
)
def test_background_rate_takes_bytes_per_second_with_a_unit(tmp_path, value, expected):
    """store.background_rate is bytes/s: a number or a string with a unit (MB = 10^6, MiB = 2^20), from the
    file or the environment; 0 or "" is no cap."""
    text = f"[store]\nbackground_rate = {value!r}\n".replace("'", '"')
    assert load_config(write(tmp_path, text), environ={}).store.background_bytes_per_second == expected
    env = {"SPOTD_STORE_BACKGROUND_RATE": str(value)}
    assert load_config(environ=env).store.background_bytes_per_second == expected


@pytest.mark.parametrize(
    ("value", "expected"), [(19, 19), (0, 0), ("10", 10), ("idle", "idle"), ("IDLE", "idle")]
)
def test_background_nice_takes_a_nice_value_or_idle(tmp_path, value, expected):
    """store.background_nice is 0-19 or "idle", from the file or the environment; 0 when not given."""
    assert load_config(environ={}).store.background_niceness == 0
    text = f"[store]\nbackground_nice = {value!r}\n".replace("'", '"')
    assert load_config(write(tmp_path, text), environ={}).store.background_niceness == expected
    env = {"SPOTD_STORE_BACKGROUND_NICE": str(value)}
    assert load_config(environ=env).store.background_niceness == expected
