"""Decoder layers run one at a time on stored hidden states: the engine under RegMean++ (regmeanpp.py)
and the layer-by-layer grams (compute_gram.py --plan layers).

A meta-device skeleton of the architecture gives the module templates and tensor names; each decoder
layer is made real from the expert's safetensors files only while it runs (load_module), so memory
holds one layer whatever the depth. What differs between model types (the embedding, incl. Gemma's
×√hidden scale, the rotary embedding and causal masks a layer takes, the final norm) lives in
DecoderAdapter; SUPPORTED lists the model types it is tested on. The hidden states of the calibration
tokens are kept packed (real tokens only) on the device, in host memory or on disk (HiddenStates).
"""

import copy
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from calibration import Gram, LinearInputs, check_one_row_per_token
from tensor_io import read_tensor
from utils import UserError, dtype_name

# model_type -> scale of the input embeddings (Gemma multiplies them by √hidden, in the model's dtype)
SUPPORTED = {"llama": None, "mistral": None, "qwen2": None, "gemma": "sqrt_hidden"}


def check_supported(model_type: str, what: str = "regmean++") -> None:
    """Refuse, before any work, a model type whose steps DecoderAdapter does not know."""
    if model_type not in SUPPORTED:
        raise UserError(f"{what} supports model types {', '.join(SUPPORTED)}; not {model_type}")


# ----------------------------------------------------------------------------- hidden states
class HiddenStates:
    """Hidden states keyed by (set, batch): one packed [tokens, hidden] tensor each, padding left
    out. Kept on the device; with host=True in host memory (moved to the device per get); with
    spill_dir in one safetensors file each, rewritten as each layer runs."""

    def __init__(self, device: torch.device, spill_dir: Path | None = None, host: bool = False):
        self.device, self.spill_dir, self.host, self.tensors = device, spill_dir, host, {}
        if spill_dir is not None:
            spill_dir.mkdir(parents=True)

    def put(self, key: tuple[int, int], x: Tensor) -> None:
        if self.spill_dir is not None:
            save_file({"h": x.contiguous().cpu()}, str(self.spill_dir / f"{key[0]}-{key[1]}.safetensors"))
        else:
            self.tensors[key] = x.cpu() if self.host else x

    def get(self, key: tuple[int, int]) -> Tensor:
        if self.spill_dir is not None:
            return load_file(str(self.spill_dir / f"{key[0]}-{key[1]}.safetensors"), device=str(self.device))["h"]
        return self.tensors[key].to(self.device)


def host_available() -> int:
    """Bytes of host memory available to a new allocation (MemAvailable: free + reclaimable cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def hidden_budget(device: torch.device) -> float:
    """Default --max-hidden-gb: half the free memory of the device (cuda) or of the host."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_available()
    return free / 2 / 2**30


def hidden_states_plan(
    max_hidden_gb: float | None,
    device: torch.device,
    forward_dtype: torch.dtype,
    hidden_size: int,
    num_tokens: int,
    host: bool = False,
) -> dict:
    """Where the hidden states go: on the device within the budget (default: half its free memory);
    with host=True and a cuda device, else in host memory within half of what is available; else on disk."""
    hidden_gib = num_tokens * hidden_size * forward_dtype.itemsize / 2**30
    budget = hidden_budget(device) if max_hidden_gb is None else max_hidden_gb
    where = str(device)
    if hidden_gib > budget:
        host_fits = host and device.type == "cuda" and hidden_gib <= hidden_budget(torch.device("cpu"))
        where = "host" if host_fits else "disk"
    return dict(
        forward_dtype=dtype_name(forward_dtype),
        max_hidden_gb=round(budget, 3),
        hidden_states=where,
        hidden_gib=round(hidden_gib, 4),
    )


# ----------------------------------------------------------------------------- the model-specific steps
def load_module(
    template: nn.Module,
    prefix: str,
    device,
    dtype,
    files: dict[str, Path] | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> nn.Module:
    """A real copy of the meta-device module `template` whose tensors (`prefix`.*) are read from a
    checkpoint's safetensors `files` {tensor name: file}, or taken from `tensors` {name: tensor}."""
    module = copy.deepcopy(template).to_empty(device=device)
    state = module.state_dict()
    unset = set(dict(module.named_buffers())) - set(state)
    if unset:  # a buffer the checkpoint does not hold would stay uninitialized
        raise UserError(
            f"{prefix} has buffers that are not saved in the checkpoint ({sorted(unset)[0]}): "
            "layer-by-layer runs do not support this architecture"
        )
    for key in state:
        name = f"{prefix}.{key}"
        state[key] = (tensors[name] if tensors is not None else read_tensor(files[name], name)).to(device, dtype)
    module.load_state_dict(state)
    return module.eval()


class DecoderAdapter:
    """The steps of a layer-by-layer run that depend on the model type, read off a meta-device
    skeleton of the architecture: tensor names, embedding, one decoder layer, the final norm.
    `infos` {tensor name: (shape, dtype)} of the checkpoint tells whether lm_head is stored."""

    def __init__(
        self, config_dir: Path, infos: dict, device: torch.device, dtype: torch.dtype, what: str = "regmean++"
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(config_dir)
        check_supported(config.model_type, what)
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
        """Embeddings of input_ids as the model computes them in self.dtype: the rows are picked
        first, then cast (so a 1 GB bfloat16 table is never copied whole into float32); Gemma scales
        by √hidden, the scale rounded to the model's dtype as GemmaTextScaledWordEmbedding does."""
        x = weight[input_ids.to(weight.device)].to(self.device, self.dtype)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, device=x.device).to(self.dtype)
        return x

    def load_layer(self, index: int, files: dict[str, Path] | None = None, tensors: dict[str, Tensor] | None = None):
        return load_module(self.layers[index], self.layer_prefix(index), self.device, self.dtype, files, tensors)

    def load_norm(self, files: dict[str, Path]) -> nn.Module:
        return load_module(self.norm, self.norm_prefix, self.device, self.dtype, files)

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


# ----------------------------------------------------------------------------- grams of one layer
def layer_linear_inputs(adapter: DecoderAdapter, layer: nn.Module, index: int) -> tuple[dict[str, int], dict[str, str]]:
    """Which nn.Linear modules of `layer` read a distinct input ({leader: in_features}, in the order
    they run) and which share one ({other: leader}), watched on a two-token probe (the values do not
    matter, only which tensor each module reads). Every process finds the same, with or without rows."""
    leaders = {}
    probe = torch.zeros(2, adapter.config.hidden_size, device=adapter.device, dtype=adapter.dtype)
    batch = (None, torch.ones(1, 2, dtype=torch.long), torch.arange(2))
    with torch.no_grad(), LinearInputs(layer, lambda name, x: leaders.setdefault(name, x.shape[-1])) as watch:
        adapter.run_layer(layer, index, probe, batch)
    return leaders, dict(watch.aliases)


def layer_grams(
    layer: nn.Module, run_batch, batches: list, aliases: dict[str, str], device, grams: dict[str, Gram] | None = None
) -> dict[str, Gram]:
    """Grams of the inputs of every nn.Linear in `layer` over the real tokens of `batches`, the
    layer being run by run_batch(b). Linear layers fed the very same tensor (q/k/v, gate/up) share
    one gram, under the first one's name; the others are recorded in `aliases`. `grams` may hold
    the accumulators already (made here as needed otherwise). Returns {name: Gram}."""
    grams, current = ({} if grams is None else grams), {}

    def add(name, x):
        check_one_row_per_token(name, x, current["total"])
        if name not in grams:
            grams[name] = Gram(x.shape[-1], device)
        grams[name].add(x, current["index"])

    # no_grad, not inference_mode: LinearInputs tells shared inputs by their version counters
    with torch.no_grad(), LinearInputs(layer, add) as watch:
        for b, (_, mask, index) in enumerate(batches):
            current.update(total=mask.numel(), index=index.to(device))
            run_batch(b)
            watch.new_pass()
    aliases.update(watch.aliases)
    return grams
