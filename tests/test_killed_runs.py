"""A run that is killed leaves its temporary (`.NAME.tmp-PID`) behind; the next run of the same output
removes it, and a run started while another one writes the same output is refused (utils.temporary_of).
Real processes and real SIGKILLs: merge_model.py killed inside its write, a gram file's final write
killed half written, a second merge while the first one writes."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file
from test_merge import read_folder

import compute_gram
from conftest import ROOT
from regmean.tensor_io import GramFile
from regmean.utils import UserError, atomic_dir

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def start(script, *args, log):
    """A stage script in its own process, its output in the file `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], stdout=f, stderr=f, env=ENV)


def cli(script, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, env=ENV
    )


def leftovers(out):
    """What a run of `out` leaves beside it while it writes: `.NAME.tmp-PID`, `.NAME.old-PID`, `.NAME.lock`."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def expert_behind_a_pipe(expert, folder):
    """A copy of `expert` whose config.json is a named pipe that the test answers (hold_in_write)."""
    shutil.copytree(expert, folder)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    return folder


def hold_in_write(proc, folder, text, out):
    """Answer each read of folder/config.json (a named pipe) with `text`, until `proc` reads it while its
    temporary of `out` exists: merge_model.py reads its last expert's config.json again inside its write
    (model_card.copy_side_files, the merged tensors already in the temporary). That read is left waiting,
    the process held inside its write, and the pipe's write end returned. No timing: the test sees where
    the merge is by what it reads."""
    pipe = folder / "config.json"
    while True:
        try:
            w = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)  # there is a reader
        except OSError as e:
            assert e.errno == errno.ENXIO and proc.poll() is None, f"the merge ended ({proc.returncode})"
            time.sleep(0.01)
            continue
        if any(".tmp-" in name for name in leftovers(out)):
            return w
        os.write(w, text.encode())
        fresh = folder / ".config.pipe"
        os.mkfifo(fresh)
        os.replace(fresh, pipe)  # the next read opens a new pipe, not this reader's
        os.close(w)


def check_average(out, experts):
    merged, ws = read_folder(out), [read_folder(e) for e in experts]
    assert merged.keys() == ws[0].keys()
    for name, w in merged.items():
        assert torch.equal(w, torch.stack([t[name] for t in ws]).mean(0)), name


def test_a_merge_killed_in_its_write_is_finished_by_the_next_run(experts, tmp_path):
    """SIGKILL while merge_model.py writes its temporary folder (merged shards in it, not yet renamed);
    the same command again: the merge is complete and nothing of the killed run is left."""
    text = (experts[1] / "config.json").read_text()
    math = expert_behind_a_pipe(experts[1], tmp_path / "math")
    out = tmp_path / "merged"
    args = ["avg", "--models", experts[0], math, "--output-dir", out]
    proc = start("merge_model.py", *args, log=tmp_path / "killed.log")
    w = hold_in_write(proc, math, text, out)
    (tmp,) = [out.parent / n for n in leftovers(out) if ".tmp-" in n]
    assert tmp.name == f".merged.tmp-{proc.pid}" and list(tmp.glob("*.safetensors"))  # half a merge
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    os.close(w)
    assert leftovers(out) == [".merged.lock", tmp.name] and not out.exists()

    (math / "config.json").unlink()
    (math / "config.json").write_text(text)
    again = cli("merge_model.py", *args)
    assert again.returncode == 0, again.stderr
    assert f"removing {tmp}, left by a run that was killed" in again.stderr
    check_average(out, experts)
    assert leftovers(out) == []


def test_a_gram_file_killed_in_its_final_write_is_written_by_the_next_run(experts, calib_files, tmp_path):
    """The final write of a tiny gram file is too short to kill from outside, so a child process runs
    the real tensor_io.save_grams with a mapping whose second gram never comes, the hidden states' spill
    folder of --plan layers beside it (utils.temporary_of, as regmean/layerwise.py takes it), and is SIGKILLed
    there, its temporaries half written. Then the real compute_gram.py on that folder: the gram file is
    that of a clean run, and nothing of the killed writer is left."""
    out = tmp_path / "grams"
    out.mkdir()
    child = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from regmean.tensor_io import save_grams
        from regmean.utils import temporary_of

        class Paused(dict):
            def values(self):
                first, *rest = super().values()
                yield first
                print("writing", flush=True)
                sys.stdin.read()  # killed here
                yield from rest

        with temporary_of({str(out / "hidden-states-rank0")!r}) as spill:
            spill.mkdir()
            (spill / "0-0.safetensors").write_bytes(bytes(1000))
            save_grams({str(out / "gram.safetensors")!r}, Paused(a=torch.eye(64), b=torch.eye(64)), {{}}, 10, {{}})
        """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [f".gram.safetensors.tmp-{proc.pid}", ".gram.safetensors.lock"]
        + [f".hidden-states-rank0.tmp-{proc.pid}", ".hidden-states-rank0.lock"]
    )

    args = ["toy-code", "--model", experts[0], "--dataset", calib_files["code"], "--format", "code"]
    args += ["--max-length", 64, "--batch-size", 4, "--device", "cpu", "--dtype", "float32"]
    args += ["--plan", "layers", "--max-hidden-gb", 0]  # the hidden states spilled to out, as the killed run's
    again = cli("compute_gram.py", *args, "--output-dir", out)
    assert again.returncode == 0, again.stderr
    assert f"removing {out / f'.gram.safetensors.tmp-{proc.pid}'}, left by a run that was killed" in again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gram.safetensors"]
    clean = compute_gram.main([str(a) for a in [*args, "--output-dir", tmp_path / "clean"]])
    got, want = load_file(out / "gram.safetensors"), load_file(clean)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert len(GramFile(out / "gram.safetensors").modules()) == len(GramFile(clean).modules())


def test_a_second_run_of_an_output_being_written_is_refused(experts, tmp_path):
    """A merge held inside its write (hold_in_write) and a second merge of the same folder: the second
    is refused (exit 2, the first one's pid), touches nothing, and the first completes."""
    text = (experts[1] / "config.json").read_text()
    math = expert_behind_a_pipe(experts[1], tmp_path / "math")
    out = tmp_path / "merged"
    first = start(
        "merge_model.py", "avg", "--models", experts[0], math, "--output-dir", out, log=tmp_path / "first.log"
    )
    w = hold_in_write(first, math, text, out)
    (tmp,) = [out.parent / n for n in leftovers(out) if ".tmp-" in n]
    written = sorted(p.name for p in tmp.iterdir())

    second = cli("merge_model.py", "avg", "--models", *experts, "--output-dir", out)
    assert second.returncode == 2
    assert f"{out} is being written by another run (pid {first.pid}); wait for it or stop it" in second.stderr
    assert sorted(p.name for p in tmp.iterdir()) == written and not out.exists()

    (math / ".config.json").write_text(text)
    os.replace(math / ".config.json", math / "config.json")  # later reads: a file
    os.write(w, text.encode())
    os.close(w)
    assert first.wait() == 0, (tmp_path / "first.log").read_text()
    check_average(out, experts)
    assert leftovers(out) == []


def test_atomic_dir_removes_what_dead_runs_left_of_its_output_only(tmp_path):
    """An overwrite killed between its two renames leaves `.NAME.old-PID`, a killed run `.NAME.tmp-PID`
    and `.NAME.lock`: all go; another output's temporaries stay. A held lock refuses."""
    out = tmp_path / "out"
    (tmp_path / ".out.old-12").mkdir()
    (tmp_path / ".out.old-12" / "model.safetensors").write_bytes(b"x")
    (tmp_path / ".out.tmp-34").write_bytes(b"x")
    (tmp_path / ".out.lock").write_text("34")
    others = [".out2.tmp-5", ".out.tmp-x", ".outside.lock"]
    for name in others:
        (tmp_path / name).write_text("")
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("a")
        with pytest.raises(UserError, match=rf"is being written by another run \(pid {os.getpid()}\)"):
            with atomic_dir(out):  # a lock is per open file: this process's second one is refused too
                pass
        assert (tmp / "a").exists()
    assert (out / "a").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *others])
