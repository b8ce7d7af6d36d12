"""Shared by test files: stand-in diffing methods for tests of the code around ``crosscoder.methods``,
and a tiny random Gemma2 pair with a trained tokenizer."""

from __future__ import annotations

import torch

from crosscoder import methods


class StandInMethod(methods.Method):
    """A method with fixed items, built in the test: ``_scores`` is the subclass's; it cannot be
    trained or loaded (not registered), and it saves no tensors."""

    def __init__(self, d_model: int, n_items: int, seconds: float = 1.0, tokens: int = 1):
        super().__init__(methods.MethodConfig(), d_model, torch.arange(n_items),
                         {"cost": methods.Cost(seconds, None, 8, tokens)._asdict()})
        self._n_items = n_items

    n_items = property(lambda self: self._n_items)

    def tensors(self):
        return {}

    @classmethod
    def _from_tensors(cls, *a):
        raise NotImplementedError("a stand-in method is built in the test, never loaded")

    @classmethod
    def _fit(cls, *a, **k):
        raise NotImplementedError("a stand-in method is built in the test, never trained")


TEXTS = [" ".join(("the cat sat on a mat while the dog ran far away from home").split()[i % 5:]) for i in range(60)]


def tiny_pair(root):
    """A pair of two randomly initialised 2-block Gemma2 LMs (d_model 32) read after block 0, saved
    under ``root`` with a tokenizer trained on ``TEXTS``, loaded in float32 on the CPU."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from crosscoder.data.pair import ModelPairConfig, load_pair
    from crosscoder.organism.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS, vocab_size=300)
    for name, seed in (("base", 0), ("chat", 1)):
        torch.manual_seed(seed)
        Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return load_pair(ModelPairConfig(base=str(root / "base"), chat=str(root / "chat"), layer=0, dtype="float32",
                                     device="cpu"))


def padded_ids(tok, n: int = 11, t: int = 9):
    """``n`` random sequences of ``t`` tokens starting at BOS, row 3 right-padded after 6 tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, len(tok), (n, t), generator=g)
    ids[:, 0] = tok.bos_token_id
    am = torch.ones_like(ids)
    am[3, 6:] = 0
    ids[3, 6:] = tok.pad_token_id
    return ids, am
