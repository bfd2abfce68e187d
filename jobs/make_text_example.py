"""Write jobs/induction_text.jsonl: induction prompts as text for the bundled attn-only-2l.

Its word-level tokenizer (`pathpatch/bundled/attn-only-2l.tokenizer.json`) reads word `t<i>` as
token i. Each clean prompt holds a segment twice, the second copy cut short: the answer is the
segment's next token, the competing answer another token. The corrupted prompt replaces the
first copy with other tokens (same length), so there is nothing to copy. Prompts vary in length.

    python jobs/make_text_example.py
"""

import json
import random
from pathlib import Path


def main(n: int = 32, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        segment = rng.sample(range(128), rng.randint(4, 8))
        before, between = rng.randint(2, 10), rng.randint(2, 12)
        cut = rng.randint(1, len(segment) - 1)
        filler = [rng.randrange(128) for _ in range(before + between)]
        clean = filler[:before] + segment + filler[before:] + segment[:cut]
        other = [rng.choice([t for t in range(128) if t not in segment]) for _ in segment]
        corrupted = filler[:before] + other + filler[before:] + segment[:cut]
        wrong = rng.choice([t for t in range(128) if t != segment[cut]])
        rows.append({"clean": " ".join(f"t{t}" for t in clean),
                     "corrupted": " ".join(f"t{t}" for t in corrupted),
                     "answer": f"t{segment[cut]}", "wrong_answer": f"t{wrong}"})
    out = Path(__file__).with_name("induction_text.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
