"""The CUDA paths, where a GPU is: grams (float32 and bfloat16 forward passes, --device-map auto), the RegMean
solve and RegMean++ on the GPU, each against the float64 references the CPU tests use. Run with
`make test-cuda` (= pytest -m cuda); the default `make test` leaves them out, since CI has no GPU."""

import json

import pytest
import torch
from test_regmeanpp import MAX_LENGTH as PP_MAX_LENGTH
from test_regmeanpp import reference_regmeanpp
from test_smollm2 import MAX_LENGTH, reference_grams, weights

import compute_gram
import merge_model
from conftest import make_rows
from demo import write_jsonl
from regmean.tensor_io import GramFile

pytestmark = pytest.mark.cuda

ROWS = make_rows("code", 9, seed=21)


def grams_on_cuda(expert, calib, out_dir, *extra):
    argv = ["toy-code", "--model", str(expert), "--dataset", str(calib), "--output-dir", str(out_dir)]
    argv += ["--max-length", str(MAX_LENGTH), "--batch-size", "4", "--device", "cuda", *extra]
    return compute_gram.main(argv)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("cuda-data") / "code.jsonl", ROWS)


@pytest.fixture(scope="module")
def cuda_grams(experts, calib, tmp_path_factory):
    """float32 forward passes on the GPU, one gram file per expert."""
    d = tmp_path_factory.mktemp("cuda-grams")
    return [grams_on_cuda(e, calib, d / e.name, "--dtype", "float32") for e in experts]


def max_rel(path, reference):
    grams = GramFile(path)
    return max(((grams.get(n).double() - g).abs().max() / g.abs().max()).item() for n, g in reference.items())


def test_grams_on_cuda_match_float64(experts, calib, cuda_grams, tmp_path):
    ref, ids = reference_grams(experts[0], ROWS)
    assert int(GramFile(cuda_grams[0]).metadata["num_tokens"]) == sum(map(len, ids))
    assert max_rel(cuda_grams[0], ref) <= 1e-5  # float32 forward passes (no TF32)
    bf16 = grams_on_cuda(experts[0], calib, tmp_path / "bf16")  # --dtype auto: bfloat16 on cuda
    assert GramFile(bf16).metadata["dtype"] == "bfloat16"
    assert 1e-4 <= max_rel(bf16, ref) <= 5e-2  # bfloat16 activations: rounding shows, and stays small
    spread = grams_on_cuda(experts[0], calib, tmp_path / "map", "--dtype", "float32", "--device-map", "auto")
    assert max_rel(spread, ref) <= 1e-5


def test_regmean_on_cuda_matches_closed_form(experts, cuda_grams, tmp_path):
    out = tmp_path / "merged"
    alpha = 0.1
    argv = ["regmean", "--models", *map(str, experts), "--grams", *map(str, cuda_grams), "--alpha", str(alpha)]
    merge_model.main([*argv, "--device", "cuda", "--output-dir", str(out)])
    assert json.loads((out / "merge_report.json").read_text())["settings"]["device"].startswith("cuda")
    ws, merged, gram_files = [weights(e) for e in experts], weights(out), [GramFile(g) for g in cuda_grams]
    checked = 0
    for module in gram_files[0].modules():
        name = module + ".weight"
        if name not in merged:
            continue
        reduced = [alpha * g.get(module).double() for g in gram_files]
        for r, g in zip(reduced, gram_files):
            r.diagonal().copy_(g.get(module).double().diagonal())
        want = torch.linalg.solve(sum(reduced), sum(r @ w[name].T for r, w in zip(reduced, ws))).T
        average = (ws[0][name] + ws[1][name]) / 2
        err = (merged[name] - want).norm() / (want - average).norm()
        assert err <= 1e-3, (module, err.item())  # on the correction to the average
        checked += 1
    assert checked == 2 * 7 + 1


def test_regmeanpp_on_cuda_matches_float64(experts, calib_files, tmp_path):
    out = tmp_path / "pp"
    argv = [
        "regmean++",
        "--models",
        *map(str, experts),
        "--datasets",
        str(calib_files["code"]),
        str(calib_files["math"]),
    ]
    argv += ["--formats", "code", "math", "--max-length", str(PP_MAX_LENGTH), "--batch-size", "4"]
    merge_model.main([*argv, "--device", "cuda", "--forward-dtype", "float32", "--output-dir", str(out)])
    want, _ = reference_regmeanpp(experts, calib_files, 0.1)
    merged, ws = weights(out), [weights(e) for e in experts]
    for name, w in want.items():
        average = (ws[0][name] + ws[1][name]) / 2
        scale = max((w - average).norm().item(), 1e-3 * w.norm().item())
        assert (merged[name] - w).norm() / scale <= 1e-3, name
    # bfloat16 forward passes, the default on cuda: runs end to end to a finite model
    merge_model.main([*argv, "--device", "cuda", "--output-dir", str(tmp_path / "pp-bf16")])
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "pp-bf16").values())
