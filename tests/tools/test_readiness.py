"""``Readiness``: turns wait for MCP servers still making their first connection, and for nothing else."""

from __future__ import annotations

import anyio
import pytest

from haip_runtime.bridge.models import ServerState, ServerStatus
from haip_runtime.config.models import McpServerConfig
from haip_runtime.tools.readiness import Readiness

pytestmark = pytest.mark.anyio


def server(connect_timeout: float = 30) -> McpServerConfig:
    return McpServerConfig(transport="stdio", command="demo", connect_timeout_seconds=connect_timeout)


async def test_a_turn_waits_for_the_bridge_and_then_for_a_connecting_server() -> None:
    readiness = Readiness({"demo": server(), "ghost": server()})
    states = {"demo": ServerState.CONNECTING, "ghost": ServerState.FAILED}
    done = anyio.Event()

    async def turn() -> None:
        await readiness.wait(["demo", "ghost", "unconfigured"])
        done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(turn)
            await anyio.wait_all_tasks_blocked()
            waited_for_bridge = not done.is_set()  # no bridge yet: every configured server is "connecting"
            readiness.attach(lambda: {name: ServerStatus(name, state, (), None, 0) for name, state in states.items()})
            await anyio.wait_all_tasks_blocked()
            waited_for_demo = not done.is_set()  # the failed ghost is not waited for; demo still connects
            states["demo"] = ServerState.CONNECTED
            readiness.changed()
    assert waited_for_bridge and waited_for_demo and done.is_set()
    assert not readiness.connecting("ghost") and not readiness.connecting("unconfigured")


async def test_a_server_that_never_connects_holds_a_turn_only_for_its_connect_timeout() -> None:
    readiness = Readiness({"stuck": server(connect_timeout=0.05)})
    readiness.attach(lambda: {"stuck": ServerStatus("stuck", ServerState.CONNECTING, (), None, 0)})
    with anyio.fail_after(5):
        await readiness.wait(["stuck"])
    assert readiness.connecting("stuck")  # the turn went on without its tools
