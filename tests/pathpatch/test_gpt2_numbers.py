"""The GPT-2 number task: its generator on a tokenizer trained here, and its offline error."""

import pytest
import torch

from pathpatch.data.tasks import _NON_NUMBERS, _NUMBER_TEMPLATES, gpt2_numbers
from pathpatch.errors import PathPatchError
from tests.pathpatch.conftest import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer in GPT-2's format, trained offline on the task's text."""
    corpus = [t.format(a=a, b=a + 1, c=a + 2) + f" {a + 3}"
              for t in _NUMBER_TEMPLATES for a in range(5, 100)]
    corpus += [t.format(a=w.strip(), b=w.strip(), c=w.strip())
               for t in _NUMBER_TEMPLATES for w in _NON_NUMBERS]
    return train_tokenizer(corpus * 5, tmp_path_factory.mktemp("tok"), vocab_size=600)


def test_pairs_are_aligned_numbers_against_words(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    data = gpt2_numbers(24, seed=3, tokenizer=tokenizer_dir)
    assert data.reference.shape == data.counterfactual.shape and len(data) == 24
    assert data.scored[:, -1].all() and data.scored.sum() == 24
    for ref, cf, ans, wrong in zip(data.reference, data.counterfactual, data.answer, data.wrong_answer):
        ref_text, cf_text = tok.decode(ref), tok.decode(cf)
        numbers = [int(w.strip(",")) for w in ref_text.split() if w.strip(",").isdigit()]
        assert numbers[1] == numbers[0] + 1 and numbers[2] == numbers[0] + 2, ref_text
        assert int(tok.decode([int(ans)])) == numbers[2] + 1 and int(tok.decode([int(wrong)])) == numbers[2]
        assert not any(w.strip(",").isdigit() for w in cf_text.split()), cf_text
    again = gpt2_numbers(24, seed=3, tokenizer=tokenizer_dir)
    assert torch.equal(again.reference, data.reference)


def test_missing_tokenizer_is_a_clear_fast_error(tmp_path):
    with pytest.raises(PathPatchError, match="needs the .* tokenizer in the local Hugging Face cache"):
        gpt2_numbers(4, tokenizer=str(tmp_path / "nowhere"))
