"""Resolution: a `SweepSpec` turned into a checked `Plan` by loading what it names, on the driver.

Everything that can fail because of the user's input fails here, before a folder is written
or a cluster is touched: the metric, the model, the dataset (vocabulary, masks, metric needs),
the hypotheses (nodes, patterns, mixed-copy bound) and the shards. Errors are
`PathPatchError`s prefixed with the spec key they come from.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from pathpatch.data.pairs import PairDataset, load_parquet
from pathpatch.data.tasks import DATASETS, make_dataset
from pathpatch.data.text import TextOptions, is_text_dataset, load_text
from pathpatch.discovery.attribution import Attribution
from pathpatch.engine import evaluation as engine
from pathpatch.engine.ablation import Intervention, ablation_values
from pathpatch.engine.metrics import BUILTIN_METRICS, get_metric
from pathpatch.errors import PathPatchError
from pathpatch.language.hypothesis_families import load_hypotheses
from pathpatch.model.graph import Graph
from pathpatch.model.loading import load_architecture, load_model, load_tokenizer, model_digest
from pipeline.plan import HypothesisInfo, Plan, Shard, attribution_info, make_plan, shard_dataset
from pipeline.spec import DTYPES, SweepSpec

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
"""The spec's precision names as torch dtypes (the names are torch's own)."""


@dataclass(frozen=True, eq=False)
class Resolved:
    """A spec with everything it names loaded and checked.

    Attributes:
        spec: the spec.
        model: the model as loaded on the driver (CPU).
        dataset: all pairs.
        shards: `pipeline.plan.Shard`s, in order.
        hypotheses: `pathpatch.language.hypotheses.Hypothesis` objects, in spec order (opaque here).
        attributions: `pathpatch.discovery.attribution.Attribution` methods, in spec order.
        plan: the work items.
        warnings: what is valid but likely not meant (a pattern that matches no path).
        ablation: an x_c-free intervention's values (`pathpatch.engine.ablation.Ablation`),
            computed here once from the whole dataset and shipped to every worker; None under
            resample.
    """

    spec: SweepSpec
    model: Any
    dataset: PairDataset
    shards: tuple[Shard, ...]
    hypotheses: tuple[Any, ...]
    plan: Plan
    warnings: tuple[str, ...] = ()
    attributions: tuple[Any, ...] = ()
    ablation: Any = None



def _prefixed(key: str, value: object, err: PathPatchError) -> PathPatchError:
    return PathPatchError(f"{key} = {value!r}: {err}")


RESOLVE_PHASES = 6
"""How many times `resolve` calls its `progress`: model, dataset, hypotheses, validation,
intervention, plan."""


def resolve(spec: SweepSpec, progress: Callable[[str], None] | None = None, *,
            weights: bool = True) -> Resolved:
    """Load and check everything `spec` names; build the plan.

    `progress(phase)` is called as each of the RESOLVE_PHASES phases starts. Without
    `weights` (a dry-run) the model is its architecture alone (`load_architecture`: no weights
    read or allocated, so a model larger than this machine plans), the plan's model digest is
    "" and an x_c-free intervention's values are not computed (they need the weights).

    Raises:
        PathPatchError: naming the spec key and value at fault, with the likely fix.
    """
    step = progress or (lambda phase: None)
    step(f"load model {spec.model}")
    try:
        metric = get_metric(spec.metric)
    except PathPatchError as err:
        raise _prefixed("metric", spec.metric, err) from None
    try:
        model = (load_model(spec.model, device="cpu", dtype=TORCH_DTYPES[spec.dtype]) if weights
                 else load_architecture(spec.model, dtype=TORCH_DTYPES[spec.dtype]))
    except PathPatchError as err:
        raise _prefixed("model", spec.model, err) from None
    except (OSError, RuntimeError, KeyError) as err:
        raise PathPatchError(f"model = {spec.model!r} could not be loaded ({err}); check the "
                             "name or path") from None
    vocab = int(model.cfg.d_vocab)
    step("dataset")
    dataset = load_spec_dataset(spec, vocab, n_ctx=int(model.cfg.n_ctx))
    if metric.name == "loss" and spec.dataset.path and is_text_dataset(spec.dataset.path):
        raise PathPatchError(
            "metric = 'loss': it scores the prompt's next token, but a text dataset scores each "
            "prompt's last token, whose next token is the answer, not part of the prompt (and "
            "padding after shorter prompts); use metric 'logit_diff' (answer against wrong "
            "answer) or 'kl'")
    if metric.check is not None:
        try:
            metric.check(dataset)
        except PathPatchError as err:
            raise _prefixed("metric", spec.metric, err) from None
    if spec.metric not in BUILTIN_METRICS:
        _probe_metric(metric, model, dataset, spec.intervention, weights)

    try:
        shards = tuple(shard_dataset(dataset, spec.shard_size))
    except PathPatchError as err:
        raise _prefixed("shard_size", spec.shard_size, err) from None
    graph = Graph.from_model(model)
    step("hypotheses")
    try:
        hypotheses = tuple(load_hypotheses(spec.hypothesis_entries(), graph))
    except PathPatchError as err:
        raise PathPatchError(f"hypotheses: {err}") from None
    attributions = tuple(Attribution(**entry) for entry in spec.attribution_entries())
    if not hypotheses and not attributions and spec.search is None:
        raise PathPatchError("hypotheses: the entries generate no hypothesis; add a named "
                             "pattern or a family that yields at least one")
    for i, method in enumerate(attributions):
        try:
            method.check(model, metric, spec.intervention)
        except PathPatchError as err:
            raise PathPatchError(f"attributions[{i}] ({method.name}): {err}") from None
    taken = {h.name for h in hypotheses} & {a.name for a in attributions}
    if taken:
        raise PathPatchError(f"attributions: {sorted(taken)[0]!r} is also a hypothesis's name; "
                             "give the attribution another name")
    step(f"validate {len(hypotheses):,} hypotheses")
    try:
        costs = (engine.check(model, list(hypotheses), max_mixed_copies=spec.max_mixed_copies,
                              dataset=dataset) if hypotheses else [])
    except PathPatchError as err:
        raise PathPatchError(f"hypotheses: {err}") from None
    infos = tuple(
        HypothesisInfo(name=h.name, canonical=h.canonical, mixed_copies=int(c.mixed_copies),
                       est_cost=float(c.est_cost), facts=h.facts)
        for h, c in zip(hypotheses, costs, strict=True)
    )
    ablation = _ablation(spec, model, dataset, step, weights)
    step("plan work items")
    plan = make_plan(
        model_digest=model_digest(model) if weights else "",
        shards=shards,
        hypotheses=infos, group_size=spec.group_size, metric=metric.name, dtype=spec.dtype,
        attributions=tuple(
            attribution_info(name=a.name, method=a.method, steps=a.steps, points=a.points,
                             edges=len(graph.edges), forwards=a.forwards)
            for a in attributions),
        intervention=spec.intervention, ablation=ablation.digest if ablation else "",
    )
    warnings = tuple(
        f"hypothesis {h.name!r} ({h.pattern}) matches no path: it equals `none` (G_H is the "
        "counterfactual run, so its unexplained effect is the total effect)"
        for h, c in zip(hypotheses, costs, strict=True) if c.matches == "none" and h.canonical != "none"
    )
    return Resolved(spec=spec, model=model, dataset=dataset, shards=shards,
                    hypotheses=hypotheses, plan=plan, warnings=warnings,
                    attributions=attributions, ablation=ablation)


def _ablation(spec: SweepSpec, model, dataset: PairDataset, step: Callable[[str], None],
              weights: bool = True):
    """An x_c-free intervention's values (None under resample), over the whole dataset's
    reference prompts or `intervention_dataset`'s, on the driver: rows are independent of
    sharding and batching. Without `weights`, everything is checked but nothing computed."""
    if spec.intervention == Intervention.RESAMPLE.value:
        step("intervention: resample (each example's counterfactual prompt)")
        return None
    means_over = dataset
    if spec.intervention_dataset is not None:
        try:
            means_over = load_spec_dataset(replace(spec, dataset=spec.intervention_dataset),
                                           int(model.cfg.d_vocab), n_ctx=int(model.cfg.n_ctx))
        except PathPatchError as err:
            raise PathPatchError(f"intervention_dataset (the prompts the means are taken over): "
                                 f"{err}") from None
        if (spec.intervention == Intervention.MEAN_POSITIONAL.value
                and means_over.seq_len != dataset.seq_len):
            raise PathPatchError(
                f"intervention_dataset has {means_over.seq_len} positions and the dataset "
                f"{dataset.seq_len}: a position-wise mean needs one length; give prompts of "
                f"{dataset.seq_len} tokens, or intervention = \"mean\"")
    source = "intervention_dataset" if spec.intervention_dataset is not None else "the dataset"
    if not weights:
        step(f"{spec.intervention} ablation values over {len(means_over):,} examples of {source}: "
             "computed when the sweep runs")
        return None
    step(f"{spec.intervention} ablation values over {len(means_over):,} examples of {source}")
    return ablation_values(model, means_over.reference, spec.intervention)


PROBE_EXAMPLES = 2
"""Examples a user metric is tried on during validation (the dataset's first ones)."""


def _probe_metric(metric, model, dataset: PairDataset, intervention: str,
                  weights: bool = True) -> None:
    """Call a ``module:function`` metric once on the model's real logits for the dataset's
    first examples (the clean run against the counterfactual one), so that a callable of the
    wrong kind fails here, naming the metric, and not in every work item on the cluster. Under
    an x_c-free intervention the batch it sees has no readable x_c (as in the run), so a metric
    that reads it fails here too; without `weights` (a dry-run) the logits are random ones of
    the model's shape.

    Raises:
        PathPatchError: the callable raised, or returned anything but one finite, non-negative
            value per example.
    """
    batch = dataset.select(slice(0, PROBE_EXAMPLES))
    if weights:
        with torch.inference_mode():
            clean = model(batch.reference)
            other = model(batch.counterfactual if intervention == "resample" else batch.reference)
    else:
        gen = torch.Generator().manual_seed(0)
        shape = (len(batch), batch.seq_len, int(model.cfg.d_vocab_out))
        clean, other = (torch.randn(shape, generator=gen) for _ in range(2))
    if intervention != "resample":
        batch = batch.without_counterfactual(
            f"metric {metric.name!r} read the batch's counterfactual prompts "
            f"(batch.counterfactual), but intervention = {intervention!r} carries ablation "
            "values instead of x_c: use a metric that reads only the clean prompts, the answers "
            "and the logits, or intervention = 'resample'")
    usage = ("a metric is fn(clean_logits [batch, pos, vocab], other_logits [batch, pos, "
             "vocab], batch: PairDataset) -> a tensor of shape [batch], finite and >= 0")
    try:
        metric.against(clean, batch, checked=True)(other)
    except PathPatchError as err:
        raise PathPatchError(f"metric = {metric.name!r}, tried on the dataset's first "
                             f"{len(batch)} examples: {err}") from None
    except Exception as err:  # the user's code, whatever it raises
        raise PathPatchError(
            f"metric = {metric.name!r} failed when tried on the dataset's first {len(batch)} "
            f"examples: {type(err).__name__}: {err}; {usage}") from None


def _check_generated_size(spec: SweepSpec, n_ctx: int) -> None:
    """What a generated dataset would allocate, checked before it is: the sequence length
    against the model's context, the pair count against this machine's free memory (a
    one-example probe measures the bytes per example, [dest, src] masks included)."""
    params = dict(spec.dataset_params())
    n = params.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PathPatchError(f"dataset.n = {n!r}: give the number of pairs as an integer >= 1")
    fn = DATASETS.get(spec.dataset.kind)
    if fn is None:
        return  # make_dataset names the known kinds
    default = inspect.signature(fn).parameters.get("seq_len")
    seq_len = params.get("seq_len", default.default if default is not None else None)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)
                                or seq_len < 1):
        raise PathPatchError(f"dataset.seq_len = {seq_len!r}: give an integer >= 1")
    if seq_len is not None and seq_len > n_ctx:
        raise PathPatchError(
            f"dataset.seq_len = {seq_len} is longer than the model's context (n_ctx = {n_ctx}, "
            f"model {spec.model!r}): give seq_len <= {n_ctx}")
    try:
        probe = make_dataset(spec.dataset.kind, **{**params, "n": 1})
    except (PathPatchError, TypeError, ValueError, RuntimeError):
        return  # the full call below reports the bad parameter
    per_example = probe.nbytes()
    available = _available_memory()
    if available is not None and n * per_example > available // 2:
        need = n * per_example
        raise PathPatchError(
            f"dataset (kind = {spec.dataset.kind!r}, n = {n}, seq_len = {seq_len}) would take "
            f"{need / 2**30:,.1f} GiB ({per_example:,} bytes per pair), more than half of this "
            f"machine's {available / 2**30:.1f} GiB of free memory: lower dataset.n or seq_len")


def _available_memory() -> int | None:
    """Bytes of memory free for new allocations (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load_text_dataset(spec: SweepSpec, n_ctx: int) -> PairDataset:
    """A text dataset tokenized with the model's tokenizer (or `dataset.tokenizer`'s); prints
    what was read."""
    keys = dict(spec.dataset.text)
    source = keys.pop("tokenizer", spec.model)
    try:
        tokenizer = load_tokenizer(source)
    except PathPatchError as err:
        raise _prefixed("dataset.tokenizer" if "tokenizer" in dict(spec.dataset.text) else "model",
                        source, err) from None
    try:
        options = TextOptions(**keys)
        dataset = load_text(spec.dataset.path, tokenizer, options, n_ctx=n_ctx)
    except PathPatchError as err:
        raise _prefixed("dataset.path", spec.dataset.path, err) from None
    lengths = dataset.scored.int().argmax(dim=1) + 1
    print(f"dataset: read {len(dataset):,} pairs from {spec.dataset.path} ({int(lengths.min())}"
          f"-{int(lengths.max())} tokens; padded to {dataset.seq_len}; "
          f"{'with' if dataset.answer is not None else 'without'} answers; digest "
          f"{dataset.digest()[:12]})", file=sys.stderr)
    return dataset


def load_spec_dataset(spec: SweepSpec, vocab: int, n_ctx: int) -> PairDataset:
    """The spec's pairs, checked against the model's vocabulary and context; errors name the
    spec key."""
    if spec.dataset.path is not None and is_text_dataset(spec.dataset.path):
        dataset = _load_text_dataset(spec, n_ctx)
    elif spec.dataset.path is not None:
        if spec.dataset.text:
            raise PathPatchError(
                f"dataset.path = {spec.dataset.path!r} is a pathpatch pairs file (token columns "
                f"'reference', 'counterfactual'): the text keys {[k for k, _ in spec.dataset.text]} "
                "do not apply to it; drop them")
        try:
            dataset = load_parquet(spec.dataset.path, vocab_size=vocab)
        except PathPatchError as err:
            raise _prefixed("dataset.path", spec.dataset.path, err) from None
        except OSError as err:
            raise PathPatchError(f"dataset.path = {spec.dataset.path!r} cannot be read ({err}); "
                                 "give a Parquet file of pairs") from None
    else:
        _check_generated_size(spec, n_ctx)
        try:
            dataset = make_dataset(spec.dataset.kind, **spec.dataset_params())
        except PathPatchError as err:
            raise _prefixed("dataset.kind", spec.dataset.kind, err) from None
        except (TypeError, ValueError, RuntimeError) as err:
            raise PathPatchError(f"dataset (kind = {spec.dataset.kind!r}): bad parameters "
                                 f"{dict(spec.dataset.params)}: {err}") from None
    if len(dataset) == 0:
        raise PathPatchError("dataset has no examples: every shard needs at least one; raise "
                             "dataset.n or check the file")
    if dataset.seq_len > n_ctx:
        raise PathPatchError(
            f"dataset sequences have {dataset.seq_len} positions, more than the model's context "
            f"(n_ctx = {n_ctx}, model {spec.model!r}): give sequences of at most {n_ctx} tokens")
    try:
        dataset.validate(vocab, where="dataset")
    except PathPatchError as err:
        raise PathPatchError(f"{err} (model {spec.model!r} has vocabulary size {vocab})"
                             ) from None
    return dataset
