"""Both models' activations on a fixed sequence set, kept between pages: equal to one full-width
pass at every real token (0 at padding), stored once under a name hashed from the sequences and
layer, read back without running the models, and never confused with another set."""

from __future__ import annotations

import pytest
import torch

from crosscoder.data.pair import extract_pair
from crosscoder.data.sequence_acts import compute, sequence_acts, sequences_key
from fakes import padded_ids, tiny_pair


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pair = tiny_pair(tmp_path_factory.mktemp("seq"))
    ids, am = padded_ids(pair.tokenizer)
    am[7, 4:] = 0
    return pair, ids, am


def test_equal_to_a_full_width_pass_and_zero_at_padding(setup):
    pair, ids, am = setup
    want = extract_pair(pair, ids, am).float()
    got = compute(pair, ids, am, batch=4)
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert bool((got[~real] == 0).all()) and bool((got[real].abs().sum(-1) > 0).all())


def test_stored_once_then_read_without_the_models(setup, tmp_path, monkeypatch):
    import crosscoder.data.sequence_acts as sa

    pair, ids, am = setup
    pair = pair._replace(acts_dir=str(tmp_path / "seq"))
    first = sequence_acts(pair, ids, am, batch=4)
    files = list((tmp_path / "seq").iterdir())
    assert [f.name for f in files] == [f"{sequences_key(ids, am, pair.layer)}.safetensors"]

    def no_forward(*a, **k):
        raise AssertionError("the models ran")

    monkeypatch.setattr(sa, "extract_pair", no_forward)
    assert torch.equal(sequence_acts(pair, ids, am, batch=4), first)
    # another set (one token changed), or the same set read at another layer, is another file
    ids2 = ids.clone()
    ids2[0, 2] = ids2[0, 3] + 1 if ids2[0, 3] + 1 < len(pair.tokenizer) else 6
    assert sequences_key(ids2, am, pair.layer) != sequences_key(ids, am, pair.layer)
    assert sequences_key(ids, am, pair.layer + 1) != sequences_key(ids, am, pair.layer)
    with pytest.raises(AssertionError, match="models ran"):
        sequence_acts(pair, ids2, am, batch=4)
    assert [f.name for f in (tmp_path / "seq").iterdir()] == [files[0].name]  # nothing half-written


def test_no_store_without_a_folder(setup):
    pair, ids, am = setup
    assert pair.acts_dir is None
    torch.testing.assert_close(sequence_acts(pair, ids, am), compute(pair, ids, am))
