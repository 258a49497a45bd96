"""Prompt/answer documents on the loader and the LM task's side: the answer spans a row carries, the
answer-only loss labels, and exact-match scoring, which must say what greedy generation would do."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from test_generate import VOCAB, random_ids, recurrent_model

from hrm_mega.data.decode import SampleSpec, decode_text
from hrm_mega.data.shards import DataFormatError
from hrm_mega.inference.generate import generate
from hrm_mega.models.vocab import label_is_argmax
from hrm_mega.training.tasks.lm import answer_counts, answer_documents, answer_only

SPEC = SampleSpec(seq_len=8, vocab_size=50, num_puzzle_identifiers=0, kind="text")


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def record(tokens, docs, answer=None) -> dict:
    rec = {
        "__key__": "000000003",
        "tokens.npy": npy(np.array(tokens, np.int32)),
        "docs.npy": npy(np.array(docs, np.int32)),
    }
    if answer is not None:
        rec["answer.npy"] = npy(np.array(answer, np.uint8))
    return rec


# Two documents: BOS 10 11 | 12 13 EOS, then BOS 14 | 15 EOS, then padding (BOS 2, EOS 1, pad 0)
TOKENS = [2, 10, 12, 1, 2, 14, 15, 1]
DOCS = [0, 0, 0, 0, 1, 1, 1, 1]
ANSWER = [0, 0, 1, 1, 0, 0, 1, 1]


def test_a_row_carries_its_answer_spans_and_plain_text_carries_none():
    sample = decode_text(record(TOKENS, DOCS, ANSWER), SPEC)
    assert sample["answer"].tolist() == ANSWER and sample["answer_spans"] == 1
    plain = decode_text(record(TOKENS, DOCS), SPEC)
    assert plain["answer"].tolist() == [0] * 8 and plain["answer_spans"] == 0
    assert plain["labels"].tolist() == sample["labels"].tolist()  # the spans do not change the labels
    with pytest.raises(DataFormatError, match="answer.npy"):
        decode_text(
            record([2, 10, 1, 0, 0, 0, 0, 0], [0, 0, 0, -1, -1, -1, -1, -1], [0, 1, 1, 1, 0, 0, 0, 0]), SPEC
        )
    with pytest.raises(DataFormatError, match="answer.npy"):
        decode_text(record(TOKENS, DOCS, [0, 2, 0, 0, 0, 0, 0, 0]), SPEC)


def batch_of(*samples: dict) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.stack([np.asarray(s[k]) for s in samples])) for k in samples[0]}


def test_answer_only_labels_keep_the_answers_on_span_rows_and_everything_on_plain_rows():
    batch = batch_of(decode_text(record(TOKENS, DOCS, ANSWER), SPEC), decode_text(record(TOKENS, DOCS), SPEC))
    labels = answer_only(batch)
    # label i is the target of position i-1: the answers' tokens 12, EOS and 15, EOS stay
    assert labels[0].tolist() == [-100, -100, 12, 1, -100, -100, 15, 1]
    assert labels[1].tolist() == [-100, 10, 12, 1, -100, 14, 15, 1]
    assert answer_documents(batch, labels)[0].tolist() == [-1, -1, 0, 0, -1, -1, 1, 1]
    assert answer_documents(batch, labels)[1].tolist() == [-1] * 8


def test_answer_counts_count_document_pieces_per_row():
    docs = torch.tensor([[-1, 0, 0, -1, 1, 1], [-1, 0, 0, 0, -1, -1]])
    correct = torch.tensor([[False, True, True, False, True, False], [True, True, True, True, False, False]])
    assert answer_counts(correct, docs) == (3, 2)  # row 0: doc 0 right, doc 1 wrong; row 1: doc 0 right
    assert answer_counts(torch.ones_like(correct), torch.full_like(docs, -1)) == (0, 0)


def test_label_is_argmax_is_the_argmax_and_ignores_unlabelled_positions():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = logits.argmax(-1)
    labels[0, 1] = (labels[0, 1] + 1) % 11
    labels[2, 3] = -100
    expected = (logits.argmax(-1) == labels) & (labels != -100)
    assert torch.equal(label_is_argmax(logits, labels), expected)
    assert not label_is_argmax(logits, labels)[0, 1] and not label_is_argmax(logits, labels)[2, 3]


def test_teacher_forced_exact_match_is_what_greedy_generation_produces():
    """An answer is scored exactly right iff greedy decoding from its prompt emits it: the answer is
    taken from greedy generation itself (right), then one token of it is changed (wrong)."""
    model = recurrent_model(seed=3)
    prompt = random_ids(1, 5, seed=4)[0]
    greedy = generate(model, prompt[None], max_new_tokens=4, greedy=True, max_cycles=2).tokens[0]
    for wrong_at in (None, 0, 3):
        answer = greedy.clone()
        if wrong_at is not None:
            answer[wrong_at] = (answer[wrong_at] + 1) % VOCAB
        ids = torch.cat([prompt, answer])[None]
        labels = ids.clone()
        labels[0, 0] = -100
        span = torch.zeros_like(ids)
        span[0, len(prompt) :] = 1
        batch = {"labels": labels, "answer": span, "doc_ids": torch.zeros_like(ids)}
        with torch.no_grad():
            logits, _ = model(ids, cycles=2)
        correct = label_is_argmax(logits[:, :-1], labels[:, 1:])
        answers, exact = answer_counts(correct, answer_documents(batch, labels)[:, 1:])
        assert answers == 1 and exact == int(wrong_at is None), wrong_at
