"""Text datasets (`pathpatch.data.text`): every format, the column mapping, MIB's layout, the
tokenizer's BOS convention, every error with its message, padding and the digest."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from pathpatch import Hypothesis, evaluate, load_model
from pathpatch.data.text import TextOptions, is_text_dataset, load_text
from pathpatch.errors import PathPatchError
from pathpatch.model.loading import load_tokenizer

WORDS = ["<pad>", "<s>", "When", "Mary", "John", "went", "to", "the", "store", ",", "gave", "a",
         "drink", "A", "B", "1", "2", "3", "+", "=", "big", "fat", "cat", "and"]


def tiny_tokenizer(bos_by_default: bool = True):
    """A word-level Hugging Face tokenizer built offline; like Llama's it prepends <s>
    (`bos_by_default`), like GPT-2's it does not."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_by_default:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>")


ROWS = [
    {"clean": "When Mary and", "corrupted": "When John and", "answer": "John", "wrong_answer": "Mary"},
]
PAIRS = [  # two lengths
    {"clean": "When Mary gave", "corrupted": "When John gave", "answer": "John", "wrong_answer": "Mary"},
    {"clean": "Mary gave a drink to", "corrupted": "John gave a drink to", "answer": "John",
     "wrong_answer": "Mary"},
    {"clean": "the store", "corrupted": "the cat", "answer": "to", "wrong_answer": "a"},
]


def ids(*words: str) -> list[int]:
    return [WORDS.index(w) for w in words]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_is_tokenized_padded_and_scored_at_each_last_token(tmp_path):
    data = load_text(write_jsonl(tmp_path / "d.jsonl", PAIRS), tiny_tokenizer())
    assert data.reference.tolist() == [
        ids("<s>", "When", "Mary", "gave") + [0, 0],
        ids("<s>", "Mary", "gave", "a", "drink", "to"),
        ids("<s>", "the", "store") + [0, 0, 0],
    ]
    assert data.counterfactual[2].tolist() == ids("<s>", "the", "cat") + [0, 0, 0]
    assert data.scored.nonzero().tolist() == [[0, 3], [1, 5], [2, 2]]
    assert data.answer.tolist() == ids("John", "John", "to")
    assert data.wrong_answer.tolist() == ids("Mary", "Mary", "a")


def test_every_format_gives_the_same_pairs(tmp_path):
    import datasets

    want = load_text(write_jsonl(tmp_path / "d.jsonl", PAIRS), tiny_tokenizer()).digest()
    csv = tmp_path / "d.csv"
    csv.write_text("clean,corrupted,answer,wrong_answer\n" + "".join(
        f"{r['clean']},{r['corrupted']},{r['answer']},{r['wrong_answer']}\n" for r in PAIRS))
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "d.parquet")
    (tmp_path / "array.json").write_text(json.dumps(PAIRS, indent=1))
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(PAIRS),
                          "train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "two"))
    tok = tiny_tokenizer()
    for path, options in ((csv, TextOptions()), (tmp_path / "d.parquet", TextOptions()),
                          (tmp_path / "array.json", TextOptions()),
                          (tmp_path / "one", TextOptions()),
                          (tmp_path / "two", TextOptions(split="test"))):
        assert is_text_dataset(path)
        assert load_text(path, tok, options).digest() == want, path
    with pytest.raises(PathPatchError, match=r"holds splits \['test', 'train'\]; choose one"):
        load_text(tmp_path / "two", tok)


def test_columns_map_other_names_and_token_ids_pass_as_they_are(tmp_path):
    rows = [{"prompt": "When Mary gave", "cf": {"prompt": "When John gave"}, "target": 4, "foil": 3}]
    options = TextOptions(columns=(("clean", "prompt"), ("corrupted", "cf.prompt"),
                                   ("answer", "target"), ("wrong_answer", "foil")))
    data = load_text(write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer(), options)
    assert data.reference.tolist() == [ids("<s>", "When", "Mary", "gave")]
    assert data.counterfactual.tolist() == [ids("<s>", "When", "John", "gave")]
    assert (data.answer.tolist(), data.wrong_answer.tolist()) == ([4], [3])
    given = [{"clean": [5, 6, 7], "corrupted": [5, 6, 8]}]  # token ids: no BOS added, no answers
    data = load_text(write_jsonl(tmp_path / "t.jsonl", given), tiny_tokenizer())
    assert data.reference.tolist() == [[5, 6, 7]] and data.answer is None


def test_bos_follows_the_tokenizer_unless_the_spec_says(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    llama_like, gpt2_like = tiny_tokenizer(True), tiny_tokenizer(False)
    assert load_text(path, llama_like).reference[0, 0] == 1
    assert load_text(path, gpt2_like).reference[0, 0] == ids("When")[0]
    assert load_text(path, gpt2_like, TextOptions(prepend_bos=True)).reference[0].tolist() == \
        ids("<s>", "When", "Mary", "and")
    assert load_text(path, llama_like, TextOptions(prepend_bos=False)).reference[0].tolist() == \
        ids("When", "Mary", "and")


def _error(tmp_path, rows, options: TextOptions | None = None, **kwargs) -> str:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PathPatchError) as err:
        load_text(path, tiny_tokenizer(), options or TextOptions(), **kwargs)
    assert "bad.jsonl" in str(err.value)
    return str(err.value)


def test_every_problem_is_an_error_naming_the_file_the_row_and_the_values(tmp_path):
    good = PAIRS[0]
    msg = _error(tmp_path, [good, {**good, "corrupted": "When John and Mary gave"}])
    assert "row 1: clean 'When Mary gave' (4 tokens) and corrupted 'When John and Mary gave' " \
           "(6 tokens) tokenize to different lengths" in msg
    msg = _error(tmp_path, [good, good, {**good, "answer": "big fat"}])
    assert "row 2: answer 'big fat' is 2 tokens" in msg and "'Mary'" in msg
    assert "answer_tokens = \"first\"" in msg
    first = load_text(write_jsonl(tmp_path / "f.jsonl", [{**good, "wrong_answer": "big fat"}]),
                      tiny_tokenizer(), TextOptions(answer_tokens="first"))
    assert first.wrong_answer.tolist() == ids("big")
    msg = _error(tmp_path, [{**good, "clean": "  ", "corrupted": "  "}])
    assert "row 0: clean prompt '  ' is empty" in msg
    msg = _error(tmp_path, [good, PAIRS[1]], n_ctx=5)
    assert "row 1: clean 'Mary gave a drink to' and corrupted 'John gave a drink to' are 6 " \
           "tokens, more than the model's context (5)" in msg
    msg = _error(tmp_path, [{"prompt": "x", "corrupted": "y"}])
    assert "missing column 'clean' (clean prompt); row 0 has columns ['corrupted', 'prompt']" in msg
    msg = _error(tmp_path, [{"clean": "Mary", "corrupted": "John", "answer": "to"}])
    assert "has column 'answer' (answer) but no 'wrong_answer'" in msg
    msg = _error(tmp_path, [good, {**good, "answer": None}])
    assert "row 1: no value in column 'answer'" in msg
    msg = _error(tmp_path, [good, {**good, "clean": "When Mary danced"}])
    assert "row 1: clean 'When Mary danced' cannot be tokenized" in msg
    msg = _error(tmp_path, [good], TextOptions(columns=(("clean", "prompt"),)))
    assert "missing column 'prompt' (clean prompt)" in msg


def test_a_padded_dataset_scores_as_each_length_alone(tmp_path):
    """Right padding is invisible to a causal model: every example's rows equal those of its
    length group evaluated on its own (unpadded)."""
    model = load_model("attn-only-2l", dtype=torch.float64)
    tok = load_tokenizer("attn-only-2l")
    data = load_text(Path(__file__).parents[2] / "jobs" / "induction_text.jsonl", tok)
    lengths = data.scored.int().argmax(dim=1) + 1
    assert len(set(lengths.tolist())) > 3
    hyps = [Hypothesis("initial", "in -> a1.*[v] -> out | in -> a0.* -> a1.*[k] -> out"),
            Hypothesis("heads", "a0.* | a1.0")]
    together = evaluate(model, data, hyps, "logit_diff").to_pylist()
    rows = {(r["hypothesis"], r["example"]): r for r in together}
    for length in sorted(set(lengths.tolist())):
        index = (lengths == length).nonzero()[:, 0]
        part = data.select(index)
        alone = type(data)(part.reference[:, :length], part.counterfactual[:, :length],
                           part.scored[:, :length], answer=part.answer,
                           wrong_answer=part.wrong_answer, example_ids=part.example_ids)
        for r in evaluate(model, alone, hyps, "logit_diff").to_pylist():
            want = rows[(r["hypothesis"], r["example"])]
            for key in ("ue", "te", "m", "m_clean", "m_cf"):
                assert r[key] == pytest.approx(want[key], abs=1e-10), (length, key)


def test_the_digest_is_the_tokenized_pairs(tmp_path):
    """Another file, format or spelling that tokenizes to the same pairs is the same dataset."""
    a = load_text(write_jsonl(tmp_path / "a.jsonl", PAIRS), tiny_tokenizer())
    spaced = [{k: "  " + v.replace(" ", "   ") for k, v in r.items()} for r in PAIRS]
    b = load_text(write_jsonl(tmp_path / "b.jsonl", spaced), tiny_tokenizer())
    ids_given = [{"clean": a.reference[i, : int(a.scored[i].int().argmax()) + 1].tolist(),
                  "corrupted": a.counterfactual[i, : int(a.scored[i].int().argmax()) + 1].tolist(),
                  "answer": int(a.answer[i]), "wrong_answer": int(a.wrong_answer[i])}
                 for i in range(len(a))]
    c = load_text(write_jsonl(tmp_path / "c.jsonl", ids_given), tiny_tokenizer())
    assert a.digest() == b.digest() == c.digest()
    other = load_text(write_jsonl(tmp_path / "d.jsonl", PAIRS), tiny_tokenizer(False))
    assert other.digest() != a.digest()


MIB_IOI = {  # the columns of mib-bench/ioi that MIB's HFEAPDataset reads (others left out)
    "prompt": "When Mary John went to the store , John gave a drink to",
    "choices": ["Mary", "John"], "answerKey": 0,
    "metadata": {"subject": "John", "indirect_object": "Mary"},
    "s2_io_flip_counterfactual": {"prompt": "When Mary John went to the store , Mary gave a drink to",
                                  "choices": ["Mary", "John"], "answerKey": 1},
    "abc_counterfactual": {"prompt": "When A B went to the store , 1 gave a drink to",
                           "choices": ["A", "B"], "answerKey": 0},
}
MIB_MCQA = {"prompt": "big A cat B =", "choices": {"label": ["A", "B"], "text": ["big", "cat"]},
            "answerKey": 0,
            "symbol_counterfactual": {"prompt": "big B cat A =",
                                      "choices": {"label": ["B", "A"], "text": ["big", "cat"]},
                                      "answerKey": 0}}
MIB_ARITHMETIC = {"prompt": "1 + 2 =", "label": 3, "operator": "+",
                  "random_counterfactual": {"prompt": "2 + 1 =", "label": 3}}


def test_mib_layout_loads_as_mib_reads_it(tmp_path):
    """Saved as MIB ships its tasks (a `datasets` DatasetDict on disk), read with MIB's answers:
    IOI's " IO" against " S", MCQA's choice label against the counterfactual's, arithmetic's."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    # GPT-2-like: a word after a space is its own token ("Ġ" + word), as MIB's " Mary" needs
    spaced = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)} | {
        "Ġ" + w: len(WORDS) + i for i, w in enumerate(WORDS)}, unk_token=None))
    spaced.pre_tokenizer = pre_tokenizers.Metaspace(replacement="Ġ", prepend_scheme="never")
    tok = PreTrainedTokenizerFast(tokenizer_object=spaced)
    folder = tmp_path / "ioi"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([MIB_IOI])}).save_to_disk(str(folder))
    data = load_text(folder, tok, TextOptions(split="train"))
    mary, john = len(WORDS) + WORDS.index("Mary"), len(WORDS) + WORDS.index("John")
    assert (data.answer.tolist(), data.wrong_answer.tolist()) == ([mary], [john])
    flip = data.counterfactual[0].tolist()
    assert flip != data.reference[0].tolist() and len(flip) == 13
    abc = load_text(folder, tok, TextOptions(split="train", counterfactual="abc_counterfactual"))
    assert abc.counterfactual[0, 1].item() == len(WORDS) + WORDS.index("A")
    for row, answers in ((MIB_MCQA, (ids("A"), ids("B"))), (MIB_ARITHMETIC, (ids("3"), ids("3")))):
        path = tmp_path / f"{len(row)}.jsonl"
        write_jsonl(path, [row])
        data = load_text(path, tiny_tokenizer(False))
        assert (data.answer.tolist(), data.wrong_answer.tolist()) == answers
    broken = tmp_path / "broken.jsonl"
    write_jsonl(broken, [MIB_ARITHMETIC, MIB_ARITHMETIC | {"random_counterfactual": None}])
    with pytest.raises(PathPatchError, match=r"broken.jsonl' row 1: MIB layout: corrupted cannot "
                                             r"be read \(counterfactual 'random_counterfactual': None"):
        load_text(broken, tiny_tokenizer(False))
    with pytest.raises(PathPatchError, match=r"no counterfactual column 'nope'; the rows have"):
        load_text(folder, tok, TextOptions(split="train", counterfactual="nope"))


def test_bundled_models_resolve_to_their_word_level_tokenizers():
    for name, vocab in (("attn-only-2l", 128), ("mlp-2l", 64)):
        tok = load_tokenizer(name)
        assert tok("t0 t5 t63", add_special_tokens=True)["input_ids"] == [0, 5, 63]
        assert len(tok.get_vocab()) == vocab


def test_a_hugging_face_directory_s_tokenizer_loads_offline(tmp_path):
    tiny_tokenizer().save_pretrained(str(tmp_path / "model"))
    tok = load_tokenizer(str(tmp_path / "model"))
    assert tok("When Mary")["input_ids"] == ids("<s>", "When", "Mary")
    with pytest.raises(PathPatchError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path / "model.safetensors"))
