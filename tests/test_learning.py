"""The tokenizer learns: a small `tiny`-style model, fixed seed, 64 ShapeWorld images, a few hundred steps."""

import pytest
import torch

from tests.helpers import tiny_tokenizer_config
from uniflow import UniFlowTokenizer
from uniflow.data.shapeworld import ShapeWorldDataset
from uniflow.distill import FrozenTeacher
from uniflow.flow import FlowConfig
from uniflow.metrics import psnr

STEPS = 250


@pytest.mark.slow
def test_flow_loss_falls_and_psnr_rises():
    torch.manual_seed(0)
    config = tiny_tokenizer_config(width=64, depth=2, image_size=32, patch=8, global_depth=1,
                                   head_width=128, head_depth=2)
    config.flow = FlowConfig(logit_normal_prob=0.0)  # uniform times: the 1-step decoder sees t = 0 often enough
    model = UniFlowTokenizer(config)
    teacher = FrozenTeacher(model.encoder)
    data = ShapeWorldDataset("train", 64, seed=0, image_size=32)
    images = torch.stack([data[i]["image"] for i in range(64)])

    model.eval()
    psnr_before = psnr(model.reconstruct(images, seed=0), images).mean().item()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 20)
        batch = images[torch.randint(0, 64, (32,))]
        pixels = model.encoder.normalize(batch)
        out = model.loss(pixels, teacher(pixels))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(out.flow.item())
    model.eval()
    psnr_after = psnr(model.reconstruct(images, seed=0), images).mean().item()
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"flow loss {first:.3f} -> {last:.3f}; 1-step PSNR {psnr_before:.2f} -> {psnr_after:.2f} dB")
    assert last < 0.7 * first
    assert psnr_after > psnr_before + 3.0
