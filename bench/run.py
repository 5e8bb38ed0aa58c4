#!/usr/bin/env python3
"""clipal benchmark harness: DIRECT vs CLIPAL vs NGINX (and FLOOR), all on loopback.

    /work/venv/bin/python bench/run.py [--quick] [--only a,b,b2,c,agent,idle,startup]
                                       [--targets direct,clipal,floor,nginx] [--out bench/out]
                                       [--clipal-cmd CMD] [--nginx-body-buffer 2m] [--strict]

Starts a fast fake upstream (bench/upstream.js, Node), then for each target in
turn starts it (clipal as a subprocess, nginx from a generated config), runs
the same load against it (wrk when installed, else bench/client.js; the SSE,
upload and precise-latency clients are always bench/client.js), samples the
proxy's CPU and RSS from /proc during every phase, and stops it again.  Prints
a side-by-side table with ratios against DIRECT, PASS/FAIL lines for the
targets clipal must meet, and writes results.json and results.md into --out.

FLOOR (opt-in, `--targets direct,clipal,floor,nginx`) is bench/floor.py: the
same Flask + gevent + requests stack with nothing of clipal on it, so that a
run also says what clipal costs above the stack it is built on.

Besides the request-path phases (a, b, b2, c): `agent` (Claude Code-like
sessions: large JSON bodies answered with ~2 s streams, TTFB added over
DIRECT), `idle` (wakeups and CPU per minute with no traffic; clipal with its
inotify and its poll config watcher) and `startup` (`clipal --version`, exec ->
first 200 on /health).

Standard library only; see bench/README.md.  Every phase has a count, a
deadline inside the client and a hard timeout here; every process started is
ended by PID (process group) on exit, on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

TARGETS = ("DIRECT", "CLIPAL", "FLOOR", "NGINX")
#: The Bearer key every load client sends (an access token with --access-tokens; stripped otherwise).
CLIENT_TOKEN = "sk-client-bench-token"
NGINX_WORKERS = 1  # clipal is one process; nginx gets one worker too (2 cores are shared with load + upstream)

CHAT_PATH = "/v1/chat/completions"
STREAM_PATH = "/v1/stream"
UPLOAD_PATH = "/v1/upload"
CHAT_BODY = b'{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"stream":false}'

# phase key -> (group used by --only, human label)
PHASES = {
    "a1": ("a", "small POST, c=1 (load tool)"),
    "a64": ("a", "small POST, c=64 (load tool)"),
    "lat": ("a", "small POST, sequential on one keep-alive connection"),
    "b": ("b", "200 concurrent SSE streams, 50 events 20 ms apart"),
    "b2": ("b2", "1000 concurrent SSE streams, 10 events 50 ms apart"),
    "c1": ("c", "20 x 10 MiB uploads, sequential (one connection)"),
    "c4": ("c", "20 x 10 MiB uploads, concurrency 4"),
    "agent": ("agent", "Claude Code-like sessions: 50 KB / 300 KB / 1.5 MB JSON bodies, each answered "
                       "with a ~2 s SSE stream (40 events 50 ms apart), 1, 8 and 32 keep-alive sessions"),
    "idle": ("idle", "no traffic for 60 s (quick 20 s) after a settle: CPU and voluntary context switches "
                     "per minute (clipal: inotify and poll config watcher)"),
    "startup": ("startup", "clipal --version wall time and exec -> first 200 on GET /health, median of 10"),
}
AGENT_PATH = "/v1/messages"
#: (label, bytes) of the agent phase's request bodies
AGENT_SIZES = (("50K", 50_000), ("300K", 300_000), ("1.5M", 1_500_000))
#: sessions -> requests per session, full and --quick
AGENT_PLAN = {1: 15, 8: 6, 32: 3}
AGENT_PLAN_QUICK = {1: 5, 8: 2, 32: 1}
AGENT_EVENTS, AGENT_INTERVAL_MS = 40, 50
STARTUP_RUNS = 10


class NotRunnable(Exception):
    """A target that could not be started or did not answer correctly."""


# ------------------------------------------------------------------ processes --

class Processes:
    """Every child we start, so that all of them are ended, by process group."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def popen(self, cmd, **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)  # own group: kill it and its children by PGID
        p = subprocess.Popen(cmd, **kw)
        with self.lock:
            self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 5.0, sig=signal.SIGTERM) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may still hold children (nginx workers) even after the leader exits.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            pass
        with self.lock:
            if p in self.procs:
                self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(reversed(self.procs)):
            self.stop(p, grace=3.0)


PROCS = Processes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    want = max(soft, min(want, 1 << 20))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        want = soft
    return want


def tool_version(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unavailable ({e.__class__.__name__})"


# ----------------------------------------------------------------- /proc stats --

def proc_tree(root: int) -> list[int]:
    """root and all its descendants (from /proc/*/stat ppid fields)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return None
    fields = st[st.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB  # resident pages == VmRSS
    except OSError:
        return 0


def task_ids(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def watcher_fds(pids: list[int]) -> list[str]:
    """The anon-inode descriptors (inotify, eventfd, ...) the processes hold, to show the watcher mode."""
    kinds = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("anon_inode:"):
                kinds.append(link[len("anon_inode:"):].strip("[]"))
    return sorted(kinds)


class Sampler:
    """CPU seconds (delta over the phase) and peak summed RSS (sampled every 20 ms)."""

    def __init__(self, proxy_pids: list[int], upstream_pid: int | None, interval: float = 0.02):
        self.pids = proxy_pids
        self.upstream_pid = upstream_pid
        self.interval = interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self, pids):
        return {p: cpu_seconds(p) for p in pids}

    def _run(self):
        while not self._stop.is_set():
            if self.pids:
                self.peak_kb = max(self.peak_kb, sum(rss_kb(p) for p in self.pids))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self.t0 = time.monotonic()
        self.cpu0 = self._cpu(self.pids)
        self.up0 = cpu_seconds(self.upstream_pid) if self.upstream_pid else None
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.wall = time.monotonic() - self.t0
        cpu1 = self._cpu(self.pids)
        self.cpu = sum((cpu1[p] - self.cpu0[p]) for p in self.pids
                       if cpu1.get(p) is not None and self.cpu0.get(p) is not None)
        up1 = cpu_seconds(self.upstream_pid) if self.upstream_pid else None
        self.upstream_cpu = (up1 - self.up0) if (up1 is not None and self.up0 is not None) else None
        return False

    def result(self) -> dict:
        r = {"wall_s": round(self.wall, 3),
             "upstream_cpu_s": None if self.upstream_cpu is None else round(self.upstream_cpu, 2)}
        if self.pids:
            r.update(proxy_cpu_s=round(self.cpu, 2), proxy_peak_rss_mb=round(self.peak_kb / 1024, 1),
                     proxy_processes=len(self.pids), rss_samples=self.samples)
        return r


# -------------------------------------------------------------------- targets --

class Target:
    def __init__(self, name: str, port: int, prefix: str = "", proc: subprocess.Popen | None = None,
                 agent_prefix: str = ""):
        self.name, self.port, self.prefix, self.proc = name, port, prefix, proc
        self.agent_prefix = agent_prefix  # clipal: /claudecode (the agent phase's Anthropic-style path)
        self.notes: dict = {}

    def pids(self) -> list[int]:
        return proc_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def path(self, p: str) -> str:
        return self.prefix + p


def http_call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 5.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_TOKEN}"} if body else {}
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def wait_health(port: int, path: str, proc: subprocess.Popen, timeout: float, errlog: Path | None):
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = ""
            if errlog and errlog.exists():
                lines = [ln for ln in errlog.read_text(errors="replace").splitlines() if ln.strip()]
                tail = lines[-1][:300] if lines else ""
            raise NotRunnable(f"exited with status {proc.returncode}" + (f": {tail}" if tail else ""))
        try:
            status, _, _ = http_call(port, "GET", path, timeout=1.0)
            if status == 200:
                return
            last = f"GET {path} -> {status}"
        except OSError as e:
            last = f"GET {path}: {e.__class__.__name__}"
        time.sleep(0.05)
    raise NotRunnable(f"no 200 from GET {path} within {timeout:.0f} s ({last})")


def smoke(t: Target) -> None:
    """One real request through the target before loading it."""
    try:
        status, headers, body = http_call(t.port, "POST", t.path(CHAT_PATH), CHAT_BODY)
    except OSError as e:
        raise NotRunnable(f"smoke POST {t.path(CHAT_PATH)} failed: {e}")
    if status != 200 or b"chat.completion" not in body:
        raise NotRunnable(f"smoke POST {t.path(CHAT_PATH)} -> {status} {body[:200]!r}")
    t.notes["smoke_headers"] = headers
    if t.name == "CLIPAL":
        t.notes["x_clipal_provider"] = headers.get("x-clipal-provider")


def ready_or_stopped(t: Target, errlog: Path | None) -> Target:
    """Wait until a proxy target is healthy and answers the smoke request; stop it if it never does."""
    try:
        wait_health(t.port, "/health", t.proc, 15.0, errlog)
        smoke(t)
    except NotRunnable:
        PROCS.stop(t.proc)
        raise
    return t


#: How the harness starts clipal when --clipal-cmd is not given (the same placeholders).
DEFAULT_CLIPAL_CMD = "{python} -m clipal --config-dir {config_dir} --port {port} --log-level error"


def write_clipal_config(args, up_port: int, tmp_root: Path) -> Path:
    """A fresh config dir: codex.yaml and claude-code.yaml (one provider each, the upstream) and config.yaml."""
    cfg = Path(tempfile.mkdtemp(prefix="clipal-bench-", dir=tmp_root))
    # --keys N: the provider has N keys (api_keys); the first one always answers.
    keys = ("    api_key: sk-bench-key\n" if args.keys <= 1 else
            "    api_keys: [" + ", ".join(f"sk-bench-key-{i}" for i in range(1, args.keys + 1)) + "]\n")
    provider = ("providers:\n"
                "  - name: bench\n"
                f"    base_url: http://127.0.0.1:{up_port}\n" + keys)
    (cfg / "codex.yaml").write_text(provider)
    (cfg / "claude-code.yaml").write_text(provider)  # the agent phase: /claudecode/v1/messages
    settings = "log_stdout: false\nmax_request_body_bytes: 33554432\n"
    if args.access_tokens:  # the load clients send this token as their Bearer key
        settings += f"access_tokens: [{CLIENT_TOKEN}]\n"
    (cfg / "config.yaml").write_text(settings + (args.config_extra.replace("\\n", "\n") + "\n"
                                                 if args.config_extra else ""))
    for f in cfg.iterdir():
        f.chmod(0o600)
    return cfg


def clipal_command(args, cfg: Path, port: int) -> list[str]:
    """The command that starts clipal: --clipal-cmd (or the default), placeholders filled in."""
    template = args.clipal_cmd or DEFAULT_CLIPAL_CMD
    fmt = {"config_dir": str(cfg), "port": port, "python": args.python}
    if "{port}" in template:
        return [part.format(**fmt) for part in shlex.split(template)]
    return ([part.format(**fmt) for part in shlex.split(template)]
            + ["--config-dir", str(cfg), "--port", str(port), "--log-level", "error"])


def clipal_cwd(cfg: Path) -> str:
    """clipal's working directory: not the repository. `python -m` puts the working directory first on
    sys.path, ahead of PYTHONPATH, so from REPO a `--clipal-cmd "env PYTHONPATH=/older/checkout ..."`
    would silently run this checkout's clipal. The default command finds REPO through PYTHONPATH."""
    return str(cfg.parent)


def clipal_env(cfg: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["CLIPAL_CONFIG_DIR"] = str(cfg)  # for commands without --config-dir (gunicorn)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # As installed by pip, which compiles the bytecode: a shell that sets PYTHONDONTWRITEBYTECODE
    # would otherwise have every start compile clipal's modules from source again.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra or {})
    return env


def start_clipal(args, up_port: int, out: Path, tmp_root: Path, env_extra: dict | None = None,
                 log_name: str = "clipal.log") -> Target:
    cfg = write_clipal_config(args, up_port, tmp_root)
    port = free_port()
    cmd = clipal_command(args, cfg, port)
    env = clipal_env(cfg, env_extra)
    errlog = out / log_name
    log = open(errlog, "wb")
    try:
        proc = PROCS.popen(cmd, cwd=clipal_cwd(cfg), env=env, stdin=subprocess.DEVNULL, stdout=log,
                           stderr=subprocess.STDOUT)
    except OSError as e:
        raise NotRunnable(f"cannot execute {cmd[0]}: {e}")
    finally:
        log.close()
    t = Target("CLIPAL", port, "/codex", proc, agent_prefix="/claudecode")
    t.notes.update(command=" ".join(shlex.quote(c) for c in cmd), config_dir=str(cfg), log=str(errlog))
    if env_extra:
        t.notes["env"] = dict(env_extra)
    else:  # the main instance: say which clipal package the command imports
        probe = clipal_module_probe(args, cfg)
        if probe:
            _, status, first = timed_run(probe, env, clipal_cwd(cfg))
            t.notes["clipal_module"] = first if status == 0 else f"probe failed (exit {status})"
    return ready_or_stopped(t, errlog)


def start_floor(args, up_port: int, out: Path, tmp_root: Path) -> Target:
    """bench/floor.py with the config dir clipal gets (it reads the upstream from codex.yaml)."""
    cfg = write_clipal_config(args, up_port, tmp_root)
    port = free_port()
    cmd = [args.python, str(HERE / "floor.py"), "--config-dir", str(cfg), "--port", str(port)]
    errlog = out / "floor.log"
    log = open(errlog, "wb")
    try:
        proc = PROCS.popen(cmd, cwd=clipal_cwd(cfg), env=clipal_env(cfg, None), stdin=subprocess.DEVNULL,
                           stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    t = Target("FLOOR", port, "/codex", proc, agent_prefix="/claudecode")
    t.notes.update(command=" ".join(shlex.quote(c) for c in cmd), log=str(errlog))
    return ready_or_stopped(t, errlog)


def nginx_conf(port: int, up_port: int, prefix: Path, out: Path, body_buffer: str = "2m") -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "\n".join(f"    {k}_temp_path {prefix}/{k}_temp;" for k in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# generated by bench/run.py
{user}worker_processes {NGINX_WORKERS};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {out}/nginx-error.log warn;
worker_rlimit_nofile 16384;

events {{
    worker_connections 8192;
    multi_accept on;
}}

http {{
    access_log {out}/nginx-access.log combined buffer=256k flush=1s;
{temps}
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    client_max_body_size 0;
    tcp_nodelay on;

    upstream bench_upstream {{
        server 127.0.0.1:{up_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 120s;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 120s;
            proxy_send_timeout 120s;
        }}
        # The agent phase (Claude Code-like bodies up to 1.5 MB): nginx's default request
        # buffering stays on, so nginx reads the whole body (in memory up to
        # client_body_buffer_size, else into a file under client_body_temp_path) before it
        # picks an upstream connection and sends the request on. With nginx's default 16k
        # buffer the body goes to a temp file and out in 8 KB writes on an upstream socket
        # without TCP_NODELAY: the last short write waits for a delayed ACK, ~40 ms
        # (--nginx-body-buffer 16k shows it); 2m keeps these bodies in memory, one writev.
        location /v1/messages {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            client_max_body_size 32m;
            client_body_buffer_size {body_buffer};
            proxy_read_timeout 120s;
            proxy_send_timeout 120s;
        }}
    }}
}}
"""


def start_nginx(args, up_port: int, out: Path) -> Target:
    exe = args.nginx or shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not exe or not os.access(exe, os.X_OK):
        raise NotRunnable(f"nginx not installed{' at ' + exe if exe else ''} (apt-get install -y nginx)")
    prefix = out / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(port, up_port, prefix, out, args.nginx_body_buffer))
    errlog = out / "nginx-error.log"
    cmd = [exe, "-p", str(prefix), "-c", str(conf), "-e", str(errlog)]
    log = open(out / "nginx-stderr.log", "wb")
    try:
        proc = PROCS.popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    t = Target("NGINX", port, "", proc)
    t.notes.update(command=" ".join(cmd), conf=str(conf), worker_processes=NGINX_WORKERS)
    return ready_or_stopped(t, errlog)


def start_upstream(args, out: Path) -> tuple[subprocess.Popen, int]:
    log = open(out / "upstream.log", "wb")
    proc = PROCS.popen([args.node, str(HERE / "upstream.js"), "--port", "0", "--watch-stdin"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    log.close()
    deadline = time.monotonic() + 10
    line = b""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        if proc.poll() is not None:
            break
        if sel.select(timeout=0.1):
            ch = os.read(proc.stdout.fileno(), 64)
            if not ch:
                break
            line += ch
    sel.close()
    if not line.startswith(b"READY "):
        raise SystemExit(f"upstream did not start: {line!r} (see {out / 'upstream.log'})")
    return proc, int(line.split()[1])


# --------------------------------------------------------------------- phases --

def run_client(cmd: list[str], timeout: float, label: str) -> dict:
    """Run one load client in its own process group; parse its JSON answer."""
    p = PROCS.popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        PROCS.stop(p, grace=1.0, sig=signal.SIGKILL)
        return {"error": f"{label}: killed after {timeout:.0f} s"}
    finally:
        if p.poll() is None:
            PROCS.stop(p, grace=1.0)
        else:
            PROCS.stop(p, grace=0)
    text = out.decode(errors="replace")
    if p.returncode != 0:
        return {"error": f"{label}: exit {p.returncode}: {err.decode(errors='replace').strip()[-300:]}"}
    for line in text.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON "):])
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"{label}: no result in output: {text[-300:]!r} {err.decode(errors='replace')[-300:]!r}"}


def node_client(args, cfg: dict, timeout: float, label: str) -> dict:
    return run_client([args.node, str(HERE / "client.js"), json.dumps(cfg)], timeout, label)


def load_phase(args, t: Target, conns: int, duration: float) -> dict:
    """Small POST with `conns` keep-alive connections for `duration` s: wrk, else client.js."""
    if args.wrk:
        threads = 1 if conns < 4 else 2
        url = f"http://127.0.0.1:{t.port}{t.path(CHAT_PATH)}"
        r = run_client([args.wrk, f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "5s",
                        "-s", str(HERE / "wrk_post.lua"), url], duration + 20, "wrk")
        if "error" in r:
            return r
        secs = r["duration_us"] / 1e6
        errors = sum(r[k] for k in r if k.startswith("errors_"))
        return {"tool": f"wrk -t{threads} -c{conns} -d{duration}s", "requests": int(r["requests"]),
                "rps": round(r["requests"] / secs, 1), "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
                "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000, "errors": int(errors),
                "errors_detail": {k[7:]: int(v) for k, v in r.items() if k.startswith("errors_") and v}}
    r = node_client(args, {"mode": "load", "port": t.port, "path": t.path(CHAT_PATH),
                           "connections": conns, "duration_s": duration}, duration + 20, "client.js load")
    if "error" not in r:
        r["tool"] = f"client.js load c={conns} {duration}s"
    return r


def run_phase(args, key: str, t: Target, up_pid: int, ctx: dict | None = None) -> dict:
    q = args.quick
    ctx = ctx or {}
    if key == "agent":
        return agent_phase(args, t, up_pid)
    if key == "idle":
        return idle_phase(args, t, ctx)
    if key == "startup":
        return startup_phase(args, t, ctx)
    if key == "a1":
        fn = lambda: load_phase(args, t, 1, 2 if q else 5)  # noqa: E731
    elif key == "a64":
        fn = lambda: load_phase(args, t, 64, 3 if q else 10)  # noqa: E731
    elif key == "lat":
        fn = lambda: run_client([sys.executable, str(HERE / "latency.py"), "--port", str(t.port),  # noqa: E731
                                 "--path", t.path(CHAT_PATH), "--count", "2000", "--warmup", "200",
                                 "--deadline", "10" if q else "20"], 40, "latency.py")
    elif key == "b":
        fn = lambda: node_client(args, {"mode": "sse", "port": t.port, "path": t.path(STREAM_PATH),  # noqa: E731
                                        "streams": 200, "events": 50, "interval_ms": 20, "deadline_s": 20}, 40, "sse")
    elif key == "b2":
        fn = lambda: node_client(args, {"mode": "sse", "port": t.port, "path": t.path(STREAM_PATH),  # noqa: E731
                                        "streams": 1000, "events": 10, "interval_ms": 50, "deadline_s": 30}, 50, "sse")
    elif key == "c1":
        fn = lambda: node_client(args, {"mode": "upload", "port": t.port, "path": t.path(UPLOAD_PATH),  # noqa: E731
                                        "count": 20, "size": 10 << 20, "concurrency": 1,
                                        "deadline_s": 30 if q else 45}, 60, "upload")
    elif key == "c4":
        fn = lambda: node_client(args, {"mode": "upload", "port": t.port, "path": t.path(UPLOAD_PATH),  # noqa: E731
                                        "count": 20, "size": 10 << 20, "concurrency": 4, "deadline_s": 45}, 60, "upload")
    else:
        raise KeyError(key)
    with Sampler(t.pids(), up_pid) as s:
        r = fn()
    r["resources"] = s.result()
    return r


def settle(t: Target, seconds: float) -> None:
    time.sleep(seconds)


# ---- agent: Claude Code-like sessions --

def agent_phase(args, t: Target, up_pid: int) -> dict:
    """Each body size x each session count, one client.js run (and one /proc sample) each."""
    plan = AGENT_PLAN_QUICK if args.quick else AGENT_PLAN
    path = t.agent_prefix + AGENT_PATH
    stream_s = AGENT_EVENTS * AGENT_INTERVAL_MS / 1000
    runs = {}
    for label, size in AGENT_SIZES:
        for sessions, per in plan.items():
            key = f"{label}/s{sessions}"
            budget = per * (stream_s + 3) + 15  # client deadline; the hard timeout is 15 s later
            with Sampler(t.pids(), up_pid) as smp:
                r = node_client(args, {"mode": "agent", "port": t.port, "path": path, "sessions": sessions,
                                       "requests": per, "size": size, "events": AGENT_EVENTS,
                                       "interval_ms": AGENT_INTERVAL_MS, "deadline_s": budget},
                                budget + 15, "agent")
            r["resources"] = smp.result()
            runs[key] = r
            if "error" in r:
                print(f"         agent {key:<9} {r['error']}", flush=True)
            else:
                fail = f" fail {r['failure_reasons']}" if r["failed"] else ""
                print(f"         agent {key:<9} {r['completed']}/{r['requests']} ok, ttfb p50 {r['ttfb_ms']['p50']} "
                      f"p99 {r['ttfb_ms']['p99']} ms, total p50 {r['total_ms']['p50']} ms, "
                      f"{r['connections']} conn{fail}", flush=True)
            time.sleep(0.3)
    ok = [r for r in runs.values() if "error" not in r]
    return {"path": path, "plan": {str(k): v for k, v in plan.items()}, "sizes": dict(AGENT_SIZES),
            "events": AGENT_EVENTS, "interval_ms": AGENT_INTERVAL_MS, "runs": runs,
            "requests": sum(r["requests"] for r in ok), "completed": sum(r["completed"] for r in ok),
            "body_ok": sum(r["body_ok"] for r in ok),
            "errors": [f"{k}: {r['error']}" for k, r in runs.items() if "error" in r]}


# ---- idle: no traffic --

IDLE_PAUSE_S = 3.0  # after the settle requests, before the window opens


def idle_settle(t: Target) -> None:
    """A few requests through the target (both paths), so that it is past its first-request work."""
    for _ in range(5):
        http_call(t.port, "POST", t.path(CHAT_PATH), CHAT_BODY)
    body = json.dumps({"model": "bench-model", "max_tokens": 16, "stream": True,
                       "messages": [{"role": "user", "content": "settle"}]}).encode()
    http_call(t.port, "POST", t.agent_prefix + AGENT_PATH + "?events=6&interval=1", body)


def _thread_counters(pid: int) -> dict[str, tuple[int | None, int]]:
    """Per thread of pid: (schedstat CPU ns or None, voluntary context switches)."""
    counters = {}
    for tid in task_ids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                vol = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches:"))
        except (OSError, StopIteration, ValueError):
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns: int | None = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            ns = None
        counters[tid] = (ns, vol)
    return counters


def _idle_snapshot(pids: list[int]) -> dict[int, tuple]:
    snap = {}
    for p in pids:
        cpu = cpu_seconds(p)
        if cpu is not None:
            snap[p] = (cpu, _thread_counters(p))
    return snap


def _thread_deltas(before: dict, after: dict) -> tuple[int | None, int, int]:
    """(CPU ns, voluntary switches, threads gone) over the threads alive at both ends.

    A thread that ends inside the window (gevent's resolver thread, say) takes
    its counters with it; summed as a whole, the process would seem to have
    run backwards.
    """
    both = [tid for tid in before if tid in after]
    ns = None if any(before[t][0] is None or after[t][0] is None for t in both) else \
        sum(after[t][0] - before[t][0] for t in both)
    return ns, sum(after[t][1] - before[t][1] for t in both), len([t for t in before if t not in after])


def idle_window(targets: dict[str, Target], seconds: float) -> dict:
    """CPU and voluntary context switches of each target's process tree over one quiet window."""
    time.sleep(IDLE_PAUSE_S)
    before = {name: _idle_snapshot(t.pids()) for name, t in targets.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    out = {}
    for name, t in targets.items():
        b = before[name]
        a = _idle_snapshot(list(b))
        both = [p for p in b if p in a]  # a process that exits in the window drops out of both ends
        per_min = 60.0 / wall
        cpu = sum(a[p][0] - b[p][0] for p in both)  # utime+stime of the process: ended threads included
        deltas = [_thread_deltas(b[p][1], a[p][1]) for p in both]
        ns = None if any(d[0] is None for d in deltas) else sum(d[0] for d in deltas)
        vol = sum(d[1] for d in deltas)
        out[name] = {
            "window_s": round(wall, 2), "pids": both, "threads": sum(len(task_ids(p)) for p in both),
            "exited_during_window": [p for p in b if p not in a],
            "new_since_window": [p for p in t.pids() if p not in b],
            "cpu_ms_per_min": round(cpu * 1000 * per_min, 2),  # utime+stime, whole clock ticks
            "cpu_ms_per_min_schedstat": None if ns is None else round(ns / 1e6 * per_min, 3),
            "wakeups_per_min": round(vol * per_min, 1),  # voluntary context switches
            "threads_ended_during_window": sum(d[2] for d in deltas),
            "anon_fds": watcher_fds(both),
        }
        if t.notes.get("env"):
            out[name]["env"] = t.notes["env"]
    return out


def idle_phase(args, t: Target, ctx: dict) -> dict:
    """NGINX: the running target.  CLIPAL: two fresh instances started as the harness starts clipal,
    CLIPAL_WATCH_MODE=inotify and =poll, measured over the same window (the main one idles too)."""
    seconds = 20.0 if args.quick else 60.0
    if t.name != "CLIPAL":
        idle_settle(t)
        return {"window_s": seconds, "modes": idle_window({"default": t}, seconds)}
    insts: dict[str, Target] = {}
    try:
        for mode in ("inotify", "poll"):
            try:
                insts[mode] = start_clipal(args, ctx["up_port"], ctx["out"], ctx["tmp_root"],
                                           env_extra={"CLIPAL_WATCH_MODE": mode}, log_name=f"clipal-idle-{mode}.log")
            except NotRunnable as e:
                return {"error": f"clipal ({mode} watcher) not runnable: {e}"}
        for inst in insts.values():
            idle_settle(inst)
        return {"window_s": seconds, "modes": idle_window(insts, seconds)}
    finally:
        for inst in insts.values():
            PROCS.stop(inst.proc)


# ---- startup: --version and exec -> first /health 200 --

_STRIP_OPTS = ("--config-dir", "--port", "--log-level")


def console_script(args) -> Path | None:
    for d in (Path(args.python).parent, REPO / ".venv" / "bin"):
        p = d / "clipal"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def version_commands(args, cfg: Path) -> tuple[list[tuple[str, list[str]]], str]:
    """[(label, argv)] for `clipal --version` from the clipal command template: `{python} -m clipal`
    as given, and the console script in its place; the --config-dir/--port/--log-level options dropped."""
    template = shlex.split(args.clipal_cmd or DEFAULT_CLIPAL_CMD)
    if any(Path(x).name.startswith(("gunicorn", "uwsgi")) for x in template):
        return [], "the clipal command is not clipal's own CLI (no --version to time)"
    variants = [("python -m clipal" if " ".join(template).find("{python} -m clipal") >= 0 else "clipal-cmd", template)]
    for i in range(len(template) - 2):
        if template[i] == "{python}" and template[i + 1:i + 3] == ["-m", "clipal"]:
            script = console_script(args)
            if script:
                variants.append(("console script", template[:i] + [str(script)] + template[i + 3:]))
            break
    fmt = {"config_dir": str(cfg), "port": 0, "python": args.python}
    out = []
    for label, toks in variants:
        argv, skip = [], False
        for tok in (x.format(**fmt) for x in toks):
            if skip:
                skip = False
                continue
            if tok in _STRIP_OPTS:
                skip = True
                continue
            if tok.startswith(tuple(o + "=" for o in _STRIP_OPTS)):
                continue
            argv.append(tok)
        out.append((label, argv + ["--version"]))
    return out, ""


def clipal_module_probe(args, cfg: Path) -> list[str] | None:
    """The clipal command with `-m clipal ...` replaced by a print of clipal.__file__ (None when the
    command does not run `{python} -m clipal`)."""
    template = shlex.split(args.clipal_cmd or DEFAULT_CLIPAL_CMD)
    for i in range(len(template) - 2):
        if template[i] == "{python}" and template[i + 1:i + 3] == ["-m", "clipal"]:
            head = [x.format(config_dir=str(cfg), port=0, python=args.python) for x in template[:i + 1]]
            return head + ["-c", "import clipal; print(clipal.__file__)"]
    return None


def timed_run(cmd: list[str], env: dict, cwd: str, timeout: float = 15.0) -> tuple[float, int, str]:
    """Wall time exec -> exit of one command (own process group), its status and first output line."""
    t0 = time.perf_counter()
    p = PROCS.popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=timeout)
        dt = time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return timeout, -1, f"killed after {timeout:.0f} s"
    finally:
        PROCS.stop(p, grace=1.0)
    text = out.decode(errors="replace").strip()
    return dt, p.returncode, text.splitlines()[0] if text else ""


def health_ok(port: int) -> bool:
    """One GET /health with a local Host header on a fresh connection: a 200?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3.0) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port)
            head = s.recv(64)
    except OSError:
        return False
    parts = head.split(b" ", 2)
    return len(parts) >= 2 and parts[1] == b"200"


STOP_TIMES: list[float] = []  # SIGTERM -> exit of each exec_to_health process (informational)


def exec_to_health(cmd: list[str], env: dict | None, cwd: str, port: int, log_path: Path,
                   timeout: float = 10.0) -> float:
    """Seconds from exec to the first 200 on GET /health (polled every 2 ms); the process is stopped after
    (SIGTERM to its group; the time until it exits goes to STOP_TIMES)."""
    log = open(log_path, "ab")
    try:
        t0 = time.perf_counter()
        p = PROCS.popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    try:
        while True:
            if health_ok(port):
                return time.perf_counter() - t0
            if p.poll() is not None:
                raise NotRunnable(f"exited with status {p.returncode} before /health answered (see {log_path})")
            if time.perf_counter() - t0 > timeout:
                raise NotRunnable(f"no 200 from /health within {timeout:.0f} s")
            time.sleep(0.002)
    finally:
        t1 = time.perf_counter()
        alive = p.poll() is None
        PROCS.stop(p)
        if alive:
            STOP_TIMES.append(time.perf_counter() - t1)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _timings(xs: list[float]) -> dict:
    return {"median_s": round(_median(xs), 4), "min_s": round(min(xs), 4), "max_s": round(max(xs), 4),
            "runs_s": [round(x, 4) for x in xs]}


def startup_phase(args, t: Target, ctx: dict) -> dict:
    out: dict = {"runs": STARTUP_RUNS}
    up_port, odir = ctx["up_port"], ctx["out"]
    if t.name == "CLIPAL":
        cfg = write_clipal_config(args, up_port, ctx["tmp_root"])  # the same config dir for every run
        env = clipal_env(cfg)
        cmds, why = version_commands(args, cfg)
        out["version"] = {}
        if why:
            out["version_note"] = why
        for label, cmd in cmds:
            times, status, first = [], None, ""
            for _ in range(STARTUP_RUNS):
                dt, status, first = timed_run(cmd, env, clipal_cwd(cfg))
                if status != 0:
                    break
                times.append(dt)
            entry = {"command": " ".join(shlex.quote(c) for c in cmd), "output": first}
            if status != 0:
                entry["error"] = f"exit {status}: {first[:200]}"
            else:
                entry.update(_timings(times))
            out["version"][label] = entry
        probe = clipal_module_probe(args, cfg)
        if probe:  # which clipal package the command imports (an older checkout through PYTHONPATH?)
            _, status, first = timed_run(probe, env, clipal_cwd(cfg))
            out["clipal_module"] = first if status == 0 else f"probe failed: exit {status}: {first[:200]}"
        log_path = odir / "clipal-startup.log"
        log_path.write_bytes(b"")

        def once():
            port = free_port()
            return exec_to_health(clipal_command(args, cfg, port), env, clipal_cwd(cfg), port, log_path)
        command = " ".join(shlex.quote(c) for c in clipal_command(args, cfg, "{port}"))
    else:
        exe = t.notes["command"].split()[0]
        prefix = odir / "nginx-startup"
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        log_path = odir / "nginx-startup.log"
        log_path.write_bytes(b"")

        def once():
            port = free_port()
            conf.write_text(nginx_conf(port, up_port, prefix, prefix, args.nginx_body_buffer))
            return exec_to_health([exe, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "nginx-error.log")],
                                  None, str(prefix), port, log_path)
        command = f"{exe} -p {prefix} -c {conf}"
    times = []
    del STOP_TIMES[:]
    try:
        for _ in range(STARTUP_RUNS):
            times.append(once())
    except NotRunnable as e:
        out["health"] = {"command": command, "error": str(e)}
        return out
    out["health"] = {"command": command, **_timings(times)}
    if STOP_TIMES:
        out["health"]["sigterm_to_exit_median_s"] = round(_median(STOP_TIMES), 4)
    return out


# ------------------------------------------------------------------- reporting --

def g(res: dict, target: str, phase: str, *keys):
    """Dig a value out of results, None when absent."""
    v = res.get(target, {}).get("phases", {}).get(phase)
    for k in keys:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v


def added_latency_ms(res, target):
    if target == "DIRECT":
        return None
    a, d = g(res, target, "lat", "p50_us"), g(res, "DIRECT", "lat", "p50_us")
    return None if a is None or d is None else (a - d) / 1000


def rows_spec():
    """(label, extractor(res, target) -> value, format, show ratio vs DIRECT)."""
    P = lambda ph, *k: (lambda res, t: g(res, t, ph, *k))  # noqa: E731
    R = lambda ph, k: (lambda res, t: g(res, t, ph, "resources", k))  # noqa: E731
    f1, f0, f3 = "{:.1f}", "{:.0f}", "{:.3f}"
    return [
        ("a  c=1  req/s", P("a1", "rps"), f0, True),
        ("a  c=1  p50 ms", P("a1", "p50_ms"), f3, True),
        ("a  c=1  p99 ms", P("a1", "p99_ms"), f3, True),
        ("a  c=1  errors", P("a1", "errors"), f0, False),
        ("a  c=64 req/s", P("a64", "rps"), f0, True),
        ("a  c=64 p50 ms", P("a64", "p50_ms"), f3, True),
        ("a  c=64 p99 ms", P("a64", "p99_ms"), f3, True),
        ("a  c=64 errors", P("a64", "errors"), f0, False),
        ("a  seq x2000 completed", P("lat", "completed"), f0, False),
        ("a  seq x2000 p50 us", P("lat", "p50_us"), f1, True),
        ("a  seq x2000 p99 us", P("lat", "p99_us"), f1, True),
        ("a  added p50 latency at c=1, ms", lambda res, t: added_latency_ms(res, t), f3, False),
        ("b  200 streams completed", P("b", "completed"), f0, False),
        ("b  TTFB p50 ms", P("b", "ttfb_ms", "p50"), f1, True),
        ("b  TTFB p99 ms", P("b", "ttfb_ms", "p99"), f1, True),
        ("b  total p50 ms", P("b", "total_ms", "p50"), f1, True),
        ("b  total p99 ms", P("b", "total_ms", "p99"), f1, True),
        ("b  largest event gap p99 ms", P("b", "max_gap_ms", "p99"), f1, True),
        ("b  proxy CPU us per relayed event", lambda res, t: _per_event_us(res, t), f1, False),
        ("b2 1000 streams completed", P("b2", "completed"), f0, False),
        ("b2 total p99 ms", P("b2", "total_ms", "p99"), f1, True),
        ("c  seq 20x10MiB total s", P("c1", "total_s"), f3, True),
        ("c  seq MiB/s", P("c1", "mb_per_s"), f1, True),
        ("c  seq MiB at upstream", lambda res, t: _mib(g(res, t, "c1", "bytes_upstream")), f1, False),
        ("c  seq sha256 ok", P("c1", "ok"), f0, False),
        ("c  c=4 20x10MiB total s", P("c4", "total_s"), f3, True),
        ("c  c=4 MiB/s", P("c4", "mb_per_s"), f1, True),
        ("c  c=4 sha256 ok", P("c4", "ok"), f0, False),
        ("d  proxy CPU s, a c=64", R("a64", "proxy_cpu_s"), "{:.2f}", False),
        ("d  proxy CPU us/req, a c=64", lambda res, t: _per_req(res, t), f1, False),
        ("d  proxy CPU/req x NGINX, a c=64", lambda res, t: _per_req_vs_nginx(res, t), "{:.1f}x", False),
        ("d  proxy CPU s, seq x2000", R("lat", "proxy_cpu_s"), "{:.2f}", False),
        ("d  proxy CPU s, b 200 streams", R("b", "proxy_cpu_s"), "{:.2f}", False),
        ("d  proxy CPU s, b2 1000 streams", R("b2", "proxy_cpu_s"), "{:.2f}", False),
        ("d  proxy CPU s, c seq uploads", R("c1", "proxy_cpu_s"), "{:.2f}", False),
        ("d  proxy CPU s, c c=4 uploads", R("c4", "proxy_cpu_s"), "{:.2f}", False),
        ("d  peak RSS MB, a c=64", R("a64", "proxy_peak_rss_mb"), f1, False),
        ("d  peak RSS MB, b 200 streams", R("b", "proxy_peak_rss_mb"), f1, False),
        ("d  peak RSS MB, b2 1000 streams", R("b2", "proxy_peak_rss_mb"), f1, False),
        ("d  peak RSS MB, c seq uploads", R("c1", "proxy_peak_rss_mb"), f1, False),
        ("d  peak RSS MB, c c=4 uploads", R("c4", "proxy_peak_rss_mb"), f1, False),
        ("d  upstream CPU s, a c=64", R("a64", "upstream_cpu_s"), "{:.2f}", False),
    ] + agent_rows() + idle_rows() + startup_rows()


def agent_key(label: str, sessions: int) -> str:
    return f"{label}/s{sessions}"


def agent_added_ttfb_ms(res, t, key):
    """Added TTFB p50 over DIRECT for one (size, sessions) run of the agent phase."""
    if t == "DIRECT":
        return None
    a, d = g(res, t, "agent", "runs", key, "ttfb_ms", "p50"), g(res, "DIRECT", "agent", "runs", key, "ttfb_ms", "p50")
    return None if a is None or d is None else a - d


def agent_rows():
    A = lambda key, *k: (lambda res, t: g(res, t, "agent", "runs", key, *k))  # noqa: E731
    f1, f2 = "{:.1f}", "{:.2f}"
    rows = []
    for label, _ in AGENT_SIZES:
        for sessions in AGENT_PLAN:
            key = agent_key(label, sessions)
            name = f"ag {label:<4} s={sessions:<2}"

            def done(res, t, key=key):
                c, n = g(res, t, "agent", "runs", key, "completed"), g(res, t, "agent", "runs", key, "requests")
                return None if c is None else f"{c}/{n}"
            rows += [
                (f"{name} completed", done, "{}", False),
                (f"{name} TTFB p50 ms", A(key, "ttfb_ms", "p50"), f2, True),
                (f"{name} TTFB p99 ms", A(key, "ttfb_ms", "p99"), f2, True),
                (f"{name} added TTFB p50 ms", lambda res, t, key=key: agent_added_ttfb_ms(res, t, key), f2, False),
                (f"{name} total p50 ms", A(key, "total_ms", "p50"), f1, True),
                (f"{name} total p99 ms", A(key, "total_ms", "p99"), f1, True),
            ]
        rows += [
            (f"ag {label:<4} proxy CPU ms/request", lambda res, t, label=label: _agent_cpu_ms(res, t, label), f2, False),
            (f"ag {label:<4} proxy peak RSS MB", lambda res, t, label=label: _agent_peak(res, t, label), f1, False),
        ]
    return rows


def _agent_cpu_ms(res, t, label):
    cpu = n = 0
    for sessions in AGENT_PLAN:
        r = g(res, t, "agent", "runs", agent_key(label, sessions))
        if not r or "error" in r or r.get("resources", {}).get("proxy_cpu_s") is None:
            return None
        cpu += r["resources"]["proxy_cpu_s"]
        n += r["requests"]
    return cpu / n * 1000 if n else None


def _agent_peak(res, t, label):
    xs = [g(res, t, "agent", "runs", agent_key(label, s), "resources", "proxy_peak_rss_mb") for s in AGENT_PLAN]
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def idle_mode(res, t, want: str):
    """The idle numbers of one watcher mode: CLIPAL's inotify/poll instance, NGINX's only one (for 'inotify')."""
    modes = g(res, t, "idle", "modes") or {}
    if t == "CLIPAL":
        return modes.get(want)
    return modes.get("default") if want == "inotify" else None


def idle_rows():
    I = lambda mode, k: (lambda res, t: "-" if t == "NGINX" and mode == "poll"  # noqa: E731
                         else (idle_mode(res, t, mode) or {}).get(k))
    return [
        ("i  idle CPU ms/min, utime+stime", I("inotify", "cpu_ms_per_min"), "{:.1f}", False),
        ("i  idle CPU ms/min, schedstat", I("inotify", "cpu_ms_per_min_schedstat"), "{:.2f}", False),
        ("i  idle wakeups/min (voluntary csw)", I("inotify", "wakeups_per_min"), "{:.1f}", False),
        ("i  poll watcher: CPU ms/min, utime+stime", I("poll", "cpu_ms_per_min"), "{:.1f}", False),
        ("i  poll watcher: CPU ms/min, schedstat", I("poll", "cpu_ms_per_min_schedstat"), "{:.2f}", False),
        ("i  poll watcher: wakeups/min", I("poll", "wakeups_per_min"), "{:.1f}", False),
    ]


def startup_rows():
    V = lambda label: (lambda res, t: "-" if t == "NGINX"  # noqa: E731
                       else g(res, t, "startup", "version", label, "median_s"))
    return [
        ("s  --version s, python -m clipal", V("python -m clipal"), "{:.3f}", False),
        ("s  --version s, clipal-cmd", V("clipal-cmd"), "{:.3f}", False),
        ("s  --version s, console script", V("console script"), "{:.3f}", False),
        ("s  exec -> first /health 200 s", lambda res, t: g(res, t, "startup", "health", "median_s"), "{:.3f}", False),
        ("s  SIGTERM -> exit s (idle)", lambda res, t: g(res, t, "startup", "health", "sigterm_to_exit_median_s"),
         "{:.3f}", False),
    ]


def _mib(v):
    return None if v is None else v / 1048576


def _per_req(res, t):
    cpu, n = g(res, t, "a64", "resources", "proxy_cpu_s"), g(res, t, "a64", "requests")
    return None if cpu is None or not n else cpu / n * 1e6


def _per_req_vs_nginx(res, t):
    """Proxy CPU per request at c=64 as a multiple of NGINX's in the same run."""
    if t == "DIRECT":
        return None
    me, ng = _per_req(res, t), _per_req(res, "NGINX")
    return None if me is None or not ng else me / ng


def _per_event_us(res, t):
    """Proxy CPU per relayed SSE event in phase b: CPU s / (completed streams x events)."""
    cpu, n, ev = g(res, t, "b", "resources", "proxy_cpu_s"), g(res, t, "b", "completed"), g(res, t, "b", "events")
    return None if cpu is None or not n or not ev else cpu / (n * ev) * 1e6


def build_table(res: dict, targets: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["metric"]
    for t in targets:
        header.append(t)
        if t != "DIRECT" and "DIRECT" in targets:
            header.append("x DIRECT")
    rows = []
    for label, fn, fmt, ratio in rows_spec():
        vals = {t: fn(res, t) for t in targets}
        if all(v is None or v == "-" for v in vals.values()):
            continue
        row = [label]
        d = vals.get("DIRECT")
        for t in targets:
            v = vals[t]
            if v is None:
                # n/a: ran but no number (phase failed); -: not applicable or target not runnable
                cell = "n/a" if res.get(t, {}).get("status") == "ok" and t != "DIRECT" else "-"
            else:
                cell = v if isinstance(v, str) and "{}" not in fmt else fmt.format(v)  # "-": not applicable
            row.append(cell)
            if t != "DIRECT" and "DIRECT" in targets:
                row.append(f"{v / d:.2f}x" if (ratio and v is not None and d) else "")
        rows.append(row)
    return header, rows


def fmt_text(header, rows) -> str:
    w = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def fmt_md(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(c or " " for c in r) + " |" for r in rows]
    return "\n".join(out)


def floor_checks(res: dict, c) -> list[dict]:
    """CLIPAL against FLOOR, the same stack without clipal's rules: what clipal adds to the stack it is built on."""
    mine = lambda *k: g(res, "CLIPAL", *k)  # noqa: E731
    floor = lambda *k: g(res, "FLOOR", *k)  # noqa: E731
    out = [
        c("CPU/request <= FLOOR's, a c=64", ["a64"], lambda: (_per_req(res, "CLIPAL"), _per_req(res, "FLOOR")),
          lambda v: v[0] <= v[1], lambda v: f"{v[0]:.0f} us vs FLOOR {v[1]:.0f} us"),
        c("200 streams: TTFB p50 <= FLOOR's", ["b"], lambda: (mine("b", "ttfb_ms", "p50"), floor("b", "ttfb_ms", "p50")),
          lambda v: v[0] <= v[1], lambda v: f"{v[0]:.1f} ms vs FLOOR {v[1]:.1f} ms"),
        c("200 streams: total p50 <= FLOOR's", ["b"], lambda: (mine("b", "total_ms", "p50"), floor("b", "total_ms", "p50")),
          lambda v: v[0] <= v[1], lambda v: f"{v[0]:.1f} ms vs FLOOR {v[1]:.1f} ms"),
        c("CPU per relayed event <= FLOOR's", ["b"], lambda: (_per_event_us(res, "CLIPAL"), _per_event_us(res, "FLOOR")),
          lambda v: v[0] <= v[1], lambda v: f"{v[0]:.0f} us vs FLOOR {v[1]:.0f} us"),
    ]
    for label, _ in AGENT_SIZES:
        for sessions in (1, 8):
            key = agent_key(label, sessions)
            out.append(c(f"agent {label} s={sessions}: added TTFB p50 <= FLOOR's", ["agent"],
                         lambda key=key: (agent_added_ttfb_ms(res, "CLIPAL", key), agent_added_ttfb_ms(res, "FLOOR", key)),
                         lambda v: v[0] <= v[1], lambda v: f"{v[0]:.2f} ms vs FLOOR {v[1]:.2f} ms"))
    return out


def checks(res: dict, target: str, selected: set[str]) -> list[dict]:
    """The targets clipal must meet (also evaluated for NGINX, as a harness self-check)."""
    nginx_rps = g(res, "NGINX", "a64", "rps")
    direct = lambda *k: g(res, "DIRECT", *k)  # noqa: E731
    me = lambda *k: g(res, target, *k)  # noqa: E731

    def c(name, phases, value_fn, ok_fn, show):
        if not set(phases) <= selected:
            return {"check": name, "result": "SKIP", "value": "phase not selected"}
        st = res.get(target, {}).get("status")
        if st != "ok":
            return {"check": name, "result": "SKIP", "value": f"not runnable ({res.get(target, {}).get('reason')})"}
        for ph in phases:
            if me(ph) is None or "error" in (me(ph) or {}):
                return {"check": name, "result": "FAIL", "value": f"phase {ph}: {(me(ph) or {}).get('error', 'no data')}"}
        try:
            v = value_fn()
            ok = ok_fn(v)
        except (TypeError, ZeroDivisionError):
            return {"check": name, "result": "FAIL", "value": "missing data"}
        return {"check": name, "result": "PASS" if ok else "FAIL", "value": show(v)}

    if res.get(target, {}).get("status") != "ok":
        return [{"check": "all checks", "result": "SKIP", "target": target,
                 "value": f"not runnable ({res.get(target, {}).get('reason')})"}]
    out = [
        c("added p50 latency at c=1 <= 1 ms", ["lat"], lambda: added_latency_ms(res, target),
          lambda v: v <= 1.0 and me("lat", "completed") == 2000, lambda v: f"{v:.3f} ms ({me('lat', 'completed')}/2000 done)"),
        c("c=64 throughput >= 0.05x NGINX, 0 errors", ["a64"],
          lambda: (me("a64", "rps"), me("a64", "errors"), nginx_rps),
          lambda v: v[2] is not None and v[0] >= 0.05 * v[2] and v[1] == 0,
          lambda v: f"{v[0]:.0f} req/s = {v[0] / v[2]:.3f}x NGINX, {v[1]} errors" if v[2]
          else f"{v[0]:.0f} req/s, {v[1]} errors, NGINX not measured"),
        c("200/200 streams complete", ["b"], lambda: me("b", "completed"),
          lambda v: v == 200, lambda v: f"{v}/200"),
        c("stream total p50 <= 1.05x DIRECT", ["b"], lambda: me("b", "total_ms", "p50") / direct("b", "total_ms", "p50"),
          lambda v: v <= 1.05, lambda v: f"{v:.3f}x ({me('b', 'total_ms', 'p50'):.1f} ms)"),
        c("TTFB p50 <= 2x DIRECT", ["b"], lambda: me("b", "ttfb_ms", "p50") / direct("b", "ttfb_ms", "p50"),
          lambda v: v <= 2.0, lambda v: f"{v:.2f}x ({me('b', 'ttfb_ms', 'p50'):.1f} ms vs {direct('b', 'ttfb_ms', 'p50'):.1f} ms)"),
        c("largest inter-chunk gap p99 <= 60 ms", ["b"], lambda: me("b", "max_gap_ms", "p99"),
          lambda v: v <= 60.0, lambda v: f"{v:.1f} ms"),
        c("peak RSS <= 100 MB during 200 streams", ["b"], lambda: me("b", "resources", "proxy_peak_rss_mb"),
          lambda v: v <= 100.0, lambda v: f"{v:.1f} MB"),
        c("peak RSS <= 80 MB during uploads", ["c1"],
          lambda: max(x for x in (me("c1", "resources", "proxy_peak_rss_mb"),
                                  me("c4", "resources", "proxy_peak_rss_mb")) if x is not None),
          lambda v: v <= 80.0, lambda v: f"{v:.1f} MB"),
        c("uploads: 20/20 sha256 match", ["c1"], lambda: me("c1", "ok"),
          lambda v: v == 20, lambda v: f"{v}/20"),
        c("1000/1000 concurrent streams complete", ["b2"], lambda: me("b2", "completed"),
          lambda v: v == 1000, lambda v: f"{v}/1000"),
    ]
    out += [
        c("TTFB p50 <= 2.5x DIRECT", ["b"], lambda: me("b", "ttfb_ms", "p50") / direct("b", "ttfb_ms", "p50"),
          lambda v: v <= 2.5, lambda v: f"{v:.2f}x ({me('b', 'ttfb_ms', 'p50'):.1f} ms vs {direct('b', 'ttfb_ms', 'p50'):.1f} ms)"),
        c("largest event gap p99 <= 80 ms", ["b"], lambda: me("b", "max_gap_ms", "p99"),
          lambda v: v <= 80.0, lambda v: f"{v:.1f} ms ({_per_event_us(res, target):.1f} us proxy CPU per event)"
          if _per_event_us(res, target) is not None else f"{v:.1f} ms"),
        c("agent: every request complete, body intact", ["agent"],
          lambda: (me("agent", "completed"), me("agent", "body_ok"), me("agent", "requests"), me("agent", "errors")),
          lambda v: v[0] == v[1] == v[2] and v[2] > 0 and not v[3],
          lambda v: f"{v[0]}/{v[2]} complete, {v[1]} bodies intact" + (f"; {'; '.join(v[3])}" if v[3] else "")),
    ]
    skip = lambda name, why: {"check": name, "result": "SKIP", "value": why}  # noqa: E731
    if target in ("CLIPAL", "FLOOR"):
        nginx_ok = res.get("NGINX", {}).get("status") == "ok"
        name = "CPU/request <= 25x NGINX, a c=64"
        if "a64" in selected and (not nginx_ok or _per_req(res, "NGINX") is None):
            out.append(skip(name, "NGINX not measured in this run"))
        else:
            out.append(c(name, ["a64"], lambda: _per_req_vs_nginx(res, target), lambda v: v <= 25.0,
                         lambda v: f"{v:.1f}x ({_per_req(res, target):.1f} us vs {_per_req(res, 'NGINX'):.1f} us)"))
        for label, _ in AGENT_SIZES:
            for sessions in (1, 8):
                key = agent_key(label, sessions)
                name = f"agent {label} s={sessions}: added TTFB p50 <= NGINX's + 1 ms"
                if "agent" in selected and (not nginx_ok or agent_added_ttfb_ms(res, "NGINX", key) is None):
                    out.append(skip(name, "NGINX not measured in this run"))
                    continue
                out.append(c(name, ["agent"], lambda key=key: (agent_added_ttfb_ms(res, target, key),
                                                               agent_added_ttfb_ms(res, "NGINX", key)),
                             lambda v: v[0] <= v[1] + 1.0, lambda v: f"{v[0]:.2f} ms vs NGINX {v[1]:.2f} ms"))
    if target == "CLIPAL" and res.get("FLOOR", {}).get("status") == "ok":
        out += floor_checks(res, c)
    if target == "CLIPAL":
        def idle_cpu(mode):
            m = idle_mode(res, target, mode)
            v = m.get("cpu_ms_per_min_schedstat")
            return v if v is not None else m["cpu_ms_per_min"]
        out += [
            c("idle, inotify watcher: <= 6 wakeups/min", ["idle"],
              lambda: idle_mode(res, target, "inotify")["wakeups_per_min"], lambda v: v <= 6.0,
              lambda v: f"{v:.1f}/min (poll watcher: {(idle_mode(res, target, 'poll') or {}).get('wakeups_per_min')}/min; "
                        f"NGINX {(idle_mode(res, 'NGINX', 'inotify') or {}).get('wakeups_per_min')}/min)"),
            c("idle, inotify watcher: CPU <= 5 ms/min", ["idle"], lambda: idle_cpu("inotify"), lambda v: v <= 5.0,
              lambda v: f"{v:.2f} ms/min (schedstat; utime+stime "
                        f"{idle_mode(res, target, 'inotify')['cpu_ms_per_min']:.0f} ms/min)"),
        ]
        versions = me("startup", "version") or {}
        if "startup" in selected and not versions and me("startup") and "error" not in me("startup"):
            out.append(skip("--version <= 0.1 s", me("startup", "version_note") or "no clipal CLI"))
        for label in versions or (["python -m clipal"] if "startup" not in selected else []):
            out.append(c(f"--version <= 0.1 s ({label})", ["startup"],
                         lambda label=label: versions[label].get("median_s", versions[label].get("error")),
                         lambda v: isinstance(v, float) and v <= 0.1,
                         lambda v: f"{v:.3f} s median of {STARTUP_RUNS}" if isinstance(v, float) else str(v)))
        out.append(c("exec -> first /health 200 <= 0.35 s", ["startup"],
                     lambda: me("startup", "health", "median_s") if me("startup", "health", "median_s") is not None
                     else me("startup", "health", "error"),
                     lambda v: isinstance(v, float) and v <= 0.35,
                     lambda v: (f"{v:.3f} s median of {STARTUP_RUNS} (NGINX "
                                f"{g(res, 'NGINX', 'startup', 'health', 'median_s') or '-'} s)")
                     if isinstance(v, float) else str(v)))
    if target == "CLIPAL" and res.get("CLIPAL", {}).get("status") == "ok":
        hv = res["CLIPAL"].get("notes", {}).get("x_clipal_provider")
        out.append({"check": "X-Clipal-Provider header present", "result": "PASS" if hv else "FAIL",
                    "value": repr(hv)})
    if nginx_rps is None and out[1]["result"] == "FAIL" and "NGINX not measured" in out[1]["value"]:
        out[1]["result"] = "SKIP"
    for x in out:
        x["target"] = target
    return out


# ----------------------------------------------------------------------- main --

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter load phases, no c=4 uploads, fewer agent "
                    "requests, 20 s idle window")
    ap.add_argument("--only", default="", help="phases or groups to run, comma-separated: "
                    "a,b,b2,c,agent,idle,startup or a1,a64,lat,b,b2,c1,c4 (default: all)")
    ap.add_argument("--targets", default="direct,clipal,nginx", help="comma-separated subset of "
                    "direct,clipal,floor,nginx (floor: bench/floor.py, the stack without clipal)")
    ap.add_argument("--out", default=str(HERE / "out"), help="output directory (default bench/out)")
    ap.add_argument("--clipal-cmd", default="", help="command that starts clipal; '--config-dir D --port N "
                    "--log-level error' is appended unless it contains {config_dir}/{port} placeholders")
    ap.add_argument("--python", default=sys.executable, help="interpreter for `-m clipal` (default: this one)")
    ap.add_argument("--node", default=shutil.which("node") or "node")
    ap.add_argument("--wrk", default=None, help="wrk binary (default: from PATH); --no-wrk to force the fallback")
    ap.add_argument("--no-wrk", action="store_true", help="use bench/client.js for phase a even if wrk exists")
    ap.add_argument("--nginx", default=None, help="nginx binary (default: from PATH or /usr/sbin/nginx)")
    ap.add_argument("--nginx-body-buffer", default="2m", metavar="SIZE",
                    help="nginx client_body_buffer_size for the agent phase's location (default 2m: the bodies "
                    "stay in memory; 16k is nginx's default: to a temp file, and a ~40 ms Nagle/delayed-ACK stall)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any CLIPAL check fails or is skipped")
    ap.add_argument("--keys", type=int, default=1, help="keys of clipal's provider (api_keys when > 1; default 1)")
    ap.add_argument("--access-tokens", action="store_true",
                    help="set access_tokens in clipal's config.yaml (the load clients send that token)")
    ap.add_argument("--config-extra", default="", help="more lines for clipal's config.yaml, e.g. 'metrics: false' "
                    "(\\n separates lines)")
    a = ap.parse_args(argv)
    a.wrk = None if a.no_wrk else (a.wrk or shutil.which("wrk"))
    if not re.fullmatch(r"[0-9]+[kKmM]?", a.nginx_body_buffer):
        ap.error("--nginx-body-buffer: a size such as 16k or 2m")
    return a


def select_phases(only: str) -> list[str]:
    if not only.strip():
        return list(PHASES)
    want = [w.strip() for w in only.split(",") if w.strip()]
    keys = []
    for w in want:
        if w in PHASES:
            keys.append(w)
        elif w in {grp for grp, _ in PHASES.values()}:
            keys.extend(k for k, (grp, _) in PHASES.items() if grp == w)
        else:
            raise SystemExit(f"--only: unknown phase {w!r} (use a,b,b2,c,agent,idle,startup or {','.join(PHASES)})")
    return [k for k in PHASES if k in keys]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    phases = select_phases(args.only)
    if args.quick and "c4" in phases and not args.only:
        phases.remove("c4")
    targets = [t.strip().upper() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise SystemExit(f"--targets: unknown {bad}")
    if "DIRECT" not in targets:
        targets.insert(0, "DIRECT")  # ratios and several checks are relative to DIRECT
    if not shutil.which(args.node) and not os.access(args.node, os.X_OK):
        raise SystemExit("node is required (bench/upstream.js, bench/client.js)")

    nofile = raise_nofile()
    t_start = time.monotonic()
    tmp_root = Path(tempfile.mkdtemp(prefix="clipal-bench-"))
    res: dict = {}
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "phases": {k: PHASES[k][1] for k in phases},
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                 "node": tool_version([args.node, "--version"]),
                 "wrk": tool_version([args.wrk, "-v"]) if args.wrk else "not installed (client.js fallback)",
                 "nginx": tool_version([args.nginx or shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
                 "nofile": nofile},
        "clipal_commit": tool_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "nginx_worker_processes": NGINX_WORKERS,
        "nginx_agent_client_body_buffer_size": args.nginx_body_buffer,
        "load_tool": "wrk" if args.wrk else "bench/client.js (load mode)",
    }
    load1 = os.getloadavg()[0]
    meta["loadavg_at_start"] = round(load1, 2)
    if load1 > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load1:.2f} on {os.cpu_count()} CPUs at start: other work on this machine "
              "will skew the numbers (compare ratios from one run, not absolute values across runs)", flush=True)
    print(f"clipal bench ({meta['mode']}): phases {','.join(phases)}; targets {','.join(targets)}; "
          f"load tool {meta['load_tool']}; out {out}", flush=True)

    up_proc = None
    try:
        up_proc, up_port = start_upstream(args, out)
        meta["upstream_port"] = up_port
        ctx = {"up_port": up_port, "out": out, "tmp_root": tmp_root}
        print(f"upstream: node bench/upstream.js on 127.0.0.1:{up_port} (pid {up_proc.pid})", flush=True)
        for name in targets:
            entry = res.setdefault(name, {"phases": {}})
            t: Target | None = None
            try:
                if name == "DIRECT":
                    t = Target("DIRECT", up_port)
                    smoke(t)
                elif name == "CLIPAL":
                    t = start_clipal(args, up_port, out, tmp_root)
                elif name == "FLOOR":
                    t = start_floor(args, up_port, out, tmp_root)
                else:
                    t = start_nginx(args, up_port, out)
            except NotRunnable as e:
                entry.update(status="not runnable", reason=str(e))
                print(f"{name.lower()}: not runnable ({e})", flush=True)
                continue
            entry.update(status="ok", port=t.port, notes=t.notes)
            print(f"{name.lower()}: 127.0.0.1:{t.port}{t.prefix} "
                  f"(pids {t.pids() or '-'})" + (f" clipal from {t.notes['clipal_module']}"
                                                 if t.notes.get("clipal_module") else ""), flush=True)
            try:
                # warm-up: connection pools, lazy imports, JIT-free but cache-warm
                load_phase(args, t, 8, 1)
                for key in phases:
                    if name in ("DIRECT", "FLOOR") and key in ("idle", "startup"):
                        continue  # the upstream has no proxy process; the floor has no CLI or watcher
                    settle(t, 1.0 if key in ("b2", "c1") else 0.4)
                    if t.proc is not None and t.proc.poll() is not None:
                        entry["phases"][key] = {"error": f"{name} exited with status {t.proc.returncode}"}
                        continue
                    ph0 = time.monotonic()
                    r = run_phase(args, key, t, up_proc.pid, ctx)
                    entry["phases"][key] = r
                    brief = r.get("error") or _brief(key, r)
                    print(f"  {name:<6} {key:<4} {time.monotonic() - ph0:5.1f}s  {brief}", flush=True)
            finally:
                if t.proc is not None:
                    PROCS.stop(t.proc)
    except KeyboardInterrupt:
        print("interrupted: stopping every process started", file=sys.stderr)
        PROCS.stop_all()
        return 130
    finally:
        PROCS.stop_all()
        shutil.rmtree(tmp_root, ignore_errors=True)

    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    header, rows = build_table(res, targets)
    all_checks = []
    for t in ("CLIPAL", "FLOOR", "NGINX"):
        if t in targets:
            all_checks += checks(res, t, set(phases))

    text = fmt_text(header, rows)
    print()
    print(text)
    print()
    unselected = {}
    for c in all_checks:
        if c["result"] == "SKIP" and c["value"] == "phase not selected":
            unselected[c["target"]] = unselected.get(c["target"], 0) + 1  # listed in results.md/json
            continue
        print(f"{c['result']:<4}  {c['target']:<6}  {c['check']:<42}  {c['value']}")
    for t, n in unselected.items():
        print(f"SKIP  {t:<6}  {n} checks of phases not selected")
    for t in targets:
        if res.get(t, {}).get("status") != "ok":
            print(f"note: {t.lower()}: not runnable ({res[t].get('reason')})")
    print(f"\nwhole run {meta['elapsed_s']} s; results in {out / 'results.json'} and {out / 'results.md'}")

    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "targets": res, "table": {"header": header, "rows": rows}, "checks": all_checks},
        indent=2, default=str) + "\n")
    (out / "results.md").write_text(render_md(meta, res, targets, header, rows, all_checks))

    if args.strict:
        bad = [c for c in all_checks if c["target"] == "CLIPAL" and c["result"] != "PASS"]
        return 1 if bad or "CLIPAL" not in targets else 0
    return 0


def _brief(key: str, r: dict) -> str:
    res = r.get("resources", {})
    tail = ""
    if "proxy_cpu_s" in res:
        tail = f"  [cpu {res['proxy_cpu_s']:.2f}s, peak rss {res['proxy_peak_rss_mb']:.1f} MB]"
    if key in ("a1", "a64"):
        return f"{r['rps']:.0f} req/s p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms errors {r['errors']}" + tail
    if key == "lat":
        return f"{r['completed']}/2000 p50 {r['p50_us']} us p99 {r['p99_us']} us errors {r['errors']}" + tail
    if key in ("b", "b2"):
        tt = r["ttfb_ms"]
        return (f"{r['completed']}/{r['streams']} ttfb p50 {tt['p50']} ms, total p50 {r['total_ms']['p50']} ms, "
                f"gap p99 {r['max_gap_ms']['p99']} ms" + (f" fail {r['failure_reasons']}" if r['failed'] else "")) + tail
    if key in ("c1", "c4"):
        return (f"{r['ok']}/{r['count']} ok, {r['total_s']} s, {r['mb_per_s']} MiB/s, "
                f"upstream got {r['bytes_upstream']} B" + tail)
    if key == "agent":
        return (f"{r['completed']}/{r['requests']} complete, {r['body_ok']} bodies intact"
                + (f"; errors {r['errors']}" if r["errors"] else ""))
    if key == "idle":
        return "; ".join(f"{m}: {x['wakeups_per_min']} wakeups/min, cpu {x['cpu_ms_per_min_schedstat']} ms/min "
                         f"(ticks {x['cpu_ms_per_min']}), fds {','.join(sorted(set(x['anon_fds']))) or '-'}"
                         for m, x in r["modes"].items())
    if key == "startup":
        parts = ([f"clipal from {r['clipal_module']}"] if r.get("clipal_module") else []) + [f"--version ({k}) {v.get('median_s', v.get('error'))} s" for k, v in r.get("version", {}).items()]
        h = r.get("health", {})
        parts.append(f"exec->/health {h.get('median_s', h.get('error'))} s")
        return "; ".join(parts)
    return ""


def render_md(meta, res, targets, header, rows, all_checks) -> str:
    h = meta["host"]
    lines = [
        f"### clipal benchmark, {meta['date']} ({meta['mode']} mode, commit {meta['clipal_commit']})",
        "",
        f"Machine: {h['cpus']} CPUs, Linux {h['kernel']}, Python {h['python']}, Node {h['node']}; "
        f"load tool: {meta['load_tool']}; nginx: {h['nginx']} with worker_processes "
        f"{meta['nginx_worker_processes']}. All traffic on loopback; upstream = bench/upstream.js (Node). "
        f"Load average at start: {meta.get('loadavg_at_start')}.",
        "",
    ]
    for t in targets:
        if res.get(t, {}).get("status") != "ok":
            lines.append(f"- {t}: not runnable ({res.get(t, {}).get('reason')})")
    lines += ["", fmt_md(header, rows), "", "| target | check | result | value |", "|---|---|---|---|"]
    lines += [f"| {c['target']} | {c['check']} | {c['result']} | {c['value']} |" for c in all_checks]
    lines += ["", "Phases: " + "; ".join(f"{k} = {v}" for k, v in meta["phases"].items()) + ".",
              "Ratios are target / DIRECT (for req/s and MiB/s higher is better; for times lower is better).", ""]
    return "\n".join(lines)


def _sigterm(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    sys.exit(main())
