"""Benchmark: what stromboli costs on top of a plain `podman run` of the Claude Code CLI.

Everything runs in one process, in one go, so the machine's noise hits both sides alike.
The Anthropic API is stood in for by the scripted model server of test_stromboli.py
(prompt "hello" → one streamed text reply); the daemon is a real `stromboli.py serve`.

Measured, after one discarded warm-up round, in rounds of A, B, C (interleaved to cancel
drift):

  A  baseline: `podman run --rm ... claude -p hello --session-id <uuid>` (subprocess), with
     a fresh session home chowned 1000:1000 and the daemon's hardening flags (see BASELINE);
  B  `POST /run {"prompt": "hello"}`, end to end (httpx);
  C  `GET /run/stream?prompt=hello`, end to end (httpx streaming).

  * wall-clock time per run: median, p90, and median(B) / median(A);
  * output latency: from the moment the model server has finished sending its reply to
    the moment the client holds the output — the first stdout line of A, the first SSE
    `data:` line of C (both clocks are this process's time.monotonic());
  * concurrency: wall time of N simultaneous runs, podman run vs POST /run (3 rounds).

The daemon also injects the API key as a Podman secret, labels its containers, and talks
to Podman over its API socket; the baseline passes the key with -e.

Run as root (rootful Podman, socket at /run/podman/podman.sock, image built):

    python bench_stromboli.py --runs 10            # markdown table on stdout
    python bench_stromboli.py --runs 10 --json     # machine-readable
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_stromboli import IMAGE, Daemon, ScriptedModel, agent_env  # noqa: E402

PROMPT = "hello"
REPLY = "Hello from the scripted model"
CONCURRENT_ROUNDS = 3
# The daemon's container hardening, replicated on the baseline's command line.
BASELINE = ["--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--pids-limit", "512", "--memory", "512m", "--cpus", "1"]


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
            os.chown(path, 1000, 1000)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs per side (≥ 2)")
    parser.add_argument("--image", default=IMAGE, help="agent image (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="simultaneous runs for the concurrency test; 0 skips it")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be at least 2")

    model = TimedModel()
    model.start()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="stromboli-bench-"))
    name, _, tag = args.image.rpartition(":")
    if not name or "/" in tag:
        name, tag = args.image, "latest"
    env = {**agent_env(model), "STROMBOLI_AGENT_IMAGE": name, "STROMBOLI_AGENT_IMAGE_TAG": tag,
           "STROMBOLI_MAX_CONCURRENT_RUNS": str(max(4, args.concurrency))}
    daemon = Daemon(workdir / "state", env)
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
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({**report, "samples": raw}, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
