"""compute_gram.py over several processes (accelerate launch, gloo on cpu) against one
process; the split of the batches; the streaming gram writer; a model dispatched by accelerate."""

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

from compute_gram import main
from conftest import ROOT
from regmean.calibration import Gram, length_batches, split_batches
from regmean.model_plan import accumulate_grams, checkpoint_path, save_checkpoint
from regmean.tensor_io import GramFile, save_grams, write_safetensors
from regmean.utils import GRAM_FILE, UserError

MAX_LENGTH = 160
BATCH = ("--batch-size", "2")  # the 13 code rows (an odd number): 7 batches, dealt 4 + 3 (or 3 + 4) over 2 processes


def argv(experts, calib_files, out_dir, *extra):
    return [
        "toy-code",
        "--model",
        str(experts[0]),
        "--dataset",
        str(calib_files["code"]),
        "--output-dir",
        str(out_dir),
        "--max-length",
        str(MAX_LENGTH),
        "--device",
        "cpu",
        "--dtype",
        "float32",  # compared with float32 computations at 1e-5, on any cpu
        *BATCH,
        *extra,
    ]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN = ("address already in use", "eaddrinuse")  # the port free_port() found was taken before the launch


def run_on_a_free_port(cmd_with_port, **kwargs):
    """subprocess.run(cmd_with_port(port)) on a free port; again on another one, up to 3 times, when some other
    process took the port between free_port() and the launch (a race that only the machine's load decides)."""
    for _ in range(3):
        proc = subprocess.run(cmd_with_port(free_port()), **kwargs)
        if not any(taken in proc.stderr.lower() for taken in PORT_TAKEN):
            return proc
    return proc


def launch(num_processes, script, args):
    """`accelerate launch` as a user runs it: --multi_gpu starts the processes through
    torchrun, and compute_gram.py joins them with gloo because its device is the cpu.
    (accelerate's own --cpu flag starts a single process unless mpirun is set up.)"""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "PORT",
        str(script),
        *args,
    ]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }

    def with_port(port):
        return [str(port) if a == "PORT" else a for a in cmd]

    # the limit only guards against a hang (the process group's own timeout is 2 h), not against a slow machine
    return run_on_a_free_port(with_port, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


def assert_ran_on_two(proc, single):
    """The launch exited 0, two ranks really ran (the writer says so) and both shares' tokens
    reached the file (each rank holds only its own share before the all-reduce)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 2 processes" in proc.stdout
    assert proc.stdout.count("wrote ") == 1  # one writer
    assert f", {tokens_of(single)} tokens in " in proc.stdout


# Another CPU-heavy job beside the launches: CI once saw rank 1 abort at exit while one ran.
LOAD = """
import torch
torch.set_num_threads(2)
x = torch.randn(384, 384)
while True:
    x = torch.tanh(x @ x)
"""


@contextmanager
def cpu_load():
    proc = subprocess.Popen([sys.executable, "-c", LOAD])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def assert_same_grams(path, reference, rtol=1e-5):
    got, ref = GramFile(path), GramFile(reference)
    assert got.metadata["num_tokens"] == ref.metadata["num_tokens"]
    assert json.loads(got.metadata["aliases"]) == json.loads(ref.metadata["aliases"])
    assert sorted(got.modules()) == sorted(ref.modules())
    for name in ref.modules():
        a, b = got.get(name), ref.get(name)
        assert (a - b).abs().max() <= rtol * b.abs().max(), name


def tokens_of(path):
    return int(GramFile(path).metadata["num_tokens"])


@pytest.fixture(scope="module")
def single(experts, calib_files, tmp_path_factory):
    return main(argv(experts, calib_files, tmp_path_factory.mktemp("single")))


def repeat_under_load(runs, single, experts, calib_files, tmp_path):
    """2-process runs one after another (`runs`: each one's extra arguments) while another job
    loads the cpu. Each must exit 0 after two ranks really ran and leave the one-process gram
    and nothing else; every failure is collected, so that a long run says how often it happens."""
    failures = []
    start = time.time()
    with cpu_load():
        for i, extra in enumerate(runs):
            out = tmp_path / f"run{i}"
            proc = launch(2, ROOT / "compute_gram.py", argv(experts, calib_files, out, *extra))
            try:
                assert_ran_on_two(proc, single)
                assert_same_grams(out / GRAM_FILE, single)
                assert sorted(p.name for p in out.iterdir()) == [GRAM_FILE]  # no temporary files, no checkpoints
            except AssertionError as e:
                failures.append(f"run {i}: exit {proc.returncode}: {str(e)[-1500:]}")
    print(f"\n{len(runs) - len(failures)}/{len(runs)} 2-process runs under load passed in {time.time() - start:.0f} s")
    assert not failures, f"{len(failures)}/{len(runs)} failed:\n" + "\n".join(failures)


def test_two_processes_equal_one(single, experts, calib_files, tmp_path):
    # --device-map places an expert over GPUs; on the cpu it must change nothing
    repeat_under_load([("--device-map", "auto"), ()], single, experts, calib_files, tmp_path)


@pytest.mark.stress
def test_two_processes_many_times_under_load(single, experts, calib_files, tmp_path):
    repeat_under_load([()] * int(os.environ.get("STRESS_RUNS", 25)), single, experts, calib_files, tmp_path)


def test_one_rank_failing_stops_all(experts, calib_files, tmp_path):
    """A failure on one rank only: rank 1 finds a checkpoint of a run with other settings,
    rank 0 none and runs its share. Both stop at the meeting point before the all-reduce with
    rank 1's message, long before the process group's 2 h timeout, and nothing is written."""
    out = tmp_path / "bad-checkpoint"
    out.mkdir()
    save_checkpoint(checkpoint_path(out, 1, 2), {}, 1, {"max_length": 99})
    proc = launch(2, ROOT / "compute_gram.py", argv(experts, calib_files, out))
    assert proc.returncode != 0
    assert "was made with other settings" in proc.stderr  # rank 1, its own error
    # rank 0 stopped by the error exchange, with rank 1's message (not by the process group's 2 h timeout, which
    # would name no rank): no elapsed-time limit, which a loaded machine alone could break
    assert "error: rank 1 of 2 failed: " in proc.stderr
    assert not (out / GRAM_FILE).exists()


# The main process fails after the all-reduce, while the others wait for its file.
MAIN_FAILS = """
import sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from regmean.ranks import meet, ranks_in_step
from regmean.utils import UserError
from utils import run_main


@ranks_in_step
def main():
    dist.init_process_group("gloo")
    meet()
    if dist.get_rank() == 0:
        raise UserError("no space left to write the gram")
    meet()
    print(f"rank {{dist.get_rank()}} done")  # never reached


run_main(main)
"""


def test_main_process_failing_stops_the_others(tmp_path):
    """The error exchange itself, in 3 gloo processes under torchrun: rank 0 fails between two
    meeting points and ranks 1 and 2 each stop with its message."""
    script = tmp_path / "main_fails.py"
    script.write_text(MAIN_FAILS.format(root=str(ROOT)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "3",
        "--master_port",
        "PORT",
        str(script),
    ]
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}

    def with_port(port):
        return [str(port) if a == "PORT" else a for a in cmd]

    proc = run_on_a_free_port(with_port, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode != 0
    assert "error: no space left to write the gram" in proc.stderr
    assert proc.stderr.count("error: rank 0 of 3 failed: no space left to write the gram") == 2, proc.stderr[-3000:]
    assert "done" not in proc.stdout


INTERRUPT = """
import sys, time
from torch import nn
from accelerate import PartialState
sys.path.insert(0, {root!r})
from compute_gram import main
from regmean.model_plan import checkpoint_path

out = {out!r}

def interrupt(module, args):
    # like Ctrl-C on every rank once its first checkpoint is on disk; each waits for the
    # others' checkpoints first, so that no rank is stopped before it has written one
    if type(module).__name__ != "LlamaModel":
        return
    state = PartialState()
    if checkpoint_path(out, state.process_index, state.num_processes).exists():
        every = [checkpoint_path(out, r, state.num_processes) for r in range(state.num_processes)]
        deadline = time.time() + 120
        while not all(p.exists() for p in every) and time.time() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt

nn.modules.module.register_module_forward_pre_hook(interrupt)
main(sys.argv[1:])
"""


def test_two_processes_resume(single, experts, calib_files, tmp_path):
    out = tmp_path / "resumed"
    args = argv(experts, calib_files, out, "--checkpoint-every", "1")
    script = tmp_path / "interrupted_gram.py"
    script.write_text(INTERRUPT.format(root=str(ROOT), out=str(out)))
    proc = launch(2, script, args)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    checkpoints = [checkpoint_path(out, r, 2) for r in range(2)]
    assert all(p.exists() for p in checkpoints) and not (out / GRAM_FILE).exists()

    # another number of processes would split the batches otherwise: refused, not restarted
    with pytest.raises(UserError, match="another number of processes"):
        main(args)

    proc = launch(2, ROOT / "compute_gram.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: resuming" in proc.stderr and "rank 1: resuming" in proc.stderr
    tokens_run = int(proc.stdout.split(" tokens in ")[0].rsplit(" ", 1)[1])
    assert 0 < tokens_run < tokens_of(single)  # only the batches after the checkpoints ran
    assert_same_grams(out / GRAM_FILE, single)
    assert not any(p.exists() for p in checkpoints)


# ----------------------------------------------------------------------------- the split, in process
@pytest.mark.parametrize("num_shares", [1, 2, 3, 5, 40])
def test_split_batches_covers_all_and_balances(num_shares):
    lengths = [(7 * i) % 97 + 3 for i in range(101)]  # 101 rows: the last batch is short
    batches = length_batches(lengths, 8)
    shares = split_batches(batches, lengths, num_shares)
    assert len(shares) == num_shares
    assert sorted(map(tuple, sum(shares, []))) == sorted(map(tuple, batches))  # each batch exactly once
    cost = [sum(len(b) * max(lengths[i] for i in b) for b in share) for share in shares]
    biggest = max(len(b) * max(lengths[i] for i in b) for b in batches)
    assert max(cost) - min(cost) <= biggest  # balanced to within one batch
    for share in shares:  # longest first within a share, as in one process
        firsts = [max(lengths[i] for i in b) for b in share]
        assert firsts == sorted(firsts, reverse=True)
    assert shares == split_batches(batches, lengths, num_shares)  # every process computes the same split


@pytest.mark.parametrize("num_shares", [3, 9])  # 9 > 7 batches: two shares are empty
def test_shares_sum_to_the_whole(single, experts, calib_files, num_shares):
    """Summing the sums of every share, as the all-reduce does, gives the one-process gram."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from regmean.calibration import format_rows, load_rows, tokenize_texts

    tokenizer = AutoTokenizer.from_pretrained(experts[0])
    token_ids = tokenize_texts(
        tokenizer, format_rows(load_rows(str(calib_files["code"])), "code", tokenizer), MAX_LENGTH
    )
    model = AutoModelForCausalLM.from_pretrained(experts[0], dtype=torch.float32).eval()
    total, rows = {}, {}
    for rank in range(num_shares):
        grams, _, _ = accumulate_grams(model, token_ids, 2, progress=False, rank=rank, num_processes=num_shares)
        for key, gram in grams.items():
            total[key] = total.get(key, 0) + gram.sum
            rows[key] = rows.get(key, 0) + gram.num_rows
    reference = GramFile(single)
    for key, s in total.items():
        gram = Gram(reference.shape(key)[0], "cpu")  # the sum is the flat buffer of its block rows
        gram.sum, gram.num_rows = s, rows[key]
        assert rows[key] == int(reference.metadata["num_tokens"])
        ref = reference.get(key)
        assert (gram.result() - ref).abs().max() <= 1e-5 * ref.abs().max(), key


# ----------------------------------------------------------------------------- big-model dispatch
def test_model_dispatched_with_offload(single, experts, calib_files, tmp_path):
    """A model placed by accelerate's big-model loading, one layer and lm_head offloaded to
    disk (weights on the meta device, brought in by hooks per forward): the grams are the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from regmean.calibration import format_rows, load_rows, tokenize_texts

    tokenizer = AutoTokenizer.from_pretrained(experts[0])
    token_ids = tokenize_texts(
        tokenizer, format_rows(load_rows(str(calib_files["code"])), "code", tokenizer), MAX_LENGTH
    )
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    model = AutoModelForCausalLM.from_pretrained(
        experts[0], dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    grams, aliases, _ = accumulate_grams(model, token_ids, 2, progress=False)
    reference = GramFile(single)
    assert sorted(grams) == sorted(k for k in reference.modules() if k not in json.loads(reference.metadata["aliases"]))
    for key, gram in grams.items():
        ref = reference.get(key)
        assert (gram.result() - ref).abs().max() <= 1e-5 * ref.abs().max(), key


# ----------------------------------------------------------------------------- streaming writer
def test_streamed_file_reads_back_with_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.mlp.gate_proj": torch.randn(5, 5, generator=g),
        "lm_head": torch.randn(3, 3, generator=g).T,  # not contiguous
        "half": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "flags": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"note": "hello", "n": 3})
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"note": "hello", "n": "3"}
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_size % 8 == 0

    # grams are symmetric: only the upper triangle is stored, packed (format v2)
    half = tensors["half"] + tensors["half"].T
    grams = {"lm_head": tensors["lm_head"] @ tensors["lm_head"].T, "model.layers.0.mlp.gate_proj": half}
    save_grams(
        tmp_path / GRAM_FILE, grams, {"model.layers.0.mlp.up_proj": "model.layers.0.mlp.gate_proj"}, 42, {"model": "m"}
    )
    saved = GramFile(tmp_path)
    assert (
        saved.metadata["num_tokens"] == "42"
        and saved.metadata["model"] == "m"
        and saved.metadata["format"] == "regmean-gram-v2"
    )
    assert torch.equal(saved.get("model.layers.0.mlp.up_proj"), half.float())
    assert torch.equal(saved.get("lm_head"), grams["lm_head"])
    with safe_open(tmp_path / GRAM_FILE, "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(NotImplementedError):  # a meta tensor has no data to copy to the host
        write_safetensors(path, {"a": torch.ones(3), "b": torch.empty(3, device="meta")})
    assert list(tmp_path.iterdir()) == []
