"""Bytes a RegMean merge reads: each gram once, each expert weight once.

    python bench/bench_merge_io.py                      # 2 random Llama-shaped experts, hidden 1024, 4 layers
    python bench/bench_merge_io.py --format v1          # the grams stored as full squares (the old format)
    python bench/bench_merge_io.py --hidden 4096 --intermediate 14336 --layers 1 --heads 32 --kv-heads 8 \
        --vocab 128256                                  # one Llama-3-8B-shaped layer (5 GB of experts, 1 GB of grams)

Two experts with random bfloat16 weights (bench/make_llama3_8b_shaped.py's writer) and one random
well-conditioned gram per distinct linear input each (q/k/v and gate/up share theirs, as
compute_gram.py stores them), in gram.safetensors format v2 (packed upper triangles) or v1 (full
squares), then `merge_model.py regmean` on them, in this process, with three counts:
- rchar of /proc/self/io: every byte this process read through read() calls. The gram files are
  read so (GramFile), the safetensors weights are not (they are memory-mapped), so a merge that
  reads each gram once has rchar ≈ the gram files' size;
- the file bytes GramFile.get took (its bytes_read, summed over the merge's gram files);
- the bytes of expert weights the merge asked for (experts.read_tensor, behind Expert.read, wrapped to count).
The figures go to stdout and, as JSON, to --output (a folder that also holds the inputs, reused
by later runs with the same sizes, and the merged model, replaced each run).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_llama3_8b_shaped import write_weights  # noqa: E402

import merge_model  # noqa: E402
from regmean import experts as expert_io  # noqa: E402
from regmean import tensor_io  # noqa: E402
from regmean.tensor_io import GramFile, save_grams, write_safetensors  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default: %(default)s)")
    p.add_argument("--intermediate", type=int, default=3584, help="MLP size (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default: %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default: %(default)s)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary (default: %(default)s)")
    p.add_argument("--format", choices=["v2", "v1"], default="v2", help="gram file format (default: %(default)s)")
    p.add_argument("--output", default="runs/bench/merge_io", help="work folder (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="where the solves run (default: %(default)s)")
    return p.parse_args(argv)


def random_gram(n: int, seed: int) -> torch.Tensor:
    """A well-conditioned random gram: low-rank data plus a diagonal floor."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 64, generator=g)
    return a @ a.T / 64 + torch.diag(torch.rand(n, generator=g) * 0.9 + 0.1)


def input_key(module: str) -> str:
    """The stored gram of a module's input: k/v read q's, up reads gate's."""
    for other, leader in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj")):
        if module.endswith(other):
            return module[: -len(other)] + leader
    return module


def prepare(folder: Path, args) -> list[Path]:
    """Two experts under `folder`, each with its gram file in the chosen format (kept for reuse)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
    )
    config.dtype = torch.bfloat16
    experts = []
    for i in range(2):
        expert = folder / f"expert{i}"
        if not (expert / "done").exists():
            shutil.rmtree(expert, ignore_errors=True)
            expert.mkdir(parents=True)
            config.save_pretrained(expert)
            write_weights(expert, config, "5GB", seed=i)
            (expert / "done").touch()
        gram_file = folder / f"gram{i}-{args.format}.safetensors"  # beside, not in, the expert's folder
        if not gram_file.exists():
            with torch.device("meta"):
                from transformers import AutoModelForCausalLM

                names = [
                    n
                    for n, m in AutoModelForCausalLM.from_config(config).named_modules()
                    if isinstance(m, torch.nn.Linear)
                ]
            aliases = {m: input_key(m) for m in names if input_key(m) != m}
            widths = {m: config.intermediate_size if m.endswith("down_proj") else config.hidden_size for m in names}
            grams = {m: random_gram(widths[m], seed=1000 * i + k) for k, m in enumerate(names) if m not in aliases}
            if args.format == "v2":
                save_grams(gram_file, grams, aliases, 1000, dict(model=str(expert)))
            else:  # what save_grams wrote before format v2
                meta = dict(model=str(expert), num_tokens="1000", aliases=json.dumps(aliases), format="regmean-gram-v1")
                write_safetensors(gram_file, grams, meta, dtype=torch.float32)
        experts.append(expert)
    return experts


def rchar() -> int:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def main(argv=None):
    args = parse_args(argv)
    folder = Path(args.output) / f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
    experts = prepare(folder, args)
    grams = [folder / f"gram{i}-{args.format}.safetensors" for i in range(len(experts))]
    gram_bytes = sum(g.stat().st_size for g in grams)
    weight_bytes = sum(f.stat().st_size for e in experts for f in e.glob("model*.safetensors"))

    counts = {"grams": 0, "weights": 0}
    read_tensor, get = expert_io.read_tensor, GramFile.get

    def counting_read(file, name, rows=None):
        t = read_tensor(file, name, rows)
        counts["weights"] += t.numel() * t.element_size()
        return t

    def counting_get(self, module):
        before = self.bytes_read
        try:
            return get(self, module)
        finally:
            counts["grams"] += self.bytes_read - before

    expert_io.read_tensor, tensor_io.GramFile.get = counting_read, counting_get
    out = folder / "merged"
    command = ["regmean", "--models", *map(str, experts), "--grams", *map(str, grams)]
    command += ["--output-dir", str(out), "--overwrite", "--device", args.device, "--error-sample-every", "0"]
    start, before = time.perf_counter(), rchar()
    try:
        merge_model.main(command)
    finally:
        expert_io.read_tensor, tensor_io.GramFile.get = read_tensor, get
    read, seconds = rchar() - before, time.perf_counter() - start
    figures = dict(
        format=args.format,
        gram_files_gb=gram_bytes / 1e9,
        weight_files_gb=weight_bytes / 1e9,
        rchar_gb=read / 1e9,
        gram_bytes_read_gb=counts["grams"] / 1e9,
        weight_bytes_read_gb=counts["weights"] / 1e9,
        gram_reads_per_byte=counts["grams"] / gram_bytes,
        seconds=round(seconds, 1),
        shapes=dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab),
    )
    print(
        f"\nmerge of 2 experts, grams {args.format}: read {(counts['grams'] + counts['weights']) / 1e9:.3f} GB "
        f"({counts['grams'] / 1e9:.3f} GB of grams, {counts['weights'] / 1e9:.3f} GB of weights) for "
        f"{gram_bytes / 1e9:.3f} GB of gram files + {weight_bytes / 1e9:.3f} GB of weight files; "
        f"rchar {read / 1e9:.3f} GB; each gram byte read {counts['grams'] / gram_bytes:.3f} times; {seconds:.1f} s"
    )
    (folder / f"merge_io-{args.format}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
