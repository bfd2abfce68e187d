"""The GPT-2 IOI task: its generator on a tokenizer trained here, and its offline error."""

import pytest
import torch

from pathpatch.data.tasks import IOI_NAMES, IOI_TEMPLATES, ioi
from pathpatch.errors import PathPatchError
from tests.pathpatch.conftest import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer in GPT-2's format, trained offline on the task's text
    (every name a single token, as in GPT-2's)."""
    names = list(IOI_NAMES)
    corpus = [t.format(A=a, B=b, S=s) + c for t in IOI_TEMPLATES for a in names[:6]
              for b in names[6:12] for s in names[12:] for c in names[:2]]
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok"), vocab_size=800)


def test_pairs_are_ioi_prompts_against_three_other_names(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert all(len(tok(n, add_special_tokens=False)["input_ids"]) == 1 for n in IOI_NAMES)
    data = ioi(40, seed=2, tokenizer=tokenizer_dir)
    assert data.reference.shape == data.counterfactual.shape and len(data) == 40
    assert data.scored[:, -1].all() and data.scored.sum() == 40
    pad = tok.eos_token_id  # one prompt length: nothing padded, a position means one thing
    assert not (data.reference == pad).any() and not (data.counterfactual == pad).any()
    orders = set()
    for ref, cf, ans, wrong in zip(data.reference, data.counterfactual, data.answer,
                                   data.wrong_answer, strict=True):
        text = tok.decode(ref).replace("<|endoftext|>", "")
        io, subject = tok.decode([int(ans)]), tok.decode([int(wrong)])
        in_ref = [n for n in IOI_NAMES if n in text]
        assert sorted(in_ref) == sorted([io, subject]) and io != subject, text
        assert text.count(subject) == 2 and text.count(io) == 1, text  # S twice, IO once
        orders.add(text.index(io) < text.index(subject))
        cf_text = tok.decode(cf).replace("<|endoftext|>", "")
        in_cf = [n for n in IOI_NAMES if n in cf_text]
        assert len(in_cf) == 3 and not set(in_cf) & {io, subject}, cf_text  # ABC: no repeat
        assert all(cf_text.count(n) == 1 for n in in_cf)
    assert orders == {True, False}  # ABBA and BABA
    assert torch.equal(ioi(40, seed=2, tokenizer=tokenizer_dir).reference, data.reference)


def test_missing_tokenizer_is_a_clear_fast_error(tmp_path):
    with pytest.raises(PathPatchError, match="n = 0"):
        ioi(0, tokenizer=str(tmp_path / "nowhere"))
    with pytest.raises(PathPatchError, match="'ioi' needs the .* tokenizer in the local Hugging"):
        ioi(4, tokenizer=str(tmp_path / "nowhere"))
