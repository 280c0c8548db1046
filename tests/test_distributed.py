"""Prediction on a dask.distributed LocalCluster of worker processes: exact, and resumable."""

from __future__ import annotations

import dataclasses
import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_tbsn import Denoiser
from napari_tbsn.axes import PlaneLayout
from napari_tbsn.distributed import RECORD_FOLDER, predict_on_cluster, split_blocks
from napari_tbsn.network.unet import UNet, student_preset
from napari_tbsn.student import Student

from .conftest import agreement, noisy_image

zarr = pytest.importorskip("zarr")
distributed = pytest.importorskip("distributed")

SHAPE, CHUNKS = (6, 96, 160), (2, 96, 80)  # 3 x 2 chunks: along Z and along X


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                silence_logs=logging.CRITICAL) as cluster, \
            distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def model_with_student(device):
    """A tiny teacher with stack context 1 and a (random, so distinct from the teacher) student."""
    _, stack = noisy_image(SHAPE, seed=3)
    stack += np.random.default_rng(4).normal(0, 1, SHAPE).astype(np.float32)  # planes differ
    teacher = Denoiser(preset="tiny", device=device, pd=1, context=1).fit(stack, "ZYX", iterations=3)
    torch.manual_seed(1)
    model = teacher.model
    student = Student(UNet(student_preset("tiny", 3 * model.channels, model.channels)).eval())
    return Denoiser.from_model(dataclasses.replace(model, student=student), teacher.options, device=device), stack


def zarr_pair(folder: Path, stack: np.ndarray):
    source = zarr.open_array(str(folder / "in.zarr"), mode="w", shape=stack.shape, chunks=CHUNKS, dtype="float32")
    source[:] = stack
    out = zarr.open_array(str(folder / "out.zarr"), mode="w", shape=stack.shape, chunks=CHUNKS, dtype="float32")
    return source, out


def test_blocks_are_whole_chunks_grown_to_the_minimum_side():
    layout = PlaneLayout.of((5, 2, 300, 1000), "ZCYX")
    blocks = split_blocks(layout, (2, 2, 100, 100), min_side=250)
    assert {block.planes for block in blocks} == {((0, 2),), ((2, 4),), ((4, 5),)}
    assert sorted({block.rows for block in blocks}) == [(0, 300)]
    assert sorted({block.columns for block in blocks}) == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    assert len({block.name for block in blocks}) == len(blocks) == 12


@pytest.mark.parametrize("student", [True, False])
def test_a_cluster_of_two_workers_gives_the_single_process_result(client, model_with_student, tmp_path, student):
    denoiser, stack = model_with_student
    source, out = zarr_pair(tmp_path, stack)
    # The teacher's tiles decide its output, so both runs use the same tile size; the student is
    # exact with any windows.
    options = {"student": student, "tile_size": 64 if not student else "auto"}
    expected = denoiser.predict(stack, "ZYX", **options)
    assert denoiser.predict(source, "ZYX", out=out, client=client, **options) is out
    np.testing.assert_allclose(out[:], expected, atol=agreement(denoiser.device, expected, 1e-5))
    assert not (tmp_path / "out.zarr" / RECORD_FOLDER).exists()  # the finished job's record is gone
    assert np.array_equal(source[:], stack)


def cluster_run(client, denoiser, source, out, student: bool) -> dict:
    options = denoiser.options.replace(student=student)
    return {"client": client, "model": denoiser.model, "defaults": denoiser.options, "options": options,
            "data": source, "layout": PlaneLayout.of(source.shape, "ZYX"), "out": out, "tile_size": 64, "views": 1,
            "min_side": 1, "device": str(denoiser.device)}


def break_a_chunk(folder: Path) -> tuple[Path, bytes]:
    """Break the input chunk of planes 0-1, columns 80-159. The blocks of planes 0-1 and 2-3 read
    it (plane 2's context is plane 1; the student's margin reaches across the columns), the two
    blocks of planes 4-5 do not."""
    chunk = next(path for path in (folder / "in.zarr").rglob("*") if path.is_file() and path.parts[-3:] == ("0", "0", "1"))
    intact = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    return chunk, intact


def test_a_failed_block_costs_only_itself_and_the_rerun_skips_the_finished_ones(client, model_with_student, tmp_path):
    denoiser, stack = model_with_student
    source, out = zarr_pair(tmp_path, stack)
    run = cluster_run(client, denoiser, source, out, student=True)
    chunk, intact = break_a_chunk(tmp_path)
    with pytest.raises(RuntimeError, match="4 of 6 blocks failed.*run the same command again"):
        predict_on_cluster(**run)
    chunk.write_bytes(intact)
    summary = predict_on_cluster(**run)
    assert (summary.blocks, summary.skipped) == (6, 2)
    expected = denoiser.predict(stack, "ZYX", student=True)
    np.testing.assert_allclose(out[:], expected, atol=agreement(denoiser.device, expected, 1e-5))
    assert not (tmp_path / "out.zarr" / RECORD_FOLDER).exists()


def test_a_different_job_does_not_reuse_another_jobs_record(client, model_with_student, tmp_path):
    denoiser, stack = model_with_student
    source, out = zarr_pair(tmp_path, stack)
    chunk, intact = break_a_chunk(tmp_path)
    with pytest.raises(RuntimeError, match="4 of 6 blocks failed"):
        predict_on_cluster(**cluster_run(client, denoiser, source, out, student=True))
    chunk.write_bytes(intact)
    summary = predict_on_cluster(**cluster_run(client, denoiser, source, out, student=False))
    assert summary.skipped == 0
    expected = denoiser.predict(stack, "ZYX", student=False, tile_size=64, ensemble=1)
    np.testing.assert_allclose(out[:], expected, atol=agreement(denoiser.device, expected, 1e-5))


def test_the_cluster_needs_zarr_arrays_it_can_open(client, model_with_student, tmp_path):
    denoiser, stack = model_with_student
    _, out = zarr_pair(tmp_path, stack)
    with pytest.raises(ValueError, match="zarr array in a folder every worker can read"):
        denoiser.predict(stack, "ZYX", out=out, client=client)
    with pytest.raises(ValueError, match="give out="):
        denoiser.predict(stack, "ZYX", client=client)


def test_r3_refinement_gives_the_single_process_result_block_by_block(client, tmp_path, device):
    # R3's random masks are seeded per tile, not per batch: a block runs fewer tiles per batch.
    shape, chunks = (4, 128, 512), (2, 128, 128)
    _, stack = noisy_image(shape, seed=5)
    stack += np.random.default_rng(6).normal(0, 1, shape).astype(np.float32)
    denoiser = Denoiser(preset="tiny", device=device, pd=2, context=1, refine=2).fit(stack, "ZYX", iterations=2)
    assert denoiser.pd == 2
    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=shape, chunks=chunks, dtype="float32")
    source[:] = stack
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=shape, chunks=chunks, dtype="float32")
    run = {**cluster_run(client, denoiser, source, out, student=False), "tile_size": 128}
    assert predict_on_cluster(**run).blocks == 8
    expected = denoiser.predict(stack, "ZYX", tile_size=128, ensemble=1)
    # batches of other sizes round differently (1e-5)
    np.testing.assert_allclose(out[:], expected, atol=agreement(denoiser.device, expected, 1e-4))


# -- GPU workers: their logic, run on the CPU with stand-ins for the GPUs ----------------------


def test_workers_spread_over_a_hosts_gpus_unless_their_launcher_chose(monkeypatch):
    from napari_tbsn.distributed import launcher_chose_gpu, spread_over_gpus

    cuda = torch.device("cuda")
    assert [spread_over_gpus(cuda, name, 2, False) for name in (0, 1, 2, "3")] == \
        [torch.device("cuda", index) for index in (0, 1, 0, 1)]
    assert spread_over_gpus(cuda, 1, 1, False) == cuda  # one GPU: the current one
    assert spread_over_gpus(cuda, 1, 4, True) == cuda  # e.g. dask-cuda: its own choice
    assert spread_over_gpus(torch.device("cuda", 3), 1, 4, False) == torch.device("cuda", 3)  # asked for: kept
    assert spread_over_gpus(cuda, "tcp-worker", 4, False) == cuda
    assert spread_over_gpus(torch.device("cpu"), 1, 4, False) == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # a SLURM job's GPUs, the same for every worker
    assert not launcher_chose_gpu()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert launcher_chose_gpu()


def test_each_worker_reports_its_own_device_and_free_memory(client):
    from napari_tbsn.distributed import smallest_worker_memory, worker_memory

    device, free = smallest_worker_memory(client, "cpu")  # what client.run gets from real workers
    assert device == "cpu" and free > 0
    assert worker_memory("cpu", dask_worker=types.SimpleNamespace(name=1))[0] == "cpu"


def test_tiles_are_sized_from_the_worker_with_the_least_free_memory(model_with_student):
    from napari_tbsn.distributed import smallest_worker_memory
    from napari_tbsn.prediction import make_runner, tile_side

    class FakeClient:  # a login node without a GPU, one large GPU and one small one
        def run(self, function, requested):
            assert function.__name__ == "worker_memory" and requested == "auto"
            return {"tcp://a:1": ("cuda:0", 80 * 2**30), "tcp://b:1": ("cuda:0", 8 * 2**30)}

    device, free = smallest_worker_memory(FakeClient(), "auto")
    assert (device, free) == ("cuda:0", 8 * 2**30)
    denoiser, _ = model_with_student
    options = denoiser.options.replace(student=False)
    runner = make_runner(denoiser.model, options, torch.device("cpu"), 1)
    small, large = (tile_side(runner, options, torch.device(device), free=f) for f in (free, 80 * 2**30))
    assert small < large  # the small GPU's tile, not the large one's (nor the client's host memory)

    class NoWorkers:
        def run(self, function, requested):
            return {}

    with pytest.raises(Exception, match="no workers"):
        smallest_worker_memory(NoWorkers(), "auto")


def test_a_block_out_of_memory_is_predicted_again_with_smaller_tiles(model_with_student, tmp_path, monkeypatch):
    from napari_tbsn.devices import OutOfMemory
    from napari_tbsn.distributed import Job, prepare_record, predict_block, store_address
    from napari_tbsn.prediction import TileModel

    denoiser, stack = model_with_student
    source, out = zarr_pair(tmp_path, stack)
    options = denoiser.options.replace(student=False, tile_size=128)
    layout = PlaneLayout.of(source.shape, "ZYX")
    token, _ = prepare_record(tmp_path / "record", denoiser.model, denoiser.options, {"job": 1})
    job = Job(str(tmp_path / "record" / "model.safetensors"), store_address(source, "input"),
              store_address(out, "output"), "ZYX", options.to_dict(), 128, 1, str(tmp_path / "record"), token,
              str(denoiser.device), {})
    tiles = []
    real = TileModel.predict_iter

    def runs_out_above_64(self, normalized, tile_size, region=None):
        tiles.append(tile_size)
        if tile_size > 64:
            raise OutOfMemory("CUDA out of memory (simulated)")
        return real(self, normalized, tile_size, region)

    monkeypatch.setattr(TileModel, "predict_iter", runs_out_above_64)
    block = split_blocks(layout, CHUNKS)[0]
    with pytest.warns(UserWarning, match="ran out of memory with 128-pixel tiles"):
        assert predict_block(job, block) == block.name
    assert tiles[:2] == [128, 64] and set(tiles[2:]) == {64}  # smaller from then on, for every plane
    monkeypatch.setattr(TileModel, "predict_iter", real)
    expected = denoiser.predict(stack, "ZYX", student=False, tile_size=64, ensemble=1)
    planes, rows, columns = block.planes[0], block.rows, block.columns
    np.testing.assert_allclose(out[slice(*planes), slice(*rows), slice(*columns)],
                               expected[slice(*planes), slice(*rows), slice(*columns)],
                               atol=agreement(denoiser.device, expected, 1e-5))


def test_a_worker_loads_the_model_onto_its_device_once(model_with_student, tmp_path):
    from napari_tbsn.distributed import _worker_model

    denoiser, _ = model_with_student
    path = tmp_path / "model.safetensors"
    denoiser.save(path)
    first = _worker_model(str(path), torch.device("cpu"))
    assert _worker_model(str(path), torch.device("cpu")) is first  # cached: no copy per block
    assert not first.network.training and not first.student.network.training
    from napari_tbsn.prediction import make_runner

    runner = make_runner(first, denoiser.options.replace(student=False), torch.device("cpu"), 1)
    assert runner.network is first.network  # on its device already: the block uses it as it is
