"""Mixed precision and batched experts: every model under CPU bf16 autocast (the same dtype paths as CUDA bf16),
MoE routing in fp32, the batched expert forms against the per-expert loop, the ``auto`` precision rule, and
bf16 training runs that stay deterministic across a resume."""

import json
import shutil

import pytest
import torch

from kha import AttentionConfig
from kha.config import ModelConfig, MoEConfig, get_preset
from kha.model import DecoderLM, MoE, run_experts_grouped, run_experts_loop, run_experts_padded
from kha.train import TrainConfig, train
from kha.train import precision as prec
from kha.train.callbacks import read_metrics

# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4 %); a loss over a short model drifts by about that
BF16_LOSS = dict(rtol=2e-2, atol=2e-2)
FP32 = dict(rtol=1e-5, atol=1e-5)

VARIANTS = {"gqa": {}, "gta": {}, "mla": dict(kv_lora_rank=16, rope_head_dim=4),
            "gla": dict(kv_lora_rank=16, rope_head_dim=4), "talking": {}}
KNOCKS = {"gqa": ["none", "linear", "mlp", "gate"], "gta": ["none", "linear", "mlp", "gate"],
          "mla": ["none", "linear"], "gla": ["none", "linear"], "talking": ["none", "linear", "mlp"]}


def lm_config(variant: str, knock: str, moe: bool) -> ModelConfig:
    attn = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=4 if variant in ("mla", "gla") else 2, head_dim=8,
                           variant=variant, knock=knock, knock_targets="qkv" if knock == "linear" else None,
                           **VARIANTS[variant])
    return ModelConfig(attention=attn, n_layers=2, d_ff=64, vocab_size=97,
                       moe=MoEConfig(n_experts=4, top_k=2, d_expert=16) if moe else None)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize(("variant", "knock"), [(v, k) for v in VARIANTS for k in KNOCKS[v]])
def test_every_model_trains_under_cpu_bf16_autocast(variant, knock, moe):
    """Forward and backward under bf16 autocast: the loss is within bf16 rounding of fp32's, every gradient
    is finite, fp32 (master weights) and close to fp32's gradient in direction."""
    torch.manual_seed(0)
    model = DecoderLM(lm_config(variant, knock, moe))
    with torch.no_grad():  # move the knocks off the identity so that their bf16 path does something
        for name, p in model.named_parameters():
            if ".knocks." in name:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 97, (2, 12))
    loss32 = model(ids, targets=ids).loss
    grads32 = torch.autograd.grad(loss32, list(model.parameters()), allow_unused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, targets=ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, loss32, **BF16_LOSS)
    grads16 = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    for (name, _), g32, g16 in zip(model.named_parameters(), grads32, grads16, strict=True):
        if g32 is None or g32.norm() < 1e-6:
            continue
        assert g16.dtype == torch.float32 and torch.isfinite(g16).all(), name
        cosine = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
        assert cosine > 0.95, f"{name}: cosine {cosine:.3f} between bf16 and fp32 gradients"


def test_moe_routing_stays_fp32_under_autocast():
    """Autocast would run the router's matmul in bf16, which changes which experts near-ties pick; it must not."""
    torch.manual_seed(0)
    moe = MoE(64, MoEConfig(n_experts=16, top_k=4, d_expert=32))
    for p in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(p, std=0.1)
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(512, 64)
    chosen32, gates32 = moe.router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chosen16, gates16 = moe.router(x)
        out16 = moe(x)
    assert gates16.dtype == torch.float32 and out16.dtype == torch.float32
    assert torch.equal(chosen16, chosen32)
    torch.testing.assert_close(gates16, gates32, rtol=0, atol=0)


def _expert_problem(dtype=torch.float32):
    torch.manual_seed(1)
    counts = [5, 0, 17, 1, 9, 0, 32, 4]  # uneven, with empty experts
    x = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
    weights = [(0.3 * torch.randn(8, *shape, dtype=dtype)).requires_grad_() for shape in ((16, 32), (16, 32), (32, 16))]
    return counts, x, weights


@pytest.mark.parametrize("form", [run_experts_padded, run_experts_grouped], ids=["padded", "grouped"])
def test_batched_experts_match_the_per_expert_loop(form):
    if form is run_experts_grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    counts, x, weights = _expert_problem()
    upstream = torch.randn(sum(counts), 16)
    ref = run_experts_loop(x, counts, *weights)
    ref_grads = torch.autograd.grad(ref, [x, *weights], upstream)
    out = form(x, counts, *weights)
    grads = torch.autograd.grad(out, [x, *weights], upstream)
    torch.testing.assert_close(out, ref, **FP32)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **FP32)


def test_grouped_mm_probe_runs_with_gradients_under_no_grad(monkeypatch):
    """The first MoE forward may be evaluation or decoding: the probe must not fail there and switch the grouped
    form off for the process."""
    import kha.model as model

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    monkeypatch.setattr(model, "_GROUPED_MM_WORKS", {})
    with torch.no_grad():
        assert model.grouped_mm_works(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(model, "_GROUPED_MM_WORKS", {})
    with torch.inference_mode():
        assert model.grouped_mm_works(torch.device("cpu"), torch.float32)


def test_top1_router_gets_a_gradient():
    """With top_k=1 the gate is the chosen expert's score (normalising over one expert would make it 1)."""
    torch.manual_seed(0)
    moe = MoE(32, MoEConfig(n_experts=4, top_k=1, d_expert=16))
    for p in (moe.w_gate, moe.w_up, moe.w_down, moe.router.weight):
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(40, 32)
    chosen, gates = moe.router(x)
    scores = torch.sigmoid(x @ moe.router.weight.t())
    torch.testing.assert_close(gates, scores.gather(-1, chosen), rtol=0, atol=1e-6)
    moe(x).pow(2).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_auto_precision_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert prec.resolve_precision("fp32", cpu, 4096)[0] == "fp32"
    assert prec.resolve_precision("bf16", cpu, 64)[0] == "bf16"
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    assert prec.resolve_precision("auto", cpu, 4096)[0] == "fp32"
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    assert prec.resolve_precision("auto", cpu, prec.AUTO_BF16_MIN_D_MODEL - 1)[0] == "fp32"
    assert prec.resolve_precision("auto", cpu, prec.AUTO_BF16_MIN_D_MODEL)[0] == "bf16"
    # where kha's AMX attention kernel covers the model, bf16 measured faster at every width
    assert prec.resolve_precision("auto", cpu, 128, amx_attention=True) == (
        "bf16", "auto: CPU with native bf16 and kha's attention kernel for this model")
    assert prec.resolve_precision("fp32", cpu, 4096, amx_attention=True)[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert prec.resolve_precision("auto", cuda, 64)[0] == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid are auto, fp32, bf16"):
        prec.resolve_precision("fp16", cpu, 64)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        TrainConfig(precision="half")


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    for flags, expected in (("fpu sse avx512f amx_bf16 amx_tile", True), ("fpu sse avx2 avx512f", False)):
        fake = tmp_path / "cpuinfo"
        fake.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(prec, "Path", lambda _, fake=fake: fake)
        prec.cpu_has_native_bf16.cache_clear()
        assert prec.cpu_has_native_bf16() is expected
    prec.cpu_has_native_bf16.cache_clear()


def _bf16_run(data_dir, out, **overrides) -> TrainConfig:
    values = dict(out=str(out), preset="tiny-moe", knock="mlp", data=str(data_dir), seq_len=32, batch_size=4,
                  steps=6, eval_every=3, eval_batches=2, ckpt_every=3, progress=False, precision="bf16")
    return TrainConfig(**{**values, **overrides})


@pytest.mark.parametrize("seq_len", [32, 64], ids=["torch-attention", "amx-attention-where-available"])
def test_bf16_training_is_deterministic_across_resume(data_dir, tmp_path, capsys, seq_len):
    """Same seed, device and precision: a run resumed from its step-3 checkpoint equals the straight run
    bit for bit, and two straight runs are identical; on a CPU with AMX on kha's fused kernels, and at length
    64 with attention on kha's kernels too (which the run prints and records)."""
    from kha import cpu_kernels

    amx = cpu_kernels.covers(get_preset("tiny-moe").attention, 4, seq_len)
    assert not amx or seq_len == 64  # 32 is not a multiple of the kernel's 64-token blocks
    train(_bf16_run(data_dir, tmp_path / "a", seq_len=seq_len))
    out = capsys.readouterr().out
    fused = cpu_kernels.prepare()  # the fused kernels run wherever the extension does, at any length
    isa = {"amx": "AMX", "avx512_bf16": "AVX512-BF16"}.get(cpu_kernels.micro_kernel())
    assert "precision: bf16 (asked for)" in out and (f"kha's {isa} attention" in out) == amx
    assert ("CPU kernels: " in out) == fused
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert saved["precision"] == "bf16" and saved["resolved_precision"] == "bf16"
    assert saved["amx_attention"] == amx and saved["cpu_kernels"] == fused
    assert saved["cpu_micro_kernel"] == (cpu_kernels.micro_kernel() if fused else None)
    train(_bf16_run(data_dir, tmp_path / "b", seq_len=seq_len))
    # b loses everything after step 3, as if killed there, and is resumed
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000006")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_0000003")
    (tmp_path / "b" / "model.safetensors").unlink()
    train(_bf16_run(data_dir, tmp_path / "b", resume=True, seq_len=seq_len))
    straight, resumed = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in straight], key


def test_resume_onto_the_other_attention_kernel_says_so(data_dir, tmp_path, monkeypatch, capsys):
    """A bf16 run begun on kha's CPU kernels and resumed where they are off (KHA_CPU_KERNELS=0)
    continues, with a warning that it is no longer bit for bit the uninterrupted run."""
    from kha import cpu_kernels

    if not cpu_kernels.covers(get_preset("tiny-moe").attention, 4, 64):
        pytest.skip("kha's attention kernels do not run here")
    train(_bf16_run(data_dir, tmp_path / "r", seq_len=64, steps=3))
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    monkeypatch.setattr(cpu_kernels, "_state", None)
    capsys.readouterr()
    train(_bf16_run(data_dir, tmp_path / "r", seq_len=64, steps=6, resume=True))
    out = capsys.readouterr().out
    isa = {"amx": "AMX", "avx512_bf16": "AVX512-BF16"}[cpu_kernels._micro_kernel]
    assert f"trained on kha's {isa} attention and kha's elementwise kernels and resumes on torch's ops" in out
    saved = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert saved["amx_attention"] is False and saved["cpu_kernels"] is False and saved["cpu_micro_kernel"] is None


def test_a_run_recorded_before_the_avx512_path_resumes_as_an_amx_run(data_dir, tmp_path, capsys):
    """Runs recorded before ``cpu_micro_kernel`` existed trained on the AMX tiles (the only path then): resumed
    on AMX they continue silently, on AVX512-BF16 with the warning that the rounding changed."""
    from kha import cpu_kernels

    if not cpu_kernels.covers(get_preset("tiny-moe").attention, 4, 64):
        pytest.skip("kha's attention kernels do not run here")
    train(_bf16_run(data_dir, tmp_path / "r", seq_len=64, steps=3))
    path = tmp_path / "r" / "train_config.json"
    recorded = json.loads(path.read_text())
    del recorded["cpu_micro_kernel"]
    path.write_text(json.dumps(recorded))
    capsys.readouterr()
    train(_bf16_run(data_dir, tmp_path / "r", seq_len=64, steps=4, resume=True))
    out = capsys.readouterr().out
    moved = ("trained on kha's AMX attention and kha's elementwise kernels and resumes on kha's AVX512-BF16 "
             "attention and kha's elementwise kernels")
    assert (moved in out) == (cpu_kernels.micro_kernel() == "avx512_bf16")
    assert json.loads(path.read_text())["cpu_micro_kernel"] == cpu_kernels.micro_kernel()


def test_kernels_label_names_the_micro_kernel():
    from kha.cpu_kernels import kernels_label

    assert kernels_label({"amx_attention": False, "cpu_kernels": False}) == "torch's ops"
    old = {"amx_attention": True, "cpu_kernels": True}  # recorded before cpu_micro_kernel: AMX
    assert kernels_label(old) == "kha's AMX attention and kha's elementwise kernels"
    assert kernels_label({**old, "cpu_micro_kernel": "avx512_bf16"}) == (
        "kha's AVX512-BF16 attention and kha's elementwise kernels")
    assert kernels_label({"amx_attention": False, "cpu_kernels": True, "cpu_micro_kernel": "avx512_bf16"}) == (
        "torch's SDPA and kha's elementwise kernels on AVX512-BF16")


def test_recorded_micro_kernel_of_old_and_odd_records():
    """What a resume compares against: None without kernels, the recorded micro-kernel, and AMX for records made
    before the key existed or holding something else (a hand-edited or foreign file: no crash, no new label)."""
    from kha.cpu_kernels import recorded_micro_kernel

    assert recorded_micro_kernel({"amx_attention": False, "cpu_kernels": False, "cpu_micro_kernel": "amx"}) is None
    assert recorded_micro_kernel({"cpu_kernels": True, "cpu_micro_kernel": "avx512_bf16"}) == "avx512_bf16"
    for odd in ({}, {"cpu_micro_kernel": None}, {"cpu_micro_kernel": "AMX"}, {"cpu_micro_kernel": [1]}):
        assert recorded_micro_kernel({"amx_attention": True, **odd}) == "amx"


def test_resumed_auto_run_keeps_its_precision(data_dir, tmp_path, monkeypatch, capsys):
    """An ``auto`` run resumed elsewhere (here: a rule that would now pick fp32) continues in its precision."""
    import kha.train.loop as loop

    monkeypatch.setattr(loop, "plan_precision", lambda asked, model_cfg, batch, seq, device: (
        (asked, "asked for", False) if asked != "auto" else ("fp32", "auto", False)))
    train(_bf16_run(data_dir, tmp_path / "r", precision="bf16", steps=3))
    train(_bf16_run(data_dir, tmp_path / "r", precision="auto", steps=6, resume=True))
    assert capsys.readouterr().out.count("precision: bf16") == 2


@pytest.mark.slow
def test_deterministic_runs_train_under_torchs_deterministic_mode_and_repeat(data_dir, tmp_path, monkeypatch):
    """``deterministic=True`` trains under ``torch.use_deterministic_algorithms`` (warn-only) and restores the
    process's setting afterwards; two compiled CPU runs of one config and seed then give the same losses bit for
    bit. (Without it, two compiled bf16 runs of the study preset on data/study2, 16 x 256, differed from step 4,
    by 4e-5 there, docs/results.md; at this test's size they happen to agree, so the mode is checked directly.)"""
    import kha.train.loop as loop

    modes, original = [], loop._train

    def spy(*args):
        modes.append((torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled()))
        return original(*args)

    monkeypatch.setattr(loop, "_train", spy)
    settings = dict(preset="tiny", knock="mlp", steps=6, compile=True, deterministic=True, seq_len=64, batch_size=8)
    for name in ("a", "b"):
        train(_bf16_run(data_dir, tmp_path / name, **settings))
        assert not torch.are_deterministic_algorithms_enabled()
    train(_bf16_run(data_dir, tmp_path / "c", preset="tiny", steps=1, eval_every=1, ckpt_every=1))
    assert modes == [(True, True), (True, True), (False, False)]
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("a", "b"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["val_loss"] for r in a if "val_loss" in r] == [r["val_loss"] for r in b if "val_loss" in r]


@pytest.mark.slow
def test_compiled_training_matches_eager(data_dir, tmp_path):
    """``--compile`` (the whole model and its loss in one process) trains the same model: losses within 1e-4
    relative of eager (fused kernels reorder float sums), and a compiled resume is bit-identical."""
    settings = dict(preset="tiny", knock="mlp", precision="fp32", steps=4, ckpt_every=2, eval_every=2)
    train(_bf16_run(data_dir, tmp_path / "eager", **settings))
    train(_bf16_run(data_dir, tmp_path / "compiled", compile=True, **settings))
    eager, compiled = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("eager", "compiled"))
    for key in ("loss", "val_loss"):
        a = [r[key] for r in eager if key in r]
        assert [r[key] for r in compiled if key in r] == pytest.approx(a, rel=1e-4), key
    shutil.rmtree(tmp_path / "compiled" / "checkpoints" / "step_0000004")
    (tmp_path / "compiled" / "checkpoints" / "latest").write_text("step_0000002")
    train(_bf16_run(data_dir, tmp_path / "compiled", compile=True, resume=True, **settings))
    resumed = read_metrics(tmp_path / "compiled" / "metrics.jsonl")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in compiled]


def test_expert_dispatch_takes_grouped_mm_on_gpus_only_where_it_works_and_traces(monkeypatch):
    """``run_experts``' choice, the GPU's included (its logic on CPU): ``torch._grouped_mm`` off CPUs where it works
    (an old torch or GPU: no), with 16-byte rows, and in bf16 only while compiling (torch's shape function refuses
    other dtypes); on CPU the padded form (measured faster there). Either way the result is the loop's."""
    import kha.model as model

    cuda, bf16, fp32 = torch.device("cuda"), torch.bfloat16, torch.float32
    monkeypatch.setitem(model._GROUPED_MM_WORKS, ("cuda", bf16), True)
    monkeypatch.setitem(model._GROUPED_MM_WORKS, ("cuda", fp32), True)
    assert model.takes_grouped_mm(cuda, bf16, 128, 96) and model.takes_grouped_mm(cuda, fp32, 128, 96)
    assert not model.takes_grouped_mm(cuda, bf16, 128, 100)  # 200-byte rows of the expert's hidden layer
    assert not model.takes_grouped_mm(torch.device("cpu"), bf16, 128, 96)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert model.takes_grouped_mm(cuda, bf16, 128, 96) and not model.takes_grouped_mm(cuda, fp32, 128, 96)
    monkeypatch.setitem(model._GROUPED_MM_WORKS, ("cuda", bf16), False)
    assert not model.takes_grouped_mm(cuda, bf16, 128, 96)
    monkeypatch.undo()

    calls = []
    monkeypatch.setattr(model, "run_experts_padded", lambda *a: calls.append("padded") or run_experts_padded(*a))
    monkeypatch.setattr(model, "takes_grouped_mm", lambda *a: len(calls) == 1)  # the second call: grouped
    monkeypatch.setattr(model, "run_experts_grouped", lambda *a: calls.append("grouped") or run_experts_grouped(*a))
    counts, x, weights = _expert_problem()
    expected = run_experts_loop(x, counts, *weights)
    torch.testing.assert_close(model.run_experts(x, counts, *weights), expected, **FP32)
    torch.testing.assert_close(model.run_experts(x, counts, *weights), expected, **FP32)
    assert calls == ["padded", "grouped"]
