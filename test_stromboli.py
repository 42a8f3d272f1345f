"""Tests for stromboli: the real daemon over HTTP, real Podman, the real Claude Code CLI.

Only the Anthropic Messages API is stood in for, by the scripted model server below
(CONTRACT §5): its reply is chosen by the prompt.

  "hello"            → text "Hello from the scripted model"
  "bash: CMD"        → a Bash tool_use; after the tool_result: text "tool said: <result>"
  "sleep N"          → waits N seconds before replying
  "fail" / "fail NNN"→ an HTTP 500 (or NNN) API error
  json_schema runs   → a StructuredOutput tool_use with the JSON after "json:" in the prompt
  anything else      → text "echo: <prompt>"

Sections mirror stromboli.py: shared fixtures first, then configuration, runs, streams,
jobs, auth/perimeter, metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import podman
import pytest
from aiohttp import web
from httpx_sse import connect_sse

HERE = pathlib.Path(__file__).resolve().parent
STROMBOLI = HERE / "stromboli.py"
IMAGE = os.environ.get("STROMBOLI_TEST_IMAGE", "localhost/stromboli-agent:test")
PODMAN_SOCKET = "/run/podman/podman.sock"
JWT_SECRET = "a-test-secret-that-is-long-enough-0123456789"


# ---------------------------------------------------------------------------
# Scripted model server (the stand-in for the Anthropic Messages API)
# ---------------------------------------------------------------------------

def blocks_of(content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in (content or []) if isinstance(b, dict)]


def user_prompts(messages: list[dict]) -> list[str]:
    """The real prompt text of each user turn (the CLI puts <system-reminder> blocks first)."""
    prompts = []
    for message in messages:
        if message.get("role") != "user":
            continue
        texts = [b.get("text", "") for b in blocks_of(message.get("content"))
                 if b.get("type") == "text"]
        real = [t for t in texts if not t.lstrip().startswith(("<system-reminder>", "<local-command",
                                                               "<command-", "[structured-output"))]
        if real:
            prompts.append(real[-1])
    return prompts


def last_tool_result(messages: list[dict]) -> dict | None:
    if messages and messages[-1].get("role") == "user":
        for block in blocks_of(messages[-1].get("content")):
            if block.get("type") == "tool_result":
                return block
    return None


def tool_result_text(block: dict) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in blocks_of(content) if b.get("type") == "text")


def estimate_tokens(value) -> int:
    return max(1, len(json.dumps(value)) // 4)


class ScriptedModel:
    """An aiohttp server speaking the Messages API (streaming and not), run in a thread."""

    def __init__(self):
        self.requests: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_post("/v1/messages", self.messages)
            app.router.add_route("*", "/{tail:.*}", self.anything)
            runner = web.AppRunner(app, access_log=None)
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(10)

    def requests_with(self, marker: str) -> list[dict]:
        """Requests whose user turns mention `marker` (tests share one model server)."""
        return [r for r in self.requests
                if any(marker in p for p in user_prompts(r.get("messages", [])))]

    async def anything(self, request: web.Request) -> web.Response:
        if request.path.endswith("/count_tokens"):
            return web.json_response({"input_tokens": 10})
        return web.json_response({})

    def plan(self, body: dict) -> dict:
        messages = body.get("messages", [])
        tools = {t.get("name"): t for t in body.get("tools") or [] if isinstance(t, dict)}
        prompts = user_prompts(messages)
        prompt = prompts[-1] if prompts else ""
        low = prompt.lower()
        plan = {"sleep": 0.0, "error": None, "stop": "end_turn"}
        if m := re.search(r"sleep\s+(\d+(?:\.\d+)?)", low):
            plan["sleep"] = float(m.group(1))
        if m := re.search(r"\bfail(?:\s+(\d{3}))?\b", low):
            plan["error"] = int(m.group(1) or 500)
        result = last_tool_result(messages)
        if result is not None:
            return {**plan, "blocks": [{"type": "text",
                                        "text": f"tool said: {tool_result_text(result)}"}]}
        if "StructuredOutput" in tools:
            m = re.search(r"json:\s*(\{.*\})", prompt, re.S)
            value = json.loads(m.group(1)) if m else {}
            return {**plan, "stop": "tool_use", "blocks": [self.tool_use("StructuredOutput", value)]}
        if (m := re.search(r"bash:\s*(.+)", prompt, re.S)) and "Bash" in tools:
            return {**plan, "stop": "tool_use", "blocks": [self.tool_use(
                "Bash", {"command": m.group(1).strip(), "description": "scripted"})]}
        text = "Hello from the scripted model" if "hello" in low else f"echo: {prompt}"
        return {**plan, "blocks": [{"type": "text", "text": text}]}

    @staticmethod
    def tool_use(name: str, value) -> dict:
        return {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": name,
                "input": value}

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        plan = self.plan(body)
        await asyncio.sleep(plan["sleep"])
        if plan["error"]:
            return web.json_response({"type": "error", "error": {
                "type": "api_error", "message": f"scripted failure {plan['error']}"}},
                status=plan["error"])
        usage = {"input_tokens": estimate_tokens(body.get("messages", [])), "output_tokens": 1,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        out_tokens = sum(estimate_tokens(b) for b in plan["blocks"])
        message = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
                   "model": body.get("model", "claude-scripted"), "stop_sequence": None}
        if not body.get("stream"):
            return web.json_response({**message, "content": plan["blocks"],
                                      "stop_reason": plan["stop"],
                                      "usage": {**usage, "output_tokens": out_tokens}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(event: str, data: dict) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        await send("message_start", {"type": "message_start", "message": {
            **message, "content": [], "stop_reason": None, "usage": usage}})
        for i, block in enumerate(plan["blocks"]):
            if block["type"] == "text":
                await send("content_block_start", {"type": "content_block_start", "index": i,
                                                   "content_block": {"type": "text", "text": ""}})
                delta = {"type": "text_delta", "text": block["text"]}
            else:
                await send("content_block_start", {"type": "content_block_start", "index": i,
                                                   "content_block": {**block, "input": {}}})
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            await send("content_block_delta", {"type": "content_block_delta", "index": i,
                                               "delta": delta})
            await send("content_block_stop", {"type": "content_block_stop", "index": i})
        await send("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": plan["stop"], "stop_sequence": None},
                                     "usage": {"output_tokens": out_tokens}})
        await send("message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response


# ---------------------------------------------------------------------------
# Shared fixtures: Podman service, agent test image, model server, daemons
# ---------------------------------------------------------------------------

def podman_client() -> podman.PodmanClient:
    return podman.PodmanClient(base_url=f"unix://{PODMAN_SOCKET}")


def agent_containers(label: str) -> list:
    """Containers (any state) with a label, as Podman itself reports them."""
    with podman_client() as client:
        return client.containers.list(all=True, filters={"label": [label]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def podman_service():
    """The Podman API socket (.ci/run starts it; started here when it is missing)."""
    proc = None
    with podman_client() as client:
        try:
            client.ping()
        except Exception:
            os.makedirs(os.path.dirname(PODMAN_SOCKET), exist_ok=True)
            proc = subprocess.Popen(["podman", "system", "service", "--time=0",
                                     f"unix://{PODMAN_SOCKET}"], start_new_session=True)
            wait_until(lambda: os.path.exists(PODMAN_SOCKET), 15, what="podman socket")
    yield PODMAN_SOCKET
    if proc:
        proc.terminate()


@pytest.fixture(scope="session")
def agent_image(podman_service):
    """The offline agent image (`stromboli image build --offline`), built if missing."""
    with podman_client() as client:
        if not client.images.exists(IMAGE):
            cmd = [sys.executable, str(STROMBOLI), "image", "build", "--offline", "--tag", IMAGE]
            if os.environ.get("STROMBOLI_TEST_CLAUDE_BIN"):
                cmd += ["--claude-bin", os.environ["STROMBOLI_TEST_CLAUDE_BIN"]]
            subprocess.run(cmd, check=True, env={**os.environ,
                                                 "STROMBOLI_PODMAN_URL": f"unix://{PODMAN_SOCKET}"})
        assert client.images.exists(IMAGE)
    return IMAGE


@pytest.fixture(scope="session")
def model():
    server = ScriptedModel()
    server.start()
    return server


class Daemon:
    """A real `python stromboli.py serve` subprocess with its own state dir and ports."""

    def __init__(self, state_dir: pathlib.Path, env: dict[str, str]):
        self.state_dir = state_dir
        self.port, self.metrics_port = free_port(), free_port()
        self.env = {**os.environ, **env,
                    "STROMBOLI_STATE_DIR": str(state_dir),
                    "STROMBOLI_SERVER_ADDRESS": f"127.0.0.1:{self.port}",
                    "STROMBOLI_METRICS_ADDRESS": f"127.0.0.1:{self.metrics_port}"}
        self.proc: subprocess.Popen | None = None
        self.log_path = state_dir / "daemon.log"
        self.http = httpx.Client(base_url=self.url, timeout=120)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_podman: bool = True) -> "Daemon":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, str(STROMBOLI), "serve"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._up, 20, what=f"daemon on :{self.port} (log: {self.log_path})")
        if wait_podman:
            wait_until(lambda: "podman connected" in self.log(), 20, what="podman connected")
        return self

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def wait_job(self, job_id: str, states=("completed", "failed", "crashed", "cancelled"),
                 timeout: float = 60) -> dict:
        def done():
            job = self.http.get(f"/jobs/{job_id}").json()
            return job if job["status"] in states else None
        return wait_until(done, timeout, 0.1, f"job {job_id} in {states}")


def agent_env(model: ScriptedModel) -> dict[str, str]:
    return {
        "STROMBOLI_AUTH_ENABLED": "false",
        "STROMBOLI_AGENT_IMAGE": IMAGE.rsplit(":", 1)[0],
        "STROMBOLI_AGENT_IMAGE_TAG": IMAGE.rsplit(":", 1)[1],
        "STROMBOLI_AGENT_NETWORK": "host",
        "STROMBOLI_PODMAN_URL": f"unix://{PODMAN_SOCKET}",
        "STROMBOLI_AGENT_CREDENTIALS_FILE": "/nonexistent/.credentials.json",
        "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
        "STROMBOLI_AGENT_ENV": ",".join([
            f"ANTHROPIC_BASE_URL={model.url}", "DISABLE_TELEMETRY=1", "DISABLE_ERROR_REPORTING=1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", "CLAUDE_CODE_MAX_RETRIES=0"]),
        "STROMBOLI_MAX_CONCURRENT_RUNS": "4",
        "STROMBOLI_LOG_FORMAT": "json",
    }


@pytest.fixture
def make_daemon(tmp_path_factory, agent_image, model):
    """Factory for daemons with extra settings; all are stopped at the end of the test."""
    daemons: list[Daemon] = []

    def make(state_dir: pathlib.Path | None = None, start: bool = True, **env: str) -> Daemon:
        daemon = Daemon(state_dir or tmp_path_factory.mktemp("state"), {**agent_env(model), **env})
        daemons.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in daemons:
        daemon.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory, agent_image, model):
    """One shared daemon (auth off) for tests that need no special settings."""
    d = Daemon(tmp_path_factory.mktemp("shared-state"), agent_env(model)).start()
    yield d
    d.stop()


def stromboli_cli(*args: str, env: dict | None = None, timeout: float = 30):
    return subprocess.run([sys.executable, str(STROMBOLI), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def marker() -> str:
    return uuid.uuid4().hex[:8]


def run_error(response: httpx.Response) -> str:
    body = response.json()
    assert body["status"] == "error" and body["id"] == "", body
    return body["error"]
