"""FID and KID through clean-fid (mode ``clean``), with reference statistics cached in the user cache.

Pipeline (clean-fid's own code wherever it has it):

    PNG files --ResizeDataset (RGB; mode "clean": PIL bicubic on float32, no re-quantisation)-->
    float [0, 255] NCHW --feature extractor--> features (N, D) --> mean mu, covariance sigma
    FID = frechet_distance(mu, sigma, mu_ref, sigma_ref)     (cleanfid.fid.frechet_distance)
    KID = kernel_distance(features, features_ref)            (cleanfid.fid.kernel_distance)

Two feature extractors, and their scores are not comparable with each other:

* ``inception``: clean-fid's InceptionV3 torchscript (``inception-2015-12-05.pt``, 2048-d pool features at 299 px),
  the standard one for real images. clean-fid downloads it into ``/tmp`` on first use; an offline machine points
  ``feature_weights`` (``--feature-weights``) at a pre-seeded copy of that file.
* ``shapes``: a small CNN trained on the labels of the shapes renderer (128-d features at 32 px), shipped with the
  package in ``apex_cli/eval/weights/shapes_features.safetensors`` so FID on the shapes world runs offline.
  ``apex_cli/eval/shapes_features.py`` holds its training code and the command that rebuilt the shipped file.

Every result carries the mode, the reference name and the reference hash, so a score is never shown without them.

What this module adds on top of clean-fid, and why:

* PNG only. ``cleanfid.fid.get_folder_features`` reads any image extension (JPEG included, which shifts FID), so the
  folder is listed here and the files handed to ``cleanfid.fid.get_files_features``.
* A reference-statistics cache outside site-packages. ``cleanfid.fid.make_custom_stats`` writes into clean-fid's
  package folder, with no feature-extractor identity in the file name.
* KID with a custom feature extractor: ``cleanfid.fid.compute_kid`` always builds Inception.
* Loading the Inception torchscript from a given path without a download attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import urllib.error
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.downloads_helper import inception_url
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import make_resizer
from PIL import Image

from apex_cli.errors import ApexError, DataError

MODE = "clean"
"""clean-fid mode used for every score (resize with PIL bicubic on float32 values, no re-quantisation)."""

INCEPTION_FILE = "inception-2015-12-05.pt"
"""The file name clean-fid expects for its InceptionV3 torchscript."""

CLEANFID_INCEPTION_DIR = Path("/tmp")
"""Where clean-fid looks for (and downloads) ``INCEPTION_FILE`` on Linux and macOS (``cleanfid/features.py``)."""

SHAPES_FEATURES_FILE = Path(__file__).parent / "weights" / "shapes_features.safetensors"
"""Packaged weights of the shapes feature network."""

FeatureName = Literal["inception", "shapes"]

_NON_PNG_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp", ".npy"}
_HASH_CHARS = 16  # hex characters of a sha256 kept in names, cache keys and results


@dataclass(frozen=True)
class FeatureExtractor:
    """A network mapping images to feature vectors, with the identity of its weights.

    Attributes:
        name: ``"inception"``, ``"shapes"`` or another name for a custom network.
        weights_hash: sha256 (hex) of the weights; part of every reference-statistics cache key.
        model: ``nn.Module`` in eval mode taking float ``[0, 255]`` images of shape ``[N, 3, H, W]`` and returning
            features of shape ``[N, D]``.
        image_size_px: Side length images are resized to before ``model`` (clean-fid's "clean" PIL bicubic resize).
    """

    name: str
    weights_hash: str
    model: torch.nn.Module
    image_size_px: int

    @property
    def fn_resize(self) -> Callable[[np.ndarray], np.ndarray]:
        """clean-fid's ``clean`` resizer (PIL bicubic on float32, clipped to [0, 255]) to ``image_size_px``."""
        return make_resizer("PIL", False, "bicubic", (self.image_size_px, self.image_size_px))


@dataclass(frozen=True)
class GeneratedReference:
    """Reference images produced by code (such as the shapes renderer) instead of read from a folder.

    Attributes:
        name: Short name shown next to every score, e.g. ``"shapes-32px-seed0-n1000"``.
        spec: JSON-serialisable description of the generator; its hash is the reference hash and part of the
            cache key, so it must change whenever the images would.
        generate: Called once on a cache miss; yields ``(H, W, 3)`` uint8 RGB images.
    """

    name: str
    spec: Mapping[str, Any]
    generate: Callable[[], Iterable[np.ndarray]]


@dataclass(frozen=True, eq=False)
class ReferenceStatistics:
    """Feature statistics of a reference set: ``mu`` ``[D]``, ``sigma`` ``[D, D]`` and ``features`` ``[N, D]``."""

    name: str
    ref_hash: str
    mode: str
    feature_name: str
    feature_hash: str
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    cache_file: Path


@dataclass(frozen=True)
class FidResult:
    """One FID/KID measurement and everything needed to read it.

    Attributes:
        fid: Fréchet distance between the feature Gaussians of the images and of the reference.
        kid: Kernel Inception Distance (clean-fid's unbiased MMD with a cubic polynomial kernel) on the same features.
        mode: clean-fid mode, always ``"clean"``.
        ref_name: Name of the reference set.
        ref_hash: Content hash of the reference images (or of the generator spec), first 16 hex characters.
        n_images: Number of PNG files scored.
        n_ref_images: Number of reference images.
        features: Feature extractor name (``"inception"`` or ``"shapes"``).
        feature_hash: Hash of the feature extractor's weights, first 16 hex characters.
    """

    fid: float
    kid: float
    mode: str
    ref_name: str
    ref_hash: str
    n_images: int
    n_ref_images: int
    features: str
    feature_hash: str

    def summary(self) -> str:
        """One line with the scores and their provenance, e.g. for the CLI."""
        return (
            f"FID {self.fid:.4f}  KID {self.kid:.6f}  ({self.n_images} images vs reference {self.ref_name} "
            f"#{self.ref_hash}, {self.n_ref_images} images; mode {self.mode}, {self.features} features "
            f"#{self.feature_hash})"
        )


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    Computed by ``cleanfid.fid.frechet_distance`` (scipy ``sqrtm``; it adds 1e-6 to the diagonals when the
    product is singular and drops an imaginary part below 1e-3). Despite the name, FID is this squared distance.

    Args:
        mu1: Mean of the first Gaussian, shape ``[D]``.
        sigma1: Covariance of the first Gaussian, shape ``[D, D]``.
        mu2: Mean of the second Gaussian, shape ``[D]``.
        sigma2: Covariance of the second Gaussian, shape ``[D, D]``.

    Returns:
        ``d^2`` as a Python float.
    """
    with warnings.catch_warnings():
        # clean-fid 0.1.35 passes sqrtm(disp=False), deprecated in SciPy 1.17 and removed in 1.18.
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated", category=DeprecationWarning)
        return float(cleanfid_fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def kernel_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """KID: unbiased MMD^2 with kernel k(x, y) = (x.y / D + 1)^3, averaged over random subsets.

    Computed by ``cleanfid.fid.kernel_distance``, in float64 (the cubic kernel loses too much in float32). It draws
    the subsets from NumPy's global random state; this wrapper seeds that state with ``seed`` and restores it
    afterwards, so KID is reproducible.

    Args:
        features1: Features of the first set, shape ``[N1, D]``.
        features2: Features of the second set, shape ``[N2, D]``.
        num_subsets: Number of random subsets averaged.
        max_subset_size: Subset size cap (the subset size is ``min(N1, N2, max_subset_size)``).
        seed: Seed of the subset draws.

    Returns:
        KID as a Python float.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(
            cleanfid_fid.kernel_distance(
                features1.astype(np.float64), features2.astype(np.float64), num_subsets, max_subset_size
            )
        )
    finally:
        np.random.set_state(state)


def cache_dir() -> Path:
    """Folder for cached FID reference statistics: ``$APEX_CACHE_DIR/fid``, else ``$XDG_CACHE_HOME/apex/fid``,
    else ``~/.cache/apex/fid``."""
    if os.environ.get("APEX_CACHE_DIR"):
        root = Path(os.environ["APEX_CACHE_DIR"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "apex"
    else:
        root = Path.home() / ".cache" / "apex"
    return root.expanduser() / "fid"


def list_png_files(folder: Path) -> list[Path]:
    """All PNG files under ``folder`` (recursively, as clean-fid does), sorted.

    Raises:
        DataError: If ``folder`` is not a directory, holds other image files (JPEG and the like), or holds fewer
            than two PNG files (a covariance needs two).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a folder")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    others = [path for path in files if path.suffix.lower() in _NON_PNG_IMAGE_SUFFIXES]
    pngs = [path for path in files if path.suffix.lower() == ".png"]
    if others:
        raise DataError(
            f"{folder} holds {len(others)} non-PNG image file(s) (e.g. {others[0].name}); FID reads PNG files only",
            hint="Save the images as PNG (lossless) or move the other files out of the folder.",
        )
    if len(pngs) < 2:
        raise DataError(f"{folder} holds {len(pngs)} PNG file(s); FID needs at least 2 (.png)")
    return pngs


def load_inception(feature_weights: Path | None = None, *, device: str | torch.device = "cpu") -> FeatureExtractor:
    """clean-fid's InceptionV3 torchscript (mode ``clean``: 299 px input, 2048-d features), as clean-fid builds it.

    Args:
        feature_weights: Path to a local ``inception-2015-12-05.pt`` (or a folder holding it); nothing is
            downloaded. ``None`` uses clean-fid's own location, ``/tmp/inception-2015-12-05.pt``, which clean-fid
            downloads if it is missing.
        device: Device the network runs on.

    Raises:
        ApexError: If the file is missing (and, for ``None``, cannot be downloaded) or cannot be loaded.
    """
    if feature_weights is None:
        folder = CLEANFID_INCEPTION_DIR
        try:
            with _quiet_jit_load():
                model = InceptionV3W(str(folder), download=True, resize_inside=False)
        except RuntimeError as err:  # torch.jit.load on a truncated or foreign file
            raise ApexError(f"cannot load Inception weights {folder / INCEPTION_FILE}: {err}".splitlines()[0]) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ApexError(
                f"Inception weights {folder / INCEPTION_FILE} are missing and could not be downloaded ({reason}); "
                f"put clean-fid's {INCEPTION_FILE} there or pass --feature-weights PATH/TO/{INCEPTION_FILE}",
                hint=f"clean-fid downloads the file from {inception_url}",
            ) from None
        path = folder / INCEPTION_FILE
    else:
        path = Path(feature_weights).expanduser()
        if path.is_dir():
            path = path / INCEPTION_FILE
        if not path.is_file():
            raise ApexError(
                f"Inception weights not found at {path}; put clean-fid's {INCEPTION_FILE} there "
                f"or point --feature-weights at that file",
                hint=f"clean-fid downloads the file from {inception_url}",
            )
        if path.name != INCEPTION_FILE:
            raise ApexError(f"--feature-weights {path}: clean-fid loads the Inception file only as {INCEPTION_FILE}")
        try:
            with _quiet_jit_load():
                model = InceptionV3W(str(path.parent), download=False, resize_inside=False)
        except RuntimeError as err:
            raise ApexError(f"cannot load Inception weights {path}: {err}".splitlines()[0]) from None
    return FeatureExtractor("inception", _file_sha256(path), model.to(device).eval(), image_size_px=299)


def load_shapes_features(
    feature_weights: Path | None = None, *, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """The shapes feature network (32 px input, 128-d features) from the packaged or a given safetensors file.

    Raises:
        ApexError: If the weights file does not exist.
    """
    from apex_cli.eval.shapes_features import IMAGE_SIZE_PX, load_feature_net

    path = SHAPES_FEATURES_FILE if feature_weights is None else Path(feature_weights).expanduser()
    if not path.is_file():
        raise ApexError(
            f"shapes feature weights not found at {path}",
            hint="Rebuild them with the command in apex_cli/eval/shapes_features.py.",
        )
    model = load_feature_net(path).to(device).eval()
    return FeatureExtractor("shapes", _file_sha256(path), model, image_size_px=IMAGE_SIZE_PX)


def load_feature_extractor(
    features: FeatureName, feature_weights: Path | None = None, *, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """Build the ``inception`` or ``shapes`` feature extractor; ``feature_weights`` overrides its weights file."""
    if features == "inception":
        return load_inception(feature_weights, device=device)
    if features == "shapes":
        return load_shapes_features(feature_weights, device=device)
    raise ApexError(f"unknown FID features {features!r}; choose 'inception' or 'shapes'")


def extract_features(
    files: Sequence[Path],
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Features ``[N, D]`` (float32) of image files, through ``cleanfid.fid.get_files_features`` in mode ``clean``."""
    return cleanfid_fid.get_files_features(
        [str(path) for path in files],
        extractor.model,
        num_workers=0,
        batch_size=batch_size,
        device=torch.device(device),
        mode=MODE,
        custom_fn_resize=extractor.fn_resize,
        verbose=False,
    )


def reference_statistics(
    ref: Path | GeneratedReference,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
) -> ReferenceStatistics:
    """Feature statistics of a reference set, read from the cache or computed and cached.

    The cache file, in ``cache_dir()``, is keyed by the reference name, its content hash, the feature extractor
    (name and weights hash) and the mode. It is written atomically (temporary file, then ``os.replace``).

    Args:
        ref: A folder of PNG files (name: the folder name; hash: sha256 of the files' contents, order- and
            name-independent) or a ``GeneratedReference`` (hash: sha256 of its spec).
        extractor: Feature extractor.
        batch_size: Images per forward pass.
        device: Device of the forward passes.
        use_cache: Read and write the cache; ``False`` recomputes and writes nothing.
    """
    if isinstance(ref, GeneratedReference):
        name = ref.name
        ref_hash = _sha256(json.dumps(dict(ref.spec), sort_keys=True).encode())
    else:
        files = list_png_files(Path(ref))
        name = Path(ref).resolve().name
        ref_hash = _sha256(b"".join(sorted(bytes.fromhex(_file_sha256(path)) for path in files)))
    ref_hash = ref_hash[:_HASH_CHARS]
    feature_hash = extractor.weights_hash[:_HASH_CHARS]
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    cache_file = cache_dir() / f"{safe_name}-{ref_hash}_{extractor.name}-{feature_hash}_{MODE}.npz"

    if use_cache and cache_file.is_file():
        with np.load(cache_file) as stored:
            features = stored["features"]
            mu, sigma = stored["mu"], stored["sigma"]
    else:
        if isinstance(ref, GeneratedReference):
            with tempfile.TemporaryDirectory(prefix="apex-fid-ref-") as tmp:
                files = save_png_images(ref.generate(), Path(tmp))
                features = extract_features(files, extractor, batch_size=batch_size, device=device)
        else:
            features = extract_features(files, extractor, batch_size=batch_size, device=device)
        mu, sigma = np.mean(features, axis=0), np.cov(features, rowvar=False)
        if use_cache:
            _save_npz_atomically(cache_file, mu=mu, sigma=sigma, features=features)
    return ReferenceStatistics(name, ref_hash, MODE, extractor.name, feature_hash, mu, sigma, features, cache_file)


def compute_fid(
    images_dir: Path,
    ref: Path | GeneratedReference,
    *,
    features: FeatureName | FeatureExtractor = "inception",
    feature_weights: Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
    kid_seed: int = 0,
) -> FidResult:
    """FID and KID of the PNG files in ``images_dir`` against a reference set, clean-fid mode ``clean``.

    Args:
        images_dir: Folder of PNG files (searched recursively; other image formats are an error).
        ref: Reference: a folder of PNG files or a ``GeneratedReference`` (see ``shapes_reference``).
        features: ``"inception"`` (standard, for real images), ``"shapes"`` (offline, shapes world only) or a
            ready ``FeatureExtractor``.
        feature_weights: Weights file of the named extractor instead of its default (``--feature-weights``).
        batch_size: Images per forward pass.
        device: Device of the forward passes.
        use_cache: Use the reference-statistics cache (see ``reference_statistics``).
        kid_seed: Seed of KID's random subsets.

    Raises:
        DataError: If a folder holds no PNG files or holds other image files.
        ApexError: If the feature extractor's weights are missing.
    """
    files = list_png_files(Path(images_dir))
    extractor = (
        features
        if isinstance(features, FeatureExtractor)
        else load_feature_extractor(features, feature_weights, device=device)
    )
    reference = reference_statistics(ref, extractor, batch_size=batch_size, device=device, use_cache=use_cache)
    image_features = extract_features(files, extractor, batch_size=batch_size, device=device)
    mu, sigma = np.mean(image_features, axis=0), np.cov(image_features, rowvar=False)
    return FidResult(
        fid=frechet_distance(mu, sigma, reference.mu, reference.sigma),
        kid=kernel_distance(image_features, reference.features, seed=kid_seed),
        mode=MODE,
        ref_name=reference.name,
        ref_hash=reference.ref_hash,
        n_images=len(files),
        n_ref_images=len(reference.features),
        features=extractor.name,
        feature_hash=reference.feature_hash,
    )


def shapes_reference(seed: int, n_images: int, image_size_px: int = 32) -> GeneratedReference:
    """The first ``n_images`` images of the shapes renderer's ``training_stream(seed, size=image_size_px)``.

    The spec hashes the renderer's source file too, so a change to the renderer invalidates cached statistics.
    """
    from apex_cli.data import shapes

    spec = {
        "generator": "apex_cli.data.shapes.training_stream",
        "seed": seed,
        "n_images": n_images,
        "image_size_px": image_size_px,
        "renderer_sha256": _file_sha256(Path(shapes.__file__)),
    }

    def generate() -> Iterator[np.ndarray]:
        stream = shapes.training_stream(seed, size=image_size_px)
        for _ in range(n_images):
            yield next(stream)[1]

    return GeneratedReference(f"shapes-{image_size_px}px-seed{seed}-n{n_images}", spec, generate)


def save_png_images(images: Iterable[np.ndarray], folder: Path) -> list[Path]:
    """Write ``(H, W, 3)`` uint8 RGB arrays as ``000000.png``, ``000001.png``, ... in ``folder``; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        path = folder / f"{index:06d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def _save_npz_atomically(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def _quiet_jit_load() -> Iterator[None]:
    # clean-fid's Inception is a torchscript file; torch 2.14 deprecates torch.jit.load with a FutureWarning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch.jit.load` is deprecated", category=FutureWarning)
        yield


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
