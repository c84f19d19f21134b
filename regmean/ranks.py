"""A stage run by several processes (`accelerate launch`, `torchrun`), data parallel: each rank's device
(rank_placement), the sums of every rank added up (all_reduce_grams), and ranks that fail and end
together (meet, ranks_in_step). Alone, every function here is a no-op or returns its input. How a gram
job splits its work: docs/scale-out.md.
"""

import functools
import os
from collections.abc import Callable
from datetime import timedelta

import torch

from .utils import Progress, UserError, first_line

# How long processes wait for each other (torch's nccl default is 10 minutes): after a
# resume the shares left can differ by many batches, and the main process writes the file
# (32 GB for an 8B expert) while the others wait.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


# ----------------------------------------------------------------------------- the sums and each rank's device
def all_reduce_grams(grams: dict, tokens_run: int) -> int:
    """Sum the partial sums, row counts and tokens run of every process, in place, one gram
    (`grams`: {key: calibration.Gram}) at a time on the device it lives on. Returns the total
    tokens run (a no-op alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tokens_run
    for gram in Progress(grams.values(), desc="all-reduce", unit="gram", disable=dist.get_rank() != 0):
        dist.all_reduce(gram.sum)
    first = next(iter(grams.values())).sum.device  # nccl reduces cuda tensors, gloo cpu ones
    counts = torch.tensor([g.num_rows for g in grams.values()] + [tokens_run], dtype=torch.int64, device=first)
    dist.all_reduce(counts)
    for gram, n in zip(grams.values(), counts.tolist()):
        gram.num_rows = n
    return counts[-1].item()


def rank_placement(device: torch.device, device_map: str | None, state) -> tuple[torch.device, dict[int, int] | None]:
    """This process's device and, with --device-map on several processes, its own slice of
    the node's GPUs as accelerate's max_memory (GPUs // processes per node each)."""
    if device.type != "cuda" or state.num_processes == 1:
        return device, None  # alone, --device-map may use every visible GPU
    if not device_map:
        return state.device, None  # cuda:LOCAL_RANK
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    per_rank = torch.cuda.device_count() // per_node
    if per_rank < 1:
        raise UserError(
            f"--device-map with {per_node} processes per node needs at least that many GPUs, "
            f"found {torch.cuda.device_count()}"
        )
    gpus = range(state.local_process_index * per_rank, (state.local_process_index + 1) * per_rank)
    torch.cuda.set_device(gpus[0])
    return torch.device("cuda", gpus[0]), {i: torch.cuda.mem_get_info(i)[0] for i in gpus}


# ----------------------------------------------------------------------------- ranks fail and end together
# Between two meeting points each rank works alone (loading, its share of the batches, the
# main process writing the file). A rank that failed there and just exited would leave the
# others blocked in their next collective until PROCESS_GROUP_TIMEOUT (2 h) under a launcher
# that does not kill them. So every rank stops at the same meeting points (meet()): each
# says whether it failed since the last one, and if one did, all stop with its message.
# The failing rank says so from ranks_in_step's exception handler, at the meeting point the
# others have reached; the others raise OtherRankFailed there and do not report it again, so
# every rank takes part in the same number of exchanges. At the end every rank destroys the
# process group (its worker threads drained and joined) while the interpreter is still whole:
# a group left to interpreter shutdown is torn down by destructors while gloo's threads may
# still hold work and tensors, and a rank once aborted that way ("terminate called without an
# active exception") after a run that had succeeded, and the launcher killed the others.
ERROR_BYTES = 1024  # room for one rank's message in the exchange


class OtherRankFailed(UserError):
    """Another process of the run failed; this one stops with its message."""


def in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def exchange_errors(message: str | None) -> list[str | None]:
    """Every rank's message (None: no failure), gathered on every rank, fixed-size byte
    buffers in one all_gather (no pickling)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = (message or "").encode()[: ERROR_BYTES - 1]
    mine = torch.zeros(ERROR_BYTES, dtype=torch.uint8)
    mine[0] = message is not None
    mine[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    every = [torch.empty(ERROR_BYTES, dtype=torch.uint8, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine.to(device))
    every = [b.cpu() for b in every]
    return [bytes(b[1:].tolist()).rstrip(b"\0").decode(errors="replace") if b[0] else None for b in every]


def meet() -> None:
    """A meeting point of all ranks (a no-op alone): returns once every rank is here, or
    raises OtherRankFailed when one of them failed since the last meeting point."""
    if not in_process_group():
        return
    import torch.distributed as dist

    for rank, message in enumerate(exchange_errors(None)):
        if message is not None:
            raise OtherRankFailed(f"rank {rank} of {dist.get_world_size()} failed: {message}")


def ranks_in_step(main: Callable) -> Callable:
    """Wrap a stage's main() so that a failure on one rank reaches the others at their next
    meet(), and every rank destroys the process group before it returns or raises."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        import torch.distributed as dist

        healthy = True  # the group can still be used (and destroyed) by everyone
        try:
            return main(*args, **kwargs)
        except BaseException as e:
            if in_process_group() and not isinstance(e, OtherRankFailed):
                message = str(e) if isinstance(e, UserError) else first_line(e).removesuffix(": ")
                try:
                    exchange_errors(message)
                except Exception:  # the group itself broke (a rank died): our own error is the news
                    healthy = False
            raise
        finally:
            if healthy and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    return run
