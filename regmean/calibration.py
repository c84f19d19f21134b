"""Calibration data and what is measured on it, for compute_gram.py and RegMean++ alike: rows ->
chat-template text -> token ids, batches of similar length, right padding, the gram accumulator,
and which linear layers read the very same input (they share one gram)."""

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .tensor_io import mirror_upper, packed_offsets
from .utils import FORMATS, PRESETS, UserError, check_at_least_one, did_you_mean, first_line

# Calibration settings, declared once: compute_gram.py's and regmean++'s defaults.
SPLIT = "train"  # split of hub datasets
NUM_EXAMPLES = 10000  # first N rows of each dataset, unshuffled
MAX_LENGTH = 256  # tokens per example, truncated
BATCH_SIZE = 32  # examples per forward pass
ROWS = ("ours", "reference")  # ours: one BOS, length batches, padding left out; reference: as its compute_gram.py
HELD = "held-out:"  # --holdout: the held-out rows' grams sit beside the fit ones under this prefix


# ----------------------------------------------------------------------------- rows -> tokens
def load_rows(dataset: str, split: str = SPLIT, num_examples: int | None = None) -> list[dict]:
    """The first `num_examples` rows (unshuffled) of a local .json/.jsonl/.parquet/.csv file or
    of a hub dataset's split, as a list of dicts. Hub datasets are streamed, so only the rows
    used are downloaded."""
    import datasets

    path = Path(PRESETS[dataset]["dataset"] if dataset in PRESETS else dataset)
    try:
        if path.suffix in (".json", ".jsonl", ".parquet", ".csv"):
            if not path.is_file():
                raise UserError(f"dataset file {path} does not exist{did_you_mean(path)}")
            if path.stat().st_size == 0:  # datasets fails on it with a bare StopIteration
                raise UserError(f"dataset file {path} is empty: no rows")
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
        raise UserError(f"cannot load dataset {str(path)!r} (split {split!r}): {first_line(e)}") from e
    if not rows:
        raise UserError(f"dataset {str(path)!r} split {split!r} has no rows")
    if num_examples is not None and len(rows) < num_examples:
        print(f"note: asked for {num_examples} examples, {path} has {len(rows)}; using {len(rows)}", file=sys.stderr)
    return rows


def format_rows(rows: list[dict], fmt: str, tokenizer) -> list[str]:
    """Rows -> chat-template texts (with whatever BOS the template writes: tokenize_texts sets it right)."""
    turns = FORMATS[fmt]
    missing = {col for _, col in turns} - set(rows[0])
    if missing:
        raise UserError(f"rows lack column(s) {sorted(missing)} needed by format {fmt!r}; they have {sorted(rows[0])}")
    texts = []
    for row in rows:
        messages = [{"role": role, "content": str(row[col] or "")} for role, col in turns]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def bos_rule(tokenizer) -> str:
    """The BOS rule of tokenize_texts, in words, for the gram file's provenance."""
    if tokenizer.bos_token_id is None:
        return "none: the tokenizer has no BOS token"
    bos = f"{tokenizer.bos_token} (id {tokenizer.bos_token_id})"
    return f"exactly one {bos} starts every row, whatever the chat template writes"


def tokenize_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Texts -> lists of token ids, truncated to max_length, each starting with exactly one BOS
    when the tokenizer has one (bos_rule). Chat templates differ: Llama-3's writes BOS, others
    write none, and tokenizing with special tokens adds one more (the reference's rows began with
    two). So no special tokens are added, the BOS tokens the text starts with are dropped, and
    one is put in front."""
    check_at_least_one(max_length=max_length)
    # one token more than kept: room for the BOS put in front when the template wrote none
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length + 1)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is None:
        return [ids[:max_length] for ids in enc]
    out = []
    for ids in enc:
        start = next((i for i, t in enumerate(ids) if t != bos), len(ids))
        out.append(([bos] + ids[start:])[:max_length])
    return out


def reference_tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """The reference's rows (--rows reference): each text tokenized as its compute_gram.py did, with the
    tokenizer's special tokens added (a BOS-adding tokenizer puts one more in front of the template's own)
    and cut at max_length tokens, those included, on the tokenizer's truncation side."""
    check_at_least_one(max_length=max_length)
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def calibration_tokens(
    tokenizer, dataset: str, fmt: str, split: str, num_examples: int, max_length: int, rows: str = "ours"
) -> list[list[int]]:
    """The calibration examples of one expert as token ids: the first num_examples rows of
    `dataset`, rendered with the tokenizer's chat template in format `fmt`, truncated (rows:
    "ours", tokenize_texts, or "reference", reference_tokenize)."""
    texts = format_rows(load_rows(dataset, split, num_examples), fmt, tokenizer)
    tokenize = reference_tokenize if rows == "reference" else tokenize_texts
    return tokenize(tokenizer, texts, max_length)


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of a model folder, which must have a chat template (the rows are rendered with it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load a tokenizer from {model_dir}: {first_line(e)}") from e
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {model_dir} has no chat template")
    return tokenizer


# ----------------------------------------------------------------------------- batches
def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Example indices grouped into batches of similar length, longest first (so that a
    batch too big for memory fails at once, not hours in)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def split_batches(batches: list[list[int]], lengths: list[int], num_shares: int) -> list[list[list[int]]]:
    """Deal whole batches to `num_shares` processes so that each gets about the same work
    (padded tokens): the costliest batch first, each to the least loaded share, ties to the
    lowest rank. Deterministic, so every process computes the same split; each share keeps
    the longest-first order. The batches themselves are those of a single process, so any
    split sums the same products, in another order only."""
    cost = [len(batch) * max(lengths[i] for i in batch) for batch in batches]
    shares, load = [[] for _ in range(num_shares)], [0] * num_shares
    for b in sorted(range(len(batches)), key=lambda b: -cost[b]):
        rank = min(range(num_shares), key=lambda r: load[r])
        shares[rank].append(b)
        load[rank] += cost[b]
    return [[batches[b] for b in sorted(share)] for share in shares]


def fit_and_held_positions(
    batch: list[int], mask: torch.Tensor, held_out: frozenset[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions of a collated batch's real tokens (mask [B, T]) in fit rows and in held-out rows
    (`held_out`: example indices, --holdout): the two grams a forward pass feeds."""
    held = torch.tensor([i in held_out for i in batch])[:, None] & mask.bool()
    return (mask.bool() & ~held).flatten().nonzero().squeeze(1), held.flatten().nonzero().squeeze(1)


def collate(token_ids: list[list[int]], batch: list[int], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask [B, T] (causal attention never looks at
    the padding on the right, so real tokens see exactly their own prefix)."""
    width = max(len(token_ids[i]) for i in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        input_ids[row, : len(token_ids[i])] = torch.tensor(token_ids[i])
        mask[row, : len(token_ids[i])] = 1
    return input_ids, mask


def file_order_batches(num_rows: int, batch_size: int) -> list[list[int]]:
    """The reference's batches (--rows reference): batch_size rows at a time, in file order."""
    return [list(range(i, min(i + batch_size, num_rows))) for i in range(0, num_rows, batch_size)]


def pad_batch(
    token_ids: list[list[int]], batch: list[int], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] padded with pad_id on `side` (left or right), as the reference's
    DataCollatorWithPadding padded its batches: on the tokenizer's padding side."""
    width = max(len(token_ids[i]) for i in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        ids = token_ids[i]
        cols = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        input_ids[row, cols], mask[row, cols] = torch.tensor(ids), 1
    return input_ids, mask


# ----------------------------------------------------------------------------- the accumulator
class Gram:
    """Running ΣXᵀX, float32 on `device`, and the number of rows fed to `add`.

    XᵀX is symmetric, so only its upper block-triangle is computed and stored: the columns are
    cut into B blocks and block row i, X[:, i]ᵀ X[:, i:], is kept and updated with one addmm_,
    (B+1)/2B of the full square's flops and memory (9/16 at B = 8). `sum` is one flat float32
    buffer holding the block rows one after another (so that it can be all-reduced, checkpointed
    and added as one tensor). `packed()` turns it, in place, into the packed upper triangle that
    gram.safetensors stores; `result()` gives the full symmetric matrix.
    """

    def __init__(self, dim: int, device: torch.device | str, blocks: int | None = None):
        self.dim = dim
        self.num_rows = 0
        # Narrow blocks make slow GEMMs: about 256 columns or more each, at most 8 blocks.
        blocks = blocks or min(8, max(1, dim // 256))
        self.edges = [round(i * dim / blocks) for i in range(blocks + 1)]
        self.sizes = [(end - start) * (dim - start) for start, end in zip(self.edges[:-1], self.edges[1:])]
        self.sum = torch.zeros(sum(self.sizes), dtype=torch.float32, device=device)

    @property
    def sum(self) -> torch.Tensor:
        return self._sum

    @sum.setter
    def sum(self, value: torch.Tensor) -> None:
        """The block rows, flat (as `sum` is read), or a full [dim, dim] square, whose upper block
        triangle is taken."""
        if getattr(self, "_sum", None) is not None:  # a value read back (a checkpoint) goes where the sum was
            value = value.to(self._sum.device, torch.float32)
        if value.dim() == 2:
            value = torch.cat([value[s:e, s:].reshape(-1) for s, e in zip(self.edges[:-1], self.edges[1:])])
        if value.shape != (sum(self.sizes),):
            raise ValueError(f"a gram of width {self.dim} holds {sum(self.sizes)} values, got {list(value.shape)}")
        self._sum = value
        views = value.split(self.sizes)
        self.rows = [v.view(e - s, self.dim - s) for v, s, e in zip(views, self.edges[:-1], self.edges[1:])]

    def add(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """x: [..., dim], on any device (it is moved to the gram's). rows: which rows of
        x.reshape(-1, dim) to use, as indices or as a bool mask shaped like x.shape[:-1]
        (None: all of them)."""
        x = x.reshape(-1, x.shape[-1])
        if rows is not None:
            if rows.dtype == torch.bool:
                rows = rows.reshape(-1).nonzero().squeeze(1)
            x = x.index_select(0, rows.to(x.device))
        # bf16/fp16 values are exact in TF32, so on cuda their float32 products may run on
        # tensor cores with nothing lost (products and sums stay float32); float32 inputs may not.
        tf32 = self.sum.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
        x = x.to(self.sum.device, torch.float32)
        allowed = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            for block, start, end in zip(self.rows, self.edges[:-1], self.edges[1:]):
                block.addmm_(x[:, start:end].T, x[:, start:])
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allowed
        self.num_rows += x.shape[0]

    def result(self) -> torch.Tensor:
        """ΣXᵀX / num_rows as a full symmetric float32 matrix on the gram's device. The running
        sum is released (call it once, at the end)."""
        n = self.dim
        full = torch.empty(n, n, dtype=torch.float32, device=self.sum.device)
        for block, start in zip(self.rows, self.edges[:-1]):
            full[start:, start:][: block.shape[0]].copy_(block)
        self._sum = self.rows = None
        mirror_upper(full)  # the lower triangle from the upper one, as GramFile reads packed files
        return full.div_(max(self.num_rows, 1))

    def packed(self) -> torch.Tensor:
        """ΣXᵀX / num_rows as its packed upper triangle (row i's columns i.., rows one after
        another: dim(dim+1)/2 values, see packed_offsets), made in place in the running sum
        (call it once, at the end): no second copy of the gram is ever allocated."""
        flat, n = self.sum.div_(max(self.num_rows, 1)), self.dim
        offsets, base = packed_offsets(n), 0
        for start, end, size in zip(self.edges[:-1], self.edges[1:], self.sizes):
            width = n - start
            for i in range(start, end):
                # Row i's upper part moves forward (never back: the packed layout is the denser),
                # through a copy where source and destination overlap.
                src, dst, length = base + (i - start) * (width + 1), offsets[i], n - i
                if src != dst:
                    row = flat[src : src + length]
                    flat[dst : dst + length].copy_(row.clone() if src < dst + length else row)
            base += size
        packed = flat[: offsets[n]]
        self._sum = self.rows = None
        return packed


class RunningMeanGram:
    """The reference's accumulator (--rows reference): every row fed to `add`, padding included, XᵀX
    formed whole in float32 and kept as a running mean, mean ← (mean · n + XᵀX) / (n + m), with its
    roundings. `sum` holds the running mean (what a checkpoint saves); `packed()` its upper triangle."""

    def __init__(self, dim: int, device: torch.device | str):
        self.dim, self.num_rows = dim, 0
        self._sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)

    @property
    def sum(self) -> torch.Tensor:
        return self._sum

    @sum.setter
    def sum(self, value: torch.Tensor) -> None:
        self._sum = value.to(self._sum.device, torch.float32).reshape(self.dim, self.dim)

    def add(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """x: [..., dim]; every row counts (`rows` must be None: the reference picks none out)."""
        assert rows is None, "the reference counts every position"
        x = x.detach().to(self._sum.device, torch.float32).reshape(-1, x.shape[-1])
        xtx = x.T @ x
        m = x.shape[0]
        if self.num_rows == 0:
            self._sum = xtx / m
        else:
            self._sum = (self._sum * self.num_rows + xtx) / (m + self.num_rows)
        self.num_rows += m

    def result(self) -> torch.Tensor:
        return self._sum

    def packed(self) -> torch.Tensor:
        """The running mean's upper triangle, packed as gram.safetensors stores it (the reference's
        XᵀX is symmetric up to the summation order of its entries; the upper entries are kept)."""
        packed = torch.cat([row[i:] for i, row in enumerate(self._sum)])
        self._sum = None
        return packed


def check_one_row_per_token(name: str, x: torch.Tensor, total: int) -> None:
    """A linear layer's input must hold one row per token of the batch (`total`), padding
    included, for the real-token index to pick its rows; routed layers (mixture of experts)
    see subsets of the tokens and are refused."""
    rows = x.numel() // x.shape[-1]
    if rows != total:
        raise UserError(f"{name} reads {rows} rows, not one per token ({total}): this architecture is not supported")


# ----------------------------------------------------------------------------- shared inputs
class LinearInputs:
    """Forward pre-hooks on every nn.Linear of `module` that tell which of them read the very same
    tensor: the same object, unmodified (same version counter), within one forward pass. A
    data_ptr match alone is not enough, since freed memory is reused within a forward. For each
    distinct input, on_input(name, x) is called for the first module that reads it (its leader);
    the others are recorded in `aliases` {module: leader}. Call new_pass() between passes.

        with LinearInputs(model, on_input) as watch:
            model(input_ids)
    """

    def __init__(self, module: nn.Module, on_input: Callable[[str, torch.Tensor], None]):
        self.aliases: dict[str, str] = {}
        self.on_input = on_input
        self.seen: dict[str, tuple[torch.Tensor, int]] = {}  # strong references keep the ids unique
        linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
        self.hooks = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            leader = next((k for k, (t, v) in self.seen.items() if t is x and v == x._version), None)
            if leader is not None:
                self.aliases[name] = leader
                return
            self.seen[name] = (x, x._version)
            self.on_input(name, x)

        return hook

    def new_pass(self) -> None:
        self.seen.clear()

    def __enter__(self) -> "LinearInputs":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()
        self.seen.clear()


def find_shared_inputs(model: nn.Module, input_ids: torch.Tensor):
    """Watch one forward pass and group the nn.Linear modules by the tensor they read.

    Returns (leaders {name: module}, aliases {other module: leader name}, head name,
    head_reads_base_output). `head_reads_base_output` tells whether lm_head's input is exactly
    the base model's last hidden state, so that the logits can be skipped."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    inputs = {}  # leader name -> the tensor it read
    with torch.no_grad(), LinearInputs(model, lambda name, x: inputs.setdefault(name, x)) as watch:
        model(input_ids=input_ids, use_cache=False)
    never_called = [name for name in linears if name not in inputs and name not in watch.aliases]
    if never_called:
        print(
            f"note: {len(never_called)} linear module(s) never run, no gram for them: {never_called[:4]}",
            file=sys.stderr,
        )
    leaders = {name: m for name, m in linears.items() if name in inputs}
    aliases = dict(watch.aliases)
    head = model.get_output_embeddings()
    head_name = next((name for name, m in leaders.items() if m is head), None)
    head_reads_base_output = False
    if head_name is not None and model.base_model is not model:
        with torch.no_grad():
            base_output = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        head_input = inputs[head_name]
        head_reads_base_output = head_input.shape == base_output.shape and torch.allclose(
            head_input.float(), base_output.to(head_input.device).float(), rtol=1e-3, atol=1e-3
        )
    return leaders, aliases, head_name, head_reads_base_output
