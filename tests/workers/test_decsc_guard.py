"""DECSC band guard: the blend algebra, that fitting learns a known rule, the shipped guard's
behaviour on a real CAVE crop (nearly clean bands handed back, stripes and Gaussian noise not),
its weights checks, and how ``denoise_cube`` applies it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, WeightsError
from workers.denoise import guard as G
from workers.denoise.api import denoise_cube, load_denoiser
from workers.denoise.guard_train import structured_low_noise

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[1] / "data"


def _cave() -> np.ndarray:
    """Held-out CAVE crop (balloons, 31 × 48 × 48): not in the denoiser's or the guard's training."""
    with np.load(DATA / "decsc" / "cave_balloons_48x48x31.npz") as d:
        return (d["cube"].astype(np.float32) / float(d["full_scale"])).clip(0, 1)


def _band_psnr(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    mse = ((np.clip(x, 0, 1) - ref) ** 2).reshape(ref.shape[0], -1).mean(1)
    return 10 * np.log10(1 / mse)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_denoiser()


def test_gain_terms_give_the_blend_mse() -> None:
    rng = np.random.default_rng(0)
    clean, y, d = (rng.random((3, 5, 6)) for _ in range(3))
    abc = G.gain_terms(clean, y, d)
    for w in (0.0, 0.3, 1.0):
        direct = ((d + w * (y - d) - clean) ** 2).reshape(3, -1).mean(1)
        np.testing.assert_allclose(
            abc[:, 0] + 2 * w * abc[:, 1] + w * w * abc[:, 2], direct, rtol=1e-10
        )


def test_features_leave_nodata_out() -> None:
    """A crop embedded in filled nodata gives the crop's own features when the mask is given."""
    clean = _cave()
    rng = np.random.default_rng(4)
    y = clean + rng.standard_normal(clean.shape).astype(np.float32) * 0.03
    d = clean + rng.standard_normal(clean.shape).astype(np.float32) * 0.005
    s = np.full(31, 0.03)
    crop = G.band_features(y[:, 8:40, 8:40], d[:, 8:40, 8:40], s)
    Y = np.repeat(y.mean(axis=(1, 2), keepdims=True), 48, 1).repeat(48, 2)
    D = Y.copy()
    Y[:, 8:40, 8:40], D[:, 8:40, 8:40] = y[:, 8:40, 8:40], d[:, 8:40, 8:40]
    mask = np.zeros((48, 48), bool)
    mask[8:40, 8:40] = True
    np.testing.assert_allclose(G.band_features(Y, D, s, mask), crop, atol=0.02)
    assert (
        np.abs(G.band_features(Y, D, s) - crop).max() > 0.2
    )  # without the mask the fill distorts them
    with pytest.raises(ConfigError, match="valid mask"):
        G.band_features(Y, D, s, np.zeros((48, 48), bool))


def test_fit_learns_a_known_rule() -> None:
    """Bands whose first feature is low should be handed back (w* ≈ 0.9), the others kept (w* = 0)."""
    rng = np.random.default_rng(1)
    n = 400
    X = rng.standard_normal((n, len(G.FEATURES))).astype(np.float32)
    clean_like = X[:, 0] < 0
    abc = np.where(clean_like[:, None], [1e-4, -1e-4, 1.1e-4], [1e-4, 0.0, 1e-2])
    g = G.fit_guard(X, abc, steps=600, seed=0)
    with torch.no_grad():
        w = g(torch.from_numpy(X)).numpy()
    assert w[clean_like].mean() > 0.8 and w[~clean_like].mean() < 0.05
    with pytest.raises(ConfigError, match="guard training data"):
        G.fit_guard(X[:, :3], abc)


def test_structured_low_noise_is_seeded_and_structured() -> None:
    clean = _cave()
    a = structured_low_noise(clean, np.random.default_rng(3))
    b = structured_low_noise(clean, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    err = np.abs(a - clean).reshape(31, -1).max(1)
    assert (err > 0.2).sum() >= 5  # some bands carry stripes, dead lines or impulses
    assert (err < 0.25).sum() >= 5  # and some are only weakly noisy


def test_guard_hands_back_nearly_clean_bands_on_real_crop(model: torch.nn.Module) -> None:
    """Two nearly clean bands (σ = 2/255) among bands at σ = 40/255: the model smooths them ~8 dB
    below their input; the guard returns them to at least their input quality."""
    clean = _cave()
    sig = np.full(31, 40 / 255)
    sig[[10, 20]] = 2 / 255
    noisy = (
        clean + np.random.default_rng(0).standard_normal(clean.shape) * sig[:, None, None]
    ).astype(np.float32)
    raw, st0 = denoise_cube(model, noisy, guard="off")
    out, st = denoise_cube(model, noisy)
    pin, p_raw, p_out = _band_psnr(noisy, clean), _band_psnr(raw, clean), _band_psnr(out, clean)
    assert st0["guard"] is False and st["guard"] is True and st["guard_bands_half"] >= 2
    for b in (10, 20):
        assert p_raw[b] < pin[b] - 5  # the failure the guard exists for
        assert p_out[b] >= pin[b] - 0.5
    others = np.setdiff1d(np.arange(31), [10, 20])
    assert (
        np.mean(p_out[others]) >= np.mean(p_raw[others]) - 0.1
    )  # noisy bands keep the model's output
    assert p_out.mean() > p_raw.mean() + 0.3


def test_guard_does_not_hand_back_stripes_or_gaussian_noise(model: torch.nn.Module) -> None:
    clean = _cave()
    rng = np.random.default_rng(1)
    sig = np.full(31, 40 / 255)
    sig[20] = 2 / 255
    noisy = (clean + rng.standard_normal(clean.shape) * sig[:, None, None]).astype(np.float32)
    cols = rng.choice(48, size=6, replace=False)
    noisy[20][:, cols] += np.array([0.2, -0.2, 0.15, -0.15, 0.25, -0.25], np.float32)[None, :]
    raw, _ = denoise_cube(model, noisy, guard="off")
    out, _ = denoise_cube(model, noisy)
    pin, p_raw, p_out = _band_psnr(noisy, clean), _band_psnr(raw, clean), _band_psnr(out, clean)
    assert p_out[20] > pin[20] + 3  # the stripes stay removed
    assert p_out[20] >= p_raw[20] - 1.0

    gauss = (clean + rng.standard_normal(clean.shape) * 30 / 255).astype(np.float32)
    raw, _ = denoise_cube(model, gauss, guard="off")
    out, st = denoise_cube(model, gauss)
    assert st["guard_w_max"] < 0.2
    assert abs(_band_psnr(out, clean).mean() - _band_psnr(raw, clean).mean()) < 0.1


def test_guard_keeps_nodata(model: torch.nn.Module) -> None:
    clean = _cave()[:, :24, :24].copy()
    noisy = clean + np.random.default_rng(2).standard_normal(clean.shape).astype(np.float32) * 0.05
    noisy[:, 3, 4] = np.nan
    out, st = denoise_cube(model, noisy)
    assert (
        np.isnan(out[:, 3, 4]).all()
        and np.isfinite(np.delete(out.reshape(31, -1), 3 * 24 + 4, axis=1)).all()
    )
    assert 0.0 <= st["guard_w_mean"] <= st["guard_w_max"] <= 1.0


def test_shipped_guard_belongs_to_the_shipped_weights() -> None:
    """The guard learnt from one DECSC's outputs: retraining DECSC without the guard fails here."""
    import json

    from safetensors import safe_open

    from workers.denoise.spec import SPEC

    with safe_open(str(G.GUARD_FILE), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["decsc_weights_sha256"] == SPEC.weights_sha256
    assert json.loads(meta["features"]) == list(G.FEATURES)
    val = json.loads(meta["validation"])
    assert (
        val["all"]["bands_worse_than_input_after"]
        < val["all"]["bands_worse_than_input_before"] / 10
    )


def test_guard_weights_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = G.load_guard()
    assert isinstance(g, G.BandGuard)
    bad = tmp_path / "decsc_guard.safetensors"
    shutil.copyfile(G.GUARD_FILE, bad)
    raw = bytearray(bad.read_bytes())
    raw[-3] ^= 0xFF
    bad.write_bytes(bytes(raw))
    G.load_guard(bad)  # another file given explicitly: no shipped-hash check, still loadable
    monkeypatch.setattr(G, "GUARD_FILE", bad)  # the shipped location holding a modified file
    with pytest.raises(WeightsError, match="was modified"):
        G.load_guard()
    monkeypatch.undo()
    with pytest.raises(WeightsError, match="not found"):
        G.load_guard(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot be read"):
        G.load_guard(junk)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file(
        G.guard_state(g), str(other), metadata={"features": '["something_else"]', "hidden": "16"}
    )
    with pytest.raises(WeightsError, match="other features"):
        G.load_guard(other)


def test_train_guard_command_on_real_cubes(shared_data: Path, tmp_path: Path) -> None:
    """`hyperdeq train guard` end to end on a few real CAVE scenes (two for training, the two
    held-out ones for validation): a loadable guard with its provenance and validation report."""
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    data = tmp_path / "data"
    (data / "cave").mkdir(parents=True)
    for name in (
        "beads_ms_256.npz",
        "cd_ms_256.npz",
        "balloons_ms_256.npz",
        "real_and_fake_apples_ms_256.npz",
    ):
        (data / "cave" / name).symlink_to(shared_data / "cave" / name)
    out = tmp_path / "g" / "guard.safetensors"
    res = CliRunner().invoke(
        app,
        [
            "train",
            "guard",
            "--data",
            str(data),
            "--out",
            str(out),
            "--patches",
            "8",
            "--val-patches",
            "3",
            "--threads",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    g = G.load_guard(out)
    assert isinstance(g, G.BandGuard)
    rep = json.loads(out.with_suffix(".json").read_text())
    assert len(rep["sha256"]) == 64 and rep["validation"]["all"]["bands"] == 3 * 31
    assert "held-out CAVE patches" in res.output
    res = CliRunner().invoke(
        app, ["train", "guard", "--data", str(tmp_path / "nowhere"), "--out", str(out)]
    )
    assert res.exit_code != 0 and "no CAVE scenes found" in str(res.output) + str(res.exception)


def test_weights_mode_reports_without_applying(model: torch.nn.Module) -> None:
    """``guard="weights"`` (what the tile engine uses) returns the model's output and the weights
    that ``guard=True`` applies."""
    clean = _cave()[:, :24, :24].copy()
    sig = np.full(31, 30 / 255)
    sig[5] = 1 / 255
    noisy = (
        clean + np.random.default_rng(5).standard_normal(clean.shape) * sig[:, None, None]
    ).astype(np.float32)
    raw, _ = denoise_cube(model, noisy, guard="off")
    rep, st = denoise_cube(model, noisy, guard="weights")
    out, st_on = denoise_cube(model, noisy)
    np.testing.assert_array_equal(rep, raw)
    w = np.asarray(st["guard_w"], np.float32)
    assert (
        st["guard_applied"] is False and st_on["guard_applied"] is True and st["guard_n"] == 24 * 24
    )
    np.testing.assert_allclose(out, raw + w[:, None, None] * (noisy - raw), atol=1e-6)
    with pytest.raises(Exception, match="guard must be"):
        denoise_cube(model, noisy, guard="sometimes")


def test_scene_weights_average_tiles_by_valid_pixels() -> None:
    stats = [
        {"guard_w": [0.0, 1.0], "guard_n": 300},
        {"guard_w": [1.0, 0.0], "guard_n": 100},
        {"guard": False},
        None,
        {"guard_w": [0.5, 0.5], "guard_n": 0},
    ]
    np.testing.assert_allclose(G.scene_weights(stats), [0.25, 0.75])
    assert G.scene_weights([{"guard": False}, None]) is None
    with pytest.raises(ConfigError, match="different band counts"):
        G.scene_weights([{"guard_w": [0.1], "guard_n": 5}, {"guard_w": [0.1, 0.2], "guard_n": 5}])
