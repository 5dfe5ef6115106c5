"""Task "mllm": LLaVA-style training of UniFlowChat (mllm/) on DeepSpeed ZeRO.

Stage 1 (`model.llm_tuning: none`): only the projector learns, on captions, encoder and LLM frozen. Stage 2
(`lora` or `full`): instruction tuning, the projector with LoRA (`peft`) or the whole LLM, and the encoder when
`model.vision.trainable`; each part is a parameter group with its own learning rate (`optim.groups.projector`,
`.llm`, `.encoder`). `model.init_from` starts from an earlier export (stage 2 from stage 1's projector).

The model section is an `mllm.config.MLLMConfig` plus `init_from`; the data section reads LLaVA JSON files or renders
ShapeWorld conversations on demand (captions or question answering). Labels cover the assistant replies only, exactly,
for any chat template (`mllm.prompting`). Frozen parameters (the base LLM, a frozen encoder) stay out of checkpoints
(the engine's rule), so each checkpoint holds the projector and the LoRA (or tuned LLM/encoder) weights; the export is
the MLLM inference folder (projector and LoRA on their own, with the base LLM's record). Evaluation: the held-out loss
and, on ShapeWorld, the exact-match accuracy of greedy answers per question type.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from mllm.config import MODEL_KIND, MLLMConfig
from train.distributed import all_reduce_sum
from train.optim import ParamGroup
from train.tasks import EvalContext, Task, heldout_batches
from uniflow.configs import FieldError, check_choice, check_number, from_dict
from uniflow.errors import CheckpointError, ConfigError

SOURCES = ("shapeworld", "llava")


@dataclass
class MLLMModelSection:
    """The `model` section: an MLLMConfig's fields plus init_from (an MLLM inference folder, e.g. stage 1's export,
    whose projector, and encoder if tuned, the run starts from)."""

    vision: dict[str, Any] = dataclasses.field(default_factory=dict)
    projector: dict[str, Any] = dataclasses.field(default_factory=dict)
    llm: dict[str, Any] = dataclasses.field(default_factory=dict)
    llm_tuning: str = "none"
    lora: dict[str, Any] = dataclasses.field(default_factory=dict)
    system_prompt: str | None = None
    max_length: int = 2048
    autocast: str | None = None
    init_from: str | None = None


@dataclass
class MLLMDataConfig:
    """source: "shapeworld" (rendered on demand) or "llava" (JSON files).
    ShapeWorld: task "caption" (stage 1) or "qa" (min_turns to max_turns questions per conversation; every_position
    adds "where is ..." for every object, not only one), num_samples training images, seed. LLaVA: path (JSON),
    image_folder (default: the JSON's folder), heldout_path (optional).
    heldout_samples: held-out conversations for the evaluation loss.
    text_path, text_ratio: a LLaVA JSON of text-only conversations, and the share of training items replaced by one
    of them (LLaVA's language-only mix: keeps the LLM's general answers through stage 2).
    group_by_length: k > 0 sorts each k micro-batches' worth of samples by token length before batching, so batches
    carry little padding (`train.data.length_grouped`: ~1.5x faster on ShapeWorld QA); 0: random batches."""

    source: str = "shapeworld"
    task: str = "qa"
    num_samples: int = 50_000
    max_turns: int = 5
    min_turns: int = 1
    every_position: bool = False
    seed: int = 0
    path: str | None = None
    image_folder: str | None = None
    heldout_path: str | None = None
    heldout_samples: int = 64
    num_workers: int = 0
    text_path: str | None = None
    text_ratio: float = 0.0
    group_by_length: int = 0

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        check_choice("task", self.task, ("caption", "qa"))
        check_number("num_samples", self.num_samples, 1, None)
        from mllm.data import MAX_SHAPEWORLD_TURNS

        check_number("max_turns", self.max_turns, 1, MAX_SHAPEWORLD_TURNS)
        check_number("min_turns", self.min_turns, 1, self.max_turns)
        check_number("seed", self.seed, 0, None)
        check_number("heldout_samples", self.heldout_samples, 0, None)
        check_number("num_workers", self.num_workers, 0, None)
        if self.source == "llava" and not self.path:
            raise FieldError("path", "the llava source needs the JSON file (data.path)")
        check_number("text_ratio", self.text_ratio, 0.0, 1.0)
        check_number("group_by_length", self.group_by_length, 0, None)
        if self.text_ratio > 0 and not self.text_path:
            raise FieldError("text_path", f"text_ratio {self.text_ratio} needs the text-only LLaVA JSON file")


@dataclass
class MLLMEvalConfig:
    """questions: held-out ShapeWorld images whose questions (5 each) are answered greedily and scored by exact match
    per type (0: none; ShapeWorld data only). max_new_tokens: the answers' token limit."""

    questions: int = 0
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        check_number("questions", self.questions, 0, None)
        check_number("max_new_tokens", self.max_new_tokens, 1, None)


def _param_names(module: nn.Module, prefix: str) -> list[tuple[str, nn.Parameter]]:
    return [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]


class MLLMTask(Task):
    kind = "mllm"
    data_config: ClassVar[type | None] = MLLMDataConfig
    eval_config: ClassVar[type | None] = MLLMEvalConfig
    count_unit = "samples"
    export_kind = MODEL_KIND
    zero3_reference_init = False  # transformers models initialise (and load) correctly under zero.Init
    data: MLLMDataConfig
    eval_options: MLLMEvalConfig

    def __init__(self, config: Any, dry_run: bool = False) -> None:
        super().__init__(config, dry_run)
        source = f"{config.source}: model"
        section = from_dict(MLLMModelSection, dict(config.model), source)
        fields = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name != "init_from"}
        self.mllm_config = MLLMConfig.from_dict(fields, source)
        self.init_from = Path(section.init_from) if section.init_from else None
        if self.data.source != "shapeworld" and self.eval_options.questions:
            raise ConfigError(f"{config.source}: eval.questions: exact-match questions need the shapeworld source")
        self._format: Any = None
        self._embed_key: str | None = None
        self._encoder_probe: list[float] | None = None
        if dry_run:
            return
        from mllm.llm import resolve_source

        vision = Path(self.mllm_config.vision.tokenizer)
        if not vision.exists() and not _looks_like_hub_id(str(vision)):
            raise ConfigError(f"{source}.vision.tokenizer: {vision} not found (a tokenizer folder; the ShapeWorld one "
                              f"is checkpoints/shapeworld/tokenizer)")
        if self.init_from is not None and not (self.init_from / "projector.safetensors").is_file():
            raise ConfigError(f"{source}.init_from: {self.init_from} is not an MLLM folder (no projector.safetensors);"
                              f" train stage 1 first")
        resolve_source(self.mllm_config.llm)  # a missing package or GGUF reader fails now, before any work

    @property
    def zero3(self) -> bool:
        """Whether the run partitions parameters (ZeRO-3): then the LLM is built from its config inside zero.Init
        and its weights come through `initial_state` (scattered by the engine from rank 0), which does not depend
        on `transformers`' own ZeRO-3 loading (that one needs `accelerate`)."""
        from train.ds_config import read_ds_json, zero_stage
        from uniflow.configs import deep_merge

        return zero_stage(deep_merge(read_ds_json(self.config.deepspeed.config), self.config.deepspeed.overrides)) == 3

    # ------------------------------------------------------------------------------------------------- model
    @property
    def chat_format(self) -> Any:
        if self._format is None:
            from mllm.llm import load_tokenizer
            from mllm.prompting import ChatFormat

            config = self.mllm_config
            self._format = ChatFormat(load_tokenizer(config.llm), config.system_prompt,
                                      name=f"the tokenizer of {config.llm.path}")
        return self._format

    def build_model(self) -> nn.Module:
        """Encoder structure (its weights come from `initial_state`), the LLM loaded by `transformers` (partitioned as
        it loads under ZeRO-3), LoRA when configured, a fresh projector."""
        from mllm.model import UniFlowChat

        model = UniFlowChat.from_config(self.mllm_config, meta=self.dry_run, load_encoder_weights=False,
                                        load_llm_weights=self.dry_run or not self.zero3)
        if self.config.gradient_checkpointing and not self.dry_run:
            model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.mllm_config.vision.trainable:
                model.encoder.set_grad_checkpointing(True)
        embedding = model.causal_lm.get_input_embeddings().weight
        self._embed_key = next(n for n, p in model.named_parameters() if p is embedding)
        self._llm_config = model.causal_lm.config
        # training-module name of each LLM tensor, by its name in the plain causal LM (peft renames some)
        self._llm_names = {_plain_llm_name(n): n for n in model.state_dict() if n.startswith("llm.")}
        self._tokens_per_image = model.tokens_per_image
        self._place_grid = model.projector.place_grid(model.grid)
        self._image_size = model.image_size
        return model

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """The encoder's weights from its tokenizer folder, and `init_from`'s projector (and tuned encoder)."""
        from mllm.llm import same_probe
        from mllm.model import ENCODER_WEIGHTS, PROJECTOR_WEIGHTS, build_vision, encoder_probe
        from uniflow.checkpoint import read_config, read_safetensors

        encoder = build_vision(self.mllm_config)
        state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
        self._encoder_probe = encoder_probe(encoder)
        if self.init_from is not None:
            recorded = read_config(self.init_from).get("encoder_probe")
            tuned = self.init_from / ENCODER_WEIGHTS
            if tuned.is_file():
                state.update(read_safetensors(tuned))
            elif recorded is not None and not same_probe(recorded, self._encoder_probe):
                raise CheckpointError(f"model.init_from: {self.init_from} was trained on another encoder than "
                                      f"{self.mllm_config.vision.tokenizer}")
            state.update(read_safetensors(self.init_from / PROJECTOR_WEIGHTS))
        if self.zero3:  # the LLM was built from its config: its weights go through the engine (rank 0 only)
            from mllm.llm import load_llm

            llm_state = load_llm(self.mllm_config.llm).state_dict()
            unknown = sorted(set(llm_state) - set(self._llm_names))
            if unknown:
                raise CheckpointError(f"model.llm: weights {unknown[:3]} of {self.mllm_config.llm.path} have no place "
                                      f"in the model built from its config")
            state.update({self._llm_names[k]: v for k, v in llm_state.items()})
            if self.mllm_config.projector.place_words and "projector.place" not in state:
                # the model was built on random LLM weights: its place words come from the real embedding
                from mllm.places import place_vectors

                state["projector.place"] = place_vectors(self.chat_format.tokenizer, state[self._embed_key],
                                                         self._place_grid)
        return state

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """projector, llm (LoRA or all of it) and encoder: set each one's lr with optim.groups.NAME."""
        return [ParamGroup("projector", _param_names(model.projector, "projector")),
                ParamGroup("llm", _param_names(model.llm, "llm")),
                ParamGroup("encoder", _param_names(model.encoder, "encoder"))]

    # -------------------------------------------------------------------------------------------------- data
    def _prepared(self) -> Any:
        from mllm.data import Prepared
        from mllm.projector import num_visual_tokens
        from uniflow.hub import resolve_folder
        from uniflow.tokenizer import read_tokenizer_config

        enc = read_tokenizer_config(resolve_folder(self.mllm_config.vision.tokenizer, what="tokenizer")).encoder
        grid = enc.image_size // enc.patch_size
        tokens = num_visual_tokens(self.mllm_config.projector.type, (grid, grid))
        return Prepared(self.chat_format, tokens, enc.image_size, self.mllm_config.max_length)

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        from mllm.data import LlavaDataset, ShapeWorldChat

        prepared = self._prepared()
        d = self.data
        if d.source == "shapeworld":
            turns = {"max_turns": d.max_turns, "min_turns": d.min_turns, "every_position": d.every_position}
            train = ShapeWorldChat(prepared, "train", d.num_samples, d.task, d.seed, **turns)
            heldout = ShapeWorldChat(prepared, "heldout", max(d.heldout_samples, 1), d.task, d.seed, **turns)
            return self._with_text(train, prepared), heldout if d.heldout_samples or self.eval_options.questions \
                else None
        train = LlavaDataset(d.path, prepared, d.image_folder)
        if len(train) == 0:
            raise ConfigError(f"{self.config.source}: data.path: {d.path} holds no records")
        heldout = LlavaDataset(d.heldout_path, prepared, d.image_folder, limit=d.heldout_samples) \
            if d.heldout_path and d.heldout_samples else None
        return self._with_text(train, prepared), heldout

    def _with_text(self, train: Dataset, prepared: Any) -> Dataset:
        """The training set with `data.text_ratio` of its items text-only conversations from `data.text_path`."""
        from mllm.data import LlavaDataset, MixedConversations

        d = self.data
        if d.text_ratio == 0:
            return train
        text = LlavaDataset(d.text_path, prepared)
        if any(record.get("image") is not None for record in text.records):
            raise ConfigError(f"{self.config.source}: data.text_path: {d.text_path} has records with an image; "
                              f"expected text-only conversations")
        try:
            return MixedConversations(train, text, d.text_ratio, d.seed)
        except ConfigError as exc:
            raise ConfigError(f"{self.config.source}: data.{exc}") from None

    def collate(self, items: list[Any]) -> Any:
        from mllm.data import collate

        return collate(items, self.chat_format.pad_id)

    def batch_count(self, batch: Any) -> int:
        return int(batch["input_ids"].shape[0])

    def item_length(self, item: Any) -> int:
        return len(item["input_ids"])

    @property
    def num_workers(self) -> int:
        return self.data.num_workers

    # ---------------------------------------------------------------------------------------- evaluation, export
    @torch.no_grad()
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        total = torch.zeros(2, dtype=torch.float64)
        for batch, weight in heldout_batches(ctx.heldout, self.data.heldout_samples, ctx.batch_size, ctx.dist,
                                             ctx.collate):
            out = ctx.forward(batch)
            n = out["metrics"]["label_tokens"].double().cpu() * float(weight.mean())
            total += torch.stack([out["loss"].double().cpu() * n, n])
        total = all_reduce_sum(total.to(ctx.dist.device)).cpu()
        metrics = {"heldout_loss": float(total[0] / total[1])} if total[1] > 0 else {}
        if self.eval_options.questions:
            with ctx.gathered():
                metrics.update(self._answer_questions(ctx))
        return metrics

    def _answer_questions(self, ctx: EvalContext) -> dict[str, float]:
        """Exact-match accuracy of greedy answers to held-out ShapeWorld questions, overall and per type (this rank
        answers its share; counts are summed over the ranks)."""
        from mllm.data import exact_match, shapeworld_questions

        questions = shapeworld_questions("heldout", self.eval_options.questions, self.data.seed)
        types = sorted({q["type"] for q in questions})
        counts = torch.zeros(2 * len(types), dtype=torch.float64)
        mine = questions[ctx.dist.rank::ctx.dist.world_size]
        model = ctx.module
        for start in range(0, len(mine), ctx.batch_size):
            chunk = mine[start:start + ctx.batch_size]
            answers = model.generate([([q["image"]], "<image>\n" + q["question"]) for q in chunk],
                                     max_new_tokens=self.eval_options.max_new_tokens)
            for q, a in zip(chunk, answers):
                k = types.index(q["type"])
                counts[2 * k] += float(exact_match(a, q["answer"]))
                counts[2 * k + 1] += 1
        counts = all_reduce_sum(counts.to(ctx.dist.device)).cpu()
        out = {f"heldout_exact_{t.replace('/', '_')}": float(counts[2 * k] / counts[2 * k + 1].clamp_min(1))
               for k, t in enumerate(types)}
        out["heldout_exact"] = float(counts[0::2].sum() / counts[1::2].sum().clamp_min(1))
        return out

    def export_key(self, name: str) -> bool:
        from mllm.model import select_adapter_state

        return name == self._embed_key or bool(select_adapter_state(self.mllm_config, {name: torch.empty(0)}))

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None,
               metrics: dict[str, float]) -> Path:
        from mllm.llm import base_record
        from mllm.model import encoder_probe, select_adapter_state, write_folder

        config = self.mllm_config
        base = base_record(config.llm, self._llm_config, state_dict[self._embed_key])
        record = self._encoder_probe
        if config.vision.trainable:
            holder = _StateHolder({k.removeprefix("encoder."): v for k, v in state_dict.items()
                                   if k.startswith("encoder.")})
            record = encoder_probe(holder)
        encoder_path = _relative_to(config.vision.tokenizer, out_dir)
        return write_folder(out_dir, config, select_adapter_state(config, state_dict), base, record, dtype,
                            overwrite=True, metrics=metrics, encoder_path=encoder_path,
                            llm_config=self._llm_config, tokenizer=self.chat_format.tokenizer)


class _StateHolder(nn.Module):
    """A state dict seen as a module (for `encoder_probe`)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self._state


def _plain_llm_name(name: str) -> str:
    """`llm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` (peft) ->
    `model.layers.0.self_attn.q_proj.weight` (the causal LM's own name)."""
    name = name.removeprefix("llm.").removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _looks_like_hub_id(text: str) -> bool:
    from uniflow.hub import REPO_ID

    return bool(REPO_ID.match(text))


def _relative_to(path: str, out_dir: Path) -> str:
    """A local encoder folder as a path relative to the export folder (an inference folder is loaded relative to
    itself first), so a bundle that moves as a whole keeps working; hub ids stay as they are."""
    p = Path(path)
    if not p.exists():
        return path
    return os.path.relpath(p.resolve(), out_dir.resolve())

