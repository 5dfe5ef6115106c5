import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from eval.metrics import psnr, ssim


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
