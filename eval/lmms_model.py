"""The project's MLLM (`mllm.UniFlowChat`) as an `lmms-eval` model, so that lmms-eval's tasks score it with their
official scorers (`uniflow eval vqa`, `eval/vqa.py`).

    python -m lmms_eval --model uniflow --model_args pretrained=checkpoints/shapeworld/mllm --tasks pope

(`--model uniflow` resolves through the `lmms_eval.models` entry point in pyproject.toml once the project is
installed; `register()` adds it by hand, which `uniflow eval vqa` does. With filelock 4 that command line fails inside
lmms-eval 0.7.3 before evaluating; `uniflow eval vqa` works around it: eval/vqa.py, `_skip_filelock_patch`.)

- `generate_until`: requests are grouped by task and generation settings and answered `batch_size` at a time with
  `UniFlowChat.generate` (left-padded, greedy: batched answers equal one-by-one answers, tests/test_mllm.py). The chat
  template is UniFlowChat's own; a task's text gets one `<image>` placeholder per image in front unless it already
  holds exactly that many. Greedy always: a task asking for sampling or beams is answered greedily, with a warning.
  The reply is cut at the first of the task's `until` strings, as lmms-eval's own models do.
- `loglikelihood`: log p(continuation | prompt) summed over the continuation's tokens, whose prompt is the chat prompt
  with the generation prompt (the continuation is what the assistant would say), batched with right padding.
- `generate_until_multi_round` (multi-round tasks) is not supported and says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model

from mllm.model import MAX_NEW_TOKENS
from uniflow.errors import ConfigError, ImageInputError

MODEL_NAME = "uniflow"
CLASS_PATH = "eval.lmms_model.UniFlowLMMS"
DEFAULT_MAX_NEW_TOKENS = 128


def manifest() -> Any:
    """The lmms-eval model manifest (the `lmms_eval.models` entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make `uniflow` a model name lmms-eval resolves (`lmms_eval.models.get_model`), without the entry point."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """The reply up to the first occurrence of any stop string (lmms-eval's `until`)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def with_placeholders(context: str, num_images: int, source: str) -> str:
    """The user turn: one `<image>` placeholder per image before the text, unless the text already holds them all."""
    from mllm.prompting import IMAGE_PLACEHOLDER

    found = context.count(IMAGE_PLACEHOLDER)
    if found == num_images:
        return context
    if found:
        raise ConfigError(f"{source}: the prompt holds {found} {IMAGE_PLACEHOLDER} placeholder(s) but the task gives "
                          f"{num_images} image(s)")
    return IMAGE_PLACEHOLDER * num_images + "\n" + context


@register_model(MODEL_NAME)
class UniFlowLMMS(lmms):
    """UniFlowChat behind lmms-eval's `lmms` interface. pretrained: an MLLM folder (`UniFlowChat.from_pretrained`);
    or model: an already loaded UniFlowChat (the folder is then only recorded)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, batch_size: int | str = 1, device: str | None = None,
                 dtype: str | None = None, model: Any = None, progress: bool = True, **unused: Any) -> None:
        super().__init__()
        unused.pop("max_batch_size", None)  # lmms-eval passes it to every model; batches here are fixed
        if unused:
            raise ConfigError(f"model_args: unknown option(s) {sorted(unused)}; expected pretrained, batch_size, "
                              f"device, dtype")
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}") from None
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if model is None:
            if pretrained is None:
                raise ConfigError("model_args: pretrained=DIR (an MLLM folder) is required")
            from mllm.model import UniFlowChat

            torch_dtype = None
            if dtype not in (None, "", "auto"):
                torch_dtype = getattr(torch, str(dtype), None)
                if not isinstance(torch_dtype, torch.dtype):
                    raise ConfigError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
            model = UniFlowChat.from_pretrained(pretrained, device=device or "cpu", dtype=torch_dtype)
        self.model = model
        self.pretrained = pretrained
        self.progress = progress
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------ requests
    def _images(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        for v in visuals:
            if isinstance(v, (str, dict)) or not hasattr(v, "size"):
                raise ImageInputError(f"{task} doc {doc_id}: a {type(v).__name__} visual input (video or audio); "
                                      f"UniFlowChat reads images only")
        return visuals

    def _conversation(self, context: str, doc_to_visual: Any, doc_id: int, task: str, split: str
                      ) -> tuple[list[Any], list[dict[str, str]]]:
        images = self._images(doc_to_visual, doc_id, task, split)
        text = with_placeholders(context, len(images), f"{task} doc {doc_id}") if images else context
        return images, [{"role": "user", "content": text}]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            from loguru import logger

            logger.warning(message)

    def _bar(self, total: int, desc: str) -> Any:
        import sys

        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, disable=not self.progress)

    # ------------------------------------------------------------------------------------------------ lmms API
    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, `batch_size` prompts at a time, grouped by task and generation settings."""
        groups: dict[tuple[str, str, str], list[int]] = {}
        for i, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            key = (task, split, json.dumps(gen_kwargs, sort_keys=True, default=str))
            groups.setdefault(key, []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = self._bar(len(requests), "answering")
        for (task, _, _), indices in groups.items():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            # UniFlowChat's limit (4096) caps a task's larger budget; the LLM's context caps it further.
            max_new_tokens = min(int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), MAX_NEW_TOKENS)
            if float(gen_kwargs.get("temperature") or 0) > 0 or gen_kwargs.get("do_sample") or \
                    int(gen_kwargs.get("num_beams") or 1) > 1:
                self._warn_once(task, f"{task}: asks for sampling or beam search ({gen_kwargs}); UniFlowChat answers "
                                      f"greedily")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                conversations = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task_i, split_i = requests[i].args
                    conversations.append(self._conversation(context, doc_to_visual, doc_id, task_i, split_i))
                answers = self.model.generate(conversations, max_new_tokens=max_new_tokens)
                for i, answer in zip(chunk, answers):
                    answer = cut_at_stops(answer, until)
                    out[i] = answer
                    self.cache_hook.add_partial("generate_until", requests[i].args, answer)
                bar.update(len(chunk))
        bar.close()
        return [a if a is not None else "" for a in out]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log p(continuation | prompt), whether greedy decoding would produce the continuation) per request."""
        model = self.model
        out: list[tuple[float, bool]] = []
        bar = self._bar(len(requests), "log-likelihoods")
        for start in range(0, len(requests), self.batch_size):
            rows, pixels, spans = [], [], []
            for request in requests[start:start + self.batch_size]:
                context, target, doc_to_visual, doc_id, task, split = request.args
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                images, messages = self._conversation(context, doc_to_visual, doc_id, task, split)
                encoded, pix = model.encode_prompt(images, messages, source=f"{task} doc {doc_id}")
                cont = model.tokenizer.encode(str(continuation), add_special_tokens=False)
                ids = encoded.ids + cont
                if model.context is not None and len(ids) > model.context:
                    raise ConfigError(f"{task} doc {doc_id}: prompt and continuation are {len(ids)} tokens, the "
                                      f"LLM's context is {model.context}")
                rows.append(ids)
                spans.append((len(encoded.ids), cont))
                if pix is not None:
                    pixels.append(pix)
            longest = max(len(r) for r in rows)
            ids = torch.full((len(rows), longest), model.format.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for k, r in enumerate(rows):  # right padding: positions 0..n-1 of each row are its own
                ids[k, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[k, :len(r)] = 1
            device = model.device
            with model._autocast():
                embeds = model.embed(ids.to(device), torch.cat(pixels) if pixels else None)
                logits = model.causal_lm(inputs_embeds=embeds, attention_mask=mask.to(device), use_cache=False).logits
            logits = logits.float()
            for k, (p, cont) in enumerate(spans):
                if not cont:
                    out.append((0.0, True))
                    continue
                pred = logits[k, p - 1:p - 1 + len(cont)]
                target = torch.tensor(cont, device=pred.device)
                logp = F.log_softmax(pred, dim=-1).gather(-1, target[:, None]).sum().item()
                out.append((float(logp) if math.isfinite(logp) else float("-inf"),
                            bool((pred.argmax(-1) == target).all())))
            bar.update(len(rows))
        bar.close()
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the uniflow model does not support multi-round tasks (output_type "
                                  "generate_until_multi_round); use single-round benchmarks")
