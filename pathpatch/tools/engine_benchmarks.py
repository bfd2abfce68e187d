"""The engine benchmark: cost per hypothesis against a plain forward and a careful hook baseline.

Everything is measured side by side in one process on the same examples, each timed run between
two timed forwards (`_SideBySide`), so the printed ratios hold on a noisy machine where absolute
times do not. Three families of 64 hypotheses: random half-edge circuits, single-edge removals,
and the induction families. The hook baseline is the careful TransformerLens way (per-head
outputs from z, split q/k/v inputs, one run per hypothesis); its logits are checked against the
engine's before any time is reported. It builds its mixed inputs with the engine's own mixing
kernel (`kernels.py`), so that the ratio compares methods, not kernels.
"""

from __future__ import annotations

import json
import os
import random
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathpatch.data.pairs import PairDataset
from pathpatch.discovery.attribution import edge_attributions
from pathpatch.discovery.greedy import START, GreedySearch
from pathpatch.engine.evaluation import DEFAULT_MEMORY_BUDGET, MemoryBudget, ModelState, compile_all, evaluate
from pathpatch.engine.group_evaluation import GroupEvaluator
from pathpatch.engine.kernels import mix
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.prepared import Prepared
from pathpatch.engine.runs import Runs
from pathpatch.engine.stage_plan import GroupPlan
from pathpatch.errors import PathPatchError
from pathpatch.language.circuits import circuit_hypothesis
from pathpatch.language.copies import estimate_cost
from pathpatch.language.hypotheses import Facts, Hypothesis
from pathpatch.language.hypothesis_families import induction_initial, induction_refined
from pathpatch.model.adapter import EMBED_HOOK, Adapter
from pathpatch.model.costs import unit_costs
from pathpatch.model.graph import Graph, NodeKind
from pathpatch.model.loading import build_model

SHAPES: dict[str, dict] = {
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257,
                       act_fn="gelu_new", normalization_type="LN"),
    # Pythia-160M / GPT-NeoX: parallel attention + MLP, rotary on a quarter of each head
    "pythia-160m": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50304,
                        act_fn="gelu", normalization_type="LN", parallel_attn_mlp=True,
                        positional_embedding_type="rotary", rotary_dim=16, rotary_base=10000),
    # Qwen2.5-0.5B: RMSNorm, gated SiLU MLP, rotary, 2 kv heads for 14 query heads
    "qwen2.5-0.5b": dict(n_layers=24, d_model=896, n_heads=14, d_head=64, n_key_value_heads=2,
                         d_mlp=4864, d_vocab=151936, act_fn="silu", normalization_type="RMS",
                         final_rms=True, gated_mlp=True, positional_embedding_type="rotary",
                         rotary_dim=64, rotary_base=1000000.0),
    # Llama-3.2-1B: as Qwen, 8 kv heads for 32, Llama-3 rotary scaling
    "llama-3.2-1b": dict(n_layers=16, d_model=2048, n_heads=32, d_head=64, n_key_value_heads=8,
                         d_mlp=8192, d_vocab=128256, act_fn="silu", normalization_type="RMS",
                         final_rms=True, gated_mlp=True, positional_embedding_type="rotary",
                         rotary_dim=64, rotary_base=500000.0, use_NTK_by_parts_rope=True,
                         NTK_by_parts_factor=32.0, NTK_by_parts_low_freq_factor=1.0,
                         NTK_by_parts_high_freq_factor=4.0, NTK_original_ctx_len=8192),
}
"""Random-weight models shaped like the field's models (`bench engine --shape`): nothing is
downloaded."""

HF_CONFIGS: dict[str, dict] = {
    "gpt2-small": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=12,
                       n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "qwen2.5-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "gemma-2-2b": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=2304,
                       intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, vocab_size=256000,
                       sliding_window=4096, query_pre_attn_scalar=256,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                       max_position_embeddings=8192),
    "llama-3.1-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}
"""The Hugging Face config.json of the models MIB's circuit track studies (and GPT-2 small), as
published by their authors (dimensions, heads, rotary and windows: what a graph and a plan
need): `pathpatch bench plan` writes each as a directory with no weights (MIB counts 32,491,
179,749, 74,218 and 1,592,881 edges)."""


def write_hf_config(name: str, folder: Path) -> Path:
    """A Hugging Face model directory of shape `name` (`HF_CONFIGS`) holding config.json only:
    what `load_architecture` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(HF_CONFIGS[name], indent=1))
    return folder


BENCH_SETTINGS: dict[str, dict] = {
    "gpt2-small": dict(n_hypotheses=64, repeats=2, memory_budget=DEFAULT_MEMORY_BUDGET),
    "pythia-160m": dict(n_hypotheses=64, repeats=2, memory_budget=DEFAULT_MEMORY_BUDGET),
    # a 152k-token vocabulary: ~155 MB of logits per example and hypothesis
    "qwen2.5-0.5b": dict(n_hypotheses=16, repeats=2, forward_repeats=3, memory_budget=6 * 2**30,
                         baseline_hypotheses=4),
    # 6 GB of float32 weights: one hypothesis per group fits beside them on 24 GiB. A forward
    # takes 6-11 s here: 4 circuits (20-35 s each), more of the cheaper families (each family's
    # ratio carries 2/n forwards of the two cached runs)
    "llama-3.2-1b": dict(n_hypotheses={"circuits": 4, "edge_removal": 16, "induction": 8},
                         repeats=1, forward_repeats=2, memory_budget=6 * 2**30,
                         baseline_hypotheses=1),
}
"""`bench engine --shape`'s defaults per shape, chosen to finish within about 10 minutes on a
2-core CPU (README); the CLI's --hypotheses, --repeats and --memory-budget
override them."""


def shaped(name: str, seed: int = 0, n_ctx: int = 64):
    """A randomly initialized model of shape `name` (a key of SHAPES)."""
    return build_model({**SHAPES[name], "n_ctx": n_ctx}, generator=torch.Generator().manual_seed(seed))


def gpt2_small_shaped(seed: int = 0, n_ctx: int = 64):
    """A randomly initialized model with GPT-2 small's shape (no weights are downloaded)."""
    return shaped("gpt2-small", seed, n_ctx)


def cpu_description() -> dict:
    """The CPU a figure was measured on: model name and vector extensions (hosts of one machine
    kind differ: AVX-512 or not changes the engine's ratios)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    vector = sorted(f for f in flags if f.startswith(("avx", "sse4", "fma", "amx")))
    return {"cpu": model, "cpus": os.cpu_count(), "vector_extensions": vector}


BENCH_PHASES = 5  # three engine families, the cached runs alone, then the hook baseline


@dataclass
class _Timer:
    repeats: int

    def best(self, fn) -> float:
        """Fastest of `repeats` runs: the least disturbed by the rest of the machine."""
        times = []
        for _ in range(self.repeats):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times.append(time.perf_counter() - t0)
        return min(times)


class _SideBySide:
    """Each timed run between two timed forwards, divided by the faster of the two.

    The machine's speed drifts by tens of percent within minutes here (docs/MEASUREMENTS.md), so
    a figure is only a ratio to the forwards measured next to it; the faster neighbour leans
    against the engine.
    """

    def __init__(self, forward: Callable[[], Any], forward_repeats: int):
        self._forward = forward
        self._forward_timer = _Timer(forward_repeats)
        self.forwards = [self._forward_timer.best(forward)]  # each neighbouring forward, in order

    def forwards_taken(self, fn: Callable[[], Any], repeats: int) -> float:
        """The fewest forwards `fn` took over `repeats` runs, each run against its neighbours."""
        return min(self.in_forwards(_Timer(1).best(fn)) for _ in range(repeats))

    def in_forwards(self, seconds: float) -> float:
        """`seconds` of a run that just ended, in forwards: times the forward after it and
        divides by the faster of that one and the one before it."""
        self.forwards.append(self._forward_timer.best(self._forward))
        return seconds / min(self.forwards[-2:])

    def report(self, result: dict) -> None:
        """The fastest forward and the spread of all of them (how much the machine drifted)."""
        result["forward_s"] = round(min(self.forwards), 4)
        result["forward_s_slowest"] = round(max(self.forwards), 4)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_circuits(graph: Graph, n: int, rng: random.Random) -> list[Hypothesis]:
    out = []
    for i in range(n):
        kept = [str(e) for e in graph.edges if rng.random() < 0.5]
        out.append(Hypothesis(f"circuit {i}", "circuit(" + ", ".join(kept) + ")",
                              facts=Facts(kind="circuit", edges=tuple(kept))))
    return out


def random_edge_removals(graph: Graph, n: int, rng: random.Random) -> list[Hypothesis]:
    return [Hypothesis(f"remove {e}", f"remove({e})") for e in rng.sample(list(graph.edges), n)]


def random_induction(graph: Graph, n: int, rng: random.Random) -> list[Hypothesis]:
    out: list[Hypothesis] = []
    while len(out) < n:
        prev = f"a0.{rng.randrange(graph.n_heads)}"
        ind = f"a{rng.randrange(1, graph.n_layers)}.{rng.randrange(graph.n_heads)}"
        family = induction_initial(graph, [prev], [ind]) + induction_refined(graph, [prev], [ind])
        out += [Hypothesis(f"{len(out) + i} {h.name}", h.pattern) for i, h in enumerate(family)]
    return out[:n]


FAMILIES = {"circuits": random_circuits, "edge_removal": random_edge_removals,
            "induction": random_induction}
"""The benchmark's hypothesis families, each made of n random members."""


def hook_baseline(model, graph: Graph, kept: set[str], xr, cf_cache) -> torch.Tensor:
    """One hooked run of the circuit `kept`, written carefully: per-head outputs from z, split
    q/k/v inputs, and per layer one matrix product that subtracts, for every removed edge,
    (patched - counterfactual) sender output from the receiver's input. Linear in the heads'
    outputs, so refused where a norm acts on each layer's heads' sum (Gemma-2)."""
    arch = Adapter.of(model)
    if arch.heads_normed:
        raise PathPatchError("the hook baseline adds head outputs linearly; this model normalizes "
                             "each layer's heads' sum (Gemma-2), so it has no hook baseline")
    outputs: list[torch.Tensor] = []  # patched-run sender outputs, in node order
    cf_outputs: list[torch.Tensor] = []
    removed: dict[tuple[int, str], torch.Tensor] = {}  # (layer, channel) -> [head, sender] 0/1
    dev_cache: dict[int, torch.Tensor] = {}  # n senders -> [batch*pos, sender, d_model]

    def mask(receivers, channel: str) -> torch.Tensor:
        senders = graph.senders(receivers[0])
        suffix = "" if channel == "resid" else f".{channel}"
        return torch.tensor([[f"{s.name}->{r.name}{suffix}" not in kept for s in senders]
                             for r in receivers], dtype=torch.float32)

    def deviations(n: int) -> torch.Tensor:
        if n not in dev_cache:
            dev_cache.clear()
            dev_cache[n] = (torch.stack(cf_outputs[:n], dim=2)
                            - torch.stack(outputs[:n], dim=2)).flatten(0, 1)
        return dev_cache[n]

    def fix(key, receivers, channel, x):  # x: [batch, pos, receiver, d_model]
        if key not in removed:
            removed[key] = mask(receivers, channel)
        m = removed[key]
        if not m.any():
            return x
        dev = deviations(m.shape[1])
        return x + mix(m.to(dev), dev).view(x.shape)  # [batch*pos, receiver, d] -> x's shape

    def on_embed(x, hook):
        outputs.append(x)
        cf_outputs.append(cf_cache[EMBED_HOOK])
        return x

    def on_z(z, hook, layer):
        W_O = arch.W_O(layer)
        outputs.extend(torch.einsum("bphe,hed->hbpd", z, W_O).unbind(0))
        cf_outputs.extend(torch.einsum("bphe,hed->hbpd", cf_cache[hook.name], W_O).unbind(0))
        return z

    def on_qkv(x, hook, layer, channel):  # [batch, pos, head, d_model]
        heads = [graph.node(f"a{layer}.{h}") for h in range(arch.n_heads)]
        return fix((layer, channel), heads, channel, x)

    def on_mlp_in(x, hook, layer):
        return fix((layer, "mlp"), [graph.node(f"m{layer}")], "resid", x[:, :, None])[:, :, 0]

    def on_mlp_out(x, hook, layer):
        outputs.append(x)
        cf_outputs.append(cf_cache[hook.name])
        return x

    def on_final(x, hook):
        return fix((arch.n_layers, "out"), [graph.output], "resid", x[:, :, None])[:, :, 0]

    hooks = [(EMBED_HOOK, on_embed)]
    for layer in range(arch.n_layers):
        for ch in ("q", "k", "v"):
            hooks.append((arch.split_input_hook(layer, ch),
                          lambda x, hook, l=layer, c=ch: on_qkv(x, hook, l, c)))
        hooks.append((arch.z_hook(layer), lambda z, hook, l=layer: on_z(z, hook, l)))
        if graph.has_mlp:
            hooks.append((arch.mlp_split_input_hook(layer),
                          lambda x, hook, l=layer: on_mlp_in(x, hook, l)))
            hooks.append((arch.mlp_out_hook(layer), lambda x, hook, l=layer: on_mlp_out(x, hook, l)))
    hooks.append((arch.output_input_hook(), on_final))
    return model.run_with_hooks(xr, fwd_hooks=hooks)


def _engine_run(model, graph, hyps, xr, xc, masks, budget, state: ModelState
                ) -> tuple[Callable[[], None], float, int, float]:
    """(a run of all hypotheses incl. both cache forwards, compile seconds, groups, the mean
    estimated cost in forwards: the arithmetic, beyond the cached runs). Each run keeps
    `state` (folded weights, workspace), as a sweep's worker does item after item."""
    t0 = time.perf_counter()
    copy_graphs = compile_all(graph, hyps, max_mixed_copies=10**6)
    batch_size, groups = MemoryBudget(model, xr.shape[1], budget).schedule(
        copy_graphs, xr.shape[0], xr.shape[0])
    plans = [GroupPlan(graph, [copy_graphs[i] for i in g]) for g in groups]
    compile_s = time.perf_counter() - t0
    unit = unit_costs(model.cfg, xr.shape[1])
    estimated = sum(estimate_cost(cg, unit) for cg in copy_graphs) / len(copy_graphs)
    positions = PositionContext(masks, xr.shape[0], xr.shape[1], xr.device)

    def run():
        runs = Runs(model, xr, xc)
        for plan in plans:
            GroupEvaluator(model, plan, runs, positions, state.folded,
                           workspace=state.workspace).logits()

    return run, compile_s, len(groups), estimated


@torch.inference_mode()
def run_engine_benchmark(model=None, *, n_hypotheses: int | Mapping[str, int] = 64, batch: int = 8,
                         seq_len: int = 32, repeats: int = 2, forward_repeats: int = 5, seed: int = 0,
                         memory_budget: int = DEFAULT_MEMORY_BUDGET,
                         baseline_hypotheses: int | None = None,
                         progress: Callable[[str], None] | None = None) -> dict:
    """Ratios of the engine's per-hypothesis cost to a plain forward, and of the hook baseline's.

    `n_hypotheses`: per family, or one count for all; each family's ratio includes its share
    (2/n forwards) of the two cached runs, which are also timed alone (`cached_runs_forwards`)
    for the figures beyond them (`..._beyond_cached_runs`). `progress(phase)` is called as
    each of the BENCH_PHASES phases starts (minutes on CPU).
    """
    counts = (dict(n_hypotheses) if isinstance(n_hypotheses, Mapping)
              else dict.fromkeys(FAMILIES, n_hypotheses))
    if set(counts) != set(FAMILIES):  # before any model is built or timed
        raise PathPatchError(f"n_hypotheses: give a count for each of {', '.join(FAMILIES)}")
    step = progress or (lambda phase: None)
    torch.manual_seed(seed)
    model = model if model is not None else gpt2_small_shaped(seed)
    graph, arch = Graph.from_model(model), Adapter.of(model)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    xr = torch.randint(0, arch.d_vocab, (batch, seq_len), generator=gen).to(device)
    xc = torch.randint(0, arch.d_vocab, (batch, seq_len), generator=gen).to(device)
    i = torch.arange(seq_len, device=device)
    masks = {  # shapes of the induction task's masks, at fixed plausible places
        "after_prev_occurrence": (i[None, :] == (i[:, None] - seq_len // 2 + 1)).expand(batch, -1, -1),
        "prev_occurrence": (i[None, :] == (i[:, None] - seq_len // 2)).expand(batch, -1, -1),
        "repeat": (i >= seq_len // 2).expand(batch, -1),
    }
    families = {name: make(graph, counts[name], rng) for name, make in FAMILIES.items()}
    result: dict = {"model_shape": {k: getattr(model.cfg, k) for k in
                                    ("n_layers", "n_heads", "n_key_value_heads", "d_model",
                                     "d_mlp", "d_vocab", "positional_embedding_type",
                                     "parallel_attn_mlp", "gated_mlp")},
                    "edges": len(graph.edges),
                    "batch": batch, "seq_len": seq_len, "n_hypotheses": n_hypotheses,
                    "torch_threads": torch.get_num_threads(),
                    **cpu_description()}
    side_by_side = _SideBySide(lambda: model(xr), forward_repeats)
    in_forwards = {}
    state = ModelState(model)  # as a worker's after its first item: every layer folded
    for layer in range(arch.n_layers):
        state.folded.qkv(layer)
    for name, hyps in families.items():
        step(f"engine: {name}")
        run, compile_s, n_groups, estimated = _engine_run(model, graph, hyps, xr, xc, masks,
                                                          memory_budget, state)
        in_forwards[name] = side_by_side.forwards_taken(run, repeats) / len(hyps)
        result[f"compile_s_per_hypothesis_{name}"] = round(compile_s / len(hyps), 4)
        result[f"estimated_forwards_{name}"] = round(estimated, 3)
        result[f"groups_{name}"] = n_groups
    result["workspace_mib"] = round(state.workspace.nbytes / 2**20, 1)
    del run, state  # its buffers go before the hook baseline, which no budget bounds
    # each family's figure carries 2/n forwards of the cached runs; a sweep shares them among
    # every hypothesis of a shard, so the rest is what each further hypothesis costs
    step("cached runs")
    runs_forwards = side_by_side.forwards_taken(lambda: Runs(model, xr, xc), repeats)
    result["cached_runs_forwards"] = round(runs_forwards, 3)
    for name, forwards in in_forwards.items():
        result[f"engine_over_forward_{name}"] = round(forwards, 3)
        result[f"engine_over_forward_{name}_beyond_cached_runs"] = round(
            forwards - runs_forwards / len(families[name]), 3)
    side_by_side.report(result)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["memory_budget_mib"] = round(memory_budget / 2**20, 1)
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(device)
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if Adapter.of(model).heads_normed:
        # the baseline adds each removed head's deviation to its receivers linearly, which a norm
        # on the sum of a layer's heads does not allow
        result["hook_baseline"] = "not run: the model normalizes each layer's heads' sum (Gemma-2)"
        return result
    # careful hook baseline on the same circuits (a subset if asked, cost is per hypothesis)
    step("hook baseline")
    circuits = families["circuits"][: baseline_hypotheses or counts["circuits"]]
    _, cf_cache = model.run_with_cache(xc)
    with Adapter.of(model).split_inputs():
        kept_sets = [set(h.facts.edges) for h in circuits]
        check_plan = GroupPlan(graph, compile_all(graph, circuits[:1], max_mixed_copies=10**6))
        want = GroupEvaluator(model, check_plan, Runs(model, xr, xc),
                              PositionContext({}, batch, seq_len, xr.device)).logits()[0]
        got = hook_baseline(model, graph, kept_sets[0], xr, cf_cache)
        err = (got - want).abs().max().item()
        tolerance = 1e-3 if want.dtype in (torch.float32, torch.float64) else 1e-1  # half precision
        assert err < tolerance * max(1.0, want.abs().max().item()), f"hook baseline disagrees: {err}"

    def baseline():  # within split inputs; the neighbouring forwards are plain ones
        with Adapter.of(model).split_inputs():
            _, cache = model.run_with_cache(xc)  # its counterfactual cache, amortized like ours
            for kept in kept_sets:
                hook_baseline(model, graph, kept, xr, cache)

    baseline_forwards = side_by_side.forwards_taken(baseline, repeats) / len(circuits)
    result["hook_baseline_over_forward"] = round(baseline_forwards, 3)
    result["hook_baseline_over_engine"] = round(baseline_forwards / in_forwards["circuits"], 3)
    result["hook_baseline_hypotheses"] = len(circuits)
    side_by_side.report(result)
    result["baseline_max_abs_diff"] = err
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


DISCOVERY_PHASES = 5  # forward, EAP, EAP-IG, exact ranking, search


def run_discovery_benchmark(model=None, *, batch: int = 8, seq_len: int = 32, steps: int = 5,
                            decisions: int = 24, window: int = 8, tau: float = 1e-4,
                            exact_sample: int = 128, repeats: int = 2, seed: int = 0,
                            progress: Callable[[str], None] | None = None) -> dict:
    """The cost of each way to rank or find edges, in forwards of the same batch.

    Every figure is divided by the faster of the plain forwards timed just before and after it.
    EAP and EAP-IG: one call of `attribution.edge_attributions` (its runs included). The exact
    ranking: `exact_sample` random single-edge removals in groups of 64 (a sweep's items) with
    the batch's cached runs, per edge and for all edges. The greedy search: `decisions` edges
    decided for real on the engine, one candidate at a time and `window` at a time, with the
    batch's cached runs reused as a worker reuses them per shard, at both ends of the visiting
    order (edges into `out`, whose candidates recompute the least; edges into layer 0, which
    recompute everything after it): evaluations per decided edge, forwards per evaluation, and
    the forwards a whole search would take between those two rates (receivers nothing reads are
    skipped, so fewer).
    """
    step = progress or (lambda phase: None)
    torch.manual_seed(seed)
    model = model if model is not None else gpt2_small_shaped(seed)
    graph, vocab = Graph.from_model(model), Adapter.of(model).d_vocab
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    xr = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    xc = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    answer = torch.randint(0, vocab, (batch,), generator=gen)
    scored = torch.zeros(batch, seq_len, dtype=torch.bool)
    scored[:, -1] = True
    data = PairDataset(xr, xc, scored, answer=answer, wrong_answer=(answer + 1) % vocab)
    step("forward")
    tokens = xr.to(device)
    side_by_side = _SideBySide(lambda: model(tokens), max(5, repeats))
    result: dict = {"edges": len(graph.edges), "batch": batch, "seq_len": seq_len,
                    "torch_threads": torch.get_num_threads(), **cpu_description()}
    step("EAP")
    eap = side_by_side.forwards_taken(lambda: edge_attributions(model, data, "logit_diff"),
                                      repeats)
    step(f"EAP-IG ({steps} steps)")
    ig = side_by_side.forwards_taken(
        lambda: edge_attributions(model, data, "logit_diff", steps=steps), repeats)
    result["eap"] = {"forwards": round(eap, 2), "anchor": "2 forwards + 1 backward"}
    result["eap_ig"] = {"steps": steps, "forwards": round(ig, 2),
                        "anchor": f"2 forwards + {steps} forwards and backwards"}
    step(f"exact ranking: {exact_sample} edge removals")
    runs_cache: dict = {}
    evaluate(model, data, [circuit_hypothesis(graph, "all", graph.edges)], "kl",
             runs_cache=runs_cache)  # the shard's cached runs, as a worker holds them
    removals = random_edge_removals(graph, exact_sample, random.Random(seed))
    groups = [removals[i:i + 64] for i in range(0, len(removals), 64)]  # a sweep's items
    prepared = Prepared.of(model)

    def exact_ranking() -> None:  # every repeat compiles and plans, as a one-shard sweep does
        prepared.clear()
        for group in groups:
            evaluate(model, data, group, "logit_diff", runs_cache=runs_cache)

    per_edge = side_by_side.forwards_taken(exact_ranking, repeats) / len(removals)
    result["exact"] = {"sampled_edges": len(removals), "forwards_per_edge": round(per_edge, 3),
                       "forwards": round(per_edge * len(graph.edges)),
                       "anchor": "one single-edge removal per edge, 64 per work item"}
    step(f"search: {decisions} decisions x 2 places, windows 1 and {window}")
    searches = {}
    first_of_layer0 = next(i for i, e in enumerate(GreedySearch(graph, tau).order)
                           if e.receiver.kind is not NodeKind.OUTPUT and e.receiver.layer == 0)
    for where, position in (("into_out", 0), ("into_layer_0", first_of_layer0)):
        for w in (1, window):
            search = GreedySearch(graph, tau)
            search.record(search.candidates(w), {START: 0.0})  # the full model: d = 0 for KL
            # deciding from here is the search's state had it kept every earlier edge:
            # receivers into out are the cheapest candidates, those into layer 0 the dearest
            search.position = position
            prepared.clear()  # each window compiles its own candidates, none kept from another
            candidates_run, start = 0, time.perf_counter()
            while len(search.steps) < decisions and not search.done:
                candidates = search.candidates(w)
                hyps = [circuit_hypothesis(graph, c.name, c.circuit) for c in candidates]
                table = evaluate(model, data, hyps, "kl", runs_cache=runs_cache)
                ue = table.column("ue").to_numpy().reshape(len(hyps), -1).mean(axis=1)
                search.record(candidates, {h.name: float(u) for h, u in zip(hyps, ue, strict=True)})
                candidates_run += len(candidates)
            seconds = time.perf_counter() - start
            per_eval = side_by_side.in_forwards(seconds) / candidates_run
            decided = len(search.steps)
            per_edge = candidates_run / decided
            searches[f"{where}_window_{w}"] = {
                "decisions": decided, "removed": sum(s.removed for s in search.steps),
                "evaluations": candidates_run, "evaluations_per_edge": round(per_edge, 3),
                "seconds_per_evaluation": round(seconds / candidates_run, 4),
                "forwards_per_evaluation": round(per_eval, 3),
                "forwards_per_edge": round(per_edge * per_eval, 3),
            }
    cheap = searches[f"into_out_window_{window}"]["forwards_per_edge"]
    dear = searches[f"into_layer_0_window_{window}"]["forwards_per_edge"]
    searches["whole_search_forwards_between"] = [round(cheap * len(graph.edges)),
                                                 round(dear * len(graph.edges))]
    result["search"] = {"tau": tau, "metric": "kl", **searches}
    side_by_side.report(result)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result
