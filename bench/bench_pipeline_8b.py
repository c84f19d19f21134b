r"""The reference's whole pipeline at Llama-3-8B shapes on one small CPU box, measured stage by stage.

    python bench/bench_pipeline_8b.py --output-dir /work/big/pipeline-8b          # 32 layers: ~81 GB of disk
    python bench/bench_pipeline_8b.py --output-dir /tmp/pipeline-2l --layers 2    # same widths, 2 layers

Two Llama-3-8B-shaped experts (a random base as bench/make_llama3_8b_shaped.py draws it, plus each expert's
own random deltas of a tenth of its scale on every matrix: linear layers, lm_head, embeddings; bfloat16 shards), their
grams with `compute_gram.py code` as a user runs it (no --plan, the defaults, a few thousand tokens of
bench_gram_8b's code rows), `merge_model.py avg` and `merge_model.py regmean --alpha 0.1`, then the merged
folder itself: what a hub upload needs (config, index, shards, card, tokenizer), loaded with transformers and
generating a few tokens on the CPU, and sampled tensors (layer 0's q_proj, the middle layer's down_proj,
lm_head rows) against an independent float64 solve from the same gram files. Every stage runs in its own
process under /usr/bin/time -v: wall and CPU time, peak RSS, and the bytes it read from and wrote to disk
(the page cache of its inputs is dropped first, so a read counts), with the disk its output takes. The disk
the run needs is stated up front and checked before anything starts; a stage whose figures exist is reused,
so a run can be resumed. The avg merge is removed once measured (--keep-avg keeps it) so that the peak of
disk is the two experts, their grams and one merge. Figures go to OUTPUT_DIR/figures.json and a table.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_gram_8b import timed_run, write_rows  # noqa: E402
from make_llama3_8b_shaped import CHUNK_ELEMENTS, LLAMA3_8B, build_tokenizer, weight_plan  # noqa: E402

from regmean.utils import UserError  # noqa: E402
from utils import run_main  # noqa: E402

EXPERTS = ("code", "math")
DELTA_SCALE = 0.1  # each expert's deltas, relative to the weights' initializer_range
ALPHA = 0.1  # the reference's
NUM_EXAMPLES, MAX_LENGTH = 4, 512  # 2048 calibration tokens per expert
LM_HEAD_ROWS = 2048  # lm_head rows checked against float64
CHECKS = ("load + generate", "float64 check")  # the bench's checks of the merged folder, not pipeline stages
CHECK_TOLERANCE = 1e-4  # of the correction's RMS, beyond the bfloat16 rounding of the output
DISK_MARGIN = 250e6  # besides the weights and grams: tokenizers, configs, cards, reports, logs (29 MB at 32 layers)


# ----------------------------------------------------------------------------- plan and disk
def llama_config(layers: int):
    from transformers import LlamaConfig

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers}, architectures=["LlamaForCausalLM"])
    config.dtype = torch.bfloat16
    return config


def disk_plan(layers: int) -> dict[str, int]:
    """Bytes each output takes: an expert (bfloat16 weights), its gram file (a packed float32 upper triangle
    per input that linear layers read: q/k/v share one, gate/up one, lm_head one), and a merge."""
    c = LLAMA3_8B
    hidden, mlp, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"]
    kv_width = kv * hidden // c["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * mlp + 2 * hidden
    expert = 2 * (2 * c["vocab_size"] * hidden + layers * per_layer + hidden)
    grams = 4 * (layers * (3 * hidden * (hidden + 1) // 2 + mlp * (mlp + 1) // 2) + hidden * (hidden + 1) // 2)
    return dict(expert=expert, grams=grams, merge=expert)


def check_disk(out: Path, layers: int, keep_avg: bool) -> dict:
    """The disk the stages still to run need at their peak, against what is free; a clear error if short."""
    plan = disk_plan(layers)
    todo = {
        "experts": 2 * plan["expert"] * (not (out / "experts" / EXPERTS[1] / "config.json").exists()),
        "grams": sum(plan["grams"] for e in EXPERTS if not (out / "grams" / e / "gram.safetensors").exists()),
        "merges": plan["merge"] * (1 + keep_avg) * (not (out / "merges" / "regmean" / "config.json").exists()),
    }
    total = 2 * plan["expert"] + 2 * plan["grams"] + plan["merge"] * (1 + keep_avg)
    need = int(sum(todo.values()) + DISK_MARGIN)
    free = shutil.disk_usage(next(p for p in [out, *out.parents] if p.exists())).free
    print(
        f"disk: the whole run takes {total / 1e9:.1f} GB at its peak (2 experts of {plan['expert'] / 1e9:.2f} GB, "
        f"2 gram files of {plan['grams'] / 1e9:.2f} GB, {1 + keep_avg} merge(s)); still to write {need / 1e9:.1f} GB, "
        f"{free / 1e9:.1f} GB free at {out}",
        file=sys.stderr,
    )
    if need > free:
        per_layer = (3 * plan["expert"] + 2 * plan["grams"]) / layers
        raise UserError(
            f"{out} has {free / 1e9:.1f} GB free, the run needs {need / 1e9:.1f} GB more: free some, "
            f"or pass a smaller --layers (each layer takes about {per_layer / 1e9:.1f} GB)"
        )
    return dict(total_gb=round(total / 1e9, 2), free_gb_at_start=round(free / 1e9, 2), **plan)


# ----------------------------------------------------------------------------- stage: the experts
def write_experts(out: Path, layers: int, seed: int = 0) -> None:
    """Both experts in one pass: each block of the base is drawn once (as make_llama3_8b_shaped.py draws it)
    and each expert adds its own deltas on every matrix's block."""
    from tqdm import tqdm
    from transformers import GenerationConfig

    from regmean.tensor_io import ShardWriter

    config = llama_config(layers)
    plan = weight_plan(config)
    dirs = [out / "experts" / e for e in EXPERTS]
    writers = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(d)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(d)
        writers.append(ShardWriter(d, plan, "5GB"))
    build_tokenizer(dirs[0]).save_pretrained(str(dirs[1]))
    std = config.initializer_range
    total = sum(math.prod(shape) * 2 for shape, _ in plan.values())
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="experts", file=sys.stderr) as bar:
            for i, (name, (shape, dtype)) in enumerate(plan.items()):
                if name.endswith("norm.weight"):
                    for w in writers:
                        w.write(name, torch.ones(shape, dtype=dtype))
                    bar.update(math.prod(shape) * 2)
                    continue
                tuned = len(shape) == 2  # every matrix: the linear layers and the embeddings
                gens = [torch.Generator().manual_seed(seed * 100003 + i)]
                gens += [torch.Generator().manual_seed((seed + 1 + e) * 7919 + i) for e in range(len(EXPERTS))]
                step = max(1, CHUNK_ELEMENTS // shape[1])
                for r in range(0, shape[0], step):
                    n = min(step, shape[0] - r)
                    base = torch.randn((n, shape[1]), generator=gens[0]).mul_(std)
                    for w, gen in zip(writers, gens[1:]):
                        delta = torch.randn((n, shape[1]), generator=gen).mul_(std * DELTA_SCALE) if tuned else 0
                        w.write(name, (base + delta).to(dtype), row=r)
                    bar.update(base.numel() * 2)
        for w in writers:
            w.finish()
    finally:
        for w in writers:
            w.close()


# ----------------------------------------------------------------------------- stage: the merged folder
def check_hub_folder(folder: Path, expert: Path) -> dict:
    """What a hub upload needs: config, generation config, tokenizer, a model card with its metadata, and an
    index whose weight map names every tensor of the expert once, in shards that exist and hold them."""
    from huggingface_hub import ModelCard
    from safetensors import safe_open

    def weight_map(model: Path) -> dict[str, str]:  # one file holds everything where the model is small
        if (model / "model.safetensors").exists():
            with safe_open(model / "model.safetensors", "pt") as f:
                return {name: "model.safetensors" for name in f.keys()}
        return json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]

    where, want = weight_map(folder), set(weight_map(expert))
    problems = [f"weight_map misses {sorted(want - set(where))[:3]}"] if want - set(where) else []
    stored, size = {}, 0
    for shard in sorted(set(where.values())):
        with safe_open(folder / shard, "pt") as f:
            for name in f.keys():
                stored[name] = shard
                size += math.prod(f.get_slice(name).get_shape()) * 2  # bfloat16
    problems += [f"{n} not in {s}" for n, s in where.items() if stored.get(n) != s][:3]
    index = folder / "model.safetensors.index.json"
    if index.exists() and json.loads(index.read_text()).get("metadata", {}).get("total_size") != size:
        problems.append(f"{index.name}'s total_size is not the {size} bytes stored")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        if not (folder / name).exists():
            problems.append(f"no {name}")
    card = ModelCard.load(folder / "README.md").data.to_dict()
    if not card.get("tags"):
        problems.append("model card without tags")
    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures") != ["LlamaForCausalLM"]:
        problems.append(f"config architectures {config.get('architectures')}")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    return dict(shards=shards, total_size=size, card_tags=card.get("tags"), problems=problems)


def load_and_generate(folder: Path, new_tokens: int = 8) -> dict:
    """transformers loads the merged folder on the CPU and greedily generates a few tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    loaded = time.perf_counter() - start
    prompt = tokenizer("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1] :]
    if len(new) != new_tokens or not torch.isfinite(model.lm_head.weight.float()).all():
        raise SystemExit(f"generated {len(new)} tokens of {new_tokens}")
    return dict(load_s=round(loaded, 1), generate_s=round(time.perf_counter() - start - loaded, 1), tokens=new.tolist())


def float64_regmean(expert_rows: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """RegMean in float64, written plainly: G̃ᵢ = α Gᵢ + (1 − α) diag(Gᵢ), equal weights cᵢ = 1/N, and the
    solver's tiny ridge λ = 1e-9 · mean diag(Σ cᵢ G̃ᵢ) toward the average:
    (Σ cᵢ G̃ᵢ + λI) Wᵀ = Σ cᵢ G̃ᵢ Wᵢᵀ + λ W_avgᵀ. One expert's float64 gram at a time (14336² at 8B)."""
    c = 1.0 / len(grams)
    a, rhs = 0, 0
    for gram, w in zip(grams, expert_rows):
        reduced = gram.double() * alpha  # a new tensor: the caller's gram stays as it is
        reduced.diagonal().copy_(gram.diagonal())  # the diagonal kept whole
        a = a + c * reduced
        rhs = rhs + c * reduced @ w.T
        del reduced
    ridge = 1e-9 * a.diagonal().mean()
    rhs += ridge * sum(c * w for w in expert_rows).T
    a.diagonal().add_(ridge)
    return torch.linalg.solve(a, rhs).T


def check_sampled_tensors(out: Path, layers: int) -> list[dict]:
    """Sampled merged tensors against float64_regmean from the same gram files. The folder is bfloat16, so
    each element may be off by half a bfloat16 spacing of the exact value; beyond that, by at most
    CHECK_TOLERANCE of the correction's RMS (the correction: the exact merge minus the average)."""
    from regmean.tensor_io import GramFile, checkpoint_files, read_tensor

    merged_files = checkpoint_files(out / "merges" / "regmean")
    expert_files = [checkpoint_files(out / "experts" / e) for e in EXPERTS]
    gram_files = [GramFile(out / "grams" / e) for e in EXPERTS]
    middle = layers // 2
    samples = [
        ("model.layers.0.self_attn.q_proj", None),  # the experts' embeddings differ: so do their grams here
        (f"model.layers.{middle}.mlp.down_proj", None),
        ("lm_head", (0, LM_HEAD_ROWS)),
    ]
    results = []
    for module, rows in samples:
        name = module + ".weight"
        start = time.perf_counter()
        experts = [read_tensor(f[name], name, rows).double() for f in expert_files]
        grams = [g.get(module) for g in gram_files]
        exact = float64_regmean(experts, grams, ALPHA)
        del grams
        written = read_tensor(merged_files[name], name, rows).double()
        average = sum(experts) / len(experts)
        correction_rms = (exact - average).pow(2).mean().sqrt()
        _, exponent = torch.frexp(exact)
        half_spacing = torch.ldexp(torch.ones_like(exact), exponent - 9)  # bfloat16: 8 significant bits
        beyond = ((written - exact).abs() - half_spacing).clamp_min(0).max() / correction_rms
        results.append(
            dict(
                tensor=name + (f"[{rows[0]}:{rows[1]}]" if rows else ""),
                shape=list(exact.shape),
                correction_rms_over_weight_rms=round((correction_rms / exact.pow(2).mean().sqrt()).item(), 4),
                beyond_bf16_rounding=beyond.item(),
                ok=beyond.item() <= CHECK_TOLERANCE,
                seconds=round(time.perf_counter() - start, 1),
            )
        )
        print(json.dumps(results[-1]), file=sys.stderr)
    return results


# ----------------------------------------------------------------------------- running and measuring stages
def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files under paths from the page cache (written back first), so that the next stage's reads
    reach the disk and are counted."""
    os.sync()
    for path in paths:
        for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_used(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_blocks * 512 for p in files)


def measured(cmd: list[str], log: Path, inputs: list[Path], output: Path) -> dict:
    """Run cmd under /usr/bin/time -v after dropping its inputs from the page cache: wall, CPU, peak RSS, bytes
    read and written (the file system's block counts), and the disk its output takes."""
    drop_page_cache([p for p in inputs if p.exists()])
    text, wall, cpu = timed_run(cmd, log)

    def field(label: str) -> float:
        return float(re.search(rf"{label}: ([\d.]+)", text).group(1))

    return dict(
        wall_s=wall,
        cpu_s=cpu,
        peak_rss_gb=round(field(r"Maximum resident set size \(kbytes\)") * 1024 / 1e9, 3),
        read_gb=round(field("File system inputs") * 512 / 1e9, 3),
        written_gb=round(field("File system outputs") * 512 / 1e9, 3),
        output_gb=round(disk_used(output) / 1e9, 3) if output.exists() else None,
        command=" ".join(cmd[1:] if cmd[0] == sys.executable else cmd),
    )


def stages(out: Path, layers: int) -> list[tuple[str, list[str], list[Path], Path]]:
    """(name, command, inputs, output) of every stage, in order."""
    py, me = sys.executable, str(Path(__file__).resolve())
    experts = [out / "experts" / e for e in EXPERTS]
    grams = [out / "grams" / e for e in EXPERTS]
    rows = out / "rows.jsonl"
    own = [py, me, "--output-dir", str(out), "--layers", str(layers), "--stage"]
    plan = [("experts", own + ["experts"], [], out / "experts")]
    for e, model, gram in zip(EXPERTS, experts, grams):
        cmd = [py, "compute_gram.py", "code", "--model", str(model), "--dataset", str(rows)]
        cmd += ["--num-examples", str(NUM_EXAMPLES), "--max-length", str(MAX_LENGTH), "--output-dir", str(gram)]
        plan.append((f"grams {e}", cmd, [model], gram))
    for method, inputs in (("avg", experts), ("regmean", experts + grams)):
        cmd = [py, "merge_model.py", method, "--models", *map(str, experts)]
        cmd += ["--output-dir", str(out / "merges" / method)]
        if method == "regmean":
            cmd += ["--grams", *map(str, grams), "--alpha", str(ALPHA)]
        plan.append((f"merge {method}", cmd, inputs, out / "merges" / method))
    merged = out / "merges" / "regmean"
    plan.append(("load + generate", own + ["generate"], [merged], out / "generate.json"))
    plan.append(("float64 check", own + ["check"], [merged, *experts, *grams], out / "check.json"))
    return plan


def run_stage(out: Path, layers: int, stage: str) -> None:
    """The bench's own stages, run in their own process by stages()."""
    if stage == "experts":
        write_experts(out, layers)
    elif stage == "generate":
        merged = out / "merges" / "regmean"
        figures = dict(hub=check_hub_folder(merged, out / "experts" / EXPERTS[0]), **load_and_generate(merged))
        (out / "generate.json").write_text(json.dumps(figures, indent=1))
        if figures["hub"]["problems"]:
            raise SystemExit(f"{merged} is not ready for the hub: {figures['hub']['problems']}")
    elif stage == "check":
        results = check_sampled_tensors(out, layers)
        (out / "check.json").write_text(json.dumps(results, indent=1))
        if not all(r["ok"] for r in results):
            raise SystemExit(f"sampled tensors off the float64 solve: {results}")


def table(figures: dict) -> str:
    lines = ["| stage | wall | CPU | peak RSS | read | written | output on disk |", "|---|---|---|---|---|---|---|"]
    for name, f in figures["stages"].items():
        disk = f"{f['output_gb']:.2f} GB" if f.get("output_gb") else ""
        lines.append(
            f"| {name} | {f['wall_s']:.0f} s | {f['cpu_s']:.0f} s | {f['peak_rss_gb']:.2f} GB | "
            f"{f['read_gb']:.2f} GB | {f['written_gb']:.2f} GB | {disk} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, required=True, help="where the experts, grams, merges and figures go")
    p.add_argument(
        "--layers", type=int, default=LLAMA3_8B["num_hidden_layers"], help="decoder layers (default: %(default)s)"
    )
    p.add_argument("--keep-avg", action="store_true", help="keep the avg merge (default: removed once measured)")
    p.add_argument("--stage", choices=["experts", "generate", "check"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = args.output_dir.resolve()
    if args.stage:
        return run_stage(out, args.layers, args.stage)
    if args.layers < 1:
        raise UserError(f"--layers must be at least 1, got {args.layers}")
    figures_file = out / "figures.json"
    figures = json.loads(figures_file.read_text()) if figures_file.exists() else {}
    if figures and figures.get("layers") != args.layers:
        raise UserError(f"{out} holds a run of {figures.get('layers')} layers; use another --output-dir")
    figures.update(layers=args.layers, disk=check_disk(out, args.layers, args.keep_avg))
    figures.setdefault("stages", {})
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "rows.jsonl", NUM_EXAMPLES)
    (out / "logs").mkdir(exist_ok=True)
    for name, cmd, inputs, output in stages(out, args.layers):
        if name in figures["stages"] and (output.exists() or name == "merge avg"):
            print(f"{name}: done before, reused", file=sys.stderr)
            continue
        print(f"{name}: {' '.join(cmd[1:])}", file=sys.stderr)
        figures["stages"][name] = measured(cmd, out / "logs" / f"{name.replace(' ', '-')}.log", inputs, output)
        figures_file.write_text(json.dumps(figures, indent=1))
        print(json.dumps(figures["stages"][name]), file=sys.stderr)
        if name == "merge avg" and not args.keep_avg:
            shutil.rmtree(output)
    weights_and_grams = 2 * figures["disk"]["expert"] + 2 * figures["disk"]["grams"]
    merge = figures["stages"]["merge regmean"]
    figures.update(
        merge_read_over_inputs=round(merge["read_gb"] * 1e9 / weights_and_grams, 3),
        largest_peak_rss_gb=max(f["peak_rss_gb"] for n, f in figures["stages"].items() if n not in CHECKS),
        disk_peak_gb=round(disk_used(out) / 1e9, 2),
        wall_s_all_stages=round(sum(f["wall_s"] for f in figures["stages"].values()), 1),
        cpu_s_all_stages=round(sum(f["cpu_s"] for f in figures["stages"].values()), 1),
        generate=json.loads((out / "generate.json").read_text()),
        check=json.loads((out / "check.json").read_text()),
    )
    figures_file.write_text(json.dumps(figures, indent=1))
    print(table(figures))
    print(
        f"merge regmean read {figures['merge_read_over_inputs']:.3f}x the experts' weights plus grams (target <= 1.1); "
        f"largest peak RSS of a pipeline stage (the experts, grams, merges) {figures['largest_peak_rss_gb']:.2f} GB "
        "(target <= 8); "
        f"disk in use at the end {figures['disk_peak_gb']:.1f} GB; all stages {figures['wall_s_all_stages']:.0f} s "
        f"({figures['cpu_s_all_stages']:.0f} CPU s)"
    )
    return figures


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_main(main)
