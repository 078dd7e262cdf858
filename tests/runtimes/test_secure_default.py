"""Secure by default (issue 18, classes 4 and 11): the shipped cross-silo configs name key files,
``fedml-prism keys --cf`` creates the missing ones, a keyless party refuses any non-loopback address
unless ``allow_unauthenticated``, and the small items: key length, file modes, scrubbing."""

from __future__ import annotations

import io
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from runtime_utils import BIN, env_for, grpc_config, write_config

from fedml_prism.job import build_job
from fedml_prism.runtimes.fedml_env import security_settings
from fedml_prism.runtimes.security import (
    KEY_ENV,
    SecuritySettings,
    is_loopback,
    read_key,
    scrub,
    scrub_logs,
    worker_key,
    write_keys,
)
from fedml_prism.tools.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
KEYS = "secrets/keys/party{rank}.key"


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


# ------------------------------------------------------------------------------ the shipped configs
@pytest.mark.parametrize("name", ["grpc", "mqtt_s3"])
def test_shipped_network_configs_require_keys(name: str) -> None:
    security = yaml.safe_load((REPO / "config" / name / "fedml_config.yaml").read_text())["security_args"]
    assert security["auth_key_file"] == KEYS and security["require_auth"] is True
    assert "allow_unauthenticated" not in security


def test_the_launch_scripts_create_keys_before_the_server() -> None:
    text = (REPO / "run" / "parties.sh").read_text()
    assert text.index('fedml-prism" keys --cf "$config"') < text.index('--rank 0 --role server')
    assert "config/*/secrets/" in (REPO / ".gitignore").read_text().splitlines()


# ------------------------------------------------------------------------------ fedml-prism keys --cf
def test_keys_cf_creates_the_missing_keys_from_the_master(tmp_path, capsys) -> None:
    cfg = grpc_config(tmp_path, workers=2, security_args={"auth_key_file": KEYS, "require_auth": True})
    key = lambda r: tmp_path / "secrets" / "keys" / f"party{r}.key"  # noqa: E731
    assert cli_main(["keys", "--cf", str(cfg)]) == 0
    assert [key(r).exists() for r in range(4)] == [True, True, True, False]  # worker_num 2
    assert all(_mode(key(r)) == 0o600 for r in range(3)) and _mode(key(0).parent) == 0o700
    master = read_key(str(key(0)))
    assert len(master) == 32 and [read_key(str(key(r))) for r in (1, 2)] == [worker_key(master, 1), worker_key(master, 2)]
    # a lost worker key is derived again from the master; the others are kept as they are
    key(2).unlink()
    before = key(1).stat().st_mtime_ns
    assert cli_main(["keys", "--cf", str(cfg), "--workers", "3"]) == 0
    assert read_key(str(key(0))) == master and key(1).stat().st_mtime_ns == before
    assert [read_key(str(key(r))) for r in (2, 3)] == [worker_key(master, 2), worker_key(master, 3)]
    lines = capsys.readouterr().out.splitlines()
    assert f"created {key(2)}" in lines and f"kept {key(0)}" in lines
    # the job starts with them: every party finds its key
    job = build_job(str(cfg))
    assert security_settings(job, 2).auth_key == worker_key(master, 2)


def test_keys_cf_refuses_worker_keys_without_their_master(tmp_path, capsys) -> None:
    cfg = grpc_config(tmp_path, workers=2, security_args={"auth_key_file": KEYS})
    assert cli_main(["keys", "--cf", str(cfg)]) == 0
    (tmp_path / "secrets" / "keys" / "party0.key").unlink()
    assert cli_main(["keys", "--cf", str(cfg)]) == 2
    assert "worker keys exist but the master key" in capsys.readouterr().err
    assert not (tmp_path / "secrets" / "keys" / "party0.key").exists()


def test_keys_cf_without_a_key_file_in_the_config_makes_nothing(tmp_path, capsys) -> None:
    cfg = grpc_config(tmp_path, workers=2)
    assert cli_main(["keys", "--cf", str(cfg)]) == 0
    assert "no keys to make" in capsys.readouterr().out and not (tmp_path / "secrets").exists()
    bad = grpc_config(tmp_path, workers=2, security_args={"auth_key_file": "one.key"})
    assert cli_main(["keys", "--cf", str(bad)]) == 2
    assert "allowed a path with {rank}" in capsys.readouterr().err
    assert cli_main(["keys", "--out", str(tmp_path / "k")]) == 2 and cli_main(["keys"]) == 2


# ------------------------------------------------------------------------------ keyless means loopback only
def _grpc_job(tmp_path: Path, server_host: str, **security: object) -> object:
    tmp_path.mkdir(exist_ok=True)
    cfg = grpc_config(tmp_path, workers=2, security_args=dict(security))
    rows = (tmp_path / "grpc_ipconfig.csv").read_text().replace("0,0,127.0.0.1", f"0,0,{server_host}")
    (tmp_path / "grpc_ipconfig.csv").write_text(rows)
    return build_job(str(cfg))


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "server.example.org", "::"])
def test_a_keyless_grpc_party_refuses_a_network_address(tmp_path, host: str) -> None:
    job = _grpc_job(tmp_path, host)
    with pytest.raises(ValueError, match=rf"party 0 would use its gRPC listening address \(rank 0\) '{host}' "
                                         "without message authentication"):
        security_settings(job, 0)
    with pytest.raises(ValueError, match=rf"party 1 would use the gRPC address of rank 0 '{host}'"):
        security_settings(job, 1)
    with pytest.raises(ValueError, match="allow_unauthenticated: true"):
        security_settings(job, 2)


def test_a_network_address_is_allowed_with_a_key_or_the_explicit_opt_out(tmp_path, monkeypatch) -> None:
    assert not security_settings(_grpc_job(tmp_path / "a", "10.1.2.3", allow_unauthenticated=True), 0).auth_key
    monkeypatch.setenv(KEY_ENV, "ab" * 16)
    assert security_settings(_grpc_job(tmp_path / "b", "10.1.2.3"), 1).auth_key == bytes.fromhex("ab" * 16)
    monkeypatch.delenv(KEY_ENV)
    assert security_settings(_grpc_job(tmp_path / "c", "127.0.0.2"), 0).auth_key is None  # loopback: allowed


def _mqtt_job(tmp_path: Path, broker: str, endpoint: str | None, **security: object) -> object:
    s3 = {"BUCKET_NAME": "b", **({"CN_S3_ENDPOINT": endpoint} if endpoint else {})}
    cfg = write_config(tmp_path / "mqtt.yaml", common_args={"training_type": "cross_silo", "scenario": "horizontal"},
                       comm_args={"backend": "MQTT_S3", "worker_num": 2, "customized_training_mqtt_config":
                                  {"BROKER_HOST": broker, "BROKER_PORT": 1883}, "customized_training_s3_config": s3},
                       security_args=dict(security))
    return build_job(str(cfg))


@pytest.mark.parametrize(("broker", "endpoint", "named"), [
    ("broker.example.org", "http://127.0.0.1:5000", "the MQTT broker 'broker.example.org'"),
    ("127.0.0.1", "https://s3.eu-west-1.amazonaws.com", "the S3 endpoint 's3.eu-west-1.amazonaws.com'"),
    ("localhost", None, "the S3 endpoint 's3.amazonaws.com'"),      # no endpoint: AWS
])
def test_a_keyless_mqtt_s3_party_refuses_a_network_broker_or_s3(tmp_path, broker, endpoint, named) -> None:
    with pytest.raises(ValueError, match=f"party 1 would use {named}"):
        security_settings(_mqtt_job(tmp_path, broker, endpoint), 1)
    assert security_settings(_mqtt_job(tmp_path, broker, endpoint, allow_unauthenticated=True), 1).auth_key is None


def test_loopback_hosts() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost", "LOCALHOST")] == [True] * 6
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "localhost.example.org", "")] == [False] * 5


def test_a_keyless_server_on_all_interfaces_exits_before_any_work(tmp_path) -> None:
    """The whole command: a clear error, exit code 2, no FedML run, no output folder."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    _grpc_job(job_dir, "0.0.0.0")
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "fedml-prism"), "run", "--cf", str(job_dir / "grpc.yaml"), "--rank", "0",
                           "--role", "server", "--output-dir", str(out)], cwd=tmp_path, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "party 0 would use its gRPC listening address (rank 0) '0.0.0.0' without message authentication" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "fedml").exists()


# ------------------------------------------------------------------------------ minor items
def test_an_environment_key_needs_16_bytes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "ab" * 15)
    with pytest.raises(ValueError, match=f"{KEY_ENV} is invalid: allowed a key of at least 16 bytes, got 15"):
        SecuritySettings.from_flat({}, str(tmp_path), rank=0)
    monkeypatch.setenv(KEY_ENV, "ab" * 16)
    assert SecuritySettings.from_flat({}, str(tmp_path), rank=0).auth_key == bytes.fromhex("ab" * 16)


def test_rewritten_key_files_are_private_whatever_their_old_mode(tmp_path) -> None:
    out = tmp_path / "keys"
    out.mkdir()
    for r in range(3):
        (out / f"party{r}.key").write_text("00" * 32)
        os.chmod(out / f"party{r}.key", 0o644)
    paths = write_keys(str(out), workers=2)
    assert [_mode(p) for p in paths] == [0o600] * 3


def test_checkpoints_and_metrics_are_private(tmp_path) -> None:
    """The engine's files (a PriSM sp run) and the writers every method's rounds use."""
    from fedml_prism.engine.rounds import RunLog, write_checkpoint

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "sp.yaml", train_args={"comm_round": 1},
                       tracking_args={"output_dir": str(out), "checkpoint_every": 1})
    old = os.umask(0o022)
    try:
        assert cli_main(["run", "--cf", str(cfg)]) == 0
        method = tmp_path / "method"
        method.mkdir()
        write_checkpoint(str(method), "layerwise", {}, 1, [], {"model": {}})
        RunLog(str(method), "layerwise").add(0, 0.0)
    finally:
        os.umask(old)
    written = [p for p in [*out.rglob("*"), *method.iterdir()] if p.is_file() and p.suffix in (".pt", ".json", ".csv")]
    names = {p.name for p in written}
    assert {"checkpoint.pt", "metrics.json", "metrics.csv"} <= names
    assert {p.name: _mode(p) for p in written} == {p.name: 0o600 for p in written}


def test_scrubbing_covers_escaped_spellings_and_short_secret_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    other = logging.getLogger("fedml.scrub.test")
    other.addHandler(handler)
    other.setLevel(logging.INFO)
    secret = 'pa"ss\\wörd'
    try:
        scrub_logs([secret])
        other.info("repr %r", {"token": secret})
        other.info("json %s", '{"token": "pa\\"ss\\\\w\\u00f6rd"}')
        other.info("args %s", {"MQTT_PWD": "ab", "CN_S3_AKI": "k", "MQTT_USER": "bob"})
        other.info('json {"CN_S3_SAK": "x\\"y", "n": 1} and CN_S3_SAK=zz end')
    finally:
        other.removeHandler(handler)
    text = stream.getvalue()
    assert "ss" not in text.replace("pass", "") and "'ab'" not in text and "'k'" not in text and "zz" not in text
    assert "'MQTT_PWD': '***'" in text and "'CN_S3_AKI': '***'" in text and "'MQTT_USER': 'bob'" in text
    assert '"CN_S3_SAK": "***", "n": 1' in text and "CN_S3_SAK=*** end" in text
    assert scrub("a plain line") == "a plain line"


def test_mqtt_sections_given_as_yaml_files_are_read_from_the_jobs_folder(tmp_path, monkeypatch) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "mqtt.yaml").write_text(yaml.safe_dump({"BROKER_HOST": "10.0.0.7", "BROKER_PORT": 1883}))
    (job_dir / "s3.yaml").write_text(yaml.safe_dump({"BUCKET_NAME": "b", "CN_S3_ENDPOINT": "http://127.0.0.1:9"}))
    cfg = write_config(job_dir / "job.yaml", common_args={"training_type": "cross_silo", "scenario": "horizontal"},
                       comm_args={"backend": "MQTT_S3", "worker_num": 2, "customized_training_mqtt_config": "mqtt.yaml",
                                  "customized_training_s3_config": "s3.yaml"})
    monkeypatch.chdir(tmp_path)  # not the job's folder
    with pytest.raises(ValueError, match="party 0 would use the MQTT broker '10.0.0.7'"):
        security_settings(build_job(str(cfg)), 0)
