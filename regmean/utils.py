"""The bottom of the layout, what every other module may use: presets, row formats, UserError,
device and dtype choice, model folders, output folders written atomically, and run figures.

Nothing here runs on import; the stage scripts (compute_gram.py, merge_model.py,
evaluate.py, demo.py) are the entry points.
"""

import contextlib
import fcntl
import functools
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

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

GRAM_FILE = "gram.safetensors"  # this project's gram format (see docs/grams.md)
SEED_GRAM_FILE = "gram.pkl"  # the seed's published format, read only


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


def first_line(error):
    """An exception as one line for a UserError message: its type and its message's first line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def plain_settings(settings: dict) -> dict:
    """Settings given from Python as the command line would give them: paths as strings, sequences as lists
    (merge(models=[Path(a), Path(b)]) records and checks like --models a b)."""
    as_text = lambda v: str(v) if isinstance(v, Path) else v
    return {k: [as_text(x) for x in v] if isinstance(v, (list, tuple)) else as_text(v) for k, v in settings.items()}


def check_at_least_one(**values: int) -> None:
    """Refuse a count option below 1: check_at_least_one(batch_size=0) -> "--batch-size must be >= 1"."""
    for name, value in values.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


# ----------------------------------------------------------------------------- device, dtype
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", as written in configs, reports and logs."""
    return str(dtype).removeprefix("torch.")


def choose_device(name="auto"):
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available")
    return torch.device(name)


def cpu_bf16_support(flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether this CPU has native bfloat16 instructions (avx512_bf16 or AMX tiles), and the evidence.

    Without them PyTorch emulates bfloat16 matmuls and they run several times slower than float32
    (measured on such a cpu: 13 against 104 GFLOP/s on a 2048² matmul). With them bfloat16 may still
    be the slower one: cpu_bf16_choice() times it before `auto` takes it. Evidence is PyTorch's own CPUID
    probe (what its kernels will use) and /proc/cpuinfo's flags; either suffices. `flags` replaces
    /proc/cpuinfo's (and skips PyTorch's probe), for tests."""
    native = {"avx512_bf16", "amx_bf16"}
    if flags is None:
        probe = {
            "avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)(),
            "amx_tile": getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)(),
        }
        found = {name for name, yes in probe.items() if yes}
        if found:
            return True, f"torch reports {', '.join(sorted(found))}"
        flags = cpu_flags()
    found = native & flags
    if found:
        return True, f"cpu flags {', '.join(sorted(found))}"
    return False, "no avx512_bf16 or amx_bf16 on this cpu (bfloat16 matmuls would be emulated)"


def cpu_flags() -> set[str]:
    """The first processor's flags in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


# `auto` takes bfloat16 on a cpu with native bfloat16 only where a timed product runs at least this many times
# float32's speed: the flag says what the cpu can do, not what this PyTorch build makes of it (an Intel Xeon with
# avx512_bf16 and AMX has run bfloat16 at half its float32 speed, another of the same model at 3-7x, an AMD EPYC
# at 2.3x; docs/benchmarks.md). Below it the measurement's noise could decide; float32, the more accurate, wins ties.
CPU_BF16_MIN_SPEEDUP = 1.2
CPU_PROBE_WIDTH = 2048  # the width timed when the caller does not know the model's (its hidden size)


def cpu_matmul_gflops(width: int = CPU_PROBE_WIDTH, repeats: int = 3) -> tuple[float, float]:
    """(float32, bfloat16) GFLOP/s of F.linear on the cpu, as the forward passes at hidden size
    `width` run it: rows × width into min(width, 1024) outputs; one warm-up each, then `repeats`
    rounds alternating the two dtypes (so a neighbour's load hits both alike), the best time of
    each. Rows (128-8192) make a product ~4 GFLOP: on 2 shared cores a product of 1 GFLOP took a
    whole scheduler tick or two whatever its dtype, hiding a 3x difference. 0.2-0.4 s on 2 cores."""
    import torch.nn.functional as F

    out = min(width, 1024)
    rows = min(8192, max(128, 2**31 // (width * out)))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, width, generator=g), torch.randn(out, width, generator=g)
    pairs = {dtype: (x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, float("inf"))
    with torch.inference_mode():
        for i in range(repeats + 1):
            for dtype, (a, b) in pairs.items():
                t0 = time.perf_counter()
                F.linear(a, b)
                if i:  # round 0 warms up (oneDNN builds its kernels)
                    best[dtype] = min(best[dtype], time.perf_counter() - t0)
    flop = 2 * rows * width * out
    return flop / best[torch.float32] / 1e9, flop / best[torch.bfloat16] / 1e9


@functools.cache
def cpu_bf16_measured(width: int, threads: int) -> tuple[float, float]:
    """cpu_matmul_gflops(width), measured once per process for each width and thread count."""
    return cpu_matmul_gflops(width)


# Set to 1 or 0, `auto` answers bfloat16 or float32 on any cpu, as a cpu with or without native bfloat16 would,
# without timing anything: `make test` runs the dtype-sensitive tests both ways with it, whatever cpu CI was given.
CPU_BF16_ENV = "REGMEAN_CPU_BF16"


def cpu_bf16_choice(width: int | None = None, flags: set[str] | None = None, measure=None) -> tuple[bool, str]:
    """Whether `auto` takes bfloat16 on the cpu, and why: REGMEAN_CPU_BF16 where it is set (1 or 0);
    else float32 on a cpu without native bfloat16 (cpu_bf16_support, no timing), and on one with it
    bfloat16 only where it measured at least CPU_BF16_MIN_SPEEDUP times float32's GFLOP/s at the
    model's `width` (CPU_PROBE_WIDTH when None). Read here only. For tests: `flags` replaces the cpu's
    (cpu_bf16_support), `measure(width) -> (float32, bfloat16) GFLOP/s` the timing."""
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced not in ("", "0", "1"):
        raise UserError(f"{CPU_BF16_ENV} must be 1 or 0 (or unset), got {forced!r}")
    native, why = cpu_bf16_support(flags)
    if forced:
        return forced == "1", f"{CPU_BF16_ENV}={forced} in the environment; this cpu: {why}"
    if not native:
        return False, why
    width = width or CPU_PROBE_WIDTH
    f32, bf16 = (measure or (lambda w: cpu_bf16_measured(w, torch.get_num_threads())))(width)
    faster = bf16 >= CPU_BF16_MIN_SPEEDUP * f32
    return faster, (
        f"{why}, {'and' if faster else 'but'} bfloat16 measured {bf16:.0f} against float32's {f32:.0f} GFLOP/s "
        f"at width {width} ({bf16 / f32:.2f}x; bfloat16 needs {CPU_BF16_MIN_SPEEDUP}x)"
    )


def auto_dtype(device: torch.device, width: int | None = None, **probe) -> tuple[torch.dtype, str]:
    """The compute dtype `--dtype auto` means on `device`, and why: bfloat16 on cuda; on the cpu
    bfloat16 where cpu_bf16_choice(width) says so (native bfloat16 that measured faster than
    float32 at the model's hidden size `width`, or REGMEAN_CPU_BF16=1), else float32. Forward
    passes (grams, RegMean++, evaluation) use it; sums of products stay float32 whatever it is.
    `probe` (flags=, measure=) goes to cpu_bf16_choice, for tests."""
    if device.type == "cuda":
        return torch.bfloat16, "cuda"
    bf16, why = cpu_bf16_choice(width, **probe)
    return (torch.bfloat16 if bf16 else torch.float32), why


def choose_dtype(name, device, default=None, width: int | None = None):
    """'auto' -> `default` when given (e.g. the experts' own dtype), else auto_dtype(device, width)."""
    if name != "auto":
        return DTYPES[name]
    if default is not None:
        return default
    return auto_dtype(torch.device(device), width)[0]


def describe_dtype(name: str, dtype: torch.dtype, device, width: int | None = None) -> str:
    """For the logs: "bfloat16" as asked, or "float32 (auto: torch reports avx512_bf16, but bfloat16
    measured 94 against float32's 190 GFLOP/s at width 576 (0.49x; bfloat16 needs 1.2x))"."""
    if name != "auto":
        return dtype_name(dtype)
    chosen, why = auto_dtype(torch.device(device), width)
    if chosen != dtype:  # several processes agreed on another rank's choice (agree_on_dtype)
        why += f"; {dtype_name(dtype)} as another process chose"
    return f"{dtype_name(dtype)} (auto: {why})"


def agree_on_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every process of a group runs: float32 if `auto` took it on any of them (each
    timed its own products, and a close call may go either way), else `dtype`. Every process of
    the group must call it at the same point; alone it returns `dtype`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dtype
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(dtype == torch.float32)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return torch.float32 if flag.item() else dtype


# ----------------------------------------------------------------------------- models
def resolve_model_dir(name_or_path):
    """A preset name, a local folder or a hub id -> a local folder holding the checkpoint.
    Hub ids resolve to the local snapshot (downloaded once by huggingface_hub)."""
    spec = PRESETS[name_or_path]["model"] if name_or_path in PRESETS else name_or_path
    if Path(spec).is_dir():
        return Path(spec)
    hint = did_you_mean(spec, PRESETS)
    if Path(spec).exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise UserError(f"model {spec!r} is neither a folder nor a hub id (owner/name){hint}")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(
            snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
        )
    except Exception as e:  # offline, missing repo, no access: one line, not a traceback
        if constants.HF_HUB_OFFLINE:  # not in the local cache either
            raise UserError(
                f"model {spec!r}: no such folder here, and the hub is unreachable (HF_HUB_OFFLINE=1){hint}"
            ) from e
        raise UserError(f"cannot get model {spec!r} from the hub: {first_line(e)}{hint}") from e


def did_you_mean(path, names=()) -> str:
    """ "; did you mean runs/demo/merges/regmean_0.1?" for a path that is not there: each missing part
    replaced by the closest name in its folder, when that leads to something that exists; `names`
    (e.g. the presets) are tried first for a bare name. "" when nothing is close."""
    import difflib

    text = str(path)
    if "/" not in text:
        close = difflib.get_close_matches(text, list(names), n=1)
        if close:
            return f"; did you mean {close[0]}?"
    p = Path(text)
    here, parts = (Path(p.parts[0]), p.parts[1:]) if p.is_absolute() else (Path(), p.parts)
    for i, part in enumerate(parts):
        if not (here / part).exists():
            try:
                close = difflib.get_close_matches(part, sorted(c.name for c in here.iterdir()), n=1)
            except OSError:
                return ""
            if not close:  # a folder left out (runs/smollm2-code for runs/demo/smollm2-code)?
                rest = Path(*parts[i:])
                found = sorted(here.glob(f"*/{rest}")) or sorted(here.glob(f"*/*/{rest}"))
                return f"; did you mean {found[0]}?" if found else ""
            part = close[0]
        here = here / part
    return f"; did you mean {here}?" if here != p and here.exists() else ""


def natural_key(text: str) -> list:
    """Sort key that orders numbers as numbers: layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]


def nth(index: int) -> str:
    """0 -> "first", 1 -> "second", ...: the 1-based place of a list entry in words."""
    return ORDINALS[index] if index < len(ORDINALS) else f"{index + 1}th"


# ----------------------------------------------------------------------------- progress
class Progress(tqdm):
    """A tqdm bar on a terminal; where stderr is not one (a redirected log) no bar, but one line when
    it closes (desc: N unit in S s), unless leave=False (a transient sub-step). Every long loop
    takes its bar from here: `for x in Progress(xs, desc="merge", unit="tensor")`."""

    def __init__(self, iterable=None, *args, **kwargs):
        self.quiet = not kwargs.get("disable") and not sys.stderr.isatty()
        if self.quiet:
            kwargs["disable"] = True
        self.said = dict(
            desc=kwargs.get("desc") or "done", unit=kwargs.get("unit", "it"), leave=kwargs.get("leave", True)
        )
        self.count, self.t0 = kwargs.get("initial", 0), time.perf_counter()
        super().__init__(iterable, *args, **kwargs)

    def __iter__(self):
        for item in super().__iter__():
            self.count += 1
            yield item

    def update(self, n=1):
        self.count += n
        return super().update(n)

    def close(self):
        if self.quiet and self.said["leave"]:
            self.quiet = False  # once: close runs again at garbage collection
            s = time.perf_counter() - self.t0
            print(f"{self.said['desc']}: {self.count:g} {self.said['unit']} in {s:.1f} s", file=sys.stderr)
        super().close()


# ----------------------------------------------------------------------------- output folders
MERGES_DIR = "runs/merges"
# method -> (folder name, display name): a merge folder is runs/merges/{name}_{alpha} (avg: runs/merges/avg)
MERGE_METHODS = {"avg": ("avg", "Average"), "regmean": ("regmean", "RegMean"), "regmean++": ("regmeanpp", "RegMean++")}


def merge_dir_name(method: str, alpha: float) -> str:
    """The folder name of a merge: avg, regmean_{alpha} or regmeanpp_{alpha}."""
    name = MERGE_METHODS[method][0]
    return name if method == "avg" else f"{name}_{alpha}"


def merge_label(dir_name: str) -> str:
    """A merge folder's name back to a row name: avg -> Average, regmean_0.1 -> RegMean (α=0.1),
    regmeanpp_0.1 -> RegMean++ (α=0.1); anything else as is."""
    for method, (name, label) in MERGE_METHODS.items():
        if method == "avg" and dir_name == name:
            return label
        if method != "avg" and dir_name.startswith(name + "_") and dir_name[len(name) + 1 :]:
            return f"{label} (α={dir_name[len(name) + 1 :]})"
    return dir_name


def check_output_free(path, overwrite: bool) -> None:
    """Refuse to replace an existing output folder unless --overwrite was passed."""
    if Path(path).exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")


def leftover(name: str, final: Path) -> bool:
    """Is `name` a temporary of `final` (`.NAME.tmp-PID`, or `.NAME.old-PID`: atomic_dir's previous folder)?"""
    return re.fullmatch(rf"\.{re.escape(final.name)}\.(tmp|old)-\d+", name) is not None


def take_lock(final: Path) -> int:
    """An exclusive flock on `.NAME.lock` beside `final`, its fd; refused (UserError) while a live run holds it."""
    path = final.with_name(f".{final.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 20).decode().strip() or "?"
            os.close(fd)
            raise UserError(f"{final} is being written by another run (pid {pid}); wait for it or stop it") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not a file its last holder removed as we opened it
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return fd
        os.close(fd)


def remove_path(path: Path) -> None:
    """Delete a file or a folder (with what it holds), if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def temporary_of(final):
    """Yield `.NAME.tmp-PID` beside `final`, not yet created, for the caller to write and rename to
    `final`; whatever is left of it is removed when the block ends.

    Why: a run that is killed (out of memory, time limit, kill -9) never removes its temporary, and
    the next run has another PID, so for an 8B merge up to 16 GB would stay hidden per interruption.
    The whole write holds an exclusive lock on `.NAME.lock` (flock: the kernel drops it when its
    process dies, however it died), so a run that takes the lock knows that no run is writing
    `final`: every `.NAME.tmp-*` and `.NAME.old-*` beside it is a dead run's leftover and goes first.
    While a live run holds the lock this one is refused (UserError) and touches nothing: two runs
    writing one output would clobber each other. The lock file goes too when the block ends."""
    final = Path(final)
    fd = take_lock(final)
    try:
        for entry in os.scandir(final.parent):
            if leftover(entry.name, final):
                print(f"removing {entry.path}, left by a run that was killed", file=sys.stderr)
                remove_path(Path(entry.path))
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            yield tmp
        finally:
            remove_path(tmp)
    finally:
        final.with_name(f".{final.name}.lock").unlink(missing_ok=True)  # before the lock is dropped: see take_lock
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final, overwrite=False):
    """Yield a temporary folder beside `final` (temporary_of); rename it to `final` when the block ends
    without error, delete it otherwise. An existing `final` is refused unless overwrite."""
    final = Path(final)
    check_output_free(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    with temporary_of(final) as tmp:
        tmp.mkdir()
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            remove_path(old)
        else:
            os.replace(tmp, final)


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
