"""``onnx-appliance``: serve models, check a repository, print the version."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app import __version__
from app.settings import CONFIG_ENV, Settings, SettingsError, load_settings

EXIT_CONFIG = 2


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
    serve.add_argument("--worker-class", choices=["gthread", "sync"])
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

    sub.add_parser("version", help="print the version")
    return parser


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


def _prepare_metrics_dir(settings: Settings) -> None:
    """Point prometheus_client at a clean multiprocess directory before workers import it."""
    path = settings.metrics.multiproc_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if not path:
        path = tempfile.mkdtemp(prefix="onnx-appliance-metrics-")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # Files left by an earlier run would be added to this run's counters.
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def serve(args: argparse.Namespace) -> int:
    """Validate everything in the master, then run gunicorn until it is told to stop."""
    config = args.config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    try:
        settings = load_settings(
            config, overrides=_overrides(args), check_repository=not args.model
        )
    except SettingsError as exc:
        return _fail(str(exc))
    if settings.metrics.enabled:
        _prepare_metrics_dir(settings)

    from app.gunicorn_conf import ApplianceApplication
    from app.logging import GunicornLogger, configure_logging
    from app.models.errors import RepositoryError
    from app.wsgi import build_repository

    configure_logging(settings.logging.level, settings.logging.format)
    GunicornLogger.log_format = settings.logging.format
    try:
        names = build_repository(settings, None, args.model or "", args.name or "").names
    except RepositoryError as exc:
        return _fail(str(exc))
    ApplianceApplication(settings, names, args.model or "", args.name or "").run()
    return 0


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
        default = " (default)" if model.version == entry.default_version else ""
        print(f"{model.name} version {model.version}{default}: ready")
        for kind, specs in (("input", model.inputs), ("output", model.outputs)):
            for spec in specs:
                print(f"  {kind:6} {spec.name}: {spec.datatype} {list(spec.shape)}")
    print(f"ok: {len(repository.names)} model(s), {sum(1 for _ in repository.models())} version(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``onnx-appliance`` command."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
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
