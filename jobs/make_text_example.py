"""Write jobs/induction_text.jsonl: induction prompts as text for the bundled attn-only-2l.

Its word-level tokenizer (`pathpatch/bundled/attn-only-2l.tokenizer.json`) reads word `t<i>` as
token i. Each row is a pair of the `induction` task (`pathpatch.data.tasks.induction_pairs`, the
counterfactual resampling the first occurrence of the repeated segment) cut at a random point
inside the second occurrence, so prompts vary in length: the answer is the segment's next token,
the competing answer a random other token.

    python jobs/make_text_example.py
"""

import json
import random
from pathlib import Path

from pathpatch.data.tasks import induction_pairs


def main(n: int = 32, seed: int = 0) -> None:
    rng = random.Random(seed)
    pairs = induction_pairs(n, seed=seed)
    rows = []
    for i in range(n):
        ends = [int(t) for t in pairs.scored[i].nonzero()[:, 0] if t + 1 < pairs.seq_len]
        end = rng.choice(ends)  # the prompt's last token; the answer is the next one
        answer = int(pairs.reference[i, end + 1])
        wrong = rng.choice([t for t in range(128) if t != answer])
        clean, corrupted = (" ".join(f"t{int(t)}" for t in tokens[: end + 1])
                            for tokens in (pairs.reference[i], pairs.counterfactual[i]))
        rows.append({"clean": clean, "corrupted": corrupted, "answer": f"t{answer}",
                     "wrong_answer": f"t{wrong}"})
    out = Path(__file__).with_name("induction_text.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
