"""The supervisor's small rules: worker node names, and the wait before a dead worker starts again.
(The supervisor at work, with real processes: ``tests/behaviour/test_workers.py``.)"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from haip_runtime.config import HaipConfig
from haip_runtime.config.clustering import ClusterConfig
from haip_runtime.exceptions import ConfigError
from haip_runtime.server.node import MARK, START_FAILED, WorkerSpec
from haip_runtime.server.workers import MAX_BACKOFF_SECONDS, Outcome, backoff, node_id
from tests.support.serving import make_config


def test_each_worker_process_is_a_node_of_its_own_named_after_the_configured_one() -> None:
    assert node_id("web-1", 1, 1) == "web-1-w1"
    assert node_id("web-1", 2, 3) == "web-1-w2.3"  # its third process: a new node, never a dead one's name
    long = node_id("n" * 64, 12, 7)
    assert len(long) == 64 and long.endswith("-w12.7")


def test_the_backoff_doubles_with_each_death_in_a_row_up_to_a_bound() -> None:
    assert [backoff(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff(50) == MAX_BACKOFF_SECONDS


def test_an_outcome_says_how_the_worker_ended() -> None:
    assert Outcome(7, -9, 3.0).describe() == "was killed by SIGKILL"
    assert Outcome(7, 3, None).describe() == "exited with code 3"


def classes_in(pickled: bytes) -> set[tuple[str, str]]:
    """The (module, name) of every class ``pickled`` makes."""
    found: set[tuple[str, str]] = set()

    class Listing(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found.add((module, name))
            return super().find_class(module, name)

    Listing(io.BytesIO(pickled)).load()
    return found


def spec_of(config: HaipConfig) -> dict[str, Any]:
    data: dict[str, Any] = pickle.loads(WorkerSpec(config, 2, "web").sent())
    return data


def test_a_worker_is_sent_its_config_as_data_and_validates_it_with_its_own_code() -> None:
    """An operator's find: the supervisor pickled its ``HaipConfig``, so a worker restarted after the code
    on disk changed got a model of the old code's fields and crash-looped (``ClusterConfig`` without
    ``log_max_bytes``). Now only values go (the classes of pathlib and pydantic, none of ours), and what
    the file left out takes the worker's own defaults."""
    postgres = {"backend": "postgres", "url": "postgresql://haip@127.0.0.1:5499/haip"}
    config = make_config({"storage": postgres, "cluster": {"redis_url": "redis://127.0.0.1:6390/0"}})
    sent = WorkerSpec(config, 2, "web").sent()
    assert classes_in(sent) <= {("pathlib", "PosixPath"), ("pydantic.types", "SecretStr")}
    assert ("haip_runtime.config.models", "HaipConfig") in classes_in(pickle.dumps(config))  # (as it was)
    back = WorkerSpec.received(io.BytesIO(sent))
    assert back == WorkerSpec(config, 2, "web")
    older = spec_of(config)  # as a supervisor of a version before cluster.log_max_bytes writes it
    older["config"]["cluster"] = {"redis_url": "redis://127.0.0.1:6390/0"}
    received = WorkerSpec.received(io.BytesIO(pickle.dumps(older))).config
    assert (
        received.cluster is not None
        and received.cluster.log_max_bytes == ClusterConfig.model_fields["log_max_bytes"].default
    )


def test_a_worker_refuses_a_config_its_code_does_not_know_in_one_line(tmp_path: Path) -> None:
    newer = spec_of(make_config({}))  # as a supervisor of a later version, with an option this code lacks
    newer["config"]["server"] = {**newer["config"].get("server", {}), "warp_speed": 9}
    worker = subprocess.run(
        [sys.executable, "-m", "haip_runtime.server.node"],
        input=pickle.dumps(newer),
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert worker.returncode == START_FAILED
    assert b"server.warp_speed: unknown key" in worker.stderr and b"restart serve" in worker.stderr
    assert worker.stdout.startswith(MARK.encode() + b"failed ")


def test_a_port_another_serve_with_workers_holds_is_refused_before_its_workers_listen() -> None:
    """A reviewer's find: the probe alone let a second ``serve --workers`` share the port while the first's
    workers were still starting (its reservation, bound with SO_REUSEADDR and SO_REUSEPORT, never listens)."""
    from haip_runtime.server.node import bind, unshared

    port, lock = unshared("127.0.0.1", 0)
    reserved = bind("127.0.0.1", port, share_port=True, listen=False)
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: another haip-runtime serve"):
            unshared("127.0.0.1", port)
        with pytest.raises(ConfigError, match="another haip-runtime serve"):  # (the address, however written)
            unshared("localhost", port)
    finally:
        reserved.close()
        if lock is not None:
            lock.close()
    again, freed = unshared("127.0.0.1", port)  # (its lock goes with it)
    assert again == port and freed is not None
    freed.close()
