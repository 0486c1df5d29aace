"""A generated model's forward checks what it is given (`L.inputs`): token ids as a [batch, tokens]
integer tensor within the vocab, and a carried state of the same batch size; each mistake is a
ValueError that says what is wrong, instead of an error from inside the embedding or a reshape.
(Pieces of no tokens are held to the whole sequence in test_streaming*.py.)"""
from __future__ import annotations

import pytest
import torch

import nlc
from tests.backends.test_compile import small


@pytest.fixture(scope="module", params=["titans", "hope_attention"])
def model(request, tmp_path_factory):
    """A memory model, and a CMS model (whose forward is the CMS window loop), at test size (vocab 50)."""
    torch.manual_seed(0)
    return nlc.compile(small(request.param, tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("ids,message", [
    (lambda: torch.randint(0, 50, (7,)), "got shape (7,) (add the batch dimension: input_ids[None])"),
    (lambda: torch.randint(0, 50, (1, 7, 2)), "must be a [batch, tokens] tensor of token ids, got shape (1, 7, 2)"),
    (lambda: torch.rand(1, 7), "must hold token ids as torch.long (or torch.int32), got torch.float32"),
    (lambda: torch.randint(0, 50, (1, 7), dtype=torch.uint8), "got torch.uint8"),
    (lambda: [[1, 2, 3]], "must be a [batch, tokens] tensor of token ids, got list"),
    (lambda: torch.tensor([[3, 50, 1]]), "token ids must be in [0, 50) (the spec's vocab), got ids from 1 to 50"),
    (lambda: torch.tensor([[3, -2, 1]]), "got ids from -2 to 3"),
])
def test_bad_token_ids_say_what_is_wrong(model, ids, message):
    with pytest.raises(ValueError) as e:
        model(ids())
    assert message in str(e.value)


def test_a_state_of_another_batch_size_is_refused(model):
    _, state = model(torch.randint(0, 50, (2, 11)))
    with pytest.raises(ValueError, match=r"is for a batch of 2 and input_ids for 3: carry a state only"):
        model(torch.randint(0, 50, (3, 5)), state)
    with pytest.raises(ValueError, match="state must be None or the dict a previous call returned, got tuple"):
        model(torch.randint(0, 50, (2, 5)), (None, state))
    logits, _ = model(torch.randint(0, 50, (2, 5), dtype=torch.int32), state)   # the same batch: carried
    assert logits.shape == (2, 5, 50) and torch.isfinite(logits).all()


def test_no_tokens_give_no_logits_and_keep_the_state(model):
    ids = torch.randint(0, 50, (2, 11))
    _, state = model(ids)
    logits, kept = model(ids[:, :0], state)
    assert logits.shape == (2, 0, 50) and kept is not state and kept.keys() == state.keys()
    assert all(kept[k] is v for k, v in state.items())
    logits, fresh = model(ids[:, :0])
    assert logits.shape == (2, 0, 50) and fresh == {}
