"""Peak memory of a RegMean merge against the number of experts N: flat when grams are read one at a time.

    python bench/bench_merge_n.py --before /tmp/before            # N = 2, 4, 8; /tmp/before: the code to compare
    python bench/bench_merge_n.py --experts 2 3 --hidden 256 --intermediate 1024 --vocab 256   # quick

N random bfloat16 Llama experts (bench/merge_inputs.py's writer: a shared base plus a small change each),
wide enough that the grams outweigh the weights (default hidden 1024, MLP 4096, 2 layers, vocab 1024:
a 4096-wide down_proj gram is 64 MB in float32), and a random gram per distinct input each (v2 files).
Each `merge_model.py regmean` runs in its own process; its peak RSS is that child's ru_maxrss (os.wait4),
and its rchar (bytes read through read() during merge_model.main: the gram files, as weights are
memory-mapped, plus the configs, tokenizer and lazily imported modules) is read by the child.
--before DIR runs the same merges with the code checked out in DIR (e.g. `git worktree add /tmp/before
971233f`), alternating with this one. Figures to stdout and, as JSON, to --output.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# The child: merge_model.main in the code of its working directory, then its own rchar on stdout.
CHILD = (
    "import json, sys; sys.path.insert(0, '.'); import merge_model; "
    "rchar = lambda: int(open('/proc/self/io').read().split()[1]); before = rchar(); "
    "merge_model.main(sys.argv[1:]); print('BENCH ' + json.dumps(dict(rchar=rchar() - before)))"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8], help="the numbers of experts N merged")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--before", help="a checkout of the code to compare with (its merge_model.py is run)")
    p.add_argument("--error-sample-every", type=int, default=256, help="merge_model.py's; 0: no output error figures")
    p.add_argument("--output", default="runs/bench_merge_n", help="folder of the inputs (reused) and figures")
    return p.parse_args(argv)


def prepare(folder: Path, args, count: int) -> None:
    """`count` experts and their v2 gram files under folder/expert{i} (skipped where already there)."""
    from merge_inputs import input_key, linear_shapes, synthetic_gram, write_expert
    from transformers import LlamaConfig

    from regmean.tensor_io import save_grams

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    shapes = linear_shapes(args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads, args.layers)
    aliases = {m: input_key(m) for m in shapes if input_key(m) != m}  # one gram per distinct input
    for i in range(count):
        expert = folder / f"expert{i}"
        if (expert / "gram.safetensors").exists():
            continue
        write_expert(expert, config, i)
        grams = {m: synthetic_gram(shapes[m][1], f"{m}/{i}") for m in shapes if m not in aliases}
        save_grams(expert / "gram.partial", grams, aliases, 100000, dict(model="synthetic", dataset="synthetic"))
        (expert / "gram.partial").rename(expert / "gram.safetensors")
        del grams


def run_merge(code: Path, folder: Path, num: int, args) -> dict:
    """One merge of the first `num` experts, in a child process running `code`'s merge_model.py."""
    experts = [str(folder / f"expert{i}") for i in range(num)]
    out = folder / f"merged-{num}"
    argv = ["regmean", "--models", *experts, "--grams", *[e + "/gram.safetensors" for e in experts]]
    argv += ["--alpha", str(args.alpha), "--output-dir", str(out), "--overwrite", "--device", "cpu"]
    argv += ["--dtype", "bfloat16", "--error-sample-every", str(args.error_sample_every)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    t0 = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *argv], cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    log = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"merge failed ({code}):\n{log}")
    io = json.loads(next(line for line in log.splitlines() if line.startswith("BENCH "))[6:])
    grams = sum((folder / f"expert{i}" / "gram.safetensors").stat().st_size for i in range(num))
    return dict(
        code=str(code),
        experts=num,
        wall_s=round(time.perf_counter() - t0, 2),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
        peak_rss_gib=round(usage.ru_maxrss / 2**20, 3),
        rchar_gb=round(io["rchar"] / 1e9, 4),
        gram_files_gb=round(grams / 1e9, 4),
        log_lines=[line for line in log.splitlines() if line.startswith(("grams:", "done in"))],
    )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    folder = Path(args.output) / f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
    prepare(folder, args, max(args.experts))
    codes = [ROOT] + ([Path(args.before).resolve()] if args.before else [])
    rows = []
    for num in args.experts:
        for code in codes:  # alternating, so that the machine's load falls on both alike
            row = run_merge(code, folder, num, args)
            rows.append(row)
            print(
                f"N={num} {'after' if code == ROOT else 'before'}: peak RSS {row['peak_rss_gib']:.3f} GiB, "
                f"wall {row['wall_s']:.1f} s, CPU {row['cpu_s']:.1f} s, rchar {row['rchar_gb']:.3f} GB "
                f"({row['rchar_gb'] / row['gram_files_gb']:.2f}x the gram files)",
                flush=True,
            )
    for code in codes:
        peaks = [r["peak_rss_gib"] for r in rows if r["code"] == str(code)]
        print(f"{'after' if code == ROOT else 'before'}: peak RSS max/min over N = {max(peaks) / min(peaks):.3f}")
    (Path(args.output) / "bench_merge_n.json").write_text(json.dumps(dict(args=vars(args), runs=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
