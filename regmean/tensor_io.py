"""safetensors I/O: tensor reads and headers of checkpoints, files written one tensor at a time,
the shard writer of the merged model, and the gram files (this project's gram.safetensors, and the
seed's gram.pkl through regmean/seed_pickle.py)."""

import json
import math
import os
from pathlib import Path

import torch

from .utils import GRAM_FILE, SEED_GRAM_FILE, UserError, did_you_mean, first_line, temporary_of

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
    with temporary_of(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)
            for t in tensors.values():
                host = t.detach().to("cpu", dtype or t.dtype).contiguous()
                f.write(host.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, no extra copy
                del host
        os.replace(tmp, path)


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
# gram.safetensors, format regmean-gram-v2: each gram is stored as its packed upper triangle, a flat
# float32 tensor of n(n+1)/2 values, row i's columns i..n-1 one row after another. Packed rather
# than as the accumulator's block rows: exactly half the square (an 8B expert's 16.4 GB against
# 18.5 GB for 8 block rows, which also hold the diagonal blocks whole), and the layout does not
# depend on how an accumulator cut its blocks. regmean-gram-v1 files hold full [n, n] squares.
GRAM_FORMAT = "regmean-gram-v2"
READ_CHUNK = 64 * 2**20  # bytes per read when a packed gram is unpacked
MIRROR_ROWS = 256  # rows per stripe when the lower triangle is mirrored from the upper one
MIRROR_UPPER = torch.ones(MIRROR_ROWS, MIRROR_ROWS, dtype=torch.bool).triu()


def packed_offsets(dim: int) -> list[int]:
    """Where each row starts in a packed upper triangle: row i holds columns i..dim-1 and starts at
    i·dim - i(i-1)/2; the last entry is the packed length dim(dim+1)/2."""
    return [i * dim - i * (i - 1) // 2 for i in range(dim + 1)]


def mirror_upper(full: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
    """Make the square `full` symmetric from its upper triangle, in place, for the columns
    start..stop of its lower triangle (default: all), in stripes small enough for the cache."""
    stop = full.shape[0] if stop is None else stop
    for a in range(start, stop, MIRROR_ROWS):
        b = min(a + MIRROR_ROWS, stop)
        diagonal, upper = full[a:b, a:b], MIRROR_UPPER[: b - a, : b - a].to(full.device)
        diagonal.copy_(torch.where(upper, diagonal, diagonal.T))
        full[b:, a:b].copy_(full[a:b, b:].T)


def packed_dim(length: int) -> int:
    """n such that n(n+1)/2 == length (ValueError if there is none)."""
    n = (math.isqrt(8 * length + 1) - 1) // 2
    if n * (n + 1) // 2 != length:
        raise ValueError(f"{length} values are no packed triangle")
    return n


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. A sum is one fast pass and is finite whenever every value is (but for
    an overflow, which the exact check below then settles)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def save_grams(
    path: str | Path, grams: dict[str, torch.Tensor], aliases: dict[str, str], num_tokens: int, provenance: dict
) -> None:
    """Write gram.safetensors atomically: `grams` {stored key: sum / num_tokens}, each either a
    [in, in] matrix (only its upper triangle is read) or already packed (Gram.packed()), on any
    device(s); `aliases` {other module: stored key}, provenance {str: str}. The grams are streamed
    to disk one at a time, packed float32, and nothing appears under `path` until the file is
    complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in provenance.items()}
    metadata.update(num_tokens=str(int(num_tokens)), aliases=json.dumps(aliases, sort_keys=True), format=GRAM_FORMAT)
    dims = {k: g.shape[0] if g.dim() == 2 else packed_dim(g.numel()) for k, g in grams.items()}
    for key, g in grams.items():
        if g.dim() == 2 and g.shape[1] != g.shape[0]:
            raise ValueError(f"gram {key} is not square: {list(g.shape)}")
    head, _ = safetensors_header({k: ((n * (n + 1) // 2,), torch.float32) for k, n in dims.items()}, metadata)
    with temporary_of(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)
            for n, g in zip(dims.values(), grams.values()):  # values(): a lazy mapping may free each as it goes
                if g.dim() == 1:
                    chunks = [g]
                else:  # a square: its rows' upper parts, a few MB at a time
                    step = max(1, READ_CHUNK // 4 // n)
                    chunks = (torch.cat([g[i, i:] for i in range(a, min(a + step, n))]) for a in range(0, n, step))
                for chunk in chunks:
                    host = chunk.detach().to("cpu", torch.float32).contiguous()
                    f.write(host.view(torch.uint8).numpy().data)
                    del host
        os.replace(tmp, path)


def read_exactly(f, offset: int, nbytes: int) -> torch.Tensor:
    """nbytes from byte `offset` of an unbuffered binary file, straight into a new uint8 tensor."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view, done = memoryview(buf.numpy()), 0
    f.seek(offset)
    while done < nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise UserError(f"{f.name}: the file ends early (truncated?)")
        done += got
    return buf


class GramFile:
    """Read access to one expert's grams, whatever the format, one gram per `get`: gram.safetensors
    (v2 packed upper triangles or v1 full squares; shared inputs stored once) or the reference
    release's gram.pkl (see regmean/seed_pickle.py). `get` always returns the full symmetric float32
    [in, in] matrix, checked finite; `bytes_read` counts the file bytes its reads took.

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
        self.path, self.bytes_read = path, 0
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                try:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
                except (ValueError, UnicodeDecodeError) as e:
                    raise UserError(f"{path}: not a safetensors file ({first_line(e)})") from e
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = {
                k: (v["dtype"], tuple(v["shape"]), 8 + size + v["data_offsets"][0]) for k, v in header.items()
            }
            self.key_of = {k: k for k in self.entries} | json.loads(self.metadata.get("aliases", "{}"))
            self.seed = None
        else:
            from .seed_pickle import SeedPickle

            self.seed = SeedPickle(path)
            self.metadata = {"format": "seed-pickle"}
            self.key_of = {k: k for k in self.seed.keys()}

    def modules(self) -> list[str]:
        return list(self.key_of)

    def __contains__(self, module: str) -> bool:
        return module in self.key_of

    def shape(self, module: str) -> tuple[int, ...]:
        """The gram's [in, in] shape (without reading it)."""
        key = self.key_of[module]
        if self.seed is not None:
            return self.seed.shape(key)
        shape = self.entries[key][1]
        if len(shape) != 1:
            return shape
        try:
            return (packed_dim(shape[0]),) * 2
        except ValueError as e:
            raise UserError(f"{self.path}: gram {key} has {shape[0]} values, not a packed triangle") from e

    def get(self, module: str) -> torch.Tensor:
        """The gram of `module`'s input: full, symmetric, float32, on the cpu. A gram holding NaN
        or Inf is refused (UserError), so that a merge checks each gram as it reads it."""
        key = self.key_of[module]
        if self.seed is not None:
            gram, nbytes = self.seed.get(key)
        elif len(self.entries[key][1]) == 1:
            return self._read_packed(key)  # checked as it is read
        else:
            gram, nbytes = self._read_square(key)
        self.bytes_read += nbytes
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise UserError(f"{self.path}: gram {key} has shape {list(gram.shape)}, not a square")
        if not all_finite(gram):
            raise UserError(f"{self.path}: gram {key} holds NaN or Inf")
        return gram

    def _read_square(self, key: str) -> tuple[torch.Tensor, int]:
        """A v1 gram: the full square as stored."""
        dtype_name, shape, offset = self.entries[key]
        dtype = ST_DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        with open(self.path, "rb", buffering=0) as f:
            return read_exactly(f, offset, nbytes).view(dtype).reshape(shape).to(torch.float32), nbytes

    def _read_packed(self, key: str) -> torch.Tensor:
        """A v2 gram: packed rows read a chunk at a time into the upper triangle, each chunk checked
        finite, and mirrored into the lower one a stripe of rows at a time."""
        dtype_name, (length,), offset = self.entries[key]
        dtype, n = ST_DTYPES[dtype_name], packed_dim(length)
        rows, full = packed_offsets(n), torch.empty(n, n, dtype=torch.float32)
        flat = full.view(-1)
        step, a = max(1, READ_CHUNK // dtype.itemsize // n), 0
        with open(self.path, "rb", buffering=0) as f:
            while a < n:
                b = min(a + step, n)
                chunk = read_exactly(f, offset + rows[a] * dtype.itemsize, (rows[b] - rows[a]) * dtype.itemsize)
                self.bytes_read += chunk.numel()
                chunk = chunk.view(dtype).to(torch.float32)
                if not all_finite(chunk):
                    raise UserError(f"{self.path}: gram {key} holds NaN or Inf")
                for i in range(a, b):  # row i's columns i.. (flat views: the cheapest copy per row)
                    flat[i * n + i : (i + 1) * n].copy_(chunk[rows[i] - rows[a] : rows[i + 1] - rows[a]])
                mirror_upper(full, a, b)
                a = b
        return full


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
