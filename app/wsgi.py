"""The Falcon application: ``create_app(settings, repository)`` wires routes to resources."""

from __future__ import annotations

from typing import Any

import falcon

from app.keys import KeyStore
from app.metrics import Metrics
from app.middleware import OPEN_PATHS, Authenticator, RequestContext
from app.models.onnx import RuntimeOptions
from app.models.repository import Repository
from app.ratelimit import RateLimiter
from app.resources import errors
from app.resources.generation import (
    ChatCompletionsResource,
    CompletionsResource,
    GenerateResource,
    WebSocketResource,
)
from app.resources.health import (
    LIVE_PATHS,
    READY_PATHS,
    LiveResource,
    ReadyResource,
    ServerResource,
)
from app.resources.image import ClassifyResource
from app.resources.metrics import MetricsResource
from app.resources.openapi import OpenApiResource
from app.resources.text import (
    DetokenizeResource,
    EmbedResource,
    ModelListResource,
    OpenAIEmbeddingsResource,
    TextsEmbeddingResource,
    TokenizeResource,
)
from app.resources.v1 import ModelStatusResource, PredictResource
from app.resources.v2 import ModelsResource, RepositoryIndexResource
from app.settings import LimitsSettings, Settings


def create_app(
    settings: Settings,
    repository: Repository,
    metrics: Metrics | None = None,
    keys: KeyStore | None = None,
    limiter: RateLimiter | None = None,
) -> falcon.App[Any, Any]:
    """Build the WSGI app around an already scanned repository.

    Args:
        settings: Validated settings.
        repository: The models to serve (loaded or not: readiness reflects it).
        metrics: Metrics to record into; a fresh set when omitted.
        keys: API keys; none configured means every route is open.
        limiter: Shared rate-limit buckets for the keys; None disables rate limiting.

    Returns:
        The Falcon app.
    """
    metrics = metrics or Metrics()
    middleware: list[Any] = [RequestContext(metrics)]
    if settings.cors.allow_origins:
        middleware.append(
            falcon.CORSMiddleware(
                allow_origins=settings.cors.allow_origins,
                expose_headers=[
                    "X-Request-ID",
                    "X-Model-Version",
                    "Retry-After",
                    "Inference-Header-Content-Length",
                ],
            )
        )
    if keys is not None and keys.enabled:  # without keys every route is open: no check
        middleware.append(Authenticator(keys, limiter, settings.auth.rate, settings.auth.burst))
    app = falcon.App(middleware=middleware, media_type=falcon.MEDIA_JSON)
    # Bodies are read and parsed by the resources themselves, with a hard size cap.
    app.req_options.auto_parse_form_urlencoded = False
    app.resp_options.secure_cookies_by_default = True
    errors.install(app)

    _add_model_routes(app, repository, settings.limits)
    _add_text_routes(app, repository, settings.limits)
    if settings.metrics.enabled:
        app.add_route("/metrics", MetricsResource(metrics))
    app.add_route("/openapi.json", OpenApiResource(app, OPEN_PATHS))
    return app


def _add_model_routes(
    app: falcon.App[Any, Any], repository: Repository, limits: LimitsSettings
) -> None:
    """Health, OIP v2, the simple JSON routes and image uploads."""
    ready = ReadyResource(repository)
    live = LiveResource()
    models = ModelsResource(repository, limits)
    predict = PredictResource(repository, limits)

    app.add_route("/v2", ServerResource())
    for path in LIVE_PATHS:
        app.add_route(path, live)
    for path in READY_PATHS:
        app.add_route(path, ready)
    app.add_route("/v2/models/{model}", models)
    app.add_route("/v2/models/{model}/ready", models, suffix="ready")
    app.add_route("/v2/models/{model}/infer", models, suffix="infer")
    app.add_route("/v2/models/{model}/versions/{version}", models)
    app.add_route("/v2/models/{model}/versions/{version}/ready", models, suffix="ready")
    app.add_route("/v2/models/{model}/versions/{version}/infer", models, suffix="infer")
    app.add_route("/v2/repository/index", RepositoryIndexResource(repository, limits))
    app.add_route("/v1/models/{model}", ModelStatusResource(repository))
    app.add_route("/v1/models/{model}:predict", predict)
    app.add_route("/v1/models/{model}/versions/{version}:predict", predict, suffix="versioned")
    app.add_route("/predict", predict)
    classify = ClassifyResource(repository, limits)
    app.add_route("/v1/models/{model}:classify", classify)
    app.add_route("/v1/models/{model}/versions/{version}:classify", classify, suffix="versioned")


def _add_text_routes(
    app: falcon.App[Any, Any], repository: Repository, limits: LimitsSettings
) -> None:
    """OpenAI's model list, embeddings, tokenization and generation."""
    app.add_route("/v1/models", ModelListResource(repository))
    app.add_route("/v1/embeddings", OpenAIEmbeddingsResource(repository, limits))
    app.add_route("/embed", EmbedResource(repository, limits))
    texts = TextsEmbeddingResource(repository, limits)
    app.add_route("/embeddings", texts)
    app.add_route("/batch_embed", texts, suffix="batch")
    app.add_route("/tokenize", TokenizeResource(repository, limits))
    detokenize = DetokenizeResource(repository, limits)
    app.add_route("/detokenize", detokenize)
    app.add_route("/decode", detokenize)
    app.add_route("/generate", GenerateResource(repository, limits))
    app.add_route("/v1/completions", CompletionsResource(repository, limits))
    app.add_route("/v1/chat/completions", ChatCompletionsResource(repository, limits))
    app.add_route("/ws", WebSocketResource(repository, limits))


def runtime_options(settings: Settings) -> RuntimeOptions:
    """Server-wide session options; ``model.toml`` may override them per model."""
    return RuntimeOptions(
        intra_op_threads=settings.effective_intra_op_threads(),
        inter_op_threads=settings.server.inter_op_threads,
        warmup_runs=settings.models.warmup_runs,
        max_batch_rows=settings.limits.max_batch_rows,
        timeout=settings.limits.timeout_ms / 1000,
        max_concurrency=settings.effective_max_concurrency(),
        max_queue=settings.limits.max_queue,
        inline_run_us=settings.server.inline_run_us,
    )


def build_repository(
    settings: Settings, metrics: Metrics | None = None, model_file: str = "", model_name: str = ""
) -> Repository:
    """Scan the configured repository (or one model file) without loading sessions.

    Raises:
        RepositoryError: the repository cannot be served.
    """
    from pathlib import Path

    observer = metrics
    options = runtime_options(settings)
    if model_file:
        return Repository.single_file(Path(model_file), options, model_name or None, observer)
    models = settings.models
    return Repository.scan(
        Path(models.repository),
        options,
        models.default_model,
        observer,
        rollouts=Path(models.rollouts_dir) if models.rollouts_dir else None,
        drift=Path(models.drift_dir) if models.drift_dir else None,
        capture=Path(models.capture_dir) if models.capture_dir else None,
    )
