"""`[cluster]`: optional, its URL checked, its password masked in `check` and known to the log redactor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from haip_runtime.cluster.keyspace import Keyspace
from haip_runtime.config import ConfigError, load_config, masked_dump, secret_values
from haip_runtime.config.base import masked_url
from haip_runtime.config.clustering import ClusterConfig
from tests.config.test_config import run_cli, write

#: ``[cluster]`` needs the PostgreSQL store (not reached by these tests).
POSTGRES = '[storage]\nbackend = "postgres"\nurl = "postgresql://haip@127.0.0.1:5432/haip"\n'


def test_without_the_section_there_is_no_cluster(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}).cluster is None


def test_the_url_may_come_from_the_environment_and_its_password_is_masked(tmp_path: Path) -> None:
    path = write(
        tmp_path, f'{POSTGRES}[cluster]\nredis_url = "redis://:${{REDIS_PASSWORD}}@127.0.0.1:6379/2"\nnode_id = "n1"\n'
    )
    config = load_config(path, env={"REDIS_PASSWORD": "hunter2-long"})
    assert config.cluster is not None and config.cluster.node_id == "n1"
    assert config.cluster.redis_url == "redis://:hunter2-long@127.0.0.1:6379/2"
    assert masked_dump(config)["cluster"]["redis_url"] == "redis://:**********@127.0.0.1:6379/2"
    assert "hunter2-long" in secret_values(config)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("rediss://app:pw@redis.example:6380/1", "rediss://app:**********@redis.example:6380/1"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_only_the_password_is_hidden(url: str, shown: str) -> None:
    assert masked_url(url) == shown


def test_a_url_of_another_scheme_is_one_line_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[cluster]\nredis_url = "http://127.0.0.1:6379"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == (
        f"{path}: cluster.redis_url: must start with redis://, rediss:// or unix:// (redis://host:6379/0), not http://"
    )  # the value is not echoed: a URL may carry a password


def test_a_database_that_is_not_a_number_is_refused_and_channels_name_the_database(tmp_path: Path) -> None:
    """``/abc`` was taken as database 0 (``check --connect`` said "answered"); and channels, which no
    database holds, name the database when it is not 0 (two deployments on one Redis apart)."""
    path = write(tmp_path, '[cluster]\nredis_url = "redis://:pw@127.0.0.1:6379/abc"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == (
        f"{path}: cluster.redis_url: the database after the port must be a number (redis://host:6379/0), not '/abc'"
    )
    five = ClusterConfig(redis_url="redis://127.0.0.1:6379/5")
    assert five.database == 5 and ClusterConfig(redis_url="unix:///run/redis.sock?db=3").database == 3
    # as redis-py reads it: ``?db=`` over the path (a re-tester's find: the numbering guard read 0 here)
    assert ClusterConfig(redis_url="redis://127.0.0.1:6379/0?db=1").database == 1
    assert Keyspace("haip", five.database).node_channel("a") == "haip:db5:node:a"
    assert Keyspace("haip", 0).node_channel("a") == "haip:node:a"  # (as before: a rolling upgrade hears all)


@pytest.mark.parametrize(
    ("written", "said"),
    [
        ("localhost:6379", "not 'localhost:6379'"),  # was: "not localhost://", which nobody wrote
        (":s3cret@localhost:6379", "not a value without one"),
    ],
)
def test_a_url_without_a_scheme_is_named_as_written_and_never_its_password(
    tmp_path: Path, written: str, said: str
) -> None:
    path = write(tmp_path, f'[cluster]\nredis_url = "{written}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).endswith(said) and "s3cret" not in str(caught.value)


@pytest.mark.parametrize("prefix", ["", "my app", "{prod}", "haip:", "x" * 33])
def test_a_key_prefix_redis_keys_cannot_carry_is_refused_saying_what_may_be_in_it(tmp_path: Path, prefix: str) -> None:
    path = write(tmp_path, f'[cluster]\nredis_url = "redis://127.0.0.1:6379/0"\nkey_prefix = "{prefix}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert "cluster.key_prefix: 1 to 32 letters, digits, '_', '.' or '-'" in str(caught.value)
    assert str(caught.value).endswith(f"not {prefix!r}")


def test_check_shows_the_cluster_without_its_password(tmp_path: Path) -> None:
    path = write(tmp_path, f'{POSTGRES}[cluster]\nredis_url = "redis://:s3cret-pw@127.0.0.1:6379/0"\n')
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cluster"]["redis_url"] == "redis://:**********@127.0.0.1:6379/0"
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_a_bad_database_or_redis_url_is_refused_without_echoing_its_password(tmp_path: Path) -> None:
    from haip_runtime.config import load_config
    from haip_runtime.exceptions import ConfigError

    for section in (
        '[cluster]\nredis_url = "http://u:hunter2@h:1/0"',
        '[storage]\nbackend = "postgres"\nurl = "mysql://u:hunter2@h/db"',
    ):
        path = tmp_path / "haip.toml"
        path.write_text(section + "\n")
        with pytest.raises(ConfigError) as refused:
            load_config(path)
        assert "hunter2" not in str(refused.value) and "url" in str(refused.value)


@pytest.mark.parametrize(
    ("url", "shown", "password"),
    [
        ("postgresql://haip:pa/ss@db/haip", "postgresql://haip:**********@db/haip", "pa/ss"),
        (
            "postgresql://haip:p?a#s@s@db:5432/h?sslmode=require",
            "postgresql://haip:**********@db:5432/h?sslmode=require",
            "p?a#s@s",
        ),
        ("postgresql://db/haip", "postgresql://db/haip", None),
        ("postgresql://u@db/x", "postgresql://u@db/x", None),
    ],
)
def test_a_password_with_url_characters_is_masked_and_redacted_whole(
    url: str, shown: str, password: str | None
) -> None:
    from haip_runtime.config.base import url_password

    assert masked_url(url) == shown and url_password(url) == password


def test_a_cluster_needs_the_postgres_store(tmp_path: Path) -> None:
    path = write(tmp_path, '[storage]\nbackend = "sqlite"\n[cluster]\nredis_url = "redis://127.0.0.1:6379/0"\n')
    with pytest.raises(ConfigError, match="needs \\[storage\\] backend = 'postgres', not 'sqlite'"):
        load_config(path, env={})


def test_the_numbering_a_store_keeps_names_the_redis_database_when_not_0() -> None:
    assert ClusterConfig(redis_url="redis://h:6379/0", key_prefix="p").numbering == "p"
    assert ClusterConfig(redis_url="redis://h:6379", key_prefix="p").numbering == "p"
    assert ClusterConfig(redis_url="redis://h:6379/1", key_prefix="p").numbering == "p@1"


@pytest.mark.parametrize(
    ("beats", "said"),
    [
        ("heartbeat_seconds = 10\n", "node_ttl_seconds (5) must be at least twice heartbeat_seconds (10)"),
        ("heartbeat_seconds = 2\nnode_ttl_seconds = 60\nslot_ttl_seconds = 3\n", "slot_ttl_seconds (3) must be"),
    ],
)
def test_a_heartbeat_the_lifetimes_it_keeps_cannot_hold_twice_is_refused(tmp_path: Path, beats: str, said: str) -> None:
    """An operator's find: a 10 s heartbeat with the 5 s node_ttl was taken, and a live node dropped out between
    its beats (the node count flapped; a second node started under its node_id)."""
    path = write(tmp_path, f'[cluster]\nredis_url = "redis://127.0.0.1:6379/0"\n{beats}')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert f"{path}: cluster: {said}" in str(caught.value)


def test_check_finds_a_redis_url_option_serve_would_refuse(tmp_path: Path) -> None:
    """A re-tester's find: ``check`` said "valid" of a URL naming a TLS file that is not there, or an option
    redis-py does not take, which ``serve`` then refused at once."""
    for query, said in (
        ("ssl_ca_certs=/nonexistent.pem", "the URL's ssl_ca_certs names no file"),
        ("foo=bar", "the URL's option 'foo' is not one"),
    ):
        path = write(tmp_path, f'{POSTGRES}[cluster]\nredis_url = "rediss://127.0.0.1:6379/0?{query}"\n')
        result = run_cli("check", "--config", str(path))
        assert result.returncode == 1 and f"cluster.redis_url: {said}" in result.stderr, result.stderr
