"""What the master validated and hands to the workers it forks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.keys import KeyStore
from app.models.repository import Repository
from app.settings import Settings

#: Exit status of a worker that cannot load its models: gunicorn then halts instead of
#: respawning it for ever.
WORKER_BOOT_ERROR = 3


class StartupError(Exception):
    """Settings, repository, keys or listeners cannot be served; the message is one line."""


@dataclass(frozen=True)
class ServingState:
    """Everything the master validated, inherited by the workers it forks.

    Attributes:
        settings: Validated settings.
        repository: Scanned (not loaded) repository; each worker loads its own copy.
        keys: API keys.
        limiter_path: Shared rate-limit state, or None when no key is configured.
        generation: 0 at start, +1 per successful reload.
    """

    settings: Settings
    repository: Repository
    keys: KeyStore
    limiter_path: Path | None
    generation: int
