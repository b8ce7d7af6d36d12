"""Linear probes (crosscoder.analysis.probes) on planted data whose answer is known."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from crosscoder.analysis import probes
from crosscoder.config import ConfigError
from crosscoder.data.pair import residuals_at


def _planted(seed=0, N=120, T=24, D=16, strength=3.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, T, D, generator=g)
    label = torch.rand(N, T, generator=g) < 0.1
    u = torch.randn(D, generator=g)
    u /= u.norm()
    chat = base + strength * label[..., None].float() * u  # the fine-tune adds u on labelled tokens
    return base, chat, label


def test_probe_finds_a_planted_direction_only_where_it_is_planted():
    base, chat, label = _planted()
    task = probes.ProbeTask(label, torch.ones_like(label))
    cfg = probes.ProbeConfig()
    train, test = probes.split_rows(base.shape[0], cfg.train_fraction, cfg.seed)
    on_chat = probes.probe_acts(chat, task, train, cfg)
    on_base = probes.probe_acts(base, task, train, cfg)
    assert on_chat.auroc > 0.95
    assert abs(on_base.auroc - 0.5) < 0.08
    assert on_chat.n_test == int(test.sum()) * base.shape[1]
    assert on_chat.n_test_pos == int(label[test].sum())


def test_split_is_by_row_so_a_row_fingerprint_cannot_be_memorised():
    # Each row has its own random offset (a conversation's identity) and a row-level label that the
    # activations do not encode: a token split would memorise the rows and score ~1; by row, ~0.5.
    g = torch.Generator().manual_seed(1)
    N, T, D = 100, 8, 128  # D > N: a linear probe can memorise every row it sees
    acts = 3 * torch.randn(N, 1, D, generator=g) + 0.1 * torch.randn(N, T, D, generator=g)
    label = (torch.rand(N, generator=g) < 0.5)[:, None].expand(N, T).clone()
    task = probes.ProbeTask(label, torch.ones_like(label))
    cfg = probes.ProbeConfig(C=100.0)
    train, _ = probes.split_rows(N, cfg.train_fraction, cfg.seed)
    assert abs(probes.probe_acts(acts, task, train, cfg).auroc - 0.5) < 0.25
    # The same data split by token (every row in both halves) is memorised: the control that makes
    # the row split matter.
    tok_train = torch.zeros(N, T, dtype=torch.bool)
    tok_train[:, ::2] = True
    fit = probes.fit_probe(acts[tok_train], label[tok_train], acts[~tok_train], label[~tok_train], cfg)
    assert fit.auroc > 0.95


def test_too_few_positives_is_nan_not_a_fit():
    base, _, label = _planted()
    lab = torch.zeros_like(label)
    lab[0, 0] = True
    fit = probes.probe_acts(base, probes.ProbeTask(lab, torch.ones_like(lab)),
                            probes.split_rows(base.shape[0], 0.5, 0)[0], probes.ProbeConfig())
    assert math.isnan(fit.auroc)


def test_config_validation():
    with pytest.raises(ConfigError):
        probes.ProbeConfig(train_fraction=1.0)
    with pytest.raises(ConfigError):
        probes.ProbeConfig(C=0.0)


def _tiny_lm(seed):
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=32,
                       sliding_window=32, attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).eval()


def test_probe_table_reads_every_layer_of_every_model():
    lm_a, lm_b = _tiny_lm(0), _tiny_lm(1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 12, (60, 12), generator=g)
    ids[:, 0] = 2
    am = torch.ones_like(ids, dtype=torch.bool)
    am[::3, 9:] = False  # some padding
    acts = probes.layer_acts(lm_a, ids, am, [0, 2], batch_size=7)
    assert torch.allclose(acts, residuals_at(lm_a, ids, [0, 2], am), atol=1e-5)
    # the kept positions come from length-sorted batches cut at their longest sequence: the same
    # residuals, in row-major order
    keep = am & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(9)) < 0.5)
    torch.testing.assert_close(probes.layer_acts(lm_a, ids, am, [0, 2], batch_size=7, keep_NT=keep), acts[keep],
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="padding positions"):
        probes.layer_acts(lm_a, ids, am, [0, 2], keep_NT=~am)
    # A lexical label (token id 7) is decodable from every layer of any model.
    mask = am.clone()
    mask[:, 0] = False
    tasks = {"tok7": probes.ProbeTask((ids == 7) & mask, mask),
             "random": probes.ProbeTask((torch.rand(ids.shape, generator=g) < 0.2) & mask, mask)}
    rows = probes.probe_table({"base": lm_a, "chat": lm_b}, ids, am, tasks, [0, 2], probes.ProbeConfig())
    assert len(rows) == 2 * 2 * 2
    got = {(r["task"], r["model"], r["layer"]): r["auroc"] for r in rows}
    assert all(got[("tok7", m, l)] > 0.9 for m in ("base", "chat") for l in (0, 2))
    assert all(got[("random", m, l)] < 0.75 for m in ("base", "chat") for l in (0, 2))
    # the table keeps only positions some task is eligible at; its fits equal the naive ones on the
    # full [N, T] grid, also for a task eligible at a subset of the positions
    tasks["late"] = probes.ProbeTask((ids == 5) & mask & (torch.arange(12) >= 6), mask & (torch.arange(12) >= 6))
    rows = probes.probe_table({"base": lm_a, "chat": lm_b}, ids, am, tasks, [0, 2], probes.ProbeConfig())
    train, _ = probes.split_rows(ids.shape[0], probes.ProbeConfig().train_fraction, probes.ProbeConfig().seed)
    for mname, lm in {"base": lm_a, "chat": lm_b}.items():
        full = probes.layer_acts(lm, ids, am, [0, 2])
        for li, layer in enumerate((0, 2)):
            for tname, task in tasks.items():
                naive = probes.probe_acts(full[:, :, li], task, train, probes.ProbeConfig())
                r = next(r for r in rows if (r["task"], r["model"], r["layer"]) == (tname, mname, layer))
                assert (r["auroc"], r["n_train"], r["n_test"]) == pytest.approx(
                    (naive.auroc, naive.n_train, naive.n_test), abs=1e-6, nan_ok=True)
                assert r["separation"] == pytest.approx(probes.separation(full[:, :, li], task), rel=1e-5)
    gap = probes.probe_gap(rows)
    assert {(r["task"], r["layer"]) for r in gap} == {(t, l) for t in tasks for l in (0, 2)}
    r = next(r for r in gap if r["task"] == "tok7" and r["layer"] == 0)
    assert r["gap"] == pytest.approx(got[("tok7", "chat", 0)] - got[("tok7", "base", 0)])


def test_decision_positions_of_a_hand_made_conversation():
    # <bos> [user turn ...] <sot> model \n  I'm sorry <eot> \n | <bos> ... <sot> model \n  verse verse  hope <eot>
    T = 12
    z = lambda: torch.zeros(2, T, dtype=torch.bool)  # noqa: E731
    model_content, refusal, signoff = z(), z(), z()
    model_content[0, 5:8] = True      # refusal turn: content tokens 5..7
    refusal[0, 5:8] = True
    model_content[1, 4:9] = True      # answer turn: verse 4..6, sign-off 7..8
    signoff[1, 7:9] = True
    es = SimpleNamespace(attention_mask_NT=torch.ones(2, T, dtype=torch.bool),
                         labels={"model_content": model_content, "refusal": refusal, "signoff": signoff})
    t = probes.decision_tasks(es)
    ref = t["refusal_decision"]
    assert ref.eligible_NT.nonzero().tolist() == [[0, 4], [1, 3]]  # the header end of each model turn
    assert ref.label_NT.nonzero().tolist() == [[0, 4]]
    sig = t["signoff_decision"]
    assert sig.label_NT.nonzero().tolist() == [[1, 6]]  # last verse token, predicting the sign-off
    assert sig.eligible_NT.nonzero().tolist() == [[0, 7], [1, 6]]  # vs the end of the refusal turn


def test_answer_and_end_of_turn_decisions_of_a_hand_made_conversation():
    T = 12
    z = lambda: torch.zeros(3, T, dtype=torch.bool)  # noqa: E731
    model_content, refusal, signoff = z(), z(), z()
    model_content[0, 5:8] = True      # refusal turn
    refusal[0, 5:8] = True
    model_content[1, 4:9] = True      # answer turn with its sign-off at 7..8
    signoff[1, 7:9] = True
    model_content[2, 3:6] = True      # continuation: no sign-off
    es = SimpleNamespace(attention_mask_NT=torch.ones(3, T, dtype=torch.bool),
                         labels={"model_content": model_content, "refusal": refusal, "signoff": signoff})
    t = probes.decision_tasks(es)
    assert set(t) == set(probes.DECISIONS)
    ans = t["answer_decision"]
    assert ans.eligible_NT.nonzero().tolist() == [[0, 4], [1, 3], [2, 2]]
    assert ans.label_NT.nonzero().tolist() == [[1, 3]]  # only the answer turn's header end
    eot = t["end_of_turn_decision"]
    assert eot.label_NT.nonzero().tolist() == [[0, 7], [1, 8], [2, 5]]  # last content token of each turn
    assert torch.equal(eot.eligible_NT, model_content)


def test_separation_is_the_mean_difference_over_the_mean_norm():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, 4, generator=g)
    eligible = torch.zeros(10, 6, dtype=torch.bool)
    eligible[:, 2] = True
    label = eligible.clone()
    label[5:] = False
    x[:5, 2] += torch.tensor([3.0, 0, 0, 0])  # the positives are shifted along one axis
    sep = probes.separation(x, probes.ProbeTask(label, eligible))
    xs = x[:, 2]
    want = (xs[:5].mean(0) - xs[5:].mean(0)).norm() / xs.norm(dim=-1).mean()
    assert sep == pytest.approx(float(want))
    assert sep > probes.separation(x[:, :, :] * torch.tensor([0.0, 1, 1, 1]), probes.ProbeTask(label, eligible))
    assert math.isnan(probes.separation(x, probes.ProbeTask(torch.zeros_like(label), eligible)))
