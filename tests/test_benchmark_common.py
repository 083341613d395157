"""``benchmarks/common.py``: the median ratio's confidence interval, and the step profile (``gpu_mfu.py
--profile-steps``): interval union, kernel families, and the operator count of a profiled CPU case; and
``moe_compile.py``'s timing of a run in slices."""

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "bench_common", Path(__file__).resolve().parent.parent / "benchmarks" / "common.py")
common = sys.modules["bench_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


@pytest.mark.parametrize("n, lower, upper", [(6, 1, 6), (12, 3, 10), (20, 6, 15), (40, 14, 27)])
def test_median_interval_takes_the_tabulated_order_statistics(n, lower, upper):
    # ranks of the 95 % sign-test (distribution-free) interval of a median, as printed in the usual tables
    values = [10.0 * r for r in range(1, n + 1)]
    random.Random(n).shuffle(values)
    assert common.median_interval(values) == (10.0 * lower, 10.0 * upper)


def test_median_interval_needs_six_values_and_covers_the_median():
    assert common.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(4000, 40, generator=gen).exp()  # skewed: median 1, mean e^0.5
    covered = sum(lo <= 1.0 <= hi for lo, hi in map(common.median_interval, samples.tolist()))
    assert covered / 4000 == pytest.approx(0.9616, abs=0.015)  # exact coverage at n = 40; binomial sd 0.003


def test_summarize_reports_the_paired_ratio_and_its_interval():
    base = [1.0, 1.1, 0.9, 1.0, 1.2, 1.0, 0.95, 1.05]
    case = [b * r for b, r in zip(base, [1.01, 1.03, 1.02, 1.00, 1.05, 1.02, 1.04, 1.01], strict=True)]
    stats = common.summarize({"base": common.Timing(base), "case": common.Timing(case)}, "base")["case"]
    assert stats["ratio"] == pytest.approx(1.02)  # the median of the 8 round ratios
    assert stats["ratio_ci95"] == pytest.approx((1.0, 1.05))  # n = 8: the 1st and 8th of them
    assert common.fmt_ratio_ci(stats) == "[1.000, 1.050]"


def test_ratio_ci_script_recomputes_the_ratios_from_a_json(tmp_path):
    base = [1.0, 1.1, 0.9, 1.0, 1.2, 1.0, 0.95, 1.05]
    ratios = [1.01, 1.03, 1.02, 1.00, 1.05, 1.02, 1.045, 1.01]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"results": [{"case": "baseline", "times_s": base},
                                            {"case": "knock", "times_s": [b * r for b, r in zip(base, ratios,
                                                                                                 strict=True)]}]}))
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ratio_ci.py"
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, check=True).stdout
    assert "| knock | 8 | 1.020 [1.010, 1.034] | [1.000, 1.050] |" in out  # inclusive quartiles; n = 8: min, max
    bad = subprocess.run([sys.executable, str(script), str(path), "--baseline", "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no case 'nope'" in bad.stderr and "['baseline', 'knock']" in bad.stderr


def test_covered_time_matches_counting_unit_cells():
    rng = random.Random(0)
    for _ in range(200):
        intervals = [(s, s + rng.randint(0, 6)) for s in (rng.randint(0, 40) for _ in range(rng.randint(0, 8)))]
        cells = {t for start, end in intervals for t in range(start, end)}  # [t, t + 1) covered by some interval
        assert common.covered_time(intervals) == len(cells)


@pytest.mark.parametrize("name, family", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t>>, false, true>(...)", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("triton_poi_fused__to_copy_add_mul_0", "generated"),
    ("triton_red_fused__to_copy_mean_pow_1", "generated"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ("aten::addmm", "gemm"), ("aten::mm", "gemm"), ("aten::mul", "other"),
    ("aten::scaled_dot_product_attention", "attention"),
])
def test_kernel_family(name, family):
    assert common.kernel_family(name) == family


def test_device_kernels_leave_out_annotations_and_host_events():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, device, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation)

    copy = "Memcpy HtoD (Pageable -> Device)"
    events = [event("## Call CompiledFxGraph fabc ##", DeviceType.CUDA, annotation=True),
              event("triton_poi_fused_add_0", DeviceType.CUDA), event(copy, DeviceType.CUDA),
              event("aten::mm", DeviceType.CPU), event("Optimizer.step#AdamW.step", DeviceType.CUDA, annotation=True)]
    assert [e.name for e in common.device_kernels(events)] == ["triton_poi_fused_add_0", copy]


def test_profile_case_counts_the_operators_of_a_cpu_step():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    calls = 3

    def run():
        for _ in range(calls):
            torch.add(torch.mm(a, b), a)

    env = common.Env(torch.device("cpu"), "fp32", compile=False, repeats=1, warmup=0, quick=True)
    run()
    prof = common.profile_case(common.Case("mm-add", run), env, steps=2)
    assert prof["kernels"] == 2 * calls  # aten::mm and aten::add per call; what runs inside them is not counted
    assert prof["family_ms"]["gemm"] > 0 and prof["family_ms"]["attention"] == 0
    assert prof["busy_ms"] == pytest.approx(sum(prof["family_ms"].values()))  # the operators run one after another
    assert prof["busy_ms"] <= prof["wall_ms"]
    assert prof["idle_ms"] == pytest.approx(prof["wall_ms"] - prof["busy_ms"])
    timed = common.profile_case(common.Case("mm-add", run), env, steps=2, timed_ms=prof["busy_ms"] + 1e3)
    assert timed["idle_ms"] == pytest.approx(prof["busy_ms"] + 1e3 - timed["busy_ms"])  # against the timed step
    table = common.profile_table({"baseline": prof, "twice": {**prof, "kernels": 2 * prof["kernels"]}},
                                 {"twice": "twice"}, "baseline")
    assert f"| twice | {prof['wall_ms']:.2f} (+0.00) | {2 * prof['kernels']:.0f} (+{prof['kernels']:.0f}) |" in table


def test_moe_compile_times_each_slice_after_its_warm_up(tmp_path):
    """``moe_compile.py --slices``: each process's first ``--skip`` steps (compilation) are left out, the median is
    taken over the rest, and per slice, so the two runs' slices can be paired."""
    spec = importlib.util.spec_from_file_location(
        "bench_moe_compile", Path(__file__).resolve().parent.parent / "benchmarks" / "moe_compile.py")
    moe_compile = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(spec.origin).parent))
    try:
        spec.loader.exec_module(moe_compile)
    finally:
        sys.path.pop(0)
    args = type("Args", (), {"batch_size": 2, "seq_len": 5, "skip": 1, "steps": 8})()
    seconds = {1: 9.0, 2: 1.0, 3: 2.0, 4: 3.0, 5: 7.0, 6: 4.0, 7: 6.0, 8: 5.0}  # steps 1 and 5 compile
    lines = [json.dumps({"step": s, "loss": 1.0, "tokens_per_s": 10 / t}) for s, t in seconds.items()]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = moe_compile.summary(args, tmp_path, True, ["Recompiling function f", ""], 12.0, [0, 4])
    assert result["steps_timed"] == 6 and result["median_step_s"] == 3.5
    assert result["slice_median_step_s"] == [2.0, 5.0] and result["first_step_s"] == 9.0
    assert result["recompiles"] == 1
