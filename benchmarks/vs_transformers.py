"""How we compare with Hugging Face transformers: training throughput (tokens/s of forward + backward + AdamW
step) of our baseline ``kha.model.DecoderLM`` (dense, no knock) against transformers' ``Qwen3ForCausalLM``
of the same shape (SDPA attention, random init), and of our KHA-MLP (v) model, in the same run.

Shapes: ``--preset small`` (``common.small_lm_config``: 6 layers, d 512, 32/4 heads of 64, SwiGLU 1536,
vocabulary 8192) with batch 2 x seq 512 on CPU; ``--preset dense-0.6b`` (the paper's smallest dense model,
24 x 1024, 32/4 heads of 128, SwiGLU 3072, vocabulary 157,184) with batch 2 x seq 2048 on GPU; ``--quick``:
the ``tiny`` preset, batch 2 x seq 64. Both models must have the same parameter count (asserted). The loss is
the same cross-entropy, computed outside both models from their fp32-cast logits, and every model gets the
same AdamW (``common.adamw``: fused where the device has it). With ``--compile`` each model is also timed
compiled (the same weights and optimizer, wrapped in ``torch.compile``), plus our best setting: the step of
``kha train --compile`` (whole model with its loss compiled). All cases are timed in one interleaved group,
and every speed is taken against transformers eager round by round.

    .venv/bin/python benchmarks/vs_transformers.py [--device cuda --dtype bf16 --compile --json PATH]
"""

from __future__ import annotations

import functools
import importlib.util
import sys

import torch

import common
from kha.config import ModelConfig, get_preset, preset_names
from kha.model import DecoderLM


def qwen3(cfg: ModelConfig, seq_len: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    a = cfg.attention
    hf_cfg = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=a.d_model, intermediate_size=cfg.d_ff,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=a.n_heads,
                         num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim, tie_word_embeddings=True,
                         rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=False,
                         max_position_embeddings=max(seq_len, 4096))
    return Qwen3ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0], repeats=10)
    p.add_argument("--preset", choices=["small"] + preset_names(), default=None,
                   help="model shape (dense presets only; default small on CPU, dense-0.6b on GPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (512 on CPU, 2048 on GPU)")
    args = p.parse_args()
    env = common.setup(args)
    if importlib.util.find_spec("transformers") is None:
        sys.exit('transformers is not installed: .venv/bin/python -m pip install "transformers>=5"')
    info = common.machine_info(env, modules=("transformers",))
    common.print_banner("Training throughput: kha DecoderLM vs transformers Qwen3ForCausalLM", info)
    name = "tiny" if env.quick else args.preset or ("dense-0.6b" if env.cuda else "small")
    seq = 64 if env.quick else args.seq_len or (2048 if env.cuda else 512)
    cfg = common.small_lm_config() if name == "small" else get_preset(name)
    if cfg.moe is not None:
        sys.exit(f"--preset {name} is an MoE model; Qwen3ForCausalLM is dense: pick a dense preset")

    torch.manual_seed(0)
    ours, hf, mlp = DecoderLM(cfg), qwen3(cfg, seq), DecoderLM(cfg.with_knock("mlp", "v"))
    n_ours, n_hf = common.n_params(ours), common.n_params(hf)
    print(f"- model ({name}): {common.describe(cfg)}; batch {args.batch} x seq {seq} = {args.batch * seq:,} tokens "
          "per step")
    print(f"- parameters: kha {n_ours:,}; transformers Qwen3 {n_hf:,}; kha KHA-MLP v {common.n_params(mlp):,}\n",
          flush=True)
    assert n_ours == n_hf, f"parameter counts differ: kha {n_ours:,} vs transformers {n_hf:,}"

    models = {"kha": ("kha DecoderLM", ours, lambda m, x: m(x).logits),
              "hf": ("transformers Qwen3ForCausalLM (sdpa)", hf, lambda m, x: m(input_ids=x, use_cache=False).logits),
              "kha-mlp-v": ("kha DecoderLM, KHA-MLP v", mlp, lambda m, x: m(x).logits)}
    batch = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1), generator=torch.Generator().manual_seed(1))
    batch = batch.to(env.device)
    opts = {}
    for key, (_, module, _) in models.items():
        module.to(env.device).train()
        opts[key] = common.adamw(module)

    # every case in one interleaved group, so that each ratio to transformers eager is taken round by round
    cases, labels = [], {}
    for mode in ["eager"] + (["compiled"] if env.compile else []):
        for key, (label, module, call) in models.items():
            wrapped = common.compile_module(module) if mode == "compiled" else module
            forward = functools.partial(call, wrapped, batch[:, :-1])
            name = f"{key} {mode}"
            cases.append(common.training_case(name, forward, common.lm_loss(batch[:, 1:]), opts[key], env))
            labels[name] = (mode, label, module)
    if env.compile:  # our best setting: kha train's own step (loss inside the compiled model), compiled
        name = "kha train --compile"
        cases.append(common.Case(name, common.kha_train_step(cfg, args.batch, seq, env.dtype, True, env.device)))
        labels[name] = ("compiled", "kha DecoderLM as `kha train --compile` runs it (whole model and loss)", ours)
    stats = common.summarize(common.measure(cases, env, "all"), "hf eager")
    rows, results = [], []
    for name, (mode, label, module) in labels.items():
        s = stats[name]
        tok_s = args.batch * seq / s["median_s"]
        rows.append([mode, label, f"{common.n_params(module):,}", common.fmt_time(s), f"{tok_s:,.0f}",
                     f"{1 / s['ratio']:.2f}x", common.fmt_ratio(s), common.fmt_mib(s)])
        results.append({"mode": mode, "case": name, "label": label, "params": common.n_params(module),
                        "tokens_per_s": tok_s, "tokens_per_step": args.batch * seq,
                        "speed_vs_transformers_eager": 1 / s["ratio"], **s})
    print(common.markdown_table(["mode", "model", "params", "step ms", "tokens/s", "speed vs transformers eager",
                                 "time ratio to transformers eager", "peak MiB"], rows))
    common.finish(args, info, results)


if __name__ == "__main__":
    main()
