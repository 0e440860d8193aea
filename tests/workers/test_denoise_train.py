"""Training checkpoints: saved with tensors and plain values only, resumed with weights_only=True."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ReadError
from workers.denoise.api import build_model
from workers.denoise.train import _save_ckpt, load_checkpoint


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = sum(p.float().square().sum() for p in model.parameters())
    loss.backward()
    opt.step()  # the optimizer now has per-parameter state (exp_avg, step, ...)
    rng = np.random.default_rng(7)
    rng.random(3)
    torch_rng = torch.get_rng_state()
    ckpt = tmp_path / "checkpoint.pt"
    _save_ckpt(model, opt, 12, 3.5, rng, ckpt)

    torch.load(ckpt, map_location="cpu", weights_only=True)  # the safe loader accepts it as is
    state = load_checkpoint(ckpt)
    assert state["step"] == 12 and state["elapsed"] == 3.5
    assert torch.equal(state["torch_rng"], torch_rng)

    model2 = build_model("cpu")
    model2.load_state_dict(state["model"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(state["opt"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, s in a["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k])), (i, k)

    rng2 = np.random.default_rng(0)
    rng2.bit_generator.state = state["rng"]
    assert np.array_equal(rng.random(5), rng2.random(5))  # resumes the same random stream


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_hostile_checkpoint_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "model": {},
            "opt": {},
            "step": 0,
            "elapsed": 0.0,
            "rng": _Payload(marker),
            "torch_rng": torch.get_rng_state(),
        },
        ckpt,
    )
    with pytest.raises(ReadError, match="cannot load training checkpoint"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live
    assert marker.exists()


def test_architecture_presets() -> None:
    from pipeline.errors import InputValidationError
    from workers.denoise.api import ARCH_PRESETS

    small, full = build_model("cpu"), build_model("cpu", "full")
    assert full.cfg.shared_features == ARCH_PRESETS["full"]["shared_features"]
    n = [sum(p.numel() for p in m.map.parameters()) for m in (small, full)]
    assert n[1] > 4 * n[0]
    with pytest.raises(InputValidationError, match="unknown DECSC architecture"):
        build_model("cpu", "huge")


@pytest.mark.slow
def test_training_with_loader_workers_on_real_data(shared_data: Path, tmp_path: Path) -> None:
    """Two real steps with batches built in worker processes; the exported weights load back."""
    import json

    from safetensors import safe_open

    from workers.denoise.api import load_denoiser
    from workers.denoise.train import TrainConfig, train

    cfg = TrainConfig(
        data_dir=shared_data,
        out_dir=tmp_path / "run",
        max_steps=2,
        batch=2,
        patch=24,
        loader_workers=2,
        threads=1,
        val_every=1000,
        checkpoint_every=1000,
    )
    weights = train(cfg)
    log = [
        json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    ]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["psnr_noisy"] < 60 for r in steps)
    with safe_open(str(weights), framework="pt") as fh:
        meta = json.loads(fh.metadata()["training"])
    assert meta["steps"] == 2 and meta["arch"] == "shipped" and meta["device"] == "cpu"
    model = load_denoiser("cpu", weights)  # same architecture as the registry: loads and verifies
    assert not model.training


def test_training_with_more_iterations_and_residual_weight(
    shared_data: Path, tmp_path: Path
) -> None:
    """One real step with --train-iters 3 and residual weight 0.2: both reach the log."""
    import json

    from workers.denoise.train import TrainConfig, train

    cfg = TrainConfig(
        data_dir=shared_data,
        out_dir=tmp_path / "run",
        max_steps=1,
        batch=1,
        patch=24,
        threads=1,
        val_every=1000,
        checkpoint_every=1000,
        train_iters=3,
        residual_weight=0.2,
    )
    train(cfg)
    log = [
        json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    ]
    step = [r for r in log if "fp_res" in r][0]
    assert step["iterations"] == 3.0
    # loss = L1 + 0.2 residual
    assert step["loss"] == pytest.approx(step["l1"] + 0.2 * step["fp_res"], rel=1e-4)


def test_training_refuses_cuda_without_a_gpu(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError
    from workers.denoise.train import TrainConfig, train

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="no CUDA device"):
        train(TrainConfig(data_dir=tmp_path, out_dir=tmp_path / "run", device="cuda"))


def test_batch_prefetch_is_seeded_per_step_and_shuts_down_cleanly(tmp_path: Path) -> None:
    """Batches built in worker processes are the same whatever the worker count (seeded per step),
    and closing the prefetcher leaves no worker process behind."""
    import multiprocessing

    from workers.denoise.train import TrainConfig, _BatchPrefetch

    data = Path(__file__).resolve().parents[1] / "data" / "decsc"
    with np.load(data / "cave_balloons_48x48x31.npz") as d:
        cave = [(d["cube"].astype(np.float32) / float(d["full_scale"])).clip(0, 1)]
    cfg = TrainConfig(data_dir=tmp_path, out_dir=tmp_path, batch=2, patch=24)
    got = []
    for workers in (1, 3):
        pf = _BatchPrefetch(cave, [], cfg, 31, start=5, workers=workers, depth=4)
        try:
            got.append([pf.get() for _ in range(3)])
        finally:
            pf.close()
        assert not multiprocessing.active_children()
    for (x1, y1, c1), (x2, y2, c2) in zip(*got, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and c1 == c2
        assert x1.shape == (2, 31, 24, 24) and not torch.equal(x1, y1)
    assert not torch.equal(got[0][0][0], got[0][1][0])  # consecutive steps differ


@pytest.mark.slow
def test_fine_tuning_starts_from_the_given_weights(shared_data: Path, tmp_path: Path) -> None:
    """``init_weights``: training starts from a weights file (here the shipped one) and says so."""
    import json

    from safetensors import safe_open

    from workers.denoise.api import load_denoiser
    from workers.denoise.train import TrainConfig, train
    from workers.registry import WEIGHTS_DIR, get_spec

    shipped = WEIGHTS_DIR / "decsc.safetensors"
    cfg = TrainConfig(
        data_dir=shared_data,
        out_dir=tmp_path / "ft",
        max_steps=1,
        batch=1,
        patch=24,
        lr=1e-9,
        min_lr=1e-9,
        threads=1,
        init_weights=shipped,
        seed=1,
    )
    weights = train(cfg)
    a, b = load_denoiser("cpu"), load_denoiser("cpu", weights)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, atol=1e-6), k  # one step at lr 1e-9: still the starting weights
    with safe_open(str(weights), framework="pt") as fh:
        meta = json.loads(fh.metadata()["training"])
    assert meta["init_sha256"] == get_spec("decsc").weights_sha256
    start = json.loads((tmp_path / "ft" / "train_log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["init_sha256"] == get_spec("decsc").weights_sha256


def test_resume_and_init_weights_conflict(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError
    from workers.denoise.train import TrainConfig

    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(
            data_dir=tmp_path,
            out_dir=tmp_path,
            resume=True,
            init_weights=tmp_path / "w.safetensors",
        )


def test_noise_relative_band_weights() -> None:
    """Equal noise in every band: plain L1 (weights 1); a nearly clean band outweighs a noisy one
    by about (σ_noisy + floor) / (σ_clean + floor); an unknown loss name is refused."""
    from pipeline.errors import ConfigError
    from pipeline.noise import add_noise_with_info
    from workers.denoise.train import LOSS_NOISE_FLOOR, TrainConfig, band_weights

    rng = np.random.default_rng(0)
    clean = rng.uniform(0.2, 0.8, size=(6, 32, 32)).astype(np.float32)
    noisy, sig, _ = add_noise_with_info(clean, "gauss30", rng)
    w = band_weights(torch.from_numpy(clean)[None], torch.from_numpy(noisy)[None])
    assert w.shape == (1, 6, 1, 1)
    torch.testing.assert_close(w, torch.ones_like(w), atol=0.03, rtol=0)
    noisy2 = clean.copy()
    noisy2[0] += 0.3 * rng.standard_normal((32, 32)).astype(np.float32)  # one very noisy band
    w2 = band_weights(torch.from_numpy(clean)[None], torch.from_numpy(noisy2)[None])[0, :, 0, 0]
    assert float(w2.mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(w2[1] / w2[0]) == pytest.approx(
        (0.3 + LOSS_NOISE_FLOOR) / LOSS_NOISE_FLOOR, rel=0.05
    )
    with pytest.raises(ConfigError, match="loss must be one of"):
        TrainConfig(data_dir=Path("."), out_dir=Path("."), loss="l2")
    with pytest.raises(ConfigError, match="residual_weight must be >= 0"):
        TrainConfig(data_dir=Path("."), out_dir=Path("."), residual_weight=-0.1)
    with pytest.raises(ConfigError, match="train_iters >= 1"):
        TrainConfig(data_dir=Path("."), out_dir=Path("."), train_iters=0)
