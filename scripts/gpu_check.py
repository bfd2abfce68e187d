"""The CUDA path on a lent GPU: exactness vs CPU, fp32/bf16/fp16, memory budget, engine bench,
and the full single-edge scan of a GPT-2-small shape through the pipeline.

Run on a machine with a CUDA GPU:
    python scripts/gpu_check.py               everything (JSON lines; the scan last)
    python scripts/gpu_check.py --bench-only  the engine benchmark only
    python scripts/gpu_check.py --scan-only   the scan only (`pathpatch bench scan --device cuda`)
    python scripts/gpu_check.py --families    the families new with TransformerLens 4 (Gemma-3,
                                              OLMo-2/3, Phi-3, SmolLM3) in bfloat16 on CUDA
The scan's goal: all 32,491 edges over 1,000 prompts in at most 15 minutes on one H100/H200
(`projected_hours_1000_prompts_one_worker` <= 0.25).
"""

from __future__ import annotations

import json
import random
import sys
import time

import torch

sys.path.insert(0, ".")
from pathpatch.data.pairs import PairDataset  # noqa: E402
from pathpatch.engine.evaluation import evaluate  # noqa: E402
from pathpatch.language.hypotheses import Hypothesis  # noqa: E402
from pathpatch.model.graph import Graph  # noqa: E402
from pathpatch.tools.engine_benchmarks import gpt2_small_shaped, random_circuits, random_edge_removals  # noqa: E402


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if "--bench-only" in sys.argv:
        return bench(out)
    if "--scan-only" in sys.argv:
        return scan()
    if "--families" in sys.argv:
        return families(out)
    model = gpt2_small_shaped(seed=0, n_ctx=64)
    graph = Graph.from_model(model)
    rng = random.Random(0)
    hyps = random_circuits(graph, 8, rng) + random_edge_removals(graph, 8, rng) + [
        Hypothesis("prev-k", "a0.* -> a5.*[k]@prev -> out"), Hypothesis("not a3", "~a3.*")]
    gen = torch.Generator().manual_seed(0)
    n, T = 32, 32
    data = PairDataset(torch.randint(0, 50257, (n, T), generator=gen),
                       torch.randint(0, 50257, (n, T), generator=gen),
                       torch.ones(n, T, dtype=torch.bool))
    cpu = evaluate(model, data, hyps, batch_size=8)
    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        m = gpt2_small_shaped(seed=0, n_ctx=64).to("cuda").to(dtype)
        assert next(m.parameters()).dtype == dtype and next(m.parameters()).is_cuda
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rows = evaluate(m, data, hyps, batch_size=8)
        torch.cuda.synchronize()
        ue_gpu = torch.tensor(rows["ue"].to_pylist())
        ue_cpu = torch.tensor(cpu["ue"].to_pylist())
        results[str(dtype)] = {
            "seconds": round(time.perf_counter() - t0, 3),
            "max_abs_diff_ue": float((ue_gpu - ue_cpu).abs().max()),
            "max_rel_diff_where_ue_over_0.01": float(((ue_gpu - ue_cpu).abs() / ue_cpu)[ue_cpu > 0.01].max()),
            "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        }
        del m
    out["dtypes"] = results
    # memory budget: peak GPU memory of evaluate stays under the budget
    m = gpt2_small_shaped(seed=0, n_ctx=64).to("cuda")
    big = [Hypothesis(f"c{i}", h.pattern) for i, h in enumerate(random_circuits(graph, 24, rng))]
    budgets = {}
    for budget in (384 * 2**20, 1024 * 2**20, 4096 * 2**20):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        rows = evaluate(m, data, big, memory_budget=budget)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        budgets[f"{budget >> 20} MiB"] = {"peak_mib": round(peak / 2**20, 1), "under_budget": peak <= budget,
                                          "seconds": round(time.perf_counter() - t0, 2)}
    out["memory_budget"] = budgets
    print(json.dumps(out, indent=1), flush=True)
    bench(out)
    scan()


def bench(out: dict) -> None:
    from pathpatch.tools.engine_benchmarks import run_engine_benchmark

    for dtype in (torch.float32, torch.bfloat16):
        m = gpt2_small_shaped(seed=0, n_ctx=64).to("cuda").to(dtype)
        result = run_engine_benchmark(m, n_hypotheses=64, repeats=3, memory_budget=8 * 2**30)
        print(json.dumps({"bench_engine": str(dtype), **result}), flush=True)
        del m


def scan() -> None:
    """The scan on one GPU actor: 256 pairs (a shard per item), 6 sampled items of 64 edges."""
    from pipeline.pipeline_benchmark import bench_scan

    result = bench_scan(pairs=256, sample_items=6, device="cuda", memory_budget=32 * 2**30)
    print(json.dumps({"bench_scan": result}), flush=True)


def families(out: dict) -> None:
    """Each new family as a random Hugging Face model (4 layers, d_model 256): pathpatch's model in
    bfloat16 on CUDA against the Hugging Face model in bfloat16 on CUDA (logits) and against
    pathpatch in float32 on the CPU (UE of node removals and a circuit)."""
    import tempfile

    import transformers as tr

    from pathpatch.model.loading import load_model

    shape = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, intermediate_size=512, max_position_embeddings=256)
    configs = {
        "gemma3_text": tr.Gemma3TextConfig(**shape, head_dim=32, sliding_window=16,
                                           layer_types=["sliding_attention"] * 3 + ["full_attention"]),
        "olmo2": tr.Olmo2Config(**shape),
        "olmo3": tr.Olmo3Config(**shape, sliding_window=16),
        "phi3": tr.Phi3Config(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "smollm3": tr.SmolLM3Config(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    }
    gen = torch.Generator().manual_seed(0)
    n, T = 16, 48
    data = PairDataset(torch.randint(0, 1024, (n, T), generator=gen),
                       torch.randint(0, 1024, (n, T), generator=gen), torch.ones(n, T, dtype=torch.bool))
    results = {}
    for family, config in configs.items():
        torch.manual_seed(0)
        hf = tr.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            cpu = load_model(folder)
            gpu = load_model(folder, device="cuda", dtype=torch.bfloat16)
            hf_gpu = tr.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.bfloat16, attn_implementation="eager").to("cuda").eval()
        graph = Graph.from_model(cpu)
        hyps = [Hypothesis("~a3.0", "~a3.0"), Hypothesis("~m1", "~m1"),
                *random_circuits(graph, 2, random.Random(0))]
        with torch.no_grad():
            tokens = data.reference[:4].to("cuda")
            logit_diff = float((gpu(tokens).float() - hf_gpu(tokens).logits.float()).abs().max())
        t0 = time.perf_counter()
        ue_gpu = torch.tensor(evaluate(gpu, data, hyps, batch_size=8)["ue"].to_pylist())
        seconds = time.perf_counter() - t0
        ue_cpu = torch.tensor(evaluate(cpu, data, hyps, batch_size=8)["ue"].to_pylist())
        results[family] = {"max_abs_logit_diff_vs_hf_bf16": logit_diff,
                           "max_abs_diff_ue_bf16_cuda_vs_fp32_cpu": float((ue_gpu - ue_cpu).abs().max()),
                           "mean_ue_fp32": float(ue_cpu.mean()), "seconds_bf16": round(seconds, 2)}
        del gpu, hf_gpu
        torch.cuda.empty_cache()
    out["families_bf16"] = results
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
