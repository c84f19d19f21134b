"""RegMean++ (Nguyen et al., arXiv 2508.03121): RegMean whose grams are taken layer by layer on
the merged model's own activations. The recipe:

    1. every tensor outside the decoder layers, final norm and lm_head: the weighted mean;
    2. the merged embeddings of each expert's calibration tokens are the hidden states of layer 0;
    3. per decoder layer l: each expert's own layer l runs on the hidden states (merged layers
       0..l-1 on that expert's tokens), the grams of its linear inputs give layer l's RegMean
       merge, and the merged layer l moves the hidden states on;
    4. the final norm is the mean; lm_head's grams come from each expert's final norm on the
       merged last hidden states.

One decoder layer of one expert is in memory at a time. What differs between model types (the
embedding, incl. Gemma's ×√hidden scale, running one layer, the final norm) lives in
DecoderAdapter; SUPPORTED lists the model types it is tested on.
"""

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from calibration import (
    BATCH_SIZE,
    MAX_LENGTH,
    NUM_EXAMPLES,
    SPLIT,
    Gram,
    LinearInputs,
    calibration_tokens,
    check_one_row_per_token,
    collate,
    length_batches,
    load_tokenizer,
)
from merging import Expert, StreamingMerge
from tensor_io import read_tensor
from utils import FORMATS, PRESETS, Progress, UserError, dtype_name

# model_type -> scale of the input embeddings (Gemma multiplies them by √hidden, in the model's dtype)
SUPPORTED = {"llama": None, "mistral": None, "qwen2": None, "gemma": "sqrt_hidden"}


def check_supported(model_type: str) -> None:
    """Refuse, before any work, a model type whose steps DecoderAdapter does not know."""
    if model_type not in SUPPORTED:
        raise UserError(f"regmean++ supports model types {', '.join(SUPPORTED)}; not {model_type}")


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


# ----------------------------------------------------------------------------- hidden states
class HiddenStates:
    """The merged model's hidden states on every expert's calibration tokens: one packed
    [tokens, hidden] tensor per (expert, batch), padding left out. Kept on the device, or, with
    spill_dir, in one safetensors file each, rewritten as each merged layer runs."""

    def __init__(self, device: torch.device, spill_dir: Path | None = None):
        self.device, self.spill_dir, self.tensors = device, spill_dir, {}
        if spill_dir is not None:
            spill_dir.mkdir()

    def put(self, key: tuple[int, int], x: Tensor) -> None:
        if self.spill_dir is None:
            self.tensors[key] = x
        else:
            save_file({"h": x.contiguous().cpu()}, str(self.spill_dir / f"{key[0]}-{key[1]}.safetensors"))

    def get(self, key: tuple[int, int]) -> Tensor:
        if self.spill_dir is None:
            return self.tensors[key]
        return load_file(str(self.spill_dir / f"{key[0]}-{key[1]}.safetensors"), device=str(self.device))["h"]


def hidden_budget(device: torch.device) -> float:
    """Default --max-hidden-gb: half the free memory of the device (cuda) or of the host."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free / 2 / 2**30


def hidden_states_plan(
    max_hidden_gb: float | None, device: torch.device, forward_dtype: torch.dtype, hidden_size: int, num_tokens: int
) -> dict:
    """Where regmean++ keeps the hidden states: on the device, or on disk above the budget."""
    hidden_gib = num_tokens * hidden_size * forward_dtype.itemsize / 2**30
    budget = hidden_budget(device) if max_hidden_gb is None else max_hidden_gb
    spill = hidden_gib > budget
    return dict(
        forward_dtype=dtype_name(forward_dtype),
        max_hidden_gb=round(budget, 3),
        hidden_states="disk" if spill else str(device),
        hidden_gib=round(hidden_gib, 4),
    )


# ----------------------------------------------------------------------------- the model-specific steps
def load_module(
    template: nn.Module,
    prefix: str,
    device,
    dtype,
    expert: Expert | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> nn.Module:
    """A real copy of the meta-device module `template` whose tensors (`prefix`.*) come from an
    expert's checkpoint, or from `tensors` {name: tensor}."""
    module = copy.deepcopy(template).to_empty(device=device)
    state = module.state_dict()
    unset = set(dict(module.named_buffers())) - set(state)
    if unset:  # a buffer the checkpoint does not hold would stay uninitialized
        raise UserError(
            f"{prefix} has buffers that are not saved in the checkpoint ({sorted(unset)[0]}): "
            "regmean++ does not support this architecture"
        )
    for key in state:
        name = f"{prefix}.{key}"
        state[key] = (tensors[name] if tensors is not None else read_tensor(expert.files[name], name)).to(device, dtype)
    module.load_state_dict(state)
    return module.eval()


class DecoderAdapter:
    """The steps of RegMean++ that depend on the model type, read off a meta-device skeleton of
    the architecture: tensor names, embedding, one decoder layer, the final norm."""

    def __init__(self, config_dir: Path, infos: dict, device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(config_dir)
        check_supported(config.model_type)
        with torch.device("meta"):  # the architecture without weights: modules to copy, names
            skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)
        self.config, base = skeleton.config, skeleton.base_model
        self.device, self.dtype = device, dtype
        self.layers, self.norm = base.layers, base.norm
        names = {m: n for n, m in skeleton.named_modules()}
        self.layers_prefix, self.norm_prefix = names[base.layers], names[base.norm]
        self.embed_name = names[skeleton.get_input_embeddings()] + ".weight"
        head = skeleton.get_output_embeddings()
        self.head_module = names[head] if head is not None else None
        head_name = f"{self.head_module}.weight" if head is not None else None
        self.head_name = head_name if head_name in infos else None  # None: tied to the embeddings
        scale = SUPPORTED[config.model_type]
        self.embed_scale = self.config.hidden_size**0.5 if scale == "sqrt_hidden" else None
        with torch.device(device):
            self.rotary = type(base.rotary_emb)(self.config)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    def in_layer(self, name: str, index: int) -> bool:
        return name.startswith(f"{self.layers_prefix}.{index}.")

    def embed(self, weight: Tensor, input_ids: Tensor) -> Tensor:
        """Embeddings of input_ids as the model computes them (Gemma scales by √hidden, the scale
        rounded to the weight's dtype as GemmaTextScaledWordEmbedding does)."""
        x = weight[input_ids]
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, device=x.device).to(weight.dtype)
        return x

    def load_layer(
        self, index: int, expert: Expert | None = None, tensors: dict[str, Tensor] | None = None
    ) -> nn.Module:
        return load_module(self.layers[index], self.layer_prefix(index), self.device, self.dtype, expert, tensors)

    def load_norm(self, expert: Expert) -> nn.Module:
        return load_module(self.norm, self.norm_prefix, self.device, self.dtype, expert)

    def layer_inputs(self, index: int, hidden: Tensor, attention_mask: Tensor) -> dict:
        """What a decoder layer takes besides the hidden states, built as the model's own forward
        builds them: positions, rotary cos/sin and the causal mask (sliding where the layer slides)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            sliding = layer_types[index] == "sliding_attention"
        else:
            sliding = getattr(self.config, "sliding_window", None) is not None
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
        mask = make_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        return dict(
            attention_mask=mask, position_ids=position_ids, position_embeddings=self.rotary(hidden, position_ids)
        )

    def run_layer(self, layer: nn.Module, index: int, packed: Tensor, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """One decoder layer on one batch of packed hidden states -> packed outputs (real tokens
        only). Right padding (zeros) goes back where it was: causal attention never reads it."""
        _, mask, real = batch
        real = real.to(self.device)
        hidden = packed.new_zeros(mask.numel(), packed.shape[-1])
        hidden[real] = packed
        hidden = hidden.view(*mask.shape, -1)
        out = layer(hidden, use_cache=False, **self.layer_inputs(index, hidden, mask.to(self.device)))
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(-1, out.shape[-1])[real]


# ----------------------------------------------------------------------------- the recipe
def layer_grams(layer: nn.Module, run_batch, batches: list, aliases: dict[str, str], device) -> dict[str, Gram]:
    """Grams of the inputs of every nn.Linear in `layer` over the real tokens of `batches`, the
    layer being run by run_batch(b). Linear layers fed the very same tensor (q/k/v, gate/up) share
    one gram, under the first one's name; the others are recorded in `aliases`. Returns {name: Gram}."""
    grams, current = {}, {}

    def add(name, x):
        check_one_row_per_token(name, x, current["total"])
        if name not in grams:
            grams[name] = Gram(x.shape[-1], device)
        grams[name].add(x, current["index"])

    with LinearInputs(layer, add) as watch:
        for b, (_, mask, index) in enumerate(batches):
            current.update(total=mask.numel(), index=index.to(device))
            run_batch(b)
            watch.new_pass()
    aliases.update(watch.aliases)
    return grams


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
                layer = model.load_layer(l, expert=e)
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
            rows, kept = merge.linear_group(members, results, counts, keep=True)
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
                norm = model.load_norm(e)
                gram = Gram(model.config.hidden_size, device)
                for b in range(len(calib[i].batches)):
                    gram.add(norm(states.get((i, b))))
                grams.append(gram.result())
        rows, _ = merge.linear_group([model.head_name], grams, [c.num_tokens for c in calib])
        report += [dict(r, gram=model.head_module, layer=num_layers) for r in rows]
    return report
