"""A tiny random Llama with a word-level tokenizer and a ChatML template, saved to a folder: the causal LM the loss
stage's and the SFT trainer's tests run on (no downloads). Each test module picks its own words, sizes and head scale:
the planted truths of those tests depend on them."""

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nyou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "[UNK]", "system", "user", "assistant"]


def build_tiny_chat_llama(
    folder: Path,
    words: list[str],
    *,
    fillers: int,
    vocab_size: int | None = None,
    hidden: int,
    max_positions: int,
    head_scale: float,
) -> dict[str, int]:
    """Write tokenizer + model to ``folder``; return the vocabulary. ``fillers`` extra words ``w0..``; ``vocab_size``
    cuts the vocabulary (a prime size: no power-of-two shortcut in the head); ``head_scale`` multiplies the 0.02-init
    head, whose logits otherwise stay near 0 whatever the hidden state."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + words + [f"w{i}" for i in range(fillers)]))}
    if vocab_size is not None:
        vocab = dict(list(vocab.items())[:vocab_size])
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="[UNK]"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=False, pad_token_id=vocab["<|im_end|>"], eos_token_id=vocab["<|im_end|>"])  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(folder)
    return vocab
