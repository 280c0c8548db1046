"""CPU threads: chosen from the cores other programs leave free (torch's OpenMP threads spin
against a busy core), settable in Python, the CLI and the widget, and restored after a job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_tbsn import Denoiser
from napari_tbsn import devices
from napari_tbsn.cli import main

from .conftest import noisy_image


@pytest.mark.parametrize("cores, busy, keep_free, expected", [
    (2, 0.0, 0, 2), (2, 1.0, 0, 1), (2, 0.9, 1, 1), (2, 2.0, 0, 1), (16, 3.2, 1, 12), (16, 0.4, 1, 15),
])
def test_auto_threads_are_the_free_cores_less_what_is_kept(monkeypatch, cores, busy, keep_free, expected):
    monkeypatch.setattr(devices, "usable_cores", lambda: cores)
    monkeypatch.setattr(devices, "cores_busy_elsewhere", lambda window=0.25: busy)
    assert devices.choose_threads("auto", keep_free=keep_free) == expected
    assert devices.choose_threads(3, keep_free=keep_free) == 3  # a number given is taken as it is


def test_a_busy_process_is_seen_and_this_process_is_not():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = devices.cores_busy_elsewhere(window=0.5)
    finally:
        busy.kill()
        busy.wait()
    assert seen >= 0.5  # the busy loop holds about one core
    spin = torch.randn(512, 512)
    import threading

    stop = threading.Event()
    worker = threading.Thread(target=lambda: [spin @ spin for _ in iter(lambda: stop.is_set(), True)])
    worker.start()
    try:
        own = devices.cores_busy_elsewhere(window=0.5)  # our own busy thread does not count
    finally:
        stop.set()
        worker.join()
    assert own < 0.5


@pytest.mark.parametrize("bad", [0, -1, 1.5, "many", True])
def test_bad_thread_counts_are_refused_where_they_enter(bad):
    with pytest.raises(ValueError, match="threads"):
        Denoiser(threads=bad)


def test_a_fit_and_a_prediction_run_with_the_threads_asked_and_restore_them():
    _, noisy = noisy_image((64, 64))
    before = torch.get_num_threads()
    seen = []
    denoiser = Denoiser(preset="tiny", device="cpu", threads=1)
    denoiser.fit(noisy, "YX", iterations=2, callback=lambda progress: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    seen.clear()
    for _ in denoiser.predict_iter(noisy, "YX", threads=2):  # per call
        seen.append(torch.get_num_threads())
    assert set(seen) == {2} and torch.get_num_threads() == before


def test_the_cli_takes_threads(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "in.npy", noisy_image((64, 64))[1])
    argv = ["denoise", str(tmp_path / "in.npy"), "-o", str(tmp_path / "o.tif"), "--preset", "tiny", "--iterations",
            "1", "--quiet"]
    assert main([*argv, "--threads", "0"]) == 2
    assert "threads must be" in capsys.readouterr().err
    assert main([*argv, "--threads", "1"]) == 0



def _huge_page_mode() -> str | None:
    """The kernel's transparent huge page mode (always, madvise, never), or None off Linux."""
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return setting.partition("[")[2].partition("]")[0]


@pytest.mark.parametrize("given", [None, "0"])
def test_importing_the_package_puts_large_cpu_tensors_on_huge_pages_unless_told_not_to(given):
    """THP_MEM_ALLOC_ENABLE, which torch reads at its first CPU allocation: 256 MB tensors then
    fault in 2 MiB pages, not 4 KiB ones (half a teacher prediction's time went to such faults).
    A user's own 0 is kept. The page-fault counts tell which allocator ran, with a wide margin;
    only where the kernel gives huge pages on request (madvise): "always" gives them to every
    large mapping anyway, "never" to none."""
    import os

    if not sys.platform.startswith("linux"):
        pytest.skip("page-fault counts (resource) and huge pages: Linux")
    probe = (
        "import os, resource, napari_tbsn, torch\n"
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): x = torch.ones(64 << 20)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        environment["THP_MEM_ALLOC_ENABLE"] = given
    setting, faults = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True,
                                     check=True).stdout.split()
    assert setting == (given or "1")
    if _huge_page_mode() != "madvise":
        pytest.skip(f"transparent huge pages here: {_huge_page_mode() or 'not on Linux'}, not on request (madvise)")
    small_pages = 20 * (256 << 20) // 4096  # 1.3 million faults
    assert int(faults) < 0.1 * small_pages if given is None else int(faults) > 0.5 * small_pages


def test_a_load_measurement_is_reused_for_a_few_seconds_then_taken_again(monkeypatch):
    loads = iter([1.0, 2.0])
    measured = []
    monkeypatch.setattr(devices, "cores_busy_elsewhere", lambda window=0.25: measured.append(window) or next(loads))
    monkeypatch.setattr(devices, "usable_cores", lambda: 4)
    clock = [100.0]
    monkeypatch.setattr(devices, "_clock", lambda: clock[0])
    assert devices.choose_threads("auto") == 3 and len(measured) == 1
    clock[0] += devices.BUSY_REUSE_SECONDS - 1
    assert devices.choose_threads("auto") == 3 and len(measured) == 1  # a call soon after: no new window
    clock[0] += 2
    assert devices.choose_threads("auto") == 2 and len(measured) == 2  # later: measured again, and used
