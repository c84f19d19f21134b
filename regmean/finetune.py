"""Small supervised fine-tuning on the CPU, and how far it moved the weights: what demo.py builds its experts with.

examples = sft_examples(tokenizer, rows, "math")            # (token ids, loss mask) per row
train(model, examples, steps=40, batch_size=8, lr=1e-4, seed=0, desc="math", trainable=lambda n: "embed" not in n)
lora = with_lora(model, rank=16, lora_alpha=32)            # peft: fresh LoRA factors on every projection
train(lora.base_model.model, examples, 24, 8, 1e-3, 0, "math", trainable=is_lora)   # then lora.save_pretrained(dir)
weight_drift(base_dir, {"code": code_dir, "math": math_dir})  # per module kind, relative to the base's norm
"""

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .calibration import format_rows, tokenize_texts
from .tensor_io import checkpoint_files, read_tensor
from .utils import FORMATS, Progress

Example = tuple[list[int], list[int]]  # token ids, loss mask (1 where the token is a target)
# The linear layers a LoRA expert adapts: every projection of a Llama-style decoder layer (not the tied head).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sft_examples(tokenizer, rows: list[dict], fmt: str, reply_only: bool = True) -> list[Example]:
    """Rows -> (token ids, loss mask) pairs, tokenized as compute_gram.py tokenizes them (the chat template writes
    any BOS). reply_only: the loss sees the assistant's reply and its end-of-turn token only, as in supervised
    fine-tuning; else every token but the first."""
    texts = format_rows(rows, fmt, tokenizer)
    out = []
    for row, ids in zip(rows, tokenize_texts(tokenizer, texts, max_length=10_000)):
        if reply_only:
            messages = [{"role": role, "content": str(row[col])} for role, col in FORMATS[fmt][:-1]]
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=False
            )
            mask = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
        else:
            mask = [0] + [1] * (len(ids) - 1)
        out.append((ids, mask))
    return out


def with_lora(model, rank: int, lora_alpha: int, targets=LORA_TARGETS):
    """The model wrapped by peft with fresh LoRA factors (B = 0, so it starts as the model) on `targets`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(targets))
    return get_peft_model(model, config)


def is_lora(name: str) -> bool:
    """A parameter that LoRA training trains: the factors, not the base."""
    return "lora_A" in name or "lora_B" in name


def reply_loss(model, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions `mask` marks as targets. The output layer runs on those
    positions only: with a 49k vocabulary it costs as much as several decoder layers per token, and in supervised
    fine-tuning most tokens are prompt."""
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    targets = mask[:, 1:].bool()
    logits = model.lm_head(hidden[:, :-1][targets])
    return torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][targets])


def train(
    model,
    examples: list[Example],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
    trainable: Callable[[str], bool] | None = None,
    autocast: bool = False,
) -> tuple[float, int]:
    """AdamW with linear warm-up and cosine decay on right-padded batches drawn at random from `examples`.
    trainable(name) picks the parameters that train (default: all); autocast runs the forward pass in bfloat16
    (the weights and the optimizer stay float32). Returns the last loss and the number of tokens trained on."""
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or trainable(name))
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    bar = Progress(range(steps), desc=desc, leave=False)
    tokens = 0
    for _ in bar:
        batch = [examples[i] for i in torch.randint(len(examples), (batch_size,), generator=g).tolist()]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in batch])
        mask = torch.tensor([m + [0] * (width - len(m)) for _, m in batch])
        attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        tokens += int(attention.sum())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = reply_loss(model, ids, attention, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return loss.item(), tokens


@torch.no_grad()
def greedy_accuracy(
    model, tokenizer, rows: list[dict], fmt: str, batch_size: int = 64, max_new_tokens: int = 32
) -> float:
    """Exact-match accuracy of greedy replies (a quick check, independent of lm_eval)."""
    *prompt_turns, (_, answer_col) = FORMATS[fmt]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    hits = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": r, "content": row[c]} for r, c in prompt_turns], tokenize=False, add_generation_prompt=True
            )
            for row in chunk
        ]
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        replies = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(reply.strip() == row[answer_col].strip() for reply, row in zip(replies, chunk))
    tokenizer.padding_side = side
    return hits / len(rows)


# ----------------------------------------------------------------------------- drift
def module_kind(name: str) -> str:
    """A checkpoint tensor's kind: the projection's name (q_proj, ..., down_proj), embed_tokens, lm_head, or norm."""
    if "norm" in name:
        return "norm"
    found = re.search(r"(\w+_proj|embed_tokens|lm_head)\.weight$", name)
    return found.group(1) if found else name


def weight_drift(base_dir: str | Path, experts: dict[str, str | Path]) -> dict[str, dict[str, float]]:
    """How far fine-tuning moved each expert, per module kind: ‖Wₑ − W_base‖ / ‖W_base‖ for each expert e, and
    ‖W₁ − W₂‖ / ‖W_base‖ for each pair, the norms taken over all tensors of that kind (float64).
    Returns {kind: {"code": .., "math": .., "code vs math": ..}}, plus "all" over every tensor. A tensor the base
    lacks (a tied lm_head) is skipped."""
    names = list(experts)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    base_files = checkpoint_files(base_dir)
    expert_files = {e: checkpoint_files(d) for e, d in experts.items()}
    sums: dict[str, dict[str, float]] = {}
    for tensor, file in base_files.items():
        base = read_tensor(file, tensor).double()
        weights = {e: read_tensor(files[tensor], tensor).double() for e, files in expert_files.items()}
        for kind in (module_kind(tensor), "all"):
            acc = sums.setdefault(kind, dict.fromkeys(["base"] + names + [f"{a} vs {b}" for a, b in pairs], 0.0))
            acc["base"] += base.square().sum().item()
            for e in names:
                acc[e] += (weights[e] - base).square().sum().item()
            for a, b in pairs:
                acc[f"{a} vs {b}"] += (weights[a] - weights[b]).square().sum().item()
    order = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
        "embed_tokens",
        "norm",
    ]
    kinds = sorted(sums, key=lambda k: (k == "all", order.index(k) if k in order else len(order), k))
    return {
        kind: {k: math.sqrt(v / sums[kind]["base"]) for k, v in sums[kind].items() if k != "base"} for kind in kinds
    }


def drift_table(drift: dict[str, dict[str, float]]) -> str:
    """weight_drift's figures as a markdown table, in percent."""
    columns = list(next(iter(drift.values())))
    lines = [
        "| Module kind | " + " | ".join(f"{c} (%)" if " vs " in c else f"{c} vs base (%)" for c in columns) + " |",
        "| ---- |" + " ---- |" * len(columns),
    ]
    for kind, row in drift.items():
        lines.append(f"| {kind} | " + " | ".join(f"{100 * row[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"
