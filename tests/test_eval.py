"""``kha eval``: lm_eval (HFLM, offline) on local tasks built from validation documents, checked against our own
scoring with the DecoderLM forward. One tiny corpus, a 3-step run and a random-init run, one ``kha eval`` call."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kha.cli import main
from kha.data.loader import read_manifest
from kha.evaluation import CLOZE, HELDOUT, cloze_examples, heldout_examples, validation_documents
from kha.model import DecoderLM

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

LIMIT, CHOICES, PASSAGE_LINES = 32, 4, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_dir):
    """The shared tiny corpus (conftest), a 3-step run, a random-init run, then one ``kha eval`` call."""
    from kha.hf.runs import save_training_run
    from kha.train import TrainConfig, train
    from kha.train.loop import build_model_config

    root, data = tmp_path_factory.mktemp("eval"), data_dir
    cfg = TrainConfig(out=str(root / "trained"), preset="tiny", data=str(data), seq_len=32, batch_size=4, steps=3,
                      lr=3e-3, eval_every=3, eval_batches=1, ckpt_every=100, progress=False)
    train(cfg)
    torch.manual_seed(1)
    vocab = read_manifest(data)["tokenizer"]["vocab_size"]
    save_training_run(DecoderLM(build_model_config(cfg, vocab)), root / "untrained")
    out = root / "out"
    assert main(["eval", str(root / "trained"), str(root / "untrained"), "--data", str(data), "--out", str(out),
                 "--limit", str(LIMIT), "--passage-lines", str(PASSAGE_LINES), "--choices", str(CHOICES),
                 "--batch-size", "16"]) == 0
    return root, data, out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def load_lm(run) -> DecoderLM:
    from kha.hf.runs import load_state_into, model_config_from_dict

    model = DecoderLM(model_config_from_dict(json.loads((run / "model_config.json").read_text())))
    load_state_into(model, load_file(run / "model.safetensors"), str(run))
    return model.eval()


def test_tasks_come_from_validation_documents_only(setup):
    root, data, out = setup
    splits = read_manifest(data)["splits"]
    val_ids, train_ids = set(splits["val"]["documents"]), set(splits["train"]["documents"])
    texts = {f.name: f.read_text() for f in (data.parent / "docs").iterdir()}  # doc id = folder/file name
    val_texts = {d: texts[d.split("/", 1)[1]] for d in val_ids}
    train_texts = [texts[d.split("/", 1)[1]] for d in train_ids]
    assert dict(validation_documents(data)) == val_texts  # val.bin decodes to the documents byte for byte

    heldout, cloze = read_jsonl(out / "tasks" / f"{HELDOUT}.jsonl"), read_jsonl(out / "tasks" / f"{CLOZE}.jsonl")
    all_passages = heldout_examples(validation_documents(data), PASSAGE_LINES)
    assert len(heldout) == min(LIMIT, len(all_passages)) and len(cloze) == LIMIT
    for ex in heldout:
        assert ex["doc_id"] in val_ids and ex["text"] in val_texts[ex["doc_id"]]
    for ex in cloze:
        assert ex["doc_id"] in val_ids
        assert ex["context"] + ex["choices"][ex["answer"]] in val_texts[ex["doc_id"]]
        for choice in ex["choices"]:  # distractors too: lines of validation documents
            assert any(choice in t for t in val_texts.values())
    # no training text: passages (several lines each) and cloze context+answer do not occur in training documents
    pieces = [ex["text"] for ex in heldout] + [ex["context"] + ex["choices"][ex["answer"]] for ex in cloze]
    shared = [p for p in pieces if len(p.strip()) > 80 and any(p in t for t in train_texts)]
    assert not shared, shared
    # valid lm_eval tasks: both load through a TaskManager on the written folder
    from lm_eval.tasks import TaskManager

    assert {HELDOUT, CLOZE} <= set(TaskManager(include_path=str(out / "tasks"), include_defaults=False).all_tasks)


def test_cloze_choices_hold_the_answer_once_and_are_deterministic(setup):
    _, data, out = setup
    for ex in read_jsonl(out / "tasks" / f"{CLOZE}.jsonl"):
        stripped = [c.strip() for c in ex["choices"]]
        assert len(ex["choices"]) == CHOICES and len(set(stripped)) == CHOICES
        assert stripped.count(ex["choices"][ex["answer"]].strip()) == 1
    docs = validation_documents(data)
    full = cloze_examples(docs, num_choices=CHOICES, seed=0)
    assert full == cloze_examples(docs, num_choices=CHOICES, seed=0)
    assert full != cloze_examples(docs, num_choices=CHOICES, seed=1)
    sample = cloze_examples(docs, num_choices=CHOICES, limit=LIMIT, seed=0)
    assert len(sample) == LIMIT and all(ex in full for ex in sample)  # an example does not depend on the limit
    assert len({ex["answer"] for ex in full}) == CHOICES  # the answer's position is drawn too
    assert heldout_examples(docs, PASSAGE_LINES, LIMIT) == heldout_examples(docs, PASSAGE_LINES, LIMIT)


def test_bits_per_byte_equals_our_negative_log_likelihood(setup):
    """Each passage is one window (asserted): lm_eval scores it after one EOS prefix token, as we do. fp32, rel 1e-5."""
    from kha.hf import hf_tokenizer

    root, data, out = setup
    report = json.loads((out / "eval.json").read_text())["runs"]
    tok = hf_tokenizer(data / "tokenizer.json")
    passages = [ex["text"] for ex in read_jsonl(out / "tasks" / f"{HELDOUT}.jsonl")]
    for name in ("trained", "untrained"):
        model = load_lm(root / name)
        nll, n_bytes, n_words = 0.0, 0, 0
        for text in passages:
            ids = tok.encode(text, add_special_tokens=False)
            assert len(ids) + 1 <= model.cfg.max_seq_len  # a single rolling window
            inputs = torch.tensor([[tok.eos_token_id, *ids[:-1]]])
            with torch.no_grad():
                logp = torch.log_softmax(model(inputs).logits.double(), dim=-1)[0]
            nll -= logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
            n_bytes += len(text.encode("utf-8"))
            n_words += len(re.split(r"\s+", text))  # lm_eval's count_words (a trailing newline counts one)
        row = report[name]
        assert row["heldout_examples"] == len(passages)
        assert row["bits_per_byte"] == pytest.approx(nll / (n_bytes * math.log(2)), rel=1e-5)
        assert row["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
        assert row["word_perplexity"] == pytest.approx(math.exp(nll / n_words), rel=1e-5)
    assert report["trained"]["bits_per_byte"] < report["untrained"]["bits_per_byte"]  # 3 steps already help


def choice_loglikelihoods(model, tok, context: str, choices: list[str]) -> list[float]:
    """log p(choice | context) for each choice, split as lm_eval does: the context's trailing whitespace moves to
    the continuation, context + continuation is encoded whole, the continuation is what follows the context's
    tokens. One right-padded batch (causal: padding after a row changes nothing before it)."""
    n = len(context) - len(context.rstrip())
    head, moved = (context[:-n], context[-n:]) if n else (context, "")
    ctx = tok.encode(head, add_special_tokens=False)
    wholes = [tok.encode(head + moved + c, add_special_tokens=False) for c in choices]
    width = max(map(len, wholes))
    ids = torch.tensor([w + [0] * (width - len(w)) for w in wholes])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits.double(), dim=-1)
    return [logp[i, torch.arange(len(ctx) - 1, len(w) - 1), ids[i, len(ctx):len(w)]].sum().item()
            for i, w in enumerate(wholes)]


def test_cloze_accuracy_equals_our_argmax_and_is_chance_untrained(setup):
    """For the random-init model, lm_eval's acc and acc_norm equal the argmax of our own log-likelihoods over the
    same examples (exact), and acc is within 3 binomial standard deviations of chance."""
    from kha.hf import hf_tokenizer

    root, data, out = setup
    report = json.loads((out / "eval.json").read_text())
    tok = hf_tokenizer(data / "tokenizer.json")
    examples = read_jsonl(out / "tasks" / f"{CLOZE}.jsonl")
    model = load_lm(root / "untrained")
    acc = acc_norm = 0
    for ex in examples:
        lls = choice_loglikelihoods(model, tok, ex["context"], ex["choices"])
        norm = [ll / len(c) for ll, c in zip(lls, ex["choices"], strict=True)]  # lm_eval: per character
        acc += max(range(CHOICES), key=lls.__getitem__) == ex["answer"]
        acc_norm += max(range(CHOICES), key=norm.__getitem__) == ex["answer"]
    row = report["runs"]["untrained"]
    assert row["cloze_examples"] == len(examples)
    assert row["cloze_acc"] == pytest.approx(acc / len(examples), abs=1e-12)
    assert row["cloze_acc_norm"] == pytest.approx(acc_norm / len(examples), abs=1e-12)
    chance, n = 1 / CHOICES, len(examples)
    assert report["cloze_chance"] == chance
    assert abs(row["cloze_acc"] - chance) <= 3 * math.sqrt(chance * (1 - chance) / n)


def test_report_files(setup, capsys):
    _, _, out = setup
    table = (out / "eval.md").read_text().splitlines()
    assert table[0].startswith("| run | bits/byte | byte ppl")
    assert [line.split("|")[1].strip() for line in table[2:4]] == ["trained", "untrained"]
    assert "±" in table[2]  # lm_eval's standard error of the cloze accuracy
    help_text = _help(capsys)
    assert "python -m kha.evaluation run --model hf" in help_text and "--limit" in help_text


def _help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    return capsys.readouterr().out
