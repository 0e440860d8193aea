"""Classical denoiser wrappers on a tiny real Pavia Centre crop (skipped without the extra)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pipeline.errors import ConfigError, ModelError
from pipeline.metrics import mpsnr
from pipeline.noise import add_noise_with_info
from workers.baselines import BASELINE_NAMES, CaseInfo, availability, get_baseline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(test_data) -> np.ndarray:
    """Real ROSIS Pavia Centre crop, 13 bands (every 8th) × 16 × 16."""
    cube = np.load(test_data / "denoise_eval" / "crops.npz")["pavia_centre"]
    return np.ascontiguousarray(cube[::8, 8:24, 8:24]).astype(np.float32)


def _need(name: str) -> None:
    ok, why = availability(name)
    if not ok:
        pytest.skip(why)


def test_registry_and_unknown_name():
    assert BASELINE_NAMES == ("fasthyde", "l1hymixde", "wsrrr", "bm4d")
    with pytest.raises(ConfigError, match=r"unknown baseline 'bm3d'.*'fasthyde'.*'none'"):
        get_baseline("bm3d")


def test_case_info_properties():
    info = CaseInfo("band[0,55]", np.array([0.0, 0.3, 0.4]))
    assert not info.iid and info.oracle_sigma == pytest.approx(np.sqrt(0.25 / 3))
    assert CaseInfo("gauss30", np.full(3, 30 / 255)).iid
    with pytest.raises(ConfigError, match="unknown noise case 'gauss'"):
        CaseInfo("gauss", np.ones(3))
    with pytest.raises(ConfigError, match="σ >= 0"):
        CaseInfo("gauss30", np.array([-1.0]))


def test_missing_package_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "bm4d", None
    )  # makes `import bm4d` fail like a missing package
    ok, why = availability("bm4d")
    assert not ok and "baseline 'bm4d' skipped" in why and "--no-deps" in why
    with pytest.raises(ModelError, match="baseline 'bm4d' skipped"):
        get_baseline("bm4d").denoise(
            np.zeros((3, 8, 8), np.float32), CaseInfo("gauss30", np.ones(3))
        )


def test_band_count_mismatch_rejected(tiny):
    _need("wsrrr")
    with pytest.raises(ConfigError, match=r"one σ per band.*\(13, 16, 16\).*3"):
        get_baseline("wsrrr").denoise(tiny, CaseInfo("gauss30", np.ones(3)))


# L1HyMixDe took over 25 s of CPU even on this crop (adaptive median up to 21x21 per band,
# 10 BM3D rounds): it is exercised by the evaluation run, not the unit suite
@pytest.mark.parametrize("name", ["fasthyde", "wsrrr", "bm4d"])
def test_baseline_denoises_real_crop(tiny, name):
    _need(name)
    noisy, sig, _ = add_noise_with_info(tiny, "gauss30", np.random.default_rng(0))
    out = get_baseline(name).denoise(noisy, CaseInfo("gauss30", sig))
    assert out.shape == tiny.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    before = mpsnr(tiny, np.clip(noisy, 0, 1))
    after = mpsnr(tiny, np.clip(out, 0, 1))
    assert after > before + 3.0, (name, before, after)
    assert get_baseline(name).versions()  # versions are recorded for the report
