"""Tiny random LLMs with real tokenizers and real chat templates, built here with no download: what the tests, the
smoke checks and the dry runs of the MLLM use in place of a hub model.

`build_tokenizer(template)` trains a small byte-level BPE tokenizer (any text encodes, nothing is unknown) and sets
one of three chat templates written after the families the MLLM supports: "qwen2" (ChatML with Qwen2.5's default
system message), "llama3" (header tokens, `<|eot_id|>`, BOS in the template) and "smollm2" (ChatML with SmolLM2's
default system message). `build_llm_folder` saves a random Qwen2 or Llama causal LM of a few thousand parameters
with such a tokenizer: a folder `transformers` loads like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TEMPLATES: dict[str, str] = {
    "qwen2": (
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.'"
        " + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message['role'] != 'system' or not loop.first %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "smollm2": (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
        "{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
# template -> (bos, eos, pad)
TOKENS: dict[str, tuple[str | None, str, str]] = {
    "qwen2": (None, "<|im_end|>", "<|endoftext|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|endoftext|>"),
    "smollm2": ("<|im_start|>", "<|im_end|>", "<|im_end|>"),
}
_CORPUS = [
    "What shape is the largest object? circle square triangle diamond star cross",
    "What colour is the circle? red green blue yellow purple orange",
    "How many shapes are there? 1 2 3 one two three",
    "Where is the red circle? top left right bottom center middle",
    "Is there a blue star? yes no",
    "Describe the image. A small red circle at the top left on a plain light background.",
    "You are a helpful assistant. The capital of France is Paris. Hello, how are you today?",
    "system user assistant image the a an is of on in at and with",
]


def build_tokenizer(template: str = "qwen2", vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained on a few ShapeWorld-like sentences, with `template`'s chat template and
    special tokens (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if template not in TEMPLATES:
        raise ValueError(f"template: expected one of {sorted(TEMPLATES)}, got {template!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    bos, eos, pad = TOKENS[template]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    tokenizer.chat_template = TEMPLATES[template]
    return tokenizer


def tiny_llm(arch: str, vocab_size: int, seed: int = 0, width: int = 32, layers: int = 2,
             context: int = 512) -> Any:
    """A random `transformers` Qwen2 ("qwen2") or Llama ("llama") causal LM of the given vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = {"vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width,
              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": context, "tie_word_embeddings": False}
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    raise ValueError(f"arch: expected 'qwen2' or 'llama', got {arch!r}")


def build_llm_folder(dest: str | Path, arch: str = "qwen2", template: str = "qwen2", seed: int = 0,
                     width: int = 32, layers: int = 2, context: int = 512) -> Path:
    """Save a tiny random causal LM with a tokenizer (`build_tokenizer(template)`) to `dest`; returns it."""
    dest = Path(dest)
    tokenizer = build_tokenizer(template)
    model = tiny_llm(arch, len(tokenizer), seed, width, layers, context)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
