"""Attribution scores per edge: the fast, approximate way to rank edges (EAP and EAP-IG).

EAP (Syed et al.): score(u -> v.c) = (a_u(x_c) - a_u(x_r)) . dm/d(input of v.c) at x_r, summed
over positions, per example: the first-order change of the metric's statistic m when the edge
carries the counterfactual value. EAP-IG averages that gradient over `steps` points whose input
embeddings are interpolated between x_c's and x_r's (Hanna et al.). Same graph and edge names
as the engine (q, k and v channels separately); unlike the engine these are approximations, and
they are named as such (SPEC section 6). The exact single-edge effect is an `edge_removal`
sweep.

m is the metric's own signed statistic (`Metric.value`: the logit difference); metrics without
one (KL, whose gradient vanishes at x_r, and loss) are refused by name.
"""

from __future__ import annotations

import torch

from pathpatch.arch import EMBED_HOOK, Adapter
from pathpatch.dataset import PairDataset
from pathpatch.errors import PathPatchError
from pathpatch.graph import Edge, Graph, NodeKind
from pathpatch.metrics import get_metric
from pathpatch.runs import Runs


def edge_attributions(model, batch: PairDataset, metric="logit_diff", *, steps: int = 0
                      ) -> tuple[tuple[Edge, ...], torch.Tensor]:
    """(the graph's edges, [batch, edge] float64 scores): EAP when `steps` is 0, else EAP-IG
    with `steps` interpolation points (k / steps for k = 1..steps, x_c's embedding at 0)."""
    metric = get_metric(metric)
    if metric.value is None:
        raise PathPatchError(
            f"attribution needs a signed statistic to differentiate; metric {metric.name!r} has "
            "none (KL's gradient vanishes at x_r): use metric 'logit_diff'")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise PathPatchError(f"steps = {steps!r}: give 0 (EAP) or a number of IG points >= 1")
    graph = Graph.from_model(model)
    arch = Adapter.of(model)
    if arch.heads_normed:
        raise PathPatchError("attribution adds head outputs linearly; this model normalizes each "
                             "layer's heads' sum (Gemma-2): use exact edge removals")
    metric.check_dataset(batch)
    device = next(model.parameters()).device
    xr, xc = batch.reference.to(device), batch.counterfactual.to(device)
    with torch.no_grad():
        runs = Runs(model, xr, xc)
        delta = runs.cf_bank()  # [node, batch, pos, d_model]: a_u(x_c) - a_u(x_r)
        embeds = (runs.cache["r"][EMBED_HOOK], runs.cache["c"][EMBED_HOOK])
    points = [None] if steps == 0 else [k / steps for k in range(1, steps + 1)]
    grads: dict[tuple[int, str], torch.Tensor] = {}
    for alpha in points:
        for key, g in _input_gradients(model, arch, graph, xr, batch, metric, embeds, alpha).items():
            grads[key] = grads[key] + g if key in grads else g
    scores = []
    for receiver in graph.nodes[1:]:
        senders = torch.tensor([s.order for s in graph.senders(receiver)], device=device)
        for channel in receiver.channels:
            g = grads[(receiver.order, channel.value)] / len(points)  # [batch, pos, d_model]
            scores.append(torch.einsum("sbpd,bpd->bs", delta[senders].double(), g.double()))
    return graph.edges, torch.cat(scores, dim=1)


def _input_gradients(model, arch: Adapter, graph: Graph, xr, batch, metric, embeds, alpha):
    """dm/d(input) of every receiver channel, at x_r or at embedding point `alpha`."""
    kept: dict[tuple[int, str], torch.Tensor] = {}
    heads = {layer: [n for n in graph.nodes if n.kind is NodeKind.HEAD and n.layer == layer]
             for layer in range(graph.n_layers)}

    def keep(key):
        def hook(x, hook):
            x.retain_grad()
            kept[key] = x
            return x
        return hook

    hooks = []
    if alpha is not None:
        emb_r, emb_c = embeds
        hooks.append((EMBED_HOOK, lambda x, hook: emb_c + alpha * (emb_r - emb_c)))
    for layer in range(graph.n_layers):
        for channel in "qkv":
            hooks.append((arch.split_input_hook(layer, channel), keep((layer, channel))))
        if graph.has_mlp:
            hooks.append((arch.mlp_split_input_hook(layer), keep((layer, "mlp"))))
    hooks.append((arch.output_input_hook(), keep(("out", "resid"))))
    try:
        with arch.split_inputs(), torch.enable_grad():
            logits = model.run_with_hooks(xr, fwd_hooks=hooks)
            metric.value(logits, batch).sum().backward()  # examples do not interact
    finally:
        model.zero_grad(set_to_none=True)
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
