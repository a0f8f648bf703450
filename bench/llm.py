"""The embedded local model through the runtime, against the same model called directly (bench/LLM-RESULTS.md).

    .venv/bin/python bench/llm.py [--rounds N] [--tokens N]

Through the runtime: a HAIP client sends a message to the `assistant` agent on `kind = "local"`
(a real uvicorn on 127.0.0.1) and times MESSAGE_PART arrivals; time to first token is from
sending the MESSAGE to the first MESSAGE_PART, tokens/s is MESSAGE_END `tokens` over the time
from the first part to MESSAGE_END. Directly: xllamacpp's `Server.handle_chat_completions` with
the same model file, context, threads, prompt and sampling, timed in its stream callback. The two
are interleaved round by round so both see the same machine load. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haip_runtime.client import HaipClient  # noqa: E402
from haip_runtime.llm.local import default_model_path  # noqa: E402
from tests.support.serving import live_server, make_config  # noqa: E402

INSTRUCTIONS = "You are a storyteller."
PROMPT = "Tell me a long story about a lighthouse keeper."
CONTEXT, THREADS = 2048, 2


async def through_runtime(url: str, token: str) -> tuple[float, float, int]:
    async with HaipClient(url, token=token, timeout=120) as client:
        tx = await client.start_transaction("assistant")
        start = time.perf_counter()
        await client.send_text(tx, PROMPT)
        first = await client.wait_for("MESSAGE_PART")
        first_at = time.perf_counter()
        end = await client.wait_for("MESSAGE_END")
        end_at = time.perf_counter()
        await client.wait_for("RUN_FINISHED")
        assert first.run_id == end.run_id
        tokens = int(end.get("tokens"))
    return first_at - start, tokens / (end_at - first_at), tokens


def direct(server: Any, max_tokens: int) -> tuple[float, float, int]:
    marks: list[float] = []
    usage: dict[str, Any] = {}
    ended: list[float] = []

    def on_chunk(chunk: dict[str, Any]) -> bool:
        for choice in chunk.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                marks.append(time.perf_counter())
        if chunk.get("usage"):  # the last chunk: the answer is complete
            usage.update(chunk["usage"])
            ended.append(time.perf_counter())
        return False

    body = {
        "messages": [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    start = time.perf_counter()
    server.handle_chat_completions(body, on_chunk)
    tokens = int(usage["completion_tokens"])
    return marks[0] - start, tokens / (ended[0] - marks[0]), tokens


def load_direct() -> Any:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(default_model_path())
    params.n_ctx = CONTEXT
    params.n_parallel = 1
    params.verbosity = -1
    params.cpuparams.n_threads = THREADS
    params.cpuparams_batch.n_threads = THREADS
    return xllamacpp.Server(params)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    local = {
        "kind": "local",
        "max_tokens": args.tokens,
        "temperature": 0,
        "context_tokens": CONTEXT,
        "threads": THREADS,
    }
    config = make_config(
        {
            "llm": {"local": local},
            "agents": {"assistant": {"plugin": "assistant", "llm": "local", "instructions": INSTRUCTIONS}},
        }
    )
    server = load_direct()
    ours: list[tuple[float, float, int]] = []
    base: list[tuple[float, float, int]] = []
    with live_server(config) as live:
        token = live.token("bench")
        anyio.run(through_runtime, live.ws_url, token)  # warm-up: loads the runtime's copy of the model
        direct(server, args.tokens)
        for _ in range(args.rounds):
            ours.append(anyio.run(through_runtime, live.ws_url, token))
            base.append(direct(server, args.tokens))
    write_results(ours, base, args)


def write_results(ours: list[tuple[float, float, int]], base: list[tuple[float, float, int]], args: Any) -> None:
    ttft_ours, ttft_base = statistics.median(r[0] for r in ours), statistics.median(r[0] for r in base)
    tps_ours, tps_base = statistics.median(r[1] for r in ours), statistics.median(r[1] for r in base)
    tokens = statistics.median(r[2] for r in ours)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cores = os.cpu_count()
    text = f"""# Local model benchmark

Written by `bench/llm.py` on {stamp}, Python {platform.python_version()}, {platform.machine()}, {cores} cores
(shared with other work). SmolLM2-135M-Instruct Q4_1, {CONTEXT}-token context,
{THREADS} threads, temperature 0, up to {args.tokens} tokens per answer (median {tokens:.0f}); median of {args.rounds}
interleaved rounds after one warm-up each.

| measure | through the runtime | the model called directly | ratio |
|---|---|---|---|
| time to first token | {ttft_ours * 1000:.0f} ms | {ttft_base * 1000:.0f} ms | {ttft_ours / ttft_base:.2f}x |
| tokens per second | {tps_ours:.1f} | {tps_base:.1f} | {tps_ours / tps_base:.2f}x |

Through the runtime, a token travels: llama.cpp's callback in the generating thread, a bounded
memory stream into the event loop, the assistant agent, MESSAGE_PART through the transaction and
session, a WebSocket frame to the client. Directly, it is the same callback, timed where it runs
(first content chunk, and the final usage chunk as the end). Both ask the same prompt each round,
so llama.cpp's prompt cache serves both alike.
"""
    (ROOT / "bench" / "LLM-RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
