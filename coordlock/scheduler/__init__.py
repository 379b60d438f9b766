"""Once-per-tick scheduling across instances (placeholder until the scheduler lands)."""

from __future__ import annotations


class Scheduler:  # pragma: no cover - replaced by the scheduler implementation
    """Placeholder."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("the scheduler is not implemented yet")
