"""config/multi-node.toml, the cluster example docs/deploy.md points to: it loads through the real
loader with its variables set, ``haip-runtime check`` accepts it, and without them it says which is missing.
(tests/behaviour/test_deploy.py runs two nodes of it behind nginx.)"""

from __future__ import annotations

import os
import subprocess
import sys

from haip_runtime.config import load_config
from tests.support.deployment import EXAMPLE, example_env
from tests.support.serving import ROOT

ENV = example_env(
    "redis://:bus-secret@10.0.0.5:6379/0",
    "postgresql://haip:db-secret@10.0.0.6:5432/haip",
    "https://id.example.com/.well-known/jwks.json",
    8080,
)


def test_the_example_loads_as_a_cluster_node_on_postgres_with_jwks_tokens() -> None:
    config = load_config(EXAMPLE, env={**ENV, "HAIP_HOST": "0.0.0.0"})
    assert config.cluster is not None and config.cluster.redis_url == ENV["HAIP_REDIS_URL"]
    assert config.storage.backend == "postgres" and config.storage.url is not None
    assert config.auth.mode == "jwt" and config.auth.jwks_url == ENV["HAIP_JWKS_URL"]
    assert config.server.host == "0.0.0.0" and config.server.port == 8080
    assert config.session.heartbeat_interval_seconds < 120  # below the guide's balancer read timeout


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "haip_runtime", "check", "--config", str(EXAMPLE)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HAIP_")}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**clean, **env}, timeout=60)


def test_check_accepts_the_example_and_masks_its_secrets() -> None:
    done = check(ENV)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "ok: " + str(EXAMPLE) + " is valid (1 agent(s), 0 MCP server(s))"
    assert "bus-secret" not in done.stdout and "db-secret" not in done.stdout
    assert "redis://:**********@10.0.0.5:6379/0" in done.stdout


def test_check_names_the_variable_the_example_misses() -> None:
    done = check({k: v for k, v in ENV.items() if k != "HAIP_REDIS_URL"})
    assert done.returncode == 1
    assert "cluster.redis_url: environment variable HAIP_REDIS_URL is not set" in done.stderr
