"""Throughput of this tree against a baseline tree: training steps, fits and predictions.

    python benchmarks/throughput.py --baseline /path/to/old/src [--rounds 3] [--kinds step,fit,teacher,student]
    python benchmarks/throughput.py --profile [--preset small]

Every measurement runs in a process of its own, with PYTHONPATH set to the tree it measures,
and the two trees alternate (old, new, old, new, ...), so that a machine whose speed drifts
slows both alike; a cell is the median over --rounds. (Make the baseline tree with e.g.
`git worktree add /tmp/old <commit>` and pass /tmp/old/src.)

- step: one `small` training step as the fit runs it (batch 1 x 128^2, bfloat16 autocast where
  the CPU has bf16 units, forward, blind-spot loss, backward, AdamW), the best of 5 rounds of 10;
  its FLOPs (below) over its time. FLOPs: matrix products as torch's FlopCounterMode counts
  them (the 1x1 convolutions, run as products in this tree, and the attention), convolutions
  as 2 x outputs x (inputs per group) x kernel area; a step is 3x the forward pass (the backward
  pass computes two products per forward one).
- fit: `Denoiser(preset="small").fit` on a 512x512 image for 150 iterations: iterations per
  second as its summary states them (validation included, as in any fit).
- teacher / student: `predict` of a 1024x1024 plane with the default options (the teacher's
  ensemble and lattice refinement; the student's single pass), megapixels per second.
- step_norms / step_blocks (only with --kinds): the step with the layer norms or the transformer
  blocks compiled by torch.compile (needs a C++ compiler), and the seconds compiling took.
- matmul: this CPU's 2048^3 matrix product in float32 and bfloat16 (this tree only).
FLOPs leave out the relative-position products (q . r, under 1%) and the output convolution.

--profile prints where one training step's time goes, per operator and per kind of work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("step", "fit", "teacher", "student")


def _best_ms(function, repeats: int = 10, rounds: int = 5) -> float:
    for _ in range(3):
        function()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        best = min(best, (time.perf_counter() - start) / repeats * 1000)
    return best


def _step_parts(preset: str, batch: int, size: int):
    import torch

    from napari_tbsn.devices import autocast_dtype
    from napari_tbsn.network.tbsn import TBSN
    from napari_tbsn.training import blind_spot_loss

    torch.manual_seed(0)
    network = TBSN.from_preset(preset)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    noisy = torch.randn(batch, 1, size, size)
    dtype = autocast_dtype(torch.device("cpu"))

    def forward():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            return network(noisy)

    def step():
        blind_spot_loss(forward(), noisy).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return network, forward, step, dtype


def forward_flops(network, forward) -> float:
    """FLOPs of one forward pass: products as FlopCounterMode counts them, convolutions from
    their modules' shapes (FlopCounterMode would not see a 1x1 convolution run as a product
    apart from the others, and the rule is the same for both trees)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    convolution_flops = []

    def count(module, inputs, output):
        weight = module.weight
        if output.dim() == 4 and weight.dim() == 4 and weight.shape[-1] * weight.shape[-2] > 1:
            convolution_flops.append(2 * output.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3])
        elif output.dim() == 4 and weight.dim() == 4:  # a 1x1 convolution, in either tree
            convolution_flops.append(2 * output.numel() * weight.shape[1])

    hooks = [m.register_forward_hook(count) for m in network.modules()
             if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 4]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    for hook in hooks:
        hook.remove()
    products = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(k))
    # Attention products (bmm) from the counter; every 1x1 and kxk convolution from the hooks.
    return float(products + sum(convolution_flops))


def worker_step() -> dict:
    network, forward, step, dtype = _step_parts("small", 1, 128)
    milliseconds = _best_ms(step)
    flops = 3 * forward_flops(network, forward)
    return {"ms": milliseconds, "gflop": flops / 1e9, "gflop_s": flops / milliseconds / 1e6,
            "dtype": str(dtype).replace("torch.", "") if dtype else "float32"}


def worker_compiled_step(part: str) -> dict:
    """The step of worker_step with parts of the network compiled (torch.compile, inductor: it
    needs a C++ compiler): "norms", each layer norm as a plain function (inductor fuses its
    forward and its backward), or "blocks", every transformer block. The compile time is that
    of the first two steps."""
    import torch

    from napari_tbsn.network.layers import BiasFreeLayerNorm
    from napari_tbsn.network.tbsn import TransformerBlock

    network, forward, step, dtype = _step_parts("small", 1, 128)
    if part == "blocks":
        for module in network.modules():
            if isinstance(module, TransformerBlock):
                module.compile(dynamic=False)
    else:
        @torch.compile(dynamic=False)
        def norm(x, weight, eps):
            wide = x.float()
            centred = wide - wide.mean(dim=1, keepdim=True)
            scaled = wide * torch.rsqrt((centred * centred).mean(dim=1, keepdim=True) + eps)
            return (scaled * weight.view(1, -1, 1, 1)).to(dtype or x.dtype)

        for module in network.modules():
            if isinstance(module, BiasFreeLayerNorm):
                module.forward = lambda x, module=module: norm(x, module.weight, module.eps)
    start = time.perf_counter()
    step()
    step()
    compile_s = time.perf_counter() - start
    return {"ms": _best_ms(step), "compile_s": compile_s}


def _image(size: int):
    import numpy as np

    return np.random.default_rng(0).poisson(10.0, (size, size)).astype(np.float32)


def worker_fit() -> dict:
    from napari_tbsn import Denoiser

    image = _image(512)
    denoiser = Denoiser(preset="small", device="cpu")
    denoiser.fit(image, "YX", iterations=3)  # warm-up
    denoiser.fit(image, "YX", iterations=150)
    return {"it_s": denoiser.summary.iterations / denoiser.summary.seconds}


def _teacher_and_student():
    import dataclasses

    from napari_tbsn import Denoiser
    from napari_tbsn.network.unet import UNet, student_preset
    from napari_tbsn.student import Student

    plane = _image(1024)
    denoiser = Denoiser(preset="small", device="cpu", pd=1)
    denoiser.fit(plane[:256, :256], "YX", iterations=2)
    model = denoiser.model
    student = UNet(student_preset("small", model.channels, model.channels)).eval()
    return plane, Denoiser.from_model(dataclasses.replace(model, student=Student(student)), denoiser.options,
                                      device="cpu")


def _predict_rate(use_student: bool) -> dict:
    plane, denoiser = _teacher_and_student()
    denoiser.predict(plane[:128, :128], "YX", student=use_student)  # warm-up
    seconds = []
    for _ in range(2 if use_student else 1):
        start = time.perf_counter()
        denoiser.predict(plane, "YX", student=use_student)
        seconds.append(time.perf_counter() - start)
    return {"mpx_s": plane.size / 1e6 / min(seconds)}


def worker_matmul() -> dict:
    import torch

    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        rates[str(dtype).replace("torch.", "")] = 2 * 2048**3 / _best_ms(lambda: a @ b, 5, 3) / 1e6
    return rates


WORKERS = {"step": worker_step, "fit": worker_fit, "teacher": lambda: _predict_rate(False),
           "student": lambda: _predict_rate(True), "matmul": worker_matmul,
           "step_norms": lambda: worker_compiled_step("norms"), "step_blocks": lambda: worker_compiled_step("blocks")}


def run_worker(kind: str, tree: str | None) -> dict:
    environment = dict(os.environ)
    if tree:
        environment["PYTHONPATH"] = tree
    result = subprocess.run([sys.executable, __file__, "--worker", kind], env=environment, capture_output=True,
                            text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{kind} in {tree or 'this tree'} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _convolution_weight(name: str, shapes: list) -> list:
    """The weight's shape among a convolution operator's inputs (the backward's third input)."""
    index = 2 if "backward" in name else 1
    return shapes[index] if len(shapes) > index and shapes[index] else []


CATEGORIES = (  # (name, test on the operator's name and its input shapes), the first match wins
    ("1x1 convolutions and relative-position products (mm)",
     lambda n, s: n in ("aten::mm", "aten::addmm", "aten::linear")),
    ("depthwise 3x3 convolutions", lambda n, s: "convolution" in n and _convolution_weight(n, s)[1:2] == [1]
     and _convolution_weight(n, s)[2:] == [3, 3]),
    ("1x1 convolutions (NCHW convolutions)", lambda n, s: "convolution" in n and _convolution_weight(n, s)[2:] == [1, 1]),
    ("dense 3x3 convolutions", lambda n, s: "convolution" in n),
    ("attention products", lambda n, s: n in ("aten::bmm", "aten::matmul")),
    ("softmax", lambda n, s: "softmax" in n),
    ("relative positions (gather)", lambda n, s: "gather" in n or "scatter" in n),
    ("key windows (unfold)", lambda n, s: "unfold" in n or "im2col" in n or "col2im" in n),
    ("norms (layer norm, cosine)", lambda n, s: "Norm" in n or "norm" in n or "rsqrt" in n),
    ("optimiser", lambda n, s: "Optimizer" in n or "foreach" in n or "lerp" in n or "addcdiv" in n),
    ("copies and casts", lambda n, s: n in ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat",
                                            "aten::constant_pad_nd", "aten::contiguous")),
    ("element-wise (GELU, residuals, masks, ...)", lambda n, s: n.startswith("aten::")),
)


def profile(preset: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    network, forward, step, dtype = _step_parts(preset, 1, 128)
    for _ in range(3):
        step()
    steps = 5
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for _ in range(steps):
            step()
    totals: dict[str, float] = {}
    for event in profiler.key_averages(group_by_input_shape=True):
        name = event.key
        shapes = event.input_shapes or []
        category = next((c for c, test in CATEGORIES if test(name, shapes)), None)
        if category is None or event.self_cpu_time_total <= 0:
            continue
        totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total / 1000 / steps
    whole = sum(totals.values())
    flops = 3 * forward_flops(network, forward)
    print(f"`{preset}` training step, batch 1 x 128^2, {dtype or 'float32'} autocast, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {flops / 1e9:.1f} GFLOP per step; self time under the profiler "
          f"(which adds its own overhead) {whole:.0f} ms per step")
    print("| kind of work | ms per step | share |")
    print("| --- | --- | --- |")
    for category, milliseconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"| {category} | {milliseconds:.1f} | {100 * milliseconds / whole:.0f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="the src folder of the tree to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--preset", default="small", help="with --profile")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker]()))
        return
    if args.profile:
        profile(args.preset)
        return
    this_tree = str(Path(__file__).resolve().parent.parent / "src")
    trees = {"baseline": args.baseline, "this tree": this_tree} if args.baseline else {"this tree": this_tree}
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for kind in args.kinds.split(","):
            for name, tree in trees.items():
                results.setdefault((kind, name), []).append(run_worker(kind, tree))
    matmul = run_worker("matmul", this_tree)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 2048^3 matrix product: "
          f"{matmul['float32']:.0f} GFLOP/s float32, {matmul['bfloat16']:.0f} GFLOP/s bfloat16; "
          f"median of {args.rounds} interleaved rounds")
    keys = {"step": "ms", "fit": "it_s", "teacher": "mpx_s", "student": "mpx_s", "step_norms": "ms",
            "step_blocks": "ms"}
    units = {"step": "ms per small step", "fit": "small fit it/s", "teacher": "teacher Mpx/s (1024^2)",
             "student": "student Mpx/s (1024^2)", "step_norms": "ms per small step, the norms compiled",
             "step_blocks": "ms per small step, the blocks compiled"}
    print("| measure | " + " | ".join(trees) + (" | this tree / baseline |" if len(trees) > 1 else " |"))
    print("| --- | " + " | ".join("---" for _ in trees) + (" | --- |" if len(trees) > 1 else " |"))
    for kind in args.kinds.split(","):
        medians = {name: statistics.median(r[keys[kind]] for r in results[(kind, name)]) for name in trees}
        row = f"| {units[kind]} | " + " | ".join(f"{medians[name]:.3g}" for name in trees)
        if len(trees) > 1:
            ratio = medians["this tree"] / medians["baseline"]
            row += f" | {1 / ratio if keys[kind] == 'ms' else ratio:.2f}x faster |"
        print(row + (" |" if len(trees) == 1 else ""))
        if kind.startswith("step_"):
            print(f"| {kind}: compiling and the first two steps (s) | " + " | ".join(
                f"{statistics.median(r['compile_s'] for r in results[(kind, name)]):.0f}" for name in trees)
                + (" | |" if len(trees) > 1 else " |"))
        if kind == "step":
            cells = []
            for name in trees:
                cell = results[(kind, name)][0]
                flops = statistics.median(r["gflop_s"] for r in results[(kind, name)])
                cells.append(f"{flops:.0f} ({100 * flops / matmul[cell['dtype']]:.0f}% of the {cell['dtype']} product)")
            print(f"| step GFLOP/s ({results[(kind, 'this tree')][0]['gflop']:.1f} GFLOP per step) | "
                  + " | ".join(cells) + (" | |" if len(trees) > 1 else " |"))


if __name__ == "__main__":
    main()
