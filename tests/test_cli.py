import json

import numpy as np
import pytest
import tifffile

from napari_tbsn.cli import main

from .conftest import noisy_image


@pytest.fixture
def noisy_tiff(tmp_path):
    _, noisy = noisy_image((2, 64, 96), seed=5)
    path = tmp_path / "noisy.tif"
    tifffile.imwrite(
        path, np.clip(noisy, 0, None).astype(np.uint16), imagej=True, resolution=(1 / 0.2, 1 / 0.2),
        metadata={"axes": "ZYX", "spacing": 0.5, "unit": "um"},
    )
    return path


def test_denoise_writes_tiff_with_axes_and_pixel_size(noisy_tiff, tmp_path):
    out = tmp_path / "clean.tif"
    model = tmp_path / "model.safetensors"
    code = main(["denoise", str(noisy_tiff), "-o", str(out), "--preset", "tiny", "--iterations", "3",
                 "--device", "cpu", "--save-model", str(model), "--quiet"])
    assert code == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].axes == "ZYX" and tif.series[0].shape == (2, 64, 96)
        assert tif.series[0].dtype == np.float32
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.5)
        assert tif.pages[0].tags["XResolution"].value == tifffile.TiffFile(noisy_tiff).pages[0].tags["XResolution"].value
    assert model.exists()


def test_fit_then_predict_to_npy_and_zarr(noisy_tiff, tmp_path):
    model = tmp_path / "model.safetensors"
    assert main(["fit", str(noisy_tiff), "-o", str(model), "--preset", "tiny", "--iterations", "2", "--quiet",
                 "--context", "0"]) == 0
    from napari_tbsn import Denoiser

    assert Denoiser.load(model, device="cpu").context_planes == 0  # each plane alone, as asked
    assert main(["predict", str(noisy_tiff), "--model", str(model), "-o", str(tmp_path / "o.npy"), "--quiet"]) == 0
    assert np.load(tmp_path / "o.npy").shape == (2, 64, 96)
    pytest.importorskip("zarr")
    assert main(["predict", str(tmp_path / "o.npy"), "--model", str(model), "--axes", "ZYX",
                 "-o", str(tmp_path / "o.zarr"), "--quiet"]) == 0
    import zarr

    stored = zarr.open(str(tmp_path / "o.zarr"), mode="r")
    assert stored.shape == (2, 64, 96) and stored.attrs["axes"] == "ZYX"


def test_bad_input_exits_non_zero_with_a_message(noisy_tiff, tmp_path, capsys):
    out = tmp_path / "never.tif"
    assert main(["denoise", str(noisy_tiff), "-o", str(out), "--axes", "ZYXQ", "--preset", "tiny", "--quiet"]) == 2
    assert "axes" in capsys.readouterr().err
    assert main(["predict", str(noisy_tiff), "--model", str(noisy_tiff), "-o", str(out), "--quiet"]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    assert main(["denoise", str(tmp_path / "missing.tif"), "-o", str(out), "--quiet"]) == 2
    assert not out.exists()


def test_failed_prediction_leaves_no_partial_output(noisy_tiff, tmp_path, monkeypatch):
    from napari_tbsn import Denoiser

    model = tmp_path / "model.safetensors"
    main(["fit", str(noisy_tiff), "-o", str(model), "--preset", "tiny", "--iterations", "1", "--quiet"])
    out = tmp_path / "clean.tif"
    out.write_bytes(b"previous result")

    def explode(self, *args, **kwargs):
        raise RuntimeError("simulated crash mid-way")

    monkeypatch.setattr(Denoiser, "predict_iter", explode)
    assert main(["predict", str(noisy_tiff), "--model", str(model), "-o", str(out), "--quiet"]) == 1  # a bug, not bad input
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_uncertainty_map_and_report(noisy_tiff, tmp_path, capsys):

    out, spread, report = tmp_path / "clean.tif", tmp_path / "sd.tif", tmp_path / "report.json"
    code = main(["denoise", str(noisy_tiff), "-o", str(out), "--preset", "tiny", "--iterations", "3",
                 "--device", "cpu", "--uncertainty", str(spread), "--report", str(report)])
    assert code == 0
    assert tifffile.imread(spread).shape == (2, 64, 96) and tifffile.imread(spread).min() > 0
    written = json.loads(report.read_text())
    assert written["pd"] == 1 and written["estimator"] == "posterior" and written["context_planes"] == 1
    assert written["noise_model"]["gain"][0] > 0 and written["quality_estimate"]["psnr"] > 0
    assert len(written["lattice_filter"]["coefficients"][0]) == 10
    log = capsys.readouterr().err
    assert "noise model" in log and "estimated PSNR" in log and "context: 1 neighbouring plane" in log


def test_bad_pd_is_refused(noisy_tiff, tmp_path):
    with pytest.raises(SystemExit):
        main(["denoise", str(noisy_tiff), "-o", str(tmp_path / "o.tif"), "--pd", "lots"])


def test_calibrated_noise_model_replaces_the_estimate(noisy_tiff, tmp_path, capsys):
    out, report, model = tmp_path / "clean.tif", tmp_path / "report.json", tmp_path / "model.safetensors"
    # Photons with read noise 1 (variance ~ signal + 1) told 1.5 * signal + 2.5: the measured
    # noise is under half the given model's, which the fit says.
    with pytest.warns(UserWarning, match="check the gain, read noise and baseline"):
        assert main(["denoise", str(noisy_tiff), "-o", str(out), "--preset", "tiny", "--iterations", "2",
                     "--device", "cpu", "--gain", "1.5", "--read-noise", "2", "--baseline", "1",
                     "--report", str(report), "--save-model", str(model)]) == 0
    assert "variance = 1.5 * signal + 2.5 (given)" in capsys.readouterr().err
    written = json.loads(report.read_text())
    noise = written["noise_model"]
    assert noise["given"] and noise["gain"] == [1.5] and noise["offset"] == [2.5]
    measured = written["noise_measurement"]
    assert len(measured["signal"][0]) == len(measured["variance"][0]) == 32
    from napari_tbsn import Denoiser

    loaded = Denoiser.load(model, device="cpu")
    assert loaded.given_noise_model == loaded.noise_model  # fine-tuning keeps the calibration
    assert main(["denoise", str(noisy_tiff), "-o", str(tmp_path / "x.tif"), "--preset", "tiny",
                 "--gain", "1.5", "--quiet"]) == 2
    assert "needs both --gain and --read-noise" in capsys.readouterr().err


@pytest.mark.parametrize("processes", [2, 1])  # one: a group of one, the path a 1-GPU machine runs
def test_torchrun_fits_with_ddp_and_rank_zero_writes_a_model_that_predicts(tmp_path, processes):
    import os
    import subprocess
    import sys

    import tifffile

    from napari_tbsn import Denoiser

    _, noisy = noisy_image((4, 96, 96), seed=21)
    tifffile.imwrite(tmp_path / "in.tif", noisy, metadata={"axes": "ZYX"})
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "napari_tbsn", "fit", str(tmp_path / "in.tif"), "-o", str(tmp_path / "model.safetensors"),
               "--preset", "tiny", "--iterations", "6", "--device", "cpu"]
    command[command.index("--nproc-per-node") + 1] = str(processes)
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"fitting on {processes} process(es) with DistributedDataParallel" in finished.stderr
    denoiser = Denoiser.load(tmp_path / "model.safetensors", device="cpu")
    assert (denoiser.summary.processes, denoiser.summary.iterations) == (processes, 6)
    assert denoiser.model.variance_head_fitted and denoiser.model.lattice_filter is not None  # rank 0's closing fits
    out = denoiser.predict(noisy, "ZYX")
    assert out.shape == noisy.shape and np.all(np.isfinite(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "model.safetensors"]


def test_under_torchrun_sigterm_is_a_ctrl_c_and_its_echo_the_same_stop(monkeypatch):
    """torchrun forwards a stop to its ranks (SIGTERM when a scheduler terminates it; a rank may
    also get the terminal's SIGINT, moments apart): the first ends the training, its echo changes
    nothing, a later one aborts."""
    import os
    import signal
    import time

    from napari_tbsn import cli

    def deliver(number):
        os.kill(os.getpid(), number)
        time.sleep(0.05)  # Python runs the handler in the main thread, between instructions

    with cli._interrupts(processes=2) as stops:
        stops.training = True
        deliver(signal.SIGTERM)
        deliver(signal.SIGINT)
        assert stops.stop_training.is_set() and not stops.cancel.is_set()
        monkeypatch.setattr(cli, "SAME_STOP_SECONDS", 0.0)
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
    before = signal.getsignal(signal.SIGTERM)
    with cli._interrupts(processes=1):  # one process: SIGTERM stays the program's abort
        assert signal.getsignal(signal.SIGTERM) is before
    with cli._interrupts(processes=2):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before




def test_a_ctrl_c_after_the_training_it_ended_is_over_stops_what_runs_then(monkeypatch):
    """One Ctrl-C handler spans a whole job (fit, then every file): the Ctrl-C that ended the
    training is spent when the training is over, so the next one cancels gracefully (finished
    outputs kept), and only a third aborts."""
    import os
    import signal
    import time

    from napari_tbsn import cli

    def deliver():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)

    with cli._interrupts() as stops:
        stops.training = True
        deliver()
        assert stops.stop_training.is_set() and not stops.cancel.is_set()
        stops.training = False  # the fit completed; the files are being denoised
        try:
            deliver()
        except KeyboardInterrupt:
            pytest.fail("the Ctrl-C after a training it ended was over aborted instead of cancelling")
        assert stops.cancel.is_set()
        with pytest.raises(KeyboardInterrupt):
            deliver()
