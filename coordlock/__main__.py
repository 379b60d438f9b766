"""``python -m coordlock``: the ``coordlock`` command (same as the console script)."""

from .cli import script

if __name__ == "__main__":  # pragma: no cover - process entry point
    script()
