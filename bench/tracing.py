"""What tracing costs: echo throughput with tracing off, off in a build without the `otel` extra, and on.

    .venv/bin/python bench/tracing.py [--rounds 3] [--seconds 5]     # writes bench/TRACING.md

Three servers (`haip-runtime serve`, the bench config: echo), each pinned to one core, driven in turn
(A, B, C, A, B, C...) by bench/load.py on the other core at 50 connections × 4 in flight:

- A: tracing off, the `otel` extra installed (this venv);
- B: tracing off, a build without the extra: the same venv with OpenTelemetry's SDK and exporters hidden
  from the import system (a `sitecustomize` that refuses them), so the runtime could not import them;
- C: `tracing = "otlp"` at `sampling_ratio = 1.0`, exporting over OTLP/HTTP to a local sink on 127.0.0.1
  that answers every export with 200 (every echo turn is a trace of one `invoke_agent echo` span).

A against B should be equal within the rounds' spread (off costs one check of a global per hook); C is
reported, not judged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import (  # type: ignore[import-not-found]
    BENCH,
    PYTHON,
    Server,
    _env,
    _read_announcement,
    bench_config,
    cores,
    load,
    pin,
    stop,
)

HIDE_OTEL = """
import importlib.abc, sys

class _NoOtelExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter")):
            raise ModuleNotFoundError(f"No module named {name!r} (bench/tracing.py: a build without the otel extra)")
        return None

sys.meta_path.insert(0, _NoOtelExtra())
"""


LABELS = (
    ("A", "A: tracing off, `otel` extra installed"),
    ("B", "B: tracing off, no `otel` extra"),
    ("C", "C: tracing on (OTLP/HTTP, ratio 1.0)"),
)


class Sink(BaseHTTPRequestHandler):
    """Takes an OTLP/HTTP export and answers 200, as a collector would; counts the bytes."""

    received = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        Sink.received += len(self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def sink() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def server(where: set[int], tracing: str = "", hide_otel: bool = False) -> Iterator[Server]:
    """`haip-runtime serve` on the bench config, with ``tracing`` lines added to [observability]."""
    with tempfile.TemporaryDirectory(prefix="haip-bench-tracing-") as tmp:
        config = bench_config(Path(tmp))
        text = config.read_text(encoding="utf-8").replace('log_level = "warning"', f'log_level = "warning"\n{tracing}')
        config.write_text(text, encoding="utf-8")
        env = _env()
        if hide_otel:
            (Path(tmp) / "sitecustomize.py").write_text(HIDE_OTEL, encoding="utf-8")
            env["PYTHONPATH"] = f"{tmp}:{env['PYTHONPATH']}"
        command = [PYTHON, "-m", "haip_runtime", "serve", "--config", str(config)]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=open(Path(tmp) / "stderr.log", "w"), text=True, cwd=tmp, env=env
        )
        pin(process.pid, where)
        try:
            port, token = _read_announcement(process)
            yield Server(process, port, token, Path(tmp))
        finally:
            stop(process)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    serve, drive = cores()
    spec = {"mode": "echo", "warmup": 1.0, "conns": 50, "inflight": 4, "seconds": args.seconds}
    rates: dict[str, list[float]] = {"A": [], "B": [], "C": []}
    with sink() as endpoint:
        on = f'tracing = "otlp"\notlp_endpoint = "{endpoint}"\nsampling_ratio = 1.0'
        with server(serve) as a, server(serve, hide_otel=True) as b, server(serve, tracing=on) as c:
            for _ in range(args.rounds):
                for name, each in (("A", a), ("B", b), ("C", c)):
                    result = load(drive, {**spec, "url": each.ws(), "token": each.token})
                    rates[name].append(result["rate"])
                    print(name, f"{result['rate']:,.0f}/s", flush=True)
        # Leaving the block stopped the servers: C's runtime exported what was pending on its way out.
    median = {name: statistics.median(values) for name, values in rates.items()}
    off_ratio = [x / y for x, y in zip(rates["A"], rates["B"], strict=True)]
    on_ratio = [x / y for x, y in zip(rates["C"], rates["A"], strict=True)]
    lines = [
        "# What tracing costs (bench/tracing.py)",
        "",
        f"Echo throughput, 50 connections × 4 in flight, {args.rounds} rounds of {args.seconds:g} s, servers "
        "pinned to one core and load to the other, run A, B, C in turn. Written by `bench/tracing.py` on "
        f"{time.strftime('%Y-%m-%d')}; this 2-core machine is shared, so compare within a run.",
        "",
        "| server | median round trips/s | rounds |",
        "|---|---|---|",
        *(
            f"| {label} | {median[name]:,.0f} | {', '.join(f'{r:,.0f}' for r in rates[name])} |"
            for name, label in LABELS
        ),
        "",
        f"- A / B (off, with against without the extra): median {statistics.median(off_ratio):.2f}x, "
        f"{min(off_ratio):.2f}–{max(off_ratio):.2f}x over the rounds.",
        f"- C / A (on against off): median {statistics.median(on_ratio):.2f}x, "
        f"{min(on_ratio):.2f}–{max(on_ratio):.2f}x; the sink received {Sink.received:,} bytes of OTLP.",
        "",
    ]
    (BENCH / "TRACING.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(json.dumps(median))


if __name__ == "__main__":
    main()
