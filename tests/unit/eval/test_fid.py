"""FID/KID plumbing: the Fréchet formula, PNG-only folders, the reference cache, Inception loading errors, and the
shapes feature network against the renderer."""

import site
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from apex_cli.errors import ApexError, DataError
from apex_cli.eval import fid
from apex_cli.eval.fid import FeatureExtractor, GeneratedReference


class _PooledPixels(torch.nn.Module):
    """Tiny deterministic extractor for plumbing tests: 2x2 average-pooled pixels (12 features at 4 px)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.avg_pool2d(x, 2).flatten(1)


@pytest.fixture
def extractor() -> FeatureExtractor:
    return FeatureExtractor("pooled-pixels", "0" * 64, _PooledPixels(), image_size_px=4)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("APEX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fid"


def _random_images(seed: int, n: int, offset: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.integers(0, 200, (4, 4, 3)) + offset, 0, 255).astype(np.uint8) for _ in range(n)]


def test_frechet_distance_of_unit_gaussians_is_squared_mean_difference():
    mu = np.array([1.0, -2.0, 0.5])
    assert fid.frechet_distance(np.zeros(3), np.eye(3), mu, np.eye(3)) == pytest.approx(mu @ mu, abs=1e-9)


def test_frechet_distance_with_diagonal_covariances_matches_hand_computation():
    # ||(1, 0) - (0, 2)||^2 = 5;  Tr = (1 + 4) + (4 + 9) - 2 * (sqrt(1*4) + sqrt(4*9)) = 18 - 16 = 2.
    value = fid.frechet_distance(np.array([1.0, 0.0]), np.diag([1.0, 4.0]), np.array([0.0, 2.0]), np.diag([4.0, 9.0]))
    assert value == pytest.approx(7.0, abs=1e-9)


def test_kernel_distance_is_reproducible_and_leaves_global_rng_alone():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 8)), rng.normal(loc=0.5, size=(50, 8))
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = fid.kernel_distance(a, b, num_subsets=10)
    assert np.random.rand() == expected_next
    assert fid.kernel_distance(a, b, num_subsets=10) == first
    assert first > fid.kernel_distance(a, a[::-1].copy(), num_subsets=10)


def test_identical_folders_give_zero_fid(tmp_path, extractor):
    images = _random_images(0, 32)
    fid.save_png_images(images, tmp_path / "a")
    fid.save_png_images(images, tmp_path / "b")
    result = fid.compute_fid(tmp_path / "a", tmp_path / "b", features=extractor)
    assert abs(result.fid) < 1e-3
    assert (result.mode, result.ref_name, result.n_images, result.n_ref_images) == ("clean", "b", 32, 32)
    assert result.features == "pooled-pixels"
    assert len(result.ref_hash) == 16
    assert "mode clean" in result.summary() and result.ref_hash in result.summary()


def test_shifted_images_give_higher_fid_and_kid(tmp_path, extractor):
    fid.save_png_images(_random_images(0, 32), tmp_path / "ref")
    fid.save_png_images(_random_images(1, 32), tmp_path / "same")
    fid.save_png_images(_random_images(1, 32, offset=40), tmp_path / "shifted")
    same = fid.compute_fid(tmp_path / "same", tmp_path / "ref", features=extractor)
    shifted = fid.compute_fid(tmp_path / "shifted", tmp_path / "ref", features=extractor)
    assert shifted.fid > 5 * same.fid
    assert shifted.kid > same.kid


def test_reference_statistics_are_cached_in_the_user_cache(tmp_path, extractor, isolated_cache):
    fid.save_png_images(_random_images(0, 16), tmp_path / "a")
    fid.save_png_images(_random_images(1, 16), tmp_path / "ref")
    first = fid.compute_fid(tmp_path / "a", tmp_path / "ref", features=extractor)
    calls_first = extractor.model.calls
    cached = list(isolated_cache.glob("*.npz"))
    assert len(cached) == 1
    assert "ref" in cached[0].name and "pooled-pixels" in cached[0].name and "clean" in cached[0].name
    assert not list(isolated_cache.glob("*.tmp"))

    second = fid.compute_fid(tmp_path / "a", tmp_path / "ref", features=extractor)
    assert extractor.model.calls == calls_first + 1  # only the scored folder, not the reference again
    assert second == first

    site_dirs = [*site.getsitepackages(), site.getusersitepackages(), sys.prefix]
    assert not any(cached[0].resolve().is_relative_to(Path(d).resolve()) for d in site_dirs)


def test_changed_reference_content_misses_the_cache(tmp_path, extractor, isolated_cache):
    fid.save_png_images(_random_images(0, 16), tmp_path / "a")
    fid.save_png_images(_random_images(1, 16), tmp_path / "ref")
    first = fid.compute_fid(tmp_path / "a", tmp_path / "ref", features=extractor)
    fid.save_png_images(_random_images(2, 16), tmp_path / "ref")
    second = fid.compute_fid(tmp_path / "a", tmp_path / "ref", features=extractor)
    assert second.ref_hash != first.ref_hash
    assert len(list(isolated_cache.glob("*.npz"))) == 2


def test_generated_reference_is_hashed_by_spec_and_cached(tmp_path, extractor, isolated_cache):
    fid.save_png_images(_random_images(0, 16), tmp_path / "a")
    generated = []

    def generate():
        generated.append(1)
        return iter(_random_images(0, 16))

    ref = GeneratedReference("random-4px", {"seed": 0, "n_images": 16}, generate)
    first = fid.compute_fid(tmp_path / "a", ref, features=extractor)
    second = fid.compute_fid(tmp_path / "a", ref, features=extractor)
    assert abs(first.fid) < 1e-3 and second == first
    assert len(generated) == 1
    assert first.ref_name == "random-4px" and first.n_ref_images == 16


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("APEX_CACHE_DIR", str(tmp_path / "apex"))
    assert fid.cache_dir() == tmp_path / "apex" / "fid"
    monkeypatch.delenv("APEX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fid.cache_dir() == tmp_path / "xdg" / "apex" / "fid"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fid.cache_dir() == tmp_path / "home" / ".cache" / "apex" / "fid"


def test_folder_without_png_is_a_data_error(tmp_path, extractor):
    fid.save_png_images(_random_images(0, 4), tmp_path / "ref")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds 0 PNG file\(s\)"):
        fid.compute_fid(tmp_path / "empty", tmp_path / "ref", features=extractor)


def test_folder_with_jpeg_images_is_a_data_error(tmp_path, extractor):
    fid.save_png_images(_random_images(0, 4), tmp_path / "ref")
    (tmp_path / "jpegs").mkdir()
    for index, image in enumerate(_random_images(1, 3)):
        Image.fromarray(image).save(tmp_path / "jpegs" / f"{index}.jpg")
    with pytest.raises(DataError, match=r"holds 3 non-PNG image file\(s\) \(e.g. 0.jpg\); FID reads PNG files only"):
        fid.compute_fid(tmp_path / "jpegs", tmp_path / "ref", features=extractor)


def test_missing_inception_file_names_the_file_and_the_option(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    with pytest.raises(ApexError) as err:
        fid.load_inception(tmp_path / "weights" / "inception-2015-12-05.pt")
    message = str(err.value)
    assert "\n" not in message
    assert "inception-2015-12-05.pt" in message and "--feature-weights" in message


def test_default_inception_location_offline_is_a_user_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fid, "CLEANFID_INCEPTION_DIR", tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ApexError, match=r"inception-2015-12-05.pt are missing and could not be downloaded") as err:
        fid.load_feature_extractor("inception")
    assert "--feature-weights" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "inception-2015-12-05.pt").exists()


def test_corrupt_inception_file_is_a_user_error(tmp_path):
    (tmp_path / "inception-2015-12-05.pt").write_bytes(b"not a torchscript archive")
    with pytest.raises(ApexError, match="cannot load Inception weights"):
        fid.load_inception(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Shapes feature network against the shapes renderer


def _renderer_folder(folder: Path, seed: int, n: int, blur_radius: float | None = None) -> Path:
    from apex_cli.data.shapes import training_stream

    stream = training_stream(seed, size=32)
    images = [next(stream)[1] for _ in range(n)]
    if blur_radius is not None:
        images = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(blur_radius))) for im in images]
    fid.save_png_images(images, folder)
    return folder


def test_shipped_shapes_feature_weights_are_small_and_give_128_features():
    assert fid.SHAPES_FEATURES_FILE.stat().st_size < 2_000_000
    extractor = fid.load_feature_extractor("shapes")
    with torch.no_grad():
        features = extractor.model(torch.full((2, 3, 32, 32), 128.0))
    assert features.shape == (2, 128)
    assert (extractor.name, extractor.image_size_px) == ("shapes", 32)


def test_missing_shapes_feature_weights_is_a_user_error(tmp_path):
    with pytest.raises(ApexError, match="shapes feature weights not found"):
        fid.load_feature_extractor("shapes", tmp_path / "nope.safetensors")


def test_renderer_vs_renderer_is_low_and_blurred_is_clearly_higher(tmp_path):
    # Shipped weights, 200 vs 200 images: other seed FID 12.5 / KID -0.05, blur r=1 FID 20.9 / KID 0.17
    # (bench/fid_sanity.py has 1,000 vs 1,000: 3.1 vs 13.6). FID at 200 images carries a large small-sample bias.
    reference = fid.shapes_reference(seed=0, n_images=200)
    other_seed = fid.compute_fid(_renderer_folder(tmp_path / "seed1", 1, 200), reference, features="shapes")
    blurred = fid.compute_fid(
        _renderer_folder(tmp_path / "blur", 1, 200, blur_radius=1.0), reference, features="shapes"
    )
    assert other_seed.ref_name == "shapes-32px-seed0-n200" and other_seed.features == "shapes"
    assert other_seed.fid < 16.0
    assert blurred.fid > 1.4 * other_seed.fid
    assert blurred.kid > other_seed.kid + 0.1
