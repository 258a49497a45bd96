"""Text builder: the synthetic corpus, SentencePiece training/reuse, packing, determinism, the unigram
baseline (checked by an independent computation) and one-line errors."""

from __future__ import annotations

import gzip
import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from hrm_mega.data.shards import read_manifest, verify_shards
from hrm_mega.prep import text as text_prep
from hrm_mega.prep.cli import main
from hrm_mega.prep.common import DataPrepError, read_samples, unit_hash
from hrm_mega.prep.corpus import TASKS, generate_documents
from hrm_mega.prep.text import train_tokenizer
from hrm_mega.prep.tokenizer import Fields, TokenizerSample, iter_documents

VOCAB = 340
SEQ_LEN = 40
# Documents the generated corpus lacks: one longer than SEQ_LEN (split across rows), characters outside
# the tokenizer's alphabet (byte fallback), and runs of spaces (kept verbatim).
SPECIAL = [
    "sort: " + " ".join("7294810536" * 6) + " -> " + " ".join(sorted("7294810536" * 6)),
    "unicode: naïve café ✓ -> ok",
    "spaces:   three  two -> kept",
]


# ---- an independent checker for the corpus ------------------------------------------------------------


def _numbers(text: str) -> list[int]:
    return [int(x) for x in text.split()]


CHECKS = {
    "add": (r"(\d+)\+(\d+)=(\d+)", lambda a, b, c: int(a) + int(b) == int(c)),
    "sub": (r"(\d+)-(\d+)=(-?\d+)", lambda a, b, c: int(a) - int(b) == int(c)),
    "mul": (r"(\d+)\*(\d+)=(\d+)", lambda a, b, c: int(a) * int(b) == int(c)),
    "reverse": (r"reverse: ([a-z]+) -> ([a-z]+)", lambda a, b: a[::-1] == b),
    "copy": (r"copy: ([a-z]+) -> ([a-z]+)", lambda a, b: a == b),
    "sort": (r"sort: ([\d ]+) -> ([\d ]+)", lambda a, b: sorted(_numbers(a)) == _numbers(b)),
    "count": (r"count ([abc]): ([abc]+) -> (\d+)", lambda x, s, n: s.count(x) == int(n)),
    "parity": (r"parity: ([01 ]+) -> ([01])", lambda bits, p: sum(_numbers(bits)) % 2 == int(p)),
}


def check_document(doc: str) -> str:
    """The task of a corpus document, after checking that its answer is right."""
    for task, (pattern, is_right) in CHECKS.items():
        match = re.fullmatch(pattern, doc)
        if match:
            assert is_right(*match.groups()), doc
            return task
    raise AssertionError(f"not a corpus document: {doc!r}")


def test_corpus_is_deterministic_mixed_correct_and_fast(tmp_path):
    assert main(["corpus", "--out", str(tmp_path / "a"), "--docs", "2000", "--seed", "3", "--quiet"]) == 0
    assert main(["corpus", "--out", str(tmp_path / "b"), "--docs", "2000", "--seed", "3", "--quiet"]) == 0
    assert main(["corpus", "--out", str(tmp_path / "c"), "--docs", "2000", "--seed", "4", "--quiet"]) == 0
    for split, count in (("train", 2000), ("test", 200)):
        a = (tmp_path / "a" / f"{split}.txt").read_bytes()
        assert a == (tmp_path / "b" / f"{split}.txt").read_bytes()
        assert a != (tmp_path / "c" / f"{split}.txt").read_bytes()
        docs = a.decode().split("\n")
        assert docs[-1] == "" and len(docs) == count + 1
        tasks = Counter(check_document(doc) for doc in docs[:-1])
        assert set(tasks) == set(TASKS) == set(CHECKS)
        assert min(tasks.values()) > count / len(TASKS) / 2  # mixed roughly uniformly
    train, test = (tmp_path / "a/train.txt").read_text(), (tmp_path / "a/test.txt").read_text()
    assert train != test
    assert generate_documents(3, "train", 100) == generate_documents(3, "train", 200)[:100]


def test_corpus_task_subset_and_operand_digits(tmp_path, capsys):
    out = tmp_path / "arith"
    args = ["corpus", "--out", str(out), "--docs", "3000", "--tasks", "add,sub,mul", "--max-digits", "2"]
    assert main([*args, "--quiet"]) == 0
    docs = (out / "train.txt").read_text().splitlines()
    assert set(Counter(check_document(doc) for doc in docs)) == {"add", "sub", "mul"}
    operands = [re.match(r"(\d+)[-+*](\d+)=", doc).groups() for doc in docs]
    assert max(len(x) for pair in operands for x in pair) == 2
    assert max(len(a) for (a, b), doc in zip(operands, docs) if "*" in doc) == 1  # products: 1 x 1 at 2
    assert any(len(a) == 1 for a, _ in operands)  # digit counts are mixed, not only the longest
    for bad, field in (
        (["--tasks", "add,nope"], "--tasks 'add,nope'"),
        (["--max-digits", "0"], "--max-digits 0"),
    ):
        assert main(["corpus", "--out", str(tmp_path / "x"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and field in err


def test_corpus_refuses_to_overwrite(tmp_path, capsys):
    out = str(tmp_path / "c")
    assert main(["corpus", "--out", out, "--docs", "5", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["corpus", "--out", out, "--docs", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert main(["corpus", "--out", out, "--docs", "7", "--test-docs", "3", "--overwrite", "--quiet"]) == 0
    assert len((tmp_path / "c/test.txt").read_text().splitlines()) == 3


# ---- building text datasets ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    assert (
        main(["corpus", "--out", str(root), "--docs", "400", "--test-docs", "60", "--seed", "1", "--quiet"])
        == 0
    )
    with open(root / "train.txt", "a", encoding="utf-8") as f:
        f.write("\n\n" + "\n".join(SPECIAL) + "\n")  # blank lines are skipped
    return {"train": root / "train.txt", "test": root / "test.txt"}


def build(out: Path, corpus: dict[str, Path], *args: str) -> dict:
    argv = ["text", "--input", str(corpus["train"]), "--test-input", str(corpus["test"])]
    argv += ["--seq-len", str(SEQ_LEN), "--out", str(out), "--quiet", "--samples-per-shard", "50", *args]
    assert main(argv) == 0
    return read_manifest(out)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("text") / "data"
    build(out, corpus, "--vocab-size", str(VOCAB), "--workers", "1")
    return out


def documents(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def shard_hashes(manifest: dict) -> dict[str, list[str]]:
    return {s: [x["sha256"] for x in v["shards"]] for s, v in manifest["splits"].items()}


def reassemble(data_dir: Path, split: str) -> dict[int, list[int]]:
    """Document index -> its tokens, gathered from the rows in key order."""
    tokens: dict[int, list[int]] = {}
    for sample in read_samples(data_dir, split):
        for token, doc in zip(sample["tokens"].tolist(), sample["docs"].tolist()):
            if doc >= 0:
                tokens.setdefault(doc, []).append(token)
    return tokens


def test_trained_tokenizer_and_manifest(dataset, corpus):
    manifest = read_manifest(dataset)
    sp = spm.SentencePieceProcessor(model_file=str(dataset / manifest["tokenizer"]))
    assert manifest["task"] == "text" and manifest["tokenizer"] == "tokenizer.model"
    assert manifest["vocab_size"] == sp.get_piece_size() == VOCAB
    assert manifest["seq_len"] == SEQ_LEN
    assert (manifest["pad_id"], manifest["eos_id"], manifest["bos_id"]) == (
        sp.pad_id(),
        sp.eos_id(),
        sp.bos_id(),
    )
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert len({sp.pad_id(), sp.eos_id(), sp.bos_id()}) == 3
    # byte fallback: text the tokenizer never saw encodes without <unk> and decodes verbatim
    for text in ["✓ 漢字 😀", *SPECIAL, "tab\there  "]:
        ids = sp.encode(text)
        assert sp.unk_id() not in ids and sp.decode(ids) == text
    assert sp.encode("123") == [sp.piece_to_id(d) for d in "123"]  # digits split
    extra = manifest["extra"]
    docs = {split: documents(corpus[split]) for split in ("train", "test")}
    assert extra["documents"] == {split: len(docs[split]) for split in docs} == {"train": 403, "test": 60}
    assert extra["tokens"] == {split: sum(len(sp.encode(d)) + 2 for d in docs[split]) for split in docs}
    assert extra["split_documents"] == {"train": 1, "test": 0}
    assert extra["unk_tokens"] == {"train": 0, "test": 0}
    for split in ("train", "test"):
        verify_shards(dataset, split)
        rows = manifest["splits"][split]["num_samples"]
        assert rows * SEQ_LEN == extra["tokens"][split] + extra["padding_tokens"][split]


def test_every_document_reconstructs_from_the_shards(dataset, corpus):
    manifest = read_manifest(dataset)
    sp = spm.SentencePieceProcessor(model_file=str(dataset / "tokenizer.model"))
    bos, eos = manifest["bos_id"], manifest["eos_id"]
    for split in ("train", "test"):
        docs = documents(corpus[split])
        rebuilt = reassemble(dataset, split)
        assert sorted(rebuilt) == list(range(len(docs)))
        for index, doc in enumerate(docs):
            assert rebuilt[index] == [bos, *sp.encode(doc), eos], (split, index)
            assert sp.decode(rebuilt[index][1:-1]) == doc
        rows_of: dict[int, set[int]] = {}
        for sample in read_samples(dataset, split):
            docs_row, tokens = sample["docs"], sample["tokens"]
            assert sample["tokens"].dtype == np.int32 and docs_row.shape == (SEQ_LEN,)
            pad = docs_row < 0
            assert not pad[0] and not (pad[:-1] & ~pad[1:]).any()  # padding only ends a row
            assert (tokens[pad] == manifest["pad_id"]).all()
            for doc in set(docs_row[~pad].tolist()):
                rows_of.setdefault(doc, set()).add(int(sample["key"]))
        for index, rows in rows_of.items():  # only a document longer than a row spans rows, consecutively
            assert len(rows) == 1 or len(rebuilt[index]) > SEQ_LEN
            assert sorted(rows) == list(range(min(rows), max(rows) + 1))
        if split == "train":
            long_doc = docs.index(SPECIAL[0])
            assert len(rebuilt[long_doc]) > 2 * SEQ_LEN and len(rows_of[long_doc]) >= 3


def test_train_rows_are_shuffled_test_rows_keep_input_order(dataset):
    first_docs = {}
    for split in ("train", "test"):
        order = [doc for s in read_samples(dataset, split) for doc in s["docs"].tolist() if doc >= 0]
        first_docs[split] = list(dict.fromkeys(order))  # document order of appearance
    assert first_docs["test"] == sorted(first_docs["test"])
    assert first_docs["train"] != sorted(first_docs["train"])


def test_unigram_entropy_matches_an_independent_computation(dataset, corpus):
    manifest = read_manifest(dataset)
    sp = spm.SentencePieceProcessor(model_file=str(dataset / "tokenizer.model"))
    eos, vocab = sp.eos_id(), sp.get_piece_size()
    train = Counter()
    for doc in documents(corpus["train"]):
        train.update(sp.encode(doc) + [eos])
    total = sum(train.values())
    nll, count = 0.0, 0
    for doc in documents(corpus["test"]):
        for token in sp.encode(doc) + [eos]:
            nll -= math.log((train[token] + 1) / (total + vocab))
            count += 1
    expected = nll / count
    assert manifest["extra"]["unigram_entropy_nats"] == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < math.log(vocab)  # a unigram beats uniform on this text


@pytest.mark.slow  # a 2-process pool
def test_same_seed_same_bytes_whatever_workers_and_other_seed_reorders(
    tmp_path, corpus, dataset, monkeypatch
):
    monkeypatch.setattr(text_prep, "_CHUNK_DOCUMENTS", 16)  # 30 chunks: more than the 4 kept in flight
    two = build(tmp_path / "w2", corpus, "--vocab-size", str(VOCAB), "--workers", "2")
    assert shard_hashes(two) == shard_hashes(read_manifest(dataset))
    assert (tmp_path / "w2/tokenizer.model").read_bytes() == (dataset / "tokenizer.model").read_bytes()
    other = build(tmp_path / "s1", corpus, "--vocab-size", str(VOCAB), "--seed", "1", "--workers", "1")
    assert shard_hashes(other)["train"] != shard_hashes(two)["train"]
    assert shard_hashes(other)["test"] == shard_hashes(two)["test"]  # same tokenizer, test keeps input order


@pytest.mark.slow  # a 2-process pool
def test_atomic_symbols_are_never_merged_and_are_recorded(tmp_path):
    """On a-b=c text BPE's only merge is '=-'; --atomic-symbols = keeps '=' a piece of its own, so a prompt
    ending in '=' splits as the text it was trained on does."""
    (tmp_path / "sub.txt").write_text("".join(f"{a}-{b}={a - b}\n" for a in range(30) for b in range(30)))
    pieces = {}
    for name, extra in (
        ("merged", ["--vocab-size", "273"]),
        ("atomic", ["--vocab-size", "272", "--atomic-symbols", "="]),
    ):
        argv = [
            "text",
            "--input",
            str(tmp_path / "sub.txt"),
            "--seq-len",
            "16",
            "--out",
            str(tmp_path / name),
        ]
        assert main([*argv, "--quiet", *extra]) == 0
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / name / "tokenizer.model"))
        pieces[name] = sp.encode("3-5=-2", out_type=str)
        assert read_manifest(tmp_path / name)["extra"]["atomic_symbols"] == (
            ["="] if name == "atomic" else []
        )
    assert pieces == {"merged": ["3", "-", "5", "=-", "2"], "atomic": ["3", "-", "5", "=", "-", "2"]}


def test_reused_tokenizer_is_copied_and_gives_the_same_shards(tmp_path, corpus, dataset):
    model = dataset / "tokenizer.model"
    manifest = build(tmp_path / "reuse", corpus, "--tokenizer", str(model), "--workers", "2")
    assert (tmp_path / "reuse/tokenizer.model").read_bytes() == model.read_bytes()
    assert shard_hashes(manifest) == shard_hashes(read_manifest(dataset))
    assert manifest["extra"]["tokenizer_source"] == str(model)
    # a foreign tokenizer (trained elsewhere, another vocab) is used as it is
    foreign = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents(corpus["test"]) * 3), model_writer=foreign, vocab_size=60,
        model_type="char", pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "char.model").write_bytes(foreign.getvalue())
    manifest = build(tmp_path / "char", corpus, "--tokenizer", str(tmp_path / "char.model"))
    sp = spm.SentencePieceProcessor(model_proto=foreign.getvalue())
    assert manifest["vocab_size"] == sp.get_piece_size()
    assert manifest["extra"]["unk_tokens"]["train"] > 0  # no byte fallback: unseen characters are <unk>
    assert reassemble(tmp_path / "char", "test")[5] == [2, *sp.encode(documents(corpus["test"])[5]), 1]


def test_tokenizer_trains_on_a_seeded_sample_of_documents(corpus):
    docs = documents(corpus["train"])
    sample = train_tokenizer(docs, VOCAB, seed=0, max_documents=100)
    assert sample == train_tokenizer(docs, VOCAB, seed=0, max_documents=100)
    assert sample != train_tokenizer(docs, VOCAB, seed=1, max_documents=100)
    assert sample != train_tokenizer(docs, VOCAB, seed=0, max_documents=len(docs))
    assert train_tokenizer(docs, VOCAB, seed=1, max_documents=len(docs)) == train_tokenizer(
        docs, VOCAB, seed=0, max_documents=len(docs)
    )  # all documents: the seed does not matter
    assert spm.SentencePieceProcessor(model_proto=sample).get_piece_size() == VOCAB


def test_test_fraction_and_jsonl_input(tmp_path):
    texts = [f"doc {i}\nwith a second line ✓ {i * i}" for i in range(50)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    out = tmp_path / "out"
    argv = ["text", "--input", str(path), "--test-fraction", "0.2", "--vocab-size", "300", "--seq-len", "16"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    manifest = read_manifest(out)
    held_out = manifest["extra"]["documents"]["test"]  # each document a seeded coin: about 10
    assert (
        manifest["extra"]["documents"] == {"train": 50 - held_out, "test": held_out} and 5 <= held_out <= 15
    )
    assert manifest["extra"]["test_fraction"] == 0.2
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    decoded = [sp.decode(ids[1:-1]) for split in ("train", "test") for ids in reassemble(out, split).values()]
    assert sorted(decoded) == sorted(texts)  # multi-line documents survive verbatim, each in one split
    # the same documents gzip-compressed under another field name give the same shards
    packed = tmp_path / "docs.jsonl.gz"
    packed.write_bytes(gzip.compress("\n".join(json.dumps({"body": t}) for t in texts).encode()))
    again = tmp_path / "again"
    argv_gz = ["text", "--input", str(packed), "--text-field", "body", "--test-fraction", "0.2", "--vocab-size", "300",
               "--seq-len", "16", "--out", str(again), "--quiet"]  # fmt: skip
    assert main(argv_gz) == 0
    for split in ("train", "test"):
        assert reassemble(again, split) == reassemble(out, split)
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataPrepError, match=r"broken\.txt\.gz: not a readable gzip file"):
        list(iter_documents([tmp_path / "broken.txt.gz"], "--input"))
    with pytest.raises(DataPrepError, match='docs.jsonl:1: expected an object with a string field "body"'):
        list(iter_documents([path], "--input", Fields(text="body")))


def test_jsonl_gzip_and_parquet_inputs_give_the_same_shards(tmp_path, corpus):
    texts = documents(corpus["train"])
    lines = "\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(texts)) + "\n"
    (tmp_path / "docs.jsonl").write_text(lines)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    table = pa.table({"n": list(range(len(texts))), "text": texts})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=100)  # several row groups
    hashes = {}
    for name in ("docs.jsonl", "docs.jsonl.gz", "docs.parquet"):
        argv = ["text", "--input", str(tmp_path / name), "--vocab-size", str(VOCAB), "--seq-len", str(SEQ_LEN),
                "--out", str(tmp_path / f"out-{name}"), "--quiet", "--workers", "1"]  # fmt: skip
        assert main(argv) == 0
        manifest = read_manifest(tmp_path / f"out-{name}")
        hashes[name] = (shard_hashes(manifest), manifest["extra"]["tokenizer_sha256"])
    assert hashes["docs.jsonl"] == hashes["docs.jsonl.gz"] == hashes["docs.parquet"]
    # the held-out documents are a seeded coin per document: about --test-fraction of them
    assert 20 <= manifest["extra"]["documents"]["test"] <= 62 and manifest["extra"]["answer_spans"] is False


def qa_records(count: int) -> list[dict]:
    """Prompt/answer records: sums, a long one split across rows, one with an empty prompt."""
    rng = np.random.default_rng(5)
    records = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in rng.integers(0, 1000, (count, 2))]
    records[7] = {
        "prompt": "sort: " + " ".join("9381726450" * 3) + " -> ",
        "answer": " ".join(sorted("9381726450" * 3)),
    }
    records[9] = {"prompt": "", "answer": "only an answer"}
    return records


@pytest.mark.slow  # a 2-process pool
def test_prompt_answer_documents_mark_exactly_the_answer_and_its_eos(tmp_path, monkeypatch):
    records = qa_records(300)
    (tmp_path / "qa.jsonl").write_text(
        "".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(records))
    )
    argv = ["text", "--input", str(tmp_path / "qa.jsonl"), "--prompt-field", "prompt", "--answer-field", "answer",
            "--vocab-size", "290", "--seq-len", "24", "--test-fraction", "0.2", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "w1"), "--workers", "1"]) == 0
    monkeypatch.setattr(text_prep, "_CHUNK_DOCUMENTS", 8)
    assert main([*argv, "--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    manifest = read_manifest(tmp_path / "w1")
    assert shard_hashes(read_manifest(tmp_path / "w2")) == shard_hashes(manifest)
    extra = manifest["extra"]
    assert extra["answer_spans"] is True and extra["answer_documents"] == extra["documents"]
    assert (
        sum(extra["documents"].values()) == len(records)
        and extra["split_documents"]["train"] + extra["split_documents"]["test"] == 1
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "w1/tokenizer.model"))
    bos, eos = sp.bos_id(), sp.eos_id()
    seen = []
    for split in ("train", "test"):
        tokens: dict[int, list[int]] = {}
        marks: dict[int, list[int]] = {}
        for sample in read_samples(tmp_path / "w1", split):
            answer, docs = sample["answer"], sample["docs"]
            assert answer.dtype == np.uint8 and answer.shape == (24,) and not answer[docs < 0].any()
            for token, doc, mark in zip(sample["tokens"].tolist(), docs.tolist(), answer.tolist()):
                if doc >= 0:
                    tokens.setdefault(doc, []).append(token)
                    marks.setdefault(doc, []).append(mark)
        for doc, ids in tokens.items():
            masked = [t for t, m in zip(ids, marks[doc]) if m]
            assert masked[-1] == eos and ids[0] == bos and marks[doc][0] == 0
            marked = marks[doc]
            assert marked == sorted(marked)  # one span, at the end
            prompt, answer_text = sp.decode(ids[1 : len(ids) - len(masked)]), sp.decode(masked[:-1])
            assert masked[:-1] == sp.encode(answer_text) and ids[1 : len(ids) - len(masked)] == sp.encode(
                prompt
            )
            seen.append({"prompt": prompt, "answer": answer_text})
    assert sorted(seen, key=json.dumps) == sorted(records, key=json.dumps)  # each record once, verbatim


def test_prep_tokenizer_trains_the_model_prep_text_trains(tmp_path, corpus, dataset):
    def tokenizer(out: Path, *args: str) -> bytes:
        assert main(["tokenizer", "--input", str(corpus["train"]), "--vocab-size", str(VOCAB), "--out", str(out),
                     "--quiet", *args]) == 0  # fmt: skip
        return out.read_bytes()

    assert tokenizer(tmp_path / "all.model") == (dataset / "tokenizer.model").read_bytes()
    sampled = tokenizer(tmp_path / "sample.model", "--tokenizer-docs", "150", "--seed", "4")
    inline = build(tmp_path / "inline", corpus, "--vocab-size", str(VOCAB), "--tokenizer-docs", "150",
                   "--seed", "4", "--workers", "1")  # fmt: skip
    assert sampled == (tmp_path / "inline/tokenizer.model").read_bytes() != tokenizer(tmp_path / "a.model")
    reused = build(tmp_path / "reused", corpus, "--tokenizer", str(tmp_path / "sample.model"), "--seed", "4",
                   "--workers", "1")  # fmt: skip
    assert shard_hashes(reused) == shard_hashes(inline)
    chars = tokenizer(tmp_path / "chars.model", "--tokenizer-chars", "3000")
    assert chars != tokenizer(tmp_path / "all2.model") and chars != sampled
    # several inputs, plain text and prompt/answer records, train one tokenizer
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in qa_records(50)))
    argv = ["tokenizer", "--input", str(corpus["train"]), str(qa), "--prompt-field", "prompt", "--answer-field",
            "answer", "--vocab-size", str(VOCAB), "--out", str(tmp_path / "mix.model"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "mix.model"))
    assert sp.get_piece_size() == VOCAB and sp.decode(sp.encode("sort: 9 3 -> 3 9")) == "sort: 9 3 -> 3 9"


def test_tokenizer_sample_is_a_key_order_prefix_within_both_budgets():
    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(1, 200, 500)]
    whole = TokenizerSample(seed=3, max_documents=60, max_chars=4000)
    whole.offer(np.arange(500), texts)
    chunks = TokenizerSample(seed=3, max_documents=60, max_chars=4000)
    for start in range(0, 500, 7):
        chunks.offer(np.arange(start, min(start + 7, 500)), texts[start : start + 7])
    assert [e[1] for e in sorted(whole.heap)] == [
        e[1] for e in sorted(chunks.heap)
    ]  # chunking does not matter
    kept = sorted(-key for key, _, _ in whole.heap)
    assert len(kept) <= 60 and whole.chars == sum(len(t) for _, _, t in whole.heap) <= 4000
    keys = unit_hash(3, 20, np.arange(500))  # tokenizer.py's _SAMPLE_KEY
    order = np.argsort(keys)
    assert sorted(i for _, i, _ in whole.heap) == sorted(order[: len(kept)].tolist())  # a prefix in key order
    next_one = texts[order[len(kept)]]
    assert len(kept) == 60 or whole.chars + len(next_one) > 4000  # ... and the longest one that fits
    assert whole.take() == [texts[i] for i in sorted(order[: len(kept)].tolist())]  # trained in input order
    one = TokenizerSample(seed=0, max_documents=5, max_chars=10)
    one.offer(np.arange(3), ["a" * 50] * 3)
    assert one.take() == ["a" * 10]  # a document over the budget is cut, never dropped into an empty sample


def test_keep_order_packs_the_train_split_in_input_order(tmp_path, corpus):
    manifest = build(tmp_path / "kept", corpus, "--vocab-size", str(VOCAB), "--workers", "1", "--keep-order")
    order = [doc for s in read_samples(tmp_path / "kept", "train") for doc in s["docs"].tolist() if doc >= 0]
    assert list(dict.fromkeys(order)) == list(range(len(documents(corpus["train"]))))
    assert manifest["extra"]["train_order"] == "input"
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [
        "manifest.json",
        "test",
        "tokenizer.model",
        "train",
    ]


# ---- errors -------------------------------------------------------------------------------------------


def char_tokenizer(path: Path, pad_id: int) -> Path:
    """A tiny character-level SentencePiece model (SentencePiece's own default: no pad piece)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["abc def 123+=>"] * 20), model_writer=model, vocab_size=20, model_type="char",
        pad_id=pad_id, minloglevel=2,
    )  # fmt: skip
    path.write_bytes(model.getvalue())
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "{tmp}/missing.txt"], "--input {tmp}/missing.txt: no such file"),
        (["--input", "{tmp}/empty.txt"], "--input {tmp}/empty.txt: holds no documents"),
        (["--input", "{tmp}/latin1.txt"], "--input {tmp}/latin1.txt: not UTF-8 text"),
        (["--input", "{tmp}/bad.jsonl"], "{tmp}/bad.jsonl:2: not valid JSON"),
        (
            ["--input", "{tmp}/notext.jsonl"],
            '{tmp}/notext.jsonl:1: expected an object with a string field "text"',
        ),
        (["--test-input", "{tmp}/missing.txt"], "--test-input {tmp}/missing.txt: no such file"),
        (["--vocab-size", "50"], "--vocab-size 50: too small for this text; it needs at least"),
        (["--vocab-size", "100000"], "--vocab-size 100000: too big for this text"),
        (["--vocab-size", "0"], "argument --vocab-size: 0 must be >= 1"),
        (["--seq-len", "1"], "--seq-len 1: must be >= 2"),
        (["--seq-len", "x"], "argument --seq-len: invalid positive_int value"),
        (["--tokenizer", "{tmp}/missing.model"], "--tokenizer {tmp}/missing.model: no such file"),
        (
            ["--tokenizer", "{tmp}/garbage.model"],
            "--tokenizer {tmp}/garbage.model: not a SentencePiece model",
        ),
        (["--tokenizer", "{tmp}/empty.txt"], "--tokenizer {tmp}/empty.txt: not a SentencePiece model"),
        (
            ["--tokenizer", "{tmp}/nopad.model"],
            "--tokenizer {tmp}/nopad.model: the tokenizer defines no pad piece",
        ),
        (
            ["--tokenizer", "{tmp}/char.model", "--vocab-size", "999"],
            "--vocab-size 999: --tokenizer {tmp}/char.model has",
        ),
        ([], "--vocab-size: required unless --tokenizer"),
        (["--atomic-symbols", ""], "--atomic-symbols: a symbol is empty"),
        (
            ["--tokenizer", "{tmp}/char.model", "--atomic-symbols", "="],
            "--atomic-symbols: applies to a trained tokenizer",
        ),
        (["--test-fraction", "0"], "--test-fraction 0.0: holds out 0 of 3 documents"),
        (["--test-fraction", "0.5", "--test-input", "{tmp}/ok.txt"], "not allowed with argument"),
        (
            ["--input", "{tmp}/qa_missing.jsonl", "--prompt-field", "prompt", "--answer-field", "answer"],
            '{tmp}/qa_missing.jsonl:2: expected an object with a string field "answer" (--answer-field)',
        ),
        (
            ["--input", "{tmp}/qa.jsonl", "--prompt-field", "prompt", "--answer-field", "answer"],
            '{tmp}/qa.jsonl:2: the answer is empty (field "answer", --answer-field)',
        ),
        (
            [
                "--input",
                "{tmp}/qa.jsonl",
                "--text-field",
                "prompt",
                "--prompt-field",
                "prompt",
                "--answer-field",
                "answer",
            ],
            "--text-field: not allowed with --prompt-field/--answer-field",
        ),
        (
            ["--input", "{tmp}/qa.jsonl", "--prompt-field", "prompt"],
            "--prompt-field: needs --answer-field too",
        ),
        (
            ["--prompt-field", "prompt", "--answer-field", "answer"],
            "--input {tmp}/ok.txt: plain text has no prompt/answer fields",
        ),
        (
            ["--input", "{tmp}/ok.parquet", "--text-field", "body"],
            '--input {tmp}/ok.parquet: no column "body" (--text-field)',
        ),
        (
            ["--input", "{tmp}/null.parquet"],
            '{tmp}/null.parquet, row 2: expected a string in column "text" (--text-field)',
        ),
        (["--input", "{tmp}/garbage.parquet"], "--input {tmp}/garbage.parquet: not a readable Parquet file"),
        (
            ["--tokenizer", "{tmp}/char.model", "--test-input", "{tmp}/bad.jsonl"],
            "{tmp}/bad.jsonl:2: not valid JSON",
        ),
    ],
)
def test_bad_input_gives_one_line_naming_the_field(tmp_path, capsys, args, message):
    (tmp_path / "ok.txt").write_text("1+1=2\n2+2=4\nabc\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "notext.jsonl").write_text('{"body": "a"}\n')
    (tmp_path / "garbage.model").write_bytes(b"\x00not a model\xff" * 10)
    (tmp_path / "qa.jsonl").write_text(
        '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "3+3=", "answer": ""}\n'
    )
    (tmp_path / "qa_missing.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    pq.write_table(pa.table({"text": ["a b", "c"]}), tmp_path / "ok.parquet")
    pq.write_table(pa.table({"text": ["a b", None]}), tmp_path / "null.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 but not really" * 4)
    char_tokenizer(tmp_path / "nopad.model", pad_id=-1)
    char_tokenizer(tmp_path / "char.model", pad_id=3)
    fill = [a.format(tmp=tmp_path) for a in args]
    argv = ["text", "--input", str(tmp_path / "ok.txt"), "--seq-len", "8", "--out", str(tmp_path / "out")]
    if "--test-input" not in fill and "--test-fraction" not in fill:
        argv += ["--test-input", str(tmp_path / "ok.txt")]
    if "--vocab-size" not in fill and "--tokenizer" not in fill and args:
        argv += ["--vocab-size", "300"]
    assert main([*argv, "--quiet", *fill]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("python -m hrm_mega.prep text: error: ")
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()  # nor a directory left behind, nor temporary files


def test_errors_surface_through_hrm_mega_prep_and_keep_an_existing_dataset(tmp_path, capsys, dataset):
    from hrm_mega.cli import main as hrm_main

    (tmp_path / "garbage.model").write_bytes(b"junk")
    before = (dataset / "manifest.json").read_bytes()
    argv = ["prep", "text", "--input", str(tmp_path / "missing.txt"), "--seq-len", "8", "--vocab-size", "300"]
    assert hrm_main([*argv, "--out", str(dataset), "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"hrm-mega prep text: error: --input {tmp_path}/missing.txt: no such file\n"
    argv = ["prep", "text", "--input", str(dataset / "tokenizer.model"), "--seq-len", "8"]
    assert (
        hrm_main(
            [*argv, "--tokenizer", str(tmp_path / "garbage.model"), "--out", str(dataset), "--overwrite"]
        )
        == 2
    )
    assert "hrm-mega prep text: error: " in capsys.readouterr().err
    assert (dataset / "manifest.json").read_bytes() == before  # a failed build leaves the old one alone


def test_existing_dataset_needs_overwrite(tmp_path, corpus, capsys):
    build(tmp_path / "d", corpus, "--vocab-size", str(VOCAB), "--workers", "1")
    argv = ["text", "--input", str(corpus["train"]), "--vocab-size", str(VOCAB), "--seq-len", "8"]
    assert main([*argv, "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "d"), "--quiet", "--overwrite"]) == 0
    assert read_manifest(tmp_path / "d")["seq_len"] == 8


# ---- hidden targets (--hidden-field) ----------------------------------------------------------------


def test_hidden_targets_train_at_the_placeholders_and_are_not_scored(tmp_path, monkeypatch):
    import torch

    from hrm_mega.data.stream import SampleStream
    from hrm_mega.training.tasks.lm import answer_documents, answer_only

    records = [
        {
            "prompt": f"q{i % 10}?r{(i * 3) % 10}?{'s' * (i % 30)}=",
            "answer": "ok",
            "hidden": [str(i % 7), "x"],
            "due": [i % 3, 4, 1 + i % 5],
        }
        for i in range(60)
    ]  # the 's' runs make some documents longer than a row: split documents keep their targets
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    atomic = ["--atomic-symbols", "?", *"0123456789", "x"]
    argv = ["text", "--input", str(tmp_path / "h.jsonl"), "--prompt-field", "prompt", "--answer-field", "answer",
            "--hidden-field", "hidden", "--due-field", "due", "--vocab-size", "290", "--seq-len", "24", "--test-fraction", "0.2",
            "--keep-order", "--quiet", *atomic]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "w1"), "--workers", "1"]) == 0
    monkeypatch.setattr(text_prep, "_CHUNK_DOCUMENTS", 8)
    assert main([*argv, "--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    manifest = read_manifest(tmp_path / "w1")
    assert shard_hashes(read_manifest(tmp_path / "w2")) == shard_hashes(manifest)
    assert sum(manifest["extra"]["hidden_targets"].values()) == 2 * len(records)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "w1/tokenizer.model"))
    placeholder = sp.piece_to_id("?")
    # The rows as stored: the tokens keep the placeholder; targets name what each one hides, in order;
    # due holds each placeholder's due cycle and the answer's on the answer and its EOS, 0 elsewhere.
    hidden_of: dict[int, list[str]] = {}
    due_of: dict[int, list[int]] = {}
    for split in ("train", "test"):
        for sample in read_samples(tmp_path / "w1", split):
            targets, tokens, docs, due = sample["targets"], sample["tokens"], sample["docs"], sample["due"]
            assert (
                targets.dtype == np.int32
                and ((targets >= 0) == ((tokens == placeholder) & (docs >= 0))).all()
            )
            assert due.dtype == np.uint8 and (due[(targets < 0) & (sample["answer"] == 0)] == 0).all()
            for doc, t in zip(docs[targets >= 0].tolist(), targets[targets >= 0].tolist()):
                hidden_of.setdefault((split, doc), []).append(sp.id_to_piece(t))
            for doc, d in zip(docs[targets >= 0].tolist(), due[targets >= 0].tolist()):
                due_of.setdefault((split, doc), []).append(d)
            for doc, d in zip(docs[sample["answer"] == 1].tolist(), due[sample["answer"] == 1].tolist()):
                due_of.setdefault((split, doc, "answer"), []).append(d)
    assert sorted(hidden_of.values()) == sorted(r["hidden"] for r in records)
    answer_dues = {key[:2]: set(v) for key, v in due_of.items() if len(key) == 3}
    pairs = sorted(due_of[key] + sorted(answer_dues[key]) for key in hidden_of)
    assert pairs == sorted([*r["due"][:2], r["due"][2]] for r in records)
    # Decoded: labels at the placeholders are the targets, answer marks them 2; the loss keeps them, the
    # exact-answer scoring does not.
    stream = SampleStream(str(tmp_path / "w1"), "train", seed=0, global_batch=4, partitions=1)
    batch = stream.take(range(4))
    ids, labels, answer = batch["input_ids"], batch["labels"], batch["answer"]
    assert (
        set(batch["due"][answer == 1].tolist()) <= {1, 2, 3, 4, 5} and (batch["due"][answer == 0] == 0).all()
    )
    hidden = answer == 2
    assert hidden.any() and (ids[hidden] == placeholder).all()
    assert {sp.id_to_piece(int(t)) for t in labels[hidden]} <= {*"0123456", "x"}
    assert not (labels[hidden] == placeholder).any()
    kept = answer_only(batch)
    assert (kept[hidden] == labels[hidden]).all() and (kept[answer == 0] == -100).all()
    scored = answer_documents(batch, kept)
    assert (scored[hidden] == -1).all() and (scored[answer == 1] >= 0).all()
    assert torch.equal(scored >= 0, (answer == 1) & (kept != -100))


@pytest.mark.parametrize(
    ("record", "extra", "message"),
    [
        ({"prompt": "a?b?=", "answer": "1", "hidden": ["1"]}, [],
         'h.jsonl:1: 1 hidden targets ("hidden") for 2 "?" placeholders in the prompt (--hidden-piece)'),
        ({"prompt": "a?=", "answer": "1", "hidden": "1"}, [],
         'h.jsonl:1: expected a list of non-empty strings in "hidden" (--hidden-field)'),
        ({"prompt": "a?=", "answer": "1", "hidden": ["12"]}, [],
         "--hidden-field: target '12' is not one piece of the tokenizer"),
        ({"prompt": "a??=", "answer": "1", "hidden": ["1", "2"]}, ["--vocab-size", "265", "--atomic-symbols", "1", "2", "??"],
         '--hidden-piece "?": not a piece of its own in every prompt (0 found for 2 targets)'),
        ({"prompt": "a?=", "answer": "1", "hidden": ["1"], "due": [1]}, ["--due-field", "due"],
         'h.jsonl:1: expected 2 ints in 0..255 in "due" (--due-field: one per hidden target, then the answer\'s)'),
        ({"prompt": "a?=", "answer": "1", "hidden": ["1"], "due": [1, 2]}, ["--due-field", "hidden"],
         "--due-field hidden: needs --hidden-field, and a field of its own"),
    ],
)  # fmt: skip
def test_hidden_targets_bad_input_gives_one_line(tmp_path, capsys, record, extra, message):
    (tmp_path / "h.jsonl").write_text(json.dumps(record) + "\n")
    argv = ["text", "--input", str(tmp_path / "h.jsonl"), "--test-input", str(tmp_path / "h.jsonl"),
            "--prompt-field", "prompt", "--answer-field", "answer", "--hidden-field", "hidden",
            "--seq-len", "16", "--out", str(tmp_path / "out"), "--quiet",
            *(extra if extra[:1] == ["--due-field"] else []),
            *(extra if extra[:1] == ["--vocab-size"] else ["--vocab-size", "265", "--atomic-symbols", "?", "1", "2"])]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "out").exists()
    assert main(["text", "--input", str(tmp_path / "h.jsonl"), "--hidden-field", "hidden", "--seq-len", "8",
                 "--vocab-size", "270", "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "--hidden-field hidden: needs --prompt-field/--answer-field" in capsys.readouterr().err
