"""LoRA experts (PEFT adapters): an expert given as an adapter folder (adapter_config.json +
adapter_model.safetensors, its base from `base_model_name_or_path` or --base) or in mergekit's BASE+ADAPTER
form. peft reads the config and says, per module, the rank and the scaling (rsLoRA's lora_alpha/√r, rank and
alpha patterns included); the adapter's weights are read here, lazily, and folded into the base per tensor,
per block of rows, as a merge reads them: Wᵢ[rows] = W₀[rows] + (Bᵢ[rows] Aᵢ)·sᵢ. No dense copy of an expert
is ever written (docs/merging.md, "LoRA adapters").

    spec = adapter_spec("runs/lora/code", base=None)      # (base spec, adapter folder) or None for a dense model
    lora = load_lora(adapter_dir, base_dir)               # config checked, modules and scalings from peft
    w = lora.fold("model.layers.0.self_attn.q_proj.weight", w0_rows, rows)
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tensor_io import model_fingerprint, read_tensor
from .utils import UserError, first_line, resolve_model_dir

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's prefix of every key in adapter_model.safetensors
# Config keys of LoRA variants that are not W₀ + s·BA on the base as it is: refused by name when set.
VARIANTS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a LoRA bias (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "arrow_config": "Arrow (arrow_config)",
}
# Initializations that change the base weights the adapter was trained on (W₀ is no longer the base's).
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


def is_adapter_dir(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_spec(spec: str, base: str | None = None) -> tuple[str | None, Path] | None:
    """(base spec or None, adapter folder) when `spec` is a LoRA expert: mergekit's BASE+ADAPTER, or an
    adapter folder (base: `base`, else its config's base_model_name_or_path, read later); None for a dense
    model."""
    if is_adapter_dir(spec):
        return base, Path(spec)
    parts = spec.split("+")
    for i in range(1, len(parts)):  # the first split whose right-hand side is an adapter folder
        left, right = "+".join(parts[:i]), "+".join(parts[i:])
        if is_adapter_dir(right):
            return left, Path(right)
    if len(parts) == 2 and parts[0] and parts[1]:
        raise UserError(f"{spec!r}: BASE+ADAPTER, but {parts[1]!r} is not an adapter folder (no {ADAPTER_CONFIG})")
    return None


def adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, checked to be a plain LoRA: another PEFT type or a LoRA variant is refused by name."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read it ({first_line(e)})") from e
    kind = config.get("peft_type")
    if kind != "LORA":
        raise UserError(f"{adapter_dir}: a PEFT {kind} adapter; only LoRA adapters are merged")
    for key, name in VARIANTS.items():
        if config.get(key):
            raise UserError(f"{adapter_dir}: {name} is not supported; only plain LoRA (W + s·BA) adapters are merged")
    if config.get("bias", "none") != "none":
        raise UserError(f"{adapter_dir}: bias={config['bias']!r} (trained biases) is not supported; only bias='none'")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise UserError(
            f"{adapter_dir}: init_lora_weights={config['init_lora_weights']!r} changes the base weights the adapter "
            "was trained on; convert it to a plain LoRA first (peft's path_initial_model_for_weight_conversion)"
        )
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    return config


def resolve_base(adapter_dir: Path, base: str | None, config: dict) -> Path:
    """The base folder of an adapter: `base` (BASE+ADAPTER or --base), else base_model_name_or_path."""
    named = config.get("base_model_name_or_path")
    if base is None and not named:
        raise UserError(f"{adapter_dir}: no base (base_model_name_or_path is empty): give --base or BASE+ADAPTER")
    try:
        return resolve_model_dir(base or named)
    except UserError as e:
        where = "--base" if base else f"its base_model_name_or_path, {named!r}"
        raise UserError(f"{adapter_dir}: the base model is missing ({where}): {e}") from e


@dataclass
class LoraModule:
    a_key: str
    b_key: str
    rank: int
    scaling: float


@dataclass
class Lora:
    """One LoRA adapter on its base: per adapted module its A and B keys in the adapter file, rank and
    scaling; the modules_to_save tensors (base tensor name -> key)."""

    dir: Path
    base_dir: Path
    config: dict
    modules: dict[str, LoraModule]  # module name (model.layers.0.self_attn.q_proj) -> its LoRA
    saved: dict[str, str] = field(default_factory=dict)  # modules_to_save: base tensor name -> key in the file
    base_saved: dict[str, str] = field(default_factory=dict)  # W₀ of adapted layers the file holds (lm_head)
    target_modules: list[str] | str | None = None
    base_spec: str | None = None  # the base as given (BASE+ADAPTER, --base) or named by the config

    @property
    def file(self) -> Path:
        return self.dir / ADAPTER_WEIGHTS

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def a(self, module: str) -> torch.Tensor:
        """A [r, in] of one adapted module, float32."""
        return read_tensor(self.file, self.modules[module].a_key).float()

    def factors(self, module: str, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B[rows]·s [rows, r]) of one adapted module, float32."""
        m = self.modules[module]
        a = read_tensor(self.file, m.a_key).float()
        b = read_tensor(self.file, m.b_key, rows).float()
        return a, b * m.scaling

    def fold(self, name: str, w: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows `rows` of the expert's tensor `name` from the base's same rows `w`: W₀ + (B A)·s where the
        module is adapted (float32), the adapter's own tensor where it saves the module, else `w`."""
        if name in self.saved:
            return read_tensor(self.file, self.saved[name], rows)
        if name in self.base_saved:  # peft's save_embedding_layers: the base layer as trained on
            w = read_tensor(self.file, self.base_saved[name], rows)
        m = self.modules.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if m is None:
            return w
        a = read_tensor(self.file, m.a_key).float()
        b = read_tensor(self.file, m.b_key, rows).float()
        return w.float() + (b @ a) * m.scaling  # peft's get_delta_weight: (B @ A) * scaling

    def fingerprint(self, base_fingerprint: str) -> str:
        """The expert's fingerprint: its base's, its adapter tensors' and every module's scaling."""
        tensors = {
            key: self.file
            for key in [*self.saved.values()] + [k for m in self.modules.values() for k in (m.a_key, m.b_key)]
        }
        h = hashlib.sha256(base_fingerprint.encode())
        h.update(model_fingerprint(tensors).encode())
        h.update(json.dumps({k: m.scaling for k, m in sorted(self.modules.items())}).encode())
        return "lora-v1:" + h.hexdigest()


def peft_layers(adapter_dir: Path, base_dir: Path) -> tuple[dict[str, tuple[int, float]], list[str]]:
    """What peft makes of the adapter on the base's architecture (a meta-device skeleton, nothing read):
    {module: (rank, scaling)} of the adapted layers, and the modules it saves whole (modules_to_save)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM

    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
        try:
            inject_adapter_in_model(config, skeleton)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{adapter_dir}: peft cannot apply it to {base_dir}: {first_line(e)}") from e
    layers, saved = {}, []
    for name, module in skeleton.named_modules():
        if isinstance(module, LoraLayer):
            if type(module) is not LoraLinear:
                raise UserError(
                    f"{adapter_dir}: LoRA on {name} ({type(module).__name__}); only LoRA on linear layers is merged"
                )
            layers[name] = (module.r["default"], float(module.scaling["default"]))
        elif name.endswith(".modules_to_save"):
            saved.append(name.removesuffix(".modules_to_save"))
    return layers, saved


def load_lora(adapter_dir: Path, base_dir: Path, config: dict, base_infos: dict, base_spec: str | None = None) -> Lora:
    """The adapter on its base, checked: every layer peft adapts has its A and B in the file, of the base's
    shapes, and the file holds nothing else than those and the saved modules."""
    from safetensors import safe_open

    layers, saved_modules = peft_layers(adapter_dir, base_dir)
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    modules, used, base_saved = {}, set(), {}
    for name, (rank, scaling) in layers.items():
        a_key, b_key = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        if f"{name}.weight" not in base_infos:  # a head tied to the embeddings: the checkpoint stores only those
            raise UserError(
                f"{adapter_dir}: LoRA on {name}, whose weight the base does not store (tied), is not merged"
            )
        out, inp = base_infos[f"{name}.weight"][0]
        for key, want in ((a_key, (rank, inp)), (b_key, (out, rank))):
            if shapes.get(key) != want:
                got = "missing" if key not in shapes else f"of shape {list(shapes[key])}"
                raise UserError(f"{adapter_dir}: {key} is {got}, expected {list(want)} (rank {rank} on the base)")
        modules[name] = LoraModule(a_key, b_key, rank, scaling)
        used |= {a_key, b_key}
        base_key = f"{PREFIX}{name}.base_layer.weight"  # peft saves it when embeddings or lm_head are targets
        if base_key in shapes:
            if shapes[base_key] != (out, inp):
                raise UserError(f"{adapter_dir}: {base_key} does not fit the base's {name}.weight")
            base_saved[f"{name}.weight"] = base_key
            used.add(base_key)
    saved = {}
    for module in saved_modules:
        for key, shape in shapes.items():
            if key.startswith(f"{PREFIX}{module}."):
                tensor = key.removeprefix(PREFIX)
                if base_infos.get(tensor, (None,))[0] != shape:
                    raise UserError(f"{adapter_dir}: saved module tensor {key} does not fit the base's {tensor}")
                saved[tensor] = key
                used.add(key)
    unknown = sorted(set(shapes) - used)
    if unknown:
        raise UserError(f"{adapter_dir}: {unknown[0]} is not a LoRA factor of a layer peft adapts on {base_dir}")
    if not modules:
        raise UserError(f"{adapter_dir}: adapts no layer of {base_dir} (target_modules {config.get('target_modules')})")
    base_spec = base_spec or config.get("base_model_name_or_path") or str(base_dir)
    return Lora(adapter_dir, base_dir, config, modules, saved, base_saved, config.get("target_modules"), base_spec)
