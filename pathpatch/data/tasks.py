"""Synthetic tasks, generated deterministically from a seed: one sampler per task, shared by
the training scripts (token batches) and by the pair datasets path patching runs on.

Two tasks, one per bundled model:

- **induction** (`attn-only-2l`): random tokens with one repeated segment. Where the segment
  starts, how long it is and how far the second occurrence sits from the first all vary per
  sequence, so a model can only predict the repeat by *content* (find the earlier occurrence of
  the current token, copy the token after it). Some distances and start offsets are held out of
  training (`HELD_OUT_DISTANCES`, `HELD_OUT_STARTS`) to check exactly that.
- **modular_sum** (`mlp-2l`): `[a, fillers..., b]`; the last position predicts `(a + b) mod p`.
  Attention must bring `a` to the last position, and the sum is a nonlinear lookup of two
  tokens, which attention's linear value path cannot compute: the MLPs have to.

`make_dataset(kind, **params)` is the one entry point by name.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import lru_cache

import torch

from pathpatch.data.pairs import PairDataset
from pathpatch.errors import PathPatchError

# Induction task defaults: the bundled attn-only-2l model was trained on exactly these.
INDUCTION_SEQ_LEN = 64
INDUCTION_VOCAB = 128
MIN_SEGMENT_LEN = 4
MAX_SEGMENT_LEN = 32
# Distances (second start - first start) and first-occurrence starts never shown in training:
# a band inside the trained range (interpolation) and the longest distances (extrapolation).
HELD_OUT_DISTANCES: frozenset[int] = frozenset(range(24, 29)) | frozenset(range(46, 61))
HELD_OUT_STARTS: frozenset[int] = frozenset({5, 6, 13, 14})

# Modular-sum task defaults (bundled mlp-2l).
MODSUM_SEQ_LEN = 8
MODSUM_VOCAB = 64
MODSUM_MODULUS = 23

COUNTERFACTUALS = ("resample_first", "independent")


@dataclass(frozen=True)
class RepeatLayout:
    """Where the repeated segment sits in each sequence of a batch.

    Attributes:
        start: [batch] int64, first occurrence begins here (s1).
        length: [batch] int64, segment length (L).
        distance: [batch] int64, second occurrence begins at start + distance (d >= L).
    """

    start: torch.Tensor
    length: torch.Tensor
    distance: torch.Tensor

    @property
    def second_start(self) -> torch.Tensor:
        return self.start + self.distance


def _check_counterfactual(counterfactual: str) -> None:
    if counterfactual not in COUNTERFACTUALS:
        raise PathPatchError(
            f"unknown counterfactual {counterfactual!r}: allowed are {', '.join(COUNTERFACTUALS)}"
        )


@lru_cache(maxsize=32)
def _layout_table(
    seq_len: int,
    min_len: int,
    max_len: int,
    min_gap: int,
    distances: frozenset[int] | None,
    starts: frozenset[int] | None,
    exclude_distances: frozenset[int],
    exclude_starts: frozenset[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every valid (start, length, distance) triple, with sampling weights.

    Weights make the draw hierarchical: length uniform, then distance uniform among those valid
    for it, then start uniform, so short segments do not dominate just by having more layouts.
    """
    rows: list[tuple[int, int, int]] = []
    weights: list[float] = []
    for length in range(min_len, max_len + 1):
        per_distance: dict[int, list[int]] = {}
        for distance in range(length + min_gap, seq_len - length + 1):
            if (distances is not None and distance not in distances) or (distance in exclude_distances):
                continue
            ok = [
                s
                for s in range(0, seq_len - distance - length + 1)
                if (starts is None or s in starts) and s not in exclude_starts
            ]
            if ok:
                per_distance[distance] = ok
        for distance, ok in per_distance.items():
            for s in ok:
                rows.append((s, length, distance))
                weights.append(1.0 / (len(per_distance) * len(ok)))
    if not rows:
        raise PathPatchError(
            f"no repeat layout fits: seq_len={seq_len}, segment length {min_len}-{max_len}, "
            f"min_gap={min_gap}, distances={sorted(distances) if distances else 'any'}, "
            f"starts={sorted(starts) if starts else 'any'}; widen the ranges or lengthen seq_len"
        )
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(weights, dtype=torch.float64)


def sample_repeat_layout(
    batch: int,
    seq_len: int,
    generator: torch.Generator,
    *,
    min_len: int = MIN_SEGMENT_LEN,
    max_len: int = MAX_SEGMENT_LEN,
    min_gap: int = 0,
    distances: Collection[int] | None = None,
    starts: Collection[int] | None = None,
    exclude_distances: Collection[int] = (),
    exclude_starts: Collection[int] = (),
) -> RepeatLayout:
    """Draw one repeat layout per sequence (allowed sets restrict, excluded sets remove)."""
    if not 1 <= min_len <= max_len:
        raise PathPatchError(f"segment lengths need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    table, weights = _layout_table(
        seq_len,
        min_len,
        max_len,
        min_gap,
        None if distances is None else frozenset(distances),
        None if starts is None else frozenset(starts),
        frozenset(exclude_distances),
        frozenset(exclude_starts),
    )
    pick = torch.multinomial(weights, batch, replacement=True, generator=generator)  # (batch,)
    chosen = table[pick]  # (batch, 3)
    return RepeatLayout(start=chosen[:, 0], length=chosen[:, 1], distance=chosen[:, 2])


def _segment_masks(layout: RepeatLayout, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, pos] bool masks of the first and the second occurrence."""
    pos = torch.arange(seq_len)[None, :]  # (1, pos)
    s1, s2, length = layout.start[:, None], layout.second_start[:, None], layout.length[:, None]
    first = (pos >= s1) & (pos < s1 + length)
    repeat = (pos >= s2) & (pos < s2 + length)
    return first, repeat


def _scored(layout: RepeatLayout, seq_len: int) -> torch.Tensor:
    """[batch, pos] bool: positions of the repeat whose next token is in the repeat too."""
    _, repeat = _segment_masks(layout, seq_len)
    last = layout.second_start + layout.length - 1  # (batch,) last position of the repeat
    return repeat & (torch.arange(seq_len)[None, :] < last[:, None])


FILLERS = ("distinct", "uniform")


def induction_tokens(
    layout: RepeatLayout,
    seq_len: int,
    vocab_size: int,
    generator: torch.Generator,
    fillers: str = "distinct",
) -> torch.Tensor:
    """Random sequences with the layout's segment written twice: [batch, pos] int64.

    Segment tokens are distinct and appear nowhere else in their sequence, so every token of
    the second occurrence has exactly one earlier occurrence. The other positions hold
    `fillers`: "distinct" tokens (a random permutation, so no token but the segment's ever
    recurs and an earlier occurrence always means a true repeat), or "uniform" draws from the
    rest of the vocabulary (chance recurrences, as in real text, make the copy uncertain).
    """
    if fillers not in FILLERS:
        raise PathPatchError(f"unknown fillers {fillers!r}: allowed are {', '.join(FILLERS)}")
    batch = layout.start.shape[0]
    need = seq_len if fillers == "distinct" else 2 * int(layout.length.max())
    if vocab_size < need:
        raise PathPatchError(
            f"vocab_size={vocab_size} is too small: {fillers} fillers with seq_len={seq_len} and "
            f"segments up to {int(layout.length.max())} need vocab_size >= {need}"
            + (' (or fillers="uniform")' if fillers == "distinct" else "")
        )
    # A random permutation per row: its first L entries are the segment, the rest fill.
    perm = torch.rand(batch, vocab_size, generator=generator).argsort(dim=1)  # (batch, vocab)
    length = layout.length[:, None]  # (batch, 1)
    first, repeat = _segment_masks(layout, seq_len)
    if fillers == "distinct":
        is_filler = ~(first | repeat)
        filler_idx = length + is_filler.long().cumsum(dim=1) - 1  # (batch, pos): L, L+1, ...
        filler_idx = filler_idx.clamp(min=0, max=vocab_size - 1)
    else:
        u = torch.rand(batch, seq_len, generator=generator)
        filler_idx = length + (u * (vocab_size - length)).long()  # (batch, pos), in [L, vocab)
    tokens = perm.gather(1, filler_idx)  # (batch, pos)
    pos = torch.arange(seq_len)[None, :]
    seg_idx_first = (pos - layout.start[:, None]).clamp(min=0, max=vocab_size - 1)
    seg_idx_repeat = (pos - layout.second_start[:, None]).clamp(min=0, max=vocab_size - 1)
    tokens = torch.where(first, perm.gather(1, seg_idx_first), tokens)
    tokens = torch.where(repeat, perm.gather(1, seg_idx_repeat), tokens)
    return tokens


def _resample_first(
    tokens: torch.Tensor, layout: RepeatLayout, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    """The same sequences with the first occurrence replaced by distinct tokens used nowhere
    else in the sequence where possible (else by tokens outside the segment).

    The repeat then has no earlier copy, and every replacement differs from the token it
    replaces, so induction predicts a wrong token.
    """
    first, repeat = _segment_masks(layout, tokens.shape[1])
    batch, seq_len = tokens.shape
    kept = ~first  # tokens that stay in the counterfactual
    used = torch.zeros(batch, vocab_size).scatter_add_(1, tokens, kept.float()) > 0
    in_segment = torch.zeros(batch, vocab_size).scatter_add_(1, tokens, repeat.float()) > 0
    # Random order per row: unused tokens first, then used fillers, segment tokens last.
    keys = torch.rand(batch, vocab_size, generator=generator) + used.float() + in_segment.float()
    order = keys.argsort(dim=1)  # (batch, vocab)
    n_unused = (~used).sum(dim=1, keepdim=True)  # (batch, 1)
    if bool((n_unused >= layout.length[:, None]).all()):
        idx = torch.arange(seq_len)[None, :] - layout.start[:, None]  # index in the segment
        fresh = order.gather(1, idx.clamp(min=0, max=vocab_size - 1))  # distinct, unused
    else:  # too small a vocabulary: uniform draws from outside the segment
        n_outside = (vocab_size - layout.length)[:, None]
        u = torch.rand(batch, seq_len, generator=generator)
        fresh = order.gather(1, (u * n_outside).long())
    return torch.where(first, fresh, tokens)


def induction_pairs(
    n: int,
    seq_len: int = INDUCTION_SEQ_LEN,
    vocab_size: int = INDUCTION_VOCAB,
    seed: int = 0,
    counterfactual: str = "resample_first",
    min_len: int = MIN_SEGMENT_LEN,
    max_len: int = MAX_SEGMENT_LEN,
    min_gap: int = 0,
    distances: Collection[int] | None = None,
    starts: Collection[int] | None = None,
    fillers: str = "distinct",
) -> PairDataset:
    """Induction pairs: a sequence with a repeated segment and its counterfactual partner.

    Args:
        n: number of pairs.
        seq_len, vocab_size: sequence shape and token range.
        seed: everything is a function of the arguments; same seed, same tensors.
        counterfactual: "resample_first" (same sequence, first occurrence replaced, so the repeat
            carries no information) or "independent" (a fresh uniform random sequence).
        min_len, max_len: segment length range; min_gap: least gap between the occurrences.
        distances, starts: optional allowed sets of occurrence distance / first start (e.g.
            `HELD_OUT_DISTANCES` to test layouts the bundled model never saw).
        fillers: "distinct" (no chance recurrences; what the bundled model saw) or "uniform";
            see `induction_tokens`.

    Returns:
        A PairDataset with
        scored [batch, pos]: t in the second occurrence whose next token is in it too
            (predictable from the first occurrence); always t < seq_len - 1;
        masks "repeat" / "first" [batch, pos]: the second / first occurrence;
        masks "after_prev_occurrence" / "prev_occurrence" [batch, dest, src]: for dest in the
            second occurrence, src = its earlier occurrence + 1 / the earlier occurrence;
        answer [batch]: the true next token at the last scored position;
        wrong_answer [batch]: a different token there: for "resample_first" the token induction
            would copy from the resampled first occurrence, for "independent" the
            counterfactual's next token (or answer + 1 where they coincide).
    """
    _check_counterfactual(counterfactual)
    gen = torch.Generator().manual_seed(seed)
    layout = sample_repeat_layout(
        n, seq_len, gen, min_len=min_len, max_len=max_len, min_gap=min_gap, distances=distances, starts=starts
    )
    reference = induction_tokens(layout, seq_len, vocab_size, gen, fillers)
    first, repeat = _segment_masks(layout, seq_len)
    pos = torch.arange(seq_len)
    scored = _scored(layout, seq_len)

    # [batch, dest, src]: dest in the repeat, src = dest - d (+ 1).
    src_prev = pos[None, :] - layout.distance[:, None]  # (batch, dest)
    prev_occurrence = repeat[:, :, None] & (pos[None, None, :] == src_prev[:, :, None])
    after_prev = repeat[:, :, None] & (pos[None, None, :] == src_prev[:, :, None] + 1)

    last_scored = layout.second_start + layout.length - 2  # (batch,)
    rows = torch.arange(n)
    answer = reference[rows, last_scored + 1]
    if counterfactual == "resample_first":
        cf = _resample_first(reference, layout, vocab_size, gen)
        wrong = cf[rows, last_scored + 1 - layout.distance]
    else:
        cf = torch.randint(0, vocab_size, (n, seq_len), generator=gen)
        wrong = cf[rows, last_scored + 1]
        wrong = torch.where(wrong == answer, (answer + 1) % vocab_size, wrong)
    return PairDataset(
        reference=reference,
        counterfactual=cf,
        scored=scored,
        masks={
            "repeat": repeat,
            "first": first,
            "after_prev_occurrence": after_prev,
            "prev_occurrence": prev_occurrence,
        },
        answer=answer,
        wrong_answer=wrong,
    )


def induction_batch(
    batch: int,
    generator: torch.Generator,
    *,
    seq_len: int = INDUCTION_SEQ_LEN,
    vocab_size: int = INDUCTION_VOCAB,
    min_len: int = MIN_SEGMENT_LEN,
    max_len: int = MAX_SEGMENT_LEN,
    fillers: str = "distinct",
    held_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training (or held-out evaluation) batch for the induction model.

    Returns:
        tokens [batch, pos] int64, and scored [batch, pos] bool (as in `induction_pairs`).
        With `held_out=False` no layout uses a held-out distance or start; with True every
        layout uses both.
    """
    if held_out:
        which = {"distances": HELD_OUT_DISTANCES, "starts": HELD_OUT_STARTS}
    else:
        which = {"exclude_distances": HELD_OUT_DISTANCES, "exclude_starts": HELD_OUT_STARTS}
    layout = sample_repeat_layout(batch, seq_len, generator, min_len=min_len, max_len=max_len, **which)
    tokens = induction_tokens(layout, seq_len, vocab_size, generator, fillers)
    return tokens, _scored(layout, seq_len)


def _check_modsum(seq_len: int, vocab_size: int, modulus: int) -> None:
    if seq_len < 2:
        raise PathPatchError(f"modular_sum needs seq_len >= 2 (a and b), got {seq_len}")
    if not 2 <= modulus < vocab_size:
        raise PathPatchError(
            f"modular_sum needs 2 <= modulus < vocab_size (numbers 0..p-1, the rest fillers), "
            f"got modulus={modulus}, vocab_size={vocab_size}"
        )


def modular_sum_batch(
    batch: int,
    generator: torch.Generator,
    *,
    seq_len: int = MODSUM_SEQ_LEN,
    vocab_size: int = MODSUM_VOCAB,
    modulus: int = MODSUM_MODULUS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences `[a, fillers..., b]` and their targets `(a + b) mod p`.

    Numbers are tokens 0..p-1, fillers p..vocab-1, so only positions 0 and -1 carry numbers.

    Returns:
        tokens [batch, pos] int64 and target [batch] int64 (the next token at the last position).
    """
    _check_modsum(seq_len, vocab_size, modulus)
    tokens = torch.randint(modulus, vocab_size, (batch, seq_len), generator=generator)
    a = torch.randint(0, modulus, (batch,), generator=generator)
    b = torch.randint(0, modulus, (batch,), generator=generator)
    tokens[:, 0] = a
    tokens[:, -1] = b
    return tokens, (a + b) % modulus


def modular_sum_pairs(
    n: int,
    seq_len: int = MODSUM_SEQ_LEN,
    vocab_size: int = MODSUM_VOCAB,
    modulus: int = MODSUM_MODULUS,
    seed: int = 0,
    counterfactual: str = "resample_first",
) -> PairDataset:
    """Modular-sum pairs: `[a, fillers..., b]` against a partner whose first operand differs.

    Args:
        n: number of pairs; seed: same seed, same tensors.
        counterfactual: "resample_first" (same sequence, a replaced by some a' != a) or
            "independent" (a fresh sequence with its own a', fillers and b').

    Returns:
        A PairDataset with scored = the last position only; masks "operand_a" / "operand_b"
        [batch, pos] (positions 0 and -1), "filler" [batch, pos], and "attend_a"
        [batch, dest, src] (dest = last position, src = 0); answer = (a + b) mod p;
        wrong_answer = the counterfactual's answer (a' + b') mod p, or answer + 1 mod p where
        they coincide.
    """
    _check_counterfactual(counterfactual)
    gen = torch.Generator().manual_seed(seed)
    reference, answer = modular_sum_batch(n, gen, seq_len=seq_len, vocab_size=vocab_size, modulus=modulus)
    if counterfactual == "resample_first":
        shift = torch.randint(1, modulus, (n,), generator=gen)  # a' = a + shift != a
        cf = reference.clone()
        cf[:, 0] = (reference[:, 0] + shift) % modulus
        cf_answer = (cf[:, 0] + cf[:, -1]) % modulus
    else:
        cf, cf_answer = modular_sum_batch(n, gen, seq_len=seq_len, vocab_size=vocab_size, modulus=modulus)
    wrong = torch.where(cf_answer == answer, (answer + 1) % modulus, cf_answer)
    pos = torch.arange(seq_len)
    operand_a = (pos == 0)[None, :].expand(n, seq_len).clone()
    operand_b = (pos == seq_len - 1)[None, :].expand(n, seq_len).clone()
    attend_a = operand_b[:, :, None] & operand_a[:, None, :]  # (batch, dest, src)
    return PairDataset(
        reference=reference,
        counterfactual=cf,
        scored=operand_b.clone(),
        masks={
            "operand_a": operand_a,
            "operand_b": operand_b,
            "filler": ~(operand_a | operand_b),
            "attend_a": attend_a,
        },
        answer=answer,
        wrong_answer=wrong,
    )


_NUMBER_TEMPLATES = (
    "I counted: {a}, {b}, {c},",
    "The pages are {a}, {b}, {c},",
    "Seats {a}, {b}, {c},",
)
_NON_NUMBERS = (" cat", " dog", " tree", " house", " river", " stone", " bird", " table", " chair",
                " road", " lamp", " book", " door", " hill", " ship", " cloud")


def _cached_tokenizer(kind: str, tokenizer: str):
    """A tokenizer from the local Hugging Face cache (or a folder), or an error saying how to
    get it: nothing downloads at run time."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except (OSError, ValueError) as err:
        raise PathPatchError(
            f"dataset {kind!r} needs the {tokenizer!r} tokenizer in the local Hugging Face cache"
            f" and it is not there ({type(err).__name__}); download it where there is network"
            f" (`huggingface-cli download {tokenizer}`) and copy the cache"
        ) from None


def _last_position_pairs(refs: list[list[int]], cfs: list[list[int]], answers: list[int],
                         wrongs: list[int], *, pad: int) -> PairDataset:
    """Token-aligned prompt pairs, left-padded so that every prompt ends at the last position
    (GPT-2 has no padding token), scored there."""
    width = max(len(r) for r in refs)
    reference = torch.tensor([[pad] * (width - len(r)) + r for r in refs])
    counterfactual = torch.tensor([[pad] * (width - len(c)) + c for c in cfs])
    scored = torch.zeros(len(refs), width, dtype=torch.bool)
    scored[:, -1] = True
    return PairDataset(reference, counterfactual, scored, answer=torch.tensor(answers),
                       wrong_answer=torch.tensor(wrongs))


def gpt2_numbers(n: int, seed: int = 0, tokenizer: str = "gpt2") -> PairDataset:
    """GPT-2 number prediction: prompts counting up by one, whose next token is a number, and
    counterfactuals with the numbers replaced by words (the next token is not a number).

    The answer is the next number; the wrong answer repeats the last one. Delta is read at the
    last position. Needs the GPT-2 tokenizer from the local Hugging Face cache.
    """
    tok = _cached_tokenizer("gpt2_numbers", tokenizer)
    rng = random.Random(seed)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    refs, cfs, answers, wrongs = [], [], [], []
    for _attempt in range(100 * n):
        if len(refs) == n:
            break
        template = rng.choice(_NUMBER_TEMPLATES)
        a = rng.randrange(10, 95)
        ref = ids(template.format(a=a, b=a + 1, c=a + 2))
        words = rng.sample(_NON_NUMBERS, 3)
        cf = ids(template.format(a=words[0].strip(), b=words[1].strip(), c=words[2].strip()))
        answer, wrong = ids(f" {a + 3}"), ids(f" {a + 2}")
        if len(ref) != len(cf) or len(answer) != 1 or len(wrong) != 1:
            continue  # keep pairs token-aligned with single-token answers
        refs.append(ref)
        cfs.append(cf)
        answers.append(answer[0])
        wrongs.append(wrong[0])
    if len(refs) < n:
        raise PathPatchError(
            f"tokenizer {tokenizer!r} gives number prompts and word prompts of different lengths"
            " (or multi-token numbers); gpt2_numbers needs GPT-2's tokenizer"
        )
    return _last_position_pairs(refs, cfs, answers, wrongs, pad=tok.eos_token_id)


IOI_TEMPLATES = (
    "When{A} and{B} went to the store,{S} gave a drink to",
    "When{A} and{B} went to the park,{S} gave a ball to",
    "After{A} and{B} went to the school,{S} gave a book to",
    "While{A} and{B} were working at the office,{S} gave a report to",
    "Then,{A} and{B} had a long argument. Afterwards{S} said to",
    "Friends{A} and{B} found a bag at the garden.{S} gave it to",
)
"""Indirect-object identification prompts (Wang et al.): two names, then one of them (the
subject) gives something to the other, whose name (the indirect object) comes next."""

IOI_NAMES = (" Mary", " John", " Tom", " James", " Dan", " Sid", " Alice", " Bob", " Kate",
             " Paul", " Anna", " Mike", " Sarah", " David", " Lisa", " Mark", " Emma", " Jack",
             " Laura", " Peter")


def ioi(n: int, seed: int = 0, tokenizer: str = "gpt2") -> PairDataset:
    """GPT-2 indirect-object identification: "When Mary and John went to the store, John gave a
    drink to" -> " Mary". The counterfactual is the same template with three other names
    (Wang et al.'s ABC distribution: no name repeats, so nothing identifies the answer). The
    answer is the indirect object, the wrong answer the subject; read at the last position.
    Both name orders (ABBA and BABA) occur; the templates used are those of the most common
    token length, so no prompt is padded. Needs the tokenizer in the local Hugging Face cache;
    names that are not one token in it are not used.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PathPatchError(f"dataset 'ioi': n = {n!r}: give the number of pairs, >= 1")
    tok = _cached_tokenizer("ioi", tokenizer)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    names = [name for name in IOI_NAMES if len(ids(name)) == 1]
    if len(names) < 5:
        raise PathPatchError(f"dataset 'ioi': tokenizer {tokenizer!r} has only {len(names)} of "
                             "the task's names as single tokens (5 are needed); use GPT-2's")
    # one prompt length: every pair ends at the last position without padding, which GPT-2
    # (no attention mask here) would attend to, and a position means the same in every prompt
    lengths = [len(ids(t.format(A=names[0], B=names[1], S=names[0]))) for t in IOI_TEMPLATES]
    common = max(set(lengths), key=lambda length: (lengths.count(length), -length))
    templates = [t for t, length in zip(IOI_TEMPLATES, lengths, strict=True) if length == common]
    rng = random.Random(seed)
    refs, cfs, answers, wrongs = [], [], [], []
    for _attempt in range(100 * n):
        if len(refs) == n:
            break
        template = rng.choice(templates)
        io, subject, c, d, e = rng.sample(names, 5)
        first, second = (io, subject) if rng.random() < 0.5 else (subject, io)
        ref = ids(template.format(A=first, B=second, S=subject))
        cf = ids(template.format(A=c, B=d, S=e))
        if len(ref) != len(cf):
            continue  # keep pairs token-aligned
        refs.append(ref)
        cfs.append(cf)
        answers.append(ids(io)[0])
        wrongs.append(ids(subject)[0])
    if len(refs) < n:
        raise PathPatchError(f"dataset 'ioi': tokenizer {tokenizer!r} splits the prompts of "
                             "different names into different lengths; use GPT-2's")
    assert len({len(r) for r in refs}) == 1  # no padding
    return _last_position_pairs(refs, cfs, answers, wrongs, pad=tok.eos_token_id)


DATASETS: dict[str, Callable[..., PairDataset]] = {
    "induction": induction_pairs,
    "modular_sum": modular_sum_pairs,
    "gpt2_numbers": gpt2_numbers,
    "ioi": ioi,
}


def make_dataset(kind: str, **params: object) -> PairDataset:
    """Build a named task's pair dataset; unknown kinds and parameters are errors, not no-ops."""
    if kind not in DATASETS:
        raise PathPatchError(f"unknown dataset kind {kind!r}: allowed are {', '.join(sorted(DATASETS))}")
    fn = DATASETS[kind]
    allowed = list(inspect.signature(fn).parameters)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise PathPatchError(
            f"unknown parameter(s) {', '.join(unknown)} for dataset {kind!r}: "
            f"allowed are {', '.join(allowed)}"
        )
    if "n" not in params:
        raise PathPatchError(f"dataset {kind!r} needs n (the number of pairs)")
    return fn(**params)
