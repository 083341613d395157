"""Downstream evaluation with lm_eval, offline: ``kha eval RUN_DIR [RUN_DIR ...] --data DATA_DIR --out DIR``.

The paper's Table 4 scores models on public benchmarks (ARC, HellaSwag, WinoGrande, PIQA, MMLU, RACE, ...),
which need a network to fetch. ``kha eval`` runs the same machinery — lm_eval's ``HFLM`` around the model,
``lm_eval.simple_evaluate`` on YAML tasks — on two **local** tasks that it writes into ``OUT/tasks/`` from the
*validation documents* of the prepared corpus (decoded from ``val.bin``; the validation split never trains a
model), so it runs anywhere:

- ``kha_heldout`` (``loglikelihood_rolling``): passages of ``--passage-lines`` consecutive lines of each
  validation document; lm_eval reports ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``
  (the negative log-likelihood of every passage, each scored after one ``<|endoftext|>`` prefix token and in
  rolling windows of the model's maximum length, summed, over the passages' words / UTF-8 bytes).
- ``kha_cloze`` (``multiple_choice``): the context is ``--context-lines`` lines of a validation document, the
  choices are the true next line and ``--choices - 1`` distractor lines drawn from elsewhere in the validation
  set (seeded by ``--seed`` and the example's position, so the same for any ``--limit``); the correct choice's
  position is drawn too. Metrics ``acc`` and ``acc_norm``; chance is ``1 / --choices``.

For each run (a ``kha train`` output folder: ``model.safetensors`` + ``model_config.json``) the model is converted
in memory to a ``KHAForCausalLM`` (``kha.hf.from_training_run``); the tokenizer is the run's ``tokenizer.json``
if it has one, else ``DATA_DIR/tokenizer.json``. Output: ``OUT/eval.md`` (one row per run, labelled with the run
folder's name; the name of its parent is added when two runs share a name, as ``kha ablate``'s
``runs/VARIANT/seed_N`` do) and ``OUT/eval.json`` (the numbers, lm_eval's ``n-samples`` and the task settings).
``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` are set for the evaluation.

The real Table 4 benchmarks, where a network exists (the tasks' datasets download from the Hugging Face Hub)::

    kha hf-convert --from runs/tiny --out hf/tiny   # KHA folder + tokenizer
    python -m kha.evaluation run --model hf --model_args pretrained=hf/tiny,dtype=bfloat16 \\
        --tasks arc_easy,arc_challenge,hellaswag,winogrande,piqa,mmlu,race --batch_size 16 --output_path results/

``python -m kha.evaluation ARGS`` is lm_eval's own command line (``lm_eval ARGS``) after ``import kha.hf``, which
registers the ``kha`` model type with ``AutoModelForCausalLM``; plain ``lm_eval`` cannot load a KHA folder since
it never imports kha. Equivalent: ``python -c "import sys, kha.hf; from lm_eval.__main__ import cli_evaluate;
sys.argv[0] = 'lm_eval'; cli_evaluate()" run --model hf ...``. Local task folders go in with ``--include_path``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np

from . import safe_io
from .data.prepare import TOKENIZER, read_manifest

HELDOUT, CLOZE = "kha_heldout", "kha_cloze"
DEFAULTS = dict(passage_lines=8, context_lines=3, choices=4, min_line_chars=12, limit=500, seed=0)
MINIMUM = dict(batch_size=1, passage_lines=1, context_lines=1, choices=2, min_line_chars=0, limit=0)


# --- validation documents ----------------------------------------------------------------------------------------

def validation_documents(data_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """``(doc_id, text)`` of every validation document, decoded from ``val.bin`` (byte-level BPE round-trips)."""
    from .data.tokenizer import load_tokenizer

    data = Path(data_dir)
    manifest = read_manifest(data)
    split = manifest["splits"]["val"]
    ids = np.memmap(data / split["file"], dtype=np.dtype(manifest["dtype"]), mode="r")
    ends = np.flatnonzero(ids == manifest["tokenizer"]["eos_id"])
    if len(ends) != len(split["documents"]):
        raise ValueError(f"{data / split['file']}: {len(ends)} documents, the manifest lists {len(split['documents'])}")
    tok = load_tokenizer(data / TOKENIZER)
    starts = np.concatenate([[0], ends[:-1] + 1])
    texts = tok.decode_batch([ids[s:e].astype(np.int64).tolist() for s, e in zip(starts, ends, strict=True)],
                             skip_special_tokens=False)
    return list(zip(split["documents"], texts, strict=True))


def _sample(items: list, limit: int | None, seed: int, salt: str) -> list:
    """At most ``limit`` items, drawn with a seeded RNG and kept in their order (all when ``limit`` is falsy)."""
    if not limit or len(items) <= limit:
        return items
    keep = sorted(random.Random(f"{seed}:{salt}").sample(range(len(items)), limit))
    return [items[i] for i in keep]


def heldout_examples(docs: list[tuple[str, str]], passage_lines: int = 8, limit: int | None = None,
                     seed: int = 0) -> list[dict]:
    """Passages of ``passage_lines`` consecutive lines (newlines kept) of each document; blank passages skipped."""
    out = []
    for doc_id, text in docs:
        lines = text.splitlines(keepends=True)
        for start in range(0, len(lines), passage_lines):
            passage = "".join(lines[start:start + passage_lines])
            if passage.strip():
                out.append({"doc_id": doc_id, "line": start, "text": passage})
    return _sample(out, limit, seed, HELDOUT)


def cloze_examples(docs: list[tuple[str, str]], context_lines: int = 3, num_choices: int = 4,
                   min_line_chars: int = 12, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Next-line multiple choice: ``context`` (``context_lines`` lines, each ending in a newline), ``choices``
    (the true next line and distractors: lines of at least ``min_line_chars`` non-blank characters from elsewhere
    in the validation set, distinct from each other and from the answer once stripped), ``answer`` (its index).

    Every example draws from its own RNG seeded by ``(seed, doc_id, line)``, so it is the same for any ``limit``.
    """
    def usable(line: str) -> bool:
        return len(line.strip()) >= min_line_chars

    split = [(doc_id, text.split("\n")) for doc_id, text in docs]
    pool = [(doc_id, i, line) for doc_id, lines in split for i, line in enumerate(lines) if usable(line)]
    examples = []
    for doc_id, lines in split:
        for i in range(context_lines, len(lines)):
            context = lines[i - context_lines:i]
            if not usable(lines[i]) or not any(c.strip() for c in context):
                continue
            rng = random.Random(f"{seed}:{doc_id}:{i}")
            answer, seen, distractors = lines[i], {lines[i].strip()}, []
            for _ in range(50 * num_choices):
                if len(distractors) == num_choices - 1:
                    break
                other_doc, j, line = pool[rng.randrange(len(pool))]
                if (other_doc == doc_id and abs(j - i) <= context_lines) or line.strip() in seen:
                    continue
                seen.add(line.strip())
                distractors.append(line)
            if len(distractors) < num_choices - 1:
                continue  # too few distinct lines in the whole validation set
            position = rng.randrange(num_choices)
            choices = distractors[:position] + [answer] + distractors[position:]
            examples.append({"doc_id": doc_id, "line": i, "context": "\n".join(context) + "\n", "choices": choices,
                             "answer": position})
    return _sample(examples, limit, seed, CLOZE)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    safe_io.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_tasks(data_dir: str | os.PathLike, out: str | os.PathLike, passage_lines: int = 8, context_lines: int = 3,
                choices: int = 4, min_line_chars: int = 12, limit: int | None = 500, seed: int = 0) -> dict:
    """Write ``kha_heldout`` and ``kha_cloze`` (YAML + JSONL) into ``out``; return ``{task: number of examples}``."""
    import yaml

    out = safe_io.make_dirs(Path(out).resolve())
    docs = validation_documents(data_dir)
    heldout = heldout_examples(docs, passage_lines, limit, seed)
    cloze = cloze_examples(docs, context_lines, choices, min_line_chars, limit, seed)
    if not heldout or not cloze:
        raise ValueError(f"{data_dir}: the validation documents give {len(heldout)} passages and {len(cloze)} cloze "
                         "examples; both tasks need at least one")
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    tasks = {
        HELDOUT: (heldout, {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False}
                            for m, agg in (("word_perplexity", "weighted_perplexity"),
                                           ("byte_perplexity", "weighted_perplexity"),
                                           ("bits_per_byte", "bits_per_byte"))]}),
        CLOZE: (cloze, {
            # the context ends in a newline and each choice is a whole line: no delimiter between them
            "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
            "doc_to_target": "answer", "target_delimiter": "",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}),
    }
    for name, (records, spec) in tasks.items():
        _write_jsonl(out / f"{name}.jsonl", records)
        config = {"task": name, **common, "dataset_kwargs": {"data_files": {"test": str(out / f"{name}.jsonl")}},
                  **spec}
        safe_io.write_text(out / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
    return {name: len(records) for name, (records, _) in tasks.items()}


# --- running lm_eval ---------------------------------------------------------------------------------------------

def _labels(runs: list[Path]) -> list[str]:
    names = [r.name for r in runs]
    return [f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def run_tokenizer_json(run: Path, data_dir: Path) -> Path:
    own = run / TOKENIZER
    return own if own.exists() else data_dir / TOKENIZER


def evaluate_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike, tasks_dir: str | os.PathLike,
                 batch_size: int = 8, device: str = "cpu", log_samples: bool = False) -> dict:
    """lm_eval on the tasks in ``tasks_dir`` for one ``kha train`` run; lm_eval's output dict."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .hf.runs import from_training_run, hf_tokenizer

    run = Path(run_dir)
    model = from_training_run(run).to(device).eval()
    tok = hf_tokenizer(run_tokenizer_json(run, Path(data_dir)))
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"{run}: the tokenizer has {len(tok)} ids, the model {model.config.vocab_size}; "
                         "was it trained on this --data?")
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size,
              max_length=model.config.max_position_embeddings)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    with torch.no_grad():
        return lm_eval.simple_evaluate(model=lm, tasks=[HELDOUT, CLOZE], task_manager=manager, log_samples=log_samples,
                                       bootstrap_iters=1000, verbosity="WARNING")


def summarize(result: dict) -> dict:
    """The numbers of one run from lm_eval's output."""
    heldout, cloze = result["results"][HELDOUT], result["results"][CLOZE]
    count = {t: result["n-samples"][t]["effective"] for t in (HELDOUT, CLOZE)}

    def num(x):
        return x if isinstance(x, (int, float)) and math.isfinite(x) else None

    return {"bits_per_byte": heldout["bits_per_byte,none"], "byte_perplexity": heldout["byte_perplexity,none"],
            "word_perplexity": heldout["word_perplexity,none"], "cloze_acc": cloze["acc,none"],
            "cloze_acc_stderr": num(cloze.get("acc_stderr,none")), "cloze_acc_norm": cloze["acc_norm,none"],
            "cloze_acc_norm_stderr": num(cloze.get("acc_norm_stderr,none")),
            "heldout_examples": count[HELDOUT], "cloze_examples": count[CLOZE]}


def markdown_table(rows: dict[str, dict], chance: float) -> str:
    lines = ["| run | bits/byte | byte ppl | word ppl | cloze acc | cloze acc_norm | passages | cloze examples |",
             "|---|---|---|---|---|---|---|---|"]

    def pm(value, err):
        return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")

    for label, r in rows.items():
        lines.append(f"| {label} | {r['bits_per_byte']:.4f} | {r['byte_perplexity']:.4f} | {r['word_perplexity']:.2f} "
                     f"| {pm(r['cloze_acc'], r['cloze_acc_stderr'])} "
                     f"| {pm(r['cloze_acc_norm'], r['cloze_acc_norm_stderr'])} "
                     f"| {r['heldout_examples']} | {r['cloze_examples']} |")
    lines.append("")
    lines.append(f"Validation documents only (never trained on). Cloze chance: {chance:.4f}; ± is lm_eval's standard "
                 "error of the mean.")
    return "\n".join(lines) + "\n"


def run_eval(runs: list[str | os.PathLike], data_dir: str | os.PathLike, out: str | os.PathLike,
             batch_size: int = 8, device: str = "cpu", verbose: bool = True, **task_options) -> dict:
    """Write the tasks, evaluate every run, write ``eval.md`` and ``eval.json``; return the ``eval.json`` dict."""
    for run in map(Path, runs):  # before minutes of task writing and evaluating the others
        if not ((run / "model.safetensors").is_file() and (run / "model_config.json").is_file()):
            what = "no such folder" if not run.is_dir() else "no model.safetensors + model_config.json"
            raise FileNotFoundError(f"{run}: {what}; a RUN_DIR is the --out folder of a finished `kha train`")
    read_manifest(data_dir)  # a missing or unprepared --data named before anything is written
    for name, low in MINIMUM.items():
        value = batch_size if name == "batch_size" else task_options.get(name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device; e.g. cpu, cuda or cuda:1") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asks for CUDA, which is not available here; use --device cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Read when huggingface_hub / datasets are first imported (lm_eval imports them below), so effective in a fresh
    # `kha eval` process; restored afterwards for callers in the same process.
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": os.environ.get("HF_DATASETS_CACHE") or str((out / ".hf_datasets").resolve())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _run_eval(runs, data_dir, out, batch_size, device, verbose, task_options)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_eval(runs, data_dir, out: Path, batch_size: int, device: str, verbose: bool, task_options: dict) -> dict:
    runs = [Path(r) for r in runs]
    options = {**DEFAULTS, **task_options}
    counts = write_tasks(data_dir, out / "tasks", **options)
    if verbose:
        print(f"wrote {out / 'tasks'}: {counts[HELDOUT]} passages ({HELDOUT}), {counts[CLOZE]} cloze examples "
              f"({CLOZE}) from the validation documents of {data_dir}")
    rows = {}
    for label, run in zip(_labels(runs), runs, strict=True):
        rows[label] = {"run": str(run), **summarize(evaluate_run(run, data_dir, out / "tasks", batch_size, device))}
        if verbose:
            print(f"{label}: bits/byte {rows[label]['bits_per_byte']:.4f}, cloze acc {rows[label]['cloze_acc']:.4f}")
    chance = 1 / options["choices"]
    table = markdown_table(rows, chance)
    safe_io.write_text(out / "eval.md", table)
    report = {"data": str(data_dir), "tasks": options, "cloze_chance": chance, "runs": rows}
    safe_io.write_text(out / "eval.json", json.dumps(report, indent=1) + "\n")
    if verbose:
        print(table, end="")
        print(f"wrote {out / 'eval.md'} and {out / 'eval.json'}")
    return report


# --- command line ------------------------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    run_eval(args.runs, args.data, args.out, batch_size=args.batch_size, device=args.device,
             passage_lines=args.passage_lines, context_lines=args.context_lines, choices=args.choices,
             min_line_chars=args.min_line_chars, limit=args.limit or None, seed=args.seed)
    return 0


EPILOG = """\
The paper's Table 4 benchmarks need a network (their datasets come from the Hugging Face Hub). Convert the run,
then call lm_eval's own command line through kha, which registers the KHA model type first:
  kha hf-convert --from RUN_DIR --out HF_DIR
  python -m kha.evaluation run --model hf --model_args pretrained=HF_DIR \\
      --tasks arc_easy,arc_challenge,hellaswag,winogrande,piqa,mmlu,race --batch_size 16 [--include_path DIR]
(plain `lm_eval` does not import kha, so AutoModelForCausalLM would not know model_type "kha")."""


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="lm_eval on local held-out perplexity and next-line cloze tasks built from validation documents",
        description="Evaluate `kha train` runs with lm_eval (HFLM, offline) on two tasks written into OUT/tasks from "
        "the validation documents of --data: kha_heldout (rolling log-likelihood: bits per byte, byte and word "
        "perplexity) and kha_cloze (the true next line among distractor lines: acc, acc_norm). Writes OUT/eval.md "
        "and OUT/eval.json.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`kha train` output folders (model.safetensors)")
    p.add_argument("--data", required=True, metavar="DATA_DIR", help="the prepared corpus the runs trained on")
    p.add_argument("--out", required=True, metavar="DIR", help="where tasks/, eval.md and eval.json go")
    p.add_argument("--limit", type=int, default=DEFAULTS["limit"],
                   help="at most N examples per task, a seeded sample (default: %(default)s; 0: all)")
    p.add_argument("--batch-size", type=int, default=8, help="lm_eval batch size (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--passage-lines", type=int, default=DEFAULTS["passage_lines"],
                   help="lines per held-out passage (default: %(default)s)")
    p.add_argument("--context-lines", type=int, default=DEFAULTS["context_lines"],
                   help="lines of cloze context (default: %(default)s)")
    p.add_argument("--choices", type=int, default=DEFAULTS["choices"], help="cloze choices (default: %(default)s)")
    p.add_argument("--min-line-chars", type=int, default=DEFAULTS["min_line_chars"],
                   help="non-blank characters a cloze answer or distractor line needs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="sampling seed (default: %(default)s)")
    p.set_defaults(func=cmd_eval)


def lm_eval_main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the ``kha`` model type registered (``python -m kha.evaluation ARGS``)."""
    from lm_eval.__main__ import cli_evaluate

    import kha.hf  # noqa: F401  (registers KHAConfig / KHAForCausalLM with the Auto classes)

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    lm_eval_main()
