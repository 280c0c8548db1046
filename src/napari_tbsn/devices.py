"""Choosing a torch device, naming the ones present, and choosing how many CPU threads to use."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch


def out_of_memory_class(torch_module=torch) -> type[BaseException]:
    """torch's out-of-memory error: `torch.OutOfMemoryError` from torch 2.5 on, which the CUDA,
    MPS and CPU allocators raise; `torch.cuda.OutOfMemoryError` (the same class later) before."""
    found = getattr(torch_module, "OutOfMemoryError", None)
    return found if found is not None else torch_module.cuda.OutOfMemoryError


# What every supported torch raises when a device runs out of memory (pyproject allows torch 2.4).
OutOfMemory = out_of_memory_class()


def available_devices() -> list[tuple[str, str]]:
    """(device string, human name) for every device torch can use here."""
    found = [("cpu", "CPU")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            found.append((f"cuda:{index}", f"CUDA {index}: {torch.cuda.get_device_name(index)}"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append(("mps", "Apple MPS"))
    return found


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; anything else must exist here."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use 'auto' or 'cpu'")
    index = name.partition(":")[2]
    if name.startswith("cuda:") and index.isdigit() and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {device!r} asked for, but this machine has {count} CUDA GPU(s) (cuda:0 to "
                         f"cuda:{count - 1}); use one of them, 'auto' or 'cpu'")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' asked for, but Apple MPS is not available here; use 'auto' or 'cpu'")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from error


def out_of_memory_error(device: torch.device, what: str) -> MemoryError:
    return MemoryError(
        f"{device.type.upper()} ran out of memory while {what}; choose a smaller preset, close other "
        "programs using the device, or use device='cpu'"
    )


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision that pays on this device, or None for float32: bfloat16 on CUDA
    GPUs from Ampere on (compute capability 8) and on CPUs with native bf16 units (AVX512-BF16
    or AMX, where oneDNN runs the convolutions in bf16); float16 on older CUDA GPUs (T4, V100,
    GTX 10xx), which have fast float16 but no fast bfloat16; float32 elsewhere."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type != "cpu":
        return None
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return torch.bfloat16 if any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks) else None


# Prediction tiles take at most this share of the memory free when they start.
TILE_MEMORY_SHARE = 0.25


def free_memory(device: torch.device) -> int:
    """Bytes free for a prediction on `device`: the GPU's free memory, or the host's available
    memory (Linux MemAvailable; 4 GiB where it cannot be read)."""
    if device.type == "cuda":  # free, plus what torch holds cached but unused (a fit leaves much)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + max(int(cached), 0)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def tile_for_memory(bytes_per_pixel: float, device: torch.device, minimum: int, maximum: int = 4096,
                    free: int | None = None) -> int:
    """The largest square tile side (a multiple of 256, so that small changes in free memory do
    not change the tiling) whose pass fits TILE_MEMORY_SHARE of the free memory (`free` bytes,
    default: what `device` has free now), from `minimum` to `maximum` pixels."""
    free = free_memory(device) if free is None else free
    side = int((TILE_MEMORY_SHARE * free / bytes_per_pixel) ** 0.5) // 256 * 256
    return max(minimum, min(side, maximum))


# -- CPU threads ----------------------------------------------------------------------------------


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, else all of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_ticks() -> tuple[float, float] | None:
    """(busy, all) CPU time of the whole machine in seconds, from /proc/stat (Linux), or None."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    hertz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields) - idle) / hertz, sum(fields) / hertz


def cores_busy_elsewhere(window: float = 0.25) -> float:
    """How many cores other processes keep busy, measured over `window` seconds (0 where the
    machine does not tell). This process's own threads are not counted."""
    before, own_before, start = _cpu_ticks(), sum(os.times()[:2]), time.perf_counter()
    if before is None:
        return 0.0
    time.sleep(window)
    after, own_after, elapsed = _cpu_ticks(), sum(os.times()[:2]), time.perf_counter() - start
    if after is None or elapsed <= 0:
        return 0.0
    busy = (after[0] - before[0]) - (own_after - own_before)
    return max(0.0, busy / elapsed)


def choose_threads(threads: int | str = "auto", keep_free: int = 0) -> int:
    """The intra-op threads for torch on the CPU: `threads` when it is a number; "auto": the
    cores no other process is using, less `keep_free` (the widget keeps one for the viewer),
    at least 1. torch's OpenMP threads spin while they wait, so one thread more than there are
    free cores costs far more than one thread fewer (measured: a tiny fit beside one busy
    process on 2 cores ran 60x slower with 2 threads than with 1)."""
    check_threads(threads)
    if threads != "auto":
        return int(threads)
    free = usable_cores() - round(recent_busy_cores())
    return max(1, free - keep_free)


# A measurement of the other processes' load is reused this long: a script calling predict plane
# after plane would otherwise wait out the measuring window at every call (0.25 s of a 0.8 s
# student prediction of a 1024x1024 plane).
BUSY_REUSE_SECONDS = 5.0
_recent_busy: tuple[float, float] | None = None  # (_clock() when measured, cores busy)
_clock = time.monotonic


def recent_busy_cores() -> float:
    """cores_busy_elsewhere(), measured anew when the last measurement is older than
    BUSY_REUSE_SECONDS."""
    global _recent_busy
    recent = _recent_busy  # read once: another thread may forget it meanwhile
    if recent is None or _clock() - recent[0] > BUSY_REUSE_SECONDS:
        busy = cores_busy_elsewhere()
        recent = _recent_busy = (_clock(), busy)  # stamped when the window ends
    return recent[1]


def forget_busy_cores() -> None:
    """Measure the other processes' load afresh at the next choose_threads("auto")."""
    global _recent_busy
    _recent_busy = None


def check_threads(threads: int | str) -> None:
    if threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be 'auto' or a whole number of 1 or more, not {threads!r}")


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` intra-op threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
