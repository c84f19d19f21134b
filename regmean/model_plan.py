"""The whole-model plan of stage 1 (compute_gram.py --plan model): the expert loaded whole (a LoRA folded in),
a hook on every distinct linear input accumulating its gram over the calibration batches, this process's
share of them, and the partial sums checkpointed every K batches. grams.py runs it; the layer plan is
layerwise.py's.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .calibration import (
    HELD,
    Gram,
    RunningMeanGram,
    check_one_row_per_token,
    collate,
    file_order_batches,
    find_shared_inputs,
    fit_and_held_positions,
    length_batches,
    pad_batch,
    split_batches,
)
from .ranks import all_reduce_grams, meet
from .tensor_io import write_safetensors
from .utils import Progress, UserError, first_line

CHECKPOINT_FILE = ".gram-checkpoint.safetensors"


def checkpoint_path(out_dir: str | Path, rank: int = 0, num_processes: int = 1) -> Path:
    """One checkpoint per process: each holds the partial sums of its own share."""
    if num_processes == 1:
        return Path(out_dir) / CHECKPOINT_FILE
    return Path(out_dir) / CHECKPOINT_FILE.replace(".safetensors", f".rank{rank}-of-{num_processes}.safetensors")


def check_no_foreign_checkpoints(out_dir: str | Path, num_processes: int) -> None:
    """A checkpoint left by a run with another number of processes covers another split of
    the batches: refuse it rather than silently starting over."""
    ours = {checkpoint_path(out_dir, r, num_processes) for r in range(num_processes)}
    foreign = sorted(
        p.name for p in Path(out_dir).glob(CHECKPOINT_FILE.replace(".safetensors", "*.safetensors")) if p not in ours
    )
    if foreign:
        raise UserError(
            f"{out_dir} holds checkpoint(s) of a run with another number of processes ({', '.join(foreign)}); "
            f"rerun with that number to resume, or delete them to start over"
        )


def save_checkpoint(path: Path, grams: dict[str, Gram], batches_done: int, settings: dict) -> None:
    """Partial sums + progress + the run's settings, written atomically, one tensor at a time."""
    meta = {
        "settings": json.dumps(settings, sort_keys=True),
        "batches_done": str(batches_done),
        "num_rows": json.dumps({k: g.num_rows for k, g in grams.items()}),
    }
    write_safetensors(path, {k: g.sum for k, g in grams.items()}, meta)


def load_checkpoint(path: Path, grams: dict[str, Gram], settings: dict) -> int:
    """Fill `grams` from the checkpoint and return the number of batches it covers."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        saved = json.loads(meta["settings"])
        if saved != settings:
            diff = ", ".join(
                f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now"
                for k in settings
                if saved.get(k) != settings.get(k)
            )
            raise UserError(
                f"{path} was made with other settings ({diff}); "
                "rerun with those settings to resume, or delete it to start over"
            )
        num_rows = json.loads(meta["num_rows"])
        for key, gram in grams.items():
            gram.sum = f.get_tensor(key)  # its block rows (a full square from an older checkpoint is cut)
            gram.num_rows = num_rows[key]
    return int(meta["batches_done"])


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where a module computes: its weight's device, or `default` for a weight offloaded by
    accelerate (kept on the meta device and brought in per forward)."""
    device = module.weight.device
    return default if device.type == "meta" else device


def accumulate_grams(
    model: nn.Module,
    token_ids: list[list[int]],
    batch_size: int,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    settings: dict | None = None,
    progress: bool = True,
    rank: int = 0,
    num_processes: int = 1,
    padding: tuple[int, str] | None = None,
    held_out: frozenset[int] = frozenset(),
) -> tuple[dict[str, Gram], dict[str, str], int]:
    """Accumulate the grams of every distinct linear-layer input of `model` over the
    examples `token_ids` (lists of ids), or over share `rank` of `num_processes` of their
    batches (see split_batches). Each gram lives on its module's device (a model spread
    over several GPUs keeps each layer's grams beside it). Returns ({stored key: Gram},
    aliases, number of tokens run in this call: fewer than its share when resuming).
    padding: (pad id, side) for the reference's batches (--rows reference, one process): file order,
    padded on that side, every position counted in a running mean (calibration.RunningMeanGram).
    held_out: rows (indices into token_ids) whose tokens go to a second gram per input, keyed HELD + its key,
    in the same forward passes (--holdout); the other rows' tokens go to the first."""
    device = model.device
    probe = torch.tensor([token_ids[0][:16]], device=device)
    leaders, aliases, head_name, head_reads_base_output = find_shared_inputs(model, probe)
    kind = Gram if padding is None else RunningMeanGram
    grams = {name: kind(m.in_features, module_device(m, device)) for name, m in leaders.items()}
    if held_out:
        grams |= {HELD + name: kind(m.in_features, module_device(m, device)) for name, m in leaders.items()}
    lengths = [len(ids) for ids in token_ids]
    if padding is None:
        batches = split_batches(length_batches(lengths, batch_size), lengths, num_processes)[rank]
    else:
        batches = file_order_batches(len(token_ids), batch_size)

    start = 0
    if checkpoint is not None and checkpoint.exists():
        start = load_checkpoint(checkpoint, grams, settings)
        who = f"rank {rank}: " if num_processes > 1 else ""
        print(f"{who}resuming from {checkpoint}: {start}/{len(batches)} batches done", file=sys.stderr)

    batch_rows = {}  # the batch being run: flat indices of its real tokens, read by the hooks

    def accumulate(name):
        def hook(module, args):
            check_one_row_per_token(name, args[0], batch_rows["total"])
            grams[name].add(args[0], batch_rows["index"])
            if held_out:
                grams[HELD + name].add(args[0], batch_rows["held"])

        return hook

    skip_head = head_reads_base_output  # lm_head fed from the base model's output, no logits
    hooks = [
        m.register_forward_pre_hook(accumulate(name))
        for name, m in leaders.items()
        if not (skip_head and name == head_name)
    ]

    def positions(batch):  # what the grams count: the real tokens, or every position of the padded batch
        return len(batch) * max(lengths[i] for i in batch) if padding else sum(lengths[i] for i in batch)

    total_tokens = sum(positions(batch) for batch in batches)
    done_tokens = sum(positions(batch) for batch in batches[:start])
    bar = Progress(
        total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, desc="gram", disable=not progress
    )
    tokens_run = 0  # counted here: a disabled bar counts nothing
    try:
        with torch.inference_mode():
            for b in range(start, len(batches)):
                if padding is None:
                    input_ids, mask = collate(token_ids, batches[b])
                    fit, held = fit_and_held_positions(batches[b], mask, held_out)
                    batch_rows["index"] = fit.to(device, non_blocking=True)
                    batch_rows["held"] = held.to(device, non_blocking=True)
                else:  # the reference's: every position, padding included
                    input_ids, mask = pad_batch(token_ids, batches[b], *padding)
                    batch_rows["index"] = None
                batch_rows["total"] = mask.numel()
                counted = mask.numel() if padding else len(batch_rows["index"]) + len(batch_rows["held"])
                input_ids, mask = input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                if skip_head:
                    hidden = model.base_model(
                        input_ids=input_ids, attention_mask=mask, use_cache=False
                    ).last_hidden_state
                    grams[head_name].add(hidden, batch_rows["index"])
                    if held_out:
                        grams[HELD + head_name].add(hidden, batch_rows["held"])
                    del hidden
                else:
                    model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                tokens_run += counted
                bar.update(counted)
                if (
                    checkpoint is not None
                    and checkpoint_every
                    and (b + 1) % checkpoint_every == 0
                    and b + 1 < len(batches)
                ):
                    save_checkpoint(checkpoint, grams, b + 1, settings)
    finally:
        bar.close()
        for h in hooks:
            h.remove()
    return grams, aliases, tokens_run


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    device_map: str | None = None,
    max_memory: dict[int, int] | None = None,
    adapter: Path | None = None,
) -> nn.Module:
    """The expert for the whole-model plan, in `dtype`, on `device` or spread by `device_map` (cuda); a LoRA
    expert as its base with the `adapter` folder folded in, in memory (peft's merge_and_unload): its linear
    layers, their names and their inputs are then the folded dense model's."""
    from transformers import AutoModelForCausalLM

    # flash-attention-2 where installed (cuda only), else PyTorch's sdpa
    attn = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    # --device-map: accelerate's big-model loading spreads the layers over the GPUs
    placement = (
        dict(device_map=device_map, max_memory=max_memory)
        if device_map and device.type == "cuda"
        else dict(device_map=str(device))
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn, **placement)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load a causal LM from {model_dir}: {first_line(e)}") from e
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


def whole_model_grams(
    model_dir: Path,
    token_ids: list[list[int]],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    device_map: str | None,
    max_memory: dict[int, int] | None,
    checkpoint: Path,
    checkpoint_every: int,
    settings: dict,
    state,
    padding: tuple[int, str] | None = None,
    adapter: Path | None = None,
    held_out: frozenset[int] = frozenset(),
) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """--plan model: this process's share through the whole expert (a LoRA: its base with `adapter` folded in),
    then every process's sums added up. Returns ({stored key: packed gram, each on its device}, aliases, tokens
    run by all processes; held_out: see accumulate_grams, their grams keyed HELD + key)."""
    model = load_model(model_dir, device, dtype, device_map, max_memory, adapter)
    grams, aliases, tokens_run = accumulate_grams(
        model,
        token_ids,
        batch_size,
        checkpoint,
        checkpoint_every,
        settings,
        progress=state.is_main_process,
        rank=state.process_index,
        num_processes=state.num_processes,
        padding=padding,
        held_out=held_out,
    )
    del model
    meet()  # every share is done, or one rank failed and all stop here
    tokens_run = all_reduce_grams(grams, tokens_run)
    return {key: gram.packed() for key, gram in grams.items()}, aliases, tokens_run  # in place, each on its device
