"""The compute dtype `--dtype auto` picks, and the float32 accuracy of the gram's XᵀX sums when the
activations are bfloat16."""

import math

import pytest
import torch

from regmean.calibration import Gram
from regmean.utils import (
    CPU_BF16_ENV,
    CPU_BF16_MIN_SPEEDUP,
    CPU_PROBE_WIDTH,
    UserError,
    agree_on_dtype,
    auto_dtype,
    choose_dtype,
    cpu_bf16_measured,
    cpu_bf16_support,
    cpu_flags,
    cpu_matmul_gflops,
    describe_dtype,
)


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_bf16_support({"avx512f", "avx512_bf16"})[0]
    assert cpu_bf16_support({"amx_tile", "amx_bf16"})[0]
    native, why = cpu_bf16_support({"avx512f", "avx512_vnni", "avx2"})  # AVX-512 alone emulates bfloat16
    assert not native and "no avx512_bf16" in why


class FakeTiming:
    """A measure(width) -> (float32, bfloat16) GFLOP/s that records the widths it was asked for."""

    def __init__(self, f32, bf16):
        self.figures, self.widths = (f32, bf16), []

    def __call__(self, width):
        self.widths.append(width)
        return self.figures


def no_timing(width):
    raise AssertionError(f"timed at width {width}, where nothing should be timed")


NATIVE = {"avx512f", "avx512_bf16"}
CPU = torch.device("cpu")


def test_auto_takes_bfloat16_where_it_measured_faster(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)  # `make test` sets it for its dtype passes
    faster = FakeTiming(100.0, 230.0)
    dtype, why = auto_dtype(CPU, 576, flags=NATIVE, measure=faster)
    assert dtype == torch.bfloat16 and faster.widths == [576]
    assert why == (
        "cpu flags avx512_bf16, and bfloat16 measured 230 against float32's 100 GFLOP/s at width 576 "
        f"(2.30x; bfloat16 needs {CPU_BF16_MIN_SPEEDUP}x)"
    )
    auto_dtype(CPU, None, flags=NATIVE, measure=faster)  # a caller that does not know the model's width
    assert faster.widths == [576, CPU_PROBE_WIDTH]


def test_auto_keeps_float32_where_bfloat16_measured_slower(monkeypatch):
    """The issue's Xeon: avx512_bf16 and AMX, yet bfloat16 at half float32's speed; and a tie is float32's."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    dtype, why = auto_dtype(CPU, 576, flags=NATIVE, measure=FakeTiming(190.0, 94.0))
    assert dtype == torch.float32
    assert why == (
        "cpu flags avx512_bf16, but bfloat16 measured 94 against float32's 190 GFLOP/s at width 576 "
        f"(0.49x; bfloat16 needs {CPU_BF16_MIN_SPEEDUP}x)"
    )
    below = FakeTiming(100.0, 100.0 * CPU_BF16_MIN_SPEEDUP * 0.99)
    at = FakeTiming(100.0, 100.0 * CPU_BF16_MIN_SPEEDUP)
    assert auto_dtype(CPU, 576, flags=NATIVE, measure=below)[0] == torch.float32
    assert auto_dtype(CPU, 576, flags=NATIVE, measure=at)[0] == torch.bfloat16


def test_no_native_bfloat16_means_float32_without_timing(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    dtype, why = auto_dtype(CPU, 576, flags={"avx512f", "avx2"}, measure=no_timing)
    assert dtype == torch.float32 and why.startswith("no avx512_bf16 or amx_bf16")
    # cuda is bfloat16 without asking the cpu; an explicit dtype wins, and so does a given default
    assert auto_dtype(torch.device("cuda"), 576, flags=NATIVE, measure=no_timing) == (torch.bfloat16, "cuda")
    assert choose_dtype("float32", torch.device("cuda")) == torch.float32
    assert choose_dtype("auto", CPU, default=torch.float16) == torch.float16


def test_environment_overrides_the_measurement_without_timing(monkeypatch):
    for value, expected, timing in [("1", torch.bfloat16, (190.0, 94.0)), ("0", torch.float32, (100.0, 230.0))]:
        monkeypatch.setenv(CPU_BF16_ENV, value)
        for flags in (NATIVE, {"avx2"}):  # either kind of cpu
            dtype, why = auto_dtype(CPU, 576, flags=flags, measure=no_timing)
            assert dtype == expected and why.startswith(f"{CPU_BF16_ENV}={value} in the environment; this cpu: ")
        assert auto_dtype(CPU, 576, flags=NATIVE, measure=FakeTiming(*timing))[0] == expected


def test_this_machine_is_judged_by_its_own_evidence(monkeypatch):
    """Unfaked: the flag, then (only with it) the measured figures decide; both calls agree, the figures
    measured once per process. Which dtype is faster here is not asserted: that is the machine's to say."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    native, evidence = cpu_bf16_support()
    probe = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native == bool(probe or cpu_flags() & {"avx512_bf16", "amx_bf16"})
    dtype, why = auto_dtype(CPU, 64)
    assert why.startswith(evidence)
    if native:
        f32, bf16 = cpu_bf16_measured(64, torch.get_num_threads())
        assert dtype == (torch.bfloat16 if bf16 >= CPU_BF16_MIN_SPEEDUP * f32 else torch.float32)
        assert f"measured {bf16:.0f} against float32's {f32:.0f} GFLOP/s at width 64" in why
    else:
        assert dtype == torch.float32 and why == evidence
    assert choose_dtype("auto", CPU, width=64) == dtype
    assert describe_dtype("auto", dtype, "cpu", 64) == f"{str(dtype)[6:]} (auto: {why})"


def test_a_real_measurement_gives_finite_positive_figures():
    for width in (64, 576):
        figures = cpu_matmul_gflops(width, repeats=2)
        assert len(figures) == 2 and all(math.isfinite(f) and f > 0 for f in figures), figures
    threads = torch.get_num_threads()
    assert cpu_bf16_measured(96, threads) is cpu_bf16_measured(96, threads)  # once per process


def agree_worker(rank, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mine = [torch.bfloat16, torch.float32][rank]  # rank 1 measured bfloat16 slower
        results.put((rank, str(agree_on_dtype(mine)), str(agree_on_dtype(torch.bfloat16))))
    finally:
        dist.destroy_process_group()


def test_processes_that_timed_apart_all_take_float32():
    """Each rank of compute_gram.py times its own products; one that found float32 faster makes every rank
    run float32, so that the grams they sum come from passes in one dtype."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(agree_worker, args=(port, results), nprocs=2)
    assert sorted(results.get() for _ in range(2)) == [
        (0, "torch.float32", "torch.bfloat16"),
        (1, "torch.float32", "torch.bfloat16"),
    ]


def test_environment_makes_auto_answer_either_way(monkeypatch):
    """REGMEAN_CPU_BF16=1|0 makes `auto` answer as a cpu with or without native bfloat16 would, whatever
    this one has, and says so in the log line; cuda and explicit dtypes are left alone; other values
    are refused in one line."""
    _, evidence = cpu_bf16_support()
    for value, expected in [("1", torch.bfloat16), ("0", torch.float32)]:
        monkeypatch.setenv(CPU_BF16_ENV, value)
        why = f"{CPU_BF16_ENV}={value} in the environment; this cpu: {evidence}"
        assert auto_dtype(CPU) == (expected, why)
        assert choose_dtype("auto", CPU) == expected
        assert describe_dtype("auto", expected, "cpu") == f"{str(expected)[6:]} (auto: {why})"
        assert choose_dtype("float32", CPU) == torch.float32 and choose_dtype("bfloat16", CPU) == torch.bfloat16
        assert auto_dtype(torch.device("cuda"))[0] == torch.bfloat16
    # several processes took float32 because another one measured it (agree_on_dtype): the log says so
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert describe_dtype("auto", torch.float32, "cpu").endswith("; float32 as another process chose)")
    assert agree_on_dtype(torch.bfloat16) == torch.bfloat16  # alone, nothing to agree with
    monkeypatch.setenv(CPU_BF16_ENV, "")  # set but empty: as if unset
    assert auto_dtype(CPU)[1].startswith(evidence)
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(UserError, match=f"^{CPU_BF16_ENV} must be 1 or 0 \\(or unset\\), got 'yes'$"):
        choose_dtype("auto", CPU)
    assert choose_dtype("float32", CPU) == torch.float32  # read only when `auto` asks


def test_gram_sums_bfloat16_activations_in_float32():
    """Σ XᵀX over bfloat16 batches with a few large channels, against float64 on the same values:
    float32 accumulation holds 1e-6; a product rounded to bfloat16 per batch is ~1e-3 off."""
    g = torch.Generator().manual_seed(0)
    dim = 640
    scale = torch.exp(torch.randn(dim, generator=g))
    scale[:3] *= 30
    batches = [(torch.randn(300, dim, generator=g) * scale).bfloat16() for _ in range(6)]
    gram = Gram(dim, "cpu", blocks=3)
    for x in batches:
        gram.add(x)
    ref = sum(x.double().T @ x.double() for x in batches) / (300 * 6)
    err = ((gram.result().double() - ref).norm() / ref.norm()).item()
    assert err < 2e-6
    rounded = sum((x.T @ x).float() for x in batches) / (300 * 6)  # what the float32 sum avoids
    assert ((rounded.double() - ref).norm() / ref.norm()).item() > 1e-4
