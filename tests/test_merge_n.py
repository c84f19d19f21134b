"""The streamed merge, one expert's gram at a time (memory independent of N), against the solver that holds
all N grams and against float64 closed forms written plainly here: N = 2 and 3, weights, unexcited inputs."""

import json

import pytest
import torch

import merge_model
from conftest import save_expert, tiny_config
from regmean import solver
from regmean.tensor_io import save_grams


def grams_of(n: int, num: int, null: int, seed: int) -> list[torch.Tensor]:
    """num float32 grams [n, n]; with null > 0 they share a null space of that dimension (no input reaches it)."""
    g = torch.Generator().manual_seed(seed)
    reach = torch.randn(n - null, n, generator=g, dtype=torch.float64) if null else None
    out = []
    for _ in range(num):
        x = torch.randn(3 * n, n - null if null else n, generator=g, dtype=torch.float64)
        x = x @ reach if null else x
        out.append((x.T @ x / len(x)).float())
    return out


def closed_form(weights, grams, coefs, alpha, null_space=None):
    """W = avg + Σᵢ cᵢ (Wᵢ − avg) G̃ᵢ B (Bᵀ A B)⁻¹ Bᵀ in float64, A = Σᵢ cᵢ G̃ᵢ, B an orthonormal basis of
    the directions some input reaches (all of them without a null space): the rest keep the average."""
    w = [x.double() for x in weights]
    reduced = []
    for g in grams:
        r = alpha * g.double()
        r.diagonal().copy_(g.double().diagonal())
        reduced.append(r)
    avg = sum(c * x for c, x in zip(coefs, w))
    a = sum(c * r for c, r in zip(coefs, reduced))
    rhs = sum(c * (x - avg) @ r for c, x, r in zip(coefs, w, reduced))
    n = a.shape[0]
    if null_space is None:
        b = torch.eye(n, dtype=torch.float64)
    else:  # the complement of the null space
        q, _ = torch.linalg.qr(torch.cat([null_space, torch.randn(n, n, dtype=torch.float64)], 1))
        b = q[:, null_space.shape[1] :]
    return avg + rhs @ b @ torch.linalg.solve(b.T @ a @ b, b.T)


def streamed(weights, grams, coefs, alpha, chunk):
    """The streamed solve as the merge runs it: A one gram at a time, then the rows a chunk at a time, the
    sums again in float64 where the solver asks for them."""
    system = solver.RegMeanSystem.start(grams[0].shape[0], alpha, coefs)
    for i, g in enumerate(grams):
        system.add_gram(i, g)
    system.finish()
    out, wide = [], solver.wide_rhs(grams[0].shape[0], alpha)
    for start in range(0, len(weights[0]), chunk):
        rows = [w[start : start + chunk] for w in weights]
        while True:
            rhs, spread = solver.deviation_sums(len(rows[0]), grams[0].shape[0], wide)
            for i in range(1, len(rows)):
                solver.add_deviation(rhs, spread, grams[i], coefs[i], alpha, rows[i] - rows[0])
            solved = system.solve_deviation(rows[0], spread, rhs)
            if solved is not None:
                break
            wide = True
        out.append(solved[0])
    return torch.cat(out), system


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("coefs", [[0.25, 0.75], [1 / 6, 2 / 6, 3 / 6]])
@pytest.mark.parametrize("alpha, null", [(0.1, 0), (1.0, 0), (1.0, 5)])
def test_streamed_solve_matches_held_and_float64(coefs, alpha, null):
    n, rows = 48, 100
    grams = grams_of(n, len(coefs), null, seed=len(coefs) + null)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(rows, n, generator=g) * 0.02
    weights = [base + 0.002 * torch.randn(rows, n, generator=g) for _ in coefs]
    merged, system = streamed(weights, grams, coefs, alpha, chunk=30)
    held, _, _ = solver.RegMeanSystem.factor(grams, alpha, coefs, num_rows=rows).solve(weights)
    assert system.unexcited == null
    assert relative(merged, held) < 1e-6  # the same weights as the solver holding all N grams
    null_space = None
    if null:  # the directions no row of any expert's inputs reaches: the null space of their shared map
        _, _, vh = torch.linalg.svd(sum(x.double() for x in grams))
        null_space = vh[-null:].T
    exact = closed_form(weights, grams, coefs, alpha, null_space)
    avg = sum(c * w.double() for c, w in zip(coefs, weights))
    assert relative(merged, exact) < 1e-6
    assert ((merged.double() - exact).norm() / (exact - avg).norm()).item() < 1e-4  # of the correction


def test_a_wrong_rhs_is_seen():
    """The check above at its tolerance: the rhs of one expert left out fails it."""
    n, rows, coefs = 48, 60, [0.25, 0.75]
    grams = grams_of(n, 2, 0, seed=9)
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(rows, n, generator=g) * 0.02 for _ in coefs]
    system = solver.RegMeanSystem.start(n, 0.1, coefs)
    for i, gram in enumerate(grams):
        system.add_gram(i, gram)
    system.finish()
    rhs, spread = solver.deviation_sums(rows, n, False)
    solver.add_deviation(rhs, spread, grams[0], coefs[1], 0.1, weights[1] - weights[0])  # expert 0's gram: wrong
    merged, _, _ = system.solve_deviation(weights[0], spread, rhs)
    assert relative(merged, closed_form(weights, grams, coefs, 0.1)) > 1e-3


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_merge_of_three_weighted_experts_in_chunks(tokenizer, tmp_path, alpha, capsys):
    """merge_model.py regmean on 3 tiny experts with weights 1 2 3, rows solved in several chunks (--block-mb
    small: lm_head and gate/up take two passes over the grams), one input with unexcited directions: every
    linear weight equals its float64 closed form."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer)))
    experts = [save_expert(base, tmp_path / f"e{i}", tokenizer, seed=30 + i) for i in range(3)]
    widths = {"lm_head": 64}
    aliases = {}
    for layer in range(2):
        p = f"model.layers.{layer}"
        widths |= {f"{p}.self_attn.q_proj": 64, f"{p}.self_attn.o_proj": 64, f"{p}.mlp.gate_proj": 64}
        widths[f"{p}.mlp.down_proj"] = 224
        aliases |= {f"{p}.self_attn.k_proj": f"{p}.self_attn.q_proj", f"{p}.self_attn.v_proj": f"{p}.self_attn.q_proj"}
        aliases[f"{p}.mlp.up_proj"] = f"{p}.mlp.gate_proj"
    unexcited = "model.layers.0.self_attn.o_proj"
    grams = [{} for _ in experts]
    for k, (module, n) in enumerate(widths.items()):
        for i, g in enumerate(grams_of(n, 3, 6 if module == unexcited else 0, seed=100 + k)):
            grams[i][module] = g
    files = []
    for i, g in enumerate(grams):
        save_grams(tmp_path / f"g{i}.safetensors", g, aliases, 1000, dict(model=str(experts[i])))
        files.append(str(tmp_path / f"g{i}.safetensors"))
    out = tmp_path / "merged"
    merge_model.main(
        ["regmean", "--models", *map(str, experts), "--grams", *files, "--weights", "1", "2", "3", "--alpha",
         str(alpha), "--output-dir", str(out), "--dtype", "float32", "--block-mb", "0.01", "--allow-gram-mismatch"]
    )  # fmt: skip
    log = capsys.readouterr().out
    assert "grams: one expert's at a time (memory independent of the number of experts)" in log
    assert "the output error figures read each gram again" in log
    merged = load_file(out / "model.safetensors")
    tensors = [load_file(e / "model.safetensors") for e in experts]
    coefs = [1 / 6, 2 / 6, 3 / 6]
    for module in [*widths, *aliases]:
        key = aliases.get(module, module)
        null_space = None
        if key == unexcited and alpha == 1.0:
            _, _, vh = torch.linalg.svd(sum(g[key].double() for g in grams))
            null_space = vh[-6:].T
        weights = [t[module + ".weight"] for t in tensors]
        exact = closed_form(weights, [g[key] for g in grams], coefs, alpha, null_space)
        assert relative(merged[module + ".weight"], exact) < 1e-6, module
    report = json.loads((out / "merge_report.json").read_text())
    rows = {r["tensor"]: r for r in report["layers"]}
    assert rows[unexcited + ".weight"]["unexcited"] == (6 if alpha == 1.0 else 0)
    assert all("output_error" in r for r in report["layers"])


def test_bench_merge_n_runs(tmp_path):
    """bench/bench_merge_n.py at tiny shapes: each merge in its own process, its peak RSS and reads counted."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_merge_n import main

    shapes = ["--hidden", "64", "--intermediate", "256", "--layers", "1", "--vocab", "128", "--heads", "4"]
    rows = main(
        [*shapes, "--kv-heads", "2", "--experts", "2", "3", "--error-sample-every", "0", "--output", str(tmp_path)]
    )
    assert [r["experts"] for r in rows] == [2, 3]
    for r in rows:
        assert r["peak_rss_gib"] > 0.1 and r["rchar_gb"] >= r["gram_files_gb"] > 0
        assert r["log_lines"][0].startswith("grams: one expert's at a time")
