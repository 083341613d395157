"""What the document mask (``kha train --doc-mask``) costs a training step: the step of ``kha train`` on the
same batch without the mask (plain causal attention, the baseline) and with it, on windows whose documents have
a given mean length (geometric lengths: each token ends its document with probability 1 / mean), RoPE positions
restarting per document (the default) and, once, continuing. Ratios are step time against the unmasked step in
the same round, cases interleaved. On CPUs with AVX512-BF16, bf16 runs the mask in kha's attention kernel;
elsewhere torch's SDPA takes it as an explicit boolean mask (on CUDA, flex_attention).

Shape: the ``study`` preset (d 256, 16/4 heads of 32) at the study's 16 x 256, bf16 autocast, compiled as
``kha train --compile``; ``--quick``: the ``tiny`` preset at 4 x 64, eager, few repeats (a smoke test).

    .venv/bin/python benchmarks/doc_mask.py --device cpu [--no-compile --doc-lengths 64,1024 --json PATH]
"""

from __future__ import annotations

import torch

import common
from kha.config import get_preset
from kha.model import DecoderLM


def packed_ids(vocab: int, batch: int, seq: int, mean_doc: int) -> torch.Tensor:
    """``(batch, seq + 1)`` random tokens with ``<|endoftext|>`` (id 0) ending a document with probability
    ``1 / mean_doc`` at each token, so documents have geometric lengths of that mean."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, seq + 1), generator=g)
    return ids.masked_fill(torch.rand(batch, seq + 1, generator=g) < 1 / mean_doc, 0)


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0], repeats=10)
    p.add_argument("--doc-lengths", default="64,1024", help="comma-separated mean document lengths (tokens)")
    p.add_argument("--no-compile", action="store_true", help="eager steps (default: compiled, as the study)")
    p.set_defaults(dtype="bf16")
    args = p.parse_args()
    env = common.setup(args)
    compile = not (args.no_compile or env.quick)
    preset, batch, seq = ("tiny", 4, 64) if env.quick else ("study", 16, 256)
    cfg = get_preset(preset)
    precision = args.dtype
    info = common.machine_info(env)
    info["compile"] = compile
    common.print_banner("Training step with and without the document mask", info)
    _, _, covered = common.auto_precision(cfg, batch, seq, env.device)
    kernel = (f"kha's attention kernel ({info['cpu_micro_kernel']})"
              if covered and precision == "bf16" and env.device.type == "cpu"
              else "flex_attention" if env.cuda else "torch's SDPA with an explicit mask")
    print(f"- {preset}: {common.describe(cfg)}; {common.n_params(DecoderLM(cfg)):,} parameters; batch {batch} x "
          f"seq {seq}; {precision}; masked attention on {kernel}\n", flush=True)
    common.static_compile_settings()
    lengths = [int(x) for x in args.doc_lengths.split(",")]
    ids = {n: packed_ids(cfg.vocab_size, batch, seq, n) for n in lengths}
    cases = [common.Case("causal", common.kha_train_step(cfg, batch, seq, precision, compile, env.device,
                                                         ids=ids[lengths[0]]))]
    for n in lengths:
        cases.append(common.Case(f"doc mask, documents ~{n}",
                                 common.kha_train_step(cfg, batch, seq, precision, compile, env.device, ids=ids[n],
                                                       doc_mask=True)))
    cases.append(common.Case(f"doc mask, documents ~{lengths[0]}, positions continue",
                             common.kha_train_step(cfg, batch, seq, precision, compile, env.device,
                                                   ids=ids[lengths[0]], doc_mask=True, doc_positions="continue")))
    stats = common.summarize(common.measure(cases, env, preset), "causal")
    rows, results = [], []
    for case in cases:
        s = stats[case.name]
        rows.append([case.name, common.fmt_time(s), common.fmt_ratio(s)])
        results.append({"case": case.name, "preset": preset, "batch": batch, "seq_len": seq, "precision": precision,
                        "compile": compile, "kernel": kernel, **s})
    print(common.markdown_table(["case", "step ms", "ratio to causal"], rows))
    print("\nTarget: the masked step within 1.05x of the unmasked one.")
    common.finish(args, info, results)


if __name__ == "__main__":
    main()
