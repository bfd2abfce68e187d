"""Attribution scores per edge: the fast, approximate way to rank edges (EAP and EAP-IG).

EAP (Syed et al.): score(u -> v.c) = (a_u(x_c) - a_u(x_r)) . dm/d(input of v.c) at x_r, summed
over positions, per example: the first-order change of the statistic m when the edge carries
the counterfactual value. EAP-IG (Hanna et al.) averages that gradient over `steps` runs on
x_r's tokens whose token embedding (`hook_embed`, the one input the two runs differ in) is
interpolated, e(α) = e(x_c) + α (e(x_r) - e(x_c)), at the points `points` names (`POINTS`):
`left`, the default, α = k/steps for k = 0..steps-1 (x_c's embedding included, x_r's left out)
as the EAP-IG repository's `get_scores_eap_ig` computes it; `right`, α = k/steps for
k = 1..steps (x_r's included, x_c's left out), pathpatch's points before they were named.
Same graph and edge names as the engine (q, k and v channels separately); unlike the engine
these are approximations, and they are named as such (SPEC section 6). The exact single-edge
effect is an `edge_removal` sweep.

m, by the sweep's metric: `logit_diff`, its signed logit difference (`Metric.value`); `loss`,
the signed next-token loss (`metrics.loss_value`); `kl`, KL(G(x_r) || G(point)) itself, which
EAP-IG's interpolated points can differentiate but EAP cannot (its gradient vanishes at x_r,
where KL has its minimum), so EAP with KL is refused by name, as is EAP-IG whose only point is
x_r (`right` with steps = 1), and user metrics (no signed statistic to differentiate).

Under an x_c-free intervention (`pathpatch.engine.ablation`: zero, mean, mean_positional) EAP
takes a_u(x_c) to be u's ablation value, as the EAP-IG repository's `get_scores_eap` does for
its `zero`, `mean` and `mean-positional` interventions: score = (a_u - a_u(x_r)) . gradient at
x_r. EAP-IG interpolates the input embedding towards x_c's, which such a sweep has not, so it is
refused there, as the repository's `EAP-IG-inputs` refuses any intervention but patching.

Cost per batch: EAP, the counterfactual run plus one forward and backward at x_r, which is the
clean run too; EAP-IG, both runs plus one forward and backward per point (`pathpatch bench
discovery` measures both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pathpatch.data.pairs import PairDataset
from pathpatch.engine.ablation import Ablation
from pathpatch.engine.effects import importance_sign as importance_sign  # torch-free home
from pathpatch.engine.evaluation import DEFAULT_MEMORY_BUDGET
from pathpatch.engine.metrics import Metric, get_metric, loss_value
from pathpatch.engine.runs import Runs
from pathpatch.errors import PathPatchError
from pathpatch.model.adapter import EMBED_HOOK, Adapter
from pathpatch.model.graph import Edge, Graph, NodeKind
from pathpatch.model.support import check_no_hooks

METHODS = ("eap", "eap-ig")
"""Attribution methods: `eap` (gradient at x_r) and `eap-ig` (integrated over `steps` points)."""

POINTS = ("left", "right")
"""EAP-IG's interpolation points α (embedding e(x_c) + α (e(x_r) - e(x_c))), m = steps: `left`,
k/m for k = 0..m-1, the EAP-IG repository's (the default); `right`, k/m for k = 1..m."""


def ig_alphas(steps: int, points: str = "left") -> list[float]:
    """EAP-IG's α values for `steps` points of convention `points` (see `POINTS`)."""
    if points not in POINTS:
        raise PathPatchError(f"eap-ig points = {points!r}: allowed are {', '.join(POINTS)} "
                             "(left: α = 0, 1/m, ..., (m-1)/m as the EAP-IG repository; right: "
                             "α = 1/m, ..., 1)")
    first = 0 if points == "left" else 1
    return [k / steps for k in range(first, first + steps)]


DEFAULT_BATCH = 16
"""The most examples per backward pass when the sweep sets no `resources.batch_size`."""


def batch_for_budget(model, seq_len: int, memory_budget: int | None = None) -> int:
    """Examples per pass that fit `memory_budget` (the engine's default, 2 GiB, when None), at
    most DEFAULT_BATCH, at least 1. Per example (float32 estimate): the logits, their gradient
    and the clean ones; every receiver channel's gradient (twice while stacked); the
    counterfactual change of every node and both cached runs' residuals."""
    graph = Graph.from_model(model)
    channels = sum(len(n.channels) for n in graph.nodes[1:])
    nodes = len(graph.evaluation.nodes)
    arch = Adapter.of(model)
    per_example = 4 * seq_len * (3 * arch.d_vocab_out + arch.d_model * (2 * channels + 3 * nodes))
    return max(1, min(DEFAULT_BATCH, (memory_budget or DEFAULT_MEMORY_BUDGET) // per_example))


ROW_SCHEMA = pa.schema([("method", pa.string()), ("example", pa.int64()),
                        ("edge", pa.string()), ("score", pa.float64())])
"""One row per (example, edge) of an attribution: the edge in pathpatch's naming."""


@dataclass(frozen=True)
class Attribution:
    """One attribution method as a sweep computes it: a work item per shard, rows per
    (example, edge). Named `eap`, `eap-ig-<steps>` (left points) or `eap-ig-<steps>-right`
    unless the spec names it. `points` is EAP-IG's convention (`POINTS`); EAP has none ("")."""

    method: str = "eap"
    steps: int = 0
    name: str = ""
    points: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PathPatchError(f"attribution method {self.method!r}: allowed are "
                                 f"{', '.join(METHODS)}")
        steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise PathPatchError(f"attribution {self.method}: steps = {steps!r} is not an integer")
        if self.method == "eap" and steps != 0:
            raise PathPatchError(f"attribution eap takes no steps (got {steps}); use method "
                                 "'eap-ig' with steps >= 1 for integrated gradients")
        if self.method == "eap-ig" and steps < 1:
            raise PathPatchError(f"attribution eap-ig: steps = {steps}: give the number of "
                                 "interpolation points, >= 1 (Hanna et al. use 5)")
        if self.method == "eap" and self.points:
            raise PathPatchError(f"attribution eap takes no points (got {self.points!r}); they "
                                 "name eap-ig's interpolation points")
        if self.method == "eap-ig":
            if not self.points:
                object.__setattr__(self, "points", "left")
            ig_alphas(steps, self.points)  # a bad name is refused here, by name
        if not self.name:
            name = "eap" if steps == 0 else f"eap-ig-{steps}"
            object.__setattr__(self, "name", name if self.points in ("", "left")
                               else f"{name}-{self.points}")

    @property
    def forwards(self) -> float:
        """Forward passes per batch: the runs it caches (EAP: the counterfactual one; EAP-IG:
        both) plus a forward and backward (~3 forwards) per point."""
        return 1.0 + 3.0 if self.steps == 0 else 2.0 + 3.0 * self.steps

    def check(self, model, metric: str | Metric, intervention: str = "resample") -> None:
        """Refuse, before any work, what this method cannot compute on `model` with `metric`
        under `intervention` (a name of `pathpatch.engine.ablation.Intervention`)."""
        _statistic(get_metric(metric), self.steps, self.points or "left")
        if self.steps and intervention != "resample":
            raise PathPatchError(_IG_NEEDS_XC.format(name=self.name, intervention=intervention))
        if Adapter.of(model).heads_normed:
            raise PathPatchError(
                f"attribution {self.name}: scores add head outputs linearly, but this model "
                "normalizes each layer's heads' sum (Gemma-2): rank its edges by exact edge "
                "removals (family 'edge_removal')")

    def rows(self, model, dataset: PairDataset, metric: str | Metric, *,
             batch_size: int | None = None, memory_budget: int | None = None,
             ablation: Ablation | None = None) -> pa.Table:
        """`ROW_SCHEMA` rows, example-major (every edge of example 0, then example 1, ...);
        `batch_size` examples per backward pass, by default as many as `memory_budget` holds
        (`batch_for_budget`); `ablation`, the values of an x_c-free intervention (EAP only)."""
        self.check(model, metric, ablation.intervention.value if ablation else "resample")
        graph = Graph.from_model(model)
        names = [str(e) for e in graph.edges]
        size = batch_size or batch_for_budget(model, dataset.seq_len, memory_budget)
        parts = []
        for start in range(0, len(dataset), size):
            batch = dataset.select(slice(start, min(start + size, len(dataset))))
            _, scores = edge_attributions(model, batch, metric, steps=self.steps,
                                          points=self.points or "left", ablation=ablation)
            parts.append(scores.cpu().numpy().reshape(-1))
        n = len(dataset)
        examples = dataset.example_ids.to(torch.int64).numpy().repeat(len(names))
        edge_index = np.tile(np.arange(len(names), dtype=np.int32), n)
        return pa.table({
            "method": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n * len(names), dtype=np.int32)), pa.array([self.name])),
            "example": pa.array(examples, pa.int64()),
            "edge": pa.DictionaryArray.from_arrays(pa.array(edge_index), pa.array(names)),
            "score": pa.array(np.concatenate(parts), pa.float64()),
        })


_IG_NEEDS_XC = (
    "attribution {name}: EAP-IG interpolates the input embedding from x_c's to x_r's, and "
    "intervention = {intervention!r} has no x_c (the EAP-IG repository refuses it likewise); use "
    "method 'eap' (the ablation value replaces a_u(x_c)) or intervention = \"resample\"")


Statistic = Callable[[torch.Tensor, PairDataset, torch.Tensor], torch.Tensor]
"""(logits, batch, clean logits) -> [batch]: what attribution differentiates."""


def _statistic(metric: Metric, steps: int, points: str = "left") -> Statistic:
    if metric.value is not None:
        value = metric.value
        return lambda logits, batch, clean: value(logits, batch)
    if metric.name == "loss":
        return lambda logits, batch, clean: loss_value(logits, batch)
    if metric.name == "kl":
        if steps == 0:
            raise PathPatchError(
                "attribution eap with metric 'kl': KL(G(x_r) || .) has its minimum at x_r, so its "
                "gradient there is 0 and every score would be 0; use method 'eap-ig' (its points "
                "lie between x_c and x_r) or metric 'logit_diff' / 'loss'")
        if steps == 1 and points == "right":
            raise PathPatchError(
                "attribution eap-ig with metric 'kl', steps = 1 and points 'right': the one point "
                "α = 1 is x_r itself, so the gradient is taken only at x_r, where KL's vanishes; "
                "give steps >= 2 or points 'left' (α = 0, x_c's embedding)")
        against = metric.against_clean
        return lambda logits, batch, clean: against(clean, batch)(logits)
    raise PathPatchError(
        f"attribution with metric {metric.name!r}: a user metric gives a distance, not a signed "
        "statistic whose gradient could be taken; use metric 'logit_diff', 'loss' or (eap-ig) "
        "'kl'")


def edge_attributions(model, batch: PairDataset, metric="logit_diff", *, steps: int = 0,
                      points: str = "left", ablation: Ablation | None = None,
                      ) -> tuple[tuple[Edge, ...], torch.Tensor]:
    """(the graph's edges, [batch, edge] float64 scores): EAP when `steps` is 0, else EAP-IG
    with m = `steps` points.

    EAP-IG runs x_r's tokens with the token embedding e(α) = e(x_c) + α (e(x_r) - e(x_c)) and
    averages each receiver channel's input gradient over the α of `points` (`ig_alphas`):
    `"left"`, α = k/m for k = 0..m-1, as the EAP-IG repository computes it (x_c's embedding is a
    point, x_r's is not); `"right"`, α = k/m for k = 1..m. `points` is unused by EAP.

    With `ablation` (EAP only), each sender's counterfactual output a_u(x_c) is its ablation
    value: x_c is not read."""
    metric = get_metric(metric)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise PathPatchError(f"steps = {steps!r}: give 0 (EAP) or a number of IG points >= 1")
    alphas = ig_alphas(steps, points) if steps else [None]  # a bad `points` is refused by name
    statistic = _statistic(metric, steps, points)
    graph = Graph.from_model(model)
    check_no_hooks(model)  # checked when the graph was made (`Graph.from_model`); hooks may come later
    arch = Adapter.of(model)
    if arch.heads_normed:
        raise PathPatchError("attribution adds head outputs linearly; this model normalizes each "
                             "layer's heads' sum (Gemma-2): use exact edge removals")
    if ablation is not None and steps:
        raise PathPatchError(_IG_NEEDS_XC.format(name=f"eap-ig-{steps}",
                                                 intervention=ablation.intervention.value))
    metric.check_dataset(batch)
    device = next(model.parameters()).device
    xr, xc = batch.reference.to(device), batch.counterfactual.to(device)
    clean_cache: dict[str, torch.Tensor] | None = None
    with torch.no_grad():
        if steps == 0 and ablation is not None:  # every node's output is its ablation value
            with model.hooks(fwd_hooks=ablation.to(device).hooks()):
                cf_logits, cf_cache = arch.run(xr)
            embeds, clean, clean_cache = None, None, {}
        elif steps == 0:  # EAP's one gradient pass runs at x_r: it is the clean run as well
            cf_logits, cf_cache = arch.run(xc)
            embeds, clean, clean_cache = None, None, {}
        else:
            runs = Runs(model, xr, xc)
            embeds = (runs.cache["r"][EMBED_HOOK], runs.cache["c"][EMBED_HOOK])
            clean = runs.logits["r"]
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)  # half: sums in float32
    grads: dict[tuple[int, str], torch.Tensor] = {}
    for alpha in alphas:
        for key, g in _input_gradients(model, arch, graph, xr, batch, statistic, clean, embeds,
                                       alpha, clean_cache).items():
            g = g.to(dtype, copy=len(alphas) > 1)  # a sum of several is accumulated in place
            grads[key] = grads[key].add_(g) if key in grads else g
    if clean_cache is not None:
        runs = Runs.from_caches(model, {"c": cf_logits}, {"r": clean_cache, "c": cf_cache})
    with torch.no_grad():
        delta = runs.cf_bank()  # [batch, pos, node, d_model]: a_u(x_c) - a_u(x_r)
    # score[b, u -> v.c] = <delta[u, b], grad[v.c, b]> over (pos, d_model): per example, one
    # product of every sender's change with every receiver channel's gradient, then the edges
    # picked out of it (gathering each receiver's senders instead moved |E| x pos x d_model)
    channels = list(grads)
    column = {key: i for i, key in enumerate(channels)}
    g = torch.stack([grads.pop(key) for key in channels]).div_(len(alphas))  # [R, b, p, d]
    d = delta.to(dtype)  # [b, p, node, d]
    senders = torch.tensor([e.sender.order for e in graph.edges], device=device)
    receivers = torch.tensor([column[(e.receiver.order, e.channel.value)] for e in graph.edges],
                             device=device)
    scores = torch.empty(len(batch), len(graph.edges), dtype=torch.float64, device=device)
    for b in range(len(batch)):
        products = torch.einsum("pnd,rpd->nr", d[b], g[:, b])  # [node, R]
        scores[b] = products[senders, receivers].double()
    return graph.edges, scores


def _input_gradients(model, arch: Adapter, graph: Graph, xr, batch, statistic: Statistic,
                     clean: torch.Tensor | None, embeds, alpha,
                     clean_cache: dict[str, torch.Tensor] | None = None):
    """dm/d(input) of every receiver channel, at x_r or at embedding point `alpha`; with
    `clean_cache` (a pass at x_r) the activations the counterfactual change is taken from are
    kept there too."""
    kept: dict[tuple[int, str], torch.Tensor] = {}

    def record(x, hook):
        clean_cache[hook.name] = x.detach()
        return x
    heads = {layer: [n for n in graph.nodes if n.kind is NodeKind.HEAD and n.layer == layer]
             for layer in range(graph.n_layers)}

    def keep(key):
        def hook(x, hook):
            x.retain_grad()
            kept[key] = x
            return x
        return hook

    def embedding(x, hook):  # the one leaf: gradients flow from here, none into the weights
        if clean_cache is not None:
            clean_cache[hook.name] = x.detach()
        point = x if alpha is None else embeds[1] + alpha * (embeds[0] - embeds[1])
        return point.detach().requires_grad_()

    hooks = [(EMBED_HOOK, embedding)]
    if clean_cache is not None:  # what the counterfactual change reads: heads' z, MLP outputs
        for layer in range(graph.n_layers):
            hooks.append((arch.z_hook(layer), record))
            if graph.has_mlp:
                hooks.append((arch.mlp_out_hook(layer), record))
    for layer in range(graph.n_layers):
        for channel in "qkv":
            hooks.append((arch.split_input_hook(layer, channel), keep((layer, channel))))
        if graph.has_mlp:
            hooks.append((arch.mlp_split_input_hook(layer), keep((layer, "mlp"))))
    hooks.append((arch.output_input_hook(), keep(("out", "resid"))))
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:  # no weight gradients: half of a backward's products saved
            p.requires_grad_(False)
        with arch.split_inputs(), torch.enable_grad():
            resid = arch.residual_with_hooks(xr, hooks)
            # logits at the scored positions only (all a built-in statistic reads), as the
            # engine unembeds them: the unembedding at every position is a third of GPT-2's
            rows, positions = batch.scored.to(resid.device).nonzero(as_tuple=True)
            logits = resid.new_zeros((*batch.scored.shape, arch.d_vocab_out))
            logits[rows, positions] = arch.unembed(resid[rows, positions])  # in place: one copy
            statistic(logits, batch, clean).sum().backward()  # examples do not interact
    finally:
        for p in frozen:
            p.requires_grad_(True)
    out: dict[tuple[int, str], torch.Tensor] = {}
    for layer in range(graph.n_layers):
        for channel in "qkv":
            grad = kept[(layer, channel)].grad  # [batch, pos, head, d_model]
            for node in heads[layer]:
                out[(node.order, channel)] = grad[:, :, node.head].detach()
        if graph.has_mlp:
            mlp = next(n for n in graph.nodes if n.kind is NodeKind.MLP and n.layer == layer)
            out[(mlp.order, "resid")] = kept[(layer, "mlp")].grad.detach()
    out[(graph.output.order, "resid")] = kept[("out", "resid")].grad.detach()
    return out
