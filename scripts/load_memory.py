"""Peak resident memory of loading a Llama-3.2-1B-shaped Hugging Face directory, in float32 and in
bfloat16, against the size of the weights themselves (docs/MEASUREMENTS.md).

    python scripts/load_memory.py FOLDER     makes FOLDER (random weights, bfloat16 like the real
                                             checkpoint, about 2.5 GB) if it does not exist

Each load runs in a fresh process; the figure is its peak RSS (VmHWM) minus the RSS after the
imports, so the interpreter, torch and transformers are not counted. The weights' own size is
the checkpoint's parameters (tied embeddings counted once) in the dtype asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})

_CHILD = """
import json, sys, torch
import transformers, pathpatch
from pathpatch.model.loading import load_model

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

base = status("VmRSS")
dtype = getattr(torch, sys.argv[2])
model = load_model(sys.argv[1], dtype=dtype)
peak, after = status("VmHWM"), status("VmRSS")
storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
weights = sum(storages.values())
print(json.dumps({"dtype": sys.argv[2], "weights_gb": weights / 1e9,
                  "peak_rss_beyond_imports_gb": (peak - base) / 1e9,
                  "rss_after_loading_beyond_imports_gb": (after - base) / 1e9,
                  "ratio": (peak - base) / weights}))
"""


def make(folder: Path) -> None:
    import torch
    import transformers as tr

    torch.manual_seed(0)
    config = tr.LlamaConfig(**LLAMA_3_2_1B)
    model = tr.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)


def main() -> None:
    folder = Path(sys.argv[1])
    if not (folder / "config.json").exists():
        make(folder)
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), dtype],
                             capture_output=True, text=True, check=True)
        print(json.dumps(json.loads(out.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
