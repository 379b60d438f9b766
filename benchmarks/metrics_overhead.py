"""What metrics cost: lock() pairs/s with metrics off, with the Prometheus exporter, and with
the OpenTelemetry exporter (SDK meter provider, in-memory reader), in the same run.

    python benchmarks/metrics_overhead.py memory://bench sqlite:////tmp/bench.db [--pairs N]
    python benchmarks/metrics_overhead.py redis://127.0.0.1:PORT/0

Each pair is ``with coordinator.lock(name, ttl=30): pass`` (renewal on). Rounds alternate
off / prometheus / otel and the median of each is reported with its ratio to "off"; the goal is
>= 0.95x with metrics on. Numbers belong here, never in tests.

On a busy shared machine the wall clock is noisy; instructions are not. ``--only MODE --pairs
N`` runs N pairs in one mode and nothing else, for ``valgrind --tool=callgrind``: the difference
between two runs with different N, divided by the difference in N, is the instructions per
pair, whatever else the machine is doing::

    for mode in off prometheus; do for n in 200 4200; do
      valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python benchmarks/metrics_overhead.py memory://cg --only $mode --pairs $n 2>&1 |
        grep Collected
    done; done
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coordlock
from coordlock import _observe


def pairs_per_second(coordinator: coordlock.RunCoordinator, n: int, name: str) -> float:
    lock = coordinator.lock  # type: ignore[attr-defined]
    started = time.perf_counter()
    for _ in range(n):
        with lock(name, ttl=30):
            pass
    return n / (time.perf_counter() - started)


def off() -> Callable[[], None]:
    assert not _observe.observers, "an observer is still registered"
    return lambda: None


def prometheus() -> Callable[[], None]:
    from prometheus_client import CollectorRegistry

    import coordlock.metrics.prometheus as exporter

    registry = CollectorRegistry()
    exporter.enable(registry)
    return lambda: exporter.disable(registry) and None


def otel() -> Callable[[], None]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import coordlock.metrics.otel as exporter

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    observer = exporter.enable(meter_provider=provider)

    def stop() -> None:
        exporter.disable(observer)
        provider.shutdown()

    return stop


MODES: dict[str, Callable[[], Callable[[], None]]] = {
    "off": off, "prometheus": prometheus, "otel": otel,
}  # fmt: skip


def bench(url: str, pairs: int, rounds: int) -> None:
    coordinator = coordlock.connect(url)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        pairs_per_second(coordinator, min(pairs, 500), name)  # warm-up
        results: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(rounds):
            for mode, setup in MODES.items():
                stop = setup()
                try:
                    results[mode].append(pairs_per_second(coordinator, pairs, name))
                finally:
                    stop()
    finally:
        coordinator.close()
    base = statistics.median(results["off"])
    scheme = url.split("://", 1)[0]
    for mode, values in results.items():
        median = statistics.median(values)
        print(
            f"{scheme:<10} {mode:<11} {median:>10.0f} pairs/s  {median / base:5.3f}x off  "
            f"(rounds: {', '.join(f'{v:.0f}' for v in values)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", metavar="URL")
    parser.add_argument("--pairs", type=int, default=0, help="pairs per round (default by URL)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--only", choices=sorted(MODES), help="run --pairs pairs in this mode only (callgrind)"
    )
    args = parser.parse_args()
    if args.only:
        for module in ("prometheus_client", "opentelemetry.sdk.metrics"):  # same imports
            __import__(module)
        for url in args.urls:
            coordinator = coordlock.connect(url)
            stop = MODES[args.only]()
            pairs_per_second(coordinator, args.pairs, "callgrind")
            stop()
            coordinator.close()
        return
    for url in args.urls:
        pairs = args.pairs or (20_000 if url.startswith("memory:") else 2_000)
        bench(url, pairs, args.rounds)


if __name__ == "__main__":
    main()
