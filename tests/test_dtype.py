"""The compute dtype `--dtype auto` picks, and the float32 accuracy of the gram's XᵀX sums when the
activations are bfloat16."""

import pytest
import torch

from calibration import Gram
from utils import CPU_BF16_ENV, UserError, auto_dtype, choose_dtype, cpu_bf16_support, cpu_flags, describe_dtype


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_bf16_support({"avx512f", "avx512_bf16"})[0]
    assert cpu_bf16_support({"amx_tile", "amx_bf16"})[0]
    native, why = cpu_bf16_support({"avx512f", "avx512_vnni", "avx2"})  # AVX-512 alone emulates bfloat16
    assert not native and "no avx512_bf16" in why


def test_auto_dtype_follows_the_hardware():
    cpu = torch.device("cpu")
    assert auto_dtype(cpu, (True, "cpu flags avx512_bf16")) == (torch.bfloat16, "cpu flags avx512_bf16")
    assert auto_dtype(cpu, (False, "none"))[0] == torch.float32
    assert auto_dtype(torch.device("cuda"), (False, "none"))[0] == torch.bfloat16
    # an explicit dtype wins, and so does a given default (the experts' dtype for merge outputs)
    assert choose_dtype("float32", torch.device("cuda")) == torch.float32
    assert choose_dtype("auto", cpu, default=torch.float16) == torch.float16


def test_this_machine_is_judged_by_its_own_evidence(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)  # `make test` sets it for its second pass
    native, why = cpu_bf16_support()
    probe = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    flags = cpu_flags() & {"avx512_bf16", "amx_bf16"}
    assert native == bool(probe or flags)
    expected = torch.bfloat16 if native else torch.float32
    assert choose_dtype("auto", torch.device("cpu")) == expected
    assert describe_dtype("auto", expected, "cpu") == f"{str(expected)[6:]} (auto: {why})"


def test_environment_makes_auto_answer_either_way(monkeypatch):
    """REGMEAN_CPU_BF16=1|0 makes `auto` answer as a cpu with or without native bfloat16 would, whatever
    this one has, and says so in the log line; cuda and explicit dtypes are left alone; other values
    are refused in one line."""
    cpu = torch.device("cpu")
    _, evidence = cpu_bf16_support()
    for value, expected in [("1", torch.bfloat16), ("0", torch.float32)]:
        monkeypatch.setenv(CPU_BF16_ENV, value)
        why = f"{CPU_BF16_ENV}={value} in the environment; this cpu: {evidence}"
        assert auto_dtype(cpu) == (expected, why)
        assert choose_dtype("auto", cpu) == expected
        assert describe_dtype("auto", expected, "cpu") == f"{str(expected)[6:]} (auto: {why})"
        assert choose_dtype("float32", cpu) == torch.float32 and choose_dtype("bfloat16", cpu) == torch.bfloat16
        assert auto_dtype(torch.device("cuda"))[0] == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "")  # set but empty: as if unset
    assert auto_dtype(cpu)[1] == evidence
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(UserError, match=f"^{CPU_BF16_ENV} must be 1 or 0 \\(or unset\\), got 'yes'$"):
        choose_dtype("auto", cpu)
    assert choose_dtype("float32", cpu) == torch.float32  # read only when `auto` asks


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
