"""The README's client example, run as written against a live server (an author's find: it stopped at
an agent's greeting, whose RUN_FINISHED came first)."""

from __future__ import annotations

import contextlib
import io
import re
import textwrap

import pytest

from haip_runtime.client import HaipClient
from tests.support.serving import ROOT, live_server, make_config

pytestmark = pytest.mark.anyio


async def test_the_readmes_client_example_prints_the_answer_after_a_greeting() -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"```python\nfrom haip_runtime.client import HaipClient\n\n(.*?)```", readme, re.S)
    assert found is not None
    example = found.group(1).replace("ws://127.0.0.1:8080/haip/websocket", "{url}")
    config = make_config({"agents": {"storyteller": {"plugin": "tests.support.agents:GreeterAgent"}}})
    with live_server(config) as live:
        code = "async def main(HaipClient, token, url):\n" + textwrap.indent(example.replace('"{url}"', "url"), "    ")
        space: dict[str, object] = {}
        exec(compile(code, "README.md", "exec"), space)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            await space["main"](HaipClient, live.token("ann"), live.ws_url)  # type: ignore[operator]
    # the answer (this agent says its history, the greeting first), not the greeting alone
    assert printed.getvalue() == "agent:hello ann, params=[] | user:a dragon"
