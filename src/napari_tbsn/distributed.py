"""Denoising a stack on a dask.distributed cluster, resumably.

The output is cut into blocks of whole storage chunks (along Y and X, runs of chunks at least
MIN_BLOCK_SIDE pixels long, so the margin a block reads around itself stays a small share of
it). Each block is one task. A task loads the model once per worker process from the model
file (no network is pickled into the graph), reads its block of every plane with the margin the
model needs (the student's bounded receptive field, or the teacher's tiles that reach the block)
and the plane's context planes, predicts exactly what a whole-plane prediction gives there,
writes its chunks into the output store, and then leaves a record. A rerun with the same model,
input, output and options skips every recorded block: a killed job or a lost worker costs only
the blocks that were running.

Workers read and write the stores by path, so input and output must lie on a file system all
workers see (a laptop's disk for a LocalCluster, the shared file system of an HPC cluster).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .axes import PlaneLayout, Region
from .camera import CameraCorrection, CorrectedStack
from .errors import UserError
from .config import PredictOptions
from .devices import OutOfMemory, free_memory, resolve_device
from .model import FittedModel
from .patches import check_finite
from .prediction import TileModel, make_runner, smaller_tile
from .progress import PredictionCancelled, drive

# A block grows by whole chunks along Y and X until it is at least this long (or the whole side).
# The small student reads a 256-pixel margin around its block: 1024-pixel blocks read 2.25x their
# pixels, 256-pixel chunks alone would read 9x.
MIN_BLOCK_SIDE = 1024
RECORD_FOLDER = ".tbsn-progress"
JOB_FILE = "job.json"
MODEL_FILE = "model.safetensors"
CAMERA_FILE = "camera.npz"
DONE_FOLDER = "done"


@dataclass(frozen=True)
class Block:
    """Whole output chunks: [start, stop) along each plane axis, then along Y and along X."""

    planes: tuple[tuple[int, int], ...]
    rows: tuple[int, int]
    columns: tuple[int, int]

    @property
    def name(self) -> str:
        return "_".join(f"{start}-{stop}" for start, stop in (*self.planes, self.rows, self.columns))

    @property
    def region(self) -> Region:
        return slice(*self.rows), slice(*self.columns)

    def plane_indices(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(start, stop) for start, stop in self.planes))


def _runs(length: int, chunk: int, minimum: int) -> list[tuple[int, int]]:
    step = chunk * max(1, math.ceil(minimum / chunk))
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def split_blocks(layout: PlaneLayout, chunks: tuple[int, ...], min_side: int = MIN_BLOCK_SIDE) -> list[Block]:
    """The blocks of an output of `layout` stored in `chunks`: one chunk along each plane axis,
    runs of chunks at least `min_side` long along Y and X, every channel."""
    if len(chunks) != len(layout.shape):
        raise ValueError(f"chunks {chunks} do not match the shape {layout.shape}")
    plane_runs = [_runs(layout.shape[axis], chunks[axis], 1) for axis in layout.plane_axes]
    y, x = layout.axes.index("Y"), layout.axes.index("X")
    rows, columns = _runs(layout.height, chunks[y], min_side), _runs(layout.width, chunks[x], min_side)
    return [Block(tuple(planes), row, column)
            for planes in itertools.product(*plane_runs) for row in rows for column in columns]


# -- stores -------------------------------------------------------------------------------


def store_address(array, role: str) -> tuple[str, str]:
    """(folder, path inside it) of a zarr array on a local or shared file system, which every
    worker opens for itself."""
    store = getattr(array, "store", None)
    root = getattr(store, "root", None) or getattr(store, "path", None)
    if root is None or not hasattr(array, "chunks"):
        raise ValueError(f"distributed prediction needs the {role} as a zarr array in a folder every worker can "
                         f"read (e.g. read_image('stack.ome.zarr').data); got {type(array).__name__}")
    return str(Path(root).resolve()), str(getattr(array, "path", "") or "")


def open_array(address: tuple[str, str], mode: str):
    import zarr

    root, path = address
    return zarr.open_array(root, path=path or None, mode=mode) if path else zarr.open_array(root, mode=mode)


# -- the worker's side -------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """All a task needs, small enough to send with every task."""

    model_file: str
    source: tuple[str, str]
    target: tuple[str, str]
    axes: str
    options: dict[str, Any]
    tile_size: int
    views: int
    record: str
    token: str  # the job's identity, written into its block records
    device: str
    threads_per_host: dict[str, int]
    camera_file: str | None = None  # the camera correction found on the client (CameraCorrection.save)


_LOADED: dict[str, tuple[tuple, Any]] = {}  # per worker process: what -> (file key, the object)
_LOADED_LOCK = threading.Lock()


def _load_once(what: str, path: str, load: Callable[[], Any], *extra: object) -> Any:
    """`load()`'s result for the file `path`, kept per worker process under `what` and loaded
    again only when the file (or `extra`, such as the device) changes."""
    status = os.stat(path)
    key = (path, status.st_mtime_ns, status.st_size, *extra)
    with _LOADED_LOCK:
        if what not in _LOADED or _LOADED[what][0] != key:
            _LOADED[what] = (key, load())
        return _LOADED[what][1]


def _worker_model(path: str, device: torch.device) -> FittedModel:
    """The model file's model with its networks on `device`, loaded once per worker process (and
    again if the file or the device changes): no block copies the network to the GPU again."""
    def load() -> FittedModel:
        model = FittedModel.load(path)[0]
        for network in (model.network, model.student.network if model.student is not None else None):
            if network is not None:
                network.to(device).eval()
        return model

    return _load_once("model", path, load, str(device))


def _worker_camera(path: str) -> CameraCorrection:
    """The job's camera correction, loaded once per worker process (its maps are large)."""
    return _load_once("camera", path, lambda: CameraCorrection.load(Path(path)))


def _worker_name() -> object:
    try:
        from distributed import get_worker

        return get_worker().name
    except (ImportError, ValueError):  # not in a worker (a test calling a task directly)
        return None


def worker_device(requested: str, name: object = None) -> torch.device:
    """The device the worker called `name` (default: the one running this task) predicts on:
    `requested` as resolve_device takes it, spread over the host's GPUs (spread_over_gpus), and
    made the current CUDA device, so that nothing of this worker lands on another's GPU."""
    device = spread_over_gpus(resolve_device(requested), _worker_name() if name is None else name,
                              torch.cuda.device_count(), launcher_chose_gpu())
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def launcher_chose_gpu() -> bool:
    """Whether this worker's launcher gave it its own GPU: CUDA_VISIBLE_DEVICES naming one, or a
    dask-cuda worker (dask-cuda lists each worker's own GPU first). A SLURM job's list of all
    its GPUs, the same for every process, is not such a choice."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (visible is not None and len([d for d in visible.split(",") if d.strip()]) == 1) or "dask_cuda" in sys.modules


def spread_over_gpus(device: torch.device, name: object, gpus: int, launcher_chose: bool) -> torch.device:
    """A CUDA device without an index ("auto" or "cuda" resolved) for the worker called `name`
    on a host with `gpus` GPUs: LocalCluster's workers are named 0, 1, ..., and worker n takes
    cuda:(n mod gpus) instead of every worker taking cuda:0, unless the launcher chose (cuda:0
    is then the worker's own)."""
    if device.type == "cuda" and device.index is None and gpus > 1 and str(name).isdigit() and not launcher_chose:
        return torch.device("cuda", int(name) % gpus)
    return device


def worker_memory(requested: str, dask_worker=None) -> tuple[str, int]:
    """(device, bytes free on it) of a worker; client.run passes the worker as `dask_worker`
    (get_worker() does not work there), whose name decides its GPU."""
    device = worker_device(requested, getattr(dask_worker, "name", None))
    return str(device), free_memory(device)


def smallest_worker_memory(client, requested: str) -> tuple[str, int]:
    """The worker device with the least free memory, which sizes every task's tiles: a login node
    without a GPU must not size the tiles that workers' GPUs run (nor a big GPU a small one's)."""
    reports = client.run(worker_memory, requested)
    if not reports:
        raise UserError("the cluster has no workers: start some, or give --workers N")
    return min(reports.values(), key=lambda report: report[1])


def _torch_threads(job: Job) -> int:
    """The host's cores shared among the tasks its workers run at once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        from distributed import get_worker

        host = get_worker().address.rsplit(":", 1)[0]
    except (ImportError, ValueError):
        host = ""
    return max(1, cores // max(1, job.threads_per_host.get(host, 1)))


class PlaneReader:
    """One plane of a stack with its context planes, normalised, read by region: `shape` is
    (C * (1 + 2k), H, W) and [:, rows, columns] reads only that block of each plane."""

    def __init__(self, model: FittedModel, layout: PlaneLayout, data, plane: tuple[int, ...],
                 pixel_maps: np.ndarray | None = None) -> None:
        self.model, self.layout, self.data, self.plane, self.pixel_maps = model, layout, data, plane, pixel_maps
        maps = 0 if pixel_maps is None else len(pixel_maps)
        self.shape = (model.channels * (1 + 2 * model.context_planes) + maps, layout.height, layout.width)

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        _, rows, columns = key
        block = self.layout.read_plane_with_context(self.data, self.plane, self.model.context_planes, (rows, columns))
        check_finite(block, f"{self.layout.describe_plane(self.plane)} of the input")
        normalized = self.model.normalizer.normalize(block)
        if self.pixel_maps is None:
            return normalized
        return np.concatenate([normalized, self.pixel_maps[:, rows, columns]])


def predict_block(job: Job, block: Block) -> str:
    """Predict one block into the output store and record it; returns the block's name. Out of
    memory, the block is predicted again with smaller tiles (as predict_planes does)."""
    done = Path(job.record) / DONE_FOLDER / block.name
    if _recorded(done, job.token):
        return block.name
    torch.set_num_threads(_torch_threads(job))
    device = worker_device(job.device)
    model = _worker_model(job.model_file, device)
    options = PredictOptions.from_dict(job.options)
    source, target = open_array(job.source, "r"), open_array(job.target, "r+")
    layout = PlaneLayout.of(source.shape, job.axes)
    camera = _worker_camera(job.camera_file) if job.camera_file else None
    if camera is not None:
        source = CorrectedStack(source, layout, camera)
    runner = make_runner(model, options, device, job.views, camera=camera)
    tile_size = job.tile_size
    for plane in block.plane_indices():
        maps = runner.extra_planes(source, layout, plane) if isinstance(runner, TileModel) else None
        reader = PlaneReader(model, layout, source, plane, maps)
        while True:
            try:
                result = drive(runner.predict_iter(reader, tile_size, block.region))
                break
            except OutOfMemory as error:
                tile_size = smaller_tile(tile_size, device, error)
        layout.write_plane(target, plane, model.normalizer.denormalize(result[: model.channels]), block.region)
    done.write_text(job.token)  # the job's token: a late task of an earlier job cannot mark this one's blocks
    return block.name


def _recorded(marker: Path, token: str) -> bool:
    try:
        return marker.read_text() == token
    except OSError:
        return False


# -- the client's side -------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSummary:
    blocks: int
    skipped: int
    seconds: float

    def describe(self) -> str:
        skipped = f" ({self.skipped} already done by an earlier run)" if self.skipped else ""
        return f"{self.blocks} blocks in {self.seconds:.0f} s{skipped}"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def prepare_record(record: Path, model: FittedModel, defaults: PredictOptions,
                   identity: dict[str, Any]) -> tuple[str, set[str]]:
    """Make `record` hold this job's model file and description; return the job's token and the
    blocks an earlier run of the same job finished (none where the job differs: its records go)."""
    record.mkdir(parents=True, exist_ok=True)
    fresh = record / f".{MODEL_FILE}.new"
    model.save(fresh, defaults)
    identity = {**identity, "model_sha256": _file_digest(fresh)}
    token = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    job_file = record / JOB_FILE
    try:
        same = json.loads(job_file.read_text()) == identity
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(record / DONE_FOLDER, ignore_errors=True)
        job_file.unlink(missing_ok=True)
    os.replace(fresh, record / MODEL_FILE)
    (record / DONE_FOLDER).mkdir(exist_ok=True)
    if not same:
        job_file.write_text(json.dumps(identity, indent=1))
    return token, {path.name for path in (record / DONE_FOLDER).iterdir() if _recorded(path, token)}


def threads_per_host(client) -> dict[str, int]:
    """Task threads of all workers on each host, from the scheduler."""
    counts: dict[str, int] = {}
    for address, worker in client.scheduler_info().get("workers", {}).items():
        host = address.rsplit(":", 1)[0]
        counts[host] = counts.get(host, 0) + int(worker.get("nthreads", 1))
    return counts


def predict_on_cluster(client, model: FittedModel, defaults: PredictOptions, options: PredictOptions, data,
                       layout: PlaneLayout, out, *, tile_size: int, views: int, device: str = "auto",
                       record: Path | None = None, min_side: int = MIN_BLOCK_SIDE,
                       cancel: threading.Event | None = None,
                       on_submit: Callable[[list], None] | None = None,
                       camera: CameraCorrection | None = None) -> ClusterSummary:
    """Predict `data` (a zarr array) into `out` (a zarr array of the same shape) on the
    cluster `client` talks to. `tile_size` and `views` are resolved for the whole stack by
    the caller, so every task tiles as a single-process prediction would. `record` (default:
    a folder inside the output's store) keeps the finished blocks across runs."""
    from distributed import wait

    start = time.perf_counter()
    source, target = store_address(data, "input"), store_address(out, "output")
    if tuple(out.shape) != layout.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {layout.shape}")
    record = Path(record) if record is not None else Path(target[0]) / RECORD_FOLDER / (target[1] or "_")
    identity = {"source": list(source), "target": list(target), "axes": layout.axes, "shape": list(layout.shape),
                "chunks": list(out.chunks), "options": options.to_dict(), "tile_size": tile_size, "views": views,
                "min_side": min_side, "camera": camera.digest() if camera is not None else None}
    token, finished = prepare_record(record, model, defaults, identity)
    camera_file = None
    if camera is not None:  # every task reads the client's correction: one per job, beside its model
        camera_file = str(record / CAMERA_FILE)
        camera.save(Path(camera_file))
    # Sharded zarr v3 arrays are written shard by shard: a block must hold whole shards.
    blocks = split_blocks(layout, tuple(getattr(out, "shards", None) or out.chunks), min_side)
    todo = [block for block in blocks if block.name not in finished]
    job = Job(str(record / MODEL_FILE), source, target, layout.axes, options.to_dict(), tile_size, views,
              str(record), token, device, threads_per_host(client), camera_file)
    # Fresh keys every run: the scheduler must not hand back an earlier run's failed results.
    run = secrets.token_hex(6)
    futures = client.map(predict_block, [job] * len(todo), todo, key=[f"tbsn-{run}-{b.name}" for b in todo],
                         pure=False, retries=0)
    try:
        if on_submit is not None:
            on_submit(futures)
        while pending := [future for future in futures if not future.done()]:
            if cancel is not None and cancel.is_set():
                raise PredictionCancelled("prediction stopped; the finished blocks are recorded: run it again "
                                          "to finish the rest")
            try:
                wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
            except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
                pass
    except BaseException:
        client.cancel(futures)
        raise
    failed = [future for future in futures if future.status != "finished"]
    if failed:
        first = failed[0].exception() if failed[0].status == "error" else failed[0].status
        raise UserError(
            f"{len(failed)} of {len(todo)} blocks failed (the first: {first}); the other blocks "
            "are recorded: run the same command again to finish the rest")
    _remove_record(record)  # the job is complete: the next run starts afresh
    return ClusterSummary(len(blocks), len(blocks) - len(todo), time.perf_counter() - start)


def _remove_record(record: Path) -> None:
    """Remove what prepare_record made, and the folders it made if they are left empty (a
    folder the caller gave keeps anything else it holds)."""
    shutil.rmtree(record / DONE_FOLDER, ignore_errors=True)
    for name in (JOB_FILE, MODEL_FILE):
        (record / name).unlink(missing_ok=True)
    for folder in (record, record.parent if record.parent.name == RECORD_FOLDER else None):
        if folder is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
