"""safetensors I/O: tensor reads and headers of checkpoints, files written one tensor at a time,
the shard writer of the merged model, and the gram files (this project's gram.safetensors and the
seed's gram.pkl, read through a restricted unpickler)."""

import io
import json
import math
import os
import pickle
import sys
from pathlib import Path

import torch

from utils import GRAM_FILE, SEED_GRAM_FILE, UserError, did_you_mean, first_line

# safetensors dtype names (https://github.com/huggingface/safetensors, format section)
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}  # "BF16" -> torch.bfloat16


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
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


def tensor_infos(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
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


def read_tensor(file: str | Path, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor (or rows[0]:rows[1] of it) from a safetensors file. The file is opened and
    closed per read so that its pages do not stay resident for the whole run."""
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        if rows is None:
            return f.get_tensor(name)
        return f.get_slice(name)[rows[0] : rows[1]]


# ----------------------------------------------------------------------------- writing
def safetensors_header(
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Lay out a .safetensors file from shapes alone: specs {name: (shape, torch dtype)} in file
    order -> (the bytes before the data: 8-byte little-endian length + JSON header padded so the
    data starts 8-byte aligned, {name: (first byte, end byte) within the data})."""
    header, spans, offset = {}, {}, 0
    for name, (shape, dtype) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        spans[name] = (offset, offset + size)
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob, spans


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None, dtype: torch.dtype | None = None
) -> None:
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


class ShardWriter:
    """Writes safetensors shards whose layout is planned up front (names, shapes, dtypes), so that
    each tensor, or each block of its rows, goes to its final place in the file as soon as it is
    merged: nothing waits in memory for a shard to fill. The sharding and the index follow
    huggingface_hub's split_torch_state_dict_into_shards."""

    def __init__(self, out_dir: str | Path, plan: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size: str):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.out_dir = Path(out_dir)
        meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in plan.items()}
        try:
            self.split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
        except ValueError as e:
            raise UserError(f"--max-shard-size {max_shard_size!r}: {e}") from e
        self.where = {}  # tensor name -> (fd, byte offset of its data, bytes per row, total bytes)
        self.fds, self.written = [], {}
        for filename, names in self.split.filename_to_tensors.items():
            head, spans = safetensors_header({name: plan[name] for name in names}, {"format": "pt"})
            fd = os.open(self.out_dir / filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, len(head) + max((end for _, end in spans.values()), default=0))
            self.fds.append(fd)
            for name, (begin, end) in spans.items():
                shape = plan[name][0]
                row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
                self.where[name] = (fd, len(head) + begin, row_bytes, end - begin)
                self.written[name] = 0

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Write `tensor` (already in the planned dtype) as rows row.. of tensor `name`."""
        fd, start, row_bytes, _ = self.where[name]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        os.pwrite(fd, memoryview(data), start + row * row_bytes)
        self.written[name] += data.nbytes

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def finish(self) -> None:
        """Close the shards, check that every byte was written, and write the index."""
        self.close()
        short = [n for n, (_, _, _, size) in self.where.items() if self.written[n] != size]
        if short:
            raise RuntimeError(f"tensor {short[0]} was not written completely")
        if self.split.is_sharded:
            index = dict(metadata=self.split.metadata, weight_map=self.split.tensor_to_filename)
            (self.out_dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )


# ----------------------------------------------------------------------------- gram files
def save_grams(
    path: str | Path, grams: dict[str, torch.Tensor], aliases: dict[str, str], num_tokens: int, provenance: dict
) -> None:
    """Write gram.safetensors atomically: `grams` {stored key: [in, in] sum / num_tokens} on
    any device(s), `aliases` {other module: stored key}, provenance {str: str}. The grams are
    streamed to disk one at a time as float32 (a Llama-3-8B's 32 GB never sit in host memory
    at once), and nothing appears under `path` until the file is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in provenance.items()}
    metadata.update(
        num_tokens=str(int(num_tokens)), aliases=json.dumps(aliases, sort_keys=True), format="regmean-gram-v1"
    )
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


def load_seed_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """The seed's gram.pkl ({module: float32 [in, in]}) through the restricted unpickler.
    A torch.save zip archive under that name goes through torch.load(weights_only=True)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            obj = (
                torch.load(f, weights_only=True, map_location="cpu")
                if head == b"PK\x03\x04"
                else _TensorsOnlyUnpickler(f).load()
            )
    except (pickle.UnpicklingError, RuntimeError, EOFError, TypeError, ValueError) as e:  # malformed: one line
        raise UserError(f"{path}: not a gram pickle ({first_line(e)})") from e
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

    def __init__(self, path: str | Path):
        given, path = path, Path(path)
        if path.is_dir():
            path = path / GRAM_FILE if (path / GRAM_FILE).exists() else path / SEED_GRAM_FILE
        if not path.exists():
            hint = did_you_mean(given) or " (run compute_gram.py first)"
            raise UserError(f"gram file {path} does not exist{hint}")
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

    def modules(self) -> list[str]:
        return list(self.key_of)

    def __contains__(self, module: str) -> bool:
        return module in self.key_of

    def get(self, module: str) -> torch.Tensor:
        key = self.key_of[module]
        if self._tensors is not None:
            return self._tensors[key].to(torch.float32)
        return read_tensor(self.path, key).to(torch.float32)

    def shape(self, module: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[self.key_of[module]].shape)
        from safetensors import safe_open

        with safe_open(self.path, "pt") as f:
            return tuple(f.get_slice(self.key_of[module]).get_shape())


# ----------------------------------------------------------------------------- fingerprints
FINGERPRINT_WINDOWS = 16  # byte windows hashed per tensor, evenly spaced from its first byte to its last
FINGERPRINT_WINDOW = 4096  # bytes per window; a tensor no larger than all its windows is hashed whole


def model_fingerprint(files: dict[str, Path]) -> str:
    """A cheap fingerprint of a checkpoint's weights, "sampled-v1:" + sha256 over every tensor in
    name order of: its name, dtype, shape and a sample of its bytes (FINGERPRINT_WINDOWS windows of
    FINGERPRINT_WINDOW bytes, evenly spaced, first and last bytes included; tensors of up to 64 KiB,
    such as norms and biases, whole). It reads at most 64 KiB per tensor (about 18 MB for a
    Llama-3-8B's 291 tensors), not the 16 GB. What it covers: any change of the names, dtypes or
    shapes, any change of a small tensor, and any change of a large tensor that touches a sampled
    window, so every fine-tune (which moves nearly every weight); a change confined to bytes
    outside the windows of a large tensor is not seen. It does not depend on how the checkpoint
    is sharded. files: {tensor name: safetensors file}, as checkpoint_files gives."""
    import hashlib

    headers = {}
    for file in set(files.values()):
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            headers[file] = (8 + n, json.loads(f.read(n)))
    h = hashlib.sha256()
    for name in sorted(files):
        start, header = headers[files[name]]
        entry = header[name]
        begin, end = entry["data_offsets"]
        size = end - begin
        h.update(json.dumps([name, entry["dtype"], entry["shape"], size]).encode())
        if size <= FINGERPRINT_WINDOWS * FINGERPRINT_WINDOW:
            spans = [(0, size)]
        else:
            last = size - FINGERPRINT_WINDOW
            spans = [(k * last // (FINGERPRINT_WINDOWS - 1), FINGERPRINT_WINDOW) for k in range(FINGERPRINT_WINDOWS)]
        with open(files[name], "rb") as f:
            for offset, length in spans:
                f.seek(start + begin + offset)
                h.update(f.read(length))
    return "sampled-v1:" + h.hexdigest()


def config_fingerprint(config: dict) -> str:
    """sha256 of a config.json's content (keys sorted), leaving out the fields that describe how it
    was saved rather than the model: transformers_version, and the dtype a merge rewrites."""
    import hashlib

    skip = {"transformers_version", "dtype", "torch_dtype"}
    text = json.dumps({k: v for k, v in config.items() if k not in skip}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
