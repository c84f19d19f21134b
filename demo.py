"""The whole pipeline, offline, on toy experts it builds itself.

    python demo.py            # builds runs/toy/ once, then gram -> merge -> evaluate
    python demo.py --quick    # tiny sizes and few rows: the same flow in under a minute

(Work in progress: the toy experts and the full flow land with the demo issue; until then
this file holds the tokenizer builder that the tests share.)
"""
from pathlib import Path

# A Llama-3-style chat template: the template writes BOS itself, so calibration text is
# tokenized with add_special_tokens=False.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]


def build_tokenizer(texts, out_dir, vocab_size=512):
    """Train a byte-level BPE tokenizer on `texts` and save it as a Hugging Face folder with
    Llama-3's special tokens and chat template. Like Llama-3's, it adds BOS when asked for
    special tokens, so a double BOS shows up wherever a caller forgets add_special_tokens=False."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)
    hf.save_pretrained(str(out_dir))
    return hf
