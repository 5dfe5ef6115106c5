import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_tokenizer_config
from uniflow import UniFlowTokenizer
from uniflow.decoder import patchify, unpatchify
from uniflow.distill import FrozenTeacher
from uniflow.errors import CheckpointError, ConfigError, ImageInputError
from uniflow.tokenizer import TokenizerConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UniFlowTokenizer(tiny_tokenizer_config()).eval()
    for p in m.decoder.flow_head.parameters():  # leave zero-init so outputs depend on the input
        torch.nn.init.normal_(p, std=0.05)
    return m


def test_patchify_roundtrip_channel_major():
    x = torch.randn(2, 3, 16, 24)
    p = patchify(x, 8)
    assert p.shape == (2, 6, 192)
    assert torch.equal(p[0, 1, :64], x[0, 0, :8, 8:16].reshape(-1))  # channel 0 of patch (0, 1) first
    assert torch.equal(unpatchify(p, 8, (2, 3)), x)


def test_encode_decode_shapes_and_types(model):
    imgs = torch.rand(2, 3, 32, 32)
    enc = model.encode(imgs)
    assert enc.latents.shape == (2, 16, 16) and enc.semantic_tokens.shape == (2, 16, 48) and enc.grid == (4, 4)
    out = model.decode(enc.latents, seed=0)
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    pil = model.reconstruct(Image.new("RGB", (32, 32), (200, 10, 10)))
    assert isinstance(pil, list) and pil[0].size == (32, 32)
    u8 = model.reconstruct(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    assert u8.dtype == torch.float32 and u8.shape == (1, 3, 32, 32)
    heun = model.decode(enc.latents, steps=4, sampler="heun", seed=0)
    assert heun.shape == out.shape


def test_non_native_size_decodes(model):
    out = model.reconstruct(torch.rand(1, 3, 48, 24))
    assert out.shape == (1, 3, 48, 24)
    enc = model.encode(torch.rand(1, 3, 48, 24))
    with pytest.raises(ImageInputError, match="square"):
        model.decode(enc.latents)


def test_loss_terms_and_gradients(model):
    teacher = FrozenTeacher(model.encoder)
    model.train()
    teacher.train()
    assert not teacher.training  # the teacher stays in eval mode
    pixels = model.prepare(torch.rand(2, 3, 32, 32))
    out = model.loss(pixels, teacher(pixels))
    assert out.alpha.shape == (2,) and out.weights.shape == (2,)
    assert abs(out.distill.item()) < 1e-5  # student == teacher at the start
    assert torch.allclose(out.loss, out.flow + out.distill)
    out.loss.backward()
    assert model.encoder.model.patch_embed.proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    metrics = out.metrics()
    assert {"loss", "flow", "distill", "alpha_1", "w_2"} <= set(metrics)
    with pytest.raises(ConfigError, match="teacher_states"):
        model.loss(pixels)
    model.zero_grad()
    model.eval()


def test_save_load_bit_identical(model, tmp_path):
    model.save_pretrained(tmp_path / "tok")
    loaded = UniFlowTokenizer.from_pretrained(tmp_path / "tok")
    imgs = torch.rand(2, 3, 32, 32)
    a = model.reconstruct(imgs, seed=3)
    b = loaded.reconstruct(imgs, seed=3)
    assert torch.equal(a, b)
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "tok" / "model.safetensors")).keys()
    assert not any(k.startswith("teacher.") for k in keys)


def test_fp16_save(model, tmp_path):
    model.save_pretrained(tmp_path / "tok16", dtype=torch.float16)
    loaded = UniFlowTokenizer.from_pretrained(tmp_path / "tok16")
    imgs = torch.rand(1, 3, 32, 32)
    assert (model.reconstruct(imgs, seed=1) - loaded.reconstruct(imgs, seed=1)).abs().max() < 0.02


# ---------------------------------------------------------------- bad input

def test_size_not_divisible_by_patch(model):
    with pytest.raises(ImageInputError, match="not divisible by the patch size 8"):
        model.encode(torch.rand(1, 3, 30, 32))
    enc = model.encode(torch.rand(1, 3, 30, 50), resize=True)  # resized to the native 32
    assert enc.grid == (4, 4)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_grey_rgba_palette_converted(model, mode):
    img = Image.new("RGB", (32, 32), (10, 120, 240)).convert(mode)
    out = model.reconstruct(img)
    assert out[0].mode == "RGB"


def test_tiny_image_and_bad_tensors(model):
    with pytest.raises(ImageInputError, match="too small"):
        model.encode(Image.new("RGB", (1, 1)))
    with pytest.raises(ImageInputError, match=r"\[0, 1\]"):
        model.encode(torch.full((1, 3, 32, 32), 7.0))
    with pytest.raises(ImageInputError, match="channels"):
        model.encode(torch.rand(1, 5, 32, 32))
    with pytest.raises(ImageInputError, match=r"latents: expected shape \(B, N, 16\)"):
        model.decode(torch.rand(1, 16, 3))


def test_corrupt_image_file(tmp_path):
    from uniflow.images import load_image

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ImageInputError, match="bad.png"):
        load_image(bad)
    with pytest.raises(ImageInputError, match="not found"):
        load_image(tmp_path / "missing.png")
    ok = tmp_path / "grey.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(ok)
    assert load_image(ok).mode == "RGB"


def test_checkpoint_missing_or_truncated(model, tmp_path):
    folder = model.save_pretrained(tmp_path / "tok")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        UniFlowTokenizer.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        UniFlowTokenizer.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not found"):
        UniFlowTokenizer.from_pretrained(tmp_path / "nowhere")


def test_checkpoint_with_missing_keys(model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = model.save_pretrained(tmp_path / "tok")
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("decoder.flow_head.final.linear.weight")
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: decoder.flow_head.final.linear.weight"):
        UniFlowTokenizer.from_pretrained(folder)


def test_config_with_unknown_fields():
    data = tiny_tokenizer_config().to_dict()
    data["decoder"]["head_widht"] = 3
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['head_widht'\].*DecoderConfig"):
        TokenizerConfig.from_dict(data)
    data = tiny_tokenizer_config().to_dict()
    data["model_kind"] = "uniflow-generator"
    with pytest.raises(ConfigError, match="model_kind"):
        TokenizerConfig.from_dict(data)
    data = tiny_tokenizer_config().to_dict()
    data["distill"]["weighting"] = "softmax"
    with pytest.raises(ConfigError, match="weighting"):
        TokenizerConfig.from_dict(data)
