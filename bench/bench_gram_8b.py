r"""compute_gram.py at the real size: a randomly initialized Llama-3-8B-shaped expert (written by
bench/make_llama3_8b_shaped.py), its grams with no --plan (auto must pick the layer plan on a 24 GiB
machine), and the figures of the run.

    python bench/make_llama3_8b_shaped.py --output-dir /work/big/llama3-8b-shaped
    python bench/bench_gram_8b.py run /work/big/llama3-8b-shaped --work-dir /work/big/gram-8b \
        --num-examples 8 --max-length 512
    python bench/make_llama3_8b_shaped.py --num-layers 2 --output-dir /work/big/llama3-2l-shaped
    python bench/bench_gram_8b.py run /work/big/llama3-2l-shaped --work-dir /work/big/gram-2l --plan model   # the ratio

`run` writes rows.jsonl (8 long code rows, the `code` preset's columns), runs
`/usr/bin/time -v compute_gram.py code --model M --dataset rows.jsonl ... --device cpu --dtype float32`,
and reports wall time, tokens/s, peak resident memory (and peak GPU memory with --device cuda), the gram
file's size, and layer 0's attention-input gram against a float64 computation of it (embeddings ->
input_layernorm -> XᵀX / n, written plainly here).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_rows(path: Path, n: int) -> Path:
    """n long code rows (instruction, input, output: the `code` preset's columns), each well over 512 tokens."""
    rows = []
    for i in range(n):
        steps = [
            f"def step_{i}_{j}(values, k={j}):\n    return [v * k + {i} for v in values if v % {j + 2}]"
            for j in range(60)
        ]
        body = "\n".join(steps)
        rows.append(dict(instruction="Explain and tidy this Python module.", input=body, output=f"# {i}\n{body}"))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed_run(cmd: list[str], log: Path) -> tuple[str, float, float]:
    """Run cmd under /usr/bin/time -v, its output to log: (the log's text, wall seconds, CPU seconds). A failed
    command stops the bench with the log's tail."""
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    text = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}), see {log}:\n{text[-3000:]}")
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", text).group(1)) for kind in ("User", "System"))
    return text, round(time.time() - start, 1), round(cpu, 1)


def time_v(cmd: list[str], log: Path) -> dict:
    """timed_run's figures of a compute_gram.py run: wall and CPU seconds, peak RSS, tokens and the plan."""
    text, wall, cpu = timed_run(cmd, log)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    tokens = re.search(r"(\d+) tokens in [\d.]+ s \((\d+) tokens/s\)", text)
    plan = re.search(r"plan: (\w+) \((.*)\)", text)
    gpu = re.search(r"peak GPU ([\d.]+) GiB", text)  # compute_gram.py's own figure, on cuda
    return dict(
        wall_s=wall,
        cpu_s=cpu,  # the machine is shared: cpu seconds say what the run itself cost
        peak_rss_gb=round(rss_kb * 1024 / 1e9, 3),
        peak_rss_gib=round(rss_kb / 2**20, 3),
        peak_gpu_gib=float(gpu.group(1)) if gpu else None,
        tokens=int(tokens.group(1)),
        tokens_per_s=int(tokens.group(2)),
        plan=plan.group(1),
        why=plan.group(2),
    )


def layer0_attention_error(model_dir: Path, rows: Path, gram_file: Path, num_examples: int, max_length: int) -> float:
    """Relative error (max abs / max abs) of the stored layer-0 attention-input gram against float64:
    the embedding rows of the calibration tokens -> RMSNorm with input_layernorm's weight -> XᵀX / n."""
    from regmean.calibration import calibration_tokens, load_tokenizer
    from regmean.tensor_io import GramFile, checkpoint_files, read_tensor

    config = json.loads((model_dir / "config.json").read_text())
    files = checkpoint_files(model_dir)
    ids = calibration_tokens(load_tokenizer(model_dir), str(rows), "code", "train", num_examples, max_length)
    flat = torch.tensor([i for row in ids for i in row])
    embed = read_tensor(files["model.embed_tokens.weight"], "model.embed_tokens.weight")
    x = embed[flat].double()
    del embed
    w = read_tensor(files["model.layers.0.input_layernorm.weight"], "model.layers.0.input_layernorm.weight").double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"]) * w
    want = x.T @ x / len(flat)
    key = "model.layers.0.self_attn.q_proj"
    try:
        got = GramFile(gram_file).get(key).double()
    except RuntimeError:  # safetensors maps the whole file (33 GB): refused where memory is short
        from regmean.layerwise import mapped_tensor

        got = mapped_tensor(gram_file, key).double()  # a full-square (v1) gram, mapped alone
    return ((got - want).abs().max() / want.abs().max()).item()


def run(
    model_dir: Path, work_dir: Path, num_examples: int, max_length: int, plan: str | None = None, device: str = "cpu"
) -> dict:
    """compute_gram.py on model_dir under /usr/bin/time -v, with the figures of the run."""
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = write_rows(work_dir / "rows.jsonl", num_examples)
    out = work_dir / (f"grams-{plan}" if plan else "grams")
    cmd = [sys.executable, "compute_gram.py", "code", "--model", str(model_dir), "--dataset", str(rows)]
    cmd += ["--num-examples", str(num_examples), "--max-length", str(max_length), "--device", device]
    cmd += ["--dtype", "float32", "--output-dir", str(out)] + (["--plan", plan] if plan else [])
    figures = time_v(cmd, work_dir / f"compute_gram{'-' + plan if plan else ''}.log")
    gram_file = out / "gram.safetensors"
    figures.update(gram_file_gb=round(gram_file.stat().st_size / 1e9, 3), command=" ".join(cmd))
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="compute_gram.py on it (no --plan: auto chooses), with the figures")
    r.add_argument("model_dir", type=Path)
    r.add_argument("--work-dir", type=Path, required=True)
    r.add_argument("--num-examples", type=int, default=8)
    r.add_argument("--max-length", type=int, default=512)
    r.add_argument("--plan", choices=["model", "layers"], help="force a plan (default: none, auto chooses)")
    r.add_argument("--device", default="cpu", help="cpu (the issue's measurement) or cuda (peak GPU memory too)")
    r.add_argument("--keep", action="store_true", help="keep the gram file (default: deleted once measured)")
    args = p.parse_args(argv)
    figures = run(args.model_dir, args.work_dir, args.num_examples, args.max_length, args.plan, args.device)
    out = args.work_dir / (f"grams-{args.plan}" if args.plan else "grams")
    figures["layer0_attention_rel_err_vs_float64"] = layer0_attention_error(
        args.model_dir, args.work_dir / "rows.jsonl", out / "gram.safetensors", args.num_examples, args.max_length
    )
    print(json.dumps(figures, indent=2))
    (args.work_dir / f"figures{'-' + args.plan if args.plan else ''}.json").write_text(json.dumps(figures, indent=2))
    if not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
