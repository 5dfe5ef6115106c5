import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from uniflow.metrics import psnr, ssim


def test_psnr_and_ssim_match_scikit_image():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 32, 40))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ours_p = psnr(torch.tensor(b), torch.tensor(a))
    ours_s = ssim(torch.tensor(b), torch.tensor(a))
    for i in range(2):
        ref_p = peak_signal_noise_ratio(a[i], b[i], data_range=1.0)
        ref_s = structural_similarity(a[i], b[i], data_range=1.0, channel_axis=0, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False)
        assert abs(ours_p[i].item() - ref_p) < 1e-3
        assert abs(ours_s[i].item() - ref_s) < 1e-4


def test_identical_images():
    x = torch.rand(1, 3, 16, 16)
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(1))


def test_patch_seam_ratio_sees_errors_at_patch_borders():
    from uniflow.metrics import patch_seam_ratio

    target = torch.zeros(2, 3, 16, 16)
    uniform = torch.full_like(target, 0.1)
    assert abs(patch_seam_ratio(uniform, target, 8) - 1.0) < 1e-9
    seams = uniform.clone()
    seams[..., 7:9, :] = 0.3  # the rows either side of the border between the two patch rows
    assert patch_seam_ratio(seams, target, 8) > 2.0
    interior = uniform.clone()
    interior[..., 3:5, 3:5] = 0.3
    assert patch_seam_ratio(interior, target, 8) < 1.0


def test_patch_edge_ratio_sees_a_mosaic_and_not_a_uniform_blur():
    import pytest

    from uniflow.data.dead_leaves import render_dead_leaves
    from uniflow.metrics import patch_edge_ratio

    target = torch.stack([render_dead_leaves(0, i) for i in range(4)])
    assert abs(patch_edge_ratio(target, target, 8) - 1.0) < 1e-9
    # each 8x8 patch returned as its own mean colour: the "smooth blob" mosaic of a decoder without texture
    mosaic = torch.nn.functional.avg_pool2d(target, 8).repeat_interleave(8, -1).repeat_interleave(8, -2)
    assert patch_edge_ratio(mosaic, target, 8) > 3.0
    # the same blur everywhere (no grid, detail lost) stays near 1
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(target, (1, 1, 1, 1), mode="replicate"), 3, 1)
    assert 0.8 < patch_edge_ratio(blurred, target, 8) < 1.2
    with pytest.raises(ValueError, match="flat"):
        patch_edge_ratio(target, torch.full_like(target, 0.5), 8)
