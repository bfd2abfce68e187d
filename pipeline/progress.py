"""Driver progress: one tqdm bar of work items with examples/s, ETA and failures; `Phases` for
the benchmarks' few long steps."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Items done out of total; postfix shows examples/s, failures and requeues.

    Disabled (no output) when `enabled` is False, e.g. for `--no-progress` or in tests.
    """

    def __init__(self, total: int, *, skipped: int = 0, enabled: bool = True,
                 desc: str = "items"):
        self.bar = tqdm(total=total + skipped, initial=skipped, desc=desc, unit="item",
                        disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                        smoothing=0.1)
        self.start = time.perf_counter()
        self.examples = 0
        self.failed = 0
        self.requeued = 0
        self._clock_started = False
        self._update_postfix()

    def done(self, examples: int) -> None:
        self.examples += examples
        self._advance()

    def fail(self) -> None:
        self.failed += 1
        self._advance()

    def _advance(self) -> None:
        """Count one item. The first one restarts the clock instead of setting a rate: before
        it, workers were starting, and a rate over that would make the first ETA many times
        too long; ETA and examples/s count from it."""
        if self._clock_started or self.bar.disable:
            self._update_postfix()
            self.bar.update(1)
            return
        self._clock_started = True
        n = self.bar.n + 1
        self.bar.reset(total=self.bar.total)
        self.bar.n = self.bar.last_print_n = self.bar.initial = n
        self.start = time.perf_counter()
        self.examples = 0
        self._update_postfix()
        self.bar.refresh()

    def requeue(self) -> None:
        self.requeued += 1
        self._update_postfix()

    def _update_postfix(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(ex_per_s=f"{self.examples / elapsed:.1f}", failed=self.failed,
                             requeued=self.requeued, refresh=False)

    def close(self) -> None:
        self.bar.close()


class Phases:
    """A bar over a benchmark's few long phases, named as each starts (on stderr)."""

    def __init__(self, total: int, desc: str, *, only_on_terminal: bool = False):
        """`only_on_terminal`: show nothing when stderr is not a terminal (a log, a test)."""
        self.desc = desc
        self.bar = tqdm(total=total, desc=desc, unit="phase", file=sys.stderr,
                        dynamic_ncols=True, bar_format="{desc} ({n}/{total} done, {elapsed})",
                        disable=only_on_terminal and not sys.stderr.isatty())
        self.started = False

    def __call__(self, phase: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description_str(f"{self.desc}: {phase}")

    def close(self) -> None:
        """End the bar: "done" after the last phase, else left at the phase that stopped."""
        if self.started and self.bar.n + 1 == self.bar.total:
            self.bar.update(1)
            self.bar.set_description_str(f"{self.desc}: done")
        self.bar.close()


class SearchProgress:
    """A greedy search's edges decided out of all, with the circuit's size and the evaluations
    run and reused (a resumed search replays its written evaluations)."""

    def __init__(self, total: int, *, enabled: bool = True):
        self.bar = tqdm(total=total, desc="search", unit="edge", disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def update(self, decided: int, *, circuit: int, evaluated: int, reused: int) -> None:
        self.bar.set_postfix(circuit=circuit, evaluated=evaluated, reused=reused, refresh=False)
        self.bar.update(decided)

    def done(self, examples: int) -> None:
        """Items are counted per round (`update`): the bar counts edges."""

    def fail(self) -> None:
        """A failed item stops the search (the driver reports it)."""

    def requeue(self) -> None:
        """Requeues are the event log's (`pathpatch status`)."""

    def close(self) -> None:
        self.bar.close()
