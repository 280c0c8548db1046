"""Export a fitted model's distilled student as a bioimage.io model zoo package (spec 0.5).

Only the student can go: it is a plain fully convolutional UNet, one pass per plane, which
zoo tools (bioimageio.core, deepImageJ, ilastik, ...) run as it is. The blind-spot teacher
needs its posterior, ensemble and R3 rounds, which no zoo runtime would reproduce.

The package holds the student twice (TorchScript, and a PyTorch state dict whose architecture
is `napari_tbsn.network.unet.ZooUNet`), the cast to float32 and the normalisation as fixed
`ensure_dtype` and `scale_linear` pre- and postprocessing, a test input cut from the user's data
(mirrored by the halo) with the student's output on it, a cover image and a README.

The output declares the student's tiling margin (`StudentConfig.margin`, its receptive field on
its grid) as its halo, and the input sizes step on that grid: a zoo tool that tiles a plane of
an accepted size with that halo cuts every tile on the whole plane's grid, with all the context
it reads, so the tiles join without seams. Zoo tools pad the plane by the halo before they run
it, by mirror reflection (declared as the input's `pad`, as the student itself pads), so within
the halo of the plane's border the output can differ a little from napari-tbsn's, which mirrors
only one grid step.

Nothing here touches the network: the description names no URL (the citation is a DOI), so the
spec library's checks read only the local files.

Needs `bioimageio.spec` (0.5.x); running the package needs `bioimageio.core`.
"""

from __future__ import annotations

import shutil
import string
import tempfile
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import MissingDependency, UserError
from .model_io import atomic_file
from .network.unet import ZooUNet, parameter_count

NO_STUDENT = ("this model has no distilled student: distil it first (Denoiser.distil, `tbsn distil`, or the "
              "widget's student option); the blind-spot teacher with its posterior and R3 cannot be run "
              "faithfully by zoo tools")
TEST_SIZE = 256  # the test tensor's largest height and width
TBSN_CITATION = ("Li, J., Zhang, Z., Zuo, W. Rethinking Transformer-Based Blind-Spot Network for Self-Supervised "
                 "Image Denoising. arXiv:2404.07846 (2024)")
TBSN_DOI = "10.48550/arXiv.2404.07846"  # arXiv's DataCite DOI for https://arxiv.org/abs/2404.07846
TBSN_URL = "https://arxiv.org/abs/2404.07846"
TAGS = ["denoising", "self-supervised", "fluorescence-light-microscopy", "napari-tbsn", "2d", "pytorch", "unet"]
DEFAULT_AUTHORS = ("napari-tbsn user",)
DEFAULT_NAME = "napari-tbsn student denoiser"
NAME_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_+- ()")
# A scripted network must give the module's output on the test input to this (float32 rounding).
SCRIPT_TOLERANCE = 1e-5


def export_bioimageio(model, path, sample, *, name: str | None = None, authors: Sequence[str] | None = None,
                      description: str | None = None, license: str = "CC-BY-4.0") -> Path:
    """Write `model`'s distilled student as a bioimage.io model package (a .zip) at `path`.

    `sample`: float32 (C_in, H, W) in the data's own units, one plane with its context planes
    as the model reads them (C_in = channels * (1 + 2 * context_planes)); its centre, at most
    256x256, mirrored by the student's margin (as zoo tools pad a plane by the halo), becomes
    the package's test input. `authors`: names (or {"name": ...} mappings; default "napari-tbsn
    user"). `license`: an SPDX identifier. Returns `path`.

    The package is written to a hidden file beside `path` and renamed over it when complete.
    Needs bioimageio.spec; reaches no network (the description names no URL)."""
    try:  # first: what to install, before what to do with the model
        from bioimageio.spec import save_bioimageio_package
    except ImportError as error:
        raise MissingDependency("exporting to the BioImage Model Zoo", "bioimageio.spec") from error
    student = getattr(model, "student", None)
    if student is None:
        raise ValueError(NO_STUDENT)
    path = Path(path)
    if path.suffix.lower() != ".zip":
        raise ValueError(f"a bioimage.io package is a .zip file; {path.name!r} does not end in .zip")
    import pydantic

    _check_versions()

    config = student.config
    channels, context = int(model.channels), int(model.context_planes)
    in_channels = channels * (1 + 2 * context)
    if config.in_channels != in_channels or config.out_channels != channels:
        raise ValueError(f"the student reads {config.in_channels} and gives {config.out_channels} channel(s), but "
                         f"the model has {channels} channel(s) and {context} context plane(s) on each side")
    name = DEFAULT_NAME if name is None else _check_name(name)
    author_names = _author_names(authors)
    license = _check_license(license)
    description = _default_description(model, channels, context) if description is None else description
    if not isinstance(description, str) or not 0 < len(description) <= 1024:
        raise ValueError("the description must be text of 1 to 1024 characters")
    crop = _test_crop(sample, in_channels, config.size_multiple)
    # Zoo tools check the test tensors as the network's own input and output, halo included.
    halo = config.margin
    test_input = np.pad(crop, ((0, 0), (0, 0), (halo, halo), (halo, halo)), mode="reflect")

    network = _zoo_network(student.network)
    low = np.asarray(model.normalizer.low, dtype=np.float64)
    high = np.asarray(model.normalizer.high, dtype=np.float64)
    test_output = _predict(network, model.normalizer, test_input)
    # What a zoo tool gives for the crop: it pads the crop so, and crops the halo off.
    crop_output = test_output[:, :, halo : halo + crop.shape[2], halo : halo + crop.shape[3]]

    # The spec library leaves some of these files open until garbage collection: on Windows the
    # folder may not go at once, which must not fail an export that is complete.
    with tempfile.TemporaryDirectory(prefix="napari-tbsn-bioimageio-", ignore_cleanup_errors=True) as folder:
        folder = Path(folder)
        np.save(folder / "test_input.npy", test_input)
        np.save(folder / "test_output.npy", test_output)
        _write_tiff(folder / "sample_input.tif", crop[0])
        _write_tiff(folder / "sample_output.tif", crop_output[0])
        state = {key: value.detach().cpu().contiguous().clone() for key, value in network.state_dict().items()}
        torch.save(state, folder / "weights.pt")
        _save_torchscript(network, test_input, model.normalizer, folder / "weights_torchscript.pt")
        _write_cover(crop[0, 0], crop_output[0, 0], folder / "cover.png")
        (folder / "README.md").write_text(_documentation(model, student, name, np.shape(sample), crop.shape,
                                                        test_input.shape, channels, context, low, high))
        (folder / "environment.yaml").write_text(_environment())
        # The description names only these local files (the citation is a DOI, no URL), so the
        # spec library's checks hash and read them and fetch nothing. No ValidationContext of our
        # own: save_bioimageio_package reloads the zip with io checks off, and a context holding
        # our `known_files` would make that reload warn about every file it cannot find there.
        try:
            descr = _description(
                folder, name=name, authors=author_names, license=license, config=config, description=description,
                channels=channels, context=context, low=low, high=high, parameters=parameter_count(network))
        except pydantic.ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()[:3])
            raise ValueError(f"the bioimage.io description is invalid: {problems}") from error
        package = save_bioimageio_package(descr, output_path=folder / "package.zip")
        with atomic_file(path) as temporary:
            shutil.copyfile(package, temporary)
    return path


def _check_versions() -> None:
    """bioimageio.spec before 0.5.14.3 calls a pydantic serializer handler in a way pydantic 2.14
    refuses, so it cannot describe any file there (its error names `index_key`); say what to do."""
    import bioimageio.spec
    import pydantic
    from packaging.version import Version

    spec, pydantic_version = Version(bioimageio.spec.__version__), Version(pydantic.VERSION)
    if spec < Version("0.5.14.3") and pydantic_version >= Version("2.14"):
        raise UserError(f"bioimageio.spec {spec} cannot write packages with pydantic {pydantic_version}: install "
                           "pydantic<2.14 (bioimageio.core 0.11 needs this spec), or bioimageio.spec>=0.5.14.3")


def _check_license(license: str) -> str:
    from bioimageio.spec.model.v0_5 import DeprecatedLicenseId, LicenseId

    for kind in (LicenseId, DeprecatedLicenseId):  # a deprecated one passes with a warning
        try:
            return str(kind(license))
        except ValueError:
            pass
    raise ValueError(f"{license!r} is not an SPDX license identifier that bioimage.io accepts (e.g. CC-BY-4.0, "
                     "MIT, BSD-3-Clause)")


def _environment() -> str:
    """The conda environment the pytorch_state_dict weights need: PyTorch, and napari-tbsn for
    the architecture (ZooUNet)."""
    from . import __version__

    return textwrap.dedent(f"""\
        name: napari-tbsn-student
        channels:
          - conda-forge
          - nodefaults
        dependencies:
          - python >=3.10
          - pytorch >=2.4
          - pip
          - pip:
              - napari-tbsn>={__version__}
        """)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not 5 <= len(name) <= 128 or not set(name) <= NAME_CHARACTERS:
        raise ValueError(f"the model name must be 5 to 128 letters, digits, spaces or _+-() characters, got {name!r}")
    return name


def _author_names(authors) -> list[str]:
    if authors is None:
        return list(DEFAULT_AUTHORS)
    if isinstance(authors, str):
        authors = [authors]
    names = []
    for author in authors:
        author = author.get("name") if isinstance(author, Mapping) else author
        if not isinstance(author, str) or not author.strip() or "/" in author:
            raise ValueError(f"each author must be a non-empty name without '/', got {author!r}")
        names.append(author.strip())
    if not names:
        raise ValueError("give at least one author (or leave authors unset)")
    return names


def _test_crop(sample, in_channels: int, smallest: int) -> np.ndarray:
    """(1, C_in, h, w) float32: the centre of `sample`, at most TEST_SIZE on each side, its sides
    whole multiples of `smallest` (the grid the package's input sizes step on)."""
    if sample is None:
        raise ValueError(f"no sample of the data to make the package's test input from: give one, {in_channels} "
                         "channel(s) x height x width in the data's units (a student distilled now keeps one)")
    sample = np.asarray(sample)
    if sample.ndim != 3 or sample.shape[0] != in_channels:
        raise ValueError(f"the sample must be (channels, height, width) with {in_channels} channel(s) (the plane's "
                         f"channels, then its context planes), got shape {sample.shape}")
    if not np.issubdtype(sample.dtype, np.number) or np.issubdtype(sample.dtype, np.complexfloating):
        raise ValueError(f"the sample must hold real numbers, got {sample.dtype}")
    sizes = []
    for length in sample.shape[1:]:
        size = min(length, TEST_SIZE) // smallest * smallest
        if size < smallest:
            raise ValueError(f"the sample is {sample.shape[1]}x{sample.shape[2]} pixels; the export needs at least "
                             f"{smallest}x{smallest} (one step of the network's grid)")
        sizes.append(size)
    top, left = (sample.shape[1] - sizes[0]) // 2, (sample.shape[2] - sizes[1]) // 2
    crop = np.ascontiguousarray(sample[:, top : top + sizes[0], left : left + sizes[1]], dtype=np.float32)
    if not np.isfinite(crop).all():
        raise ValueError("the sample has NaN or infinite values; cut it from a part of the data without them")
    return crop[np.newaxis]


def _zoo_network(network) -> ZooUNet:
    """A CPU copy of the student's UNet as a ZooUNet (the packaged architecture), in eval mode."""
    config = network.config
    zoo = ZooUNet(config.width, config.depth, config.shuffle, config.in_channels, config.out_channels)
    zoo.load_state_dict({key: value.detach().cpu() for key, value in network.state_dict().items()}, strict=True)
    return zoo.eval()


def _run(network, normalised: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return network(torch.from_numpy(normalised)).numpy()


def _predict(network, normalizer, test_input: np.ndarray) -> np.ndarray:
    """The student's output in the data's units: normalise, run, de-normalise (as napari-tbsn does)."""
    normalised = normalizer.normalize(test_input[0])[np.newaxis].astype(np.float32)
    return normalizer.denormalize(_run(network, normalised)[0])[np.newaxis].astype(np.float32)


def _save_torchscript(network, test_input: np.ndarray, normalizer, path: Path) -> None:
    """Script the UNet (its padding follows each input's size, which tracing would freeze),
    save it, and check the saved module gives the module's output."""
    with warnings.catch_warnings():
        # torch 2.9+ calls TorchScript deprecated; it is still the zoo's format.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        torch.jit.script(network).save(str(path))
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    normalised = normalizer.normalize(test_input[0])[np.newaxis].astype(np.float32)
    expected, scripted_output = _run(network, normalised), _run(scripted, normalised)
    difference = float(np.max(np.abs(expected - scripted_output)))
    if not difference <= SCRIPT_TOLERANCE * max(1.0, float(np.max(np.abs(expected)))):
        raise RuntimeError(f"the TorchScript student differs from the student by {difference:.3g} (normalised units)")


def _write_tiff(path: Path, image: np.ndarray) -> None:
    """(C, Y, X) float32 as one multi-page TIFF (the package's human-readable sample)."""
    import tifffile

    tifffile.imwrite(path, image, photometric="minisblack", metadata={"axes": "CYX"})


def _write_cover(noisy: np.ndarray, denoised: np.ndarray, path: Path) -> None:
    """Noisy | denoised, side by side, both on the noisy plane's 0.5-99.5 percentile scale."""
    import imageio.v3 as iio  # a dependency of bioimageio.spec

    low, high = np.percentile(noisy, [0.5, 99.5])
    scale = high - low if high > low else 1.0
    pair = [np.clip((image - low) / scale, 0, 1) for image in (noisy, denoised)]
    gap = np.ones((noisy.shape[0], max(2, noisy.shape[1] // 64)))
    image = np.concatenate([pair[0], gap, pair[1]], axis=1)
    iio.imwrite(path, np.round(image * 255).astype(np.uint8), extension=".png")


def _channel_names(channels: int, context: int) -> list[str]:
    names = [f"c{c}" for c in range(channels)]
    for offset in [*range(-context, 0), *range(1, context + 1)]:
        side = "minus" if offset < 0 else "plus"
        names += [f"c{c}_plane_{side}{abs(offset)}" for c in range(channels)]
    return names


def _default_description(model, channels: int, context: int) -> str:
    axes = model.axes or "unknown"
    stacked = f", reading {context} neighbouring plane(s) on each side as extra channels" if context else ""
    return (f"Denoiser for one {axes} dataset ({channels} channel(s){stacked}): a UNet distilled from a TBSN "
            "blind-spot network fitted self-supervised by napari-tbsn on that data's own noise. Not a general "
            "denoiser.")


def _description(folder: Path, *, name, authors, license, config, description, channels, context, low, high,
                 parameters):
    from bioimageio.spec.model import v0_5

    in_names = _channel_names(channels, context)
    scale = high - low
    repeats = len(in_names) // channels
    gain_in = np.tile(1.0 / scale, repeats)
    offset_in = np.tile(-low / scale, repeats)
    # A tile reads the student's margin on each side of the pixels it keeps (its halo), and its
    # size steps on the network's grid: with the halo a multiple of the grid too, every tile a zoo
    # tool cuts starts on the whole plane's grid, where pooling and pixel shuffles give the
    # whole-plane pass's values. The spec wants a tile to keep at least one pixel: one grid step.
    halo, grid = config.margin, config.size_multiple
    input_id, channel_id, y, x = v0_5.TensorId("input"), v0_5.AxisId("channel"), v0_5.AxisId("y"), v0_5.AxisId("x")

    def space_in(axis):
        return v0_5.SpaceInputAxis(id=axis, size=v0_5.ParameterizedSize(min=2 * halo + grid, step=grid))

    def space_out(axis):
        return v0_5.SpaceOutputAxisWithHalo(
            id=axis, size=v0_5.SizeReference(tensor_id=input_id, axis_id=axis), halo=halo)

    float32 = v0_5.IntervalOrRatioDataDescr(type="float32")
    inputs = [v0_5.InputTensorDescr(
        id=input_id,
        description="noisy plane(s) in the data's units: the plane's channels, then its context planes",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(id=channel_id, channel_names=in_names), space_in(y), space_in(x)],
        test_tensor=v0_5.FileDescr(source=folder / "test_input.npy"),
        sample_tensor=v0_5.FileDescr(source=folder / "sample_input.tif"),
        data=float32,
        # Mirror the plane beyond its border, as the student does (numpy's "reflect"). The mode
        # is set explicitly: left at its default it is not written, and `pad: {}` reads back as
        # constant (zero) padding.
        pad=v0_5.ReflectPadding(mode="reflect"),
        # Cast first, so integer data (uint16 cameras) need no cast by the zoo tool.
        preprocessing=[v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32")),
                       *_scale_linear(v0_5, channel_id, gain_in, offset_in)],
    )]
    outputs = [v0_5.OutputTensorDescr(
        id=v0_5.TensorId("output"),
        description="denoised plane in the data's units",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(id=channel_id, channel_names=in_names[:channels]),
              space_out(y), space_out(x)],
        test_tensor=v0_5.FileDescr(source=folder / "test_output.npy"),
        sample_tensor=v0_5.FileDescr(source=folder / "sample_output.tif"),
        data=float32,
        postprocessing=_scale_linear(v0_5, channel_id, scale, low),
    )]
    torch_version = v0_5.Version(torch.__version__.split("+")[0])
    weights = v0_5.WeightsDescr(
        pytorch_state_dict=v0_5.PytorchStateDictWeightsDescr(
            source=folder / "weights.pt",
            architecture=v0_5.ArchitectureFromLibraryDescr(
                callable=v0_5.Identifier("ZooUNet"), import_from="napari_tbsn.network.unet",
                kwargs={key: int(value) for key, value in config.to_dict().items()}),
            pytorch_version=torch_version,
            dependencies=v0_5.FileDescr(source=folder / "environment.yaml"),
        ),
        torchscript=v0_5.TorchscriptWeightsDescr(
            source=folder / "weights_torchscript.pt", pytorch_version=torch_version, parent="pytorch_state_dict"),
    )
    return v0_5.ModelDescr(
        name=name,
        description=description,
        authors=[v0_5.Author(name=author) for author in authors],
        cite=[v0_5.CiteEntry(text=TBSN_CITATION, doi=v0_5.Doi(TBSN_DOI))],
        license=license,
        tags=list(TAGS),
        covers=[v0_5.FileDescr(source=folder / "cover.png")],
        documentation=v0_5.FileDescr(source=folder / "README.md"),
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        config=v0_5.Config(bioimageio=v0_5.BioimageioConfig(
            architecture_type="UNet",
            architecture_description=(f"pixel-unshuffled UNet (shuffle {config.shuffle}, depth {config.depth}, "
                                      f"width {config.width}) with a residual output, reflection-padded"),
            modality="fluorescence light microscopy",
            task="denoising",
            model_parameter_count=parameters,
        )),
    )


def _scale_linear(v0_5, axis, gain, offset) -> list:
    """x * gain + offset per channel, or nothing when that is the identity (which the spec refuses)."""
    gain, offset = [float(g) for g in gain], [float(o) for o in offset]
    if all(g == 1.0 for g in gain) and all(o == 0.0 for o in offset):
        return []
    return [v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearAlongAxisKwargs(axis=axis, gain=gain, offset=offset))]


def _format_values(values) -> str:
    return ", ".join(f"{float(v):.6g}" for v in values)


def _documentation(model, student, name, sample_shape, crop_shape, test_shape, channels, context, low,
                   high) -> str:
    config = student.config
    axes = model.axes or "unknown"
    in_channels = channels * (1 + 2 * context)
    summary = student.summary.describe() if student.summary is not None and student.summary.iterations else \
        "no distillation summary was recorded"
    if context:
        offsets = [*range(-context, 0), *range(1, context + 1)]
        order = ", ".join(["the plane itself", *[f"the plane {o:+d}" for o in offsets]])
        layout = textwrap.dedent(f"""\
            The input stacks {1 + 2 * context} planes as channels: {order} along the stack's Z (else T)
            axis, each with its {channels} channel(s) in order, so input channel `j` is data channel
            `j % {channels}` of plane offset `[0, {", ".join(str(o) for o in offsets)}][j // {channels}]`.
            To denoise plane `z`, stack those planes (napari-tbsn, past an end of the stack, uses the
            plane as far the other way: `z - o` when `z + o` does not exist) and run the model once
            per plane; the output is plane `z`, denoised. Never give a plane as its own context.""")
    else:
        layout = f"The input is one plane with its {channels} channel(s); run the model once per plane."
    return textwrap.dedent("""\
        # {title}

        A denoiser for one dataset, exported by [napari-tbsn](https://github.com/napari-tbsn/napari-tbsn).

        ## What it is

        A UNet *student* distilled from a TBSN (Transformer-based blind-spot network) *teacher*
        that napari-tbsn fitted self-supervised, on the user's own noisy data: no clean images were
        used. The student maps a noisy plane to the teacher's denoised output in one pass; it
        sees every pixel and needs no blind spot, posterior or test-time ensemble.

        It was **fitted to the noise of that data** (that microscope, camera, gain and sample) and
        is not a general denoiser: on other data it may remove structure or leave noise.

        ## The data it was fitted on

        - axes: `{axes}`
        - channels: {channels}; context planes on each side: {context}; model input channels: {in_channels}
        - the sample the test tensors were cut from: shape {sample_shape} (channels, height, width);
          the test input is its centre, {crop_shape}, mirrored by the halo to {test_shape}; the
          test output is the network's output on it, halo included (`sample_input.tif` and
          `sample_output.tif` hold the centre alone)
        - normalisation, per channel (the package's `scale_linear` pre- and postprocessing):
          low = [{low}], high = [{high}]; normalised = (x - low) / (high - low)

        {layout}

        ## Running it

        Input: (batch, {in_channels}, y, x) in the data's own units, any real dtype (the first
        preprocessing step, `ensure_dtype`, casts it to float32); output: (batch, {channels}, y, x)
        in the same units. The network itself would run on any height and width (it pads itself
        by mirror reflection to its grid of {grid} pixels), but its output at a pixel depends on
        the input up to {radius} pixels away, and its pooling on where the grid starts. So the
        output declares a halo of {margin} pixels (that distance on the grid), and the input's
        height and width are {min_size} + n x {grid} pixels: a tile keeps n x {grid} + {grid}
        pixels and reads the halo on each side, and every tile a zoo tool cuts starts on the
        plane's grid, where it gives the whole-plane output exactly. Zoo tools pad the plane by
        the halo (mirror reflection, the input's `pad`) before they tile it. Planes whose height
        or width is not {min_size} + n x {grid} must be padded to such a size first (some tools,
        `bioimageio.core` among them, refuse them otherwise). Within {margin} pixels of the
        plane's border the output depends on the padding and can differ a little from
        napari-tbsn's own, which mirrors only {grid} pixels.

        Student network: width {width}, depth {depth}, pixel shuffle {shuffle},
        {parameters} parameters; {summary}.

        ## Validation

        The package's test input and output are checked by `bioimageio.core` (both weight
        formats reproduce the student's output). The student was distilled against its teacher on
        the same data; its held-out difference from the teacher is stated above when recorded.
        There is no clean ground truth: to validate on unseen data from the same set-up, compare the
        output with the blind-spot teacher's in napari-tbsn, inspect residuals (input minus output,
        which should look like structureless noise), or image a sample twice and compare.

        ## Citation

        {citation} <{url}> (doi: {doi})
        """).format(
        title=name, axes=axes, channels=channels, context=context, in_channels=in_channels,
        sample_shape=tuple(int(s) for s in sample_shape), crop_shape=tuple(int(s) for s in crop_shape),
        test_shape=tuple(int(s) for s in test_shape),
        low=_format_values(low), high=_format_values(high), layout=layout, grid=config.size_multiple,
        radius=config.radius, margin=config.margin, min_size=2 * config.margin + config.size_multiple,
        width=config.width, depth=config.depth,
        shuffle=config.shuffle, parameters=parameter_count(student.network), summary=summary,
        citation=TBSN_CITATION, url=TBSN_URL, doi=TBSN_DOI)
