"""Tests for stromboli: the real daemon over HTTP, real Podman, the real Claude Code CLI.

Only the Anthropic Messages API is stood in for (it cannot be reached from the tests), by
the scripted model server below: its reply is chosen by the prompt.

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
import base64
import concurrent.futures
import contextlib
import datetime
import hashlib
import hmac
import io
import json
import os
import pathlib
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from unittest import mock

import httpx
import jwt
import podman
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
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
    """An aiohttp server speaking the Messages API (streaming and not), run in a thread.
    `requests` holds each request body as received, plus the `x-api-key` header it came
    with under "_x_api_key"."""

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
        self.requests.append({**body, "_x_api_key": request.headers.get("x-api-key", "")})
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
        return client.containers.list(all=True, filters={"label": label})


def running_containers(label: str) -> list:
    """Containers with a label that Podman has running (not just created or `initialized`:
    those cannot be killed yet, and a restart finds them in another state)."""
    return [c for c in agent_containers(label) if c.attrs.get("State") == "running"]


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
                                     f"unix://{PODMAN_SOCKET}"], start_new_session=True, cwd="/")
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

    def __init__(self, state_dir: pathlib.Path, env: dict[str, str], wrapper: tuple = ()):
        self.state_dir = state_dir
        self.wrapper = wrapper  # a command the daemon runs under (e.g. `unshare`)
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

    @property
    def instance(self) -> str:
        """The `stromboli.instance` label of this daemon's containers and own secrets."""
        db = (self.state_dir / "stromboli.db").resolve()
        return hashlib.sha256(str(db).encode()).hexdigest()[:12]

    def launch(self) -> "Daemon":
        """The process, without waiting for it to answer."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([*self.wrapper, sys.executable, str(STROMBOLI), "serve"],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def start(self, wait_podman: bool = True) -> "Daemon":
        self.launch()
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

    def remove_containers(self) -> None:
        """After the test: a stopped daemon leaves its jobs' containers running for its next
        start, which will not come — and its session homes mounted."""
        self.unmount_staging()
        for container in agent_containers(f"stromboli.instance={self.instance}"):
            container.remove(force=True)
        unmount_below(self.state_dir)

    def staging_mounts(self) -> list[str]:
        """Mount points under the daemon's volume staging folder (its tmpfs first)."""
        root = str(self.state_dir / "mounts")
        with open("/proc/self/mountinfo") as info:
            points = [line.split()[4] for line in info]
        return sorted(p for p in points if p == root or p.startswith(root + "/"))

    def unmount_staging(self) -> None:
        """The daemon keeps its staging tmpfs (and a kept job's binds) for its next start."""
        for point in reversed(self.staging_mounts()):
            subprocess.run(["umount", "-l", point], check=False)

    def wait_job(self, job_id: str, states=("completed", "failed", "crashed", "cancelled"),
                 timeout: float = 60) -> dict:
        def done():
            job = self.http.get(f"/jobs/{job_id}").json()
            return job if job["status"] in states else None
        return wait_until(done, timeout, 0.1, f"job {job_id} in {states}")


def mount_points_below(folder: pathlib.Path) -> list[str]:
    """Mount points below a folder, deepest first (from /proc/self/mountinfo)."""
    prefix = str(folder.resolve()) + "/"
    with open("/proc/self/mountinfo") as info:
        points = [line.split()[4].replace("\\040", " ") for line in info]
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)


def unmount_below(folder: pathlib.Path) -> None:
    """Unmount the session homes a daemon mounted in its state dir: they outlive the daemon
    on purpose (a job's container may still write into its home)."""
    for point in mount_points_below(folder):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)


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
        "STROMBOLI_SHUTDOWN_GRACE": "3s",  # Daemon.stop waits 30 s for the process
        "STROMBOLI_LOG_FORMAT": "json",
    }


@pytest.fixture
def make_daemon(tmp_path_factory, agent_image, model):
    """Factory for daemons with extra settings; all are stopped at the end of the test."""
    daemons: list[Daemon] = []

    def make(state_dir: pathlib.Path | None = None, wait_podman: bool = True, wrapper: tuple = (),
             **env: str) -> Daemon:
        daemon = Daemon(state_dir or tmp_path_factory.mktemp("state"), {**agent_env(model), **env},
                        wrapper)
        daemons.append(daemon)
        return daemon.start(wait_podman)

    yield make
    for daemon in daemons:
        daemon.stop()
        daemon.remove_containers()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory, agent_image, model):
    """One shared daemon (auth off) for tests that need no special settings."""
    d = Daemon(tmp_path_factory.mktemp("shared-state"), agent_env(model)).start()
    yield d
    d.stop()
    d.remove_containers()


def stromboli_cli(*args: str, env: dict | None = None, timeout: float = 30):
    return subprocess.run([sys.executable, str(STROMBOLI), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def marker() -> str:
    return uuid.uuid4().hex[:8]


def run_error(response: httpx.Response) -> str:
    body = response.json()
    assert body["status"] == "error" and body["id"] == "", body
    return body["error"]


# ---------------------------------------------------------------------------
# Fast tier: the pure parts in-process, no container nor daemon (`pytest -m fast`: ~2 s)
# ---------------------------------------------------------------------------

sys.path.insert(0, str(HERE))
import stromboli  # noqa: E402  (the module under test, for the in-process tier)


@pytest.mark.fast
def test_feed_splits_lines_across_frames_and_cuts_long_ones():
    feed = stromboli.RunFeed("run-x", max_line=1024, max_output=1024 * 1024)
    for chunk in (b"al", b"pha\nbe", b"ta\r\n", b"x" * 3000, b"y" * 3000, b"\nlast"):
        feed.feed(chunk)
    feed.flush()
    lines = [data for _, kind, data in feed.events if kind == "line"]
    assert lines[:2] == ["alpha", "beta"]
    assert lines[2] == "x" * 1024 + " [stromboli: line truncated, 4976 bytes dropped]"
    assert lines[3] == "last" and feed.truncated


@pytest.mark.fast
def test_feed_drops_output_past_the_cap_but_keeps_the_last_line():
    feed = stromboli.RunFeed("run-x", max_line=1024, max_output=10 * 1024)
    feed.feed(b"".join(b"%05d %s\n" % (i, b"a" * 94) for i in range(1000)))
    feed.feed(b'{"type":"result","result":"done"}\n')
    feed.flush()
    output = feed.output()
    assert len(output) < 11 * 1024 and feed.truncated
    assert output.splitlines()[-2].startswith("[stromboli: output truncated: ")
    assert output.splitlines()[-1] == '{"type":"result","result":"done"}'
    untouched = stromboli.RunFeed("run-y")
    untouched.feed(b"short\n")
    untouched.flush()
    assert untouched.output() == "short" and not untouched.truncated


@pytest.mark.fast
def test_bounded_lines_skips_oversized_lines_without_holding_them():
    data = b'{"a":1}\n' + b"z" * 5000 + b'\n{"b":2}\n' + b"q" * 5000
    assert list(stromboli.bounded_lines(io.BytesIO(data), 1000)) == [b'{"a":1}\n', b'{"b":2}\n']


@pytest.mark.fast
def test_documented_options_are_exactly_the_parsed_ones():
    doc = stromboli.OPENAPI
    claude = doc["definitions"]["stromboli_internal_types.ClaudeOptions"]["properties"]
    podman_ = doc["definitions"]["stromboli_internal_types.PodmanOptions"]["properties"]
    assert set(claude) == set(stromboli.CLAUDE_KINDS)
    assert set(podman_) == set(stromboli.PODMAN_KINDS)
    stream = doc["paths"]["/run/stream"]["get"]["parameters"]
    documented = {p["name"] for p in stream if p["in"] == "query"}
    parsed = {"prompt", "workdir", "webhook_url", "run_id", "last_event_id",
              *stromboli.CLAUDE_KINDS, *stromboli.PODMAN_KINDS}
    assert documented == parsed
    # and each documented query parameter really reaches the request
    for name in documented - {"prompt", "run_id", "last_event_id"}:
        kind = stromboli.CLAUDE_KINDS.get(name) or stromboli.PODMAN_KINDS.get(name) or "str"
        value = {"bool": "true", "int": "3", "budget": "1.5", "object": "{}", "map": "{}"}.get(
            kind, "x")
        body = stromboli.stream_request_body(FakeQuery({"prompt": "p", name: value}))
        assert name in body or name in body["claude"] or name in body["podman"], name


class FakeQuery(dict):
    """The part of aiohttp's MultiDict that stream_request_body uses."""

    def getall(self, key):
        return [self[key]]


# Upstream's own document (Stromboli v0.5.6), kept here as the facts the served document must
# keep: each operation's parameters ("name:type", the body as "request:#Definition") and each
# definition's properties ("name:type"; "#X" is a reference to X, "&X" an allOf of it).
UPSTREAM_OPERATIONS = {
    "GET /agents": "",
    "POST /agents": "request:#stromboli_internal_agent.CreateRequest",
    "GET /agents/{id}": "id:string",
    "DELETE /agents/{id}": "id:string",
    "POST /agents/{id}/send": "id:string request:#internal_api.SendAgentRequest",
    "GET /agents/{id}/stream": "id:string",
    "POST /auth/logout": "",
    "POST /auth/refresh": "request:#internal_api.RefreshRequest",
    "POST /auth/token": "request:#internal_api.TokenRequest",
    "GET /auth/validate": "",
    "GET /claude/status": "",
    "GET /health": "",
    "GET /images": "",
    "POST /images/pull": "request:#internal_api.ImagePullRequest",
    "GET /images/search": "q:string limit:integer no_trunc:boolean",
    "GET /images/{name}": "name:string",
    "GET /jobs": "",
    "GET /jobs/{id}": "id:string",
    "DELETE /jobs/{id}": "id:string",
    "POST /run": "request:#internal_api.RunRequest",
    "POST /run/async": "request:#internal_api.RunRequest",
    "GET /run/stream": "prompt:string workdir:string session_id:string",
    "GET /secrets": "",
    "POST /secrets": "request:#internal_api.CreateSecretRequest",
    "GET /secrets/{name}": "name:string",
    "DELETE /secrets/{name}": "name:string",
    "GET /sessions": "",
    "DELETE /sessions/{id}": "id:string",
    "GET /sessions/{id}/messages": "id:string offset:integer limit:integer",
    "GET /sessions/{id}/messages/{message_id}": "id:string message_id:string",
}
UPSTREAM_DEFINITIONS = {
    "internal_api.AsyncRunResponse": "job_id:string session_id:string",
    "internal_api.ClaudeStatusResponse": "configured:boolean message:string",
    "internal_api.ComponentHealth": "error:string name:string status:string",
    "internal_api.CreateAgentResponse":
        "created_at:string exit_error:string id:string idle_timeout_disabled:boolean "
        "idle_timeout_seconds:integer last_activity_at:string session_id:string "
        "status:#stromboli_internal_agent.Status turns_completed:integer",
    "internal_api.CreateSecretRequest": "name:string value:string",
    "internal_api.CreateSecretResponse": "error:string name:string success:boolean",
    "internal_api.DeleteSecretResponse": "error:string name:string success:boolean",
    "internal_api.ErrorResponse": "error:string",
    "internal_api.HealthResponse": "components:array name:string status:string version:string",
    "internal_api.ImageDetailResponse":
        "compatibility_rank:integer compatible:boolean created:string description:string "
        "has_claude_cli:boolean id:string labels:object rank_description:string repository:string "
        "size:integer tag:string tools:array",
    "internal_api.ImageInfoResponse":
        "compatibility_rank:integer compatible:boolean created:string description:string "
        "has_claude_cli:boolean id:string repository:string size:integer tag:string tools:array",
    "internal_api.ImagePullRequest": "image:string platform:string quiet:boolean",
    "internal_api.ImagePullResponse": "image:string image_id:string success:boolean",
    "internal_api.ImageSearchResponse": "results:array",
    "internal_api.ImagesListResponse": "images:array",
    "internal_api.JobCancelResponse": "cancelled:boolean job_id:string",
    "internal_api.JobListResponse": "jobs:array",
    "internal_api.JobResponse":
        "crash_info:#stromboli_internal_job.CrashInfo created_at:string error:string id:string "
        "output:string session_id:string status:&stromboli_internal_job.Status "
        "structured_output:object updated_at:string",
    "internal_api.LogoutResponse": "message:string success:boolean",
    "internal_api.RefreshRequest": "refresh_token:string",
    "internal_api.RunRequest":
        "claude:&stromboli_internal_types.ClaudeOptions "
        "podman:&stromboli_internal_types.PodmanOptions prompt:string webhook_url:string "
        "workdir:string",
    "internal_api.RunResponse":
        "crash_info:&stromboli_internal_job.CrashInfo error:string id:string output:string "
        "session_id:string status:string structured_output:object "
        "usage:&stromboli_internal_job.Usage",
    "internal_api.SearchResultResponse":
        "automated:boolean description:string index:string name:string official:boolean "
        "stars:integer",
    "internal_api.SecretInfoResponse": "created_at:string id:string name:string",
    "internal_api.SecretsListResponse": "error:string secrets:array",
    "internal_api.SendAgentRequest": "prompt:string",
    "internal_api.SendAgentResponse": "turn_id:string",
    "internal_api.SessionDestroyResponse": "error:string session_id:string success:boolean",
    "internal_api.SessionInfo": "id:string title:string",
    "internal_api.SessionListResponse": "error:string sessions:array",
    "internal_api.SessionMessageResponse":
        "error:string message:#stromboli_internal_history.Message",
    "internal_api.SessionMessagesResponse":
        "has_more:boolean limit:integer messages:array offset:integer total:integer",
    "internal_api.TokenRequest": "client_id:string",
    "internal_api.TokenResponse":
        "access_token:string expires_in:integer refresh_token:string token_type:string",
    "internal_api.ValidateResponse": "expires_at:integer subject:string valid:boolean",
    "internal_api.errorBody": "error:string",
    "stromboli_internal_agent.CreateRequest":
        "claude:&stromboli_internal_types.ClaudeOptions disable_idle_timeout:boolean "
        "idle_timeout_seconds:integer prompt:string workdir:string",
    "stromboli_internal_agent.Snapshot":
        "created_at:string exit_error:string id:string idle_timeout_disabled:boolean "
        "idle_timeout_seconds:integer last_activity_at:string session_id:string "
        "status:#stromboli_internal_agent.Status turns_completed:integer",
    "stromboli_internal_agent.Status": "",
    "stromboli_internal_history.ContentBlock":
        "content:string id:string input:object is_error:boolean name:string text:string "
        "tool_use_id:string type:string",
    "stromboli_internal_history.Message":
        "content:&stromboli_internal_history.MessageContent cwd:string git_branch:string "
        "parent_uuid:string permission_mode:string session_id:string timestamp:string "
        "tool_result:&stromboli_internal_history.ToolResult "
        "type:&stromboli_internal_history.MessageType uuid:string version:string",
    "stromboli_internal_history.MessageContent":
        "content:array message_id:string model:string role:string stop_reason:string "
        "usage:&stromboli_internal_history.Usage",
    "stromboli_internal_history.MessageType": "",
    "stromboli_internal_history.ToolResult":
        "interrupted:boolean is_image:boolean stderr:string stdout:string",
    "stromboli_internal_history.Usage":
        "cache_creation_input_tokens:integer cache_read_input_tokens:integer input_tokens:integer "
        "output_tokens:integer",
    "stromboli_internal_job.CrashInfo":
        "exit_code:integer partial_output:string reason:string signal:string "
        "task_completed:boolean",
    "stromboli_internal_job.Status": "",
    "stromboli_internal_job.Usage":
        "cache_creation_input_tokens:integer cache_read_input_tokens:integer "
        "estimated_cost_usd:number input_tokens:integer model:string output_tokens:integer "
        "total_tokens:integer",
    "stromboli_internal_types.ClaudeOptions":
        "add_dirs:array agent:string agents:object allow_dangerously_skip_permissions:boolean "
        "allowed_tools:array append_system_prompt:string bedrock_service_tier:string betas:array "
        "continue:boolean dangerously_skip_permissions:boolean debug:string "
        "disable_slash_commands:boolean disallowed_tools:array effort:string "
        "enable_powershell_tool:boolean fallback_model:string files:array fork_session:boolean "
        "include_partial_messages:boolean input_format:string json_schema:string "
        "max_budget_usd:number max_turns:integer mcp_configs:array model:string "
        "no_persistence:boolean output_format:string permission_mode:string plugin_dirs:array "
        "prompt_caching_ttl:string replay_user_messages:boolean resume:boolean session_id:string "
        "setting_sources:array settings:string strict_mcp_config:boolean system_prompt:string "
        "tools:array verbose:boolean",
    "stromboli_internal_types.EnvironmentConfig":
        "build_timeout:string path:string service:string type:string",
    "stromboli_internal_types.LifecycleHooks":
        "hooks_timeout:string on_create_command:array post_create:array post_start:array",
    "stromboli_internal_types.PodmanOptions":
        "cpu_shares:integer cpus:string environment:&stromboli_internal_types.EnvironmentConfig "
        "image:string lifecycle:&stromboli_internal_types.LifecycleHooks memory:string "
        "secrets_env:object timeout:string volumes:array",
}


def schema_kind(schema: dict) -> str:
    """A parameter's or property's type in UPSTREAM_*'s notation."""
    if "type" in schema:
        return schema["type"]
    if "$ref" in schema:
        return "#" + schema["$ref"].removeprefix("#/definitions/")
    return "&" + "&".join(s.get("$ref", "?").removeprefix("#/definitions/")
                          for s in schema.get("allOf", []))


def facts(text: str) -> dict[str, str]:
    return dict(fact.split(":", 1) for fact in text.split())


@pytest.mark.fast
def test_served_document_keeps_every_upstream_operation_and_type():
    ours = stromboli.OPENAPI
    for operation, parameters in UPSTREAM_OPERATIONS.items():
        method, path = operation.split(" ")
        mine = ours["paths"][path][method.lower()]
        theirs = facts(parameters)
        assert {p["name"]: p.get("type") or schema_kind(p["schema"])
                for p in mine.get("parameters", []) if p["name"] in theirs} == theirs, operation
    for name, properties in UPSTREAM_DEFINITIONS.items():
        mine = ours["definitions"][name].get("properties") or {}
        for prop_name, kind in facts(properties).items():
            assert schema_kind(mine[prop_name]) == kind, (name, prop_name)


@pytest.mark.fast
def test_route_records_derive_auth_and_body_responses():
    for route in stromboli.ROUTES:
        responses = stromboli.OPENAPI["paths"][route.doc_path][route.method.lower()]["responses"]
        assert ("401" in responses) == (route.access != "public" or route.reads_bearer or
                                        route.path == "/auth/refresh"), route.path
        assert ("413" in responses) == ("415" in responses) == bool(route.body), route.path
        assert route.envelope in ("error", "run", "success", "text")


@pytest.mark.fast
def test_no_content_answers_declare_no_body():
    """A 204 has no body: a schema there makes validating proxies (Prism) turn the real,
    empty answer into an error."""
    no_content = [(path, method, answer)
                  for path, operations in stromboli.OPENAPI["paths"].items()
                  for method, operation in operations.items()
                  for status, answer in operation["responses"].items() if status == "204"]
    assert ("/agents/{id}", "delete", {"description": "No Content"}) in no_content
    assert all("schema" not in answer for _, _, answer in no_content), no_content


def hostile_home(tmp_path: pathlib.Path):
    """A SessionStore with one session home and a root-only folder outside it."""
    store = stromboli.SessionStore(tmp_path / "sessions", tmp_path / "sessions", None, 0)
    sid = str(uuid.uuid4())
    store.ensure(sid)
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    return store, sid, tmp_path / "sessions" / sid, outside


@pytest.mark.fast
def test_safe_home_never_follows_the_agents_links(tmp_path):
    store, sid, home, outside = hostile_home(tmp_path)
    (outside / f"{sid}.jsonl").write_text('{"type":"user","message":{"content":"SECRET"}}\n')
    projects = home / ".claude" / "projects"
    projects.mkdir()
    (projects / "z").mkdir()
    (projects / "z" / f"{sid}.jsonl").symlink_to(outside / f"{sid}.jsonl")
    assert store.transcript(sid) is None  # a linked transcript is absent
    (home / stromboli.INIT_MARKER).symlink_to(outside / "created-by-daemon")
    assert not store.initialized(sid)
    store.mark_initialized(sid)
    assert not (outside / "created-by-daemon").exists() and store.initialized(sid)
    (home / ".claude").rename(home / "moved")
    (home / ".claude").symlink_to(outside)
    store.ensure(sid)
    assert (home / ".claude").is_dir() and not (home / ".claude").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == [f"{sid}.jsonl"]


@pytest.mark.fast
def test_safe_home_resume_does_not_move_into_a_linked_project_folder(tmp_path):
    store, sid, home, outside = hostile_home(tmp_path)
    (home / ".claude" / "projects" / "other").mkdir(parents=True)
    (home / ".claude" / "projects" / "other" / f"{sid}.jsonl").write_text("{}\n")
    (home / ".claude" / "projects" / "-workspace").symlink_to(outside)
    store.relocate(sid, sid, "/workspace")
    assert list(outside.iterdir()) == []
    assert (home / ".claude" / "projects" / "-workspace" / f"{sid}.jsonl").is_file()


@pytest.mark.fast
def test_safe_home_fork_skips_fifos_and_links_and_keeps_the_quota(tmp_path):
    store, sid, home, outside = hostile_home(tmp_path)
    (outside / "private").write_text("root only")
    os.mkfifo(home / "pipe")
    (home / "link").symlink_to(outside / "private")
    (home / "work").mkdir()
    (home / "work" / "notes.txt").write_text("mine")
    fork = str(uuid.uuid4())
    store.fork(sid, fork)
    copy = tmp_path / "sessions" / fork
    assert (copy / "work" / "notes.txt").read_text() == "mine"
    assert not os.path.lexists(copy / "pipe") and not os.path.lexists(copy / "link")
    small = stromboli.SessionStore(tmp_path / "sessions", tmp_path / "sessions", None, 2)
    with pytest.raises(stromboli.HomeError):
        small.fork(sid, str(uuid.uuid4()))
    assert sorted(p.name for p in (tmp_path / "sessions").iterdir()) == sorted([sid, fork])
    assert "over its quota" in small.over_quota(sid)


@pytest.mark.fast
def test_safe_home_deletes_a_deep_home_without_following_links(tmp_path):
    store, sid, home, outside = hostile_home(tmp_path)
    (outside / "keep").write_text("root only")
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    for depth in range(1200):  # past Python's recursion limit (1000)
        os.mkdir("d", dir_fd=fd)
        if depth % 100 == 0:
            os.symlink(outside, "link", dir_fd=fd)
            os.symlink(outside / "keep", f".stromboli-removing-{depth // 100}", dir_fd=fd)
        fd, parent = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(parent)
    os.close(fd)
    store.delete(sid)
    assert not os.path.lexists(home)
    assert (outside / "keep").read_text() == "root only"


@pytest.mark.fast
def test_a_measured_home_counts_blocks_and_entries_not_sizes(tmp_path):
    store, sid, home, _ = hostile_home(tmp_path)
    empty = store.size(sid)
    with open(home / "sparse", "wb") as f:
        f.truncate(1024 ** 3)  # 1 GiB that takes no block
    assert store.size(sid) - empty < 4096
    with open(home / "hidden", "wb") as f:  # fallocate --keep-size: blocks, no size
        subprocess.run(["fallocate", "--keep-size", "-l", "8M", f.name], check=True)
    assert os.path.getsize(home / "hidden") == 0
    assert store.size(sid) - empty >= 8 * 1024 ** 2
    before = store.size(sid)
    for i in range(1000):
        os.symlink("x", home / f"link{i}")
    assert store.size(sid) - before >= 1000 * stromboli.ENTRY_BYTES


@pytest.mark.fast
def test_volume_host_paths_are_opened_without_following_links(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "real" / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "link").symlink_to(outside)
    (allowed / "file").write_text("x")
    cfg = stromboli.Config(agent_allowed_volumes=(str(allowed),))

    def volume(path: pathlib.Path) -> stromboli.Volume:  # the parse: the path's letters only
        return stromboli.check_volume(cfg, f"{path}:/data")

    fd = stromboli.open_volume(cfg, volume(allowed / "real" / "sub"))
    assert os.fstat(fd).st_ino == (allowed / "real" / "sub").stat().st_ino
    os.close(fd)
    refused = {allowed / "link" / "x": "goes through a symbolic link",
               allowed / "link": "goes through a symbolic link",
               allowed / "real" / "missing": "does not exist",
               allowed / "file" / "x": "is not a folder"}
    for path, message in refused.items():
        with pytest.raises(stromboli.BadRequest, match=message):
            stromboli.open_volume(cfg, volume(path))
    with pytest.raises(stromboli.BadRequest, match="is not in allowed directories"):
        volume(allowed / ".." / "outside")
    stromboli.make_volume_dirs(cfg, [volume(allowed / "new" / "deep")])
    assert stat.S_IMODE((allowed / "new" / "deep").stat().st_mode) == 0o755
    with pytest.raises(stromboli.BadRequest, match="goes through a symbolic link"):
        stromboli.make_volume_dirs(cfg, [volume(allowed / "link" / "made")])
    assert not (outside / "made").exists()
    # Of nested allowed folders the outermost: the link inside it is opened as a link.
    nested = stromboli.Config(agent_allowed_volumes=(str(allowed / "link"), str(allowed)))
    assert stromboli.volume_root(nested, str(allowed / "link" / "x")) == \
        (str(allowed), ["link", "x"])


@pytest.mark.fast
def test_volume_targets_that_shadow_the_image_are_refused():
    cfg = stromboli.Config(agent_allow_all_volumes=True)
    for target in ("/", "/usr", "/usr/lib", "/lib64", "/opt", "/opt/claude", "/home",
                   "/home/user", "/etc/x", "//usr"):
        with pytest.raises(stromboli.BadRequest):
            stromboli.check_volume(cfg, f"/tmp:{target}")
    for bad in ("/tmp:/data:U", "/tmp:/data:ro,U", "/t\0mp:/data"):
        with pytest.raises(stromboli.BadRequest):
            stromboli.check_volume(cfg, bad)
    assert stromboli.check_volume(cfg, "/tmp:/home/user/project:ro")[1] == "/home/user/project"
    assert stromboli.check_volume(cfg, "/tmp:/opt/tools")[1] == "/opt/tools"


@pytest.mark.fast
def test_request_parser_names_unknown_podman_options():
    cfg = stromboli.Config()
    for key in ("privileged", "cap_add", "devices", "security_opt", "user", "mounts"):
        with pytest.raises(stromboli.BadRequest, match=f'unknown podman option "{key}"'):
            stromboli.RunRequest.parse({"prompt": "x", "podman": {key: True}}, cfg)


# -- option → argv mapping --------------------------------------------------------

@pytest.mark.fast
def test_claude_argv_maps_every_flag_kind_in_table_order():
    options = {"no_persistence": True, "model": "opus", "tools": ["Bash", "Read"],
               "allowed_tools": ["Bash(git:*)", "Read"], "dangerously_skip_permissions": False,
               "json_schema": {"type": "object"}, "max_budget_usd": 1.5, "max_turns": 7,
               "agents": {"rev": {"description": "d"}}, "add_dirs": [], "settings": "",
               "setting_sources": ["user"], "debug": True, "disable_slash_commands": True}
    assert stromboli.claude_argv(options, ["--session-id", "s"]) == [
        "claude", "-p", "--session-id", "s", "--no-session-persistence", "--model", "opus",
        "--tools", "Bash", "Read", "--allowedTools", "Bash(git:*),Read",
        "--json-schema", '{"type": "object"}', "--max-budget-usd", "1.50", "--max-turns", "7",
        "--agents", '{"rev": {"description": "d"}}', "--setting-sources", "user", "--debug",
        "--disable-slash-commands"]
    argv = stromboli.claude_argv({"json_schema": '{"type":"string"}', "debug": "api,hooks",
                                  "max_budget_usd": 3, "max_turns": 0}, [])
    assert argv == ["claude", "-p", "--json-schema", '{"type":"string"}',
                    "--max-budget-usd", "3.00", "--max-turns", "0", "--debug", "api,hooks"]
    assert stromboli.claude_argv({}, []) == ["claude", "-p"]


@pytest.mark.fast
def test_stream_json_output_adds_verbose_once():
    argv = stromboli.claude_argv({"output_format": "stream-json"}, [])
    assert argv == ["claude", "-p", "--output-format", "stream-json", "--verbose"]
    argv = stromboli.claude_argv({"output_format": "stream-json", "verbose": True}, [])
    assert argv.count("--verbose") == 1
    assert "--verbose" not in stromboli.claude_argv({"output_format": "json"}, [])


@pytest.mark.fast
def test_session_plans_give_the_cli_the_flags_it_accepts():
    sid, other = str(uuid.uuid4()), str(uuid.uuid4())
    new = stromboli.SessionPlan.of({"session_id": sid})
    assert (new.mode, new.argv()) == ("new", ["--session-id", sid])
    fresh = stromboli.SessionPlan.of({})
    assert fresh.mode == "new" and stromboli.UUID_RE.match(fresh.session_id)
    resume = stromboli.SessionPlan.of({"session_id": sid, "resume": True})
    assert (resume.mode, resume.argv()) == ("resume", ["--resume", sid])
    cont = stromboli.SessionPlan.of({"session_id": sid, "continue": True, "resume": True})
    assert (cont.mode, cont.argv()) == ("continue", ["--continue"])
    fork = stromboli.SessionPlan.of({"session_id": sid, "fork_session": True, "resume": True},
                                    fork_id=other)
    assert (fork.mode, fork.source) == ("fork", sid)
    assert fork.argv() == ["--resume", sid, "--fork-session", "--session-id", other]
    assert stromboli.SessionPlan.of({"session_id": sid, "fork_session": True}).session_id != sid
    for flag in ("resume", "continue", "fork_session"):
        with pytest.raises(stromboli.BadRequest, match="need claude.session_id"):
            stromboli.SessionPlan.of({flag: True})
    argv = stromboli.claude_argv({"model": "haiku"}, resume.argv())
    assert argv == ["claude", "-p", "--resume", sid, "--model", "haiku"]


@pytest.mark.fast
def test_claude_env_carries_the_env_options():
    assert stromboli.claude_env({}) == {}
    assert stromboli.claude_env({"prompt_caching_ttl": "1h"}) == {"ENABLE_PROMPT_CACHING_1H": "1"}
    assert stromboli.claude_env({"prompt_caching_ttl": "5m", "bedrock_service_tier": "flex",
                                 "enable_powershell_tool": True}) == {
        "FORCE_PROMPT_CACHING_5M": "1", "ANTHROPIC_BEDROCK_SERVICE_TIER": "flex",
        "CLAUDE_CODE_USE_POWERSHELL_TOOL": "1"}
    assert stromboli.claude_env({"prompt_caching_ttl": "2h", "enable_powershell_tool": False}) == {}


# -- request validation -----------------------------------------------------------

REQUIRED_PROMPT = ("Invalid request: Key: 'RunRequest.Prompt' Error:Field validation for 'Prompt' "
                   "failed on the 'required' tag")
BAD_BODIES = [
    ("not an object", ["prompt"], "Invalid request: body must be a JSON object"),
    ("no prompt", {}, REQUIRED_PROMPT),
    ("blank prompt", {"prompt": " \n\t"}, REQUIRED_PROMPT),
    ("prompt not a string", {"prompt": 5}, REQUIRED_PROMPT),
    ("NUL in prompt", {"prompt": "a\0b"},
     "Invalid request: prompt must not contain NUL characters"),
]
BAD_FIELDS = [  # beside a valid prompt
    ("workdir type", {"workdir": 5}, "Invalid request: workdir must be a string"),
    ("webhook type", {"webhook_url": ["x"]}, "Invalid request: webhook_url must be a string"),
    ("webhook scheme", {"webhook_url": "ftp://host/x"},
     "Invalid request: webhook_url must be an http(s) URL"),
    ("claude type", {"claude": ["model"]}, "Invalid request: claude must be an object"),
    ("bool", {"claude": {"no_persistence": "yes"}},
     "Invalid request: claude.no_persistence must be a boolean"),
    ("str", {"claude": {"model": 3}}, "Invalid request: claude.model must be a string"),
    ("multi", {"claude": {"tools": "Bash"}},
     "Invalid request: claude.tools must be an array of strings"),
    ("multi items", {"claude": {"add_dirs": ["/a", 1]}},
     "Invalid request: claude.add_dirs must be an array of strings"),
    ("joined", {"claude": {"allowed_tools": "Read"}},
     "Invalid request: claude.allowed_tools must be an array of strings"),
    ("int from bool", {"claude": {"max_turns": True}},
     "Invalid request: claude.max_turns must be an integer"),
    ("int from float", {"claude": {"max_turns": 1.5}},
     "Invalid request: claude.max_turns must be an integer"),
    ("budget", {"claude": {"max_budget_usd": "5"}},
     "Invalid request: claude.max_budget_usd must be a number"),
    ("json_text", {"claude": {"json_schema": 5}},
     "Invalid request: claude.json_schema must be a JSON string"),
    ("object", {"claude": {"agents": []}}, "Invalid request: claude.agents must be an object"),
    ("debug", {"claude": {"debug": 1}}, "Invalid request: claude.debug must be a string"),
    ("session flag", {"claude": {"resume": "true"}},
     "Invalid request: claude.resume must be a boolean"),
    ("output choice", {"claude": {"output_format": "xml"}},
     "Invalid request: claude.output_format must be one of text, json, stream-json"),
    ("input choice", {"claude": {"input_format": "json"}},
     "Invalid request: claude.input_format must be one of text, stream-json"),
    ("max_turns < 0", {"claude": {"max_turns": -1}},
     "Invalid request: claude.max_turns must be between 0 and 10000"),
    ("max_turns > 10000", {"claude": {"max_turns": 10001}},
     "Invalid request: claude.max_turns must be between 0 and 10000"),
    ("budget < 0", {"claude": {"max_budget_usd": -0.01}},
     "Invalid request: claude.max_budget_usd must be between 0 and 1e+06"),
    ("budget > 1e6", {"claude": {"max_budget_usd": 1e6 + 1}},
     "Invalid request: claude.max_budget_usd must be between 0 and 1e+06"),
    ("budget NaN", {"claude": {"max_budget_usd": float("nan")}},
     "Invalid request: claude.max_budget_usd must be between 0 and 1e+06"),
    ("budget inf", {"claude": {"max_budget_usd": float("inf")}},
     "Invalid request: claude.max_budget_usd must be between 0 and 1e+06"),
    ("session id form", {"claude": {"session_id": "not-a-uuid"}},
     "invalid session ID: must be a lowercase UUID"),
    ("session id case", {"claude": {"session_id": str(uuid.uuid4()).upper()}},
     "invalid session ID: must be a lowercase UUID"),
    ("session id path", {"claude": {"session_id": "../" + str(uuid.uuid4())}},
     "invalid session ID: must be a lowercase UUID"),
    ("resume without id", {"claude": {"resume": True}},
     ("Invalid request: claude.resume, claude.continue and claude.fork_session need "
      "claude.session_id")),
    ("podman type", {"podman": "big"}, "Invalid request: podman must be an object"),
    ("podman unknown", {"podman": {"network": "host"}},
     'Invalid request: unknown podman option "network"'),
    ("podman str", {"podman": {"cpus": 2}}, "Invalid request: podman.cpus must be a string"),
    ("podman map", {"podman": {"secrets_env": {"A": 1}}},
     "Invalid request: podman.secrets_env must be an object of strings"),
    ("cpu_shares low", {"podman": {"cpu_shares": 1}},
     "Invalid request: podman.cpu_shares must be between 2 and 262144"),
    ("cpu_shares high", {"podman": {"cpu_shares": 262145}},
     "Invalid request: podman.cpu_shares must be between 2 and 262144"),
    ("cpu_shares bool", {"podman": {"cpu_shares": True}},
     "Invalid request: podman.cpu_shares must be an integer"),
    ("memory syntax", {"podman": {"memory": "1x"}},
     "Invalid request: podman.memory: invalid memory value '1x' (use e.g. 512m, 2g)"),
    ("memory 40 digits", {"podman": {"memory": "9" * 40}},
     f"Invalid request: podman.memory: invalid memory value '{'9' * 40}' (use e.g. 512m, 2g)"),
    ("memory small", {"podman": {"memory": "5m"}},
     "Invalid request: podman.memory: memory value '5m' is below Podman's minimum of 6m"),
    ("memory large", {"podman": {"memory": "1025g"}},
     "Invalid request: podman.memory: memory value '1025g' is above 1024g"),
    ("cpus range", {"podman": {"cpus": "0"}},
     "Invalid request: podman.cpus: cpus value '0' must be between 0.01 and 1024"),
    ("cpus NaN", {"podman": {"cpus": "nan"}},
     "Invalid request: podman.cpus: cpus value 'nan' must be between 0.01 and 1024"),
    ("timeout syntax", {"podman": {"timeout": "5 minutes"}},
     ("Invalid request: podman.timeout: invalid duration '5 minutes' (use Go syntax such as "
      "30s, 5m, 1h)")),
    ("timeout zero", {"podman": {"timeout": "0s"}}, "invalid timeout duration: must be > 0"),
    ("timeout > 168h", {"podman": {"timeout": "168h1s"}},
     "invalid timeout duration: must be at most 168h"),
    ("compose", {"podman": {"environment": {"type": "compose"}}},
     "compose environments are not supported by this server"),
    ("environment key", {"podman": {"environment": {"image": "x"}}},
     'Invalid request: unknown podman.environment key "image" (known: type, path, service, '
     'build_timeout)'),
    ("environment value", {"podman": {"environment": {"service": ["dev"]}}},
     "Invalid request: podman.environment.service must be a string"),
    ("workdir relative", {"workdir": "work"},
     "workdir validation failed: workdir must be an absolute path starting with /"),
    ("workdir traversal", {"workdir": "/work/../etc"},
     "workdir validation failed: workdir cannot contain path traversal (..) sequences"),
    ("workdir characters", {"workdir": "/work dir"},
     ("workdir validation failed: workdir contains invalid characters (only alphanumeric, /, "
      "_, ., - allowed)")),
    ("workdir length", {"workdir": "/" + "a" * 4096},
     "workdir validation failed: workdir path too long (max 4096 characters)"),
]
BAD_REQUESTS = BAD_BODIES + [(name, {"prompt": "hello", **fields}, message)
                             for name, fields, message in BAD_FIELDS]


@pytest.mark.fast
@pytest.mark.parametrize("body, message", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_run_request_is_refused_with_its_message(body, message):
    with pytest.raises(stromboli.BadRequest) as refused:
        stromboli.RunRequest.parse(body, stromboli.Config())
    assert refused.value.message == message
    assert refused.value.status == 400


@pytest.mark.fast
def test_run_request_keeps_valid_options_and_drops_unknown_and_empty_ones():
    sid = str(uuid.uuid4())
    req = stromboli.RunRequest.parse({
        "prompt": "hi", "workdir": "/work/sub_dir-1.x", "webhook_url": "https://hooks.example/x",
        "claude": {"model": "opus", "session_id": sid, "resume": True, "max_turns": 0,
                   "max_budget_usd": 1e6, "debug": True, "json_schema": {"type": "object"},
                   "output_format": None, "not_an_option": 1},
        "podman": {"timeout": "168h", "memory": "6m", "cpus": "0.01", "cpu_shares": 262144,
                   "image": "", "lifecycle": None,
                   "environment": {"type": "", "path": "/x.yml", "service": None}}},
        stromboli.Config())
    assert req.claude == {"model": "opus", "session_id": sid, "resume": True, "max_turns": 0,
                          "max_budget_usd": 1e6, "debug": True, "json_schema": {"type": "object"}}
    assert req.podman == {"timeout": "168h", "memory": "6m", "cpus": "0.01", "cpu_shares": 262144}
    assert (req.workdir, req.webhook_url) == ("/work/sub_dir-1.x", "https://hooks.example/x")
    assert stromboli.RunRequest.parse({"prompt": "p", "claude": None, "podman": None},
                                      stromboli.Config()).to_json() == {
        "prompt": "p", "workdir": "", "webhook_url": "", "claude": {}, "podman": {}}


# -- durations, sizes, memory, cpus -----------------------------------------------

@pytest.mark.fast
def test_parse_duration_reads_go_durations():
    for text, seconds in (("0", 0), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5),
                          ("1.5s", 1.5), ("2h45m30s", 9930), ("250us", 0.00025),
                          ("250µs", 0.00025), ("10ns", 1e-8), (" 1m ", 60)):
        assert stromboli.parse_duration(text) == pytest.approx(seconds), text
    for bad in ("", "5", "1d", "m5", "5m x", "-5s", "5s5", "1h 30m", "1e3s", "s"):
        with pytest.raises(ValueError, match="invalid duration"):
            stromboli.parse_duration(bad)


@pytest.mark.fast
def test_format_duration_is_the_shortest_go_form_and_round_trips():
    assert [stromboli.format_duration(s) for s in (0, 0.5, 45, 90, 120, 3600, 5400, 86400)] == \
        ["0s", "0.5s", "45s", "90s", "2m", "1h", "90m", "24h"]
    for seconds in (0.25, 1, 59, 60, 61, 3599, 3600, 7200, 604800):
        assert stromboli.parse_duration(stromboli.format_duration(seconds)) == seconds


@pytest.mark.fast
def test_parse_memory_bounds_and_units():
    assert stromboli.parse_memory("512m") == 512 * 1024 ** 2
    assert stromboli.parse_memory(" 2G ") == 2 * 1024 ** 3
    assert stromboli.parse_memory("6m") == 6 * 1024 ** 2
    assert stromboli.parse_memory("6291456") == 6 * 1024 ** 2
    assert stromboli.parse_memory("1024g") == 1024 ** 4
    for bad, message in (("1x", "invalid memory value"), ("1.5g", "invalid memory value"),
                         ("1t", "invalid memory value"), ("", "invalid memory value"),
                         ("-1g", "invalid memory value"), ("9" * 40, "invalid memory value"),
                         ("9" * 40 + "g", "invalid memory value"), ("5m", "below Podman's minimum"),
                         ("6291455", "below Podman's minimum"), ("1025g", "above 1024g")):
        with pytest.raises(ValueError, match=message):
            stromboli.parse_memory(bad)


@pytest.mark.fast
def test_parse_cpus_range():
    assert [stromboli.parse_cpus(t) for t in ("0.01", "0.5", " 2 ", "1024")] == [0.01, 0.5, 2, 1024]
    for bad, message in (("0", "must be between"), ("0.009", "must be between"),
                         ("1025", "must be between"), ("-1", "must be between"),
                         ("nan", "must be between"), ("inf", "must be between"),
                         ("two", "invalid cpus value"), ("", "invalid cpus value")):
        with pytest.raises(ValueError, match=message):
            stromboli.parse_cpus(bad)


@pytest.mark.fast
def test_sizes_parse_and_format():
    assert [stromboli.parse_size(t) for t in ("512", "64k", "16M", "1g", 2048)] == \
        [512, 65536, 16 * 1024 ** 2, 1024 ** 3, 2048]
    for bad in ("1.5m", "1t", "-1", "", "k", "1" * 16):
        with pytest.raises(ValueError, match="invalid size"):
            stromboli.parse_size(bad)
    assert [stromboli.format_size(n) for n in (0, 512, 1536, 1024 ** 2, 3 * 1024 ** 3 // 2,
                                                3 * 1024 ** 3, 2048 * 1024 ** 3)] == \
        ["0 B", "512 B", "1.5 KiB", "1.0 MiB", "1.5 GiB", "3.0 GiB", "2048.0 GiB"]


# -- configuration: precedence, unknown keys, validation ----------------------------

@pytest.mark.fast
def test_config_load_precedence_defaults_file_env_overrides(tmp_path):
    config = tmp_path / "stromboli.toml"
    config.write_text('[server]\nmax_concurrent_runs = 3\n'
                      '[resources]\nmemory = "1g"\ncpus = "2"\ntimeout = "10m"\n'
                      '[agent]\nallowed_volumes = ["/srv", "/data"]\n[agent.env]\nA = "1"\n')
    environ = {"STROMBOLI_RESOURCES_CPUS": "3", "STROMBOLI_DEFAULT_CPUS": "4",
               "STROMBOLI_DEFAULT_TIMEOUT": "20m", "STROMBOLI_RESOURCES_MEMORY": "",
               "STROMBOLI_LOG_LEVEL": "debug"}
    cfg = stromboli.Config.load(str(config), {"resources.timeout": "5m"}, environ)
    assert cfg.resources_memory == "1g"          # the file (an empty variable is unset)
    assert cfg.resources_cpus == "3"             # env beats the file; the first name its alias
    assert cfg.resources_timeout == 300          # the override beats env and file
    assert cfg.log_level == "debug"              # env beats the default
    assert cfg.max_concurrent_runs == 3          # the file beats the default
    assert cfg.agent_allowed_volumes == ("/srv", "/data") and cfg.agent_env == (("A", "1"),)
    assert cfg.server_address == stromboli.Config().server_address == ":8080"  # the default
    assert stromboli.Config.load(str(config), None, environ).resources_timeout == 1200
    from_file = stromboli.Config.load(None, None, {"STROMBOLI_CONFIG": str(config)})
    assert (from_file.resources_cpus, from_file.resources_timeout) == ("2", 600)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert stromboli.Config.load(str(empty), None, {}) == stromboli.Config()


@pytest.mark.fast
def test_config_load_reads_the_jwt_credential_below_the_variable(tmp_path):
    (tmp_path / "jwt-secret").write_text(JWT_SECRET + "\n")
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert stromboli.Config.load(str(empty), None, environ).jwt_secret == JWT_SECRET
    environ["STROMBOLI_JWT_SECRET"] = "from-the-variable-" + "x" * 32
    assert stromboli.Config.load(str(empty), None, environ).jwt_secret == environ[
        "STROMBOLI_JWT_SECRET"]


@pytest.mark.fast
def test_config_load_names_the_source_of_a_bad_value(tmp_path):
    config = tmp_path / "stromboli.toml"
    config.write_text('[resources]\ntimeout = "soon"\n')
    with pytest.raises(stromboli.ConfigError, match=r"^resources\.timeout in the config file: "
                                                    r"invalid duration 'soon'"):
        stromboli.Config.load(str(config), None, {})
    config.write_text("")
    with pytest.raises(stromboli.ConfigError,
                       match=r"^STROMBOLI_RATE_LIMIT_BURST: invalid literal"):
        stromboli.Config.load(str(config), None, {"STROMBOLI_RATE_LIMIT_BURST": "many"})
    with pytest.raises(stromboli.ConfigError,
                       match=r"^--set auth\.enabled: invalid boolean 'maybe'$"):
        stromboli.Config.load(str(config), {"auth.enabled": "maybe"}, {})
    with pytest.raises(stromboli.ConfigError, match=r"^STROMBOLI_AGENT_ENV: invalid KEY=VALUE pair "
                                                    r"\(entry 2, key 'NOVALUE'\)$"):
        stromboli.Config.load(str(config), None, {"STROMBOLI_AGENT_ENV": "A=1,NOVALUE"})


@pytest.mark.fast
def test_config_file_with_unknown_keys_or_bad_toml_is_refused(tmp_path):
    config = tmp_path / "stromboli.toml"
    config.write_text('[server]\nadress = ":80"\nmax_body_bytes = 1\n[nope]\nx = 1\n')
    with pytest.raises(stromboli.ConfigError) as refused:
        stromboli.Config.load(str(config), None, {})
    assert str(refused.value) == f"config file {config}: unknown keys: nope.x, server.adress"
    config.write_text("[server\n")
    with pytest.raises(stromboli.ConfigError, match=f"^config file {re.escape(str(config))}: "):
        stromboli.Config.load(str(config), None, {})
    with pytest.raises(stromboli.ConfigError, match="^cannot read config file .*missing.toml: "
                                                    "No such file or directory$"):
        stromboli.Config.load(str(tmp_path / "missing.toml"), None, {})


@pytest.mark.fast
def test_config_validate_messages():
    hint = "generate one with: openssl rand -base64 32"
    assert stromboli.Config(jwt_secret=JWT_SECRET).validate() == []
    assert stromboli.Config(auth_enabled=False).validate() == []
    assert stromboli.Config().validate() == [
        f"auth is enabled but STROMBOLI_JWT_SECRET is empty — {hint}"]
    assert stromboli.Config(jwt_secret="  short  ").validate() == [
        f"STROMBOLI_JWT_SECRET is too short (5 chars, need at least 32) — {hint}"]
    assert stromboli.Config(jwt_secret="INSECURE-secret-do-not-use-in-prod").validate() == [
        f"STROMBOLI_JWT_SECRET is a known placeholder value — {hint}"]
    assert stromboli.Config(jwt_secret=JWT_SECRET, jwt_refresh_expiry=0).validate() == [
        "JWT access and refresh expiry must be > 0"]
    broken = stromboli.Config(
        auth_enabled=False, rate_limit_enabled=True, rate_limit_rate=0, auth_failure_burst=0,
        server_header_timeout=0, jobs_cleanup_ttl=0, max_concurrent_runs=-1, log_format="xml",
        resources_memory="1x", resources_cpus="0", resources_timeout=0, agent_max_line=100,
        agent_userns_base=-1, server_address="nohost", metrics_address="127.0.0.1:99999")
    assert broken.validate() == [
        "rate limit rate and burst must be > 0", "auth failure rate and burst must be > 0",
        "server timeouts must be > 0 and max_connections >= 1",
        "jobs cleanup TTL and interval must be > 0", "STROMBOLI_MAX_CONCURRENT_RUNS must be >= 0",
        "STROMBOLI_LOG_FORMAT must be json or text",
        "resources: invalid memory value '1x' (use e.g. 512m, 2g)",
        "resources: cpus value '0' must be between 0.01 and 1024",
        "resources timeout must be > 0", "agent max_line must be >= 1k and max_output >= max_line",
        "agent userns_base must be between 0 and 4294901758",
        "server address: invalid address 'nohost' (use host:port or :port)",
        "metrics address: invalid address '127.0.0.1:99999' (use host:port or :port)"]


@pytest.mark.fast
def test_config_validates_the_session_filesystem_and_the_tmp_size():
    def problems(**settings):
        return stromboli.Config(auth_enabled=False, **settings).validate()
    assert problems(agent_session_filesystem="zfs") == [
        "agent session_filesystem must be auto, loop or plain"]
    assert problems(agent_session_filesystem="loop", agent_session_quota=0) == [
        "agent session_filesystem loop needs a session_quota of at least 1m (the size of each "
        "home's filesystem)"]
    assert problems(agent_tmp_size=4096) == ["agent tmp_size must be >= 1m"]
    assert problems(agent_session_filesystem="plain", agent_session_quota=0) == []


# -- rate limiting ----------------------------------------------------------------

@pytest.mark.fast
def test_token_bucket_spends_refills_and_caps_at_the_burst():
    bucket = stromboli.TokenBucket(2, now=100.0)
    assert [bucket.take(1.0, 2, 100.0) for _ in range(3)] == [True, True, False]
    assert bucket.wait(1.0) == 1 and bucket.wait(0.25) == 4
    assert not bucket.take(1.0, 2, 100.5)          # half a token
    assert bucket.tokens == pytest.approx(0.5) and bucket.wait(0.25) == 2
    assert bucket.take(1.0, 2, 101.0)
    bucket.refill(1.0, 2, 1000.0)                  # a long idle time refills only the burst
    assert bucket.tokens == 2


@pytest.mark.fast
def test_buckets_evict_the_least_recent_and_the_idle():
    buckets = stromboli.Buckets(1.0, 1, max_clients=3)
    for ip in ("a", "b", "c"):
        buckets.get(ip, 0.0).take(1.0, 1, 0.0)
    assert buckets.get("a", 1.0) is buckets.table["a"]  # seen again: most recent now
    buckets.get("d", 1.0)
    assert list(buckets.table) == ["c", "a", "d"] and len(buckets) == 3
    buckets.get("e", 1.0 + stromboli.Buckets.IDLE_SECONDS + 1)  # all others idle too long
    assert list(buckets.table) == ["e"]


@pytest.mark.fast
def test_rate_limiter_check_counts_down_and_says_when_to_retry():
    limiter = stromboli.RateLimiter(stromboli.Config(rate_limit_rate=0.5, rate_limit_burst=2))
    first, second, third = (limiter.check("192.0.2.1") for _ in range(3))
    assert first[0] and first[1]["X-RateLimit-Remaining"] == "1"
    assert first[1]["X-RateLimit-Limit"] == "0.5" and "Retry-After" not in first[1]
    assert second[0] and second[1]["X-RateLimit-Remaining"] == "0"
    assert not third[0] and third[1]["X-RateLimit-Remaining"] == "0"
    assert third[1]["Retry-After"] == "2"
    assert limiter.check("192.0.2.2")[0]  # another client has its own bucket


class FakePeer:
    """What RateLimiter.client_ip reads of a request."""

    def __init__(self, remote: str, **headers: str):
        self.remote = remote
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}


@pytest.mark.fast
def test_client_ip_is_the_rightmost_untrusted_forwarded_address():
    limiter = stromboli.RateLimiter(stromboli.Config(
        rate_limit_trusted_proxies=("10.0.0.0/8", "::1", "not-a-network")))
    ip = limiter.client_ip
    assert ip(FakePeer("203.0.113.5", X_Forwarded_For="198.51.100.1")) == "203.0.113.5"
    assert ip(FakePeer("203.0.113.5", X_Real_IP="198.51.100.1")) == "203.0.113.5"
    assert ip(FakePeer("10.0.0.2")) == "10.0.0.2"
    forged = "6.6.6.6, 198.51.100.7, 10.0.0.9"  # the client wrote 6.6.6.6 itself
    assert ip(FakePeer("10.0.0.2", X_Forwarded_For=forged)) == "198.51.100.7"
    assert ip(FakePeer("10.0.0.2", X_Forwarded_For="198.51.100.7:8080, junk, ")) == "198.51.100.7"
    assert ip(FakePeer("::1", X_Forwarded_For="[2001:db8::1]:443")) == "2001:db8::1"
    all_trusted = "10.0.0.5, 10.0.0.6"
    assert ip(FakePeer("10.0.0.2", X_Forwarded_For=all_trusted, X_Real_IP="192.0.2.9")) == \
        "192.0.2.9"
    assert ip(FakePeer("10.0.0.2", X_Forwarded_For=all_trusted)) == "10.0.0.5"
    assert ip(FakePeer("10.0.0.2", X_Forwarded_For="junk", X_Real_IP="junk")) == "10.0.0.2"
    assert [str(n) for n in limiter.trusted] == ["10.0.0.0/8", "::1/128"]


@pytest.mark.fast
def test_failure_budget_blocks_an_ip_until_it_refills():
    budget = stromboli.FailureBudget(0.25, 3, 100)
    assert budget.blocked("192.0.2.1") == 0
    for _ in range(2):
        budget.spend("192.0.2.1")
    assert budget.blocked("192.0.2.1") == 0  # one failure left
    budget.spend("192.0.2.1")
    assert 3 <= budget.blocked("192.0.2.1") <= 4  # a token comes back every 4 s
    assert budget.blocked("192.0.2.2") == 0 and "192.0.2.2" not in budget.table
    budget.table["192.0.2.1"].stamp -= 4.1  # as if 4.1 s had passed
    assert budget.blocked("192.0.2.1") == 0


# -- metrics ------------------------------------------------------------------------

PROMETHEUS_SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})?'
    r' (-?(?:\d+(?:\.\d*)?(?:e[+-]?\d+)?|NaN|\+Inf|-Inf))$')


def prometheus_samples(text: str) -> dict[str, float]:
    """{series: value} of a text-format exposition, checked by promtool when it is on PATH
    and line by line here: a sample belongs to the family of the last # TYPE line."""
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text, check=False,
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    assert text.endswith("\n")
    samples, family, kind = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram)$", line):
            family, kind = m.groups()
            continue
        if line.startswith("# HELP "):
            continue
        m = PROMETHEUS_SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        assert m.group(1) in {family + s for s in suffixes}, line
        assert m.group(1) + (m.group(2) or "") not in samples, f"duplicate series: {line}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


@pytest.mark.fast
def test_metrics_render_prometheus_text_and_counters_move():
    metrics = stromboli.Metrics()
    metrics.gauges["stromboli_test_level"] = ("A gauge read at render time.", lambda: 2.5)
    before = prometheus_samples(metrics.render({}))
    assert before["active_containers"] == 0 and before["stromboli_test_level"] == 2.5
    assert before['stromboli_jobs{state="pending"}'] == 0
    assert not any(k.startswith(("http_requests_total{", "stromboli_runs_total{")) for k in before)
    odd = 'a"b\\c\nd'  # label values are escaped
    for seconds in (0.02, 3, 0.02):
        metrics.request("GET", "/jobs/{id}", 200, seconds)
    metrics.request("POST", odd, 404, 0.001)
    metrics.run_finished(4)
    metrics.run_status("completed")
    metrics.run_status("completed")
    metrics.rate_limited += 1
    metrics.active_containers = 2
    after = prometheus_samples(metrics.render({"running": 1, "completed": 5}))
    series = 'method="GET",path="/jobs/{id}"'
    assert after[f'http_requests_total{{{series},status="200"}}'] == 3
    assert after['http_requests_total{method="POST",path="a\\"b\\\\c\\nd",status="404"}'] == 1
    assert after[f'http_request_duration_seconds_bucket{{{series},le="0.01"}}'] == 0
    assert after[f'http_request_duration_seconds_bucket{{{series},le="0.025"}}'] == 2
    assert after[f'http_request_duration_seconds_bucket{{{series},le="5"}}'] == 3
    assert after[f'http_request_duration_seconds_bucket{{{series},le="+Inf"}}'] == 3
    assert after[f"http_request_duration_seconds_count{{{series}}}"] == 3
    assert after[f"http_request_duration_seconds_sum{{{series}}}"] == pytest.approx(3.04)
    assert after['stromboli_run_duration_seconds_bucket{le="2"}'] == 0
    assert after['stromboli_run_duration_seconds_bucket{le="5"}'] == 1
    assert after["stromboli_run_duration_seconds_count"] == 1
    assert after['stromboli_runs_total{status="completed"}'] == 2
    assert after['stromboli_jobs{state="running"}'] == 1
    assert after['stromboli_jobs{state="completed"}'] == 5
    assert after["stromboli_rate_limited_total"] == 1 and after["active_containers"] == 2
    buckets: dict[str, list[float]] = {}  # cumulative: never decreasing towards +Inf
    for key, value in after.items():
        if m := re.match(r'^(\w+_bucket)\{(.*?),?le="[^"]+"\}$', key):
            buckets.setdefault(m.group(1) + m.group(2), []).append(value)
    assert len(buckets) == 3 and all(v == sorted(v) for v in buckets.values())


# -- transcripts --------------------------------------------------------------------

def transcript(*lines: str | bytes, end: bytes = b"\n") -> io.BytesIO:
    data = b"\n".join(line.encode() if isinstance(line, str) else line for line in lines)
    return io.BytesIO(data + end)


HUGE_LINE = json.dumps({"type": "summary", "summary": "x" * (stromboli.MAX_TRANSCRIPT_LINE + 10)})


@pytest.mark.fast
def test_read_transcript_skips_broken_partial_non_object_and_huge_lines():
    fh = transcript('{"n": 1}', '{"n": 2', "[1, 2]", "5", '"text"', "", "   ", "null",
                    b'{"n": "\xff"}', HUGE_LINE, '  {"n": 3}  ', "{not json}",
                    '{"n": 4}', '{"n": 5', end=b"")  # the last line is cut short
    assert [line["n"] for line in stromboli.read_transcript(fh)] == [1, 3, 4]
    assert list(stromboli.read_transcript(io.BytesIO(b""))) == []
    assert [x["n"] for x in stromboli.read_transcript(transcript('{"n": 6}', end=b""))] == [6]


@pytest.mark.fast
def test_transcript_message_maps_lines_to_history_messages():
    user = stromboli.transcript_message({
        "type": "user", "uuid": "u1", "parentUuid": None, "sessionId": "s",
        "timestamp": "2025-01-01T00:00:00Z", "cwd": "/workspace",
        "message": {"role": "user", "content": "hello"}})
    assert user == {"uuid": "u1", "type": "user", "session_id": "s",
                    "timestamp": "2025-01-01T00:00:00Z", "cwd": "/workspace",
                    "content": {"role": "user", "content": [{"type": "text", "text": "hello"}]}}
    assistant = stromboli.transcript_message({
        "type": "assistant", "uuid": "a1", "parentUuid": "u1",
        "message": {"role": "assistant", "model": "claude-sonnet", "id": "msg_1",
                    "stop_reason": "tool_use", "usage": {"output_tokens": 3},
                    "content": [{"type": "text", "text": "hi"}, None, "bare",
                                {"type": "tool_use", "id": "t1", "name": "Bash",
                                 "input": {"command": "ls"}},
                                {"type": "tool_result", "tool_use_id": "t1", "is_error": False,
                                 "content": [{"type": "text", "text": "a"}, "x",
                                             {"type": "text", "text": "b"}]}]},
        "toolUseResult": {"stdout": "a\nb", "stderr": "", "interrupted": False}})
    assert assistant["parent_uuid"] == "u1" and assistant["timestamp"]
    assert assistant["content"]["message_id"] == "msg_1"
    assert assistant["content"]["usage"] == {"output_tokens": 3}
    assert assistant["content"]["content"] == [
        {"type": "text", "text": "hi"}, {"type": "text", "text": "bare"},
        {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}},
        {"type": "tool_result", "tool_use_id": "t1", "content": "ab", "is_error": False}]
    assert assistant["tool_result"] == {"stdout": "a\nb", "stderr": "", "interrupted": False}
    for bookkeeping in ("queue-operation", "system", "attachment", "last-prompt", "summary"):
        assert stromboli.transcript_message({"type": bookkeeping}) is None  # no conversation
    odd = stromboli.transcript_message({"type": "user", "message": "not an object",
                                        "toolUseResult": "text"})
    assert odd["content"] == {"role": "", "content": []} and "tool_result" not in odd


@pytest.mark.fast
def test_fair_shares_keep_the_small_whole_and_split_the_rest():
    assert stromboli.fair_shares([10, 1000, 20, 5000], 1030) == [10, 500, 20, 500]
    assert stromboli.fair_shares([10, 20], 1000) == [10, 20]
    assert stromboli.fair_shares([], 1000) == []


CUT = re.compile(r"(.*) \[stromboli: truncated, (\d+) characters dropped\]", re.S)


@pytest.mark.fast
def test_a_huge_history_message_is_cut_to_its_room_with_markers():
    text = "ж" * 2_000_000  # 4 MB in UTF-8, 12 MB as JSON (\u0436 each)
    message = stromboli.transcript_message({"type": "assistant", "uuid": "u-1", "message": {
        "role": "assistant", "content": [{"type": "text", "text": text},
                                         {"type": "text", "text": "short"}]}})
    room = 64 * 1024
    found = stromboli.message_json(message, room)
    assert len(found) <= room
    blocks = json.loads(found)["content"]["content"]
    assert blocks[1] == {"type": "text", "text": "short"}  # the short strings stay whole
    kept, dropped = CUT.fullmatch(blocks[0]["text"]).groups()
    assert set(kept) == {"ж"} and len(kept) > room // 7
    assert len(kept) + int(dropped) == len(text)
    assert json.loads(found)["uuid"] == "u-1"
    small = {"uuid": "u-2", "content": {"content": [{"type": "text", "text": "hi"}]}}
    assert stromboli.message_json(small, 1024) == json.dumps(small, separators=(",", ":"))


@pytest.mark.fast
def test_a_history_message_too_wide_or_deep_to_cut_becomes_a_stub():
    wide = stromboli.transcript_message({"type": "assistant", "uuid": "u-3", "message": {
        "content": [{"type": "tool_use", "input": {f"k{i}": i for i in range(50_000)}}]}})
    deep: dict = {}
    for _ in range(5000):
        deep = {"d": deep}
    nested = {"type": "user", "uuid": "u-4", "content": {"content": [{"input": deep}]}}
    for message in (wide, nested):
        found = stromboli.message_json(message, 20 * 1024)
        assert len(found) <= 20 * 1024
        stub = json.loads(found)
        assert stub["uuid"] == message["uuid"] and stub["type"] == message["type"]
        assert stub["content"]["content"][0]["text"].startswith("[stromboli: message dropped")


@pytest.mark.fast
def test_a_page_of_history_holds_at_most_its_bytes(tmp_path):
    store, sid, home, _ = hostile_home(tmp_path)
    (home / ".claude" / "projects" / "-workspace").mkdir(parents=True)
    huge = "ж" * 500_000  # 3 MB of JSON each: ten of them do not fit in a page
    lines = [{"type": "user", "uuid": f"u-{i}", "message": {"content": huge}}
             if i % 3 == 0 else {"type": "assistant", "uuid": f"u-{i}",
                                 "message": {"content": [{"type": "text", "text": f"answer {i}"}]}}
             for i in range(30)]
    (home / ".claude" / "projects" / "-workspace" / f"{sid}.jsonl").write_text(
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    page, total = store.messages(sid, 0, 50)
    assert total == 30 and len(page) == 30
    assert sum(map(len, page)) + len(page) - 1 <= stromboli.MESSAGES_PAGE_BYTES
    messages = [json.loads(text) for text in page]
    assert [m["uuid"] for m in messages] == [f"u-{i}" for i in range(30)]
    assert messages[1]["content"]["content"][0]["text"] == "answer 1"  # small: whole
    cut = [CUT.fullmatch(m["content"]["content"][0]["text"]) for m in messages[::3]]
    assert all(cut) and len({len(c.group(1)) for c in cut}) == 1  # equal shares
    page, total = store.messages(sid, 27, 2)
    assert total == 30 and [json.loads(t)["uuid"] for t in page] == ["u-27", "u-28"]
    assert json.loads(page[0])["content"]["content"][0]["text"] == huge  # room enough: whole
    assert json.loads(store.message(sid, "u-3"))["content"]["content"][0]["text"] == huge


@pytest.mark.fast
def test_transcript_title_prefers_the_last_recorded_title():
    first = '{"type": "user", "message": {"content": "  fix   the\\n build  "}}'
    assert stromboli.transcript_title(transcript(first)) == "fix the build"
    later = '{"type": "user", "message": {"content": "second prompt"}}'
    assert stromboli.transcript_title(transcript(HUGE_LINE, "{broken", first, later)) == \
        "fix the build"
    long_prompt = json.dumps({"type": "user", "message": {"content": "word " * 40}})
    title = stromboli.transcript_title(transcript(long_prompt))
    assert len(title) == 80 and title.endswith("…") and title.startswith("word word")
    titled = transcript(first, '{"type": "summary", "summary": "A summary"}',
                        '{"type": "custom-title", "customTitle": "Custom"}', later,
                        '{"hookSpecificOutput": {"sessionTitle": 5}}',
                        '{"type": "summary", "summary": ["not text"]}')
    assert stromboli.transcript_title(titled) == "Custom"
    hooked = transcript('{"type": "custom-title", "customTitle": "Custom"}',
                        '{"hookSpecificOutput": {"sessionTitle": "From a hook"}}')
    assert stromboli.transcript_title(hooked) == "From a hook"
    assert stromboli.transcript_title(transcript('{"type": "user", "message": {"content": '
                                                 '[{"type": "text", "text": "blocks"}]}}')) == ""


@pytest.mark.fast
def test_transcript_usage_counts_each_message_once():
    def line(message_id, **usage):
        return json.dumps({"type": "assistant", "uuid": str(uuid.uuid4()), "message": {
            "id": message_id, "model": "claude-sonnet-4", "usage": usage}})
    fh = transcript(line("m1", input_tokens=100, output_tokens=10),
                    line("m1", input_tokens=100, output_tokens=10),  # one line per block
                    line("m2", input_tokens=1000, output_tokens=100, cache_read_input_tokens=50),
                    '{"type": "user", "message": {"usage": {"input_tokens": 999}}}',
                    '{"type": "assistant", "message": {"id": "m3", "usage": "none"}}',
                    '{"type": "assistant", "message": "text"}', HUGE_LINE, '{"type": "assist')
    usage = stromboli.transcript_usage(fh)
    assert usage == {"model": "claude-sonnet-4", "input_tokens": 1100, "output_tokens": 110,
                     "cache_creation_input_tokens": 0, "cache_read_input_tokens": 50,
                     "total_tokens": 1260,
                     "estimated_cost_usd": round((1100 * 3 + 110 * 15 + 50 * 0.3) / 1e6, 6)}
    assert stromboli.transcript_usage(transcript('{"type": "user"}', "{broken")) is None


# -- run slots ------------------------------------------------------------------------

@pytest.mark.fast
def test_run_slots_are_handed_out_first_in_first_out():
    async def scenario() -> tuple[list[str], list[int]]:
        slots, order, peaks = stromboli.RunSlots(2), [], []
        gates = {name: asyncio.Event() for name in "ABCDEF"}

        async def run(name: str) -> None:
            async with slots.slot():
                order.append(name)
                peaks.append(slots.active)
                await gates[name].wait()
        tasks = {}
        for name in "ABCDEF":
            tasks[name] = asyncio.ensure_future(run(name))
            await asyncio.sleep(0)  # arrive in this order
        await asyncio.sleep(0.01)
        assert order == ["A", "B"] and slots.queued == 4
        tasks["D"].cancel()  # gives up while waiting: leaves the queue
        await asyncio.sleep(0.01)
        assert slots.queued == 3
        for name in "BACEF":
            gates[name].set()
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 5)
        assert tasks["D"].cancelled()
        assert (slots.active, slots.queued) == (0, 0)
        return order, peaks
    order, peaks = asyncio.run(scenario())
    assert order == ["A", "B", "C", "E", "F"]
    assert max(peaks) == 2


@pytest.mark.fast
def test_run_slot_handed_to_a_cancelled_waiter_goes_to_the_next():
    async def scenario() -> list[str]:
        slots, order = stromboli.RunSlots(1), []
        release = asyncio.Event()
        tasks: dict[str, asyncio.Task] = {}

        async def holder() -> None:
            async with slots.slot():
                order.append("A")
                await release.wait()
            tasks["B"].cancel()  # B was just handed the slot but has not run yet

        async def waiter(name: str) -> None:
            async with slots.slot():
                order.append(name)
        tasks["A"] = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        for name in "BC":
            tasks[name] = asyncio.ensure_future(waiter(name))
            await asyncio.sleep(0)
        assert slots.queued == 2
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 5)
        assert tasks["B"].cancelled() and (slots.active, slots.queued) == (0, 0)
        return order
    assert asyncio.run(scenario()) == ["A", "C"]


# -- agents -----------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("body, message", [
    ([], "agent: invalid request: body must be a JSON object"),
    ({"idle_timeout_seconds": -1},
     "agent: invalid request: idle_timeout_seconds must be non-negative"),
    ({"idle_timeout_seconds": "60"}, "agent: invalid request: idle_timeout_seconds must be an "
                                     "integer"),
    ({"idle_timeout_seconds": True}, "agent: invalid request: idle_timeout_seconds must be an "
                                     "integer"),
    ({"prompt": 5}, "agent: invalid request: prompt must be a string"),
    ({"disable_idle_timeout": "yes"}, "agent: invalid request: disable_idle_timeout must be a "
                                      "boolean"),
    ({"workdir": "relative"}, "workdir validation failed: workdir must be an absolute path "
                              "starting with /"),
    ({"podman": {"privileged": True}}, 'Invalid request: unknown podman option "privileged"'),
])
def test_agent_request_is_refused_with_its_message(body, message):
    cfg = stromboli.Config()
    with pytest.raises(stromboli.ApiError) as caught:
        stromboli.AgentRequest.parse(body, cfg)
    assert caught.value.status == 400 and caught.value.message == message


@pytest.mark.fast
def test_agent_request_forces_stream_json_and_a_new_session():
    req = stromboli.AgentRequest.parse({
        "prompt": "hi", "claude": {"model": "sonnet", "session_id": str(uuid.uuid4()),
                                   "resume": True, "output_format": "text"}}, stromboli.Config())
    assert (req.prompt, req.idle_timeout, req.idle_timeout_disabled) == ("hi", 1800, False)
    plan = stromboli.SessionPlan("11111111-1111-4111-8111-111111111111", "new")
    argv = stromboli.container_command(stromboli.Config(), req.run, plan, True, [], stdin="")[-1]
    assert "'--input-format' 'stream-json'" in argv and "'--output-format' 'stream-json'" in argv
    assert "'--include-partial-messages'" in argv and argv.count("'--verbose'") == 1
    assert "'--resume'" not in argv and "'--session-id' '11111111-" in argv
    assert "'--model' 'sonnet'" in argv and not argv.rstrip().endswith("/prompt")


def fast_agent(max_bytes: int = 1 << 20) -> tuple["stromboli.Agent", list]:
    saved = []
    req = stromboli.AgentRequest.parse({}, stromboli.Config())
    return stromboli.Agent.new(req, max_bytes, lambda a: saved.append(a.status)), saved


def event_body(event: "stromboli.AgentEvent") -> dict:
    """The Event JSON of a kept frame: its one `data:` line."""
    return json.loads(event.frame.partition(b"\ndata: ")[2])


def sse_events(stream: bytes) -> list[tuple[str | None, str, str]]:
    """(id, event, data) of each frame of an SSE byte stream."""
    found = []
    for frame in stream.decode().split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in frame.split("\n"))
        found.append((fields.get("id"), fields["event"], fields["data"]))
    return found


async def followed(follower: "stromboli.AgentFollower", chunks: list[bytes]) -> None:
    async for chunk in follower.frames():
        chunks.append(chunk)


@pytest.mark.fast
def test_agent_lines_become_events_and_a_result_ends_the_turn():
    async def scenario():
        agent, saved = fast_agent()
        await agent.on_line(1, '{"type":"system","subtype":"init"}')
        assert agent.status == "idle" and saved == ["idle"]
        agent.status, agent.turn_id = "generating", "turn-1"
        await agent.on_line(2, "warning: something")
        await agent.on_line(1, json.dumps({"type": "result", "usage": {
            "input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 1},
            "modelUsage": {"claude-sonnet-4[1m]": {}}}))
        events = [(e.seq, e.kind, event_body(e)) for e in agent.events]
        assert [i for i, _, _ in events] == [1, 2, 3, 4]
        assert [k for _, k, _ in events] == ["output", "error", "output", "turn_end"]
        assert events[1][2]["error"] == "[stderr] warning: something"
        end = events[-1][2]
        assert end["turn_id"] == "turn-1" and end["usage"]["model"] == "claude-sonnet-4"
        assert end["usage"]["total_tokens"] == 16 and end["usage"]["estimated_cost_usd"] > 0
        assert (agent.status, agent.turns_completed, agent.turn_id) == ("idle", 1, "")
        assert sse_events(agent.events[0].frame) == [
            ("1", "output", json.dumps(event_body(agent.events[0]), separators=(",", ":")))]
    asyncio.run(scenario())


@pytest.mark.fast
def test_agent_output_is_no_activity_but_a_turn_is():
    async def scenario():
        agent, _ = fast_agent()
        agent.last_activity = 1000.0
        await agent.on_line(1, '{"type":"system","subtype":"init"}')
        await agent.on_line(2, "tick")
        assert agent.last_activity == 1000.0  # the agent's own output: not a client's turn
        agent.status, agent.turn_id = "generating", "turn-1"
        await agent.on_line(1, '{"type":"result"}')
        assert agent.status == "idle" and agent.last_activity > time.time() - 5
    asyncio.run(scenario())


@pytest.mark.fast
@pytest.mark.parametrize("line", [
    '{"type":"result","usage":{"input_tokens":"lots"},"modelUsage":[1]}',
    '{"type":"result","usage":{"input_tokens":1e999},"modelUsage":{"m":{}}}',
    '{"type":"result","usage":{"input_tokens":' + "9" * 400 + '},"modelUsage":{"opus":{}}}',
])
def test_agent_result_with_hostile_usage_still_ends_the_turn(line):
    async def scenario():
        agent, _ = fast_agent()
        agent.status, agent.turn_id = "generating", "turn-1"
        await agent.on_line(1, line)
        end = event_body(agent.events[-1])
        assert end["type"] == "turn_end" and "usage" not in end and agent.status == "idle"
    asyncio.run(scenario())


@pytest.mark.fast
def test_agent_output_cannot_break_the_parser_or_fake_a_turn():
    async def scenario():
        agent, saved = fast_agent()
        await agent.on_line(1, '{"type":"result","x":' + "[" * 200_000)  # deep: RecursionError
        await agent.on_line(1, '{"type":"result"}')  # no turn running: only output
        assert [e.kind for e in agent.events] == ["output", "output"]
        assert (agent.status, agent.turns_completed) == ("idle", 0)
    asyncio.run(scenario())


@pytest.mark.fast
def test_agent_follow_replays_after_an_id_then_ends_with_closed():
    async def scenario():
        agent, _ = fast_agent()
        for n in range(5):
            await agent.on_line(1, f"line {n}")
        chunks: list[bytes] = []
        with agent.follower(3, 10) as follower:
            following = asyncio.ensure_future(followed(follower, chunks))
            await asyncio.sleep(0.01)
            assert [(i, k) for i, k, _ in sse_events(b"".join(chunks))] == [
                ("4", "output"), ("5", "output")] and not following.done()
            agent.finish("agent: idle timeout reached")
            await asyncio.wait_for(following, 2)
        events = sse_events(b"".join(chunks))
        assert [(i, k) for i, k, _ in events[2:]] == [("6", "exited"), ("6", "closed")]
        assert json.loads(events[2][2])["error"] == "agent: idle timeout reached"
        assert events[3][2] == "{}" and not agent.followers
    asyncio.run(scenario())


@pytest.mark.fast
def test_agent_events_are_bounded_and_a_late_follower_starts_at_the_oldest_kept():
    async def scenario():
        agent, _ = fast_agent(max_bytes=10_000)
        for n in range(3000):
            await agent.on_line(1, f"{n:0100d}")
        kept = list(agent.events)
        assert sum(len(e.frame) for e in kept) <= 10_000 and kept[-1].seq == 3000
        ids = [e.seq for e in kept]
        assert ids == list(range(ids[0], 3001))
        with agent.follower(0, 10) as follower:
            first = await follower.frames().__anext__()
        assert sse_events(first)[0][0] == str(ids[0])  # the oldest kept, not a hole
        assert [int(i) for i, _, _ in sse_events(first)] == ids  # small events: one write
    asyncio.run(scenario())


@pytest.mark.fast
def test_agent_a_large_event_is_written_in_chunks_and_held_by_no_follower():
    async def scenario():
        agent, _ = fast_agent(max_bytes=64 << 20)
        mixed = ('\x01a"\\\n\U0001F600é' * 20_000)[:99_999]  # cut anywhere, in pieces
        await agent.on_line(2, mixed)
        assert event_body(agent.events[-1]) == json.loads(stromboli.AgentEvent.body(
            "error", event_body(agent.events[-1])["at"], error=f"[stderr] {mixed}"
        ).partition(b"data: ")[2])
        await agent.on_line(1, "\x01" * (1 << 20))  # 6 MiB of JSON, encoded in pieces
        frame = agent.events[-1].frame
        assert len(frame) > 6 << 20 and event_body(agent.events[-1])["content"] == \
            "\x01" * (1 << 20)
        with agent.follower(1, 10) as one, agent.follower(1, 10) as two:
            chunks = [await one.frames().__anext__() for _ in range(3)]
            assert all(len(c) == stromboli.AGENT_FOLLOWER_CHUNK for c in chunks)
            assert b"".join(chunks) == frame[:3 * stromboli.AGENT_FOLLOWER_CHUNK]
            assert (one.cursor, one.offset) == (1, 3 * stromboli.AGENT_FOLLOWER_CHUNK)
            assert (two.cursor, two.offset) == (1, 0)  # followers share the frame, not copy it
    asyncio.run(scenario())


@pytest.mark.fast
def test_agent_a_follower_that_fell_behind_is_dropped():
    async def scenario():
        agent, _ = fast_agent(max_bytes=250_000)
        await agent.on_line(1, "a" * 30_000)
        with agent.follower(0, 10) as between, agent.follower(0, 10) as inside, \
                agent.follower(0, 10) as late:
            await between.frames().__anext__()  # event 1, whole
            await agent.on_line(1, "b" * 100_000)
            await inside.frames().__anext__()  # event 1 and the start of event 2
            assert (between.cursor, between.offset) == (1, 0)
            assert inside.cursor == 1 and inside.offset > 0
            for _ in range(3):
                await agent.on_line(1, "c" * 100_000)
            assert agent.events[0].seq == 4  # events 1-3 are let go
            assert between.behind and inside.behind and not late.behind
            last = [chunk async for chunk in between.frames()]
            assert len(last) == 1 and [(i, k) for i, k, _ in sse_events(last[0])] == [
                (None, "error")]  # no id: its Last-Event-ID stays the last event it got
            assert json.loads(sse_events(last[0])[0][2])["error"] == \
                stromboli.AGENT_FELL_BEHIND
            with pytest.raises(stromboli.FellBehind):
                await inside.frames().__anext__()
            first = await late.frames().__anext__()  # one that had not started: the oldest kept
            assert first.startswith(b"id: 4\n")
    asyncio.run(scenario())


@pytest.mark.fast
def test_agent_followers_are_capped():
    async def scenario():
        agent, _ = fast_agent()
        with agent.follower(-1, 2), agent.follower(-1, 2):
            with pytest.raises(stromboli.ApiError) as refused:
                with agent.follower(-1, 2):
                    pass
            assert refused.value.status == 429 and refused.value.headers["Retry-After"]
            assert refused.value.message == ("agent: 2 clients follow this agent already "
                                             "(agent.max_followers); retry later")
        assert not agent.followers
        with agent.follower(-1, 2):  # free again
            pass
    asyncio.run(scenario())


# -- the store's jobs -----------------------------------------------------------------

@pytest.mark.fast
def test_store_migrates_an_old_database_and_shows_jobs_without_their_request(tmp_path):
    path = tmp_path / "stromboli.db"
    with contextlib.closing(sqlite3.connect(path)) as db:  # the jobs table of release 1
        db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, session_id "
                   "TEXT NOT NULL, run_id TEXT NOT NULL, request TEXT NOT NULL, output TEXT, "
                   "error TEXT, structured_output TEXT, usage TEXT, crash_info TEXT, created_at "
                   "REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL)")
        db.execute("INSERT INTO jobs (id, status, session_id, run_id, request, created_at, "
                   "updated_at) VALUES ('job-old', 'running', 's', 'run-old', ?, 1, 1)",
                   (json.dumps({"prompt": "p" * 1000, "webhook_url": "http://h/x"}),))
        db.commit()
    store = stromboli.Store(path)

    def on_its_thread(fn, *args):
        return store._executor.submit(fn, *args).result()
    try:
        request = {"prompt": "q", "webhook_url": ""}
        for i in range(8):
            on_its_thread(store.insert_job, {
                "id": f"job-{i}", "status": "completed", "session_id": "s", "run_id": f"run-{i}",
                "request": request, "output": "o" * (16 * 1024 ** 2), "created_at": 2 + i,
                "updated_at": 2 + i}, 100)
        old = on_its_thread(store.get_job, "job-old")
        assert "request" not in old and old["webhook_url"] == "http://h/x"
        for i in range(8):
            assert on_its_thread(store.get_job, f"job-{i}")["output"]
        cached = sum(len(job.get("output") or "") for job in store._jobs.values())
        assert 0 < cached <= store.JOB_CACHE_BYTES  # not all 8 outputs of 16 MiB
        jobs, total = on_its_thread(store.list_jobs, None, 1000, 0)
        assert total == 9 and not any("request" in job for job in jobs)
        with pytest.raises(stromboli.QueueFull):  # no place left in a queue of 0
            on_its_thread(store.insert_job, {**jobs[0], "id": "job-x", "status": "pending",
                                             "request": request}, 0)
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert "container_id" in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}


# -- JWT ------------------------------------------------------------------------------

@pytest.fixture
def jwt_auth(tmp_path):
    """stromboli.Auth over a real (temporary) store, with one static token."""
    store = stromboli.Store(tmp_path / "db.sqlite")
    cfg = stromboli.Config(jwt_secret=JWT_SECRET, auth_valid_tokens=("static-token-1",),
                           jwt_access_expiry=600, jwt_refresh_expiry=3600)
    yield stromboli.Auth(cfg, store)
    store.close()


@pytest.mark.fast
def test_jwt_issue_and_decode_keep_access_and_refresh_apart(jwt_auth):
    auth = jwt_auth
    pair = auth.tokens("alice")
    assert pair["token_type"] == "bearer" and pair["expires_in"] == 600
    access = auth.decode(pair["access_token"])
    refresh = auth.decode(pair["refresh_token"], refresh=True)
    assert access["sub"] == refresh["sub"] == "alice"
    assert access["fam"] == refresh["fam"] and access["jti"] != refresh["jti"]
    assert access["exp"] - access["iat"] == 600 and refresh["exp"] - refresh["iat"] == 3600
    assert "is_refresh" not in access and refresh["is_refresh"] is True
    assert jwt.get_unverified_header(pair["access_token"])["alg"] == "HS256"
    with pytest.raises(stromboli.AuthError, match="^invalid or expired token$"):
        auth.decode(pair["refresh_token"])  # a refresh token is no access token
    with pytest.raises(stromboli.AuthError, match="^invalid or expired refresh token$"):
        auth.decode(pair["access_token"], refresh=True)  # nor the other way round
    assert auth.family_key(access) == f"family:{access['fam']}"
    assert auth.family_key({"jti": "j1"}) == "family:j1"  # tokens from before families
    bob = auth.tokens("bob", family="f1")
    assert auth.decode(bob["refresh_token"], refresh=True)["fam"] == "f1"


@pytest.mark.fast
def test_jwt_decode_refuses_forged_expired_and_incomplete_tokens(jwt_auth):
    auth = jwt_auth
    now = int(time.time())
    claims = {"sub": "m", "iat": now, "exp": now + 60, "jti": "j"}
    unsigned = base64url(json.dumps({"alg": "none", "typ": "JWT"}).encode()) + "." + \
        base64url(json.dumps(claims).encode()) + "."
    for token in (jwt.encode(claims, "another-secret-that-is-long-enough-xxxxxxxx", "HS256"),
                  jwt.encode(claims, JWT_SECRET, "HS512"), unsigned,
                  jwt.encode({**claims, "exp": now - 10}, JWT_SECRET, "HS256"),
                  jwt.encode({k: v for k, v in claims.items() if k != "jti"}, JWT_SECRET, "HS256"),
                  jwt.encode({k: v for k, v in claims.items() if k != "exp"}, JWT_SECRET, "HS256"),
                  "not.a.jwt", ""):
        with pytest.raises(stromboli.AuthError) as refused:
            auth.decode(token)
        assert (refused.value.status, refused.value.message) == (401, "invalid or expired token")
    assert auth.decode(jwt.encode(claims, JWT_SECRET, "HS256"))["sub"] == "m"
    unconfigured = stromboli.Auth(stromboli.Config(), auth.store)
    with pytest.raises(stromboli.AuthError):
        unconfigured.decode(jwt.encode(claims, JWT_SECRET, "HS256"))


@pytest.mark.fast
def test_refresh_rotates_and_a_reused_refresh_token_revokes_its_family(jwt_auth):
    auth = jwt_auth
    async def scenario() -> None:
        assert auth.is_static("static-token-1") and not auth.is_static("static-token-2")
        assert await auth.check_access("static-token-1") is None
        pair = auth.tokens("alice")
        assert (await auth.check_access(pair["access_token"]))["sub"] == "alice"
        rotated = await auth.refresh(pair["refresh_token"])
        family = auth.decode(pair["access_token"])["fam"]
        assert auth.decode(rotated["access_token"])["fam"] == family
        with pytest.raises(stromboli.AuthError, match="already used: its token family is revoked"):
            await auth.refresh(pair["refresh_token"])  # a stolen copy replayed
        for token in (pair["access_token"], rotated["access_token"]):
            with pytest.raises(stromboli.AuthError, match="^token revoked$"):
                await auth.check_access(token)
        with pytest.raises(stromboli.AuthError, match="^invalid or expired refresh token$"):
            await auth.refresh(rotated["refresh_token"])
        other = auth.tokens("bob")  # another grant is untouched
        assert (await auth.check_access(other["access_token"]))["sub"] == "bob"
        with pytest.raises(stromboli.AuthError, match="^invalid or expired refresh token$"):
            await auth.refresh(other["access_token"])
    asyncio.run(scenario())


@pytest.mark.fast
def test_bearer_header_parsing():
    malformed = "invalid authorization header format"
    for headers, message in (({}, "missing authorization header"),
                             ({"Authorization": "Basic dXNlcg=="}, malformed),
                             ({"Authorization": "Bearer   "}, malformed)):
        with pytest.raises(stromboli.AuthError, match=f"^{message}$"):
            stromboli.Auth.bearer(make_mocked_request("GET", "/jobs", headers))
    assert stromboli.Auth.bearer(make_mocked_request(
        "GET", "/jobs", {"Authorization": "bearer  tok-1 "})) == "tok-1"


# -- browser guard ----------------------------------------------------------------------

@pytest.mark.fast
def test_browser_guard_host_origin_and_content_type():
    guard = stromboli.BrowserGuard(stromboli.Config(
        server_allowed_hosts=("API.example",), server_allowed_origins=("https://app.example/",)))

    def status(method: str = "GET", body: bool = False, **headers: str) -> int | None:
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        request = make_mocked_request(method, "/run", headers,
                                      **({"payload": mock.Mock()} if body else {}))
        try:
            guard.check(request)
        except stromboli.ApiError as exc:
            return exc.status
        return None
    for host in ("localhost:8080", "LOCALHOST", "127.0.0.1:8080", "[::1]:8080", "api.example",
                 "api.example:443", "10.1.2.3"):
        assert status(Host=host) is None, host
    assert status() is None  # HTTP/1.0 without a Host
    for host in ("evil.example", "localhost.evil.example", "api.example.evil", "127.0.0.1.nip.io"):
        assert status(Host=host) == 421, host
    with pytest.raises(stromboli.ApiError, match="unknown Host header 'evil.example'"):
        guard.check(make_mocked_request("GET", "/", {"Host": "evil.example:80"}))
    assert status(Host="localhost:8080", Origin="http://localhost:8080") is None
    assert status(Host="localhost:8080", Origin="https://app.example") is None
    assert status(Host="localhost:8080", Origin="HTTPS://APP.EXAMPLE/") is None
    for origin in ("http://evil.example", "null", "https://localhost:8080",
                   "http://localhost:8081", "https://app.example.evil"):
        assert status(Host="localhost:8080", Origin=origin) == 403, origin
    json_post = {"method": "POST", "body": True, "Host": "localhost"}
    for kind in ("application/json", "application/json; charset=utf-8",
                 "application/merge-patch+json"):
        assert status(**json_post, Content_Type=kind) is None, kind
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                 "application/jsonx"):
        assert status(**json_post, Content_Type=kind) == 415, kind
    assert status(**json_post) == 415  # no Content-Type
    assert status("POST", Host="localhost", Content_Type="text/plain") is None  # no body
    assert status("GET", body=True, Host="localhost", Content_Type="text/plain") is None


# -- the app in-process (aiohttp's test client, no Podman) --------------------------------

def in_process(tmp_path: pathlib.Path, exercise, **settings) -> None:
    """Run `exercise(client, app_state)` against build_app over a Stromboli that was never
    started: no Podman, so only what the perimeter and the request parsers answer."""
    cfg = stromboli.Config(**{"state_dir": str(tmp_path / "state"), "jwt_secret": JWT_SECRET,
                              "auth_valid_tokens": ("static-token-1",),
                              "auth_failure_burst": 1000, **settings})

    async def scenario() -> None:
        app_state = stromboli.Stromboli(cfg)
        try:
            async with TestClient(TestServer(stromboli.build_app(app_state))) as client:
                await exercise(client, app_state)
        finally:
            app_state.store.close()
    asyncio.run(scenario())


@pytest.mark.fast
def test_in_process_perimeter_wants_a_token_on_every_non_public_route(tmp_path):
    async def exercise(client, app_state) -> None:
        checked = 0
        for route in stromboli.ROUTES:
            if route.access == "public" and not route.reads_bearer:
                continue
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            for headers, message in (({}, "missing authorization header"),
                                     (bearer(forge(key="a-guessed-key-" + "x" * 32)),
                                      "invalid or expired token")):
                r = await client.request(route.method, path, headers=headers)
                assert r.status == 401, (route.method, route.path, r.status)
                assert await r.json() == {"error": message}, (route.method, route.path)
                checked += 1
        assert checked >= 2 * 20  # every protected route, /auth/token, validate and logout
        assert app_state.metrics.auth_failures == checked
        r = await client.get("/swagger/doc.json")
        assert r.status == 200 and await r.json() == stromboli.OPENAPI
        r = await client.post("/auth/refresh", json={"refresh_token": forge()})
        assert r.status == 401 and await r.json() == {"error": "invalid or expired refresh token"}
    in_process(tmp_path, exercise)


@pytest.mark.fast
def test_in_process_run_validation_answers_in_each_routes_envelope(tmp_path):
    async def exercise(client, app_state) -> None:
        r = await client.post("/run", json={"prompt": "x", "claude": {"max_turns": -1}},
                              headers=STATIC)
        assert r.status == 400 and await r.json() == {
            "id": "", "status": "error",
            "error": "Invalid request: claude.max_turns must be between 0 and 10000"}
        r = await client.post("/run/async", data=b'{"prompt": NaN}', headers={
            **STATIC, "Content-Type": "application/json"})
        assert r.status == 400 and (await r.json())["error"] == \
            "Invalid request: invalid JSON: NaN is not JSON"
        r = await client.post("/run", data=b'{"prompt": "x"}', headers={
            **STATIC, "Content-Type": "text/plain"})
        assert r.status == 415 and await r.json() == {
            "id": "", "status": "error", "error": "Content-Type must be application/json"}
        r = await client.get("/run/stream", params={"prompt": "x", "podman.timeout": "169h"},
                             headers=STATIC)
        assert r.status == 400
        assert await r.text() == "invalid timeout duration: must be at most 168h"
        r = await client.get("/run/stream", params={"prompt": "x", "max_turns": "many"},
                             headers=STATIC)
        assert (r.status, await r.text()) == (
            400, "Invalid request: max_turns: cannot parse 'many'")
        pair = await (await client.post("/auth/token", json={"client_id": "c"},
                                        headers=STATIC)).json()
        r = await client.get("/auth/validate", headers=bearer(pair["access_token"]))
        assert (await r.json())["subject"] == "c"
        r = await client.post("/run", json={"prompt": " "}, headers=bearer(pair["access_token"]))
        assert r.status == 400 and (await r.json())["error"] == REQUIRED_PROMPT
        requests = app_state.metrics.requests
        assert requests[("POST", "/run", "400")] == 2 and requests[("POST", "/run", "415")] == 1
    in_process(tmp_path, exercise)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def test_check_config_precedence_flags_over_env_over_file(tmp_path):
    config = tmp_path / "stromboli.toml"
    config.write_text('[resources]\nmemory = "1g"\ncpus = "2"\ntimeout = "10m"\n'
                      '[auth]\nenabled = false\n')
    env = {"STROMBOLI_RESOURCES_CPUS": "3", "STROMBOLI_AUTH_ENABLED": ""}
    result = stromboli_cli("check-config", "--config", str(config),
                           "--set", "resources.timeout=5m", env=env)
    assert result.returncode == 0, result.stderr
    rows = dict(re.findall(r"^(\S+)\s+(\S*)", result.stdout, re.M))
    assert rows["resources.memory"] == "1g"      # from the file
    assert rows["resources.cpus"] == "3"         # env beats the file
    assert rows["resources.timeout"] == "5m"     # the flag beats both


def test_check_config_masks_secrets(tmp_path):
    env = {"STROMBOLI_JWT_SECRET": "s3cret-" + "x" * 40, "STROMBOLI_API_TOKENS": "tok-visible-1",
           "ANTHROPIC_API_KEY": "sk-ant-very-secret", "STROMBOLI_AGENT_ENV": "TOKEN=hunter2"}
    result = stromboli_cli("check-config", env=env)
    assert result.returncode == 0, result.stderr
    for secret in ("s3cret-", "tok-visible-1", "sk-ant-very-secret", "hunter2"):
        assert secret not in result.stdout + result.stderr
    assert "<set, hidden>" in result.stdout


@pytest.mark.parametrize("secret, message", [
    ("", "auth is enabled but STROMBOLI_JWT_SECRET is empty"),
    ("short", "is too short (5 chars, need at least 32)"),
    ("change-me", "is too short"),
])
def test_serve_refuses_bad_jwt_secret(tmp_path, secret, message):
    env = {"STROMBOLI_AUTH_ENABLED": "true", "STROMBOLI_JWT_SECRET": secret,
           "STROMBOLI_STATE_DIR": str(tmp_path), "STROMBOLI_LOG_FORMAT": "text"}
    result = stromboli_cli("serve", env=env)
    assert result.returncode == 1
    assert "invalid configuration" in result.stderr and message in result.stderr


def test_serve_refuses_placeholder_secret(tmp_path):
    env = {"STROMBOLI_JWT_SECRET": "generate-with-openssl-rand-base64-32",
           "STROMBOLI_STATE_DIR": str(tmp_path)}
    result = stromboli_cli("serve", env=env)
    assert result.returncode == 1 and "known placeholder value" in result.stderr


def test_bad_config_values_are_reported(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[resources]\nmemory = \"lots\"\n")
    result = stromboli_cli("check-config", "--config", str(config))
    assert result.returncode == 1 and "invalid memory value" in result.stderr
    config.write_text("[nonsense]\nkey = 1\n")
    result = stromboli_cli("check-config", "--config", str(config))
    assert result.returncode == 1 and "unknown keys: nonsense.key" in result.stderr
    result = stromboli_cli("check-config", env={"STROMBOLI_RESOURCES_TIMEOUT": "forever"})
    assert result.returncode == 1 and "STROMBOLI_RESOURCES_TIMEOUT" in result.stderr


def test_readme_configuration_table_matches_the_code():
    sys.path.insert(0, str(HERE))
    import dataclasses
    import stromboli
    readme = (HERE / "README.md").read_text()
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^\| `([a-z_.]+)` \| (.*?) \|", readme, re.M)}
    settings = {f.metadata["key"]: f.metadata["env"] for f in dataclasses.fields(stromboli.Config)}
    assert set(rows) == set(settings)
    for key, names in settings.items():
        assert re.findall(r"`([A-Z_]+)`", rows[key]) == list(names), key


# ---------------------------------------------------------------------------
# Health and Claude status
# ---------------------------------------------------------------------------

def test_health_reports_components(daemon):
    r = daemon.http.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["name"] == "stromboli"
    assert re.match(r"^\d+\.\d+\.\d+", body["version"])
    names = [c["name"] for c in body["components"]]
    assert names[0] == "podman" and "anthropic-api-key" in names
    assert r.headers["X-Request-ID"]


def test_health_is_right_from_its_first_answer(tmp_path, agent_image, model):
    """Asked from the moment the process starts, the first answer already knows Podman and
    the daemon's secrets (it is not `not checked yet`, degraded, while all is well)."""
    d = Daemon(tmp_path / "state", agent_env(model)).launch()

    def first_answer() -> dict | None:
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited {d.proc.returncode}:\n{d.log()}")
        try:
            r = httpx.get(d.url + "/health", timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None
    try:
        first = wait_until(first_answer, 30, 0.005, "the first /health answer")
    finally:
        d.stop()
        d.remove_containers()
    assert first["status"] == "ok", first
    assert [c for c in first["components"] if c["status"] != "ok"] == [], first
    assert {"podman", "anthropic-api-key"} <= {c["name"] for c in first["components"]}


def test_request_id_is_echoed(daemon):
    r = daemon.http.get("/health", headers={"X-Request-ID": "my-request-42"})
    assert r.headers["X-Request-ID"] == "my-request-42"


def test_podman_gone_degrades_health_and_runs_fail_clearly(make_daemon, tmp_path):
    d = make_daemon(wait_podman=False, STROMBOLI_PODMAN_URL=f"unix://{tmp_path}/no-such.sock")
    body = d.http.get("/health").json()
    assert body["status"] == "degraded"
    podman_component = body["components"][0]
    assert podman_component["name"] == "podman" and podman_component["status"] == "error"
    assert "failed to connect to podman" in podman_component["error"]
    r = d.http.post("/run", json={"prompt": "hello"})
    assert r.status_code == 503 and "podman" in run_error(r)
    assert d.http.get("/health").status_code == 200  # the daemon keeps serving


def test_claude_status_and_runs_need_credentials(make_daemon):
    d = make_daemon(ANTHROPIC_API_KEY="")
    status = d.http.get("/claude/status").json()
    assert status["configured"] is False
    r = d.http.post("/run", json={"prompt": "hello"})
    assert r.status_code == 503
    assert run_error(r) == "Claude not configured. Run 'make claude-setup' first"
    r = d.http.get("/run/stream", params={"prompt": "hello"})
    assert r.status_code == 503 and r.text.startswith("Claude not configured")


def test_credentials_file_is_synced_to_a_secret_by_hash(make_daemon, tmp_path):
    creds = tmp_path / ".credentials.json"
    creds.write_text('{"claudeAiOauth": {"note": "first"}}')
    d = make_daemon(STROMBOLI_AGENT_CREDENTIALS_FILE=str(creds))
    names = [c["name"] for c in d.http.get("/health").json()["components"]]
    assert "claude-credentials-file" in names and "claude-credentials-secret" in names
    read = {"prompt": "bash: cat $HOME/.claude/.credentials.json",
            "claude": {"dangerously_skip_permissions": True}}
    assert '"first"' in d.http.post("/run", json=read).json()["output"]
    creds.write_text('{"claudeAiOauth": {"note": "second"}}')
    assert '"second"' in d.http.post("/run", json=read).json()["output"]
    assert "second" not in d.log()


def test_claude_status_configured(daemon):
    assert daemon.http.get("/claude/status").json() == {"configured": True,
                                                        "message": "Claude is configured"}


# ---------------------------------------------------------------------------
# Runs — POST /run
# ---------------------------------------------------------------------------

def test_run_hello(daemon, model):
    r = daemon.http.post("/run", json={"prompt": "say hello"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed"
    assert body["output"] == "Hello from the scripted model"
    assert re.match(r"^run-[0-9a-f]{16}$", body["id"])
    assert uuid.UUID(body["session_id"]).version == 4
    assert not agent_containers(f"stromboli.run={body['id']}")  # removed after the run


def test_run_usage_comes_from_the_transcript_with_prices(daemon, model):
    tag = marker()
    body = daemon.http.post("/run", json={"prompt": f"hello {tag}"}).json()
    usage = body["usage"]
    sent = model.requests_with(tag)
    assert len(sent) == 1
    assert usage["model"] == sent[0]["model"]
    assert usage["input_tokens"] == estimate_tokens(sent[0]["messages"])
    assert usage["total_tokens"] == sum(usage[k] for k in (
        "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    rates = {"haiku": (0.25, 1.25), "sonnet": (3.0, 15.0), "opus": (15.0, 75.0)}
    family = next(f for f in rates if f in usage["model"])
    expected = (usage["input_tokens"] * rates[family][0]
                + usage["output_tokens"] * rates[family][1]) / 1e6
    assert usage["estimated_cost_usd"] == pytest.approx(round(expected, 6))


def test_bash_tool_loop_runs_inside_a_hardened_container(daemon, model):
    tag = marker()
    command = (f"echo {tag} uid=$(id -u) home=$HOME pwd=$PWD; "
               "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status | tr -s '\\t\\n' ' '; "
               # (with the host network and a user namespace, /sys is the host's: the
               # container's own cgroup is found through /proc/self/cgroup)
               "cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max "
               "/sys/fs/cgroup/pids$(grep :pids: /proc/self/cgroup | cut -d: -f3)/pids.max "
               "2>/dev/null")
    r = daemon.http.post("/run", json={"prompt": f"bash: {command}",
                                       "claude": {"dangerously_skip_permissions": True}})
    body = r.json()
    assert body["status"] == "completed", body
    output = body["output"]
    assert output.startswith("tool said: ")
    assert f"{tag} uid=1000 home=/home/user pwd=/workspace" in output
    assert re.search(r"CapEff:\s*0000000000000000", output)
    assert re.search(r"NoNewPrivs:\s*1", output)
    assert "512" in output  # pids limit
    # The model really got the tool result back from the CLI (a full agent loop).
    assert len(model.requests_with(tag)) == 2


def test_container_limits_labels_and_env(daemon, model):
    tag = marker()
    session = str(uuid.uuid4())
    job = daemon.http.post("/run/async", json={
        "prompt": f"sleep 3 {tag}", "claude": {"session_id": session, "model": "haiku"},
        "podman": {"memory": "300m", "cpus": "0.5"}}).json()
    containers = wait_until(lambda: agent_containers(f"stromboli.job={job['job_id']}"), 20,
                            what="the job's container")
    attrs = containers[0].attrs
    with podman_client() as client:
        info = client.containers.get(containers[0].id).inspect()
    host = info["HostConfig"]
    assert host["Memory"] == 300 * 1024 * 1024
    assert host["CpuQuota"] == 50000 and host["CpuPeriod"] == 100000
    assert host["PidsLimit"] == 512
    assert info["Config"]["User"] == "1000:1000"
    labels = info["Config"]["Labels"]
    assert labels["managed-by"] == "stromboli" and labels["stromboli.session"] == session
    assert labels["stromboli.run"].startswith("run-")
    env = dict(e.split("=", 1) for e in info["Config"]["Env"])
    assert env["HOME"] == "/home/user" and env["CLAUDE_CODE_MAX_RETRIES"] == "0"
    assert "sk-test-not-a-real-key" not in json.dumps(info["Config"]["Cmd"])
    command = info["Config"]["Cmd"]
    assert command[:2] == ["sh", "-c"] and "'--model' 'haiku'" in command[2], command
    assert tag not in json.dumps(command)  # the prompt goes on stdin
    assert attrs
    assert daemon.wait_job(job["job_id"])["status"] == "completed"


def test_workdir_is_created_and_used(daemon):
    r = daemon.http.post("/run", json={"prompt": "bash: pwd; ls -ld .", "workdir": "/workspace/a/b-c",
                                       "claude": {"dangerously_skip_permissions": True}})
    body = r.json()
    assert body["status"] == "completed", body
    assert "/workspace/a/b-c" in body["output"]


def test_prompt_starting_with_a_dash(daemon):
    body = daemon.http.post("/run", json={"prompt": "- fix the bug\n- then say hello"}).json()
    assert body["status"] == "completed", body
    assert body["output"] == "Hello from the scripted model"


def test_structured_output(daemon):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"]}
    r = daemon.http.post("/run", json={"prompt": 'give json: {"answer": 42}', "claude": {
        "output_format": "json", "json_schema": json.dumps(schema)}})
    body = r.json()
    assert body["status"] == "completed", body
    assert body["structured_output"] == {"answer": 42}
    assert json.loads(body["output"])["type"] == "result"


def test_stream_json_output_format(daemon):
    body = daemon.http.post("/run", json={"prompt": "hello", "claude": {
        "output_format": "stream-json"}}).json()
    events = [json.loads(line) for line in body["output"].splitlines() if line.startswith("{")]
    assert events[0]["type"] == "system" and events[-1]["type"] == "result"
    assert events[-1]["result"] == "Hello from the scripted model"


def test_api_error_is_an_execution_failure(daemon):
    r = daemon.http.post("/run", json={"prompt": "please fail 500"})
    assert r.status_code == 500
    error = run_error(r)
    assert error.startswith("execution failed: exit status 1, output:") and "500" in error


def test_timeout_kills_and_removes_the_container(daemon):
    started = time.monotonic()
    r = daemon.http.post("/run", json={"prompt": "sleep 30", "podman": {"timeout": "3s"}})
    elapsed = time.monotonic() - started
    body = r.json()
    assert r.status_code == 200 and body["status"] == "crashed", body
    assert body["crash_info"]["exit_code"] == 137 and body["crash_info"]["signal"] == "SIGKILL"
    assert "Timeout" in body["crash_info"]["reason"]
    assert elapsed < 20
    assert not agent_containers(f"stromboli.run={body['id']}")


def test_client_disconnect_from_run_stops_its_container(daemon):
    session = str(uuid.uuid4())
    label = f"stromboli.session={session}"

    def post():
        try:
            httpx.post(daemon.url + "/run", timeout=4,
                       json={"prompt": "sleep 60", "claude": {"session_id": session}})
        except httpx.TimeoutException:
            pass
    thread = threading.Thread(target=post)
    thread.start()
    wait_until(lambda: agent_containers(label), 15, what="the run's container")
    thread.join()
    wait_until(lambda: not agent_containers(label), 20, what="container removal on disconnect")


# ---------------------------------------------------------------------------
# Bad input — 4xx envelopes, never 500
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "Invalid request: invalid JSON"),
    (b"", 400, "request body is empty"),
    (b"[1,2]", 400, "body must be a JSON object"),
    (b'{"workdir": "/w"}', 400, "'RunRequest.Prompt' Error:Field validation"),
    (b'{"prompt": ""}', 400, "failed on the 'required' tag"),
    (b'{"prompt": "x", "workdir": "/workspace/../etc"}', 400,
     "workdir validation failed: workdir cannot contain path traversal"),
    (b'{"prompt": "x", "workdir": "relative"}', 400, "must be an absolute path"),
    (b'{"prompt": "x", "workdir": "/a b"}', 400, "invalid characters"),
    (b'{"prompt": "x", "claude": {"model": 5}}', 400, "claude.model must be a string"),
    (b'{"prompt": "x", "claude": {"allowed_tools": "Bash"}}', 400, "must be an array of strings"),
    (b'{"prompt": "x", "claude": {"output_format": "xml"}}', 400, "output_format must be one of"),
    (b'{"prompt": "x", "claude": {"session_id": "../../etc"}}', 400, "invalid session ID"),
    (b'{"prompt": "x", "podman": {"memory": "lots"}}', 400, "invalid memory value"),
    (b'{"prompt": "x", "podman": {"timeout": "soon"}}', 400, "invalid duration"),
    (b'{"prompt": "x", "podman": {"volumes": ["/tmp:/data"]}}', 400,
     "no volume allowlist configured"),
    (b'{"prompt": "x", "podman": {"secrets_env": {"LD_PRELOAD": "s"}}}', 400,
     "is not allowed for security reasons"),
    (b'{"prompt": "x", "podman": {"image": "nosuch.example/img:1"}}', 400, "not found"),
])
def test_bad_run_requests_get_400_envelopes(daemon, body, status, fragment):
    for path in ("/run", "/run/async"):
        r = daemon.http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        assert fragment in run_error(r)


def test_oversized_body_is_413(make_daemon):
    d = make_daemon(STROMBOLI_SERVER_MAX_BODY_BYTES=str(64 * 1024))
    r = d.http.post("/run", json={"prompt": "x" * (100 * 1024)})
    assert r.status_code == 413
    assert "request body too large" in run_error(r)


def test_unknown_route_and_method_are_json(daemon):
    r = daemon.http.get("/no/such/route")
    assert r.status_code == 404 and r.json() == {"error": "not found"}
    r = daemon.http.put("/run", json={})
    assert r.status_code == 405 and r.json() == {"error": "method not allowed"}
    r = daemon.http.get("/metrics")  # on the API port too (issue 12), as protected as any
    assert r.status_code == 200 and "http_requests_total" in r.text


# ---------------------------------------------------------------------------
# Streams — GET /run/stream
# ---------------------------------------------------------------------------

def read_sse(daemon: Daemon, params: dict, headers: dict | None = None):
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        with connect_sse(client, "GET", "/run/stream", params=params,
                         headers=headers or {}) as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            return source.response, list(source.iter_sse())


def test_stream_sends_data_lines_then_done(daemon):
    response, events = read_sse(daemon, {"prompt": "hello"})
    data = [e for e in events if e.event == "message"]
    assert [e.data for e in data] == ["Hello from the scripted model"]
    done = events[-1]
    assert done.event == "done"
    final = json.loads(done.data)
    assert final["status"] == "completed" and final["id"] == response.headers["X-Run-ID"]
    uuid.UUID(final["session_id"])


def test_stream_accepts_run_options_as_query_parameters(daemon, model):
    tag = marker()
    _, events = read_sse(daemon, {"prompt": f"hello {tag}", "model": "sonnet",
                                  "claude.output_format": "stream-json"})
    lines = [json.loads(e.data) for e in events if e.event == "message"]
    assert lines[0]["type"] == "system" and lines[-1]["type"] == "result"
    assert "sonnet" in model.requests_with(tag)[0]["model"]


def test_stream_error_event_on_failure(daemon):
    _, events = read_sse(daemon, {"prompt": "please fail 500"})
    assert events[-1].event == "error"
    error = json.loads(events[-1].data)  # JSON, so that a client can tell it from content
    assert error["status"] == "error" and "execution failed" in error["error"]
    assert error["id"].startswith("run-")


def test_stream_multiline_error_keeps_every_line(daemon):
    _, events = read_sse(daemon, {"prompt": "please fail 500", "output_format": "stream-json"})
    assert events[-1].event == "error"
    message = json.loads(events[-1].data)["error"]
    assert "\n" in message  # the whole multi-line message, in one event
    assert '"type":"result"' in message.splitlines()[-1]
    assert message.startswith("execution failed: exit status 1, output:")


def test_stream_missing_prompt_is_plain_400(daemon):
    r = daemon.http.get("/run/stream")
    assert r.status_code == 400 and r.text == "Missing required parameter: prompt"
    r = daemon.http.get("/run/stream", params={"prompt": "x", "workdir": "../x"})
    assert r.status_code == 400 and "workdir validation failed" in r.text


def test_stream_replay_with_last_event_id(daemon):
    response, events = read_sse(daemon, {"prompt": "bash: printf 'one\\ntwo\\nthree\\n'",
                                         "dangerously_skip_permissions": "true",
                                         "output_format": "stream-json"})
    run_id = response.headers["X-Run-ID"]
    _, replay = read_sse(daemon, {"run_id": run_id}, {"Last-Event-ID": events[1].id})
    assert [e.data for e in replay] == [e.data for e in events[2:]]
    assert replay[-1].event == "done"
    r = daemon.http.get("/run/stream", params={"run_id": "run-0000000000000000"})
    assert r.status_code == 404


def test_stream_replay_from_the_store_after_a_restart(make_daemon, tmp_path):
    state = tmp_path / "state"
    d = make_daemon(state_dir=state)
    response, events = read_sse(d, {"prompt": "hello", "output_format": "stream-json"})
    run_id = response.headers["X-Run-ID"]
    d.stop()
    again = make_daemon(state_dir=state)
    _, replay = read_sse(again, {"run_id": run_id}, {"Last-Event-ID": events[0].id})
    assert [(e.event, e.data) for e in replay] == [(e.event, e.data) for e in events[1:]]


def test_stream_disconnect_stops_the_container(daemon):
    session = str(uuid.uuid4())
    label = f"stromboli.session={session}"
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        with client.stream("GET", "/run/stream", params={"prompt": "sleep 60",
                                                         "session_id": session}) as response:
            assert response.status_code == 200
            wait_until(lambda: agent_containers(label), 15, what="the stream's container")
    wait_until(lambda: not agent_containers(label), 20, what="container removal on disconnect")


# ---------------------------------------------------------------------------
# Jobs — POST /run/async, /jobs
# ---------------------------------------------------------------------------

def test_async_job_completes(daemon):
    session = str(uuid.uuid4())
    r = daemon.http.post("/run/async", json={"prompt": "hello", "claude": {"session_id": session}})
    assert r.status_code == 202
    accepted = r.json()
    assert re.match(r"^job-[0-9a-f]{16}$", accepted["job_id"]) and accepted["session_id"] == session
    job = daemon.wait_job(accepted["job_id"])
    assert job["status"] == "completed" and job["output"] == "Hello from the scripted model"
    assert job["session_id"] == session and job["usage"]["output_tokens"] > 0
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)$", job["created_at"])
    listed = daemon.http.get("/jobs").json()["jobs"]
    assert accepted["job_id"] in [j["id"] for j in listed]


def test_async_job_gets_a_session_id(daemon):
    accepted = daemon.http.post("/run/async", json={"prompt": "hello"}).json()
    uuid.UUID(accepted["session_id"])
    assert daemon.wait_job(accepted["job_id"])["session_id"] == accepted["session_id"]


def test_cancel_kills_the_container_and_stays_cancelled(daemon):
    job_id = daemon.http.post("/run/async", json={"prompt": "sleep 60"}).json()["job_id"]
    daemon.wait_job(job_id, ("running",))
    wait_until(lambda: agent_containers(f"stromboli.job={job_id}"), 15, what="job container")
    r = daemon.http.delete(f"/jobs/{job_id}")
    assert r.status_code == 200 and r.json() == {"cancelled": True, "job_id": job_id}
    assert not agent_containers(f"stromboli.job={job_id}")  # gone when DELETE returns
    time.sleep(1)
    assert daemon.http.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    r = daemon.http.delete(f"/jobs/{job_id}")
    assert r.status_code == 409
    assert run_error(r) == "cannot cancel job (already completed, failed, or cancelled)"


def test_jobs_can_be_filtered_by_status(daemon):
    job_id = daemon.http.post("/run/async", json={"prompt": "hello"}).json()["job_id"]
    daemon.wait_job(job_id)
    completed = daemon.http.get("/jobs", params={"status": "completed"}).json()["jobs"]
    assert job_id in [j["id"] for j in completed]
    assert all(j["status"] == "completed" for j in completed)
    assert job_id not in [j["id"] for j in daemon.http.get(
        "/jobs", params={"status": "failed"}).json()["jobs"]]
    r = daemon.http.get("/jobs", params={"status": "bogus"})
    assert r.status_code == 400 and "invalid status filter" in run_error(r)


def test_agent_network_setting_is_applied(make_daemon):
    d = make_daemon(STROMBOLI_AGENT_NETWORK="none")  # the model server becomes unreachable
    r = d.http.post("/run", json={"prompt": "hello"})
    assert r.status_code == 500
    assert "Unable to connect" in run_error(r) or "ConnectionRefused" in run_error(r)


def test_unknown_job_is_404(daemon):
    for method in ("GET", "DELETE"):
        r = daemon.http.request(method, "/jobs/job-doesnotexist00")
        assert r.status_code == 404 and run_error(r) == "job not found"


def test_killed_container_reports_crash_info(daemon):
    job_id = daemon.http.post("/run/async", json={"prompt": "sleep 60"}).json()["job_id"]
    containers = wait_until(lambda: running_containers(f"stromboli.job={job_id}"), 20,
                            what="running container")
    containers[0].kill("SIGKILL")
    job = daemon.wait_job(job_id)
    assert job["status"] == "crashed", job
    assert job["crash_info"]["exit_code"] == 137
    assert job["crash_info"]["signal"] == "SIGKILL"
    assert job["crash_info"]["reason"] == "Process exited with SIGKILL"


def test_concurrency_cap_queues_jobs_fifo(make_daemon):
    d = make_daemon(STROMBOLI_MAX_CONCURRENT_RUNS="1")
    ids = [d.http.post("/run/async", json={"prompt": "sleep 1.5"}).json()["job_id"]
           for _ in range(3)]
    seen_pending = False

    def all_completed():
        nonlocal seen_pending
        jobs = {j["id"]: j for j in d.http.get("/jobs").json()["jobs"]}
        states = [jobs[i]["status"] for i in ids]
        assert states.count("running") <= 1, states
        seen_pending |= "pending" in states
        assert not any(s in ("failed", "crashed") for s in states), states
        return jobs if all(s == "completed" for s in states) else None
    jobs = wait_until(all_completed, 90, 0.05, "the three queued jobs to complete")
    assert seen_pending
    started = [parse_time(jobs[i]["started_at"]) for i in ids]
    assert started == sorted(started)  # first in, first out
    finished = [parse_time(jobs[i]["finished_at"]) for i in ids]
    assert started[1] >= finished[0] - 0.5 and started[2] >= finished[1] - 0.5


def test_sync_runs_wait_their_turn(make_daemon):
    d = make_daemon(STROMBOLI_MAX_CONCURRENT_RUNS="1")
    results, peak = [], [0]

    def post() -> None:
        results.append(httpx.post(d.url + "/run", json={"prompt": "sleep 1.5"}, timeout=60).json())
    threads = [threading.Thread(target=post) for _ in range(2)]
    started = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        running = [c for c in agent_containers(f"stromboli.instance={d.instance}")
                   if c.attrs.get("State") == "running"]
        peak[0] = max(peak[0], len(running))
        time.sleep(0.05)
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert time.monotonic() - started >= 3.0  # one after the other
    assert peak[0] == 1  # a container was seen running, never two


def test_lifecycle_hooks_run_init_once_and_post_start_always(daemon):
    hooks = {"on_create_command": ["echo created >> $HOME/hooks.log # a comment; || true"],
             "post_create": ["echo post-create >> $HOME/hooks.log"],
             "post_start": ["echo started >> $HOME/hooks.log"]}
    first = daemon.http.post("/run", json={"prompt": "hello", "podman": {"lifecycle": hooks}}).json()
    assert first["status"] == "completed", first
    session = first["session_id"]
    second = daemon.http.post("/run", json={"prompt": "hello", "podman": {"lifecycle": hooks},
                                            "claude": {"session_id": session, "resume": True}}).json()
    assert second["status"] == "completed", second
    log = (daemon.state_dir / "sessions" / session / "hooks.log").read_text()
    assert log.split() == ["created", "post-create", "started", "started"]
    r = daemon.http.post("/run", json={"prompt": "x", "podman": {"lifecycle": {"post_start": []}}})
    assert r.status_code == 400 and "lifecycle hooks validation failed" in run_error(r)


def test_a_job_survives_kill_9_with_its_real_output(make_daemon, tmp_path):
    """The container outlives the daemon: the next start takes it over, replays what it
    printed meanwhile and finishes the job normally (issue 13)."""
    state = tmp_path / "state"
    d = make_daemon(state_dir=state)
    done_id = d.http.post("/run/async", json={"prompt": "hello"}).json()["job_id"]
    d.wait_job(done_id)
    tag = marker()
    long_id = d.http.post("/run/async", json={
        "prompt": f"sleep 6 {tag}", "claude": {"output_format": "stream-json"}}).json()["job_id"]
    d.wait_job(long_id, ("running",))
    wait_until(lambda: running_containers(f"stromboli.job={long_id}"), 15,
               what="job container running")
    time.sleep(1)  # let the CLI print its first lines while the daemon is still there
    d.stop(signal.SIGKILL)  # a crash: nothing is cleaned up
    assert agent_containers(f"stromboli.job={long_id}")
    again = make_daemon(state_dir=state)
    finished = again.http.get(f"/jobs/{done_id}").json()
    assert finished["status"] == "completed"
    assert finished["output"] == "Hello from the scripted model"
    job = again.wait_job(long_id, timeout=60)
    assert job["status"] == "completed", job
    assert f"echo: sleep 6 {tag}" in job["output"]  # the model's answer, after the restart
    assert '"type":"system"' in job["output"].splitlines()[0]  # printed before the crash
    assert job["usage"]["output_tokens"] > 0
    wait_until(lambda: not agent_containers(f"stromboli.job={long_id}"), 20,
               what="the job's container removal")
    with httpx.Client(base_url=again.url, timeout=60) as client:  # its stream, from the store
        with connect_sse(client, "GET", f"/jobs/{long_id}/stream") as source:
            events = list(source.iter_sse())
    assert [int(e.id) for e in events] == list(range(len(events)))  # no gaps, no duplicates
    assert events[-1].event == "done"


def test_a_job_whose_container_vanished_meanwhile_fails_clearly(make_daemon, tmp_path):
    state = tmp_path / "state"
    d = make_daemon(state_dir=state)
    long_id = d.http.post("/run/async", json={"prompt": "sleep 120"}).json()["job_id"]
    d.wait_job(long_id, ("running",))
    containers = wait_until(lambda: running_containers(f"stromboli.job={long_id}"), 15,
                            what="job container running")  # not `initialized`: killable
    d.stop(signal.SIGKILL)
    with podman_client() as client:  # an admin cleans up while the daemon is down
        container = client.containers.get(containers[0].id)
        container.kill()
        wait_until(lambda: client.containers.get(container.id).status != "running", 10,
                   what="the container stopped")
        container.remove(force=True)
    again = make_daemon(state_dir=state)
    job = again.wait_job(long_id, timeout=30)
    assert job["status"] == "failed"
    assert "its container is gone" in job["error"]


def test_sigterm_lets_runs_finish_then_leaves_jobs_to_the_next_start(make_daemon, tmp_path):
    state = tmp_path / "state"
    d = make_daemon(state_dir=state, STROMBOLI_SHUTDOWN_GRACE="1s")
    tag = marker()
    long_id = d.http.post("/run/async", json={"prompt": f"sleep 6 {tag}"}).json()["job_id"]
    d.wait_job(long_id, ("running",))
    wait_until(lambda: running_containers(f"stromboli.job={long_id}"), 15,
               what="job container running")
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(20)
    assert time.monotonic() - started < 10  # the grace (1 s) and the shutdown, no more
    assert agent_containers(f"stromboli.job={long_id}")  # left running, not killed
    again = make_daemon(state_dir=state)
    job = again.wait_job(long_id, timeout=60)
    assert job["status"] == "completed" and f"echo: sleep 6 {tag}" in job["output"], job


def test_draining_refuses_new_runs_and_tells_cut_clients_why(make_daemon):
    d = make_daemon(STROMBOLI_SHUTDOWN_GRACE="2s")
    answers: dict[str, object] = {}

    def sync_run() -> None:
        answers["sync"] = httpx.post(d.url + "/run", json={"prompt": "sleep 20"}, timeout=60)

    def stream_run() -> None:
        with httpx.Client(base_url=d.url, timeout=60) as client:
            with connect_sse(client, "GET", "/run/stream",
                             params={"prompt": "sleep 20 streamed"}) as source:
                answers["stream"] = list(source.iter_sse())
    clients = [threading.Thread(target=sync_run), threading.Thread(target=stream_run)]
    for client in clients:
        client.start()
    wait_until(lambda: len(agent_containers(f"stromboli.instance={d.instance}")) == 2, 20,
               what="both runs' containers")
    d.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutting down" in d.log(), 10, what="the shutdown")
    r = d.http.post("/run", json={"prompt": "hello"})  # within the grace: refused
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert "restarting" in run_error(r)
    for client in clients:
        client.join(40)
    d.proc.wait(30)
    cut = answers["sync"]
    assert cut.status_code == 503 and "restarting" in run_error(cut), cut.text
    last = answers["stream"][-1]
    assert last.event == "error" and "restarting" in json.loads(last.data)["error"]
    assert not agent_containers(f"stromboli.instance={d.instance}")  # clients' runs: removed


def test_pending_jobs_survive_a_restart(make_daemon, tmp_path):
    state = tmp_path / "state"
    d = make_daemon(state_dir=state, STROMBOLI_MAX_CONCURRENT_RUNS="1")
    first = d.http.post("/run/async", json={"prompt": "sleep 4"}).json()["job_id"]
    queued = d.http.post("/run/async", json={"prompt": "hello"}).json()["job_id"]
    d.wait_job(first, ("running",))
    wait_until(lambda: running_containers(f"stromboli.job={first}"), 15,
               what="the first job's container running")
    assert d.http.get(f"/jobs/{queued}").json()["status"] == "pending"
    d.stop(signal.SIGKILL)
    again = make_daemon(state_dir=state, STROMBOLI_MAX_CONCURRENT_RUNS="1")
    assert again.wait_job(queued)["status"] == "completed"
    assert again.wait_job(first)["status"] == "completed"  # taken over, then finished


def test_idempotent_submits(daemon):
    key = f"key-{marker()}"
    body = {"prompt": f"idempotent {marker()}"}
    first = daemon.http.post("/run/async", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    again = daemon.http.post("/run/async", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json() == first.json()
    other = daemon.http.post("/run/async", json={"prompt": "something else"},
                             headers={"Idempotency-Key": key})
    assert other.status_code == 409 and "Idempotency-Key" in run_error(other)
    assert daemon.wait_job(first.json()["job_id"])["status"] == "completed"
    jobs = daemon.http.get("/jobs").json()["jobs"]
    assert sum(1 for j in jobs if j["id"] == first.json()["job_id"]) == 1
    fresh = daemon.http.post("/run/async", json=body)  # no key: a new job
    assert fresh.status_code == 202 and fresh.json()["job_id"] != first.json()["job_id"]


def test_admission_control_and_queue_positions(make_daemon):
    d = make_daemon(STROMBOLI_MAX_CONCURRENT_RUNS="1", STROMBOLI_MAX_QUEUED_JOBS="2")
    ids = [d.http.post("/run/async", json={"prompt": "sleep 3"}).json()["job_id"]]
    wait_until(lambda: d.http.get(f"/jobs/{ids[0]}").json()["status"] == "running", 20,
               what="the first job running")
    ids += [d.http.post("/run/async", json={"prompt": f"queued {i}"}).json()["job_id"]
            for i in range(2)]
    refused = d.http.post("/run/async", json={"prompt": "one too many"})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "5"
    assert "too many queued jobs" in run_error(refused)
    places = [d.http.get(f"/jobs/{i}").json().get("queue_position") for i in ids]
    assert places == [None, 0, 1], places
    listed = {j["id"]: j.get("queue_position") for j in d.http.get("/jobs").json()["jobs"]}
    assert [listed[i] for i in ids] == [None, 0, 1]
    for job_id in ids:
        assert d.wait_job(job_id)["status"] == "completed"


def test_job_stream_replays_after_last_event_id(daemon):
    job = daemon.http.post("/run/async", json={"prompt": "hello", "claude": {
        "output_format": "stream-json"}}).json()
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        with connect_sse(client, "GET", f"/jobs/{job['job_id']}/stream") as source:
            live = list(source.iter_sse())
    assert live[-1].event == "done" and json.loads(live[-1].data)["status"] == "completed"
    ids = [int(e.id) for e in live]
    assert ids == list(range(len(ids))) and len(ids) > 3  # no gaps, no duplicates
    daemon.wait_job(job["job_id"])
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        with connect_sse(client, "GET", f"/jobs/{job['job_id']}/stream",
                         headers={"Last-Event-ID": str(ids[1])}) as source:
            rest = list(source.iter_sse())
    assert [int(e.id) for e in rest] == ids[2:]
    assert [e.data for e in rest] == [e.data for e in live[2:]]
    assert daemon.http.get("/jobs/job-nope/stream").status_code == 404


def test_finished_jobs_are_deleted_after_the_ttl(make_daemon):
    d = make_daemon(STROMBOLI_JOBS_CLEANUP_TTL="1s", STROMBOLI_JOBS_CLEANUP_INTERVAL="500ms")
    job_id = d.http.post("/run/async", json={"prompt": "hello"}).json()["job_id"]
    d.wait_job(job_id)
    wait_until(lambda: d.http.get(f"/jobs/{job_id}").status_code == 404, 10,
               what="job retention cleanup")


def test_webhook_is_delivered_signed(make_daemon, model):
    received = []

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(status=500 if len(received) == 1 else 200)  # first attempt fails

    port = free_port()

    async def start_hook():
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    asyncio.run_coroutine_threadsafe(start_hook(), model.loop).result(5)
    secret = "whsec-test"
    d = make_daemon(STROMBOLI_WEBHOOK_SIGNING_SECRET=secret)
    job_id = d.http.post("/run/async", json={"prompt": "hello",
                                             "webhook_url": f"http://127.0.0.1:{port}/hook"}
                         ).json()["job_id"]
    wait_until(lambda: len(received) >= 2, 30, what="webhook retry")
    headers, raw = received[-1]
    payload = json.loads(raw)
    assert payload["job_id"] == job_id and payload["status"] == "completed"
    expected = hmac.new(secret.encode(), headers["X-Stromboli-Timestamp"].encode() + b"." + raw,
                        hashlib.sha256).hexdigest()
    assert headers["X-Stromboli-Signature"] == f"sha256={expected}"
    attempts = wait_until(lambda: len(d.http.get(f"/jobs/{job_id}").json().get(
        "webhook_deliveries", [])) >= 2 and d.http.get(f"/jobs/{job_id}").json()[
        "webhook_deliveries"], 10, what="recorded deliveries")
    assert [a["status_code"] for a in attempts] == [500, 200]
    assert [a["attempt"] for a in attempts] == [1, 2]


# -- jobs against a hostile client or image (issue 18) ------------------------------

def labelled_image(name: str, labels: dict[str, str]) -> str:
    """The test image with labels of its own, as any image may carry; → its reference."""
    with podman_client() as client:
        container = client.containers.create(IMAGE, ["true"])
        try:
            container.commit(repository=name, tag="test",
                             changes=[f"LABEL {key}={value}" for key, value in labels.items()])
        finally:
            container.remove(force=True)
    return f"{name}:test"


def run_in_background(d: Daemon, body: dict) -> threading.Thread:
    """A sync run whose client may be cut (the daemon is killed under it)."""
    def run() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(d.url + "/run", json=body, timeout=60)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_an_image_labelled_as_another_job_is_not_taken_over_for_it(make_daemon, model, tmp_path):
    """Podman merges an image's labels into its containers'. An image labelled
    `stromboli.job=<a running job>` must not make a restarted daemon take its container over
    for that job: each job keeps its own output, and the forged containers are removed."""
    state, tag = tmp_path / "state", marker()
    d = make_daemon(state_dir=state)
    victim = d.http.post("/run/async", json={"prompt": f"sleep 6 victim-{tag}"}).json()
    image = labelled_image(f"localhost/stromboli-forged-{tag}", {
        "stromboli.job": victim["job_id"], "stromboli.deadline": "1", "stromboli.init": "1",
        "stromboli.transcript": "forged/1", "stromboli.run": "run-forged",
        "managed-by": "stromboli"})
    try:
        own = wait_until(lambda: agent_containers(f"stromboli.job={victim['job_id']}"), 15,
                         what="the victim's container")[0].id
        # Forged containers listed before and after the victim's, whatever Podman's order.
        run_in_background(d, {"prompt": f"sleep 6 forged-a-{tag}", "podman": {"image": image}})
        other = d.http.post("/run/async", json={"prompt": f"sleep 6 other-{tag}",
                                                "podman": {"image": image}}).json()["job_id"]
        run_in_background(d, {"prompt": f"sleep 6 forged-b-{tag}", "podman": {"image": image}})
        for name in ("victim", "other", "forged-a", "forged-b"):
            wait_until(lambda: model.requests_with(f"{name}-{tag}"), 30, what=f"{name}'s CLI")
        claimed = {c.id for c in agent_containers(f"stromboli.job={victim['job_id']}")}
        assert own in claimed and len(claimed) == 3, claimed  # the image's label took effect
        d.stop(signal.SIGKILL)
        again = make_daemon(state_dir=state)
        job = again.wait_job(victim["job_id"])
        assert job["status"] == "completed", job
        assert f"echo: sleep 6 victim-{tag}" in job["output"] and "forged" not in job["output"]
        job = again.wait_job(other)  # the daemon's own labels won over the image's
        assert job["status"] == "completed" and f"echo: sleep 6 other-{tag}" in job["output"], job
        wait_until(lambda: not claimed & {c.id for c in agent_containers(
            f"stromboli.instance={again.instance}")}, 20, what="the forged containers' removal")
    finally:
        with podman_client() as client:
            client.images.remove(image, force=True)


def test_the_queue_bound_holds_against_concurrent_submits(make_daemon):
    """60 submits at once against a queue of 5 (the run slot busy): 5 are queued, in each of
    a few rounds (a race is won by chance)."""
    d = make_daemon(STROMBOLI_MAX_CONCURRENT_RUNS="1", STROMBOLI_MAX_QUEUED_JOBS="5")
    first = d.http.post("/run/async", json={"prompt": "sleep 60"}).json()["job_id"]
    d.wait_job(first, ("running",))
    for _ in range(4):  # main's code let 6 to 23 in, in 5 rounds of 7
        start, codes = threading.Barrier(60), []

        def submit(i: int) -> None:
            start.wait()
            codes.append(httpx.post(d.url + "/run/async", json={"prompt": f"queued {i}"},
                                    timeout=60).status_code)
        clients = [threading.Thread(target=submit, args=(i,)) for i in range(60)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(60)
        assert sorted(codes) == [202] * 5 + [429] * 55, codes
        pending = d.http.get("/jobs", params={"status": "pending"}).json()
        assert pending["total"] == 5
        for job in pending["jobs"]:  # emptied for the next round: none of them starts
            assert d.http.delete(f"/jobs/{job['id']}").status_code == 200
    assert d.http.delete(f"/jobs/{first}").status_code == 200


def test_a_last_event_id_sqlite_cannot_hold_is_a_400_before_any_stream(daemon):
    job_id = daemon.http.post("/run/async", json={"prompt": "hello"}).json()["job_id"]
    run_id = daemon.wait_job(job_id)["run_id"]
    streams = ((f"/jobs/{job_id}/stream", {}), ("/run/stream", {"run_id": run_id}))
    for path, params in streams:
        for last in (str(2 ** 63), str(2 ** 64), "9" * 40):
            for header, query in (({"Last-Event-ID": last}, {}), ({}, {"last_event_id": last})):
                r = daemon.http.get(path, params={**params, **query}, headers=header)
                assert r.status_code == 400, (path, last, r.status_code, r.text[:200])
                assert r.text == f"Last-Event-ID must be at most {2 ** 63 - 1}"
        r = daemon.http.get(path, params=params, headers={"Last-Event-ID": str(2 ** 63 - 1)})
        assert r.status_code == 200 and r.text == ""  # nothing after the last possible id
        r = daemon.http.get(path, params=params, headers={"Last-Event-ID": str(-2 ** 64)})
        assert r.status_code == 200 and r.text.startswith("id: 0\n")  # from the start
    assert "Traceback" not in daemon.log()


def no_history(prompt: str) -> dict:
    """A job that fails at once, before any container (a resume of a session without
    history): what it keeps is its request."""
    return {"prompt": prompt, "claude": {"resume": True, "session_id": str(uuid.uuid4())}}


def test_huge_requests_are_413_and_leave_nothing_behind(make_daemon):
    d = make_daemon()
    body = json.dumps(no_history("x" * (9 * 1024 ** 2))).encode()
    json_type = {"Content-Type": "application/json"}
    for _ in range(40):
        r = d.http.post("/run/async", content=body, headers=json_type)
        assert r.status_code == 413, r.text[:200]
        assert run_error(r) == "request body too large (limit 4194304 bytes, " \
                               "agent.max_request_bytes)"
    assert d.http.post("/run", content=body, headers=json_type).status_code == 413
    for path in ("/agents", "/agents/agent-nope/send"):
        r = d.http.post(path, content=body, headers=json_type)
        assert r.status_code == 413 and "agent.max_request_bytes" in r.json()["error"]
    assert d.http.get("/jobs").json()["total"] == 0
    stored = sum(f.stat().st_size for f in d.state_dir.glob("stromboli.db*"))
    assert stored < 1024 ** 2, f"the store grew to {stored} bytes"


def test_listing_jobs_reads_no_requests(make_daemon):
    d = make_daemon()
    ids = [d.http.post("/run/async", json=no_history(f"{i} " + "y" * (3 * 1024 ** 2))).json()
           ["job_id"] for i in range(20)]
    for job_id in ids:
        assert d.wait_job(job_id)["status"] == "failed"
    peak = memory_kib(d.proc.pid, "VmHWM")
    listed = d.http.get("/jobs")
    assert listed.json()["total"] == 20 and len(listed.content) < 50_000
    grown = memory_kib(d.proc.pid, "VmHWM") - peak
    assert grown < 20 * 1024, f"GET /jobs of 60 MB of requests took the peak RSS up {grown} KiB"


def test_podman_environment_takes_only_upstreams_single_container_form(daemon):
    refused = (({"junk": "x" * 1000}, 'unknown podman.environment key "junk"'),
               ({"type": "", "path": {"a": [1] * 1000}}, "podman.environment.path must be a "
                                                         "string"),
               ({"type": "compose", "path": "/x.yml", "service": "dev"},
                "compose environments are not supported by this server"))
    for environment, message in refused:
        for path in ("/run/async", "/run", "/agents"):
            r = daemon.http.post(path, json={"prompt": "hello",
                                             "podman": {"environment": environment}})
            assert r.status_code == 400 and message in r.json()["error"], (path, r.text[:200])
    for environment in ({}, {"type": ""}, {"type": None, "path": "/x.yml", "service": "dev",
                                           "build_timeout": "15m"}):
        job_id = daemon.http.post("/run/async", json={
            "prompt": "hello", "podman": {"environment": environment}}).json()["job_id"]
        assert daemon.wait_job(job_id)["status"] == "completed"
        with contextlib.closing(sqlite3.connect(daemon.state_dir / "stromboli.db")) as db:
            kept = db.execute("SELECT json_extract(request, '$.podman') FROM jobs WHERE id=?",
                              (job_id,)).fetchone()[0]
        assert json.loads(kept) == {}  # nothing of it is kept

# ---------------------------------------------------------------------------
# Sessions — resume, continue, fork, serialisation, the history API
# ---------------------------------------------------------------------------

def prompts_seen(model: ScriptedModel, tag: str) -> list[list[str]]:
    """For each model request mentioning `tag`, the user prompts it carried."""
    return [user_prompts(r["messages"]) for r in model.requests_with(tag)]


def test_resume_in_a_fresh_container_and_another_workdir(daemon, model):
    tag = marker()
    first = daemon.http.post("/run", json={"prompt": f"first turn {tag}"}).json()
    session = first["session_id"]
    second = daemon.http.post("/run", json={
        "prompt": f"second turn {tag}", "workdir": "/workspace/elsewhere",
        "claude": {"session_id": session, "resume": True}}).json()
    assert second["status"] == "completed", second
    assert second["session_id"] == session
    last = prompts_seen(model, tag)[-1]
    assert last[0] == f"first turn {tag}" and last[-1] == f"second turn {tag}"
    # Usage covers this run only: the second request's input, not the whole session.
    assert second["usage"]["input_tokens"] == estimate_tokens(model.requests_with(tag)[-1]["messages"])


def test_continue(daemon, model):
    tag = marker()
    session = daemon.http.post("/run", json={"prompt": f"one {tag}"}).json()["session_id"]
    body = daemon.http.post("/run", json={"prompt": f"two {tag}", "claude": {
        "session_id": session, "continue": True}}).json()
    assert body["status"] == "completed" and body["session_id"] == session
    assert prompts_seen(model, tag)[-1] == [f"one {tag}", f"two {tag}"]


def test_fork_gets_a_new_id_and_leaves_the_original_intact(daemon, model):
    tag = marker()
    original = daemon.http.post("/run", json={"prompt": f"root {tag}"}).json()["session_id"]
    before = daemon.http.get(f"/sessions/{original}/messages").json()["total"]
    fork = daemon.http.post("/run", json={"prompt": f"branch {tag}", "claude": {
        "session_id": original, "fork_session": True}}).json()
    assert fork["status"] == "completed", fork
    assert fork["session_id"] != original
    assert prompts_seen(model, tag)[-1] == [f"root {tag}", f"branch {tag}"]
    assert daemon.http.get(f"/sessions/{original}/messages").json()["total"] == before
    forked = daemon.http.get(f"/sessions/{fork['session_id']}/messages").json()
    assert forked["total"] > before
    texts = json.dumps(forked["messages"])
    assert f"root {tag}" in texts and f"branch {tag}" in texts
    # The original goes on without the branch.
    daemon.http.post("/run", json={"prompt": f"trunk {tag}", "claude": {
        "session_id": original, "resume": True}})
    assert prompts_seen(model, tag)[-1] == [f"root {tag}", f"trunk {tag}"]


def test_async_fork_returns_the_new_id_at_once(daemon):
    original = daemon.http.post("/run", json={"prompt": "hello"}).json()["session_id"]
    accepted = daemon.http.post("/run/async", json={"prompt": "hello again", "claude": {
        "session_id": original, "fork_session": True}}).json()
    assert accepted["session_id"] != original
    job = daemon.wait_job(accepted["job_id"])
    assert job["status"] == "completed" and job["session_id"] == accepted["session_id"]


def test_fork_and_resume_of_one_session_with_one_slot_do_not_deadlock(make_daemon):
    d = make_daemon(STROMBOLI_MAX_CONCURRENT_RUNS="1")
    source = d.http.post("/run", json={"prompt": "hello"}).json()["session_id"]
    fork = d.http.post("/run/async", json={"prompt": "sleep 1", "claude": {
        "session_id": source, "fork_session": True}}).json()
    resume = d.http.post("/run/async", json={"prompt": "sleep 1", "claude": {
        "session_id": source, "resume": True}}).json()
    assert d.wait_job(fork["job_id"], timeout=30)["status"] == "completed"
    assert d.wait_job(resume["job_id"], timeout=30)["status"] == "completed"


def test_failed_fork_leaves_no_half_session(daemon):
    source = daemon.http.post("/run", json={"prompt": "hello"}).json()["session_id"]
    before = {s["id"] for s in daemon.http.get("/sessions").json()["sessions"]}
    r = daemon.http.post("/run", json={"prompt": "hello", "claude": {
        "session_id": source, "fork_session": True}, "workdir": "/proc/forbidden"})
    assert r.status_code == 500
    after = {s["id"] for s in daemon.http.get("/sessions").json()["sessions"]}
    assert after == before


def test_resume_without_history_is_an_error_not_a_new_conversation(daemon):
    session = str(uuid.uuid4())
    for options in ({"resume": True}, {"continue": True}, {"fork_session": True}):
        r = daemon.http.post("/run", json={"prompt": "hello",
                                           "claude": {"session_id": session, **options}})
        assert r.status_code == 404
        assert run_error(r) == f"session has no history: {session}"
    r = daemon.http.post("/run", json={"prompt": "hello", "claude": {"resume": True}})
    assert r.status_code == 400 and "need claude.session_id" in run_error(r)


def test_new_run_on_a_session_with_history_is_409(daemon):
    session = daemon.http.post("/run", json={"prompt": "hello"}).json()["session_id"]
    r = daemon.http.post("/run", json={"prompt": "hello", "claude": {"session_id": session}})
    assert r.status_code == 409 and "already has history" in run_error(r)


def test_runs_on_one_session_are_serialised(daemon):
    session = str(uuid.uuid4())
    first = daemon.http.post("/run/async", json={"prompt": "sleep 2",
                                                 "claude": {"session_id": session}}).json()
    second = daemon.http.post("/run/async", json={"prompt": "hello", "claude": {
        "session_id": session, "resume": True}}).json()
    label = f"stromboli.session={session}"
    peak = [0]

    def second_finished() -> bool:
        peak[0] = max(peak[0], len(agent_containers(label)))
        assert peak[0] <= 1
        return daemon.http.get(f"/jobs/{second['job_id']}").json()["status"] not in (
            "pending", "running")
    wait_until(second_finished, 60, 0.05, "the second run on the session to finish")
    assert peak[0] == 1  # the session's containers were seen, one at a time
    a, b = daemon.wait_job(first["job_id"]), daemon.wait_job(second["job_id"])
    assert a["status"] == b["status"] == "completed", (a, b)
    # B starts once A's container is gone; A's row is written a moment later.
    assert parse_time(b["started_at"]) >= parse_time(a["finished_at"]) - 0.5
    assert parse_time(b["started_at"]) >= parse_time(a["started_at"]) + 2


def test_session_list_messages_pagination_and_single_message(daemon):
    tag = marker()
    session = daemon.http.post("/run", json={"prompt": f"title me {tag}"}).json()["session_id"]
    daemon.http.post("/run", json={"prompt": f"more {tag}",
                                   "claude": {"session_id": session, "resume": True}})
    listed = daemon.http.get("/sessions").json()["sessions"]
    newest = listed[0]
    assert newest["id"] == session and newest["title"] == f"title me {tag}"
    assert newest["size_bytes"] > 1000  # the transcript, at least
    assert daemon.http.get("/sessions", params={"limit": 1, "offset": 1}).json()["sessions"] \
        == listed[1:2]
    page = daemon.http.get(f"/sessions/{session}/messages").json()
    assert page["offset"] == 0 and page["limit"] == 50
    total = page["total"]
    assert total >= 4 and page["has_more"] is False
    assert page["usage"]["total_tokens"] > 0
    types = [m["type"] for m in page["messages"]]
    assert "queue-operation" not in types and "user" in types and "assistant" in types
    first_page = daemon.http.get(f"/sessions/{session}/messages",
                                 params={"limit": 2, "offset": 0}).json()
    assert len(first_page["messages"]) == 2 and first_page["has_more"] is True
    last_page = daemon.http.get(f"/sessions/{session}/messages",
                                params={"limit": 2, "offset": total - 1}).json()
    assert len(last_page["messages"]) == 1 and last_page["has_more"] is False
    clamped = daemon.http.get(f"/sessions/{session}/messages",
                              params={"limit": 1000, "offset": -3}).json()
    assert clamped["limit"] == 200 and clamped["offset"] == 0
    assistant = next(m for m in page["messages"] if m["type"] == "assistant")
    assert assistant["content"]["role"] == "assistant"
    assert assistant["content"]["content"][0]["type"] == "text"
    one = daemon.http.get(f"/sessions/{session}/messages/{assistant['uuid']}").json()
    assert one == {"message": assistant}
    r = daemon.http.get(f"/sessions/{session}/messages/no-such-message")
    assert r.status_code == 404 and r.json() == {"error": "message not found: no-such-message"}


def test_transcript_parsing_tolerates_bad_lines(daemon):
    session = daemon.http.post("/run", json={"prompt": "hello"}).json()["session_id"]
    home = daemon.state_dir / "sessions" / session
    transcript = next(home.glob(".claude/projects/*/*.jsonl"))
    before = daemon.http.get(f"/sessions/{session}/messages").json()["total"]
    with transcript.open("a") as fh:
        fh.write('{"type": "future-kind", "uuid": "u-future"}\n')  # not a message: left out
        fh.write('{"type": "user", "uuid": "u-kept", "message": {"content": "still here"}}\n')
        fh.write("not json at all\n")
        fh.write('{"type": "user", "message": {"content": "' + "x" * (11 * 1024 * 1024) + '"}}\n')
        fh.write('{"type": "user", "uuid": "u-partial", "mess')  # a partial last line
    started = time.monotonic()
    after = daemon.http.get(f"/sessions/{session}/messages").json()
    assert time.monotonic() - started < 10
    assert after["total"] == before + 1
    assert after["messages"][-1]["uuid"] == "u-kept"


def test_delete_session(daemon):
    session = daemon.http.post("/run", json={"prompt": "hello"}).json()["session_id"]
    job = daemon.http.post("/run/async", json={"prompt": "sleep 30", "claude": {
        "session_id": session, "resume": True}}).json()
    daemon.wait_job(job["job_id"], ("running",))
    r = daemon.http.delete(f"/sessions/{session}")
    assert r.status_code == 409 and r.json()["success"] is False
    daemon.http.delete(f"/jobs/{job['job_id']}")
    r = daemon.http.delete(f"/sessions/{session}")
    assert r.json() == {"success": True, "session_id": session}
    assert not (daemon.state_dir / "sessions" / session).exists()
    assert session not in [s["id"] for s in daemon.http.get("/sessions").json()["sessions"]]
    r = daemon.http.delete(f"/sessions/{session}")
    assert r.status_code == 404 and r.json() == {"success": False,
                                                 "error": f"session not found: {session}"}


@pytest.mark.parametrize("bad", ["..", "%2e%2e", "..%2F..%2Fetc", "a%2Fb", "%00", "*", "x%3Fy",
                                 "ABCDEF00-0000-4000-8000-000000000000", "not-a-uuid",
                                 "0" * 300])
def test_session_id_traversal_is_rejected(daemon, bad):
    for method, path in (("GET", f"/sessions/{bad}/messages"),
                         ("GET", f"/sessions/{bad}/messages/m1"),
                         ("DELETE", f"/sessions/{bad}")):
        r = daemon.http.request(method, path)
        # Such an id can never exist: 404, as upstream (the router's own when it cannot even
        # match the path), and no filesystem access.
        assert r.status_code == 404, (path, r.status_code)
        assert r.json()["error"] in ("not found", "session not found"), (path, r.text)
    r = daemon.http.post("/run", json={"prompt": "x", "claude": {"session_id": bad}})
    assert r.status_code == 400 and "invalid session ID" in run_error(r)


def test_unknown_session_is_404(daemon):
    session = str(uuid.uuid4())
    r = daemon.http.get(f"/sessions/{session}/messages")
    assert r.status_code == 404 and r.json() == {"error": f"session history not found: {session}"}


def test_path_session_ids_that_are_no_uuid_are_404(daemon):
    """The upstream SDK's e2e suite accepts only 404/500 for these (issue 12)."""
    for method, path in (("DELETE", "/sessions/sess-example123"),
                         ("GET", "/sessions/sess-example123/messages"),
                         ("GET", "/sessions/sess-example123/messages/m1")):
        r = daemon.http.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"] == "session not found"
        assert r.json().get("success", False) is False


def test_messages_validate_against_the_served_document(daemon):
    """Every message the daemon serves fits its own document (a validating proxy in front
    of it would otherwise turn the answer into a 500)."""
    import jsonschema
    tag = marker()
    session = daemon.http.post("/run", json={
        "prompt": f"bash: echo {tag}", "claude": {"dangerously_skip_permissions": True}}
    ).json()["session_id"]
    doc = daemon.http.get("/swagger/doc.json").json()
    schema = {**doc["paths"]["/sessions/{id}/messages"]["get"]["responses"]["200"]["schema"],
              "definitions": doc["definitions"]}
    page = daemon.http.get(f"/sessions/{session}/messages").json()
    assert page["messages"], page
    jsonschema.validate(page, schema)  # OpenAPI 2.0 schemas are JSON Schema draft 4
    types = {m["type"] for m in page["messages"]}
    assert types <= {"user", "assistant"} and types == {"user", "assistant"}, types
    transcript = next((daemon.state_dir / "sessions" / session / ".claude/projects").glob(
        f"*/{session}.jsonl")).read_text()
    assert '"type":"attachment"' in transcript or '"type":"last-prompt"' in transcript \
        or '"type":"system"' in transcript, "the CLI wrote no bookkeeping line to leave out"


def test_jobs_paginate_with_total(daemon):
    ids = [daemon.http.post("/run/async", json={"prompt": f"page {marker()}"}).json()["job_id"]
           for _ in range(3)]
    for job_id in ids:
        daemon.wait_job(job_id)
    first = daemon.http.get("/jobs", params={"limit": 2}).json()
    assert len(first["jobs"]) == 2 and first["limit"] == 2 and first["offset"] == 0
    assert first["total"] >= 3
    second = daemon.http.get("/jobs", params={"limit": 2, "offset": 2}).json()
    assert {j["id"] for j in first["jobs"]}.isdisjoint(j["id"] for j in second["jobs"])
    newest_first = [j["id"] for j in first["jobs"]]
    assert newest_first == [ids[2], ids[1]]  # no job of another test came in between
    assert daemon.http.get("/jobs").json()["total"] == first["total"]


# ---------------------------------------------------------------------------
# Agents — persistent processes: /agents/* (issue 14)
# ---------------------------------------------------------------------------
# One agent = one long-lived container running the real CLI in stream-json mode; each turn
# is a line on its stdin, each stdout line an `output` event on /agents/{id}/stream. The
# streams are read line by line here (not with iter_sse) so that keep-alive comments count
# against each read's deadline: no test waits on a silent stream for ever.

UUID4_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
RFC3339_FRACTION_RE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d)$"
AGENT_NOT_FOUND = {"error": "agent: not found"}
AGENT_EXITED = {"error": "agent: process has exited"}
IDLE_TIMEOUT_REACHED = "agent: idle timeout reached"


class AgentEvent:
    """One SSE event of an agent stream: its `id:` (None when absent), `event:` and `data:`."""

    def __init__(self, fields: dict[str, str]):
        self.id = fields.get("id")
        self.event = fields.get("event", "message")
        self.data = fields.get("data", "")

    @property
    def body(self) -> dict:
        return json.loads(self.data)

    def __repr__(self) -> str:
        return f"AgentEvent(id={self.id!r}, event={self.event!r}, data={self.data[:200]!r})"


class AgentStream:
    """GET /agents/{id}/stream, kept open across reads: `read(until)` collects events until
    `until(events)` holds or the stream ends, within `timeout` seconds."""

    def __init__(self, d: Daemon, agent_id: str, headers: dict | None = None,
                 params: dict | None = None):
        self.stack = contextlib.ExitStack()
        client = self.stack.enter_context(
            httpx.Client(base_url=d.url, timeout=httpx.Timeout(10, read=20)))
        self.response = self.stack.enter_context(client.stream(
            "GET", f"/agents/{agent_id}/stream", headers=headers or {}, params=params or {}))
        self.events: list[AgentEvent] = []
        self.comments: list[str] = []
        self.ended = False
        self._lines = self.response.iter_lines()

    def __enter__(self) -> AgentStream:
        assert self.response.status_code == 200, (self.response.status_code,
                                                  self.response.read())
        assert self.response.headers["content-type"].startswith("text/event-stream")
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def read(self, until=lambda events: False, timeout: float = 90,
             comments: int | None = None) -> list[AgentEvent]:
        """… or, with `comments`, until that many comment lines have come."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while not self.ended and not until(self.events) and (
                comments is None or len(self.comments) < comments):
            if time.monotonic() > deadline:
                raise AssertionError(f"stream: nothing conclusive after {timeout}s: {self.events}")
            try:
                line = next(self._lines)
            except StopIteration:
                self.ended = True
                break
            if line.startswith(":"):  # a comment (keep-alive)
                self.comments.append(line)
                continue
            if line == "":
                if fields:
                    self.events.append(AgentEvent(fields))
                fields = {}
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields \
                else value
        return self.events


def turn_ended(turn_id: str | None = None):
    """`until` for AgentStream.read: a turn_end (of that turn, when given) has arrived."""
    return lambda events: any(e.event == "turn_end" and (turn_id is None
                                                         or e.body.get("turn_id") == turn_id)
                              for e in events)


def stream_closed(events: list[AgentEvent]) -> bool:
    return any(e.event == "closed" for e in events)


def assert_event_ids_increase(events: list[AgentEvent]) -> list[int]:
    ids = [e.id for e in events if e.event != "closed"]
    assert all(i is not None and re.fullmatch(r"\d+", i) for i in ids), events
    numbers = [int(i) for i in ids]
    assert numbers == sorted(set(numbers)), numbers  # strictly increasing
    return numbers


@pytest.fixture
def new_agent():
    """POST /agents on a daemon, expecting 201; every agent made is deleted after the test
    (each live agent holds a run slot of its daemon)."""
    made: list[tuple[Daemon, str]] = []

    def make(d: Daemon, **body) -> dict:
        r = d.http.post("/agents", json=body)
        assert r.status_code == 201, r.text
        made.append((d, r.json()["id"]))
        return r.json()
    yield make
    for d, agent_id in made:
        with contextlib.suppress(httpx.HTTPError):
            d.http.delete(f"/agents/{agent_id}", timeout=30)


def agent_snapshot(d: Daemon, agent_id: str) -> dict:
    r = d.http.get(f"/agents/{agent_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_agent(d: Daemon, agent_id: str, status: str, timeout: float = 15) -> dict:
    def reached():
        snapshot = agent_snapshot(d, agent_id)
        return snapshot if snapshot["status"] == status else None
    return wait_until(reached, timeout, 0.1, f"agent {agent_id} {status}")


def message_texts(page: dict, kind: str) -> list[str]:
    return [b.get("text", "") for m in page["messages"] if m["type"] == kind
            for b in m["content"]["content"] if isinstance(b, dict) and b.get("type") == "text"]


def test_agent_api_create_with_a_prompt_streams_one_turn(daemon, new_agent):
    tag = marker()
    created = new_agent(daemon, prompt=f"hello {tag}")
    assert re.fullmatch(f"agent-{UUID4_RE}", created["id"]), created
    assert re.fullmatch(UUID4_RE, created["session_id"]), created
    assert created["status"] in ("starting", "generating"), created
    assert created["idle_timeout_seconds"] == 1800 and created["turns_completed"] == 0
    assert "idle_timeout_disabled" not in created and "exit_error" not in created
    assert re.match(RFC3339_FRACTION_RE, created["created_at"]), created
    assert re.match(RFC3339_FRACTION_RE, created["last_activity_at"]), created
    with AgentStream(daemon, created["id"]) as stream:  # no Last-Event-ID: from the start
        events = stream.read(turn_ended())
    assert_event_ids_increase(events)
    assert events[0].event == "turn_start", events
    turn_id = events[0].body["turn_id"]
    assert re.fullmatch(f"turn-{UUID4_RE}", turn_id)
    for event in events:
        assert event.body["type"] == event.event and event.body["at"], event
    outputs = [json.loads(e.body["content"]) for e in events if e.event == "output"]
    assert outputs and all(isinstance(o, dict) and "type" in o for o in outputs), outputs
    results = [o for o in outputs if o["type"] == "result"]
    assert [r.get("result") for r in results] == ["Hello from the scripted model"], results
    end = events[-1]
    assert end.event == "turn_end" and end.body["turn_id"] == turn_id
    usage = end.body["usage"]
    assert isinstance(usage["input_tokens"], int) and usage["input_tokens"] > 0, usage
    assert isinstance(usage["output_tokens"], int) and usage["output_tokens"] > 0, usage
    assert usage["total_tokens"] == sum(usage[k] for k in (
        "input_tokens", "output_tokens", "cache_creation_input_tokens",
        "cache_read_input_tokens")), usage
    assert [e.event for e in events].count("turn_start") == 1, events
    snapshot = wait_agent(daemon, created["id"], "idle")
    assert snapshot["turns_completed"] == 1
    assert snapshot["session_id"] == created["session_id"]
    assert parse_time(snapshot["last_activity_at"]) >= parse_time(created["created_at"])
    listed = daemon.http.get("/agents")
    assert listed.status_code == 200
    assert [a["id"] for a in listed.json()].count(created["id"]) == 1


def test_agent_api_two_turns_share_one_warm_container_and_conversation(daemon, model, new_agent):
    tag = marker()
    created = new_agent(daemon, prompt=f"first {tag}", podman={"memory": "300m"})
    agent_id = created["id"]
    label = f"stromboli.agent={agent_id}"
    with AgentStream(daemon, agent_id) as stream:
        stream.read(turn_ended())
        first = agent_containers(label)
        assert len(first) == 1, first
        with podman_client() as client:
            info = client.containers.get(first[0].id).inspect()
        assert info["HostConfig"]["Memory"] == 300 * 1024 * 1024  # podman options apply
        assert info["HostConfig"]["PidsLimit"] == 512  # hardened as runs are
        assert info["Config"]["User"] == "1000:1000"
        assert f"first {tag}" not in json.dumps(info["Config"]["Cmd"])  # turns go on stdin
        labels = first[0].labels
        assert labels["managed-by"] == "stromboli"
        assert labels["stromboli.session"] == created["session_id"]
        assert labels["stromboli.instance"] == daemon.instance
        wait_agent(daemon, agent_id, "idle")
        r = daemon.http.post(f"/agents/{agent_id}/send", json={"prompt": f"second {tag}"})
        assert r.status_code == 202, r.text
        assert list(r.json()) == ["turn_id"]
        turn_id = r.json()["turn_id"]
        assert re.fullmatch(f"turn-{UUID4_RE}", turn_id)
        events = stream.read(turn_ended(turn_id))
    assert_event_ids_increase(events)
    assert [e.body.get("turn_id") for e in events if e.event == "turn_start"][-1] == turn_id
    second = agent_containers(label)
    assert [c.id for c in second] == [first[0].id]  # the same process, still there
    with podman_client() as client:
        assert client.containers.get(first[0].id).status == "running"
    snapshot = wait_agent(daemon, agent_id, "idle")
    assert snapshot["turns_completed"] == 2 and snapshot["session_id"] == created["session_id"]
    conversations = [user_prompts(r["messages"]) for r in model.requests_with(f"second {tag}")]
    assert any(any(f"first {tag}" in p for p in prompts) for prompts in conversations), \
        conversations  # one conversation: the second turn's request carries the first


def test_agent_api_refusals(daemon, new_agent):
    tag = marker()
    asked = str(uuid.uuid4())
    created = new_agent(daemon, claude={"session_id": asked, "resume": True})
    assert created["status"] == "starting", created  # no prompt: nothing to say yet
    assert created["session_id"] != asked  # an agent's session is always a new one
    agent_id = created["id"]
    time.sleep(2)
    assert agent_snapshot(daemon, agent_id)["status"] == "starting"  # the CLI waits for input
    r = daemon.http.post(f"/agents/{agent_id}/send", json={"prompt": f"sleep 3 {tag}"})
    assert r.status_code == 202, r.text
    again = daemon.http.post(f"/agents/{agent_id}/send", json={"prompt": "one more"})
    assert again.status_code == 409, again.text
    assert again.json() == {"error": "agent: a turn is already in progress"}
    with AgentStream(daemon, agent_id) as stream:
        stream.read(turn_ended(r.json()["turn_id"]))
    wait_agent(daemon, agent_id, "idle")
    for blank in ({"prompt": ""}, {"prompt": "  \n "}, {}):
        r = daemon.http.post(f"/agents/{agent_id}/send", json=blank)
        assert r.status_code == 400, (blank, r.text)
        assert r.json() == {"error": "agent: invalid request: prompt is required"}, blank
    assert agent_snapshot(daemon, agent_id)["turns_completed"] == 1  # nothing sent
    unknown = f"agent-{uuid.uuid4()}"
    for method, path, body in (("GET", f"/agents/{unknown}", None),
                               ("POST", f"/agents/{unknown}/send", {"prompt": "hello"}),
                               ("GET", f"/agents/{unknown}/stream", None),
                               ("DELETE", f"/agents/{unknown}", None)):
        r = daemon.http.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json() == AGENT_NOT_FOUND, (method, path)
    before = {a["id"] for a in daemon.http.get("/agents").json()}
    r = daemon.http.post("/agents", json={"prompt": "hello", "idle_timeout_seconds": -1})
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": "agent: invalid request: idle_timeout_seconds must be non-negative"}
    assert {a["id"] for a in daemon.http.get("/agents").json()} == before  # none made


def test_agent_api_idle_timeout_ends_the_agent(daemon, new_agent):
    kept = new_agent(daemon, idle_timeout_seconds=2, disable_idle_timeout=True)
    assert kept["idle_timeout_disabled"] is True
    created = new_agent(daemon, prompt="hello", idle_timeout_seconds=2)
    assert created["idle_timeout_seconds"] == 2 and "idle_timeout_disabled" not in created
    agent_id = created["id"]
    with AgentStream(daemon, agent_id) as stream:
        stream.read(turn_ended())
        turn_over = time.monotonic()
        wait_until(lambda: agent_containers(f"stromboli.agent={agent_id}"), 10,
                   what="the agent's container")
        events = stream.read(lambda events: False, timeout=30)  # to its end
        assert stream.ended
    assert time.monotonic() - turn_over < 12, "the idle watchdog took too long"
    assert_event_ids_increase(events)
    assert [e.event for e in events[-2:]] == ["exited", "closed"], events
    assert events[-2].body["error"] == IDLE_TIMEOUT_REACHED
    assert events[-1].data == "{}"
    snapshot = agent_snapshot(daemon, agent_id)
    assert snapshot["status"] == "exited" and snapshot["exit_error"] == IDLE_TIMEOUT_REACHED
    wait_until(lambda: not agent_containers(f"stromboli.agent={agent_id}"), 10,
               what="the idle agent's container removed")
    r = daemon.http.post(f"/agents/{agent_id}/send", json={"prompt": "are you there?"})
    assert r.status_code == 410 and r.json() == AGENT_EXITED, r.text
    with AgentStream(daemon, agent_id) as again:  # an exited agent: exited, closed, the end
        late = again.read(timeout=20)
        assert again.ended
    assert [e.event for e in late[-2:]] == ["exited", "closed"], late
    assert late[-2].body["error"] == IDLE_TIMEOUT_REACHED
    time.sleep(3)  # the kept agent has been idle for more than twice its timeout by now
    spared = agent_snapshot(daemon, kept["id"])
    assert spared["status"] != "exited" and "exit_error" not in spared, spared
    assert agent_containers(f"stromboli.agent={kept['id']}")


def test_agent_api_a_failed_turn_leaves_the_agent_usable(daemon, new_agent):
    agent_id = new_agent(daemon, prompt="please fail 500")["id"]
    with AgentStream(daemon, agent_id) as stream:
        failed = stream.read(turn_ended())
        results = [json.loads(e.body["content"]) for e in failed if e.event == "output"
                   and json.loads(e.body["content"]).get("type") == "result"]
        assert len(results) == 1 and results[0].get("is_error") is True, results
        assert "scripted failure 500" in json.dumps(results[0]), results
        wait_agent(daemon, agent_id, "idle")
        r = daemon.http.post(f"/agents/{agent_id}/send", json={"prompt": "hello again"})
        assert r.status_code == 202, r.text
        events = stream.read(turn_ended(r.json()["turn_id"]))
    replies = [json.loads(e.body["content"]).get("result") for e in events
               if e.event == "output" and json.loads(e.body["content"]).get("type") == "result"]
    assert replies[-1] == "Hello from the scripted model", replies
    assert wait_agent(daemon, agent_id, "idle")["turns_completed"] == 2


def test_agent_api_podman_timeout_bounds_its_lifetime(daemon, new_agent):
    born = time.monotonic()
    created = new_agent(daemon, disable_idle_timeout=True, podman={"timeout": "3s"})
    agent_id = created["id"]
    wait_until(lambda: agent_containers(f"stromboli.agent={agent_id}"), 10,
               what="the agent's container")
    with AgentStream(daemon, agent_id) as stream:
        events = stream.read(timeout=25)  # to its end: the lifetime is up after 3 s
        assert stream.ended
    assert 3 <= time.monotonic() - born < 20  # not before its lifetime, nor long after
    assert [e.event for e in events[-2:]] == ["exited", "closed"], events
    snapshot = agent_snapshot(daemon, agent_id)
    assert snapshot["status"] == "exited" and snapshot["exit_error"], snapshot
    assert snapshot["exit_error"] != IDLE_TIMEOUT_REACHED
    assert events[-2].body["error"] == snapshot["exit_error"]
    wait_until(lambda: not agent_containers(f"stromboli.agent={agent_id}"), 10,
               what="the agent's container removed")


def test_agent_api_its_own_output_does_not_keep_an_idle_agent_alive(daemon, new_agent):
    """A detached loop printing a line every second (started by a hook: its stdout is the
    container's) is no client's turn: the agent still ends once idle (issue 18, item 6)."""
    ticking = "(while true; do echo tick; sleep 1; done) &"
    created = new_agent(daemon, idle_timeout_seconds=3,
                        podman={"lifecycle": {"post_start": [ticking]}})
    with AgentStream(daemon, created["id"]) as stream:
        events = stream.read(timeout=40)  # to its end
        assert stream.ended
    ticks = [e for e in events if e.event == "output" and e.body["content"] == "tick"]
    assert len(ticks) >= 2, events[-5:]  # it kept printing
    assert [e.event for e in events[-2:]] == ["exited", "closed"], events[-5:]
    assert events[-2].body["error"] == IDLE_TIMEOUT_REACHED
    snapshot = agent_snapshot(daemon, created["id"])
    assert snapshot["last_activity_at"] == created["last_activity_at"]  # no turn: no activity


def test_agent_api_max_lifetime_ends_even_a_busy_agent(make_daemon, new_agent):
    d = make_daemon(STROMBOLI_AGENT_MAX_LIFETIME="6s")
    created = new_agent(d, prompt="sleep 60 then answer", disable_idle_timeout=True)
    with AgentStream(d, created["id"]) as stream:
        events = stream.read(timeout=45)  # to its end
        assert stream.ended
    lifetime = "agent: maximum lifetime reached (6s since its creation; agent.max_lifetime)"
    assert [e.event for e in events[-2:]] == ["exited", "closed"], events[-5:]
    assert events[-2].body["error"] == lifetime
    assert "turn_start" in [e.event for e in events] and "turn_end" not in [
        e.event for e in events]  # its turn was still running: nothing spares it
    snapshot = agent_snapshot(d, created["id"])
    assert snapshot["status"] == "exited" and snapshot["exit_error"] == lifetime
    assert parse_time(events[-2].body["at"]) - parse_time(created["created_at"]) >= 6
    wait_until(lambda: not agent_containers(f"stromboli.agent={created['id']}"), 10,
               what="the agent's container removed")


def stream_status(d: Daemon, agent_id: str) -> httpx.Response:
    """GET /agents/{id}/stream, closed as soon as the answer's head is in."""
    with httpx.Client(base_url=d.url, timeout=10) as client, \
            client.stream("GET", f"/agents/{agent_id}/stream") as response:
        if response.status_code != 200:
            response.read()
        return response


def test_agent_api_followers_past_the_cap_get_429(make_daemon, new_agent):
    d = make_daemon(STROMBOLI_AGENT_MAX_FOLLOWERS="2")
    agent_id = new_agent(d)["id"]
    with AgentStream(d, agent_id), AgentStream(d, agent_id):
        r = stream_status(d, agent_id)
        assert r.status_code == 429, r.status_code
        assert r.json() == {"error": "agent: 2 clients follow this agent already "
                                     "(agent.max_followers); retry later"}
        assert int(r.headers["Retry-After"]) > 0
    # once they went away, there is room again (the daemon notices within a second)
    wait_until(lambda: stream_status(d, agent_id).status_code == 200, 10, 0.5,
               "a follower admitted again")
    assert d.http.get(f"/agents/{agent_id}").json()["status"] != "exited"


def test_agent_api_a_revived_agent_is_checked_against_the_configuration_in_force(
        make_daemon, new_agent, tmp_path):
    """An agent created with an image the allowlist then allowed is not started again by
    a daemon whose allowlist refuses it (issue 18, item 10): it is exited, saying why."""
    state = tmp_path / "state"
    d = make_daemon(state_dir=state, STROMBOLI_AGENT_ALLOWED_IMAGE_PATTERNS=IMAGE)
    created = new_agent(d, prompt="hello", podman={"image": IMAGE})
    agent_id = created["id"]
    with AgentStream(d, agent_id) as stream:
        stream.read(turn_ended())
    d.stop()
    again = make_daemon(state_dir=state,
                        STROMBOLI_AGENT_ALLOWED_IMAGE_PATTERNS="localhost/another-image:*")
    snapshot = wait_agent(again, agent_id, "exited", timeout=30)
    refused = ("agent: could not be started again after the daemon restarted: the "
               "configuration now in force refuses its request: image validation failed: "
               f'image "{IMAGE}" not in allowed patterns')
    assert snapshot["exit_error"] == refused
    assert agent_containers(f"stromboli.agent={agent_id}") == []  # never started
    with AgentStream(again, agent_id) as stream:
        events = stream.read(timeout=20)
        assert stream.ended
    assert [e.event for e in events[-2:]] == ["exited", "closed"]
    assert events[-2].body["error"] == refused
    r = again.http.post(f"/agents/{agent_id}/send", json={"prompt": "hello"})
    assert r.status_code == 410 and r.json() == AGENT_EXITED, r.text


def test_agent_api_concurrent_sends_start_one_turn(daemon, new_agent):
    agent_id = new_agent(daemon)["id"]
    barrier = threading.Barrier(4)
    answers: list[httpx.Response] = []

    def send(i: int) -> None:
        barrier.wait(5)
        answers.append(httpx.post(f"{daemon.url}/agents/{agent_id}/send",
                                  json={"prompt": f"sleep 2 racer {i}"}, timeout=30))
    racers = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(30)
    assert sorted(r.status_code for r in answers) == [202, 409, 409, 409], \
        [(r.status_code, r.text) for r in answers]
    turn_id = next(r.json()["turn_id"] for r in answers if r.status_code == 202)
    with AgentStream(daemon, agent_id) as stream:
        events = stream.read(turn_ended(turn_id))
    assert [e.body["turn_id"] for e in events if e.event == "turn_start"] == [turn_id]
    assert wait_agent(daemon, agent_id, "idle")["turns_completed"] == 1


def test_agent_api_a_multiline_prompt_is_one_turn(daemon, model, new_agent):
    tag = marker()
    prompt = f'two lines {tag}\n{{"type":"user","message":{{"role":"user","content":"x"}}}}\n' \
             'and a "quote", a tab\t, and ünïcødé ✓'
    agent_id = new_agent(daemon, prompt=prompt)["id"]
    with AgentStream(daemon, agent_id) as stream:
        events = stream.read(turn_ended())
    results = [json.loads(e.body["content"]) for e in events if e.event == "output"]
    results = [o for o in results if o["type"] == "result"]
    assert [o.get("result") for o in results] == [f"echo: {prompt}"], results
    assert [user_prompts(r["messages"]) for r in model.requests_with(tag)] == [[prompt]]
    assert wait_agent(daemon, agent_id, "idle")["turns_completed"] == 1  # one turn, not three


def test_agent_api_idle_watchdog_spares_a_turn_longer_than_the_timeout(daemon, new_agent):
    created = new_agent(daemon, prompt="sleep 5 then answer", idle_timeout_seconds=2)
    with AgentStream(daemon, created["id"]) as stream:
        events = stream.read(turn_ended(), timeout=60)
        assert [e.event for e in events].count("exited") == 0, events
        results = [json.loads(e.body["content"]) for e in events if e.event == "output"]
        assert [o.get("result") for o in results if o["type"] == "result"] == [
            "echo: sleep 5 then answer"]
        rest = stream.read(timeout=20)  # then idle: it ends 2 s later
    assert rest[-2].body["error"] == IDLE_TIMEOUT_REACHED
    assert agent_snapshot(daemon, created["id"])["turns_completed"] == 1


def test_agent_api_delete_during_a_turn_stops_it(daemon, new_agent):
    agent_id = new_agent(daemon, prompt="sleep 60 and never mind")["id"]
    label = f"stromboli.agent={agent_id}"
    wait_until(lambda: agent_containers(label), 15, what="the agent's container")
    assert agent_snapshot(daemon, agent_id)["status"] == "generating"
    started = time.monotonic()
    r = daemon.http.delete(f"/agents/{agent_id}", timeout=60)
    assert r.status_code == 204, r.text
    assert time.monotonic() - started < 20  # stdin closed, 5 s, SIGTERM, 5 s, SIGKILL at most
    assert agent_containers(label) == []
    assert daemon.http.get(f"/agents/{agent_id}").status_code == 404


def test_agent_api_delete_removes_the_container_and_closes_streams(daemon, new_agent):
    created = new_agent(daemon, prompt="hello")
    agent_id = created["id"]
    label = f"stromboli.agent={agent_id}"
    with AgentStream(daemon, agent_id) as stream:
        stream.read(turn_ended())
        assert len(agent_containers(label)) == 1
        r = daemon.http.delete(f"/agents/{agent_id}", timeout=60)
        assert r.status_code == 204 and r.content == b"", r.text
        assert agent_containers(label) == []  # 204 once the container is gone, in any state
        events = stream.read(timeout=30)
        assert stream.ended
    assert [e.event for e in events[-2:]] == ["exited", "closed"], events
    assert events[-2].body.get("error") == "" and events[-1].data == "{}", events
    r = daemon.http.get(f"/agents/{agent_id}")
    assert r.status_code == 404 and r.json() == AGENT_NOT_FOUND
    assert agent_id not in [a["id"] for a in daemon.http.get("/agents").json()]
    r = daemon.http.delete(f"/agents/{agent_id}")
    assert r.status_code == 404 and r.json() == AGENT_NOT_FOUND


def test_agent_api_every_follower_gets_the_events_and_silence_is_kept_alive(daemon, new_agent):
    agent_id = new_agent(daemon)["id"]
    with AgentStream(daemon, agent_id) as one, AgentStream(daemon, agent_id) as two:
        r = daemon.http.post(f"/agents/{agent_id}/send", json={"prompt": "hello"})
        assert r.status_code == 202, r.text
        first = one.read(turn_ended(r.json()["turn_id"]))
        second = two.read(turn_ended(r.json()["turn_id"]))
        assert [(e.id, e.event, e.data) for e in first] == [(e.id, e.event, e.data)
                                                            for e in second]
        seen = len(one.comments)
        one.read(timeout=20, comments=seen + 1)  # silence: a keep-alive comment every 15 s
        assert set(one.comments) == {": keepalive"} and not one.ended
        assert len(one.events) == len(first)  # and no event meanwhile


def test_agent_api_stream_replays_after_last_event_id(daemon, new_agent):
    agent_id = new_agent(daemon, prompt="hello")["id"]
    with AgentStream(daemon, agent_id) as stream:
        live = stream.read(turn_ended())
    ids = assert_event_ids_increase(live)
    assert len(ids) > 3, live
    after = ids[1]
    for headers, params in (({"Last-Event-ID": str(after)}, {}),
                            ({}, {"last_event_id": str(after)})):
        with AgentStream(daemon, agent_id, headers=headers, params=params) as stream:
            replay = stream.read(turn_ended())
        got = assert_event_ids_increase(replay)
        assert got[0] == after + 1, (headers, params, got)
        assert got == ids[2:], (headers, params)
        assert [(e.event, e.data) for e in replay] == [(e.event, e.data) for e in live[2:]]
    with AgentStream(daemon, agent_id, headers={"Last-Event-ID": str(ids[-1])}) as stream:
        r = daemon.http.post(f"/agents/{agent_id}/send", json={"prompt": "hello again"})
        assert r.status_code == 202, r.text
        fresh = stream.read(turn_ended(r.json()["turn_id"]))  # nothing old: the new turn
    assert fresh[0].event == "turn_start" and fresh[0].body["turn_id"] == r.json()["turn_id"]
    assert assert_event_ids_increase(fresh)[0] == ids[-1] + 1


def test_agent_api_conversation_is_in_the_session_history(daemon, new_agent):
    tag = marker()
    created = new_agent(daemon, prompt=f"hello {tag}")
    with AgentStream(daemon, created["id"]) as stream:
        stream.read(turn_ended())

    def page():
        r = daemon.http.get(f"/sessions/{created['session_id']}/messages")
        return r.json() if r.status_code == 200 and message_texts(r.json(), "assistant") \
            else None
    messages = wait_until(page, 10, 0.2, "the agent's transcript")
    assert any(f"hello {tag}" in t for t in message_texts(messages, "user")), messages
    assert "Hello from the scripted model" in message_texts(messages, "assistant"), messages
    r = daemon.http.delete(f"/sessions/{created['session_id']}")
    assert r.status_code == 409, r.text  # not the home of a live agent
    assert daemon.http.delete(f"/agents/{created['id']}", timeout=60).status_code == 204
    kept = daemon.http.get(f"/sessions/{created['session_id']}/messages")
    assert kept.status_code == 200 and kept.json()["messages"] == messages["messages"]


def test_agent_api_live_agents_hold_run_slots(make_daemon, new_agent):
    d = make_daemon(STROMBOLI_MAX_CONCURRENT_RUNS="1")
    first = new_agent(d)
    r = d.http.post("/agents", json={"prompt": "hello"})
    assert r.status_code == 429, r.text
    assert r.json()["error"].startswith("agent: all 1 run slots are in use"), r.text
    assert int(r.headers["Retry-After"]) > 0
    assert len(d.http.get("/agents").json()) == 1
    assert d.http.delete(f"/agents/{first['id']}", timeout=60).status_code == 204
    second = new_agent(d, prompt="hello", idle_timeout_seconds=1)
    with AgentStream(d, second["id"]) as stream:
        stream.read(turn_ended())
        stream.read(timeout=20)  # it ends when idle, and gives its slot back
    assert agent_snapshot(d, second["id"])["status"] == "exited"
    third = d.http.post("/agents", json={})  # the exited agent is still listed, slot-free
    assert third.status_code == 201, third.text
    assert len(d.http.get("/agents").json()) == 2


def test_agent_api_bad_create_options_are_400s(make_daemon, new_agent):
    d = make_daemon(STROMBOLI_MAX_CONCURRENT_RUNS="1", STROMBOLI_AGENT_ALLOW_ALL_VOLUMES="true")
    bodies = {
        "not JSON": b"{",
        "not an object": b"[]",
        "a prompt that is no string": b'{"prompt": 5}',
        "idle_timeout_seconds a string": b'{"idle_timeout_seconds": "ten"}',
        "NUL in a volume host path": json.dumps({"podman": {"volumes": ["/tmp/a\0b:/data"]}}),
        "cpu_shares -5": json.dumps({"podman": {"cpu_shares": -5}}),
        "memory over 1 TiB": json.dumps({"podman": {"memory": "2000g"}}),
        "max_turns over 10000": json.dumps({"claude": {"max_turns": 10 ** 6}}),
        "max_budget_usd NaN": b'{"claude": {"max_budget_usd": NaN}}',
        "workdir out of bounds": json.dumps({"workdir": "../etc"}),
    }
    wrong = {}
    for name, body in bodies.items():
        r = d.http.post("/agents", content=body, headers={"Content-Type": "application/json"})
        error = r.json().get("error") if r.headers.get("content-type", "").startswith(
            "application/json") and isinstance(r.json(), dict) else None
        if r.status_code != 400 or not isinstance(error, str) or not error:
            wrong[name] = (r.status_code, r.text[:160])
    assert not wrong, "\n".join(f"{name} → {outcome}" for name, outcome in wrong.items())
    assert d.http.get("/agents").json() == []
    assert "Traceback" not in d.log()
    assert agent_containers(f"stromboli.instance={d.instance}") == []  # none left behind
    fine = new_agent(d, prompt="hello")  # the only slot is still free
    with AgentStream(d, fine["id"]) as stream:
        stream.read(turn_ended())


def test_agent_api_a_process_that_dies_is_exited_and_frees_its_slot(make_daemon, new_agent):
    d = make_daemon(STROMBOLI_MAX_CONCURRENT_RUNS="1")
    doomed = new_agent(d, prompt="hello", podman={"memory": "8m"})  # too small for the CLI
    with AgentStream(d, doomed["id"]) as stream:
        events = stream.read(timeout=60)  # to its end
        assert stream.ended
    assert [e.event for e in events[-2:]] == ["exited", "closed"], events
    assert "turn_end" not in [e.event for e in events]
    snapshot = agent_snapshot(d, doomed["id"])
    assert snapshot["status"] == "exited" and snapshot["exit_error"], snapshot
    assert events[-2].body["error"] == snapshot["exit_error"]
    r = d.http.post(f"/agents/{doomed['id']}/send", json={"prompt": "hello?"})
    assert r.status_code == 410 and r.json() == AGENT_EXITED, r.text
    wait_until(lambda: not agent_containers(f"stromboli.agent={doomed['id']}"), 10,
               what="the dead agent's container removed")
    fine = new_agent(d, prompt="hello")  # its slot was given back
    with AgentStream(d, fine["id"]) as stream:
        stream.read(turn_ended())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_agent_api_a_restart_brings_the_agent_back(make_daemon, model, new_agent, tmp_path, sig):
    """After SIGTERM or kill -9 and a new start, a new container resumes the agent's
    conversation: same id, session and turn count, ids going on."""
    state = tmp_path / "state"
    d = make_daemon(state_dir=state)
    tag = marker()
    created = new_agent(d, prompt=f"first {tag}")
    agent_id = created["id"]
    with AgentStream(d, agent_id) as stream:
        before = stream.read(turn_ended())
    old = [c.id for c in agent_containers(f"stromboli.agent={agent_id}")]
    assert len(old) == 1
    d.stop(sig)
    again = make_daemon(state_dir=state)
    snapshot = wait_agent(again, agent_id, "idle", timeout=30)
    assert snapshot["session_id"] == created["session_id"] and snapshot["turns_completed"] == 1
    assert "exit_error" not in snapshot, snapshot
    refused = []

    def sent():  # "idle" may still answer 503 while its new container starts
        r = again.http.post(f"/agents/{agent_id}/send", json={"prompt": f"second {tag}"})
        if r.status_code == 503:
            refused.append(r.json())
            return None
        return r
    r = wait_until(sent, 30, 0.5, "a send accepted after the restart")
    assert r.status_code == 202, r.text
    with AgentStream(again, agent_id) as stream:
        after = stream.read(turn_ended(r.json()["turn_id"]))
    assert min(assert_event_ids_increase(after)) > max(assert_event_ids_increase(before))
    now = [c.id for c in agent_containers(f"stromboli.agent={agent_id}")]
    assert len(now) == 1 and now != old  # a new process
    conversations = [user_prompts(q["messages"]) for q in model.requests_with(f"second {tag}")]
    assert any(any(f"first {tag}" in p for p in prompts) for prompts in conversations), \
        conversations
    assert wait_agent(again, agent_id, "idle")["turns_completed"] == 2
    assert again.http.delete(f"/agents/{agent_id}", timeout=60).status_code == 204


def test_agent_api_a_turn_cut_by_a_crash_is_ended_and_the_agent_goes_on(make_daemon, new_agent,
                                                                         tmp_path):
    state = tmp_path / "state"
    d = make_daemon(state_dir=state)
    tag = marker()
    agent_id = new_agent(d)["id"]
    turn = d.http.post(f"/agents/{agent_id}/send", json={"prompt": f"sleep 5 {tag}"})
    assert turn.status_code == 202, turn.text
    wait_agent(d, agent_id, "generating")
    d.stop(signal.SIGKILL)
    again = make_daemon(state_dir=state)
    with AgentStream(again, agent_id) as stream:
        events = stream.read(lambda events: any(e.event == "error" for e in events), timeout=20)
    cut = next(e.body for e in events if e.event == "error")
    assert (cut["turn_id"], cut["error"]) == (
        turn.json()["turn_id"], "agent: the daemon restarted during this turn; its output ends here")
    snapshot = wait_agent(again, agent_id, "idle", timeout=30)
    assert snapshot["turns_completed"] == 0 and "exit_error" not in snapshot, snapshot
    r = wait_until(lambda: (r := again.http.post(f"/agents/{agent_id}/send", json={
        "prompt": f"hello {tag}"})).status_code != 503 and r, 30, 0.5, "a send accepted")
    assert r.status_code == 202, r.text
    with AgentStream(again, agent_id) as stream:
        stream.read(turn_ended(r.json()["turn_id"]))
    assert again.http.delete(f"/agents/{agent_id}", timeout=60).status_code == 204


# ---------------------------------------------------------------------------
# Agent boundary: the agent is hostile (issue 9)
# ---------------------------------------------------------------------------
# Each test plays the agent through "bash: …" prompts (the real CLI runs the command in
# its container, as uid 1000, with the session home as $HOME) or the hostile API client,
# and checks that the root daemon never acts for it outside its container.

def agent_does(d: Daemon, command: str, claude: dict | None = None, **body) -> httpx.Response:
    """A run in which the agent runs `command` with its Bash tool."""
    return d.http.post("/run", json={"prompt": f"bash: {command}", **body, "claude": {
        "dangerously_skip_permissions": True, **(claude or {})}})


def session_home(d: Daemon, session: str) -> pathlib.Path:
    return d.state_dir / "sessions" / session


def root_only_dir(path: pathlib.Path) -> pathlib.Path:
    """A host folder only root may enter (the kind of place an escape aims at)."""
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def assert_untouched(folder: pathlib.Path) -> None:
    st = os.lstat(folder)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o700), \
        f"{folder} now {st.st_uid}:{st.st_gid} {oct(st.st_mode & 0o7777)}"
    assert os.listdir(folder) == []


@contextlib.contextmanager
def health_latencies(d: Daemon):
    """The latencies of /health, probed every 0.2 s while the block runs (a failed probe
    counts as an endless wait)."""
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                httpx.get(d.url + "/health", timeout=120)
            except httpx.HTTPError:
                started = -float("inf")
            latencies.append(time.monotonic() - started)
            stop.wait(0.2)
    prober = threading.Thread(target=probe)
    prober.start()
    try:
        yield latencies
    finally:
        stop.set()
        prober.join()


def memory_kib(pid: int, field: str) -> int:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def test_agent_claude_dir_link_to_a_host_dir_is_not_chowned(daemon, tmp_path):
    target = root_only_dir(tmp_path / "root-only")
    session = str(uuid.uuid4())
    agent_does(daemon, f"mv ~/.claude ~/claude-was-here && ln -s {target} ~/.claude",
               {"session_id": session})
    assert os.path.islink(session_home(daemon, session) / ".claude")  # the agent did it
    daemon.http.post("/run", json={"prompt": "hello", "claude": {"session_id": session,
                                                                 "resume": True}})
    assert_untouched(target)


def test_agent_project_folder_link_receives_no_transcript(daemon, tmp_path):
    target = root_only_dir(tmp_path / "root-only")
    session = str(uuid.uuid4())
    # Its own transcript lives under -workspace-other; -workspace becomes a link to the host.
    agent_does(daemon, f"ln -s {target} ~/.claude/projects/-workspace",
               {"session_id": session}, workdir="/workspace/other")
    assert os.path.islink(session_home(daemon, session) / ".claude/projects/-workspace")
    daemon.http.post("/run", json={"prompt": "hello", "workdir": "/workspace",
                                   "claude": {"session_id": session, "resume": True}})
    assert_untouched(target)


def test_agent_init_marker_link_creates_no_host_file(daemon, tmp_path):
    planted = root_only_dir(tmp_path / "root-only") / "planted-by-the-daemon"
    session = str(uuid.uuid4())
    agent_does(daemon, f"ln -s {planted} ~/.stromboli-initialized", {"session_id": session})
    assert os.path.islink(session_home(daemon, session) / ".stromboli-initialized")
    daemon.http.post("/run", json={
        "prompt": "hello", "claude": {"session_id": session, "resume": True},
        "podman": {"lifecycle": {"on_create_command": ["true"]}}})
    assert not os.path.lexists(planted)
    assert_untouched(planted.parent)


def test_agent_transcript_link_to_a_host_file_is_never_read(daemon, tmp_path):
    tag = marker()
    session = str(uuid.uuid4())
    host_file = root_only_dir(tmp_path / "root-only") / "audit.jsonl"
    host_file.write_text(
        json.dumps({"type": "user", "uuid": f"host-{tag}", "sessionId": session,
                    "message": {"role": "user", "content": f"HOST-SECRET-{tag}"}}) + "\n"
        + json.dumps({"type": "summary", "summary": f"HOST-SECRET-{tag}"}) + "\n")
    host_file.chmod(0o600)
    agent_does(daemon, f"mkdir -p ~/.claude/projects/z && "
                       f"ln -s {host_file} ~/.claude/projects/z/{session}.jsonl",
               {"session_id": session})
    assert os.path.islink(session_home(daemon, session) / f".claude/projects/z/{session}.jsonl")
    os.utime(host_file)  # a live host file: newer than the agent's own transcript
    messages = daemon.http.get(f"/sessions/{session}/messages")
    assert messages.status_code == 200, messages.text
    assert f"HOST-SECRET-{tag}" not in messages.text
    assert "ln -s" in messages.text  # its own transcript is the one read
    assert f"HOST-SECRET-{tag}" not in daemon.http.get("/sessions").text


def test_agent_fifo_in_its_home_does_not_break_a_fork(daemon):
    tag = marker()
    source = str(uuid.uuid4())
    made = agent_does(daemon, f"mkfifo ~/pipe-{tag} && echo made-{tag}", {"session_id": source})
    assert f"made-{tag}" in made.json()["output"]
    before = {s["id"] for s in daemon.http.get("/sessions").json()["sessions"]}
    r = daemon.http.post("/run", json={"prompt": "hello", "claude": {
        "session_id": source, "fork_session": True}})
    assert r.status_code == 200, r.text
    fork = r.json()
    assert fork["status"] == "completed" and fork["session_id"] != source
    assert not os.path.lexists(session_home(daemon, fork["session_id"]) / f"pipe-{tag}")
    after = {s["id"] for s in daemon.http.get("/sessions").json()["sessions"]}
    assert after - before == {fork["session_id"]}


def flood_through_a_hook(d: Daemon, script: str, route: str = "/run") -> httpx.Response:
    """The agent's way to the container's raw stdout: in its user namespace it cannot open
    /proc/1/fd/1 (the pipe belongs to host root), but it can rewrite a script in its home
    that a client's lifecycle hook runs before the CLI. Run 1 plants it; run 2 (a resume
    with a post_start hook) runs it. → run 2's response (on `route`)."""
    session = str(uuid.uuid4())
    planted = agent_does(d, f"echo x > /proc/1/fd/1 || echo direct-denied; "
                            f"printf '%s\\n' {shlex.quote(script)} > ~/setup.sh; echo planted",
                         {"session_id": session}).json()
    assert "direct-denied" in planted["output"] and "planted" in planted["output"], planted
    return d.http.post(route, json={
        "prompt": f"after the flood {session}",
        "claude": {"session_id": session, "resume": True},
        "podman": {"lifecycle": {"post_start": ["sh ~/setup.sh"]}}})


def test_a_huge_output_line_is_cut_and_the_daemon_stays_responsive(make_daemon):
    d = make_daemon(STROMBOLI_AGENT_MAX_LINE="65536", STROMBOLI_AGENT_MAX_OUTPUT="1m")
    with health_latencies(d) as latencies:
        r = flood_through_a_hook(d, "head -c 20000000 /dev/zero | tr '\\0' a; echo")
    assert max(latencies) < 5, f"/health took {max(latencies):.1f}s during the flood"
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body["status"] == "completed", body.get("crash_info")
    output = body["output"]
    assert len(output) < 1024 * 1024 + 4096
    assert re.search(r"(^|\n)a{65536} \[stromboli: line truncated, 19934464 bytes dropped\]\n",
                     output), output[-300:]
    assert output.splitlines()[-1].startswith("echo: after the flood")
    assert body["truncated"] is True
    _, events = read_sse(d, {"run_id": body["id"]})  # the stream carries the same lines
    data = [e.data for e in events if e.event == "message"]
    assert sum(map(len, data)) < 1024 * 1024 + 4096
    assert data[-1].startswith("echo: after the flood") and events[-1].event == "done"


def test_output_past_max_output_is_dropped_but_the_result_survives(make_daemon):
    d = make_daemon(STROMBOLI_AGENT_MAX_LINE="65536", STROMBOLI_AGENT_MAX_OUTPUT="1m")
    flood = f"yes flood-line-{'x' * 40} | head -n 100000"  # 5.2 MB in 100000 lines
    run = flood_through_a_hook(d, flood)
    assert run.status_code == 200, run.text[:500]
    job = flood_through_a_hook(d, flood, "/run/async").json()
    for body in (run.json(), d.wait_job(job["job_id"])):
        assert body["status"] == "completed", body.get("crash_info")
        output = body["output"]
        assert len(output) < 1024 * 1024 + 4096
        lines = output.splitlines()
        dropped = re.fullmatch(
            r"\[stromboli: output truncated: (\d+) bytes in (\d+) lines dropped\]", lines[-2])
        assert dropped, lines[-3:]
        assert int(dropped.group(1)) > 4_000_000 and int(dropped.group(2)) > 70_000
        assert lines[-1].startswith("echo: after the flood")  # the CLI's answer survives
        assert lines[0].startswith("flood-line-")
        assert body["truncated"] is True


def test_a_huge_transcript_line_does_not_inflate_the_daemon(make_daemon):
    d = make_daemon()
    assert d.http.post("/run", json={"prompt": "hello"}).json()["status"] == "completed"
    baseline = memory_kib(d.proc.pid, "VmRSS")
    session = str(uuid.uuid4())
    # One 15 MB transcript line of five million tiny JSON objects (cheap on disk, costly
    # to parse), appended by the agent to its own transcript.
    big_line = ("{ printf '{\"type\":\"assistant\",\"message\":{\"id\":\"m-big\",\"content\":['; "
                "yes '{},' | head -n 5000000 | tr -d '\\n'; printf '{}]}}\\n'; }")
    r = agent_does(d, f"{big_line} >> ~/.claude/projects/-workspace/{session}.jsonl; echo ok",
                   {"session_id": session})
    assert r.json()["status"] == "completed", r.text[:500]
    transcript = session_home(d, session) / f".claude/projects/-workspace/{session}.jsonl"
    assert transcript.stat().st_size > 15_000_000
    started = time.monotonic()
    messages = d.http.get(f"/sessions/{session}/messages")
    assert messages.status_code == 200
    assert time.monotonic() - started < 5
    assert d.http.get("/sessions").status_code == 200
    grown = memory_kib(d.proc.pid, "VmHWM") - baseline
    assert grown < 100 * 1024, f"daemon peak RSS grew by {grown // 1024} MiB"


def test_huge_transcript_messages_give_a_bounded_page(make_daemon):
    """The agent appends 24 lines of 4 MB of 2-byte characters to its own transcript: each
    is a 12 MB message as JSON (a 6-byte escape for each character), 300 MB for a page of
    them. A page is 4 MiB at most, its messages cut with a marker, and the daemon neither
    swells nor stalls while it serves it."""
    d = make_daemon()
    session = str(uuid.uuid4())
    chars = "$z$z$z$z"  # 32 × ж (0xd0 0xb6), 64 bytes; 65000 of them: 4,160,000 bytes
    line = ("{ printf '{\"type\":\"user\",\"uuid\":\"huge-%s\",\"message\":{\"role\":"
            f"\"user\",\"content\":\"' $i; yes \"{chars}\" | head -n 65000 | tr -d '\\n'; "
            "printf '\"}}\\n'; }")
    r = agent_does(d, "z=$(printf '\\320\\266\\320\\266\\320\\266\\320\\266'"
                      "'\\320\\266\\320\\266\\320\\266\\320\\266'); "
                      f"for i in $(seq 24); do {line}; done "
                      f">> ~/.claude/projects/-workspace/{session}.jsonl; echo ok",
                   {"session_id": session})
    assert r.json()["status"] == "completed", r.text[:500]
    transcript = session_home(d, session) / f".claude/projects/-workspace/{session}.jsonl"
    assert transcript.stat().st_size > 24 * 4_000_000
    baseline = memory_kib(d.proc.pid, "VmRSS")
    with health_latencies(d) as latencies:
        pages = [d.http.get(f"/sessions/{session}/messages", params=params)
                 for params in ({}, {"limit": 200}, {"offset": 5, "limit": 3})]
    grown = memory_kib(d.proc.pid, "VmHWM") - baseline
    assert max(latencies) < 1, f"/health took {max(latencies):.1f}s during the pages"
    for page in pages:
        assert page.status_code == 200
        assert len(page.content) < 4 * 1024 * 1024 + 64 * 1024, len(page.content)
    body = pages[0].json()
    huge = [m for m in body["messages"] if m["uuid"].startswith("huge-")]
    assert len(huge) == 24 and body["total"] >= 24 and body["limit"] == 50
    for message in huge:
        text = message["content"]["content"][0]["text"]
        kept, dropped = CUT.fullmatch(text).groups()
        assert set(kept) == {"ж"} and len(kept) + int(dropped) == 65000 * 32
    assert [m["uuid"] for m in pages[2].json()["messages"]] == \
        [m["uuid"] for m in body["messages"][5:8]]
    one = d.http.get(f"/sessions/{session}/messages/huge-3")
    assert one.status_code == 200 and len(one.content) < 4 * 1024 * 1024 + 1024
    assert CUT.fullmatch(one.json()["message"]["content"]["content"][0]["text"])
    assert grown < 150 * 1024, f"daemon peak RSS grew by {grown // 1024} MiB"


def test_secrets_are_not_in_podman_inspect_but_the_agent_has_them(daemon):
    name, value = f"agent-secret-{marker()}", f"value-{marker()}"
    assert daemon.http.post("/secrets", json={"name": name, "value": value}).status_code == 201
    session = str(uuid.uuid4())
    try:
        job = daemon.http.post("/run/async", json={
            "prompt": "sleep 2 bash: echo got=$MY_SECRET",
            "claude": {"session_id": session, "dangerously_skip_permissions": True},
            "podman": {"secrets_env": {"MY_SECRET": name}}}).json()
        containers = wait_until(lambda: agent_containers(f"stromboli.session={session}"), 20,
                                what="the run's container")
        with podman_client() as client:
            info = client.containers.get(containers[0].id).inspect()
        inspected = json.dumps(info)
        assert "sk-test-not-a-real-key" not in inspected
        assert value not in inspected
        done = daemon.wait_job(job["job_id"])
        assert done["status"] == "completed", done
        assert f"got={value}" in done["output"]  # exported inside, for the CLI and its tools
    finally:
        daemon.http.delete(f"/secrets/{name}")


def test_the_prompt_is_not_in_argv_and_may_be_large(daemon, model):
    tag = marker()
    session = str(uuid.uuid4())
    job = daemon.http.post("/run/async", json={
        "prompt": f"sleep 2 prompt-{tag}", "claude": {"session_id": session}}).json()
    containers = wait_until(lambda: agent_containers(f"stromboli.session={session}"), 20,
                            what="the run's container")
    wait_until(lambda: model.requests_with(tag), 20, what="the CLI to send the prompt")
    with podman_client() as client:
        info = client.containers.get(containers[0].id).inspect()
    assert tag not in json.dumps([info["Config"].get("Cmd"), info.get("Args"),
                                  info["Config"].get("Entrypoint")])
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert tag not in ps
    assert daemon.wait_job(job["job_id"])["status"] == "completed"
    big = "hello " + "word " * (200 * 1024 // 5)  # over the kernel's 128 KiB argument limit
    r = daemon.http.post("/run", json={"prompt": big})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["output"] == "Hello from the scripted model"


def test_agents_run_in_a_user_namespace(daemon):
    tag = marker()
    session = str(uuid.uuid4())
    body = agent_does(daemon, f"cat /proc/self/uid_map; touch ~/made-{tag}",
                      {"session_id": session}).json()
    assert body["status"] == "completed", body
    assert re.search(r"\b0\s+1000000000\s+65536\b", body["output"]), body["output"]
    made = session_home(daemon, session) / f"made-{tag}"
    assert made.stat().st_uid == 1000000000 + 1000


def test_volume_options_and_targets_that_reach_the_host_are_refused(make_daemon, tmp_path):
    allowed = tmp_path / "projects"
    (allowed / "demo").mkdir(parents=True)
    (allowed / "demo" / "notes.txt").write_text("mounted-file-content\n")
    d = make_daemon(STROMBOLI_AGENT_ALLOWED_VOLUMES=str(allowed))
    demo = allowed / "demo"
    r = d.http.post("/run", json={"prompt": "hello", "podman": {"volumes": [f"{demo}:/data:ro,U"]}})
    assert r.status_code == 400, r.text
    assert run_error(r).startswith("volume validation failed: ") and '"U"' in run_error(r)
    assert demo.stat().st_uid == 0  # nothing chowned it
    for target in ("/", "/usr", "/usr/lib", "/opt", "/opt/claude", "/home", "/home/user",
                   "/home/user/", "/etc/x", "/lib64"):
        r = d.http.post("/run", json={"prompt": "hello",
                                      "podman": {"volumes": [f"{demo}:{target}"]}})
        assert r.status_code == 400, (target, r.status_code, r.text[:300])
        error = run_error(r)
        assert error.startswith("volume validation failed: container path"), (target, error)
    r = d.http.post("/run", json={"prompt": "hello", "podman": {"volumes": [f"{demo}\0x:/data"]}})
    assert r.status_code == 400, r.text
    assert "volume" in run_error(r)
    ok = agent_does(d, "cat /home/user/project/notes.txt",
                    podman={"volumes": [f"{demo}:/home/user/project:ro"]}).json()
    assert ok["status"] == "completed" and "mounted-file-content" in ok["output"], ok


def test_secrets_of_other_podman_tenants_are_out_of_reach(daemon, make_daemon):
    name, value = f"db-password-{marker()}", f"their-value-{marker()}"
    with podman_client() as client:
        client.secrets.create(name, value.encode())
    try:
        assert name not in [s["name"] for s in daemon.http.get("/secrets").json()["secrets"]]
        assert daemon.http.get(f"/secrets/{name}").status_code == 404
        assert daemon.http.delete(f"/secrets/{name}").status_code == 404
        r = daemon.http.post("/run", json={"prompt": "bash: echo got=$DB",
                                           "podman": {"secrets_env": {"DB": name}}})
        assert r.status_code == 400, r.text
        assert name in run_error(r) and "STROMBOLI_SECRETS_ALLOWED" in run_error(r)
        with podman_client() as client:
            assert client.secrets.exists(name)
        allowed = make_daemon(STROMBOLI_SECRETS_ALLOWED=name)
        body = agent_does(allowed, "echo got=$DB", podman={"secrets_env": {"DB": name}}).json()
        assert body["status"] == "completed" and f"got={value}" in body["output"], body
        listed = {s["name"]: s for s in allowed.http.get("/secrets").json()["secrets"]}
        assert listed[name]["managed"] is False
        assert allowed.http.delete(f"/secrets/{name}").status_code == 400
        with podman_client() as client:
            assert client.secrets.exists(name)
    finally:
        with podman_client() as client:
            if client.secrets.exists(name):
                client.secrets.remove(name)


def test_two_daemons_on_one_podman_keep_their_own_api_keys(make_daemon, model):
    keys = {"a": f"sk-test-a-{marker()}", "b": f"sk-test-b-{marker()}"}
    daemons = {k: make_daemon(ANTHROPIC_API_KEY=key) for k, key in keys.items()}
    for which in ("a", "b", "a", "b"):
        tag = marker()
        body = daemons[which].http.post("/run", json={"prompt": f"hello {tag}"}).json()
        assert body["status"] == "completed", body
        assert {r["_x_api_key"] for r in model.requests_with(tag)} == {keys[which]}, which


@pytest.mark.parametrize("filesystem", ["plain", "loop"])
def test_session_quota_is_reported_and_blocks_runs_and_forks(make_daemon, filesystem):
    d = make_daemon(STROMBOLI_AGENT_SESSION_QUOTA="5m",
                    STROMBOLI_AGENT_SESSION_FILESYSTEM=filesystem)
    session = str(uuid.uuid4())
    r = agent_does(d, "head -c 8000000 /dev/zero > ~/big; echo wrote", {"session_id": session})
    big = os.path.getsize(session_home(d, session) / "big")
    if filesystem == "plain":
        assert big == 8_000_000, r.text
    else:  # the kernel stopped the write at the quota
        assert 4_000_000 < big < 5 * 1024 ** 2, r.text
    listed = {s["id"]: s for s in d.http.get("/sessions").json()["sessions"]}
    assert listed[session].get("size_bytes", 0) >= big, listed[session]
    for options in ({"resume": True}, {"continue": True}, {"fork_session": True}):
        r = d.http.post("/run", json={"prompt": "hello",
                                      "claude": {"session_id": session, **options}})
        assert r.status_code == 409, (options, r.status_code, r.text[:300])
        assert "quota" in run_error(r)


def test_a_home_growing_past_the_quota_gets_its_run_killed(make_daemon):
    d = make_daemon(STROMBOLI_AGENT_SESSION_QUOTA="5m", STROMBOLI_AGENT_SESSION_FILESYSTEM="plain")
    started = time.monotonic()
    body = agent_does(d, "head -c 8000000 /dev/zero > ~/big; sleep $((20)); echo slept").json()
    assert body["status"] == "crashed", body
    assert "quota" in body["crash_info"]["reason"]
    assert time.monotonic() - started < 15


def host_bytes(d: Daemon, session: str) -> int:
    """What a session home takes on the host's disk: the blocks allocated to its image when
    it is a filesystem of its own, else to everything below it."""
    home = session_home(d, session)
    if os.stat(home).st_dev != os.stat(home.parent).st_dev:
        return os.stat(home.parent / ".images" / f"{session}.img").st_blocks * 512
    du = subprocess.run(["du", "-s", "-x", "-B1", str(home)], capture_output=True, text=True,
                        check=True)
    return int(du.stdout.split()[0])


def long_links(count: int, folder: str) -> str:
    """A shell command that makes `count` symbolic links of over 200 bytes each in
    `folder`, with a few processes (each process costs the CLI's Bash tool ~50 ms)."""
    return (f"mkdir -p /tmp/{'x' * 200} {folder} && cd /tmp/x* && i=0; "
            f"while [ $i -lt {count} ]; do : > $i; i=$((i+1)); done; "
            f"ls | sed \"s|^|$PWD/|\" | xargs sh -c 'cp -s \"$@\" {folder}/' _; "
            f"ls {folder} | wc -l")


# The agent's ways to fill a disk past a 50 MiB quota (issue 18: all of them got through).
# Busybox's fallocate has no --keep-size: util-linux's is copied into the home first.
DISK_FILLERS = {
    "fallocate": "fallocate -l 3G ~/f",
    "fallocate --keep-size": "~/fallocate --keep-size -l 2G ~/f",
    "dd": "dd if=/dev/zero of=$HOME/f bs=1M count=300",
    "small files": "mkdir ~/f && cd ~/f && i=0; while [ $i -lt 20000 ]; do "
                   "echo x > $i || break; i=$((i+1)); done; echo made $i",
    "long symlinks": long_links(20000, "~/f"),
}


def test_a_session_home_holds_no_more_than_its_quota_on_the_host(make_daemon):
    """The hostile agent fills its home every way it can; on the host, the home never takes
    more than its quota + 10 % (each home is a filesystem of the quota's size)."""
    quota = 50 * 1024 ** 2
    d = make_daemon(STROMBOLI_AGENT_SESSION_QUOTA="50m")
    for attack, command in DISK_FILLERS.items():
        session = str(uuid.uuid4())
        assert agent_does(d, "echo ready", {"session_id": session}).json()["status"] == \
            "completed"
        shutil.copy("/usr/bin/fallocate", session_home(d, session) / "fallocate")
        r = agent_does(d, f"{command}; echo done-{attack}", {"session_id": session,
                                                               "resume": True})
        assert r.status_code == 200, (attack, r.text[:300])
        taken = host_bytes(d, session)
        assert taken <= quota * 1.1, f"{attack}: the home takes {taken / 1024 ** 2:.0f} MiB"
        listed = {s["id"]: s for s in d.http.get("/sessions").json()["sessions"]}
        assert listed[session]["size_bytes"] <= quota, (attack, listed[session])
    assert d.http.delete(f"/sessions/{session}").status_code == 200
    images = d.state_dir / "sessions" / ".images"
    assert not session_home(d, session).exists() and not (images / f"{session}.img").exists()
    assert len(list(images.iterdir())) == len(DISK_FILLERS) - 1


def test_a_home_is_mounted_once_across_restarts_and_again_after_a_reboot(make_daemon, tmp_path):
    """A job's container outlives a crash of the daemon and keeps writing into its home: the
    next start must not mount the image a second time. After a reboot (nothing mounted)
    the next start mounts it again, with the conversation in it."""
    state = tmp_path / "state"
    d = make_daemon(state_dir=state)
    session = str(uuid.uuid4())
    home = str(session_home(d, session))
    image = str(state / "sessions" / ".images" / f"{session}.img")

    def mounted_once() -> None:
        assert mount_points_below(state) == [home]
        loops = subprocess.run(["losetup", "-j", image], capture_output=True, text=True).stdout
        assert len(loops.splitlines()) == 1, loops

    job = d.http.post("/run/async", json={"prompt": "sleep 4 first",
                                           "claude": {"session_id": session}}).json()
    d.wait_job(job["job_id"], ("running",))
    wait_until(lambda: agent_containers(f"stromboli.job={job['job_id']}"), 15, what="container")
    d.stop(signal.SIGKILL)
    again = make_daemon(state_dir=state)
    assert again.wait_job(job["job_id"])["status"] == "completed"
    mounted_once()
    again.stop()
    unmount_below(state)  # a reboot
    third = make_daemon(state_dir=state)
    mounted_once()
    r = third.http.post("/run", json={"prompt": "hello", "claude": {"session_id": session,
                                                                    "resume": True}})
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text[:300]
    history = third.http.get(f"/sessions/{session}/messages").json()
    assert history["total"] >= 4, history
    mounted_once()


def test_a_measured_home_counts_allocated_blocks_and_links(make_daemon):
    """A home that is a plain folder (plain mode, or made before images) is measured by
    what it takes on disk: preallocated blocks and links count, sizes do not."""
    d = make_daemon(STROMBOLI_AGENT_SESSION_QUOTA="5m", STROMBOLI_AGENT_SESSION_FILESYSTEM="plain")
    session = str(uuid.uuid4())
    agent_does(d, "echo ready", {"session_id": session})
    shutil.copy("/usr/bin/fallocate", session_home(d, session) / "fallocate")
    r = agent_does(d, "~/fallocate --keep-size -l 8M ~/hidden; truncate -s 1G ~/sparse; "
                      f"{long_links(2000, '~/links')}; sleep 5; echo done",
                   {"session_id": session, "resume": True})
    assert r.json()["status"] == "crashed" and "Quota" in r.json()["crash_info"]["reason"], \
        r.text[:300]
    listed = {s["id"]: s for s in d.http.get("/sessions").json()["sessions"]}
    assert 8 * 1024 ** 2 < listed[session]["size_bytes"] < 100 * 1024 ** 2, listed[session]
    r = d.http.post("/run", json={"prompt": "hello", "claude": {"session_id": session,
                                                                "resume": True}})
    assert r.status_code == 409 and "quota" in run_error(r), r.text[:300]


def test_a_deeply_nested_home_is_deleted(make_daemon):
    """The agent nests its home 1,100 folders deep (Python's rmtree recursed to death on
    it and left the home); deleting the session removes it all, links untouched."""
    d = make_daemon()
    session = str(uuid.uuid4())
    deep = "d/" * 1100
    try:
        r = agent_does(d, f"mkdir -p ~/{deep} && ln -s /etc/hostname ~/{deep}link && "
                          "find ~ -type d | wc -l", {"session_id": session})
        assert re.search(r"\b11\d\d\b", r.json()["output"]), r.text[:500]
        r = d.http.delete(f"/sessions/{session}")
        assert r.status_code == 200, r.text[:300]
        assert r.json() == {"success": True, "session_id": session}
        assert not os.path.lexists(session_home(d, session))
        assert not (d.state_dir / "sessions" / ".images" / f"{session}.img").exists()
        assert not mount_points_below(d.state_dir)
        assert os.path.isfile("/etc/hostname")
        assert d.http.delete(f"/sessions/{session}").status_code == 404
    finally:  # a home left behind would break pytest's own clean-up (rmtree recurses)
        unmount_below(d.state_dir)
        subprocess.run(["rm", "-rf", str(session_home(d, session))], timeout=60)


def test_the_container_log_and_tmp_are_bounded(make_daemon):
    """Disk outside the home: the agent floods its output (the container's log on the host
    is cut at twice agent.max_output) and fills /tmp and /var/tmp (tmpfs of
    agent.tmp_size: ENOSPC inside, nothing on the host's disk)."""
    d = make_daemon(STROMBOLI_AGENT_MAX_LINE="65536", STROMBOLI_AGENT_MAX_OUTPUT="1m",
                    STROMBOLI_AGENT_TMP_SIZE="64m")
    # The CLI keeps its Bash tool's output under /tmp: a full /tmp loses it, so the agent
    # notes what happened in its home and frees /tmp before it answers.
    r = agent_does(d, "for t in /tmp /var/tmp; do dd if=/dev/zero of=$t/big bs=1M count=1024 "
                      "2>> ~/notes; echo rc=$? $(ls -l $t/big) >> ~/notes; rm $t/big; done; "
                      "cat ~/notes")
    output = r.json()["output"]
    assert "No space left on device" in output, output[-500:]
    sizes = [int(m) for m in re.findall(r"rc=1 \S+ +\d+ +\S+ +\S+ +(\d+) ", output)]
    assert len(sizes) == 2 and all(size <= 64 * 1024 ** 2 for size in sizes), output[-500:]
    job = flood_through_a_hook(d, "head -c 64000000 /dev/zero | tr '\\0' a | fold -w 4000",
                               "/run/async").json()
    containers = wait_until(lambda: agent_containers(f"stromboli.session={job['session_id']}"),
                            30, 0.05, "the flooding container")
    with podman_client() as client:
        log_path = client.containers.get(containers[0].id).inspect()["HostConfig"][
            "LogConfig"]["Path"]
    largest = 0
    while d.http.get(f"/jobs/{job['job_id']}").json()["status"] in ("pending", "running"):
        with contextlib.suppress(FileNotFoundError):
            largest = max(largest, os.path.getsize(log_path))
        time.sleep(0.02)
    done = d.wait_job(job["job_id"])
    assert done["status"] == "completed" and done["truncated"], done.get("error")
    assert 0 < largest <= 2 * 1024 ** 2 + 65536, f"the log grew to {largest} bytes"


@pytest.mark.parametrize("key, value", [
    ("privileged", True), ("cap_add", ["SYS_ADMIN"]), ("devices", ["/dev/fuse"]),
    ("security_opt", ["seccomp=unconfined"]), ("user", "root"),
    ("mounts", [{"type": "bind", "source": "/", "target": "/host"}]), ("network_mode", "host"),
])
def test_unknown_podman_options_are_refused_by_name(daemon, key, value):
    r = daemon.http.post("/run", json={"prompt": "hello", "podman": {key: value}})
    assert r.status_code == 400, r.text
    assert f'unknown podman option "{key}"' in run_error(r)


def agent_events(d: Daemon, agent_id: str, until: str, after: int | None = None,
                 timeout: float = 60) -> list:
    """A persistent agent's SSE events (from `after`), up to the first of type `until`."""
    headers = {} if after is None else {"Last-Event-ID": str(after)}
    found = []
    with httpx.Client(base_url=d.url, timeout=timeout) as client:
        with connect_sse(client, "GET", f"/agents/{agent_id}/stream", headers=headers) as source:
            for event in source.iter_sse():
                found.append(event)
                if event.event == until:
                    return found
    raise AssertionError(f"the stream ended without {until}: {[e.event for e in found]}")


AGENT_FELL_BEHIND = ("agent: stream: this client fell behind the agent's kept events and is "
                     "dropped; follow again with Last-Event-ID")


def agent_events_through_drops(d: Daemon, agent_id: str, until: str,
                              timeout: float = 120) -> list:
    """agent_events from the start, following again with Last-Event-ID each time the daemon
    drops the stream for falling behind the kept events (as clients are told to)."""
    found: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        headers = {"Last-Event-ID": found[-1].id} if found and found[-1].id else {}
        with httpx.Client(base_url=d.url, timeout=timeout) as client, connect_sse(
                client, "GET", f"/agents/{agent_id}/stream", headers=headers) as source:
            for event in source.iter_sse():
                found.append(event)
                if event.event == until:
                    return found
        dropped = found and found[-1].event == "error" and \
            json.loads(found[-1].data)["error"] == AGENT_FELL_BEHIND
        assert dropped, f"the stream ended without {until}: {[e.event for e in found[-5:]]}"
    raise AssertionError(f"no {until} within {timeout}s")


def test_persistent_agent_output_flood_is_bounded_and_the_daemon_stays_responsive(make_daemon):
    """100,000 lines and one 20 MB line on an agent's stdout (a hook's, since the agent
    itself cannot open the container's stdout): the daemon keeps at most its window of
    events, cuts the long line, stays responsive, and the agent still takes turns."""
    d = make_daemon(STROMBOLI_AGENT_MAX_LINE="65536", STROMBOLI_AGENT_MAX_OUTPUT="1m")
    flood = ("yes flood-line | head -n 100000; head -c 20000000 /dev/zero | tr '\\0' a; "
             "echo; echo flood-done")
    baseline = memory_kib(d.proc.pid, "VmRSS")
    with health_latencies(d) as latencies:
        r = d.http.post("/agents", json={"podman": {"lifecycle": {"post_start": [flood]}}})
        assert r.status_code == 201, r.text
        agent = r.json()["id"]
        turn = d.http.post(f"/agents/{agent}/send", json={"prompt": "hello"}).json()["turn_id"]
        agent_events_through_drops(d, agent, "turn_end")  # live, through the flood
    assert max(latencies) < 5, f"/health took {max(latencies):.1f}s during the flood"
    events = agent_events(d, agent, "turn_end", after=0)  # the window kept for replays
    kept = [e for e in events if e.event in ("output", "error")]
    assert len(events) <= 1000 and sum(len(e.data) for e in events) < 1024 * 1024 + 70000
    assert [int(e.id) for e in events] == list(range(int(events[0].id), int(events[-1].id) + 1))
    assert int(events[0].id) > 1000  # the window moved: early lines were let go
    cut = [e for e in kept if "[stromboli: line truncated, 19934464 bytes dropped]" in e.data]
    assert len(cut) == 1 and len(json.loads(cut[0].data)["content"]) < 65536 + 100
    assert json.loads(events[-1].data)["turn_id"] == turn
    assert memory_kib(d.proc.pid, "VmRSS") - baseline < 150 * 1024
    assert d.http.delete(f"/agents/{agent}").status_code == 204


def served_connections(port: int) -> int:
    """Established TCP connections whose local port is `port`: the daemon's side of them."""
    count = 0
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        count += int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01"
    return count


@contextlib.contextmanager
def peak_rss_kib(pid: int):
    """The peak VmRSS of a process, sampled every 50 ms while the block runs (a list of
    one value, filled at the end)."""
    peak, stop = [memory_kib(pid, "VmRSS")], threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], memory_kib(pid, "VmRSS"))
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def test_stalled_followers_of_a_flooding_agent_are_dropped_and_cost_little(make_daemon):
    """200 clients follow an agent that prints 1 MiB lines of control characters (6 MiB
    events in JSON) and never read (issue 18, item 3): the daemon keeps one copy of each
    event, not one per follower, encodes the big ones off the event loop, drops the
    followers once they fell behind, and /health answers within a second throughout."""
    d = make_daemon(STROMBOLI_AGENT_MAX_FOLLOWERS="250")
    lines = 30
    flood = ("sleep 5; i=0; while [ $i -lt %d ]; do head -c 1048575 /dev/zero | tr '\\0' "
             "'\\1'; echo; i=$((i+1)); done; echo flood-done" % lines)
    r = d.http.post("/agents", json={"podman": {"lifecycle": {"post_start": [flood]}}})
    assert r.status_code == 201, r.text
    agent = r.json()["id"]
    request = (f"GET /agents/{agent}/stream HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n"
               "\r\n").encode()
    baseline = memory_kib(d.proc.pid, "VmRSS")
    stalled: list[socket.socket] = []
    try:
        with health_latencies(d) as latencies, peak_rss_kib(d.proc.pid) as peak:
            for _ in range(200):
                follower = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                stalled.append(follower)
                follower.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                follower.connect(("127.0.0.1", d.port))
                follower.sendall(request)  # and never a read
            wait_until(lambda: served_connections(d.port) >= 200, 10, 0.2,
                       "the 200 followers served")
            wait_until(lambda: served_connections(d.port) < 5, 40, 0.5,
                       "the stalled followers dropped")
            last = agent_events(d, agent, "output", after=lines, timeout=120)[-1]
            assert (last.id, json.loads(last.data)["content"]) == (str(lines + 1), "flood-done")
    finally:
        for follower in stalled:
            follower.close()
    assert max(latencies) < 1, f"/health took {max(latencies):.1f}s"
    assert peak[0] - baseline < 150 * 1024, f"RSS {baseline} → {peak[0]} KiB"
    assert memory_kib(d.proc.pid, "VmRSS") - baseline < 150 * 1024
    assert d.http.delete(f"/agents/{agent}").status_code == 204


@pytest.mark.parametrize("namespace", ["podman's", "its own"])
def test_a_folder_swapped_for_a_link_never_gets_its_target_mounted(make_daemon, tmp_path,
                                                                   namespace):
    """Issue 18, item 1: an agent keeps swapping a folder of its writable volume for a link
    to a folder outside the allowlist while other runs ask for a volume below that folder.
    No run may ever see the link's target, and each refusal is a 400. In its own mount
    namespace (systemd's sandboxing puts it in one) the daemon cannot stage the volumes:
    Podman mounts the host paths and the daemon checks the mounts before the start."""
    tag = marker()
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    (allowed / "w").mkdir(parents=True)
    (allowed / "w").chmod(0o777)
    (secret / "name").mkdir(parents=True)
    (secret / "name" / "marker.txt").write_text(f"secret-{tag}\n")
    wrapper = () if namespace == "podman's" else ("unshare", "--mount", "--propagation", "slave")
    d = make_daemon(wrapper=wrapper, STROMBOLI_AGENT_ALLOWED_VOLUMES=str(allowed),
                    STROMBOLI_AGENT_VOLUME_AUTO_CREATE="false")
    swap = (f"cd /w && mkdir -p x/name && echo decoy-{tag} > x/name/marker.txt && touch started"
            f" && while :; do mv x xr; ln -s {secret} x; sleep 0.02; rm x; mv xr x; sleep 0.025;"
            " done")  # a link 45 % of the time, missing ~4 %
    hostile = d.http.post("/run/async", json={
        "prompt": f"bash: {swap}", "claude": {"dangerously_skip_permissions": True},
        "podman": {"volumes": [f"{allowed}/w:/w"], "timeout": "5m"}}).json()["job_id"]
    wait_until(lambda: (allowed / "w" / "started").exists(), 60, what="the swapping agent")

    def victim(_) -> httpx.Response:
        return agent_does(d, "cat /v/marker.txt",
                          podman={"volumes": [f"{allowed}/w/x/name:/v:ro"]})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(victim, range(40)))
    d.http.delete(f"/jobs/{hostile}")
    leaked = [i for i, r in enumerate(answers) if f"secret-{tag}" in r.text]
    assert not leaked, f"tries {leaked} of {len(answers)} saw the link's target"
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 400}, [r.text[:600] for r in answers if r.status_code > 400]
    refused = [run_error(r) for r in answers if r.status_code == 400]
    assert all(e.startswith("volume validation failed: ") for e in refused), refused
    assert any(f"decoy-{tag}" in r.text for r in answers), statuses  # the volume works
    d.wait_job(hostile)
    left = [str(d.state_dir / "mounts")] if not wrapper else []  # the binds are gone
    wait_until(lambda: d.staging_mounts() == left, 10, what="staging points released")


def mount_options(point: str) -> list[str]:
    with open("/proc/self/mountinfo") as info:
        return next(line.split()[5].split(",") for line in info if line.split()[4] == point)


def test_staged_volumes_live_as_long_as_their_container_across_a_restart(make_daemon, tmp_path):
    """Each volume is bind-mounted at a staging point (read-only when asked, a file as a file)
    for as long as its container lives: through a restart that takes the job's container
    over, and gone when it ends. The restart sweeps points whose container is gone."""
    allowed = tmp_path / "allowed"
    (allowed / "ro").mkdir(parents=True)
    (allowed / "rw").mkdir()
    (allowed / "notes.txt").write_text("a file volume\n")
    env = {"STROMBOLI_AGENT_ALLOWED_VOLUMES": str(allowed)}
    d = make_daemon(state_dir=tmp_path / "state", **env)
    job = d.http.post("/run/async", json={
        "prompt": "bash: sleep 6; cat /notes.txt", "claude": {"dangerously_skip_permissions": True},
        "podman": {"volumes": [f"{allowed}/ro:/ro:ro", f"{allowed}/rw:/rw",
                               f"{allowed}/notes.txt:/notes.txt:ro"]}}).json()["job_id"]
    root = str(d.state_dir / "mounts")
    points = wait_until(lambda: d.staging_mounts()[1:] if len(d.staging_mounts()) == 4 else None,
                        30, what="the job's staging points")
    assert [p.rsplit("/", 1)[1] for p in points] == ["0", "1", "2"], points
    assert ["ro" in mount_options(p) for p in points] == [True, False, True]
    assert os.path.isfile(points[2]) and open(points[2]).read() == "a file volume\n"
    stale = pathlib.Path(root) / "stromboli-agent-run-gone"
    stale.mkdir()  # a container that is gone
    d.stop()  # the job's container runs on, with its staging points
    assert d.staging_mounts() == [root, *points]
    again = make_daemon(state_dir=d.state_dir, **env)
    wait_until(lambda: not stale.exists(), 20, what="the sweep at start")
    done = again.wait_job(job)
    assert done["status"] == "completed" and "a file volume" in done["output"], done
    wait_until(lambda: again.staging_mounts() == [root], 10, what="the staging points released")


@pytest.mark.parametrize("namespace", ["podman's", "its own"])
def test_an_agents_volumes_are_opened_link_by_link_like_a_runs(make_daemon, new_agent, tmp_path,
                                                                namespace):
    tag = marker()
    allowed = tmp_path / "allowed"
    (allowed / "demo").mkdir(parents=True)
    (allowed / "demo" / "notes.txt").write_text(f"agent-volume-{tag}\n")
    (allowed / "escape").symlink_to(tmp_path)
    wrapper = () if namespace == "podman's" else ("unshare", "--mount", "--propagation", "slave")
    d = make_daemon(wrapper=wrapper, STROMBOLI_AGENT_ALLOWED_VOLUMES=str(allowed))
    r = d.http.post("/agents", json={"podman": {"volumes": [f"{allowed}/escape/demo:/data"]}})
    assert r.status_code == 400 and "goes through a symbolic link" in r.json()["error"], r.text
    agent = new_agent(d, prompt="bash: cat /data/notes.txt",
                      claude={"dangerously_skip_permissions": True},
                      podman={"volumes": [f"{allowed}/demo:/data:ro"]})["id"]
    with AgentStream(d, agent) as stream:
        events = stream.read(turn_ended())
    assert any(f"agent-volume-{tag}" in json.dumps(e.body) for e in events), events
    root = str(d.state_dir / "mounts")
    assert d.staging_mounts() == ([root, f"{root}/stromboli-{agent}/0"] if not wrapper else [])
    assert d.http.delete(f"/agents/{agent}").status_code == 204
    assert d.staging_mounts() == ([root] if not wrapper else [])


# ---------------------------------------------------------------------------
# Perimeter — auth, revocation, rate limiting, logs, validation allowlists
# ---------------------------------------------------------------------------

STATIC = {"Authorization": "Bearer static-token-1"}


@pytest.fixture
def auth_daemon(make_daemon):
    """Auth on; a large failed-auth budget, since these tests fail on purpose (the budget
    has its own tests)."""
    return make_daemon(STROMBOLI_AUTH_ENABLED="true", STROMBOLI_JWT_SECRET=JWT_SECRET,
                       STROMBOLI_API_TOKENS="static-token-1", STROMBOLI_AUTH_FAILURE_BURST="1000")


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def forge(claims: dict | None = None, key: str = JWT_SECRET, algorithm: str = "HS256") -> str:
    now = int(time.time())
    body = {"sub": "mallory", "iat": now, "exp": now + 3600, "jti": str(uuid.uuid4()),
            **(claims or {})}
    return jwt.encode(body, key, algorithm=algorithm)


def test_protected_routes_need_a_token(auth_daemon):
    r = auth_daemon.http.get("/jobs")
    assert r.status_code == 401 and r.json() == {"error": "missing authorization header"}
    r = auth_daemon.http.get("/jobs", headers={"Authorization": "Basic abc"})
    assert r.json() == {"error": "invalid authorization header format"}
    r = auth_daemon.http.get("/jobs", headers={"Authorization": "Bearer"})
    assert r.json() == {"error": "invalid authorization header format"}
    r = auth_daemon.http.get("/jobs", headers=bearer("wrong"))
    assert r.status_code == 401 and r.json() == {"error": "invalid or expired token"}
    assert auth_daemon.http.get("/jobs", headers=STATIC).status_code == 200
    assert auth_daemon.http.get("/jobs", headers={"Authorization": "bearer static-token-1"}
                                ).status_code == 200  # the scheme is case-insensitive
    assert auth_daemon.http.get("/health").status_code == 200  # public
    r = auth_daemon.http.post("/auth/token", json={"client_id": "x"})
    assert r.status_code == 401  # minting needs a credential too


def test_every_protected_route_needs_a_token(auth_daemon):
    sys.path.insert(0, str(HERE))
    import stromboli
    for route in stromboli.ROUTES:
        method, path, access = route.method, route.path, route.access
        concrete = re.sub(r"\{[^}]+\}", "x", path).replace("x:.+", "x")
        r = auth_daemon.http.request(method, concrete)
        if access == "public" and not route.reads_bearer:
            assert r.status_code != 401, (method, path, r.status_code)
        else:  # and /auth/validate, /auth/logout: public, but they check the bearer themselves
            assert r.status_code == 401, (method, path, r.status_code)
    assert {route.access for route in stromboli.ROUTES} == {"public", "token", "protected"}
    r = auth_daemon.http.get(f"/images/{IMAGE}")  # names with slashes too
    assert r.status_code == 401


def test_forged_tokens_are_rejected(auth_daemon):
    header = base64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = base64url(json.dumps({"sub": "mallory", "exp": int(time.time()) + 3600,
                                    "iat": int(time.time()), "jti": "x"}).encode())
    good = forge()
    head, body, sig = good.split(".")
    tampered_body = base64url(json.dumps({**json.loads(base64url_decode(body)),
                                          "sub": "admin"}).encode())
    attacks = {
        "alg none": f"{header}.{payload}.",
        "wrong key": forge(key="another-secret-that-is-long-enough-xxxxxxxx"),
        "HS512 with the right key": forge(algorithm="HS512"),
        "expired": forge({"exp": int(time.time()) - 10, "iat": int(time.time()) - 100}),
        "tampered payload": f"{head}.{tampered_body}.{sig}",
        "refresh token as access": forge({"is_refresh": True}),
        "no jti": jwt.encode({"sub": "m", "iat": int(time.time()),
                              "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256"),
    }
    assert auth_daemon.http.get("/jobs", headers=bearer(good)).status_code == 200
    for name, token in attacks.items():
        r = auth_daemon.http.get("/jobs", headers=bearer(token))
        assert r.status_code == 401, name
        assert r.json() == {"error": "invalid or expired token"}, name
        assert auth_daemon.http.get("/auth/validate", headers=bearer(token)).status_code == 401


def base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def base64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_jwt_flow_and_revocation_survives_restart(auth_daemon, make_daemon):
    r = auth_daemon.http.post("/auth/token", json={}, headers=STATIC)
    assert r.status_code == 400 and r.json()["error"].startswith("invalid request:")
    tokens = auth_daemon.http.post("/auth/token", json={"client_id": "ci"}, headers=STATIC).json()
    assert tokens["token_type"] == "bearer" and tokens["expires_in"] == 86400
    claims = jwt.decode(tokens["access_token"], JWT_SECRET, algorithms=["HS256"])
    assert set(claims) == {"sub", "iat", "exp", "jti", "fam"} and claims["sub"] == "ci"
    refresh_claims = jwt.decode(tokens["refresh_token"], JWT_SECRET, algorithms=["HS256"])
    assert refresh_claims["is_refresh"] is True
    assert refresh_claims["exp"] - refresh_claims["iat"] == 168 * 3600
    access = bearer(tokens["access_token"])
    assert auth_daemon.http.get("/jobs", headers=access).status_code == 200
    # Only a static token mints: a leaked access JWT cannot make itself last.
    r = auth_daemon.http.post("/auth/token", json={"client_id": "ci2"}, headers=access)
    assert r.status_code == 401 and "static API token" in r.json()["error"]
    valid = auth_daemon.http.get("/auth/validate", headers=access).json()
    assert valid == {"valid": True, "subject": "ci", "expires_at": claims["exp"]}
    assert auth_daemon.http.get("/auth/validate", headers=STATIC).status_code == 401
    r = auth_daemon.http.post("/auth/refresh", json={"refresh_token": tokens["access_token"]})
    assert r.status_code == 401 and r.json() == {"error": "invalid or expired refresh token"}
    rotated = auth_daemon.http.post("/auth/refresh",
                                    json={"refresh_token": tokens["refresh_token"]}).json()
    assert rotated["access_token"] != tokens["access_token"]
    assert rotated["refresh_token"] != tokens["refresh_token"]
    r = auth_daemon.http.post("/auth/logout", headers=access,
                              json={"refresh_token": tokens["refresh_token"]})
    assert r.json() == {"success": True, "message": "token invalidated"}
    assert auth_daemon.http.get("/jobs", headers=access).json() == {"error": "token revoked"}
    sibling = bearer(rotated["access_token"])  # refreshed from the same grant: revoked too
    assert auth_daemon.http.get("/jobs", headers=sibling).json() == {"error": "token revoked"}
    r = auth_daemon.http.post("/auth/refresh", json={"refresh_token": rotated["refresh_token"]})
    assert r.status_code == 401
    other = auth_daemon.http.post("/auth/token", json={"client_id": "other"},
                                  headers=STATIC).json()
    auth_daemon.stop()
    again = make_daemon(state_dir=auth_daemon.state_dir, STROMBOLI_AUTH_ENABLED="true",
                        STROMBOLI_JWT_SECRET=JWT_SECRET)
    for revoked in (access, sibling):
        r = again.http.get("/jobs", headers=revoked)
        assert r.status_code == 401 and r.json() == {"error": "token revoked"}
    assert again.http.get("/jobs", headers=bearer(other["access_token"])).status_code == 200


def test_overview_rows_post_validate_and_metrics_on_the_api_port(auth_daemon):
    """The API overview lists POST /auth/validate and GET /metrics on the API's base URL."""
    tokens = auth_daemon.http.post("/auth/token", json={"client_id": "ov"}, headers=STATIC).json()
    access = bearer(tokens["access_token"])
    for method in ("GET", "POST"):
        r = auth_daemon.http.request(method, "/auth/validate", headers=access)
        assert r.status_code == 200 and r.json()["subject"] == "ov", (method, r.text)
        assert auth_daemon.http.request(method, "/auth/validate").status_code == 401
    assert auth_daemon.http.get("/metrics").status_code == 401  # behind auth like the rest
    for headers in (access, STATIC):
        r = auth_daemon.http.get("/metrics", headers=headers)
        assert r.status_code == 200 and "http_requests_total" in r.text
        assert r.headers["Content-Type"].startswith("text/plain")
    # the separate listener stays open (127.0.0.1) for Prometheus
    assert httpx.get(f"http://127.0.0.1:{auth_daemon.metrics_port}/metrics").status_code == 200


def test_expired_revocations_are_reaped(make_daemon):
    d = make_daemon(STROMBOLI_AUTH_ENABLED="true", STROMBOLI_JWT_SECRET=JWT_SECRET,
                    STROMBOLI_API_TOKENS="static-token-1", STROMBOLI_JWT_EXPIRY="2s",
                    STROMBOLI_JWT_REFRESH_EXPIRY="2s",
                    STROMBOLI_AUTH_BLACKLIST_CLEANUP_INTERVAL="500ms")
    token = d.http.post("/auth/token", json={"client_id": "c"}, headers=STATIC).json()
    d.http.post("/auth/logout", headers=bearer(token["access_token"]))

    def revoked_rows() -> int:
        with sqlite3.connect(d.state_dir / "stromboli.db") as db:
            return db.execute("SELECT COUNT(*) FROM revoked_tokens").fetchone()[0]
    assert revoked_rows() == 1
    wait_until(lambda: revoked_rows() == 0, 10, what="expired revocation reaped")


def test_jwt_endpoints_without_a_secret_are_503(daemon):
    for method, path in (("POST", "/auth/token"), ("POST", "/auth/refresh"),
                         ("GET", "/auth/validate"), ("POST", "/auth/logout")):
        r = daemon.http.request(method, path, json={})
        assert r.status_code == 503 and r.json() == {"error": "JWT authentication not configured"}


def test_rate_limit_429_with_headers_and_refill(make_daemon):
    d = make_daemon(STROMBOLI_RATE_LIMIT_ENABLED="true", STROMBOLI_RATE_LIMIT_RPS="1",
                    STROMBOLI_RATE_LIMIT_BURST="2")
    first = d.http.get("/jobs")
    assert first.status_code == 200
    assert first.headers["X-RateLimit-Limit"] == "1"
    assert first.headers["X-RateLimit-Remaining"] == "1"
    assert int(first.headers["X-RateLimit-Reset"]) >= int(time.time())
    assert d.http.get("/jobs").headers["X-RateLimit-Remaining"] == "0"
    third = d.http.get("/jobs")
    assert third.status_code == 429 and third.json() == {"error": "rate limit exceeded"}
    assert third.headers["X-RateLimit-Remaining"] == "0"
    retry_after = int(third.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    time.sleep(retry_after)
    assert d.http.get("/jobs").status_code == 200  # refilled
    for _ in range(3):
        assert d.http.get("/health").status_code == 200  # never rate-limited
    metrics = httpx.get(f"http://127.0.0.1:{d.metrics_port}/metrics").text
    assert re.search(r"^stromboli_rate_limited_total [1-9]", metrics, re.M)


def test_rate_limit_runs_before_auth(make_daemon):
    d = make_daemon(STROMBOLI_RATE_LIMIT_ENABLED="true", STROMBOLI_RATE_LIMIT_RPS="1",
                    STROMBOLI_RATE_LIMIT_BURST="1", STROMBOLI_AUTH_ENABLED="true",
                    STROMBOLI_JWT_SECRET=JWT_SECRET)
    assert d.http.get("/jobs").status_code == 401
    assert d.http.get("/jobs").status_code == 429  # unauthenticated floods are limited too


@pytest.mark.parametrize("trusted", [True, False])
def test_forwarded_headers_only_from_trusted_proxies(make_daemon, trusted):
    env = {"STROMBOLI_RATE_LIMIT_ENABLED": "true", "STROMBOLI_RATE_LIMIT_RPS": "0.1",
           "STROMBOLI_RATE_LIMIT_BURST": "1"}
    if trusted:
        env["STROMBOLI_RATE_LIMIT_TRUSTED_PROXIES"] = "127.0.0.0/8"
    d = make_daemon(**env)
    # The proxy appends the address it saw: the rightmost entry is the client.
    statuses = [d.http.get("/jobs", headers={"X-Forwarded-For": f"10.0.0.1, 203.0.113.{i}"}
                           ).status_code for i in range(1, 4)]
    statuses.append(d.http.get("/jobs", headers={"X-Real-IP": "198.51.100.7"}).status_code)
    assert statuses == ([200, 200, 200, 200] if trusted else [200, 429, 429, 429])


def test_ip_rotation_flood_keeps_buckets_bounded(make_daemon):
    d = make_daemon(STROMBOLI_RATE_LIMIT_ENABLED="true", STROMBOLI_RATE_LIMIT_TRUSTED_PROXIES="127.0.0.1",
                    STROMBOLI_RATE_LIMIT_MAX_CLIENTS="50")
    with httpx.Client(base_url=d.url) as client:
        for i in range(300):
            client.get("/claude/status", headers={"X-Forwarded-For": f"10.{i // 250}.{i % 250}.9"})
    metrics = httpx.get(f"http://127.0.0.1:{d.metrics_port}/metrics").text
    clients = int(re.search(r"^stromboli_rate_limit_clients (\d+)", metrics, re.M).group(1))
    assert 1 <= clients <= 50


def test_access_log_is_structured_and_keeps_secrets_out(make_daemon):
    d = make_daemon(STROMBOLI_AUTH_ENABLED="true", STROMBOLI_JWT_SECRET=JWT_SECRET,
                    STROMBOLI_API_TOKENS="static-token-1")
    secret_prompt = f"hello confidential-{marker()}"
    d.http.post("/run", json={"prompt": secret_prompt}, headers={**STATIC, "X-Request-ID": "rid-7"})
    d.http.get("/run/stream", params={"prompt": secret_prompt}, headers=STATIC)
    token = d.http.post("/auth/token", json={"client_id": "c"}, headers=STATIC).json()
    d.http.get("/jobs", headers=bearer(token["access_token"]))
    text = d.log()
    for secret in (secret_prompt, "static-token-1", token["access_token"], JWT_SECRET,
                   "sk-test-not-a-real-key"):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines()]
    access = next(l for l in lines if l.get("request_id") == "rid-7")
    assert access["msg"] == "request" and access["method"] == "POST"
    assert access["path"] == "/run" and access["status"] == 200
    assert access["duration_ms"] > 0 and access["client_ip"] == "127.0.0.1"


def test_text_logs_and_level(make_daemon):
    d = make_daemon(wait_podman=False, STROMBOLI_LOG_FORMAT="text", STROMBOLI_LOG_LEVEL="warn")
    d.http.get("/jobs")
    text = d.log()
    assert "WARNING" in text and not text.lstrip().startswith("{")
    assert "method=GET" not in text  # info-level access lines are below the level


def test_volume_allowlist(make_daemon, tmp_path):
    allowed = tmp_path / "projects"
    (allowed / "demo").mkdir(parents=True)
    (allowed / "demo" / "notes.txt").write_text("mounted-file-content\n")
    (allowed / "escape").symlink_to("/etc")
    d = make_daemon(STROMBOLI_AGENT_ALLOWED_VOLUMES=str(allowed))
    ok = d.http.post("/run", json={
        "prompt": "bash: cat /data/notes.txt", "claude": {"dangerously_skip_permissions": True},
        "podman": {"volumes": [f"{allowed}/demo:/data:ro,z"]}}).json()
    assert ok["status"] == "completed", ok
    assert "mounted-file-content" in ok["output"]
    rejected = {
        f"{allowed}/escape:/data": "goes through a symbolic link",
        f"{allowed}/demo/notes.txt/x:/data": "is not a folder",
        f"{tmp_path}:/data": "is not in allowed directories",
        f"{allowed}/demo:/home/user/.ssh": "is blocked for security reasons",
        f"{allowed}/demo:/etc/x": "is blocked for security reasons",
        f"{allowed}/demo:/data:exec": 'mount option "exec" is not allowed',
        f"{allowed}/demo": "expected host:container[:options]",
        f"{allowed}/demo:relative": "must be an absolute path",
    }
    for volume, message in rejected.items():
        r = d.http.post("/run", json={"prompt": "x", "podman": {"volumes": [volume]}})
        assert r.status_code == 400, volume
        error = run_error(r)
        assert error.startswith("volume validation failed: ") and message in error, (volume, error)


def test_image_allowlist(make_daemon):
    d = make_daemon(STROMBOLI_AGENT_ALLOWED_IMAGE_PATTERNS="localhost/stromboli-agent:*")
    ok = d.http.post("/run", json={"prompt": "hello", "podman": {"image": IMAGE}}).json()
    assert ok["status"] == "completed"
    r = d.http.post("/run", json={"prompt": "hello", "podman": {"image": "python:3.12"}})
    assert r.status_code == 400
    assert run_error(r) == 'image validation failed: image "python:3.12" not in allowed patterns'


def test_secrets_env_rules(daemon):
    too_many = {f"VAR_{i}": "s" for i in range(51)}
    cases = {
        "too many secrets requested (51), maximum is 50": too_many,
        'invalid environment variable name "1BAD"': {"1BAD": "s"},
        'environment variable "LD_LIBRARY_PATH" is not allowed': {"LD_LIBRARY_PATH": "s"},
        'secret name for environment variable "EMPTY" cannot be empty': {"EMPTY": ""},
        "exceeds maximum length of 253 characters": {"LONG": "s" * 254},
        'secret "no-such-secret-here" not found': {"OK_NAME": "no-such-secret-here"},
    }
    for message, mapping in cases.items():
        r = daemon.http.post("/run", json={"prompt": "x", "podman": {"secrets_env": mapping}})
        assert r.status_code == 400, message
        assert message in run_error(r)
        assert run_error(r).startswith("secrets validation failed: ")


def test_secrets_env_reaches_the_agent_but_never_the_api(daemon):
    name, value = f"test-secret-{marker()}", f"value-{marker()}"
    assert daemon.http.post("/secrets", json={"name": name, "value": value}).status_code == 201
    try:
        job_id = daemon.http.post("/run/async", json={
            "prompt": "bash: echo got=$MY_SECRET; sleep 2",
            "claude": {"dangerously_skip_permissions": True},
            "podman": {"secrets_env": {"MY_SECRET": name}}}).json()["job_id"]
        running = wait_until(lambda: [c for c in agent_containers(f"stromboli.job={job_id}")
                                      if c.attrs.get("State") == "running"], 30,
                             what="the run's container")
        with podman_client() as client:  # inspected while it runs (it is removed afterwards)
            inspected = client.containers.get(running[0].id).attrs
        assert inspected["Config"]["Env"] and value not in json.dumps(inspected)
        body = daemon.wait_job(job_id)
        assert body["status"] == "completed", body
        assert f"got={value}" in body["output"]  # the agent itself printed it
        assert value not in daemon.log()
    finally:
        with podman_client() as client:
            client.secrets.remove(name)


# ---------------------------------------------------------------------------
# Network boundary: the network is hostile (issue 10)
# ---------------------------------------------------------------------------
# Each test plays an attacker from loopback (never any other address), bounded in time and
# count: connections that never finish, a /health flood, a web page in the user's browser,
# replayed and leaked tokens, a forged proxy header, webhook endpoints that redirect or probe,
# and numbers no container should ever see.

def metric_value(d: Daemon, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", scrape(d), re.M)
    return float(m.group(1)) if m else None


def half_requests(port: int, count: int) -> list[socket.socket]:
    """Connections that send half a request line and hold (slowloris)."""
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(1)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            break  # the listen queue is full: the attack is already complete
        held.append(sock)
        with contextlib.suppress(OSError):  # the server may have closed it already
            sock.sendall(b"GET /health HT")
    return held


def still_open(socks: list[socket.socket], within: float) -> list[socket.socket]:
    """The sockets the server has not closed (EOF or reset) after `within` seconds; what it
    sends first (a 408, say) is read and skipped."""
    left_open = set(socks)
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + within
        while left_open and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(min(left, 0.5)):
                try:
                    if key.fileobj.recv(65536):
                        continue
                except OSError:
                    pass
                selector.unregister(key.fileobj)
                left_open.discard(key.fileobj)
    return [sock for sock in socks if sock in left_open]


def health_answers(d: Daemon, timeout: float = 1) -> bool:
    try:
        return httpx.get(d.url + "/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def test_connections_past_the_cap_are_closed_at_once_and_slow_heads_time_out(make_daemon):
    d = make_daemon(STROMBOLI_SERVER_HEADER_TIMEOUT="3s", STROMBOLI_SERVER_MAX_CONNECTIONS="50")
    started = time.monotonic()
    held = half_requests(d.port, 40)  # under the cap
    flood: list[socket.socket] = []
    try:
        assert len(held) == 40
        assert health_answers(d, timeout=2), "/health stalled behind 40 half-sent requests"
        flood = half_requests(d.port, 160)  # 200 in all
        assert len(held + flood) > 100
        survivors = still_open(held + flood, 1)
        assert len(survivors) <= 50, f"{len(survivors)} connections open with a cap of 50"
        survivors = still_open(survivors, started + 3 + 2 - time.monotonic())
        assert survivors == [], f"{len(survivors)} half-sent requests outlived the header timeout"
        wait_until(lambda: health_answers(d), 3, 0.2, "/health once the slow ones are gone")
    finally:
        for sock in held + flood:
            sock.close()
    assert (metric_value(d, "stromboli_connections_rejected_total") or 0) >= 150
    assert metric_value(d, "stromboli_open_connections") is not None


def test_a_slowloris_past_the_descriptor_limit_does_not_take_the_daemon_down(make_daemon):
    d = make_daemon(STROMBOLI_SERVER_HEADER_TIMEOUT="3s", STROMBOLI_SERVER_MAX_CONNECTIONS="50")
    # systemd's default of 1,024 descriptors against 1,100 connections, scaled down: 128
    # descriptors (set after start, so the daemon cannot raise them) against 200 connections.
    resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (128, 128))
    started = time.monotonic()
    held = half_requests(d.port, 200)
    try:
        assert len(held) > 128
        wait_until(lambda: health_answers(d), 3 + 3, 0.2, "/health during the slowloris")
        survivors = still_open(held, started + 3 + 3 - time.monotonic())
        assert survivors == [], f"{len(survivors)} half-sent requests outlived the header timeout"
    finally:
        for sock in held:
            sock.close()
    log = d.log()
    assert log.count("Traceback") <= 2 and log.count('"level": "ERROR"') <= 5, \
        f"{log.count(chr(10))} log lines, {log.count('Traceback')} tracebacks"


def drip(port: int, first: bytes, more: bytes, limit: float) -> tuple[float, bytes] | None:
    """Send `first`, then `more` every 0.25 s, until the server answers or closes: how long it
    took and the first bytes it sent (b"" when it just closed); None if still open at `limit`."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=0.25) as sock:
        sock.sendall(first)
        while time.monotonic() - started < limit:
            try:
                return time.monotonic() - started, sock.recv(65536)
            except socket.timeout:
                pass
            except OSError:
                return time.monotonic() - started, b""
            try:
                sock.sendall(more)
            except OSError:
                return time.monotonic() - started, b""
    return None


def test_slow_request_heads_and_bodies_are_cut_off(make_daemon):
    d = make_daemon(STROMBOLI_SERVER_HEADER_TIMEOUT="2s", STROMBOLI_SERVER_BODY_TIMEOUT="2s")
    host = f"Host: 127.0.0.1:{d.port}\r\n".encode()
    head = drip(d.port, b"GET /health HTTP/1.1\r\n" + host + b"X-Pad: ", b"a", limit=5)
    assert head is not None, "a request head dripped a byte at a time was never cut off"
    assert head[1] == b"" or head[1].startswith(b"HTTP/1.1 408"), head
    body = drip(d.port, b"POST /run HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n" + b'{"prompt": "', b"x", limit=5)
    assert body is not None, "a body dripped a byte at a time was never cut off"
    assert body[1] == b"" or body[1].startswith(b"HTTP/1.1 408"), body
    assert health_answers(d)


class PodmanTap:
    """A unix socket in front of the Podman API that records the path of every request going
    through (on the model server's event loop)."""

    def __init__(self, path: pathlib.Path, loop: asyncio.AbstractEventLoop):
        self.path, self.loop, self.requests = path, loop, []
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_unix_server(self._connection, str(path)), loop).result(5)

    async def _connection(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(PODMAN_SOCKET)
        await asyncio.gather(self._pipe(reader, up_writer, True),
                             self._pipe(up_reader, writer, False))

    async def _pipe(self, reader, writer, record: bool) -> None:
        try:
            while data := await reader.read(65536):
                if record:
                    self.requests += re.findall(rb"^(?:GET|HEAD|POST|PUT|DELETE) (\S+) HTTP/1",
                                                data, re.M)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)


@pytest.fixture
def podman_tap(model, tmp_path):
    """Ask for it before make_daemon: it must outlive the daemons that use it."""
    tap = PodmanTap(tmp_path / "podman.sock", model.loop)
    yield tap
    tap.close()


def test_health_answers_from_state_without_calling_podman(podman_tap, make_daemon):
    d = make_daemon(STROMBOLI_PODMAN_URL=f"unix://{podman_tap.path}")
    seen = len(podman_tap.requests)
    answered, started = 0, time.monotonic()
    with httpx.Client(base_url=d.url, timeout=5) as client:
        while answered < 200 and time.monotonic() - started < 5:
            assert client.get("/health").status_code == 200
            answered += 1
    during = podman_tap.requests[seen:]
    assert [p for p in during if not p.endswith(b"/_ping")] == [], \
        f"{answered} /health calls made {len(during)} Podman calls"
    assert len(during) <= 2  # the monitor's own ping every 5 s
    assert answered == 200, f"only {answered} /health answers in 5 s"
    body = d.http.get("/health").json()
    assert body["status"] == "ok"
    assert body["components"][0] == {"name": "podman", "status": "ok"}


def test_health_does_not_show_the_credentials_path(make_daemon):
    hidden = f"private-{marker()}"
    d = make_daemon(ANTHROPIC_API_KEY="",
                    STROMBOLI_AGENT_CREDENTIALS_FILE=f"/nonexistent/{hidden}/.credentials.json")
    r = d.http.get("/health")
    assert hidden not in r.text
    file_component = next(c for c in r.json()["components"]
                          if c["name"] == "claude-credentials-file")
    assert file_component["status"] == "error"
    assert file_component["error"].startswith("credentials file missing")
    assert "/" not in file_component["error"]


EVIL_ORIGIN = {"Origin": "http://evil.example"}


def test_a_foreign_web_page_cannot_start_runs(daemon, model):
    tag = marker()
    r = daemon.http.post("/run", json={"prompt": f"hello {tag}"}, headers=EVIL_ORIGIN)
    assert r.status_code == 403 and run_error(r).startswith("cross-origin request refused")
    hooks = json.dumps({"post_start": [f"echo {tag}"]})
    r = daemon.http.get("/run/stream", headers=EVIL_ORIGIN,
                        params={"prompt": f"hello {tag}", "podman.lifecycle": hooks})
    assert r.status_code == 403 and r.text.startswith("cross-origin request refused")
    for origin in ("null", f"http://127.0.0.1:{daemon.port + 1}",
                   f"https://127.0.0.1:{daemon.port}"):
        r = daemon.http.post("/run", json={"prompt": f"hello {tag}"}, headers={"Origin": origin})
        assert r.status_code == 403, origin
    # A form or fetch "simple request" needs no preflight: text/plain, and no Origin is needed.
    r = daemon.http.post("/run", content=json.dumps({"prompt": f"hello {tag}"}),
                         headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert run_error(r).startswith("Content-Type must be application/json")
    r = daemon.http.get("/sessions", headers=EVIL_ORIGIN)
    assert r.status_code == 403 and r.json()["error"].startswith("cross-origin request refused")
    time.sleep(1.5)  # a run started behind a refusal would have reached the model by now
    assert model.requests_with(tag) == []


def test_dns_rebinding_host_names_are_refused(daemon):
    for host in ("evil.example", f"evil.example:{daemon.port}",
                 f"localhost.evil.example:{daemon.port}"):
        r = daemon.http.get("/sessions", headers={"Host": host})
        assert r.status_code == 421, host
        assert r.json()["error"].startswith("unknown Host header"), host
    for host in (f"localhost:{daemon.port}", "localhost", f"127.0.0.1:{daemon.port}",
                 f"[::1]:{daemon.port}"):
        assert daemon.http.get("/sessions", headers={"Host": host}).status_code == 200, host
    same = {"Host": f"localhost:{daemon.port}", "Origin": f"http://localhost:{daemon.port}"}
    assert daemon.http.get("/sessions", headers=same).status_code == 200
    r = daemon.http.post("/run", json={"prompt": "hello"},
                         headers={"Origin": f"http://127.0.0.1:{daemon.port}"})
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text


def test_allowed_origins_and_hosts_are_settings(make_daemon):
    d = make_daemon(wait_podman=False, STROMBOLI_SERVER_ALLOWED_ORIGINS="https://dash.example",
                    STROMBOLI_SERVER_ALLOWED_HOSTS="stromboli.lan")
    assert d.http.get("/sessions", headers={"Origin": "https://dash.example"}).status_code == 200
    r = d.http.get("/sessions", headers={"Origin": "https://dash.example.evil.example"})
    assert r.status_code == 403 and r.json()["error"].startswith("cross-origin request refused")
    named = {"Host": f"stromboli.lan:{d.port}", "Origin": f"http://stromboli.lan:{d.port}"}
    assert d.http.get("/sessions", headers=named).status_code == 200
    assert d.http.get("/sessions", headers={"Host": "other.lan"}).status_code == 421


def mint(d: Daemon, headers: dict = STATIC) -> dict:
    r = d.http.post("/auth/token", json={"client_id": "grant"}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def refresh(d: Daemon, refresh_token: str) -> httpx.Response:
    return d.http.post("/auth/refresh", json={"refresh_token": refresh_token})


def jobs_status(d: Daemon, access_token: str) -> int:
    return d.http.get("/jobs", headers=bearer(access_token)).status_code


def test_only_static_tokens_mint(auth_daemon):
    pair = mint(auth_daemon)
    for name, token in (("access JWT", pair["access_token"]), ("forged JWT", forge()),
                        ("refresh JWT", pair["refresh_token"])):
        r = auth_daemon.http.post("/auth/token", json={"client_id": "more"}, headers=bearer(token))
        assert r.status_code == 401, name


def test_refresh_tokens_are_single_use_and_reuse_ends_the_grant(auth_daemon):
    first = mint(auth_daemon)
    r = refresh(auth_daemon, first["refresh_token"])
    assert r.status_code == 200
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert jobs_status(auth_daemon, second["access_token"]) == 200
    assert refresh(auth_daemon, first["refresh_token"]).status_code == 401  # replayed
    assert jobs_status(auth_daemon, second["access_token"]) == 401  # the whole family ends
    assert refresh(auth_daemon, second["refresh_token"]).status_code == 401
    assert jobs_status(auth_daemon, first["access_token"]) == 401
    other = mint(auth_daemon)  # another grant is untouched
    assert jobs_status(auth_daemon, other["access_token"]) == 200


def test_logout_ends_every_token_of_the_grant(auth_daemon):
    first = mint(auth_daemon)
    second = refresh(auth_daemon, first["refresh_token"]).json()
    other = mint(auth_daemon)
    r = auth_daemon.http.post("/auth/logout", headers=bearer(first["access_token"]))
    assert r.json() == {"success": True, "message": "token invalidated"}
    assert jobs_status(auth_daemon, first["access_token"]) == 401
    assert jobs_status(auth_daemon, second["access_token"]) == 401  # minted by the refresh
    assert refresh(auth_daemon, second["refresh_token"]).status_code == 401
    assert jobs_status(auth_daemon, other["access_token"]) == 200


def test_logout_with_a_bad_refresh_token_revokes_nothing(auth_daemon):
    pair = mint(auth_daemon)
    r = auth_daemon.http.post("/auth/logout", headers=bearer(pair["access_token"]),
                              json={"refresh_token": "not-a-token"})
    assert r.status_code == 401
    assert jobs_status(auth_daemon, pair["access_token"]) == 200
    assert refresh(auth_daemon, pair["refresh_token"]).status_code == 200


def test_failed_authentications_are_budgeted_per_ip(make_daemon):
    d = make_daemon(wait_podman=False, STROMBOLI_AUTH_ENABLED="true",
                    STROMBOLI_JWT_SECRET=JWT_SECRET, STROMBOLI_API_TOKENS="static-token-1",
                    STROMBOLI_AUTH_FAILURE_BURST="5", STROMBOLI_AUTH_FAILURE_RATE="0.25")
    statuses = []
    for i in range(30):  # wrong static tokens and forged JWTs, on two routes
        if i % 2:
            r = d.http.post("/auth/token", json={"client_id": "x"}, headers=bearer(f"guess-{i}"))
        else:
            r = d.http.get("/jobs", headers=bearer(forge(key="a-guessed-key-" + "x" * 32)))
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[-1] == 429, f"no 429 after {len(statuses)} failed authentications"
    assert statuses.count(401) <= 6, statuses
    retry_after = int(r.headers["Retry-After"])
    assert 1 <= retry_after <= 8
    assert d.http.get("/jobs", headers=bearer("guess-again")).status_code == 429
    assert d.http.post("/auth/token", json={"client_id": "x"},
                       headers=bearer("guess-again")).status_code == 429
    time.sleep(retry_after + 0.2)
    assert d.http.get("/jobs", headers=bearer("guess-again")).status_code == 401  # refilled


def test_a_valid_credential_is_served_past_the_failure_budget(make_daemon):
    """Whoever shares the owner's address (NAT, the reverse proxy, a process on the host)
    spends its failed-auth budget with wrong tokens: the owner's own tokens still work,
    only the wrong ones get 429."""
    d = make_daemon(wait_podman=False, STROMBOLI_AUTH_ENABLED="true",
                    STROMBOLI_JWT_SECRET=JWT_SECRET, STROMBOLI_API_TOKENS="static-token-1",
                    STROMBOLI_AUTH_FAILURE_BURST="3", STROMBOLI_AUTH_FAILURE_RATE="0.01")
    pair = d.http.post("/auth/token", json={"client_id": "owner"}, headers=STATIC).json()
    access = bearer(pair["access_token"])
    for i in range(3):  # the budget, spent by someone else from 127.0.0.1
        assert d.http.get("/jobs", headers=bearer(f"wrong-{i}")).status_code == 401
    wrong = bearer("wrong-again")
    forged = bearer(forge(key="a-guessed-key-" + "x" * 32))
    assert d.http.get("/jobs", headers=wrong).status_code == 429
    assert d.http.get("/jobs", headers=forged).status_code == 429
    assert d.http.get("/auth/validate", headers=forged).status_code == 429
    assert d.http.post("/auth/refresh", json={"refresh_token": "x.y.z"}).status_code == 429
    assert d.http.get("/jobs", headers=STATIC).status_code == 200
    assert d.http.get("/jobs", headers=access).status_code == 200
    assert d.http.get("/auth/validate", headers=access).json()["subject"] == "owner"
    assert d.http.post("/auth/token", json={"client_id": "owner"},
                       headers=STATIC).status_code == 200
    refreshed = d.http.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text
    assert d.http.post("/auth/logout",
                       headers=bearer(refreshed.json()["access_token"])).status_code == 200
    assert d.http.get("/jobs", headers=wrong).status_code == 429  # still past the budget


def test_a_forged_forwarded_chain_is_limited_like_the_real_client(make_daemon):
    d = make_daemon(wait_podman=False, STROMBOLI_RATE_LIMIT_ENABLED="true",
                    STROMBOLI_RATE_LIMIT_RPS="0.1", STROMBOLI_RATE_LIMIT_BURST="5",
                    STROMBOLI_RATE_LIMIT_TRUSTED_PROXIES="127.0.0.1/32")

    def passed(forwarded) -> int:
        return sum(d.http.get("/jobs", headers={"X-Forwarded-For": forwarded(i)}).status_code
                   == 200 for i in range(20))
    assert passed(lambda i: f"198.18.{i}.1, 203.0.113.7") <= 6  # the client's own entry is last
    assert passed(lambda i: f"198.18.{i}.2, 203.0.113.8, 127.0.0.1") <= 6  # past our proxy
    assert passed(lambda i: f"not-an-ip-{i}") <= 6  # ignored: the proxy itself is the client
    assert passed(lambda i: f"203.0.113.{100 + i}") == 20  # real clients keep their own budgets


@contextlib.contextmanager
def hook_receiver(model: ScriptedModel, replies: dict[str, tuple[int, str]],
                  host: str = "127.0.0.1"):
    """Webhook endpoints on `host` (served from the model server's thread): `replies` maps a
    path to (status, Location); other paths answer 200. Yields the base URL and the list of
    (method, path) received."""
    seen: list[tuple[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append((request.method, request.path))
        await request.read()
        status, location = replies.get(request.path, (200, ""))
        return web.Response(status=status, headers={"Location": location} if location else {},
                            text="upstream db at 10.9.8.7:5432 is down")

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, 0).start()
        return runner
    runner = asyncio.run_coroutine_threadsafe(start(), model.loop).result(5)
    try:
        yield f"http://{host}:{runner.addresses[0][1]}", seen
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), model.loop).result(10)


def deliveries(d: Daemon, job_id: str) -> list[dict]:
    return d.http.get(f"/jobs/{job_id}").json().get("webhook_deliveries", [])


def test_webhook_deliveries_cut_by_a_restart_go_on_after_it(make_daemon, model, tmp_path):
    """A job finished, its webhook failing and retried with backoff, the daemon killed
    meanwhile: the next start goes on with the attempts that are left (issue 13)."""
    state = tmp_path / "state"
    env = {"STROMBOLI_WEBHOOK_MAX_ATTEMPTS": "10"}
    d = make_daemon(state_dir=state, **env)
    with hook_receiver(model, {"/hook": (503, "")}) as (url, seen):
        job_id = d.http.post("/run/async", json={"prompt": "hello", "webhook_url": url + "/hook"}
                             ).json()["job_id"]
        wait_until(lambda: len(deliveries(d, job_id)) >= 1, 30, what="a failed first attempt")
        d.stop(signal.SIGKILL)
    assert seen
    with hook_receiver(model, {}) as (url2, seen2):
        # The receiver came back (on another port: point the job at it, as a DNS change would).
        with sqlite3.connect(state / "stromboli.db") as db:
            db.execute("UPDATE jobs SET request=json_set(request, '$.webhook_url', ?) WHERE id=?",
                       (url2 + "/hook", job_id))
        again = make_daemon(state_dir=state, **env)
        wait_until(lambda: seen2, 30, what="the delivery after the restart")
        attempts = deliveries(again, job_id)
        assert attempts[-1]["status_code"] == 200 and "error" not in attempts[-1]
        # went on where it stopped (numbering goes on), and delivered once
        assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
        assert all(a["status_code"] == 503 for a in attempts[:-1]) and len(attempts) >= 2
        assert len(seen2) == 1


def test_webhooks_follow_no_redirect_and_log_only_a_reason(make_daemon, model):
    d = make_daemon(STROMBOLI_WEBHOOK_MAX_ATTEMPTS="2")
    replies = {"/temporary": (307, "/target"), "/found": (302, "/target"), "/broken": (503, "")}
    with hook_receiver(model, replies) as (url, seen):
        targets = {path: url + path for path in replies}
        targets["closed port"] = f"http://127.0.0.1:{free_port()}/hook"
        jobs = {name: d.http.post("/run/async", json={"prompt": "hello", "webhook_url": target}
                                  ).json()["job_id"] for name, target in targets.items()}
        wait_until(lambda: any(path == "/target" for _, path in seen)
                   or all(len(deliveries(d, job)) >= 2 for job in jobs.values()),
                   40, 0.2, "two delivery attempts per job")
        assert [request for request in seen if request[1] == "/target"] == []
    expected = {"/temporary": (307, "redirect not followed"),
                "/found": (302, "redirect not followed"), "/broken": (503, "HTTP 5xx"),
                "closed port": (None, "connection failed")}  # no address, no port, no OS text
    for name, (status, reason) in expected.items():
        attempts = [(a.get("status_code"), a.get("error")) for a in deliveries(d, jobs[name])]
        assert attempts == [(status, reason)] * 2, name


def test_webhook_allowlist_refuses_other_hosts_at_submit(make_daemon, model):
    d = make_daemon(STROMBOLI_WEBHOOK_ALLOWED_HOSTS="example.invalid, 127.0.0.2/32")
    with hook_receiver(model, {}, host="127.0.0.2") as (url, seen):
        port = url.rsplit(":", 1)[1]
        for refused in (f"http://127.0.0.1:{port}/hook", f"http://localhost:{port}/hook",
                        f"http://127.0.0.3:{port}/hook"):
            r = d.http.post("/run/async", json={"prompt": "hello", "webhook_url": refused})
            assert r.status_code == 400, (refused, r.text)
            assert run_error(r)
        r = d.http.post("/run/async", json={"prompt": "hello", "webhook_url": url + "/hook"})
        assert r.status_code == 202, r.text
        wait_until(lambda: seen, 30, what="the delivery to the listed network")
    assert len(d.http.get("/jobs").json()["jobs"]) == 1


def test_out_of_range_run_options_are_400_not_500(make_daemon):
    d = make_daemon(STROMBOLI_AGENT_ALLOW_ALL_VOLUMES="true")

    def run_body(**sections) -> bytes:
        return json.dumps({"prompt": "hello", **sections}).encode()
    bodies = {
        "NUL in a volume host path": run_body(podman={"volumes": ["/tmp/a\0b:/data"]}),
        "cpu_shares -5": run_body(podman={"cpu_shares": -5}),
        "cpu_shares 2**40": run_body(podman={"cpu_shares": 2 ** 40}),
        "a 40-digit memory": run_body(podman={"memory": "9" * 40}),
        "memory over 1 TiB": run_body(podman={"memory": "2000g"}),
        "max_turns over 10000": run_body(claude={"max_turns": 10 ** 6}),
        "max_budget_usd NaN": b'{"prompt": "hello", "claude": {"max_budget_usd": NaN}}',
        "max_budget_usd Infinity": b'{"prompt": "hello", "claude": {"max_budget_usd": Infinity}}',
        "max_budget_usd 1e400": b'{"prompt": "hello", "claude": {"max_budget_usd": 1e400}}',
        "a NaN literal anywhere": b'{"prompt": "hello", "note": -Infinity}',
    }
    wrong = {}
    for path in ("/run", "/run/async"):
        for name, body in bodies.items():
            r = d.http.post(path, content=body, headers={"Content-Type": "application/json"})
            envelope = r.json() if r.headers.get("content-type", "").startswith(
                "application/json") else {}
            if r.status_code != 400 or envelope.get("id") != "" or \
                    envelope.get("status") != "error" or not envelope.get("error"):
                wrong[f"{path}: {name}"] = (r.status_code, r.text[:120])
    assert not wrong, "\n".join(f"{name} → {outcome}" for name, outcome in wrong.items())
    assert "Traceback" not in d.log()


# ---------------------------------------------------------------------------
# Images and secrets
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def base_image(agent_image):
    """A glibc base image without claude (the agent image minus the binary), labelled
    like a third-party image, for two-image mode."""
    name = "localhost/stromboli-base:test"
    with podman_client() as client:
        if not client.images.exists(name):
            container = client.containers.create(agent_image, ["true"], user="root")
            try:
                container.start()
                container.wait()
                subprocess.run(["podman", "cp", "/dev/null", f"{container.id}:/usr/local/bin/claude"],
                               check=True)
                container.commit(repository="localhost/stromboli-base", tag="test",
                                 changes=["LABEL ai.stromboli.compatible=false",
                                          "LABEL ai.stromboli.claude-cli=false",
                                          "LABEL ai.stromboli.tools=git,jq",
                                          "LABEL ai.stromboli.description=Base for tests"])
            finally:
                container.remove(force=True)
    return name


def test_image_list_is_ranked_and_labelled(daemon, base_image):
    with podman_client() as client:  # a name the ranking knows as incompatible
        client.images.get(base_image).tag("localhost/busybox-probe", "test")
    try:
        images = daemon.http.get("/images").json()["images"]
    finally:
        with podman_client() as client:
            client.images.remove("localhost/busybox-probe:test")
    ranks = [i["compatibility_rank"] for i in images]
    assert ranks == sorted(ranks)
    agent = next(i for i in images if f"{i['repository']}:{i['tag']}" == IMAGE)
    assert agent["compatibility_rank"] == 1 and agent["compatible"] is True
    assert agent["has_claude_cli"] is True
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", agent["created"])
    base = next(i for i in images if i["repository"] == "localhost/stromboli-base")
    assert base["compatibility_rank"] == 3 and base["tools"] == ["git", "jq"]
    assert base["has_claude_cli"] is False and base["description"] == "Base for tests"
    probe = [i for i in images if "busybox" in i["repository"] or "probe" in i["repository"]]
    assert probe and all(i["compatibility_rank"] in (3, 4) for i in probe)
    busybox = next(i for i in probe if i["repository"] == "localhost/busybox-probe")
    assert busybox["compatibility_rank"] == 4 and busybox["compatible"] is False


def test_image_inspect(daemon, base_image):
    detail = daemon.http.get(f"/images/{IMAGE}").json()
    assert detail["repository"] + ":" + detail["tag"] == IMAGE
    assert detail["labels"]["ai.stromboli.compatible"] == "true"
    assert detail["rank_description"] == "Stromboli verified compatible"
    encoded = IMAGE.replace("/", "%2F")
    assert daemon.http.get(f"/images/{encoded}").json() == detail
    r = daemon.http.get("/images/localhost/no-such-image:1")
    assert r.status_code == 404 and r.json() == {"error": "image not found"}
    r = daemon.http.get("/images/bad$name")
    assert r.status_code == 400 and r.json() == {"error": "validation error: invalid image name format"}
    r = daemon.http.get("/images/" + "a" * 300)
    assert r.status_code == 400 and "exceeds maximum length" in r.json()["error"]


def test_image_search_offline_is_502(daemon):
    r = daemon.http.get("/images/search", params={"q": "python", "limit": "500"})
    assert r.status_code == 502 and r.json() == {"error": "registry search failed"}
    assert daemon.http.get("/images/search").json() == {"error": "query parameter 'q' is required"}
    for limit in ("0", "-1", "many"):
        r = daemon.http.get("/images/search", params={"q": "python", "limit": limit})
        assert r.status_code == 400 and r.json() == {"error": "invalid limit parameter"}
    r = daemon.http.get("/images/search", params={"q": "bad query!"})
    assert r.status_code == 400 and r.json() == {"error": "validation error: invalid search query format"}


def test_image_pull_of_an_unreachable_image_fails(daemon):
    r = daemon.http.post("/images/pull", json={"image": "docker.io/library/alpine:3.19"})
    assert r.status_code == 500
    assert r.json()["error"].startswith("failed to pull image: ")
    assert daemon.http.post("/images/pull", json={}).status_code == 400
    r = daemon.http.post("/images/pull", json={"image": "bad image"})
    assert r.status_code == 400
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        with connect_sse(client, "POST", "/images/pull",
                         json={"image": "quay.io/nobody/nothing:1"}) as source:
            events = list(source.iter_sse())
    assert events[-1].event == "error" and "failed to pull image" in events[-1].data
    assert any("Trying to pull" in e.data for e in events if e.event == "message")


def test_secrets_round_trip(daemon):
    name = f"rt-{marker()}"
    value = f"super-secret-{marker()}"
    r = daemon.http.post("/secrets", json={"name": name, "value": value})
    assert r.status_code == 201 and r.json() == {"success": True, "name": name}
    r = daemon.http.post("/secrets", json={"name": name, "value": value})
    assert r.status_code == 409
    assert r.json() == {"success": False, "name": name, "error": "secret already exists"}
    listed = daemon.http.get("/secrets").json()["secrets"]
    mine = next(x for x in listed if x["name"] == name)
    assert mine["managed"] is False and mine["id"] and mine["created_at"]
    managed = next(x for x in listed
                   if x["name"] == f"stromboli-{daemon.instance}-anthropic-api-key")
    assert managed["managed"] is True
    one = daemon.http.get(f"/secrets/{name}").json()
    assert one == mine
    for response in (daemon.http.get("/secrets"), daemon.http.get(f"/secrets/{name}")):
        assert value not in response.text
    r = daemon.http.delete(f"/secrets/{name}")
    assert r.json() == {"success": True, "name": name}
    assert daemon.http.get(f"/secrets/{name}").status_code == 404
    r = daemon.http.delete(f"/secrets/{name}")
    assert r.status_code == 404 and r.json()["error"] == "secret not found"
    assert value not in daemon.log()


def test_secret_names_are_never_id_prefixes(daemon):
    """Podman resolves a name as an ID prefix too: through the API, only exact names count."""
    name, value = f"exact-{marker()}", f"v-{marker()}"
    assert daemon.http.post("/secrets", json={"name": name, "value": value}).status_code == 201
    try:
        secret_id = daemon.http.get(f"/secrets/{name}").json()["id"]
        for prefix in (secret_id[:10], secret_id[:1]):
            assert daemon.http.get(f"/secrets/{prefix}").status_code == 404
            assert daemon.http.delete(f"/secrets/{prefix}").status_code == 404
            r = daemon.http.post("/run", json={"prompt": "x",
                                               "podman": {"secrets_env": {"S": prefix}}})
            assert r.status_code == 400, r.text
        assert daemon.http.get(f"/secrets/{name}").status_code == 200
    finally:
        daemon.http.delete(f"/secrets/{name}")


def test_secret_validation_and_managed_secrets(daemon):
    for body in ({}, {"name": "x"}, {"value": "v"}, {"name": "x", "value": ""}):
        r = daemon.http.post("/secrets", json=body)
        assert r.status_code == 400 and r.json()["success"] is False
    r = daemon.http.post("/secrets", json={"name": "bad name!", "value": "v"})
    assert r.status_code == 400 and "invalid secret name" in r.json()["error"]
    r = daemon.http.post("/secrets", json={"name": "big", "value": "x" * (1024 * 1024 + 1)})
    assert r.status_code == 400 and "exceeds 1 MB" in r.json()["error"]
    assert daemon.http.get("/secrets/bad%20name").status_code == 400
    own = f"stromboli-{daemon.instance}-anthropic-api-key"
    r = daemon.http.delete(f"/secrets/{own}")
    assert r.status_code == 409 and "managed by stromboli" in r.json()["error"]
    with podman_client() as client:
        assert client.secrets.exists(own)


def test_two_image_mode(make_daemon, base_image):
    d = make_daemon(STROMBOLI_AGENT_MOUNT_CLAUDE_CLI="true",
                    STROMBOLI_AGENT_CLI_IMAGE=IMAGE.rsplit(":", 1)[0],
                    STROMBOLI_AGENT_CLI_IMAGE_TAG=IMAGE.rsplit(":", 1)[1])
    body = d.http.post("/run", json={
        "prompt": "bash: command -v claude; test -s /usr/local/bin/claude || echo base-has-no-cli",
        "claude": {"dangerously_skip_permissions": True}, "podman": {"image": base_image}}).json()
    assert body["status"] == "completed", body
    assert "/opt/claude/usr/local/bin/claude" in body["output"]
    assert "base-has-no-cli" in body["output"]
    with podman_client() as client:
        client.images.get(base_image).tag("localhost/alpine-like", "3")
    try:
        r = d.http.post("/run", json={"prompt": "x", "podman": {"image": "localhost/alpine-like:3"}})
        assert r.status_code == 400
        assert run_error(r) == ('image validation failed: image "localhost/alpine-like:3" is '
                                "incompatible with Claude CLI mount (Alpine/musl-based images not "
                                "supported, use glibc-based alternatives like debian/slim)")
    finally:
        with podman_client() as client:
            client.images.remove("localhost/alpine-like:3")


# ---------------------------------------------------------------------------
# Operations — systemd integration, the client CLI
# ---------------------------------------------------------------------------

def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    unit = (HERE / "stromboli.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "LoadCredential=" in unit
    executable = shutil.which("stromboli") or f"{sys.executable} {STROMBOLI}"
    installed = tmp_path / "stromboli.service"
    installed.write_text(unit.replace("/usr/local/bin/stromboli", executable))
    result = subprocess.run(["systemd-analyze", "verify", str(installed)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stromboli.service" not in result.stderr  # no warnings about our unit


def test_notify_protocol_ready_watchdog_stopping(make_daemon, tmp_path):
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(20)
    d = make_daemon(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000")
    messages = []

    def receive_until(predicate) -> None:
        while not any(predicate(m) for m in messages):
            messages.append(receiver.recv(4096).decode())
    receive_until(lambda m: "READY=1" in m)
    ready = next(m for m in messages if "READY=1" in m)
    assert f"STATUS=serving on 127.0.0.1:{d.port}" in ready
    receive_until(lambda m: "WATCHDOG=1" in m)
    pings = sum("WATCHDOG=1" in m for m in messages)
    receive_until(lambda m: sum("WATCHDOG=1" in x for x in messages) >= pings + 2)
    assert any("STATUS=0 running, 0 queued" in m for m in messages)
    d.proc.send_signal(signal.SIGTERM)
    receive_until(lambda m: "STOPPING=1" in m)
    assert d.proc.wait(30) == 0
    receiver.close()


def test_socket_activation_and_credentials_directory(tmp_path, model, agent_image):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "jwt-secret").write_text(JWT_SECRET + "\n")
    (credentials / "anthropic-api-key").write_text("sk-test-from-credential\n")
    port = free_port()
    env = {**os.environ, **agent_env(model), "STROMBOLI_STATE_DIR": str(tmp_path / "state"),
           "STROMBOLI_AUTH_ENABLED": "true", "STROMBOLI_API_TOKENS": "static-token-1",
           "ANTHROPIC_API_KEY": "", "CREDENTIALS_DIRECTORY": str(credentials),
           "STROMBOLI_SERVER_ADDRESS": "127.0.0.1:1",  # unused: the socket comes from systemd
           "STROMBOLI_METRICS_ENABLED": "false"}
    passed = [arg for name in env for arg in ("-E", name)]  # values stay out of argv
    proc = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", *passed,
                             sys.executable, str(STROMBOLI), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        health = wait_until(lambda: _get_json(url + "/health"), 20, what="socket-activated daemon")
        assert health["name"] == "stromboli"
        http = httpx.Client(base_url=url, timeout=60, headers=STATIC)
        assert http.post("/auth/token", json={"client_id": "svc"}).status_code == 200
        assert http.get("/claude/status").json()["configured"] is True
        wait_until(lambda: http.get("/health").json()["status"] == "ok", 20, what="podman")
        body = http.post("/run", json={"prompt": "hello"}).json()
        assert body["status"] == "completed", body
    finally:
        proc.terminate()
        proc.wait(30)


def _get_json(url: str):
    try:
        return httpx.get(url, timeout=2).json()
    except httpx.HTTPError:
        return None


def cli(daemon: Daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return stromboli_cli(*args, env={"STROMBOLI_URL": daemon.url, "STROMBOLI_TOKEN": ""},
                         timeout=timeout)


def test_openapi_documents_exactly_the_route_table(daemon):
    sys.path.insert(0, str(HERE))
    import stromboli
    doc = daemon.http.get("/swagger/doc.json").json()
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    routes = {(method, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path))
              for method, path in ((r.method, r.path) for r in stromboli.ROUTES)}
    assert documented == routes
    assert doc["swagger"] == "2.0" and doc["info"]["version"] == daemon.http.get(
        "/health").json()["version"]
    from openapi_spec_validator import OpenAPIV2SpecValidator
    assert list(OpenAPIV2SpecValidator(doc).iter_errors()) == []
    job = doc["definitions"]["internal_api.JobResponse"]["properties"]
    assert {"usage", "run_id", "started_at", "finished_at"} <= set(job)


def test_swagger_page_needs_no_cdn(daemon):
    r = daemon.http.get("/swagger/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'fetch("doc.json")' in r.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text)


def test_cli_run_streams_readable_text(daemon):
    result = cli(daemon, "run", "bash: echo from-the-cli", "--yes")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "→ Bash: echo from-the-cli"
    assert lines[1] == "  ← from-the-cli"
    assert "tool said: from-the-cli" in result.stdout
    assert "· completed ·" in result.stderr and "tokens" in result.stderr


def test_cli_run_json_lines(daemon):
    result = cli(daemon, "run", "hello", "--json", "--model", "haiku")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["type"] == "system" and events[-1]["type"] == "done"
    assert events[-1]["status"] == "completed"
    assert any(e["type"] == "result" and e["result"] == "Hello from the scripted model"
               for e in events)


def test_cli_exit_codes(daemon):
    assert cli(daemon, "run", "please fail 500").returncode == 1
    assert cli(daemon, "run", "sleep 30", "--timeout", "2s").returncode == 3
    unreachable = stromboli_cli("health", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 4 and "cannot reach stromboli" in unreachable.stderr
    assert stromboli_cli("run").returncode == 2  # missing prompt: usage error
    assert cli(daemon, "cancel", "job-doesnotexist00").returncode == 1


def test_cli_jobs_sessions_health_and_token(daemon, auth_daemon):
    health = cli(daemon, "health")
    assert health.returncode == 0 and "podman: ok" in health.stdout
    job_id = daemon.http.post("/run/async", json={"prompt": "bash: echo job-output",
                              "claude": {"dangerously_skip_permissions": True,
                                         "output_format": "stream-json"}}).json()["job_id"]
    followed = cli(daemon, "jobs", job_id, "--follow")
    assert followed.returncode == 0, followed.stderr
    assert "→ Bash: echo job-output" in followed.stdout
    listed = cli(daemon, "jobs")
    assert job_id in listed.stdout and "completed" in listed.stdout
    shown = json.loads(cli(daemon, "jobs", job_id).stdout)
    assert shown["id"] == job_id and shown["status"] == "completed"
    long_job = daemon.http.post("/run/async", json={"prompt": "sleep 60"}).json()["job_id"]
    daemon.wait_job(long_job, ("running",))
    assert cli(daemon, "cancel", long_job).returncode == 0
    assert daemon.http.get(f"/jobs/{long_job}").json()["status"] == "cancelled"
    session = shown["session_id"]
    sessions = cli(daemon, "sessions")
    assert session in sessions.stdout
    conversation = cli(daemon, "sessions", session)
    assert "user: bash: echo job-output" in conversation.stdout
    token = stromboli_cli("token", "me", env={"STROMBOLI_URL": auth_daemon.url,
                                              "STROMBOLI_TOKEN": "static-token-1"})
    assert token.returncode == 0
    access = token.stdout.strip()
    assert jwt.decode(access, JWT_SECRET, algorithms=["HS256"])["sub"] == "me"
    denied = stromboli_cli("jobs", env={"STROMBOLI_URL": auth_daemon.url, "STROMBOLI_TOKEN": "x"})
    assert denied.returncode == 4 and "401" in denied.stderr


def test_cli_shows_a_spinner_on_a_terminal(daemon):
    import pty
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(STROMBOLI), "run", "sleep 1.5"],
                            stdout=secondary, stderr=secondary, stdin=subprocess.DEVNULL,
                            env={**os.environ, "STROMBOLI_URL": daemon.url})
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(primary)
    assert proc.wait(30) == 0
    text = screen.decode(errors="replace")
    assert re.search(r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]\s+1\.\ds", text)  # elapsed time while waiting
    assert "echo: sleep 1.5" in text


def test_cli_help_reads_well():
    result = stromboli_cli("--help")
    for command in ("serve", "check-config", "image", "run", "jobs", "cancel", "sessions",
                    "token", "health", "agents", "agent"):
        assert command in result.stdout
    run_help = stromboli_cli("run", "--help").stdout
    assert "exit codes: 0 done" in run_help and "--resume" in run_help


# `stromboli agents` / `stromboli agent new|send|show|stop`: the pure parts in-process (a
# scripted stream stands in for the daemon), then against the real daemon.

def agent_sse(seq: int, kind: str, turn_id: str | None = None, **details) -> tuple:
    """One (event, data, id) of an agent stream, as ApiClient.events yields them."""
    body = {"type": kind, "turn_id": turn_id, **details, "at": "2025-01-01T00:00:00.0Z"}
    return kind, json.dumps({k: v for k, v in body.items() if v is not None}), str(seq)


def claude_output(seq: int, turn_id: str, **line) -> tuple:
    return agent_sse(seq, "output", turn_id, content=json.dumps(line))


def assistant_says(seq: int, turn_id: str, text: str) -> tuple:
    return claude_output(seq, turn_id, type="assistant",
                         message={"content": [{"type": "text", "text": text}]})


class ScriptedAgentApi:
    """An ApiClient stand-in: each events() call plays the next scripted stream (or raises
    it), each call() returns (or raises) the next scripted answer."""

    def __init__(self, streams=(), answers=()):
        self.streams, self.answers = list(streams), list(answers)
        self.opened: list[str | None] = []  # the Last-Event-ID of each stream opened
        self.calls: list[tuple] = []

    def events(self, path, query, last_event_id=None):
        self.opened.append(last_event_id)
        stream = self.streams.pop(0)
        if isinstance(stream, Exception):
            raise stream
        yield from stream

    def call(self, method, path, body=None, query=None):
        self.calls.append((method, path, body))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def follow_scripted(api: ScriptedAgentApi, turn_id: str | None, as_json: bool = False,
                    quiet: bool = False) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = stromboli.follow_turn(api, "agent-x", turn_id, as_json, quiet, out=out, err=err,
                                 sleep=lambda seconds: None)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.fast
def test_cli_agent_send_renders_only_its_turn_from_the_replay():
    replay = [agent_sse(1, "turn_start", "turn-1"), assistant_says(2, "turn-1", "old answer"),
              claude_output(3, "turn-1", type="result", result="old answer"),
              agent_sse(4, "turn_end", "turn-1"), agent_sse(5, "error", None, error="[stderr] x"),
              agent_sse(6, "turn_start", "turn-2"),
              claude_output(7, "turn-2", type="system", subtype="init", session_id="s-1",
                            model="m"),
              assistant_says(8, "turn-2", "new answer"),
              claude_output(9, "turn-2", type="result", result="new answer",
                            usage={"input_tokens": 1000, "output_tokens": 234},
                            total_cost_usd=0.5),
              agent_sse(10, "turn_end", "turn-2"),
              assistant_says(11, "turn-3", "never read")]
    code, out, err = follow_scripted(ScriptedAgentApi([replay]), "turn-2")
    assert code == 0 and out == "new answer\n", (out, err)
    assert "· session s-1 · model m" in err
    assert re.search(r"· done · \d+\.\ds · 1,234 tokens · \$0\.5000 · agent agent-x$",
                     err.strip()), err


@pytest.mark.fast
def test_cli_agent_new_follows_the_first_turn_and_json_prints_its_events():
    stream = [agent_sse(1, "turn_start", "turn-a"), assistant_says(2, "turn-a", "hi"),
              claude_output(3, "turn-a", type="result", is_error=True, result="boom"),
              agent_sse(4, "turn_end", "turn-a")]
    code, out, err = follow_scripted(ScriptedAgentApi([stream]), None, as_json=True)
    assert code == 1 and err == ""  # the result said is_error
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == ["turn_start", "output", "output", "turn_end"]
    assert {e["turn_id"] for e in events} == {"turn-a"}
    code, out, err = follow_scripted(ScriptedAgentApi([stream[:2] + stream[3:]]), None,
                                     quiet=True)
    assert (code, out, err) == (0, "", "")


@pytest.mark.fast
def test_cli_agent_turn_resumes_a_cut_stream_after_its_last_event():
    first = [agent_sse(7, "turn_start", "turn-1"), assistant_says(8, "turn-1", "part one"),
             agent_sse(9, "error", "turn-1", error=stromboli.AGENT_PAUSED)]
    unreachable = stromboli.ClientError("cannot reach stromboli", stromboli.EXIT_UNREACHABLE)
    after = [agent_sse(1010, "error", "turn-1", error=stromboli.AGENT_LOST_TURN)]
    api = ScriptedAgentApi([first, unreachable, after])
    code, out, err = follow_scripted(api, "turn-1")
    assert api.opened == [None, "9", "9"]
    assert code == 3 and out == "part one\n"
    assert stromboli.AGENT_PAUSED in err and "cannot reach stromboli" in err
    assert f"· lost: {stromboli.AGENT_LOST_TURN}" in err
    gone = stromboli.ClientError("404: agent: not found", stromboli.EXIT_FAILED, 404)
    with pytest.raises(stromboli.ClientError, match="404"):  # refused: not retried
        follow_scripted(ScriptedAgentApi([first, gone]), "turn-1")
    with pytest.raises(stromboli.ClientError, match="stream ended before the turn did"):
        follow_scripted(ScriptedAgentApi([[]] * 10), "turn-1")


@pytest.mark.fast
def test_cli_agent_turn_ends_when_the_agent_exits():
    stream = [agent_sse(1, "turn_start", "turn-1"), assistant_says(2, "turn-1", "wor"),
              agent_sse(3, "exited", "turn-1", error="agent: lifetime reached"),
              ("closed", "{}", "3")]
    code, out, err = follow_scripted(ScriptedAgentApi([stream]), "turn-1")
    assert code == 3 and out == "wor\n" and "· exited: agent: lifetime reached" in err
    code, _, err = follow_scripted(ScriptedAgentApi([stream[2:]]), None, quiet=True)
    assert code == 3 and err == "error: agent: lifetime reached\n"


@pytest.mark.fast
def test_cli_agent_send_retries_a_restarting_agent_but_not_a_busy_one(capsys):
    def refused(status: int, retry_after: str | None = None):
        return stromboli.ClientError(f"{status}: agent: no", stromboli.EXIT_FAILED, status,
                                     retry_after)
    waits: list[float] = []
    api = ScriptedAgentApi(answers=[refused(503, "3"), refused(503), {"turn_id": "turn-9"}])
    assert stromboli.send_turn(api, "agent-x", "hi", sleep=waits.append) == "turn-9"
    assert waits == [3.0, 2.0]
    assert api.calls[-1] == ("POST", "/agents/agent-x/send", {"prompt": "hi"})
    assert "503: agent: no; retrying in 3s" in capsys.readouterr().err
    for status in (409, 410, 404):
        with pytest.raises(stromboli.ClientError, match=str(status)):
            stromboli.send_turn(ScriptedAgentApi(answers=[refused(status)]), "agent-x", "hi",
                                sleep=waits.append)
    with pytest.raises(stromboli.ClientError, match="503"):
        stromboli.send_turn(ScriptedAgentApi(answers=[refused(503)] * 10), "agent-x", "hi",
                            sleep=waits.append)
    assert stromboli.retry_after_seconds("600") == 30 and stromboli.retry_after_seconds(
        "Wed, 21 Oct 2015 07:28:00 GMT") == 2 == stromboli.retry_after_seconds("nan")


@pytest.mark.fast
def test_cli_agent_arguments():
    parse = stromboli.build_parser().parse_args
    args = parse(["agent", "new", "hi", "--idle-timeout", "10m", "--model", "haiku", "-q"])
    assert (args.func, args.prompt, args.idle_timeout, args.model, args.quiet) == (
        stromboli.cmd_agent_new, "hi", 600, "haiku", True)
    args = parse(["agent", "new", "--no-idle-timeout"])
    assert (args.prompt, args.idle_timeout, args.no_idle_timeout) == ("", None, True)
    assert parse(["agent", "new", "--idle-timeout", "90"]).idle_timeout == 90
    args = parse(["agent", "send", "agent-1", "again", "--json"])
    assert (args.func, args.id, args.prompt, args.json) == (
        stromboli.cmd_agent_send, "agent-1", "again", True)
    assert parse(["agents"]).func is stromboli.cmd_agents
    assert parse(["agent", "stop", "agent-1"]).func is stromboli.cmd_agent_stop
    for wrong in (["agent"], ["agent", "send", "agent-1"], ["agent", "new", "--idle-timeout",
                  "soon"], ["agent", "new", "--idle-timeout", "0"],
                  ["agent", "new", "--idle-timeout", "5", "--no-idle-timeout"]):
        with pytest.raises(SystemExit) as exit_:
            parse(wrong)
        assert exit_.value.code == 2, wrong


def test_cli_agent_new_send_list_show_stop(daemon):
    tag = marker()
    created = cli(daemon, "agent", "new", f"hello {tag}", "--idle-timeout", "5m", "--yes")
    assert created.returncode == 0, created.stderr
    assert "Hello from the scripted model" in created.stdout
    agent_id = re.search(f"agent-{UUID4_RE}", created.stderr).group(0)
    try:
        assert "· done ·" in created.stderr and f"agent {agent_id}" in created.stderr
        sent = cli(daemon, "agent", "send", agent_id, f"bash: echo second-{tag}")
        assert sent.returncode == 0, sent.stderr
        assert "Hello from the scripted model" not in sent.stdout  # the first turn is skipped
        assert sent.stdout.splitlines()[:2] == [f"→ Bash: echo second-{tag}",
                                                f"  ← second-{tag}"], sent.stdout
        assert f"tool said: second-{tag}" in sent.stdout and "· done ·" in sent.stderr
        as_json = cli(daemon, "agent", "send", agent_id, "hello", "--json")
        assert as_json.returncode == 0, as_json.stderr
        events = [json.loads(line) for line in as_json.stdout.splitlines()]
        assert events[0]["type"] == "turn_start" and events[-1]["type"] == "turn_end"
        assert len({e["turn_id"] for e in events}) == 1
        listed = cli(daemon, "agents")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if line.startswith(agent_id))
        assert row.split()[1:4] == ["idle", "3", "5m"], row
        assert agent_id in [a["id"] for a in json.loads(cli(daemon, "agents", "--json").stdout)]
        shown = cli(daemon, "agent", "show", agent_id)
        assert shown.returncode == 0 and re.search(r"^turns_completed:\s+3$", shown.stdout, re.M)
        assert json.loads(cli(daemon, "agent", "show", agent_id, "--json").stdout)["id"] == \
            agent_id
    finally:
        stopped = cli(daemon, "agent", "stop", agent_id)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"stopped {agent_id}"
    assert daemon.http.get(f"/agents/{agent_id}").status_code == 404
    late = cli(daemon, "agent", "send", agent_id, "are you there?")
    assert late.returncode == 1 and "404: agent: not found" in late.stderr
    assert cli(daemon, "agent", "show", agent_id).returncode == 1


def test_cli_agent_quiet_new_busy_and_exited_agents(daemon):
    quiet = cli(daemon, "agent", "new", "-q", "--idle-timeout", "3")
    assert quiet.returncode == 0, quiet.stderr
    agent_id = quiet.stdout.strip()
    assert re.fullmatch(f"agent-{UUID4_RE}", agent_id) and quiet.stderr == ""
    try:
        busy = subprocess.Popen([sys.executable, str(STROMBOLI), "agent", "send", agent_id,
                                 "sleep 3"], env={**os.environ, "STROMBOLI_URL": daemon.url},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_agent(daemon, agent_id, "generating")
        refused = cli(daemon, "agent", "send", agent_id, "one more")
        assert refused.returncode == 1
        assert "409: agent: a turn is already in progress" in refused.stderr
        assert busy.wait(60) == 0, busy.stderr.read()
        wait_agent(daemon, agent_id, "exited", timeout=20)  # its idle timeout
        exited = cli(daemon, "agent", "send", agent_id, "hello")
        assert exited.returncode == 1 and "410: agent: process has exited" in exited.stderr
        listed = cli(daemon, "agents").stdout
        assert re.search(rf"^{agent_id}\s+exited\s+1\s+3s\s+agent: idle timeout reached$",
                         listed, re.M), listed
    finally:
        cli(daemon, "agent", "stop", agent_id)
    piped = cli(daemon, "agent", "new", "hello", "--quiet", "--no-idle-timeout")
    assert piped.returncode == 0, piped.stderr
    agent_id = piped.stdout.strip()  # the id alone, once the first turn has ended
    try:
        assert re.fullmatch(f"agent-{UUID4_RE}", agent_id), piped.stdout
        snapshot = agent_snapshot(daemon, agent_id)
        assert snapshot["turns_completed"] == 1 and snapshot["idle_timeout_disabled"] is True
    finally:
        assert cli(daemon, "agent", "stop", agent_id).returncode == 0


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def scrape(daemon: Daemon) -> str:
    return httpx.get(f"http://127.0.0.1:{daemon.metrics_port}/metrics").text


def test_metrics_pass_promtool_and_counters_move(daemon):
    def count() -> int:
        m = re.search(r'^http_requests_total\{method="GET",path="/claude/status",status="200"\} (\d+)',
                      scrape(daemon), re.M)
        return int(m.group(1)) if m else 0
    before = count()
    for _ in range(3):
        daemon.http.get("/claude/status")
    assert count() == before + 3
    text = scrape(daemon)
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("process_resident_memory_bytes", "process_open_fds", "stromboli_queued_runs",
                 "stromboli_auth_failures_total", "stromboli_run_duration_seconds_count"):
        assert re.search(rf"^{name} \d", text, re.M), name
    assert re.search(r'^stromboli_jobs\{state="completed"\} \d+$', text, re.M)


def test_metrics_listener_counts_requests_by_route(daemon):
    daemon.http.get("/jobs/job-nonexistent0001")
    text = scrape(daemon)
    assert re.search(r'http_requests_total\{method="GET",path="/jobs/\{id\}",status="404"\} \d+',
                     text)
    assert "job-nonexistent0001" not in text
    assert "# TYPE http_request_duration_seconds histogram" in text
    assert re.search(r"^active_containers \d+$", text, re.M)
    assert re.search(r'^stromboli_runs_total\{status="completed"\} \d+$', text, re.M)
