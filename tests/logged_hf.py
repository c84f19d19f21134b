"""lm_eval's own `hf` backend, registered as `hf_logged`, that also writes the token ids of every
generation batch it encodes to the JSON-lines file named by $TOKEN_LOG, so a test can see what the
real backend feeds the model (a BOS or not) through the real lm_eval command line:

    TOKEN_LOG=ids.jsonl python -c "import sys; sys.path.insert(0, 'tests'); import logged_hf; logged_hf.main()" \\
        run --model hf_logged --model_args pretrained=DIR,add_bos_token=False --tasks humaneval_instruct ...
"""

import json
import os

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


@register_model("hf_logged")
class LoggedHFLM(HFLM):
    def tok_batch_encode(self, strings, *args, **kwargs):
        input_ids, attention_mask = super().tok_batch_encode(strings, *args, **kwargs)
        with open(os.environ["TOKEN_LOG"], "a") as f:
            for text, ids, mask in zip(strings, input_ids.tolist(), attention_mask.tolist()):
                real = [i for i, m in zip(ids, mask) if m]  # the left padding dropped
                f.write(json.dumps({"text": text, "ids": real}) + "\n")
        return input_ids, attention_mask


def main() -> None:
    """lm_eval's own command line, with `hf_logged` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
