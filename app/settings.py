"""Appliance settings: one TOML file plus ``ONNX_APPLIANCE_*`` environment overrides.

The file has sections (``[server]``, ``[models]``, ``[limits]``, ``[logging]``,
``[metrics]``); an environment variable ``ONNX_APPLIANCE_<SECTION>__<KEY>`` overrides one key,
its value read as a TOML value (``4``, ``true``, ``["a", "b"]``) or else as a plain string.
Everything is validated once at start-up; any problem raises :class:`SettingsError` whose
message is one line naming the key.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from app.ratelimit import LimitError, check_burst, check_rate

DEFAULT_CONFIG_PATH = Path("/etc/onnx-appliance/appliance.toml")
DEFAULT_MODEL_REPOSITORY = Path("/var/lib/onnx-appliance/models")
DEFAULT_ROLLOUTS_DIR = Path("/var/lib/onnx-appliance/rollouts")
DEFAULT_DRIFT_DIR = Path("/var/lib/onnx-appliance/drift")
ENV_PREFIX = "ONNX_APPLIANCE_"
#: Where the CLI finds the configuration file when --config is not given.
CONFIG_ENV = "ONNX_APPLIANCE_CONFIG"

_ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?$")
_BIND_RE = re.compile(r"^(unix:/.+|(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5}))$")
#: Upper bounds of the settings (and of the same keys in a model.toml).
THREADS_PER_CORE = 4
MAX_REQUEST_THREADS = 256
MAX_INLINE_RUN_US = 10_000_000
MAX_WARMUP_RUNS = 10_000
MAX_BODY_BYTES = 1024 * 1024 * 1024
MAX_BATCH_ROWS = 1_000_000
MAX_TENSOR_ELEMENTS = 1 << 31
MAX_TEXT_TOKENS = 65_536
MAX_IMAGE_PIXELS = 1 << 28
#: Most sequences one worker may generate at once (each holds a key/value cache).
MAX_SEQUENCES = 256
MAX_TIMEOUT_MS = 3_600_000
MAX_QUEUE = 100_000


class SettingsError(Exception):
    """The configuration cannot be used; the message is one line for the operator."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSettings(_Section):
    """How gunicorn runs the app.

    Thread and process counts are bounded by ``THREADS_PER_CORE`` times the cores.

    Attributes:
        bind: Addresses to listen on: ``host:port`` or ``unix:/path``. Loopback only
            (``127.0.0.0/8``, ``::1``, ``localhost``) unless ``allow_non_loopback`` is set:
            NGINX is the only thing that should face the network.
        allow_non_loopback: Allow ``bind`` addresses other than loopback.
        workers: Worker processes; 0 means one per CPU core.
        worker_class: ``gevent`` (every connection a greenlet on the worker's one thread:
            no thread hand-offs, batching gathers from all of them), ``gthread`` (a pool of
            request threads), ``sync`` (one request at a time), or ``auto`` (gevent).
        threads: Request threads per gthread worker; 0 chooses from the repository: 4, or
            the largest ``max_batch_size`` of a batching model (at most 64) so a worker can
            gather full batches.
        worker_connections: Connections one gevent worker serves at once; more wait in the
            listen backlog.
        inline_run_us: gevent workers run a model on their own thread when its warm-up (the
            fastest run at each warm-up batch size) took at most this many microseconds (a
            helper-thread hand-off costs about 80 us); slower models, and models whose runs
            take longer in CPU time three times in a row, run in a helper thread, so the
            worker keeps reading requests, shedding load and answering health checks.
        intra_op_threads: onnxruntime intra-op threads per session; 0 means cores / workers.
        inter_op_threads: onnxruntime inter-op threads per session.
        cpu_affinity: Pin each worker to one core (round robin).
        timeout: Seconds a silent worker may live before the master kills it.
        graceful_timeout: Seconds a worker gets to finish its requests on shutdown/reload.
        keepalive: Seconds an idle keep-alive connection stays open.
        backlog: Listen backlog.
        max_requests: Recycle a worker after this many requests (0: never).
        max_requests_jitter: Random extra requests before recycling, to spread restarts.
        control_socket: Path of gunicorn's control socket, or "" for none.
        socket_mode: Octal mode of a unix listening socket.
        runtime_dir: Directory for worker readiness markers, rate-limit state and (unless
            metrics.multiproc_dir says otherwise) metric files; "" takes
            ``$RUNTIME_DIRECTORY`` (systemd) or a private temporary directory.
        pidfile: Where the master writes its pid ("" for nowhere); ``onnx-appliance reload``
            reads it.
        reload_timeout: Seconds new workers get to load and warm up on a reload before the
            reload is abandoned and the old workers keep serving.
        http_parser: How requests are parsed: ``fast`` (gunicorn_h1c, in C), ``python``
            (gunicorn's own), or ``auto`` (fast when gunicorn_h1c is installed, as it is
            with the appliance).
        grpc_bind: ``host:port`` where every worker also serves the Open Inference Protocol
            over gRPC ("" for no gRPC); loopback only, like ``bind``.
        grpc_threads: Calls one worker's gRPC server handles at once (greenlets in gevent
            workers); more wait for a free one.
    """

    bind: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:8000"])
    allow_non_loopback: bool = False
    workers: int = 0
    worker_class: Literal["auto", "gthread", "sync", "gevent"] = "auto"
    threads: int = 0
    worker_connections: int = 1000
    inline_run_us: int = 1000
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    cpu_affinity: bool = False
    timeout: int = 60
    graceful_timeout: int = 30
    keepalive: int = 5
    backlog: int = 2048
    max_requests: int = 0
    max_requests_jitter: int = 0
    control_socket: str = ""
    socket_mode: int = 0o660
    runtime_dir: str = ""
    pidfile: str = ""
    reload_timeout: int = 120
    http_parser: Literal["auto", "fast", "python"] = "auto"
    grpc_bind: str = ""
    grpc_threads: int = 16


class ModelsSettings(_Section):
    """Where models come from.

    Attributes:
        repository: Directory laid out as ``<name>/<version>/model.onnx``.
        default_model: Model served by ``POST /predict``; "" means the only model, or the
            first in name order.
        warmup_runs: Inference runs per model version before the worker reports ready.
        rollouts_dir: Where ``onnx-appliance rollout`` keeps its state, one file per model
            whose traffic weights replace ``model.toml``'s ("" for no rollouts).
        drift_dir: Where ``onnx-appliance drift`` keeps each model's reference window of
            input statistics ("" for no drift scores).
        capture_dir: Where models with ``[drift.capture]`` write sampled payloads ("" for
            nowhere: such a model is refused). The service must be able to write it.
    """

    repository: str = str(DEFAULT_MODEL_REPOSITORY)
    default_model: str = ""
    warmup_runs: int = 3
    rollouts_dir: str = str(DEFAULT_ROLLOUTS_DIR)
    drift_dir: str = str(DEFAULT_DRIFT_DIR)
    capture_dir: str = ""


class LimitsSettings(_Section):
    """Bounds on what a request may ask for.

    Attributes:
        max_body_bytes: Largest request body read; larger gets 413.
        max_batch_rows: Largest batch (first dimension) per request unless a model sets less.
        max_tensor_elements: Largest element count of one input tensor; checked from the
            declared shape before anything is allocated.
        timeout_ms: Default deadline of a request from its arrival (at NGINX when it sends
            ``X-Request-Start``); a model.toml may change it, a client may only lower it.
        body_timeout_ms: Longest time to receive a request's body once its headers are in;
            a client that sends it slower gets 408 and its connection is closed.
        max_concurrency: Session runs of one model at once per worker; 0 means cores / workers.
        max_queue: Requests per model and worker that may wait for a run slot; more get 503.
    """

    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_rows: int = 1024
    max_tensor_elements: int = 4 * 1024 * 1024
    timeout_ms: int = 30_000
    body_timeout_ms: int = 30_000
    max_concurrency: int = 0
    max_queue: int = 64


class AuthSettings(_Section):
    """API keys and their rate limits.

    Attributes:
        keys_file: File of hashed keys managed by ``onnx-appliance keys``. When it holds at
            least one key, every route but health, readiness and metrics needs a key.
        required: Refuse to start when no key is configured (instead of serving openly).
        rate: Default requests per second per key (a key's own rate wins); 0 = unlimited,
            else 0.001 to 1000000.
        burst: Default bucket size per key: requests allowed at once after idling
            (1 to 1000000).
    """

    keys_file: str = "/etc/onnx-appliance/api-keys"
    required: bool = False
    rate: float = 100.0
    burst: int = 200


class CorsSettings(_Section):
    """Cross-origin requests from browsers.

    Attributes:
        allow_origins: Origins allowed to call the API (``https://app.example.com``); empty
            allows none.
    """

    allow_origins: list[str] = msgspec.field(default_factory=list)


class LoggingSettings(_Section):
    """Log output.

    Attributes:
        level: debug, info, warning or error.
        format: ``json`` (one object per line, for journald/shipping) or ``console``.
    """

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class MetricsSettings(_Section):
    """Prometheus metrics.

    Attributes:
        enabled: Serve ``GET /metrics``.
        multiproc_dir: Directory for per-worker metric files; "" takes
            ``$PROMETHEUS_MULTIPROC_DIR`` or a private temporary directory.
    """

    enabled: bool = True
    multiproc_dir: str = ""


class Settings(_Section):
    """All appliance settings."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    models: ModelsSettings = msgspec.field(default_factory=ModelsSettings)
    limits: LimitsSettings = msgspec.field(default_factory=LimitsSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    cors: CorsSettings = msgspec.field(default_factory=CorsSettings)

    def effective_workers(self) -> int:
        """Worker count with 0 resolved to the number of usable cores."""
        return self.server.workers or cpu_count()

    def effective_intra_op_threads(self) -> int:
        """Intra-op threads with 0 resolved to cores / workers (at least one)."""
        if self.server.intra_op_threads:
            return self.server.intra_op_threads
        return max(1, cpu_count() // self.effective_workers())

    def effective_max_concurrency(self) -> int:
        """Run slots per model and worker with 0 resolved to cores / workers (at least one)."""
        return self.limits.max_concurrency or max(1, cpu_count() // self.effective_workers())


def runtime_dir(settings: Settings) -> Path:
    """The directory for readiness markers, rate-limit state and default metric files.

    ``server.runtime_dir``, else systemd's ``$RUNTIME_DIRECTORY``, else a new private
    temporary directory.
    """
    path = settings.server.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    directory = Path(path) if path else Path(tempfile.mkdtemp(prefix="onnx-appliance-"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def cpu_count() -> int:
    """Cores this process may run on (honours affinity masks and cgroup cpusets)."""
    return len(os.sched_getaffinity(0)) or 1


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    sections = set(Settings.__struct_fields__)
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        section, sep, field = key.partition("__")
        if not sep or section not in sections or not field:
            raise SettingsError(
                f"environment variable {name} is not a setting "
                f"(expected {ENV_PREFIX}<SECTION>__<KEY>, sections: {', '.join(sorted(sections))})"
            )
        data.setdefault(section, {})[field] = _env_value(raw)


def _check(settings: Settings, check_repository: bool) -> None:
    s, limits = settings.server, settings.limits
    threads = thread_limit()
    bounds = {
        "server.workers": (s.workers, 0, threads),
        "server.threads": (s.threads, 0, MAX_REQUEST_THREADS),
        "server.worker_connections": (s.worker_connections, 1, 100_000),
        "server.inline_run_us": (s.inline_run_us, 0, MAX_INLINE_RUN_US),
        "server.intra_op_threads": (s.intra_op_threads, 0, threads),
        "server.inter_op_threads": (s.inter_op_threads, 1, threads),
        "server.timeout": (s.timeout, 1, 86_400),
        "server.graceful_timeout": (s.graceful_timeout, 1, 3600),
        "server.keepalive": (s.keepalive, 0, 3600),
        "server.backlog": (s.backlog, 1, 65_535),
        "server.max_requests": (s.max_requests, 0, 1_000_000_000),
        "server.max_requests_jitter": (s.max_requests_jitter, 0, 1_000_000_000),
        "server.reload_timeout": (s.reload_timeout, 1, 3600),
        "server.grpc_threads": (s.grpc_threads, 1, MAX_REQUEST_THREADS),
        "models.warmup_runs": (settings.models.warmup_runs, 0, MAX_WARMUP_RUNS),
        "limits.max_body_bytes": (limits.max_body_bytes, 1, MAX_BODY_BYTES),
        "limits.max_batch_rows": (limits.max_batch_rows, 1, MAX_BATCH_ROWS),
        "limits.max_tensor_elements": (limits.max_tensor_elements, 1, MAX_TENSOR_ELEMENTS),
        "limits.timeout_ms": (limits.timeout_ms, 1, MAX_TIMEOUT_MS),
        "limits.body_timeout_ms": (limits.body_timeout_ms, 1, MAX_TIMEOUT_MS),
        "limits.max_concurrency": (limits.max_concurrency, 0, threads),
        "limits.max_queue": (limits.max_queue, 0, MAX_QUEUE),
    }
    for key, (value, low, high) in bounds.items():
        problem = out_of_range(key, value, low, high)
        if problem:
            raise SettingsError(problem)
    try:
        check_rate(settings.auth.rate, "auth.rate")
        check_burst(settings.auth.burst, "auth.burst")
    except LimitError as exc:
        raise SettingsError(str(exc)) from None
    if not s.bind:
        raise SettingsError("server.bind is empty: give at least one address")
    for address in s.bind:
        _check_bind(address, s.allow_non_loopback)
    if s.grpc_bind:
        if s.grpc_bind.startswith("unix:"):
            raise SettingsError("server.grpc_bind takes host:port, not a unix socket")
        _check_bind(s.grpc_bind, s.allow_non_loopback, "server.grpc_bind")
    for origin in settings.cors.allow_origins:
        if not _ORIGIN_RE.match(origin):
            raise SettingsError(
                f"cors.allow_origins entry {origin!r} is invalid: use scheme://host[:port]"
            )
    if s.http_parser == "fast" and not _installed("gunicorn_h1c"):
        raise SettingsError(
            'server.http_parser = "fast" needs gunicorn_h1c, which is not installed'
        )
    if not 0 <= s.socket_mode <= 0o777:
        raise SettingsError(f"server.socket_mode = {s.socket_mode:o} is not a file mode")
    repo = Path(settings.models.repository)
    if check_repository and not repo.is_dir():
        raise SettingsError(f"models.repository {repo} does not exist or is not a directory")


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _check_bind(address: str, allow_non_loopback: bool, key: str = "server.bind entry") -> None:
    match = _BIND_RE.match(address)
    if not match:
        raise SettingsError(f"{key} {address!r} is invalid: use host:port or unix:/absolute/path")
    if address.startswith("unix:"):
        return
    host, port = match.group("host").strip("[]"), int(match.group("port"))
    if not 1 <= port <= 65_535:
        raise SettingsError(f"{key} {address!r} has port {port}: use 1 to 65535")
    if not allow_non_loopback and not is_loopback(host):
        raise SettingsError(
            f"{key} {address!r} is not a loopback address: NGINX is what faces "
            "the network; set server.allow_non_loopback = true to listen there anyway"
        )


def is_loopback(host: str) -> bool:
    """Whether a bind host is loopback without asking DNS: ``localhost`` or a loopback IP."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def out_of_range(key: str, value: int, low: int, high: int) -> str | None:
    """The one-line complaint about ``key = value`` outside ``low..high``, or None."""
    if low <= value <= high:
        return None
    return f"{key} = {value} is invalid: must be from {low} to {high}"


def first_out_of_range(*bounds: tuple[str, int, int, int]) -> str | None:
    """The complaint about the first ``(key, value, low, high)`` out of range, or None."""
    for key, value, low, high in bounds:
        problem = out_of_range(key, value, low, high)
        if problem:
            return problem
    return None


def thread_limit() -> int:
    """The most threads (or processes) any one thread-count setting may ask for.

    A few per core is already more than helps; far more (100000, a typo) would try to start
    them all and exhaust the host.
    """
    return THREADS_PER_CORE * cpu_count()


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    check_repository: bool = True,
) -> Settings:
    """Read, merge and validate the settings.

    Args:
        path: TOML file. ``None`` reads :data:`DEFAULT_CONFIG_PATH` when it exists and
            otherwise starts from the built-in defaults; an explicit path must exist.
        env: Environment to take ``ONNX_APPLIANCE_*`` overrides from (default: os.environ).
        overrides: Values from the command line, ``{section: {key: value}}``; they win
            over the file and the environment.
        check_repository: Require ``models.repository`` to be a directory (off when a
            single model file is served instead).

    Returns:
        Validated settings.

    Raises:
        SettingsError: with a one-line message naming the problem.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    file = path if path is not None else DEFAULT_CONFIG_PATH
    if path is not None or file.exists():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"configuration file {file} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"configuration file {file} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"configuration file {file} is not valid TOML: {exc}") from None
        _anchor_paths(data, file.resolve().parent)
    _apply_env(data, env)
    for section, values in (overrides or {}).items():
        section_data = data.setdefault(section, {})
        if isinstance(section_data, dict):
            section_data.update(values)
    try:
        settings = msgspec.convert(data, Settings)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid setting: {_readable(str(exc))}") from None
    _check(settings, check_repository)
    return settings


#: Settings that name a file or folder ("" meaning none); relative ones in the settings file
#: are relative to the file's folder, not to wherever the command was started.
PATH_KEYS = (
    ("models", "repository"),
    ("models", "rollouts_dir"),
    ("models", "drift_dir"),
    ("models", "capture_dir"),
    ("auth", "keys_file"),
    ("server", "runtime_dir"),
    ("server", "pidfile"),
    ("server", "control_socket"),
    ("metrics", "multiproc_dir"),
)


def _anchor_paths(data: dict[str, Any], folder: Path) -> None:
    for section, key in PATH_KEYS:
        values = data.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            values[key] = str(folder / value)  # type: ignore[index]


def _readable(message: str) -> str:
    # msgspec says "Object contains unknown field `x` - at `$.server`"; make the path dotted.
    return re.sub(r"`\$\.?([^`]*)`", lambda m: f"`{m.group(1) or 'top level'}`", message)
