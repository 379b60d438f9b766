"""``python -m coordlock.cli``: the ``coordlock`` command."""

from . import script

if __name__ == "__main__":  # pragma: no cover - process entry point
    script()
