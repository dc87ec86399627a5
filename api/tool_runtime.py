"""Tools as the API serves them: client function tools, the built-in ``python`` tool, forced
calls for ``tool_choice``, output parsing, and one sandbox per session.

Tool declarations are accepted in the chat format (``{"type": "function", "function": {...}}``),
the Responses format (``{"type": "function", "name": ..., "parameters": ...}``) and as
``{"type": "python"}``, which enables the server-side Python interpreter under the function
name ``python``. Calls to ``python`` run on the server; every other call goes back to the
client.

``python`` calls (and starting a session's sandbox) run on the tool pool (``api/tool_pool.py``):
``tool_workers`` threads of its own, at most ``tool_workers_per_key`` per API key, so a tenant
flooding long computations delays only its own calls, and turn ends (asyncio's default
executor) never wait behind a computation. Sandboxes are closed on a cleanup thread of their
own, never on the event loop.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.errors import APIError
from api.tool_pool import DEFAULT_TOOL_WORKERS, DEFAULT_TOOL_WORKERS_PER_KEY, KeyFairPool
from tools.render import ToolSchemaError, tool_call_format, validate_tools
from tools.sandbox import PythonSandbox, SandboxLimits, SandboxResult
from tools.streaming_parser import StreamingToolParser
from tools.tool_call import ToolCallFormat

if TYPE_CHECKING:
    from tools.constrained import ToolCallConstrainer

PYTHON_TOOL_NAME = "python"
CLOSING_RESERVE = 16  # tokens kept to close a forced call: quotes, braces, </tool_call>, EOS
PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": PYTHON_TOOL_NAME,
        "description": "Run Python code in a persistent interpreter (variables persist between "
        "calls) and return what it printed and the value of its last expression.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "Python source to run"}},
            "required": ["code"],
        },
    },
}


def normalize_tools(tools: Any) -> list[dict[str, Any]]:
    """Chat-format function tools (``python`` expanded); raises APIError on a bad entry."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise APIError("tools must be a list", param="tools")
    result = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise APIError("each tool must be an object", param="tools")
        if tool.get("type") == PYTHON_TOOL_NAME:
            result.append(PYTHON_TOOL)
        elif tool.get("type") == "function" and "function" in tool:
            result.append(tool)
        elif tool.get("type") == "function" and "name" in tool:
            function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            result.append({"type": "function", "function": function})
        else:
            raise APIError('tools must be function tools or {"type": "python"}', param="tools")
    try:
        validate_tools(result)
    except ToolSchemaError as exc:
        raise APIError(str(exc), param="tools") from exc
    return result


def check_tool_choice(tools: list[dict[str, Any]] | None, tool_choice: Any) -> None:
    """Raise APIError (400, param ``tool_choice``) unless ``tool_choice`` is "auto", "none",
    "required" with at least one tool, or names one of ``tools`` (a name, the chat form
    ``{"type": "function", "function": {"name": ...}}`` or the Responses form ``{"name": ...}``).
    With ``tools=None`` (not known yet, e.g. a session default) only the form is checked.
    """
    if tool_choice in (None, "auto", "none"):
        return
    if tool_choice == "required":
        if tools is not None and not tools:
            raise APIError('tool_choice "required" needs at least one tool', param="tool_choice")
        return
    name: Any = tool_choice
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function", tool_choice)
        name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise APIError(
            'tool_choice must be "auto", "none", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if tools is None:
        return
    names = [tool["function"]["name"] for tool in tools]
    if name not in names:
        raise APIError(
            f"tool_choice names the function {name!r}, which is not in tools "
            f"(tools: {names or 'none given'})",
            param="tool_choice",
        )


def python_result_text(result: SandboxResult) -> str:
    """The tool output the model sees (and the client gets in ``tool_output`` events)."""
    parts = []
    if result.notice:
        parts.append(f"[{result.notice}]")
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.value is not None:
        parts.append(result.value)
    if result.error is not None:
        parts.append(f"{result.error.type}: {result.error.message}")
    if result.stderr and result.error is None:
        parts.append(result.stderr.rstrip("\n"))
    return "\n".join(parts) if parts else "(no output)"


@dataclass
class ToolRuntime:
    """Per-server tool machinery. The constrainer is built on first use (its tokenizer
    preprocessing takes a moment) and only ever used from the event loop thread.

    ``sandbox_factory(session_id)`` makes a session's sandbox (on a tool worker); None: a
    ``PythonSandbox`` under ``root`` with ``sandbox_limits``. ``root`` is ``sandbox_root``, or
    without one a temporary directory of the runtime's own, which ``close`` removes.
    """

    tokenizer: Any
    vocab_size: int
    stop_token_ids: list[int]
    sandbox_root: Path | None = None
    sandbox_limits: SandboxLimits = field(default_factory=SandboxLimits)
    sandbox_factory: Callable[[str], PythonSandbox] | None = None
    tool_call_parser: ToolCallFormat | None = None  # --tool-call-parser; None: from the template
    tool_workers: int = DEFAULT_TOOL_WORKERS  # --tool-workers
    tool_workers_per_key: int = DEFAULT_TOOL_WORKERS_PER_KEY  # --tool-workers-per-key
    _constrainer: Any = None
    _sandboxes: dict[str, PythonSandbox] = field(default_factory=dict)
    _pool: KeyFairPool | None = None
    _cleanup: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, "tarry-sandbox-cleanup")
    )

    @property
    def pool(self) -> KeyFairPool:
        """The tool pool (made on first use, so a runtime built off the loop costs nothing)."""
        if self._pool is None:
            self._pool = KeyFairPool(self.tool_workers, self.tool_workers_per_key)
        return self._pool

    def __post_init__(self) -> None:
        self.root = self.sandbox_root or Path(tempfile.mkdtemp(prefix="tarry-py-"))
        # Chosen once: forced calls are written in the format the parser reads.
        self.call_format: ToolCallFormat = self.tool_call_parser or tool_call_format(self.tokenizer)

    def parser(self) -> StreamingToolParser:
        return StreamingToolParser(self.call_format)

    @property
    def constrainer(self) -> ToolCallConstrainer:
        """The grammar constrainer (built on first use), writing calls in ``call_format``."""
        if self._constrainer is None:
            from tools.constrained import ToolCallConstrainer

            self._constrainer = ToolCallConstrainer(
                self.tokenizer, self.vocab_size, self.stop_token_ids, call_format=self.call_format
            )
        return self._constrainer

    def processors(
        self, tools: list[dict[str, Any]], tool_choice: Any, max_tokens: int | None = None
    ) -> list[Any]:
        """Logits processors forcing a call for "required" or a named function; [] otherwise.

        The call starts closing its open strings and objects ``CLOSING_RESERVE`` tokens before
        ``max_tokens`` runs out, so a forced call is complete whenever the budget allows.
        """
        check_tool_choice(tools, tool_choice)
        if not tools or tool_choice in (None, "auto", "none"):
            return []
        try:
            processor = self.constrainer.processor_for(
                tools,
                tool_choice,
                max_call_tokens=call_token_budget(max_tokens),
            )
        except ToolSchemaError as exc:
            raise APIError(str(exc), param="tool_choice") from exc
        return [processor] if processor is not None else []

    async def run_python(self, session_id: str, arguments_json: str, owner: str = "") -> str:
        """Run a ``python`` call's code in the session's sandbox (made on first use) on the
        tool pool, as ``owner``'s (the API key's) call; the output text."""
        try:
            code = json.loads(arguments_json).get("code")
        except (ValueError, AttributeError):
            code = None
        if not isinstance(code, str):
            return "error: the python tool needs a string argument 'code'"
        sandbox = self._sandboxes.get(session_id)
        if sandbox is None or sandbox.closed:
            sandbox = await self.pool.run(owner, self._new_sandbox, session_id)
            previous = self._sandboxes.get(session_id)
            if previous is not None and not previous.closed:  # made meanwhile by another call
                self._cleanup.submit(sandbox.close)
                sandbox = previous
            self._sandboxes[session_id] = sandbox
        result = await self.pool.run(owner, sandbox.run, code)
        return python_result_text(result)

    def _new_sandbox(self, session_id: str) -> PythonSandbox:
        if self.sandbox_factory is not None:
            return self.sandbox_factory(session_id)
        return PythonSandbox(self.root, self.sandbox_limits)

    def close_sandbox(self, session_id: str) -> None:
        """Close a session's sandbox on the cleanup thread (the event loop never waits)."""
        sandbox = self._sandboxes.pop(session_id, None)
        if sandbox is not None:
            try:
                self._cleanup.submit(sandbox.close)
            except RuntimeError:  # shut down already: the server is stopping
                sandbox.close()

    def close(self) -> None:
        """Server shutdown: close every sandbox now and stop the threads."""
        if self._pool is not None:
            self._pool.close()
        self._cleanup.shutdown(wait=True)
        for session_id in list(self._sandboxes):
            self._sandboxes.pop(session_id).close()
        if self.sandbox_root is None:  # the root is the runtime's own temporary directory
            shutil.rmtree(self.root, ignore_errors=True)


def call_token_budget(max_tokens: int | None) -> int:
    """Tokens a constrained call or JSON answer may use before it must close: the request's
    ``max_tokens`` (unbounded when None) less the reserve the closing needs."""
    return max(0, (max_tokens or 1 << 20) - CLOSING_RESERVE)
