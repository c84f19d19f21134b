"""A randomly initialised Llama-3-8B-shaped model folder, for measurements at the real size.

    python bench/make_llama3_8b_shaped.py                          # -> runs/models/llama3-8b-shaped (16.1 GB)
    python bench/make_llama3_8b_shaped.py --num-layers 1 --output-dir /tmp/l3-1layer   # 2.5 GB, seconds

Llama-3-8B's shapes: hidden 4096, MLP 14336, 32 decoder layers, 32 query heads over 8 key/value heads,
a 128256-token vocabulary, untied lm_head, bfloat16 safetensors shards of at most --max-shard-size with
their index, config.json (Llama-3-8B-Instruct's settings: rope theta 500000, 8192 positions) and a
tokenizer of exactly 128256 tokens with Llama-3's special tokens and chat template.

The weights are drawn as transformers initialises a Llama (normal with std initializer_range = 0.02,
norms at 1), seeded per tensor, and written one block of rows at a time straight to their place in
the shards (tensor_io.ShardWriter), so the writer stays small (a few hundred MB resident, whatever
--num-layers) while 16 GB go to disk.

The tokenizer is built here, not downloaded: a byte-level BPE whose 128000 ordinary tokens are the
256 byte symbols, every pair of them and then byte triples (merges in that order), followed by
Llama-3's 256 special tokens at ids 128000-128255 (<|begin_of_text|>, <|eot_id|>, the reserved
ones, ...). It tokenises any text, about 2-3 bytes per token; what the tokens mean does not matter
for a random model, only that every id is a row of the embedding.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from regmean.tensor_io import ShardWriter  # noqa: E402
from regmean.utils import UserError, atomic_dir, check_at_least_one  # noqa: E402
from utils import run_main

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128009,
)
NUM_ORDINARY = 128000  # Llama-3's BPE tokens; its 256 special tokens follow
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHUNK_ELEMENTS = 1 << 25  # rows drawn per step: 128 MB of float32 at most


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/models/llama3-8b-shaped", help="model folder (default: %(default)s)")
    p.add_argument("--num-layers", type=int, default=32, help="decoder layers (default: %(default)s, as Llama-3-8B)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard file (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    return p.parse_args(argv)


def special_tokens() -> list[str]:
    """Llama-3's 256 special tokens in id order (128000 + position)."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        9: "<|eot_id|>",
    }
    out, reserved = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def build_tokenizer(out_dir: Path):
    """The 128256-token byte-level BPE described above, saved as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab = {s: i for i, s in enumerate(alphabet)}
    merges = []
    for a in alphabet:  # every pair: 65536 tokens
        for b in alphabet:
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    for pair in list(vocab)[len(alphabet) : len(alphabet) + 256 * 256]:  # then triples until 128000
        for c in alphabet:
            if len(vocab) == NUM_ORDINARY:
                break
            merges.append((pair, c))
            vocab[pair + c] = len(vocab)
        if len(vocab) == NUM_ORDINARY:
            break
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens()
    tok.add_special_tokens(specials)
    bos = specials[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, NUM_ORDINARY)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", chat_template=CHAT_TEMPLATE
    )
    assert len(hf) == LLAMA3_8B["vocab_size"] and hf.convert_tokens_to_ids("<|eot_id|>") == 128009
    hf.save_pretrained(str(out_dir))
    return hf


def weight_plan(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor name: (shape, bfloat16)} of the model, in transformers' own order, from a skeleton on
    the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: (tuple(t.shape), torch.bfloat16) for name, t in model.state_dict().items()}


def write_weights(out_dir: Path, config, max_shard_size: str, seed: int) -> int:
    """Draw and write every tensor, a block of rows at a time; returns the bytes written."""
    from tqdm import tqdm

    plan = weight_plan(config)
    writer = ShardWriter(out_dir, plan, max_shard_size)
    total = sum(torch.Size(shape).numel() * 2 for shape, _ in plan.values())
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="weights", file=sys.stderr) as bar:
            for i, (name, (shape, dtype)) in enumerate(plan.items()):
                gen = torch.Generator().manual_seed(seed * 100003 + i)
                if name.endswith("norm.weight"):  # RMSNorm weights start at 1
                    writer.write(name, torch.ones(shape, dtype=dtype))
                    bar.update(torch.Size(shape).numel() * 2)
                    continue
                rows, cols = shape[0], (shape[1] if len(shape) > 1 else 1)
                step = max(1, CHUNK_ELEMENTS // cols)
                for r in range(0, rows, step):
                    n = min(step, rows - r)
                    block = torch.randn((n, *shape[1:]), generator=gen).mul_(config.initializer_range)
                    writer.write(name, block.to(dtype), row=r)
                    bar.update(block.numel() * 2)
                    del block
        writer.finish()
    finally:
        writer.close()
    return total


def main(argv=None):
    args = parse_args(argv)
    check_at_least_one(num_layers=args.num_layers)
    from transformers import GenerationConfig, LlamaConfig

    out = Path(args.output_dir)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    start = time.perf_counter()
    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.num_layers})
    config.dtype = torch.bfloat16
    with atomic_dir(out, overwrite=args.overwrite) as folder:
        folder = Path(folder)
        config.save_pretrained(folder)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(folder)
        build_tokenizer(folder)
        size = write_weights(folder, config, args.max_shard_size, args.seed)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KB on Linux
    print(
        f"{out}: Llama-3-8B-shaped, {args.num_layers} layer(s), {size / 1e9:.2f} GB of bfloat16 weights, "
        f"{time.perf_counter() - start:.0f} s, peak resident memory {peak_gb:.2f} GB"
    )
    print(json.dumps(dict(output_dir=str(out), layers=args.num_layers, bytes=size, peak_rss_gb=round(peak_gb, 3))))


if __name__ == "__main__":
    run_main(main)
