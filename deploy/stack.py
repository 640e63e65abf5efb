"""A local production-like stack: PostgreSQL, code server, dagster-daemon, dagster-webserver and the
monitoring API (with its metrics listener), each a separate process with its own log file.

    python deploy/stack.py up [--detach]     # start (foreground: Ctrl-C stops everything)
    python deploy/stack.py status            # each process: alive? healthy?
    python deploy/stack.py down              # stop what `up --detach` started

Everything lives under `--home` (default `.nilus/stack`): `stack.json` (pids, ports, URLs),
`logs/<service>.log`, `dagster_home/` (deploy/dagster.yaml, PostgreSQL storage) and `postgres/`
(the embedded cluster, unless `--postgres-dsn` names a server to use). Secrets come from the
environment only; without API tokens configured, an admin token is generated into `home/`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEPLOY_DIR = Path(__file__).resolve().parent
REPO_DIR = DEPLOY_DIR.parent
INSTANCE_YAML = DEPLOY_DIR / "dagster.yaml"
API_PREFIX = "/nilus-manager/api/v1"
LOCATION_NAME = "nilus_pipelines"
DAGSTER_DB = "dagster"
STATE_DB = "nilus_state"
# The daemon stops first, so nothing new is launched; the code server last (its runs with it).
STOP_ORDER = ("daemon", "api", "webserver", "code_server")


@dataclass
class Service:
    """One supervised process (its whole process group is stopped) and how to check it."""

    name: str
    pid: int
    log: str
    url: str | None = None


@dataclass
class StackState:
    """What `up` started, written to `home/stack.json` for `status` and `down`."""

    home: str
    project: str
    host: str
    ports: dict[str, int]
    postgres_dsn: str
    embedded_postgres: str | None  # data dir of the embedded cluster, None for an external server
    api_token_file: str | None
    services: dict[str, Service] = field(default_factory=dict)

    def save(self) -> None:
        path = Path(self.home) / "stack.json"
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, home: Path) -> StackState:
        data = json.loads((home / "stack.json").read_text())
        data["services"] = {k: Service(**v) for k, v in data["services"].items()}
        return cls(**data)

    def env(self) -> dict[str, str]:
        return service_env(self)

    def api_token(self) -> str | None:
        token = os.environ.get("NILUS_STACK_API_TOKEN")
        if token:
            return token
        if self.api_token_file and Path(self.api_token_file).exists():
            return Path(self.api_token_file).read_text().strip()
        return None


# -- processes ------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"stack: {message}", flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv's dagster, not another one)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _process_groups() -> dict[int, list[tuple[int, str]]]:
    """Live (non-zombie) processes by process group, from /proc."""
    groups: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        rest = text[text.rfind(")") + 2 :].split()
        state, pgid = rest[0], int(rest[2])
        if state not in ("Z", "X"):
            groups.setdefault(pgid, []).append((int(stat.parent.name), state))
    return groups


def group_alive(pgid: int) -> bool:
    """True while any process of the group lives (zombies of an unreaped parent do not count)."""
    if Path("/proc/self/stat").exists():
        return pgid in _process_groups()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rfind(")") + 2] not in "ZX"
    except OSError:
        return False


def stop_group(name: str, pgid: int, timeout: float) -> None:
    """SIGTERM the process group, SIGKILL what is left after `timeout` seconds."""
    if not group_alive(pgid):
        return
    _log(f"stopping {name} (process group {pgid})")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return
        time.sleep(0.2)
    _log(f"{name} did not stop within {timeout:.0f}s: SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def start_process(name: str, argv: list[str], env: dict[str, str], cwd: Path, logs: Path) -> Service:
    """Start `argv` in a new session (its own process group: run workers die with it)."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _log(f"started {name} (pid {process.pid}), log {log_path}")
    return Service(name=name, pid=process.pid, log=str(log_path))


# -- configuration --------------------------------------------------------------------------------


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return parts._replace(path=f"/{database}").geturl()


def service_env(state: StackState) -> dict[str, str]:
    """The environment every process gets: the caller's, plus instance and state-store settings."""
    env = dict(os.environ)
    parts = urlsplit(state.postgres_dsn)
    home = Path(state.home)
    env.update(
        DAGSTER_HOME=str(home / "dagster_home"),
        DAGSTER_PG_HOST=parts.hostname or "127.0.0.1",
        DAGSTER_PG_PORT=str(parts.port or 5432),
        DAGSTER_PG_USERNAME=parts.username or "postgres",
        DAGSTER_PG_PASSWORD=parts.password or "",
        DAGSTER_PG_DB=DAGSTER_DB,
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("NILUS_STATE_DSN", _with_database(state.postgres_dsn, STATE_DB))
    env.setdefault("NILUS_DEFS_DIR", str(Path(state.project) / "pipelines"))
    env["NILUS_DAGSTER_UI_URL"] = f"http://{state.host}:{state.ports['webserver']}"
    env["NILUS_METRICS_HOST"] = state.host
    if state.api_token_file and not env.get("NILUS_API_TOKENS") and not env.get("NILUS_API_TOKENS_FILE"):
        env["NILUS_API_TOKENS_FILE"] = str(home / "api-tokens.yaml")
    return env


def _ensure_api_tokens(home: Path) -> str | None:
    """Without NILUS_API_TOKENS(_FILE), generate an admin token (hash in the tokens file, the
    token itself in a 0600 file for you and for health checks)."""
    if os.environ.get("NILUS_API_TOKENS") or os.environ.get("NILUS_API_TOKENS_FILE"):
        return None
    import hashlib

    token_file = home / "api-admin-token"
    if not token_file.exists():
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(32) + "\n")
    token = token_file.read_text().strip()
    digest = hashlib.sha256(token.encode()).hexdigest()
    (home / "api-tokens.yaml").write_text(
        f"# Generated by deploy/stack.py: the token is in {token_file.name}.\n"
        f"tokens:\n  - {{name: stack-admin, sha256: {digest}, tenants: [], scope: admin}}\n"
    )
    return str(token_file)


def _ensure_databases(dsn: str, names: tuple[str, ...]) -> None:
    import psycopg

    with psycopg.connect(_with_database(dsn, "postgres"), autocommit=True) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def write_workspace(state: StackState) -> Path:
    """The webserver and the daemon load code from the code server, never by themselves."""
    path = Path(state.home) / "workspace.yaml"
    path.write_text(
        "load_from:\n"
        "  - grpc_server:\n"
        f"      host: {state.host}\n"
        f"      port: {state.ports['code_server']}\n"
        f"      location_name: {LOCATION_NAME}\n"
    )
    return path


def commands(state: StackState) -> dict[str, list[str]]:
    host, ports, workspace = state.host, state.ports, str(Path(state.home) / "workspace.yaml")
    return {
        "code_server": [
            _bin("dagster"), "code-server", "start", "-h", host, "-p", str(ports["code_server"]),
            "-f", "definitions.py", "-d", state.project, "--location-name", LOCATION_NAME,
            "--use-python-environment-entry-point",
        ],
        "daemon": [_bin("dagster-daemon"), "run", "-w", workspace],
        "webserver": [_bin("dagster-webserver"), "-h", host, "-p", str(ports["webserver"]), "-w", workspace],
        "api": [
            sys.executable, "-m", "nilus_dagster.api.server", "--host", host, "--port", str(ports["api"]),
            "--metrics-port", str(ports["metrics"]),
        ],
    }


# -- health ---------------------------------------------------------------------------------------


def _http_ok(url: str, token: str | None = None, accept: Callable[[int], bool] = lambda s: s == 200) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return accept(response.status)
    except urllib.error.HTTPError as error:
        return accept(error.code)
    except (OSError, ValueError):
        return False


def _command_ok(argv: list[str], env: dict[str, str]) -> bool:
    try:
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def health_checks(state: StackState) -> dict[str, Callable[[], bool]]:
    """One check per endpoint; the API process serves two (the API and its metrics listener)."""
    base = f"http://{state.host}"
    env, token = state.env(), state.api_token()
    # Without a token we know, any answer but a server error shows the API is up.
    api_accept: Callable[[int], bool] = (lambda s: s == 200) if token else (lambda s: s < 500)
    return {
        "code_server": lambda: _command_ok(
            [_bin("dagster"), "api", "grpc-health-check", "-h", state.host, "-p", str(state.ports["code_server"])], env
        ),
        "webserver": lambda: _http_ok(f"{base}:{state.ports['webserver']}/server_info"),
        "api": lambda: _http_ok(f"{base}:{state.ports['api']}{API_PREFIX}/health", token, api_accept),
        "metrics": lambda: _http_ok(f"{base}:{state.ports['metrics']}/health"),
        "daemon": lambda: _command_ok([_bin("dagster-daemon"), "liveness-check"], env),
    }


def _owner(check: str) -> str:
    return "api" if check == "metrics" else check


def code_location_error(state: StackState) -> str | None:
    """The code server answers health checks even when the code failed to load: ask it."""
    from dagster._grpc.client import DagsterGrpcClient
    from dagster._serdes import deserialize_value
    from dagster._utils.error import SerializableErrorInfo

    client = DagsterGrpcClient(host=state.host, port=state.ports["code_server"])
    response = deserialize_value(client.list_repositories())
    return response.to_string() if isinstance(response, SerializableErrorInfo) else None


def wait_healthy(state: StackState, names: list[str], timeout: float) -> None:
    checks = health_checks(state)
    pending = [n for n in checks if _owner(n) in names]
    deadline = time.monotonic() + timeout
    while pending:
        for name in list(pending):
            service = state.services[_owner(name)]
            if not pid_alive(service.pid):
                raise RuntimeError(f"{service.name} exited during startup; see {service.log}:\n{_tail(service.log)}")
            if checks[name]():
                _log(f"{name} is healthy")
                pending.remove(name)
        if pending and time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}:\n{_tail(state.services[_owner(n)].log)}" for n in pending)
            raise RuntimeError(f"not healthy after {timeout:.0f}s: {', '.join(pending)}\n{logs}")
        if pending:
            time.sleep(1.0)


def _tail(path: str, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- commands -------------------------------------------------------------------------------------


def _postgres(args: argparse.Namespace, home: Path) -> tuple[str, str | None]:
    """The server DSN (database part ignored) and, when embedded, the cluster's data dir."""
    dsn = args.postgres_dsn or os.environ.get("NILUS_STACK_POSTGRES_DSN")
    if dsn:
        return dsn, None
    from nilus_dagster.embedded.postgres import EmbeddedPostgres

    cluster = EmbeddedPostgres(home / "postgres", port=args.pg_port).start()
    _log(f"embedded PostgreSQL on 127.0.0.1:{cluster.port} (data in {cluster.pgdata})")
    return cluster.dsn("postgres"), str(cluster.data_dir)


def _stop_postgres(data_dir: str | None) -> None:
    if data_dir is None:
        return
    from nilus_dagster.embedded.postgres import EmbeddedPostgres

    _log("stopping embedded PostgreSQL")
    EmbeddedPostgres(Path(data_dir)).stop()


def up(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    project = Path(args.project).resolve()
    if (home / "stack.json").exists():
        previous = StackState.load(home)
        if any(group_alive(s.pid) for s in previous.services.values()):
            _log(f"already running (see `status`); stop it with `down --home {home}`")
            return 1
    if not (project / "definitions.py").exists():
        _log(f"{project} has no definitions.py")
        return 2
    (home / "dagster_home").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(INSTANCE_YAML, home / "dagster_home" / "dagster.yaml")
    dsn, embedded = _postgres(args, home)
    state = StackState(
        home=str(home), project=str(project), host=args.host,
        ports={
            "code_server": args.code_server_port or free_port(args.host),
            "webserver": args.webserver_port or free_port(args.host),
            "api": args.api_port or free_port(args.host),
            "metrics": args.metrics_port or free_port(args.host),
        },
        postgres_dsn=dsn, embedded_postgres=embedded, api_token_file=_ensure_api_tokens(home),
    )
    try:
        _ensure_databases(dsn, (DAGSTER_DB, STATE_DB))
        if args.seed_demo:
            _seed_demo(state)
        write_workspace(state)
        env, argvs, logs = state.env(), commands(state), home / "logs"
        state.services["code_server"] = start_process("code_server", argvs["code_server"], env, project, logs)
        state.save()
        wait_healthy(state, ["code_server"], args.timeout)  # the others load code from it
        error = code_location_error(state)
        if error:
            raise RuntimeError(f"the code location failed to load:\n{error}")
        for name in ("webserver", "api", "daemon"):
            state.services[name] = start_process(name, argvs[name], env, project, logs)
        state.services["webserver"].url = env["NILUS_DAGSTER_UI_URL"]
        state.services["api"].url = f"http://{state.host}:{state.ports['api']}{API_PREFIX}"
        state.save()
        wait_healthy(state, ["webserver", "api", "daemon"], args.timeout)
    except (Exception, KeyboardInterrupt) as error:
        _log(f"startup failed: {error}")
        stop_all(state, args.stop_timeout)
        return 1
    _print_summary(state)
    if args.detach:
        return 0
    return supervise(state, args.stop_timeout)


def _seed_demo(state: StackState) -> None:
    """The demo project's source: a seeded `shop` database on the stack's server (SHOP_DSN)."""
    from nilus_dagster.demo.shop import seed_shop

    if os.environ.get("SHOP_DSN"):
        return
    _ensure_databases(state.postgres_dsn, ("shop",))
    os.environ["SHOP_DSN"] = _with_database(state.postgres_dsn, "shop")
    seed_shop(os.environ["SHOP_DSN"])


def _print_summary(state: StackState) -> None:
    _log("all processes healthy")
    print(f"  Dagster UI   http://{state.host}:{state.ports['webserver']}")
    print(f"  API          http://{state.host}:{state.ports['api']}{API_PREFIX}")
    print(f"  metrics      http://{state.host}:{state.ports['metrics']}/metrics")
    print(f"  code server  {state.host}:{state.ports['code_server']} (grpc)")
    print(f"  logs         {Path(state.home) / 'logs'}")
    if state.api_token_file:
        print(f"  API token    in {state.api_token_file}")
    sys.stdout.flush()


def supervise(state: StackState, stop_timeout: float) -> int:
    """Foreground mode: wait for Ctrl-C/SIGTERM or for a process to die, then stop everything."""
    stopping = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    _log("running; Ctrl-C stops everything")
    code = 0
    while stopping["signal"] is None:
        dead = [s for s in state.services.values() if not pid_alive(s.pid)]
        if dead:
            _log(f"{dead[0].name} exited; see {dead[0].log}. Stopping the stack")
            code = 1
            break
        time.sleep(1.0)
    stop_all(state, stop_timeout)
    return code


def _terminate_runs(state: StackState, timeout: float) -> None:
    """Ask in-progress runs to stop through Dagster (CDC runs flush and end CANCELED)."""
    if "code_server" not in state.services or not group_alive(state.services["code_server"].pid):
        return
    argv = [sys.executable, str(Path(__file__).resolve()), "_terminate-runs", "--timeout", str(timeout)]
    try:
        subprocess.run(argv, env=state.env(), timeout=timeout + 60, check=False)
    except subprocess.TimeoutExpired:
        _log("terminating runs timed out")


def terminate_runs(timeout: float) -> int:
    import dagster as dg

    live = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs(dg.RunsFilter(statuses=live))
        queued = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
        for run in runs:
            _log(f"terminating run {run.run_id} ({run.job_name})")
            with contextlib.suppress(Exception):
                instance.run_launcher.terminate(run.run_id)
        for run in queued:  # the daemon is already stopped: nothing would dequeue them
            instance.report_run_canceled(run, message="stack stopped before the run was dequeued")
        deadline = time.monotonic() + timeout
        while runs and time.monotonic() < deadline:
            runs = instance.get_runs(dg.RunsFilter(run_ids=[r.run_id for r in runs], statuses=live))
            time.sleep(0.5)
    return 0


def stop_all(state: StackState, timeout: float) -> None:
    for name in STOP_ORDER:
        service = state.services.get(name)
        if service is None:
            continue
        if name == "code_server":
            _terminate_runs(state, timeout)
        stop_group(name, service.pid, timeout)
    _stop_postgres(state.embedded_postgres)
    with contextlib.suppress(FileNotFoundError):
        (Path(state.home) / "stack.json").unlink()
    _log("stopped")


def down(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    if not (home / "stack.json").exists():
        _log(f"nothing to stop (no {home / 'stack.json'})")
        return 0
    stop_all(StackState.load(home), args.stop_timeout)
    return 0


def status(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    if not (home / "stack.json").exists():
        _log("not running")
        return 3
    state = StackState.load(home)
    healthy = True
    for check_name, check in health_checks(state).items():
        service = state.services.get(_owner(check_name))
        alive = service is not None and pid_alive(service.pid)
        ok = alive and check()
        healthy &= ok
        pid = service.pid if service else "-"
        print(f"{check_name:12} pid {pid!s:>8}  {'healthy' if ok else ('UNHEALTHY' if alive else 'DOWN')}")
    return 0 if healthy else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=os.environ.get("NILUS_STACK_HOME", ".nilus/stack"), help="state folder")
    common.add_argument("--stop-timeout", type=float, default=20.0, help="seconds before SIGKILL")
    start = sub.add_parser("up", parents=[common], help="start the stack")
    start.add_argument("--project", default=str(REPO_DIR), help="folder with definitions.py and pipelines/")
    start.add_argument("--postgres-dsn", help="use this PostgreSQL server (databases dagster, nilus_state)")
    start.add_argument("--pg-port", type=int, default=0, help="embedded PostgreSQL port (0: a free one)")
    start.add_argument("--host", default="127.0.0.1", help="address every service binds")
    for name in ("webserver", "api", "metrics", "code-server"):
        start.add_argument(f"--{name}-port", type=int, default=0, help=f"{name} port (0: a free one)")
    start.add_argument("--seed-demo", action="store_true", help="create and seed the demo `shop` database")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for health")
    start.add_argument("--detach", action="store_true", help="return once healthy; stop with `down`")
    sub.add_parser("down", parents=[common], help="stop a detached stack")
    sub.add_parser("status", parents=[common], help="show each process's health")
    internal = sub.add_parser("_terminate-runs")
    internal.add_argument("--timeout", type=float, default=20.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "up":
        return up(args)
    if args.command == "down":
        return down(args)
    if args.command == "status":
        return status(args)
    return terminate_runs(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
