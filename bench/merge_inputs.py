"""The synthetic inputs of bench/bench_merge.py: two Llama-shaped bf16 experts (a shared random base plus a
small per-expert change, written as safetensors shards), SPD grams for them in this project's format and in
the seed's gram.pkl, and toy calibration rows for regmean++."""

import json
import pickle
import zlib

import torch

NUM_EXPERTS = 2


def linear_shapes(hidden, intermediate, vocab, heads, kv_heads, layers):
    """{module: (out, in)} of a Llama model's linear layers."""
    kv = hidden // heads * kv_heads
    per_layer = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    shapes = {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in per_layer.items()}
    shapes["lm_head"] = (vocab, hidden)
    return shapes


def input_key(module):
    """The module whose gram `module` shares: k/v read q's input, up reads gate's."""
    return module.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")


def seeded(name, *extra):
    return torch.Generator().manual_seed(zlib.crc32("/".join([name, *map(str, extra)]).encode()))


def synthetic_gram(n, seed_name, rank=256, floor=None):
    """An SPD gram with a spread spectrum: low rank plus a diagonal, like real activations.
    floor: the diagonal's scale relative to the low-rank part's top eigenvalue (None: 0.1-1,
    a well-conditioned gram; 1e-7 gives a condition number ~1e7)."""
    b = torch.randn(n, rank, generator=seeded(seed_name))
    d = torch.rand(n, generator=seeded(seed_name, "d")) * 0.9 + 0.1
    if floor is not None:
        d *= floor * (n**0.5 + rank**0.5) ** 2 / rank  # the top eigenvalue of b bᵀ / rank, about
    return b @ b.T / rank + torch.diag(d)


def write_expert(folder, config, index, max_shard_size="300MB"):
    """Random bf16 weights (a shared base plus a small per-expert change), written shard by shard."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config).state_dict()
    split = split_torch_state_dict_into_shards(
        {k: v.to(torch.bfloat16) for k, v in meta.items()}, max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            shape = meta[name].shape
            if name.endswith("norm.weight"):
                base = torch.ones(shape)
            else:
                base = torch.randn(shape, generator=seeded(name)) * 0.02
            shard[name] = (base + 0.002 * torch.randn(shape, generator=seeded(name, index))).to(torch.bfloat16)
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps(dict(metadata=split.metadata, weight_map=split.tensor_to_filename))
        )
    config.save_pretrained(str(folder))


def prepare(folder, args, layers):
    """Two experts and their grams in both formats under `folder` (skipped when already there)."""
    from transformers import LlamaConfig

    from regmean.tensor_io import save_grams

    done = folder / "done"
    if done.exists():
        return
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    shapes = linear_shapes(args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads, layers)
    for i in range(NUM_EXPERTS):
        write_expert(folder / f"expert{i}", config, i)
        aliases = {m: input_key(m) for m in shapes if input_key(m) != m}  # one gram per distinct input
        floor = 1e-6 if args.ill_conditioned else None
        stored = {m: synthetic_gram(shapes[m][1], f"{m}/{i}", floor=floor) for m in shapes if m not in aliases}
        save_grams(
            folder / f"expert{i}" / "gram.safetensors",
            stored,
            aliases,
            100000,
            dict(model="synthetic", dataset="synthetic"),
        )
        with open(folder / f"expert{i}" / "gram.pkl", "wb") as f:  # the seed's format: a tensor per module
            pickle.dump({m: stored[aliases.get(m, m)] for m in shapes}, f)
        del stored
    done.touch()


def condition_numbers(folder, alpha):
    """The condition number of layer 0's o_proj gram sum, plain and reduced by alpha, for the log
    (eigvalsh of one [hidden, hidden] matrix: seconds, where a cond of every gram would take minutes)."""
    from regmean.tensor_io import GramFile

    module = "model.layers.0.self_attn.o_proj"
    g = sum(GramFile(folder / f"expert{i}" / "gram.safetensors").get(module).double() for i in range(NUM_EXPERTS))
    reduced = g * alpha
    reduced.diagonal().copy_(g.diagonal())
    cond = []
    for m in (g, reduced):
        e = torch.linalg.eigvalsh(m)
        cond.append(e[-1].item() / e[0].item())
    return f"o_proj gram sum cond {cond[0]:.1e} (reduced, alpha {alpha}: {cond[1]:.1e})"


def prepare_calibration(folder, num_examples):
    """Toy chat rows (code and math, as demo.py writes them) and a local BPE tokenizer with the chat
    template in each expert folder, for regmean++ (skipped when already there)."""
    import random

    import demo

    files = [folder / f"calib_{kind}.jsonl" for kind in ("code", "math")]
    if all(f.exists() for f in files) and len(files[0].read_text().splitlines()) == num_examples:
        return files
    rng = random.Random(0)
    rows = {
        kind: [make(rng) for _ in range(num_examples)]
        for kind, make in (("code", demo.code_row), ("math", demo.math_row))
    }
    tokenizer = demo.build_tokenizer(
        [json.dumps(r) for kind in rows for r in rows[kind]], folder / "tokenizer", vocab_size=512, split_digits=True
    )
    for i in range(NUM_EXPERTS):
        tokenizer.save_pretrained(str(folder / f"expert{i}"))
    for f, kind in zip(files, rows):
        demo.write_jsonl(f, rows[kind])
    return files
