"""Training of the band guard (:mod:`workers.denoise.guard`): data from the shipped DECSC.

Seeded, augmented patches of the training cubes (:mod:`workers.denoise.data`) get one noise case
each (the protocol's cases plus :data:`STRUCTURED_LOW`), go through DECSC at its evaluation
setting, and give the guard's features and the per-band gain terms it is fitted to
(:func:`workers.denoise.guard.fit_guard`); the held-out CAVE scenes give the validation report.
``hyperdeq train guard`` runs :func:`train_guard`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.noise import NOISE_CASES, add_noise
from workers.registry import sha256_file

from .api import arch_weights, load_denoiser
from .data import HELD_OUT_CAVE, load_cave, load_training_data, sample_patch
from .decsc import estimate_sigma
from .guard import band_features, fit_guard, gain_terms, save_guard

#: an extra noise case for the guard's data only: nearly clean bands (σ_b ~ U(0, 15)/255), some with
#: stripes, dead lines or impulses. The protocol's ``mixture`` pairs structured noise with σ ≥ 10/255
#: only, so without this case the guard learns "low σ̂ → hand the input back" and returns the
#: stripes of a clean but striped band (a pushbroom sensor's typical defect)
STRUCTURED_LOW = "structured-low"


def structured_low_noise(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``clean`` (B, H, W) + weak Gaussian noise; each band also gets, with probability 0.2 each,
    stripes (offsets U(−0.25, 0.25) on 5–15 % of the columns or rows), dead lines (set to 0) or
    impulses (density 1–30 %, salt and pepper)."""
    b, h, w = clean.shape
    sig = np.asarray(rng.uniform(0, 15 / 255, b))
    y = clean.astype(np.float64) + rng.standard_normal(clean.shape) * sig[:, None, None]
    kinds = np.asarray(
        rng.choice(4, size=b, p=[0.4, 0.2, 0.2, 0.2])
    )  # none, stripes, dead lines, impulses
    for k in np.nonzero(kinds)[0]:
        rows = bool(rng.random() < 0.5)
        band = y[k].T if rows else y[k]  # a view: lines along the other axis
        n_lines = band.shape[1]
        cols = np.asarray(
            rng.choice(n_lines, size=max(1, int(rng.uniform(0.05, 0.15) * n_lines)), replace=False)
        )
        if kinds[k] == 1:
            band[:, cols] += np.asarray(rng.uniform(-0.25, 0.25, size=cols.size))[None, :]
        elif kinds[k] == 2:
            band[:, cols] = 0.0
        else:
            hit = rng.random((h, w)) < float(rng.choice([0.01, 0.05, 0.1, 0.3]))
            salt = rng.random((h, w)) < 0.5
            y[k][hit & salt] = 1.0
            y[k][hit & ~salt] = 0.0
    return y.astype(np.float32)


def collect(
    model: nn.Module,
    cubes: list[np.ndarray],
    n_patches: int,
    *,
    seed: int,
    patch: int = 64,
    cases: tuple[str, ...] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features and gain terms of ``n_patches`` seeded, augmented training patches.

    Each patch: a random 31-band window of a random cube (as in training), one noise case drawn
    uniformly (the protocol's cases plus :data:`STRUCTURED_LOW`), DECSC at its evaluation setting,
    then :func:`band_features` / :func:`gain_terms`.
    """
    rng = np.random.default_rng(seed)
    cases = tuple(cases or (*NOISE_CASES, STRUCTURED_LOW))
    bands = int(model.cfg.bands)  # type: ignore[union-attr,arg-type]
    X, A, used = [], [], []
    t0 = time.perf_counter()
    for i in range(n_patches):
        c = sample_patch(cubes[int(rng.integers(len(cubes)))], bands, patch, rng)
        case = cases[int(rng.integers(len(cases)))]
        y = structured_low_noise(c, rng) if case == STRUCTURED_LOW else add_noise(c, case, rng)
        with torch.no_grad():
            yt = torch.from_numpy(y)[None]
            s = estimate_sigma(yt)
            d = model(yt, s)[0][0].numpy()
        X.append(band_features(y, d, s[0].numpy()))
        A.append(gain_terms(c, y, d))
        used += [case] * bands
        if progress and (i + 1) % 50 == 0:
            print(
                f"  guard data: {i + 1}/{n_patches} patches, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    return np.concatenate(X), np.concatenate(A), used


def validation_report(
    w: np.ndarray, abc: np.ndarray, cases: list[str] | np.ndarray
) -> dict[str, Any]:
    """MPSNR gain (dB, mean over bands and patches) and bands worse than the input, per noise case."""
    cases = np.asarray(cases)
    mse0 = abc[:, 0]
    mse = abc[:, 0] + 2 * w * abc[:, 1] + w * w * abc[:, 2]
    mse_in = abc[:, 0] + 2 * abc[:, 1] + abc[:, 2]
    gain = -10 * (np.log10(np.maximum(mse, 1e-10)) - np.log10(np.maximum(mse0, 1e-10)))
    out: dict[str, Any] = {}
    for c in ["all", *sorted(set(cases.tolist()))]:
        m = np.ones(len(cases), bool) if c == "all" else cases == c
        out[c] = {
            "gain_db": round(float(gain[m].mean()), 3),
            "bands_worse_than_input_before": int(np.sum(mse0[m] > mse_in[m])),
            "bands_worse_than_input_after": int(np.sum(mse[m] > mse_in[m])),
            "bands": int(m.sum()),
        }
    return out


def train_guard(
    data: Path,
    out: Path,
    *,
    patches: int = 480,
    val_patches: int = 120,
    seed: int = 0,
    hidden: int = 16,
    steps: int = 2000,
    weight_decay: float = 1e-4,
    arch: str = "shipped",
    weights: Path | None = None,
    say: Any = print,
) -> tuple[Path, str, dict[str, Any]]:
    """Collect guard data with the shipped DECSC (training cubes: CAVE minus the held-out scenes,
    a quarter of the patches from the remote-sensing crops; never the test scenes), fit the guard,
    report it on held-out CAVE patches and write ``out`` (safetensors). Returns (path, sha256, report).

    The guard learns from the outputs of one set of DECSC weights (``weights``, default the shipped
    file of ``arch``), whose sha256 it records: new DECSC weights need a new guard."""
    if patches < 8 or val_patches < 1:
        raise ConfigError(
            f"need at least 8 training patches and 1 validation patch, got {patches!r} / {val_patches!r}"
        )
    model = load_denoiser(arch=arch, weights=weights)
    cave, extras, names = load_training_data(Path(data))
    n_rs = patches // 4 if extras else 0
    t0 = time.perf_counter()
    say(
        f"guard: {patches} training patches ({n_rs} remote-sensing), {val_patches} validation patches"
    )
    X1, A1, c1 = collect(model, cave, patches - n_rs, seed=seed + 11)
    parts = [(X1, A1)]
    if n_rs:
        X2, A2, _ = collect(model, extras, n_rs, seed=seed + 12)
        parts.append((X2, A2))
    X = np.concatenate([p[0] for p in parts])
    A = np.concatenate([p[1] for p in parts])
    val_cubes = [
        load_cave(Path(data) / "cave" / n)
        for n in HELD_OUT_CAVE
        if (Path(data) / "cave" / n).is_file()
    ]
    if not val_cubes:
        raise ConfigError(
            f"held-out CAVE scenes {HELD_OUT_CAVE!r} not found under {str(Path(data) / 'cave')!r}"
        )
    Xv, Av, cv = collect(model, val_cubes, val_patches, seed=seed + 13)
    guard = fit_guard(X, A, seed=seed, steps=steps, hidden=hidden, weight_decay=weight_decay)
    with torch.no_grad():
        report = validation_report(guard(torch.from_numpy(Xv)).numpy(), Av, cv)
    meta = {
        "decsc_arch": arch,
        "training_cubes": names,
        "decsc_weights_sha256": sha256_file(Path(weights))
        if weights is not None
        else arch_weights(arch)[1],
        "patches": patches,
        "val_patches": val_patches,
        "seed": seed,
        "steps": steps,
        "hidden": hidden,
        "weight_decay": weight_decay,
        "validation": report,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    sha = save_guard(guard, Path(out), meta)
    return Path(out), sha, report
