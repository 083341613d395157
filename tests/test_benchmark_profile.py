"""The step profile of ``benchmarks/common.py`` (``gpu_mfu.py --profile-steps``): interval union, kernel families,
and the operator count of a profiled CPU case."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "bench_common", Path(__file__).resolve().parent.parent / "benchmarks" / "common.py")
common = sys.modules["bench_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


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
