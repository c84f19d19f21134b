"""RegMean++ (Nguyen et al., arXiv 2508.03121): RegMean whose grams are taken layer by layer on
the merged model's own activations. The recipe:

    1. every tensor outside the decoder layers, final norm and lm_head: the weighted mean;
    2. the merged embeddings of each expert's calibration tokens are the hidden states of layer 0;
    3. per decoder layer l: each expert's own layer l runs on the hidden states (merged layers
       0..l-1 on that expert's tokens), the grams of its linear inputs give layer l's RegMean
       merge, and the merged layer l moves the hidden states on;
    4. the final norm is the mean; lm_head's grams come from each expert's final norm on the
       merged last hidden states.

One decoder layer of one expert is in memory at a time. The engine that runs decoder layers one by
one on stored hidden states (skeleton, weights from the safetensors files, rotary and masks per
model type, the hidden-state store) is regmean/layerwise.py's, shared with compute_gram.py --plan layers.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .calibration import (
    BATCH_SIZE,
    MAX_LENGTH,
    NUM_EXAMPLES,
    SPLIT,
    Gram,
    calibration_tokens,
    collate,
    length_batches,
    load_tokenizer,
)
from .experts import Expert
from .layerwise import DecoderAdapter, HiddenStates, layer_grams, load_module
from .merging import StreamingMerge
from .utils import FORMATS, PRESETS, Progress, UserError


# ----------------------------------------------------------------------------- calibration data
@dataclass
class CalibrationSettings:
    split: str = SPLIT
    num_examples: int = NUM_EXAMPLES
    max_length: int = MAX_LENGTH
    batch_size: int = BATCH_SIZE


@dataclass
class CalibrationSet:
    """One expert's calibration tokens in length batches: (input_ids, attention_mask, flat
    indices of the real tokens) each, and where they come from (for the report and model card)."""

    batches: list[tuple[Tensor, Tensor, Tensor]]
    provenance: dict

    @property
    def num_tokens(self) -> int:
        return self.provenance["num_tokens"]


def calibration_sets(
    experts: list[Expert], datasets: list[str] | None, formats: list[str] | None, settings: CalibrationSettings
) -> list[CalibrationSet]:
    """Each expert's calibration examples as token ids (rendered and tokenized as compute_gram.py
    does, with the expert's own tokenizer), all checked before any model is loaded."""
    if datasets is None:
        missing = [e.spec for e in experts if e.spec not in PRESETS]
        if missing:
            raise UserError(f"no default data for {missing[0]!r} (not a preset): pass --datasets, one per model")
    datasets = datasets or [e.spec for e in experts]
    if len(datasets) != len(experts):
        raise UserError(f"--datasets has {len(datasets)} datasets for {len(experts)} models")
    formats = formats or [None]
    if len(formats) not in (1, len(experts)):
        raise UserError(f"--formats has {len(formats)} formats for {len(experts)} models (give one, or one per model)")
    formats = formats * len(experts) if len(formats) == 1 else formats
    sets = []
    for e, dataset, fmt in zip(experts, datasets, formats):
        fmt = fmt or (PRESETS[dataset]["format"] if dataset in PRESETS else None)
        if fmt is None:
            raise UserError(f"dataset {dataset!r} is not a preset: pass --formats ({' or '.join(FORMATS)})")
        s = settings
        token_ids = calibration_tokens(load_tokenizer(e.dir), dataset, fmt, s.split, s.num_examples, s.max_length)
        lengths = [len(ids) for ids in token_ids]
        batches = []
        for batch in length_batches(lengths, s.batch_size):
            input_ids, mask = collate(token_ids, batch)
            batches.append((input_ids, mask, mask.flatten().nonzero().squeeze(1)))
        sets.append(
            CalibrationSet(
                batches,
                dict(
                    dataset=PRESETS[dataset]["dataset"] if dataset in PRESETS else dataset,
                    row_format=fmt,
                    split=s.split,
                    num_examples=len(token_ids),
                    max_length=s.max_length,
                    num_tokens=sum(lengths),
                ),
            )
        )
    return sets


# ----------------------------------------------------------------------------- the recipe
def expert_module(model: DecoderAdapter, template: torch.nn.Module, prefix: str, e: Expert) -> torch.nn.Module:
    """One of expert e's modules (a decoder layer, the final norm) made real: from its files, or a LoRA expert's
    tensors folded into its base as read (one layer's at a time)."""
    if e.lora is None:
        return load_module(template, prefix, model.device, model.dtype, files=e.files)
    tensors = {f"{prefix}.{k}": e.read(f"{prefix}.{k}") for k in template.state_dict()}
    return load_module(template, prefix, model.device, model.dtype, tensors=tensors)


def merge_regmean_pp(
    merge: StreamingMerge, calib: list[CalibrationSet], forward_dtype: torch.dtype, states: HiddenStates
) -> list[dict]:
    """RegMean++ layer by layer into merge.writer (see the module docstring). Returns the report rows."""
    experts, device, timer = merge.experts, merge.device, merge.timer
    model = DecoderAdapter(experts[-1].dir, experts[0].infos, device, forward_dtype)
    infos, report = experts[0].infos, []
    num_layers = len(model.layers)

    # 1. Everything outside the decoder layers, final norm and lm_head: the mean, written first.
    norm_names = [n for n in infos if n.startswith(model.norm_prefix + ".")]
    special = {model.embed_name, model.head_name, *norm_names}
    for name in infos:
        if name not in special and not any(model.in_layer(name, l) for l in range(num_layers)):
            merge.mean(name)
    # 2. Layer 0 reads the merged embeddings of each expert's tokens.
    embed = merge.mean(model.embed_name, keep=True).to(device, forward_dtype)
    for i, c in enumerate(calib):
        for b, (input_ids, _, index) in enumerate(c.batches):
            states.put((i, b), model.embed(embed, input_ids.flatten()[index].to(device)))
    del embed

    # 3. Per layer: grams on each expert's own layer, the RegMean solve, the hidden states moved on.
    for l in Progress(range(num_layers), desc="regmean++", unit="layer"):
        prefix = model.layer_prefix(l)
        grams, aliases = [], {}
        for i, e in enumerate(experts):
            with timer("load"):
                layer = expert_module(model, model.layers[l], prefix, e)
            with timer("forward"), torch.no_grad():  # no_grad, not inference_mode: version counters tell shared inputs

                def run_batch(b, layer=layer, i=i, l=l):
                    return model.run_layer(layer, l, states.get((i, b)), calib[i].batches[b])

                grams.append(layer_grams(layer, run_batch, calib[i].batches, aliases, device))
            del layer, run_batch
        merged = {}
        for leader in list(grams[0]):
            members = [f"{prefix}.{m}.weight" for m in [leader] + [a for a, k in aliases.items() if k == leader]]
            counts = [g[leader].num_rows for g in grams]
            with timer("solve"):
                results = [g.pop(leader).result() for g in grams]
            rows, kept = merge.linear_group(members, results.__getitem__, counts, keep=True)
            del results
            report += [dict(r, gram=f"{prefix}.{leader}", layer=l) for r in rows]
            merged.update(kept)
        for name in infos:  # norms, biases, linear layers never run: the mean
            if model.in_layer(name, l) and name not in merged:
                merged[name] = merge.mean(name, keep=True)
        with timer("forward"), torch.inference_mode():  # the merged layer l, as written, moves the states on
            layer = model.load_layer(l, tensors=merged)
            for i, c in enumerate(calib):
                for b, batch in enumerate(c.batches):
                    states.put((i, b), model.run_layer(layer, l, states.get((i, b)), batch))
        del layer, merged

    # 4. The final norm; lm_head reads each expert's own final norm of the merged last hidden states.
    for name in norm_names:
        merge.mean(name)
    if model.head_name is not None:
        grams = []
        for i, e in enumerate(experts):
            with timer("forward"), torch.inference_mode():
                norm = expert_module(model, model.norm, model.norm_prefix, e)
                gram = Gram(model.config.hidden_size, device)
                for b in range(len(calib[i].batches)):
                    gram.add(norm(states.get((i, b))))
                grams.append(gram.result())
        rows, _ = merge.linear_group([model.head_name], grams.__getitem__, [c.num_tokens for c in calib])
        report += [dict(r, gram=model.head_module, layer=num_layers) for r in rows]
    return report
