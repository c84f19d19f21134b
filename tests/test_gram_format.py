"""Grams in half the bytes, read once: the accumulator's upper block rows, gram.safetensors v2 (packed
upper triangles) against v1 (full squares) and the reference's gram.pkl, and what a merge reads."""

import json
import pickle
import pickletools
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import merge_model
from conftest import save_expert, tiny_config
from regmean.calibration import Gram
from regmean.seed_pickle import SKIP_BYTES, available_memory
from regmean.tensor_io import GRAM_FORMAT, GramFile, save_grams, write_safetensors
from regmean.utils import UserError


def rchar() -> int:
    """Bytes this process has read through read() calls (/proc/self/io): what a gram read costs."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def data_bytes(path) -> int:
    """The bytes of a safetensors file after its header."""
    with open(path, "rb") as f:
        return Path(path).stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def write_v1(path, grams, aliases, num_tokens=1000):
    """A gram file as save_grams wrote it before format v2: full float32 squares."""
    meta = dict(model="test", num_tokens=str(num_tokens), aliases=json.dumps(aliases), format="regmean-gram-v1")
    write_safetensors(path, grams, meta, dtype=torch.float32)
    return path


def write_reference_pickle(path, grams):
    """gram.pkl as the reference's compute_gram.py wrote it: pickle.dump of the grams moved with .cpu()."""
    with open(path, "wb") as f:
        pickle.dump({k: v.cpu() for k, v in grams.items()}, f)
    return path


# ----------------------------------------------------------------------------- the accumulator
def test_accumulator_keeps_the_upper_block_rows_and_matches_float64():
    g = torch.Generator().manual_seed(0)
    dim = 2048  # 8 blocks of 256
    scale = torch.exp(torch.randn(dim, generator=g, dtype=torch.float64))
    batches = [torch.randn(5, 40, dim, generator=g, dtype=torch.float64) * scale for _ in range(3)]
    masks = [torch.rand(5, 40, generator=g) > 0.3 for _ in batches]
    rows = torch.cat([x[m] for x, m in zip(batches, masks)])
    expected = rows.T @ rows / len(rows)  # float64, written plainly
    grams = [Gram(dim, "cpu"), Gram(dim, "cpu")]
    for gram in grams:
        assert gram.sum.numel() == sum((e - s) * (dim - s) for s, e in zip(gram.edges[:-1], gram.edges[1:]))
        assert gram.sum.numel() * 4 <= 9 / 16 * dim * dim * 4  # not the full square
        for x, m in zip(batches, masks):
            x = x.clone()
            x[~m] = 1e6  # padding rows: never summed
            gram.add(x.float(), m)
    full, packed = grams[0].result(), grams[1].packed()
    assert grams[0].num_rows == len(rows) and packed.numel() == dim * (dim + 1) // 2
    assert torch.equal(full, full.T)
    assert ((full.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6
    upper = torch.cat([expected[i, i:] for i in range(dim)])
    assert ((packed.double() - upper).abs().max() / upper.abs().max()).item() < 1e-6


def test_gram_file_is_half_the_square_and_reads_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 1000, generator=g, dtype=torch.float64) * torch.linspace(0.1, 10, 1000, dtype=torch.float64)
    expected = x.T @ x / 300
    grams = [Gram(1000, "cpu", blocks=3) for _ in range(2)]
    for gram in grams:
        gram.add(x[:170].float())
        gram.add(x[170:].float())
    full = grams[0].result()
    save_grams(tmp_path / "v2.safetensors", {"a": grams[1].packed()}, {"b": "a"}, 300, {"model": "m"})
    write_v1(tmp_path / "v1.safetensors", {"a": full}, {"b": "a"}, 300)
    v2, v1 = GramFile(tmp_path / "v2.safetensors"), GramFile(tmp_path / "v1.safetensors")
    assert v2.metadata["format"] == GRAM_FORMAT == "regmean-gram-v2" and v2.shape("b") == (1000, 1000)
    assert data_bytes(v2.path) == 1000 * 1001 // 2 * 4  # the upper triangle, packed
    assert 0.5 < v2.path.stat().st_size / v1.path.stat().st_size < 0.501
    got = v2.get("b")
    assert got.dtype == torch.float32 and got.shape == (1000, 1000) and torch.equal(got, got.T)
    assert torch.equal(got, full) and torch.equal(v1.get("b"), full)  # both files: the accumulator's own matrix
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6  # float64 closed form
    assert v2.bytes_read == data_bytes(v2.path)
    with safe_open(v2.path, "pt") as f:  # a plain safetensors file for any other reader
        assert f.get_slice("a").get_shape() == [1000 * 1001 // 2]


# ----------------------------------------------------------------------------- the reference's gram.pkl
def test_reference_pickle_with_views_is_read_one_gram_at_a_time(tmp_path):
    g = torch.Generator().manual_seed(2)
    big = torch.randn(400, 400, generator=g)
    big = big @ big.T  # symmetric, as grams are
    grams = {
        "model.layers.0.self_attn.q_proj": torch.randn(300, 300, generator=g),
        "model.layers.0.mlp.down_proj": big[100:300, 100:300],  # a view inside a larger storage
        "model.layers.0.self_attn.o_proj": big.T,  # the whole storage, transposed strides
        "lm_head": torch.randn(3, 3, generator=g),  # small: read with the pickle's opening
    }
    path = write_reference_pickle(tmp_path / "gram.pkl", grams)
    size = path.stat().st_size
    # pickle stores a view's whole storage (once per tensor): the file holds big's 640 KB twice
    assert size > 2 * big.numel() * 4 + 300 * 300 * 4
    before = rchar()
    loaded = GramFile(tmp_path)
    assert rchar() - before < 0.05 * size  # opening walks the stream, seeking past the storages
    assert loaded.metadata["format"] == "seed-pickle" and sorted(loaded.modules()) == sorted(grams)
    for key, value in grams.items():
        before = rchar()
        got = loaded.get(key)
        read = rchar() - before
        assert torch.equal(got, value), key  # the view's values, not the storage's
        assert got.is_contiguous() and got.untyped_storage().nbytes() == got.numel() * 4, key  # a copy of its own
        assert loaded.shape(key) == tuple(value.shape)
        storage = value.untyped_storage().nbytes()
        if storage >= SKIP_BYTES:
            assert storage <= read < storage + 64 * 1024, key  # one storage's bytes per gram


def test_reference_pickle_larger_than_memory_is_refused_in_one_line(tmp_path):
    """A gram.pkl of more bytes than this machine's free memory (a sparse file: its big storage is a
    hole) opens at once; its small gram reads; its big one is refused before anything is read."""
    g = torch.Generator().manual_seed(3)
    grams = {"model.layers.0.mlp.down_proj": torch.randn(200, 200, generator=g), "lm_head": torch.eye(4)}
    data = pickle.dumps({k: v.cpu() for k, v in grams.items()})
    op, arg, pos = next((op, arg, pos) for op, arg, pos in pickletools.genops(data) if op.name == "BINBYTES")
    assert len(arg) > SKIP_BYTES  # the 160 KB storage, outside the pickle's frames
    huge = available_memory() + 2**30
    path = tmp_path / "gram.pkl"
    with open(path, "wb") as f:  # the same stream with that storage's 160 KB declared as `huge` bytes
        f.write(data[:pos] + pickle.BINBYTES8 + struct.pack("<Q", huge))
        f.seek(huge, 1)
        f.write(data[pos + 5 + len(arg) :])
    assert path.stat().st_size > available_memory()
    before = rchar()
    loaded = GramFile(path)
    assert rchar() - before < 1e6
    assert torch.equal(loaded.get("lm_head"), torch.eye(4))
    needle = r"gram.pkl: gram model.layers.0.mlp.down_proj \(its pickled storage and the float32 matrix\) needs "
    with pytest.raises(UserError, match=needle + r"[\d.]+ GB of memory, [\d.]+ GB are available"):
        loaded.get("model.layers.0.mlp.down_proj")


# ----------------------------------------------------------------------------- merges
def random_grams(modules: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """A well-conditioned, exactly symmetric gram per input."""
    g, out = torch.Generator().manual_seed(seed), {}
    for module, n in modules.items():
        a = torch.randn(n, 16, generator=g)
        gram = a @ a.T / 16 + torch.diag(torch.rand(n, generator=g) + 0.1)
        out[module] = (gram + gram.T) / 2
    return out


@pytest.fixture(scope="module")
def wide(tokenizer, tmp_path_factory):
    """Two tiny Llama experts with a wide MLP (2048), so that the grams outweigh every other file the
    merge reads, and their grams in format v2, in v1 and as the reference's pickle."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer), intermediate_size=2048))
    experts = [save_expert(base, d / f"expert{i}", tokenizer, seed=20 + i) for i in range(2)]
    widths = {"lm_head": 64}
    for layer in range(2):
        p = f"model.layers.{layer}"
        widths |= {f"{p}.self_attn.q_proj": 64, f"{p}.self_attn.o_proj": 64}
        widths |= {f"{p}.mlp.gate_proj": 64, f"{p}.mlp.down_proj": 2048}
    aliases = {}
    for layer in range(2):
        p = f"model.layers.{layer}"
        aliases |= {f"{p}.self_attn.k_proj": f"{p}.self_attn.q_proj", f"{p}.self_attn.v_proj": f"{p}.self_attn.q_proj"}
        aliases[f"{p}.mlp.up_proj"] = f"{p}.mlp.gate_proj"
    out = dict(experts=experts, v2=[], v1=[], pkl=[], grams=[], aliases=aliases)
    for i in range(2):
        grams = random_grams(widths, seed=i)
        save_grams(d / f"v2-{i}.safetensors", grams, aliases, 1000, dict(model=f"expert{i}"))
        write_v1(d / f"v1-{i}.safetensors", grams, aliases)
        every = {m: grams[aliases.get(m, m)] for m in [*grams, *aliases]}  # the reference: a gram per module
        down = "model.layers.1.mlp.down_proj"
        buffer = torch.zeros(2100, 2100)
        buffer[:2048, :2048] = every[down]
        every[down] = buffer[:2048, :2048]  # a view of a larger storage
        out["pkl"].append(write_reference_pickle(d / f"ref-{i}.pkl", every))
        out["v2"].append(d / f"v2-{i}.safetensors")
        out["v1"].append(d / f"v1-{i}.safetensors")
        out["grams"].append(grams)
    return out


def merge(wide, grams, out, *extra):
    args = ["regmean", "--models", *wide["experts"], "--grams", *grams, "--output-dir", out, "--device", "cpu"]
    merge_model.main([str(a) for a in [*args, "--alpha", 1, "--dtype", "float32", "--overwrite", *extra]])
    tensors = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            tensors |= {k: st.get_tensor(k) for k in st.keys()}
    return tensors


def test_new_old_and_reference_formats_merge_to_the_same_weights(wide, tmp_path):
    merged = {fmt: merge(wide, wide[fmt], tmp_path / fmt) for fmt in ("v2", "v1", "pkl")}
    assert sorted(merged["v2"]) == sorted(merged["v1"]) == sorted(merged["pkl"])
    for name, w in merged["v2"].items():
        assert torch.equal(w, merged["v1"][name]), name  # the same matrices in, the same weights out
        # the pickle has a gram per module, so q/k/v (gate/up) are solved one by one, not on one system
        torch.testing.assert_close(w, merged["pkl"][name], rtol=1e-6, atol=1e-7, msg=name)
    # and the merge is RegMean's on these grams: one layer against the float64 closed form
    module = "model.layers.1.mlp.down_proj"
    ws = []
    for e in wide["experts"]:
        with safe_open(e / "model.safetensors", "pt") as st:
            ws.append(st.get_tensor(module + ".weight").double())
    gs = [g[module].double() for g in wide["grams"]]
    ref = torch.linalg.solve(gs[0] + gs[1], gs[0] @ ws[0].T + gs[1] @ ws[1].T).T
    assert ((merged["v2"][module + ".weight"].double() - ref).norm() / ref.norm()).item() < 1e-5


def test_nan_gram_in_the_last_layer_is_found_as_it_is_read_and_leaves_nothing(wide, tmp_path, capsys):
    bad = dict(wide["grams"][1])
    bad["model.layers.1.mlp.down_proj"] = bad["model.layers.1.mlp.down_proj"].clone()
    bad["model.layers.1.mlp.down_proj"][7, 1900] = float("nan")
    path = save_grams(tmp_path / "bad.safetensors", bad, wide["aliases"], 1000, {}) or tmp_path / "bad.safetensors"
    out = tmp_path / "out"
    with pytest.raises(UserError, match=re.escape(f"{path}: gram model.layers.1.mlp.down_proj holds NaN or Inf")):
        merge(wide, [wide["v2"][0], path], out)
    assert "merging 2 models" in capsys.readouterr().out  # found during the merge, not before it
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.safetensors"]  # no temporary folder left


def test_a_merge_reads_each_gram_once(wide, tmp_path):
    # No output error figures: their picture has matplotlib read its 0.76 MB font file some 50 times.
    merge(wide, wide["v2"], tmp_path / "warm", "--error-sample-every", 0)  # imports out of the way
    grams = sum(data_bytes(p) for p in wide["v2"])
    before = rchar()
    merge(wide, wide["v2"], tmp_path / "measured", "--error-sample-every", 0)
    read = rchar() - before
    # the weights are memory-mapped (not in rchar); the rest (configs, tokenizer, headers) is small.
    # Checking every gram before the solves, as merges did, read 2x.
    assert grams <= read < 1.1 * grams, (read, grams)


def test_bench_counts_the_bytes_a_merge_reads(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_merge_io import main

    args = ["--hidden", "64", "--intermediate", "1024", "--layers", "2", "--heads", "4", "--kv-heads", "2"]
    for fmt in ("v2", "v1"):
        figures = main([*args, "--vocab", "256", "--format", fmt, "--output", str(tmp_path)])
        assert 0.99 < figures["gram_reads_per_byte"] <= 1.0, fmt  # every stored gram, once
        assert figures["gram_bytes_read_gb"] <= figures["rchar_gb"] < 1.1 * figures["gram_files_gb"], fmt
        assert abs(figures["weight_bytes_read_gb"] / figures["weight_files_gb"] - 1) < 0.01, fmt  # weights once too
