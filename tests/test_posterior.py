import numpy as np
import pytest
import torch

from napari_tbsn import Denoiser
from napari_tbsn.posterior import NoiseTerms, posterior_estimate

from .conftest import noisy_image


def test_posterior_beats_the_prior_and_its_error_estimate_is_unbiased():
    """A prior with known error, a known noise model: the posterior mean has a lower error than
    the prior mean, and the squared-error estimate, made without the clean values, matches."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(1, 1, 256, 256, generator=generator)
    noise = NoiseTerms.of(np.array([0.02]), np.array([0.01]), np.array([1e-6]), torch.device("cpu"))
    prior_error = 0.004 * (1 + clean)  # varies over the image, as a real prior's does
    mean = clean + prior_error.sqrt() * torch.randn(clean.shape, generator=generator)
    noisy = clean + noise.variance(clean).sqrt() * torch.randn(clean.shape, generator=generator)
    estimate = posterior_estimate(mean, prior_error, noisy, noise)
    true_error = torch.mean((estimate.value - clean) ** 2)
    assert true_error < 0.8 * torch.mean((mean - clean) ** 2)
    assert float(estimate.squared_error.mean()) == pytest.approx(float(true_error), rel=0.1)
    assert float(estimate.variance.mean()) == pytest.approx(float(true_error), rel=0.1)


def test_denoiser_posterior_uncertainty_and_quality_estimate(device):
    clean, noisy = noisy_image((128, 128), seed=4)
    denoiser = Denoiser(preset="tiny", device=device).fit(noisy, "YX", iterations=60)
    assert denoiser.uses_posterior and denoiser.pd == 1
    assert denoiser.noise_model.gain[0] == pytest.approx(1.0, rel=0.3)
    uncertainty = np.empty_like(noisy)
    posterior = denoiser.predict(noisy, "YX", uncertainty=uncertainty)
    assert np.all(uncertainty > 0) and np.all(uncertainty < noisy.std())
    quality = denoiser.quality
    true_mse = float(np.mean((posterior - clean) ** 2))
    assert quality is not None and quality.mse == pytest.approx(true_mse, rel=0.5)
    plain = denoiser.predict(noisy, "YX", estimator="blind_spot")
    assert not np.allclose(plain, posterior)
    with pytest.raises(ValueError, match="posterior"):
        denoiser.predict(noisy, "YX", uncertainty=uncertainty, estimator="blind_spot")


def test_correlated_noise_gets_pixel_shuffle_and_no_posterior(recwarn, device):
    from scipy.ndimage import convolve

    rng = np.random.default_rng(0)
    clean, _ = noisy_image((256, 256), seed=5)
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], float)
    noisy = (clean + 2 * convolve(rng.normal(0, 1, clean.shape), kernel / np.sqrt((kernel**2).sum()))).astype(
        np.float32
    )
    auto = Denoiser(preset="tiny", device=device, refine=2).fit(noisy, "YX", iterations=3)
    assert auto.pd >= 2 and not auto.uses_posterior
    assert auto.predict(noisy, "YX").shape == noisy.shape and auto.quality is None
    with pytest.warns(UserWarning, match="copy correlated noise"):
        Denoiser(preset="tiny", device=device, pd=1).fit(noisy, "YX", iterations=1)


def test_context_planes_fit_predict_and_need_a_stack(tmp_path, device):
    _, noisy = noisy_image((5, 64, 64), seed=6)
    denoiser = Denoiser(preset="tiny", device=device, context=1).fit(noisy, "ZYX", iterations=3)
    assert denoiser.context_planes == 1
    assert denoiser.network.config.context_channels == 2
    reloaded = Denoiser.load(denoiser.save(tmp_path / "context.safetensors"), device=device)
    np.testing.assert_allclose(reloaded.predict(noisy, "ZYX"), denoiser.predict(noisy, "ZYX"), atol=1e-5)
    with pytest.raises(ValueError, match="Z or T"):
        denoiser.predict(noisy[0], "YX")
    with pytest.raises(ValueError, match="Z or T"):
        Denoiser(preset="tiny", device=device, context=1).fit(noisy[0], "YX", iterations=1)
    # The default, "auto": one neighbour each side for Z-stacks, none for time series and planes.
    assert Denoiser(preset="tiny", device=device).fit(noisy, "ZYX", iterations=1).context_planes == 1
    assert Denoiser(preset="tiny", device=device).fit(noisy, "TYX", iterations=1).context_planes == 0
    assert Denoiser(preset="tiny", device=device).fit(noisy[0], "YX", iterations=1).context_planes == 0


def test_auto_ensemble_averages_eight_views_for_small_inputs_and_correlated_noise():
    from napari_tbsn import FittedModel
    from napari_tbsn.network import TBSN
    from napari_tbsn.normalization import Normalizer
    from napari_tbsn.config import PredictOptions
    from napari_tbsn.prediction import AUTO_ENSEMBLE_PIXELS, ensemble_size

    def denoiser_with_pd(pd):
        return Denoiser.from_model(FittedModel(TBSN.from_preset("tiny"), Normalizer((0.0,), (1.0,)), pd, "tiny"))

    denoiser = denoiser_with_pd(1)
    assert denoiser.ensemble == "auto"
    assert denoiser.ensemble_size((512, 512)) == 8
    assert denoiser.ensemble_size((4, 512, 512)) == 1
    assert denoiser.ensemble_size((AUTO_ENSEMBLE_PIXELS + 1,)) == 1
    # Correlated noise: the x8 ensemble at any size, unless R3 (which averages its own passes) is asked for.
    assert denoiser_with_pd(2).ensemble_size((4, 1024, 1024)) == 8
    assert ensemble_size(2, PredictOptions(refine=2), (64, 64)) == 1
    assert denoiser.ensemble_size((64, 64), ensemble=1) == 1


def test_a_model_saved_with_r3_keeps_it_and_one_view(tmp_path, device):
    """Models saved before R3 went off by default carry refine 8: loaded, they predict as before."""
    _, noisy = noisy_image((128, 128), seed=21)
    path = Denoiser(preset="tiny", device=device, pd=2, refine=8).fit(noisy, "YX", iterations=1).save(tmp_path / "m")
    loaded = Denoiser.load(path, device=device)
    assert loaded.refine == 8 and loaded.ensemble_size((64, 64)) == 1
    assert Denoiser(preset="tiny", device=device, pd=2).refine == 0
