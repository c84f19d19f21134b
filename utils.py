"""What the stages share: presets, device and dtype, model and calibration-data loading,
the gram file format, streaming tensors out of safetensors checkpoints, and run figures.

Nothing here runs on import; the stage scripts (compute_gram.py, merge_model.py,
evaluate.py, demo.py) are the entry points.
"""
import contextlib
import io
import json
import math
import os
import pickle
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- presets
# The seed's two experts and their calibration data; smollm2-* are built by `python demo.py`, toy-* by `--toy`.
PRESETS = {
    "code": dict(
        model="rombodawg/rombos_Replete-Coder-Llama3-8B",
        dataset="Replete-AI/code_bagel_hermes-2.5",
        format="code",
        gram_dir="runs/merges/code-llama3",
    ),
    "math": dict(
        model="TIGER-Lab/MAmmoTH2-8B",
        dataset="TIGER-Lab/WebInstructSub",
        format="math",
        gram_dir="runs/merges/math-llama3",
    ),
    # SmolLM2-135M-Instruct, a real pretrained LLM available offline: `python smollm2.py` builds the folder;
    # `python demo.py` fine-tunes the two smollm2-* experts from it and writes their data
    "smollm2": dict(
        model="runs/models/SmolLM2-135M-Instruct",
        dataset="runs/demo/data/code_calib.jsonl",
        format="code",
        gram_dir="runs/grams/smollm2",
    ),
    "smollm2-code": dict(
        model="runs/demo/smollm2-code",
        dataset="runs/demo/data/code_calib.jsonl",
        format="code",
        gram_dir="runs/demo/grams/smollm2-code",
    ),
    "smollm2-math": dict(
        model="runs/demo/smollm2-math",
        dataset="runs/demo/data/math_calib.jsonl",
        format="math",
        gram_dir="runs/demo/grams/smollm2-math",
    ),
    "toy-code": dict(
        model="runs/toy/toy-code",
        dataset="runs/toy/data/code_calib.jsonl",
        format="code",
        gram_dir="runs/toy/grams/toy-code",
    ),
    "toy-math": dict(
        model="runs/toy/toy-math",
        dataset="runs/toy/data/math_calib.jsonl",
        format="math",
        gram_dir="runs/toy/grams/toy-math",
    ),
}

# Columns each row format needs, and how they become chat turns (role, column).
FORMATS = {
    "code": [("system", "instruction"), ("user", "input"), ("assistant", "output")],
    "math": [("user", "question"), ("assistant", "answer")],
}

GRAM_FILE = "gram.safetensors"  # this project's gram format (see README)
SEED_GRAM_FILE = "gram.pkl"  # the seed's published format, read only


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


def first_line(error):
    """An exception as one line for a UserError message: its type and its message's first line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def run_main(main):
    """Run a stage's main(); a UserError becomes one clear line on stderr and exit 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- device, dtype
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def choose_device(name="auto"):
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available")
    return torch.device(name)


def choose_dtype(name, device, default=None):
    """'auto' -> `default` when given (e.g. the experts' own dtype), else bfloat16 on cuda
    and float32 on cpu (bfloat16 matmuls are slow on most CPUs)."""
    if name != "auto":
        return DTYPES[name]
    if default is not None:
        return default
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- models
def resolve_model_dir(name_or_path):
    """A preset name, a local folder or a hub id -> a local folder holding the checkpoint.
    Hub ids resolve to the local snapshot (downloaded once by huggingface_hub)."""
    spec = PRESETS[name_or_path]["model"] if name_or_path in PRESETS else name_or_path
    if Path(spec).is_dir():
        return Path(spec)
    if Path(spec).exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise UserError(f"model {spec!r} is neither a folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as e:  # offline, missing repo, no access: one line, not a traceback
        raise UserError(f"cannot get model {spec!r} from the hub: {first_line(e)}")


def checkpoint_files(model_dir):
    """{tensor name: safetensors file} of a checkpoint folder (one file, or shards with an index)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} holds no .safetensors weights")
    from safetensors import safe_open

    out = {}
    for file in files:
        with safe_open(file, "pt") as f:
            out.update({name: file for name in f.keys()})
    return out


def tensor_infos(files):
    """{tensor name: (shape tuple, safetensors dtype string)} without reading any data."""
    from safetensors import safe_open

    by_file = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    infos = {}
    for file, names in by_file.items():
        with safe_open(file, "pt") as f:
            for name in names:
                s = f.get_slice(name)
                infos[name] = (tuple(s.get_shape()), s.get_dtype())
    return infos


def read_tensor(file, name, rows=None):
    """One tensor (or rows[0]:rows[1] of it) from a safetensors file. The file is opened and
    closed per read so that its pages do not stay resident for the whole run."""
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        if rows is None:
            return f.get_tensor(name)
        return f.get_slice(name)[rows[0]:rows[1]]


# ----------------------------------------------------------------------------- calibration data
def load_rows(dataset, split="train", num_examples=None):
    """The first `num_examples` rows (unshuffled) of a local .json/.jsonl/.parquet/.csv file or
    of a hub dataset's split, as a list of dicts. Hub datasets are streamed, so only the rows
    used are downloaded."""
    import datasets

    path = Path(PRESETS[dataset]["dataset"] if dataset in PRESETS else dataset)
    try:
        if path.suffix in (".json", ".jsonl", ".parquet", ".csv"):
            if not path.is_file():
                raise UserError(f"dataset file {path} does not exist")
            builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}[path.suffix]
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
            n = len(ds) if num_examples is None else min(num_examples, len(ds))
            rows = ds.select(range(n)).to_list()
        else:
            ds = datasets.load_dataset(str(path), split=split, streaming=True)
            rows = list(ds.take(num_examples)) if num_examples is not None else list(ds)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load dataset {str(path)!r} (split {split!r}): {first_line(e)}")
    if not rows:
        raise UserError(f"dataset {str(path)!r} split {split!r} has no rows")
    if num_examples is not None and len(rows) < num_examples:
        print(f"note: asked for {num_examples} examples, {path} has {len(rows)}; using {len(rows)}", file=sys.stderr)
    return rows


def format_rows(rows, fmt, tokenizer):
    """Rows -> chat-template texts (the template renders the BOS token itself)."""
    turns = FORMATS[fmt]
    missing = {col for _, col in turns} - set(rows[0])
    if missing:
        raise UserError(f"rows lack column(s) {sorted(missing)} needed by format {fmt!r}; they have {sorted(rows[0])}")
    texts = []
    for row in rows:
        messages = [{"role": role, "content": str(row[col] or "")} for role, col in turns]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def tokenize_texts(tokenizer, texts, max_length):
    """Texts -> lists of token ids, truncated to max_length, with no special tokens added
    (the chat template already wrote BOS; adding it again gives a double BOS)."""
    if max_length < 1:
        raise UserError(f"--max-length must be >= 1, got {max_length}")
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)
    return enc["input_ids"]


# ----------------------------------------------------------------------------- gram files
# safetensors dtype names (https://github.com/huggingface/safetensors, format section)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_header(specs, metadata=None):
    """Lay out a .safetensors file from shapes alone: specs {name: (shape, torch dtype)} in file
    order -> (the bytes before the data: 8-byte little-endian length + JSON header padded so the
    data starts 8-byte aligned, {name: (first byte, end byte) within the data})."""
    header, spans, offset = {}, {}, 0
    for name, (shape, dtype) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        spans[name] = (offset, offset + size)
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob, spans


def write_safetensors(path, tensors, metadata=None, dtype=None):
    """Write {name: tensor} as a .safetensors file, one tensor at a time: the header is laid out
    first from the shapes alone, then each tensor is copied to the host (cast to `dtype` when
    given) and appended. Host memory holds one tensor at a time, whatever device the tensors
    live on. Atomic: written under a temporary name and renamed when complete."""
    path = Path(path)
    head, _ = safetensors_header({name: (tuple(t.shape), dtype or t.dtype) for name, t in tensors.items()}, metadata)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for t in tensors.values():
                host = t.detach().to("cpu", dtype or t.dtype).contiguous()
                f.write(host.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, no extra copy
                del host
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_grams(path, grams, aliases, num_tokens, provenance):
    """Write gram.safetensors atomically: `grams` {stored key: [in, in] sum / num_tokens} on
    any device(s), `aliases` {other module: stored key}, provenance {str: str}. The grams are
    streamed to disk one at a time as float32 (a Llama-3-8B's 32 GB never sit in host memory
    at once), and nothing appears under `path` until the file is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in provenance.items()}
    metadata.update(num_tokens=str(int(num_tokens)), aliases=json.dumps(aliases, sort_keys=True), format="regmean-gram-v1")
    write_safetensors(path, grams, metadata, dtype=torch.float32)


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Admits what a pickled {name: tensor} dict needs and nothing else: a pickle that names
    any other callable (os.system, eval, ...) is refused before anything runs."""

    ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "FloatStorage"),
        ("torch", "BFloat16Storage"),
        ("torch", "HalfStorage"),
        ("torch", "DoubleStorage"),
    }

    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            # Plain-pickled tensors carry their storage as a nested torch.save blob; load it
            # with torch's own weights-only unpickler instead of the unrestricted default.
            return lambda b: torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
        if (module, name) in self.ALLOWED:
            return getattr(sys.modules[module] if module in sys.modules else __import__(module, fromlist=[name]), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a gram pickle holds tensors only")


def load_seed_pickle(path):
    """The seed's gram.pkl ({module: float32 [in, in]}) through the restricted unpickler.
    A torch.save zip archive under that name goes through torch.load(weights_only=True)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            obj = torch.load(f, weights_only=True, map_location="cpu") if head == b"PK\x03\x04" else _TensorsOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UserError(f"{path}: not a gram pickle ({str(e).splitlines()[0]})")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a dict of module name -> tensor")
    return obj


class GramFile:
    """Read access to one expert's grams, whatever the format: `gram.safetensors` (lazy, one
    tensor per `get`, shared inputs stored once) or the seed's `gram.pkl` (loaded whole).

        grams = GramFile("runs/merges/code-llama3")   # a folder or a file
        grams.modules()          # every linear module with a gram, aliases included
        grams.get("model.layers.0.self_attn.k_proj")  # float32 [in, in]
    """

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            path = path / GRAM_FILE if (path / GRAM_FILE).exists() else path / SEED_GRAM_FILE
        if not path.exists():
            raise UserError(f"gram file {path} does not exist (run compute_gram.py first)")
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                self.metadata = f.metadata() or {}
                keys = list(f.keys())
            aliases = json.loads(self.metadata.get("aliases", "{}"))
            self.key_of = {k: k for k in keys} | aliases
            self._tensors = None
        else:
            self._tensors = load_seed_pickle(path)
            self.metadata = {"format": "seed-pickle"}
            self.key_of = {k: k for k in self._tensors}

    def modules(self):
        return list(self.key_of)

    def __contains__(self, module):
        return module in self.key_of

    def get(self, module):
        key = self.key_of[module]
        if self._tensors is not None:
            return self._tensors[key].to(torch.float32)
        return read_tensor(self.path, key).to(torch.float32)

    def shape(self, module):
        if self._tensors is not None:
            return tuple(self._tensors[self.key_of[module]].shape)
        from safetensors import safe_open

        with safe_open(self.path, "pt") as f:
            return tuple(f.get_slice(self.key_of[module]).get_shape())


# ----------------------------------------------------------------------------- output folders
@contextlib.contextmanager
def atomic_dir(final, overwrite=False):
    """Yield a temporary folder beside `final`; rename it to `final` when the block ends
    without error, delete it otherwise. An existing `final` is refused unless overwrite."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise UserError(f"{final} exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- run figures
def peak_memory(device=None):
    """Peak resident memory of this process (GiB) and, on cuda, peak allocated device memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    text = f"peak RSS {rss:.2f} GiB"
    if device is not None and torch.device(device).type == "cuda":
        text += f", peak GPU {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return text


class Timer:
    """Accumulates wall time per named phase: `with timer("solve"): ...`."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases = {}

    @contextlib.contextmanager
    def __call__(self, phase):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0

    def total(self):
        return time.perf_counter() - self.start
