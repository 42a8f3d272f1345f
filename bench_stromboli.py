"""Benchmark stromboli: its overhead on top of a plain `podman run` of the Claude Code CLI
(the default mode), what an agent's output flood costs the daemon (`flood`), the daemon
under mixed traffic at a fixed rate (`load`), the requests/s of its cheap routes next to a
bare aiohttp handler (`rps`), the daemon under a slowloris attack (`slowloris`), kill -9
during async jobs (`soak`), a persistent agent's warm turn next to a cold run (`agent`), and
the clients of a flooding agent's stream, stalled (`followers`) and reading (`fanout`).

Everything runs in one process, in one go, so the machine's noise hits both sides alike.
The Anthropic API is stood in for by the scripted model server of test_stromboli.py
(prompt "hello" → one streamed text reply; prompt "bash: CMD" → a Bash tool call that the
real CLI runs in the container); the daemon is a real `stromboli.py serve`.

Default mode (no subcommand): overhead. Measured, after one discarded warm-up round, in
rounds of A, B, C (interleaved to cancel drift):

  A  baseline: `podman run --rm ... claude -p hello --session-id <uuid>` (subprocess), with
     a fresh session home owned by the agent's host uid and the daemon's hardening flags and
     user namespace (see BASELINE);
  B  `POST /run {"prompt": "hello"}`, end to end (httpx);
  C  `GET /run/stream?prompt=hello`, end to end (httpx streaming).

  * wall-clock time per run: median, p90, and median(B) / median(A);
  * output latency: from the moment the model server has finished sending its reply to
    the moment the client holds the output — the first stdout line of A, the first SSE
    `data:` line of C (both clocks are this process's time.monotonic());
  * concurrency: wall time of N simultaneous runs, podman run vs POST /run (3 rounds).

The daemon also injects the API key as a Podman secret, labels its containers, and talks
to Podman over its API socket; the baseline passes the key with -e.

`flood`: an agent that floods its output (issue 9, item 2). For each variant, a fresh daemon
runs one `POST /run` whose container writes --megabytes (default 100) MB straight to its
stdout, past the CLI, from a `post_start` lifecycle hook (the path a hostile agent has:
rewrite a script in its session home that a client's hook runs; in the agent's user
namespace it cannot open /proc/1/fd/1, which belongs to host root), either

  lines     in 100-byte lines (`yes aaa… | head -c N`), or
  one-line  as one line without a newline (`head -c N /dev/zero | tr '\\0' a`),

while two threads sample, every 100 ms, the daemon's RSS (VmRSS of /proc/<pid>/status) and
the latency of `GET /health` (5 s timeout, one probe at a time). Reported per variant: RSS
before the run and its peak, /health max and p99 latency, the probes that failed or took
over 1 s, the longest time without a /health answer, the run's wall time, status, response
size, output size and whether `truncated` was set. Then --slow-readers (default 8) clients
replay the whole flooded run (`GET /run/stream?run_id=<id>`, `Last-Event-ID: -1`; with 0 the
one-line flood, event 0, would be skipped) and never read (receive buffer 64 KiB) while RSS
is sampled, until it settles (3–30 s): once on the same daemon (the run's feed may still be
in memory) and once after a daemon restart (replay from the store). The issue's bounds: RSS
under 300 MB and /health answering within 1 s throughout.

`load`: the daemon under mixed traffic from loopback (issue 10). A daemon with auth on (a
static token and a JWT secret; every other request carries the static token, the others a JWT
minted from it) first runs --jobs async jobs, then gets --requests (default 10,000) requests
launched open-loop at --rate (default 500) per second, i.e. on a fixed 2 ms cadence whatever the
earlier ones are doing (aiohttp, at most --concurrency = 256 in flight; a request waiting for a
slot shows as schedule lag): GET /health, GET /jobs, GET /jobs/{id} (the jobs above) and
GET /sessions in turn, and one `POST /run {"prompt": "hello"}` in every --run-every (200). Nothing
is launched after --max-seconds (120), and what is still in flight then is cancelled. Reported:
requests sent and completed, errors by kind (non-2xx by status, a run not "completed", a
/health not "ok", timeouts — 10 s per GET, 120 s per run —, connection errors), latency
p50/p99/max per route (from send; and p99 from the moment the request was due), the offered and
achieved rate, the daemon's RSS, open fds and threads (/proc, every 100 ms) before, at peak and
after, and the CPU used by the daemon, by this process (the client and the scripted model) and by
the whole machine: on 2 cores the client competes with the daemon.

`rps`: requests per second, closed loop, from loopback (issue 12's fast path, issue 10's
/health targets). Needs `wrk` on PATH (Debian package `wrk`; the bench installs nothing and
says so if it is missing). In one run: a bare aiohttp app in a subprocess (one GET handler, a
small JSON body, no access log) and a real daemon with auth on (a static token and a JWT
secret, as in `load`; its access log on, as shipped). After one async job has finished and a
JWT has been minted (`POST /auth/token` with the static token), `wrk -t2 -c32 -d5s --latency`
(--threads, --connections, --duration; each target after a --warmup of 1 s, --rounds times in
turn, median reported) runs against, in this order:

  the bare handler; GET /health (public); GET /jobs/{id} with the JWT; GET /jobs/{id} with
  the static token; GET /jobs with the JWT (headers with wrk's -H).

Reported per target: req/s and its ratio to the bare handler, p50/p99 latency, requests,
non-2xx answers and socket errors, and the serving process's CPU. Then "a /health flood slows a
concurrent run by at most 10 %": after one discarded run, the median wall time of --runs
(default 5) sequential `POST /run {"prompt": "hello"}`, alone and while one wrk process (same
-t/-c) floods GET /health for the whole series (started 1 s before the first run, stopped with
SIGINT after the last); --flood-rounds pairs (default 1, alone then flooded; more alternate,
ABBA). Reported: both medians and their ratio, /health's req/s during the flood, the daemon's
and the machine's CPU. Targets checked: /health ≥ 0.5× bare and a flooded run ≤ 1.10× (issue
10), GET /jobs/{id} with a JWT ≥ 0.3× bare (issue 12). On 2 cores wrk competes with the
server it measures, and under the flood with the run: the CPU figures show how much.

`slowloris`: half-sent requests held open (issue 10, item 1). A daemon with default server
settings (auth off; header_timeout 10 s, max_connections 512), started with a soft nofile
limit of --daemon-nofile (1024, systemd's default; it raises its own when allowed), gets
--connections (default 1,100) loopback connections from a separate attacker process (this
process raises its soft RLIMIT_NOFILE to the hard limit first) that each send
"GET /health HT" and hold for --hold (default 30) seconds, a connection the server closes
being re-opened at once. Meanwhile, every 100 ms: GET /health from a fresh client (5 s
timeout) and the daemon's RSS and open fds (/proc); and 3 sequential
`POST /run {"prompt": "hello"}`, against 3 before the attack. Reported: /health probes ok /
failed / over 1 s and p50/p99/max latency (before, during, after the hold); the runs' wall
times before vs during; peak RSS and fds; stromboli_connections_rejected_total,
stromboli_connections_timed_out_total and stromboli_open_connections from the metrics
listener (before, at the end of the hold, after); the daemon log's lines and "Traceback"
count; how many attack connections were held open (mean, min, max) and how many re-opened.

`soak`: kill -9 during a stream of async jobs (issue 13). One state dir; --kills (default 20)
times: start the daemon (auth off, max_concurrent_runs 2), submit --jobs-per-round (3) async
jobs (prompts among "hello", "sleep 1", "sleep 3", a quarter with output_format stream-json),
wait a random 0.5–4 s (--seed) and SIGKILL it. Then start it a last time, wait (at most
--final-timeout, 180 s) until no job is pending or running, read every submitted job back and
stop it gracefully (SIGTERM). Reported: jobs submitted, by final status, the non-completed
ones' errors (grouped; per job, its daemon log lines), jobs lost (acknowledged but unknown to
the daemon: must be 0), completed jobs without the model's answer, orphan containers (the
daemon's `stromboli.instance` label, still there after the graceful stop: must be 0), the
start times and the total wall time. Containers of the instance still there at the very end
are counted, then removed; the daemon logs are kept (path in the report) when anything is off.
Exits 1 when a job is lost or a container is orphaned.

`agent`: persistent agents (issue 14): what a turn on a live agent costs next to a cold run.
One daemon (auth off), the scripted model; one long-lived agent created with a prompt (its
first turn not counted), whose SSE stream (GET /agents/{id}/stream, `Last-Event-ID: 0`) stays
open across turns. Then --runs (default 10) rounds, after one discarded warm-up round, each:

  `podman run --rm <image> true` (a container start and removal, nothing else);
  overhead's baseline, the hardened `podman run … claude -p hello` (container + CLI);
  cold: `POST /run {"prompt": "hello <n>"}` (sync: a container and a CLI per run);
  warm: `POST /agents/{id}/send {"prompt": "hello <n>"}` on the long-lived agent → its
     `turn_end` event (and → its first `output` event, → the first one carrying the reply
     text, → the 202), timed at the SSE event's receipt;
  agent cold start: `POST /agents {"prompt": "hello <n>"}` → the new agent's first
     `turn_end` (its own stream), then `DELETE /agents/{id}` → 204 (timed).

Reported: median and p90 of each, the ratio warm turn / cold run (medians), and checks: the
long-lived agent kept one container and one CLI process (`podman top`), its turns_completed,
model calls per turn, the stream-json type of a turn's first output, stderr `error` events,
and after each DELETE a 404, no container left and the stream ended by `closed`.

`followers`: clients of an agent's stream that never read (issue 18, item 3). A daemon with
agent.max_followers above --followers; an agent whose post_start hook sleeps 5 s, then prints
--lines (30) lines of 1 MiB of control characters (6 MiB events in JSON). --followers (200)
raw sockets (receive buffer 4 KiB) send GET /agents/{id}/stream and never read. Reported: the
daemon's RSS before, at peak and 3 s after the clients closed, /health (every 100 ms) p50, max,
failed or over 1 s and the longest time without an answer, and when the daemon had dropped
them (its established connections on the port, from /proc/net/tcp; --timeout, 90 s).

`fanout`: clients reading an agent's stream during a flood (issue 18, item 5). --followers
(100) clients, in a process of their own, read everything of GET /agents/{id}/stream while the
agent prints --megabytes (50) MB in --line-bytes (1000) lines from a hook, before its first
turn's answer. A client the daemon drops (it fell behind the kept events) follows again 1 s
later, as the `stromboli` client does. Reported: the daemon's CPU time from the agent's
creation until every client has the `turn_end`, the turn at each client (first output →
`turn_end`: first, median, last), drops and 429s, /health p50 and max meanwhile, bytes read.
--max-followers sets agent.max_followers (default: --followers).

--stromboli PATH runs another stromboli.py (e.g. an older one, for before/after figures).

Run as root (rootful Podman, socket at /run/podman/podman.sock, image built):

    python bench_stromboli.py --runs 10            # overhead: markdown table on stdout
    python bench_stromboli.py --runs 10 --json     # machine-readable
    python bench_stromboli.py flood                # flood: markdown table on stdout
    python bench_stromboli.py flood --megabytes 20 --slow-readers 8 --json
    python bench_stromboli.py load                 # load: 10,000 requests at 500/s
    python bench_stromboli.py load --requests 1000 # a quick version
    python bench_stromboli.py load --requests 10000 --rate 500 --json
    python bench_stromboli.py rps                  # wrk: req/s vs bare aiohttp; /health flood
    python bench_stromboli.py rps --rounds 3 --runs 5 --flood-rounds 2 --json
    python bench_stromboli.py slowloris            # 1,100 half-sent requests held 30 s
    python bench_stromboli.py slowloris --connections 1100 --hold 30 --json
    python bench_stromboli.py soak                 # 20 kill -9 during async jobs
    python bench_stromboli.py soak --kills 20 --jobs-per-round 3 --seed 13 --json
    python bench_stromboli.py agent                # warm agent turn vs cold POST /run
    python bench_stromboli.py agent --runs 10 --json
    python bench_stromboli.py followers            # 200 stalled clients of a flooding agent
    python bench_stromboli.py fanout               # 100 readers of a 50 MB flood
    python bench_stromboli.py --stromboli /tmp/old/stromboli.py fanout --followers 10
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import os
import pathlib
import platform
import queue
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import random
import uuid

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import test_stromboli  # noqa: E402  (--stromboli sets the daemon its Daemon starts)
from test_stromboli import (  # noqa: E402
    IMAGE, JWT_SECRET, Daemon, ScriptedModel, agent_env, unmount_below)

PROMPT = "hello"
REPLY = "Hello from the scripted model"
CONCURRENT_ROUNDS = 3
# The daemon's container hardening, replicated on the baseline's command line.
# The daemon's user namespace (agent.userns_base = 1000000000): uid 1000 is host uid 1000001000.
USERNS = ["--uidmap", "0:1000000000:65536", "--gidmap", "0:1000000000:65536"]
AGENT_HOST_UID = 1000001000
BASELINE = ["--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--pids-limit", "512", "--memory", "512m", "--cpus", "1", *USERNS]


class TimedModel(ScriptedModel):
    """The scripted model server, noting when each reply has been fully sent."""

    def __init__(self):
        super().__init__()
        self.replies: list[float] = []

    async def messages(self, request):
        response = await super().messages(request)
        self.replies.append(time.monotonic())
        return response

    def reply_between(self, start: float, end: float) -> float:
        """When the last reply sent in [start, end] finished (one model call per run)."""
        return max(t for t in self.replies if start <= t <= end)


class Bench:
    def __init__(self, model: TimedModel, daemon: Daemon, image: str, workdir: pathlib.Path):
        self.model, self.daemon, self.image, self.workdir = model, daemon, image, workdir
        agent_vars = daemon.env["STROMBOLI_AGENT_ENV"].split(",")
        self.env = ["HOME=/home/user", "DISABLE_AUTOUPDATER=1",
                    f"ANTHROPIC_API_KEY={daemon.env['ANTHROPIC_API_KEY']}", *agent_vars]

    def podman_argv(self) -> list[str]:
        """`podman run` for one fresh session, as the daemon would set it up."""
        home = pathlib.Path(tempfile.mkdtemp(dir=self.workdir))
        (home / ".claude").mkdir(mode=0o700)
        for path in (home, home / ".claude"):
            os.chown(path, AGENT_HOST_UID, AGENT_HOST_UID)
        env = [arg for var in self.env for arg in ("-e", var)]
        return ["podman", "run", "--rm", "--network", "host", "--user", "1000:1000", *BASELINE,
                *env, "-v", f"{home}:/home/user", self.image,
                "claude", "-p", PROMPT, "--session-id", str(uuid.uuid4())]

    def podman_run(self) -> tuple[float, float]:
        """→ (wall seconds, seconds from reply sent to first stdout line)."""
        argv = self.podman_argv()
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        got = time.monotonic()
        rest, err = proc.communicate()
        wall = time.monotonic() - start
        if proc.returncode or (first + rest).strip() != REPLY:
            raise RuntimeError(f"podman run failed ({proc.returncode}): {first}{rest}{err}")
        return wall, got - self.model.reply_between(start, got)

    def post_run(self, client: httpx.Client) -> float:
        start = time.monotonic()
        response = client.post("/run", json={"prompt": PROMPT})
        wall = time.monotonic() - start
        body = response.json()
        if body.get("status") != "completed" or body.get("output") != REPLY:
            raise RuntimeError(f"POST /run failed ({response.status_code}): {response.text}")
        return wall

    def stream(self, client: httpx.Client) -> tuple[float, float]:
        """→ (wall seconds, seconds from reply sent to first SSE `data:` line)."""
        start = time.monotonic()
        got, lines = None, []
        with client.stream("GET", "/run/stream", params={"prompt": PROMPT}) as response:
            for line in response.iter_lines():
                if got is None and line.startswith("data:"):
                    got = time.monotonic()
                lines.append(line)
        wall = time.monotonic() - start
        if f"data: {REPLY}" not in lines or "event: done" not in lines:
            raise RuntimeError(f"stream failed ({response.status_code}): {lines}")
        return wall, got - self.model.reply_between(start, got)

    def sequential(self, runs: int) -> dict[str, list[float]]:
        samples = {k: [] for k in ("podman_run", "post_run", "stream", "podman_latency",
                                   "sse_latency")}
        with httpx.Client(base_url=self.daemon.url, timeout=120) as client:
            for i in range(runs + 1):  # round 0 is the warm-up
                podman_wall, podman_latency = self.podman_run()
                post_wall = self.post_run(client)
                stream_wall, sse_latency = self.stream(client)
                if i:
                    for key, value in zip(samples, (podman_wall, post_wall, stream_wall,
                                                    podman_latency, sse_latency)):
                        samples[key].append(value)
        return samples

    def concurrent(self, n: int) -> dict[str, list[float]]:
        """Wall time of n simultaneous runs, each side CONCURRENT_ROUNDS times, interleaved."""
        def burst(task) -> float:
            start = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                list(pool.map(lambda _: task(), range(n)))
            return time.monotonic() - start

        samples = {"podman_run": [], "post_run": []}
        with httpx.Client(base_url=self.daemon.url, timeout=300,
                          limits=httpx.Limits(max_connections=n)) as client:
            for _ in range(CONCURRENT_ROUNDS):
                samples["podman_run"].append(burst(self.podman_run))
                samples["post_run"].append(burst(lambda: self.post_run(client)))
        return samples


def summary(values: list[float]) -> dict[str, float]:
    p90 = statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 \
        else values[0]
    return {"median": statistics.median(values), "p90": p90, "n": len(values)}


def machine_info(image: str) -> dict[str, str]:
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.machine())
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "podman": out("podman", "--version").removeprefix("podman version "),
            "claude": out("podman", "run", "--rm", image, "claude", "--version"),
            "python": platform.python_version()}


def markdown(report: dict) -> str:
    seq, conc = report["sequential"], report.get("concurrent")

    def row(label: str, stats: dict, unit: str, ratio: str = "") -> str:
        scale, fmt = (1000, "{:.0f} ms") if unit == "ms" else (1, "{:.2f} s")
        return (f"| {label} | {fmt.format(stats['median'] * scale)} "
                f"| {fmt.format(stats['p90'] * scale)} | {ratio} |")

    def ratio(a: dict, b: dict, of: str) -> str:
        return f"{a['median'] / b['median']:.2f}× {of}"

    n = seq["podman_run"]["n"]
    lines = [f"| measurement (n={n} each, interleaved) | median | p90 | ratio of medians |",
             "|---|---|---|---|",
             row("`podman run` (baseline), one run", seq["podman_run"], "s"),
             row("`POST /run`, one run", seq["post_run"], "s",
                 ratio(seq["post_run"], seq["podman_run"], "podman run")),
             row("`GET /run/stream`, whole stream", seq["stream"], "s",
                 ratio(seq["stream"], seq["post_run"], "POST /run")),
             row("reply sent → first stdout line (`podman run`)", seq["podman_latency"], "ms"),
             row("reply sent → first SSE `data:` line", seq["sse_latency"], "ms",
                 ratio(seq["sse_latency"], seq["podman_latency"], "podman run"))]
    if conc:
        k = report["concurrency"]
        lines += [row(f"{k}× concurrent `podman run`, wall", conc["podman_run"], "s"),
                  row(f"{k}× concurrent `POST /run`, wall", conc["post_run"], "s",
                      ratio(conc["post_run"], conc["podman_run"], "podman run"))]
    info = ", ".join(f"{k} {v}" for k, v in report["machine"].items())
    return "\n".join([
        *lines, "",
        f"Baseline: `podman run --rm --network host --user 1000:1000 {' '.join(BASELINE)}`, "
        "fresh chowned session home, the daemon's agent env, API key via `-e` "
        "(the daemon uses a Podman secret).",
        f"Command: `{report['command']}`", f"Machine: {info}"])


# -- flood: an agent that floods its output (issue 9, item 2) ---------------------------

FLOOD_VARIANTS = ("lines", "one-line")
FLOOD_LINE = 100  # bytes per line of the "lines" variant, newline included
SAMPLE_INTERVAL = 0.1  # seconds between RSS samples and between /health probes
HEALTH_TIMEOUT = 5.0
HEALTH_SLOW = 1.0  # a /health answer slower than this counts as bad (the issue's bound)
RSS_BOUND = 300 * 1024 * 1024  # the issue's bound on daemon RSS during a 100 MB flood
SLOW_RCVBUF = 64 * 1024  # receive buffer of a non-reading replay client
SLOW_HOLD = (3.0, 30.0, 3.0)  # hold non-reading clients ≥ 3 s, ≤ 30 s, until RSS is flat 3 s
MiB = 1024 * 1024


def flood_command(variant: str, nbytes: int) -> str:
    """A shell command writing nbytes to the container's stdout, past the CLI."""
    if variant == "lines":
        return f"yes {'a' * (FLOOD_LINE - 1)} | head -c {nbytes}"
    return f"head -c {nbytes} /dev/zero | tr '\\0' a"


def read_rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


class Sampler:
    """Two threads: every 100 ms one samples the daemon's RSS, the other probes GET /health
    (one probe at a time, so a stalled daemon shows as long probes and timeouts)."""

    def __init__(self, pid: int, url: str):
        self.pid, self.url = pid, url
        self.rss: list[tuple[float, int]] = []  # (monotonic, bytes)
        self.health: list[tuple[float, float, bool]] = []  # (monotonic start, seconds, ok)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample_rss, daemon=True),
                         threading.Thread(target=self._probe_health, daemon=True)]

    def __enter__(self) -> "Sampler":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(HEALTH_TIMEOUT + 5)

    def _tick(self, due: float) -> float:
        """Wait for the next tick after `due`; → the new due time."""
        due = max(due + SAMPLE_INTERVAL, time.monotonic())
        self._stop.wait(max(0.0, due - time.monotonic()))
        return due

    def _sample_rss(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                self.rss.append((time.monotonic(), read_rss(self.pid)))
            except (OSError, ValueError):
                return  # the daemon is gone
            due = self._tick(due)

    def _probe_health(self) -> None:
        due = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=HEALTH_TIMEOUT) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    ok = client.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.health.append((start, time.monotonic() - start, ok))
                due = self._tick(due)

    def window(self, start: float, end: float) -> dict:
        """RSS and /health figures of the samples taken in [start, end]."""
        rss = [v for t, v in self.rss if start <= t <= end]
        probes = [(t, d, ok) for t, d, ok in self.health if start <= t <= end]
        latencies = sorted(d for _, d, _ in probes)
        answered = sorted(t + d for t, d, ok in self.health if ok and start <= t + d <= end)
        gaps = [b - a for a, b in zip([start, *answered], [*answered, end])]
        return {
            "seconds": end - start, "rss_samples": len(rss),
            "rss_peak": max(rss, default=None), "health_probes": len(probes),
            "health_median": statistics.median(latencies) if latencies else None,
            "health_max": latencies[-1] if latencies else None,
            "health_p99": (statistics.quantiles(latencies, n=100, method="inclusive")[98]
                           if len(latencies) > 1 else (latencies or [None])[0]),
            "health_failed": sum(1 for _, _, ok in probes if not ok),
            "health_bad": sum(1 for _, d, ok in probes if not ok or d > HEALTH_SLOW),
            "health_longest_silence": max(gaps),
        }

    def series(self, origin: float) -> dict:
        return {"rss": [[round(t - origin, 3), v] for t, v in self.rss],
                "health": [[round(t - origin, 3), round(d, 4), ok] for t, d, ok in self.health]}


def our_containers(workdir: pathlib.Path) -> list[str]:
    """Stromboli containers whose mounts come from this bench's workdir (nobody else's)."""
    def podman(*argv: str) -> str:
        return subprocess.run(["podman", *argv], capture_output=True, text=True,
                              timeout=60).stdout
    ids = podman("ps", "-a", "-q", "--filter", "label=managed-by=stromboli").split()
    if not ids:
        return []
    try:
        containers = json.loads(podman("inspect", *ids) or "[]")
    except json.JSONDecodeError:
        return []
    return [c["Id"] for c in containers
            if any(str(m.get("Source", "")).startswith(str(workdir)) for m in c.get("Mounts") or [])]


def remove_workdir(workdir: pathlib.Path) -> None:
    """Unmount the session homes the daemons mounted in it (they outlive a daemon), then
    delete it."""
    unmount_below(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


def stop_daemon(daemon: Daemon) -> None:
    """SIGTERM, and SIGKILL if a stalled daemon does not exit in 30 s."""
    try:
        daemon.stop()
    except subprocess.TimeoutExpired:
        daemon.proc.kill()
        daemon.proc.wait(10)


class Flood:
    def __init__(self, args, model: ScriptedModel, env: dict[str, str],
                 workdir: pathlib.Path):
        self.args, self.model, self.env, self.workdir = args, model, env, workdir

    def variant(self, variant: str) -> dict:
        """One flood run on a fresh daemon, then non-reading replays of it."""
        nbytes = self.args.megabytes * 1_000_000
        command = flood_command(variant, nbytes)
        daemon = Daemon(self.workdir / variant, self.env)
        result: dict = {"variant": variant, "bytes": nbytes, "command": command}
        try:
            daemon.start()
            time.sleep(1)  # let the fresh daemon settle
            with Sampler(daemon.proc.pid, daemon.url) as sampler:
                origin = time.monotonic()
                time.sleep(1)
                result["rss_before"] = read_rss(daemon.proc.pid)
                result["run"] = self.flood_run(daemon, command)
                result["idle"] = sampler.window(origin, result["run"]["start"])
                kept = result["run"].get("output_bytes") or 0
                if kept < nbytes // 2 and not result["run"].get("truncated"):
                    print(f"flood: {variant}: only {kept} bytes of output came back, and not "
                          "marked truncated: did the agent's command run?", file=sys.stderr)
                # the tail: RSS still grows while the response is handed over
                time.sleep(1)
                result["run"].update(sampler.window(result["run"].pop("start"),
                                                    time.monotonic()))
                run_id = result["run"].get("id")
                if self.args.slow_readers and run_id:
                    result["replay_live"] = self.slow_replays(daemon, sampler, run_id)
                result["samples_live"] = sampler.series(origin)
            if self.args.slow_readers and run_id:
                stop_daemon(daemon)
                daemon.start()  # same state dir: the run is replayed from the store
                time.sleep(1)
                with Sampler(daemon.proc.pid, daemon.url) as sampler:
                    origin = time.monotonic()
                    time.sleep(1)
                    result["replay_stored"] = self.slow_replays(daemon, sampler, run_id)
                    result["samples_stored"] = sampler.series(origin)
        except Exception:
            sys.stderr.write(f"daemon log (tail):\n{daemon.log()[-4000:]}\n")
            raise
        finally:
            stop_daemon(daemon)
            leftover = our_containers(self.workdir)
            if leftover:
                subprocess.run(["podman", "rm", "-f", "-t", "0", *leftover],
                               capture_output=True, timeout=120)
        return result

    def flood_run(self, daemon: Daemon, command: str) -> dict:
        body = {"prompt": "hello", "podman": {"timeout": f"{self.args.timeout}s",
                                              "lifecycle": {"post_start": [command]}}}
        start = time.monotonic()
        try:
            with httpx.Client(base_url=daemon.url, timeout=self.args.timeout + 120) as client:
                response = client.post("/run", json=body)
        except httpx.HTTPError as exc:
            wall = time.monotonic() - start
            return {"start": start, "wall": wall, "http_status": None,
                    "error": f"{type(exc).__name__}: {exc}"}
        wall = time.monotonic() - start
        run = {"start": start, "wall": wall, "http_status": response.status_code,
               "response_bytes": len(response.content)}
        try:
            reply = response.json()
        except ValueError:
            return {**run, "error": response.text[:500]}
        output = reply.get("output") or ""
        run.update(id=reply.get("id"), status=reply.get("status"),
                   truncated=bool(reply.get("truncated")),
                   output_bytes=len(output.encode()), output_lines=output.count("\n") + 1,
                   crash_info=reply.get("crash_info"), error=reply.get("error"))
        return run

    def slow_replays(self, daemon: Daemon, sampler: Sampler, run_id: str) -> dict:
        """--slow-readers clients replay the run and never read, until RSS settles.
        `Last-Event-ID: -1` asks for every event: the one-line flood is event 0."""
        request = (f"GET /run/stream?run_id={run_id} HTTP/1.1\r\nHost: {daemon.url[7:]}\r\n"
                   "Accept: text/event-stream\r\nLast-Event-ID: -1\r\n\r\n").encode()
        minimum, maximum, settle = SLOW_HOLD
        readers: list[socket.socket] = []
        before = read_rss(daemon.proc.pid)
        start = time.monotonic()
        try:
            for _ in range(self.args.slow_readers):
                reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                readers.append(reader)
                reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
                reader.settimeout(10)
                reader.connect(("127.0.0.1", daemon.port))
                reader.sendall(request)
            peak, peak_at = before, start
            while (now := time.monotonic()) - start < maximum:
                time.sleep(0.5)
                rss = read_rss(daemon.proc.pid)
                if rss > peak + MiB:
                    peak, peak_at = rss, time.monotonic()
                if now - start >= minimum and now - peak_at >= settle:
                    break
            streaming = 0
            for reader in readers:  # peek: the buffer is left unread
                try:
                    streaming += reader.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 200")
                except OSError:
                    pass
            end = time.monotonic()
        finally:
            for reader in readers:
                reader.close()
        time.sleep(2)
        return {"readers": len(readers), "streaming": streaming, "rss_before": before,
                **sampler.window(start, end), "rss_after_close": read_rss(daemon.proc.pid)}


def flood_markdown(report: dict) -> str:
    variants = report["variants"]

    def mb(value) -> str:
        return "–" if value is None else f"{value / MiB:.0f} MiB"

    def ms(value) -> str:
        return "–" if value is None else f"{value * 1000:.0f} ms"

    def row(label: str, cell) -> str:
        cells = []
        for v in variants.values():
            try:
                cells.append(cell(v))
            except (KeyError, TypeError):
                cells.append("–")
        return f"| {label} | " + " | ".join(cells) + " |"

    def health(section: str, label: str) -> list[str]:
        return [row(f"/health max / p99 latency ({label})",
                    lambda v: f"{ms(v[section]['health_max'])} / {ms(v[section]['health_p99'])}"),
                row(f"/health probes failed or > 1 s ({label})",
                    lambda v: f"{v[section]['health_bad']} of {v[section]['health_probes']}"
                              f" ({v[section]['health_failed']} failed)"),
                row(f"longest time without a /health answer ({label})",
                    lambda v: f"{v[section]['health_longest_silence']:.1f} s")]

    def run_status(v: dict) -> str:
        run = v["run"]
        status = run.get("status") or f"HTTP {run['http_status']}"
        why = (run.get("crash_info") or {}).get("reason") or run.get("error") or ""
        return f"{status} ({str(why)[:60]})" if why and status != "completed" else status

    mbytes = report["megabytes"]
    names = {"lines": f"{mbytes} MB in {FLOOD_LINE}-byte lines",
             "one-line": f"{mbytes} MB in one line"}
    lines = ["| measurement | " + " | ".join(names[k] for k in variants) + " |",
             "|---|" + "---|" * len(variants),
             row("daemon RSS before", lambda v: mb(v["rss_before"])),
             row("daemon peak RSS during the run", lambda v: mb(v["run"]["rss_peak"])),
             row("/health median latency, idle before the run",
                 lambda v: ms(v["idle"]["health_median"])),
             *health("run", "during the run"),
             row("run wall time", lambda v: f"{v['run']['wall']:.1f} s"),
             row("run status", run_status),
             row("response size", lambda v: f"{v['run']['response_bytes'] / 1e6:.1f} MB"),
             row("output kept (size / lines)",
                 lambda v: f"{v['run']['output_bytes'] / 1e6:.1f} MB / {v['run']['output_lines']}"),
             row("`truncated` set", lambda v: "yes" if v["run"]["truncated"] else "no")]
    k = report["slow_readers"]
    for section, label in (("replay_live", "same daemon"),
                           ("replay_stored", "after restart, from the store")):
        if any(section in v for v in variants.values()):
            lines += [
                row(f"peak RSS with {k} non-reading replays ({label})",
                    lambda v, s=section: f"{mb(v[s]['rss_peak'])} (before {mb(v[s]['rss_before'])}"
                                         f", {v[s]['streaming']}/{v[s]['readers']} streaming)"),
                row(f"RSS once they closed ({label})",
                    lambda v, s=section: mb(v[s]["rss_after_close"])),
                *health(section, f"with the replays, {label}")]
    info = ", ".join(f"{key} {value}" for key, value in report["machine"].items())
    return "\n".join([
        *lines, "",
        f"Flood commands: `yes <{FLOOD_LINE - 1} × a> | head -c N` and "
        "`head -c N /dev/zero | tr '\\0' a` (a `post_start` lifecycle hook, before the "
        f"CLI), run timeout {report['timeout']} s. RSS and "
        f"/health sampled every {SAMPLE_INTERVAL * 1000:.0f} ms (probe timeout "
        f"{HEALTH_TIMEOUT:.0f} s); bounds of issue 9: RSS < {RSS_BOUND // MiB} MiB, "
        "/health within 1 s.",
        f"Command: `{report['command']}`", f"Machine: {info}"])


# -- load: mixed requests at a fixed rate from loopback (issue 10) ------------------------

LOAD_TOKEN = "load-static-token-1"
LOAD_ROUTES = ("GET /health", "GET /jobs", "GET /jobs/{id}", "GET /sessions")
RUN_ROUTE = "POST /run"
LOAD_TIMEOUT = 10.0  # seconds, per GET
RUN_TIMEOUT = 120.0  # seconds, per POST /run (the time cap still applies)
LOAD_SETTLE = 2.0  # seconds between the last answer and the "after" sample


def read_proc(pid: int) -> dict[str, int]:
    """RSS, peak RSS (VmHWM), threads and open fds of a process, from /proc."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                found["rss"] = int(value.split()[0]) * 1024
            elif key == "VmHWM":
                found["hwm"] = int(value.split()[0]) * 1024
            elif key == "Threads":
                found["threads"] = int(value)
    found["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return found


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of a list; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]


class ProcSampler:
    """One thread sampling a process's RSS, open fds and threads every 100 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples: list[tuple[float, int, int, int]] = []  # (monotonic, rss, fds, threads)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                found = read_proc(self.pid)
                self.samples.append((time.monotonic(), found["rss"], found["fds"],
                                     found["threads"]))
            except (OSError, KeyError, ValueError):
                pass
            due = max(due + SAMPLE_INTERVAL, time.monotonic())
            self._stop.wait(max(0.0, due - time.monotonic()))

    def peaks(self, start: float, end: float) -> dict[str, int | None]:
        window = [s for s in self.samples if start <= s[0] <= end]
        return {"samples": len(window),
                "rss": max((s[1] for s in window), default=None),
                "fds": max((s[2] for s in window), default=None),
                "threads": max((s[3] for s in window), default=None)}


def load_plan(requests: int, run_every: int) -> list[str]:
    """The route of each request: the GET routes in turn, one POST /run in every run_every."""
    plan, k = [], 0
    for i in range(requests):
        if run_every and i % run_every == run_every // 2:
            plan.append(RUN_ROUTE)
        else:
            plan.append(LOAD_ROUTES[k % len(LOAD_ROUTES)])
            k += 1
    return plan


async def load_phase(args, url: str, tokens: list[str], job_ids: list[str]) -> dict:
    """Open loop: request i is launched at start + i / rate whatever the earlier ones are doing
    (at most --concurrency in flight; the others wait for a slot, which shows as schedule lag).
    Nothing is launched after --max-seconds, and what is still in flight then is cancelled."""
    import aiohttp

    plan = load_plan(args.requests, args.run_every)
    auth = [{"Authorization": f"Bearer {token}"} for token in tokens]
    results: list[tuple[str, float, float, float, str]] = []  # route, due, sent, done, outcome
    slots = asyncio.Semaphore(args.concurrency)
    get_timeout = aiohttp.ClientTimeout(total=LOAD_TIMEOUT)
    run_timeout = aiohttp.ClientTimeout(total=RUN_TIMEOUT)

    async def one(session: aiohttp.ClientSession, i: int, route: str, due: float) -> None:
        async with slots:
            method, path = route.split(" ", 1)
            if route == "GET /jobs/{id}":
                path = f"/jobs/{job_ids[i % len(job_ids)]}"
            headers = {} if route == "GET /health" else auth[i % len(auth)]
            body = {"prompt": PROMPT} if route == RUN_ROUTE else None
            sent = time.monotonic()
            try:
                async with session.request(
                        method, path, headers=headers, json=body,
                        timeout=run_timeout if route == RUN_ROUTE else get_timeout) as response:
                    content = await response.read()
                    if not 200 <= response.status < 300:
                        outcome = f"HTTP {response.status}"
                    elif route in (RUN_ROUTE, "GET /health"):
                        try:
                            status = json.loads(content).get("status")
                        except (ValueError, AttributeError):
                            status = "unparsable"
                        good = "completed" if route == RUN_ROUTE else "ok"
                        word = "run" if route == RUN_ROUTE else "health"
                        outcome = "ok" if status == good else f"{word} {status}"
                    else:
                        outcome = "ok"
            except asyncio.TimeoutError:
                outcome = "timeout"
            except aiohttp.ClientConnectionError as exc:
                outcome = f"connection error ({type(exc).__name__})"
            except aiohttp.ClientError as exc:
                outcome = f"client error ({type(exc).__name__})"
            results.append((route, due, sent, time.monotonic(), outcome))

    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:
        start = time.monotonic()
        deadline = start + args.max_seconds
        tasks = []
        for i, route in enumerate(plan):
            due = start + i / args.rate
            if due >= deadline:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))  # 0: yield, catch up
            tasks.append(asyncio.create_task(one(session, i, route, due)))
        launched = time.monotonic()
        pending: set = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        end = time.monotonic()
    return {"plan": plan, "results": results, "start": start, "launched": launched, "end": end,
            "sent": len(tasks), "cancelled": len(pending)}


def load_stats(phase: dict) -> dict:
    """Counts, errors by kind and latency per route of one load phase."""
    results = phase["results"]

    def summarize(rows: list[tuple]) -> dict:
        answered = [(due, sent, done) for _, due, sent, done, outcome in rows
                    if not outcome.startswith(("timeout", "connection", "client"))]
        latencies = [done - sent for _, sent, done in answered]
        since_due = [done - due for due, _, done in answered]
        errors: dict[str, int] = {}
        for *_, outcome in rows:
            if outcome != "ok":
                errors[outcome] = errors.get(outcome, 0) + 1
        return {"completed": len(rows), "ok": sum(1 for r in rows if r[4] == "ok"),
                "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
                "latency_p50": percentile(latencies, 0.50),
                "latency_p99": percentile(latencies, 0.99),
                "latency_max": max(latencies, default=None),
                "since_due_p99": percentile(since_due, 0.99)}

    planned: dict[str, int] = {}
    for route in phase["plan"][:phase["sent"]]:
        planned[route] = planned.get(route, 0) + 1
    routes = {route: {"sent": planned.get(route, 0),
                      **summarize([r for r in results if r[0] == route])}
              for route in (*LOAD_ROUTES, RUN_ROUTE) if planned.get(route)}
    lags = [sent - due for _, due, sent, _, _ in results]
    answered = [r for r in results if not r[4].startswith(("timeout", "connection", "client"))]
    first = min((r[2] for r in results), default=phase["start"])
    last = max((r[3] for r in results), default=phase["end"])
    return {
        "planned": len(phase["plan"]), "sent": phase["sent"],
        "not_sent_time_cap": len(phase["plan"]) - phase["sent"],
        "cancelled_time_cap": phase["cancelled"],
        "launch_seconds": phase["launched"] - phase["start"],
        "total_seconds": phase["end"] - phase["start"],
        "offered_rps": phase["sent"] / max(1e-9, phase["launched"] - phase["start"]),
        "achieved_rps": len(answered) / max(1e-9, last - first),
        "schedule_lag_p99": percentile(lags, 0.99), "schedule_lag_max": max(lags, default=None),
        "all": {"sent": phase["sent"], **summarize(results)},
        "routes": routes,
    }


def wait_jobs(client: httpx.Client, job_ids: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for job_id in job_ids:
        while True:
            status = client.get(f"/jobs/{job_id}").json().get("status")
            if status in ("completed", "failed", "crashed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} still {status} after {timeout:.0f} s")
            time.sleep(0.2)


def load(args) -> int:
    """`load`: mixed requests at a fixed rate against an auth-on daemon."""
    model = ScriptedModel()
    model.start()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stromboli-load-"))
    env = {**daemon_env(model, args.image, 0), "STROMBOLI_AUTH_ENABLED": "true",
           "STROMBOLI_API_TOKENS": LOAD_TOKEN, "STROMBOLI_JWT_SECRET": JWT_SECRET}
    daemon = Daemon(workdir / "state", env)
    report: dict = {"command": shlex.join(sys.orig_argv), "machine": machine_info(args.image),
                    "requests": args.requests, "rate": args.rate,
                    "concurrency": args.concurrency, "run_every": args.run_every,
                    "max_seconds": args.max_seconds, "jobs": args.jobs,
                    "timeouts": {"get": LOAD_TIMEOUT, "run": RUN_TIMEOUT}}
    try:
        daemon.start()
        pid = daemon.proc.pid
        static = {"Authorization": f"Bearer {LOAD_TOKEN}"}
        with httpx.Client(base_url=daemon.url, timeout=120, headers=static) as client:
            minted = client.post("/auth/token", json={"client_id": "load"})
            minted.raise_for_status()
            tokens = [LOAD_TOKEN, minted.json()["access_token"]]  # every other request a JWT
            job_ids = []
            for _ in range(max(1, args.jobs)):
                created = client.post("/run/async", json={"prompt": PROMPT})
                created.raise_for_status()
                job_ids.append(created.json()["job_id"])
            wait_jobs(client, job_ids)
        time.sleep(1)
        report["before"] = read_proc(pid)
        report["loadavg_before"] = open("/proc/loadavg").read().split()[:3]
        with ProcSampler(pid) as sampler:
            cpu0, daemon0, machine0 = time.process_time(), process_cpu(pid), machine_cpu()
            print(f"load: {args.requests} requests at {args.rate:g}/s…", file=sys.stderr,
                  flush=True)
            phase = asyncio.run(load_phase(args, daemon.url, tokens, job_ids))
            cpu1, daemon1, machine1 = time.process_time(), process_cpu(pid), machine_cpu()
            wall = phase["end"] - phase["start"]
            report.update(load_stats(phase))
            report["peak"] = sampler.peaks(phase["start"], phase["end"] + LOAD_SETTLE)
            time.sleep(LOAD_SETTLE)
        report["after"] = read_proc(pid)
        report["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
        report["cpu"] = {
            "client_seconds": cpu1 - cpu0, "client_share": (cpu1 - cpu0) / wall,
            "daemon_seconds": daemon1 - daemon0, "daemon_share": (daemon1 - daemon0) / wall,
            "machine_busy": (machine1[0] - machine0[0]) / max(1, machine1[1] - machine0[1]),
            "nproc": os.cpu_count()}
        start = time.monotonic()
        try:
            health = httpx.get(daemon.url + "/health", timeout=LOAD_TIMEOUT).status_code
        except httpx.HTTPError as exc:
            health = type(exc).__name__
        report["health_after"] = {"status": health, "seconds": time.monotonic() - start}
    except Exception:
        sys.stderr.write(f"daemon log (tail):\n{daemon.log()[-4000:]}\n")
        raise
    finally:
        stop_daemon(daemon)
        leftover = our_containers(workdir)
        if leftover:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *leftover],
                           capture_output=True, timeout=120)
        remove_workdir(workdir)
    print(json.dumps(report, indent=2) if args.json else load_markdown(report))
    return 0


def load_markdown(report: dict) -> str:
    def ms(value) -> str:
        return "–" if value is None else f"{value * 1000:.0f} ms" if value >= 0.01 \
            else f"{value * 1000:.1f} ms"

    def mb(value) -> str:
        return "–" if value is None else f"{value / MiB:.0f} MiB"

    def errors(stats: dict) -> str:
        return ", ".join(f"{kind}: {n}" for kind, n in stats["errors"].items()) or "0"

    lines = ["| route | sent | completed | ok | errors | p50 | p99 | max | p99 from schedule |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, stats in [*report["routes"].items(), ("all", report["all"])]:
        lines.append(f"| {'**all**' if label == 'all' else f'`{label}`'} | {stats['sent']} "
                     f"| {stats['completed']} | {stats['ok']} | {errors(stats)} "
                     f"| {ms(stats['latency_p50'])} | {ms(stats['latency_p99'])} "
                     f"| {ms(stats['latency_max'])} | {ms(stats['since_due_p99'])} |")
    before, peak, after, cpu = report["before"], report["peak"], report["after"], report["cpu"]
    health = report["health_after"]
    lines += [
        "", "| measurement | value |", "|---|---|",
        f"| requests planned / sent / completed | {report['planned']} / {report['sent']} / "
        f"{report['all']['completed']} (not sent, time cap: {report['not_sent_time_cap']}; "
        f"cancelled in flight at the cap: {report['cancelled_time_cap']}) |",
        f"| offered rate (launch window {report['launch_seconds']:.1f} s) "
        f"| {report['offered_rps']:.0f} req/s |",
        f"| achieved rate (answered requests) | {report['achieved_rps']:.0f} req/s |",
        f"| total time | {report['total_seconds']:.1f} s |",
        f"| schedule lag p99 / max (waiting for a slot or the event loop) "
        f"| {ms(report['schedule_lag_p99'])} / {ms(report['schedule_lag_max'])} |",
        f"| daemon RSS before / peak / after | {mb(before['rss'])} / {mb(peak['rss'])} / "
        f"{mb(after['rss'])} (VmHWM {mb(after['hwm'])}) |",
        f"| daemon open fds before / peak / after | {before['fds']} / {peak['fds']} / "
        f"{after['fds']} |",
        f"| daemon threads before / peak / after | {before['threads']} / {peak['threads']} / "
        f"{after['threads']} |",
        f"| daemon CPU during the load | {cpu['daemon_seconds']:.1f} s "
        f"({cpu['daemon_share'] * 100:.0f} % of one core) |",
        f"| client (this process) CPU during the load | {cpu['client_seconds']:.1f} s "
        f"({cpu['client_share'] * 100:.0f} % of one core) |",
        f"| machine CPU busy ({cpu['nproc']} cores) | {cpu['machine_busy'] * 100:.0f} % "
        f"(loadavg {' '.join(report['loadavg_before'])} → {' '.join(report['loadavg_after'])}) |",
        f"| `GET /health` after the load | {health['status']} in {ms(health['seconds'])} |",
    ]
    info = ", ".join(f"{key} {value}" for key, value in report["machine"].items())
    run_share = (f"one `POST /run {{\"prompt\": \"hello\"}}` in every {report['run_every']}"
                 if report["run_every"] else "no runs")
    return "\n".join([
        *lines, "",
        f"Open loop: request i launched at i / {report['rate']:g} s (aiohttp, at most "
        f"{report['concurrency']} in flight), hard cap {report['max_seconds']:g} s; the GET "
        f"routes in turn and {run_share}; auth on, every other request with the static token, "
        f"the others with a JWT (`/health` with none); `GET /jobs/{{id}}` on {report['jobs']} "
        f"finished async jobs. Timeouts: {report['timeouts']['get']:g} s per GET, "
        f"{report['timeouts']['run']:g} s per run. ok: a 2xx, and for `/health` status "
        "\"ok\", for a run status \"completed\". Latency from send to the last byte (p99 "
        "from schedule: from the moment the request was due, slot wait included); daemon "
        f"RSS, fds and threads sampled every {SAMPLE_INTERVAL * 1000:.0f} ms (/proc). The "
        "client, the scripted model and the daemon share the machine.",
        f"Command: `{report['command']}`", f"Machine: {info}"])


# -- rps: requests/s next to a bare aiohttp handler (issues 10 and 12) -----------------------

RPS_TOKEN = "rps-static-token-1"
# The reference: a bare aiohttp app, one GET handler with a small JSON body, no access log,
# in its own process (as the daemon is), on the default asyncio loop (as the daemon uses).
BARE_APP = r'''
import asyncio
from aiohttp import web


async def handler(request):
    return web.json_response({"status": "ok", "name": "bare"})


async def main():
    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
'''
WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
RPS_BOUNDS = {"health": 0.5, "job_jwt": 0.3}  # × bare: issue 10 (/health), issue 12 (JWT)
FLOOD_SLOWDOWN = 1.10  # issue 10: a /health flood slows a concurrent run by at most 10 %
FLOOD_RAMP = 1.0  # seconds the flood runs before the first run of a flooded series


def wrk_seconds(value: str) -> float | None:
    """A wrk time ("635.91us", "1.20ms", "5.00s", "1.00m") → seconds; None if unparsable."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value.strip())
    return float(match[1]) * WRK_UNITS[match[2]] if match else None


def parse_wrk(output: str) -> dict:
    """Requests/sec, the request count, latency (avg, max, percentiles with --latency),
    non-2xx/3xx answers and socket errors from wrk's report."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if not rps:
        raise RuntimeError(f"wrk: no Requests/sec line in its output:\n{output}")
    done = re.search(r"^\s*(\d+) requests in (\S+?),", output, re.M)
    latency = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", output, re.M)
    if latency and latency[1] == "Distribution":
        latency = None
    percentiles = {int(p): wrk_seconds(v)
                   for p, v in re.findall(r"^\s*(50|75|90|99)%\s+(\S+)", output, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     output)
    socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                             map(int, sock.groups()))) if sock else {}
    return {"rps": float(rps[1]),
            "requests": int(done[1]) if done else None,
            "seconds": wrk_seconds(done[2]) if done else None,
            "latency_avg": wrk_seconds(latency[1]) if latency else None,
            "latency_max": wrk_seconds(latency[3]) if latency else None,
            "latency_p50": percentiles.get(50), "latency_p90": percentiles.get(90),
            "latency_p99": percentiles.get(99),
            "non_2xx": int(non2xx[1]) if non2xx else 0,
            "socket_errors": socket_errors,
            "errors": (int(non2xx[1]) if non2xx else 0) + sum(socket_errors.values())}


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (here: the wrk processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Rps:
    def __init__(self, args, wrk: str):
        self.args, self.wrk = args, wrk

    def argv(self, url: str, headers: list[str], seconds: float) -> list[str]:
        header_args = [arg for header in headers for arg in ("-H", header)]
        return [self.wrk, f"-t{self.args.threads}", f"-c{self.args.connections}",
                f"-d{max(1, round(seconds))}s", "--latency", *header_args, url]

    def measure(self, url: str, headers: list[str], server_pid: int, seconds: float) -> dict:
        """One wrk run of `seconds` → its figures, and the CPU of the server, wrk and the
        machine meanwhile."""
        argv = self.argv(url, headers, seconds)
        cpu0, server0, machine0 = children_cpu(), process_cpu(server_pid), machine_cpu()
        start = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        wall = time.monotonic() - start
        cpu1, server1, machine1 = children_cpu(), process_cpu(server_pid), machine_cpu()
        if proc.returncode:
            raise RuntimeError(f"wrk exited {proc.returncode}: {shlex.join(argv)}\n"
                               f"{proc.stdout}{proc.stderr}")
        return {**parse_wrk(proc.stdout),
                "server_cpu_share": (server1 - server0) / wall,
                "wrk_cpu_share": (cpu1 - cpu0) / wall,
                "machine_busy": (machine1[0] - machine0[0]) / max(1, machine1[1] - machine0[1]),
                "wrk_output": proc.stdout.strip()}

    def targets(self, targets: list[dict]) -> dict:
        """Each target for --duration, --rounds times in turn, after a --warmup run each."""
        if self.args.warmup:
            for target in targets:
                self.measure(target["url"], target["headers"], target["pid"], self.args.warmup)
        runs: dict[str, list[dict]] = {t["key"]: [] for t in targets}
        for r in range(self.args.rounds):
            for target in targets:
                print(f"rps: round {r + 1}/{self.args.rounds}: {target['label']}…",
                      file=sys.stderr, flush=True)
                runs[target["key"]].append(self.measure(target["url"], target["headers"],
                                                        target["pid"], self.args.duration))
        results = {}
        for target in targets:
            rounds = runs[target["key"]]

            def median(key: str):
                values = [r[key] for r in rounds if r[key] is not None]
                return statistics.median(values) if values else None

            results[target["key"]] = {
                "label": target["label"], "path": target["path"], "auth": target["auth"],
                **{key: median(key) for key in ("rps", "latency_p50", "latency_p99",
                                                "server_cpu_share", "wrk_cpu_share",
                                                "machine_busy")},
                "requests": sum(r["requests"] or 0 for r in rounds),
                "non_2xx": sum(r["non_2xx"] for r in rounds),
                "socket_errors": sum(sum(r["socket_errors"].values()) for r in rounds),
                "rounds": rounds}
        bare = results["bare"]["rps"]
        for result in results.values():
            result["ratio"] = result["rps"] / bare if bare else None
        return results

    def health_flood(self, client: httpx.Client, daemon: Daemon, bare_url: str) -> dict:
        """Median wall time of --runs sequential POST /run, alone, while wrk floods
        /health (one wrk process for the whole series), and while it floods the bare
        aiohttp handler instead (the floor: what any HTTP flood costs a run on this
        machine); --flood-rounds rounds, the order alternating."""
        n, pid = self.args.rps_runs, daemon.proc.pid
        post_run(client)  # warm-up, discarded
        walls: dict[str, list[float]] = {"alone": [], "flood": [], "bare": []}
        series: list[dict] = []
        targets = {"flood": daemon.url + "/health", "bare": bare_url + "/"}
        for r in range(self.args.flood_rounds):
            order = ("alone", "flood", "bare")
            for side in order if r % 2 == 0 else order[::-1]:
                print(f"rps: {n} × POST /run, {side} (round {r + 1}/"
                      f"{self.args.flood_rounds})…", file=sys.stderr, flush=True)
                wrk = None
                cpu0 = children_cpu()
                if side in targets:
                    argv = self.argv(targets[side], [], n * RUN_TIMEOUT + 60)
                    wrk = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
                    time.sleep(FLOOD_RAMP)
                    if wrk.poll() is not None:
                        raise RuntimeError(f"wrk exited {wrk.returncode}:\n"
                                           f"{''.join(wrk.communicate())}")
                daemon0, machine0, start = process_cpu(pid), machine_cpu(), time.monotonic()
                these: list[float] = []
                try:
                    for _ in range(n):
                        these.append(post_run(client))
                finally:
                    end, daemon1, machine1 = time.monotonic(), process_cpu(pid), machine_cpu()
                    if wrk is not None:
                        wrk.send_signal(signal.SIGINT)  # wrk stops and prints its report
                        try:
                            out, err = wrk.communicate(timeout=30)
                        except subprocess.TimeoutExpired:
                            wrk.kill()
                            out, err = wrk.communicate()
                wall = end - start
                entry = {"side": side, "round": r, "walls": these, "seconds": wall,
                         "daemon_cpu_share": (daemon1 - daemon0) / wall,
                         "machine_busy": (machine1[0] - machine0[0])
                         / max(1, machine1[1] - machine0[1])}
                if wrk is not None:
                    if wrk.returncode not in (0, -signal.SIGINT):
                        raise RuntimeError(f"wrk exited {wrk.returncode}:\n{out}{err}")
                    flood_wall = wall + FLOOD_RAMP
                    entry["wrk"] = {**parse_wrk(out), "wrk_output": out.strip(),
                                    "wrk_cpu_share": (children_cpu() - cpu0) / flood_wall}
                walls[side].extend(these)
                series.append(entry)
        alone, flooded = summary(walls["alone"]), summary(walls["flood"])
        bare_flooded = summary(walls["bare"])
        floods = [s["wrk"] for s in series if s["side"] == "flood"]
        return {"runs": n, "rounds": self.args.flood_rounds, "alone": alone, "flood": flooded,
                "ratio": flooded["median"] / alone["median"], "bare": bare_flooded,
                "bare_ratio": bare_flooded["median"] / alone["median"],
                "health_rps": statistics.median(f["rps"] for f in floods),
                "health_p99": statistics.median(f["latency_p99"] for f in floods
                                                if f["latency_p99"] is not None)
                if any(f["latency_p99"] is not None for f in floods) else None,
                "health_requests": sum(f["requests"] or 0 for f in floods),
                "health_errors": sum(f["errors"] for f in floods),
                "wrk_cpu_share": statistics.median(f["wrk_cpu_share"] for f in floods),
                "daemon_cpu_share": {side: statistics.median(
                    s["daemon_cpu_share"] for s in series if s["side"] == side)
                    for side in ("alone", "flood", "bare")},
                "machine_busy": {side: statistics.median(
                    s["machine_busy"] for s in series if s["side"] == side)
                    for side in ("alone", "flood", "bare")},
                "series": series}


def post_run(client: httpx.Client) -> float:
    """One `POST /run {"prompt": "hello"}` → its wall time; it must complete with the reply."""
    start = time.monotonic()
    response = client.post("/run", json={"prompt": PROMPT})
    wall = time.monotonic() - start
    try:
        body = response.json()
    except ValueError:
        body = {}
    if body.get("status") != "completed" or body.get("output") != REPLY:
        raise RuntimeError(f"POST /run failed ({response.status_code}): {response.text[:2000]}")
    return wall


def start_bare() -> tuple[subprocess.Popen, str]:
    """The bare aiohttp app in a subprocess → (process, base URL)."""
    proc = subprocess.Popen([sys.executable, "-c", BARE_APP], stdout=subprocess.PIPE,
                            text=True)
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(20)
    if not ready or not ready[0].strip().isdigit():
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"the bare aiohttp app did not start (exit {proc.poll()})")
    return proc, f"http://127.0.0.1:{int(ready[0])}"


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).split("\n", 1)[0].split()
    return first[1] if len(first) > 1 else "?"


def rps(args) -> int:
    """`rps`: wrk against a bare aiohttp handler and the daemon's cheap routes, then POST /run
    alone and under a /health flood."""
    wrk = shutil.which("wrk")
    if not wrk:
        print("bench_stromboli.py rps needs wrk (HTTP benchmarking tool), not found on PATH: "
              "install it (Debian/Ubuntu: apt-get install wrk) and run again.", file=sys.stderr)
        return 2
    model = ScriptedModel()
    model.start()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stromboli-rps-"))
    env = {**daemon_env(model, args.image, 0), "STROMBOLI_AUTH_ENABLED": "true",
           "STROMBOLI_API_TOKENS": RPS_TOKEN, "STROMBOLI_JWT_SECRET": JWT_SECRET}
    daemon = Daemon(workdir / "state", env)
    report: dict = {"command": shlex.join(sys.orig_argv),
                    "machine": {**machine_info(args.image), "wrk": wrk_version(wrk)},
                    "threads": args.threads, "connections": args.connections,
                    "duration": args.duration, "warmup": args.warmup, "rounds": args.rounds,
                    "bounds": {**RPS_BOUNDS, "flood_slowdown": FLOOD_SLOWDOWN},
                    "loadavg_before": open("/proc/loadavg").read().split()[:3]}
    bare = None
    bench = Rps(args, wrk)
    try:
        bare, bare_url = start_bare()
        daemon.start()
        static = f"Authorization: Bearer {RPS_TOKEN}"
        with httpx.Client(base_url=daemon.url, timeout=RUN_TIMEOUT,
                          headers={"Authorization": f"Bearer {RPS_TOKEN}"}) as client:
            minted = client.post("/auth/token", json={"client_id": "rps"},
                                 headers={"Content-Type": "application/json"})
            minted.raise_for_status()
            jwt = f"Authorization: Bearer {minted.json()['access_token']}"
            created = client.post("/run/async", json={"prompt": PROMPT})
            created.raise_for_status()
            job_id = created.json()["job_id"]
            wait_jobs(client, [job_id])
            report["job_status"] = client.get(f"/jobs/{job_id}").json().get("status")
            pid = daemon.proc.pid
            targets = [
                {"key": "bare", "label": "bare aiohttp handler", "path": "GET /",
                 "auth": "none", "url": bare_url + "/", "headers": [], "pid": bare.pid},
                {"key": "health", "label": "`GET /health`", "path": "GET /health",
                 "auth": "none (public)", "url": daemon.url + "/health", "headers": [],
                 "pid": pid},
                {"key": "job_jwt", "label": "`GET /jobs/{id}`, JWT", "path": "GET /jobs/{id}",
                 "auth": "JWT", "url": f"{daemon.url}/jobs/{job_id}", "headers": [jwt],
                 "pid": pid},
                {"key": "job_static", "label": "`GET /jobs/{id}`, static token",
                 "path": "GET /jobs/{id}", "auth": "static token",
                 "url": f"{daemon.url}/jobs/{job_id}", "headers": [static], "pid": pid},
                {"key": "jobs_jwt", "label": "`GET /jobs`, JWT", "path": "GET /jobs",
                 "auth": "JWT", "url": daemon.url + "/jobs", "headers": [jwt], "pid": pid}]
            for target in targets:  # each answers 200 before it is measured
                name, _, value = (target["headers"] or [": "])[0].partition(": ")
                answer = httpx.get(target["url"], timeout=10,
                                   headers={name: value} if target["headers"] else None)
                if answer.status_code != 200:
                    raise RuntimeError(f"{target['label']}: HTTP {answer.status_code} "
                                       f"before the measurement: {answer.text[:500]}")
                if target["key"] == "health":
                    report["health_status"] = answer.json().get("status")
            report["targets"] = bench.targets(targets)
            if args.rps_runs:
                report["flood"] = bench.health_flood(client, daemon, bare_url)
        report["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    except Exception:
        sys.stderr.write(f"daemon log (tail):\n{daemon.log()[-4000:]}\n")
        raise
    finally:
        if bare is not None:
            bare.terminate()
            try:
                bare.wait(10)
            except subprocess.TimeoutExpired:
                bare.kill()
                bare.wait(10)
        stop_daemon(daemon)
        leftover = our_containers(workdir)
        if leftover:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *leftover],
                           capture_output=True, timeout=120)
        remove_workdir(workdir)
    if not args.json:
        print(rps_markdown(report))
        return 0
    print(json.dumps(report, indent=2))
    return 0


def rps_markdown(report: dict) -> str:
    def ms(value) -> str:
        return "–" if value is None else f"{value * 1000:.2f} ms" if value < 0.01 \
            else f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"

    def pct(value) -> str:
        return "–" if value is None else f"{value * 100:.0f} %"

    def times(value) -> str:
        return "–" if value is None else f"{value:.2f}×"

    def verdict(value, ok: bool) -> str:
        return f"{times(value)} — " + ("–" if value is None else "**met**" if ok
                                       else "**not met**")

    targets = report["targets"]
    lines = ["| target | auth | req/s | × bare | p50 | p99 | requests | non-2xx | socket errors "
             "| server CPU (of one core) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in targets.values():
        lines.append(f"| {t['label']} | {t['auth']} | {t['rps']:,.0f} | {times(t['ratio'])} "
                     f"| {ms(t['latency_p50'])} | {ms(t['latency_p99'])} | {t['requests']:,} "
                     f"| {t['non_2xx']} | {t['socket_errors']} | {pct(t['server_cpu_share'])} |")
    health, job = targets["health"]["ratio"], targets["job_jwt"]["ratio"]
    bounds = report["bounds"]
    checks = [f"- `/health` ≥ {bounds['health']}× bare (issue 10): "
              f"{verdict(health, health is not None and health >= bounds['health'])}",
              f"- `GET /jobs/{{id}}` with a JWT ≥ {bounds['job_jwt']}× bare (issue 12): "
              f"{verdict(job, job is not None and job >= bounds['job_jwt'])}"]
    flood = report.get("flood")
    if flood:
        n, rounds = flood["runs"] * flood["rounds"], flood["rounds"]
        lines += ["", f"| `POST /run {{\"prompt\": \"hello\"}}`, n={n} per side | median | p90 "
                      "| daemon CPU (of one core) | machine CPU busy |",
                  "|---|---|---|---|---|"]
        for side, label in (("alone", "alone"),
                            ("flood", f"while `wrk -c{report['connections']}` floods "
                                      "`/health`"),
                            ("bare", f"while `wrk -c{report['connections']}` floods the bare "
                                     "aiohttp handler (the floor)")):
            lines.append(f"| {label} | {flood[side]['median']:.2f} s "
                         f"| {flood[side]['p90']:.2f} s | {pct(flood['daemon_cpu_share'][side])} "
                         f"| {pct(flood['machine_busy'][side])} |")
        bare = targets["bare"]["rps"]
        lines += ["", f"Ratio of medians (flooded / alone): **{flood['ratio']:.2f}×** "
                      f"(a flood of the bare handler: {flood['bare_ratio']:.2f}×); "
                      f"`/health` meanwhile: {flood['health_rps']:,.0f} req/s "
                      f"({times(flood['health_rps'] / bare if bare else None)} bare), p99 "
                      f"{ms(flood['health_p99'])}, {flood['health_requests']:,} requests, "
                      f"{flood['health_errors']} errors (non-2xx + socket); wrk itself used "
                      f"{pct(flood['wrk_cpu_share'])} of one core."]
        checks.append(f"- a `/health` flood slows a concurrent run by ≤ "
                      f"{(bounds['flood_slowdown'] - 1) * 100:.0f} % (issue 10): "
                      f"{(flood['ratio'] - 1) * 100:+.0f} %, "
                      f"{verdict(flood['ratio'], flood['ratio'] <= bounds['flood_slowdown'])}")
    info = ", ".join(f"{key} {value}" for key, value in report["machine"].items())
    rounds = (f"{report['rounds']} rounds, median per target" if report["rounds"] > 1
              else "one round")
    flood_text = ""
    if flood:
        order = "ABBA" if flood["rounds"] > 1 else "back-to-back"
        flood_text = (f" Then, after one discarded run, {flood['runs']} sequential `POST /run` "
                      f"alone and {flood['runs']} while one wrk process (same -t/-c) floods "
                      f"`/health` for the whole series (started {FLOOD_RAMP:g} s before the "
                      f"first run, stopped with SIGINT after the last), {flood['rounds']} "
                      f"pair(s), {order}.")
    return "\n".join([
        *lines, "", "Targets:", *checks, "",
        f"`wrk -t{report['threads']} -c{report['connections']} -d{report['duration']}s "
        f"--latency` per target ({rounds}, in the order shown, each after a "
        f"{report['warmup']} s warm-up), headers with `-H`. Bare: a subprocess serving one "
        "aiohttp GET handler with a small JSON body, no access log. The daemon: "
        "`stromboli.py serve` with auth on (a static token and a JWT secret; the JWT minted "
        "by `POST /auth/token`), its access log on as shipped (JSON lines at info, to a "
        f"file), `GET /jobs/{{id}}` on one finished async job ({report.get('job_status')}); "
        f"`/health` answered \"{report.get('health_status')}\". Server CPU: the serving "
        "process's user+system time over wrk's wall time; wrk, the bench and the server "
        "share the machine." + flood_text,
        f"Load average before → after: {' '.join(report['loadavg_before'])} → "
        f"{' '.join(report.get('loadavg_after', ['?']))}.",
        f"Command: `{report['command']}`", f"Machine: {info}"])


# -- slowloris: half-sent request lines held open (issue 10, item 1) -----------------------

SLOW_LINE = b"GET /health HT"  # half a request line, never finished
SLOW_SETTLE = 1.0  # seconds after the attack stops before the "after" figures
SLOW_RUNS = 3  # sequential POST /run before the attack, and during it
# The attacker, in its own process (its socket churn must not take this process's GIL from
# the /health prober): argv host port connections hold. Non-blocking sockets under one
# selector; each connects, sends SLOW_LINE once it is connected, and waits; one the server
# closes (EOF, RST, a failed connect) is re-opened at once. Every 100 ms it notes how many
# are connected and not closed; at the end it closes them all and prints its figures as JSON.
SLOWLORIS_ATTACK = r'''
import errno, json, selectors, socket, sys, time

host, port, connections, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
line = sys.argv[5].encode()
sel = selectors.DefaultSelector()
stats = {"opened": 0, "connected": 0, "closed_eof": 0, "closed_reset": 0, "connect_failed": 0,
         "open_failed": 0, "samples": [], "first_all_open": None}
state = {}  # socket -> "connecting" | "held"


def open_one():
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        stats["open_failed"] += 1
        return False
    sock.setblocking(False)
    err = sock.connect_ex((host, port))
    if err not in (0, errno.EINPROGRESS):
        stats["connect_failed"] += 1
        sock.close()
        return False
    stats["opened"] += 1
    state[sock] = "connecting"
    sel.register(sock, selectors.EVENT_WRITE)
    return True


def drop(sock, kind):
    stats[kind] += 1
    sel.unregister(sock)
    del state[sock]
    sock.close()


start = time.monotonic()
deadline, next_sample = start + hold, start
print(json.dumps({"start": start}), flush=True)
while True:
    now = time.monotonic()
    if now >= deadline:
        break
    missing = connections - len(state)
    for _ in range(missing):
        if not open_one():
            break
    held = sum(1 for s in state.values() if s == "held")
    if stats["first_all_open"] is None and held == connections:
        stats["first_all_open"] = now - start
    if now >= next_sample:
        stats["samples"].append([now, held, len(state)])
        next_sample += 0.1
    timeout = max(0.0, min(next_sample, deadline) - time.monotonic())
    for key, events in sel.select(timeout if len(state) == connections else 0.005):
        sock = key.fileobj
        if state.get(sock) == "connecting":
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                drop(sock, "connect_failed")
                continue
            try:
                sock.send(line)
            except OSError:
                drop(sock, "closed_reset")
                continue
            stats["connected"] += 1
            state[sock] = "held"
            sel.modify(sock, selectors.EVENT_READ)
        else:
            try:
                data = sock.recv(65536)
            except OSError:
                drop(sock, "closed_reset")
                continue
            if not data:
                drop(sock, "closed_eof")
stats["end"] = time.monotonic()
for sock in list(state):
    sel.unregister(sock)
    sock.close()
print(json.dumps(stats), flush=True)
'''


def raise_own_nofile() -> tuple[int, int]:
    """This process's soft RLIMIT_NOFILE up to the hard limit → (soft, hard) now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def proc_nofile(pid: int) -> int | None:
    """A process's soft "Max open files", from /proc/<pid>/limits."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                value = line.split()[3]
                return int(value) if value.isdigit() else None
    return None


def read_metrics(port: int, names: tuple[str, ...]) -> dict:
    """Some samples of the daemon's /metrics (its metrics listener) → {name: value}."""
    start = time.monotonic()
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=HEALTH_TIMEOUT)
        found: dict = {"status": response.status_code}
        for line in response.text.splitlines():
            name, _, value = line.partition(" ")
            if name in names:
                found[name] = float(value)
    except httpx.HTTPError as exc:
        found = {"status": type(exc).__name__}
    found["seconds"] = time.monotonic() - start
    return found


class FreshHealthProber:
    """One thread: GET /health every 100 ms, each from a fresh client (a new connection,
    as a monitoring probe makes, so it meets the daemon's connection limit), one at a time."""

    def __init__(self, url: str):
        self.url = url
        self.probes: list[tuple[float, float, bool, str]] = []  # (start, seconds, ok, error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "FreshHealthProber":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(HEALTH_TIMEOUT + 5)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            start, error = time.monotonic(), ""
            try:
                with httpx.Client(timeout=HEALTH_TIMEOUT) as client:
                    response = client.get(self.url + "/health")
                ok = response.status_code == 200
                error = "" if ok else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                ok, error = False, type(exc).__name__
            self.probes.append((start, time.monotonic() - start, ok, error))
            due = max(due + SAMPLE_INTERVAL, time.monotonic())
            self._stop.wait(max(0.0, due - time.monotonic()))

    def window(self, start: float, end: float, by: str = "overlap") -> dict:
        """Probes that started ("start"), ended ("end") or were in flight ("overlap") in
        [start, end]."""
        probes = [p for p in self.probes
                  if (by == "start" and start <= p[0] <= end)
                  or (by == "end" and start <= p[0] + p[1] <= end)
                  or (by == "overlap" and p[0] <= end and p[0] + p[1] >= start)]
        latencies = [d for _, d, ok, _ in probes if ok]
        errors: dict[str, int] = {}
        for _, _, ok, error in probes:
            if not ok:
                errors[error] = errors.get(error, 0) + 1
        return {"probes": len(probes), "ok": len(latencies), "failed": len(probes) - len(latencies),
                "slow": sum(1 for d in latencies if d > HEALTH_SLOW), "errors": errors,
                "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                "max": max(latencies, default=None)}


def timed_run(url: str) -> dict:
    """One `POST /run {"prompt": "hello"}` from a fresh client → wall time, ok, error."""
    start = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=RUN_TIMEOUT) as client:
            post_run(client)
        return {"seconds": time.monotonic() - start, "ok": True}
    except (httpx.HTTPError, RuntimeError) as exc:
        return {"seconds": time.monotonic() - start, "ok": False,
                "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def log_figures(path: pathlib.Path, offset: int = 0) -> dict:
    """Lines, bytes and "Traceback" occurrences of the daemon log from byte offset on."""
    try:
        with open(path, "rb") as log_file:
            log_file.seek(offset)
            text = log_file.read()
    except OSError:
        text = b""
    messages: dict[str, int] = {}
    for line in text.splitlines():
        try:
            message = str(json.loads(line).get("msg"))[:80]
        except (ValueError, AttributeError):
            message = "(not JSON)"
        messages[message] = messages.get(message, 0) + 1
    top = sorted(messages.items(), key=lambda item: -item[1])[:5]
    return {"bytes": len(text), "lines": text.count(b"\n"),
            "tracebacks": text.count(b"Traceback"), "top_messages": dict(top)}


def slowloris(args) -> int:
    """`slowloris`: half-sent request lines held on many connections, against a daemon with
    default server settings; /health, runs, RSS, fds, metrics and log during the hold."""
    model = ScriptedModel()
    model.start()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stromboli-slowloris-"))
    daemon = Daemon(workdir / "state", daemon_env(model, args.image, 0))
    report: dict = {"command": shlex.join(sys.orig_argv), "machine": machine_info(args.image),
                    "connections": args.connections, "hold": args.hold,
                    "line": SLOW_LINE.decode(), "runs": SLOW_RUNS}
    names = ("stromboli_connections_rejected_total", "stromboli_connections_timed_out_total",
             "stromboli_open_connections")
    attacker = None
    try:
        # The daemon starts with --daemon-nofile as its soft limit (systemd's default 1024,
        # as in the issue; it raises its own at start when allowed), this process then raises
        # its own to the hard limit, and the attacker (its child) inherits that.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if args.daemon_nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.daemon_nofile, hard), hard))
        try:
            daemon.start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        pid = daemon.proc.pid
        report["nofile"] = {"daemon_started_with": args.daemon_nofile or soft,
                            "daemon": proc_nofile(pid), "bench": raise_own_nofile()[0]}
        report["loadavg_before"] = open("/proc/loadavg").read().split()[:3]
        print("slowloris: runs before the attack…", file=sys.stderr, flush=True)
        timed_run(daemon.url)  # warm-up, discarded
        report["runs_before"] = [timed_run(daemon.url) for _ in range(SLOW_RUNS)]
        time.sleep(1)
        report["before"] = read_proc(pid)
        report["metrics_before"] = read_metrics(daemon.metrics_port, names)
        log_offset = daemon.log_path.stat().st_size
        report["log_before"] = log_figures(daemon.log_path)
        with ProcSampler(pid) as sampler, FreshHealthProber(daemon.url) as prober:
            time.sleep(1)  # a second of /health probes without the attack
            print(f"slowloris: {args.connections} connections for {args.hold:g} s…",
                  file=sys.stderr, flush=True)
            attacker = subprocess.Popen(
                [sys.executable, "-c", SLOWLORIS_ATTACK, "127.0.0.1", str(daemon.port),
                 str(args.connections), str(args.hold), SLOW_LINE.decode()],
                stdout=subprocess.PIPE, text=True)
            attack_start = json.loads(attacker.stdout.readline())["start"]
            time.sleep(min(2.0, args.hold / 4))  # let the connections pile up
            report["runs_during"] = []
            for _ in range(SLOW_RUNS):
                if time.monotonic() - attack_start >= args.hold:
                    break
                report["runs_during"].append(timed_run(daemon.url))
                report["runs_during"][-1]["at"] = time.monotonic() - attack_start
            # The metrics at the end of the hold, the attack still on.
            time.sleep(max(0.0, attack_start + args.hold - 0.5 - time.monotonic()))
            report["metrics_end_of_hold"] = read_metrics(daemon.metrics_port, names)
            out, _ = attacker.communicate(timeout=args.hold + 60)
            attack = json.loads(out.strip().splitlines()[-1])
            attack_end = attack["end"]
            time.sleep(SLOW_SETTLE)
            # Before: ended before the attack; during: in flight at any time during it.
            report["health_before_attack"] = prober.window(attack_start - 1.5, attack_start,
                                                           "end")
            report["health"] = prober.window(attack_start, attack_end, "overlap")
            report["health_after_attack"] = prober.window(attack_end, time.monotonic(),
                                                          "start")
            report["peak"] = sampler.peaks(attack_start, attack_end + SLOW_SETTLE)
        report["after"] = read_proc(pid)
        report["metrics_after"] = read_metrics(daemon.metrics_port, names)
        report["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
        samples = [s for s in attack.pop("samples") if s[0] <= attack_end]
        held = [h for _, h, _ in samples]
        attack["held_mean"] = statistics.mean(held) if held else None
        attack["held_min_after_ramp"] = min((h for t, h, _ in samples if t >= attack_start + 2),
                                            default=None)
        attack["held_max"] = max(held, default=None)
        attack["seconds"] = attack_end - attack_start
        attack["reopened"] = attack["opened"] - args.connections
        report["attack"] = attack
        report["log_during_and_after"] = log_figures(daemon.log_path, log_offset)
        report["log_total"] = log_figures(daemon.log_path)
        report["daemon_alive"] = daemon.proc.poll() is None
    except Exception:
        sys.stderr.write(f"daemon log (tail):\n{daemon.log()[-4000:]}\n")
        raise
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait(10)
        stop_daemon(daemon)
        leftover = our_containers(workdir)
        if leftover:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *leftover],
                           capture_output=True, timeout=120)
        remove_workdir(workdir)
    print(json.dumps(report, indent=2) if args.json else slowloris_markdown(report))
    return 0


def slowloris_markdown(report: dict) -> str:
    def ms(value) -> str:
        return "–" if value is None else f"{value * 1000:.1f} ms" if value < 1 \
            else f"{value:.2f} s"

    def mb(value) -> str:
        return "–" if value is None else f"{value / MiB:.0f} MiB"

    def runs(series: list[dict]) -> str:
        return ", ".join(ms(r["seconds"]) + ("" if r["ok"] else f" ✗ ({r['error'][:80]})")
                         for r in series) or "–"

    def median_run(series: list[dict]) -> float | None:
        ok = [r["seconds"] for r in series if r["ok"]]
        return statistics.median(ok) if ok else None

    def health(h: dict) -> str:
        errors = ", ".join(f"{k} {n}" for k, n in h["errors"].items())
        return (f"{h['ok']} / {h['failed']}{f' ({errors})' if errors else ''} / {h['slow']} "
                f"| {ms(h['p50'])} | {ms(h['p99'])} | {ms(h['max'])} |")

    def metric(m: dict, name: str) -> str:
        value = m.get(name)
        return "–" if value is None else f"{value:.0f}"

    attack, before, peak, after = report["attack"], report["before"], report["peak"], \
        report["after"]
    b, d = median_run(report["runs_before"]), median_run(report["runs_during"])
    ratio = f" ({d / b:.2f}×)" if b and d else ""
    lines = ["| `GET /health`, fresh client, every 100 ms | probes ok / failed / > 1 s "
             "| p50 | p99 | max |", "|---|---|---|---|---|",
             f"| 1 s before the attack | {health(report['health_before_attack'])}",
             f"| during the hold ({attack['seconds']:.1f} s) | {health(report['health'])}",
             f"| {SLOW_SETTLE:g} s after | {health(report['health_after_attack'])}"]
    metric_rows = [f"| `{name}` before / end of hold / {SLOW_SETTLE:g} s after "
                   f"| {metric(report['metrics_before'], name)} / "
                   f"{metric(report['metrics_end_of_hold'], name)} / "
                   f"{metric(report['metrics_after'], name)} |"
                   for name in ("stromboli_connections_rejected_total",
                                "stromboli_connections_timed_out_total",
                                "stromboli_open_connections")]
    log, total = report["log_during_and_after"], report["log_total"]
    nofile = report["nofile"]
    lines += [
        "", "| measurement | value |", "|---|---|",
        f"| `POST /run` wall, before the attack | {runs(report['runs_before'])} |",
        f"| `POST /run` wall, during the attack | {runs(report['runs_during'])} "
        f"(median {ms(d)} vs {ms(b)}{ratio}) |",
        f"| attack connections held open: mean / min after 2 s / max "
        f"| {attack['held_mean']:.0f} / {attack['held_min_after_ramp']} / "
        f"{attack['held_max']} of {report['connections']} |",
        f"| attack: all {report['connections']} held at once after "
        f"| {'never' if attack['first_all_open'] is None else ms(attack['first_all_open'])} |",
        f"| attack: opened (re-opened) / closed by server: EOF, reset / connect failed "
        f"| {attack['opened']} ({attack['reopened']}) / {attack['closed_eof']}, "
        f"{attack['closed_reset']} / {attack['connect_failed']} |",
        f"| daemon RSS before / peak / after | {mb(before['rss'])} / {mb(peak['rss'])} / "
        f"{mb(after['rss'])} |",
        f"| daemon open fds before / peak / after | {before['fds']} / {peak['fds']} / "
        f"{after['fds']} |",
        *metric_rows,
        f"| `/metrics` read at the end of the hold, in "
        f"| {ms(report['metrics_end_of_hold']['seconds'])} "
        f"(status {report['metrics_end_of_hold']['status']}) |",
        f"| daemon log during the attack and after: lines / bytes / tracebacks "
        f"| {log['lines']} / {log['bytes']} / {log['tracebacks']} (whole log: "
        f"{total['lines']} lines, {total['tracebacks']} tracebacks) |",
        f"| daemon log during the attack and after: most frequent messages "
        f"| {'; '.join(f'{m} ×{n}' for m, n in log['top_messages'].items()) or '–'} |",
        f"| daemon alive at the end | {'yes' if report['daemon_alive'] else 'no'} |",
        f"| nofile soft limit: daemon started with / daemon's own / bench "
        f"| {nofile['daemon_started_with']} / {nofile['daemon']} / {nofile['bench']} |",
    ]
    info = ", ".join(f"{key} {value}" for key, value in report["machine"].items())
    return "\n".join([
        *lines, "",
        f"A daemon with default server settings (auth off) gets {report['connections']} "
        f"loopback connections that each send `{report['line']}` and hold, for "
        f"{report['hold']:g} s; a connection the server closes is re-opened at once (attacker "
        "in its own process, non-blocking sockets). Meanwhile: `GET /health` every "
        f"{SAMPLE_INTERVAL * 1000:.0f} ms from a fresh client ({HEALTH_TIMEOUT:g} s timeout; "
        f"ok = 200; > 1 s counts the ok ones), the daemon's RSS and fds (/proc, every "
        f"{SAMPLE_INTERVAL * 1000:.0f} ms) and {report['runs']} sequential "
        "`POST /run {\"prompt\": \"hello\"}` (fresh client each, from 2 s into the hold), "
        f"against {report['runs']} before the attack (after one discarded). Connections held: "
        "the attacker's sockets connected, half line sent and not closed, every 100 ms (the "
        "kernel's accept queue included: the daemon's own count is "
        "`stromboli_open_connections`).",
        f"Load average before → after: {' '.join(report['loadavg_before'])} → "
        f"{' '.join(report['loadavg_after'])}.",
        f"Command: `{report['command']}`", f"Machine: {info}"])


# -- soak: kill -9 during a stream of async jobs (issue 13) ----------------------------

SOAK_FINAL = ("completed", "failed", "crashed", "cancelled")
SOAK_PROMPTS = ("hello", "sleep 1", "sleep 3")


def instance_containers(instance: str) -> list[str]:
    """Ids of the Podman containers (any state) labelled with this daemon instance."""
    proc = subprocess.run(["podman", "ps", "-a", "-q", "--no-trunc", "--filter",
                           f"label=stromboli.instance={instance}"],
                          capture_output=True, text=True, timeout=60)
    return proc.stdout.split()


def instance_container_states(instance: str) -> list[dict]:
    """This instance's containers: short id, Podman state and job label."""
    proc = subprocess.run(["podman", "ps", "-a", "--format", "json", "--filter",
                           f"label=stromboli.instance={instance}"],
                          capture_output=True, text=True, timeout=60)
    try:
        found = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        return []
    return [{"id": c.get("Id", "")[:12], "state": c.get("State"),
             "job": (c.get("Labels") or {}).get("stromboli.job")} for c in found]


def soak_error_key(error: str) -> str:
    """An error text with its ids and numbers blanked, to group alike errors."""
    text = re.sub(r"\b(job|run|sess)-[0-9a-f]+\b", r"\1-…", error or "(no error text)")
    return re.sub(r"\b[0-9a-f]{12,}\b", "…", text)[:400]


class Soak:
    def __init__(self, args, model: ScriptedModel, workdir: pathlib.Path):
        self.args = args
        self.rng = random.Random(args.seed)
        self.env = {**daemon_env(model, args.image, 0), "STROMBOLI_AUTH_ENABLED": "false",
                    "STROMBOLI_MAX_CONCURRENT_RUNS": "2"}
        self.workdir = workdir
        self.state = workdir / "state"
        self.jobs: dict[str, dict] = {}  # job id → {"round", "prompt", "stream"}
        self.rounds: list[dict] = []
        self.logs: list[pathlib.Path] = []

    def daemon(self, label: str) -> Daemon:
        daemon = Daemon(self.state, self.env)
        daemon.log_path = self.workdir / f"daemon-{label}.log"  # "podman connected" per start
        self.logs.append(daemon.log_path)
        return daemon

    def start(self, daemon: Daemon) -> float | str:
        """Start it; → seconds to up and podman connected, or the error text."""
        started = time.monotonic()
        try:
            daemon.start()
            return time.monotonic() - started
        except Exception as exc:  # noqa: BLE001 - reported, the soak goes on
            if daemon.proc and daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait(10)
            return f"{type(exc).__name__}: {str(exc)[-600:]}"

    def submit(self, client: httpx.Client, round_no: int) -> dict:
        prompt = f"{self.rng.choice(SOAK_PROMPTS)} {uuid.uuid4().hex[:8]}"
        stream = self.rng.random() < 0.25
        body: dict = {"prompt": prompt}
        if stream:
            body["claude"] = {"output_format": "stream-json"}
        try:
            response = client.post("/run/async", json=body)
            job_id = response.json().get("job_id") if response.status_code in (200, 201, 202) \
                else None
        except (httpx.HTTPError, ValueError) as exc:
            return {"prompt": prompt, "error": f"{type(exc).__name__}: {exc}"}
        if not job_id:
            return {"prompt": prompt, "error": f"HTTP {response.status_code}: "
                                               f"{response.text[:200]}"}
        self.jobs[job_id] = {"round": round_no, "prompt": prompt, "stream": stream}
        return {"prompt": prompt, "job_id": job_id}

    @staticmethod
    def counts(client: httpx.Client) -> dict[str, int] | str:
        out = {}
        try:
            for status in ("pending", "running"):
                out[status] = client.get("/jobs", params={"status": status, "limit": 1}
                                         ).json()["total"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return out

    def round(self, round_no: int) -> dict:
        daemon = self.daemon(f"{round_no:02d}")
        row: dict = {"round": round_no, "delay": round(self.rng.uniform(0.5, 4.0), 2)}
        up = self.start(daemon)
        if isinstance(up, str):
            row["start_error"] = up
            return row
        row["start_seconds"] = round(up, 3)
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            row["submitted"] = [self.submit(client, round_no)
                                for _ in range(self.args.jobs_per_round)]
            time.sleep(row["delay"])
            row["at_kill"] = self.counts(client)
        try:
            daemon.stop(signal.SIGKILL)
        except subprocess.TimeoutExpired:
            row["kill_error"] = "daemon still alive 30 s after SIGKILL"
        row["containers_after_kill"] = len(instance_containers(daemon.instance))
        return row

    def final(self) -> dict:
        daemon = self.daemon("final")
        out: dict = {}
        up = self.start(daemon)
        if isinstance(up, str):
            out["start_error"] = up
            return out
        out["start_seconds"] = round(up, 3)
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            began = time.monotonic()
            while True:
                counts = self.counts(client)
                if isinstance(counts, dict) and not any(counts.values()):
                    break
                if time.monotonic() - began > self.args.final_timeout:
                    out["still_busy"] = counts
                    break
                time.sleep(0.5)
            out["drain_seconds"] = round(time.monotonic() - began, 3)
            out["containers_idle"] = instance_container_states(daemon.instance)
            out["jobs"] = {}
            for job_id in self.jobs:
                try:
                    response = client.get(f"/jobs/{job_id}")
                    out["jobs"][job_id] = response.json() if response.status_code == 200 \
                        else {"status": "lost", "error": f"HTTP {response.status_code}"}
                except (httpx.HTTPError, ValueError) as exc:
                    out["jobs"][job_id] = {"status": "unreadable",
                                           "error": f"{type(exc).__name__}: {exc}"}
            try:
                out["daemon_total"] = client.get("/jobs", params={"limit": 1}).json()["total"]
            except (httpx.HTTPError, ValueError, KeyError):
                out["daemon_total"] = None
        stop_daemon(daemon)
        out["orphans"] = instance_container_states(daemon.instance)
        out["instance"] = daemon.instance
        return out

    def log_lines(self, job_id: str, keep: int = 8) -> list[str]:
        lines = []
        for path in self.logs:
            if path.exists():
                lines += [f"{path.stem}: {line[:400]}" for line in path.read_text().splitlines()
                          if job_id in line]
        return lines[-keep:]

    def run(self) -> dict:
        started = time.monotonic()
        for round_no in range(1, self.args.kills + 1):
            row = self.round(round_no)
            self.rounds.append(row)
            print(f"soak: kill {round_no}/{self.args.kills} after {row['delay']} s "
                  f"({row.get('at_kill') or row.get('start_error')})", file=sys.stderr, flush=True)
        final = self.final()
        instance = final.get("instance") or Daemon(self.state, self.env).instance
        leftover = instance_containers(instance)
        if leftover:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *leftover], capture_output=True,
                           timeout=120)
        jobs = final.get("jobs", {})
        by_status: dict[str, int] = {}
        errors: dict[str, dict] = {}
        wrong_output = []
        problems = {}
        for job_id, meta in self.jobs.items():
            job = jobs.get(job_id, {"status": "not checked", "error": "final start failed"})
            status = job.get("status", "?")
            if status not in SOAK_FINAL and status not in ("lost", "unreadable", "not checked"):
                status = f"still {status}"
            by_status[status] = by_status.get(status, 0) + 1
            if status == "completed":
                want = REPLY if meta["prompt"].startswith("hello") else f"echo: {meta['prompt']}"
                if want not in (job.get("output") or ""):
                    wrong_output.append({"job_id": job_id, **meta,
                                         "output": (job.get("output") or "")[-300:]})
                continue
            key = f"{status}: {soak_error_key(job.get('error') or '')}"
            group = errors.setdefault(key, {"count": 0, "jobs": []})
            group["count"] += 1
            group["jobs"].append(job_id)
            problems[job_id] = {**meta, "status": status, "error": job.get("error"),
                                "crash_info": job.get("crash_info"),
                                "log": self.log_lines(job_id)}
        for item in wrong_output:
            problems[item["job_id"]] = {**item, "log": self.log_lines(item["job_id"])}
        tracebacks = sum(p.read_text().count("Traceback") for p in self.logs if p.exists())
        refused = [{"round": r["round"], **s} for r in self.rounds for s in r.get("submitted", [])
                   if "error" in s]
        return {
            "command": shlex.join(sys.orig_argv), "machine": machine_info(self.args.image),
            "kills": self.args.kills, "jobs_per_round": self.args.jobs_per_round,
            "seed": self.args.seed, "max_concurrent_runs": 2,
            "final_timeout": self.args.final_timeout,
            "submitted": len(self.jobs), "submissions_refused": refused,
            "daemon_total": final.get("daemon_total"),
            "by_status": by_status,
            "lost": [j for j, job in jobs.items() if job.get("status") == "lost"],
            "errors": errors, "wrong_output": wrong_output, "problems": problems,
            "start_errors": [{"round": r["round"], "error": r["start_error"]}
                             for r in self.rounds if "start_error" in r]
                            + ([{"round": "final", "error": final["start_error"]}]
                               if "start_error" in final else []),
            "final_start_seconds": final.get("start_seconds"),
            "drain_seconds": final.get("drain_seconds"), "still_busy": final.get("still_busy"),
            "containers_idle": final.get("containers_idle"),
            "orphans": final.get("orphans", []),
            "leftover_cleaned": len(leftover),
            "tracebacks": tracebacks,
            "rounds": [{k: v for k, v in r.items() if k != "submitted"}
                       | {"jobs": [s.get("job_id") for s in r.get("submitted", [])]}
                       for r in self.rounds],
            "wall_seconds": round(time.monotonic() - started, 1),
            "workdir": str(self.workdir),
        }


def soak(args) -> int:
    """`soak`: SIGKILL the daemon --kills times during a stream of async jobs."""
    model = ScriptedModel()
    model.start()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stromboli-soak-"))
    report = Soak(args, model, workdir).run()
    clean = not (report["lost"] or report["orphans"] or report["problems"]
                 or report["start_errors"] or report["still_busy"] or report["tracebacks"])
    if clean:
        remove_workdir(workdir)
        report["workdir"] = None
    print(json.dumps(report, indent=2) if args.json else soak_markdown(report))
    return 0 if not (report["lost"] or report["orphans"]) else 1


def soak_markdown(report: dict) -> str:
    stats = report["by_status"]
    starts = [r["start_seconds"] for r in report["rounds"] if "start_seconds" in r]
    delays = [r["delay"] for r in report["rounds"]]
    running = [r["at_kill"].get("running", 0) for r in report["rounds"]
               if isinstance(r.get("at_kill"), dict)]
    pending = [r["at_kill"].get("pending", 0) for r in report["rounds"]
               if isinstance(r.get("at_kill"), dict)]
    orphans = " (" + ", ".join(f"{c['id']} {c['state']} {c['job']}" for c in report["orphans"]) \
        + ")" if report["orphans"] else ""
    lines = [
        "| soak | value |", "|---|---:|",
        f"| kill -9 | {report['kills']} (delay after submitting: "
        f"{min(delays, default=0):.2f}–{max(delays, default=0):.2f} s) |",
        f"| jobs submitted (acknowledged) | {report['submitted']} |",
        f"| submissions refused / unanswered | {len(report['submissions_refused'])} |",
        f"| jobs known to the daemon at the end | {report['daemon_total']} |",
        *(f"| jobs {status} | {n} |" for status, n in sorted(stats.items())),
        f"| **jobs lost** (acknowledged, unknown at the end) | **{len(report['lost'])}** |",
        f"| completed with an unexpected output | {len(report['wrong_output'])} |",
        f"| jobs running / pending at a kill (median; max) | "
        f"{statistics.median(running) if running else '–'} / "
        f"{statistics.median(pending) if pending else '–'}; "
        f"{max(running, default='–')} / {max(pending, default='–')} |",
        f"| daemon start to ready (podman connected; median, max) | "
        f"{statistics.median(starts):.2f} s, {max(starts):.2f} s |" if starts else
        "| daemon start to ready | – |",
        f"| daemon start failures | {len(report['start_errors'])} |",
        f"| final daemon: until no job pending/running | {report['drain_seconds']} s"
        f"{' (gave up: ' + str(report['still_busy']) + ')' if report['still_busy'] else ''} |",
        f"| containers of the instance, all jobs final, daemon up | "
        f"{len(report['containers_idle'] or [])} |",
        f"| **orphan containers after the final graceful stop** | "
        f"**{len(report['orphans'])}**{orphans} |",
        f"| containers of the instance removed by the bench at the end | "
        f"{report['leftover_cleaned']} |",
        f"| tracebacks in the daemon logs | {report['tracebacks']} |",
        f"| total wall time | {report['wall_seconds']} s |",
    ]
    if report["errors"]:
        lines += ["", "| non-completed jobs: status and error | jobs |", "|---|---:|"]
        lines += [f"| {key.replace('|', '/')} | {g['count']} |"
                  for key, g in sorted(report["errors"].items(), key=lambda kv: -kv[1]["count"])]
    for item in report["start_errors"]:
        lines.append(f"\nStart failure (round {item['round']}): `{item['error'][-300:]}`")
    for item in report["submissions_refused"]:
        lines.append(f"\nSubmission refused (round {item['round']}): {item['error']}")
    info = ", ".join(f"{key} {value}" for key, value in report["machine"].items())
    return "\n".join([
        *lines, "",
        f"One state dir; {report['kills']} times: start the daemon (auth off, "
        f"max_concurrent_runs {report['max_concurrent_runs']}), submit "
        f"{report['jobs_per_round']} async jobs (prompts among "
        f"{', '.join(repr(p) for p in SOAK_PROMPTS)} — the scripted model waits N s on "
        "\"sleep N\" —, a quarter with output_format stream-json), wait a random 0.5–4 s "
        f"(seed {report['seed']}), SIGKILL. Then a last start, waiting (≤ "
        f"{report['final_timeout']:g} s) until no job is pending or running, each submitted "
        "job read back (GET /jobs/{id}; a completed one must carry the model's answer), and "
        "a graceful stop (SIGTERM): orphans are the containers with the daemon's "
        "`stromboli.instance` label still there after it."
        + (f" Daemon logs kept in {report['workdir']}." if report["workdir"] else ""),
        f"Command: `{report['command']}`", f"Machine: {info}"])


# -- agent: a persistent agent's warm turn vs a cold run (issue 14) ------------------

AGENT_TIMEOUT = 120.0  # seconds for one turn, one run, one agent's first turn
AGENT_READ_TIMEOUT = 60.0  # SSE read timeout (the daemon sends `: keepalive` every 15 s)
AGENT_CLOSE_WAIT = 30.0  # seconds for the stream to end after DELETE


class AgentStream:
    """GET /agents/{id}/stream, kept open and read by a thread. Each event, once its blank
    line has arrived, is queued as {"t": monotonic at receipt, "id", "event", "data"}."""

    def __init__(self, url: str, agent_id: str, last_event_id: int | None = None):
        self.url, self.agent_id, self.last_event_id = url, agent_id, last_event_id
        self.queue: "queue.Queue[dict | None]" = queue.Queue()
        self.status: int | None = None
        self.error: str | None = None
        self.ended = threading.Event()
        self.events_seen = 0
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> "AgentStream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join(0)  # a daemon thread; it ends with the stream (DELETE ends it)

    def _read(self) -> None:
        headers = {} if self.last_event_id is None else {"Last-Event-ID": str(self.last_event_id)}
        timeout = httpx.Timeout(10.0, read=AGENT_READ_TIMEOUT)
        try:
            with httpx.Client(base_url=self.url, timeout=timeout) as client, \
                    client.stream("GET", f"/agents/{self.agent_id}/stream",
                                  headers=headers) as response:
                self.status = response.status_code
                if response.status_code != 200:
                    response.read()
                    self.error = f"GET stream → {response.status_code}: {response.text[:500]}"
                    return
                block: dict = {}
                for line in response.iter_lines():
                    if line == "":
                        if block:
                            self._emit(block)
                        block = {}
                    elif not line.startswith(":"):  # `: keepalive` comments are skipped
                        field, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if field == "data" and "data" in block:
                            block["data"] += "\n" + value
                        else:
                            block[field] = value
        except httpx.HTTPError as exc:
            self.error = f"stream: {type(exc).__name__}: {exc}"
        finally:
            self.ended.set()
            self.queue.put(None)

    def _emit(self, block: dict) -> None:
        t = time.monotonic()
        try:
            data = json.loads(block.get("data") or "null")
        except json.JSONDecodeError:
            data = {"_raw": block.get("data")}
        try:
            event_id = int(block["id"]) if "id" in block else None
        except ValueError:
            event_id = block["id"]
        self.events_seen += 1
        self.queue.put({"t": t, "id": event_id, "event": block.get("event", "message"),
                        "data": data if isinstance(data, dict) else {"_value": data}})

    def next(self, deadline: float) -> dict:
        """The next event; RuntimeError when the stream has ended or nothing came in time."""
        try:
            event = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"agent {self.agent_id}: no event within the deadline") from None
        if event is None:
            self.queue.put(None)  # stays ended for later callers
            raise RuntimeError(f"agent {self.agent_id}: stream ended"
                               + (f" ({self.error})" if self.error else ""))
        return event

    def until_closed(self, timeout: float) -> list[str]:
        """After DELETE: the types of the events left, up to the stream's end."""
        deadline, kinds = time.monotonic() + timeout, []
        while True:
            try:
                kinds.append(self.next(deadline)["event"])
            except RuntimeError:
                return kinds


def read_turn(stream: AgentStream, start: float, turn_id: str | None) -> dict:
    """Events up to the turn's `turn_end` (turn_id None: the first turn_end) → its times,
    relative to `start`: first `output`, first output with the model's reply text, turn_end."""
    deadline = start + AGENT_TIMEOUT
    turn = {"first_output": None, "first_reply_text": None, "turn_end": None,
            "first_output_type": None, "outputs": 0, "errors": [], "stray": 0,
            "reply_seen": False, "turn_id": turn_id, "events": []}
    while True:
        event = stream.next(deadline)
        kind, data = event["event"], event["data"]
        turn["events"].append(kind)
        other = turn_id is not None and data.get("turn_id") not in (None, turn_id)
        if other:
            turn["stray"] += 1
            continue
        if kind == "output":
            content = data.get("content") or ""
            turn["outputs"] += 1
            if turn["first_output"] is None:
                turn["first_output"] = event["t"] - start
                try:
                    turn["first_output_type"] = json.loads(content).get("type")
                except (ValueError, AttributeError):
                    turn["first_output_type"] = "(not JSON)"
            if REPLY in content:
                turn["reply_seen"] = True
                if turn["first_reply_text"] is None:
                    turn["first_reply_text"] = event["t"] - start
        elif kind == "error":
            turn["errors"].append(str(data.get("error"))[:300])
        elif kind == "turn_end":
            turn["turn_end"] = event["t"] - start
            turn["turn_end_at"] = data.get("at")
            turn["turn_id"] = data.get("turn_id", turn_id)
            turn["usage"] = data.get("usage")
            turn["end_monotonic"] = event["t"]
            turn["events"] = turn["events"][-12:]
            return turn
        elif kind in ("exited", "closed"):
            raise RuntimeError(f"agent {stream.agent_id}: `{kind}` during a turn: {data} "
                               f"(errors: {turn['errors'][-5:]})")


def rfc3339_epoch(value) -> float | None:
    """An RFC 3339 timestamp (fractional seconds, any precision) → epoch seconds."""
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"(.+?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", value.strip())
    if not m:
        return None
    try:
        base = datetime.datetime.fromisoformat(m.group(1) + m.group(3).replace("Z", "+00:00"))
    except ValueError:
        return None
    return base.timestamp() + (float("0." + m.group(2)) if m.group(2) else 0.0)


def agent_containers(instance: str, agent_id: str) -> list[str]:
    proc = subprocess.run(["podman", "ps", "-a", "-q", "--no-trunc", "--filter",
                           f"label=stromboli.instance={instance}", "--filter",
                           f"label=stromboli.agent={agent_id}"],
                          capture_output=True, text=True, timeout=60)
    return proc.stdout.split()


def container_processes(container: str) -> list[str]:
    """`podman top <container> hpid pid args` → one "host-pid pid args" line per process (or
    the error): the host pid tells a restarted CLI from the same one (both are pid 1)."""
    proc = subprocess.run(["podman", "top", container, "hpid", "pid", "args"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode:
        return [f"(podman top failed: {proc.stderr.strip()[:200]})"]
    return [" ".join(line.split()) for line in proc.stdout.splitlines()[1:] if line.strip()]


def cli_pids(processes: list[str]) -> list[str]:
    return [line.split()[0] for line in processes if "claude" in line and line[:1].isdigit()]


class AgentBench:
    def __init__(self, args, model: TimedModel, daemon: Daemon, workdir: pathlib.Path):
        self.args, self.model, self.daemon, self.workdir = args, model, daemon, workdir
        self.client = httpx.Client(base_url=daemon.url, timeout=AGENT_TIMEOUT)
        self.bench = Bench(model, daemon, args.image, workdir)  # overhead's baseline
        self.notes: list[str] = []
        self.stray_agents: list[str] = []

    def podman_true(self) -> float:
        """Raw `podman run --rm <image> true`: a container start and removal, nothing else."""
        start = time.monotonic()
        proc = subprocess.run(["podman", "run", "--rm", self.args.image, "true"],
                              capture_output=True, text=True, timeout=AGENT_TIMEOUT)
        wall = time.monotonic() - start
        if proc.returncode:
            raise RuntimeError(f"podman run true failed ({proc.returncode}): {proc.stderr}")
        return wall

    def cold_run(self, prompt: str) -> dict:
        """`POST /run {prompt}` (sync): a container and a CLI per run."""
        start = time.monotonic()
        response = self.client.post("/run", json={"prompt": prompt})
        end = time.monotonic()
        try:
            body = response.json()
        except ValueError:
            body = {}
        if body.get("status") != "completed" or body.get("output") != REPLY:
            raise RuntimeError(f"POST /run failed ({response.status_code}): "
                               f"{response.text[:2000]}")
        return {"wall": end - start, "reply_to_answer": end - self.model.reply_between(start, end)}

    def create(self, prompt: str) -> tuple[str, dict, float, float]:
        """POST /agents {prompt} → (id, snapshot, monotonic start, epoch start)."""
        epoch, start = time.time(), time.monotonic()
        response = self.client.post("/agents", json={"prompt": prompt})
        if response.status_code != 201:
            hint = " (no /agents route: is the feature in this stromboli.py?)" \
                if response.status_code in (404, 405) else ""
            raise RuntimeError(f"POST /agents → {response.status_code}{hint}: "
                               f"{response.text[:1000]}")
        snapshot = response.json()
        self.stray_agents.append(snapshot["id"])
        return snapshot["id"], snapshot, start, epoch

    def first_turn(self, stream: AgentStream, start: float, epoch: float,
                   models_before: int) -> dict:
        turn = read_turn(stream, start, None)
        if not turn["reply_seen"]:
            raise RuntimeError(f"agent {stream.agent_id}: first turn ended without the reply: "
                               f"{turn}")
        at = rfc3339_epoch(turn.get("turn_end_at"))
        turn["turn_end_by_at"] = at - epoch if at is not None else None
        turn["model_calls"] = len(self.model.replies) - models_before
        return turn

    def delete(self, agent_id: str, stream: AgentStream | None) -> dict:
        """DELETE /agents/{id}, timed, and what follows; never raises for a daemon gone
        (it is called from `finally` blocks: the first error is the one to see)."""
        start = time.monotonic()
        try:
            response = self.client.delete(f"/agents/{agent_id}")
        except httpx.HTTPError as exc:
            return {"status": None, "seconds": time.monotonic() - start,
                    "error": f"{type(exc).__name__}: {exc}"}
        wall = time.monotonic() - start
        result = {"status": response.status_code, "seconds": wall}
        if response.status_code == 204 and agent_id in self.stray_agents:
            self.stray_agents.remove(agent_id)
        if stream is not None:
            result["stream_after_delete"] = stream.until_closed(AGENT_CLOSE_WAIT)
            result["stream_ended"] = stream.ended.is_set()
        try:
            result["after"] = self.client.get(f"/agents/{agent_id}").status_code
        except httpx.HTTPError as exc:
            result["after"] = f"{type(exc).__name__}: {exc}"
        result["containers_left"] = len(agent_containers(self.daemon.instance, agent_id))
        return result

    def cold_agent(self, prompt: str) -> dict:
        """A new agent with a prompt → its first turn_end; then DELETE (timed)."""
        models_before = len(self.model.replies)
        agent_id, _, start, epoch = self.create(prompt)
        with AgentStream(self.daemon.url, agent_id, last_event_id=0) as stream:
            try:
                turn = self.first_turn(stream, start, epoch, models_before)
            finally:
                deleted = self.delete(agent_id, stream)
        return {"turn": turn, "delete": deleted}

    def warm_turn(self, stream: AgentStream, agent_id: str, prompt: str) -> dict:
        models_before = len(self.model.replies)
        start = time.monotonic()
        response = self.client.post(f"/agents/{agent_id}/send", json={"prompt": prompt})
        accepted = time.monotonic() - start
        if response.status_code != 202:
            raise RuntimeError(f"POST /agents/{agent_id}/send → {response.status_code}: "
                               f"{response.text[:1000]}")
        turn_id = response.json().get("turn_id")
        turn = read_turn(stream, start, turn_id)
        if not turn["reply_seen"]:
            raise RuntimeError(f"agent {agent_id}: turn {turn_id} ended without the reply: {turn}")
        turn["accepted"] = accepted
        turn["model_calls"] = len(self.model.replies) - models_before
        turn["reply_to_turn_end"] = turn["end_monotonic"] - self.model.reply_between(
            start, turn["end_monotonic"])
        return turn

    def run(self) -> tuple[dict, dict]:
        runs = self.args.runs
        keys = ("podman_true", "podman_claude", "post_run", "post_run_reply_to_answer",
                "agent_first_turn", "agent_first_output", "agent_delete",
                "warm_turn", "warm_first_output", "warm_first_reply_text", "warm_accepted",
                "warm_reply_to_turn_end")
        samples: dict[str, list[float]] = {k: [] for k in keys}
        facts: dict = {"first_output_types": {}, "stderr_errors": [], "stray_events": 0,
                       "model_calls_per_warm_turn": [], "model_calls_per_first_turn": [],
                       "deletes": []}
        models_before = len(self.model.replies)
        agent_id, snapshot, start, epoch = self.create("hello 0")
        facts["agent"] = {"id": agent_id, "session_id": snapshot.get("session_id"),
                          "created_status": snapshot.get("status")}
        with AgentStream(self.daemon.url, agent_id, last_event_id=0) as stream:
            try:
                first = self.first_turn(stream, start, epoch, models_before)
                facts["agent"]["first_turn"] = round(first["turn_end"], 4)
                containers = agent_containers(self.daemon.instance, agent_id)
                processes = container_processes(containers[0]) if containers else []
                facts["agent"]["containers_before"] = containers
                facts["agent"]["processes_before"] = processes
                for i in range(runs + 1):  # round 0 is the warm-up
                    print(f"agent: round {i}/{runs}…", file=sys.stderr, flush=True)
                    prompt = f"hello {i + 1}"
                    true_wall = self.podman_true()
                    claude_wall, _ = self.bench.podman_run()
                    cold = self.cold_run(prompt)
                    warm = self.warm_turn(stream, agent_id, prompt)
                    new = self.cold_agent(prompt)
                    if not i:
                        continue
                    for key, value in (
                            ("podman_true", true_wall), ("podman_claude", claude_wall),
                            ("post_run", cold["wall"]),
                            ("post_run_reply_to_answer", cold["reply_to_answer"]),
                            ("agent_first_turn", new["turn"]["turn_end"]),
                            ("agent_first_output", new["turn"]["first_output"]),
                            ("agent_delete", new["delete"]["seconds"]),
                            ("warm_turn", warm["turn_end"]),
                            ("warm_first_output", warm["first_output"]),
                            ("warm_first_reply_text", warm["first_reply_text"]),
                            ("warm_accepted", warm["accepted"]),
                            ("warm_reply_to_turn_end", warm["reply_to_turn_end"])):
                        if value is not None:
                            samples[key].append(value)
                    for turn, kind in ((warm, "warm"), (new["turn"], "first")):
                        name = f"{kind}: {turn['first_output_type']}"
                        facts["first_output_types"][name] = \
                            facts["first_output_types"].get(name, 0) + 1
                        facts["stderr_errors"] += turn["errors"]
                        facts["stray_events"] += turn["stray"]
                    facts["model_calls_per_warm_turn"].append(warm["model_calls"])
                    facts["model_calls_per_first_turn"].append(new["turn"]["model_calls"])
                    facts["deletes"].append({k: v for k, v in new["delete"].items()
                                             if k != "seconds"})
                    facts.setdefault("first_turn_by_at", []).append(
                        new["turn"].get("turn_end_by_at"))
                    facts["warm_usage_last"] = warm.get("usage")
                containers_after = agent_containers(self.daemon.instance, agent_id)
                facts["agent"]["containers_after"] = containers_after
                facts["agent"]["processes_after"] = \
                    container_processes(containers_after[0]) if containers_after else []
                facts["agent"]["snapshot_after"] = self.client.get(f"/agents/{agent_id}").json()
            finally:
                facts["agent"]["delete"] = self.delete(agent_id, stream)
        return samples, facts

    def close(self) -> None:
        """Agents this bench created and did not delete (after an error)."""
        for agent_id in list(self.stray_agents):
            try:
                self.client.delete(f"/agents/{agent_id}")
            except httpx.HTTPError:
                pass
        self.client.close()


def agent_checks(facts: dict, runs: int) -> list[str]:
    """What the run says about the contract, as report lines (problems flagged)."""
    a = facts["agent"]
    lines = []
    same_container = a["containers_before"] == a["containers_after"] and \
        len(a["containers_before"]) == 1
    lines.append(f"- long-lived agent: one container throughout: "
                 f"{'yes' if same_container else 'NO'} "
                 f"({', '.join(c[:12] for c in a['containers_before'])} → "
                 f"{', '.join(c[:12] for c in a['containers_after'])})")
    before, after = cli_pids(a["processes_before"]), cli_pids(a["processes_after"])
    lines.append(f"- its CLI process: host pid {', '.join(before) or '?'} before the rounds, "
                 f"{', '.join(after) or '?'} after: "
                 f"{'unchanged' if before and before == after else 'CHANGED or unknown'}; "
                 f"processes in its container after: {len(a['processes_after'])}")
    snap = a.get("snapshot_after") or {}
    expected = runs + 2  # its first turn, the warm-up turn, the measured turns
    lines.append(f"- snapshot after the turns: status `{snap.get('status')}`, turns_completed "
                 f"{snap.get('turns_completed')} (expected {expected})"
                 + ("" if snap.get("turns_completed") == expected else " — MISMATCH"))
    calls = facts["model_calls_per_warm_turn"] + facts["model_calls_per_first_turn"]
    lines.append(f"- model calls per turn: {sorted(set(calls))}")
    lines.append("- first `output` event of a turn, by stream-json type: " + ", ".join(
        f"{k} ×{v}" for k, v in sorted(facts["first_output_types"].items())))
    if facts["stderr_errors"]:
        lines.append(f"- `error` events (stderr) during turns: {len(facts['stderr_errors'])}, "
                     f"e.g. `{facts['stderr_errors'][0][:200]}`")
    if facts["stray_events"]:
        lines.append(f"- events of another turn seen during a turn: {facts['stray_events']}")
    deletes = facts["deletes"] + [a["delete"]]
    bad = [d for d in deletes if d.get("status") != 204 or d.get("after") != 404
           or d.get("containers_left") or not d.get("stream_ended")
           or (d.get("stream_after_delete") or [])[-1:] != ["closed"]]
    tails = sorted({" → ".join(d.get("stream_after_delete") or ["(nothing)"]) for d in deletes})
    lines.append(f"- DELETE: {len(deletes)} agents, {len(deletes) - len(bad)} with 204, then 404, "
                 f"no container left and the stream ended by `closed`; stream after DELETE: "
                 + "; ".join(f"`{t}`" for t in tails))
    for d in bad[:3]:
        lines.append(f"  - PROBLEM: {d}")
    by_at = [v for v in facts.get("first_turn_by_at") or [] if v is not None]
    if by_at:
        lines.append(f"- agent cold start by the daemon's `at` stamp of `turn_end` (vs the "
                     f"SSE receipt): median {statistics.median(by_at):.3f} s")
    return lines


def agent_markdown(report: dict) -> str:
    s = report["stats"]

    def fmt(value: float) -> str:
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"

    def row(label: str, key: str, ratio: str = "") -> str:
        stats = s.get(key)
        if not stats:
            return f"| {label} | – | – | {ratio} |"
        return f"| {label} | {fmt(stats['median'])} | {fmt(stats['p90'])} | {ratio} |"

    def ratio(a: str, b: str, of: str) -> str:
        if not s.get(a) or not s.get(b):
            return ""
        return f"{s[a]['median'] / s[b]['median']:.2f}× {of}"

    n = report["runs"]
    warm_cold = report["ratios"]["warm_over_cold"]
    lines = [
        f"| measurement (n={n} each, interleaved, after a warm-up round) | median | p90 "
        "| ratio of medians |",
        "|---|---|---|---|",
        row(f"`podman run --rm {report['image']} true` (baseline: container only)",
            "podman_true"),
        row("`podman run … claude -p hello` (overhead's baseline: container + CLI)",
            "podman_claude", ratio("podman_claude", "podman_true", "podman true")),
        row("**cold**: `POST /run` (sync), one run", "post_run",
            ratio("post_run", "podman_true", "podman true")),
        row("cold: model reply sent → `POST /run` answer", "post_run_reply_to_answer"),
        row("agent cold start: `POST /agents {prompt}` → its `turn_end`", "agent_first_turn",
            ratio("agent_first_turn", "post_run", "POST /run")),
        row("agent cold start: `POST /agents` → first `output`", "agent_first_output"),
        row("`DELETE /agents/{id}` → 204", "agent_delete"),
        row("**warm**: one turn, `POST /agents/{id}/send` → `turn_end`", "warm_turn",
            f"**{warm_cold:.3f}× POST /run**" if warm_cold is not None else ""),
        row("warm: `send` → first `output` event", "warm_first_output"),
        row("warm: `send` → first `output` with the reply text", "warm_first_reply_text"),
        row("warm: `send` → 202", "warm_accepted"),
        row("warm: model reply sent → `turn_end`", "warm_reply_to_turn_end"),
    ]
    if warm_cold is not None:
        lines += ["", f"Warm turn / cold run (medians): **{warm_cold:.3f}** — a warm turn takes "
                      f"{1 / warm_cold:.1f}× less time than a `POST /run`; "
                      f"warm turn / `podman run … true`: "
                      f"{report['ratios']['warm_over_podman_true']:.3f}."]
    lines += ["", "Checks:", *agent_checks(report["facts"], n)]
    info = ", ".join(f"{k} {v}" for k, v in report["machine"].items())
    return "\n".join([
        *lines, "",
        "One daemon (auth off, the scripted model), one long-lived agent created with a "
        "prompt (its first turn not counted), its SSE stream (`Last-Event-ID: 0`) kept open "
        "across turns. Each round, in this order: `podman run --rm <image> true`; overhead's "
        "hardened `podman run … claude -p hello`; `POST /run {\"prompt\": \"hello <n>\"}`; a "
        "turn `hello <n>` on the long-lived agent (send → its `turn_end`, times at the SSE "
        "event's receipt); a new agent `POST /agents {\"prompt\": \"hello <n>\"}` → its "
        "first `turn_end` (its own stream, `Last-Event-ID: 0`), then `DELETE` (timed: stdin "
        "closed, up to 5 s, SIGTERM…). Round 0 is discarded. \"model reply sent\": when the "
        "scripted model had sent its whole reply.",
        f"Load average before: {' '.join(report['loadavg_before'])}, after: "
        f"{' '.join(report['loadavg_after'])}.",
        f"Command: `{report['command']}`", f"Machine: {info}"])


def agent(args) -> int:
    """`agent`: a persistent agent's warm turn vs a cold `POST /run` vs `podman run true`."""
    model = TimedModel()
    model.start()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stromboli-agent-"))
    daemon = Daemon(workdir / "state", daemon_env(model, args.image, 0))
    report: dict = {"command": shlex.join(sys.orig_argv), "machine": machine_info(args.image),
                    "image": args.image, "runs": args.runs,
                    "loadavg_before": open("/proc/loadavg").read().split()[:3]}
    bench = None
    try:
        daemon.start()
        bench = AgentBench(args, model, daemon, workdir)
        samples, facts = bench.run()
        report["stats"] = {k: summary(v) for k, v in samples.items() if v}
        report["facts"] = facts
        stats = report["stats"]
        report["ratios"] = {
            "warm_over_cold": stats["warm_turn"]["median"] / stats["post_run"]["median"],
            "warm_over_podman_true":
                stats["warm_turn"]["median"] / stats["podman_true"]["median"],
            "agent_cold_start_over_cold":
                stats["agent_first_turn"]["median"] / stats["post_run"]["median"]}
        report["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    except Exception:
        sys.stderr.write(f"daemon log (tail):\n{daemon.log()[-4000:]}\n")
        if daemon.proc is not None and daemon.proc.poll() is not None:
            sys.stderr.write(f"the daemon (pid {daemon.proc.pid}) exited with "
                             f"{daemon.proc.returncode} before the bench stopped it\n")
        raise
    finally:
        if bench is not None:
            bench.close()
        stop_daemon(daemon)
        leftover = instance_containers(daemon.instance) + our_containers(workdir)
        if leftover:
            report["containers_left_after_stop"] = len(set(leftover))
            subprocess.run(["podman", "rm", "-f", "-t", "0", *set(leftover)],
                           capture_output=True, timeout=120)
        remove_workdir(workdir)
    print(json.dumps({**report, "samples": samples}, indent=2) if args.json
          else agent_markdown(report))
    return 0


# -- followers / fanout: an agent's stream with many clients (issue 18, items 3 and 5) ------

FOLLOWERS_RCVBUF = 4096  # receive buffer of a stalled follower (it never reads)
FOLLOWERS_CLOSED = 5  # served connections left (probes, …) once the followers are dropped


def served_connections(port: int) -> int:
    """Established TCP connections whose local port is `port`: the daemon's side of them."""
    count = 0
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            count += int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01"
    return count


def stream_request(daemon: Daemon, agent_id: str) -> bytes:
    return (f"GET /agents/{agent_id}/stream HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n"
            "Accept: text/event-stream\r\n\r\n").encode()


def create_agent(daemon: Daemon, body: dict) -> str:
    response = httpx.post(daemon.url + "/agents", json=body, timeout=AGENT_TIMEOUT)
    if response.status_code != 201:
        raise RuntimeError(f"POST /agents → {response.status_code}: {response.text[:500]}")
    return response.json()["id"]


def wait_for(predicate, timeout: float, interval: float = 0.2) -> float | None:
    """Seconds until predicate() held, or None if it did not within timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    return None


def followers_bench(args, model: ScriptedModel, workdir: pathlib.Path) -> dict:
    """--followers clients that never read follow an agent printing --lines lines of 1 MiB
    of control characters: daemon RSS and /health while they are connected, whether and
    when the daemon drops them, and RSS once they are closed."""
    env = {**daemon_env(model, args.image, 0),
           "STROMBOLI_AGENT_MAX_FOLLOWERS": str(args.followers + 10)}
    daemon = Daemon(workdir / "followers", env)
    flood = ("sleep 5; i=0; while [ $i -lt %d ]; do head -c 1048575 /dev/zero | "
             "tr '\\0' '\\1'; echo; i=$((i+1)); done; echo flood-done" % args.lines)
    result: dict = {"followers": args.followers, "lines": args.lines, "command": flood}
    stalled: list[socket.socket] = []
    try:
        daemon.start()
        agent_id = create_agent(daemon, {"podman": {"lifecycle": {"post_start": [flood]}}})
        time.sleep(1)
        with Sampler(daemon.proc.pid, daemon.url) as sampler:
            start = time.monotonic()
            result["rss_before"] = read_rss(daemon.proc.pid)
            request = stream_request(daemon, agent_id)
            for _ in range(args.followers):
                follower = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                stalled.append(follower)
                follower.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FOLLOWERS_RCVBUF)
                follower.connect(("127.0.0.1", daemon.port))
                follower.sendall(request)
            result["served"] = wait_for(
                lambda: served_connections(daemon.port) >= args.followers, 10) is not None
            result["dropped_after"] = wait_for(
                lambda: served_connections(daemon.port) < FOLLOWERS_CLOSED, args.timeout)
            result["still_served"] = served_connections(daemon.port)
            with AgentStream(daemon.url, agent_id, last_event_id=args.lines) as stream:
                try:  # the flood's last line is event lines + 1
                    result["flood_done"] = stream.next(start + args.timeout)["data"].get(
                        "content") == "flood-done"
                except RuntimeError as exc:
                    result["flood_done"] = f"not seen: {exc}"
            result["flood_seconds"] = time.monotonic() - start
            result.update(sampler.window(start, time.monotonic()))
            for follower in stalled:
                follower.close()
            stalled.clear()
            time.sleep(3)
            result["rss_after_close"] = read_rss(daemon.proc.pid)
            httpx.delete(f"{daemon.url}/agents/{agent_id}", timeout=AGENT_TIMEOUT)
    except Exception:
        sys.stderr.write(f"daemon log (tail):\n{daemon.log()[-4000:]}\n")
        raise
    finally:
        for follower in stalled:
            follower.close()
        stop_daemon(daemon)
        leftover = our_containers(workdir)
        if leftover:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *leftover],
                           capture_output=True, timeout=120)
    return result


FANOUT_RECONNECT = 1.0  # seconds a dropped follower waits before it follows again


class FanoutClient:
    """One follower of the fan-out: it reads all it gets and, when the daemon drops it
    before the `turn_end` (it fell behind), follows again FANOUT_RECONNECT seconds later
    from the oldest kept event, as the `stromboli` client does (after 1 s)."""

    def __init__(self, port: int, request: bytes):
        self.port, self.request = port, request
        self.status: int | None = None
        self.bytes = self.connections = self.refused = 0
        self.first_output: float | None = None  # time.monotonic: one clock for all processes
        self.turn_end: float | None = None
        self.sock: socket.socket | None = None
        self._tail = b""

    def connect(self) -> socket.socket:
        self.connections += 1
        self.sock = socket.create_connection(("127.0.0.1", self.port))
        self.sock.sendall(self.request)
        self.sock.setblocking(False)
        self.status, self._tail = None, b""
        return self.sock

    def received(self, data: bytes) -> bool:
        """→ whether to read on (False: the connection is over)."""
        if self.status is None and data.startswith(b"HTTP/1.1 "):
            self.status = int(data[9:12])
        seen = self._tail + data
        self.bytes += len(data)
        if self.first_output is None and b"event: output" in seen:
            self.first_output = time.monotonic()
        if self.turn_end is None and b"event: turn_end" in seen:
            self.turn_end = time.monotonic()
        self._tail = seen[-64:]
        self.refused += self.status == 429
        return bool(data) and self.turn_end is None and self.status == 200

    def result(self) -> dict:
        return {"bytes": self.bytes, "connections": self.connections, "refused": self.refused,
                "first_output": self.first_output, "turn_end": self.turn_end}


def fanout_reader(port: int, count: int, timeout: float, pipe) -> None:
    """In its own process (the bench's threads must not slow the readers): once the request
    comes through the pipe, `count` FanoutClients follow the stream. Sends "connected",
    then each client's result."""
    import selectors
    request = pipe.recv()
    clients = [FanoutClient(port, request) for _ in range(count)]
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.connect(), selectors.EVENT_READ, client)
    pipe.send("connected")
    deadline, open_ = time.monotonic() + timeout, count
    waiting: list[tuple[float, FanoutClient]] = []  # (when, client): dropped ones
    while open_ and time.monotonic() < deadline:
        now = time.monotonic()
        for due, client in [w for w in waiting if w[0] <= now]:
            waiting.remove((due, client))
            selector.register(client.connect(), selectors.EVENT_READ, client)
        for key, _ in selector.select(0.1 if waiting else 1.0):
            client = key.data
            try:
                data = key.fileobj.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if client.received(data):
                continue
            selector.unregister(key.fileobj)
            key.fileobj.close()
            if client.turn_end is None:  # dropped, or refused while its last one was let go
                waiting.append((time.monotonic() + FANOUT_RECONNECT, client))
            else:
                open_ -= 1
    pipe.send([client.result() for client in clients])


def fanout_bench(args, model: ScriptedModel, workdir: pathlib.Path) -> dict:
    """--followers clients read an agent's stream while it prints --megabytes MB in
    --line-bytes lines before its first turn: daemon CPU, the turn's time, /health."""
    import multiprocessing
    env = {**daemon_env(model, args.image, 0),
           "STROMBOLI_AGENT_MAX_FOLLOWERS": str(args.max_followers or args.followers)}
    daemon = Daemon(workdir / "fanout", env)
    nbytes = args.megabytes * 1_000_000
    # From a hook, before the CLI starts: the CLI makes the container's stdout non-blocking,
    # which a relay of a turn's own output would have to survive.
    flood = f"sleep 5; yes {'a' * (args.line_bytes - 1)} | head -c {nbytes}; echo flood-done"
    result: dict = {"followers": args.followers, "bytes": nbytes,
                    "line_bytes": args.line_bytes, "hook": flood,
                    "max_followers": env["STROMBOLI_AGENT_MAX_FOLLOWERS"]}
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    reader = context.Process(target=fanout_reader, daemon=True,
                             args=(daemon.port, args.followers, args.timeout + 30, child))
    reader.start()  # it imports this module while the daemon starts
    try:
        daemon.start()
        with Sampler(daemon.proc.pid, daemon.url) as sampler:
            time.sleep(1)
            cpu_before, start = process_cpu(daemon.proc.pid), time.monotonic()
            agent_id = create_agent(daemon, {"prompt": "hello", "podman": {
                "lifecycle": {"post_start": [flood]}, "timeout": f"{args.timeout}s"}})
            parent.send(stream_request(daemon, agent_id))
            if not parent.poll(5) or parent.recv() != "connected":
                raise RuntimeError("the reader process did not connect its clients in 5 s")
            if not parent.poll(args.timeout + 60):
                raise RuntimeError("the readers did not finish")
            readers = parent.recv()
            end = time.monotonic()
            result["daemon_cpu"] = process_cpu(daemon.proc.pid) - cpu_before
            result.update(sampler.window(start, end))
        turns = sorted(r["turn_end"] - r["first_output"] for r in readers
                       if r["turn_end"] is not None and r["first_output"] is not None)
        result.update(
            got_turn_end=len(turns), refused=sum(r["refused"] for r in readers),
            dropped=sum(r["connections"] - 1 - r["refused"] for r in readers),
            dropped_followers=sum(r["connections"] > 1 + r["refused"] for r in readers),
            turn_first=turns[0] if turns else None,
            turn_median=statistics.median(turns) if turns else None,
            turn_last=turns[-1] if turns else None,
            mb_read=sum(r["bytes"] for r in readers) / 1e6,
            snapshot=httpx.get(f"{daemon.url}/agents/{agent_id}").json())
        httpx.delete(f"{daemon.url}/agents/{agent_id}", timeout=AGENT_TIMEOUT)
    except Exception:
        sys.stderr.write(f"daemon log (tail):\n{daemon.log()[-4000:]}\n")
        raise
    finally:
        if reader.is_alive():
            reader.kill()
        stop_daemon(daemon)
        leftover = our_containers(workdir)
        if leftover:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *leftover],
                           capture_output=True, timeout=120)
    return result


def followers_markdown(report: dict) -> str:
    def mb(value) -> str:
        return "–" if value is None else f"{value / MiB:.0f} MiB"

    def secs(value) -> str:
        if value is None:
            return "–"
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"

    lines = ["| measurement | value |", "|---|---|"]
    if (s := report.get("stalled")) is not None:
        lines += [
            f"| stalled followers (never read), 1 MiB lines of control characters | "
            f"{s['followers']} followers, {s['lines']} lines |",
            f"| daemon RSS before → peak (growth) | {mb(s['rss_before'])} → "
            f"{mb(s['rss_peak'])} (+{mb(s['rss_peak'] - s['rss_before'])}) |",
            f"| daemon RSS once they were closed (growth) | {mb(s['rss_after_close'])} "
            f"(+{mb(s['rss_after_close'] - s['rss_before'])}) |",
            f"| /health p50 / max latency, longest time without an answer | "
            f"{secs(s['health_median'])} / {secs(s['health_max'])}, "
            f"{secs(s['health_longest_silence'])} |",
            f"| /health probes failed or > 1 s | {s['health_bad']} of {s['health_probes']} |",
            f"| followers dropped by the daemon | " + (
                f"all, {secs(s['dropped_after'])} after they connected"
                if s["dropped_after"] is not None else
                f"no: {s['still_served']} still served after {report['timeout']} s") + " |",
            f"| the flood's last line replayed, checked once they were dropped | "
            f"{secs(s['flood_seconds'])} "
            f"({'ok' if s['flood_done'] is True else s['flood_done']}) |"]
    if (f := report.get("fanout")) is not None:
        lines += [
            f"| fan-out: followers reading, output before the turn's answer | "
            f"{f['followers']} followers (max_followers {f['max_followers']}), "
            f"{f['bytes'] / 1e6:.0f} MB in {f['line_bytes']}-byte lines |",
            f"| daemon CPU, agent created → every follower has the `turn_end` | "
            f"{f['daemon_cpu']:.1f} s |",
            f"| the turn (first output → `turn_end` at a follower): first / median / last | "
            f"{secs(f['turn_first'])} / {secs(f['turn_median'])} / {secs(f['turn_last'])} |",
            f"| followers that got the `turn_end`; dropped for falling behind (followed "
            f"again); 429s | {f['got_turn_end']}; {f['dropped']} times "
            f"({f['dropped_followers']} followers); {f['refused']} |",
            f"| /health p50 / max latency meanwhile | {secs(f['health_median'])} / "
            f"{secs(f['health_max'])} ({f['health_bad']} of {f['health_probes']} failed or "
            "> 1 s) |",
            f"| read by all followers | {f['mb_read']:.0f} MB |"]
    info = ", ".join(f"{k} {v}" for k, v in report["machine"].items())
    return "\n".join([*lines, "", f"Daemon: `{report['stromboli']}`",
                      f"Command: `{report['command']}`", f"Machine: {info}",
                      f"Load average before: {' '.join(report['loadavg_before'])}"])


def followers_report(args) -> dict:
    return {"command": shlex.join(sys.orig_argv), "machine": machine_info(args.image),
            "stromboli": str(test_stromboli.STROMBOLI), "timeout": args.timeout,
            "loadavg_before": open("/proc/loadavg").read().split()[:3]}


def agent_stream_mode(args, name: str, bench) -> int:
    """Run one agent-stream bench (`followers` or `fanout`) with its own model server and
    work folder, and print its report."""
    model = ScriptedModel()
    model.start()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"stromboli-{name}-"))
    report = followers_report(args)
    try:
        report[name] = bench(args, model, workdir)
    finally:
        remove_workdir(workdir)
    print(json.dumps(report, indent=2) if args.json else followers_markdown(report))
    return 0


def followers(args) -> int:
    """`followers`: clients of an agent's stream that never read, during a flood."""
    return agent_stream_mode(args, "stalled", followers_bench)


def fanout(args) -> int:
    """`fanout`: many clients reading an agent's stream while a turn floods it."""
    return agent_stream_mode(args, "fanout", fanout_bench)


# -- command line ---------------------------------------------------------------------

def daemon_env(model: ScriptedModel, image: str, concurrency: int) -> dict[str, str]:
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        name, tag = image, "latest"
    return {**agent_env(model), "STROMBOLI_AGENT_IMAGE": name, "STROMBOLI_AGENT_IMAGE_TAG": tag,
            "STROMBOLI_MAX_CONCURRENT_RUNS": str(max(4, concurrency))}


def overhead(args) -> int:
    """The default mode: stromboli vs plain `podman run`."""
    model = TimedModel()
    model.start()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stromboli-bench-"))
    daemon = Daemon(workdir / "state", daemon_env(model, args.image, args.concurrency))
    try:
        daemon.start()
        bench = Bench(model, daemon, args.image, workdir)
        report = {"command": shlex.join(sys.orig_argv), "machine": machine_info(args.image),
                  "baseline_flags": BASELINE, "concurrency": args.concurrency}
        raw = {"sequential": bench.sequential(args.runs)}
        if args.concurrency:
            raw["concurrent"] = bench.concurrent(args.concurrency)
        for section, samples in raw.items():
            report[section] = {key: summary(values) for key, values in samples.items()}
    except Exception:
        sys.stderr.write(f"daemon log (tail):\n{daemon.log()[-4000:]}\n")
        raise
    finally:
        daemon.stop()
        remove_workdir(workdir)
    print(json.dumps({**report, "samples": raw}, indent=2) if args.json else markdown(report))
    return 0


def flood(args) -> int:
    """`flood`: daemon RSS and /health latency while an agent floods its output."""
    model = ScriptedModel()
    model.start()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stromboli-flood-"))
    bench = Flood(args, model, daemon_env(model, args.image, 0), workdir)
    report = {"command": shlex.join(sys.orig_argv), "machine": machine_info(args.image),
              "megabytes": args.megabytes, "timeout": args.timeout,
              "slow_readers": args.slow_readers, "variants": {}}
    try:
        for variant in args.variants:
            print(f"flood: {variant} ({args.megabytes} MB)…", file=sys.stderr, flush=True)
            report["variants"][variant] = bench.variant(variant)
    finally:
        remove_workdir(workdir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for v in report["variants"].values():
            v.pop("samples_live", None), v.pop("samples_stored", None)
        print(flood_markdown(report))
    return 0


def common_options(mode_parser: argparse.ArgumentParser) -> None:
    """--image and --json, also accepted after the mode (SUPPRESS: given before it, they are
    not reset)."""
    mode_parser.add_argument("--image", default=argparse.SUPPRESS,
                             help="agent image (default: %s)" % IMAGE)
    mode_parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                             help="print JSON instead of markdown")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs per side (≥ 2)")
    parser.add_argument("--image", default=IMAGE, help="agent image (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="simultaneous runs for the concurrency test; 0 skips it")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--stromboli", type=pathlib.Path, default=test_stromboli.STROMBOLI,
                        help="the stromboli.py the daemon runs, e.g. another branch's, for "
                             "before/after figures (default: %(default)s)")
    modes = parser.add_subparsers(
        dest="mode", metavar="{flood,load,rps,slowloris,soak,agent,followers,fanout}",
        help="without one: stromboli vs plain `podman run`")
    flood_parser = modes.add_parser(
        "flood", help="daemon RSS and /health latency during an agent output flood",
        description="Daemon RSS and /health latency while an agent writes --megabytes of "
                    "output (in 100-byte lines, and as one line), then with non-reading "
                    "replay clients of that run.")
    flood_parser.add_argument("--megabytes", type=int, default=100,
                              help="output the agent writes, in MB of 10^6 bytes "
                                   "(default: %(default)s)")
    flood_parser.add_argument("--slow-readers", type=int, default=8,
                              help="non-reading SSE replays of the flooded run; 0 skips them "
                                   "(default: %(default)s)")
    flood_parser.add_argument("--timeout", type=int, default=300,
                              help="run timeout in seconds, passed as podman.timeout "
                                   "(default: %(default)s)")
    flood_parser.add_argument("--variants", default=",".join(FLOOD_VARIANTS),
                              help="comma list of %(default)s")
    common_options(flood_parser)
    load_parser = modes.add_parser(
        "load", help="mixed requests at a fixed rate: errors, latency, daemon RSS and fds",
        description="Open-loop load from loopback against a real daemon with auth on: "
                    "GET /health, /jobs, /jobs/{id}, /sessions in turn and a small POST /run "
                    "now and then, launched at --rate per second whatever the answers do.")
    load_parser.add_argument("--requests", type=int, default=10000,
                             help="requests to send (default: %(default)s; 1000 is a quick run)")
    load_parser.add_argument("--rate", type=float, default=500,
                             help="requests launched per second (default: %(default)s)")
    load_parser.add_argument("--concurrency", type=int, default=256,
                             help="requests in flight at most (default: %(default)s)")
    load_parser.add_argument("--run-every", type=int, default=200,
                             help="one POST /run in every N requests; 0: none "
                                  "(default: %(default)s)")
    load_parser.add_argument("--jobs", type=int, default=4,
                             help="async jobs created first, for GET /jobs/{id} "
                                  "(default: %(default)s)")
    load_parser.add_argument("--max-seconds", type=float, default=120,
                             help="hard cap on the load phase (default: %(default)s)")
    common_options(load_parser)
    rps_parser = modes.add_parser(
        "rps", help="requests/s (wrk) of the daemon's cheap routes next to bare aiohttp, and "
                    "POST /run under a /health flood",
        description="wrk against a bare aiohttp handler and the daemon's GET /health, "
                    "GET /jobs/{id} (JWT and static token) and GET /jobs (JWT), in one run, "
                    "with the ratios to the bare handler; then the median wall time of "
                    "sequential POST /run alone and while wrk floods /health. Needs wrk.")
    rps_parser.add_argument("--duration", type=int, default=5,
                            help="seconds of wrk per target (default: %(default)s)")
    rps_parser.add_argument("--connections", type=int, default=32,
                            help="wrk connections, -c (default: %(default)s)")
    rps_parser.add_argument("--threads", type=int, default=2,
                            help="wrk threads, -t (default: %(default)s)")
    rps_parser.add_argument("--warmup", type=int, default=1,
                            help="seconds of discarded wrk per target first; 0: none "
                                 "(default: %(default)s)")
    rps_parser.add_argument("--rounds", type=int, default=1,
                            help="wrk runs per target, in turn; the median is reported "
                                 "(default: %(default)s)")
    rps_parser.add_argument("--runs", dest="rps_runs", metavar="N", type=int, default=5,
                            help="sequential POST /run per side (alone, under the /health "
                                 "flood) and round; 0 skips the flood part "
                                 "(default: %(default)s)")
    rps_parser.add_argument("--flood-rounds", type=int, default=1,
                            help="(alone, flooded) series pairs, in ABBA order "
                                 "(default: %(default)s)")
    common_options(rps_parser)
    slow_parser = modes.add_parser(
        "slowloris", help="half-sent request lines held on many connections: /health, runs, "
                          "RSS, fds, connection metrics and the daemon log",
        description="A daemon with default server settings gets --connections loopback "
                    "connections that send half a request line and hold for --hold seconds "
                    "(re-opened when closed), while GET /health is probed every 100 ms from a "
                    "fresh client, RSS and fds are sampled and 3 POST /run are timed (and 3 "
                    "before the attack).")
    slow_parser.add_argument("--connections", type=int, default=1100,
                             help="attack connections (default: %(default)s)")
    slow_parser.add_argument("--hold", type=float, default=30,
                             help="seconds the attack lasts (default: %(default)s)")
    slow_parser.add_argument("--daemon-nofile", type=int, default=1024,
                             help="soft RLIMIT_NOFILE the daemon is started with (systemd's "
                                  "default; it raises its own when allowed); 0: this "
                                  "process's (default: %(default)s)")
    common_options(slow_parser)
    soak_parser = modes.add_parser(
        "soak", help="kill -9 the daemon at random points during a stream of async jobs: "
                     "jobs lost, final statuses, orphan containers",
        description="--kills times: start the daemon on one state dir, submit "
                    "--jobs-per-round async jobs, SIGKILL it after a random 0.5-4 s; then "
                    "start it a last time, wait for every job to end, stop it gracefully and "
                    "count the jobs lost and the containers left behind.")
    soak_parser.add_argument("--kills", type=int, default=20,
                             help="daemon SIGKILLs (default: %(default)s)")
    soak_parser.add_argument("--jobs-per-round", type=int, default=3,
                             help="async jobs submitted after each start (default: %(default)s)")
    soak_parser.add_argument("--seed", type=int, default=13,
                             help="seed of the delays and prompts (default: %(default)s)")
    soak_parser.add_argument("--final-timeout", type=float, default=180,
                             help="seconds the last daemon gets to end every job "
                                  "(default: %(default)s)")
    common_options(soak_parser)
    agent_parser = modes.add_parser(
        "agent", help="a persistent agent's warm turn vs a cold POST /run vs podman run true",
        description="In one run, against one daemon and the scripted model: the latency of "
                    "a turn on a live persistent agent (POST /agents/{id}/send → its turn_end "
                    "on the SSE stream kept open; and to its first output event), of a sync "
                    "POST /run (a container and a CLI per run), of a new agent's first turn "
                    "(POST /agents with a prompt → turn_end) and of `podman run --rm <image> "
                    "true`, --runs times each, interleaved, after a discarded warm-up round.")
    agent_parser.add_argument("--runs", type=int, default=argparse.SUPPRESS,
                              help="measured turns/runs per measurement, ≥ 2 (default: 10)")
    common_options(agent_parser)
    followers_parser = modes.add_parser(
        "followers", help="clients of an agent's stream that never read, during a flood: "
                          "daemon RSS, /health, whether they are dropped",
        description="--followers clients open GET /agents/{id}/stream and never read "
                    "(receive buffer 4 KiB) while the agent prints --lines lines of 1 MiB "
                    "of control characters (6 MiB events in JSON), from a post_start hook.")
    followers_parser.add_argument("--followers", type=int, default=200,
                                  help="stalled followers (default: %(default)s)")
    followers_parser.add_argument("--lines", type=int, default=30,
                                  help="1 MiB lines the agent prints (default: %(default)s)")
    followers_parser.add_argument("--timeout", type=int, default=90,
                                  help="seconds to wait for the drop and for the flood's end "
                                       "(default: %(default)s)")
    common_options(followers_parser)
    fanout_parser = modes.add_parser(
        "fanout", help="many clients reading an agent's stream during a flooding turn: "
                       "daemon CPU, the turn's time, /health",
        description="--followers clients read GET /agents/{id}/stream (in a process of "
                    "their own) while one turn's Bash tool writes --megabytes MB in "
                    "--line-bytes lines to the agent's output (through a FIFO a hook "
                    "copies to the container's stdout).")
    fanout_parser.add_argument("--followers", type=int, default=100,
                               help="reading followers (default: %(default)s)")
    fanout_parser.add_argument("--max-followers", type=int, default=0,
                               help="STROMBOLI_AGENT_MAX_FOLLOWERS of the daemon; 0: "
                                    "--followers (default: %(default)s)")
    fanout_parser.add_argument("--megabytes", type=int, default=50,
                               help="output of the turn, in MB of 10^6 bytes "
                                    "(default: %(default)s)")
    fanout_parser.add_argument("--line-bytes", type=int, default=1000,
                               help="bytes per line, newline included (default: %(default)s)")
    fanout_parser.add_argument("--timeout", type=int, default=300,
                               help="seconds the turn may take (default: %(default)s)")
    common_options(fanout_parser)
    args = parser.parse_args()
    test_stromboli.STROMBOLI = args.stromboli.resolve()
    if args.mode == "followers":
        if args.followers < 1 or args.lines < 3 or args.timeout < 10:
            parser.error("followers: --followers ≥ 1, --lines ≥ 3, --timeout ≥ 10")
        return followers(args)
    if args.mode == "fanout":
        if args.followers < 1 or args.megabytes < 1 or not 2 <= args.line_bytes <= 65536 \
                or args.timeout < 10 or args.max_followers < 0:
            parser.error("fanout: --followers, --megabytes ≥ 1; 2 ≤ --line-bytes ≤ 65536; "
                         "--timeout ≥ 10; --max-followers ≥ 0")
        return fanout(args)
    if args.mode == "agent":
        if args.runs < 2:
            parser.error("agent: --runs must be at least 2")
        return agent(args)
    if args.mode == "soak":
        if args.kills < 1 or args.jobs_per_round < 1 or args.final_timeout <= 0:
            parser.error("soak: --kills, --jobs-per-round ≥ 1; --final-timeout > 0")
        return soak(args)
    if args.mode == "slowloris":
        if args.connections < 1 or args.hold < 4 or args.daemon_nofile < 0:
            parser.error("slowloris: --connections ≥ 1, --hold ≥ 4, --daemon-nofile ≥ 0")
        return slowloris(args)
    if args.mode == "rps":
        if args.duration < 1 or args.threads < 1 or args.connections < args.threads \
                or args.warmup < 0 or args.rounds < 1 or args.rps_runs < 0 \
                or args.flood_rounds < 1:
            parser.error("rps: --duration, --threads, --rounds, --flood-rounds ≥ 1; "
                         "--connections ≥ --threads; --warmup, --runs ≥ 0")
        return rps(args)
    if args.mode == "load":
        if args.requests < 1 or args.rate <= 0 or args.concurrency < 1 \
                or args.max_seconds <= 0 or args.run_every < 0 or args.jobs < 1:
            parser.error("load: --requests, --concurrency, --jobs ≥ 1; --rate, --max-seconds "
                         "> 0; --run-every ≥ 0")
        return load(args)
    if args.mode == "flood":
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not args.variants or set(args.variants) - set(FLOOD_VARIANTS):
            parser.error(f"--variants: choose among {', '.join(FLOOD_VARIANTS)}")
        if args.megabytes < 1 or args.slow_readers < 0 or args.timeout < 1:
            parser.error("--megabytes and --timeout must be ≥ 1, --slow-readers ≥ 0")
        return flood(args)
    if args.runs < 2:
        parser.error("--runs must be at least 2")
    return overhead(args)


if __name__ == "__main__":
    sys.exit(main())
