"""Stage 2: merge experts fine-tuned from one base into one model, by the plain average, by
RegMean (Jin et al., ICLR 2023) or by RegMean++ (Nguyen et al., arXiv 2508.03121), streaming
in bounded memory.

    python merge_model.py avg                  # code + math presets -> runs/merges/avg
    python merge_model.py regmean              # same, grams from runs/merges/{code,math}-llama3
                                               #   -> runs/merges/regmean_0.1
    python merge_model.py regmean --models toy-code toy-math --alpha 1.0   # after `python demo.py`
    python merge_model.py regmean --models A B C --grams A/gram.safetensors B/gram.pkl C \
        --weights 1 1 2 --output-dir runs/merges/abc --dtype bfloat16 --overwrite
    python merge_model.py regmean++            # code + math presets on their data -> runs/merges/regmeanpp_0.1
    python merge_model.py regmean++ --models toy-code toy-math          # after `python demo.py`
    python merge_model.py regmean++ --models A B --datasets a.jsonl b.jsonl --formats code math \
        --num-examples 2000 --max-length 256 --batch-size 16 --max-hidden-gb 20

For every linear layer y = x Wᵀ (W is out x in) whose input has a gram in every gram file:
    G̃ᵢ = α Gᵢ + (1 - α) diag(Gᵢ)                       (α = --alpha; 1 is plain RegMean)
    (Σᵢ cᵢ G̃ᵢ + λI) Wᵀ = Σᵢ cᵢ G̃ᵢ Wᵢᵀ + λ W_avgᵀ        (cᵢ = normalized --weights)
solved for the deviation from the weighted average W_avg by a Cholesky factorization shared
by the layers that read the same input (q/k/v, gate/up). λ is a tiny ridge: input directions
the data never excites keep the average. Every other tensor (embeddings, norms, biases,
layers without grams) is the weighted mean; `avg` is the weighted mean of every tensor.

The solve is float32 Cholesky where that is accurate (its error is measured on random probes
per input), float64 Cholesky where the gram is too ill-conditioned for float32, and an
eigendecomposition where even that fails; never lstsq (whose default CPU driver truncates the
rank of ill-conditioned grams). merge_report.json holds the path, ridge, relative residual,
estimated error and time of every linear layer.

Each expert tensor is read from its safetensors file when needed (in blocks of rows when
large), and each merged block goes straight to its place in the output shards, so memory
stays flat in depth and vocabulary. The output folder (shards + index, config, generation
config and tokenizer of the last model listed, README.md model card, merge_report.json)
appears under its final name only when complete.

RegMean++ needs no gram files: it takes the grams itself, layer by layer, on the merged model's
own activations. The merged embeddings of each expert's calibration tokens (rendered and
tokenized as compute_gram.py does) feed layer 0; for layer l, each expert's own decoder layer l
runs on the hidden states that merged layers 0..l-1 produce, the grams of its linear inputs (over
non-padding tokens) give layer l's RegMean merge (same alpha, weights and solver), and the merged
layer l moves the hidden states on. lm_head's grams come from each expert's final norm on the
merged last hidden states. One decoder layer of one expert is in memory at a time; the hidden
states (tokens x hidden per expert) stay on the device, or go to disk above --max-hidden-gb
(the log and merge_report.json say which). merge_report.json adds each layer's gram figures
(tokens, trace, mean diagonal, a condition-number bound) per expert.
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from compute_gram import Gram, check_one_row_per_token, collate, length_batches, load_tokenizer
from compute_gram import parse_args as gram_args
from utils import (DTYPES, FORMATS, PRESETS, SAFETENSORS_DTYPES, GramFile, Timer, UserError, atomic_dir, checkpoint_files,
                   choose_device, choose_dtype, format_rows, load_rows, peak_memory, read_tensor, resolve_model_dir, run_main,
                   safetensors_header, tensor_infos, tokenize_texts)

# Solver constants (why: see regmean_factor / regmean_solve).
RIDGE = 1e-9  # λ = RIDGE * mean(diag(Σ cᵢ G̃ᵢ)): below any direction the data excites, above float64 rounding
TOLERANCE = 1e-5  # estimated relative error of a merged weight above which float64 is used
RESIDUAL_LIMIT = 1e-3  # relative residual of a solve (on sampled rows) above which the next fallback is taken
NUM_PROBES = 8  # random right-hand sides used to estimate a float32 factorization's error
NUM_RESIDUAL_COLUMNS = 64  # output rows on which each solve's residual is measured

# Files copied from the last model listed (the seed saved its merge into the math model).
COPIED_FILES = ["generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "chat_template*"]

ST_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}  # "BF16" -> torch.bfloat16


def parse_args(argv=None):
    gram_defaults = gram_args(["code"])  # calibration settings as compute_gram.py's
    p = argparse.ArgumentParser(description="Merge fine-tuned experts by plain averaging, RegMean or RegMean++, streaming.")
    p.add_argument("method", choices=["avg", "regmean", "regmean++"],
                   help="avg: weighted mean of every tensor; regmean: RegMean on linear layers, grams from files; "
                        "regmean++: RegMean layer by layer, grams on the merged model's own hidden states")
    p.add_argument("--models", nargs="+", default=["code", "math"],
                   help="preset names, local folders or hub ids, 2 or more; config and tokenizer come from the last (default: code math)")
    p.add_argument("--grams", nargs="+", default=None, help="one gram file or folder per model (default: each preset's gram folder)")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="per-expert weights, normalized to sum 1 (default: equal)")
    p.add_argument("--alpha", type=float, default=0.1, help="off-diagonal scale of the grams; 1.0 is plain RegMean (default: 0.1)")
    p.add_argument("--datasets", nargs="+", default=None,
                   help="regmean++: calibration data, one per model: preset names or .json/.jsonl/.parquet/.csv files or hub ids "
                        "(default: each preset model's data)")
    p.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=None,
                   help="regmean++: row format of each dataset, or one for all (default: the preset's)")
    p.add_argument("--split", default=gram_defaults.split, help=f"regmean++: split of hub datasets (default: {gram_defaults.split})")
    p.add_argument("--num-examples", type=int, default=gram_defaults.num_examples,
                   help=f"regmean++: first N rows of each dataset, unshuffled (default: {gram_defaults.num_examples})")
    p.add_argument("--max-length", type=int, default=gram_defaults.max_length,
                   help=f"regmean++: truncate each example to this many tokens (default: {gram_defaults.max_length})")
    p.add_argument("--batch-size", type=int, default=gram_defaults.batch_size,
                   help=f"regmean++: examples per forward pass (default: {gram_defaults.batch_size})")
    p.add_argument("--forward-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="regmean++: dtype of the forward passes and hidden states (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--max-hidden-gb", type=float, default=None,
                   help="regmean++: hidden states larger than this go to disk, in the output folder while it is written "
                        "(default: half the free memory of the device)")
    p.add_argument("--output-dir", default=None,
                   help="(default: runs/merges/avg, runs/merges/regmean_{alpha} or runs/merges/regmeanpp_{alpha})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu: where the solves (and regmean++'s forward passes) run (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="output dtype (default: auto, the experts' dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="size of the output shards (default: 5GB)")
    p.add_argument("--block-mb", type=float, default=64,
                   help="large tensors are merged in blocks of rows of about this many MB per expert, as float32 (default: 64)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs and validation
def model_id(spec):
    """What a model is called in the model card: the hub id of a preset, else as given."""
    return PRESETS[spec]["model"] if spec in PRESETS else spec


def load_experts(specs):
    """Each model -> dict(spec, dir, config, files {name: file}, infos {name: (shape, dtype)}),
    checked to share one architecture and the same tensor names and shapes."""
    experts = []
    for spec in specs:
        model_dir = resolve_model_dir(spec)
        config_file = model_dir / "config.json"
        if not config_file.exists():
            raise UserError(f"{model_dir} has no config.json")
        files = checkpoint_files(model_dir)
        experts.append(dict(spec=spec, dir=model_dir, config=json.loads(config_file.read_text()), files=files,
                            infos=tensor_infos(files)))
    first = experts[0]
    for e in experts[1:]:
        for key in ("model_type", "architectures"):
            if e["config"].get(key) != first["config"].get(key):
                raise UserError(f"models differ in {key}: {first['dir']} has {first['config'].get(key)}, {e['dir']} has {e['config'].get(key)}")
        names, other = set(first["infos"]), set(e["infos"])
        if names != other:
            name = sorted(names ^ other)[0]
            where = first["dir"] if name in names else e["dir"]
            raise UserError(f"tensor {name} is in {where} only; all models must have the same tensors")
        for name, (shape, _) in first["infos"].items():
            if e["infos"][name][0] != shape:
                raise UserError(f"tensor {name} has shape {list(shape)} in {first['dir']} but {list(e['infos'][name][0])} in {e['dir']}")
    return experts


def default_gram_paths(specs):
    missing = [s for s in specs if s not in PRESETS]
    if missing:
        raise UserError(f"no default grams for {missing[0]!r} (not a preset): pass --grams, one per model")
    return [PRESETS[s]["gram_dir"] for s in specs]


def linear_modules(infos, gram_files):
    """{module: in features} of the linear layers RegMean merges: the 2-D `.weight` tensors whose
    module has a gram. Every gram file must hold a finite [in, in] gram for each of them."""
    linear = {}
    for name, (shape, _) in infos.items():
        module = name[: -len(".weight")]
        if name.endswith(".weight") and len(shape) == 2 and any(module in g for g in gram_files):
            linear[module] = shape[1]
    if not linear:
        raise UserError(f"no gram in {[str(g.path) for g in gram_files]} matches a weight of the models (wrong grams?)")
    for grams in gram_files:
        for module, n in linear.items():
            if module not in grams:
                raise UserError(f"{grams.path} has no gram for {module} (other gram files have one)")
            if grams.shape(module) != (n, n):
                raise UserError(f"{grams.path}: gram of {module} has shape {list(grams.shape(module))}, expected [{n}, {n}]")
        keys = sorted({grams.key_of[m] for m in linear})
        for key in tqdm(keys, desc=f"checking {grams.path.name}", leave=False, disable=len(keys) < 50):
            if not torch.isfinite(grams.get(key)).all():
                raise UserError(f"{grams.path}: gram {key} holds NaN or Inf")
    return linear


# ----------------------------------------------------------------------------- the RegMean solver
def reduce_off_diagonal(gram, alpha):
    """G̃ = α G + (1 - α) diag(G): off-diagonals scaled by α, the diagonal kept (one new tensor)."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_factor(grams, alpha, coefs, device, num_rows=None):
    """Factor the system shared by the layers that read one input. grams: one [in, in] gram per
    expert; coefs: the experts' normalized weights; num_rows: how many output rows will be
    solved with it (all layers of the group). Returns the state regmean_solve needs.

    A = Σ cᵢ G̃ᵢ + λI is factored by Cholesky in float32. Its error is measured on NUM_PROBES
    random solutions whose right-hand sides are exact float64 products; the float32 error
    (factorization and the rounding of A alike) grows with A's condition number, and
    regmean_solve moves a layer to float64 where it would show in the merged weight.
    The right-hand side needs N - 1 products, not N: with Xᵢ = Wᵢ - W_avg, Σ cᵢ Xᵢ = 0, so
    Σ cᵢ G̃ᵢ Xᵢᵀ = Σ_{i<N} Δᵢ Xᵢᵀ with Δᵢ = cᵢ (G̃ᵢ - G̃_N). Where more rows than inputs are
    to come (q/k/v, gate/up, lm_head), Mᵢ = A⁻¹ Δᵢ is formed once and each row block costs one
    product per expert instead of a product and two triangular solves."""
    grams = [g.to(device, torch.float32) for g in grams]
    n = grams[0].shape[0]
    a = torch.zeros(n, n, device=device)
    for g, c in zip(grams, coefs):
        a.add_(g, alpha=c * alpha)
    a.diagonal().copy_(sum(c * g.diagonal() for g, c in zip(grams, coefs)))
    scale = torch.diagonal(a).mean().item()
    lam = RIDGE * scale if scale > 0 else 1.0
    system = dict(grams=grams, coefs=coefs, alpha=alpha, lam=lam, n=n, path="cholesky32", probe_error=None)
    if scale <= 0:  # the data never reached this input: the average everywhere
        system["path"] = "average"
        return system
    a.diagonal().add_(lam)
    l32, info = torch.linalg.cholesky_ex(a)
    del a
    if info.item() != 0:
        _upgrade(system)
        return system
    deltas = []
    for g, c in zip(grams[:-1], coefs):
        d = torch.sub(g, grams[-1]).mul_(c * alpha)
        d.diagonal().copy_(c * (g.diagonal() - grams[-1].diagonal()))
        deltas.append(d)
    z = torch.randn(n, NUM_PROBES, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    z_solved = torch.cholesky_solve(_apply_a(system, z).float(), l32).double()
    system.update(l32=l32, deltas=deltas, probe_error=((z_solved - z).norm() / z.norm()).item())
    if num_rows is not None and num_rows > n:
        system["maps"] = [torch.cholesky_solve(d, l32) for d in deltas]
    return system


def _apply_a(system, x, chunk=2048):
    """(Σ cᵢ G̃ᵢ + λI) x for a few columns x, in x's precision. In float64 the products come from
    the float32 grams a chunk of rows at a time (no float64 copy of a 14336 x 14336 gram)."""
    if x.dtype == torch.float64 and "a64" in system:
        return system["a64"] @ x
    alpha, out = system["alpha"], system["lam"] * x
    for g, c in zip(system["grams"], system["coefs"]):
        gx = torch.cat([g[i:i + chunk].double() @ x for i in range(0, len(g), chunk)]) if x.dtype == torch.float64 else g @ x
        out += c * (alpha * gx + (1 - alpha) * torch.diagonal(g).to(x.dtype)[:, None] * x)
    return out


def _upgrade(system):
    """Move a system to the next, more robust solver: float64 Cholesky of A formed in float64,
    then an eigendecomposition (directions without positive curvature keep the average)."""
    system.pop("l32", None)
    system.pop("maps", None)
    if "a64" not in system:  # float64 Δᵢ and A, exact from the float32 grams
        reduced = [reduce_off_diagonal(g.double(), system["alpha"]) for g in system["grams"]]
        system["deltas"] = [c * (r - reduced[-1]) for r, c in zip(reduced[:-1], system["coefs"])]
        system["a64"] = sum(c * r for r, c in zip(reduced, system["coefs"]))
        system["a64"].diagonal().add_(system["lam"])
        del reduced
    if system["path"] == "cholesky32":
        l64, info = torch.linalg.cholesky_ex(system["a64"])
        if info.item() == 0:
            system.update(path="cholesky64", l64=l64)
            return
    evals, evecs = torch.linalg.eigh(system["a64"])
    keep = evals > evals.max().clamp_min(0) * 1e-10
    system.pop("l64", None)
    system.update(path="eigh64", eig=(evals[keep], evecs[:, keep]))


def regmean_solve(system, expert_rows):
    """Merged rows (float32 [rows, in]) of one layer from each expert's rows of W (float32, on
    the system's device), and diagnostics: relative residual and estimated relative error.
    Solving for the deviation from the average keeps the ridge toward the average and makes the
    rounding error proportional to the (small) deviation rather than to the weight."""
    while True:
        wide = system["path"] in ("cholesky64", "eigh64")
        rows = [w.double() if wide else w for w in expert_rows]
        avg = sum(c * w for c, w in zip(system["coefs"], rows))
        if system["path"] == "average":
            return avg, dict(residual=0.0, error=0.0)
        diffs = [w - avg for w in rows[:-1]]  # Xᵢ of all experts but the last
        sample = torch.linspace(0, len(avg) - 1, min(NUM_RESIDUAL_COLUMNS, len(avg)), device=avg.device).long()
        if "maps" in system:  # D = Σ Mᵢ Xᵢᵀ
            dev_t = sum(x @ m.T for x, m in zip(diffs, system["maps"]))
            rhs_sample = sum(x[sample] @ d for x, d in zip(diffs, system["deltas"]))
        else:
            rhs_t = sum(x @ d for x, d in zip(diffs, system["deltas"]))  # Σ Δᵢ Xᵢᵀ, transposed ([rows, in])
            if system["path"] == "eigh64":
                evals, evecs = system["eig"]
                dev_t = ((rhs_t @ evecs) / evals) @ evecs.T
            else:
                dev_t = torch.cholesky_solve(rhs_t.T, system["l64" if wide else "l32"]).T
            rhs_sample = rhs_t[sample]
            del rhs_t
        del diffs
        merged = (avg + dev_t).float()
        error = 0.0 if wide else system["probe_error"] * (dev_t.norm() / merged.norm().clamp_min(1e-30)).item()
        # The residual of the system solved, on a sample of output rows, in the solve's precision.
        rhs_sample = rhs_sample.T
        res = _apply_a(system, dev_t[sample].T.contiguous()) - rhs_sample
        residual = (res.norm() / rhs_sample.norm().clamp_min(1e-30)).item()
        finite = bool(torch.isfinite(merged).all())
        if (finite and residual <= RESIDUAL_LIMIT and error <= TOLERANCE) or system["path"] == "eigh64":
            break
        _upgrade(system)
    if not finite:  # cannot happen with finite inputs; never write NaN anyway
        merged, residual = avg.float(), float("nan")
    return merged, dict(residual=residual, error=error)


def regmean_merge_weight(expert_weights, grams, alpha, coefs, device="cpu"):
    """The RegMean merge of one linear weight: the experts' weights ([out, in]), their grams
    ([in, in]), alpha and normalized weights -> merged weight (float32) and diagnostics."""
    system = regmean_factor(grams, alpha, coefs, device, num_rows=expert_weights[0].shape[0])
    merged, diag = regmean_solve(system, [w.to(device, torch.float32) for w in expert_weights])
    return merged, dict(diag, path=system["path"], ridge=system["lam"], probe_error=system["probe_error"])


# ----------------------------------------------------------------------------- output shards
class ShardWriter:
    """Writes safetensors shards whose layout is planned up front (names, shapes, dtypes), so that
    each tensor, or each block of its rows, goes to its final place in the file as soon as it is
    merged: nothing waits in memory for a shard to fill. The sharding and the index follow
    huggingface_hub's split_torch_state_dict_into_shards."""

    def __init__(self, out_dir, plan, max_shard_size):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.out_dir = Path(out_dir)
        meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in plan.items()}
        try:
            self.split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
        except ValueError as e:
            raise UserError(f"--max-shard-size {max_shard_size!r}: {e}")
        self.where = {}  # tensor name -> (fd, byte offset of its data, bytes per row, total bytes)
        self.fds, self.written = [], {}
        for filename, names in self.split.filename_to_tensors.items():
            head, spans = safetensors_header({name: plan[name] for name in names}, {"format": "pt"})
            fd = os.open(self.out_dir / filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, len(head) + max((end for _, end in spans.values()), default=0))
            self.fds.append(fd)
            for name, (begin, end) in spans.items():
                shape = plan[name][0]
                row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
                self.where[name] = (fd, len(head) + begin, row_bytes, end - begin)
                self.written[name] = 0

    def write(self, name, tensor, row=0):
        """Write `tensor` (already in the planned dtype) as rows row.. of tensor `name`."""
        fd, start, row_bytes, _ = self.where[name]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        os.pwrite(fd, memoryview(data), start + row * row_bytes)
        self.written[name] += data.nbytes

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def finish(self):
        """Close the shards, check that every byte was written, and write the index."""
        self.close()
        short = [n for n, (_, _, _, size) in self.where.items() if self.written[n] != size]
        if short:
            raise RuntimeError(f"tensor {short[0]} was not written completely")
        if self.split.is_sharded:
            index = dict(metadata=self.split.metadata, weight_map=self.split.tensor_to_filename)
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- the merge
def row_blocks(shape, block_mb):
    """(start, stop) row ranges of a tensor, each about block_mb MB in float32."""
    if len(shape) == 0:
        return [None]
    row_bytes = max(1, math.prod(shape[1:]) * 4)
    step = max(1, int(block_mb * 2**20 // row_bytes))
    return [(i, min(i + step, shape[0])) for i in range(0, max(shape[0], 1), step)]


def read_rows(experts, name, rows, device):
    """The same rows of tensor `name` from every expert, float32 on device."""
    return [read_tensor(e["files"][name], name, rows).to(device, torch.float32) for e in experts]


def merge_mean(experts, name, coefs, device, out_dtype, writer, timer, block_mb, keep=False):
    """The weighted mean of tensor `name` into `writer`, block by block; with keep, also returned
    as written (for a forward pass through the merged model)."""
    shape, st_dtype = experts[0]["infos"][name]
    kept = []
    for rows in row_blocks(shape, block_mb):
        with timer("load"):
            blocks = [read_tensor(e["files"][name], name, rows) for e in experts]
        with timer("solve"):
            if blocks[0].is_floating_point():
                merged = sum(c * b.to(device, torch.float32) for c, b in zip(coefs, blocks)).to(writer_dtype(out_dtype, st_dtype))
            else:  # integer buffers are not averaged: the last model's value
                merged = blocks[-1]
        with timer("write"):
            writer.write(name, merged, rows[0] if rows else 0)
        if keep:
            kept.append(merged)
    if keep:
        return kept[0] if len(kept) == 1 else torch.cat(kept)


def gram_stats(gram, tokens):
    """Figures of one expert's gram for the report: its tokens, trace, mean diagonal and
    max/min diagonal (a lower bound of the condition number, free to compute)."""
    d = gram.diagonal().double()
    return dict(tokens=tokens, trace=d.sum().item(), mean_diag=d.mean().item(),
                cond_lower_bound=(d.max() / d.min()).item() if d.min() > 0 else float("inf"))


def merge_linear_group(experts, members, grams, tokens, alpha, coefs, device, out_dtype, writer, timer, block_mb, keep=False):
    """RegMean merge of the linear weights `members` that read one input (q/k/v, gate/up, or one
    layer alone) on one factorization of their system. grams: each expert's gram of that input;
    tokens: how many tokens each gram saw (None where unknown). Returns one report row per weight
    and, with keep, {name: merged weight as written}."""
    infos = experts[0]["infos"]
    t0 = time.perf_counter()
    stats = [gram_stats(g, n) for g, n in zip(grams, tokens)]
    with timer("solve"):
        system = regmean_factor(grams, alpha, coefs, device, num_rows=sum(infos[m][0][0] for m in members))
    factor_s = time.perf_counter() - t0
    rows_out, kept = [], {}
    for member in members:
        t0 = time.perf_counter()
        worst, blocks_out = dict(residual=0.0, error=0.0), []
        for rows in row_blocks(infos[member][0], block_mb):
            with timer("load"):
                blocks = read_rows(experts, member, rows, device)
            with timer("solve"):
                merged, diag = regmean_solve(system, blocks)
                merged = merged.to(out_dtype)
            with timer("write"):
                writer.write(member, merged, rows[0])
            worst = {k: max(worst[k], diag[k]) for k in worst}
            if keep:
                blocks_out.append(merged)
        if keep:
            kept[member] = torch.cat(blocks_out)
        rows_out.append(dict(tensor=member, n=system["n"], path=system["path"], ridge=system["lam"],
                             probe_error=system["probe_error"], residual=worst["residual"], error_estimate=worst["error"],
                             seconds=round(time.perf_counter() - t0 + factor_s, 4), grams=stats))
        factor_s = 0.0  # the factorization is counted once, with the first layer of its group
    return rows_out, kept


def merge_tensors(experts, gram_files, linear, args, coefs, device, out_dtype, writer, timer):
    """Merge every tensor into `writer`, one tensor (or block of rows) at a time. Linear layers
    that share an input are solved together, on one factorization. Returns per-layer diagnostics."""
    infos = experts[0]["infos"]
    groups = {}  # gram keys (one per expert) -> weight names, in checkpoint order
    for module in linear:
        key = tuple(g.key_of[module] for g in gram_files)
        groups.setdefault(key, []).append(module + ".weight")
    group_of = {name: key for key, names in groups.items() for name in names}
    tokens = [int(g.metadata["num_tokens"]) if "num_tokens" in g.metadata else None for g in gram_files]
    done, report = set(), []
    bar = tqdm(total=len(infos), desc=f"merge ({args.method})", unit="tensor")
    for name in infos:
        if name in done:
            continue
        if name not in group_of:
            merge_mean(experts, name, coefs, device, out_dtype, writer, timer, args.block_mb)
            done.add(name)
            bar.update(1)
            continue
        key = group_of[name]
        with timer("load"):
            grams = [g.get(k) for g, k in zip(gram_files, key)]
        rows, _ = merge_linear_group(experts, groups[key], grams, tokens, args.alpha, coefs, device, out_dtype, writer, timer, args.block_mb)
        del grams
        report += [dict(r, gram=key[0]) for r in rows]
        done.update(groups[key])
        bar.update(len(groups[key]))
    bar.close()
    return report


def writer_dtype(out_dtype, st_dtype):
    return out_dtype if ST_DTYPES[st_dtype].is_floating_point else ST_DTYPES[st_dtype]


# ----------------------------------------------------------------------------- RegMean++
def calibration_sets(args, experts):
    """Each expert's calibration examples as token ids, from --datasets and --formats, rendered
    and tokenized as compute_gram.py does; all checked before any model is loaded."""
    if args.datasets is None:
        missing = [e["spec"] for e in experts if e["spec"] not in PRESETS]
        if missing:
            raise UserError(f"no default data for {missing[0]!r} (not a preset): pass --datasets, one per model")
    datasets = args.datasets or [e["spec"] for e in experts]
    if len(datasets) != len(experts):
        raise UserError(f"--datasets has {len(datasets)} datasets for {len(experts)} models")
    formats = args.formats or [None]
    if len(formats) not in (1, len(experts)):
        raise UserError(f"--formats has {len(formats)} formats for {len(experts)} models (give one, or one per model)")
    formats = formats * len(experts) if len(formats) == 1 else formats
    sets = []
    for e, dataset, fmt in zip(experts, datasets, formats):
        fmt = fmt or (PRESETS[dataset]["format"] if dataset in PRESETS else None)
        if fmt is None:
            raise UserError(f"dataset {dataset!r} is not a preset: pass --formats ({' or '.join(FORMATS)})")
        tokenizer = load_tokenizer(e["dir"])
        rows = load_rows(dataset, args.split, args.num_examples)
        token_ids = tokenize_texts(tokenizer, format_rows(rows, fmt, tokenizer), args.max_length)
        lengths = [len(ids) for ids in token_ids]
        batches = []  # (input_ids, attention_mask, flat indices of the real tokens) per batch
        for batch in length_batches(lengths, args.batch_size):
            input_ids, mask = collate(token_ids, batch)
            batches.append((input_ids, mask, mask.flatten().nonzero().squeeze(1)))
        sets.append(dict(batches=batches, provenance=dict(
            dataset=PRESETS[dataset]["dataset"] if dataset in PRESETS else dataset, format=fmt, split=args.split,
            num_examples=len(token_ids), max_length=args.max_length, num_tokens=sum(lengths))))
    return sets


class HiddenStates:
    """The merged model's hidden states on every expert's calibration tokens: one packed
    [tokens, hidden] tensor per (expert, batch), padding left out. Kept on the device, or, with
    spill_dir, in one safetensors file each, rewritten as each merged layer runs."""

    def __init__(self, device, spill_dir=None):
        self.device, self.spill_dir, self.tensors = device, spill_dir, {}
        if spill_dir is not None:
            spill_dir.mkdir()

    def put(self, key, x):
        if self.spill_dir is None:
            self.tensors[key] = x
        else:
            save_file({"h": x.contiguous().cpu()}, str(self.spill_dir / f"{key[0]}-{key[1]}.safetensors"))

    def get(self, key):
        if self.spill_dir is None:
            return self.tensors[key]
        return load_file(str(self.spill_dir / f"{key[0]}-{key[1]}.safetensors"), device=str(self.device))["h"]


def hidden_budget(device):
    """Default --max-hidden-gb: half the free memory of the device (cuda) or of the host."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free / 2 / 2**30


def load_module(template, prefix, device, dtype, expert=None, tensors=None):
    """A real copy of the meta-device module `template` whose tensors (`prefix`.*) come from an
    expert's checkpoint, or from `tensors` {name: tensor}."""
    module = copy.deepcopy(template).to_empty(device=device)
    state = module.state_dict()
    unset = set(dict(module.named_buffers())) - set(state)
    if unset:  # a buffer the checkpoint does not hold would stay uninitialized
        raise UserError(f"{prefix} has buffers that are not saved in the checkpoint ({sorted(unset)[0]}): regmean++ does not support this architecture")
    for key in state:
        name = f"{prefix}.{key}"
        state[key] = (tensors[name] if tensors is not None else read_tensor(expert["files"][name], name)).to(device, dtype)
    module.load_state_dict(state)
    return module.eval()


def layer_inputs(config, rotary, layer_index, hidden, attention_mask):
    """What a decoder layer takes besides the hidden states, built as the model's own forward
    builds them: positions, rotary cos/sin and the causal mask (sliding where the layer slides)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    layer_types = getattr(config, "layer_types", None)
    sliding = layer_types[layer_index] == "sliding_attention" if layer_types else getattr(config, "sliding_window", None) is not None
    position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
    make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
    mask = make_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids)
    return dict(attention_mask=mask, position_ids=position_ids, position_embeddings=rotary(hidden, position_ids))


def run_layer(layer, config, rotary, layer_index, packed, batch, device):
    """One decoder layer on one batch of packed hidden states -> packed outputs (real tokens only).
    Right padding (zeros) goes back where it was: causal attention never reads it."""
    _, mask, index = batch
    index = index.to(device)
    hidden = packed.new_zeros(mask.numel(), packed.shape[-1])
    hidden[index] = packed
    hidden = hidden.view(*mask.shape, -1)
    out = layer(hidden, use_cache=False, **layer_inputs(config, rotary, layer_index, hidden, mask.to(device)))
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, out.shape[-1])[index]


def layer_grams(layer, run_batch, batches, aliases, device):
    """Grams of the inputs of every nn.Linear in `layer` over the real tokens of `batches`, the
    layer being run by run_batch(b). Linear layers fed the very same tensor (same object, same
    version, within one forward: q/k/v, gate/up) share one gram, under the first one's name;
    the others are recorded in `aliases` {name: that first name}. Returns {name: Gram}."""
    grams, seen, current = {}, {}, {}

    def record(name):
        def hook(module, args):
            x = args[0]
            check_one_row_per_token(name, x, current["total"])
            leader = next((k for k, (t, v) in seen.items() if t is x and v == x._version), None)
            if leader is not None:
                aliases[name] = leader
                return
            seen[name] = (x, x._version)
            if name not in grams:
                grams[name] = Gram(x.shape[-1], device)
            grams[name].add(x, current["index"])
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    try:
        for b, (_, mask, index) in enumerate(batches):
            current.update(total=mask.numel(), index=index.to(device))
            run_batch(b)
            seen.clear()
    finally:
        for h in hooks:
            h.remove()
    return grams


def merge_regmean_pp(experts, calib, args, coefs, device, out_dtype, forward_dtype, writer, timer, states):
    """RegMean++ layer by layer: the merged embeddings feed layer 0; the grams of layer l are each
    expert's own layer l run on the merged model's hidden states after merged layers 0..l-1 (on
    that expert's calibration tokens); the merged layer l then moves the hidden states on. The
    grams of lm_head come from each expert's final norm on the merged last hidden states. Every
    other tensor is the weighted mean. Returns the report rows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(experts[-1]["dir"])
    with torch.device("meta"):  # the architecture without weights: modules to copy, names
        skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(forward_dtype)
    config, base = skeleton.config, skeleton.base_model
    if not all(hasattr(base, a) for a in ("layers", "norm", "rotary_emb")):
        raise UserError(f"regmean++ supports decoder-only models with layers, norm and rotary_emb (Llama, Mistral, Qwen2); not {config.model_type}")
    names = {m: n for n, m in skeleton.named_modules()}
    layers_prefix, norm_prefix = names[base.layers], names[base.norm]
    embed_name = names[skeleton.get_input_embeddings()] + ".weight"
    head = skeleton.get_output_embeddings()
    head_name = names[head] + ".weight" if head is not None and names[head] + ".weight" in experts[0]["infos"] else None  # None: tied
    with torch.device(device):
        rotary = type(base.rotary_emb)(config)
    infos, report = experts[0]["infos"], []
    tokens = [c["provenance"]["num_tokens"] for c in calib]
    merge = dict(coefs=coefs, device=device, out_dtype=out_dtype, writer=writer, timer=timer, block_mb=args.block_mb)

    def in_layer(name, l):
        return name.startswith(f"{layers_prefix}.{l}.")

    # Everything outside the decoder layers, final norm and lm_head: the mean, written first.
    special = {embed_name, head_name} | {n for n in infos if n.startswith(norm_prefix + ".")}
    for name in infos:
        if name not in special and not any(in_layer(name, l) for l in range(len(base.layers))):
            merge_mean(experts, name, **merge)
    # Layer 0 reads the merged embeddings of each expert's tokens.
    embed = merge_mean(experts, embed_name, keep=True, **merge).to(device, forward_dtype)
    for i, c in enumerate(calib):
        for b, (input_ids, _, index) in enumerate(c["batches"]):
            states.put((i, b), embed[input_ids.flatten()[index].to(device)])
    del embed

    for l, template in enumerate(tqdm(base.layers, desc="regmean++", unit="layer")):
        prefix = f"{layers_prefix}.{l}"
        grams, aliases = [], {}
        for i, e in enumerate(experts):  # each expert's own layer l on the merged model's states
            with timer("load"):
                layer = load_module(template, prefix, device, forward_dtype, expert=e)
            with timer("forward"), torch.no_grad():  # no_grad, not inference_mode: version counters tell shared inputs
                def run_batch(b, layer=layer, i=i):
                    return run_layer(layer, config, rotary, l, states.get((i, b)), calib[i]["batches"][b], device)

                grams.append(layer_grams(layer, run_batch, calib[i]["batches"], aliases, device))
            del layer, run_batch
        merged = {}
        for leader in list(grams[0]):
            members = [f"{prefix}.{m}.weight" for m in [leader] + [a for a, k in aliases.items() if k == leader]]
            counts = [g[leader].num_rows for g in grams]
            with timer("solve"):
                results = [g.pop(leader).result() for g in grams]
            rows, kept = merge_linear_group(experts, members, results, counts, args.alpha, coefs, device, out_dtype, writer,
                                            timer, args.block_mb, keep=True)
            del results
            report += [dict(r, gram=f"{prefix}.{leader}", layer=l) for r in rows]
            merged.update(kept)
        for name in infos:  # norms, biases, linear layers never run: the mean
            if in_layer(name, l) and name not in merged:
                merged[name] = merge_mean(experts, name, keep=True, **merge)
        with timer("forward"), torch.inference_mode():  # the merged layer l, as written, moves the states on
            layer = load_module(template, prefix, device, forward_dtype, tensors=merged)
            for i, c in enumerate(calib):
                for b, batch in enumerate(c["batches"]):
                    states.put((i, b), run_layer(layer, config, rotary, l, states.get((i, b)), batch, device))
        del layer, merged

    for name in infos:  # the final norm
        if name.startswith(norm_prefix + "."):
            merge_mean(experts, name, **merge)
    if head_name is not None:  # lm_head reads each expert's own final norm of the merged last hidden states
        grams = []
        for i, e in enumerate(experts):
            with timer("forward"), torch.inference_mode():
                norm = load_module(base.norm, norm_prefix, device, forward_dtype, expert=e)
                gram = Gram(config.hidden_size, device)
                for b in range(len(calib[i]["batches"])):
                    gram.add(norm(states.get((i, b))))
                grams.append(gram.result())
        rows, _ = merge_linear_group(experts, [head_name], grams, tokens, args.alpha, coefs, device, out_dtype, writer, timer, args.block_mb)
        report += [dict(r, gram=names[head], layer=len(base.layers)) for r in rows]
    return report


# ----------------------------------------------------------------------------- the output folder
def gram_provenance(grams):
    keep = ("model", "dataset", "split", "num_examples", "max_length", "num_tokens", "format")
    return dict(file=str(grams.path), **{k: grams.metadata[k] for k in keep if k in grams.metadata})


METHOD_NAMES = {"avg": "Average", "regmean": "RegMean", "regmean++": "RegMean++"}


def write_model_card(out_dir, args, experts, provenance, coefs, out_dtype, summary, argv):
    """provenance: per expert, where its grams come from (a gram file's, or regmean++'s data); or []."""
    lines = ["---", "base_model:", *[f"- {model_id(e['spec'])}" for e in experts], "tags:", "- merge", "- regmean",
             *(["- regmean-plus-plus"] if args.method == "regmean++" else []), "library_name: transformers", "---", "",
             f"# {METHOD_NAMES[args.method]} merge of {len(experts)} experts", ""]
    solve = ("(Σ cᵢ G̃ᵢ + λI) Wᵀ = Σ cᵢ G̃ᵢ Wᵢᵀ + λ W_avgᵀ with G̃ᵢ = α Gᵢ + (1 - α) diag(Gᵢ); "
             "every other tensor is the weighted mean.")
    if args.method == "regmean":
        lines += [f"Method: RegMean (Jin et al., ICLR 2023) with alpha = {args.alpha}: each linear layer solves " + solve, ""]
    elif args.method == "regmean++":
        lines += [f"Method: RegMean++ (Nguyen et al., arXiv 2508.03121) with alpha = {args.alpha}: layer by layer, the gram Gᵢ "
                  "of a linear layer is taken on expert i's own layer run on the merged model's hidden states (the merged "
                  "layers before it, on expert i's calibration data); each linear layer then solves " + solve, ""]
    else:
        lines += ["Method: the weighted mean of every tensor.", ""]
    lines += [f"| expert | weight | {'calibration data' if args.method == 'regmean++' else 'gram'} |", "| --- | --- | --- |"]
    for i, (e, c) in enumerate(zip(experts, coefs)):
        gram = "-" if not provenance else ", ".join(f"{k}: {v}" for k, v in provenance[i].items())
        lines.append(f"| {model_id(e['spec'])} | {c:.4g} | {gram} |")
    lines += ["", f"Output dtype: {str(out_dtype).replace('torch.', '')}. Config, generation config and tokenizer "
              f"from {model_id(experts[-1]['spec'])}.", ""]
    if summary:
        lines += [f"Solver: {summary}", ""]
    lines += ["Command:", "", "```", "python merge_model.py " + " ".join(argv), "```", "",
              "Details per layer are in merge_report.json.", ""]
    (out_dir / "README.md").write_text("\n".join(lines))


def copy_side_files(src_dir, out_dir, out_dtype):
    config = json.loads((src_dir / "config.json").read_text())
    name = str(out_dtype).replace("torch.", "")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for pattern in COPIED_FILES:
        for f in src_dir.glob(pattern):
            if f.is_file():
                shutil.copyfile(f, out_dir / f.name)


def summarize(report):
    if not report:
        return ""
    paths = {}
    for r in report:
        paths[r["path"]] = paths.get(r["path"], 0) + 1
    return (f"{len(report)} linear layers; paths " + ", ".join(f"{k} {v}" for k, v in sorted(paths.items()))
            + f"; max relative residual {max(r['residual'] for r in report):.2e}"
            + f"; max estimated relative error {max(r['error_estimate'] for r in report):.2e}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    timer = Timer()
    pp = args.method == "regmean++"
    # Check every input before any heavy work.
    if len(args.models) < 2:
        raise UserError(f"--models needs at least 2 models, got {len(args.models)}")
    weights = args.weights or [1.0] * len(args.models)
    if len(weights) != len(args.models):
        raise UserError(f"--weights has {len(weights)} values for {len(args.models)} models")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights must be finite, >= 0 and not all 0, got {weights}")
    coefs = [w / sum(weights) for w in weights]
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.block_mb <= 0:
        raise UserError(f"--block-mb must be > 0, got {args.block_mb}")
    if pp and args.grams:
        raise UserError("regmean++ computes its own grams: pass --datasets, not --grams")
    if not pp and (args.datasets or args.formats):
        raise UserError(f"--datasets and --formats are for regmean++; {args.method} takes {'--grams' if args.method == 'regmean' else 'neither'}")
    for name in ("num_examples", "max_length", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = choose_device(args.device)
    default_dir = {"avg": "runs/merges/avg", "regmean": f"runs/merges/regmean_{args.alpha}", "regmean++": f"runs/merges/regmeanpp_{args.alpha}"}
    out_dir = Path(args.output_dir or default_dir[args.method])
    if out_dir.exists() and not args.overwrite:
        raise UserError(f"{out_dir} exists; pass --overwrite to replace it")

    with timer("load"):
        experts = load_experts(args.models)
        gram_files, linear, calib, provenance = [], {}, None, []
        if args.method == "regmean":
            gram_paths = args.grams or default_gram_paths(args.models)
            if len(gram_paths) != len(args.models):
                raise UserError(f"--grams has {len(gram_paths)} files for {len(args.models)} models")
            gram_files = [GramFile(p) for p in gram_paths]
            linear = linear_modules(experts[0]["infos"], gram_files)
            provenance = [gram_provenance(g) for g in gram_files]
        elif pp:
            calib = calibration_sets(args, experts)
            provenance = [c["provenance"] for c in calib]
    infos = experts[0]["infos"]
    float_dtypes = [ST_DTYPES[d] for _, d in experts[-1]["infos"].values() if ST_DTYPES[d].is_floating_point]
    out_dtype = choose_dtype(args.dtype, device, default=max(set(float_dtypes), key=float_dtypes.count))
    plan = {name: (shape, writer_dtype(out_dtype, st_dtype)) for name, (shape, st_dtype) in infos.items()}
    what = f"{len(linear)} by RegMean" if args.method == "regmean" else ("linear layers by RegMean++" if pp else "all by the mean")
    print(f"merging {len(args.models)} models ({', '.join(str(e['dir']) for e in experts)}) by {args.method}: "
          f"{len(infos)} tensors, {what}, on {device}, output {str(out_dtype).replace('torch.', '')} -> {out_dir}")
    extra_settings = {}
    if pp:
        forward_dtype = choose_dtype(args.forward_dtype, device)
        num_tokens = sum(p["num_tokens"] for p in provenance)
        hidden_gib = num_tokens * experts[-1]["config"]["hidden_size"] * forward_dtype.itemsize / 2**30
        budget = hidden_budget(device) if args.max_hidden_gb is None else args.max_hidden_gb
        spill = hidden_gib > budget
        extra_settings = dict(forward_dtype=str(forward_dtype).replace("torch.", ""), max_hidden_gb=round(budget, 3),
                              hidden_states="disk" if spill else str(device), hidden_gib=round(hidden_gib, 4))
        print(f"regmean++: {num_tokens} calibration tokens ({', '.join(str(p['num_tokens']) for p in provenance)}); their hidden states "
              f"({hidden_gib:.3g} GiB, {extra_settings['forward_dtype']}) kept " + (f"on disk (over the {budget:.3g} GiB budget)" if spill else
              f"on {device} (budget {budget:.3g} GiB)"))

    with atomic_dir(out_dir, overwrite=args.overwrite) as tmp:
        writer = ShardWriter(tmp, plan, args.max_shard_size)
        try:
            if pp:
                states = HiddenStates(device, tmp / ".hidden-states" if spill else None)
                report = merge_regmean_pp(experts, calib, args, coefs, device, out_dtype, forward_dtype, writer, timer, states)
                del states
                shutil.rmtree(tmp / ".hidden-states", ignore_errors=True)
            else:
                report = merge_tensors(experts, gram_files, linear, args, coefs, device, out_dtype, writer, timer)
        finally:
            writer.close()
        writer.finish()
        summary = summarize(report)
        with timer("write"):
            copy_side_files(experts[-1]["dir"], tmp, out_dtype)
            write_model_card(tmp, args, experts, provenance, coefs, out_dtype, summary, argv)
            total_bytes = sum(math.prod(s) * d.itemsize for s, d in plan.values())
            figures = dict(wall_s=round(timer.total(), 3), **{f"{k}_s": round(v, 3) for k, v in timer.phases.items()},
                           peak_memory=peak_memory(device), output_bytes=total_bytes)
            if pp:
                figures.update(calibration_tokens=num_tokens, seconds_per_token=timer.total() / num_tokens)
            settings = dict(vars(args), weights=weights, output_dir=str(out_dir), device=str(device),
                            dtype=str(out_dtype).replace("torch.", ""), **extra_settings)
            merge_report = dict(settings=settings, command="python merge_model.py " + " ".join(argv),
                                experts=[dict(model=model_id(e["spec"]), dir=str(e["dir"]), weight=c) for e, c in zip(experts, coefs)],
                                grams=provenance, summary=summary, figures=figures, layers=report)
            (tmp / "merge_report.json").write_text(json.dumps(merge_report, indent=2) + "\n")
    if summary:
        print(f"{args.method}: {summary}")
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in timer.phases.items())
    rate = f"{num_tokens / timer.phases.get('forward', 1e-9):.0f} calibration tokens/s in the forward passes; " if pp else ""
    print(f"done in {timer.total():.1f}s ({phases}); {rate}{total_bytes / 2**30 / max(timer.total(), 1e-9):.2f} GiB/s written; "
          f"{peak_memory(device)} -> {out_dir}")
    return out_dir


if __name__ == "__main__":
    run_main(main)
