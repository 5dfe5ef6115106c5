"""UniFlowChat: the UniFlow encoder's semantic tokens -> projector -> any `transformers` causal LM.

    images ─► encoder.preprocess (resize + crop to its native size) ─► encoder (layer `vision.layer`) ─► tokens h
    h (B, N, D) ─► projector (mlp, or pixel shuffle 2x2 + LayerNorm + mlp) ─► visual embeddings (B, T, H)
    messages ─► the LLM's chat template ─► token ids with an IMAGE_TOKEN_ID run of T positions per `<image>`
    embeddings of the ids, the runs replaced by the visual embeddings ─► LLM ─► loss on the replies / generation

The same module is the training module of the `mllm` task (its forward takes a collated batch and returns the loss)
and the inference model (`chat`, `generate`). An inference folder holds only what training changed: `config.json`
(the MLLMConfig, the base LLM's record and the encoder's probe), `projector.safetensors`, and `lora/` (a LoRA
folder), `llm/` (a fully tuned LLM) or `encoder.safetensors` (a tuned encoder) when those were trained; the encoder
and the base LLM are loaded from where the config says.

Generation: prompts of a batch are left-padded with an attention mask, and `transformers`' `generate` derives the
position ids from that mask, so a prompt's greedy answer does not depend on the batch it is in (tested). A prompt is
never cut: a prompt longer than the LLM's context is an error, and `max_new_tokens` is lowered to what the context
leaves after the prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm.config import MODEL_KIND, MLLMConfig
from mllm.llm import base_record, context_length, llm_width, load_llm, load_tokenizer, probe, same_probe
from mllm.places import place_vectors
from mllm.projector import Projector
from mllm.prompting import IGNORE_INDEX, IMAGE_TOKEN_ID, ChatFormat, EncodedConversation
from uniflow.checkpoint import CONFIG_NAME, check_destination, check_dtype, check_finite, load_state_strict
from uniflow.configs import check_int, check_number
from uniflow.errors import CheckpointError, ConfigError, ImageInputError
from uniflow.precision import bf16_autocast_enabled

PROJECTOR_WEIGHTS = "projector.safetensors"
ENCODER_WEIGHTS = "encoder.safetensors"
LORA_DIR = "lora"
LLM_DIR = "llm"
MAX_NEW_TOKENS = 4096


def encoder_probe(encoder: nn.Module) -> list[float]:
    """A probe of the encoder's weights (its first, middle and last weight matrices by name): a projector trained on
    one encoder refuses another."""
    state = encoder.state_dict()
    names = sorted(k for k, v in state.items() if v.is_floating_point() and v.ndim >= 2)  # matrices: never constant
    picked = [names[0], names[len(names) // 2], names[-1]] if names else []
    return probe([state[n] for n in picked])


def _resolve_encoder_folder(path: str, base: Path | None) -> str:
    """A relative encoder path in an inference folder's config is tried against the folder first."""
    p = Path(path)
    if base is not None and not p.is_absolute() and (base / p).exists():
        return str(base / p)
    return path


def _as_image_list(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _as_messages(messages: Any) -> Any:
    """A plain string is one user message."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return messages


class UniFlowChat(nn.Module):
    """Chat about images with UniFlow's semantic tokens. Build with `from_config` (training) or `from_pretrained`
    (an inference folder); `chat` answers one conversation (optionally streamed), `generate` a batch."""

    def __init__(self, config: MLLMConfig, encoder: nn.Module, llm: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.llm = llm
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer, config.system_prompt, name=f"the tokenizer of {config.llm.path}")
        native = encoder.image_size // encoder.patch_size
        self.grid = (native, native)
        self.projector = Projector(config.projector, encoder.width, llm_width(llm.config), self.grid)
        self.image_size = encoder.image_size
        self.tokens_per_image = self.projector.num_tokens(self.grid)
        self.context = context_length(llm.config)
        self.base: dict[str, Any] | None = None  # the base LLM's record (mllm.llm.base_record)
        self.encoder_record: list[float] | None = None

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: MLLMConfig, meta: bool = False, load_encoder_weights: bool = True,
                    folder: Path | None = None, load_llm_weights: bool = True) -> UniFlowChat:
        """Encoder, LLM (with LoRA when `llm_tuning` is lora) and a fresh projector. meta: everything on the meta
        device from configs alone (dry runs). load_encoder_weights / load_llm_weights=False build that part's
        structure only (its weights come later, from the training engine)."""
        # The new parts (projector, LoRA) draw their random init from the seed in force when building starts, so
        # they are the same however the rest was built (loaded, or random under ZeRO-3, which draws numbers).
        seed = torch.initial_seed()
        encoder = build_vision(config, meta=meta, load_weights=load_encoder_weights, folder=folder)
        llm = load_llm(config.llm, meta=meta, weights=load_llm_weights)
        tokenizer = load_tokenizer(config.llm) if not meta else _meta_tokenizer(config)
        if config.llm_tuning == "lora":
            from mllm.lora import wrap_lora

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((seed + 1) % 2**63)
                llm = wrap_lora(llm, config.lora)
        with torch.random.fork_rng(devices=[]), torch.device("meta") if meta else contextlib.nullcontext():
            torch.manual_seed(seed)
            model = cls(config, encoder, llm, tokenizer)
        if not meta:
            if load_llm_weights:
                embedding = model.causal_lm.get_input_embeddings().weight
                model.base = base_record(config.llm, model.causal_lm.config, embedding)
                if config.projector.place_words:  # otherwise the training engine sets them from the real weights
                    model.projector.set_places(place_vectors(tokenizer, embedding,
                                                             model.projector.place_grid(model.grid)))
            model.encoder_record = encoder_probe(encoder) if load_encoder_weights else None
        model.set_trainable()
        return model

    def set_trainable(self) -> None:
        """Stage 1 (llm_tuning none): the projector only; stage 2: + LoRA or the whole LLM; the encoder when
        `vision.trainable`."""
        tuning = self.config.llm_tuning
        for p in self.encoder.parameters():
            p.requires_grad_(self.config.vision.trainable)
        for name, p in self.llm.named_parameters():
            p.requires_grad_(tuning == "full" or (tuning == "lora" and "lora_" in name))
        for p in self.projector.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> UniFlowChat:
        """Frozen parts stay in eval mode while the rest trains: a frozen encoder's drop-path or a frozen LLM's
        dropout would otherwise perturb what the projector learns from."""
        super().train(mode)
        if mode and not self.config.vision.trainable:
            self.encoder.eval()
        if mode and self.config.llm_tuning == "none":
            self.llm.eval()
        return self

    @property
    def causal_lm(self) -> nn.Module:
        """The `transformers` causal LM (inside peft's wrapper when LoRA is on; LoRA layers are in place in it)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    # ------------------------------------------------------------------------------------------------ images
    def prepare_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images, arrays, tensors or file paths -> (N, 3, S, S) normalised pixels, resized and centre-cropped to
        the encoder's native size (the training data goes through the same resize)."""
        from uniflow.images import open_image

        items = []
        for i, image in enumerate(images):
            if isinstance(image, (str, Path)):
                image = open_image(image, size=self.image_size)
            elif image is None:
                raise ImageInputError(f"images[{i}]: None is not an image")
            items.append(image)
        return self.encoder.preprocess(items, resize=True)

    def visual_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels -> (N, T, H) LLM embeddings."""
        weight = next(self.encoder.parameters())
        out = self.encoder(pixels.to(weight.device, weight.dtype), layers=[self.config.vision.layer])
        tokens = out.last
        proj = self.projector.fc1.weight
        return self.projector(tokens.to(proj.dtype), out.grid)

    def embed(self, ids: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with every IMAGE_TOKEN_ID run replaced by its image's visual embeddings (images in
        order of appearance, batch row by row)."""
        is_image = ids == IMAGE_TOKEN_ID
        embeds = self.causal_lm.get_input_embeddings()(ids.masked_fill(is_image, 0))
        n_positions = int(is_image.sum())
        n_images = 0 if pixels is None else pixels.shape[0]
        if n_positions != n_images * self.tokens_per_image:
            raise ImageInputError(f"{n_positions} image positions in the tokens but {n_images} image(s) of "
                                  f"{self.tokens_per_image} tokens each")
        if n_images == 0:
            return embeds
        visual = self.visual_embeddings(pixels).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    def _autocast(self) -> Any:
        """bf16 autocast when the config asks for it and the device computes bf16 natively (`uniflow.precision`)."""
        device = self.device
        enabled = bf16_autocast_enabled(self.config.autocast == "bf16", device, "model.autocast")
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------------------------------------------ training
    def forward(self, batch: dict[str, torch.Tensor], mode: str = "loss") -> dict[str, Any]:
        """Loss of a collated batch (`mllm.data.collate`): cross-entropy on the labelled (assistant) tokens only,
        summed and divided by their number; the LM head runs on those positions only."""
        if mode != "loss":
            raise ValueError(f"mode must be 'loss', got {mode!r}")
        device = self.device
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)
        pixels = batch.get("pixel_values")  # [0, 1] RGB from the datasets; the encoder's own normalisation here,
        # the same that prepare_images applies at inference
        pixels = self.encoder.normalize(pixels.to(device)) if pixels is not None and pixels.shape[0] else None
        causal = self.causal_lm
        with self._autocast():
            embeds = self.embed(ids, pixels)
            hidden = causal.get_decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            logits = causal.get_output_embeddings()(hidden[:, :-1][keep])
        logits = logits.float()
        softcap = getattr(causal.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        count = keep.sum()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum") / count.clamp_min(1)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == targets[keep]).float().sum() / count.clamp_min(1)
        return {"loss": loss, "metrics": {"loss": loss.detach(), "token_accuracy": accuracy,
                                          "label_tokens": count.float()}}

    # ------------------------------------------------------------------------------------------------ prompts
    def encode_prompt(self, images: Any, messages: Any, source: str = "conversation"
                      ) -> tuple[EncodedConversation, torch.Tensor | None]:
        """(token ids ending with the generation prompt, prepared pixels or None) of one conversation."""
        images = _as_image_list(images)
        encoded = self.format.encode(_as_messages(messages), [self.tokens_per_image] * len(images),
                                     for_generation=True, source=source)
        pixels = self.prepare_images(images) if images else None
        if self.context is not None and len(encoded.ids) >= self.context:
            raise ConfigError(f"{source}: the prompt is {len(encoded.ids)} tokens ({self.tokens_per_image} per image "
                              f"included), the LLM's context is {self.context}; shorten the conversation")
        return encoded, pixels

    def _left_padded(self, prompts: list[EncodedConversation]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(p.ids) for p in prompts)
        ids = torch.full((len(prompts), longest), self.format.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p.ids):] = torch.tensor(p.ids, dtype=torch.long)
            mask[i, longest - len(p.ids):] = 1
        return ids, mask

    # ------------------------------------------------------------------------------------------------ generation
    def _generation_kwargs(self, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                           top_k: int, longest_prompt: int) -> dict[str, Any]:
        check_int("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS + 1)
        check_number("temperature", temperature, 0.0, None, lo_open=True)
        check_number("top_p", top_p, 0.0, 1.0, lo_open=True)
        check_int("top_k", top_k, 0)
        if self.context is not None:
            max_new_tokens = min(max_new_tokens, self.context - longest_prompt)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                  "eos_token_id": self.format.stop_ids, "pad_token_id": self.format.pad_id}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _decode(self, tokens: list[int]) -> str:
        stop = set(self.format.stop_ids)
        cut = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
        return self.tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate(self, conversations: Sequence[tuple[Any, Any]], max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 streamer: Any = None) -> list[str]:
        """Answers to a batch of (images, messages) conversations, generated together: left-padded prompts with an
        attention mask, greedy (default) or sampled (temperature, top_p, top_k; `seed` for a repeatable draw),
        stopping at the template's end-of-turn token or EOS, at most `max_new_tokens` each. `streamer` (batch of one
        only): a `transformers` streamer receiving the tokens as they come."""
        if not conversations:
            raise ConfigError("generate: no conversations given")
        if streamer is not None and len(conversations) != 1:
            raise ConfigError("generate: streaming works on one conversation at a time")
        prompts, pixel_list = [], []
        for i, (images, messages) in enumerate(conversations):
            encoded, pixels = self.encode_prompt(images, messages, source=f"conversation {i}")
            prompts.append(encoded)
            if pixels is not None:
                pixel_list.append(pixels)
        kwargs = self._generation_kwargs(max_new_tokens, do_sample, temperature, top_p, top_k,
                                         max(len(p.ids) for p in prompts))
        ids, mask = self._left_padded(prompts)
        device = self.device
        pixels = torch.cat(pixel_list) if pixel_list else None
        was_training = self.training
        self.eval()
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None \
            else contextlib.nullcontext()
        try:
            with rng, self._autocast():
                if seed is not None:
                    torch.manual_seed(seed)
                embeds = self.embed(ids.to(device), pixels)
                out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask.to(device), streamer=streamer,
                                        **kwargs)
        finally:
            self.train(was_training)
        if out.shape[1] > kwargs["max_new_tokens"]:  # a model that returns the prompt too
            out = out[:, ids.shape[1]:]
        return [self._decode(row.tolist()) for row in out]

    def chat(self, images: Any, messages: Any, stream: bool = False, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None) -> str | Iterator[str]:
        """The assistant's reply to a conversation about `images` (an image, a list, or None). `messages`: a list of
        {"role", "content"} turns ending with the user's, or one user message as a string; each image needs one
        `<image>` placeholder in a user turn. stream=True returns an iterator of text pieces as they are generated
        (`transformers.TextIteratorStreamer`); errors in the input are raised before it is returned."""
        if not stream:
            return self.generate([(images, messages)], max_new_tokens, do_sample, temperature, top_p, top_k, seed)[0]
        from transformers import TextIteratorStreamer

        self.encode_prompt(images, messages)  # bad input fails here, in the caller's thread
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.generate([(images, messages)], max_new_tokens, do_sample, temperature, top_p, top_k, seed,
                              streamer=streamer)
            except BaseException as exc:  # re-raised in the consumer's thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def pieces() -> Iterator[str]:
            yield from streamer
            thread.join()
            if failure:
                raise failure[0]

        return pieces()

    # ------------------------------------------------------------------------------------------------ folders
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What an inference folder stores, by this module's parameter names (see `save_pretrained`)."""
        return select_adapter_state(self.config, self.state_dict())

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False,
                        metrics: dict[str, float] | None = None, encoder_path: str | None = None) -> Path:
        """Write the inference folder (only what training changed; see the module docstring). dtype: e.g.
        torch.float16 for shipping. encoder_path: how the folder's config names the encoder (e.g. relative to the
        folder); default: as configured."""
        if self.base is None:
            raise CheckpointError("this model has no base LLM record (built on the meta device?); cannot save it")
        return write_folder(folder, self.config, self.adapter_state(), self.base, self.encoder_record, dtype,
                            overwrite, metrics, encoder_path, llm_config=self.causal_lm.config,
                            tokenizer=self.tokenizer)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> UniFlowChat:
        """An inference folder (`save_pretrained`, or a training export): the encoder and the base LLM are loaded
        from where its config says, then the projector, LoRA / tuned LLM and tuned encoder from the folder; a folder
        trained on another encoder or another base LLM is refused."""
        folder = Path(folder)
        from uniflow.checkpoint import read_config, read_safetensors

        data = read_config(folder)
        base = data.pop("base", None)
        enc_record = data.pop("encoder_probe", None)
        data.pop("metrics", None)
        config = MLLMConfig.from_dict(data, str(folder / CONFIG_NAME))
        if config.llm_tuning == "full":  # the folder holds the whole tuned LLM
            config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, path=str(folder / LLM_DIR),
                                                                         gguf_file=None, cache=False),
                                         llm_tuning="none")
            tuned_full = True
        else:
            tuned_full = False
        lora = config.llm_tuning == "lora"
        model = cls.from_config(config, folder=folder)
        if enc_record is not None and not (folder / ENCODER_WEIGHTS).is_file() and \
                not same_probe(enc_record, model.encoder_record or []):
            raise CheckpointError(f"{folder}: its projector was trained on another encoder than "
                                  f"{config.vision.tokenizer}; load the encoder it was trained with")
        if not tuned_full and base is not None:
            from mllm.llm import check_base

            check_base(base, model.base, f"the projector in {folder}")
        projector = read_safetensors(folder / PROJECTOR_WEIGHTS)
        load_state_strict(model.projector, {k.removeprefix("projector."): v for k, v in projector.items()},
                          str(folder / PROJECTOR_WEIGHTS))
        if (folder / ENCODER_WEIGHTS).is_file():
            encoder = read_safetensors(folder / ENCODER_WEIGHTS)
            load_state_strict(model.encoder, {k.removeprefix("encoder."): v for k, v in encoder.items()},
                              str(folder / ENCODER_WEIGHTS))
        if lora:
            from mllm.lora import load_lora

            load_lora(model.llm, folder / LORA_DIR, model.base)
        model.set_trainable()
        model.eval()
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def build_vision(config: MLLMConfig, meta: bool = False, load_weights: bool = True, folder: Path | None = None
                 ) -> nn.Module:
    """The encoder alone: `uniflow.load_encoder` of `vision.tokenizer`, its structure only (load_weights=False), or
    from `vision.preset` on the meta device when the folder is absent (dry runs)."""
    from uniflow.encoders import build_encoder
    from uniflow.tokenizer import load_encoder, read_tokenizer_config

    path = _resolve_encoder_folder(config.vision.tokenizer, folder)
    if meta and not Path(path).exists():
        if config.vision.preset is None:
            raise ConfigError(f"vision.tokenizer: {path} not found; a dry run without it needs vision.preset")
        from uniflow.presets import get_preset

        enc_config = get_preset(config.vision.preset).encoder
        with torch.device("meta"):
            return build_encoder(dataclasses.replace(enc_config, pretrained=None))
    if meta or not load_weights:
        from uniflow.hub import resolve_folder

        enc_config = read_tokenizer_config(resolve_folder(path, what="tokenizer")).encoder
        with torch.device("meta") if meta else contextlib.nullcontext():
            return build_encoder(dataclasses.replace(enc_config, pretrained=None))
    return load_encoder(path)


def _meta_tokenizer(config: MLLMConfig) -> Any:
    """A dry run needs the tokenizer only for the chat format: the real one when present, else a stand-in with a
    ChatML template (nothing is tokenized in a dry run)."""
    path = str(config.llm.path)
    if Path(path).exists():
        return load_tokenizer(config.llm)
    from mllm.tiny import build_tokenizer

    return build_tokenizer("qwen2")


def select_adapter_state(config: MLLMConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a UniFlowChat state dict that training changed: the projector; the LoRA tensors or the whole
    LLM (by `llm_tuning`); the encoder when trainable."""
    def kept(key: str) -> bool:
        if key.startswith("projector."):
            return True
        if key.startswith("llm."):
            return config.llm_tuning == "full" or (config.llm_tuning == "lora" and (".lora_A." in key or
                                                                                   ".lora_B." in key))
        return key.startswith("encoder.") and config.vision.trainable

    return {k: v for k, v in state.items() if kept(k)}


def write_folder(folder: str | Path, config: MLLMConfig, state: dict[str, torch.Tensor], base: dict[str, Any],
                 encoder_record: list[float] | None, dtype: torch.dtype | None = None, overwrite: bool = False,
                 metrics: dict[str, float] | None = None, encoder_path: str | None = None, llm_config: Any = None,
                 tokenizer: Any = None) -> Path:
    """Write an inference folder from the training module's tensors (`select_adapter_state` of its state dict),
    atomically; the destination rules of `uniflow.checkpoint.check_destination` apply. A fully tuned LLM is written
    as a `transformers` folder `llm/` (its config and tokenizer: `llm_config`, `tokenizer`)."""
    from safetensors.torch import save_file

    from uniflow.fileio import atomic_write_dir

    dtype = check_dtype(dtype)
    dest = check_destination(folder, MODEL_KIND, overwrite)
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in state.items()}
    check_finite(cast, f"{dest}: weights" + (f" cast to {dtype}" if dtype is not None else ""))
    saved = dataclasses.replace(config, vision=dataclasses.replace(config.vision, tokenizer=encoder_path)) \
        if encoder_path is not None else config
    data = {**saved.to_dict(), "base": base, "encoder_probe": encoder_record}
    if metrics:
        data["metrics"] = metrics
    projector = {k: v for k, v in cast.items() if k.startswith("projector.")}
    encoder = {k: v for k, v in cast.items() if k.startswith("encoder.")}

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
        save_file(projector, str(tmp / PROJECTOR_WEIGHTS), metadata={"format": "pt"})
        if encoder:
            save_file(encoder, str(tmp / ENCODER_WEIGHTS), metadata={"format": "pt"})
        if config.llm_tuning == "lora":
            from mllm.lora import lora_state, save_lora

            save_lora(tmp / LORA_DIR, lora_state(cast, "llm."), config.lora, base)
        elif config.llm_tuning == "full":
            if llm_config is None or tokenizer is None:
                raise CheckpointError("a fully tuned LLM needs its config and tokenizer to be saved")
            weights = {k.removeprefix("llm."): v for k, v in cast.items() if k.startswith("llm.")}
            if getattr(llm_config, "tie_word_embeddings", False):
                weights.pop("lm_head.weight", None)
            (tmp / LLM_DIR).mkdir()
            llm_config.save_pretrained(str(tmp / LLM_DIR))
            save_file(weights, str(tmp / LLM_DIR / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(str(tmp / LLM_DIR))

    return atomic_write_dir(dest, write)
