"""Per-example dissimilarity delta between the clean output and another one.

delta(G(x_r), other) is read only at the dataset's scored positions, where `other` is a patched
run G_H(x_r, x_c) (giving the unexplained effect UE) or the counterfactual run G(x_c) (giving
the total effect TE). Every metric is non-negative per example, so errors on different inputs
never cancel when averaged:

- ``kl`` (default): KL(P_clean || P_other) of the next-token distributions at each scored
  position (in float64), averaged over the example's scored positions.
- ``loss``: |loss_clean - loss_other| per scored position t, where loss = -log p(reference[t+1]),
  then the mean over scored positions. The last position has no target: scoring it is an error.
- ``logit_diff``: |(logit[answer] - logit[wrong_answer])_clean - (same)_other| at the example's
  last scored position; the dataset must carry ``answer`` and ``wrong_answer``.
- ``"module:function"``: a user callable ``fn(clean_logits, other_logits, batch) -> [batch]``,
  imported by name (so it must be importable wherever the sweep runs).

Scores over examples (AUE, ATE, proportion explained with intervals) are `pipeline.intervals`'.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pathpatch.data.pairs import PairDataset
from pathpatch.engine.effects import MIN_ATE as MIN_ATE  # its home is torch-free; kept here too
from pathpatch.engine.effects import SIGNED_METRICS
from pathpatch.errors import PathPatchError

MetricFn = Callable[[torch.Tensor, torch.Tensor, PairDataset], torch.Tensor]
"""fn(clean_logits [batch, pos, vocab], other_logits [batch, pos, vocab], batch) -> [batch]."""

DEFAULT_METRIC = "kl"

# Positions are processed in chunks of about this many float64 logits, so memory stays bounded
# when a large vocabulary meets many scored positions.
_CHUNK_ELEMENTS = 2**23


Against = Callable[[torch.Tensor, PairDataset], Callable[[torch.Tensor], torch.Tensor]]
"""against(clean_logits, batch) -> (other_logits -> [batch]): the clean side computed once."""


@dataclass(frozen=True)
class Metric:
    """A named per-example dissimilarity, in one form for built-ins and user callables alike.

    Attributes:
        name: ``kl``, ``loss``, ``logit_diff`` or the ``module:function`` spec of a callable;
            part of a work item's identity.
        against_clean: (clean_logits, batch) -> (other_logits -> [batch]): the clean logits'
            share (KL's clean probabilities, loss's clean log-probabilities) is computed once
            per batch instead of once per hypothesis. A plain fn(clean, other, batch) becomes
            this form through `Metric.from_fn`.
        check: optional dataset requirement (raises PathPatchError), run by
            `check_dataset` before any model work and again by `against` unless its caller
            checked the whole dataset already (`engine.evaluate`: once per call).
        value: optional statistic of one output per example, signed (``logit_diff``: the
            answer's logit minus the wrong answer's at the last scored position, MIB's m).
            Where there is one, `engine.evaluate` stores it beside the deltas: columns `m`
            (the hypothesis), `m_clean` and `m_cf` (the two runs), which MIB's faithfulness
            f(C) = (m(C) - m(cf)) / (m(clean) - m(cf)) is computed from.
        scored_only: the metric reads logits at the batch's scored positions only (built-ins),
            so the engine unembeds those positions only and leaves the others NaN. A user
            callable may read any position: its logits are complete.
        value_of: optional `value` in the form of `against_clean`: (logits, batch) -> (logits
            -> [batch]), what it reads of the batch (answers, positions) read and checked once
            for every output of the batch (`values`).
    """

    name: str
    against_clean: Against
    check: Callable[[PairDataset], None] | None = None
    scored_only: bool = False
    value: Callable[[torch.Tensor, PairDataset], torch.Tensor] | None = None
    value_of: Against | None = None

    @classmethod
    def from_fn(cls, name: str, fn: MetricFn,
                check: Callable[[PairDataset], None] | None = None) -> Metric:
        """A metric from fn(clean_logits, other_logits, batch) -> [batch] (a user's callable):
        the clean side is not split out, so fn sees both logits on every call."""
        return cls(name, lambda clean, batch: lambda other: fn(clean, other, batch), check)

    def check_dataset(self, dataset: PairDataset) -> None:
        """Raise PathPatchError if this metric cannot be read on `dataset` (e.g. no answers)."""
        if self.check is not None:
            self.check(dataset)

    def per_example(
        self, clean_logits: torch.Tensor, other_logits: torch.Tensor, batch: PairDataset
    ) -> torch.Tensor:
        """delta(clean, other) per example: `against(clean_logits, batch)(other_logits)`."""
        return self.against(clean_logits, batch)(other_logits)

    def against(
        self, clean_logits: torch.Tensor, batch: PairDataset, *, checked: bool = False
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """delta(clean, ·) per example, for the many other outputs of one batch.

        Args:
            clean_logits: [batch, pos, vocab] logits of G(x_r).
            batch: the examples the logits belong to (scored positions, answers).
            checked: the caller ran `check_dataset` on a dataset `batch` is part of.

        Returns:
            other_logits [batch, pos, vocab] (G_H(x_r, x_c) or G(x_c)) -> [batch] float64,
            finite and >= 0, on the logits' device.

        Raises:
            PathPatchError: shapes disagree, the dataset lacks what the metric needs, or a
                (user) metric returns the wrong shape, negative or non-finite values.
        """
        self._check_logits("clean_logits", clean_logits, batch)
        if not checked:
            self.check_dataset(batch)
        raw = self.against_clean(clean_logits, batch)

        def delta(other_logits: torch.Tensor) -> torch.Tensor:
            self._check_logits("other_logits", other_logits, batch)
            if clean_logits.shape != other_logits.shape:
                raise PathPatchError(
                    f"metric '{self.name}': clean_logits {list(clean_logits.shape)} and "
                    f"other_logits {list(other_logits.shape)} differ in shape"
                )
            return self._checked(raw(other_logits), batch)

        return delta

    def values(self, logits: torch.Tensor, batch: PairDataset
               ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The metric's `value` for the many outputs of one batch: logits [batch, pos, vocab]
        -> [batch], with what it reads of the batch read once (`value_of`), from `logits`
        (any output of the batch: only its shape and device are read)."""
        if self.value is None:
            raise PathPatchError(f"metric '{self.name}' has no value (a statistic of one output)")
        if self.value_of is not None:
            return self.value_of(logits, batch)
        return lambda other: self.value(other, batch)

    def _check_logits(self, label: str, logits: torch.Tensor, batch: PairDataset) -> None:
        expected = (len(batch), batch.seq_len)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
            got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise PathPatchError(
                f"metric '{self.name}': {label} must be [batch, pos, vocab], got {got}"
            )
        if tuple(logits.shape[:2]) != expected:
            raise PathPatchError(
                f"metric '{self.name}': {label} has shape {list(logits.shape)} but the batch "
                f"is [batch, pos] = {list(expected)}"
            )

    def _checked(self, out: torch.Tensor, batch: PairDataset) -> torch.Tensor:
        """`out` as [batch] float64, or a PathPatchError naming the examples that are wrong."""
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(batch),):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise PathPatchError(
                f"metric '{self.name}' returned {got}; a metric returns one value per example, "
                f"a tensor of shape [{len(batch)}]"
            )
        if out.is_complex() or out.dtype == torch.bool:
            raise PathPatchError(f"metric '{self.name}' returned dtype {out.dtype}, not real")
        out = out.to(torch.float64)
        bad = ~torch.isfinite(out)
        if bool(bad.any()):
            rows = bad.nonzero()[:, 0].tolist()[:5]
            ids = [int(batch.example_ids[r]) for r in rows]
            raise PathPatchError(
                f"metric '{self.name}' is not finite for example_ids {ids} (values "
                f"{[float(out[r]) for r in rows]}); the logits likely contain NaN or inf: check "
                "the model dtype (float16 overflows) and its inputs"
            )
        negative = out < 0
        if bool(negative.any()):
            row = int(negative.nonzero()[0, 0])
            raise PathPatchError(
                f"metric '{self.name}' is negative ({float(out[row])}) for example_id "
                f"{int(batch.example_ids[row])}; a dissimilarity must be >= 0 so errors cannot "
                "cancel across inputs: return e.g. an absolute difference"
            )
        return out


def get_metric(spec: str | Metric = DEFAULT_METRIC) -> Metric:
    """The metric named by `spec`: a built-in name, ``"module:function"``, or a Metric.

    Raises:
        PathPatchError: unknown name (the message lists the allowed ones), or a callable
            that cannot be imported.
    """
    if isinstance(spec, Metric):
        return spec
    if not isinstance(spec, str):
        raise PathPatchError(f"metric must be a name or a Metric, got {type(spec).__name__}")
    if spec in BUILTIN_METRICS:
        return BUILTIN_METRICS[spec]
    if ":" in spec:
        return Metric.from_fn(spec, _import_callable(spec))
    raise PathPatchError(
        f"unknown metric {spec!r}; allowed: {', '.join(repr(n) for n in BUILTIN_METRICS)}, or "
        "'module:function' for your own fn(clean_logits, other_logits, batch) -> [batch]"
    )


def _import_callable(spec: str) -> MetricFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PathPatchError(
            f"metric {spec!r}: a callable metric is written 'module:function' "
            "(e.g. 'my_metrics:top1_change')"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            raise PathPatchError(
                f"metric {spec!r}: no module named {module_name!r}; it must be importable "
                "(on PYTHONPATH or installed) on the driver and every worker"
            ) from e
        raise PathPatchError(
            f"metric {spec!r}: importing {module_name!r} failed: {e}; install what it needs"
        ) from e
    except Exception as e:
        raise PathPatchError(
            f"metric {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}"
        ) from e
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PathPatchError(
                f"metric {spec!r}: module {module_name!r} has no attribute {attr!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise PathPatchError(
            f"metric {spec!r}: {attr!r} is a {type(obj).__name__}, not a function "
            "fn(clean_logits, other_logits, batch) -> [batch]"
        )
    return obj  # type: ignore[return-value]


# --- built-in metrics -----------------------------------------------------------------------


def _scored_index(batch: PairDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(example, position) of every scored position, each [n_scored], in row-major order."""
    rows, positions = batch.scored.to(device).nonzero(as_tuple=True)
    return rows, positions


def _chunks(n: int, vocab: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _mean_over_scored(
    values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, batch: PairDataset
) -> torch.Tensor:
    """Per-example mean of per-position `values` [n_scored] -> [batch] float64.

    Scatters into a dense [batch, pos] grid (unique indices, no atomics) and reduces along
    pos, so the result is bitwise deterministic on every device.
    """
    grid = torch.zeros(len(batch), batch.seq_len, dtype=torch.float64, device=values.device)
    grid[rows, positions] = values
    counts = batch.scored.to(values.device).sum(dim=1).to(torch.float64)
    return grid.sum(dim=1) / counts


class _ScoredRows:
    """The logits at a batch's scored positions, chunk by chunk, as float64 rows.

    Rows are copied run by run (scored positions are mostly consecutive: the second half of
    every example, say): cheaper than a fancy-index gather of the same rows
    (docs/MEASUREMENTS.md).
    """

    def __init__(self, batch: PairDataset, like: torch.Tensor):
        self.rows, self.positions = _scored_index(batch, like.device)
        flat = (self.rows * batch.seq_len + self.positions).tolist()
        self.chunks = [(part, _consecutive_runs(flat[part]))
                       for part in _chunks(len(flat), like.shape[-1])]

    @staticmethod
    def log_softmax(logits: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        """log_softmax (float64) of one chunk's rows of `logits`."""
        flat = logits.reshape(-1, logits.shape[-1])
        n = sum(length for _, _, length in runs)
        values = logits.new_empty((n, logits.shape[-1]), dtype=torch.float64)
        for dst, src, length in runs:
            values[dst:dst + length].copy_(flat[src:src + length])
        return torch.log_softmax(values, dim=-1)


def _consecutive_runs(flat: list[int]) -> list[tuple[int, int, int]]:
    """(destination, source, length) of each run of consecutive indices in `flat`."""
    runs: list[tuple[int, int, int]] = []
    for dst, src in enumerate(flat):
        if runs and runs[-1][1] + runs[-1][2] == src:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((dst, src, 1))
    return runs


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] sums of a * b along the last dimension, as one batched product."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _kl_against(clean: torch.Tensor, batch: PairDataset) -> Callable[[torch.Tensor], torch.Tensor]:
    """KL(p || q) = sum p log p - sum p log q per scored position. The clean side (p and sum p log p)
    is computed once per batch, so an other output costs a float64 copy of its scored rows, one
    log_softmax and one dot product per position, instead of two log_softmaxes and four
    elementwise passes per output (docs/MEASUREMENTS.md). Identical logits give exactly 0: both
    sums are the same operations on the same numbers. Memory: p, float64 [scored positions,
    vocab], is kept for the batch, within the budget's metric share (`engine.MemoryBudget`); the
    rest is one chunk at a time."""
    scored = _ScoredRows(batch, clean)
    kept = []
    for part, runs in scored.chunks:
        log_p = scored.log_softmax(clean, runs)
        p = log_p.exp()
        ruled_out = p == 0  # 0 * log(0 / q) = 0: tokens the clean run rules out add nothing
        ruled_out = ruled_out if bool(ruled_out.any()) else None
        if ruled_out is not None:
            log_p.masked_fill_(ruled_out, 0.0)
        kept.append((part, runs, p, ruled_out, _row_dots(p, log_p)))

    def kl(other: torch.Tensor) -> torch.Tensor:
        values = torch.empty(len(scored.rows), dtype=torch.float64, device=clean.device)
        for part, runs, p, ruled_out, p_log_p in kept:
            log_q = scored.log_softmax(other, runs)
            if ruled_out is not None:
                log_q.masked_fill_(ruled_out, 0.0)
            values[part] = p_log_p - _row_dots(p, log_q)
        # KL >= 0; rounding can leave -1e-17 on near-identical distributions.
        return _mean_over_scored(values.clamp_min(0.0), scored.rows, scored.positions, batch)

    return kl


def _check_loss(batch: PairDataset) -> None:
    last = batch.scored[:, -1]
    if bool(last.any()):
        ids = batch.example_ids[last].tolist()
        shown = f"{ids[:5]}".rstrip("]") + (", ...]" if len(ids) > 5 else "]")
        raise PathPatchError(
            f"metric 'loss' predicts the next reference token, but the dataset scores the last "
            f"position ({batch.seq_len - 1}), which has none, in {len(ids)} examples "
            f"(example_ids {shown}); unscore the last position or use metric 'kl'"
        )


def _target_log_probs(batch: PairDataset, like: torch.Tensor
                      ) -> tuple[_ScoredRows, Callable[[torch.Tensor], torch.Tensor]]:
    """logits -> [n_scored] float64 log-probabilities of the next reference token at each
    scored position (differentiable: attribution takes its gradient)."""
    scored = _ScoredRows(batch, like)
    targets = batch.reference.to(like.device)[scored.rows, scored.positions + 1]  # (n,)

    def log_probs(logits: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(scored.rows), dtype=torch.float64, device=logits.device)
        for part, runs in scored.chunks:
            out[part] = scored.log_softmax(logits, runs).gather(-1, targets[part, None])[:, 0]
        return out

    return scored, log_probs


def _loss_against(clean: torch.Tensor, batch: PairDataset) -> Callable[[torch.Tensor], torch.Tensor]:
    """The clean log-probabilities of the targets once per batch; an other output costs one
    log_softmax of its scored rows."""
    scored, log_probs = _target_log_probs(batch, clean)
    clean_log_p = log_probs(clean)

    def loss(other: torch.Tensor) -> torch.Tensor:
        values = (clean_log_p - log_probs(other)).abs()  # |loss_clean - loss_other|
        return _mean_over_scored(values, scored.rows, scored.positions, batch)

    return loss


def loss_value(logits: torch.Tensor, batch: PairDataset) -> torch.Tensor:
    """[batch] float64: the next-token loss (-log p of the next reference token), averaged over
    each example's scored positions; the signed statistic behind metric 'loss'."""
    _check_loss(batch)
    scored, log_probs = _target_log_probs(batch, logits)
    return _mean_over_scored(-log_probs(logits), scored.rows, scored.positions, batch)


def _check_logit_diff(batch: PairDataset) -> None:
    missing = [n for n in ("answer", "wrong_answer") if getattr(batch, n) is None]
    if missing:
        raise PathPatchError(
            f"metric 'logit_diff' needs the dataset's answer and wrong_answer tokens, but it "
            f"has no {' or '.join(missing)}; add the columns 'answer' and 'wrong_answer' or use "
            "metric 'kl'"
        )


def _logit_diff_value(logits: torch.Tensor, batch: PairDataset) -> torch.Tensor:
    """[batch] float64: the answer's logit minus the wrong answer's at the last scored position."""
    return _logit_diff_of(logits, batch)(logits)


def _logit_diff_against(clean: torch.Tensor, batch: PairDataset) -> Callable[[torch.Tensor], torch.Tensor]:
    """The clean logit difference once per batch; an other output costs its own."""
    diff = _logit_diff_of(clean, batch)
    clean_diff = diff(clean)
    return lambda other: (clean_diff - diff(other)).abs()


def _logit_diff_of(clean: torch.Tensor, batch: PairDataset) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits -> [batch] logit differences at the batch's last scored positions (checked once)."""
    device = clean.device
    vocab = clean.shape[-1]
    answer = batch.answer.to(device)
    wrong = batch.wrong_answer.to(device)
    for name, tokens in (("answer", answer), ("wrong_answer", wrong)):
        if bool((tokens >= vocab).any()):
            row = int((tokens >= vocab).nonzero()[0, 0])
            raise PathPatchError(
                f"metric 'logit_diff': {name} {int(tokens[row])} of example_id "
                f"{int(batch.example_ids[row])} is outside the vocabulary [0, {vocab})"
            )
    scored = batch.scored.to(device)
    arange = torch.arange(batch.seq_len, device=device)
    last = torch.where(scored, arange, -1).amax(dim=1)  # (batch,) last scored position
    rows = torch.arange(len(batch), device=device)

    def diff(logits: torch.Tensor) -> torch.Tensor:
        at = logits[rows, last].to(torch.float64)  # (batch, vocab)
        return at[rows, answer] - at[rows, wrong]

    return diff


BUILTIN_METRICS: dict[str, Metric] = {
    "kl": Metric("kl", _kl_against, scored_only=True),
    "loss": Metric("loss", _loss_against, _check_loss, scored_only=True),
    "logit_diff": Metric("logit_diff", _logit_diff_against, _check_logit_diff, scored_only=True,
                         value=_logit_diff_value, value_of=_logit_diff_of),
}
"""Built-in metrics by name; ``kl`` is the default."""
assert SIGNED_METRICS == {n for n, m in BUILTIN_METRICS.items() if m.value is not None}, (
    "effects.SIGNED_METRICS must name the built-ins with a value")
