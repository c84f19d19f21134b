"""The reference release's gram.pkl, read one gram at a time and nothing run but tensor rebuilding.

The reference wrote `pickle.dump({module name: gram.cpu()}, f)`. A torch tensor pickles as
torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...), and its storage as
torch.storage._load_from_bytes(blob): the blob is a legacy torch.save of the tensor's WHOLE storage,
so a view or slice of a larger tensor carries all of that tensor's bytes (once per view: pickle does
not share storages between tensors). An 8B expert's file is ~33 GB, more than many machines' memory.

So the pickle is not loaded whole. A restricted pure-Python unpickler walks the stream once and skips
every large byte string (a storage blob: pickle writes those outside its frames) by seeking past it,
keeping only where it lies; the dict it builds holds, per module, the blob's place and the tensor's
offset, size and stride. `get` then reads one blob with torch's weights-only loader, takes the
tensor's own elements out of the storage (a copy, so a view never keeps its whole storage alive)
and refuses, in one line, a storage larger than the memory available. Opening a 33 GB file reads a
few KB; each gram's read is its storage's bytes.

A torch.save zip archive under that name is opened with torch.load(mmap=True, weights_only=True):
its storages stay on disk until a gram is taken. A legacy (non-zip) torch.save file is loaded whole,
if it fits in the memory available.
"""

import io
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .utils import UserError, first_line

SKIP_BYTES = 1 << 16  # byte strings at least this long are skipped over, not read, when the pickle is opened
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # a legacy torch.save file's first bytes


@dataclass(frozen=True)
class Blob:
    """A byte string the unpickler skipped: `length` bytes from file offset `offset`."""

    offset: int
    length: int


@dataclass(frozen=True)
class LazyTensor:
    """A pickled tensor not yet read: its storage (a Blob, or the bytes themselves when small) and
    where in it the tensor's elements are."""

    storage: Blob | bytes
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *rest) -> LazyTensor:
    return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *rest):
    return data


class LazyUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (it reads the file through our hands, so large byte strings can be
    skipped), admitting only what a pickled {name: tensor} dict needs: anything else (os.system,
    eval, ...) is refused before it runs."""

    ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,  # a tensor's backward hooks
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): lambda blob: blob,  # read later, by torch's weights-only loader
    }
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file):
        super().__init__(file)
        self.raw = file
        self.size = Path(file.name).stat().st_size

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a gram pickle holds tensors only")

    def push_bytes(self, length: int) -> None:
        frame = self._unframer.current_frame
        if frame is not None:
            with frame.getbuffer() as buffer:
                in_frame = frame.tell() < buffer.nbytes
        if length < SKIP_BYTES or (frame is not None and in_frame):
            data = self.read(length)
            if len(data) < length:
                raise EOFError("the pickle ends inside a byte string")
            self.append(data)
            return
        start = self.raw.tell()
        if start + length > self.size:
            raise EOFError(f"a {length}-byte string runs past the end of the file")
        self.raw.seek(length, 1)
        self.append(Blob(start, length))

    def load_binbytes(self):
        self.push_bytes(struct.unpack("<I", self.read(4))[0])

    def load_binbytes8(self):
        self.push_bytes(struct.unpack("<Q", self.read(8))[0])

    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8


def available_memory() -> int:
    """Bytes of memory this process can still take: MemAvailable, or what its cgroup's limit
    leaves when that is less."""
    values = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    free = int(values["MemAvailable"].split()[0]) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def check_fits(path: Path, what: str, nbytes: int) -> None:
    free = available_memory()
    if nbytes > free:
        raise UserError(
            f"{path}: {what} needs {nbytes / 1e9:.1f} GB of memory, {free / 1e9:.1f} GB are available; "
            "convert the file on a larger machine (e.g. to gram.safetensors with tensor_io.save_grams)"
        )


class SeedPickle:
    """{module: gram} of a gram.pkl, one gram read per `get`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(LEGACY_MAGIC))
                f.seek(0)
                if head.startswith(b"PK\x03\x04"):  # torch.save's zip archive: storages mapped, read on use
                    obj = torch.load(f.name, weights_only=True, map_location="cpu", mmap=True)
                elif head == LEGACY_MAGIC:
                    check_fits(self.path, "this legacy torch.save file, loaded whole,", self.path.stat().st_size)
                    obj = torch.load(f, weights_only=True, map_location="cpu")
                else:
                    obj = LazyUnpickler(f).load()
        except (pickle.UnpicklingError, RuntimeError, EOFError, TypeError, ValueError, struct.error) as e:
            raise UserError(f"{self.path}: not a gram pickle ({first_line(e)})") from e
        if not isinstance(obj, dict) or not all(isinstance(v, (torch.Tensor, LazyTensor)) for v in obj.values()):
            raise UserError(f"{self.path}: expected a dict of module name -> tensor")
        self.tensors = obj

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        t = self.tensors[key]
        return tuple(t.size) if isinstance(t, LazyTensor) else tuple(t.shape)

    def get(self, key: str) -> tuple[torch.Tensor, int]:
        """(the gram as a float32 tensor of its own, the file bytes read for it)."""
        t = self.tensors[key]
        if isinstance(t, torch.Tensor):  # from torch.load: its own elements, copied out of the mapped storage
            return t.to(torch.float32, memory_format=torch.contiguous_format, copy=True), t.numel() * t.element_size()
        numel = 1
        for s in t.size:
            numel *= s
        if isinstance(t.storage, Blob):
            check_fits(
                self.path, f"gram {key} (its pickled storage and the float32 matrix)", t.storage.length + 4 * numel
            )
            source, nbytes = open(self.path, "rb"), t.storage.length
            source.seek(t.storage.offset)
        else:
            source, nbytes = io.BytesIO(t.storage), 0  # read with the pickle's opening
        try:
            with source:
                storage = torch.load(source, weights_only=True, map_location="cpu")
            untyped = getattr(storage, "_untyped_storage", storage)  # TypedStorage.untyped() warns it is deprecated
            view = torch.empty(0, dtype=storage.dtype).set_(untyped, t.offset, t.size, t.stride)
        except (pickle.UnpicklingError, RuntimeError, EOFError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{self.path}: gram {key} cannot be read ({first_line(e)})") from e
        return view.to(torch.float32, memory_format=torch.contiguous_format, copy=True), nbytes
