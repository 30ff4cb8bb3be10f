"""``onnx-appliance``: serve models, check a repository, print the version."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app import __version__
from app.client import local_get
from app.settings import CONFIG_ENV, Settings, SettingsError, load_settings, runtime_dir

if TYPE_CHECKING:
    from app.models.repository import ModelEntry, Repository

EXIT_CONFIG = 2
EXIT_UNHEALTHY = 1
READY_PATH = "/v2/health/ready"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-appliance",
        description="Serve ONNX models over the Open Inference Protocol and simple JSON.",
    )
    parser.add_argument("--version", action="version", version=f"onnx-appliance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="start gunicorn workers serving the model repository",
        description="Validate the settings and the model repository, then start gunicorn: "
        "each worker loads and warms every model before it accepts requests. "
        "Command-line options override the configuration file and the "
        "ONNX_APPLIANCE_<SECTION>__<KEY> environment variables.",
    )
    serve.add_argument(
        "--config",
        type=Path,
        help="TOML settings file (default: "
        f"${CONFIG_ENV} or /etc/onnx-appliance/appliance.toml if present)",
    )
    serve.add_argument("--model-dir", help="model repository (<name>/<version>/model.onnx)")
    serve.add_argument(
        "--model",
        metavar="FILE",
        help="serve this one .onnx file as version 1, without a repository",
    )
    serve.add_argument("--name", help="model name for --model (default: the file name)")
    serve.add_argument(
        "--bind",
        action="append",
        metavar="ADDRESS",
        help="host:port or unix:/path; repeat for several (default 127.0.0.1:8000)",
    )
    serve.add_argument("--workers", type=int, help="worker processes (0: one per core)")
    serve.add_argument("--threads", type=int, help="request threads per gthread worker")
    serve.add_argument("--worker-class", choices=["gevent", "gthread", "sync"])
    serve.add_argument(
        "--intra-op-threads", type=int, help="onnxruntime threads per session (0: cores / workers)"
    )
    serve.add_argument(
        "--cpu-affinity", action="store_true", default=None, help="pin each worker to one core"
    )
    serve.add_argument(
        "--control-socket", metavar="PATH", help="gunicorn control socket path (default: none)"
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["json", "console"])

    check = sub.add_parser(
        "check",
        help="validate a model repository and print every model's signature",
        description="Scan DIR like the server would, load and warm up every model version, "
        "and print its inputs and outputs. Exit status 0 when every model can be "
        "served, 2 (with one line naming the problem) otherwise.",
    )
    check.add_argument("directory", type=Path, metavar="DIR")
    check.add_argument(
        "--contract",
        type=Path,
        metavar="FILE",
        help="serving contract snapshot: written when absent; when present, a model version "
        "that breaks its recorded contract (an input or output removed or renamed, an input "
        "added, a datatype changed, a shape narrowed, labels changed) is refused; the file "
        "is then rewritten with this repository's contracts",
    )
    check.add_argument(
        "--accept-contract",
        action="append",
        default=[],
        metavar="MODEL",
        help="accept MODEL's contract change (or its removal) this once; repeat for several",
    )

    check_config = sub.add_parser(
        "check-config",
        help="validate a settings file",
        description="Read FILE as `serve` would (without the environment, and without "
        "requiring its model repository to exist yet) and say whether it can be served. "
        "Exit status 0 when it can, 2 (with one line naming the problem) otherwise; "
        "Ansible validates the file with this before writing it.",
    )
    check_config.add_argument("file", type=Path, metavar="FILE")

    reload_cmd = sub.add_parser(
        "reload",
        help="gracefully reload settings, models and keys of a running server",
        description="Send SIGHUP to the master named in the pidfile. It re-reads the settings, "
        "the repository and the keys; when they are valid it starts new workers, "
        "waits until each has loaded and warmed its models, then retires the old "
        "ones. Anything invalid leaves the old workers serving.",
    )
    reload_cmd.add_argument("--config", type=Path, help="settings file naming server.pidfile")
    reload_cmd.add_argument("--pidfile", type=Path, help="the master's pidfile")
    reload_cmd.add_argument("--pid", type=int, help="the master's pid (systemd: $MAINPID)")

    keys_cmd = sub.add_parser(
        "keys",
        help="manage API keys (stored hashed)",
        description="Add, list or revoke API keys. The file holds only salted hashes; a new "
        "key is printed once. Reload the server to apply changes.",
    )
    keys_cmd.add_argument("--config", type=Path, help="settings file naming auth.keys_file")
    keys_cmd.add_argument("--file", type=Path, help="keys file (default: auth.keys_file)")
    actions = keys_cmd.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create a key and print it once")
    add.add_argument("id", help="key id: a-z, 0-9 and -, shown in logs and metrics")
    add.add_argument("--rate", type=float, help="requests per second (default: auth.rate)")
    add.add_argument("--burst", type=int, help="burst size (default: auth.burst)")
    actions.add_parser("list", help="list key ids and their limits")
    revoke = actions.add_parser("revoke", help="delete a key")
    revoke.add_argument("id")

    health = sub.add_parser(
        "health",
        help="ask the local server whether it is ready (a container HEALTHCHECK)",
        description="GET /v2/health/ready on the first server.bind address of the settings "
        "(a wildcard host is asked on loopback). Exit status 0 when it answers 200, 1 "
        "when it is not ready or not answering, 2 when the settings are invalid.",
    )
    health.add_argument("--config", type=Path, help="settings file (as for serve)")
    health.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )

    _rollout_parser(sub)
    drift_cmd = sub.add_parser(
        "drift",
        help="capture a model's reference window of input statistics, or show drift scores",
        description="With --capture-reference SECONDS: read the running server's input "
        "statistics of MODEL (a model with [drift]), wait SECONDS while good traffic flows, "
        "read them again, and write each input feature's mean and standard deviation over "
        "that window to models.drift_dir/MODEL.json; the workers score recent inputs "
        "against it from then on (onnx_appliance_input_drift). With --show: print the "
        "reference and the current scores. Exit status 1 when the window had too little "
        "traffic or the server does not answer, 2 for bad input.",
    )
    drift_cmd.add_argument("model", metavar="MODEL")
    drift_what = drift_cmd.add_mutually_exclusive_group(required=True)
    drift_what.add_argument("--capture-reference", type=float, metavar="SECONDS")
    drift_what.add_argument("--show", action="store_true")
    drift_cmd.add_argument(
        "--min-rows", type=int, default=100, help="rows each input needs in the window (100)"
    )
    drift_cmd.add_argument("--config", type=Path, help="settings file (as for serve)")
    sub.add_parser("version", help="print the version")
    return parser


def _rollout_parser(sub: Any) -> None:
    from app.models.rollout import Thresholds

    rollout_cmd = sub.add_parser(
        "rollout",
        help="move a model's traffic to a new version in steps, judged by its metrics",
        description="Raise VERSION's share of MODEL's traffic step by step (each step a "
        "graceful reload), judging each step after --interval seconds from the server's "
        "metrics: the candidate's 5xx ratio and p99 latency against the primary's, and the "
        "agreement of shadow comparisons. It advances, holds when there is too little "
        "traffic, or rolls back to the primary. State lives in models.rollouts_dir/MODEL.json; "
        "run it again to resume after an interruption. Exit status 0 when the candidate "
        "reached 100%%, 1 when it was rolled back (or the server would not reload), 2 for "
        "bad input.",
    )
    rollout_cmd.add_argument("model", metavar="MODEL")
    what = rollout_cmd.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", type=int, metavar="VERSION", help="the candidate version")
    what.add_argument("--status", action="store_true", help="print the rollout's state")
    what.add_argument(
        "--clear",
        action="store_true",
        help="remove a finished rollout's state (its traffic then comes from model.toml again)",
    )
    rollout_cmd.add_argument("--config", type=Path, help="settings file (as for serve)")
    rollout_cmd.add_argument(
        "--from", dest="primary", type=int, metavar="VERSION",
        help="the primary (default: the version most traffic goes to now)",
    )  # fmt: skip
    rollout_cmd.add_argument("--steps", default="1,5,25,50,100", help="percentages, ending at 100")
    defaults = Thresholds()
    for flag, kind, help_text in (
        ("interval-s", float, "seconds each step runs before it is judged"),
        ("min-requests", int, "candidate requests a step needs to be judged"),
        ("max-holds", int, "intervals a step may wait for traffic before rolling back"),
        ("max-error-increase", float, "largest 5xx ratio above the primary's (0.01: 1 point)"),
        ("max-latency-ratio", float, "largest p99 as a multiple of the primary's"),
        ("min-latency-ms", float, "p99 differences below this never count"),
        ("min-agreement", float, "smallest share of agreeing shadow comparisons"),
        ("max-abs-difference", float, "numeric shadow answers agree within this"),
    ):
        default = getattr(defaults, flag.replace("-", "_"))
        rollout_cmd.add_argument(
            f"--{flag}", type=kind, default=default, help=f"{help_text} (default {default:g})"
        )
    rollout_cmd.add_argument("--pid", type=int, help="the master's pid, to signal reloads")
    rollout_cmd.add_argument("--pidfile", help="the master's pidfile (default: server.pidfile)")
    rollout_cmd.add_argument(
        "--reload-command",
        default="",
        help="command that reloads the server, e.g. 'systemctl reload onnx-appliance'",
    )


def _fail(message: str) -> int:
    print(f"onnx-appliance: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    pairs = {
        ("server", "bind"): args.bind,
        ("server", "workers"): args.workers,
        ("server", "threads"): args.threads,
        ("server", "worker_class"): args.worker_class,
        ("server", "intra_op_threads"): args.intra_op_threads,
        ("server", "cpu_affinity"): args.cpu_affinity,
        ("server", "control_socket"): args.control_socket,
        ("models", "repository"): args.model_dir,
        ("logging", "level"): args.log_level,
        ("logging", "format"): args.log_format,
    }
    out: dict[str, dict[str, Any]] = {}
    for (section, key), value in pairs.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def _prepare_metrics_dir(settings: Settings, runtime: Path) -> None:
    """Point prometheus_client at a clean multiprocess directory before workers import it."""
    path = settings.metrics.multiproc_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    directory = Path(path) if path else runtime / "metrics"
    directory.mkdir(parents=True, exist_ok=True)
    # Files left by an earlier run would be added to this run's counters.
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config:
        return Path(args.config)
    return Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None


def serve(args: argparse.Namespace) -> int:
    """Validate everything in the master, then run gunicorn until it is told to stop."""
    try:
        settings = load_settings(
            _config_path(args), overrides=_overrides(args), check_repository=not args.model
        )
    except SettingsError as exc:
        return _fail(str(exc))
    from app.logging import configure_logging

    configure_logging(settings.logging.level, settings.logging.format)
    runtime = runtime_dir(settings)
    if settings.metrics.enabled:
        _prepare_metrics_dir(settings, runtime)
    # Imported only now: prometheus_client reads PROMETHEUS_MULTIPROC_DIR at import time.
    from app.server.application import ApplianceApplication
    from app.server.state import StartupError

    try:
        application = ApplianceApplication(
            _config_path(args),
            _overrides(args),
            args.model or "",
            args.name or "",
            runtime,
            settings,
        )
        application.run()
    except StartupError as exc:
        return _fail(str(exc))
    return 0


def reload(args: argparse.Namespace) -> int:
    """Ask the running master (by pid, or found through its pidfile) for a graceful reload."""
    if args.pid is not None:
        try:
            os.kill(args.pid, signal.SIGHUP)
        except OSError as exc:
            return _fail(f"cannot signal the server (pid {args.pid}): {exc}")
        print(f"reload requested from pid {args.pid}; the log says when the new workers are ready")
        return 0
    pidfile = args.pidfile
    if not pidfile:
        try:
            pidfile = load_settings(_config_path(args), check_repository=False).server.pidfile
        except SettingsError as exc:
            return _fail(str(exc))
    if not pidfile:
        return _fail(
            "no pidfile: set server.pidfile or pass --pidfile (under systemd use "
            "`systemctl reload onnx-appliance`)"
        )
    try:
        pid = int(Path(pidfile).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot signal the server from {pidfile}: {exc}")
    print(f"reload requested from pid {pid}; the log says when the new workers are ready")
    return 0


def keys(args: argparse.Namespace) -> int:
    """Add, list or revoke API keys in the keys file."""
    from app.keys import KeyFileError, KeyStore, new_key

    path = args.file
    if path is None:
        try:
            path = Path(load_settings(_config_path(args), check_repository=False).auth.keys_file)
        except SettingsError as exc:
            return _fail(str(exc))
    try:
        store = KeyStore.load(path)
        if args.action == "list":
            for key in store.keys.values():
                rate = "default" if key.rate is None else f"{key.rate:g}/s"
                burst = "default" if key.burst is None else str(key.burst)
                print(f"{key.id}\trate={rate}\tburst={burst}")
            return 0
        if args.action == "add":
            if args.id in store.keys:
                return _fail(f"key id {args.id!r} already exists; revoke it first")
            record, token = new_key(args.id, args.rate, args.burst)
            store = KeyStore({**store.keys, record.id: record})
            store.save(path)
            print(token)
            print(
                f"# key {record.id!r} added to {path}; it is shown only now. Reload the "
                "server to use it.",
                file=sys.stderr,
            )
            return 0
        if args.id not in store.keys:
            return _fail(f"no key with id {args.id!r} in {path}")
        store = KeyStore({k: v for k, v in store.keys.items() if k != args.id})
        store.save(path)
        print(f"key {args.id!r} revoked in {path}; reload the server to apply it", file=sys.stderr)
        return 0
    except KeyFileError as exc:
        return _fail(str(exc))


def check(args: argparse.Namespace) -> int:
    """Load every model version in DIR and print its signature."""
    from app.models.errors import RepositoryError
    from app.models.onnx import RuntimeOptions
    from app.models.repository import Repository

    try:
        repository = Repository.scan(args.directory, RuntimeOptions())
        repository.load()
    except RepositoryError as exc:
        return _fail(str(exc))
    for model in repository.models():
        entry = repository.entry(model.name)
        print(f"{model.name} version {model.version}{_routing(entry, model.version)}: ready")
        # What clients see: a text model takes text, whatever its graph takes.
        signature = entry.runners[model.version].signature
        for kind, specs in (("input", signature.inputs), ("output", signature.outputs)):
            for spec in specs:
                print(f"  {kind:6} {spec.name}: {spec.datatype} {list(spec.shape)}")
    if args.contract is not None:
        problem = _check_contracts(repository, args.contract, set(args.accept_contract))
        if problem:
            return _fail(problem)
    print(f"ok: {len(repository.names)} model(s), {sum(1 for _ in repository.models())} version(s)")
    return 0


def _check_contracts(repository: Repository, path: Path, accepted: set[str]) -> str:
    """Compare every model version with the snapshot, then record the repository's contracts.

    Returns:
        The one-line refusal, or "" when the repository keeps every recorded contract (or
        the operator accepted the changes).
    """
    from app.models.contract import Contract, ContractFileError, breaks, load, save

    try:
        recorded = load(path)
        versions = {
            (model.name, model.version): Contract.of(
                repository.entry(model.name).runners[model.version].signature
            )
            for model in repository.models()
        }
        current = {
            name: versions[name, repository.entry(name).default_version]
            for name in repository.names
        }
        if recorded is None:
            save(path, current)
            print(f"contract snapshot written to {path}")
            return ""
        problems: list[tuple[str, str]] = []  # (model, what breaks)
        for (name, version), contract in versions.items():
            old = recorded.get(name)
            if old is None or name in accepted:
                continue
            problems += [
                (name, f"model {name!r} version {version}: {found}")
                for found in breaks(old, contract)
            ]
        problems += [
            (name, f"model {name!r} is no longer served")
            for name in sorted(set(recorded) - set(current) - accepted)
        ]
        if problems:
            names = sorted({name for name, _ in problems})
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            accept = " ".join(f"--accept-contract {n}" for n in names)
            return (
                f"{problems[0][1]}{more}: that breaks the contract recorded in {path}; pass "
                f"{accept} to accept it"
            )
        save(path, {**{n: c for n, c in recorded.items() if n not in accepted}, **current})
    except ContractFileError as exc:
        return str(exc)
    print(f"contracts kept; snapshot {path} updated")
    return ""


def check_config(args: argparse.Namespace) -> int:
    """Validate one settings file on its own."""
    try:
        load_settings(args.file, env={}, check_repository=False)
    except SettingsError as exc:
        return _fail(str(exc))
    print(f"ok: {args.file} is valid")
    return 0


def health(args: argparse.Namespace) -> int:
    """Probe the server's readiness through its first listening address."""
    try:
        settings = load_settings(_config_path(args), check_repository=False)
    except SettingsError as exc:
        return _fail(str(exc))
    if not 0 < args.timeout <= 300:
        return _fail(f"--timeout {args.timeout:g} is out of range: use more than 0, at most 300")
    address = settings.server.bind[0]
    try:
        status, _ = local_get(address, READY_PATH, args.timeout)
    except OSError as exc:
        print(f"onnx-appliance: not answering on {address}: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    if status != 200:
        print(f"onnx-appliance: not ready on {address}: HTTP {status}", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(f"ready on {address}")
    return 0


#: (flag, attribute, low, high) of the rollout thresholds an operator may set.
_THRESHOLD_RANGES = (
    ("--interval-s", "interval_s", 0.1, 86_400.0),
    ("--min-requests", "min_requests", 1, 10_000_000),
    ("--max-holds", "max_holds", 0, 1000),
    ("--max-error-increase", "max_error_increase", 0.0, 1.0),
    ("--max-latency-ratio", "max_latency_ratio", 1.0, 1000.0),
    ("--min-latency-ms", "min_latency_ms", 0.0, 60_000.0),
    ("--min-agreement", "min_agreement", 0.0, 1.0),
    ("--max-abs-difference", "max_abs_difference", 0.0, 1e9),
)


def rollout(args: argparse.Namespace) -> int:
    """Start, resume, show or clear a model's gradual rollout."""
    from app.models.rollout import RolloutFileError, Thresholds, read_state, state_path
    from app.rollout import Controller, RolloutError, load_or_start, new_state, parse_steps

    try:
        settings = load_settings(_config_path(args), check_repository=True)
    except SettingsError as exc:
        return _fail(str(exc))
    if not settings.models.rollouts_dir:
        return _fail("models.rollouts_dir is empty: rollouts need a folder for their state")
    directory = Path(settings.models.rollouts_dir)
    path = state_path(directory, args.model)
    try:
        if args.status:
            found = read_state(path)
            if found is None:
                print(f"no rollout of {args.model!r} in {directory}")
            else:
                import msgspec

                print(msgspec.json.format(msgspec.json.encode(found), indent=2).decode())
            return 0
        if args.clear:
            found = read_state(path)
            if found is not None and found.status == "running":
                return _fail(f"the rollout of {args.model!r} is still running; let it finish")
            path.unlink(missing_ok=True)
            print(f"cleared; reload the server for {args.model!r} to take model.toml's traffic")
            return 0
    except (RolloutFileError, OSError) as exc:
        return _fail(str(exc))
    values = {}
    for flag, name, low, high in _THRESHOLD_RANGES:
        value = getattr(args, name)
        if not low <= value <= high:  # NaN too: every comparison with it is false
            return _fail(f"{flag} {value:g} is out of range {low:g}..{high:g}")
        values[name] = value
    try:
        steps = parse_steps(args.steps)
    except ValueError as exc:
        return _fail(str(exc))
    plan = _rollout_plan(settings, args, directory)
    if isinstance(plan, str):
        return _fail(plan)
    primary, reload_signal = plan
    from app.logging import configure_logging

    configure_logging(settings.logging.level, settings.logging.format)
    thresholds = Thresholds(**values)
    try:
        state, resumed = load_or_start(
            directory,
            args.model,
            lambda: new_state(args.model, primary, args.to, steps, thresholds),
            args.to,
        )
        if not resumed:
            from app.models.rollout import write_state

            write_state(path, state)  # the first step is on record before it is applied
    except (ValueError, RolloutFileError) as exc:
        return _fail(str(exc))
    import structlog

    structlog.get_logger("app.rollout").info(
        "rollout_resumed" if resumed else "rollout_started",
        model=state.model, primary=state.primary, candidate=state.candidate,
        steps=state.steps, step=state.step, state_file=str(path),
    )  # fmt: skip
    controller = Controller(
        path, settings.server.bind[0], reload_signal, settings.server.reload_timeout + 30.0
    )
    try:
        final = controller.run(state)
    except (RolloutError, RolloutFileError) as exc:
        structlog.get_logger("app.rollout").error("rollout_stopped", error=str(exc))
        print(f"onnx-appliance: rollout stopped: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    return 0 if final.status == "complete" else EXIT_UNHEALTHY


def drift(args: argparse.Namespace) -> int:
    """Capture a drift reference from the running server, or show one and the scores."""
    import msgspec
    from prometheus_client.parser import text_string_to_metric_families

    from app.client import NoMetrics, local_metrics
    from app.drift import TooLittleTraffic, capture_reference, reference_path
    from app.files import write_atomically
    from app.models.drift import read_reference

    try:
        settings = load_settings(_config_path(args), check_repository=False)
    except SettingsError as exc:
        return _fail(str(exc))
    if not settings.models.drift_dir:
        return _fail("models.drift_dir is empty: drift references need a folder")
    if not settings.metrics.enabled:
        return _fail("drift statistics travel in the server's metrics: metrics.enabled is off")
    path = reference_path(Path(settings.models.drift_dir), args.model)
    address = settings.server.bind[0]
    try:
        if args.show:
            reference = read_reference(path, args.model) if path.exists() else None
            text = local_metrics(address)
            scores = {
                (s.labels["version"], s.labels["input"]): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "onnx_appliance_input_drift" and s.labels.get("model") == args.model
            }
            shown = {
                "reference": msgspec.to_builtins(reference) if reference else None,
                "scores": [
                    {"version": v, "input": i, "score": round(score, 6)}
                    for (v, i), score in sorted(scores.items())
                ],
            }
            print(msgspec.json.format(msgspec.json.encode(shown), indent=2).decode())
            return 0
        seconds = args.capture_reference
        if not 1 <= seconds <= 86_400:
            return _fail(f"--capture-reference {seconds:g} is out of range 1..86400 seconds")
        if not 1 <= args.min_rows <= 1_000_000_000:
            return _fail(f"--min-rows {args.min_rows} is out of range 1..1000000000")
        reference = capture_reference(
            lambda: local_metrics(address), args.model, seconds, args.min_rows
        )
        write_atomically(path, msgspec.json.format(msgspec.json.encode(reference), indent=2))
    except (NoMetrics, TooLittleTraffic) as exc:
        print(f"onnx-appliance: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    except OSError as exc:
        return _fail(f"cannot write {path}: {exc}")
    features = sum(len(f) for f in reference.inputs.values())
    print(f"reference of {args.model!r} written to {path} ({features} features); scored from now")
    return 0


def _rollout_plan(
    settings: Settings, args: argparse.Namespace, directory: Path
) -> tuple[int, Any] | str:
    """The primary version and how to reload, or what is wrong."""
    from app.errors import ApplianceError
    from app.models.errors import RepositoryError
    from app.models.onnx import RuntimeOptions
    from app.models.repository import Repository
    from app.rollout import reloader

    if not settings.metrics.enabled:
        return "the rollout judges from the server's metrics: metrics.enabled must be true"
    try:
        repository = Repository.scan(
            Path(settings.models.repository), RuntimeOptions(), rollouts=directory
        )
        entry = repository.entry(args.model)
    except (RepositoryError, ApplianceError) as exc:
        return str(exc)
    versions = ", ".join(map(str, sorted(entry.versions)))
    if args.to not in entry.versions:
        return f"model {args.model!r} has no version {args.to} (versions: {versions})"
    primary = args.primary
    if primary is None:
        shares = {int(v): s for v, s in entry.traffic_shares().items() if int(v) != args.to}
        primary = max(shares, key=lambda v: (shares[v], v)) if shares else None
    if primary is None or primary == args.to or primary not in entry.versions:
        return f"model {args.model!r} needs a primary version other than {args.to} (--from)"
    pidfile = args.pidfile or settings.server.pidfile
    if args.pid is None and not pidfile and not args.reload_command:
        return (
            "no way to reload the server: pass --reload-command (under systemd: "
            "'systemctl reload onnx-appliance'), --pid, or set server.pidfile"
        )
    return primary, reloader(args.pid, pidfile, args.reload_command)


def _routing(entry: ModelEntry, version: int) -> str:
    """How requests that name no version reach this version, for ``check``'s listing."""
    if entry.config.traffic:
        return f" (traffic {entry.traffic_shares().get(str(version), 0.0):.3g}%)"
    return " (default)" if version == entry.default_version else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``onnx-appliance`` command."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "reload":
        return reload(args)
    if args.command == "keys":
        return keys(args)
    if args.command == "check-config":
        return check_config(args)
    if args.command == "health":
        return health(args)
    if args.command == "rollout":
        return rollout(args)
    if args.command == "drift":
        return drift(args)
    if args.command == "check":
        import structlog

        from app.logging import configure_logging

        configure_logging("warning")
        structlog.contextvars.clear_contextvars()
        return check(args)
    print(f"onnx-appliance {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
