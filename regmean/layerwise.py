"""Decoder layers run one at a time on stored hidden states: the engine under RegMean++ (regmean/regmeanpp.py)
and the layer-by-layer grams (compute_gram.py --plan layers).

A meta-device skeleton of the architecture gives the module templates and tensor names; each decoder
layer is made real from the expert's safetensors files only while it runs (load_module), so memory
holds one layer whatever the depth. What differs between model types (the embedding, incl. Gemma's
×√hidden scale, the rotary embedding and causal masks a layer takes, the final norm) lives in
DecoderAdapter; SUPPORTED lists the model types it is tested on. The hidden states of the calibration
tokens are kept packed (real tokens only) on the device, in host memory or on disk (HiddenStates).
"""

import contextlib
import copy
import functools
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .calibration import HELD, Gram, LinearInputs, check_one_row_per_token, collate, fit_and_held_positions
from .tensor_io import read_tensor, tensor_infos, write_safetensors
from .utils import Progress, UserError, dtype_name, temporary_of

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
def read_from(files, name: str) -> Tensor:
    """Tensor `name` from a checkpoint's {tensor name: safetensors file}, or from an object that reads its own
    tensors (experts.Expert: a LoRA expert's folded into its base as read)."""
    return files.read(name) if hasattr(files, "read") else read_tensor(files[name], name)


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
        state[key] = (tensors[name] if tensors is not None else read_from(files, name)).to(device, dtype)
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
    layer: nn.Module,
    run_batch,
    batches: list,
    aliases: dict[str, str],
    device,
    grams: dict[str, Gram] | None = None,
    held: tuple[dict[str, Gram], list[Tensor]] | None = None,
) -> dict[str, Gram]:
    """Grams of the inputs of every nn.Linear in `layer` over the tokens at `batches`' flat positions
    (input_ids, mask, positions), the layer being run by run_batch(b). Linear layers fed the very same
    tensor (q/k/v, gate/up) share one gram, under the first one's name; the others are recorded in
    `aliases`. `grams` may hold the accumulators already (made here as needed otherwise). held: (grams,
    each batch's positions of held-out tokens), a second gram per input from the same passes (--holdout).
    Returns {name: Gram}."""
    grams, current = ({} if grams is None else grams), {}

    def add(name, x):
        check_one_row_per_token(name, x, current["total"])
        for into, rows in current["into"]:
            if name not in into:
                into[name] = Gram(x.shape[-1], device)
            into[name].add(x, rows)

    # no_grad, not inference_mode: LinearInputs tells shared inputs by their version counters
    with torch.no_grad(), LinearInputs(layer, add) as watch:
        for b, (_, mask, index) in enumerate(batches):
            into = [(grams, index.to(device))] + ([(held[0], held[1][b].to(device))] if held else [])
            current.update(total=mask.numel(), into=into)
            run_batch(b)
            watch.new_pass()
    aliases.update(watch.aliases)
    return grams


# ----------------------------------------------------------------------------- grams layer by layer
PARTS_DIR = ".gram-layers"  # finished layers' grams, in the output folder until gram.safetensors is written


def linear_inputs(adapter: DecoderAdapter, index: int) -> tuple[dict[str, int], dict[str, str]]:
    """Which nn.Linear modules of decoder layer `index` read a distinct input ({leader: in_features},
    in the layer's module order) and which share one ({other: leader}), watched on a two-token pass of
    the meta-device template: no weights, no memory, and every process finds the same with or without
    rows (only which tensor each module reads matters, not the values)."""
    layer, found = adapter.layers[index], {}
    hidden = torch.zeros(1, 2, adapter.config.hidden_size, device="meta", dtype=adapter.dtype)
    position_ids = torch.arange(2, device="meta")[None]
    with torch.device("meta"):
        rotary = type(adapter.rotary)(adapter.config)
    with torch.no_grad(), LinearInputs(layer, lambda name, x: found.setdefault(name, x.shape[-1])) as watch:
        layer(
            hidden,
            attention_mask=None,
            position_ids=position_ids,
            position_embeddings=rotary(hidden, position_ids),
            use_cache=False,
        )
    order = [name for name, _ in layer.named_modules()]
    return {name: found[name] for name in sorted(found, key=order.index)}, dict(watch.aliases)


def gram_bytes(adapter: DecoderAdapter) -> int:
    """Bytes of the float32 accumulators of every distinct linear input (lm_head's included): their
    upper block rows, as Gram allocates them (sized on the meta device, nothing allocated)."""
    dims = [adapter.config.hidden_size] if adapter.head_module is not None else []
    for index in range(len(adapter.layers)):
        dims += linear_inputs(adapter, index)[0].values()
    return sum(Gram(n, "meta").sum.numel() for n in dims) * 4


def mapped_tensor(file: Path, name: str) -> Tensor:
    """A tensor of a safetensors file mapped from disk (read as it is used, nothing copied up front)."""
    import numpy as np

    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(size))[name]
    assert entry["dtype"] == "F32", entry["dtype"]
    begin, end = entry["data_offsets"]
    array = np.memmap(file, dtype=np.float32, mode="c", offset=8 + size + begin, shape=tuple(entry["shape"]))
    assert array.nbytes == end - begin
    return torch.from_numpy(array)


class FinishedGrams(dict):
    """{stored key: (file, name in it)} whose grams are mapped from the finished layers' files only when
    asked for, so that the gram file is written from them one tensor at a time. Going through values()
    (the writer's data pass) deletes each layer's file once its grams have been handed out, so the disk
    holds the grams about once, not twice (a write that fails halfway recomputes those layers)."""

    def __getitem__(self, key: str) -> Tensor:
        return mapped_tensor(*super().__getitem__(key))

    def items(self):
        return ((k, self[k]) for k in self)

    def values(self):
        keys = list(self)
        for i, key in enumerate(keys):
            yield self[key]  # mapped: readable until freed, even once its file is unlinked
            path = super().__getitem__(key)[0]
            if i + 1 == len(keys) or super().__getitem__(keys[i + 1])[0] != path:
                path.unlink(missing_ok=True)


def read_part(path: Path, settings: dict) -> tuple[dict[str, tuple[Path, str]], dict[str, str]] | None:
    """A finished layer's keys and aliases, None when it is not there; a part made with other
    settings is refused as compute_gram.py's checkpoints are."""
    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    saved = json.loads(meta["settings"])
    if saved != settings:
        diff = ", ".join(f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in settings.items() if saved.get(k) != v)
        raise UserError(
            f"{path} was made with other settings ({diff}); rerun with those settings to resume, "
            f"or delete {path.parent} to start over"
        )
    return {k: (path, k) for k in keys}, json.loads(meta["aliases"])


def process_rank() -> int:
    """This process's rank among compute_gram.py's processes (0 alone)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def agree_on_done(done: int) -> int:
    """The finished layers every process sees (the fewest): all resume from the same layer."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return done
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    n = torch.tensor([done], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return int(n.item())


def grams_by_layer(
    adapter: DecoderAdapter,
    files: dict[str, Path],
    token_ids: list[list[int]],
    batches: list[list[int]],
    out_dir: Path,
    settings: dict,
    reduce,
    resume: bool = False,
    max_hidden_gb: float | None = None,
    is_main: bool = True,
    progress: bool = True,
    held_out: frozenset[int] = frozenset(),
) -> tuple[FinishedGrams, dict[str, str], int]:
    """The grams of every distinct linear input of the model, one decoder layer at a time: the
    hidden states of this process's `batches` (lists of example indices) are kept (device, host or
    disk: hidden_states_plan), each layer is read from `files`, run on them with its inputs'
    grams accumulated, and moves them on; lm_head's gram is taken on the final norm's output.
    After each layer reduce(grams, tokens) sums every process's grams in place (compute_gram.py's
    all-reduce), and the main process writes them to OUTPUT_DIR/.gram-layers/, where a later run
    with resume=True and the same settings picks up after the last finished layer (the finished
    layers then only move the hidden states on). held_out: example indices whose tokens go to a second
    gram per input, keyed HELD + its key, from the same layer runs (--holdout), into a file of their own
    per layer (layer-NNNNN-held.safetensors, written before the layer's). Returns (the grams, read from
    those files as they are used, aliases, tokens run through the layers here); the main process logs
    where the hidden states are kept."""
    parts_dir = out_dir / PARTS_DIR
    if not resume and is_main and parts_dir.exists():
        shutil.rmtree(parts_dir)  # a previous run's layers, not asked to resume from
    num_layers, device = len(adapter.layers), adapter.device
    part_paths = [parts_dir / f"layer-{i:05d}.safetensors" for i in range(num_layers)]
    if adapter.head_module is not None:
        part_paths.append(parts_dir / "head.safetensors")

    def held_path(path: Path) -> Path:
        return path.with_name(f"{path.stem}-held{path.suffix}")

    where, aliases, done = {}, {}, 0
    for path in part_paths if resume else []:
        parts = [read_part(p, settings) for p in ([held_path(path)] if held_out else []) + [path]]
        if None in parts:
            break
        for keys, part_aliases in parts:
            where.update(keys)
            aliases.update(part_aliases)
        done += 1
    done = agree_on_done(done)
    finished = {*part_paths[:done], *map(held_path, part_paths[:done])}
    where = {k: p for k, p in where.items() if p[0] in finished}
    aliases = {k: v for k, v in aliases.items() if v in where}

    # layer 0's input: the embeddings of this process's tokens, packed (padding left out)
    calib, fit_batches, held_at, packed = [], [], [], []
    for batch in batches:
        input_ids, mask = collate(token_ids, batch)
        index = mask.flatten().nonzero().squeeze(1)
        calib.append((input_ids, mask, index))
        if held_out:  # which tokens feed the fit grams and which the held-out ones: flat, and among the packed
            fit, held = fit_and_held_positions(batch, mask, held_out)
            fit_batches.append((input_ids, mask, fit))
            held_at.append(held)
            is_held = torch.zeros(mask.numel(), dtype=torch.bool).index_fill_(0, held, True)[index]
            packed.append(((~is_held).nonzero().squeeze(1), is_held.nonzero().squeeze(1)))
    num_tokens = sum(len(index) for _, _, index in calib)
    plan = hidden_states_plan(max_hidden_gb, device, adapter.dtype, adapter.config.hidden_size, num_tokens, host=True)
    if done == len(part_paths):
        return FinishedGrams(where), aliases, 0
    if is_main:
        parts_dir.mkdir(parents=True, exist_ok=True)

    def run(layer, index, b):
        states.put((0, b), adapter.run_layer(layer, index, states.get((0, b)), calib[b]))

    def finish(grams: dict[str, Gram], part_aliases: dict[str, str], path: Path) -> None:
        """All processes' sums added up; the main process writes them (the next run's resume point)."""
        reduce(grams, 0)
        meta = dict(settings=json.dumps(settings, sort_keys=True), aliases=json.dumps(part_aliases))
        files = {held_path(path): [k for k in grams if k.startswith(HELD)]} if held_out else {}
        files[path] = [k for k in grams if not k.startswith(HELD)]  # the layer's own file last: the resume point
        for file, keys in files.items():
            if is_main:
                write_safetensors(file, {k: grams[k].packed() for k in keys}, meta)
            where.update({k: (file, k) for k in keys})
        aliases.update(part_aliases)

    if is_main:
        print(
            f"hidden states: {plan['hidden_gib']:.3g} GiB kept on {plan['hidden_states']} "
            f"(budget {plan['max_hidden_gb']:.3g} GiB)",
            file=sys.stderr,
        )
    bar = Progress(total=len(part_paths), initial=done, desc="gram (layers)", unit="layer", disable=not progress)
    spill = contextlib.ExitStack()  # the hidden states' folder on disk: each process its own (one out_dir)
    try:
        disk = plan["hidden_states"] == "disk"
        folder = spill.enter_context(temporary_of(out_dir / f"hidden-states-rank{process_rank()}")) if disk else None
        states = HiddenStates(device, folder, host=plan["hidden_states"] == "host")
        embed = read_from(files, adapter.embed_name)
        for b, (input_ids, _, index) in enumerate(calib):
            states.put((0, b), adapter.embed(embed, input_ids.flatten()[index]))
        del embed
        for index in range(num_layers):
            layer = adapter.load_layer(index, files)
            if index < done:  # finished before: only move the hidden states on
                with torch.inference_mode():
                    for b in range(len(calib)):
                        run(layer, index, b)
                del layer
                continue
            leaders, shared = linear_inputs(adapter, index)
            prefix = adapter.layer_prefix(index)
            grams = {name: Gram(n, device) for name, n in leaders.items()}
            held = ({name: Gram(n, device) for name, n in leaders.items()}, held_at) if held_out else None
            seen = {}
            layer_grams(layer, functools.partial(run, layer, index), fit_batches or calib, seen, device, grams, held)
            if seen and seen != shared:
                raise UserError(f"layer {index}: linear layers share inputs as {seen}, not as probed ({shared})")
            del layer
            grams = {f"{prefix}.{k}": g for k, g in grams.items()}
            grams |= {f"{HELD}{prefix}.{k}": g for k, g in held[0].items()} if held else {}
            finish(grams, {f"{prefix}.{k}": f"{prefix}.{v}" for k, v in shared.items()}, part_paths[index])
            del grams
            bar.update()
        if adapter.head_module is not None:  # lm_head reads the final norm's output
            norm, head = adapter.load_norm(files), adapter.head_module
            keys = [head, HELD + head] if held_out else [head]
            grams = {key: Gram(adapter.config.hidden_size, device) for key in keys}
            with torch.inference_mode():
                for b in range(len(calib)):
                    hidden = norm(states.get((0, b)))
                    if held_out:
                        grams[HELD + head].add(hidden, packed[b][1].to(device))
                    grams[head].add(hidden, packed[b][0].to(device) if held_out else None)
            del norm
            finish(grams, {}, part_paths[-1])
            bar.update()
    finally:
        bar.close()
        spill.close()
    return FinishedGrams(where), aliases, num_tokens


def whole_model_need(
    adapter: DecoderAdapter, infos: dict, dtype: torch.dtype, batch_size: int, length: int
) -> dict[str, float]:
    """GiB the whole-model plan holds on its device: the weights in `dtype`, the float32 accumulators
    of every distinct linear input, and the activations of one batch (a few [batch, length, width]
    tensors per layer step, and the attention scores where sdpa falls back to the math kernel)."""
    c = adapter.config
    weights = sum(torch.Size(shape).numel() for shape, _ in infos.values()) * dtype.itemsize
    width = 4 * c.hidden_size + 3 * c.intermediate_size
    scores = c.num_attention_heads * length * length
    activations = batch_size * (length * width + scores) * max(dtype.itemsize, 4)
    return dict(weights=weights / 2**30, grams=gram_bytes(adapter) / 2**30, activations=activations / 2**30)


def choose_plan(
    requested: str,
    model_dir: Path,
    files: dict[str, Path],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    length: int,
    device_map: str | None = None,
    resume: str | None = None,
) -> tuple[str, str]:
    """compute_gram.py --plan auto|model|layers -> (plan, why). auto: a run to resume keeps its plan
    (`resume`); else the whole model when its weights, grams and one batch fit the device's free
    memory (cuda) or 80% of the host's available memory (cpu, shared by the processes of this
    node), else one layer at a time. Every process takes the same plan (layers if any needs it):
    each runs the one all-reduce that decides it, whichever way it chose (a resume or --plan on one
    rank alone must not leave the others waiting in a collective it never joins)."""
    plan, why = plan_of_this_process(requested, model_dir, files, device, dtype, batch_size, length, device_map, resume)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(plan == "layers")], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and plan != "layers":
            return "layers", f"another process needs the layer plan (here: {why})"
    return plan, why


def plan_of_this_process(
    requested: str,
    model_dir: Path,
    files: dict[str, Path],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    length: int,
    device_map: str | None = None,
    resume: str | None = None,
) -> tuple[str, str]:
    """choose_plan's decision for this process alone."""
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if requested == "model":
        return "model", "--plan model"
    if requested == "layers":
        check_supported(model_type, "--plan layers")
        if device_map:
            raise UserError("--plan layers runs one layer at a time on one device: leave out --device-map")
        return "layers", "--plan layers"
    if model_type not in SUPPORTED:
        return "model", f"model type {model_type} has no layer-by-layer steps ({', '.join(SUPPORTED)} do)"
    if device_map:
        return "model", "--device-map spreads the whole model"
    if resume:
        return resume, "the plan of the run it resumes"
    infos = tensor_infos(files)
    need = whole_model_need(
        DecoderAdapter(model_dir, infos, torch.device("meta"), dtype), infos, dtype, batch_size, length
    )
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0] / 2**30, f"{device} has"
    else:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        free, where = 0.8 * host_available() / 2**30 / per_node, "80% of the host's available memory is"
    total = sum(need.values())
    layers = total > free
    parts = " + ".join(f"{k} {v:.3g}" for k, v in need.items())
    verdict = f"{where} {free:.3g} GiB: {'does not fit' if layers else 'fits'}"
    return ("layers" if layers else "model"), f"the whole model needs {parts} = {total:.3g} GiB; {verdict}"
