"""What KHA costs at inference and what folding saves: prefill latency and per-token decode latency with the
KV cache of a small dense LM, baseline vs KHA-Linear (qkv) unfolded vs the same model folded
(``kha.fold_knocks``) vs KHA-MLP (v).

Model: ``common.small_lm_config`` (6 layers, d 512, GQA 32 query / 4 KV heads of 64, SwiGLU 1536, vocabulary
8192, 32.5M parameters). Every model is built under the same seed (same base weights), and its knocks are
moved off the identity at random (as training would) before the folded copy is made; the script asserts
that folded and unfolded logits agree within 1e-4 in fp32 before timing anything.
Prefill: batch 1, a 512-token prompt on CPU (2048 on GPU). Decode: greedy, 64 tokens after a 256-token
prompt, one token per forward through the KV cache; the prompt's prefill is untimed.

    .venv/bin/python benchmarks/inference.py [--device cuda --dtype bf16 --compile --json PATH]
"""

from __future__ import annotations

import copy

import torch

import common
from kha import fold_knocks
from kha.model import DecoderLM

FOLD_TOLERANCE = 1e-4


def build(knock: str, targets) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(common.small_lm_config(knock, targets)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".knocks." in name:  # away from identity/zero, as after training
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def models() -> dict[str, tuple[str, DecoderLM]]:
    """key -> (label, fp32 CPU model); checks folded == unfolded first."""
    linear = build("linear", "qkv")
    folded = fold_knocks(copy.deepcopy(linear))
    out = {"baseline": ("baseline", build("none", None)), "linear-qkv": ("KHA-Linear qkv, unfolded", linear),
           "linear-qkv-folded": ("KHA-Linear qkv, folded", folded), "mlp-v": ("KHA-MLP v", build("mlp", "v"))}
    tokens = torch.randint(0, linear.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (linear(tokens).logits - folded(tokens).logits).abs().max().item()
    assert diff <= FOLD_TOLERANCE, f"folded logits differ from unfolded by {diff:.3g} > {FOLD_TOLERANCE}"
    assert common.n_params(folded) == common.n_params(out["baseline"][1]), "folded model is not baseline-sized"
    print(f"- check: folded vs unfolded KHA-Linear logits, fp32, max abs diff {diff:.2e} (<= {FOLD_TOLERANCE}); "
          f"folded parameter count equals the baseline's ({common.n_params(folded):,})\n", flush=True)
    return out


def prefill_case(key: str, model, prompt: torch.Tensor, env: common.Env) -> common.Case:
    def run():
        with torch.inference_mode(), env.autocast():
            model(prompt, caches=model.new_caches())

    return common.Case(key, run)


def decode_case(key: str, model, prompt: torch.Tensor, steps: int, env: common.Env) -> common.Case:
    state = {}

    def setup():
        with torch.inference_mode(), env.autocast():
            state["caches"] = model.new_caches()  # a compiled model forwards this to the original
            state["token"] = model(prompt, caches=state["caches"]).logits[:, -1:].argmax(-1)

    def run():
        with torch.inference_mode(), env.autocast():
            token, caches = state["token"], state["caches"]
            for _ in range(steps):
                token = model(token, caches=caches).logits[:, -1:].argmax(-1)

    return common.Case(key, run, setup)


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0], repeats=10)
    p.add_argument("--prompt-len", type=int, default=None, help="prefill prompt (512 on CPU, 2048 on GPU)")
    p.add_argument("--decode-prompt-len", type=int, default=256, help="prompt before decoding")
    p.add_argument("--decode-steps", type=int, default=64, help="tokens decoded per timed call")
    args = p.parse_args()
    env = common.setup(args)
    info = common.machine_info(env)
    common.print_banner("Inference: prefill and KV-cache decoding, baseline vs KHA (unfolded, folded)", info)
    prompt_len = args.prompt_len or (2048 if env.cuda else 512)
    decode_prompt, steps = args.decode_prompt_len, args.decode_steps
    if env.quick:
        prompt_len, decode_prompt, steps = 32, 16, 8
    built = models()
    cfg = built["baseline"][1].cfg
    print(f"- model: {common.describe(cfg)}; prefill batch 1 x {prompt_len} tokens; decode {steps} tokens after a "
          f"{decode_prompt}-token prompt (batch 1)\n", flush=True)

    gen = torch.Generator().manual_seed(3)
    prefill_prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=gen).to(env.device)
    decode_prompt_ids = torch.randint(0, cfg.vocab_size, (1, decode_prompt), generator=gen).to(env.device)
    prefill, decode = [], []
    for key, (_, model) in built.items():
        model = env.maybe_compile(model.to(env.device))
        prefill.append(prefill_case(key, model, prefill_prompt, env))
        decode.append(decode_case(key, model, decode_prompt_ids, steps, env))
    pre = common.summarize(common.measure(prefill, env, "prefill"), "baseline")
    dec = common.summarize(common.measure(decode, env, "decode"), "baseline", scale=1 / steps)

    rows, results = [], []
    for key, (label, model) in built.items():
        rows.append([label, f"{common.n_params(model):,}", common.fmt_time(pre[key]), common.fmt_ratio(pre[key]),
                     common.fmt_time(dec[key]), common.fmt_ratio(dec[key]), common.fmt_mib(pre[key]),
                     common.fmt_mib(dec[key])])
        results.append({"case": key, "label": label, "params": common.n_params(model), "prefill": pre[key],
                        "decode_per_token": dec[key], "prompt_len": prompt_len, "decode_prompt_len": decode_prompt,
                        "decode_steps": steps})
    print(common.markdown_table(["case", "params", "prefill ms", "prefill ratio", "decode ms/token", "decode ratio",
                                 "prefill peak MiB", f"decode peak MiB ({steps} tokens)"], rows))
    common.finish(args, info, results)


if __name__ == "__main__":
    main()
