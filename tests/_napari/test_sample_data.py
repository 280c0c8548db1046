import numpy as np

from napari_tbsn._napari.sample_data import clean_nuclei, noisy_nuclei


def test_sample_data_is_a_noisy_stack_and_its_reference():
    (noisy, noisy_meta, kind), = noisy_nuclei()
    (clean, clean_meta, _), = clean_nuclei()
    assert kind == "image" and noisy.shape == clean.shape == (16, 128, 128)
    assert noisy.dtype == np.float32 and noisy_meta["axis_labels"] == ("Z", "Y", "X")
    noise = noisy - clean
    assert abs(float(noise.mean())) < 0.1 and 1.0 < float(noise.std()) < 4.0
    np.testing.assert_array_equal(noisy, noisy_nuclei()[0][0])  # reproducible


def test_manifest_is_found_by_npe2():
    import npe2

    manifest = npe2.PluginManifest.from_distribution("napari-tbsn")
    assert [w.display_name for w in manifest.contributions.widgets] == ["TBSN Denoise"]
    assert {s.key for s in manifest.contributions.sample_data} == {"noisy_nuclei", "clean_nuclei"}
