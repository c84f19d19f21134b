"""A test-only lm_eval model, `--model canonical`, that answers each HumanEval request with the problem's
canonical solution, so a run through the real lm_eval CLI checks prompts, stops, filters and execution-based
scoring end to end. Problems named in `broken` get a body that must fail instead:

    python -c "import sys; sys.path.insert(0, 'tests'); import canonical_lm; canonical_lm.main()" run \\
        --model canonical --model_args broken=3:10 --tasks humaneval,humaneval_instruct,humaneval_instruct_v4 \\
        --include_path lm-eval-harness --confirm_run_unsafe_code --output_path OUT --log_samples
"""

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

# A wrong value, an exception, a syntax error: each must score 0.
BROKEN_BODIES = ["    return None\n", "    raise ValueError('broken on purpose')\n", "    return (\n"]


def problem_number(doc: dict) -> int:
    return int(doc["task_id"].split("/")[1])


@register_model("canonical")
class CanonicalLM(LM):
    def __init__(self, broken: str = "", **_):  # lm_eval also passes batch_size, device, ...
        super().__init__()
        self.broken = {int(i) for i in str(broken).split(":") if i.strip()}

    def answer(self, task: str, doc: dict) -> str:
        i = problem_number(doc)
        body = BROKEN_BODIES[i % 3] if i in self.broken else doc["canonical_solution"]
        if "_instruct" in task:  # humaneval_instruct, humaneval_instruct_v4
            return body + "```\n\nThis function passes the tests."  # chat models close the fence and go on talking
        return body + "\n\ndef another_function():\n    pass\n"  # base models go on writing code

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            _, gen_kwargs = req.arguments
            text = self.answer(req.task_name, req.doc)
            cut = min([text.find(s) for s in gen_kwargs["until"] if s in text], default=len(text))
            out.append(text[:cut])  # a real backend stops at the first stop string
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("canonical answers generation requests only")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("canonical answers generation requests only")


def main() -> None:
    """lm_eval's own command line, with `canonical` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
