"""FID/KID arithmetic against direct NumPy/SciPy computations; the Inception extractor's weight layout."""

import numpy as np
import pytest
import torch
from scipy import linalg

from latentforge.errors import UserError
from latentforge.metrics import fid as fidmod
from latentforge.metrics import inception


def _features(seed, n=64, d=8, shift=0.0):
    """n samples of one correlated Gaussian (mixing matrix fixed per d), shifted by `shift`."""
    a = np.random.default_rng(d).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ a + shift


def test_fid_matches_direct_scipy():
    x, y = _features(1), _features(2, shift=0.5)
    mu1, s1 = x.mean(0), np.cov(x.T)
    mu2, s2 = y.mean(0), np.cov(y.T)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fidmod.fid_score(x, y) == pytest.approx(direct, rel=1e-9)
    assert fidmod.fid_score(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_form_diagonal():
    # Diagonal covariances: (Σ₁Σ₂)^{1/2} = diag(√(σ₁σ₂)), so d² = |Δμ|² + Σ(√σ₁ − √σ₂)².
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert fidmod.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_fid_singular_covariance_is_finite():
    x, y = _features(3, n=5, d=16), _features(4, n=5, d=16)  # rank-deficient covariances
    assert np.isfinite(fidmod.fid_score(x, y))


def test_mmd2_unbiased_matches_double_loop():
    x, y = _features(5, n=7, d=4), _features(6, n=9, d=4, shift=0.3)
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert fidmod.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_kid_subsets_mean_and_std():
    x, y = _features(7, n=40), _features(8, n=30, shift=1.0)
    mean, std = fidmod.kid_score(x, y, subsets=5, subset_size=20, seed=3)
    rng = np.random.default_rng(3)
    vals = [fidmod.mmd2_unbiased(x[rng.choice(40, 20, replace=False)], y[rng.choice(30, 20, replace=False)])
            for _ in range(5)]
    assert (mean, std) == pytest.approx((np.mean(vals), np.std(vals)))
    assert mean > 0  # the shifted set is measurably different
    # Two samples of one distribution: the unbiased estimate is near 0, far below the shifted pair's.
    same_mean, _ = fidmod.kid_score(x, _features(9, n=40), subsets=5, subset_size=40)
    assert abs(same_mean) < 0.1 * mean


# Key names of pytorch-fid's pt_inception-2015-12-05-6726825d.pth, written out from torchvision's
# Inception3 definition (aux_logits=False, num_classes=1008) plus pytorch-fid's FIDInception{A,C,E}.
_A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"]
_B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"] + [f"branch7x7dbl_{i}" for i in range(1, 6)] + ["branch_pool"]
_D = ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)]
_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
_CONVS = (["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
          + [f"{m}.{b}" for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d") for b in _A]
          + [f"Mixed_6a.{b}" for b in _B]
          + [f"{m}.{b}" for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e") for b in _C]
          + [f"Mixed_7a.{b}" for b in _D]
          + [f"{m}.{b}" for m in ("Mixed_7b", "Mixed_7c") for b in _E])
PYTORCH_FID_KEYS = sorted(
    [f"{c}.conv.weight" for c in _CONVS]
    + [f"{c}.bn.{p}" for c in _CONVS for p in ("weight", "bias", "running_mean", "running_var")]
    + ["fc.weight", "fc.bias"]
)


@pytest.fixture(scope="module")
def random_inception():
    torch.manual_seed(0)
    return inception.FIDInceptionV3().eval()


def test_extractor_has_pytorch_fid_layout(random_inception):
    sd = random_inception.state_dict()
    keys = sorted(k for k in sd if not k.endswith("num_batches_tracked"))
    assert keys == PYTORCH_FID_KEYS
    assert sd["Mixed_5b.branch1x1.conv.weight"].shape == (64, 192, 1, 1)
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert sd["fc.weight"].shape == (1008, 2048)
    # torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, with the aux head
    # of 3,326,696); without the aux head and with 1008 classes: 27,161,264 − 3,326,696 + 8·2049.
    assert sum(p.numel() for p in random_inception.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049


def test_extractor_loads_pth_and_safetensors(random_inception, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    # The original .pth predates BatchNorm's num_batches_tracked buffer: save without it.
    sd = {k: v.clone() for k, v in random_inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / inception.WEIGHTS_NAME)
    save_file(sd, str(tmp_path / "inception.safetensors"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    want = random_inception(images)
    assert want.shape == (2, 2048)
    loaded = inception.load_inception(tmp_path / inception.WEIGHTS_NAME)
    torch.testing.assert_close(loaded(images), want, rtol=0, atol=0)
    monkeypatch.setenv(inception.ENV_VAR, str(tmp_path / "inception.safetensors"))
    torch.testing.assert_close(inception.load_inception(None)(images), want, rtol=0, atol=0)


def test_extractor_rejects_wrong_keys_and_shapes(random_inception, tmp_path):
    sd = random_inception.state_dict()
    bad = {k: v for k, v in sd.items() if k != "Mixed_6e.branch_pool.conv.weight"}
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="missing key Mixed_6e.branch_pool.conv.weight"):
        inception.load_inception(tmp_path / "missing.pth")
    wrong = dict(sd, **{"fc.weight": torch.zeros(1000, 2048)})
    torch.save(wrong, tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"fc.weight has shape \(1000, 2048\)"):
        inception.load_inception(tmp_path / "shape.pth")


def test_missing_weights_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    with pytest.raises(UserError) as e:
        inception.load_inception(None)
    msg = str(e.value)
    assert "\n" not in msg
    for needed in ("--inception-weights", inception.ENV_VAR, inception.WEIGHTS_NAME):
        assert needed in msg
    with pytest.raises(UserError, match="does not exist"):
        inception.load_inception(tmp_path / "nope.pth")
