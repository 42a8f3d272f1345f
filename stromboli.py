#!/usr/bin/env python3
"""stromboli — run the Claude Code CLI inside Podman containers behind a REST API.

One file, three dependencies (aiohttp, podman, pyjwt). Wire-compatible with upstream
Stromboli (Go) v0.5.6: synchronous runs (POST /run), SSE streams (GET /run/stream), async
jobs (POST /run/async, /jobs), resumable sessions, JWT auth, per-IP rate limiting and a
Prometheus exporter. Where upstream is weak it is better: jobs survive restarts (SQLite),
cancel really kills the container, containers are hardened by default, and both the agent
(it has a shell) and the network are treated as hostile: the daemon never follows a link
in a session home, bounds every buffer, keeps secrets out of `podman inspect`, and answers
its public routes without expensive work (see "Security model" in README.md).

    python3 stromboli.py serve                  # run the daemon (the default command)
    python3 stromboli.py check-config           # print the effective configuration
    python3 stromboli.py image build --offline  # build the agent image from a local claude
    python3 stromboli.py run "hello"            # client: stream a run from a daemon
    python3 stromboli.py jobs | cancel | sessions | token | health

Sections, in dependency order, each under a banner: configuration, logging, errors and
envelopes, store (SQLite), metrics, Podman, Claude (option tables, argv, output, usage),
sessions (the symlink-safe SafeHome layer, transcripts), runner (validation, Credentials,
the container spec, the run lifecycle), webhooks, jobs, auth, rate limiting, agent image,
images and secrets, OpenAPI (route records and the derived document), daemon (the app
object, health monitor), HTTP (browser checks, middlewares, handlers declared with @api,
connection limits), systemd, client CLI, main(), and data (Containerfile, viewer page).

Configuration: flags > environment (STROMBOLI_*) > TOML file (--config,
$STROMBOLI_CONFIG, /etc/stromboli/stromboli.toml) > defaults. See README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import datetime as dt
import errno
import fnmatch
import functools
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import os
import pathlib
import re
import resource
import secrets as pysecrets
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
import urllib.parse
import uuid
from typing import Any, Awaitable, BinaryIO, Callable, Iterable, Iterator, NamedTuple

import aiohttp
import jwt
import podman
import podman.errors
from aiohttp import web

VERSION = "0.5.6-alpha"
log = logging.getLogger("stromboli")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

PLACEHOLDER_SECRETS = {
    "change-me", "changeme", "replace-me", "your-secret-here", "your-jwt-secret",
    "generate-with-openssl-rand-base64-32", "insecure-secret-do-not-use-in-prod", "test-secret",
}
DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Parse a Go duration ("30m", "1h30m", "500ms", "0") into seconds."""
    text = str(text).strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r} (use Go syntax such as 30s, 5m, 1h)")
    return total


def format_duration(seconds: float) -> str:
    if seconds and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


def format_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:g} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"invalid boolean {text!r}")


def parse_list(text: Any) -> tuple[str, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(str(item).strip() for item in text if str(item).strip())
    return tuple(item.strip() for item in str(text).split(",") if item.strip())


def parse_env_pairs(text: Any) -> tuple[tuple[str, str], ...]:
    """`KEY=VALUE,KEY2=VALUE2` (or a TOML table) → ordered pairs."""
    if isinstance(text, dict):
        return tuple((str(k), str(v)) for k, v in text.items())
    pairs = []
    for item in parse_list(text):
        key, sep, value = item.partition("=")
        if not sep or not ENV_NAME_RE.match(key):  # the value may be a secret: never echo it
            raise ValueError(f"invalid KEY=VALUE pair (entry {len(pairs) + 1}, key {key[:40]!r})")
        pairs.append((key, value))
    return tuple(pairs)


SIZE_RE = re.compile(r"^(\d{1,15})([bkmg]?)$", re.I)


def parse_size(text: Any) -> int:
    """A byte size: 512, 64k, 16m, 1g (binary multiples)."""
    m = SIZE_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"invalid size {text!r} (use e.g. 64k, 16m, 1g)")
    return int(m.group(1)) * 1024 ** "bkmg".index((m.group(2) or "b").lower())


ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PARSERS: dict[str, Callable[[Any], Any]] = {
    "str": str, "bool": parse_bool, "int": int, "float": float, "size": parse_size,
    "duration": parse_duration, "list": parse_list, "env": parse_env_pairs,
}


def setting(default: Any, key: str, *env: str, kind: str = "str", secret: bool = False,
            help: str = "") -> Any:
    """A configuration field: its TOML key, environment names, parser and description."""
    meta = {"key": key, "env": env, "kind": kind, "secret": secret, "help": help}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Config:
    """The daemon's whole configuration; every field is one documented setting."""

    server_address: str = setting(":8080", "server.address", "STROMBOLI_SERVER_ADDRESS",
                                  help="API listen address (host:port, :port)")
    server_max_body_bytes: int = setting(10 * 1024 * 1024, "server.max_body_bytes",
                                         "STROMBOLI_SERVER_MAX_BODY_BYTES", kind="int",
                                         help="largest accepted request body (413 beyond)")
    server_header_timeout: float = setting(10.0, "server.header_timeout",
                                           "STROMBOLI_SERVER_HEADER_TIMEOUT", kind="duration",
                                           help="a new connection's request head must arrive "
                                                "within this")
    server_body_timeout: float = setting(30.0, "server.body_timeout",
                                         "STROMBOLI_SERVER_BODY_TIMEOUT", kind="duration",
                                         help="a request body must arrive within this (408)")
    server_keepalive_timeout: float = setting(75.0, "server.keepalive_timeout",
                                              "STROMBOLI_SERVER_KEEPALIVE_TIMEOUT",
                                              kind="duration",
                                              help="idle keep-alive connections closed after this")
    server_shutdown_grace: float = setting(30.0, "server.shutdown_grace",
                                           "STROMBOLI_SHUTDOWN_GRACE", kind="duration",
                                           help="on SIGTERM, runs may finish this long")
    server_max_connections: int = setting(512, "server.max_connections",
                                          "STROMBOLI_SERVER_MAX_CONNECTIONS", kind="int",
                                          help="open client connections at most (more: closed)")
    server_allowed_hosts: tuple = setting((), "server.allowed_hosts",
                                          "STROMBOLI_SERVER_ALLOWED_HOSTS", kind="list",
                                          help="Host names accepted besides IPs and localhost")
    server_allowed_origins: tuple = setting((), "server.allowed_origins",
                                            "STROMBOLI_SERVER_ALLOWED_ORIGINS", kind="list",
                                            help="browser origins accepted besides our own")
    state_dir: str = setting("", "server.state_dir", "STROMBOLI_STATE_DIR", "STATE_DIRECTORY",
                             help="SQLite store folder (default ~/.local/share/stromboli)")
    podman_url: str = setting("", "podman.url", "STROMBOLI_PODMAN_URL", "CONTAINER_HOST",
                              help="Podman API URL; empty = discover or start a private service")
    max_concurrent_runs: int = setting(0, "server.max_concurrent_runs",
                                       "STROMBOLI_MAX_CONCURRENT_RUNS", kind="int",
                                       help="runs executing at once (0 = number of CPUs)")
    agent_image: str = setting("stromboli-agent", "agent.image", "STROMBOLI_AGENT_IMAGE",
                               help="default agent image")
    agent_image_tag: str = setting("latest", "agent.image_tag", "STROMBOLI_AGENT_IMAGE_TAG",
                                   help="default agent image tag")
    agent_allowed_image_patterns: tuple = setting(
        (), "agent.allowed_image_patterns", "STROMBOLI_AGENT_ALLOWED_IMAGE_PATTERNS",
        kind="list", help="image globs a request may choose (empty = any)")
    agent_allowed_volumes: tuple = setting((), "agent.allowed_volumes",
                                           "STROMBOLI_AGENT_ALLOWED_VOLUMES", kind="list",
                                           help="host path roots a request may mount")
    agent_allow_all_volumes: bool = setting(False, "agent.allow_all_volumes",
                                            "STROMBOLI_AGENT_ALLOW_ALL_VOLUMES", kind="bool",
                                            help="allow any host path (development only)")
    agent_workdir_auto_create: bool = setting(True, "agent.workdir_auto_create",
                                              "STROMBOLI_AGENT_WORKDIR_AUTO_CREATE", kind="bool",
                                              help="mkdir -p the workdir inside the container")
    agent_volume_auto_create: bool = setting(True, "agent.volume_auto_create",
                                             "STROMBOLI_AGENT_VOLUME_AUTO_CREATE", kind="bool",
                                             help="create missing host paths of volumes")
    agent_mount_claude_cli: bool = setting(False, "agent.mount_claude_cli",
                                           "STROMBOLI_AGENT_MOUNT_CLAUDE_CLI", kind="bool",
                                           help="mount the CLI image into the base image")
    agent_cli_image: str = setting("stromboli-agent", "agent.cli_image",
                                   "STROMBOLI_AGENT_CLI_IMAGE", help="image that holds claude")
    agent_cli_image_tag: str = setting("latest", "agent.cli_image_tag",
                                       "STROMBOLI_AGENT_CLI_IMAGE_TAG", help="CLI image tag")
    agent_credentials_file: str = setting("~/.claude/.credentials.json", "agent.credentials_file",
                                          "STROMBOLI_AGENT_CREDENTIALS_FILE",
                                          help="Claude OAuth credentials synced to a secret")
    agent_sessions_dir: str = setting("", "agent.sessions_dir", "STROMBOLI_AGENT_SESSIONS_DIR",
                                      help="session homes (default <state dir>/sessions)")
    agent_sessions_host_dir: str = setting("", "agent.sessions_host_dir",
                                           "STROMBOLI_AGENT_SESSIONS_HOST_DIR",
                                           help="sessions dir as Podman sees it")
    agent_network: str = setting("", "agent.network", "STROMBOLI_AGENT_NETWORK",
                                 help="network mode: bridge, host, none or a network name")
    agent_env: tuple = setting((), "agent.env", "STROMBOLI_AGENT_ENV", kind="env",
                               help="KEY=VALUE pairs set in every agent container")
    agent_pids_limit: int = setting(512, "agent.pids_limit", "STROMBOLI_AGENT_PIDS_LIMIT",
                                    kind="int", help="process limit per agent container")
    agent_max_line: int = setting(1024 ** 2, "agent.max_line", "STROMBOLI_AGENT_MAX_LINE",
                                  kind="size", help="longest output line kept (cut beyond)")
    agent_max_output: int = setting(16 * 1024 ** 2, "agent.max_output",
                                    "STROMBOLI_AGENT_MAX_OUTPUT", kind="size",
                                    help="output kept per run (the rest is dropped)")
    agent_max_followers: int = setting(32, "agent.max_followers", "STROMBOLI_AGENT_MAX_FOLLOWERS",
                                       kind="int", help="clients following one agent's stream "
                                                        "at once (429 beyond)")
    agent_max_lifetime: float = setting(86400.0, "agent.max_lifetime",
                                        "STROMBOLI_AGENT_MAX_LIFETIME", kind="duration",
                                        help="an agent is stopped this long after its creation "
                                             "(0 = never)")
    agent_max_request_bytes: int = setting(4 * 1024 ** 2, "agent.max_request_bytes",
                                           "STROMBOLI_AGENT_MAX_REQUEST_BYTES", kind="size",
                                           help="largest body of a run or agent request, "
                                                "prompt included (413 beyond)")
    agent_session_quota: int = setting(1024 ** 3, "agent.session_quota",
                                       "STROMBOLI_AGENT_SESSION_QUOTA", kind="size",
                                       help="size limit of one session home (0 = none)")
    agent_session_filesystem: str = setting("auto", "agent.session_filesystem",
                                            "STROMBOLI_AGENT_SESSION_FILESYSTEM",
                                            help="loop (each home its own filesystem: the "
                                                 "kernel enforces the quota), plain (measured) "
                                                 "or auto")
    agent_tmp_size: int = setting(256 * 1024 ** 2, "agent.tmp_size", "STROMBOLI_AGENT_TMP_SIZE",
                                  kind="size", help="size of the tmpfs at /tmp and /var/tmp of "
                                                    "each container (within its memory)")
    agent_userns_base: int = setting(1_000_000_000, "agent.userns_base",
                                     "STROMBOLI_AGENT_USERNS_BASE", kind="int",
                                     help="rootful: host uid of container uid 0 (0 = no userns)")
    secrets_allowed: tuple = setting((), "secrets.allowed", "STROMBOLI_SECRETS_ALLOWED",
                                     kind="list", help="existing Podman secrets runs may use")
    anthropic_api_key: str = setting("", "agent.anthropic_api_key", "ANTHROPIC_API_KEY",
                                     secret=True, help="API key injected as a Podman secret")
    anthropic_api_key_file: str = setting("", "agent.anthropic_api_key_file",
                                          "STROMBOLI_ANTHROPIC_API_KEY_FILE",
                                          help="file holding the API key")
    resources_memory: str = setting("512m", "resources.memory", "STROMBOLI_RESOURCES_MEMORY",
                                    "STROMBOLI_DEFAULT_MEMORY", help="default memory limit")
    resources_cpus: str = setting("1", "resources.cpus", "STROMBOLI_RESOURCES_CPUS",
                                  "STROMBOLI_DEFAULT_CPUS", help="default CPU limit")
    resources_timeout: float = setting(1800.0, "resources.timeout", "STROMBOLI_RESOURCES_TIMEOUT",
                                       "STROMBOLI_DEFAULT_TIMEOUT", kind="duration",
                                       help="default run timeout")
    auth_enabled: bool = setting(True, "auth.enabled", "STROMBOLI_AUTH_ENABLED", kind="bool",
                                 help="require a token on protected routes")
    auth_valid_tokens: tuple = setting((), "auth.valid_tokens", "STROMBOLI_API_TOKENS",
                                       kind="list", secret=True, help="static bearer tokens")
    auth_blacklist_cleanup_interval: float = setting(
        3600.0, "auth.blacklist.cleanup_interval", "STROMBOLI_AUTH_BLACKLIST_CLEANUP_INTERVAL",
        kind="duration", help="how often expired revocations are reaped")
    auth_failure_rate: float = setting(0.2, "auth.failure_rate", "STROMBOLI_AUTH_FAILURE_RATE",
                                       kind="float",
                                       help="failed authentications refilled per second per IP")
    auth_failure_burst: int = setting(10, "auth.failure_burst", "STROMBOLI_AUTH_FAILURE_BURST",
                                      kind="int", help="failed authentications per IP in a burst")
    jwt_secret: str = setting("", "jwt.secret", "STROMBOLI_JWT_SECRET", secret=True,
                              help="HS256 signing secret (>= 32 chars)")
    jwt_access_expiry: float = setting(86400.0, "jwt.access_expiry", "STROMBOLI_JWT_EXPIRY",
                                       kind="duration", help="access token lifetime")
    jwt_refresh_expiry: float = setting(604800.0, "jwt.refresh_expiry",
                                        "STROMBOLI_JWT_REFRESH_EXPIRY", kind="duration",
                                        help="refresh token lifetime")
    rate_limit_enabled: bool = setting(False, "rate_limit.enabled", "STROMBOLI_RATE_LIMIT_ENABLED",
                                       kind="bool", help="per-IP token bucket")
    rate_limit_rate: float = setting(10.0, "rate_limit.rate", "STROMBOLI_RATE_LIMIT_RPS",
                                     kind="float", help="tokens refilled per second")
    rate_limit_burst: int = setting(20, "rate_limit.burst", "STROMBOLI_RATE_LIMIT_BURST",
                                    kind="int", help="bucket capacity")
    rate_limit_max_clients: int = setting(10000, "rate_limit.max_clients",
                                          "STROMBOLI_RATE_LIMIT_MAX_CLIENTS", kind="int",
                                          help="buckets kept at most (least recent evicted)")
    rate_limit_trusted_proxies: tuple = setting(
        (), "rate_limit.trusted_proxies", "STROMBOLI_RATE_LIMIT_TRUSTED_PROXIES", kind="list",
        help="CIDRs whose X-Forwarded-For / X-Real-IP are believed")
    webhook_signing_secret: str = setting("", "webhook.signing_secret",
                                          "STROMBOLI_WEBHOOK_SIGNING_SECRET", secret=True,
                                          help="HMAC-SHA256 key for webhook signatures")
    webhook_allowed_hosts: tuple = setting((), "webhook.allowed_hosts",
                                           "STROMBOLI_WEBHOOK_ALLOWED_HOSTS", kind="list",
                                           help="host names or CIDRs webhooks may reach "
                                                "(empty = any)")
    webhook_max_attempts: int = setting(5, "webhook.max_attempts", "STROMBOLI_WEBHOOK_MAX_ATTEMPTS",
                                        kind="int", help="deliveries tried per webhook")
    jobs_max_queued: int = setting(1000, "jobs.max_queued", "STROMBOLI_MAX_QUEUED_JOBS",
                                   kind="int", help="pending async jobs at most (429 beyond)")
    jobs_cleanup_ttl: float = setting(3600.0, "jobs.cleanup_ttl", "STROMBOLI_JOBS_CLEANUP_TTL",
                                      kind="duration", help="finished jobs kept this long")
    jobs_cleanup_interval: float = setting(300.0, "jobs.cleanup_interval",
                                           "STROMBOLI_JOBS_CLEANUP_INTERVAL", kind="duration",
                                           help="how often old jobs are deleted")
    metrics_enabled: bool = setting(True, "metrics.enabled", "STROMBOLI_METRICS_ENABLED",
                                    kind="bool", help="serve /metrics on its own listener")
    metrics_address: str = setting("127.0.0.1:9090", "metrics.address",
                                   "STROMBOLI_METRICS_ADDRESS", help="metrics listen address")
    log_format: str = setting("json", "log.format", "STROMBOLI_LOG_FORMAT",
                              help="json or text")
    log_level: str = setting("info", "log.level", "STROMBOLI_LOG_LEVEL",
                             help="debug, info, warn, error")

    # -- derived values -----------------------------------------------------
    @property
    def state_path(self) -> pathlib.Path:
        if self.state_dir:
            return pathlib.Path(self.state_dir.split(":")[0]).expanduser()
        return pathlib.Path("~/.local/share/stromboli").expanduser()

    @property
    def sessions_path(self) -> pathlib.Path:
        if self.agent_sessions_dir:
            return pathlib.Path(self.agent_sessions_dir).expanduser().absolute()
        return self.state_path.absolute() / "sessions"

    @property
    def sessions_host_path(self) -> pathlib.Path:
        if self.agent_sessions_host_dir:
            return pathlib.Path(self.agent_sessions_host_dir).expanduser()
        return self.sessions_path

    @property
    def default_image(self) -> str:
        return f"{self.agent_image}:{self.agent_image_tag}"

    @property
    def cli_image(self) -> str:
        return f"{self.agent_cli_image}:{self.agent_cli_image_tag}"

    @property
    def credentials_path(self) -> pathlib.Path:
        return pathlib.Path(self.agent_credentials_file).expanduser()

    @property
    def agent_host_uid(self) -> int | None:
        """The host uid of the agent's uid 1000 with rootful Podman (owner of its session
        homes); None when the daemon is not root and cannot give files away."""
        if os.geteuid() != 0:
            return None
        return self.agent_userns_base + 1000 if self.userns_base else 1000

    @property
    def userns_base(self) -> int:
        """The user namespace base in force: none in two-image mode, where Podman 4 cannot
        mount an image inside a user namespace (permission denied on its storage)."""
        return 0 if self.agent_mount_claude_cli else self.agent_userns_base

    @property
    def run_slots(self) -> int:
        return self.max_concurrent_runs or os.cpu_count() or 1

    def api_key(self) -> str:
        """The Anthropic API key from the variable, a key file or a systemd credential."""
        if self.anthropic_api_key:
            return self.anthropic_api_key.strip()
        candidates = [self.anthropic_api_key_file]
        if os.environ.get("CREDENTIALS_DIRECTORY"):
            candidates.append(os.path.join(os.environ["CREDENTIALS_DIRECTORY"], "anthropic-api-key"))
        for path in filter(None, candidates):
            try:
                return pathlib.Path(path).read_text().strip()
            except OSError:
                continue
        return ""

    # -- loading ------------------------------------------------------------
    @classmethod
    def load(cls, file: str | None = None, overrides: dict[str, str] | None = None,
             environ: dict[str, str] | None = None) -> "Config":
        environ = dict(os.environ if environ is None else environ)
        table = cls._read_toml(file or environ.get("STROMBOLI_CONFIG") or "")
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            meta, raw, source = f.metadata, None, None
            if meta["key"] in table:
                raw, source = table[meta["key"]], f"{meta['key']} in the config file"
            for name in reversed(meta["env"]):
                if environ.get(name, "") != "":
                    raw, source = environ[name], name
            if f.name == "jwt_secret" and raw is None and credentials:
                raw = cls._read_credential(credentials, "jwt-secret")
                source = "the jwt-secret credential"
            if overrides and meta["key"] in overrides:
                raw, source = overrides[meta["key"]], f"--set {meta['key']}"
            if raw is None:
                continue
            try:
                values[f.name] = PARSERS[meta["kind"]](raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: {exc}") from None
        return cls(**values)

    @staticmethod
    def _read_credential(directory: str, name: str) -> str | None:
        try:
            return pathlib.Path(directory, name).read_text().strip()
        except OSError:
            return None

    @staticmethod
    def _read_toml(file: str) -> dict[str, Any]:
        """Read the TOML file into a flat {"section.key": value} table."""
        path = pathlib.Path(file) if file else pathlib.Path("/etc/stromboli/stromboli.toml")
        if not file and not path.exists():
            return {}
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: dict) -> None:
            for key, value in node.items():
                name = f"{prefix}{key}"
                if isinstance(value, dict) and name != "agent.env":
                    walk(name + ".", value)
                else:
                    flat[name] = value
        walk("", data)
        known = {f.metadata["key"] for f in dataclasses.fields(Config)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ConfigError(f"config file {path}: unknown keys: {', '.join(unknown)}")
        return flat

    def validate(self) -> list[str]:
        """Startup checks; upstream's messages where upstream has them."""
        errors = []
        hint = "generate one with: openssl rand -base64 32"
        secret = self.jwt_secret.strip()
        if self.auth_enabled:
            if not secret:
                errors.append(f"auth is enabled but STROMBOLI_JWT_SECRET is empty — {hint}")
            elif len(secret) < 32:
                errors.append(f"STROMBOLI_JWT_SECRET is too short ({len(secret)} chars, need at "
                              f"least 32) — {hint}")
            elif secret.lower() in PLACEHOLDER_SECRETS:
                errors.append(f"STROMBOLI_JWT_SECRET is a known placeholder value — {hint}")
        if self.rate_limit_enabled and (self.rate_limit_rate <= 0 or self.rate_limit_burst <= 0):
            errors.append("rate limit rate and burst must be > 0")
        if self.auth_failure_rate <= 0 or self.auth_failure_burst <= 0:
            errors.append("auth failure rate and burst must be > 0")
        if min(self.server_header_timeout, self.server_body_timeout,
               self.server_keepalive_timeout) <= 0 or self.server_max_connections < 1:
            errors.append("server timeouts must be > 0 and max_connections >= 1")
        if secret and (self.jwt_access_expiry <= 0 or self.jwt_refresh_expiry <= 0):
            errors.append("JWT access and refresh expiry must be > 0")
        if self.jobs_cleanup_ttl <= 0 or self.jobs_cleanup_interval <= 0:
            errors.append("jobs cleanup TTL and interval must be > 0")
        if self.max_concurrent_runs < 0:
            errors.append("STROMBOLI_MAX_CONCURRENT_RUNS must be >= 0")
        if self.log_format not in ("json", "text"):
            errors.append("STROMBOLI_LOG_FORMAT must be json or text")
        for problem in (parse_error(parse_memory, self.resources_memory),
                        parse_error(parse_cpus, self.resources_cpus)):
            if problem:
                errors.append(f"resources: {problem}")
        if self.resources_timeout <= 0:
            errors.append("resources timeout must be > 0")
        if self.agent_max_line < 1024 or self.agent_max_output < self.agent_max_line:
            errors.append("agent max_line must be >= 1k and max_output >= max_line")
        if self.agent_max_followers < 1 or self.agent_max_lifetime < 0:
            errors.append("agent max_followers must be >= 1 and max_lifetime >= 0")
        if self.agent_max_request_bytes < 16 * 1024:  # /run/stream's 8 KiB query fits
            errors.append("agent max_request_bytes must be >= 16k")
        if self.agent_session_filesystem not in ("auto", "loop", "plain"):
            errors.append("agent session_filesystem must be auto, loop or plain")
        elif self.agent_session_filesystem == "loop" and self.agent_session_quota < 1024 ** 2:
            errors.append("agent session_filesystem loop needs a session_quota of at least 1m "
                          "(the size of each home's filesystem)")
        if self.agent_tmp_size < 1024 ** 2:
            errors.append("agent tmp_size must be >= 1m")
        if not 0 <= self.agent_userns_base <= 2 ** 32 - 2 ** 16 - 2:
            errors.append("agent userns_base must be between 0 and 4294901758")
        for label, address in (("server", self.server_address), ("metrics", self.metrics_address)):
            try:
                split_address(address)
            except ValueError as exc:
                errors.append(f"{label} address: {exc}")
        return errors

    def describe(self) -> list[tuple[str, str, str]]:
        """(key, env, value) rows with secrets masked, for check-config."""
        rows = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                shown = "<set, hidden>"
            elif f.metadata["kind"] == "env":
                shown = ",".join(f"{k}=<hidden>" for k, _ in value)
            elif isinstance(value, tuple):
                shown = ",".join(value)
            elif f.metadata["kind"] == "duration":
                shown = format_duration(value)
            elif f.metadata["kind"] == "size":  # as it would be written: 16m, 1g
                shown = next(f"{value // 1024 ** i}{unit}" for i, unit in
                             ((3, "g"), (2, "m"), (1, "k"), (0, "")) if value % 1024 ** i == 0)
            else:
                shown = str(value)
            rows.append((f.metadata["key"], f.metadata["env"][0], shown))
        return rows


class ConfigError(Exception):
    """The configuration cannot be used; the daemon exits with code 1."""


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"invalid address {address!r} (use host:port or :port)")
    return host.strip("[]") or "0.0.0.0", int(port)


MEMORY_RE = re.compile(r"^(\d{1,15})([bkmg]?)$", re.I)


def parse_memory(text: str) -> int:
    m = MEMORY_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"invalid memory value {text!r} (use e.g. 512m, 2g)")
    value = int(m.group(1)) * 1024 ** "bkmg".index((m.group(2) or "b").lower())
    if value < 6 * 1024 * 1024:
        raise ValueError(f"memory value {text!r} is below Podman's minimum of 6m")
    if value > 1024 ** 4:
        raise ValueError(f"memory value {text!r} is above 1024g")
    return value


def parse_cpus(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"invalid cpus value {text!r} (use e.g. 1, 0.5, 2)") from None
    if not 0.01 <= value <= 1024:
        raise ValueError(f"cpus value {text!r} must be between 0.01 and 1024")
    return value


def parse_error(parse: Callable[[str], Any], text: str) -> str | None:
    """The message `parse` raises for `text`, or None when it parses."""
    try:
        parse(text)
    except ValueError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------
# Logging — one line per event, JSON or text, with structured fields
# ---------------------------------------------------------------------------

def setup_logging(cfg: Config) -> None:
    level_name = cfg.log_level.lower().replace("warning", "warn")
    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "error": logging.ERROR}
    # Fields no line shows are not gathered (each costs every record: the access log is hot).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = BufferedLogHandler()
    handler.setFormatter(JsonLogFormatter() if cfg.log_format == "json" else TextLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(levels.get(level_name, logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    if level_name not in levels:
        log.warning("unknown log level, using info", extra={"fields": {"level": cfg.log_level}})


class BufferedLogHandler(logging.StreamHandler):
    """Lines to stderr, written in batches: at most every 0.2 s, at once for warnings and
    worse, and at exit (one write per access-log line would cost a busy daemon a tenth of
    its time). A kill -9 may lose the last 0.2 s of info lines."""

    INTERVAL = 0.2

    def __init__(self) -> None:
        super().__init__(open(sys.stderr.fileno(), "w", buffering=1 << 16, closefd=False,
                              encoding="utf-8", errors="replace"))
        self._timer: threading.Timer | None = None

    def flush(self) -> None:
        with self.lock:
            self._timer = None
            super().flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
        elif self._timer is None:  # the lines of the next 0.2 s go out together
            self._timer = threading.Timer(self.INTERVAL, self.flush)
            self._timer.daemon = True
            self._timer.start()


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)  # strftime once per second: this is the hot path
        if seconds != getattr(self, "_second", None):
            self._second = seconds
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        entry = {"time": f"{self._stamp}.{int(record.created % 1 * 1000):03d}Z",
                 "level": record.levelname, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{when} {record.levelname:<7} {record.getMessage()} {fields}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def fields(**kwargs: Any) -> dict:
    """Structured log fields: log.info("msg", extra=fields(a=1))."""
    return {"fields": kwargs}


def access_log(**entry: Any) -> None:
    """The per-request line, at INFO. Cheaper than log.info: the logging module's record
    machinery would be a fifth of a fast request's cost; the line is the same one."""
    if not log.isEnabledFor(logging.INFO):
        return
    record = logging.LogRecord("stromboli", logging.INFO, "", 0, "request", None, None)
    record.fields = entry
    for handler in logging.getLogger().handlers:
        handler.handle(record)


# ---------------------------------------------------------------------------
# Errors and JSON envelopes
# ---------------------------------------------------------------------------

class ApiError(Exception):
    """An HTTP outcome other than success. Where it is raised does not choose how it looks:
    it is rendered in the envelope of the route being served (its route record's), one of
    upstream's: "error" → {"error": msg}; "run" → RunResponse {"id":"","status":"error",
    "error"}; "success" → {"success": false, "error"}; "text" → plain text (the SSE
    endpoint's errors). `extra` fields join the body."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra
        self.headers = headers or {}

    def response(self, envelope: str = "error") -> web.Response:
        if envelope == "text":
            return web.Response(status=self.status, text=self.message, headers=self.headers)
        if envelope == "run":
            body = {"id": "", "status": "error", "error": self.message}
        elif envelope == "success":
            body = {"success": False, "error": self.message}
        else:
            body = {"error": self.message}
        body.update(self.extra)
        return json_response(body, status=self.status, headers=self.headers)


class FixedStatus(ApiError):
    """An ApiError whose status is fixed by its class."""

    code = 500

    def __init__(self, message: str, **extra: Any):
        super().__init__(self.code, message, **extra)


class BadRequest(FixedStatus):
    code = 400


class NotFound(FixedStatus):
    code = 404


class Conflict(FixedStatus):
    code = 409


class Unavailable(FixedStatus):
    code = 503


class RunFailed(Exception):
    """A run that could not execute (podman failure, non-crash exit, ...)."""


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, headers=headers, content_type="application/json",
                        text=json.dumps(body, separators=(",", ":"), default=str))


@functools.lru_cache(maxsize=8192)  # a job's timestamps are rendered on every GET
def rfc3339(ts: float | None, timespec: str = "seconds") -> str | None:
    if ts is None:
        return None
    text = dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec=timespec)
    return text.replace("+00:00", "Z")


def new_id(prefix: str) -> str:
    return f"{prefix}-{pysecrets.token_hex(8)}"


def drop_none(body: dict) -> dict:
    return {k: v for k, v in body.items() if v is not None}


# ---------------------------------------------------------------------------
# Store — SQLite (jobs, run events, agents, revoked tokens, webhook deliveries)
# ---------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, session_id TEXT NOT NULL, run_id TEXT NOT NULL,
    request TEXT NOT NULL, output TEXT, error TEXT, structured_output TEXT, usage TEXT,
    crash_info TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    started_at REAL, finished_at REAL, truncated INTEGER, container_id TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, updated_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs(status, created_at);
CREATE TABLE IF NOT EXISTS run_events (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS revoked_tokens (jti TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY, request_hash TEXT NOT NULL, job_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, session_id TEXT NOT NULL, status TEXT NOT NULL,
    created_at REAL NOT NULL, last_activity_at REAL NOT NULL, idle_timeout INTEGER NOT NULL,
    idle_timeout_disabled INTEGER NOT NULL, turns_completed INTEGER NOT NULL,
    exit_error TEXT, last_event INTEGER NOT NULL, exited_at REAL, turn_id TEXT NOT NULL,
    request TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, url TEXT NOT NULL,
    attempt INTEGER NOT NULL, status_code INTEGER, error TEXT, at REAL NOT NULL
);
"""
JOB_JSON_COLUMNS = ("request", "structured_output", "usage", "crash_info")
# A job as the API shows it: no request (it may be megabytes, and only a run needs it).
JOB_SHOWN = ("id, status, session_id, run_id, output, error, structured_output, usage, "
             "crash_info, created_at, updated_at, started_at, finished_at, truncated")
TERMINAL_STATES = ("completed", "failed", "crashed", "cancelled")


class QueueFull(Exception):
    """A job was not queued: as many as allowed are pending already."""


class Store:
    """The SQLite database. Every query runs on one dedicated thread, off the event loop."""

    def __init__(self, path: pathlib.Path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        self._db: sqlite3.Connection | None = None
        self._jobs: dict[str, dict] = {}  # see cached_job
        self._job_sizes: dict[str, int] = {}
        self._executor.submit(self._open).result()

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column in ("truncated INTEGER", "container_id TEXT"):  # added after release 1
            if column.split()[0] not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column}")
        os.chmod(self.path, 0o600)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.submit(self._db.close).result()
        self._executor.shutdown()

    # -- jobs (called through .call) ------------------------------------------
    JOB_CACHE_SIZE = 2048
    JOB_CACHE_BYTES = 64 * 1024 ** 2  # outputs may take agent.max_output each

    def cached_job(self, job_id: str) -> dict | None:
        """A job as last read or written, without a trip to the store's thread (the hot
        path of GET /jobs/{id}); None when it is not at hand. Writes replace or drop the
        entry on the store's thread, so a hit is never older than the last write."""
        return self._jobs.get(job_id)

    def _remember(self, job: dict, size: int) -> dict:
        """Cache a job (`size`: about its bytes), letting the oldest go past the cache's
        count or bytes."""
        self._forget(job["id"])
        while self._jobs and (len(self._jobs) >= self.JOB_CACHE_SIZE or
                              sum(self._job_sizes.values()) + size > self.JOB_CACHE_BYTES):
            self._forget(next(iter(self._jobs)))
        self._jobs[job["id"]], self._job_sizes[job["id"]] = job, size
        return job

    def _forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._job_sizes.pop(job_id, None)

    def insert_job_once(self, job: dict, key: str, request_hash: str,
                        max_pending: int) -> dict | None:
        """Insert a job under an Idempotency-Key, unless the key is taken: → None when
        inserted, else {"job_id", "request_hash"} of the job the key already names."""
        found = self._db.execute("SELECT job_id, request_hash FROM idempotency_keys WHERE "
                                 "key=?", (key,)).fetchone()
        if found:
            return dict(found)
        with self._db:  # both rows or neither
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO idempotency_keys VALUES (?,?,?)",
                             (key, request_hash, job["id"]))
            self.insert_job(job, max_pending)
        return None

    def queue_positions(self) -> dict[str, int]:
        """{job id: place among pending jobs, 0 = next}, oldest first."""
        rows = self._db.execute("SELECT id FROM jobs WHERE status='pending' ORDER BY created_at")
        return {row[0]: place for place, row in enumerate(rows)}

    def count_pending(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status='pending'").fetchone()[0]

    def insert_job(self, job: dict, max_pending: int) -> None:
        """Insert a pending job, unless `max_pending` jobs are pending already (QueueFull):
        counted and inserted in one step on the store's one thread, so that concurrent
        submits cannot all see the same free place."""
        if self.count_pending() >= max_pending:
            raise QueueFull(max_pending)
        row = {k: (json.dumps(v) if k in JOB_JSON_COLUMNS and v is not None else v)
               for k, v in job.items()}
        cols = ",".join(row)
        self._db.execute(f"INSERT INTO jobs ({cols}) VALUES ({','.join('?' * len(row))})",
                         tuple(row.values()))

    def update_job(self, job_id: str, only_if_active: bool = True, **changes: Any) -> bool:
        """Update a job; by default only while it is pending/running, so that a cancelled
        job stays cancelled whatever its run reports afterwards."""
        changes["updated_at"] = time.time()
        row = {k: (json.dumps(v) if k in JOB_JSON_COLUMNS and v is not None else v)
               for k, v in changes.items()}
        self._forget(job_id)
        sql = f"UPDATE jobs SET {','.join(f'{k}=?' for k in row)} WHERE id=?"
        if only_if_active:
            sql += " AND status IN ('pending','running')"
        return self._db.execute(sql, (*row.values(), job_id)).rowcount > 0

    def get_job(self, job_id: str) -> dict | None:
        """A job as shown, and where its webhook goes (`webhook_url`)."""
        row = self._db.execute(f"SELECT {JOB_SHOWN}, json_extract(request, '$.webhook_url') "
                               "AS webhook_url FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        return self._remember(self._job(row), sum(len(v) for v in row if isinstance(v, str)))

    def list_jobs(self, status: str | None = None, limit: int = 1000,
                  offset: int = 0) -> tuple[list[dict], int]:
        """A page of jobs, newest first, and how many match in all."""
        where, args = ("WHERE status=?", (status,)) if status else ("", ())
        rows = self._db.execute(f"SELECT {JOB_SHOWN} FROM jobs {where} ORDER BY created_at "
                                "DESC LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        total = self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
        return [self._job(r) for r in rows], total

    def jobs_in(self, states: Iterable[str]) -> list[dict]:
        states = tuple(states)
        rows = self._db.execute(f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(states))})"
                                " ORDER BY created_at", states).fetchall()
        return [self._job(r) for r in rows]

    def delete_old_jobs(self, older_than: float) -> int:
        ids = [r[0] for r in self._db.execute(
            "SELECT run_id FROM jobs WHERE status IN ('completed','failed','crashed','cancelled') "
            "AND updated_at < ?", (older_than,))]
        self._db.executemany("DELETE FROM run_events WHERE run_id=?", [(i,) for i in ids])
        self._jobs.clear()
        self._job_sizes.clear()
        self._db.execute("DELETE FROM idempotency_keys WHERE job_id NOT IN (SELECT id FROM jobs) "
                         "OR job_id IN (SELECT id FROM jobs WHERE status IN ('completed','failed',"
                         "'crashed','cancelled') AND updated_at < ?)", (older_than,))
        return self._db.execute(
            "DELETE FROM jobs WHERE status IN ('completed','failed','crashed','cancelled') "
            "AND updated_at < ?", (older_than,)).rowcount

    def count_jobs_by_status(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"))

    @staticmethod
    def _job(row: sqlite3.Row | dict) -> dict:
        job = dict(row)
        for key in JOB_JSON_COLUMNS:
            if job.get(key) is not None:
                job[key] = json.loads(job[key])
        return job

    # -- run events --------------------------------------------------------------
    def add_run_events(self, rows: list[tuple[str, int, str, str, float]]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO run_events VALUES (?,?,?,?,?)", rows)

    def run_events(self, run_id: str, after: int = -1,
                   limit: int = -1) -> list[tuple[int, str, str]]:
        return [tuple(r) for r in self._db.execute(
            "SELECT seq, kind, data FROM run_events WHERE run_id=? AND seq>? ORDER BY seq "
            "LIMIT ?", (run_id, after, limit))]

    def delete_run_events(self, run_id: str) -> None:
        self._db.execute("DELETE FROM run_events WHERE run_id=?", (run_id,))

    def delete_run_events_before(self, older_than: float) -> None:
        self._db.execute("DELETE FROM run_events WHERE at < ? AND run_id NOT IN "
                         "(SELECT run_id FROM jobs)", (older_than,))

    # -- agents --------------------------------------------------------------------
    def save_agent(self, row: dict) -> None:
        self._db.execute(f"INSERT OR REPLACE INTO agents ({','.join(row)}) VALUES "
                         f"({','.join('?' * len(row))})", tuple(row.values()))

    def agents(self) -> list[dict]:
        return [dict(r) for r in self._db.execute("SELECT * FROM agents ORDER BY created_at")]

    def delete_agent(self, agent_id: str) -> None:
        self._db.execute("DELETE FROM agents WHERE id=?", (agent_id,))

    # -- revoked tokens ----------------------------------------------------------
    def revoke(self, jti: str, expires_at: float) -> None:
        self._db.execute("INSERT OR REPLACE INTO revoked_tokens VALUES (?,?)", (jti, expires_at))

    def is_revoked(self, *keys: str) -> bool:
        """Is any of these revoked (a token's jti, its family's key)?"""
        marks = ",".join("?" * len(keys))
        return self._db.execute(f"SELECT 1 FROM revoked_tokens WHERE jti IN ({marks}) AND "
                                "expires_at>?", (*keys, time.time())).fetchone() is not None

    def use_once(self, jti: str, expires_at: float) -> bool:
        """Mark a single-use token used; False when it already was (atomically)."""
        return self._db.execute("INSERT OR IGNORE INTO revoked_tokens VALUES (?,?)",
                                (jti, expires_at)).rowcount == 1

    def revocations(self, limit: int) -> dict[str, float] | None:
        """The live revocations {key: expires_at}, or None when there are more than limit."""
        rows = self._db.execute("SELECT jti, expires_at FROM revoked_tokens WHERE expires_at>? "
                                "LIMIT ?", (time.time(), limit + 1)).fetchall()
        return None if len(rows) > limit else dict(rows)

    def reap_revoked(self) -> int:
        return self._db.execute("DELETE FROM revoked_tokens WHERE expires_at<=?",
                                (time.time(),)).rowcount

    # -- webhook deliveries ------------------------------------------------------
    def record_delivery(self, job_id: str, url: str, attempt: int, status_code: int | None,
                        error: str | None) -> None:
        self._db.execute("INSERT INTO webhook_deliveries (job_id,url,attempt,status_code,error,at)"
                         " VALUES (?,?,?,?,?,?)", (job_id, url, attempt, status_code, error,
                                                   time.time()))

    def undelivered(self, max_attempts: int) -> list[tuple[dict, int]]:
        """Finished jobs whose webhook has not been delivered and has attempts left (a
        shutdown came between): → (job, attempts made)."""
        rows = self._db.execute(
            f"SELECT {JOB_SHOWN}, json_extract(request, '$.webhook_url') AS webhook_url, "
            "(SELECT COUNT(*) FROM webhook_deliveries d WHERE d.job_id=j.id) AS n "
            "FROM jobs j WHERE j.status IN ('completed','failed','crashed','cancelled') "
            "AND COALESCE(json_extract(j.request, '$.webhook_url'), '') != '' "
            "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.job_id=j.id "
            "AND d.error IS NULL)").fetchall()
        found = []
        for row in rows:
            attempts = row["n"]
            if attempts < max_attempts:
                found.append((self._job({k: row[k] for k in row.keys() if k != "n"}), attempts))
        return found

    def deliveries(self, job_id: str) -> list[dict]:
        return [dict(r) for r in self._db.execute(
            "SELECT attempt, status_code, error, at FROM webhook_deliveries WHERE job_id=? "
            "ORDER BY id", (job_id,))]


# ---------------------------------------------------------------------------
# Metrics — counters, gauges and histograms in the Prometheus text format
# ---------------------------------------------------------------------------

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RUN_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.series: dict[tuple, list] = {}

    def observe(self, labels: tuple, value: float) -> None:
        """Counts per bucket (not cumulative: one increment per observation); the
        exporter sums them up."""
        counts = self.series.setdefault(labels, [[0] * len(self.buckets), 0.0, 0])
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            counts[0][index] += 1
        counts[1] += value
        counts[2] += 1


def label_text(names: tuple[str, ...], values: tuple) -> str:
    def escape(v: Any) -> str:
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return ",".join(f'{n}="{escape(v)}"' for n, v in zip(names, values))


class Metrics:
    """Process-wide counters, exported by hand in text format 0.0.4. Upstream's three
    names keep their meaning; `path` is the route template so ids do not explode it."""

    def __init__(self):
        self.requests: collections.Counter = collections.Counter()
        self.durations = Histogram(DEFAULT_BUCKETS)
        self.run_durations = Histogram(RUN_BUCKETS)
        self.runs: collections.Counter = collections.Counter()
        self.rate_limited = 0
        self.auth_failures = 0
        self.connections_rejected = 0
        self.connections_timed_out = 0
        self.active_containers = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}  # name: (help, read)

    def request(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests[(method, path, str(status))] += 1
        self.durations.observe((method, path), seconds)

    def run_finished(self, seconds: float) -> None:
        self.run_durations.observe((), seconds)

    def run_status(self, status: str) -> None:
        self.runs[status] += 1

    def render(self, jobs_by_status: dict[str, int]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("http_requests_total", "counter", "HTTP requests by method, route and status.")
        for (method, path, status), n in sorted(self.requests.items()):
            out.append(f"http_requests_total{{{label_text(('method', 'path', 'status'), (method, path, status))}}} {n}")
        self._histogram(out, family, "http_request_duration_seconds",
                        "HTTP request latency by method and route.", self.durations,
                        ("method", "path"))
        family("active_containers", "gauge", "Agent containers currently executing.")
        out.append(f"active_containers {self.active_containers}")
        family("stromboli_runs_total", "counter", "Finished runs by final status.")
        for status, n in sorted(self.runs.items()):
            out.append(f'stromboli_runs_total{{status="{status}"}} {n}')
        self._histogram(out, family, "stromboli_run_duration_seconds",
                        "Time agent containers ran.", self.run_durations, ())
        family("stromboli_jobs", "gauge", "Stored async jobs by state.")
        for state in ("pending", "running", *TERMINAL_STATES):
            out.append(f'stromboli_jobs{{state="{state}"}} {jobs_by_status.get(state, 0)}')
        for name, value, help_text in (
                ("stromboli_rate_limited_total", self.rate_limited,
                 "Requests rejected with 429."),
                ("stromboli_auth_failures_total", self.auth_failures,
                 "Requests rejected with 401."),
                ("stromboli_connections_rejected_total", self.connections_rejected,
                 "Connections refused, or evicted while sending their head, at max_connections."),
                ("stromboli_connections_timed_out_total", self.connections_timed_out,
                 "Connections closed for not sending a request head in time.")):
            family(name, "counter", help_text)
            out.append(f"{name} {value}")
        for name, (help_text, fn) in sorted(self.gauges.items()):
            family(name, "gauge", help_text)
            out.append(f"{name} {fn()}")
        return "\n".join(out) + "\n"

    @staticmethod
    def _histogram(out: list[str], family: Callable, name: str, help_text: str,
                   hist: Histogram, names: tuple[str, ...]) -> None:
        family(name, "histogram", help_text)
        for labels, (counts, total, count) in sorted(hist.series.items()):
            base = label_text(names, labels)
            sep = "," if base else ""
            for bound, n in zip(hist.buckets, itertools.accumulate(counts)):
                out.append(f'{name}_bucket{{{base}{sep}le="{bound:g}"}} {n}')
            out.append(f'{name}_bucket{{{base}{sep}le="+Inf"}} {count}')
            suffix = f"{{{base}}}" if base else ""
            out.append(f"{name}_sum{suffix} {total:.6f}")
            out.append(f"{name}_count{suffix} {count}")


def process_resident_bytes() -> float:
    try:
        pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
        return float(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


def process_open_fds() -> float:
    try:
        return float(len(os.listdir("/proc/self/fd")))
    except OSError:
        return 0.0


# ---------------------------------------------------------------------------
# Podman — connection discovery, the private API service, the podman-py wrapper
# ---------------------------------------------------------------------------

class PodmanUnavailable(FixedStatus):
    """The Podman API cannot be reached: raised by Podman.call for every connection failure
    (podman-py wraps them in APIError), rendered 503 in the route's envelope."""

    code = 503


class PodmanService:
    """Finds a Podman API socket that answers, or starts a private `podman system service`
    on a socket in the state dir and stops it when the daemon exits."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.process: subprocess.Popen | None = None

    def candidates(self) -> list[str]:
        if self.cfg.podman_url:
            return [self.cfg.podman_url]
        found = []
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        for path in ([f"{runtime}/podman/podman.sock"] if runtime else []) + ["/run/podman/podman.sock"]:
            if os.path.exists(path):
                found.append(f"unix://{path}")
        return found

    def resolve(self) -> str:
        """Blocking: the URL of a Podman API that answers (starting one if needed)."""
        for url in self.candidates():
            if self.cfg.podman_url or self._answers(url):
                return url
        return self._start_private()

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            with podman.PodmanClient(base_url=url, timeout=5) as client:
                return bool(client.ping())
        except Exception:  # any failure means "not this one"
            return False

    def _start_private(self) -> str:
        binary = shutil.which("podman")
        sock = self.cfg.state_path / "podman.sock"
        url = f"unix://{sock}"
        if not binary:
            log.warning("no Podman socket answers and the podman binary is not installed; "
                        "runs will fail until Podman is reachable")
            return url
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        # cwd="/": conmon inherits the service's cwd and fails if that folder goes away.
        # Without our secrets in its environment.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("STROMBOLI_") and k != "ANTHROPIC_API_KEY"}
        self.process = subprocess.Popen([binary, "system", "service", "--time=0", url], cwd="/",
                                        env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.process.poll() is None:
            if sock.exists() and self._answers(url):
                log.info("started a private Podman API service", extra=fields(url=url))
                return url
            time.sleep(0.1)
        log.warning("could not start a private Podman API service", extra=fields(url=url))
        return url

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()


def podman_namespace_apart(podman_url: str) -> str:
    """Why Podman would not see the daemon's mounts ("" if it would, or if nobody can tell):
    it serves from another mount namespace — systemd's ProtectSystem=, PrivateTmp= and the
    like give the daemon one of its own. Asked of the process behind Podman's local socket
    (a socket-activated service's is systemd's), else of PID 1. Blocking."""
    mine = os.stat("/proc/self/ns/mnt").st_ino
    with contextlib.suppress(OSError):
        if podman_url.startswith("unix://"):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(podman_url.removeprefix("unix://"))
                peer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid = int.from_bytes(peer[:4], sys.byteorder)
            if os.stat(f"/proc/{pid}/ns/mnt").st_ino != mine:
                return "Podman runs in another mount namespace"
            return ""
    try:
        if os.stat("/proc/1/ns/mnt").st_ino != mine:
            return "the daemon runs in a mount namespace of its own (systemd's " \
                   "ProtectSystem=, PrivateTmp=...), where Podman would not see its mounts"
    except OSError:  # not allowed to look: nothing says they differ
        pass
    return ""


class Podman:
    """podman-py behind a dedicated thread pool: every call here is awaited, none blocks
    the event loop. Long calls (wait, follow logs) each hold one worker thread."""

    def __init__(self, url: str, workers: int = 64):
        self.url = url
        self.client = podman.PodmanClient(base_url=url, max_pool_size=workers)
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="podman")
        self.on_failure: Callable[[], None] = lambda: None  # the health monitor's nudge

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor,
                                              functools.partial(fn, *args, **kwargs))
        except podman.errors.NotFound:
            raise
        except Exception as exc:
            self.on_failure()
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            if isinstance(cause, OSError):  # the socket, not Podman's answer
                raise PodmanUnavailable(f"podman unavailable: {short_error(cause)}") from None
            raise

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # -- blocking helpers, run through .call -------------------------------------
    def ping(self) -> None:
        try:
            answered = self.client.ping()
        except Exception as exc:
            raise PodmanUnavailable(f"failed to connect to podman: {short_error(exc)}") from None
        if not answered:
            raise PodmanUnavailable("podman did not answer its ping")

    def version(self) -> dict:
        try:
            return self.client.version()
        except Exception as exc:
            raise PodmanUnavailable(f"failed to connect to podman: {short_error(exc)}") from None

    def rootless(self) -> bool:
        return bool(self.client.info().get("host", {}).get("security", {}).get("rootless"))

    def secret(self, name: str) -> dict | None:
        """The secret of exactly this name, inspected (with its labels), or None. Podman
        also matches names as ID prefixes ("0" may be anyone's secret): never ask it by name."""
        found = next((s for s in self.client.secrets.list()
                      if (s.attrs.get("Spec") or {}).get("Name") == name), None)
        if found is None:
            return None
        try:  # Podman 4's list leaves out the labels
            return self.client.secrets.get(found.id).attrs
        except podman.errors.NotFound:
            return None

    def secret_exists(self, name: str) -> bool:
        return self.secret(name) is not None

    def secret_usable(self, name: str, allowed: Iterable[str]) -> bool:
        """May a run use this secret: one stromboli created, or one an admin allowed."""
        attrs = self.secret(name)
        labels = ((attrs or {}).get("Spec") or {}).get("Labels") or {}
        return attrs is not None and (name in allowed or labels.get("managed-by") == "stromboli")

    def create_secret(self, name: str, data: bytes, labels: dict) -> None:
        """The value travels in the request body only (podman-py drops labels: the API
        is called directly)."""
        response = self.client.api.post(
            "/secrets/create", params={"name": name, "labels": json.dumps(labels)}, data=data,
            headers={"Content-Type": "application/octet-stream"})
        response.raise_for_status()

    def replace_secret(self, name: str, data: bytes, labels: dict) -> None:
        self.remove_secret(name)
        self.create_secret(name, data, labels)

    def remove_secret(self, name: str) -> None:
        if (attrs := self.secret(name)) is not None:
            self.client.secrets.remove(attrs["ID"])

    def image_exists(self, ref: str) -> bool:
        return self.client.images.exists(ref)

    def image_workdir(self, ref: str) -> str:
        config = self.client.images.get(ref).attrs.get("Config") or {}
        return config.get("WorkingDir") or "/"

    def create(self, image: str, command: list[str], **spec: Any) -> str:
        return self.client.containers.create(image, command, **spec).id

    def start(self, cid: str) -> None:
        self.client.containers.get(cid).start()

    def init(self, cid: str) -> int:
        """Make the container's process, its mounts done, its command not started; → its pid.
        RunFailed with the runtime's error (e.g. a mount source gone)."""
        container = self.client.containers.get(cid)
        try:
            container.init()
        except podman.errors.APIError as exc:
            raise RunFailed(str(exc.explanation or exc)) from None
        container.reload()
        return int(container.attrs["State"]["Pid"])

    def exit_code(self, cid: str) -> int:
        """The exit code of a container whose output stream has ended. Inspecting is far
        quicker than the wait endpoint here (which polls every ~250 ms). One still running
        10 s after its output ended closed its output on purpose: RunFailed (the caller
        removes it)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = self.client.containers.get(cid).attrs["State"]
            if state["Status"] in ("exited", "stopped"):
                return int(state["ExitCode"])
            time.sleep(0.01)
        raise RunFailed("the container closed its output but did not exit")

    def attach(self, cid: str, attached: Callable[[], None], sink: Callable[[bytes], None]) -> None:
        """Stream a container's stdout and stderr frames into `sink` until it exits.
        `attached` is called once the stream is open (podman-py has no attach())."""
        response = self.client.api.post(f"/containers/{cid}/attach", stream=True, params={
            "stream": True, "stdout": True, "stderr": True, "logs": True})
        response.raise_for_status()
        attached()
        try:
            while len(header := response.raw.read(8)) == 8:
                size = int.from_bytes(header[4:], "big")
                while size > 0 and (data := response.raw.read(min(size, 65536))):
                    sink(data)
                    size -= len(data)
        finally:
            response.close()

    def state(self, cid: str) -> str:
        return self.client.containers.get(cid).attrs["State"]["Status"]

    async def attach_stdio(self, cid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Attach to a container's stdin, stdout and stderr (before its start): → a reader
        of multiplexed frames (see read_frames) and a writer whose bytes reach its stdin;
        closing the writer's side (write_eof) closes its stdin. podman-py cannot: Podman
        hijacks the HTTP connection, so this speaks HTTP/1.1 on a socket of our own (on the
        event loop, which never blocks on it)."""
        scheme, _, where = self.url.partition("://")
        writer = None
        try:
            if scheme in ("unix", "http+unix"):
                reader, writer = await asyncio.open_unix_connection(urllib.parse.unquote(where))
            elif scheme in ("tcp", "http"):
                host, _, port = where.partition("/")[0].rpartition(":")
                reader, writer = await asyncio.open_connection(host, int(port))
            else:
                raise PodmanUnavailable(f"agents need a unix:// or tcp:// Podman URL, not {scheme}")
            writer.write(f"POST /v4.0.0/libpod/containers/{cid}/attach?stream=true&stdin=true"
                         "&stdout=true&stderr=true HTTP/1.1\r\nHost: podman\r\n"
                         "Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
                         .encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            if writer is not None:
                writer.close()
            raise PodmanUnavailable(f"podman unavailable: attach failed: {short_error(exc)}") \
                from None
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if " 101 " not in status and " 200 " not in status:
            writer.close()
            raise ApiError(500, f"agent: spawn: attach failed: {status[:200]}")
        return reader, writer

    @staticmethod
    async def read_frames(reader: asyncio.StreamReader):
        """(stream, bytes) of an attached container's output until it ends: stream 1 is
        stdout, 2 stderr. A frame's bytes arrive in pieces of at most 64 KiB (its size is
        the agent's choice)."""
        while True:
            try:
                header = await reader.readexactly(8)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            size = int.from_bytes(header[4:], "big")
            while size > 0:
                try:
                    data = await reader.readexactly(min(size, 65536))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                size -= len(data)
                yield header[0], data

    def follow_logs(self, cid: str, attached: Callable[[], None],
                    sink: Callable[[bytes], None]) -> None:
        """A container's whole output into `sink` until it exits (as attach does for a new
        one); for one found after a restart, running or exited."""
        attached()
        for chunk in self.client.containers.get(cid).logs(stdout=True, stderr=True, stream=True,
                                                          follow=True):
            sink(chunk if isinstance(chunk, bytes) else str(chunk).encode())

    def kill(self, cid: str, sig: str = "SIGKILL") -> None:
        try:
            self.client.containers.get(cid).kill(sig)
        except podman.errors.NotFound:
            pass
        except podman.errors.APIError as exc:
            if "not running" not in str(exc) and "state" not in str(exc):
                raise

    def remove(self, cid: str) -> None:
        try:
            self.client.containers.remove(cid, force=True)
        except podman.errors.NotFound:
            pass

    def containers(self, label: str) -> list[dict]:
        found = []
        for c in self.client.containers.list(all=True, filters={"label": label}):
            state = c.attrs.get("State")  # a string in list results, unlike inspect's object
            found.append({"id": c.id, "name": c.name, "labels": c.labels or {},
                          "status": state if isinstance(state, str) else c.status})
        return found

    def import_image(self, tar_path: str, reference: str, changes: list[str]) -> None:
        with open(tar_path, "rb") as data:
            response = self.client.api.post(
                "/images/import", params={"reference": reference, "changes": changes},
                data=data, headers={"Content-Type": "application/x-tar"})
        response.raise_for_status()


def short_error(exc: BaseException) -> str:
    """A one-line error text without request URLs (which may name socket paths)."""
    text = getattr(exc, "explanation", None) or str(exc) or type(exc).__name__
    return str(text).splitlines()[0][:300]


# ---------------------------------------------------------------------------
# Claude — option → argv mapping, output parsing, usage and cost, crash info
# ---------------------------------------------------------------------------

# (JSON field, kind, CLI flag, description, example) in upstream's argv order: these rows
# parse requests, build argv and write the OpenAPI document.
CLAUDE_FLAGS: tuple[tuple[str, str, str, str, Any], ...] = (
    ("no_persistence", "bool", "--no-session-persistence", "Don't save session to disk", False),
    ("model", "str", "--model", "Model alias (sonnet, opus, haiku) or full name", "sonnet"),
    ("fallback_model", "str", "--fallback-model", "Fallback model when default is overloaded",
     "haiku"),
    ("effort", "str", "--effort",
     "Effort level: low, medium, high, xhigh, max (model-dependent, not validated)", "high"),
    ("system_prompt", "str", "--system-prompt", "Replace default system prompt",
     "You are a senior Go developer"),
    ("append_system_prompt", "str", "--append-system-prompt", "Append to default system prompt",
     "Focus on security best practices"),
    ("tools", "multi", "--tools", "Built-in tools (\"\", \"default\", or specific names)",
     ["Bash", "Read", "Edit"]),
    ("allowed_tools", "joined", "--allowedTools",
     "Allowed tools with patterns (e.g., \"Bash(git:*)\")", ["Bash(git:*)", "Read"]),
    ("disallowed_tools", "joined", "--disallowedTools", "Denied tools", ["Write"]),
    ("permission_mode", "str", "--permission-mode",
     "Permission mode: acceptEdits, bypassPermissions, default, delegate, dontAsk, plan",
     "bypassPermissions"),
    ("dangerously_skip_permissions", "bool", "--dangerously-skip-permissions",
     "Bypass all permission checks (use in sandboxed environments only)", True),
    ("allow_dangerously_skip_permissions", "bool", "--allow-dangerously-skip-permissions",
     "Enable bypass as an option without enabling by default", False),
    ("input_format", "str", "--input-format", "Input format: text, stream-json", "text"),
    ("output_format", "str", "--output-format", "Output format: text, json, stream-json", "json"),
    ("include_partial_messages", "bool", "--include-partial-messages",
     "Include partial message chunks (stream-json only)", False),
    ("replay_user_messages", "bool", "--replay-user-messages", "Re-emit user messages on stdout",
     False),
    ("json_schema", "json_text", "--json-schema",
     "JSON Schema for structured output validation (extension: a JSON object is accepted too)",
     "{\"type\":\"object\"}"),
    ("max_budget_usd", "budget", "--max-budget-usd", "Maximum dollar amount for API calls", 5),
    ("max_turns", "int", "--max-turns",
     "Maximum number of agentic turns (0 = unlimited, unset = CLI default)", 30),
    ("mcp_configs", "multi", "--mcp-config", "MCP server config files or JSON strings", None),
    ("strict_mcp_config", "bool", "--strict-mcp-config", "Only use MCP servers from mcp_configs",
     False),
    ("agent", "str", "--agent", "Agent for current session", "reviewer"),
    ("agents", "object", "--agents", "Custom agents definition (JSON object)", None),
    ("add_dirs", "multi", "--add-dir", "Additional directories for tool access", None),
    ("plugin_dirs", "multi", "--plugin-dir", "Plugin directories", None),
    ("files", "multi", "--file", "File resources (format: file_id:path)", None),
    ("settings", "str", "--settings", "Path to settings JSON file or JSON string", None),
    ("setting_sources", "joined", "--setting-sources",
     "Setting sources to load: user, project, local", ["user", "project"]),
    ("betas", "multi", "--betas", "Beta headers for API requests", None),
    ("verbose", "bool", "--verbose", "Enable verbose mode", False),
    ("debug", "debug", "--debug", "Debug mode with optional category filter", "api,hooks"),
    ("disable_slash_commands", "bool", "--disable-slash-commands",
     "Disable all slash commands/skills", False),
)
# Options that are not plain flags: the session ones (see SessionPlan) and env-var options.
CLAUDE_OTHER: dict[str, tuple[str, str, Any]] = {
    "session_id": ("str", "Session ID (UUID) - used for both new and resumed sessions",
                   "550e8400-e29b-41d4-a716-446655440000"),
    "resume": ("bool", "Resume an existing session (requires session_id)", True),
    "continue": ("bool", "Continue most recent conversation in workspace (ignores session_id)",
                 False),
    "fork_session": ("bool", "Create new session ID when resuming", False),
    "prompt_caching_ttl": ("str",
                           "Prompt cache TTL: \"5m\" (FORCE_PROMPT_CACHING_5M=1) or \"1h\" "
                           "(ENABLE_PROMPT_CACHING_1H=1)",
                           "1h"),
    "bedrock_service_tier": ("str",
                             "Bedrock service tier: default, flex, priority "
                             "(ANTHROPIC_BEDROCK_SERVICE_TIER)",
                             "priority"),
    "enable_powershell_tool": ("bool",
                               "Sets CLAUDE_CODE_USE_POWERSHELL_TOOL=1 (Windows agent hosts only)",
                               False),
}
CLAUDE_KINDS = {name: kind for name, kind, *_ in CLAUDE_FLAGS} | \
    {name: row[0] for name, row in CLAUDE_OTHER.items()}
CHOICES = {"output_format": ("text", "json", "stream-json"), "input_format": ("text", "stream-json")}


def check_kind(where: str, value: Any, kind: str) -> None:
    """Raise BadRequest unless a JSON value fits an option kind."""
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "debug": lambda v: isinstance(v, (str, bool)),
        "multi": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "joined": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "budget": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "json_text": lambda v: isinstance(v, (str, dict)),
        "object": lambda v: isinstance(v, dict),
        "map": lambda v: isinstance(v, dict) and all(isinstance(i, str) for i in v.values()),
    }[kind](value)
    if not ok:
        expected = {"bool": "a boolean", "str": "a string", "debug": "a string",
                    "multi": "an array of strings", "joined": "an array of strings",
                    "int": "an integer", "budget": "a number", "json_text": "a JSON string",
                    "object": "an object", "map": "an object of strings"}[kind]
        raise BadRequest(f"Invalid request: {where} must be {expected}")


def validate_claude_options(options: Any) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadRequest("Invalid request: claude must be an object")
    for name, value in options.items():
        if name in CLAUDE_KINDS and value is not None:
            check_kind(f"claude.{name}", value, CLAUDE_KINDS[name])
    for name, allowed in CHOICES.items():
        if options.get(name) and options[name] not in allowed:
            raise BadRequest(f"Invalid request: claude.{name} must be one of "
                             f"{', '.join(allowed)}")
    for name, most in (("max_turns", 10000), ("max_budget_usd", 1e6)):
        value = options.get(name)
        if value is not None and not 0 <= value <= most:  # also refuses NaN and infinity
            raise BadRequest(f"Invalid request: claude.{name} must be between 0 and {most:g}")
    return {k: v for k, v in options.items() if k in CLAUDE_KINDS and v is not None}


def claude_argv(options: dict, session_flags: list[str]) -> list[str]:
    """The `claude` command line for one run (upstream's flags). The prompt is not in it: the CLI
    reads it on stdin, so that it shows in no process list and has no size limit."""
    argv = ["claude", "-p", *session_flags]
    for name, kind, flag, *_ in CLAUDE_FLAGS:
        value = options.get(name)
        if value is None or value is False or value == "" or value == []:
            continue
        if kind == "bool" or (kind == "debug" and value is True):
            argv.append(flag)
        elif kind in ("str", "debug", "int"):
            argv += [flag, str(value)]
        elif kind == "multi":
            argv += [flag, *value]
        elif kind == "joined":
            argv += [flag, ",".join(value)]
        elif kind == "budget":
            argv += [flag, f"{value:.2f}"]
        elif kind == "json_text":
            argv += [flag, value if isinstance(value, str) else json.dumps(value)]
        elif kind == "object":
            argv += [flag, json.dumps(value)]
    if options.get("output_format") == "stream-json" and "--verbose" not in argv:
        argv.append("--verbose")  # the CLI refuses stream-json in print mode without it
    return argv


def claude_env(options: dict) -> dict[str, str]:
    """Options that the CLI reads from its environment (upstream passes them so too)."""
    env = {}
    ttl = options.get("prompt_caching_ttl")
    if ttl == "1h":
        env["ENABLE_PROMPT_CACHING_1H"] = "1"
    elif ttl == "5m":
        env["FORCE_PROMPT_CACHING_5M"] = "1"
    if options.get("bedrock_service_tier"):
        env["ANTHROPIC_BEDROCK_SERVICE_TIER"] = options["bedrock_service_tier"]
    if options.get("enable_powershell_tool"):
        env["CLAUDE_CODE_USE_POWERSHELL_TOOL"] = "1"
    return env


def parse_json_lines(lines: Iterable[str | bytes]) -> Iterable[dict]:
    """The JSON objects among lines (text or bytes); anything else is skipped."""
    for line in lines:
        line = line.strip()
        if line[:1] in ("{", b"{"):
            try:
                value = json.loads(line)
            except (ValueError, RecursionError):  # deep nesting is the agent's choice too
                continue
            if isinstance(value, dict):
                yield value


def result_event(output: str) -> dict | None:
    """The CLI's final `result` object from json or stream-json output, if any."""
    text = output.strip()
    try:
        whole = json.loads(text)
        if isinstance(whole, dict):
            return whole
    except (ValueError, RecursionError):  # the agent's output: any text at all
        pass
    found = None
    for event in parse_json_lines(text.splitlines()):
        if event.get("type") == "result":
            found = event
    return found


def structured_output(output: str) -> Any:
    result = result_event(output)
    return None if result is None else result.get("structured_output")


# USD per million tokens: input, output, cache write, cache read (upstream's price table).
PRICES = (("haiku", (0.25, 1.25, 0.30, 0.025)), ("sonnet", (3.0, 15.0, 3.75, 0.30)),
          ("opus", (15.0, 75.0, 18.75, 1.50)))
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
              "cache_read_input_tokens")


def usage_summary(messages: dict[str, dict], model: str) -> dict | None:
    """Flat Usage object from {message id: usage}; None when nothing was found."""
    if not messages:
        return None
    totals = {k: sum(int(u.get(k) or 0) for u in messages.values()) for k in USAGE_KEYS}
    rates = next((r for family, r in PRICES if family in model.lower()), (0, 0, 0, 0))
    cost = sum(totals[k] * rate for k, rate in zip(USAGE_KEYS, rates)) / 1e6
    return drop_none({"model": model or None, **totals, "total_tokens": sum(totals.values()),
                      "estimated_cost_usd": round(cost, 6)})


CRASH_SIGNALS = {2: "SIGINT", 4: "SIGILL", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL",
                 11: "SIGSEGV", 15: "SIGTERM"}
COMPLETION_MARKERS = ("No messages returned", "Task completed", "finished successfully")


def crash_info(exit_code: int, output: str, reason: str | None = None) -> dict:
    """CrashInfo for an exit by signal (exit code > 128), as upstream derives it."""
    sig = CRASH_SIGNALS.get(exit_code - 128, f"signal {exit_code - 128}")
    partial = output[-2000:]
    if len(output) > 2000:
        partial = "..." + partial
    return drop_none({
        "exit_code": exit_code, "signal": sig,
        "reason": reason or f"Process exited with {sig}",
        "partial_output": partial or None,
        "task_completed": any(m in output for m in COMPLETION_MARKERS) or None,
    })


# ---------------------------------------------------------------------------
# Sessions — session homes (never following the agent's links), locks, transcripts
# ---------------------------------------------------------------------------

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
CONTAINER_UID = 1000  # the agent image's `user` (inside the container's user namespace)
CONTAINER_HOME = "/home/user"
MAX_TRANSCRIPT_LINE = 4 * 1024 * 1024
MESSAGES_PAGE_BYTES = 4 * 1024 * 1024  # the JSON of a page of history messages, at most
CUT_MARKER = " [stromboli: truncated, {} characters dropped]"
CUT_MARKER_ROOM = 64  # bytes of JSON a marker takes, at most
MAX_HOME_DEPTH = 128
ENTRY_BYTES = 512  # what a measured home's entry costs besides its blocks: inode, name
INIT_MARKER = ".stromboli-initialized"
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block
O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def check_session_id(session_id: Any) -> str:
    """Session ids become path names: only the lowercase UUID form is accepted."""
    if not isinstance(session_id, str) or not UUID_RE.match(session_id):
        raise BadRequest("invalid session ID: must be a lowercase UUID")
    return session_id


def cwd_folder(cwd: str) -> str:
    """The CLI's project folder name for a working directory."""
    return re.sub(r"[^A-Za-z0-9]", "-", cwd)


@dataclasses.dataclass(frozen=True)
class SessionPlan:
    """Which conversation a run continues, and the id its transcript lives under."""

    session_id: str
    mode: str  # new | resume | continue | fork
    source: str = ""  # the session a fork starts from

    @classmethod
    def of(cls, options: dict, fork_id: str | None = None) -> "SessionPlan":
        sid = options.get("session_id")
        if not sid and any(options.get(k) for k in ("resume", "continue", "fork_session")):
            raise BadRequest("Invalid request: claude.resume, claude.continue and "
                             "claude.fork_session need claude.session_id")
        if options.get("fork_session"):
            return cls(fork_id or str(uuid.uuid4()), "fork", sid)
        if options.get("continue"):
            return cls(sid, "continue")
        if options.get("resume"):
            return cls(sid, "resume")
        return cls(sid or str(uuid.uuid4()), "new")

    def argv(self) -> list[str]:
        """The CLI's session flags (it refuses --session-id beside --resume/--continue
        unless forking, so each mode gets exactly what it accepts)."""
        return {"new": ["--session-id", self.session_id],
                "resume": ["--resume", self.session_id],
                "continue": ["--continue"],
                "fork": ["--resume", self.source, "--fork-session",
                         "--session-id", self.session_id]}[self.mode]


def bounded_lines(fh: BinaryIO, limit: int) -> Iterable[bytes]:
    """The lines of a binary file; a line longer than `limit` is skipped without ever
    being held whole."""
    while line := fh.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := fh.readline(limit)) and not rest.endswith(b"\n"):
                pass
            continue
        yield line


def read_transcript(fh: BinaryIO) -> Iterable[dict]:
    """Each JSON object line of a transcript; unparseable, partial and oversized lines
    are skipped."""
    return parse_json_lines(bounded_lines(fh, MAX_TRANSCRIPT_LINE))


def transcript_usage(fh: BinaryIO) -> dict | None:
    """Usage of the assistant messages from the file's position on. The CLI writes one
    line per content block, each repeating its message's usage: grouped by message id."""
    messages: dict[str, dict] = {}
    model = ""
    for line in read_transcript(fh):
        message = line.get("message")
        if line.get("type") != "assistant" or not isinstance(message, dict):
            continue
        if isinstance(message.get("usage"), dict):
            key = message.get("id") or line.get("uuid") or str(len(messages))
            messages[key] = message["usage"]
            model = message.get("model") or model
    return usage_summary(messages, model)


def content_block(block: Any) -> dict:
    if not isinstance(block, dict):
        return {"type": "text", "text": str(block)}
    content = block.get("content")
    if isinstance(content, list):  # tool results may hold blocks: keep their text
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return drop_none({"type": block.get("type", ""), "text": block.get("text"),
                      "id": block.get("id"), "name": block.get("name"),
                      "input": block.get("input"), "tool_use_id": block.get("tool_use_id"),
                      "content": content, "is_error": block.get("is_error")})


MESSAGE_TYPES = ("user", "assistant")


def transcript_message(line: dict) -> dict | None:
    """A transcript line as upstream's history Message; None for the CLI's own
    bookkeeping lines (attachments, modes, titles, summaries, queue operations...), which
    are no conversation and whose types upstream's document does not know."""
    if line.get("type") not in MESSAGE_TYPES:
        return None
    message = line.get("message") if isinstance(line.get("message"), dict) else {}
    content = message.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else \
        [content_block(b) for b in content or [] if b is not None]
    result = line.get("toolUseResult") if isinstance(line.get("toolUseResult"), dict) else None
    return drop_none({
        "uuid": line.get("uuid", ""), "parent_uuid": line.get("parentUuid"),
        "type": line.get("type", ""), "session_id": line.get("sessionId", ""),
        "timestamp": line.get("timestamp") or rfc3339(time.time()),
        "cwd": line.get("cwd"), "git_branch": line.get("gitBranch"),
        "version": line.get("version"), "permission_mode": line.get("permissionMode"),
        "content": drop_none({"role": message.get("role", ""), "model": message.get("model"),
                              "message_id": message.get("id"), "content": blocks,
                              "stop_reason": message.get("stop_reason"),
                              "usage": message.get("usage")}),
        "tool_result": drop_none({"stdout": result.get("stdout"), "stderr": result.get("stderr"),
                                  "interrupted": result.get("interrupted"),
                                  "is_image": result.get("isImage")}) if result else None,
    })


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def json_size(message: dict) -> int:
    """Bytes of a message's JSON; one nested too deeply to encode counts as a whole page
    (message_json replaces it with a stub)."""
    try:
        return len(compact_json(message))
    except RecursionError:
        return MESSAGES_PAGE_BYTES


def fair_shares(sizes: list[int], room: int) -> list[int]:
    """Each size, or less where they do not all fit in `room`: the smallest are kept
    whole and the others share what is left equally."""
    shares = list(sizes)
    for done, index in enumerate(sorted(range(len(sizes)), key=sizes.__getitem__)):
        shares[index] = min(sizes[index], room // (len(sizes) - done))
        room -= shares[index]
    return shares


def json_strings(value: Any) -> Iterable[str]:
    """The strings in a JSON value (not its keys), in document order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (dict, list)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from json_strings(item)


def map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """A copy of a JSON value with each of its strings (not its keys) changed, in document
    order (the order of json_strings)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {key: map_strings(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [map_strings(item, change) for item in value]
    return value


def cut_text(text: str, size: int, share: int) -> str:
    """A string whose JSON takes `size` bytes, in at most `share`: whole, or its start and
    a marker saying how much was dropped."""
    if size <= share:
        return text
    room = max(0, share - CUT_MARKER_ROOM)
    keep = len(text) * room // size  # as dense as the whole, checked below
    while keep and len(compact_json(text[:keep])) > room:
        keep = keep * 3 // 4
    return text[:keep] + CUT_MARKER.format(len(text) - keep)


def message_json(message: dict, room: int) -> str:
    """A history message as JSON in at most `room` (>= 1 KiB) bytes. The agent writes its
    transcript, so a message may be huge (a 4 MiB line of 2-byte characters is 12 MiB of
    JSON, a 6-byte escape each): then its strings share the room — the short ones whole,
    the long ones cut with a marker — and should its shape alone not fit (thousands of
    keys, deep nesting), a stub says what was dropped."""
    try:
        text = compact_json(message)
        if len(text) <= room:
            return text
        sizes = [len(compact_json(s)) for s in json_strings(message)]
        shares = iter(zip(sizes, fair_shares(sizes, room - (len(text) - sum(sizes)))))
        cut = compact_json(map_strings(message, lambda s: cut_text(s, *next(shares))))
        if len(cut) <= room:
            return cut
    except RecursionError:  # nesting is the agent's choice too
        pass
    kept = {key: message[key] for key in ("uuid", "type", "session_id", "timestamp")
            if isinstance(message.get(key), str) and len(message[key]) <= 100}
    return compact_json({**kept, "content": {"role": kept.get("type", ""), "content": [
        {"type": "text", "text": "[stromboli: message dropped: its JSON does not fit in "
                                 f"{room} bytes]"}]}})


def transcript_title(fh: BinaryIO) -> str:
    """A session's title: the last title the CLI recorded (a UserPromptSubmit hook's
    sessionTitle, a custom title or a summary), else its first prompt, shortened."""
    title, first_prompt = "", ""
    for line in read_transcript(fh):
        hook = line.get("hookSpecificOutput")
        if isinstance(hook, dict) and isinstance(hook.get("sessionTitle"), str):
            title = hook["sessionTitle"]
        elif line.get("type") == "custom-title" and isinstance(line.get("customTitle"), str):
            title = line["customTitle"]
        elif line.get("type") == "summary" and isinstance(line.get("summary"), str):
            title = line["summary"]
        elif not first_prompt and line.get("type") == "user":
            content = (line.get("message") or {}).get("content")
            if isinstance(content, str):
                first_prompt = content
    if title:
        return title
    first_prompt = " ".join(first_prompt.split())
    return first_prompt if len(first_prompt) <= 80 else first_prompt[:79] + "…"


class HomeError(Exception):
    """A session home the daemon will not work with (too deep, over its quota)."""


class SafeHome:
    """One session home, held by a directory fd. The agent writes to it freely, so every
    path below it is walked one name at a time with O_NOFOLLOW relative to its parent's
    fd: a link the agent made is never followed, and anything that is not a regular file
    or a directory counts as absent. All methods block: call them through a thread."""

    def __init__(self, fd: int, owner: int | None):
        self.fd, self.owner = fd, owner

    @classmethod
    @contextlib.contextmanager
    def open(cls, root: pathlib.Path, name: str, owner: int | None, create: bool = False):
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            home = cls(root_fd, owner)
            home.fd = home._open_dir(root_fd, name, create)
        finally:
            os.close(root_fd)
        try:
            yield home
        finally:
            os.close(home.fd)

    @staticmethod
    def _check(name: str) -> str:
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise ValueError(f"not a plain name: {name!r}")
        return name

    def _open_dir(self, parent: int, name: str, create: bool) -> int:
        try:
            return os.open(self._check(name), O_DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:  # ELOOP: a link; ENOTDIR: a file, FIFO, device...
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            if not create:
                raise FileNotFoundError(errno.ENOENT, "not a folder", name) from None
            os.unlink(name, dir_fd=parent)  # removes the link itself, never its target
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, O_DIR, dir_fd=parent)
        self._own(fd)
        return fd

    def _own(self, fd: int) -> None:
        if self.owner is not None:
            os.fchown(fd, self.owner, self.owner)

    @contextlib.contextmanager
    def folder(self, *parts: str, create: bool = False):
        """The fd of a folder below the home (FileNotFoundError when it is not one)."""
        fd = os.dup(self.fd)
        try:
            for part in parts:
                child = self._open_dir(fd, part, create)
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def entries(fd: int, every: bool = False) -> list[tuple[str, os.stat_result]]:
        """The regular files and folders in a folder (or, with `every`, all its entries:
        links, FIFOs...), by lstat."""
        found = []
        with os.scandir(fd) as listing:
            for entry in listing:
                info = entry.stat(follow_symlinks=False)
                if every or stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
                    found.append((entry.name, info))
        return found

    @staticmethod
    def file_stat(fd: int, name: str) -> os.stat_result | None:
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return info if stat.S_ISREG(info.st_mode) else None

    def read(self, fd: int, name: str) -> BinaryIO:
        """A regular file for reading; FileNotFoundError for anything else."""
        file_fd = os.open(self._check(name), O_READ, dir_fd=fd)
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            os.close(file_fd)
            raise FileNotFoundError(errno.ENOENT, "not a regular file", name)
        return os.fdopen(file_fd, "rb")

    def write(self, fd: int, name: str, data: bytes) -> None:
        """Create or replace a small regular file, whatever stood at that name."""
        self.remove(fd, name)
        file_fd = os.open(self._check(name), O_CREATE, 0o644, dir_fd=fd)
        with os.fdopen(file_fd, "wb") as out:
            self._own(file_fd)
            out.write(data)

    @staticmethod
    def remove(fd: int, name: str) -> None:
        """Remove whatever stands at a name (a link itself, never its target; a folder
        with everything in it)."""
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            SafeHome._empty(fd, name)
            os.rmdir(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)

    @staticmethod
    def _empty(parent: int, name: str) -> None:
        """Empty a folder however deeply it nests, without recursion and with two fds:
        the folders inside each child folder are moved up into the folder (a rename
        follows no link), then the child, which holds no folder any more, is emptied and
        removed; until no child folder is left."""
        top = os.open(name, O_DIR, dir_fd=parent)
        moved = itertools.count()
        try:
            while children := SafeHome._unlink_files(top):
                for child in children:
                    try:
                        child_fd = os.open(child, O_DIR, dir_fd=top)
                    except OSError as exc:  # gone, or no folder any more: the next round
                        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                            continue
                        raise
                    try:
                        for inner in SafeHome._unlink_files(child_fd):
                            SafeHome._move_up(child_fd, inner, top, moved)
                    finally:
                        os.close(child_fd)
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        os.rmdir(child, dir_fd=top)
        finally:
            os.close(top)

    @staticmethod
    def _unlink_files(fd: int) -> list[str]:
        """Unlink everything in a folder but its folders → their names."""
        folders = []
        with os.scandir(fd) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.name)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
        return folders

    @staticmethod
    def _move_up(source: int, name: str, target: int, moved: Iterator[int]) -> None:
        """Move a folder into `target` under a name that is free there."""
        while True:
            try:
                return os.rename(name, f".stromboli-removing-{next(moved)}", src_dir_fd=source,
                                 dst_dir_fd=target)
            except OSError as exc:  # the agent's own entry has that name: take the next
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR,
                                     errno.EISDIR):
                    raise

    def walk(self, every: bool = False
             ) -> Iterable[tuple[tuple[str, ...], int, list[tuple[str, os.stat_result]]]]:
        """(path parts, folder fd, entries) for the home and every folder below it,
        parents first, iteratively; each folder is reopened name by name from the home."""
        pending: list[tuple[str, ...]] = [()]
        while pending:
            parts = pending.pop()
            if len(parts) > MAX_HOME_DEPTH:
                raise HomeError(f"session home is nested deeper than {MAX_HOME_DEPTH} folders")
            try:
                with self.folder(*parts) as fd:
                    entries = self.entries(fd, every)
                    yield parts, fd, entries
            except FileNotFoundError:
                continue  # replaced while we walked: it is not a folder any more
            pending += [(*parts, name) for name, info in entries if stat.S_ISDIR(info.st_mode)]

    def size(self) -> int:
        """What the home costs the host's disk: the blocks allocated to each of its
        entries (not their apparent size: a sparse or preallocated file counts what it
        holds) plus an inode's worth per entry (links and empty files take no block)."""
        return sum(info.st_blocks * 512 + ENTRY_BYTES for _, _, entries in self.walk(every=True)
                   for _, info in entries)

    def space(self) -> tuple[int, int]:
        """(bytes used, bytes free) of the home's own filesystem."""
        fs = os.fstatvfs(self.fd)
        return (fs.f_blocks - fs.f_bfree) * fs.f_frsize, fs.f_bavail * fs.f_frsize

    def own_all(self) -> None:
        """Give the whole home to the owner (homes made for another uid). A file with
        other hard links is left alone: it may be someone else's."""
        self._own(self.fd)
        for _, fd, entries in self.walk():
            for name, info in entries:
                if stat.S_ISDIR(info.st_mode) or info.st_nlink == 1:
                    os.chown(name, self.owner, self.owner, dir_fd=fd, follow_symlinks=False)

    def copy_to(self, target: "SafeHome", limit: int) -> None:
        """Copy the regular files and folders into another home; links, FIFOs and devices
        are left out. HomeError past `limit` bytes (0 = no limit) or when the target's own
        filesystem is full."""
        try:
            self._copy_to(target, limit)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise HomeError(f"session home is at its quota ({exc.strerror})") from None

    def _copy_to(self, target: "SafeHome", limit: int) -> None:
        total = 0
        for parts, fd, entries in self.walk():
            with target.folder(*parts, create=True) as out:
                for name, info in entries:
                    if stat.S_ISDIR(info.st_mode):
                        continue
                    total += info.st_size
                    if limit and total > limit:
                        raise HomeError(f"session home is over its quota of {format_size(limit)}")
                    try:
                        source = self.read(fd, name)
                    except FileNotFoundError:
                        continue
                    with source, os.fdopen(os.open(name, O_CREATE, info.st_mode & 0o777 | 0o600,
                                                   dir_fd=out), "wb") as copy:
                        target._own(copy.fileno())
                        shutil.copyfileobj(source, copy, 1024 * 1024)


def host_tool(name: str) -> str | None:
    """A host program's path (the sbin folders too: they are not always on PATH)."""
    return shutil.which(name, path=os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin",
                                                     "/sbin")))


# No journal (a home is scratch space, and it is made in milliseconds), no reserved blocks,
# inode tables left as the sparse file has them (zeros) rather than written at mount.
MKFS_OPTIONS = ("-q", "-F", "-m", "0", "-O", "^has_journal", "-E",
                "lazy_itable_init=1,nodiscard,root_owner={owner}:{owner}")
# `loop` sets the loop device up with autoclear (unmounting frees it); `discard` gives the
# blocks of deleted files back to the host.
HOME_MOUNT_OPTIONS = "loop,nosuid,nodev,noatime,discard,noinit_itable"
MIN_FREE_SHARE = 100  # a home on its own filesystem with under 1/100 of it free is full


class HomeImages:
    """Session homes that are filesystems of their own: a sparse image file per home
    (`<sessions dir>/.images/<sid>.img`, the quota's size, ext4) mounted on the home
    through a loop device, so that the kernel holds a home at its quota (a write past it
    is ENOSPC inside the container) and bounds its inodes. Mounts outlive the daemon on
    purpose: a job's container may write into its home across a restart, and mounting an
    image a second time (another loop device) would corrupt it. So a home is mounted only
    when it is not mounted already, and unmounted only when its session is deleted. A home
    that is a plain folder (made before, or in plain mode) stays one. All methods block
    (mkfs, mount): call them through a thread."""

    def __init__(self, root: pathlib.Path, size: int, owner: int, make_new: bool):
        self.root, self.size, self.owner, self.make_new = root, size, owner, make_new
        self.folder = root / ".images"
        self._lock = threading.Lock()  # one mount (or unmount) at a time
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    @staticmethod
    def unavailable(podman_url: str) -> str | None:
        """Why homes cannot be images on this host, or None."""
        if os.geteuid() != 0:
            return "the daemon does not run as root"
        if not os.path.exists("/dev/loop-control"):
            return "the host has no loop devices (/dev/loop-control; try `modprobe loop`)"
        missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if not host_tool(tool)]
        if missing:
            return f"{', '.join(missing)} not found (install e2fsprogs and mount)"
        return podman_namespace_apart(podman_url) or None

    def image(self, session_id: str) -> pathlib.Path:
        return self.folder / f"{session_id}.img"

    def mounted(self, session_id: str) -> bool:
        """Whether the home is a mount point (its own filesystem)."""
        try:
            return os.lstat(self.root / session_id).st_dev != os.stat(self.root).st_dev
        except FileNotFoundError:
            return False

    def attach(self, session_id: str, create: bool) -> None:
        """Mount the home's image unless it is mounted; with `create`, a home that does not
        exist yet gets its image first (when new homes are images)."""
        with self._lock:
            image = self.image(session_id)
            fresh = not image.exists()
            if fresh:
                if not (create and self.make_new) or os.path.lexists(self.root / session_id):
                    return
                self._make(image)
            if not self.mounted(session_id):
                self._mount(session_id, image, fresh)

    def _make(self, image: pathlib.Path) -> None:
        partial = image.with_suffix(".new")
        try:
            with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                   0o600), "wb") as out:
                out.truncate(self.size)
            run_host_tool("mkfs.ext4", *(o.format(owner=self.owner) for o in MKFS_OPTIONS),
                          str(partial))
            os.replace(partial, image)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def _mount(self, session_id: str, image: pathlib.Path, fresh: bool) -> None:
        home = self.root / session_id
        with contextlib.suppress(FileExistsError):
            os.mkdir(home, 0o700)
        run_host_tool("mount", "-t", "ext4", "-o", HOME_MOUNT_OPTIONS, str(image), str(home))
        if fresh:  # the home looks as a folder would: the agent's, and nothing in it
            os.chmod(home, 0o700)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(home / "lost+found")

    def detach(self, session_id: str) -> None:
        """Unmount a home and delete its image. Lazily: a container that still uses the
        home (it outlived a restart) keeps its filesystem until it ends."""
        with self._lock:
            for _ in range(8):  # a mount stacked on another by hand: each goes
                if not self.mounted(session_id):
                    break
                run_host_tool("umount", "--lazy", str(self.root / session_id))
            self.image(session_id).unlink(missing_ok=True)

    def attach_all(self) -> int:
        """Mount every image that is not mounted (after a reboot) → how many were."""
        mounted = 0
        for image in self.folder.glob("*.img"):
            session_id = image.stem
            if not UUID_RE.match(session_id) or self.mounted(session_id):
                continue
            try:
                self.attach(session_id, create=False)
                mounted += 1
            except (OSError, Unavailable) as exc:
                log.warning("could not mount a session home", extra=fields(
                    session_id=session_id, error=getattr(exc, "message", None) or str(exc)))
        return mounted


def session_images(cfg: Config, podman_url: str) -> HomeImages | None:
    """How session homes are made (agent.session_filesystem): images when asked for (loop)
    or possible (auto), with a warning when the quota will only be measured; ConfigError
    when loop is asked for and cannot be. Images made before are mounted whatever the
    mode, when the host can (and Podman, at `podman_url` if known yet, sees the mounts)."""
    mode, quota = cfg.agent_session_filesystem, cfg.agent_session_quota
    host_problem = HomeImages.unavailable(podman_url)
    problem = host_problem or ("the quota is under 1m, too small for a filesystem"
                               if quota < 1024 ** 2 else None)
    if mode == "auto" and not problem and cfg.sessions_host_path != cfg.sessions_path:
        problem = "agent.sessions_host_dir is set: Podman sees the sessions dir elsewhere, " \
                  "where the daemon's mounts may not reach (set loop if they do)"
    wanted = mode == "loop" or (mode == "auto" and quota > 0)
    if wanted and problem:
        if mode == "loop":
            raise ConfigError(f"agent.session_filesystem is loop, but {problem}")
        log.warning("session homes are plain folders: their quota is only measured (every 2 s "
                    "during a run), not enforced by the kernel", extra=fields(reason=problem))
    if host_problem:
        return None
    return HomeImages(cfg.sessions_path, quota, cfg.agent_host_uid, make_new=wanted and not problem)


def run_host_tool(name: str, *args: str) -> None:
    """Run mkfs, mount or umount; Unavailable with its message when it fails."""
    try:
        done = subprocess.run([host_tool(name) or name, *args], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"session home: {name} failed: {exc}") from None
    if done.returncode != 0:
        message = " ".join((done.stderr or done.stdout).split())[:300]
        raise Unavailable(f"session home: {name} failed: {message}")


@dataclasses.dataclass(frozen=True)
class Transcript:
    """Where a conversation's transcript is: its project folder and file name."""

    folder: str
    name: str
    size: int
    mtime: float


class SessionStore:
    """Session homes under the sessions dir (each is $HOME of its runs' containers),
    and one lock per session so that two runs never write one transcript at once.
    Every disk access goes through SafeHome and blocks: call these through a thread."""

    def __init__(self, root: pathlib.Path, host_root: pathlib.Path, owner: int | None,
                 quota: int, images: HomeImages | None = None):
        self.root, self.host_root, self.owner, self.quota = root, host_root, owner, quota
        self.images = images  # None: every home is a plain folder, its size measured
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: collections.Counter = collections.Counter()
        self._titles: dict[str, tuple[tuple, str]] = {}
        self._sizes: dict[str, int] = {}
        root.mkdir(parents=True, exist_ok=True)

    def host_home(self, session_id: str) -> str:
        return str(self.host_root / check_session_id(session_id))

    def _open(self, session_id: str, create: bool = False):
        check_session_id(session_id)
        if self.images:
            self.images.attach(session_id, create)
        return SafeHome.open(self.root, session_id, self.owner, create)

    def bounded(self, session_id: str) -> bool:
        """Whether the home is a filesystem of its own (the kernel enforces its quota)."""
        return self.images is not None and self.images.mounted(check_session_id(session_id))

    def exists(self, session_id: str) -> bool:
        try:
            with self._open(session_id):
                return True
        except FileNotFoundError:
            return False

    def ensure(self, session_id: str) -> None:
        with self._open(session_id, create=True) as home:
            if self.owner is not None and os.fstat(home.fd).st_uid != self.owner:
                home.own_all()  # made for another uid (before user namespaces)
            with home.folder(".claude", create=True):
                pass

    def transcript(self, session_id: str, conversation: str = "") -> Transcript | None:
        """The newest transcript of a conversation (default: the session's own)."""
        name = f"{check_session_id(conversation or session_id)}.jsonl"
        found = []
        try:
            with self._open(session_id) as home, home.folder(".claude", "projects") as fd:
                for folder, info in home.entries(fd):
                    if not stat.S_ISDIR(info.st_mode):
                        continue
                    with contextlib.suppress(FileNotFoundError), home.folder(
                            ".claude", "projects", folder) as project:
                        if (file := home.file_stat(project, name)) is not None:
                            found.append(Transcript(folder, name, file.st_size, file.st_mtime))
        except FileNotFoundError:
            return None
        return max(found, key=lambda t: t.mtime, default=None)

    @contextlib.contextmanager
    def read(self, session_id: str, transcript: Transcript):
        with self._open(session_id) as home, \
                home.folder(".claude", "projects", transcript.folder) as fd, \
                home.read(fd, transcript.name) as fh:
            yield fh

    def usage(self, session_id: str, before: Transcript | None = None) -> dict | None:
        """Usage recorded in the session's transcript (after `before`, when it is the same
        file, so that a run counts only its own messages)."""
        current = self.transcript(session_id)
        if current is None:
            return None
        try:
            with self.read(session_id, current) as fh:
                if before is not None and before.folder == current.folder:
                    fh.seek(before.size)
                return transcript_usage(fh)
        except FileNotFoundError:
            return None

    def relocate(self, session_id: str, conversation: str, cwd: str) -> None:
        """Move a conversation's transcript (in this session's home) into the project
        folder of `cwd`: the CLI only resumes conversations recorded under its cwd."""
        current = self.transcript(session_id, conversation)
        target = cwd_folder(cwd)
        if current is None or current.folder == target:
            return
        with self._open(session_id) as home, \
                home.folder(".claude", "projects", current.folder) as source, \
                home.folder(".claude", "projects", target, create=True) as dest:
            side = current.name.removesuffix(".jsonl")  # the CLI's side folder
            for name, info in home.entries(source):
                if name in (current.name, side):
                    home.remove(dest, name)
                    os.replace(name, name, src_dir_fd=source, dst_dir_fd=dest)

    def fork(self, source: str, session_id: str) -> None:
        """A new session home holding a copy of `source`'s history (within the quota)."""
        try:
            with self._open(source) as original, self._open(session_id, create=True) as copy:
                original.copy_to(copy, self.quota)
        except BaseException:
            self.remove(session_id)
            raise

    def settle_fork(self, session_id: str, source: str) -> None:
        """After a fork's run: drop the copy of the source's transcript; a fork that wrote
        no conversation of its own (it failed early) is removed altogether."""
        while (copied := self.transcript(session_id, source)) is not None:
            with self._open(session_id) as home, \
                    home.folder(".claude", "projects", copied.folder) as fd:
                home.remove(fd, copied.name)
        if self.transcript(session_id) is None:
            self.remove(session_id)

    def open_for_run(self, plan: SessionPlan, cwd: str) -> None:
        """Make a run's home ready: a copy of the source for a fork (within the quota),
        else the session's own; check that its history fits the mode and the home its
        quota; for a continued conversation, put the transcript in the project folder of
        `cwd`, where the CLI looks. The caller holds the session's (and source's) lock."""
        sid = plan.session_id
        if plan.mode == "fork":
            if self.transcript(plan.source) is None:
                raise NotFound(f"session has no history: {plan.source}")
            self.check_quota(plan.source)
            self.fork(plan.source, sid)
        else:
            self.ensure(sid)
            history = self.transcript(sid)
            if plan.mode == "new" and history is not None:
                raise Conflict(f"session {sid} already has history; set claude.resume=true "
                               "to continue it")
            if plan.mode != "new" and history is None:
                raise NotFound(f"session has no history: {sid}")
            self.check_quota(sid)
        if plan.mode != "new":
            self.relocate(sid, plan.source or sid, cwd)

    def check_quota(self, session_id: str) -> None:
        if problem := self.over_quota(session_id):
            raise Conflict(problem)

    def initialized(self, session_id: str) -> bool:
        with self._open(session_id) as home:
            return home.file_stat(home.fd, INIT_MARKER) is not None

    def mark_initialized(self, session_id: str) -> None:
        with self._open(session_id) as home:
            home.write(home.fd, INIT_MARKER, (rfc3339(time.time()) or "").encode())

    def size(self, session_id: str) -> int:
        return self._measure(session_id)[0]

    def _measure(self, session_id: str) -> tuple[int, int | None]:
        """(bytes the home takes, bytes its own filesystem has free — None for a plain
        folder, whose quota is only measured)."""
        with self._open(session_id) as home:
            used, free = home.space() if self.bounded(session_id) else (home.size(), None)
        self._sizes[session_id] = used
        return used, free

    def over_quota(self, session_id: str) -> str | None:
        """Why the home cannot be used (full, over its quota, too deep), or None."""
        try:
            size, free = self._measure(session_id)
        except FileNotFoundError:
            return None
        except HomeError as exc:
            return str(exc)
        if free is not None:
            if free >= (size + free) / MIN_FREE_SHARE:
                return None
            return (f"session home is at its quota ({format_size(size)} used, "
                    f"{format_size(free)} free): delete files in it or delete the session")
        if self.quota and size > self.quota:
            return (f"session home is over its quota ({format_size(size)} used of "
                    f"{format_size(self.quota)}): delete files in it or delete the session")
        return None

    def list(self) -> list[dict]:
        """Sessions newest first, with titles (cached by transcript size and mtime) and
        the home's size (as of its last run or check)."""
        entries = []
        with os.scandir(self.root) as homes:
            for home in homes:
                if not (UUID_RE.match(home.name) and home.is_dir(follow_symlinks=False)):
                    continue
                transcript = self.transcript(home.name)
                mtime = transcript.mtime if transcript else \
                    home.stat(follow_symlinks=False).st_mtime
                entries.append((mtime, home.name, transcript))
        entries.sort(reverse=True)
        return [{"id": sid, "title": self._title(sid, transcript),
                 "size_bytes": self._cached_size(sid)} for _, sid, transcript in entries]

    def _cached_size(self, session_id: str) -> int:
        if session_id not in self._sizes:
            with contextlib.suppress(FileNotFoundError, HomeError):
                self.size(session_id)
        return self._sizes.get(session_id, 0)

    def _title(self, session_id: str, transcript: Transcript | None) -> str:
        if transcript is None:
            return ""
        key = (transcript.folder, transcript.size, transcript.mtime)
        cached = self._titles.get(session_id)
        if cached and cached[0] == key:
            return cached[1]
        try:
            with self.read(session_id, transcript) as fh:
                title = transcript_title(fh)
        except FileNotFoundError:
            return ""
        self._titles[session_id] = (key, title)
        return title

    def messages(self, session_id: str, offset: int, limit: int) -> tuple[list[str], int]:
        """One page of the history as JSON texts that together take MESSAGES_PAGE_BYTES at
        most (the large ones cut to share it), and the number of messages in all. The
        transcript is read twice, so that no more than a page is ever held: once to
        measure the page's messages, once to cut them."""
        sizes, total = [], 0
        for message in self._messages(session_id):
            if offset <= total < offset + limit:
                sizes.append(json_size(message))
            total += 1
        shares = fair_shares(sizes, MESSAGES_PAGE_BYTES - len(sizes))  # and the commas
        with contextlib.closing(self._messages(session_id)) as messages:
            page = [message_json(message, share) for share, message
                    in zip(shares, itertools.islice(messages, offset, None))]
        return page, total

    def message(self, session_id: str, message_id: str) -> str | None:
        """One message's JSON (within MESSAGES_PAGE_BYTES), found by its uuid."""
        with contextlib.closing(self._messages(session_id)) as messages:
            found = next((m for m in messages if m["uuid"] == message_id), None)
        return None if found is None else message_json(found, MESSAGES_PAGE_BYTES)

    def _messages(self, session_id: str) -> Iterable[dict]:
        transcript = self.transcript(session_id)
        if transcript is None:
            raise NotFound(f"session history not found: {session_id}")
        try:
            with self.read(session_id, transcript) as fh:
                for line in read_transcript(fh):
                    if (message := transcript_message(line)) is not None:
                        yield message
        except FileNotFoundError:
            raise NotFound(f"session history not found: {session_id}") from None

    def delete(self, session_id: str) -> None:
        if not self.exists(session_id):
            raise NotFound(f"session not found: {session_id}")
        self.remove(session_id)

    def remove(self, session_id: str) -> None:
        check_session_id(session_id)
        if self.images:
            self.images.detach(session_id)  # what stays is the folder it was mounted on
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            SafeHome.remove(root_fd, session_id)
        finally:
            os.close(root_fd)
        self._titles.pop(session_id, None)
        self._sizes.pop(session_id, None)

    def busy(self, session_id: str) -> bool:
        return self._users[session_id] > 0

    @contextlib.asynccontextmanager
    async def lock(self, session_id: str):
        self._users[session_id] += 1
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            self._users[session_id] -= 1
            if not self._users[session_id]:
                del self._users[session_id]
                self._locks.pop(session_id, None)


# ---------------------------------------------------------------------------
# Runner — request validation, container spec, run lifecycle
# ---------------------------------------------------------------------------

CLI_MOUNT = "/opt/claude"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROMPT_FILE = "/run/stromboli/prompt"  # the CLI reads the prompt on stdin from here
SECRETS_DIR = "/run/secrets"
MANAGED_LABEL = {"managed-by": "stromboli"}
USERNS_SIZE = 65536
QUOTA_CHECK_INTERVAL = 2.0
NOT_STARTED = ("created", "configured", "initialized")  # Podman states before a start
MAX_RUN_TIMEOUT = 7 * 86400
WORKDIR_RE = re.compile(r"^[A-Za-z0-9/_.-]+$")
IMAGE_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._/:@-]*$")
SECRET_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
BLOCKED_CONTAINER_PATHS = (
    "/home/user/.claude", "/home/user/.ssh", "/home/user/.gnupg", "/home/user/.aws",
    "/home/user/.docker", "/home/user/.kube", "/home/user/.config", "/home/user/.local",
    "/home/user/.netrc", "/home/user/.git-credentials", "/home/user/.password-store",
    "/home/user/.bashrc", "/home/user/.bash_profile", "/home/user/.profile", "/home/user/.zshrc",
    "/etc", "/root", "/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/lib",
    "/lib64", "/var/run", "/run", "/proc", "/sys", "/dev")
# Targets that would replace part of the image (or the agent's home): refused, and so is
# any folder above them ("/", "/usr", "/home"...).
SHADOWED_CONTAINER_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                            "/etc", CLI_MOUNT, "/home/user")
# No `U`: it chowns the host tree recursively, even read-only.
MOUNT_OPTIONS = {"ro", "rw", "z", "Z", "noexec", "nosuid", "nodev", "rslave", "rprivate",
                 "rshared", "slave", "private", "shared", "nocopy", "copy"}
INCOMPATIBLE_IMAGES = ("*alpine*", "*-alpine", "alpine:*", "gcr.io/distroless/*", "scratch",
                       "busybox*")
# (kind, description, example) of each podman option: parsing and the OpenAPI document.
PODMAN_OPTIONS: dict[str, tuple[str, str, Any]] = {
    "image": ("str", "Container image override (must match allowed patterns)", "python:3.12"),
    "volumes": ("multi", "Volume mounts (host:container or host:container:options format)",
                ["/data:/data:ro"]),
    "secrets_env": ("map",
                    "Secrets injected as environment variables (ENV_NAME → Podman secret name)",
                    None),
    "timeout": ("str", "Container timeout (e.g., \"5m\", \"1h\", \"30s\")", "5m"),
    "memory": ("str", "Memory limit (e.g., \"512m\", \"1g\")", "512m"),
    "cpus": ("str", "CPU limit (e.g., \"0.5\", \"2\")", "1"),
    "cpu_shares": ("int", "CPU shares (relative weight, default 1024)", 512),
    "lifecycle": ("object", "Lifecycle hooks for running commands at container events", None),
    "environment": ("object",
                    "Compose environment; not supported by this server (a non-empty type is a 400)",
                    None),
}
PODMAN_KINDS = {name: row[0] for name, row in PODMAN_OPTIONS.items()}
HOOK_KEYS = ("on_create_command", "post_create", "post_start")
ENVIRONMENT_KEYS = ("type", "path", "service", "build_timeout")  # upstream's EnvironmentConfig
TMPFS_PATHS = ("/tmp", "/var/tmp")


def shell_quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def check_workdir(workdir: str) -> None:
    """Upstream's workdir rules, with upstream's messages."""
    prefix = "workdir validation failed: "
    if len(workdir) > 4096:
        raise BadRequest(prefix + "workdir path too long (max 4096 characters)")
    if not workdir.startswith("/"):
        raise BadRequest(prefix + "workdir must be an absolute path starting with /")
    if not WORKDIR_RE.match(workdir):
        raise BadRequest(prefix + "workdir contains invalid characters (only alphanumeric, /, _,"
                         " ., - allowed)")
    if ".." in workdir:
        raise BadRequest(prefix + "workdir cannot contain path traversal (..) sequences")


def normalize_image(name: str) -> str:
    first, sep, rest = name.partition("/")
    if not sep:
        return f"docker.io/library/{name}"
    if "." in first or ":" in first or first == "localhost":
        return name
    return f"docker.io/{name}"


def image_matches(name: str, patterns: Iterable[str]) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, p) or p.strip("*") in lowered for p in patterns)


def check_image(cfg: Config, image: str) -> None:
    """Upstream's image rules: the allowlist, and the CLI-mount compatibility check."""
    prefix = "image validation failed: "
    if len(image) > 255 or not IMAGE_NAME_RE.match(image) or ".." in image:
        raise BadRequest(f"{prefix}invalid image name format")
    patterns = cfg.agent_allowed_image_patterns
    if patterns and not any(image == p or fnmatch.fnmatchcase(image, p)
                            or fnmatch.fnmatchcase(normalize_image(image), normalize_image(p))
                            for p in patterns):
        raise BadRequest(f'{prefix}image "{image}" not in allowed patterns')
    if cfg.agent_mount_claude_cli and image_matches(image, INCOMPATIBLE_IMAGES):
        raise BadRequest(f'{prefix}image "{image}" is incompatible with Claude CLI mount '
                         "(Alpine/musl-based images not supported, use glibc-based alternatives "
                         "like debian/slim)")


class Volume(NamedTuple):
    """One checked `host:container[:options]` entry. `host` is absolute and normalized by
    its letters only: it is never resolved, links on it are refused when it is opened."""

    host: str
    target: str
    options: list[str]


def check_volume(cfg: Config, volume: str) -> Volume:
    """Upstream's volume rules: parse and validate one `host:container[:options]` entry.
    A pure check (the allowlist by the path's letters): the host path is opened, never
    following a link, only when its container is made (open_volume)."""
    prefix = "volume validation failed: "
    parts = volume.split(":")
    if len(parts) < 2 or len(parts) > 3 or not parts[0] or not parts[1]:
        raise BadRequest(f'{prefix}invalid volume format "{volume}": invalid volume format, '
                         "expected host:container[:options]")
    host, target = parts[0], parts[1]
    options = [o for o in parts[2].split(",") if o] if len(parts) == 3 else []
    if "\0" in volume:
        raise BadRequest(f"{prefix}volume must not contain NUL characters")
    host = "/" + os.path.abspath(host).lstrip("/")
    if not cfg.agent_allowed_volumes:
        if not cfg.agent_allow_all_volumes:
            raise BadRequest(prefix + "volume host path not allowed: no volume allowlist "
                             "configured; set allowed_volumes or enable allow_all_volumes for "
                             "development")
    elif volume_root(cfg, host) is None:
        raise BadRequest(f'{prefix}volume host path not allowed: workspace path "{host}" '
                         "is not in allowed directories")
    if len(target) > 4096 or not target.startswith("/"):
        raise BadRequest(f'{prefix}container path "{target}" must be an absolute path')
    clean = "/" + os.path.normpath(target).lstrip("/")
    if any(clean == b or clean.startswith(b + "/") for b in BLOCKED_CONTAINER_PATHS):
        raise BadRequest(f'{prefix}container path "{target}" is blocked for security reasons')
    if any(s == clean or s.startswith(clean.rstrip("/") + "/") or
           (s != "/home/user" and clean.startswith(s + "/")) for s in SHADOWED_CONTAINER_PATHS):
        raise BadRequest(f'{prefix}container path "{target}" would shadow the image\'s system '
                         "folders or the agent's home")
    for option in options:
        if option not in MOUNT_OPTIONS:
            raise BadRequest(f'{prefix}mount option "{option}" is not allowed')
    return Volume(host, clean, options)


def volume_root(cfg: Config, host: str) -> tuple[str, list[str]] | None:
    """The allowed folder a normalized host path lies in (resolved: the admin configured it
    and no agent writes above it) and the names below it, which are opened one by one; of
    nested allowed folders the outermost, so that the most is opened link by link. `/` with
    allow_all_volumes. None: outside the allowlist."""
    names = [name for name in host.split("/") if name]
    if not cfg.agent_allowed_volumes:
        return "/", names
    found = []
    for root in cfg.agent_allowed_volumes:
        configured = "/" + os.path.abspath(root).lstrip("/")
        try:
            real = os.path.realpath(configured)
        except OSError:  # (EINVAL, ELOOP) a root that cannot be resolved allows nothing
            continue
        for folder in {configured, real}:
            if host == folder or host.startswith(folder.rstrip("/") + "/"):
                found.append((real, names[len([n for n in folder.split("/") if n]):]))
    return max(found, key=lambda root: len(root[1]), default=None)


def check_secrets_env(mapping: dict[str, str]) -> None:
    """Upstream's `secrets_env` rules, with upstream's messages."""
    prefix = "secrets validation failed: "
    if len(mapping) > 50:
        raise BadRequest(f"{prefix}too many secrets requested ({len(mapping)}), maximum is 50")
    for env, name in mapping.items():
        if not ENV_NAME_RE.match(env):
            raise BadRequest(f'{prefix}invalid environment variable name "{env}": must start with'
                             " letter or underscore, contain only alphanumeric and underscore")
        if env in ("LD_PRELOAD", "LD_LIBRARY_PATH"):
            raise BadRequest(f'{prefix}environment variable "{env}" is not allowed for security '
                             "reasons")
        if not name:
            raise BadRequest(f'{prefix}secret name for environment variable "{env}" cannot be '
                             "empty")
        if len(name) > 253:
            raise BadRequest(f'{prefix}secret name "{name}" exceeds maximum length of 253 '
                             "characters")
        if not SECRET_NAME_RE.match(name):
            raise BadRequest(f'{prefix}invalid secret name "{name}"')


def check_hooks(hooks: dict) -> dict[str, list[str]]:
    """Upstream's lifecycle hook limits; each element is one shell command."""
    prefix = "lifecycle hooks validation failed: "
    checked, total, size = {}, 0, 0
    for key in HOOK_KEYS:
        if key not in hooks or hooks[key] is None:
            continue
        check_kind(f"podman.lifecycle.{key}", hooks[key], "multi")
        commands = hooks[key]
        if not commands or len(commands) > 100:
            raise BadRequest(f"{prefix}{key} must hold 1 to 100 commands")
        for command in commands:
            if not 0 < len(command.encode()) <= 4096 or "\0" in command:
                raise BadRequest(f"{prefix}each {key} command must be 1..4096 bytes without NUL")
            size += len(command.encode())
        total += len(commands)
        checked[key] = commands
    if total > 200 or size > 65536:
        raise BadRequest(f"{prefix}too many hook commands (max 200, 64 KiB in all)")
    if hooks.get("hooks_timeout") is not None:  # validated; hooks share the run's timeout
        try:
            parse_duration(hooks["hooks_timeout"])
        except ValueError as exc:
            raise BadRequest(f"{prefix}hooks_timeout: {exc}") from None
    return checked


def check_environment(environment: dict) -> None:
    """podman.environment as upstream defines it (EnvironmentConfig), in its only form this
    server runs: a single container (an empty type). Anything else is refused, not kept."""
    for key, value in environment.items():
        if key not in ENVIRONMENT_KEYS:
            raise BadRequest(f'Invalid request: unknown podman.environment key "{key[:40]}" '
                             f"(known: {', '.join(ENVIRONMENT_KEYS)})")
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"Invalid request: podman.environment.{key} must be a string")
    if environment.get("type"):
        raise BadRequest("compose environments are not supported by this server")


@dataclasses.dataclass
class RunRequest:
    """A validated run request (upstream's RunRequest)."""

    prompt: str
    workdir: str = ""
    webhook_url: str = ""
    claude: dict = dataclasses.field(default_factory=dict)
    podman: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, body: Any, cfg: Config) -> "RunRequest":
        if not isinstance(body, dict):
            raise BadRequest("Invalid request: body must be a JSON object")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("Invalid request: Key: 'RunRequest.Prompt' Error:Field validation "
                             "for 'Prompt' failed on the 'required' tag")
        if "\0" in prompt:
            raise BadRequest("Invalid request: prompt must not contain NUL characters")
        for name in ("workdir", "webhook_url"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise BadRequest(f"Invalid request: {name} must be a string")
        req = cls(prompt=prompt, workdir=body.get("workdir") or "",
                  webhook_url=body.get("webhook_url") or "",
                  claude=validate_claude_options(body.get("claude")),
                  podman=cls.parse_podman_options(body.get("podman"), cfg))
        if req.workdir:
            check_workdir(req.workdir)
        if req.webhook_url and not re.match(r"^https?://[^\s/]+", req.webhook_url):
            raise BadRequest("Invalid request: webhook_url must be an http(s) URL")
        if req.claude.get("session_id") is not None:
            check_session_id(req.claude["session_id"])
        SessionPlan.of(req.claude)  # rejects resume/continue/fork without a session id
        return req

    @staticmethod
    def parse_podman_options(options: Any, cfg: Config) -> dict:
        if options is None:
            return {}
        if not isinstance(options, dict):
            raise BadRequest("Invalid request: podman must be an object")
        for name in options:
            if name not in PODMAN_KINDS:  # nobody may believe they got a privilege
                raise BadRequest(f'Invalid request: unknown podman option "{name}"')
        options = {k: v for k, v in options.items() if v not in (None, "")}
        for name, value in options.items():
            check_kind(f"podman.{name}", value, PODMAN_KINDS[name])
        if "image" in options:
            check_image(cfg, options["image"])
        for volume in options.get("volumes", []):
            check_volume(cfg, volume)
        check_secrets_env(options.get("secrets_env", {}))
        checks = (("timeout", parse_duration), ("memory", parse_memory), ("cpus", parse_cpus))
        for name, parse in checks:
            if name in options:
                try:
                    value = parse(options[name])
                except ValueError as exc:
                    raise BadRequest(f"Invalid request: podman.{name}: {exc}") from None
                if name == "timeout" and value <= 0:
                    raise BadRequest("invalid timeout duration: must be > 0")
                if name == "timeout" and value > MAX_RUN_TIMEOUT:
                    raise BadRequest("invalid timeout duration: must be at most 168h")
        if not 2 <= options.get("cpu_shares", 2) <= 262144:
            raise BadRequest("Invalid request: podman.cpu_shares must be between 2 and 262144")
        if "lifecycle" in options:
            check_hooks(options["lifecycle"])
        if "environment" in options:
            check_environment(options.pop("environment"))  # a single container: nothing kept
        return options

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RunResult:
    run_id: str
    session_id: str
    status: str  # completed | crashed
    output: str
    crash_info: dict | None = None
    usage: dict | None = None
    structured_output: Any = None
    truncated: bool = False

    def response(self) -> dict:
        return drop_none({"id": self.run_id, "status": self.status, "output": self.output,
                          "structured_output": self.structured_output,
                          "session_id": self.session_id, "usage": self.usage,
                          "crash_info": self.crash_info, "truncated": self.truncated or None})


class LineBuffer:
    """Raw output frames → lines (a line may span frames), in linear time. The agent
    controls its output: a line is cut at `max_line` bytes, with a marker saying so."""

    def __init__(self, max_line: int):
        self.max_line = max_line
        self.cut_lines = 0
        self._partial = bytearray()
        self._cut = 0  # bytes dropped from the line being assembled

    def feed(self, chunk: bytes) -> list[str]:
        lines, start = [], 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._gather(chunk, start, end)
            lines.append(self._end_line())
            start = end + 1
        self._gather(chunk, start, len(chunk))
        return lines

    def flush(self) -> list[str]:
        """The last line, if the output did not end with a newline."""
        return [self._end_line()] if self._partial or self._cut else []

    def _gather(self, chunk: bytes, start: int, end: int) -> None:
        take = min(self.max_line - len(self._partial), end - start)
        self._partial += chunk[start:start + take]
        self._cut += end - start - take

    def _end_line(self) -> str:
        line = self._partial.rstrip(b"\r").decode("utf-8", "replace")
        if self._cut:
            line += f" [stromboli: line truncated, {self._cut} bytes dropped]"
            self.cut_lines += 1
        self._partial, self._cut = bytearray(), 0
        return line


class RunFeed:
    """The output of one run as numbered events, for live followers and replay.

    Events are (seq, kind, data): kind "line" for each output line, then one final
    "done" (data = JSON {id, session_id, status}) or "error" (data = message).
    The agent controls its output, so memory is bounded: lines are cut (LineBuffer), and
    past `max_output` bytes (or as many lines) further lines are counted and dropped —
    only the last one is kept, since the CLI's result comes last."""

    def __init__(self, run_id: str, max_line: int = 1024 ** 2, max_output: int = 16 * 1024 ** 2):
        self.run_id, self.max_output = run_id, max_output
        self.max_lines = max(10000, max_output // 64)
        self.events: list[tuple[int, str, str]] = []
        self.finished = False
        self.kept = 0
        self.dropped_bytes = self.dropped_lines = 0
        self._changed = asyncio.Event()
        self._lines = LineBuffer(max_line)
        self._last_dropped: str | None = None
        self.leftover = ""  # a finished job's container, removed once its row is written

    @property
    def truncated(self) -> bool:
        return bool(self._lines.cut_lines or self.dropped_lines)

    def feed(self, chunk: bytes) -> None:
        for line in self._lines.feed(chunk):
            self._keep(line)
        self._notify()

    def _keep(self, line: str) -> None:
        size = len(line) + 1
        if self.dropped_lines or self.kept + size > self.max_output \
                or len(self.events) >= self.max_lines:  # once dropping, keep order: drop all
            self.dropped_bytes += size
            self.dropped_lines += 1
            self._last_dropped = line
            return
        self.kept += size
        self.events.append((len(self.events), "line", line))

    def flush(self) -> None:
        for line in self._lines.flush():
            self._keep(line)
        if self._last_dropped is not None:
            marker = (f"[stromboli: output truncated: {self.dropped_bytes} bytes in "
                      f"{self.dropped_lines} lines dropped]")
            for line in (marker, self._last_dropped):
                self.events.append((len(self.events), "line", line))
            self._last_dropped = None
        self._notify()

    def push(self, kind: str, data: str) -> None:
        self.events.append((len(self.events), kind, data))
        if kind != "line":
            self.finished = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def output(self) -> str:
        return "\n".join(d for _, k, d in self.events if k == "line")

    async def follow(self, after: int = -1):
        """Yield events with seq > after, live, until the final event."""
        cursor = after + 1
        while True:
            waiter = self._changed
            while cursor < len(self.events):
                yield self.events[cursor]
                cursor += 1
            if self.finished:
                return
            await waiter.wait()


def run_error_event(run_id: str, message: str) -> str:
    """The data of a stream's final `event: error`: JSON with `status` and `error`, so that a
    client which parses it can tell it from content (upstream sends the bare message)."""
    return json.dumps({"id": run_id, "status": "error", "error": message},
                      separators=(",", ":"))


class RunSlots:
    """A FIFO semaphore: at most `size` runs execute; the rest wait in arrival order."""

    def __init__(self, size: int):
        self.size, self.active = size, 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """A slot at once, or False (an agent holds one for its whole life; see release)."""
        if self.active >= self.size or self._waiters:
            return False
        self.active += 1
        return True

    @contextlib.asynccontextmanager
    async def slot(self):
        if self.active >= self.size or self._waiters:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self.release()  # the slot was handed to us as we were cancelled
                raise
        else:
            self.active += 1
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over: `active` stays the same
                return
        self.active -= 1


def instance_secret(instance: str, name: str) -> str:
    """A daemon's own secret, named per instance so daemons sharing a Podman keep theirs."""
    return f"stromboli-{instance}-{name}"


class Credentials:
    """The daemon's own secrets — the API key and the `claude` login's credentials file —
    kept in step with their Podman secrets, and how a container receives them: as files
    only its user can read, never as values in `podman inspect`."""

    def __init__(self, cfg: Config, podman_api: Podman, instance: str):
        self.cfg, self.podman = cfg, podman_api
        self.api_key = cfg.api_key()  # read once: it may come from a file or a credential
        self.api_key_secret = instance_secret(instance, "anthropic-api-key")
        self.file_secret = instance_secret(instance, "claude-credentials")
        self.labels = {**MANAGED_LABEL, "stromboli.instance": instance}
        self.synced = 0  # bumped whenever a secret changes (the health monitor rechecks)
        self._lock = asyncio.Lock()
        self._digest = ""
        self._api_key_synced = False

    def configured(self) -> bool:
        return bool(self.api_key) or self.cfg.credentials_path.is_file()

    async def sync(self) -> None:
        """Bring the secrets in step with the credentials file (by hash) and the API key."""
        async with self._lock:  # concurrent runs must not replace them twice
            path = self.cfg.credentials_path
            if path.is_file():
                data = await asyncio.to_thread(path.read_bytes)
                digest = hashlib.sha256(data).hexdigest()
                if digest != self._digest:
                    await self.podman.call(self.podman.replace_secret, self.file_secret, data,
                                           self.labels)
                    self._digest = digest
                    self.synced += 1
            if self.api_key and not self._api_key_synced:
                await self.podman.call(self.podman.replace_secret, self.api_key_secret,
                                       self.api_key.encode(), self.labels)
                self._api_key_synced = True
                self.synced += 1

    async def drop(self) -> None:
        """At shutdown: the next start creates them again, so none outlive the daemon."""
        for name in (self.api_key_secret, self.file_secret):
            try:
                await asyncio.wait_for(self.podman.call(self.podman.remove_secret, name), 5)
            except Exception as exc:  # Podman may be gone: nothing more to do
                log.warning("could not remove a secret", extra=fields(
                    secret=name, error=short_error(exc)))

    def secret_env(self, requested: dict[str, str]) -> dict[str, str]:
        """{environment variable: secret name} for a run, the daemon's API key included."""
        mapping = dict(requested)
        if self.api_key:
            mapping.setdefault("ANTHROPIC_API_KEY", self.api_key_secret)
        return mapping

    def mounts(self, secret_env: dict[str, str]) -> list[dict]:
        """Podman's secret mounts: each variable's secret as a file the entry command
        exports, and the credentials file where the CLI looks for it."""
        found = [{"source": name, "target": f"{SECRETS_DIR}/{env}", "uid": CONTAINER_UID,
                  "gid": CONTAINER_UID, "mode": 0o400} for env, name in secret_env.items()]
        if self._digest:
            found.append({"source": self.file_secret, "uid": CONTAINER_UID, "gid": CONTAINER_UID,
                          "mode": 0o600, "target": f"{CONTAINER_HOME}/.claude/.credentials.json"})
        return found


def container_command(cfg: Config, req: RunRequest, plan: SessionPlan, needs_init: bool,
                      secret_env: Iterable[str], stdin: str = PROMPT_FILE) -> list[str]:
    """The container's command: a fail-fast shell chain that exports the secrets from
    their files (so their values are in no `podman inspect`), makes and enters the
    workdir, runs the lifecycle hooks (each in its own subshell on its own lines, so a
    comment, `;`, `||` or `cd` inside one cannot change the chain), then execs claude
    with the prompt on stdin (so it is in no argv) — read from the `stdin` file, or the
    container's own stdin when that is empty (an agent's turns)."""
    argv = claude_argv(req.claude, plan.argv())
    hooks = check_hooks(req.podman.get("lifecycle") or {})
    steps = [f'export {env}="$(cat {SECRETS_DIR}/{env})"' for env in secret_env]
    if req.workdir and cfg.agent_workdir_auto_create:
        steps.append(f"mkdir -p {shell_quote(req.workdir)}")
        steps.append(f"cd {shell_quote(req.workdir)}")
    for key in HOOK_KEYS:
        if key != "post_start" and not needs_init:
            continue
        steps += [f"(\n{hook}\n)" for hook in hooks.get(key, [])]
    claude = "exec " + " ".join(map(shell_quote, argv)) + (f" < {stdin}" if stdin else "")
    return ["sh", "-c", " && ".join(steps + [claude])]


def agent_user(cfg: Config, rootless: bool) -> dict:
    """Who the agent is. Rootful: uid 1000 inside a user namespace whose ids start at
    userns_base on the host, so the agent is no real host user; rootless Podman maps
    already, and keep-id lets the agent write the daemon user's session homes."""
    if rootless:
        return {"userns_mode": "keep-id", "user": f"{os.getuid()}:{os.getgid()}"}
    spec: dict[str, Any] = {"user": f"{CONTAINER_UID}:{CONTAINER_UID}"}
    if base := cfg.userns_base:
        mapping = [{"container_id": 0, "host_id": base, "size": USERNS_SIZE}]
        spec.update(userns_mode="private", idmappings={"UIDMap": mapping, "GIDMap": mapping})
    return spec


def container_spec(cfg: Config, req: RunRequest, *, name: str, labels: dict, home: str,
                   prompt_file: str, secrets: list[dict], user: dict,
                   staged: list[Volume]) -> dict:
    """The container's create arguments: a pure function of the request and settings.
    `staged`: the request's volumes with the source Podman mounts (VolumeStaging.sources)."""
    opts = req.podman
    cpus = parse_cpus(opts.get("cpus") or cfg.resources_cpus)
    env = {"HOME": CONTAINER_HOME, "DISABLE_AUTOUPDATER": "1", **dict(cfg.agent_env),
           **claude_env(req.claude)}
    # `z`: on SELinux hosts the session home must be relabelled (ignored elsewhere).
    volumes = {home: {"bind": CONTAINER_HOME, "mode": "rw", "extended_mode": ["z"]}}
    if prompt_file:  # an agent has none: its turns come on stdin
        volumes[prompt_file] = {"bind": PROMPT_FILE, "mode": "ro"}
    for source, target, options in staged:
        volumes[source] = {"bind": target, "extended_mode": options}
    spec: dict[str, Any] = dict(
        name=name, labels=labels, environment=env, volumes=volumes, secrets=secrets,
        cap_drop=["ALL"], no_new_privileges=True, pids_limit=cfg.agent_pids_limit,
        mem_limit=parse_memory(opts.get("memory") or cfg.resources_memory),
        cpu_period=100000, cpu_quota=int(cpus * 100000), **user,
        # Disk the agent fills outside its home: scratch folders are tmpfs (in its memory
        # limit), the log (the daemon attaches; a restart replays it) is cut past its size.
        mounts=[{"type": "tmpfs", "source": "tmpfs", "target": target,
                 "size": str(cfg.agent_tmp_size), "mode": "1777"} for target in TMPFS_PATHS
                if target not in {v["bind"].rstrip("/") for v in volumes.values()}],
        log_config={"Type": "k8s-file", "Config": {"size": 2 * cfg.agent_max_output}})
    if opts.get("cpu_shares"):
        spec["cpu_shares"] = opts["cpu_shares"]
    if cfg.agent_mount_claude_cli:
        # Two-image mode: the CLI image read-only at /opt/claude, its claude first on PATH.
        spec["image_volumes"] = [{"Source": cfg.cli_image, "Destination": CLI_MOUNT,
                                  "ReadWrite": False}]
        env["PATH"] = f"{CLI_MOUNT}/usr/local/bin:{DEFAULT_PATH}"
    if req.workdir and not cfg.agent_workdir_auto_create:
        spec["working_dir"] = req.workdir  # else the command's `mkdir -p && cd` does it
    network = cfg.agent_network
    if network in ("bridge", "host", "none", "private", "slirp4netns", "pasta"):
        spec["network_mode"] = network
    elif network:
        spec["networks"] = {network: {}}
    return spec


def run_container_name(run_id: str) -> str:
    return f"stromboli-agent-{run_id}"


def request_volumes(cfg: Config, req: RunRequest) -> list[Volume]:
    return [check_volume(cfg, volume) for volume in req.podman.get("volumes", [])]


O_NODE = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC  # the name itself: a link is not followed


def open_below(fd: int, names: list[str], create: bool = False) -> int:
    """An O_PATH descriptor of fd/names[0]/names[1]/..., opened one name at a time relative
    to the last, never following a link: OSError ELOOP at a link, ENOTDIR at a non-folder on
    the way (its `filename` the names up to it). Missing folders are made (0755 whatever the
    umask: the agent runs as another uid) when `create`."""
    fd = os.dup(fd)
    try:
        for depth, name in enumerate(names, 1):
            where = "/".join(names[:depth])
            try:
                child = open_child(fd, name, create)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, where) from None
            os.close(fd)
            fd = child
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise OSError(errno.ELOOP, "a symbolic link", where)
            if depth < len(names) and not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, "not a folder", where)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_child(parent: int, name: str, create: bool) -> int:
    """The name in the folder `parent`, opened as itself; made as a folder if missing and
    `create` (one made meanwhile is opened as it is: open_below checks what it is)."""
    try:
        return os.open(name, O_NODE, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, 0o755, dir_fd=parent)
    except FileExistsError:
        return os.open(name, O_NODE, dir_fd=parent)
    fd = os.open(name, O_DIR, dir_fd=parent)  # ELOOP if swapped for a link since
    os.fchmod(fd, 0o755)
    return fd


def open_volume(cfg: Config, volume: Volume, create: bool = False) -> int:
    """An O_PATH descriptor of the volume's host path, opened name by name from its allowed
    folder without following any link: an agent with a writable folder on the way may be
    swapping a folder for a link right now. What it finds is what gets mounted (staged from
    this descriptor, or compared with the mount: VolumeStaging). Missing folders are made
    when `create`. BadRequest for a link, a missing path... Blocking."""
    prefix = f'volume validation failed: host path "{volume.host}"'
    found = volume_root(cfg, volume.host)
    if found is None:
        raise BadRequest(f"{prefix} is not in allowed directories")
    root, names = found
    try:
        start = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return open_below(start, names, create)
        finally:
            os.close(start)
    except OSError as exc:
        where = os.path.join(root, exc.filename or "")
        if exc.errno == errno.ELOOP:
            raise BadRequest(f'{prefix} goes through a symbolic link ("{where}"): links are '
                             "not followed") from None
        if exc.errno == errno.ENOENT:
            raise BadRequest(f"{prefix} does not exist") from None
        if exc.errno == errno.ENOTDIR:
            raise BadRequest(f'{prefix}: "{where}" is not a folder') from None
        raise BadRequest(f"{prefix} cannot be opened: {exc.strerror}") from None


def make_volume_dirs(cfg: Config, volumes: list[Volume]) -> None:
    """Create missing host folders of the volumes (volume_auto_create), link-safe."""
    if not cfg.agent_volume_auto_create:
        return
    for volume in volumes:
        os.close(open_volume(cfg, volume, create=True))


def check_mounts(cfg: Config, pid: int, volumes: list[Volume]) -> None:
    """Each volume mounted in an initialized container (its process `pid` not started yet)
    is the very folder (or file) its host path leads to, opened link by link now; otherwise
    BadRequest. Podman resolved the path itself: an agent may have swapped in a link."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for volume in volumes:
            expected = open_volume(cfg, volume)
            try:
                mounted = open_below(root, [n for n in volume.target.split("/") if n])
            except OSError as exc:  # a link in the image (Podman followed it inside the root)
                os.close(expected)
                raise BadRequest(f'volume validation failed: container path "{volume.target}"'
                                 f" cannot be checked: {exc.strerror}") from None
            try:
                same = same_file(os.fstat(mounted), os.fstat(expected))
            finally:
                os.close(mounted)
                os.close(expected)
            if not same:
                raise BadRequest(f'volume validation failed: host path "{volume.host}" changed '
                                 "while it was being mounted (a link swapped in?)")
    finally:
        os.close(root)


def volume_failure(error: Exception, volumes: list[Volume]) -> BadRequest | None:
    """Podman's error about an unstaged volume's host path (gone or changed since the walk:
    Podman resolves it again) as the client's 400, if the error names one."""
    for volume in volumes:
        if f"{volume.host}:" in str(error) or f'"{volume.host}"' in str(error):
            return BadRequest(f'volume validation failed: host path "{volume.host}" could not '
                              "be mounted (changed meanwhile?)")
    return None


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 4096, 16384, 1 << 18, 2
# A read-only remount sets the mount's flags: these of the source's are kept (statvfs
# reports them with the values of mount(2)'s).
KEPT_MOUNT_FLAGS = (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME
                    | os.ST_NODIRATIME | os.ST_RELATIME)
CAP_SYS_ADMIN = 21


@functools.cache
def libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return lib


def mount(source: str | None, target: str, flags: int, fstype: str | None = None,
          data: str | None = None) -> None:
    """mount(2) itself: mount(8) would canonicalize the source path, resolving it again."""
    args = [None if text is None else text.encode() for text in (source, target, fstype)]
    if libc().mount(*args, flags, None if data is None else data.encode()):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def unmount(target: str) -> None:
    if libc().umount2(target.encode(), MNT_DETACH):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


class VolumeStaging:
    """Where a rootful daemon puts a container's volumes before Podman sees them: each host
    path is opened link by link (open_volume) and that very folder (or file) is bind-mounted
    (mount(2) on /proc/self/fd/N, so no path is resolved again) at <state>/mounts/<container
    name>/<n>, the source Podman is given. Nothing an agent can write lies on that path:
    swapping a folder for a link changes nothing once the walk is done. The parent is a
    private tmpfs (mode 0700), so the binds propagate to no other mount namespace; they
    outlive a daemon restart, as a job's container does. Without it (no CAP_SYS_ADMIN, or
    Podman in another mount namespace, where these mounts would not be seen) Podman gets the
    host path, walked link by link just before, and the runner checks the mounts of the
    initialized container before it starts (check_mounts). Blocking methods."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.enabled = False
        self._active: set[str] = set()  # containers staged by this process

    def probe(self, podman_url: str) -> str:
        """Stage from now on if Podman would see our mounts; → why not ("" if it does)."""
        status = pathlib.Path("/proc/self/status").read_text()
        caps = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        if not caps >> CAP_SYS_ADMIN & 1:
            return "the daemon may not mount (no CAP_SYS_ADMIN)"
        if not podman_url.startswith("unix://"):
            return "Podman is not on a local socket"
        if apart := podman_namespace_apart(podman_url):
            return apart
        self.enabled = True
        return ""

    def sources(self, name: str, volumes: list[Volume]) -> list[Volume]:
        """The volumes as Podman is to mount them: from their staging points, or (staging
        off) from their host paths."""
        if not self.enabled:
            return volumes
        return [v._replace(host=str(self.root / name / str(n))) for n, v in enumerate(volumes)]

    def stage(self, cfg: Config, name: str, volumes: list[Volume]) -> None:
        """Open each volume link by link (BadRequest for a link, a missing path...) and bind
        it at its staging point (staging off: the walk alone refuses links)."""
        try:
            if self.enabled and volumes:
                self._mount_root()
                self.release(name)
                self._active.add(name)
                (self.root / name).mkdir(mode=0o700)
            for n, volume in enumerate(volumes):
                fd = open_volume(cfg, volume)
                try:
                    if self.enabled:
                        self._bind(fd, str(self.root / name / str(n)), "ro" in volume.options)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise RunFailed(f"volume staging failed: {exc.strerror}") from None

    def _mount_root(self) -> None:
        self.root.mkdir(mode=0o700, exist_ok=True)
        if not os.path.ismount(self.root):
            mount("tmpfs", str(self.root), MS_NOSUID | MS_NODEV | MS_NOEXEC, "tmpfs",
                  "mode=0700,size=1m")
            mount(None, str(self.root), MS_PRIVATE)

    @staticmethod
    def _bind(fd: int, point: str, read_only: bool) -> None:
        opened = os.fstat(fd)
        if stat.S_ISDIR(opened.st_mode):
            os.mkdir(point, 0o700)
        else:
            os.close(os.open(point, O_CREATE, 0o600))
        mount(f"/proc/self/fd/{fd}", point, MS_BIND | MS_REC)
        mount(None, point, MS_PRIVATE | MS_REC)  # no peer of the source's mount
        if read_only:
            kept = os.statvfs(point).f_flag & KEPT_MOUNT_FLAGS
            mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        if not same_file(os.stat(point), opened):
            raise OSError(errno.EIO, "the staged mount is not the opened folder", point)

    def release(self, name: str) -> None:
        """Unmount and remove a container's staging points (if any). Never raises: it runs
        while a run ends."""
        self._active.discard(name)
        folder = self.root / name
        try:
            points = os.listdir(folder)
        except OSError:  # none staged
            return
        try:
            for point in points:
                path = str(folder / point)
                with contextlib.suppress(OSError):  # EINVAL: not (or no longer) a mount
                    unmount(path)
                try:
                    os.rmdir(path)
                except NotADirectoryError:
                    os.unlink(path)
            os.rmdir(folder)
        except OSError as exc:  # e.g. EBUSY: still mounted; the next start tries again
            log.warning("could not remove a volume staging point", extra=fields(
                container=name, error=short_error(exc)))

    def sweep(self, kept: set[str]) -> None:
        """At startup: release what no container left running (`kept`) or made since uses."""
        with contextlib.suppress(OSError):
            for name in os.listdir(self.root):
                if name not in kept and name not in self._active:
                    self.release(name)


class ContainerRunner:
    """Runs one request in one fresh, hardened agent container and always removes it."""

    def __init__(self, cfg: Config, podman_api: Podman, sessions: SessionStore, store: Store,
                 metrics: "Metrics"):
        self.cfg, self.podman, self.sessions, self.store = cfg, podman_api, sessions, store
        self.metrics = metrics
        self.slots = RunSlots(cfg.run_slots)
        self.feeds: dict[str, RunFeed] = {}  # runs in progress (and for 5 min after)
        # Daemons sharing one Podman (a user and a system service, say) tell their
        # containers apart by this label, derived from the state dir.
        self.instance = hashlib.sha256(str(store.path.resolve()).encode()).hexdigest()[:12]
        self.credentials = Credentials(cfg, podman_api, self.instance)
        self.prompts = cfg.state_path / "prompts"
        self.staging = VolumeStaging(cfg.state_path / "mounts")
        self.rootless = False
        self.detaching = False  # a shutdown: jobs' containers are left running, not removed
        self.connected = asyncio.Event()  # set once Podman answered and recovery is done
        self._workdirs: dict[str, str] = {}

    async def connect(self) -> None:
        """Learn Podman's mode and bring the secrets in step (once it answers)."""
        await self.podman.call(self.podman.version)
        self.rootless = await self.podman.call(self.podman.rootless)
        await self.credentials.sync()
        if why_not := await asyncio.to_thread(self.staging.probe, self.podman.url):
            log.warning("volumes are not staged: Podman mounts their host paths itself and "
                        "each container's mounts are checked before it starts",
                        extra=fields(reason=why_not))

    async def instance_containers(self) -> list[dict]:
        """This daemon's containers (by its instance label), as a restart found them."""
        return await self.podman.call(self.podman.containers,
                                      f"stromboli.instance={self.instance}")

    def write_prompt(self, run_id: str, prompt: str) -> str:
        """The prompt as a file only the container's user can read; → its host path."""
        self.prompts.mkdir(mode=0o711, parents=True, exist_ok=True)
        path = self.prompts / run_id
        fd = os.open(path, O_CREATE, 0o400)
        with os.fdopen(fd, "wb") as out:
            if not self.rootless and (uid := self.cfg.agent_host_uid) is not None:
                os.fchown(fd, uid, uid)
            out.write(prompt.encode())
        return str(path)

    # -- a run ---------------------------------------------------------------------
    async def prepare(self, req: RunRequest) -> str:
        """Sync credentials; check that the run's image and secrets exist; → the image."""
        image = req.podman.get("image") or self.cfg.default_image
        try:  # runs wait briefly for Podman at startup (socket activation wakes us with one)
            await asyncio.wait_for(self.connected.wait(), 10)
        except asyncio.TimeoutError:
            raise Unavailable("podman unavailable: not connected yet (see /health)") from None
        try:
            await self.credentials.sync()
            exists = await self.podman.call(self.podman.image_exists, image)
            usable = [name for name in req.podman.get("secrets_env", {}).values()
                      if await self.podman.call(self.podman.secret_usable, name,
                                                self.cfg.secrets_allowed)]
        except podman.errors.APIError as exc:  # Podman answered, with an error
            raise Unavailable(f"podman failed: {short_error(exc)}") from None
        if not exists:
            hint = ("build it with `stromboli image build`" if image == self.cfg.default_image
                    else "pull it first (POST /images/pull)")
            raise BadRequest(f'image validation failed: image "{image}" not found; {hint}')
        for name in req.podman.get("secrets_env", {}).values():
            if name not in usable:
                raise BadRequest(f'secrets validation failed: secret "{name}" not found among '
                                 "stromboli's secrets (create it with POST /secrets, or an admin "
                                 "can allow an existing Podman secret with "
                                 "STROMBOLI_SECRETS_ALLOWED)")
        return image

    async def run(self, req: RunRequest, run_id: str, plan: SessionPlan,
                  labels: dict | None = None,
                  on_start: Callable[[], Awaitable[None]] | None = None,
                  on_end: Callable[[RunResult | None, Exception | None], Awaitable[None]]
                  | None = None, resume: dict | None = None,
                  on_created: Callable[[str], Awaitable[None]] | None = None) -> RunResult:
        """Wait for the session and a slot, then execute. Cancelling the calling task
        kills and removes the container. `on_start` runs once the slot is held, `on_end`
        (with the result or the error) before it is given to the next run, so that a
        job's row never says `running` beside its successor's; `on_created` with the
        container's id, before it starts."""
        feed = self.feeds.get(run_id) or self.open_feed(run_id)
        try:
            async with contextlib.AsyncExitStack() as held:
                # A fork also holds its source; locks in a fixed order, all before the slot,
                # so that no run waits for a lock while holding a slot.
                for sid in sorted({plan.session_id, plan.source} - {""}):
                    await held.enter_async_context(self.sessions.lock(sid))
                if resume is None:  # a taken-over container runs already: it takes no slot
                    await held.enter_async_context(self.slots.slot())
                if on_start:
                    await on_start()
                try:
                    result = await self._execute(req, run_id, plan, labels or {}, feed, resume,
                                                 on_created)
                except Exception as exc:
                    if on_end:
                        await asyncio.shield(on_end(None, exc))
                    raise
                else:
                    if on_end:
                        await asyncio.shield(on_end(result, None))
                finally:
                    if feed.leftover:  # a job's: kept until its row says how it ended, so
                        await asyncio.shield(self.destroy(feed.leftover))  # a crash loses none
            feed.push("done", json.dumps({"id": run_id, "session_id": result.session_id,
                                          "status": result.status}, separators=(",", ":")))
            return result
        except asyncio.CancelledError:
            feed.push("error", run_error_event(run_id, "the daemon is restarting: run it again "
                                               "shortly" if self.detaching else "run cancelled"))
            raise
        except Exception as exc:
            feed.push("error", run_error_event(run_id, getattr(exc, "message", None) or str(exc)))
            raise
        finally:
            asyncio.get_running_loop().call_later(300, self.feeds.pop, run_id, None)
            await asyncio.shield(self._persist(feed))

    def open_feed(self, run_id: str) -> RunFeed:
        feed = self.feeds[run_id] = RunFeed(run_id, self.cfg.agent_max_line,
                                            self.cfg.agent_max_output)
        return feed

    async def _persist(self, feed: RunFeed) -> None:
        now = time.time()
        rows = [(feed.run_id, seq, kind, data, now) for seq, kind, data in feed.events]
        await self.store.call(self.store.add_run_events, rows)

    async def open_session(self, req: RunRequest, plan: SessionPlan, image: str) -> None:
        cwd = "" if plan.mode == "new" else req.workdir or await self.image_workdir(image)
        try:
            await asyncio.to_thread(self.sessions.open_for_run, plan, cwd)
        except HomeError as exc:
            raise Conflict(str(exc)) from None

    async def image_workdir(self, image: str) -> str:
        if image not in self._workdirs:
            self._workdirs[image] = await self.podman.call(self.podman.image_workdir, image)
        return self._workdirs[image]

    async def _execute(self, req: RunRequest, run_id: str, plan: SessionPlan, labels: dict,
                       feed: RunFeed, resume: dict | None = None,
                       on_created: Callable[[str], Awaitable[None]] | None = None) -> RunResult:
        """Set the run up and create its container — or, with `resume` (a container that
        outlived a daemon restart: the one its job's row recorded, so its labels are the
        ones written at its creation, which override the image's), take it over —
        then follow it to its end."""
        session_id = plan.session_id
        name, volumes = run_container_name(run_id), request_volumes(self.cfg, req)
        timeout = parse_duration(req.podman["timeout"]) if "timeout" in req.podman \
            else self.cfg.resources_timeout
        if resume is None:
            image = await self.prepare(req)
            await asyncio.to_thread(make_volume_dirs, self.cfg, volumes)
            await self.open_session(req, plan, image)
            needs_init = not await asyncio.to_thread(self.sessions.initialized, session_id)
            before = await asyncio.to_thread(self.sessions.transcript, session_id)
            prompt_file = await asyncio.to_thread(self.write_prompt, run_id, req.prompt)
            secret_env = self.credentials.secret_env(req.podman.get("secrets_env", {}))
            resume_labels = {"stromboli.deadline": str(int(time.time() + timeout)),
                             "stromboli.init": str(int(needs_init)),
                             "stromboli.transcript": f"{before.folder}/{before.size}"
                             if before else ""}
            spec = container_spec(
                self.cfg, req, name=name, home=self.sessions.host_home(
                    session_id), prompt_file=prompt_file,
                secrets=self.credentials.mounts(secret_env),
                user=agent_user(self.cfg, self.rootless),
                staged=self.staging.sources(name, volumes),
                labels={**MANAGED_LABEL, "stromboli.instance": self.instance,
                        "stromboli.run": run_id, "stromboli.session": session_id,
                        **resume_labels, **labels})
            command = container_command(self.cfg, req, plan, needs_init, secret_env)
        else:
            needs_init = resume["labels"].get("stromboli.init") == "1"
            folder, _, size = resume["labels"].get("stromboli.transcript", "").partition("/")
            before = Transcript(folder, f"{session_id}.jsonl", int(size), 0) if folder else None
            prompt_file = str(self.prompts / run_id)
            timeout = float(resume["labels"].get("stromboli.deadline", 0)) - time.time()
        started = time.monotonic()
        keep = "stromboli.job" in labels  # a job's container outlives a daemon shutdown
        detached = False
        try:
            if resume is None:
                exit_code, killed_for = await self._container(image, command, spec, volumes,
                                                              feed, timeout, session_id, keep,
                                                              on_created)
            else:
                exit_code, killed_for = await self._supervise(resume["id"], feed, timeout,
                                                              session_id, keep, volumes=volumes)
        except asyncio.CancelledError:
            detached = keep and self.detaching
            raise
        finally:
            if not detached:
                await asyncio.shield(asyncio.to_thread(self._after_container, plan,
                                                       prompt_file, name))
        self.metrics.run_finished(time.monotonic() - started)
        output, usage, structured = await asyncio.to_thread(
            self._outcome, feed, session_id, before)  # may parse megabytes
        result = functools.partial(RunResult, run_id, session_id, truncated=feed.truncated)
        if killed_for:
            return result("crashed", output, crash_info(137, output, killed_for), usage)
        if exit_code > 128:
            return result("crashed", output, crash_info(exit_code, output), usage)
        if exit_code != 0:
            raise RunFailed(f"execution failed: exit status {exit_code}, output: {output}")
        lifecycle = req.podman.get("lifecycle") or {}
        if needs_init and any(lifecycle.get(k) for k in ("on_create_command", "post_create")):
            await asyncio.to_thread(self.sessions.mark_initialized, session_id)
        return result("completed", output, None, usage, structured)

    def _after_container(self, plan: SessionPlan, prompt_file: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # (gone already if a restart came between)
            os.unlink(prompt_file)
        self.staging.release(name)
        if plan.mode == "fork":
            self.sessions.settle_fork(plan.session_id, plan.source)
        self.sessions.over_quota(plan.session_id)  # refreshes the size /sessions shows

    def _outcome(self, feed: RunFeed, session_id: str,
                 before: Transcript | None) -> tuple[str, dict | None, Any]:
        """(output, this run's usage, structured output) once the container is gone."""
        output = feed.output().strip()
        usage = self.sessions.usage(session_id, before)
        return output, usage, structured_output(output)

    async def _container(self, image: str, command: list[str], spec: dict,
                         volumes: list[Volume], feed: RunFeed, timeout: float, session_id: str,
                         keep: bool, on_created: Callable[[str], Awaitable[None]] | None = None
                         ) -> tuple[int, str | None]:
        """Stage the volumes, create the container, tell `on_created`, then supervise it
        from its start."""
        await asyncio.to_thread(self.staging.stage, self.cfg, spec["name"], volumes)
        creating = asyncio.ensure_future(self.podman.call(self.podman.create, image, command,
                                                          **spec))
        try:
            cid = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # Cancelled mid-create: the container may exist anyway, so wait and remove it.
            await asyncio.wait({creating})
            if not creating.cancelled() and creating.exception() is None:
                await self.destroy(creating.result())
            raise
        except podman.errors.PodmanError as exc:
            raise RunFailed(f"failed to create container: {short_error(exc)}") from None
        except PodmanUnavailable as exc:  # (also Podman's answers: APIError is an OSError)
            raise volume_failure(exc, volumes) or exc from None
        return await self._supervise(cid, feed, timeout, session_id, keep, created=True,
                                     on_created=on_created, volumes=volumes)

    async def _supervise(self, cid: str, feed: RunFeed, timeout: float, session_id: str,
                         keep: bool, created: bool = False,
                         on_created: Callable[[str], Awaitable[None]] | None = None,
                         volumes: list[Volume] | None = None) -> tuple[int, str | None]:
        """Stream a container's output into the feed until it exits (attached before the
        start of a new one, so nothing is lost; one found after a restart replays its
        output from the start, or from its log once it has exited), within the timeout and
        the home's quota; then remove it — unless it is a job's and the daemon is detaching
        (a shutdown: the next start takes it over). A new one is told to `on_created` first.
        → (exit code, why the daemon killed it: the timeout or the home's quota, or None)"""
        self.metrics.active_containers += 1
        detached = cancelled = False
        try:
            if on_created is not None:
                await asyncio.shield(on_created(cid))
            # A restart may come between create and start: such a container starts now.
            created = created or await self.podman.call(self.podman.state, cid) in NOT_STARTED
            if created:
                await self.verify_volumes(cid, volumes or [])
                stream = await self._attach(cid, feed, self.podman.attach)
                await self.podman.call(self.podman.start, cid)
            else:  # the log replays from the start and ends with the container, whenever
                stream = await self._attach(cid, feed, self.podman.follow_logs)
            watch = asyncio.ensure_future(self.watch_quota(session_id))
            timer = asyncio.ensure_future(asyncio.sleep(max(timeout, 0)))
            try:
                await asyncio.wait({stream, watch, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
                timer.cancel()
            killed_for = None
            if not stream.done():
                killed_for = watch.result() if watch.done() and not watch.cancelled() else \
                    f"Timeout: the run exceeded {format_duration(timeout)} and its container " \
                    "was killed"
                await self.podman.call(self.podman.kill, cid)
                await asyncio.wait({stream}, timeout=10)
            exit_code = 137 if killed_for else await self.podman.call(self.podman.exit_code, cid)
            await asyncio.sleep(0)  # let the last call_soon_threadsafe frames land
            feed.flush()
            return exit_code, killed_for
        except asyncio.CancelledError:
            cancelled, detached = True, keep and self.detaching
            raise
        except podman.errors.APIError as exc:
            raise RunFailed(f"container failed: {short_error(exc)}") from None
        finally:
            self.metrics.active_containers -= 1
            if keep and not cancelled:
                feed.leftover = cid  # run() removes it once the job's row is written
            elif not detached:
                await asyncio.shield(self.destroy(cid))

    async def _attach(self, cid: str, feed: RunFeed, method: Callable) -> asyncio.Future:
        """Attach to the created container (before start, so no output is lost: the attach
        stream delivers output as it is written and ends when the container exits; a
        followed log polls). → the streaming future. The reading thread waits while 64
        frames are still queued for the event loop, so a flood cannot pile up in memory."""
        loop = asyncio.get_running_loop()
        credits = threading.BoundedSemaphore(64)
        attached = asyncio.Event()

        def consume(chunk: bytes) -> None:
            credits.release()
            feed.feed(chunk)

        def deliver(chunk: bytes) -> None:  # on the reading thread
            credits.acquire(timeout=30)
            loop.call_soon_threadsafe(consume, chunk)

        stream = asyncio.ensure_future(self.podman.call(
            method, cid, functools.partial(loop.call_soon_threadsafe, attached.set), deliver))
        waiter = asyncio.ensure_future(attached.wait())
        await asyncio.wait({stream, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if stream.done():
            stream.result()  # attaching failed: raise why
        return stream

    async def watch_quota(self, session_id: str) -> str:
        """Return (ending the run) once the session home grows past its quota. A home on
        its own filesystem cannot: there is nothing to watch (a write past the quota fails
        inside the container, and the run goes on)."""
        if await asyncio.to_thread(self.sessions.bounded, session_id):
            await asyncio.get_running_loop().create_future()  # until the run ends
        while True:
            await asyncio.sleep(QUOTA_CHECK_INTERVAL)
            try:
                problem = await asyncio.to_thread(self.sessions.over_quota, session_id)
            except OSError as exc:
                log.warning("session size check failed", extra=fields(
                    session_id=session_id, error=short_error(exc)))
                continue
            if problem:
                return f"Quota: {problem}; its container was killed"

    async def verify_volumes(self, cid: str, volumes: list[Volume]) -> None:
        """Unstaged volumes: Podman resolved their host paths itself, after our walk. Once it
        has mounted them (the container initialized, its process not started) each mount
        must be what a link-free walk finds, or the container never starts (BadRequest)."""
        if self.staging.enabled or not volumes:
            return
        try:
            pid = await self.podman.call(self.podman.init, cid)
        except RunFailed as exc:
            # The spec was good (created); what init adds is the mounts, from paths an agent
            # may be changing: the runtime fails in many ways then (runs without volumes
            # still show its own failures as 500s).
            log.warning("a container with volumes could not be initialized", extra=fields(
                container=cid[:12], error=short_error(exc)))
            raise BadRequest("volume validation failed: the volumes could not be mounted (a "
                             f"host path changed meanwhile?): {short_error(exc)}") from None
        await asyncio.to_thread(check_mounts, self.cfg, pid, volumes)

    async def destroy(self, cid: str) -> None:
        try:
            await self.podman.call(self.podman.kill, cid)
            await self.podman.call(self.podman.remove, cid)
        except Exception as exc:  # the orphan sweep at startup will retry
            log.warning("could not remove container", extra=fields(container=cid[:12],
                                                                    error=short_error(exc)))


# ---------------------------------------------------------------------------
# Webhooks — signed job notifications, retried with backoff and recorded
# ---------------------------------------------------------------------------

def sign_webhook(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


class WebhookHosts:
    """Where webhooks may go (`webhook.allowed_hosts`: names, IP addresses, CIDRs; empty =
    anywhere). A name listed is trusted whatever it resolves to; any other host must
    resolve only into the listed networks, checked again at connect time by the resolver
    below (so a name cannot rebind to another address between check and delivery)."""

    def __init__(self, entries: Iterable[str]):
        self.names: set[str] = set()
        self.networks: list[Any] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry.lower().rstrip("."))

    @property
    def open(self) -> bool:
        return not (self.names or self.networks)

    def address_ok(self, address: str) -> bool:
        ip = ip_or_none(address)
        return ip is not None and any(ip in net for net in self.networks)

    async def permits(self, url: str) -> bool:
        host = (urllib.parse.urlsplit(url).hostname or "").rstrip(".")
        if self.open or host in self.names:
            return True
        if ip_or_none(host) is not None:
            return self.address_ok(host)
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, None)
        except OSError:
            return False
        return bool(found) and all(self.address_ok(info[4][0]) for info in found)


class WebhookResolver(aiohttp.abc.AbstractResolver):
    """The default resolver, keeping only the addresses WebhookHosts allows."""

    def __init__(self, hosts: WebhookHosts):
        self.hosts, self.inner = hosts, aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list:
        found = await self.inner.resolve(host, port, family)
        if self.hosts.open or host.lower().rstrip(".") in self.hosts.names:
            return found
        allowed = [entry for entry in found if self.hosts.address_ok(entry["host"])]
        if not allowed:
            raise OSError("host not allowed")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


class WebhookSender:
    """POSTs a job's final state to its webhook_url. Upstream tries twice 100 ms apart;
    we retry with exponential backoff and record every attempt in the store. Redirects
    are not followed (a 3xx fails the attempt: a signed body must not be replayed to
    another host), and the recorded reason is one of a few fixed words, so that the
    delivery log cannot be used to probe the network."""

    def __init__(self, cfg: Config, store: Store):
        self.cfg, self.store = cfg, store
        self.hosts = WebhookHosts(cfg.webhook_allowed_hosts)
        self.tasks: set[asyncio.Task] = set()
        self.first_delay = 0.5

    def notify(self, url: str, job: dict, made: int = 0) -> None:
        """Deliver in the background; `made` attempts were made before (a restart came)."""
        task = asyncio.ensure_future(self._deliver(url, job, made))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, url: str, job: dict, made: int = 0) -> None:
        payload = drop_none({"job_id": job["id"], "status": job["status"],
                             "output": job.get("output") or None, "error": job.get("error"),
                             "session_id": job.get("session_id"), "usage": job.get("usage")})
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"stromboli/{VERSION}"}
        if self.cfg.webhook_signing_secret:
            stamp = str(int(time.time()))
            headers["X-Stromboli-Timestamp"] = stamp
            headers["X-Stromboli-Signature"] = sign_webhook(self.cfg.webhook_signing_secret,
                                                            stamp, body)
        delay = self.first_delay
        connector = aiohttp.TCPConnector(resolver=WebhookResolver(self.hosts))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5),
                                         connector=connector) as session:
            for attempt in range(made + 1, max(1, self.cfg.webhook_max_attempts) + 1):
                status, error = await self._attempt(session, url, body, headers)
                await self.store.call(self.store.record_delivery, job["id"], url, attempt,
                                      status, error)
                if error is None:
                    return
                if attempt < self.cfg.webhook_max_attempts:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 60)
        log.warning("webhook not delivered", extra=fields(job_id=job["id"],
                                                          attempts=self.cfg.webhook_max_attempts))

    async def _attempt(self, session: aiohttp.ClientSession, url: str, body: bytes,
                       headers: dict) -> tuple[int | None, str | None]:
        """One POST → (HTTP status or None, None on success or a fixed reason)."""
        if not await self.hosts.permits(url):
            return None, "host not allowed"
        try:
            async with session.post(url, data=body, headers=headers,
                                    allow_redirects=False) as resp:
                status = resp.status
        except asyncio.TimeoutError:
            return None, "timed out"
        except (aiohttp.ClientError, OSError):
            return None, "connection failed"
        if 200 <= status < 300:
            return status, None
        return status, "redirect not followed" if 300 <= status < 400 else \
            f"HTTP {status // 100}xx"


# ---------------------------------------------------------------------------
# Jobs — async runs: queue, cancel, restart recovery, retention
# ---------------------------------------------------------------------------

RESTART_ERROR = ("the daemon restarted while this job was running, and its container is gone "
                 "(removed while the daemon was down)")


class JobManager:
    """Async jobs live in the store; their runs are tasks here. Cancel kills the run's
    container and `cancelled` stays terminal."""

    def __init__(self, cfg: Config, store: Store, runner: ContainerRunner,
                 webhooks: WebhookSender, metrics: Metrics):
        self.cfg, self.store, self.runner = cfg, store, runner
        self.webhooks, self.metrics = webhooks, metrics
        self.tasks: dict[str, asyncio.Task] = {}

    async def submit(self, req: RunRequest, key: str = "") -> tuple[dict, bool]:
        """Queue a job; with an Idempotency-Key, the job that key already names (for the
        same request; 409 for another). → (job, whether it is new)."""
        # Shielded: a client that hangs up mid-way must not leave a row without its task.
        return await asyncio.shield(self._submit(req, key))

    async def _submit(self, req: RunRequest, key: str) -> tuple[dict, bool]:
        # The request as the client sent it (before a new session id is filled in).
        digest = hashlib.sha256(json.dumps(req.to_json(), sort_keys=True).encode()).hexdigest()
        plan = SessionPlan.of(req.claude)
        session_id = plan.session_id
        if plan.mode == "new":
            req.claude["session_id"] = session_id  # a requeue after restart keeps it
        now = time.time()
        job = {"id": new_id("job"), "status": "pending", "session_id": session_id,
               "run_id": new_id("run"), "request": req.to_json(), "created_at": now,
               "updated_at": now}
        limit = self.cfg.jobs_max_queued
        try:
            if key:
                taken = await self.store.call(self.store.insert_job_once, job, key, digest, limit)
                if taken is not None:
                    if taken["request_hash"] != digest:
                        raise Conflict("Idempotency-Key already used for a different request")
                    return await self.get(taken["job_id"]), False
            else:
                await self.store.call(self.store.insert_job, job, limit)
        except QueueFull:
            raise ApiError(429, f"too many queued jobs ({limit}): retry later",
                           {"Retry-After": "5"}) from None
        self._start(job)
        return job, True

    def _start(self, job: dict, resume: dict | None = None) -> None:
        task = asyncio.ensure_future(self._run(job, resume))
        self.tasks[job["id"]] = task
        task.add_done_callback(lambda _: self.tasks.pop(job["id"], None))

    async def _run(self, job: dict, resume: dict | None = None) -> None:
        req = RunRequest(**job["request"])

        async def started() -> None:
            await self.store.call(functools.partial(self.store.update_job, job["id"],
                                                    status="running", started_at=time.time()))
        ended = []

        async def end(result: RunResult | None, error: Exception | None) -> None:
            ended.append(True)
            await self._finish(job, self._outcome(job, result, error))

        async def created(cid: str) -> None:  # the one container a restart may take over
            await self.store.call(functools.partial(self.store.update_job, job["id"],
                                                    container_id=cid))
        try:
            plan = SessionPlan.of(req.claude, fork_id=job["session_id"])
            if resume is not None:  # its events are replayed from the container's start
                await self.store.call(self.store.delete_run_events, job["run_id"])
            await self.runner.run(req, job["run_id"], plan, {"stromboli.job": job["id"]},
                                  None if resume else started, end, resume, created)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # failed before it had a slot
            if not ended:
                await self._finish(job, self._outcome(job, None, exc))

    @staticmethod
    def _outcome(job: dict, result: RunResult | None, error: Exception | None) -> dict:
        """The job row's changes for a run's result or error."""
        if result is not None:
            changes = dict(status=result.status, output=result.output,
                           crash_info=result.crash_info, usage=result.usage,
                           structured_output=result.structured_output,
                           truncated=int(result.truncated))
        elif isinstance(error, ApiError):
            changes = dict(status="failed", error=error.message)
        elif isinstance(error, RunFailed):
            changes = dict(status="failed", error=str(error))
        else:  # a bug must not leave the job running forever
            log.error("job failed unexpectedly", exc_info=error, extra=fields(job_id=job["id"]))
            changes = dict(status="failed", error=f"internal error: {short_error(error)}")
        return {**changes, "finished_at": time.time()}

    async def _finish(self, job: dict, changes: dict, only_if_active: bool = True) -> None:
        updated = await self.store.call(functools.partial(
            self.store.update_job, job["id"], only_if_active, **changes))
        if not updated:
            return
        self.metrics.run_status(changes["status"])
        final = await self.store.call(self.store.get_job, job["id"])
        if final and final["webhook_url"]:
            self.webhooks.notify(final["webhook_url"], final)

    async def cancel(self, job_id: str) -> None:
        # Shielded: once the row says cancelled, the container must go too.
        await asyncio.shield(self._cancel(job_id))

    async def _cancel(self, job_id: str) -> None:
        job = await self.store.call(self.store.get_job, job_id)
        if job is None:
            raise NotFound("job not found")
        updated = await self.store.call(functools.partial(
            self.store.update_job, job_id, status="cancelled", finished_at=time.time(),
            error="cancelled by request"))
        if not updated:
            raise Conflict("cannot cancel job (already completed, failed, or cancelled)")
        self.metrics.run_status("cancelled")
        task = self.tasks.get(job_id)
        if task:
            task.cancel()
            await asyncio.wait({task}, timeout=20)  # the container is gone when this returns
        if job["webhook_url"]:
            self.webhooks.notify(job["webhook_url"],
                                 await self.store.call(self.store.get_job, job_id))

    async def get(self, job_id: str) -> dict:
        job = self.store.cached_job(job_id) or await self.store.call(self.store.get_job, job_id)
        if job is None:
            raise NotFound("job not found")
        return job

    async def recover(self) -> None:
        """At startup, before any run may start: take over the containers of the jobs that
        were running (they outlive the daemon), fail the running jobs whose container is
        gone, requeue the pending ones, and remove every other leftover container. A job's
        container is the one whose id its row recorded — or, when a crash came before the id
        was (during the create), the one with its run's name: labels prove nothing (an
        image's labels are merged into its containers'), a name is the daemon's choice."""
        found = await self.runner.instance_containers()
        containers = {c["id"]: c for c in found}
        named = {c["name"]: c["id"] for c in found}
        for job in await self.store.call(self.store.jobs_in, ("pending", "running")):
            if job["status"] == "running":
                cid = job["container_id"] or named.get(run_container_name(job["run_id"]), "")
                container = containers.pop(cid, None)
                if container is not None:
                    log.info("taking over a job's container", extra=fields(
                        job_id=job["id"], container=container["id"][:12]))
                    self._start(job, resume=container)
                else:
                    await self._finish(job, dict(status="failed", error=RESTART_ERROR,
                                                 finished_at=time.time()))
                continue
            # A queued job cancelled by the shutdown left a "run cancelled" event behind.
            await self.store.call(self.store.delete_run_events, job["run_id"])
            self._start(job)
        for container in containers.values():  # runs of clients that are gone, old jobs
            log.info("removing leftover agent container", extra=fields(
                container=container["id"][:12]))
            await self.runner.destroy(container["id"])
        taken_over = {c["name"] for c in found} - {c["name"] for c in containers.values()}
        await asyncio.to_thread(self.runner.staging.sweep, taken_over)
        for job, made in await self.store.call(self.store.undelivered,
                                               self.cfg.webhook_max_attempts):
            self.webhooks.notify(job["webhook_url"], job, made)

    async def cleanup_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.jobs_cleanup_interval)
            cutoff = time.time() - self.cfg.jobs_cleanup_ttl
            removed = await self.store.call(self.store.delete_old_jobs, cutoff)
            await self.store.call(self.store.delete_run_events_before, cutoff)
            if removed:
                log.info("deleted finished jobs", extra=fields(count=removed))

    async def shutdown(self) -> None:
        """Let go of the jobs: their containers keep running, their rows stay as they are,
        and the next start takes them over (pending ones are queued again)."""
        self.runner.detaching = True
        for task in list(self.tasks.values()):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks.values()), timeout=20)


def job_response(job: dict) -> dict:
    return drop_none({
        "id": job["id"], "status": job["status"], "output": job.get("output") or None,
        "structured_output": job.get("structured_output"), "error": job.get("error"),
        "session_id": job.get("session_id"), "crash_info": job.get("crash_info"),
        "usage": job.get("usage"), "run_id": job.get("run_id"),
        "truncated": bool(job.get("truncated")) or None,
        "created_at": rfc3339(job["created_at"]), "updated_at": rfc3339(job["updated_at"]),
        "started_at": rfc3339(job.get("started_at"), "milliseconds"),
        "finished_at": rfc3339(job.get("finished_at"), "milliseconds"),
    })


# ---------------------------------------------------------------------------
# Agents — persistent Claude processes: turns on stdin, an event feed, SQLite rows
# ---------------------------------------------------------------------------

AGENT_IDLE_TIMEOUT = 1800  # seconds (upstream's default)
AGENT_STOP_GRACE = 5.0  # after closing stdin, then after SIGTERM (as upstream)
AGENT_EVENTS_KEPT = 1000  # per agent, for Last-Event-ID (and at most agent.max_output bytes)
AGENT_EVENTS_KEPT_EXITED = 100
AGENT_SEND_TIMEOUT = 10.0
AGENT_FORCED_OPTIONS = {"input_format": "stream-json", "output_format": "stream-json",
                        "include_partial_messages": True, "verbose": True}
AGENT_SESSION_OPTIONS = ("session_id", "resume", "continue", "fork_session")
AGENT_PAUSED = ("agent: the daemon is restarting; the agent will be back with its "
                "conversation (follow it again with Last-Event-ID)")
AGENT_LOST_TURN = "agent: the daemon restarted during this turn; its output ends here"
AGENT_REVIVE_ERROR = "agent: could not be started again after the daemon restarted: "
AGENT_REFUSED_ERROR = (AGENT_REVIVE_ERROR + "the configuration now in force refuses its "
                       "request: ")
AGENT_STOPPED = "agent: stopped"
AGENT_IDLE_ERROR = "agent: idle timeout reached"
AGENT_FOLLOWER_CHUNK = 64 * 1024  # bytes handed to a follower's connection at a time
AGENT_ENCODE_PIECE = 64 * 1024  # characters of a line encoded between two turns of the loop
AGENT_FELL_BEHIND = ("agent: stream: this client fell behind the agent's kept events and is "
                     "dropped; follow again with Last-Event-ID")


def now_rfc3339() -> str:
    """Now, as Go's time.Time marshals (RFC 3339 with fractional seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds") \
        .replace("+00:00", "Z")


def turn_usage(result: dict) -> dict | None:
    """A turn's Usage, from the CLI's `result` line (the agent wrote it: nothing in it is
    trusted to have the right type)."""
    usage, models = result.get("usage"), result.get("modelUsage")
    model = next(iter(models), "") if isinstance(models, dict) else ""
    if not isinstance(usage, dict) or not isinstance(model, str):
        return None
    try:
        return usage_summary({"turn": usage}, re.sub(r"\[\w+\]$", "", model))
    except (TypeError, ValueError, ArithmeticError):  # 1e999, a 400-digit count...
        return None


def error_text(exc: Exception) -> str:
    """What an agent's exit_error says of an exception: an ApiError's own message."""
    return getattr(exc, "message", None) or short_error(exc)


@dataclasses.dataclass
class AgentRequest:
    """A validated CreateRequest (upstream's); `podman` options are an extension."""

    run: RunRequest  # what the container needs; the prompt is the first turn
    prompt: str = ""
    idle_timeout: int = AGENT_IDLE_TIMEOUT
    idle_timeout_disabled: bool = False

    @classmethod
    def parse(cls, body: Any, cfg: Config) -> "AgentRequest":
        prefix = "agent: invalid request: "
        if not isinstance(body, dict):
            raise BadRequest(prefix + "body must be a JSON object")
        for name, kind, text in (("prompt", str, "a string"), ("workdir", str, "a string"),
                                 ("disable_idle_timeout", bool, "a boolean")):
            if body.get(name) is not None and not isinstance(body[name], kind):
                raise BadRequest(f"{prefix}{name} must be {text}")
        timeout = body.get("idle_timeout_seconds")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)):
            raise BadRequest(prefix + "idle_timeout_seconds must be an integer")
        if (timeout or 0) < 0:
            raise BadRequest(prefix + "idle_timeout_seconds must be non-negative")
        if (timeout or 0) > MAX_RUN_TIMEOUT:
            raise BadRequest(f"{prefix}idle_timeout_seconds must be at most {MAX_RUN_TIMEOUT}")
        prompt = body.get("prompt") or ""
        if "\0" in prompt:
            raise BadRequest(prefix + "prompt must not contain NUL characters")
        claude = {k: v for k, v in validate_claude_options(body.get("claude")).items()
                  if k not in AGENT_SESSION_OPTIONS}  # an agent's session is always new
        run = RunRequest(prompt="", workdir=body.get("workdir") or "",
                         claude={**claude, **AGENT_FORCED_OPTIONS},
                         podman=RunRequest.parse_podman_options(body.get("podman"), cfg))
        if run.workdir:
            check_workdir(run.workdir)
        return cls(run, prompt, timeout or AGENT_IDLE_TIMEOUT,
                   bool(body.get("disable_idle_timeout")))


@dataclasses.dataclass(frozen=True, slots=True)
class AgentEvent:
    """One numbered event of an agent, kept as its SSE frame: encoded once, shared by every
    follower."""

    seq: int
    kind: str
    frame: bytes

    @staticmethod
    def body(kind: str, at: str, **details: Any) -> bytes:
        """An Event (upstream's agent event: type, the details that are set, at) as an SSE
        frame, but its `id:` line."""
        data = json.dumps(drop_none({"type": kind, **details, "at": at}), separators=(",", ":"))
        return f"event: {kind}\ndata: {data}\n\n".encode()

    @classmethod
    def make(cls, seq: int, kind: str, at: str, **details: Any) -> "AgentEvent":
        return cls(seq, kind, b"id: %d\n" % seq + cls.body(kind, at, **details))


class FellBehind(Exception):
    """A follower lost the event it was in the middle of sending: it must be cut off."""


class Agent:
    """One persistent agent: what its snapshot shows, its input, and its events —
    numbered, kept for Last-Event-ID (the last AGENT_EVENTS_KEPT, within `max_bytes` of
    frames), and followed live. `on_change` is called whenever its row must be saved.
    `last_activity` is the last client turn (a send, or a turn's end): what the agent prints
    on its own does not keep it alive."""

    def __init__(self, row: dict, max_bytes: int, on_change: Callable[["Agent"], None]):
        self.id, self.session_id, self.status = row["id"], row["session_id"], row["status"]
        self.created_at, self.last_activity = row["created_at"], row["last_activity_at"]
        self.idle_timeout = row["idle_timeout"]
        self.idle_timeout_disabled = bool(row["idle_timeout_disabled"])
        self.turns_completed, self.seq = row["turns_completed"], row["last_event"]
        self.exit_error, self.exited_at = row["exit_error"] or "", row["exited_at"]
        self.turn_id = row["turn_id"]
        self.run = RunRequest(**json.loads(row["request"]))  # its container, again after a restart
        self.paused = False  # the daemon stopped; the next start brings it back
        self.stdin: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None  # its life, from spawn to cleanup
        self.stop_reason = ""
        self.stop_requested = asyncio.Event()
        self.events: collections.deque[AgentEvent] = collections.deque()
        self.followers: set[AgentFollower] = set()
        self._bytes, self._max_bytes = 0, max_bytes
        self._changed = asyncio.Event()
        self._on_change = on_change
        self._saved_seq = self.seq

    @classmethod
    def new(cls, req: AgentRequest, max_bytes: int,
            on_change: Callable[["Agent"], None]) -> "Agent":
        now = time.time()
        return cls({"id": f"agent-{uuid.uuid4()}", "session_id": str(uuid.uuid4()),
                    "status": "starting", "created_at": now, "last_activity_at": now,
                    "idle_timeout": req.idle_timeout,
                    "idle_timeout_disabled": req.idle_timeout_disabled, "turns_completed": 0,
                    "last_event": 0, "exit_error": None, "exited_at": None, "turn_id": "",
                    "request": json.dumps(req.run.to_json())},
                   max_bytes, on_change)

    def row(self) -> dict:
        self._saved_seq = self.seq
        return {"id": self.id, "session_id": self.session_id, "status": self.status,
                "created_at": self.created_at, "last_activity_at": self.last_activity,
                "idle_timeout": self.idle_timeout,
                "idle_timeout_disabled": int(self.idle_timeout_disabled),
                "turns_completed": self.turns_completed, "exit_error": self.exit_error or None,
                "last_event": self.seq, "exited_at": self.exited_at, "turn_id": self.turn_id,
                "request": json.dumps(self.run.to_json())}

    def snapshot(self) -> dict:
        return drop_none({
            "id": self.id, "session_id": self.session_id, "status": self.status,
            "created_at": rfc3339(self.created_at, "microseconds"),
            "last_activity_at": rfc3339(self.last_activity, "microseconds"),
            "idle_timeout_seconds": self.idle_timeout,
            "idle_timeout_disabled": True if self.idle_timeout_disabled else None,
            "turns_completed": self.turns_completed, "exit_error": self.exit_error or None})

    # -- events --------------------------------------------------------------------
    def emit(self, kind: str, **details: Any) -> None:
        self.keep(kind, AgentEvent.body(kind, now_rfc3339(), **details))

    async def emit_line(self, kind: str, name: str, line: str) -> None:
        """emit, for an output or stderr line (the `name` detail): a long one is encoded
        AGENT_ENCODE_PIECE characters at a time, letting the loop run in between — its
        JSON can be 6× as long (a control character is `\\u0001`). Not in a thread: one
        holding the GIL through json.dumps would stall the loop at each of its syscalls."""
        turn_id = self.turn_id or None
        if len(line) <= AGENT_ENCODE_PIECE:
            self.keep(kind, AgentEvent.body(kind, now_rfc3339(), turn_id=turn_id, **{name: line}))
            return
        body = AgentEvent.body(kind, now_rfc3339(), turn_id=turn_id, **{name: "\0"})
        head, _, tail = body.partition(b'"\\u0000"')  # nothing else in it has a NUL
        parts = [head, b'"']
        for start in range(0, len(line), AGENT_ENCODE_PIECE):
            parts.append(json.dumps(line[start:start + AGENT_ENCODE_PIECE])[1:-1].encode())
            await asyncio.sleep(0)
        self.keep(kind, *parts, b'"', tail)

    def keep(self, kind: str, *body: bytes) -> None:
        """Number an event (its frame: the `id:` line, then the body's parts), keep it, and
        wake the followers."""
        self.seq += 1
        event = AgentEvent(self.seq, kind, b"".join((b"id: %d\n" % self.seq, *body)))
        self.events.append(event)
        self._bytes += len(event.frame)
        self._trim(AGENT_EVENTS_KEPT, self._max_bytes)
        self._changed.set()
        self._changed = asyncio.Event()
        if self.seq - self._saved_seq >= AGENT_EVENTS_KEPT // 2:  # so ids outlive a crash
            self._on_change(self)

    def _trim(self, count: int, size: int) -> None:
        while len(self.events) > 1 and (len(self.events) > count or self._bytes > size):
            self._bytes -= len(self.events.popleft().frame)

    @property
    def changed(self) -> asyncio.Event:
        """Set when the next event comes."""
        return self._changed

    @contextlib.contextmanager
    def follower(self, after: int, limit: int):
        """A new follower of the events after `after`, counted while in use: a 429 past
        `limit` of them."""
        if len(self.followers) >= limit:
            raise ApiError(429, f"agent: {limit} clients follow this agent already "
                                "(agent.max_followers); retry later", {"Retry-After": "5"})
        follower = AgentFollower(self, after)
        self.followers.add(follower)
        try:
            yield follower
        finally:
            self.followers.discard(follower)

    # -- what the process says -------------------------------------------------------
    async def on_line(self, stream: int, line: str) -> None:
        turn_id = self.turn_id or None
        if stream == 2:
            await self.emit_line("error", "error", f"[stderr] {line}")
            return
        if self.status == "starting":
            self.status = "idle"
            self._on_change(self)
        await self.emit_line("output", "content", line)
        if self.status == "generating" and '"result"' in line \
                and (event := next(parse_json_lines([line]), None)) \
                and event.get("type") == "result":
            self.turns_completed += 1
            self.status, self.turn_id, self.last_activity = "idle", "", time.time()
            self.emit("turn_end", turn_id=turn_id, usage=turn_usage(event))
            self._on_change(self)

    async def send(self, prompt: str) -> str:
        """Write one turn to the process's stdin (upstream's statuses) → its turn id."""
        if self.status == "exited":
            raise ApiError(410, "agent: process has exited")
        if self.stdin is None:
            raise ApiError(503, "agent: starting again after a daemon restart; retry shortly",
                           {"Retry-After": "2"})
        if self.status == "generating":
            raise Conflict("agent: a turn is already in progress")
        if self.stdin.transport.get_write_buffer_size():  # a send before was never read
            raise Unavailable("agent: send: its input is not being read")
        turn_id = f"turn-{uuid.uuid4()}"
        self.turn_id, self.status, self.last_activity = turn_id, "generating", time.time()
        self.emit("turn_start", turn_id=turn_id)
        self._on_change(self)
        message = {"type": "user", "message": {"role": "user", "content": prompt}}
        try:
            self.stdin.write(json.dumps(message).encode() + b"\n")  # control bytes escaped
            await asyncio.wait_for(self.stdin.drain(), AGENT_SEND_TIMEOUT)
        except (OSError, RuntimeError, asyncio.TimeoutError) as exc:
            why = "its input is not being read" if isinstance(exc, asyncio.TimeoutError) \
                else short_error(exc)
            if self.status == "generating" and self.turn_id == turn_id:  # not if it ended
                self.status, self.turn_id = "idle", ""
                self._on_change(self)
            self.emit("error", turn_id=turn_id, error=f"agent: send: {why}")
            raise Unavailable(f"agent: send: {why}") from None
        return turn_id

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.stop_requested.set()

    def pause(self) -> None:
        """The daemon stops: its followers are told, and its row keeps it live."""
        self.stdin, self.paused = None, True
        self.emit("error", turn_id=self.turn_id or None, error=AGENT_PAUSED)
        self._on_change(self)

    def resume_after_restart(self) -> None:
        """At the next start, before its new process (`starting` until it runs): ids go on
        past any event the old daemon sent but had not saved, and a turn the restart cut
        is ended."""
        self.seq += AGENT_EVENTS_KEPT
        self.last_activity = time.time()  # the downtime does not count as idleness
        if self.status == "generating":
            self.emit("error", turn_id=self.turn_id or None, error=AGENT_LOST_TURN)
        self.status, self.turn_id = "starting", ""
        self._on_change(self)

    def finish(self, exit_error: str) -> None:
        """Exited: the last event; followers get `closed` after it."""
        self.status, self.exit_error, self.exited_at = "exited", exit_error, time.time()
        self.stdin = None
        self.emit("exited", turn_id=self.turn_id or None, error=exit_error)
        self._trim(AGENT_EVENTS_KEPT_EXITED, 64 * 1024)  # exited agents stay listed: keep less
        self._on_change(self)


class AgentFollower:
    """One client of an agent's stream. It keeps no event of its own: it reads the agent's
    shared frames by id, AGENT_FOLLOWER_CHUNK bytes at a time, so all it holds is what its
    connection has not sent yet. It starts at the oldest event after `after` still kept
    when it sends its first; once the event it needs has left the kept window, it fell
    behind."""

    def __init__(self, agent: Agent, after: int):
        self.agent = agent
        self.cursor = max(after, agent.seq if not agent.events else -1)  # last sent whole
        self.offset = 0  # bytes of the next one sent already
        self.started = False

    @property
    def behind(self) -> bool:
        events = self.agent.events
        return self.started and bool(events) and self.cursor + 1 < events[0].seq

    async def frames(self):
        """The stream's bytes, live, then `closed` once the agent has exited; it ends
        without it when the daemon stops (the agent comes back after). One that fell
        behind gets a last `error` event (without an id: its Last-Event-ID stays the last
        event it got whole), or FellBehind in the middle of an event."""
        agent = self.agent
        while True:
            waiter = agent.changed
            while self.cursor < agent.seq:
                if self.behind:
                    if self.offset:
                        raise FellBehind()
                    yield AgentEvent.body("error", now_rfc3339(), error=AGENT_FELL_BEHIND)
                    return
                yield self._next_chunk()
            if agent.status == "exited":
                yield b"id: %d\nevent: closed\ndata: {}\n\n" % agent.seq
                return
            if agent.paused:
                return
            await waiter.wait()

    def _next_chunk(self) -> bytes:
        """From where it is, up to AGENT_FOLLOWER_CHUNK bytes: the rest of its event and
        the whole events after it that fit (many small events make one write)."""
        events, parts, size = self.agent.events, [], 0
        if not self.started:
            self.cursor, self.started = max(self.cursor, events[0].seq - 1), True
        index = self.cursor + 1 - events[0].seq
        while index < len(events) and size < AGENT_FOLLOWER_CHUNK:
            event = events[index]
            part = event.frame[self.offset:self.offset + AGENT_FOLLOWER_CHUNK - size]
            parts.append(part)
            size += len(part)
            self.offset += len(part)
            if self.offset == len(event.frame):
                self.cursor, self.offset, index = event.seq, 0, index + 1
        return b"".join(parts)


class AgentManager:
    """The agents: each spawned into a hardened container as a run is (holding a run slot
    for its whole life), fed and followed over one attach connection, stopped on request,
    idleness, its home's quota or its lifetime, and kept as an SQLite row. A daemon restart
    cannot keep an agent's process (Podman closes a container's stdin with the attach
    connection that fed it), so the next start runs a new one that resumes the agent's
    conversation: same id, same session, same options."""

    def __init__(self, cfg: Config, store: Store, runner: ContainerRunner):
        self.cfg, self.store, self.runner = cfg, store, runner
        self.podman, self.sessions = runner.podman, runner.sessions
        self.agents: dict[str, Agent] = {}
        self._saving: dict[str, bool] = {}  # agent id → written again when done
        self._reserved: set[str] = set()  # agents to revive, holding their slot

    @property
    def live(self) -> int:
        return sum(1 for a in self.agents.values() if a.task)

    @property
    def generating(self) -> int:
        return sum(1 for a in self.agents.values() if a.task and a.status == "generating")

    def get(self, agent_id: str) -> Agent:
        if (agent := self.agents.get(agent_id)) is None:
            raise NotFound("agent: not found")
        return agent

    def save(self, agent: Agent) -> None:
        """Write the agent's row: at most one write per agent in flight, the latest state
        written after it (an agent printing fake results cannot flood the store's thread,
        which keeps the writes in order). A deleted agent is written no more."""
        if agent.id not in self.agents:
            return
        if agent.id in self._saving:
            self._saving[agent.id] = True  # written again once the one in flight is done
            return
        self._saving[agent.id] = False
        saving = asyncio.ensure_future(self.store.call(self.store.save_agent, agent.row()))
        saving.add_done_callback(functools.partial(self._saved, agent))

    def _saved(self, agent: Agent, saving: asyncio.Future) -> None:
        if not saving.cancelled() and saving.exception() is not None:
            log.error("could not save an agent", extra=fields(
                agent_id=agent.id, error=short_error(saving.exception())))
        if self._saving.pop(agent.id, False):
            self.save(agent)

    async def load(self) -> None:
        """At startup: every agent in the store is listed again; the ones that were live
        keep a run slot (before any job can take it) and start again once Podman answers
        (revive)."""
        for row in await self.store.call(self.store.agents):
            agent = self.agents[row["id"]] = Agent(row, self.cfg.agent_max_output, self.save)
            if agent.status == "exited":
                agent.events.append(AgentEvent.make(
                    agent.seq, "exited", rfc3339(agent.exited_at, "microseconds"),
                    error=agent.exit_error))
            else:
                agent.resume_after_restart()
                if self.runner.slots.try_acquire():
                    self._reserved.add(agent.id)

    async def revive(self) -> None:
        """After the orphan sweep (the old processes are gone with their containers): each
        agent that was live starts again, resuming its conversation (Podman gets three
        tries); one that cannot, or that the configuration now in force refuses, is shown
        exited, with why."""
        for agent in [a for a in self.agents.values() if a.status != "exited" and not a.task]:
            if refusal := self._refusal(agent):
                self._give_up(agent, refusal)
                continue
            for attempt in range(3):
                if agent.id not in self.agents or agent.stop_requested.is_set():
                    break  # deleted meanwhile
                try:
                    await self.start(agent)
                    if agent.status == "starting":  # its new process takes input
                        agent.status = "idle"
                        self.save(agent)
                    log.info("agent started again after a restart", extra=fields(
                        agent_id=agent.id, session_id=agent.session_id))
                    break
                except (PodmanUnavailable, Unavailable) as exc:
                    if attempt < 2:
                        await asyncio.sleep(2)
                        continue
                    self._give_up(agent, AGENT_REVIVE_ERROR + error_text(exc))
                except Exception as exc:
                    if agent.id in self.agents:
                        self._give_up(agent, AGENT_REVIVE_ERROR + error_text(exc))
                    break

    def _refusal(self, agent: Agent) -> str:
        """Why an agent may not start again under the configuration now in force ("" if
        it may): its lifetime is over, or its stored options are no longer allowed (the
        image allowlist, volumes, ...: checked as a new request's are)."""
        if self._lifetime_left(agent) <= 0:
            return self._lifetime_error()
        try:
            RunRequest.parse_podman_options(agent.run.podman, self.cfg)
        except ApiError as exc:
            return AGENT_REFUSED_ERROR + exc.message
        return ""

    def _give_up(self, agent: Agent, exit_error: str) -> None:
        log.warning("agent not started again", extra=fields(agent_id=agent.id,
                                                            error=exit_error))
        self._release_reserved(agent)
        agent.finish(exit_error)

    def _release_reserved(self, agent: Agent) -> None:
        if agent.id in self._reserved:
            self._reserved.discard(agent.id)
            self.runner.slots.release()

    async def spawn(self, req: AgentRequest) -> Agent:
        """A new agent, live (errors are the caller's), its first prompt sent if any."""
        agent = Agent.new(req, self.cfg.agent_max_output, self.save)
        await self.start(agent, req.prompt)
        return agent

    async def start(self, agent: Agent, prompt: str = "") -> None:
        """Create, attach and start the agent's container, holding a run slot."""
        image = await self.runner.prepare(agent.run)
        if agent.stop_requested.is_set():  # deleted while Podman was asked
            raise NotFound("agent: not found")
        if agent.id in self._reserved:
            self._reserved.discard(agent.id)  # the slot kept for it across the restart
        elif not self.runner.slots.try_acquire():
            raise ApiError(429, f"agent: all {self.runner.slots.size} run slots are in use "
                                "(each live agent holds one); retry later",
                           {"Retry-After": "5"})
        started = asyncio.get_running_loop().create_future()
        agent.task = asyncio.ensure_future(self._live(agent, prompt, image, started))
        await asyncio.shield(started)

    async def _live(self, agent: Agent, prompt: str, image: str,
                    started: asyncio.Future) -> None:
        """The agent's whole life: spawn, supervise, clean up (its container, its slot)."""
        cid, exit_error, running, writer = "", AGENT_STOPPED, False, None
        try:
            async with self.sessions.lock(agent.session_id):
                try:
                    cid = await self._create(agent, agent.run, image)
                    await self.runner.verify_volumes(cid, request_volumes(self.cfg, agent.run))
                    reader, writer = await self.podman.attach_stdio(cid)
                    agent.stdin = writer
                    await self.podman.call(self.podman.start, cid)
                except Exception as exc:
                    started.set_exception(exc)
                    return
                self.agents[agent.id] = agent
                log.info("agent started", extra=fields(agent_id=agent.id, container=cid[:12],
                                                       session_id=agent.session_id))
                if agent.idle_timeout_disabled:
                    log.warning("agent created with idle timeout DISABLED — caller owns "
                                "lifecycle, agent will not auto-stop on inactivity",
                                extra=fields(agent_id=agent.id))
                if prompt.strip():
                    with contextlib.suppress(ApiError):  # shown as its `error` event
                        await agent.send(prompt)
                self.save(agent)
                started.set_result(None)
                running = True
                try:
                    exit_error = await self._supervise(agent, cid, reader, agent.run)
                except Exception as exc:  # e.g. a home the size check cannot walk
                    log.exception("agent supervision failed", extra=fields(agent_id=agent.id))
                    exit_error = f"agent: supervision failed: {short_error(exc)}"
        finally:
            if not started.done():
                started.cancel()
            if writer is not None:
                writer.close()
            if cid:
                await asyncio.shield(self.runner.destroy(cid))
            await asyncio.shield(asyncio.to_thread(self.runner.staging.release,
                                                   self.container_name(agent)))
            self.runner.slots.release()
            agent.task = None
            if running and exit_error == AGENT_PAUSED:
                agent.pause()
            elif running:
                agent.finish(exit_error)
                log.info("agent exited", extra=fields(agent_id=agent.id, error=exit_error))
            with contextlib.suppress(OSError, HomeError):  # refreshes the size /sessions shows
                await asyncio.to_thread(self.sessions.over_quota, agent.session_id)

    @staticmethod
    def container_name(agent: Agent) -> str:
        return f"stromboli-{agent.id}"

    async def _create(self, agent: Agent, req: RunRequest, image: str) -> str:
        """The container; an agent that has a conversation already (started again after a
        restart) resumes it."""
        had = await asyncio.to_thread(self.sessions.transcript, agent.session_id)
        plan = SessionPlan(agent.session_id, "resume" if had else "new")
        name, volumes = self.container_name(agent), request_volumes(self.cfg, req)
        await asyncio.to_thread(make_volume_dirs, self.cfg, volumes)
        await self.runner.open_session(req, plan, image)
        credentials = self.runner.credentials
        secret_env = credentials.secret_env(req.podman.get("secrets_env", {}))
        spec = container_spec(
            self.cfg, req, name=name, prompt_file="",
            home=self.sessions.host_home(agent.session_id),
            secrets=credentials.mounts(secret_env),
            user=agent_user(self.cfg, self.runner.rootless),
            staged=self.runner.staging.sources(name, volumes),
            labels={**MANAGED_LABEL, "stromboli.instance": self.runner.instance,
                    "stromboli.agent": agent.id, "stromboli.session": agent.session_id})
        command = container_command(self.cfg, req, plan, plan.mode == "new", secret_env,
                                    stdin="")
        await asyncio.to_thread(self.runner.staging.stage, self.cfg, name, volumes)
        try:
            return await self.podman.call(self.podman.create, image, command, stdin_open=True,
                                          **spec)
        except podman.errors.APIError as exc:
            raise ApiError(500, f"agent: spawn: {short_error(exc)}") from None
        except PodmanUnavailable as exc:  # (also Podman's answers: APIError is an OSError)
            raise volume_failure(exc, volumes) or exc from None

    async def _supervise(self, agent: Agent, cid: str, reader: asyncio.StreamReader,
                         req: RunRequest) -> str:
        """Turn the process's output into events until it exits, or until it must stop
        (DELETE, shutdown, idleness, quota, lifetime) → the exit error ("" if none)."""
        pump = asyncio.ensure_future(self._pump(agent, reader))
        watchers = [asyncio.ensure_future(self._stop_requested(agent)),
                    asyncio.ensure_future(self.runner.watch_quota(agent.session_id))]
        if not agent.idle_timeout_disabled:
            watchers.append(asyncio.ensure_future(self._idle(agent)))
        if "timeout" in req.podman:
            watchers.append(asyncio.ensure_future(self._lifetime(req.podman["timeout"])))
        if self.cfg.agent_max_lifetime:
            watchers.append(asyncio.ensure_future(self._max_lifetime(agent)))
        try:
            await asyncio.wait({pump, *watchers}, return_when=asyncio.FIRST_COMPLETED)
            for watcher in watchers:
                watcher.cancel()
            if pump.done() and pump.exception() is None:
                try:
                    code = await self.podman.call(self.podman.exit_code, cid)
                except Exception as exc:  # gone, or closed its output and lingers
                    return f"agent: process ended; its exit status is unknown " \
                           f"({short_error(exc)})"
                return "" if code == 0 else f"agent: process exited with status {code}"
            if pump.done():
                log.error("agent output handling failed", exc_info=pump.exception(),
                          extra=fields(agent_id=agent.id))
                reason = f"agent: output handling failed: {short_error(pump.exception())}"
            else:
                reason = next(w.result() for w in watchers if w.done() and not w.cancelled())
            await self._stop(agent, cid, pump)
            return reason
        finally:
            for task in (pump, *watchers):
                task.cancel()

    async def _pump(self, agent: Agent, reader: asyncio.StreamReader) -> None:
        """Output frames → lines → events. Every 256 lines it lets the loop run: a flood
        of tiny lines must not starve the other clients."""
        lines = {1: LineBuffer(self.cfg.agent_max_line), 2: LineBuffer(self.cfg.agent_max_line)}
        count = 0
        async for stream, data in Podman.read_frames(reader):
            stream = 2 if stream == 2 else 1
            for line in lines[stream].feed(data):
                await agent.on_line(stream, line)
                count += 1
                if count % 256 == 0:
                    await asyncio.sleep(0)
        for stream, buffer in lines.items():
            for line in buffer.flush():
                await agent.on_line(stream, line)

    async def _stop(self, agent: Agent, cid: str, pump: asyncio.Future) -> None:
        """Close its stdin, then SIGTERM, then SIGKILL, a grace period apart (as upstream)."""
        with contextlib.suppress(OSError, RuntimeError, AttributeError):
            agent.stdin.write_eof()
        for sig in ("SIGTERM", "SIGKILL"):
            if (await asyncio.wait({pump}, timeout=AGENT_STOP_GRACE))[0]:
                return
            with contextlib.suppress(Exception):  # destroy() kills it at the end anyway
                await self.podman.call(self.podman.kill, cid, sig)
        await asyncio.wait({pump}, timeout=AGENT_STOP_GRACE)
        pump.cancel()

    @staticmethod
    async def _stop_requested(agent: Agent) -> str:
        await agent.stop_requested.wait()
        return agent.stop_reason

    @staticmethod
    async def _idle(agent: Agent) -> str:
        while True:
            left = agent.last_activity + agent.idle_timeout - time.time()
            if left <= 0 and agent.status != "generating":
                return AGENT_IDLE_ERROR
            await asyncio.sleep(left if left > 0 else 1.0)

    @staticmethod
    async def _lifetime(timeout: str) -> str:
        seconds = parse_duration(timeout)
        await asyncio.sleep(seconds)
        return f"agent: lived past its podman.timeout of {format_duration(seconds)}"

    def _lifetime_left(self, agent: Agent) -> float:
        """Seconds until agent.max_lifetime after its creation (restarts count too)."""
        if not self.cfg.agent_max_lifetime:
            return float("inf")
        return agent.created_at + self.cfg.agent_max_lifetime - time.time()

    def _lifetime_error(self) -> str:
        return (f"agent: maximum lifetime reached ({format_duration(self.cfg.agent_max_lifetime)}"
                " since its creation; agent.max_lifetime)")

    async def _max_lifetime(self, agent: Agent) -> str:
        await asyncio.sleep(max(0.0, self._lifetime_left(agent)))
        return self._lifetime_error()

    async def delete(self, agent_id: str) -> None:
        """Stop the agent (if live) and forget it, once its container is gone."""
        agent = self.get(agent_id)
        agent.request_stop("")
        self._release_reserved(agent)  # one not started again yet
        if agent.task is not None:
            await asyncio.shield(agent.task)
        self.agents.pop(agent_id, None)
        await self.store.call(self.store.delete_agent, agent_id)

    async def cleanup_forever(self) -> None:
        """Exited agents stay listed (upstream: until deleted) for jobs.cleanup_ttl."""
        while True:
            await asyncio.sleep(self.cfg.jobs_cleanup_interval)
            cutoff = time.time() - self.cfg.jobs_cleanup_ttl
            for agent in [a for a in self.agents.values()
                          if a.status == "exited" and (a.exited_at or 0) < cutoff]:
                self.agents.pop(agent.id, None)
                await self.store.call(self.store.delete_agent, agent.id)

    async def shutdown(self) -> None:
        """Stop every live agent's process (upstream stops its agents too); their rows stay
        live, and the next start brings them back. Followers get an `error` event saying so,
        and their streams end."""
        tasks = [a.task for a in self.agents.values() if a.task]
        for agent in self.agents.values():
            agent.request_stop(AGENT_PAUSED)
        if tasks:
            await asyncio.wait(tasks, timeout=3 * AGENT_STOP_GRACE + 5)


# ---------------------------------------------------------------------------
# Auth — static tokens, HS256 JWT issue/verify, persistent revocation
# ---------------------------------------------------------------------------

class AuthError(ApiError):
    def __init__(self, message: str, status: int = 401):
        super().__init__(status, message)


class Auth:
    """Bearer tokens: static API tokens (compared in constant time) and HS256 JWTs whose
    revocations live in the store, so a logout survives a restart.

    Only a static token mints JWTs. Each mint starts a family (claim `fam`) shared by the
    tokens later refreshed from it; refresh tokens are single-use and rotate, and the reuse
    of a used one (a stolen copy) revokes its whole family, as logout does."""

    MIRROR_LIMIT = 100_000  # revocations mirrored in memory at most
    VERIFIED_LIMIT = 4096  # tokens whose signature check is remembered

    def __init__(self, cfg: Config, store: Store):
        self.cfg, self.store = cfg, store
        self.secret = cfg.jwt_secret.strip()
        self.static = [t.encode() for t in cfg.auth_valid_tokens]
        # The revocation table mirrored in memory, so that a token check needs no trip to
        # the store's thread; None (the store answers) when it outgrew MIRROR_LIMIT.
        self.revoked: dict[str, float] | None = None
        self._verified: dict[str, dict] = {}  # token → claims (signature already checked)

    async def load(self) -> None:
        self.revoked = await self.store.call(self.store.revocations, self.MIRROR_LIMIT)

    def reap(self) -> None:
        """Forget expired revocations (the store reaps its own)."""
        if self.revoked is not None:
            now = time.time()
            self.revoked = {k: until for k, until in self.revoked.items() if until > now}

    @staticmethod
    def bearer(request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        if not header:
            raise AuthError("missing authorization header")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("invalid authorization header format")
        return token.strip()

    def is_static(self, token: str) -> bool:
        encoded = token.encode()
        return any(hmac.compare_digest(encoded, t) for t in self.static)

    def issue(self, subject: str, family: str, refresh: bool = False) -> str:
        now = int(time.time())
        lifetime = self.cfg.jwt_refresh_expiry if refresh else self.cfg.jwt_access_expiry
        claims = {"sub": subject, "iat": now, "exp": now + int(lifetime),
                  "jti": str(uuid.uuid4()), "fam": family}
        if refresh:
            claims["is_refresh"] = True
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def decode(self, token: str, refresh: bool = False) -> dict:
        """Verify signature (HS256 only), expiry and token kind; raise AuthError."""
        message = "invalid or expired refresh token" if refresh else "invalid or expired token"
        if not self.secret:
            raise AuthError(message)
        claims = self._verified.get(token)
        if claims is None or claims["exp"] <= time.time():
            try:
                claims = jwt.decode(token, self.secret, algorithms=["HS256"],
                                    options={"require": ["exp", "iat", "sub", "jti"]})
            except jwt.PyJWTError:
                raise AuthError(message) from None
            if len(self._verified) >= self.VERIFIED_LIMIT:
                self._verified.pop(next(iter(self._verified)))
            self._verified[token] = claims
        if bool(claims.get("is_refresh")) != refresh:
            raise AuthError(message)
        return claims

    @staticmethod
    def family_key(claims: dict) -> str:
        return f"family:{claims.get('fam') or claims['jti']}"

    async def _store(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self.store.call(fn, *args)
        except sqlite3.Error:
            raise AuthError("auth backend unavailable", 503) from None

    async def check_access(self, token: str) -> dict | None:
        """The access token's claims (None for a static token), or AuthError."""
        if self.is_static(token):
            return None
        claims = self.decode(token)
        if await self.is_revoked(claims["jti"], self.family_key(claims)):
            raise AuthError("token revoked")
        return claims

    async def is_revoked(self, *keys: str) -> bool:
        if self.revoked is None:
            return await self._store(self.store.is_revoked, *keys)
        now = time.time()
        return any(self.revoked.get(key, 0) > now for key in keys)

    async def _mark(self, key: str, until: float, once: bool = False) -> bool:
        """Record a revocation (in the store, the truth, and the mirror); with `once`, only
        if it is not there yet → whether it was recorded now."""
        if once and await self.is_revoked(key):
            return False
        if self.revoked is not None:  # set before the write: the loop sees it at once
            self.revoked[key] = until
            if len(self.revoked) > self.MIRROR_LIMIT:
                self.revoked = None
        fn = self.store.use_once if once else self.store.revoke
        return await self._store(fn, key, until) or not once

    async def refresh(self, token: str) -> dict:
        """A new pair for a refresh token, which is used up; a reused one revokes its family."""
        claims = self.decode(token, refresh=True)
        if await self.is_revoked(self.family_key(claims)):
            raise AuthError("invalid or expired refresh token")
        if not await self._mark(claims["jti"], float(claims["exp"]), once=True):
            await self.revoke_family(claims)
            raise AuthError("refresh token already used: its token family is revoked")
        return self.tokens(claims["sub"], claims.get("fam") or claims["jti"])

    async def revoke_family(self, claims: dict) -> None:
        """Revoke every token of the claims' grant (until any of them could still expire)."""
        until = time.time() + max(self.cfg.jwt_access_expiry, self.cfg.jwt_refresh_expiry)
        await self._mark(self.family_key(claims), until)

    def tokens(self, subject: str, family: str | None = None) -> dict:
        family = family or str(uuid.uuid4())
        return {"access_token": self.issue(subject, family),
                "refresh_token": self.issue(subject, family, True),
                "token_type": "bearer", "expires_in": int(self.cfg.jwt_access_expiry)}


# ---------------------------------------------------------------------------
# Rate limiting — token buckets per client IP, trusted proxies
# ---------------------------------------------------------------------------

class TokenBucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float):
        self.tokens, self.stamp = float(burst), now

    def refill(self, rate: float, burst: float, now: float) -> None:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now

    def take(self, rate: float, burst: float, now: float) -> bool:
        self.refill(rate, burst, now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self, rate: float) -> int:
        """Whole seconds until the next token."""
        return max(1, int((1 - self.tokens) / rate + 0.999))


def strip_port(address: str) -> str:
    """`1.2.3.4:80` → `1.2.3.4`, `[::1]:80` → `::1`; a bare address is kept."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    m = re.match(r"^\[([^\]]+)\](?::\d+)?$", address) or re.match(r"^([^:]+):\d+$", address)
    return m.group(1) if m else address


def ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(strip_port(text.strip()))
    except ValueError:
        return None


class Buckets:
    """Token buckets by client IP, in least-recently-used order: buckets idle for 10
    minutes go, and past `max_clients` the least recently seen goes, so an IP-rotation
    flood cannot grow memory without bound."""

    IDLE_SECONDS = 600

    def __init__(self, rate: float, burst: float, max_clients: int):
        self.rate, self.burst, self.max_clients = rate, burst, max(1, max_clients)
        self.table: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.table)

    def get(self, ip: str, now: float) -> TokenBucket:
        bucket = self.table.get(ip)
        if bucket is None:
            while self.table:
                oldest = next(iter(self.table.values()))
                if now - oldest.stamp <= self.IDLE_SECONDS and len(self.table) < self.max_clients:
                    break
                self.table.popitem(last=False)
            bucket = self.table[ip] = TokenBucket(self.burst, now)
        else:
            self.table.move_to_end(ip)
        return bucket


class FailureBudget(Buckets):
    """Failed authentications per IP: each spends a token; with none left, the IP's auth
    attempts are refused (429) until the budget refills."""

    def blocked(self, ip: str) -> int:
        """Seconds to wait before trying again, 0 when the IP may try now."""
        bucket = self.table.get(ip)
        if bucket is None:
            return 0
        bucket.refill(self.rate, self.burst, time.monotonic())
        return 0 if bucket.tokens >= 1 else bucket.wait(self.rate)

    def spend(self, ip: str) -> None:
        now = time.monotonic()
        self.get(ip, now).take(self.rate, self.burst, now)


class RateLimiter:
    """Per-IP request buckets (upstream's) and, apart from them, per-IP budgets of failed
    authentications (on even when rate limiting is off), so that tokens cannot be
    guessed at speed."""

    def __init__(self, cfg: Config):
        self.requests = Buckets(cfg.rate_limit_rate, cfg.rate_limit_burst,
                                cfg.rate_limit_max_clients)
        self.failures = FailureBudget(cfg.auth_failure_rate, cfg.auth_failure_burst,
                                      cfg.rate_limit_max_clients)
        self.trusted = []
        for entry in cfg.rate_limit_trusted_proxies:
            try:
                self.trusted.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                log.warning("ignoring invalid trusted proxy", extra=fields(entry=entry))

    def is_trusted(self, ip: Any) -> bool:
        return ip is not None and any(ip in net for net in self.trusted)

    def client_ip(self, request: web.Request) -> str:
        """The peer, or behind trusted proxies the rightmost forwarded address that is not
        one of them (entries left of it are the client's to forge; non-IPs are ignored)."""
        peer = request.remote or ""
        if not self.trusted or not self.is_trusted(ip_or_none(peer)):
            return peer
        hops = [ip for ip in map(ip_or_none, request.headers.get("X-Forwarded-For", "")
                                 .split(",")) if ip is not None]
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return str(hop)
        real = ip_or_none(request.headers.get("X-Real-IP", ""))
        return str(real or (hops[0] if hops else peer))

    def check(self, ip: str) -> tuple[bool, dict[str, str]]:
        table, now = self.requests, time.monotonic()
        bucket = table.get(ip, now)
        allowed = bucket.take(table.rate, table.burst, now)
        headers = {"X-RateLimit-Limit": f"{table.rate:g}",
                   "X-RateLimit-Remaining": str(max(0, int(bucket.tokens))),
                   "X-RateLimit-Reset": str(int(time.time()) + 1)}
        if not allowed:
            headers["X-RateLimit-Remaining"] = "0"
            headers["Retry-After"] = str(bucket.wait(table.rate))
        return allowed, headers


# ---------------------------------------------------------------------------
# Agent image — building the default image (from a registry, or offline)
# ---------------------------------------------------------------------------

IMAGE_CHANGES = ["USER user", "WORKDIR /workspace", "ENV PATH=/usr/local/bin:/usr/bin:/bin",
                 "ENV HOME=/home/user", "LABEL ai.stromboli.compatible=true",
                 "LABEL ai.stromboli.claude-cli=true"]
ROOTFS_PASSWD = ("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/bash\n"
                 "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
ROOTFS_FILES = {"etc/passwd": ROOTFS_PASSWD, "etc/group": "root:x:0:\nuser:x:1000:\n",
                "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
                "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
                "etc/shells": "/bin/sh\n/bin/bash\n"}


def find_claude_binary() -> str | None:
    """A native `claude` binary: on PATH, or inside an npm install of the CLI."""
    candidates = [shutil.which("claude") or ""]
    for root in ("/usr/local/lib/node_modules", "/usr/lib/node_modules", "node_modules",
                 os.path.expanduser("~/.npm-global/lib/node_modules")):
        candidates += sorted(map(str, pathlib.Path(root).glob(
            "@anthropic-ai/claude-code*/**/claude")))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path)
    return None


class RootfsBuilder:
    """A minimal usr-merged root filesystem as a tar: static busybox, bash, the libraries
    that bash and claude link against, the claude binary, a `user` (uid 1000)."""

    def __init__(self, tar: tarfile.TarFile):
        self.tar = tar
        self.seen: set[str] = set()

    def _add(self, name: str, kind: bytes, mode: int, uid: int = 0, data: bytes | None = None,
             link: str = "", source: str | None = None) -> None:
        name = name.strip("/")
        if name in self.seen:
            return
        parent = os.path.dirname(name)
        if parent and parent not in self.seen:
            self.dir(parent)
        self.seen.add(name)
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, uid, link
        info.mtime = 1_700_000_000
        if source:
            info.size = os.path.getsize(source)
            with open(source, "rb") as fh:
                self.tar.addfile(info, fh)
            return
        info.size = len(data or b"")
        self.tar.addfile(info, io.BytesIO(data or b""))

    def dir(self, name: str, mode: int = 0o755, uid: int = 0) -> None:
        self._add(name, tarfile.DIRTYPE, mode, uid)

    def link(self, name: str, target: str) -> None:
        self._add(name, tarfile.SYMTYPE, 0o777, link=target)

    def text(self, name: str, content: str) -> None:
        self._add(name, tarfile.REGTYPE, 0o644, data=content.encode())

    def copy(self, name: str, source: str) -> None:
        real = os.path.realpath(source)
        self._add(name, tarfile.REGTYPE, os.stat(real).st_mode & 0o7777, source=real)

    @staticmethod
    def in_image(path: str) -> str:
        path = os.path.normpath(path).lstrip("/")
        top = path.split("/")[0]
        return f"usr/{path}" if top in ("bin", "sbin", "lib", "lib64") else path

    def library(self, path: str) -> None:
        """A shared library under the path ldd names, keeping its symlink chain."""
        for _ in range(10):
            if not os.path.islink(path):
                break
            target = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
            self.link(self.in_image(path), "/" + self.in_image(target))
            path = target
        self.copy(self.in_image(path), path)

    def build(self, claude: str, busybox: str, bash: str) -> None:
        for top in ("bin", "sbin", "lib", "lib64"):
            self.dir(f"usr/{top}")
            self.link(top, f"usr/{top}")
        for name, mode, uid in (("tmp", 0o1777, 0), ("var/tmp", 0o1777, 0), ("root", 0o700, 0),
                                ("home/user", 0o755, CONTAINER_UID),
                                ("workspace", 0o777, CONTAINER_UID),
                                ("proc", 0o755, 0), ("sys", 0o755, 0), ("dev", 0o755, 0),
                                ("run", 0o755, 0), ("etc", 0o755, 0)):
            self.dir(name, mode, uid)
        self.copy("usr/bin/busybox", busybox)
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True).stdout
        for applet in applets.split():
            if applet not in ("bash", "busybox") and "/" not in applet:
                self.link(f"usr/bin/{applet}", "busybox")
        self.copy("usr/bin/bash", bash)
        self.copy("usr/local/bin/claude", claude)
        for binary in (bash, claude):
            ldd = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
            for m in re.finditer(r"(?:=>\s*|^\s*)(/\S+)", ldd, re.M):
                self.library(m.group(1))
        for name, content in ROOTFS_FILES.items():
            self.text(name, content)
        if os.path.isfile("/etc/ssl/certs/ca-certificates.crt"):
            self.copy("etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs/ca-certificates.crt")


def build_offline_image(podman_api: Podman, reference: str, claude: str) -> None:
    """Assemble the root filesystem and import it through the Podman API (no registry)."""
    busybox = shutil.which("busybox")
    bash = shutil.which("bash")
    if not busybox or subprocess.run(["ldd", busybox], capture_output=True).returncode == 0:
        raise SystemExit("image build --offline needs a static busybox "
                         "(apt-get install busybox-static)")
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        with tarfile.open(tmp.name, "w", format=tarfile.GNU_FORMAT) as tar:
            RootfsBuilder(tar).build(claude, busybox, bash)
        podman_api.import_image(tmp.name, reference, IMAGE_CHANGES)


def build_registry_image(podman_api: Podman, reference: str) -> None:
    """Build from the embedded Containerfile (needs a reachable registry and npm)."""
    with tempfile.TemporaryDirectory() as ctx:
        pathlib.Path(ctx, "Containerfile").write_text(AGENT_CONTAINERFILE)
        _, logs = podman_api.client.images.build(path=ctx, dockerfile="Containerfile",
                                                 tag=reference, rm=True)
        for entry in logs:
            text = entry.get("stream", "") if isinstance(entry, dict) else str(entry)
            sys.stderr.write(text)


# ---------------------------------------------------------------------------
# Images and secrets — listing, ranking, inspect, search, pull; Podman secrets
# ---------------------------------------------------------------------------

LISTED_INCOMPATIBLE = ("*alpine*", "*-alpine", "alpine:*", "alpine", "gcr.io/distroless/*",
                       "distroless/*", "scratch", "busybox*", "busybox")
RANK_TEXT = {1: "Stromboli verified compatible", 2: "Claude CLI pre-installed",
             3: "Standard glibc-based (compatible)", 4: "Incompatible (Alpine/musl/distroless)"}
MAX_SECRET_BYTES = 1024 * 1024


def check_image_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise BadRequest("validation error: image name cannot be empty")
    if len(name) > 255:
        raise BadRequest("validation error: image name exceeds maximum length of 255 characters")
    if not IMAGE_NAME_RE.match(name) or ".." in name:
        raise BadRequest("validation error: invalid image name format")
    return name


def split_reference(reference: str) -> tuple[str, str]:
    """`registry:5000/repo:tag` → (`registry:5000/repo`, `tag`); no tag → `latest`."""
    repository, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        return reference, "latest"
    return repository, tag


def image_info(image_id: str, reference: str, size: int, created: Any, labels: dict) -> dict:
    """ImageInfoResponse (upstream's ranking): rank from the stromboli labels, then from
    the name."""
    repository, tag = split_reference(reference)
    labels = labels or {}
    name = repository.lower() + ("" if tag == "latest" else f":{tag}")
    if labels.get("ai.stromboli.compatible") == "true":
        rank = 1
    elif labels.get("ai.stromboli.claude-cli") == "true":
        rank = 2
    else:
        rank = 4 if image_matches(name, LISTED_INCOMPATIBLE) else 3
    if isinstance(created, (int, float)):
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    tools = [t.strip() for t in labels.get("ai.stromboli.tools", "").split(",") if t.strip()]
    return drop_none({
        "id": image_id.removeprefix("sha256:")[:12], "repository": repository, "tag": tag,
        "size": size, "created": created, "compatibility_rank": rank,
        "compatible": labels.get("ai.stromboli.compatible") == "true" or rank <= 3,
        "tools": tools or None, "has_claude_cli": labels.get("ai.stromboli.claude-cli") == "true",
        "description": labels.get("ai.stromboli.description")})


def search_term(query: Any) -> str:
    """Validate a search query and qualify it with docker.io/ when it names no registry."""
    if not query:
        raise BadRequest("query parameter 'q' is required")
    if len(query) > 255 or not IMAGE_NAME_RE.match(query):
        raise BadRequest("validation error: invalid search query format")
    first, sep, _ = query.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return query
    return f"docker.io/{query}"


class PodmanCatalog:
    """Images and secrets through podman-py (blocking: call through Podman.call)."""

    def __init__(self, podman_api: Podman, instance: str, allowed: Iterable[str]):
        self.podman, self.client = podman_api, podman_api.client
        self.instance, self.allowed = instance, frozenset(allowed)

    def images(self) -> list[dict]:
        found = []
        for image in self.client.images.list():
            attrs = image.attrs
            for reference in attrs.get("RepoTags") or attrs.get("Names") or []:
                if reference.startswith("<none>"):
                    continue
                found.append(image_info(attrs.get("Id", ""), reference, attrs.get("Size", 0),
                                        attrs.get("Created"), attrs.get("Labels")))
        found.sort(key=lambda i: (i["compatibility_rank"], i["repository"], i["tag"]))
        return found

    def inspect(self, name: str) -> dict:
        try:
            attrs = self.client.images.get(name).attrs
        except podman.errors.ImageNotFound:
            raise NotFound("image not found") from None
        labels = (attrs.get("Config") or {}).get("Labels") or attrs.get("Labels") or {}
        tags = attrs.get("RepoTags") or [name]
        info = image_info(attrs.get("Id", ""), tags[0], attrs.get("Size", 0),
                          attrs.get("Created"), labels)
        info.update(labels=labels or None, rank_description=RANK_TEXT[info["compatibility_rank"]])
        return drop_none(info)

    def search(self, term: str, limit: int) -> list[dict]:
        try:  # podman-py always asks for untruncated results
            results = self.client.images.search(term, limit=limit)
        except podman.errors.APIError:
            raise ApiError(502, "registry search failed") from None
        return [{"index": r.get("Index", ""), "name": r.get("Name", ""),
                 "description": r.get("Description", ""), "stars": int(r.get("Stars") or 0),
                 "official": r.get("Official") == "[OK]", "automated": r.get("Automated") == "[OK]"}
                for r in results]

    def pull(self, image: str, platform: str | None, progress: Callable[[str], None]) -> str:
        """Pull and confirm: podman-py can return without raising when a registry is
        unreachable, so errors in the stream count and the image must exist afterwards."""
        kwargs = {"platform": platform} if platform else {}
        try:
            for event in self.client.images.pull(image, stream=True, decode=True, **kwargs):
                if isinstance(event, dict) and event.get("error"):
                    raise RunFailed(str(event["error"]).strip())
                text = event.get("stream") if isinstance(event, dict) else str(event)
                if text and text.strip():
                    progress(text.strip())
        except podman.errors.APIError as exc:
            raise RunFailed(short_error(exc)) from None
        try:
            return self.client.images.get(image).id
        except podman.errors.ImageNotFound:
            raise RunFailed(f"{image} is not present after the pull") from None

    # Secrets: only those stromboli created (label managed-by=stromboli; the daemon's own
    # carry its instance) and those an admin allowed; other tenants' secrets stay unseen.
    def secrets(self) -> list[dict]:
        found = []
        for listed in self.client.secrets.list():
            with contextlib.suppress(podman.errors.NotFound):  # removed meanwhile
                attrs = self.client.secrets.get(listed.id).attrs  # the list has no labels
                if self._kind(attrs) != "foreign":
                    found.append(self._secret(attrs))
        return found

    def secret(self, name: str) -> dict:
        attrs = self._find(name)
        if attrs is None:
            raise NotFound("secret not found")
        return self._secret(attrs)

    def _find(self, name: str) -> dict | None:
        attrs = self.podman.secret(name)
        return None if attrs is None or self._kind(attrs) == "foreign" else attrs

    def _kind(self, attrs: dict) -> str:
        """own (the daemon's credentials), managed (created through the API), allowed (an
        admin's choice) or foreign."""
        spec = attrs.get("Spec") or {}
        labels = spec.get("Labels") or {}
        if labels.get("managed-by") == "stromboli":
            instance = labels.get("stromboli.instance")
            if instance is None:
                return "managed"
            if instance == self.instance:
                return "own"
        return "allowed" if spec.get("Name") in self.allowed else "foreign"

    def _secret(self, attrs: dict) -> dict:
        name = (attrs.get("Spec") or {}).get("Name", "")
        return {"id": attrs.get("ID", ""), "name": name, "created_at": attrs.get("CreatedAt", ""),
                "managed": self._kind(attrs) == "own"}

    def create_secret(self, name: str, value: bytes) -> None:
        if self.podman.secret_exists(name):
            raise Conflict("secret already exists", name=name)
        self.podman.create_secret(name, value, MANAGED_LABEL)

    def delete_secret(self, name: str) -> None:
        attrs = self._find(name)
        if attrs is None:
            raise NotFound("secret not found", name=name)
        kind = self._kind(attrs)
        if kind == "own":
            raise Conflict("secret is managed by stromboli and cannot be deleted",
                           name=name)
        if kind == "allowed":
            raise BadRequest("secret was not created by stromboli (it is only allowed for use by "
                             "STROMBOLI_SECRETS_ALLOWED) and cannot be deleted here",
                             name=name)
        self.client.secrets.remove(attrs["ID"])


# ---------------------------------------------------------------------------
# OpenAPI — route records, and the document at /swagger/doc.json derived from them
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Route:
    """One API route, declared beside its handler with @api. The router, the perimeter
    (`access`), the error renderer (`envelope`) and the OpenAPI document all read it."""

    method: str
    path: str
    handler: Callable
    access: str  # public | token (a static token mints JWTs: auth, no rate limit) | protected
    envelope: str  # the ApiError shape of every error raised while serving it
    tag: str
    summary: str
    description: str = ""
    body: str = ""  # the definition of its JSON body, if any
    body_required: bool = True
    params: tuple[dict, ...] = ()
    produces: tuple[str, ...] = ("application/json",)
    ok: tuple[int, str, str | None] = (200, "OK", None)
    also_ok: tuple[tuple[int, str, str | None], ...] = ()  # other success answers
    errors: tuple[tuple[int, str], ...] = ()  # (status, description) beyond the derived ones
    error_schema: str = ""  # the definition of its error bodies (default: the envelope's)
    reads_bearer: bool = False  # a public route that checks the bearer token itself

    @property
    def doc_path(self) -> str:
        return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", self.path)


ROUTES: list[Route] = []  # filled once, at import, by @api (in declaration order)


def api(method: str, path: str, access: str, envelope: str, tag: str, summary: str,
        **details: Any) -> Callable[[Callable], Callable]:
    """Declare the route a handler serves (see Route)."""
    def register(handler: Callable) -> Callable:
        ROUTES.append(Route(method, path, handler, access, envelope, tag, summary, **details))
        return handler
    return register


def param(name: str, where: str, kind: str, description: str, example: Any = None,
          **extra: Any) -> dict:
    return {"name": name, "in": where, "type": kind, "description": description,
            **({"required": True} if where == "path" else {}),
            **({"x-example": example} if example is not None else {}), **extra}


def prop(kind: str, description: str = "", **extra: Any) -> dict:
    """A schema: `kind` is a JSON type, "[type]" an array of it, "#Definition" a reference,
    "[#Definition]" an array of them; `example` and other keywords join it."""
    if kind.startswith("["):
        schema: dict = {"type": "array", "items": prop(kind[1:-1])}
    elif kind.startswith("#"):
        ref = {"$ref": f"#/definitions/{kind[1:]}"}
        schema = {"allOf": [ref]} if description or extra else ref
    else:
        schema = {"type": kind}
    return {**schema, **({"description": description} if description else {}), **extra}


def obj(description: str, properties: dict, required: Iterable[str] = ()) -> dict:
    return {**({"description": description} if description else {}), "type": "object",
            "properties": properties, **({"required": list(required)} if required else {})}


# What each option kind (CLAUDE_FLAGS, PODMAN_OPTIONS) is in a JSON body and in a query.
OPTION_SCHEMA = {"bool": "boolean", "str": "string", "debug": "string", "multi": "[string]",
                 "joined": "[string]", "int": "integer", "budget": "number",
                 "json_text": "string", "object": "object", "map": "object"}
OPTION_DEFINITIONS = {"lifecycle": "#stromboli_internal_types.LifecycleHooks",
                      "environment": "#stromboli_internal_types.EnvironmentConfig"}
OBJECT_VALUES = {"agents": {}, "secrets_env": {"type": "string"}}


def option_schema(name: str, kind: str, description: str, example: Any) -> dict:
    kind_text = OPTION_DEFINITIONS.get(name) or OPTION_SCHEMA[kind]
    extra = {"example": example} if example is not None else {}
    if name in OBJECT_VALUES:
        extra["additionalProperties"] = OBJECT_VALUES[name]
    return prop(kind_text, description, **extra)


def option_rows() -> Iterable[tuple[str, str, str, str, Any]]:
    """(section, name, kind, description, example) of every run option."""
    for name, kind, _, description, example in CLAUDE_FLAGS:
        yield "claude", name, kind, description, example
    for name, (kind, description, example) in CLAUDE_OTHER.items():
        yield "claude", name, kind, description, example
    for name, (kind, description, example) in PODMAN_OPTIONS.items():
        yield "podman", name, kind, description, example


def options_definition(section: str, description: str) -> dict:
    return obj(description, {name: option_schema(name, kind, text, example)
                             for where, name, kind, text, example in option_rows()
                             if where == section})


def stream_parameters() -> list[dict]:
    """/run/stream's query: upstream's three, the replay ones, then every run option (as
    stream_request_body parses them)."""
    found = [param("prompt", "query", "string", "The prompt to send to Claude (required "
                   "unless run_id is given)"),
             param("workdir", "query", "string", "Working directory inside container"),
             param("session_id", "query", "string", "Session ID for conversation continuation"),
             param("webhook_url", "query", "string", "(extension) Accepted and ignored: a "
                   "stream has no job to report"),
             param("run_id", "query", "string", "(extension) Replay/follow this run's events "
                   "instead of starting a run"),
             param("Last-Event-ID", "header", "integer", "(extension) With run_id: send only "
                   "events after this id"),
             param("last_event_id", "query", "integer", "(extension) Same as the Last-Event-ID "
                   "header")]
    for section, name, kind, _, _ in option_rows():
        if name == "session_id":
            continue
        text = f"(extension) {section}.{name} (also as {section}.{name}=)"
        schema = OPTION_SCHEMA[kind]
        if name == "volumes":  # options hold commas: one parameter per volume
            found.append(param(name, "query", "array", text, items={"type": "string"},
                               collectionFormat="multi"))
        elif schema == "[string]":
            found.append(param(name, "query", "array", text, items={"type": "string"},
                               collectionFormat="csv"))
        elif schema == "object":
            found.append(param(name, "query", "string", text + ", as a JSON object"))
        else:
            found.append(param(name, "query", schema, text))
    return found


ENVELOPE_SCHEMAS = {"run": "internal_api.RunResponse", "error": "internal_api.ErrorResponse",
                    "success": "internal_api.ErrorResponse", "text": ""}


def response(description: str, definition: str | None, status: int = 200) -> dict:
    """A response whose body is a definition, a bare JSON type ("object") or text (None);
    a 204 has no body, so no schema."""
    if status == 204:
        return {"description": description}
    if not definition:
        schema = {"type": "string"}
    elif definition.startswith("["):
        schema = prop(definition)
    else:
        schema = {"type": definition} if definition.islower() else prop("#" + definition)
    return {"description": description, "schema": schema}


def operation(route: Route) -> dict:
    """A route record as an OpenAPI operation. Beyond its own errors: 401 where auth is
    checked, 429 where rate limits or the failed-auth budget apply, 413/415/408 where
    there is a body, and 403/421 (browser checks) everywhere."""
    error_schema = route.error_schema or ENVELOPE_SCHEMAS[route.envelope]
    responses = {str(status): response(text, definition, status)
                 for status, text, definition in (route.ok, *route.also_ok)}
    checks_auth = route.access != "public" or route.path.startswith("/auth/")
    if route.access != "public":
        responses["401"] = {"$ref": "#/responses/Unauthorized"}
    if route.access == "protected" or checks_auth:
        responses["429"] = {"$ref": "#/responses/RateLimited"}
    derived = [(403, "Foreign Origin (browser check; extension)"),
               (421, "Host header not ours (browser check; extension)")]
    if route.body:
        derived += [(408, "Body not received in time (extension)"),
                    (413, "Body over the size limit (extension)"),
                    (415, "Body not sent as application/json (extension)")]
    for code, description in (*derived, *route.errors):
        responses[str(code)] = response(description, error_schema)
    parameters = list(route.params)
    if route.body:
        parameters.insert(0, {"name": "request", "in": "body", "required": route.body_required,
                              "description": "Request body", "schema": prop("#" + route.body)})
    found = {"tags": [route.tag], "summary": route.summary, "description": route.description,
             "produces": list(route.produces), "responses": dict(sorted(responses.items()))}
    if parameters:
        found["parameters"] = parameters
    if route.body:
        found["consumes"] = ["application/json"]
    if route.access == "public" and not route.reads_bearer:
        found["security"] = []
    return found


def build_openapi(routes: Iterable[Route]) -> dict:
    paths: dict[str, dict] = {}
    for route in routes:
        paths.setdefault(route.doc_path, {})[route.method.lower()] = operation(route)
    return {**OPENAPI_HEAD, "paths": paths, "definitions": {
        **DEFINITIONS,
        "stromboli_internal_types.ClaudeOptions": options_definition(
            "claude", "All available Claude CLI options for headless execution"),
        "stromboli_internal_types.PodmanOptions": options_definition(
            "podman", "Podman container mount configuration")}}


# Swagger 2.0, upstream's v0.5.6 document; definition names are upstream's
# so generated clients match. What this server adds is marked "(extension)".
OPENAPI_HEAD: dict = {
    "swagger": "2.0",
    "info": {
        "title": "Stromboli API",
        "version": VERSION,
        "description": (
            "Claude Code container orchestration API: secure, isolated AI execution. This is "
            "the Python re-implementation, wire-compatible with upstream Stromboli v0.5.6. "
            "Every response carries X-Request-ID; rate-limited routes carry "
            "X-RateLimit-Limit/Remaining/Reset when rate limiting is enabled. The Prometheus "
            "/metrics endpoint is on a separate listener."),
        "license": {"name": "MIT", "url": "https://opensource.org/licenses/MIT"},
    },
    "basePath": "/",
    "schemes": ["http"],
    "securityDefinitions": {
        "BearerAuth": {"type": "apiKey", "name": "Authorization", "in": "header",
                       "description": "`Bearer <token>`: a static API token or a JWT access "
                                      "token from /auth/token"},
    },
    "security": [{"BearerAuth": []}],
    "tags": [
        {"name": "system", "description": "Health and configuration"},
        {"name": "auth", "description": "JWT access and refresh tokens"},
        {"name": "execution", "description": "Run Claude Code in a Podman container"},
        {"name": "jobs", "description": "Asynchronous runs"},
        {"name": "sessions", "description": "Conversations and their transcripts"},
        {"name": "secrets", "description": "Podman secrets for secrets_env"},
        {"name": "images", "description": "Container images"},
        {"name": "agents", "description": "Persistent agents: one long-lived Claude process "
                                          "each, fed turn by turn"},
        {"name": "docs", "description": "This document (extension)"},
    ],
    "responses": {
        "Unauthorized": response("Missing, malformed, invalid, expired or revoked token (auth "
                                 "enabled); always {\"error\"}", "internal_api.ErrorResponse"),
        "RateLimited": {
            "description": "{\"error\":\"rate limit exceeded\"} (rate limiting enabled) or "
                           "{\"error\":\"too many failed authentications\"}; Retry-After is an "
                           "extension",
            "schema": prop("#internal_api.ErrorResponse"),
            "headers": {
                "Retry-After": {"type": "integer", "description": "Seconds to wait (extension)"},
                "X-RateLimit-Limit": {"type": "number", "description": "Requests per second"},
                "X-RateLimit-Remaining": {"type": "integer", "description": "Tokens left"},
                "X-RateLimit-Reset": {"type": "integer", "description": "Unix seconds"}}},
    },
}

IMAGE_INFO = {
    "compatibility_rank": prop("integer", example=3),
    "compatible": prop("boolean", example=True),
    "created": prop("string", example="2024-01-15T10:30:00Z"),
    "description": prop("string", example="Python development image"),
    "has_claude_cli": prop("boolean", example=False),
    "id": prop("string", example="sha256:abc123def456"),
    "repository": prop("string", example="python"),
    "size": prop("integer", example=125000000),
    "tag": prop("string", example="3.12-slim"),
    "tools": prop("[string]", example=["python", "pip"]),
}
SECRET_RESULT = {"error": prop("string"), "name": prop("string", example="github-token"),
                 "success": prop("boolean", example=True)}
AGENT_SNAPSHOT = {
    "created_at": prop("string"),
    "exit_error": prop("string"),
    "id": prop("string"),
    "idle_timeout_disabled": prop("boolean"),
    "idle_timeout_seconds": prop("integer"),
    "last_activity_at": prop("string"),
    "session_id": prop("string"),
    "status": prop("#stromboli_internal_agent.Status"),
    "turns_completed": prop("integer"),
}
DEFINITIONS: dict = {
    "internal_api.AsyncRunResponse": obj("Response from starting an async Claude execution", properties={
        "job_id": prop("string", example="job-abc123def456"),
        "session_id": prop("string", example="550e8400-e29b-41d4-a716-446655440000"),
    }),
    "internal_api.ClaudeStatusResponse": obj("Claude configuration status", properties={
        "configured": prop("boolean", example=True),
        "message": prop("string", example="Claude is configured"),
    }),
    "internal_api.ComponentHealth": obj("", properties={
        "error": prop("string", "Error message if status is \"error\"", example=""),
        "name": prop("string", "Name of the component", example="podman"),
        "status": prop("string", "Status is \"ok\" or \"error\"", example="ok"),
    }),
    "internal_api.CreateSecretRequest": obj("Request to create a new Podman secret", required=["name", "value"], properties={
        "name": prop("string", example="github-token"),
        "value": prop("string", example="ghp_xxxxxxxxxxxx"),
    }),
    "internal_api.CreateSecretResponse": obj("Result of secret creation", SECRET_RESULT),
    "internal_api.DeleteSecretResponse": obj("Result of secret deletion", SECRET_RESULT),
    "internal_api.ErrorResponse": obj("", properties={
        "error": prop("string"),
    }),
    "internal_api.HealthResponse": obj("Health check response", properties={
        "components": prop("[#internal_api.ComponentHealth]"),
        "name": prop("string", example="stromboli"),
        "status": prop("string", example="ok"),
        "version": prop("string", example="0.5.6-alpha"),
    }),
    "internal_api.ImageDetailResponse": obj(
        "Detailed container image information including labels", {
            **IMAGE_INFO, "labels": prop("object", additionalProperties={"type": "string"}),
            "rank_description": prop("string", example="Standard glibc-based (compatible)")}),
    "internal_api.ImageInfoResponse": obj(
        "Container image metadata with compatibility information", IMAGE_INFO),
    "internal_api.ImagePullRequest": obj("Request to pull a container image from a registry", required=["image"], properties={
        "image": prop("string", example="python:3.12-slim"),
        "platform": prop("string", example="linux/amd64"),
        "quiet": prop("boolean", "Accepted and ignored", example=True),
    }),
    "internal_api.ImagePullResponse": obj("Result of image pull operation", properties={
        "image": prop("string", example="python:3.12-slim"),
        "image_id": prop("string", example="sha256:abc123def456"),
        "success": prop("boolean", example=True),
    }),
    "internal_api.ImageSearchResponse": obj("Search results from container registries", properties={
        "results": prop("[#internal_api.SearchResultResponse]"),
    }),
    "internal_api.ImagesListResponse": obj("List of local container images sorted by compatibility", properties={
        "images": prop("[#internal_api.ImageInfoResponse]"),
    }),
    "internal_api.JobCancelResponse": obj("Result of a job cancel request", properties={
        "cancelled": prop("boolean", example=True),
        "job_id": prop("string", example="job-abc123def456"),
    }),
    "internal_api.JobListResponse": obj("List of async jobs", properties={
        "jobs": prop("[#internal_api.JobResponse]"),
        "limit": prop("integer", "(extension) The page size used", example=1000),
        "offset": prop("integer", "(extension) Jobs skipped", example=0),
        "total": prop("integer", "(extension) Jobs matching, on all pages", example=3),
    }),
    "internal_api.JobResponse": obj("Job status and result", properties={
        "crash_info": prop("#stromboli_internal_job.CrashInfo"),
        "created_at": prop("string", example="2024-01-15T10:30:00Z"),
        "error": prop("string"),
        "finished_at": prop("string",
                            "(extension) RFC 3339 with milliseconds; absent until the job ends",
                            example="2024-01-15T10:31:00.250Z", format="date-time"),
        "id": prop("string", example="job-abc123def456"),
        "output": prop("string", example="Hello!"),
        "queue_position": prop("integer", "(extension) A pending job's place in the queue, 0 = "
                               "next", example=0),
        "run_id": prop("string", "(extension) The run's id (see /run/stream run_id)",
                       example="run-abc123def456"),
        "session_id": prop("string", example="sess-abc123def456"),
        "started_at": prop("string",
                           "(extension) RFC 3339 with milliseconds; absent until the job starts",
                           example="2024-01-15T10:30:00.125Z", format="date-time"),
        "status": prop("#stromboli_internal_job.Status", example="running"),
        "structured_output": prop("object"),
        "truncated": prop("boolean",
                          "(extension) Output was cut: a line over agent.max_line or output "
                          "over agent.max_output",
                          example=False),
        "updated_at": prop("string", example="2024-01-15T10:31:00Z"),
        "usage": prop("#stromboli_internal_job.Usage",
                      "(extension) Token usage totals + estimated USD cost"),
        "webhook_deliveries": prop("array",
                                   "(extension) Webhook delivery attempts; GET /jobs/{id} only, "
                                   "when webhook_url was set",
                                   items={"type": "object", "properties": {"attempt": {"type": "integer"}, "status_code": {"type": "integer"}, "error": {"type": "string"}, "at": {"type": "string", "format": "date-time"}}}),
    }),
    "internal_api.LogoutRequest": obj("(extension) Optional body of POST /auth/logout", properties={
        "refresh_token": prop("string"),
    }),
    "internal_api.LogoutResponse": obj("", properties={
        "message": prop("string"),
        "success": prop("boolean"),
    }),
    "internal_api.RefreshRequest": obj("", required=["refresh_token"], properties={
        "refresh_token": prop("string"),
    }),
    "internal_api.RunRequest": obj("Request to execute Claude Code in an isolated container", required=["prompt"], properties={
        "claude": prop("#stromboli_internal_types.ClaudeOptions",
                       "Claude configuration - all CLI options exposed"),
        "podman": prop("#stromboli_internal_types.PodmanOptions", "Podman configuration"),
        "prompt": prop("string", "Required: the prompt to send to Claude",
                       example="Analyze this code and suggest improvements"),
        "webhook_url": prop("string", "Webhook URL to notify when job completes (async only)",
                            example="https://example.com/webhook"),
        "workdir": prop("string",
                        "Working directory inside the container where Claude will spawn; use "
                        "podman.volumes to mount host paths",
                        example="/workspace"),
    }),
    "internal_api.RunResponse": obj("Response from Claude execution", properties={
        "crash_info": prop("#stromboli_internal_job.CrashInfo",
                           "Crash details (when status is \"crashed\")"),
        "error": prop("string", "Error message (when failed)", example=""),
        "id": prop("string", "Unique run identifier", example="run-abc123def456"),
        "output": prop("string",
                       "Claude's raw output (full CLI output, including JSON envelope when "
                       "output_format=json)",
                       example="Here is my analysis..."),
        "session_id": prop("string", "Session ID for conversation continuation",
                           example="sess-abc123def456"),
        "status": prop("string", "Execution status: completed, crashed, error",
                       example="completed"),
        "structured_output": prop("object",
                                  "structured_output from Claude's JSON envelope (when "
                                  "json_schema is used)"),
        "truncated": prop("boolean",
                          "(extension) Output was cut: a line over agent.max_line or output "
                          "over agent.max_output",
                          example=False),
        "usage": prop("#stromboli_internal_job.Usage",
                      "Token usage totals + estimated USD cost of this run; omitted when no "
                      "assistant message reported usage"),
    }),
    "internal_api.SearchResultResponse": obj("Search result from a container registry", properties={
        "automated": prop("boolean", example=False),
        "description": prop("string", example="Python is an interpreted programming language"),
        "index": prop("string", example="docker.io"),
        "name": prop("string", example="python"),
        "official": prop("boolean", example=True),
        "stars": prop("integer", example=8500),
    }),
    "internal_api.SecretInfoResponse": obj("Secret metadata (never contains the actual secret value)", properties={
        "created_at": prop("string", example="2024-01-15T10:30:00Z"),
        "id": prop("string", example="abc123def456"),
        "managed": prop("boolean", "(extension) Managed by stromboli (cannot be deleted)",
                        example=False),
        "name": prop("string", example="github-token"),
    }),
    "internal_api.SecretsListResponse": obj("List of available secrets that can be injected into runs", properties={
        "error": prop("string"),
        "secrets": prop("[#internal_api.SecretInfoResponse]"),
    }),
    "internal_api.SessionDestroyResponse": obj("Result of session destruction", properties={
        "error": prop("string"),
        "session_id": prop("string", example="sess-abc123"),
        "success": prop("boolean", example=True),
    }),
    "internal_api.SessionInfo": obj("Metadata about a single session", properties={
        "id": prop("string", example="sess-abc123"),
        "size_bytes": prop("integer",
                           "(extension) Bytes in the session home (as of its last run or check; "
                           "see agent.session_quota)",
                           example=48213),
        "title": prop("string", "Session title; empty when none is known",
                      example="Refactor billing service"),
    }),
    "internal_api.SessionListResponse": obj("List of existing sessions with metadata", properties={
        "error": prop("string"),
        "sessions": prop("[#internal_api.SessionInfo]"),
        "total": prop("integer", "(extension) Number of sessions before pagination"),
    }),
    "internal_api.SessionMessageResponse": obj("A single message from session history", properties={
        "error": prop("string"),
        "message": prop("#stromboli_internal_history.Message"),
    }),
    "internal_api.SessionMessagesResponse": obj("Paginated list of session messages", properties={
        "has_more": prop("boolean"),
        "limit": prop("integer"),
        "messages": prop("[#stromboli_internal_history.Message]"),
        "offset": prop("integer"),
        "total": prop("integer"),
        "usage": prop("#stromboli_internal_job.Usage",
                      "(extension) The session's cumulative token usage"),
    }),
    "internal_api.TokenRequest": obj("", required=["client_id"], properties={
        "client_id": prop("string"),
    }),
    "internal_api.TokenResponse": obj("", properties={
        "access_token": prop("string"),
        "expires_in": prop("integer"),
        "refresh_token": prop("string"),
        "token_type": prop("string"),
    }),
    "internal_api.ValidateResponse": obj("", properties={
        "expires_at": prop("integer"),
        "subject": prop("string"),
        "valid": prop("boolean"),
    }),
    "stromboli_internal_history.ContentBlock": obj("A content block (text, tool_use, or tool_result)", properties={
        "content": prop("string", "Tool result content (for tool_result)",
                        example="file1.txt\nfile2.txt"),
        "id": prop("string", "Tool use ID (for tool_use and tool_result)",
                   example="toolu_01G5uAJ4YZ26yyJbXNnG2byM"),
        "input": prop("object", "Tool input (for tool_use)", additionalProperties={}),
        "is_error": prop("boolean", "Whether tool execution errored", example=False),
        "name": prop("string", "Tool name (for tool_use)", example="Bash"),
        "text": prop("string", "Text content (for text blocks)",
                     example="I'll help you with that."),
        "tool_use_id": prop("string", "Tool use ID reference (for tool_result)",
                            example="toolu_01G5uAJ4YZ26yyJbXNnG2byM"),
        "type": prop("string", "Block type: text, tool_use, tool_result", example="tool_use"),
    }),
    "stromboli_internal_history.Message": obj("A message in the conversation history", properties={
        "content": prop("#stromboli_internal_history.MessageContent", "The actual message content"),
        "cwd": prop("string", "Working directory at time of message", example="/workspace"),
        "git_branch": prop("string", "Git branch at time of message", example="main"),
        "parent_uuid": prop("string", "Parent message UUID for threading",
                            example="92242819-b7d1-48d4-b023-6134c3e9f63a"),
        "permission_mode": prop("string", "Permission mode active for this message",
                                example="bypassPermissions"),
        "session_id": prop("string", "Session ID this message belongs to",
                           example="c7518652-f0ea-436e-9143-327085022abd"),
        "timestamp": prop("string", "Timestamp when the message was created",
                          example="2026-01-24T10:06:42.906Z"),
        "tool_result": prop("#stromboli_internal_history.ToolResult",
                            "Tool use result (for tool_result messages)"),
        "type": prop("#stromboli_internal_history.MessageType",
                     "Message type: user, assistant, queue-operation", example="assistant"),
        "uuid": prop("string", "Unique identifier for this message",
                     example="40adde19-546a-43e8-ad25-31ef4faa4112"),
        "version": prop("string", "Claude Code version", example="2.1.19"),
    }),
    "stromboli_internal_history.MessageContent": obj("Message content with role and content blocks", properties={
        "content": prop("[#stromboli_internal_history.ContentBlock]",
                        "Content blocks (text, tool_use, tool_result)"),
        "message_id": prop("string", "Message ID from API", example="msg_017ETE4Wk32ZXAQJp3GXP1Bo"),
        "model": prop("string", "Model used (for assistant messages)",
                      example="claude-opus-4-5-20251101"),
        "role": prop("string", "Role: user or assistant", example="assistant"),
        "stop_reason": prop("string", "Stop reason (for assistant messages)", example="end_turn"),
        "usage": prop("#stromboli_internal_history.Usage", "Token usage"),
    }),
    "stromboli_internal_history.MessageType": {
        "type": "string", "enum": ["user", "assistant", "queue-operation"],
        "description": "Served: user and assistant (the CLI's bookkeeping lines are left out)",
        "x-enum-varnames": ["MessageTypeUser", "MessageTypeAssistant", "MessageTypeSystem"]},
    "stromboli_internal_history.ToolResult": obj("Detailed result of a tool execution", properties={
        "interrupted": prop("boolean", "Whether execution was interrupted", example=False),
        "is_image": prop("boolean", "Whether result is an image", example=False),
        "stderr": prop("string", "Standard error", example=""),
        "stdout": prop("string", "Standard output", example="file1.txt\nfile2.txt"),
    }),
    "stromboli_internal_history.Usage": obj("Token usage statistics", properties={
        "cache_creation_input_tokens": prop("integer", example=336),
        "cache_read_input_tokens": prop("integer", example=18121),
        "input_tokens": prop("integer", example=150),
        "output_tokens": prop("integer", example=42),
    }),
    "stromboli_internal_job.CrashInfo": obj("", properties={
        "exit_code": prop("integer", "Exit code (if available)"),
        "partial_output": prop("string", "Partial output captured before crash"),
        "reason": prop("string", "Human-readable crash reason"),
        "signal": prop("string", "Signal that killed the process (SIGSEGV, SIGKILL, etc.)"),
        "task_completed": prop("boolean", "Whether the task appeared to complete before crashing"),
    }),
    "stromboli_internal_job.Status": {"type": "string", "enum": ["pending", "running", "completed", "failed", "crashed", "cancelled"], "x-enum-varnames": ["StatusPending", "StatusRunning", "StatusCompleted", "StatusFailed", "StatusCrashed", "StatusCancelled"]},
    "stromboli_internal_job.Usage": obj("", properties={
        "cache_creation_input_tokens": prop("integer"),
        "cache_read_input_tokens": prop("integer"),
        "estimated_cost_usd": prop("number",
                                   "Best effort: tokens × Anthropic's per-1M rates; 0 when the "
                                   "model is unknown"),
        "input_tokens": prop("integer"),
        "model": prop("string", "Model reported by Claude; empty when unknown"),
        "output_tokens": prop("integer"),
        "total_tokens": prop("integer"),
    }),
    "stromboli_internal_types.EnvironmentConfig": obj("Runtime environment configuration (single container or compose)", properties={
        "build_timeout": prop("string", "Build timeout override for compose (default 10m)",
                              example="15m"),
        "path": prop("string",
                     "Absolute path to the compose file (.yml/.yaml), required when "
                     "type=\"compose\"",
                     example="/home/user/project/docker-compose.yml"),
        "service": prop("string",
                        "Service name where Claude will run (required when type=\"compose\")",
                        example="dev"),
        "type": prop("string", "\"\" (default single container) or \"compose\"", example="compose"),
    }),
    "stromboli_internal_types.LifecycleHooks": obj("Commands to run at specific container lifecycle stages", properties={
        "hooks_timeout": prop("string",
                              "Maximum duration for all hooks combined (e.g. \"5m\"); default: "
                              "the container timeout",
                              example="5m"),
        "on_create_command": prop("[string]",
                                  "Shell commands run before Claude on a session's first run",
                                  example=["pip install -r requirements.txt"]),
        "post_create": prop("[string]",
                            "Shell commands run after on_create_command (first run only)",
                            example=["npm run setup"]),
        "post_start": prop("[string]", "Shell commands run on every run, including continues",
                           example=["redis-server --daemonize yes"]),
    }),
    "internal_api.CreateAgentResponse": obj("Created agent metadata", AGENT_SNAPSHOT),
    "internal_api.SendAgentRequest": obj("Append a prompt to a running agent's stream-json stdin", required=["prompt"], properties={
        "prompt": prop("string", example="Tell me about that alert"),
    }),
    "internal_api.SendAgentResponse": obj("Acknowledgement that a turn has started; output streams via /stream", properties={
        "turn_id": prop("string", example="turn-abc123"),
    }),
    "internal_api.errorBody": obj("", properties={"error": prop("string")}),
    "stromboli_internal_agent.CreateRequest": obj("Configuration for spawning a long-lived Claude agent", properties={
        "claude": prop("#stromboli_internal_types.ClaudeOptions",
                       "Claude CLI options, as for runs (session_id, resume, continue and "
                       "fork_session are ignored: an agent's session is new; input and output "
                       "are stream-json)"),
        "disable_idle_timeout": prop("boolean", "No auto-stop on inactivity: the agent runs "
                                     "until DELETE or shutdown", example=False),
        "idle_timeout_seconds": prop("integer", "Idle timeout in seconds; 0 means the default "
                                     "(1800); negative values are refused", example=1800),
        "podman": prop("#stromboli_internal_types.PodmanOptions",
                       "(extension) Container options, as for runs; timeout is the agent's "
                       "lifetime"),
        "prompt": prop("string", "Initial prompt sent as the first turn (optional)",
                       example="You are an on-call assistant."),
        "workdir": prop("string", "Working directory inside the container",
                        example="/workspace"),
    }),
    "stromboli_internal_agent.Event": obj("(extension) One event of GET /agents/{id}/stream", properties={
        "at": prop("string", "When (RFC 3339, fractional seconds)"),
        "content": prop("string", "output: one stdout line of the CLI (a stream-json object)"),
        "error": prop("string", "error: a stderr line (\"[stderr] …\") or a failed send; "
                      "exited: why, or empty"),
        "turn_id": prop("string", example="turn-abc123"),
        "type": prop("string", enum=["turn_start", "output", "turn_end", "error", "exited"]),
        "usage": prop("#stromboli_internal_job.Usage", "turn_end: the turn's usage (extension)"),
    }),
    "stromboli_internal_agent.Snapshot": obj("", AGENT_SNAPSHOT),
    "stromboli_internal_agent.Status": {"type": "string", "enum": ["starting", "idle", "generating", "exited"], "x-enum-varnames": ["StatusStarting", "StatusIdle", "StatusGenerating", "StatusExited"]},
}


# ---------------------------------------------------------------------------
# Daemon — what it holds (the app object), its background tasks, the health monitor
# ---------------------------------------------------------------------------

class HealthMonitor:
    """What /health reports, kept by a background task so that a request costs no Podman
    call: Podman is pinged every few seconds and as soon as a Podman call fails, its version
    is read once, and the daemon's own secrets are checked at start and whenever they are
    synced (or Podman comes back)."""

    INTERVAL = 5.0
    NOT_CHECKED = "not checked yet"

    def __init__(self, cfg: Config, runner: ContainerRunner):
        self.cfg, self.runner, self.credentials = cfg, runner, runner.credentials
        self.podman_error: str | None = self.NOT_CHECKED
        self.podman_version: dict | None = None
        self.has_credentials_file = False
        self._reported: tuple[list | None, bytes] = (None, b"")
        self.secret_errors: dict[str, str | None] = {}
        self._checked_sync = -1
        self._wake = asyncio.Event()
        runner.podman.on_failure = self._wake.set

    async def watch_forever(self) -> None:
        while True:
            await self.check()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.INTERVAL)
            self._wake.clear()

    async def check(self) -> None:
        self.has_credentials_file = await asyncio.to_thread(self.cfg.credentials_path.is_file)
        api = self.runner.podman
        try:
            await asyncio.wait_for(api.call(api.ping), 5)
            if self.podman_version is None:
                self.podman_version = await asyncio.wait_for(api.call(api.version), 10)
            self.podman_error = None
        except asyncio.TimeoutError:
            self.podman_error = "timed out after 5s"
        except Exception as exc:
            self.podman_error = short_error(exc)
        self._wake.clear()  # our own failed ping must not wake us at once
        if self.podman_error is not None:
            self._checked_sync = -1  # recheck the secrets once Podman is back
        elif self._checked_sync != self.credentials.synced:
            self._checked_sync = self.credentials.synced
            for name in (self.credentials.api_key_secret, self.credentials.file_secret):
                self.secret_errors[name] = await self._secret_error(name)

    async def _secret_error(self, name: str) -> str | None:
        try:
            if await asyncio.wait_for(self.runner.podman.call(
                    self.runner.podman.secret_exists, name), 5):
                return None
            return f"podman secret '{name}' not found: run stromboli to create it"
        except Exception as exc:
            return short_error(exc) or "secret check failed"

    def report(self) -> bytes:
        """/health's body, encoded again only when the state changed."""
        components = self.components()
        if components != self._reported[0]:
            status = "ok" if all(c["status"] == "ok" for c in components) else "degraded"
            body = {"status": status, "name": "stromboli", "version": VERSION,
                    "components": components}
            self._reported = (components, json.dumps(body, separators=(",", ":")).encode())
        return self._reported[1]

    def components(self) -> list[dict]:
        found = [self._component("podman", self.podman_error)]
        if self.credentials.api_key:
            found.append(self._secret_component("anthropic-api-key",
                                                self.credentials.api_key_secret))
        has_file = self.has_credentials_file
        if has_file or not self.credentials.api_key:
            found.append(self._component("claude-credentials-file", None if has_file else
                                         "credentials file missing: run 'claude' to "
                                         "authenticate"))
            found.append(self._secret_component("claude-credentials-secret",
                                                self.credentials.file_secret))
        return found

    def _secret_component(self, component: str, secret: str) -> dict:
        error = self.podman_error or self.secret_errors.get(secret, self.NOT_CHECKED)
        return self._component(component, error)

    @staticmethod
    def _component(name: str, error: str | None) -> dict:
        return {"name": name, "status": "ok"} if error is None else \
            {"name": name, "status": "error", "error": error}


class Stromboli:
    """Everything the daemon holds, created once and shared by the handlers."""

    FIRST_CHECK_TIMEOUT = 10.0  # seconds the start waits for Podman, at most

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.store = Store(cfg.state_path / "stromboli.db")
        self.metrics = Metrics()
        self.podman_service = PodmanService(cfg)
        self.podman: Podman | None = None
        self.catalog: PodmanCatalog | None = None
        known_podman = next(iter(self.podman_service.candidates()), "")  # before any start
        self.sessions = SessionStore(cfg.sessions_path, cfg.sessions_host_path,
                                     cfg.agent_host_uid, cfg.agent_session_quota,
                                     session_images(cfg, known_podman))
        self.auth = Auth(cfg, self.store)
        self.limiter = RateLimiter(cfg)
        self.browsers = BrowserGuard(cfg)
        self.webhooks = WebhookSender(cfg, self.store)
        self.runner: ContainerRunner | None = None
        self.jobs: JobManager | None = None
        self.agents: AgentManager | None = None
        self.background: list[asyncio.Task] = []
        self.draining = False  # a shutdown began: no new runs
        self._client_runs: set[asyncio.Task] = set()
        self._request_prefix = pysecrets.token_hex(4)
        self._request_numbers = itertools.count(1)
        self.metrics.gauges.update({
            "process_resident_memory_bytes": ("Resident memory in bytes.", process_resident_bytes),
            "process_open_fds": ("Open file descriptors.", process_open_fds),
            "stromboli_queued_runs": ("Runs waiting for a slot.",
                                      lambda: self.runner.slots.queued if self.runner else 0),
            "stromboli_live_agents": ("Persistent agents alive (each holds a run slot).",
                                      lambda: self.agents.live if self.agents else 0),
            "stromboli_rate_limit_clients": ("Client IPs with a rate-limit bucket.",
                                             lambda: len(self.limiter.requests)),
        })

    async def start(self) -> None:
        if self.sessions.images:  # after a reboot; after a restart they are mounted still
            if mounted := await asyncio.to_thread(self.sessions.images.attach_all):
                log.info("session homes mounted", extra=fields(count=mounted))
        url = await asyncio.to_thread(self.podman_service.resolve)
        # Each run holds a worker while attached: leave room for the short calls.
        self.podman = Podman(url, workers=2 * self.cfg.run_slots + 32)
        self.runner = ContainerRunner(self.cfg, self.podman, self.sessions, self.store,
                                      self.metrics)
        self.catalog = PodmanCatalog(self.podman, self.runner.instance, self.cfg.secrets_allowed)
        self.jobs = JobManager(self.cfg, self.store, self.runner, self.webhooks, self.metrics)
        self.agents = AgentManager(self.cfg, self.store, self.runner)
        await self.agents.load()
        self.monitor = HealthMonitor(self.cfg, self.runner)
        if self.cfg.agent_mount_claude_cli and self.cfg.agent_userns_base:
            log.warning("two-image mode: agents run without a user namespace (Podman cannot "
                        "mount the CLI image inside one), so their uid 1000 is host uid 1000")
        await self.auth.load()
        await self._first_check(self.FIRST_CHECK_TIMEOUT)
        self.background.append(asyncio.ensure_future(self.monitor.watch_forever()))
        self.background.append(asyncio.ensure_future(self._connect()))
        self.background.append(asyncio.ensure_future(self.jobs.cleanup_forever()))
        self.background.append(asyncio.ensure_future(self.agents.cleanup_forever()))
        self.background.append(asyncio.ensure_future(self._reap_tokens_forever()))

    async def _first_check(self, timeout: float) -> None:
        """Before the listener answers (and before READY=1): meet Podman once (its mode,
        the daemon's secrets) and run the monitor's first check, so that /health is right
        from its first answer. A Podman that does not answer delays the start by `timeout`
        at most, and /health says so; _connect keeps trying."""
        async def first_round() -> None:
            with contextlib.suppress(Exception):  # _connect retries it, and logs why
                await self.runner.connect()
            await self.monitor.check()
        try:
            await asyncio.wait_for(first_round(), timeout)
        except asyncio.TimeoutError:
            if self.monitor.podman_error == HealthMonitor.NOT_CHECKED:
                self.monitor.podman_error = f"no answer within {timeout:g}s of the start"

    async def _connect(self) -> None:
        """Once Podman answers: learn its mode, sync credentials, recover jobs."""
        delay = 1.0
        while True:
            try:
                await self.runner.connect()
                await self.jobs.recover()
                await self.monitor.check()  # /health is right from the first answer
                self.runner.connected.set()
                self.background.append(asyncio.ensure_future(self.agents.revive()))
                log.info("podman connected", extra=fields(url=self.podman.url,
                                                          rootless=self.runner.rootless))
                return
            except Exception as exc:
                log.warning("podman not ready, retrying", extra=fields(error=short_error(exc)))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)

    def client_run(self, run: Awaitable[RunResult]) -> asyncio.Task:
        """A sync or stream run, as a task a shutdown can end with a last word to its client."""
        task = asyncio.ensure_future(run)
        self._client_runs.add(task)
        task.add_done_callback(self._client_runs.discard)
        return task

    async def drain(self, grace: float) -> None:
        """Refuse new runs and let the running ones (and agents' turns) finish, for at most
        `grace` seconds; then stop the agents' processes (the next start brings them back)
        and end the clients' runs, whose handlers tell them the daemon is restarting (a
        stream's last event, a 503 for /run). Jobs are let go later (JobManager.shutdown)."""
        self.draining = True
        if self.runner:
            self.runner.detaching = True  # what is still running at the end is let go
        deadline = time.monotonic() + grace
        while self.runner and time.monotonic() < deadline and (
                self.runner.slots.active > self.agents.live  # agents hold slots: not runs
                or self.agents.generating):
            await asyncio.sleep(0.1)
        if self.agents:
            await self.agents.shutdown()  # while their followers can still be told
        for task in list(self._client_runs):
            task.cancel()
        if self._client_runs:
            await asyncio.wait(set(self._client_runs), timeout=20)
            await asyncio.sleep(0.2)  # their handlers write the last word

    def next_request_id(self) -> str:
        """Unique per request (a per-start random prefix and a counter: no syscall)."""
        return f"{self._request_prefix}{next(self._request_numbers):x}"

    def status_line(self) -> str:
        slots, agents = self.runner.slots, self.agents.live
        podman_state = "podman connected" if self.runner.connected.is_set() \
            else "waiting for podman"
        return f"{slots.active - agents} running, {slots.queued} queued, {agents} agents; " \
               f"{podman_state}"

    async def _reap_tokens_forever(self) -> None:
        while True:
            await self.store.call(self.store.reap_revoked)
            self.auth.reap()
            await asyncio.sleep(self.cfg.auth_blacklist_cleanup_interval)

    async def stop(self) -> None:
        for task in self.background:
            task.cancel()
        if self.jobs:
            await self.jobs.shutdown()
        if self.agents:
            await self.agents.shutdown()
        if self.webhooks.tasks:
            await asyncio.wait(self.webhooks.tasks, timeout=5)
        if self.runner:
            await self.runner.credentials.drop()
        if self.podman:
            self.podman.close()
        await asyncio.to_thread(self.podman_service.stop)
        self.store.close()


# ---------------------------------------------------------------------------
# HTTP — browser checks, middlewares, handlers and their route records, the app
# ---------------------------------------------------------------------------

class BrowserGuard:
    """Keeps web pages from driving the API (curl and the SDKs send no Origin and are not
    affected): a foreign Origin is refused, so is a Host name that is not ours (DNS
    rebinding uses names), and a body that is not JSON (forms and text/plain are what a
    page can send without asking)."""

    def __init__(self, cfg: Config):
        self.hosts = {h.lower() for h in cfg.server_allowed_hosts} | {"localhost"}
        self.origins = {o.rstrip("/").lower() for o in cfg.server_allowed_origins}
        self._known_hosts: dict[str, bool] = {}  # Host header → ours (a few, seen again)

    def host_ok(self, host: str) -> bool:
        known = self._known_hosts.get(host)
        if known is None:
            name = strip_port(host)
            known = not host or ip_or_none(name) is not None or name in self.hosts
            if len(self._known_hosts) < 1024:
                self._known_hosts[host] = known
        return known

    def check(self, request: web.Request) -> None:
        host = request.headers.get("Host", "").lower()
        if not self.host_ok(host):
            raise ApiError(421, f"unknown Host header {strip_port(host)[:100]!r}: add the name "
                                "to STROMBOLI_SERVER_ALLOWED_HOSTS")
        origin = request.headers.get("Origin")
        if origin is not None:
            origin = origin.rstrip("/").lower()
            if origin != f"{request.scheme}://{host}" and origin not in self.origins:
                raise ApiError(403, "cross-origin request refused: add the origin to "
                                    "STROMBOLI_SERVER_ALLOWED_ORIGINS")
        if request.method in ("POST", "PUT", "PATCH") and request.body_exists:
            kind = request.content_type
            if kind != "application/json" and not kind.endswith("+json"):
                raise ApiError(415, "Content-Type must be application/json")


APP_KEY = web.AppKey("stromboli", Stromboli)


def state(request: web.Request) -> Stromboli:
    return request.app[APP_KEY]


def route_template(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def request_context(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Request id, error envelopes, one access log line and the request metrics."""
    app = state(request)
    request_id = request["request_id"] = request.headers.get("X-Request-ID") \
        or app.next_request_id()
    record = request.app[ROUTE_RECORDS_KEY].get((request.method, route_template(request)))
    # An unknown route is the router's 404/405; had it a handler without a record, it
    # would be protected.
    request["access"], request["envelope"] = (record.access, record.envelope) if record \
        else ("protected", "error")
    started = time.monotonic()
    try:
        response = await handler(request)
    except ApiError as exc:
        response = exc.response(request["envelope"])
    except web.HTTPException as exc:
        response = http_exception_response(exc)
    except Exception:
        log.exception("unhandled error", extra=fields(request_id=request_id, path=request.path))
        response = json_response({"error": "internal server error"}, status=500)
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
    elapsed = time.monotonic() - started
    app.metrics.request(request.method, route_template(request), response.status, elapsed)
    if response.status == 401:
        app.metrics.auth_failures += 1
        app.limiter.failures.spend(request.get("client_ip") or app.limiter.client_ip(request))
    access_log(request_id=request_id, method=request.method, path=request.path,
               status=response.status, duration_ms=round(elapsed * 1000, 2),
               client_ip=request.remote)
    return response


def http_exception_response(exc: web.HTTPException) -> web.Response:
    messages = {404: "not found", 405: "method not allowed",
                413: "request body too large"}
    message = messages.get(exc.status, exc.reason.lower())
    response = json_response({"error": message}, status=exc.status)
    if exc.status == 405 and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


@web.middleware
async def perimeter(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Browser checks, rate limit, then auth, as the route table marks each route.
    The credential is checked before the failed-auth budget: past the budget, an IP's
    failed attempts get 429, but a valid credential is always served (whoever shares the
    address cannot lock its owner out with wrong tokens)."""
    app = state(request)
    if request.match_info.http_exception is not None:
        return await handler(request)  # no such route: the router answers 404/405
    access, envelope = request["access"], request["envelope"]
    try:
        app.browsers.check(request)
    except ApiError as exc:
        return exc.response(envelope)
    ip = request["client_ip"] = app.limiter.client_ip(request)
    limit_headers: dict[str, str] = {}
    if access == "protected" and app.cfg.rate_limit_enabled:
        allowed, limit_headers = app.limiter.check(ip)
        if not allowed:
            app.metrics.rate_limited += 1
            return json_response({"error": "rate limit exceeded"}, 429, limit_headers)
    checks_auth = (access != "public" and app.cfg.auth_enabled) or \
        request.path.startswith("/auth/")
    retry = app.limiter.failures.blocked(ip) if checks_auth else 0
    if access in ("protected", "token") and app.cfg.auth_enabled:
        try:
            request["jwt_claims"] = await app.auth.check_access(Auth.bearer(request))
        except ApiError as exc:  # upstream's auth middleware: {"error"} on every route
            if retry and exc.status == 401:
                return too_many_failures(app, retry)
            response = exc.response()
            response.headers.update(limit_headers)
            return response
    try:
        response = await handler(request)
    except AuthError as exc:  # the /auth/* routes check their credentials themselves
        if retry and exc.status == 401:
            return too_many_failures(app, retry)
        raise
    if limit_headers and not response.prepared:
        response.headers.update(limit_headers)
    return response


def too_many_failures(app: Stromboli, retry: int) -> web.Response:
    """A failed authentication from an IP past its budget."""
    app.metrics.rate_limited += 1
    return json_response({"error": "too many failed authentications"}, 429,
                         {"Retry-After": str(retry)})


async def read_json(request: web.Request, prefix: str = "", kept: bool = False) -> Any:
    """The body as JSON. A `kept` one (a run's or an agent's request: a job or an agent
    keeps it) is bounded by agent.max_request_bytes, refused unread when it says it is
    larger."""
    cfg = state(request).cfg
    limit = cfg.agent_max_request_bytes if kept else cfg.server_max_body_bytes
    if (request.content_length or 0) > limit:
        raise body_too_large(limit, kept)
    try:  # a body trickled in slowly must not hold the handler forever
        raw = await asyncio.wait_for(request.read(), cfg.server_body_timeout)
    except web.HTTPRequestEntityTooLarge:
        raise body_too_large(limit, kept) from None
    except asyncio.TimeoutError:
        raise ApiError(408, "request body not received within "
                            f"{format_duration(cfg.server_body_timeout)}") from None
    if len(raw) > limit:
        raise body_too_large(limit, kept)
    if not raw.strip():
        raise BadRequest(f"{prefix}request body is empty")
    try:  # a large body is parsed off the event loop
        return strict_json(raw) if len(raw) < 256 * 1024 else \
            await asyncio.to_thread(strict_json, raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{prefix}invalid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(f"{prefix}invalid JSON: nested too deeply") from None


def body_too_large(limit: int, kept: bool) -> ApiError:
    setting = "agent.max_request_bytes" if kept else "server.max_body_bytes"
    return ApiError(413, f"request body too large (limit {limit} bytes, {setting})")


def refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def strict_json(raw: bytes) -> Any:
    """JSON as RFC 8259 has it: NaN and Infinity (which Python accepts) are refused."""
    return json.loads(raw, parse_constant=refuse_constant)


def require_running(app: Stromboli) -> None:
    """No new runs once a shutdown began (the next daemon will take them)."""
    if app.draining:
        raise ApiError(503, "the daemon is restarting: retry shortly", {"Retry-After": "5"})


def require_configured(app: Stromboli) -> None:
    if not app.runner.credentials.configured():
        raise Unavailable("Claude not configured. Run 'make claude-setup' first")


# -- system -------------------------------------------------------------------

@api("GET", "/health", "public", "error", "system", "Health check",
     description="Health of the API with component checks; always 200, status \"degraded\" when "
                 "a component fails",
     ok=(200, "OK", "internal_api.HealthResponse"))
async def health(request: web.Request) -> web.Response:
    """From the monitor's state: no Podman call, whoever asks and however often."""
    return web.Response(body=state(request).monitor.report(), content_type="application/json")


@api("GET", "/claude/status", "protected", "error", "system", "Claude status",
     description="Checks if Claude credentials (or an API key) are configured",
     ok=(200, "OK", "internal_api.ClaudeStatusResponse"))
async def claude_status(request: web.Request) -> web.Response:
    configured = state(request).runner.credentials.configured()
    return json_response({"configured": configured, "message": "Claude is configured"
                          if configured else "Run 'make claude-setup' to configure (or set "
                                             "ANTHROPIC_API_KEY)"})


# -- runs ---------------------------------------------------------------------

@api("POST", "/run", "protected", "run", "execution", "Run Claude",
     description="Executes Claude Code in an isolated Podman container",
     body="internal_api.RunRequest",
     ok=(200, "OK (status completed, or crashed with crash_info)", "internal_api.RunResponse"),
     errors=((400,
              "Invalid request, including option validation errors (extension: upstream answers "
              "500 for those)"),
             (404,
              "session has no history: <id> (resume, continue or fork without a transcript; "
              "extension)"),
             (409, "Session already has history; set claude.resume=true (extension)"),
             (500, "Execution failed"),
             (503, "Claude not configured, or Podman unavailable (extension)")))
async def run_sync(request: web.Request) -> web.Response:
    app = state(request)
    req = RunRequest.parse(await read_json(request, "Invalid request: ", kept=True), app.cfg)
    require_running(app)
    require_configured(app)
    try:
        result = await app.client_run(app.runner.run(req, new_id("run"),
                                                     SessionPlan.of(req.claude)))
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():  # the client went away
            raise
        raise ApiError(503, "the daemon is restarting: run it again shortly",
                       {"Retry-After": "5"}) from None
    except RunFailed as exc:
        app.metrics.run_status("failed")
        raise ApiError(500, str(exc)) from None
    app.metrics.run_status(result.status)
    return json_response(result.response())


@api("POST", "/run/async", "protected", "run", "execution", "Run Claude async",
     description="Starts Claude Code execution asynchronously and returns a job ID. "
                 "Session-history errors (404/409 on /run) fail the job instead",
     body="internal_api.RunRequest", ok=(202, "Accepted", "internal_api.AsyncRunResponse"),
     also_ok=((200, "The job this Idempotency-Key already names (extension)",
               "internal_api.AsyncRunResponse"),),
     params=(param("Idempotency-Key", "header", "string", "(extension) Resubmitting with the "
                   "same key and body answers 200 with the same job; another body, 409"),),
     errors=((400, "Invalid request"),
             (409, "Idempotency-Key already used for a different request (extension)"),
             (429, "Too many queued jobs (jobs.max_queued; extension), with Retry-After"),
             (503, "Claude not configured, or Podman unavailable (extension)")))
async def run_async(request: web.Request) -> web.Response:
    app = state(request)
    req = RunRequest.parse(await read_json(request, "Invalid request: ", kept=True), app.cfg)
    require_running(app)
    require_configured(app)
    if req.webhook_url and not await app.webhooks.hosts.permits(req.webhook_url):
        raise BadRequest("Invalid request: webhook_url host is not in "
                         "STROMBOLI_WEBHOOK_ALLOWED_HOSTS")
    key = request.headers.get("Idempotency-Key", "")
    if len(key) > 255 or not key.isprintable():
        raise BadRequest("Invalid request: Idempotency-Key must be at most 255 printable "
                         "characters")
    await app.runner.prepare(req)
    job, new = await app.jobs.submit(req, key)
    return json_response({"job_id": job["id"], "session_id": job["session_id"]},
                         202 if new else 200)


def stream_request_body(query: Any) -> dict:
    """Query parameters → a RunRequest body: prompt, workdir, session_id as upstream, plus
    every claude option (`model=` or `claude.model=`) and podman option (`podman.timeout=`,
    or bare `timeout=`) as an extension. Lists are comma-separated, except volumes (whose
    options hold commas): repeat `volumes=` once per volume."""
    body: dict[str, Any] = {"prompt": query.get("prompt", ""), "claude": {}, "podman": {}}
    for key, value in query.items():
        section, _, name = key.rpartition(".")
        if key in ("prompt", "workdir", "webhook_url"):
            body[key] = value
            continue
        if section not in ("", "claude", "podman"):
            continue
        target = "podman" if section == "podman" or (not section and name in PODMAN_KINDS) \
            else "claude"
        kind = (PODMAN_KINDS if target == "podman" else CLAUDE_KINDS).get(name)
        if kind is None:
            continue
        if name == "volumes":
            body[target][name] = list(query.getall(key))
        else:
            body[target][name] = convert_query_value(name, kind, value)
    return body


def convert_query_value(name: str, kind: str, value: str) -> Any:
    try:
        if kind == "bool":
            return parse_bool(value)
        if kind in ("multi", "joined"):
            return list(parse_list(value))
        if kind == "int":
            return int(value)
        if kind == "budget":
            return float(value)
        if kind in ("object", "map"):
            return json.loads(value)
    except ValueError:
        raise BadRequest(f"Invalid request: {name}: cannot parse {value!r}") from None
    return value


@api("GET", "/run/stream", "protected", "text", "execution", "Stream Claude output",
     description="Executes Claude and streams output in real-time using SSE. Each output line "
                 "is `id: <n>` + `data: <raw line>`; the stream ends with `event: done` (data "
                 "{id, session_id, status}) or `event: error` (data {id, status: \"error\", "
                 "error}: JSON, an extension; upstream sends the bare message). Extensions: "
                 "every run option is a query parameter, bare or prefixed (`claude.<option>`, "
                 "`podman.<option>`), lists comma-separated, objects as JSON; `id:` on each "
                 "event, the X-Run-ID header, and replay with run_id + Last-Event-ID",
     params=tuple(stream_parameters()), produces=("text/event-stream", "text/plain"),
     ok=(200, "Event stream of output lines; header X-Run-ID: the run's id (extension)", None),
     errors=((400, "Invalid request (plain text)"),
             (404, "run not found: <run_id> (plain text; extension)"),
             (503, "Claude not configured, or Podman unavailable (plain text)")))
async def run_stream(request: web.Request) -> web.StreamResponse:
    app = state(request)
    query = request.query
    if query.get("run_id"):
        return await replay_stream(request, query["run_id"])
    if not query.get("prompt", "").strip():
        raise BadRequest("Missing required parameter: prompt")
    req = RunRequest.parse(stream_request_body(query), app.cfg)
    require_running(app)
    require_configured(app)
    await app.runner.prepare(req)
    run_id = new_id("run")
    feed = app.runner.open_feed(run_id)
    response = await sse_response(request, run_id)
    task = app.client_run(app.runner.run(req, run_id, SessionPlan.of(req.claude)))
    try:
        await write_feed(request, response, feed.follow())
        result = await task
        app.metrics.run_status(result.status)
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise
        # A shutdown ended the run: the stream's last event said so.
    except ConnectionResetError:
        pass  # the client went away; `finally` stops its container
    except Exception as exc:  # already reported to the client as `event: error`
        app.metrics.run_status("failed")
        if not isinstance(exc, (ApiError, RunFailed)):
            log.exception("stream run failed", extra=fields(run_id=run_id))
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=20)
    return response


SSE_KEEPALIVE = 15.0
SSE_STALL = 60.0


async def sse_response(request: web.Request, run_id: str) -> web.StreamResponse:
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "Connection": "keep-alive", "X-Accel-Buffering": "no",
               "X-Request-ID": request["request_id"]}
    if run_id:
        headers["X-Run-ID"] = run_id
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    return response


async def write_feed(request: web.Request, response: web.StreamResponse, events: Any) -> None:
    """Upstream's SSE framing: raw `data:` lines, then `event: done` or `event: error`.
    Each event carries an `id:` so a client can resume with Last-Event-ID. A client that
    stops reading holds only the transport's buffer, and is dropped after SSE_STALL
    seconds without progress (it can resume with Last-Event-ID)."""
    writing_since: list[float] = []

    async def keepalive() -> None:
        while True:
            await asyncio.sleep(SSE_KEEPALIVE)
            if writing_since and time.monotonic() - writing_since[0] > SSE_STALL:
                if request.transport is not None:
                    request.transport.abort()
                return
            if not writing_since:
                await response.write(b": keepalive\n\n")
    pinger = asyncio.ensure_future(keepalive())
    try:
        async for seq, kind, data in events:
            head = "" if kind == "line" else f"event: {kind}\n"
            body = "".join(f"data: {part}\n" for part in re.split(r"\r\n|\r|\n", data))
            writing_since.append(time.monotonic())
            await response.write(f"id: {seq}\n{head}{body}\n".encode())
            writing_since.clear()
    finally:
        pinger.cancel()


async def replay_stream(request: web.Request, run_id: str) -> web.StreamResponse:
    """Resume a run's stream after Last-Event-ID (extension): live while it runs, from the
    store once it has finished."""
    app = state(request)
    after = last_event_id(request)
    feed = app.runner.feeds.get(run_id)
    if feed is not None:
        events: Any = feed.follow(after)
    else:
        if not await app.store.call(app.store.run_events, run_id, -1, 1):
            raise NotFound(f"run not found: {run_id}")
        events = stored_events(app.store, run_id, after)
    response = await sse_response(request, run_id)
    await write_feed(request, response, events)
    return response


LAST_EVENT_ID_MAX = 2 ** 63 - 1  # the largest integer SQLite takes


def last_event_id(request: web.Request) -> int:
    """The Last-Event-ID header (or last_event_id query parameter) of a resumed stream."""
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or "-1"
    try:
        after = int(last)
    except ValueError:
        raise BadRequest("Last-Event-ID must be an integer") from None
    if after > LAST_EVENT_ID_MAX:  # checked before the stream starts: no error inside it
        raise BadRequest(f"Last-Event-ID must be at most {LAST_EVENT_ID_MAX}")
    return max(-1, after)


async def stored_events(store: Store, run_id: str, after: int):
    """A finished run's events from the store, a page at a time (bounded memory)."""
    while rows := await store.call(store.run_events, run_id, after, 256):
        for row in rows:
            yield row
        after = rows[-1][0]


# -- jobs -----------------------------------------------------------------------

@api("GET", "/jobs", "protected", "run", "jobs", "List jobs",
     description="Returns async jobs, newest first",
     params=(param("status", "query", "string", "(extension) Only jobs in this state",
                   enum=["pending", "running", "completed", "failed", "crashed", "cancelled"]),
             param("limit", "query", "integer", "(extension) Jobs per page (default and most: "
                   "1000)"),
             param("offset", "query", "integer", "(extension) Jobs to skip (default 0)")),
     ok=(200, "OK", "internal_api.JobListResponse"),
     errors=((400, "Invalid status filter (extension)"),))
async def list_jobs(request: web.Request) -> web.Response:
    app = state(request)
    status = request.query.get("status")
    if status and status not in ("pending", "running", *TERMINAL_STATES):
        raise BadRequest(f"invalid status filter {status!r}")
    offset, limit = page_params(request, 1000, 1000)
    jobs, total = await app.store.call(app.store.list_jobs, status, limit, offset)
    places = await app.store.call(app.store.queue_positions) \
        if any(j["status"] == "pending" for j in jobs) else {}
    return json_response({"jobs": [drop_none({**job_response(j),
                                              "queue_position": places.get(j["id"])})
                                   for j in jobs],
                          "total": total, "offset": offset, "limit": limit})


@api("GET", "/jobs/{id}", "protected", "run", "jobs", "Get job status",
     description="Returns the status and result of an async job",
     params=(param("id", "path", "string", "Job ID"),), ok=(200, "OK", "internal_api.JobResponse"),
     errors=((404, "Job not found"),))
async def get_job(request: web.Request) -> web.Response:
    """A job; with a webhook_url, its delivery attempts too (extension)."""
    app = state(request)
    job = await app.jobs.get(request.match_info["id"])
    body = job_response(job)
    if job["status"] == "pending":
        places = await app.store.call(app.store.queue_positions)
        body["queue_position"] = places.get(job["id"])
    if job.get("webhook_url"):
        attempts = await app.store.call(app.store.deliveries, job["id"])
        body["webhook_deliveries"] = [drop_none({**a, "at": rfc3339(a["at"])}) for a in attempts]
    return json_response(body)


@api("DELETE", "/jobs/{id}", "protected", "run", "jobs", "Cancel job",
     description="Cancels a pending or running job (its container is stopped)",
     params=(param("id", "path", "string", "Job ID"),),
     ok=(200, "OK", "internal_api.JobCancelResponse"),
     errors=((404, "Job not found"), (409, "Job cannot be cancelled"),))
async def cancel_job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    await state(request).jobs.cancel(job_id)
    return json_response({"cancelled": True, "job_id": job_id})


@api("GET", "/jobs/{id}/stream", "protected", "text", "jobs", "Stream a job's events",
     description="(extension) The job's output as SSE, as /run/stream sends it: `id:` on each "
                 "event, Last-Event-ID (header or last_event_id) resumes after that event, "
                 "replayed from the store once the job has finished, live while it runs, "
                 "ending with `event: done` or `event: error`; keep-alive comments every 15 s",
     params=(param("id", "path", "string", "Job ID"),
             param("Last-Event-ID", "header", "integer", "Send only events after this id"),
             param("last_event_id", "query", "integer", "Same as the Last-Event-ID header")),
     produces=("text/event-stream", "text/plain"),
     ok=(200, "Event stream of output lines", None),
     errors=((400, "Invalid Last-Event-ID"), (404, "Job not found")))
async def job_stream(request: web.Request) -> web.StreamResponse:
    job = await state(request).jobs.get(request.match_info["id"])
    return await replay_stream(request, job["run_id"])


# -- agents -----------------------------------------------------------------------

AGENT_ID_PARAM = param("id", "path", "string", "Agent ID")


@api("GET", "/agents", "protected", "error", "agents", "List persistent agents",
     description="Every agent, live or exited (until deleted), oldest first",
     ok=(200, "OK", "[#stromboli_internal_agent.Snapshot]"))
async def list_agents(request: web.Request) -> web.Response:
    return json_response([a.snapshot() for a in state(request).agents.agents.values()])


@api("POST", "/agents", "protected", "error", "agents", "Spawn a persistent agent",
     description="Launches a long-lived Claude container with stream-json I/O; a non-blank "
                 "prompt is its first turn. Extensions: `podman` options as for runs (the "
                 "image allowlist, volumes, secrets_env, limits; `timeout` is its lifetime); "
                 "each live agent holds one of the run slots (STROMBOLI_MAX_CONCURRENT_RUNS)",
     body="stromboli_internal_agent.CreateRequest",
     ok=(201, "Created", "internal_api.CreateAgentResponse"),
     errors=((400, "Invalid request"),
             (429, "All run slots are in use (extension), with Retry-After"),
             (500, "Spawn failed"),
             (503, "Claude not configured, or Podman unavailable (extension)")),
     error_schema="internal_api.errorBody")
async def create_agent(request: web.Request) -> web.Response:
    app = state(request)
    req = AgentRequest.parse(await read_json(request, "agent: invalid request: ", kept=True),
                             app.cfg)
    require_running(app)
    require_configured(app)
    agent = await app.agents.spawn(req)
    return json_response(agent.snapshot(), 201)


@api("GET", "/agents/{id}", "protected", "error", "agents", "Get persistent agent",
     params=(AGENT_ID_PARAM,), ok=(200, "OK", "stromboli_internal_agent.Snapshot"),
     errors=((404, "Not Found"),), error_schema="internal_api.errorBody")
async def get_agent(request: web.Request) -> web.Response:
    return json_response(state(request).agents.get(request.match_info["id"]).snapshot())


@api("DELETE", "/agents/{id}", "protected", "error", "agents", "Stop a persistent agent",
     description="Closes its stdin, then SIGTERM, then SIGKILL, 5 s apart; answers once its "
                 "container is gone, and the agent is forgotten",
     params=(AGENT_ID_PARAM,), ok=(204, "No Content", None), errors=((404, "Not Found"),),
     error_schema="internal_api.errorBody")
async def delete_agent(request: web.Request) -> web.Response:
    await state(request).agents.delete(request.match_info["id"])
    return web.Response(status=204)


@api("POST", "/agents/{id}/send", "protected", "error", "agents",
     "Send a turn to a persistent agent",
     description="Writes the prompt to the agent's stdin as a stream-json user message; its "
                 "output follows on /agents/{id}/stream",
     params=(AGENT_ID_PARAM,), body="internal_api.SendAgentRequest",
     ok=(202, "Accepted", "internal_api.SendAgentResponse"),
     errors=((400, "Bad Request"), (404, "Not Found"), (409, "Turn already in progress"),
             (410, "Agent has exited"),
             (503, "The agent does not read its input, or is starting again after a daemon "
                   "restart (extension), with Retry-After")),
     error_schema="internal_api.errorBody")
async def send_to_agent(request: web.Request) -> web.Response:
    body = await read_json(request, "agent: invalid request: ", kept=True)  # first, as upstream
    agent = state(request).agents.get(request.match_info["id"])
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("agent: invalid request: prompt is required")
    if "\0" in prompt:
        raise BadRequest("agent: invalid request: prompt must not contain NUL characters")
    return json_response({"turn_id": await agent.send(prompt)}, 202)


@api("GET", "/agents/{id}/stream", "protected", "error", "agents",
     "Stream a persistent agent's events (SSE)",
     description="Each event is `event: <type>` + `data: <JSON Event>`: turn_start, output "
                 "(content: one stdout line of the CLI), turn_end (with the turn's usage; "
                 "extension), error, exited; then `event: closed` with `{}` once the agent has "
                 "exited. Extensions: `id:` on each event and Last-Event-ID (header or "
                 "last_event_id) replays the kept events after it; a client that falls "
                 "behind the kept events is dropped, with a last `error` event when it can "
                 "take one; at most agent.max_followers clients (429 beyond); keep-alive "
                 "comments every 15 s",
     params=(AGENT_ID_PARAM,
             param("Last-Event-ID", "header", "integer", "(extension) Send only events after "
                   "this id"),
             param("last_event_id", "query", "integer", "(extension) Same as the "
                   "Last-Event-ID header")),
     produces=("text/event-stream", "application/json"),
     ok=(200, "SSE stream of agent.Event objects (stromboli_internal_agent.Event)", None),
     errors=((400, "Invalid Last-Event-ID (extension)"), (404, "Not Found"),
             (429, "agent.max_followers clients follow this agent already (extension), with "
                   "Retry-After")),
     error_schema="internal_api.errorBody")
async def agent_stream(request: web.Request) -> web.StreamResponse:
    app = state(request)
    agent = app.agents.get(request.match_info["id"])
    after = last_event_id(request)
    with agent.follower(after, app.cfg.agent_max_followers) as follower:
        response = await sse_response(request, "")
        with contextlib.suppress(ConnectionResetError):  # the client went away
            await write_agent_feed(request, response, follower)
    return response


AGENT_FOLLOWER_CHECK = 1.0  # seconds between checks of a follower's progress
AGENT_FOLLOWER_SNDBUF = 256 * 1024  # its socket's send buffer (the kernel's: twice that)
AGENT_FOLLOWER_BURST = 512 * 1024  # bytes it may write in one turn of the loop (the agent's
#                                    output of one turn is at most ~300 KiB of events)


async def write_agent_feed(request: web.Request, response: web.StreamResponse,
                           follower: AgentFollower) -> None:
    """An agent's stream: its shared frames, a chunk at a time (at most
    AGENT_FOLLOWER_BURST bytes per turn of the loop, so that many followers cannot hold
    it), and keep-alive comments while it is silent. A client that does not read holds its
    connection's buffers (about two chunks in the daemon, AGENT_FOLLOWER_SNDBUF in the
    kernel) and is cut off once it fell behind the kept events, or after SSE_STALL seconds
    without progress; it can follow again with Last-Event-ID. A client gone is noticed
    within AGENT_FOLLOWER_CHECK seconds, even while the agent is silent."""
    writing_since, last_write = 0.0, time.monotonic()
    if request.transport is not None \
            and (sock := request.transport.get_extra_info("socket")) is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, AGENT_FOLLOWER_SNDBUF)

    async def feed() -> None:
        nonlocal writing_since, last_write
        burst = 0
        try:
            async for chunk in follower.frames():
                writing_since = time.monotonic()
                await response.write(chunk)
                writing_since, last_write = 0.0, time.monotonic()
                burst += len(chunk)
                if burst >= AGENT_FOLLOWER_BURST:
                    burst = 0
                    await asyncio.sleep(0)
        except FellBehind:
            if request.transport is not None:
                request.transport.abort()

    async def watch() -> None:
        nonlocal last_write
        while (transport := request.transport) is not None and not transport.is_closing():
            now = time.monotonic()
            if writing_since and (follower.behind or now - writing_since > SSE_STALL):
                transport.abort()
            elif not writing_since and now - last_write >= SSE_KEEPALIVE \
                    and not transport.get_write_buffer_size():
                last_write = now
                await response.write(b": keepalive\n\n")
            await asyncio.sleep(AGENT_FOLLOWER_CHECK)
    feeding, watching = asyncio.ensure_future(feed()), asyncio.ensure_future(watch())
    try:
        await asyncio.wait({feeding, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        feeding.cancel()
        watching.cancel()
    if feeding.done() and not feeding.cancelled():
        feeding.result()  # raises what ended it, if anything did


# -- sessions ---------------------------------------------------------------------

def path_session_id(request: web.Request) -> str:
    """A session id from the path: one that is no lowercase UUID can never exist, so it is
    a 404 (as upstream), refused before any filesystem access."""
    session_id = request.match_info["id"]
    if not UUID_RE.match(session_id):
        raise NotFound("session not found")
    return session_id


def page_params(request: web.Request, default: int, maximum: int) -> tuple[int, int]:
    """offset/limit query parameters: invalid or negative values fall back (as upstream)."""
    def number(name: str, fallback: int) -> int:
        try:
            value = int(request.query.get(name, ""))
        except ValueError:
            return fallback
        return value if value >= 0 else fallback
    offset = number("offset", 0)
    limit = number("limit", default) or default
    return offset, min(limit, maximum)


@api("GET", "/sessions", "protected", "error", "sessions", "List sessions",
     description="Returns existing sessions with titles, newest first",
     params=(param("limit", "query", "integer",
                   "(extension) Number of sessions to return (default: all)"),
             param("offset", "query", "integer", "(extension) Offset for pagination (default: 0)")),
     ok=(200, "OK", "internal_api.SessionListResponse"), errors=((500, "Internal Server Error"),),
     error_schema="internal_api.SessionListResponse")
async def list_sessions(request: web.Request) -> web.Response:
    """Newest first; `offset`/`limit` paginate (extension, default: all)."""
    app = state(request)
    sessions = await asyncio.to_thread(app.sessions.list)
    offset, limit = page_params(request, len(sessions) or 1, max(len(sessions), 1))
    return json_response({"sessions": sessions[offset:offset + limit], "total": len(sessions)})


@api("DELETE", "/sessions/{id}", "protected", "success", "sessions", "Destroy session",
     description="Removes a session and all its stored data",
     params=(param("id", "path", "string", "Session ID (lowercase UUID)"),),
     ok=(200, "OK", "internal_api.SessionDestroyResponse"),
     errors=((400, "Bad Request"),
             (404, "Not Found"),
             (409, "A run on the session is active or queued (extension)")),
     error_schema="internal_api.SessionDestroyResponse")
async def delete_session(request: web.Request) -> web.Response:
    app = state(request)
    session_id = path_session_id(request)
    if app.sessions.busy(session_id):
        raise Conflict("session is in use by a run; wait for it or cancel it first")
    async with app.sessions.lock(session_id):  # no run can start while the home goes
        await asyncio.to_thread(app.sessions.delete, session_id)
    return json_response({"success": True, "session_id": session_id})


@api("GET", "/sessions/{id}/messages", "protected", "error", "sessions", "List session messages",
     description="Returns paginated conversation history for a session including all messages, "
                 "tool calls, and results. (extension) The messages of a page take at most "
                 "4 MiB of JSON: when large ones do not fit, they share it, their long strings "
                 "cut with a marker \" [stromboli: truncated, N characters dropped]\"",
     params=(param("id", "path", "string", "Session ID (UUID)"),
             param("offset", "query", "integer", "Offset for pagination (default: 0)"),
             param("limit", "query", "integer",
                   "Number of messages to return (default: 50, max: 200)")),
     ok=(200, "OK", "internal_api.SessionMessagesResponse"),
     errors=((400, "Invalid parameters"), (404, "Session not found"), (500, "Internal error"),),
     error_schema="internal_api.SessionMessagesResponse")
async def session_messages(request: web.Request) -> web.Response:
    """A page of the transcript, plus the session's cumulative `usage` (extension)."""
    app = state(request)
    session_id = path_session_id(request)
    offset, limit = page_params(request, 50, 200)
    messages, total = await asyncio.to_thread(app.sessions.messages, session_id, offset, limit)
    usage = await asyncio.to_thread(app.sessions.usage, session_id)
    rest = compact_json(drop_none({"total": total, "offset": offset, "limit": limit,
                                   "has_more": offset + limit < total, "usage": usage}))
    # The messages were encoded (and bounded) in the store's thread: here they are joined.
    return web.Response(text=f'{{"messages":[{",".join(messages)}],{rest[1:]}',
                        content_type="application/json")


@api("GET", "/sessions/{id}/messages/{message_id}", "protected", "error", "sessions",
     "Get session message",
     description="Returns a specific message from session history by UUID, including full "
                 "content, tool calls, and results. (extension) At most 4 MiB of JSON: the "
                 "long strings of a larger one are cut with a marker",
     params=(param("id", "path", "string", "Session ID (UUID)"),
             param("message_id", "path", "string", "Message UUID")),
     ok=(200, "OK", "internal_api.SessionMessageResponse"),
     errors=((400, "Invalid parameters"), (404, "Message not found"), (500, "Internal error"),),
     error_schema="internal_api.SessionMessageResponse")
async def session_message(request: web.Request) -> web.Response:
    app = state(request)
    session_id = path_session_id(request)
    message_id = request.match_info["message_id"]
    message = await asyncio.to_thread(app.sessions.message, session_id, message_id)
    if message is None:
        raise NotFound(f"message not found: {message_id}")
    return web.Response(text=f'{{"message":{message}}}', content_type="application/json")


# -- images and secrets -------------------------------------------------------------

async def catalog(request: web.Request, method: str, *args: Any, failure: str) -> Any:
    """Call a PodmanCatalog method off the loop; Podman failures become 500/503."""
    app = state(request)
    try:
        return await app.podman.call(getattr(app.catalog, method), *args)
    except ApiError:  # PodmanUnavailable included
        raise
    except (podman.errors.PodmanError, RunFailed) as exc:
        log.warning(failure, extra=fields(error=short_error(exc)))
        raise ApiError(500, failure) from None


@api("GET", "/images", "protected", "error", "images", "List images",
     description="Returns local container images sorted by compatibility rank: 1-2 verified "
                 "compatible, 3 standard glibc (compatible), 4 incompatible (Alpine/musl)",
     ok=(200, "List of images (empty array if none exist)", "internal_api.ImagesListResponse"),
     errors=((500, "Internal server error"), (503, "Podman unavailable (extension)"),))
async def list_images(request: web.Request) -> web.Response:
    images = await catalog(request, "images", failure="failed to list images")
    return json_response({"images": images})


@api("GET", "/images/{name:.+}", "protected", "error", "images", "Inspect image",
     description="Returns detailed information about a container image including all labels and "
                 "compatibility information",
     params=(param("name", "path", "string",
                   "Image name with optional tag; may hold a registry and slashes, raw or "
                   "URL-encoded (extension)",
                   example="python:3.12-slim"),),
     ok=(200, "Image details", "internal_api.ImageDetailResponse"),
     errors=((400, "Invalid image name"),
             (404, "Image not found"),
             (500, "Internal server error"),
             (503, "Podman unavailable (extension)")))
async def inspect_image(request: web.Request) -> web.Response:
    """`/images/{name}`: the name may hold a registry and slashes, raw or URL-encoded."""
    name = check_image_name(request.match_info["name"])
    return json_response(await catalog(request, "inspect", name, failure="internal server error"))


@api("GET", "/images/search", "protected", "error", "images", "Search images",
     description="Searches container registries for images matching the query",
     params=(param("q", "query", "string", "Search query", example="python", required=True),
             param("limit", "query", "integer", "Maximum number of results (default 25, max 100)",
                   example=10),
             param("no_trunc", "query", "boolean",
                   "Don't truncate output (accepted; results are never truncated)")),
     ok=(200, "Search results", "internal_api.ImageSearchResponse"),
     errors=((400, "Invalid request (missing query)"),
             (500, "Internal server error"),
             (502, "Registry search failed"),
             (503, "Podman unavailable (extension)")))
async def search_images(request: web.Request) -> web.Response:
    term = search_term(request.query.get("q", ""))
    try:
        limit = int(request.query.get("limit", "25"))
    except ValueError:
        limit = 0
    if limit < 1:
        raise BadRequest("invalid limit parameter")
    results = await catalog(request, "search", term, min(limit, 100),
                            failure="registry search failed")
    return json_response({"results": results})


@api("POST", "/images/pull", "protected", "error", "images", "Pull image",
     description="Pulls a container image from a registry. Extension: with `Accept: "
                 "text/event-stream` the progress is streamed as SSE `data:` lines, then "
                 "`event: done` (data: the ImagePullResponse JSON) or `event: error` (data: "
                 "message)",
     body="internal_api.ImagePullRequest", produces=("application/json", "text/event-stream"),
     ok=(200, "Image pulled successfully (or the SSE progress stream)",
         "internal_api.ImagePullResponse"),
     errors=((400, "Invalid request"), (500, "Pull failed"),))
async def pull_image(request: web.Request) -> web.StreamResponse:
    """Pull an image; with `Accept: text/event-stream` its progress is streamed as SSE
    (`data:` lines, then `event: done` with the JSON result, or `event: error`)."""
    app = state(request)
    body = await read_json(request)
    if not isinstance(body, dict) or not body.get("image"):
        raise BadRequest("Key: 'ImagePullRequest.Image' Error:Field validation for 'Image' "
                         "failed on the 'required' tag")
    image = check_image_name(body["image"])
    platform = body.get("platform") or None
    if platform is not None and not isinstance(platform, str):
        raise BadRequest("platform must be a string")
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()
    pulling = asyncio.ensure_future(app.podman.call(
        app.catalog.pull, image, platform, functools.partial(loop.call_soon_threadsafe,
                                                             lines.put_nowait)))
    if "text/event-stream" not in request.headers.get("Accept", ""):
        try:
            image_id = await pulling
        except (RunFailed, podman.errors.PodmanError) as exc:
            raise ApiError(500, f"failed to pull image: {short_error(exc)}") from None
        return json_response({"success": True, "image_id": image_id, "image": image})
    response = await sse_response(request, run_id="")

    async def events():
        seq = 0
        while not (pulling.done() and lines.empty()):
            getter = asyncio.ensure_future(lines.get())
            await asyncio.wait({getter, pulling}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield seq, "line", getter.result()
                seq += 1
            else:
                getter.cancel()
        try:
            result = {"success": True, "image_id": pulling.result(), "image": image}
            yield seq, "done", json.dumps(result)
        except (RunFailed, podman.errors.PodmanError, OSError) as exc:
            yield seq, "error", f"failed to pull image: {short_error(exc)}"
    try:
        await write_feed(request, response, events())
    finally:
        pulling.cancel()
    return response


@api("GET", "/secrets", "protected", "error", "secrets", "List secrets",
     description="Returns metadata for all Podman secrets; values are never returned",
     ok=(200, "List of secrets (empty array if none exist)", "internal_api.SecretsListResponse"),
     errors=((500, "Internal server error"), (503, "Podman unavailable (extension)"),),
     error_schema="internal_api.SecretsListResponse")
async def list_secrets(request: web.Request) -> web.Response:
    try:
        secrets = await catalog(request, "secrets", failure="failed to list secrets")
    except ApiError as exc:
        exc.extra["secrets"] = None
        raise
    return json_response({"secrets": secrets})


def check_secret_name(name: Any) -> str:
    if not isinstance(name, str) or not SECRET_NAME_RE.match(name) or len(name) > 253:
        raise BadRequest("invalid secret name: use letters, digits, _ and - (at most 253)")
    return name


@api("POST", "/secrets", "protected", "success", "secrets", "Create secret",
     description="Creates a Podman secret. Names: letters, digits, - and _, max 253 characters. "
                 "Values are limited to 1MB",
     body="internal_api.CreateSecretRequest",
     ok=(201, "Secret created successfully", "internal_api.CreateSecretResponse"),
     errors=((400, "Invalid request (missing/invalid name or value)"),
             (409, "Secret with this name already exists"),
             (500, "Internal server error"),
             (503, "Podman unavailable (extension)")),
     error_schema="internal_api.CreateSecretResponse")
async def create_secret(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) \
            or not isinstance(body.get("value"), str) or not body["name"] or not body["value"]:
        raise BadRequest("Key: 'CreateSecretRequest.Name/Value' Error:Field validation for "
                         "'Name' and 'Value' failed on the 'required' tag")
    name = check_secret_name(body["name"])
    value = body["value"].encode()
    if len(value) > MAX_SECRET_BYTES:
        raise BadRequest("secret value exceeds 1 MB", name=name)
    await catalog(request, "create_secret", name, value, failure="failed to create secret")
    return json_response({"success": True, "name": name}, 201)


@api("GET", "/secrets/{name}", "protected", "error", "secrets", "Get secret metadata",
     description="Returns metadata about a Podman secret; the value is never returned",
     params=(param("name", "path", "string", "Secret name", example="github-token"),),
     ok=(200, "Secret metadata", "internal_api.SecretInfoResponse"),
     errors=((400, "Invalid secret name"),
             (404, "Secret not found"),
             (500, "Internal server error"),
             (503, "Podman unavailable (extension)")))
async def get_secret(request: web.Request) -> web.Response:
    name = check_secret_name(request.match_info["name"])
    return json_response(await catalog(request, "secret", name, failure="internal server error"))


@api("DELETE", "/secrets/{name}", "protected", "success", "secrets", "Delete secret",
     description="Permanently deletes a Podman secret. Secrets in use by running containers may "
                 "cause those containers to fail",
     params=(param("name", "path", "string", "Secret name", example="github-token"),),
     ok=(200, "Secret deleted successfully", "internal_api.DeleteSecretResponse"),
     errors=((400, "Invalid secret name"),
             (404, "Secret not found"),
             (409, "Secret is managed by stromboli (extension)"),
             (500, "Internal server error"),
             (503, "Podman unavailable (extension)")),
     error_schema="internal_api.DeleteSecretResponse")
async def delete_secret(request: web.Request) -> web.Response:
    name = check_secret_name(request.match_info["name"])
    await catalog(request, "delete_secret", name, failure="failed to delete secret")
    return json_response({"success": True, "name": name})


# -- auth -------------------------------------------------------------------------

def require_jwt(app: Stromboli) -> None:
    if not app.auth.secret:
        raise Unavailable("JWT authentication not configured")


@api("POST", "/auth/token", "token", "error", "auth", "Generate JWT tokens",
     description="Generate new JWT access and refresh tokens using API credentials (only a "
                 "static API token mints: not a JWT; not rate limited)",
     body="internal_api.TokenRequest", ok=(200, "OK", "internal_api.TokenResponse"),
     errors=((400, "Bad Request"), (503, "JWT authentication not configured"),))
async def auth_token(request: web.Request) -> web.Response:
    """Mint a pair. Only a static token may (perimeter has checked it when auth is on): a
    JWT minting JWTs would make one leaked access token last forever."""
    app = state(request)
    require_jwt(app)
    if request.get("jwt_claims") is not None:
        raise AuthError("a static API token is required to mint tokens")
    body = await read_json(request, prefix="invalid request: ")
    client_id = body.get("client_id") if isinstance(body, dict) else None
    if not isinstance(client_id, str) or not client_id.strip():
        raise BadRequest("invalid request: Key: 'TokenRequest.ClientID' Error:Field validation "
                         "for 'ClientID' failed on the 'required' tag")
    return json_response(app.auth.tokens(client_id))


@api("POST", "/auth/refresh", "public", "error", "auth", "Refresh access token",
     description="Generate a new access token (and a new refresh token) using a valid refresh "
                 "token",
     body="internal_api.RefreshRequest", ok=(200, "OK", "internal_api.TokenResponse"),
     errors=((400, "Bad Request"),
             (401, "invalid or expired refresh token"),
             (503, "JWT authentication not configured")))
async def auth_refresh(request: web.Request) -> web.Response:
    app = state(request)
    require_jwt(app)
    body = await read_json(request, prefix="invalid request: ")
    token = body.get("refresh_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise BadRequest("invalid request: Key: 'RefreshRequest.RefreshToken' Error:Field "
                         "validation for 'RefreshToken' failed on the 'required' tag")
    return json_response(await app.auth.refresh(token))


@api("GET", "/auth/validate", "public", "error", "auth", "Validate JWT token",
     description="Validate a JWT access token and return its claims. Public route (no rate "
                 "limit): it checks the bearer token itself",
     ok=(200, "OK", "internal_api.ValidateResponse"),
     errors=((401, "Unauthorized"), (503, "JWT authentication not configured"),),
     reads_bearer=True)
@api("POST", "/auth/validate", "public", "error", "auth", "Validate JWT token (POST)",
     description="(extension) The same as GET /auth/validate, as the API overview lists it",
     ok=(200, "OK", "internal_api.ValidateResponse"),
     errors=((401, "Unauthorized"), (503, "JWT authentication not configured")),
     reads_bearer=True)
async def auth_validate(request: web.Request) -> web.Response:
    app = state(request)
    require_jwt(app)
    claims = await app.auth.check_access(Auth.bearer(request))
    if claims is None:
        raise AuthError("invalid or expired token")
    return json_response({"valid": True, "subject": claims["sub"], "expires_at": claims["exp"]})


@api("POST", "/auth/logout", "public", "error", "auth", "Logout (invalidate token)",
     description="Revokes the bearer JWT; a refresh_token in the optional body is revoked too "
                 "(extension). Public route (no rate limit): it checks the bearer token itself",
     body="internal_api.LogoutRequest", body_required=False,
     ok=(200, "OK", "internal_api.LogoutResponse"),
     errors=((401, "Unauthorized"), (503, "Service Unavailable"),), reads_bearer=True)
async def auth_logout(request: web.Request) -> web.Response:
    """Revoke the presented access token's whole family (every token of that grant), and
    that of a `refresh_token` in the body. All or nothing: every token is checked first."""
    app = state(request)
    require_jwt(app)
    families = [await app.auth.check_access(Auth.bearer(request))]
    if families[0] is None:
        raise AuthError("invalid or expired token")  # a static token cannot log out
    if request.body_exists:
        body = await read_json(request, prefix="invalid request: ")
        refresh = body.get("refresh_token") if isinstance(body, dict) else None
        if refresh is not None:
            if not isinstance(refresh, str):
                raise BadRequest("invalid request: refresh_token must be a string")
            families.append(app.auth.decode(refresh, refresh=True))
    for claims in families:
        await app.auth.revoke_family(claims)
    return json_response({"success": True, "message": "token invalidated"})


@api("GET", "/swagger/doc.json", "public", "error", "docs", "OpenAPI document",
     description="(extension) This Swagger 2.0 document", ok=(200, "OK", "object"))
async def openapi_document(request: web.Request) -> web.Response:
    return json_response(OPENAPI)


@api("GET", "/swagger/", "public", "error", "docs", "API documentation page",
     description="(extension) A self-contained HTML viewer of doc.json", produces=("text/html",),
     ok=(200, "OK", None))
async def openapi_viewer(request: web.Request) -> web.Response:
    return web.Response(text=SWAGGER_HTML, content_type="text/html", charset="utf-8")


@api("GET", "/metrics", "protected", "error", "system", "Prometheus metrics",
     description="(extension) The Prometheus exposition, also served without auth on the "
                 "metrics listener (127.0.0.1:9090 by default)",
     produces=("text/plain",), ok=(200, "Prometheus text format 0.0.4", None))
async def metrics_endpoint(request: web.Request) -> web.Response:
    app = state(request)
    jobs = await app.store.call(app.store.count_jobs_by_status)
    return web.Response(text=app.metrics.render(jobs),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


# -- the route table --------------------------------------------------------------

# ROUTES holds every handler's @api record; the document is derived from them once.
OPENAPI = build_openapi(ROUTES)
ROUTE_RECORDS_KEY = web.AppKey("route_records", dict)


def build_app(app_state: Stromboli) -> web.Application:
    app = web.Application(middlewares=[request_context, perimeter],
                          client_max_size=app_state.cfg.server_max_body_bytes)
    app[APP_KEY] = app_state
    records = {}
    for record in ROUTES:
        route = app.router.add_route(record.method, record.path, record.handler)
        records[(record.method, route.resource.canonical)] = record  # request_context's key
    app[ROUTE_RECORDS_KEY] = records
    return app


def build_metrics_app(app_state: Stromboli) -> web.Application:
    app = web.Application()
    app[APP_KEY] = app_state
    app.router.add_get("/metrics", metrics_endpoint)
    return app


# -- connections ------------------------------------------------------------------

class ConnectionGuard:
    """Limits in front of aiohttp's protocol, which has none against slowloris: a deadline
    for a new connection's first request head, and at most `max_connections` open. When
    full, a new connection takes the place of the oldest one still sending its head (a
    slowloris holds its connections there; a real client leaves it within milliseconds),
    and is closed at once only when every connection is busy with a request. Later
    requests on a kept-alive connection are bounded by aiohttp's keep-alive timeout,
    bodies by read_json's."""

    def __init__(self, cfg: Config, metrics: "Metrics"):
        self.limit, self.header_timeout = cfg.server_max_connections, cfg.server_header_timeout
        self.metrics = metrics
        self.open = 0
        self.waiting: dict[GuardedConnection, asyncio.BaseTransport] = {}  # oldest first

    def protocol(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        return GuardedConnection(self, factory)

    def admit(self) -> bool:
        """Room for one more connection, making it if a head-sending one can go."""
        if self.open < self.limit:
            return True
        self.metrics.connections_rejected += 1
        if not self.waiting:
            return False
        oldest = next(iter(self.waiting))
        self.waiting.pop(oldest).abort()  # its connection_lost frees the slot
        oldest.release()
        return True


class GuardedConnection(asyncio.Protocol):
    """One client connection: counted, timed until its request head is in, then handed
    through to aiohttp's protocol untouched."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]):
        self.guard, self.factory = guard, factory
        self.counted = True
        self.inner: asyncio.Protocol | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard.admit():
            transport.abort()
            return
        self.guard.open += 1
        self.inner = self.factory()
        self.deadline = asyncio.get_running_loop().call_later(
            self.guard.header_timeout, self._expire, transport)
        self.guard.waiting[self] = transport
        self.inner.connection_made(transport)

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        self.guard.metrics.connections_timed_out += 1
        self.guard.waiting.pop(self, None)
        transport.abort()

    def release(self) -> None:
        """Stop counting this connection (it is closing); idempotent."""
        if self.inner is not None and self.counted:
            self.counted = False
            self.guard.open -= 1
        self.guard.waiting.pop(self, None)
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def data_received(self, data: bytes) -> None:
        if self.deadline is not None:  # until the blank line that ends the request head
            seen = self.tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self.deadline.cancel()
                self.deadline = None
                self.guard.waiting.pop(self, None)
            self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is None:
            return
        self.release()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.SockSite):
    """aiohttp's socket site, with each connection passed through a ConnectionGuard."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, guard: ConnectionGuard):
        super().__init__(runner, sock, backlog=1024)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        self._server = await asyncio.get_running_loop().create_server(
            functools.partial(self.guard.protocol, server), sock=self._sock, backlog=1024)


class LoopErrorLog:
    """The event loop's error handler: one line per kind of error per 10 s, with a count,
    so that a storm (accept() failing for want of file descriptors) cannot flood the log."""

    INTERVAL = 10.0

    def __init__(self) -> None:
        self.seen: dict[str, tuple[float, int]] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        key = f"{context.get('message', 'event loop error')}: " \
              f"{type(exc).__name__ + ': ' + str(exc) if exc else ''}"[:300]
        last, count = self.seen.get(key, (0.0, 0))
        now = time.monotonic()
        if now - last < self.INTERVAL:
            self.seen[key] = (last, count + 1)
            return
        self.seen[key] = (now, 0)
        log.error("event loop error", extra=fields(error=key, repeats_since_last=count))


def raise_open_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: each connection and run holds descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------
# systemd — readiness and watchdog notifications, socket activation
# ---------------------------------------------------------------------------

class SystemdNotifier:
    """sd_notify(3) over $NOTIFY_SOCKET with the stdlib socket module; a no-op when the
    daemon is not run by systemd with Type=notify."""

    def __init__(self, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 2e6 if usec.isdigit() and mine else 0.0

    def notify(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify failed", extra=fields(error=str(exc)))

    async def watchdog_forever(self, status: Callable[[], str]) -> None:
        """Ping at half the watchdog interval; the ping only goes out while the event
        loop runs, so a wedged daemon is restarted by systemd."""
        while self.watchdog_seconds:
            self.notify("WATCHDOG=1", f"STATUS={status()}")
            await asyncio.sleep(self.watchdog_seconds)


def activated_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_FDS, from fd 3): the first
    serves the API, a second one (if any) the metrics."""
    environ = os.environ if environ is None else environ
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(environ.get("LISTEN_FDS", "0") or 0)
    return [socket.socket(fileno=3 + i) for i in range(count)]


# ---------------------------------------------------------------------------
# Client CLI — subcommands that talk to a running daemon
# ---------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED, EXIT_CRASHED, EXIT_UNREACHABLE = 0, 1, 3, 4  # 2: argparse usage
EXIT_CODES_HELP = """exit codes: 0 done, 1 the run or request failed, 2 bad usage, 3 the run crashed
(killed, timed out; an agent exited during the turn), 4 the daemon cannot be reached or refused
the token"""


class ClientError(Exception):
    """`status` is the HTTP status of a refused request (None: no answer), with its
    Retry-After header when it had one."""

    def __init__(self, message: str, code: int = EXIT_FAILED, status: int | None = None,
                 retry_after: str | None = None):
        super().__init__(message)
        self.code, self.status, self.retry_after = code, status, retry_after


class ApiClient:
    """A small blocking HTTP client (urllib) for the CLI subcommands."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url.rstrip("/"), token

    def _open(self, method: str, path: str, body: Any = None, query: dict | None = None,
              headers: dict | None = None):
        import urllib.error
        import urllib.parse
        import urllib.request
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=None)
        except urllib.error.HTTPError as exc:
            raw = exc.read().decode(errors="replace")
            try:
                message = json.loads(raw).get("error") or raw
            except ValueError:
                message = raw.strip() or exc.reason
            code = EXIT_UNREACHABLE if exc.code in (401, 403) else EXIT_FAILED
            raise ClientError(f"{exc.code}: {message}", code, exc.code,
                              exc.headers.get("Retry-After")) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach stromboli at {self.url}: {reason}",
                              EXIT_UNREACHABLE) from None

    def call(self, method: str, path: str, body: Any = None, query: dict | None = None) -> Any:
        with self._open(method, path, body, query) as response:
            return json.loads(response.read() or b"null")

    def events(self, path: str, query: dict, last_event_id: str | None = None):
        """Server-sent events as (event, data, id) tuples."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        with self._open("GET", path, query=query, headers=headers) as response:
            event, data, event_id = "message", [], None
            for raw in response:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if data:
                        yield event, "\n".join(data), event_id
                    event, data = "message", []
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data":
                        data.append(value)
                    elif name == "event":
                        event = value
                    elif name == "id":
                        event_id = value


class Spinner:
    """Elapsed time on stderr while waiting for output (only on a terminal)."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, enabled: bool):
        self.enabled, self.started = enabled, time.monotonic()
        self._waiting = threading.Event()
        self._stop = threading.Event()
        if enabled:
            threading.Thread(target=self._spin, daemon=True).start()

    def _spin(self) -> None:
        frame = 0
        while not self._stop.wait(0.1):
            if self._waiting.is_set():
                elapsed = time.monotonic() - self.started
                sys.stderr.write(f"\r{self.FRAMES[frame % 10]} {elapsed:5.1f}s")
                sys.stderr.flush()
                frame += 1

    def wait(self) -> None:
        self._waiting.set()

    def pause(self) -> None:
        if self.enabled and self._waiting.is_set():
            self._waiting.clear()
            time.sleep(0.01)
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def stop(self) -> None:
        self.pause()
        self._stop.set()


class EventRenderer:
    """Stream-json events as readable text: assistant text as is, tool calls and results
    as one compact line each, a one-line summary at the end (on stderr)."""

    def __init__(self, out=None, err=None):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.result: dict | None = None

    def line(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict) or "type" not in event:
            print(text, file=self.out, flush=True)
            return
        kind = event["type"]
        if kind == "system" and event.get("subtype") == "init":
            print(f"· session {event.get('session_id', '?')} · model {event.get('model', '?')}",
                  file=self.err, flush=True)
        elif kind == "assistant":
            for block in (event.get("message") or {}).get("content") or []:
                self._assistant_block(block)
        elif kind == "user":
            for block in (event.get("message") or {}).get("content") or []:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    print(f"  ← {self._short(self._result_text(block))}", file=self.out, flush=True)
        elif kind == "result":
            self.result = event

    def _assistant_block(self, block: Any) -> None:
        if not isinstance(block, dict):
            return
        if block.get("type") == "text" and block.get("text"):
            print(block["text"], file=self.out, flush=True)
        elif block.get("type") == "tool_use":
            data = block.get("input") or {}
            detail = data.get("command") or data.get("file_path") or data.get("pattern") \
                or json.dumps(data)
            print(f"→ {block.get('name', 'tool')}: {self._short(str(detail))}", file=self.out,
                  flush=True)

    @staticmethod
    def _result_text(block: dict) -> str:
        content = block.get("content")
        if isinstance(content, list):
            content = " ".join(b.get("text", "") for b in content if isinstance(b, dict))
        return str(content or "")

    @staticmethod
    def _short(text: str, width: int = 100) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width - 1] + "…"

    def summary(self, elapsed: float) -> str:
        parts = [f"{elapsed:.1f}s"]
        usage = (self.result or {}).get("usage") or {}
        tokens = sum(int(usage.get(k) or 0) for k in USAGE_KEYS)
        if tokens:
            parts.append(f"{tokens:,} tokens")
        if (self.result or {}).get("total_cost_usd") is not None:
            parts.append(f"${self.result['total_cost_usd']:.4f}")
        return " · ".join(parts)


def client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(args.url or os.environ.get("STROMBOLI_URL") or "http://127.0.0.1:8080",
                     args.token or os.environ.get("STROMBOLI_TOKEN", ""))


def error_message(data: str) -> str:
    """The message of an `event: error` (JSON from this daemon, bare text from upstream)."""
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data


def follow_run(api: ApiClient, query: dict, as_json: bool, run_id: str | None = None) -> int:
    """Print a run's stream; the exit code follows its final status."""
    renderer = EventRenderer()
    spinner = Spinner(sys.stderr.isatty() and sys.stdout.isatty() and not as_json)
    started, status = time.monotonic(), None
    path_query = {"run_id": run_id} if run_id else query
    spinner.wait()
    try:
        for event, data, _ in api.events("/run/stream", path_query):
            spinner.pause()
            if event == "done":
                status = json.loads(data)
                if as_json:
                    print(json.dumps({"type": "done", **status}), flush=True)
            elif event == "error":
                message = error_message(data)
                if as_json:
                    print(json.dumps({"type": "error", "error": message}), flush=True)
                raise ClientError(f"run failed: {message}")
            elif as_json:
                print(data if data.startswith("{") else json.dumps({"type": "text", "text": data}),
                      flush=True)
            else:
                renderer.line(data)
            spinner.wait()
    finally:
        spinner.stop()
    if status is None:
        raise ClientError("the stream ended without a final status")
    if not as_json:
        print(f"· {status['status']} · {renderer.summary(time.monotonic() - started)} · "
              f"session {status['session_id']}", file=sys.stderr)
    if status["status"] == "crashed":
        return EXIT_CRASHED
    return EXIT_FAILED if (renderer.result or {}).get("is_error") else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    query = {"prompt": args.prompt, "output_format": "stream-json"}
    options = {"session_id": args.session, "workdir": args.workdir, "model": args.model,
               "timeout": args.timeout, "allowed_tools": args.allowed_tools,
               "system_prompt": args.system_prompt, "image": args.image}
    query.update({k: v for k, v in options.items() if v})
    for flag in ("resume", "continue", "fork_session", "dangerously_skip_permissions"):
        if getattr(args, flag):
            query[flag] = "true"
    return follow_run(client(args), query, args.json)


def cmd_jobs(args: argparse.Namespace) -> int:
    api = client(args)
    if not args.id:
        jobs = api.call("GET", "/jobs", query={"status": args.status} if args.status else None)
        if args.json:
            print(json.dumps(jobs, indent=2))
            return EXIT_OK
        print(f"{'JOB':<22} {'STATUS':<10} {'SESSION':<37} CREATED")
        for job in jobs["jobs"]:
            print(f"{job['id']:<22} {job['status']:<10} {job.get('session_id', ''):<37} "
                  f"{job['created_at']}")
        return EXIT_OK
    job = api.call("GET", f"/jobs/{args.id}")
    if args.follow:
        while job["status"] == "pending" and not job.get("started_at"):
            time.sleep(0.5)
            job = api.call("GET", f"/jobs/{args.id}")
        follow_run(api, {}, args.json, run_id=job["run_id"])
        job = api.call("GET", f"/jobs/{args.id}")
    if args.json or not args.follow:
        print(json.dumps(job, indent=2))
    return {"completed": EXIT_OK, "crashed": EXIT_CRASHED}.get(job["status"], EXIT_FAILED) \
        if job["status"] not in ("pending", "running") else EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    result = client(args).call("DELETE", f"/jobs/{args.id}")
    print(f"cancelled {result['job_id']}")
    return EXIT_OK


def cmd_sessions(args: argparse.Namespace) -> int:
    api = client(args)
    if not args.id:
        sessions = api.call("GET", "/sessions")
        if args.json:
            print(json.dumps(sessions, indent=2))
        for session in [] if args.json else sessions["sessions"]:
            print(f"{session['id']}  {session['title']}")
        return EXIT_OK
    page = api.call("GET", f"/sessions/{args.id}/messages", query={"limit": 200})
    if args.json:
        print(json.dumps(page, indent=2))
        return EXIT_OK
    for message in page["messages"]:
        content = message.get("content") or {}
        texts = [b.get("text") or (f"[{b.get('name')}]" if b.get("type") == "tool_use" else "")
                 for b in content.get("content") or []]
        text = " ".join(t for t in texts if t)
        if content.get("role") in ("user", "assistant") and text:
            print(f"{content['role']:>9}: {text}")
    return EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    tokens = client(args).call("POST", "/auth/token", {"client_id": args.client_id})
    print(json.dumps(tokens, indent=2) if args.json else tokens["access_token"])
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    health = client(args).call("GET", "/health")
    if args.json:
        print(json.dumps(health, indent=2))
    else:
        print(f"{health['name']} {health['version']}: {health['status']}")
        for component in health.get("components", []):
            error = f" — {component['error']}" if component.get("error") else ""
            print(f"  {component['name']}: {component['status']}{error}")
    return EXIT_OK if health["status"] == "ok" else EXIT_FAILED


AGENT_SEND_RETRIES = 5  # a 503 (the agent is starting again after a daemon restart)
AGENT_STREAM_RECONNECTS = 5  # a stream cut before the turn ended (the daemon restarted)


def retry_after_seconds(header: str | None, default: float = 2.0) -> float:
    """A Retry-After header in seconds (1 to 30; `default` when absent or a date)."""
    try:
        seconds = float(header or "")
    except ValueError:
        return default
    return min(max(seconds, 1.0), 30.0) if seconds == seconds else default  # not NaN


def idle_timeout_arg(text: str) -> int:
    """--idle-timeout: seconds, or a duration such as 10m."""
    try:
        seconds = int(text) if text.strip().isdigit() else int(parse_duration(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (seconds, or e.g. 10m, "
                                         "1h)") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be positive (--no-idle-timeout turns it off)")
    return seconds


def send_turn(api: ApiClient, agent_id: str, prompt: str, sleep: Callable = time.sleep) -> str:
    """POST /agents/{id}/send → the turn id; a 503 (starting again after a daemon restart)
    is retried after its Retry-After, a few times."""
    for attempt in range(AGENT_SEND_RETRIES + 1):
        try:
            return api.call("POST", f"/agents/{agent_id}/send", {"prompt": prompt})["turn_id"]
        except ClientError as exc:
            if exc.status != 503 or attempt == AGENT_SEND_RETRIES:
                raise
            wait = retry_after_seconds(exc.retry_after)
            print(f"· {exc}; retrying in {wait:g}s", file=sys.stderr, flush=True)
            sleep(wait)
    raise AssertionError("unreachable")


def follow_turn(api: ApiClient, agent_id: str, turn_id: str | None, as_json: bool,
                quiet: bool = False, out=None, err=None, sleep: Callable = time.sleep) -> int:
    """Print one turn from an agent's stream — `turn_id`, or (None) the first turn that
    starts — until its turn_end; the exit code follows how it ended. The stream replays the
    kept events first: those of other turns are skipped. A stream cut before the turn ended
    (a daemon restart) is resumed with Last-Event-ID."""
    out, err = out or sys.stdout, err or sys.stderr
    renderer = EventRenderer(out, err)
    spinner = Spinner(err.isatty() and out.isatty() and not as_json and not quiet)
    started, last_id, cuts = time.monotonic(), None, 0
    ending: tuple[str, str] | None = None  # (how, message)
    spinner.wait()
    try:
        while ending is None:
            try:
                for event, data, event_id in api.events(f"/agents/{agent_id}/stream", {},
                                                        last_id):
                    spinner.pause()
                    last_id, cuts = event_id or last_id, 0
                    ending = agent_event(event, data, turn_id, renderer, as_json, quiet)
                    if isinstance(ending, str):  # the first turn_start: the turn followed
                        turn_id, ending = ending, None
                    if ending:
                        break
                    spinner.wait()
            except ClientError as exc:
                if exc.status is not None:  # refused (404: the agent is gone): no retry
                    raise
                if not quiet:
                    print(f"· {exc}", file=err, flush=True)
            if ending is None:
                cuts += 1
                if cuts > AGENT_STREAM_RECONNECTS:
                    raise ClientError("the agent's stream ended before the turn did",
                                      EXIT_CRASHED)
                sleep(cuts)
    finally:
        spinner.stop()
    how, message = ending
    failed = (renderer.result or {}).get("is_error")
    if not as_json and not quiet:
        status = {"end": "failed" if failed else "done"}.get(how, f"{how}: {message}")
        print(f"· {status} · {renderer.summary(time.monotonic() - started)} · agent "
              f"{agent_id}", file=err, flush=True)
    if how != "end":
        if as_json or quiet:
            print(f"error: {message}", file=err, flush=True)
        return EXIT_CRASHED
    return EXIT_FAILED if failed else EXIT_OK


def agent_event(event: str, data: str, turn_id: str | None, renderer: EventRenderer,
                as_json: bool, quiet: bool) -> tuple[str, str] | str | None:
    """One event of an agent's stream for follow_turn: printed if it belongs to the turn;
    → how the turn ended ("end", "exited", "lost"), the id of the first turn to start when
    `turn_id` is None, or None to read on."""
    if event == "closed":
        return "exited", "the agent has exited"
    try:
        body = json.loads(data)
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    if event == "exited":  # a turn in flight ends with it, whichever it was
        return "exited", str(body.get("error") or "the agent has exited")
    if turn_id is None:
        if event != "turn_start" or not body.get("turn_id"):
            return None
        started = str(body["turn_id"])
        agent_event(event, data, started, renderer, as_json, quiet)
        return started
    if body.get("turn_id") != turn_id:
        return None
    if as_json and not quiet:
        print(data, file=renderer.out, flush=True)
    if event == "output":
        content = str(body.get("content") or "")
        if as_json or quiet:
            line = next(parse_json_lines([content]), None)
            if line and line.get("type") == "result":
                renderer.result = line
        else:
            renderer.line(content)
    elif event == "error":
        message = str(body.get("error") or "")
        if not as_json and not quiet:
            print(f"· {message}", file=renderer.err, flush=True)
        if message == AGENT_LOST_TURN:
            return "lost", message
    elif event == "turn_end":
        return "end", ""
    return None


def cmd_agents(args: argparse.Namespace) -> int:
    agents = client(args).call("GET", "/agents")
    if args.json:
        print(json.dumps(agents, indent=2))
        return EXIT_OK
    print(f"{'AGENT':<42} {'STATUS':<10} {'TURNS':>5}  {'IDLE TIMEOUT':<12} EXIT ERROR")
    for agent in agents:
        idle = "off" if agent.get("idle_timeout_disabled") else \
            format_duration(agent.get("idle_timeout_seconds") or 0)
        print(f"{agent['id']:<42} {agent['status']:<10} {agent.get('turns_completed', 0):>5}  "
              f"{idle:<12} {agent.get('exit_error', '')}".rstrip())
    return EXIT_OK


def cmd_agent_new(args: argparse.Namespace) -> int:
    api = client(args)
    body: dict[str, Any] = {"prompt": args.prompt, "workdir": args.workdir,
                            "idle_timeout_seconds": args.idle_timeout}
    claude = {"model": args.model,
              "dangerously_skip_permissions": args.dangerously_skip_permissions or None}
    body["claude"] = {k: v for k, v in claude.items() if v} or None
    if args.no_idle_timeout:
        body["disable_idle_timeout"] = True
    agent = api.call("POST", "/agents", {k: v for k, v in body.items() if v})
    if args.json:
        print(json.dumps(agent), flush=True)
    elif not args.quiet and args.prompt:
        print(f"· agent {agent['id']} · session {agent['session_id']}", file=sys.stderr,
              flush=True)
    code = follow_turn(api, agent["id"], None, args.json, args.quiet) if args.prompt \
        else EXIT_OK
    if not args.json and (args.quiet or not args.prompt):  # the id alone on stdout
        print(agent["id"], flush=True)
    return code


def cmd_agent_send(args: argparse.Namespace) -> int:
    api = client(args)
    turn_id = send_turn(api, args.id, args.prompt)
    return follow_turn(api, args.id, turn_id, args.json)


def cmd_agent_show(args: argparse.Namespace) -> int:
    agent = client(args).call("GET", f"/agents/{args.id}")
    if args.json:
        print(json.dumps(agent, indent=2))
    else:
        for key, value in agent.items():
            print(f"{key + ':':<22} {value}")
    return EXIT_OK


def cmd_agent_stop(args: argparse.Namespace) -> int:
    client(args).call("DELETE", f"/agents/{args.id}")
    print(f"stopped {args.id}")
    return EXIT_OK


def add_client_commands(sub: Any) -> None:
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", help="daemon URL (default $STROMBOLI_URL or http://127.0.0.1:8080)")
    remote.add_argument("--token", help="bearer token (default $STROMBOLI_TOKEN)")
    remote.add_argument("--json", action="store_true", help="print raw JSON")

    def command(name: str, func: Callable, help_text: str, parent: Any = sub
                ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[remote], help=help_text, description=help_text,
                              epilog=EXIT_CODES_HELP)
        p.set_defaults(func=func)
        return p
    p = command("run", cmd_run, "run a prompt and stream the agent's output")
    p.add_argument("prompt")
    p.add_argument("--session", help="session id to use (with --resume/--continue/--fork)")
    p.add_argument("--resume", action="store_true", help="resume the session")
    p.add_argument("--continue", action="store_true", help="continue the session")
    p.add_argument("--fork", dest="fork_session", action="store_true",
                   help="fork the session into a new one")
    p.add_argument("--model", help="model alias or id (sonnet, opus, haiku, ...)")
    p.add_argument("--workdir", help="working directory inside the container")
    p.add_argument("--timeout", help="run timeout, e.g. 10m")
    p.add_argument("--image", help="agent image for this run")
    p.add_argument("--allowed-tools", help="comma-separated tools the agent may use")
    p.add_argument("--system-prompt", help="replace the system prompt")
    p.add_argument("--yes", dest="dangerously_skip_permissions", action="store_true",
                   help="let the agent use every tool without asking (skip permissions)")
    p = command("jobs", cmd_jobs, "list async jobs, show one, or follow its output")
    p.add_argument("id", nargs="?")
    p.add_argument("--follow", "-f", action="store_true", help="stream the job's output")
    p.add_argument("--status", help="only jobs in this state")
    p = command("cancel", cmd_cancel, "cancel a pending or running job (kills its container)")
    p.add_argument("id")
    p = command("sessions", cmd_sessions, "list sessions, or print one's conversation")
    p.add_argument("id", nargs="?")
    p = command("token", cmd_token, "mint an access token (needs a static token or JWT)")
    p.add_argument("client_id")
    command("health", cmd_health, "show the daemon's health")
    command("agents", cmd_agents, "list persistent agents")
    agent = sub.add_parser("agent", help="start a persistent agent, send it turns, show or "
                                         "stop it", description="A persistent agent: one "
                           "long-lived container whose turns reuse its warm CLI.")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True,
                                     metavar="{new,send,show,stop}")
    p = command("new", cmd_agent_new, "start an agent, with a prompt as its first turn "
                "(rendered until it ends); prints the agent's id", agent_sub)
    p.add_argument("prompt", nargs="?", default="")
    p.add_argument("--workdir", help="working directory inside the container")
    p.add_argument("--model", help="model alias or id (sonnet, opus, haiku, ...)")
    idle = p.add_mutually_exclusive_group()
    idle.add_argument("--idle-timeout", type=idle_timeout_arg, metavar="SECONDS",
                      help="exit after this long without a turn (seconds or e.g. 10m; "
                           "default 30m)")
    idle.add_argument("--no-idle-timeout", action="store_true",
                      help="never exit for idleness")
    p.add_argument("--yes", dest="dangerously_skip_permissions", action="store_true",
                   help="let the agent use every tool without asking (skip permissions)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print only the agent's id (after the first turn, if any, ended)")
    p = command("send", cmd_agent_send, "send a turn to an agent and render it until it ends",
                agent_sub)
    p.add_argument("id")
    p.add_argument("prompt")
    p = command("show", cmd_agent_show, "show an agent's status", agent_sub)
    p.add_argument("id")
    p = command("stop", cmd_agent_stop, "stop an agent (removes its container) and forget it",
                agent_sub)
    p.add_argument("id")


# ---------------------------------------------------------------------------
# main() — argument parsing and dispatch
# ---------------------------------------------------------------------------

def listening_socket(address: str) -> socket.socket:
    host, port = split_address(address)
    return socket.create_server((host, port), backlog=1024)


async def serve(cfg: Config) -> None:
    notifier = SystemdNotifier()
    raise_open_file_limit()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrorLog())
    app_state = Stromboli(cfg)
    await app_state.start()
    sockets = activated_sockets()
    handler_args = dict(access_log=None, shutdown_timeout=10,
                        keepalive_timeout=cfg.server_keepalive_timeout)
    runners = [web.AppRunner(build_app(app_state), handler_cancellation=True, **handler_args)]
    listeners = [(cfg.server_address, sockets[0] if sockets else None)]
    if cfg.metrics_enabled:
        runners.append(web.AppRunner(build_metrics_app(app_state), **handler_args))
        listeners.append((cfg.metrics_address, sockets[1] if len(sockets) > 1 else None))
    guard = ConnectionGuard(cfg, app_state.metrics)
    app_state.metrics.gauges["stromboli_open_connections"] = (
        "Open client connections (API and metrics listeners).", lambda: guard.open)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for runner, (address, sock) in zip(runners, listeners):
            await runner.setup()
            await GuardedSite(runner, sock or listening_socket(address), guard).start()
        where = "a systemd socket" if sockets else cfg.server_address
        log.info("Starting Stromboli 🌋", extra=fields(version=VERSION, address=where,
                                                       metrics=cfg.metrics_enabled and
                                                       cfg.metrics_address))
        if not cfg.auth_enabled:
            log.warning("Authentication disabled: every client can run agents")
        notifier.notify("READY=1", f"STATUS=serving on {where}")
        app_state.background.append(asyncio.ensure_future(
            notifier.watchdog_forever(app_state.status_line)))
        await stop.wait()
        log.info("shutting down")
        notifier.notify("STOPPING=1", "STATUS=stopping: letting runs finish")
        await app_state.drain(cfg.server_shutdown_grace)
    finally:
        # Stop taking requests first (in-flight runs are cancelled, which removes their
        # containers), then stop jobs and close Podman and the store.
        for runner in runners:
            await runner.cleanup()
        await app_state.stop()


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key.strip()] = value
    return overrides


def load_config(args: argparse.Namespace) -> Config:
    overrides = parse_overrides(args.set)
    for key, attr in (("server.address", "address"), ("server.state_dir", "state_dir"),
                      ("podman.url", "podman_url")):
        if getattr(args, attr, None):
            overrides[key] = getattr(args, attr)
    return Config.load(args.config, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    setup_logging(cfg)
    errors = cfg.validate()
    if errors:
        log.error("Failed to load configuration",
                  extra=fields(error="invalid configuration: " + "; ".join(errors)))
        return 1
    os.umask(0o077)  # the database, its WAL files and session homes are private
    asyncio.run(serve(cfg))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    rows = cfg.describe()
    width = max(len(key) for key, _, _ in rows)
    for key, env, value in rows:
        print(f"{key:<{width}}  {value}    ({env})")
    errors = cfg.validate()
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print("configuration is valid" if not errors else "configuration is INVALID",
          file=sys.stderr)
    return 1 if errors else 0


def cmd_image_build(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    reference = args.tag or cfg.default_image
    service = PodmanService(cfg)
    podman_api = Podman(service.resolve(), workers=2)
    started = time.monotonic()
    try:
        if args.offline:
            claude = args.claude_bin or find_claude_binary()
            if not claude:
                print("error: no claude binary found; install it with "
                      "`npm install -g @anthropic-ai/claude-code` or pass --claude-bin",
                      file=sys.stderr)
                return 1
            print(f"building {reference} offline from {claude}", file=sys.stderr)
            build_offline_image(podman_api, reference, claude)
        else:
            print(f"building {reference} from the embedded Containerfile", file=sys.stderr)
            build_registry_image(podman_api, reference)
    except (podman.errors.PodmanError, OSError) as exc:
        print(f"error: image build failed: {short_error(exc)}", file=sys.stderr)
        return 1
    finally:
        podman_api.close()
        service.stop()
    print(f"built {reference} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (default $STROMBOLI_CONFIG, "
                                         "/etc/stromboli/stromboli.toml)")
    common.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a setting by its TOML key, e.g. --set resources.memory=1g")
    common.add_argument("--state-dir", help="SQLite store folder")
    common.add_argument("--podman-url", help="Podman API URL")
    parser = argparse.ArgumentParser(
        prog="stromboli", parents=[common],
        description="Run the Claude Code CLI in Podman containers behind a REST API.")
    parser.add_argument("--version", action="version", version=f"stromboli {VERSION}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("serve", parents=[common], help="run the daemon (default)")
    p.add_argument("--address", help="API listen address, e.g. :8080")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", parents=[common],
                       help="print the effective configuration (secrets masked) and validate it")
    p.set_defaults(func=cmd_check_config)
    image = sub.add_parser("image", help="agent image commands")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    p = image_sub.add_parser("build", parents=[common], help="build the default agent image")
    p.add_argument("--offline", action="store_true",
                   help="assemble it from a local claude binary, without any registry")
    p.add_argument("--claude-bin", help="the claude binary for --offline")
    p.add_argument("--tag", help="image reference (default: the configured agent image)")
    p.set_defaults(func=cmd_image_build)
    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
        func = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------
# Data — the agent image's Containerfile and the OpenAPI viewer page
# ---------------------------------------------------------------------------

AGENT_CONTAINERFILE = """\
FROM docker.io/library/node:20-slim
RUN apt-get update && apt-get install -y --no-install-recommends git jq procps ca-certificates \\
 && rm -rf /var/lib/apt/lists/* \\
 && npm install -g @anthropic-ai/claude-code && npm cache clean --force \\
 && (userdel -r node || true) && useradd -m -u 1000 -s /bin/bash user \\
 && mkdir -p /workspace && chown user:user /workspace
ENV DISABLE_AUTOUPDATER=1
LABEL ai.stromboli.compatible="true" ai.stromboli.claude-cli="true" \\
      ai.stromboli.description="Default stromboli agent image"
USER user
WORKDIR /workspace
"""

SWAGGER_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Stromboli API</title><link rel="icon" href="data:,">
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1rem 1.5rem;
  color:#1d2330;background:#f7f8fa}
h1{margin:.2rem 0}h1 small,h2 small,.d{color:#5c6575;font-weight:normal}
h2{margin:1.5rem 0 .4rem;padding-bottom:.2rem;border-bottom:1px solid #d8dde6}
.bar{display:flex;gap:.5rem;margin:.8rem 0}.bar input{flex:1;padding:.35rem .5rem}
details.op{border:1px solid #d8dde6;border-radius:6px;margin:.3rem 0;background:#fff}
details.op>summary{padding:.4rem .6rem;display:flex;gap:.7rem;align-items:center}
.m{font:bold 12px monospace;color:#fff;border-radius:4px;padding:.15rem 0;width:4.4rem;
  text-align:center;flex:none}.get{background:#2f7dd1}.post{background:#2e9e5b}
.put{background:#c98a1a}.delete{background:#d14343}.patch{background:#7a4fc9}
.path{font:600 13px monospace}.lock{margin-left:auto;font-size:12px;color:#8a6d1a}
.in{padding:.2rem 1rem .8rem;border-top:1px solid #eef0f4}h4{margin:.7rem 0 .2rem;color:#39414f}
table{border-collapse:collapse;width:100%}summary{cursor:pointer}
td,th{text-align:left;vertical-align:top;padding:.25rem .5rem;border-bottom:1px solid #eef0f4}
code,.n,.t{font-family:monospace;font-size:13px}.t{color:#7a3e9d}.r{color:#d14343}
ul.s{list-style:none;margin:.1rem 0;padding-left:1.1rem;border-left:1px dotted #c5cbd6}
</style></head><body>
<h1 id="title">Stromboli API</h1>
<div id="desc" class="d">Loading <a href="doc.json">doc.json</a>…</div>
<div class="bar"><input id="q" type="search" placeholder="Filter by path, summary or tag">
<button id="all">Expand all</button></div><main id="ops"></main>
<script>
"use strict";
let doc;  // the document, once loaded
const el = (tag, cls, text) => Object.assign(document.createElement(tag),  // text, never HTML
  cls ? {className: cls} : {}, text == null ? {} : {textContent: String(text)});
const add = (parent, ...kids) => { kids.forEach(k => k && parent.append(k)); return parent; };
const deref = ref => ref.slice(2).split("/").reduce((o, k) => o && o[k], doc);
function typeOf(s) {
  if (!s) return "";
  if (s.$ref) return s.$ref.split("/").pop();
  if (s.allOf) return s.allOf.map(typeOf).join(" & ");
  if (s.type === "array") return typeOf(s.items) + "[]";
  if (s.enum) return (s.type || "") + " (" + s.enum.join(" | ") + ")";
  if (s.additionalProperties) return "map<string, " + typeOf(s.additionalProperties) + ">";
  return (s.type || "any") + (s.format ? " <" + s.format + ">" : "");
}
function target(s) {  // the object or enum schema that s ends in, or null
  for (let i = 0; s && i < 10; i++) {
    if (s.$ref) s = deref(s.$ref);
    else if (s.allOf) s = s.allOf[0];
    else if (s.type === "array") s = s.items;
    else return s.properties || s.enum ? s : null;
  }
  return null;
}
function tree(s) {  // an object's fields; nested objects expand on demand
  const t = target(s), ul = el("ul", "s");
  if (!t) return null;
  if (t.enum) return add(ul, el("li", "d", "one of: " + t.enum.join(", ")));
  const req = new Set(t.required || []);
  for (const [name, p] of Object.entries(t.properties)) {
    const line = [el("span", "n", name), req.has(name) ? el("span", "r", "*") : null,
      el("span", "t", "  " + typeOf(p)),
      el("span", "d", p.description ? "  — " + p.description : "")];
    if (!target(p)) { add(ul, add(el("li"), ...line)); continue; }
    const d = add(el("details"), add(el("summary"), ...line));
    d.addEventListener("toggle", () => d.open && d.childElementCount < 2 && add(d, tree(p)));
    add(ul, add(el("li"), d));
  }
  return ul;
}
function schemaBlock(s, open) {
  const t = tree(s), d = add(el("details"), add(el("summary"), el("code", "t", typeOf(s))), t);
  d.open = open;
  return t ? d : el("code", "t", typeOf(s));
}
function operation(method, path, op) {
  const sec = op.security || doc.security || [], d = el("details", "op");
  Object.assign(d, {id: method + "-" + path, title: op.tags.join(", ")});
  add(d, add(el("summary"), el("span", "m " + method, method.toUpperCase()),
    el("span", "path", path), el("span", "d", op.summary),
    sec.length ? el("span", "lock", "auth: " + Object.keys(sec[0]).join(", ")) : null));
  const body = add(el("div", "in"), el("p", null, op.description),
    el("div", "d", "Consumes: " + (op.consumes || ["—"]).join(", ") +
                   " · Produces: " + (op.produces || ["—"]).join(", ")));
  const params = (op.parameters || []).filter(p => p.in !== "body");
  if (params.length) {
    const tb = add(el("table"), add(el("tr"), ...["Name", "In", "Type", "Description"]
      .map(h => el("th", null, h))));
    for (const p of params) add(tb, add(el("tr"), add(el("td"), el("span", "n", p.name),
      p.required ? el("span", "r", "*") : null), el("td", "d", p.in), el("td", "t", typeOf(p)),
      el("td", null, p.description)));
    add(body, el("h4", null, "Parameters"), tb);
  }
  for (const p of (op.parameters || []).filter(p => p.in === "body"))
    add(body, el("h4", null, "Request body" + (p.required ? "" : " (optional)")),
      el("div", "d", p.description), schemaBlock(p.schema, true));
  const tb = add(el("table"), add(el("tr"), el("th", null, "Status"), el("th", null, "Response")));
  for (let [code, r] of Object.entries(op.responses || {})) {
    if (r.$ref) r = deref(r.$ref);
    const cell = add(el("td"), el("div", null, r.description),
      r.schema ? schemaBlock(r.schema, false) : null);
    for (const [h, v] of Object.entries(r.headers || {}))
      add(cell, el("div", "d", "Header " + h + ": " + typeOf(v) + " — " + (v.description || "")));
    add(tb, add(el("tr"), el("td", "n", code), cell));
  }
  return add(d, add(body, el("h4", null, "Responses"), tb));
}
function render() {
  document.title = doc.info.title + " " + doc.info.version;
  add(document.getElementById("title"), el("small", null, " " + doc.info.version));
  const desc = document.getElementById("desc");
  desc.textContent = doc.info.description + " Base path " + doc.basePath + ". ";
  add(desc, Object.assign(el("a", null, "Raw doc.json"), {href: "doc.json"}));
  const tags = doc.tags || [], groups = new Map(tags.map(t => [t.name, []]));
  for (const [path, item] of Object.entries(doc.paths))
    for (const [method, op] of Object.entries(item)) {
      const tag = (op.tags || ["other"])[0];
      groups.set(tag, (groups.get(tag) || []).concat(operation(method, path, op)));
    }
  const main = document.getElementById("ops");
  for (const [tag, ops] of groups) {
    const info = tags.find(t => t.name === tag) || {};
    if (ops.length) add(main, add(el("section"), add(el("h2", null, tag + " "),
      el("small", null, info.description)), ...ops));
  }
  const models = add(el("section"), el("h2", null, "Models"));
  for (const name of Object.keys(doc.definitions || {}).sort()) {
    const s = {$ref: "#/definitions/" + name};
    add(models, add(el("details", "op"), add(el("summary"), el("span", "path", name),
      el("span", "d", deref(s.$ref).description)), add(el("div", "in"), tree(s))));
  }
  add(main, models);
  const hit = document.getElementById(decodeURIComponent(location.hash.slice(1)));
  if (hit) { hit.open = true; hit.scrollIntoView(); }
}
document.getElementById("q").addEventListener("input", e => {
  const q = e.target.value.trim().toLowerCase();
  document.querySelectorAll("#ops section").forEach(sec => {
    const ops = [...sec.querySelectorAll("details.op")];
    ops.forEach(d => {
      d.hidden = !(d.title + " " + d.firstChild.textContent).toLowerCase().includes(q);
    });
    sec.hidden = ops.every(d => d.hidden);
  });
});
document.getElementById("all").addEventListener("click", e => {
  const open = e.target.textContent === "Expand all";
  document.querySelectorAll("details.op").forEach(d => { d.open = open; });
  e.target.textContent = open ? "Collapse all" : "Expand all";
});
fetch("doc.json").then(r => r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status)))
  .then(d => { doc = d; render(); })
  .catch(err => { document.getElementById("desc").textContent = "Cannot load doc.json: " + err; });
</script></body></html>
"""


if __name__ == "__main__":
    sys.exit(main())
