"""Scene-scale DEQ-Unmix: fit once per scene on a bounded sample, then apply tile by tile.

``fit_scene`` estimates the endmembers' start from a seeded sample of valid pixels and fits
the network and the endmembers on distinct windows of the scene (blind: no ground truth);
``apply_fit`` unmixes any tile of that scene. Memory is bounded by ``sample_pixels`` and ``fit_tiles × fit_tile_size²``,
whatever the scene size (the scene may be dask-backed and larger than memory).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from pipeline import LOCAL_SCHEDULER
from pipeline.errors import ConfigError, InputValidationError, ModelError, WriteError
from pipeline.scene import good_band_index, valid_mask, validate_scene
from workers.allocator import tune_allocator
from workers.unmix.classical import (
    MINVOL_HINGE_C,
    MINVOL_HINGE_RANGE,
    estimate_n_endmembers,
    fcls,
    minvol,
    nfindr,
    noise_floor,
    noise_variances,
    vca,
)
from workers.unmix.deq_unmix import DEQUnmix

FIT_FORMAT = "hyperdeq-unmix-fit/1"
_TENSORS = "unmix_fit.safetensors"
_META = "unmix_fit.json"

#: default number of Adam steps of fit_scene (the CLI commands use the same value); with early
#: stopping on the held-out-band validation loss, one 100×100 scene fits in well under a minute
#: on one CPU thread
DEFAULT_EPOCHS = 60
#: the linear mixing model "explains" a sample when the minimum-volume simplex reconstructs it
#: within this factor of the noise floor (chosen on the tuning sets: exact synthetic mixtures
#: 0.989–0.996 at any sample size; mixtures with illumination and endmember variability at
#: 25 dB 1.024–1.17, where the minimum-volume simplex misses materials; Samson 8.0, Jasper 5.0)
LMM_TOLERANCE = 1.01

#: otherwise, the best pure-pixel candidate (an extraction or the mean of its k purest pixels)
#: within this factor of the noise floor means a linear mixture with pure pixels, and it is the
#: start; above it the pure pixels vary beyond the noise and the class means are (measured: the
#: two USGS test mixtures at 30 dB 1.15 and 1.27; Samson 8.8, Jasper Ridge 4.3, Cuprite 4.1,
#: HYDICE Urban crop 4.9–9.8)
PURE_TOLERANCE = 2.0

#: defaults of the blind per-scene fit (recorded in provenance)
DEFAULTS: dict[str, Any] = {
    "hidden": 32,
    "lr_net": 2e-3,
    # endmembers are parametrised multiplicatively, E = E_init·exp(S) (positive, relative steps
    # of the same size for dark and bright spectra); this is the Adam step on S. It is small
    # because the blind held-out-band loss pulls the endmembers toward the scene's variability,
    # away from the reference abundances (checked on the tuning scenes: benchmarks/unmix_tuning.py)
    "lr_endmembers": 5e-4,
    "holdout_fraction": 0.5,
    "train_max_iter": 20,
    "train_crop": 32,  # each step trains on one random crop of this size per fit tile
    "tol": 1e-4,
    # per-pixel stopping: only slow pixels use the cap (the scaled mixing model on the Pavia
    # University crop, P = 8: 93.9 % of the pixels converged at 150 iterations, 99.9 % at 300)
    "eval_max_iter": 300,
    # Anderson history of the abundance solver (training and inference). With many endmembers
    # (P = 8 from HySime on the EnMAP demo crop and the Pavia University crop) a history of 5
    # left 3-6 % of the pixels above tol at the cap; 3 leaves under 1 % and is faster
    "anderson_m": 3,
    # endmember start: "vca", "nfindr", "minvol", or "best": the minimum-volume simplex if it
    # reconstructs the sample at the noise floor (a linear mixture); else the extractions (VCA,
    # N-FINDR) and the means of their k purest pixels (k in init_topk) if one reconstructs the
    # sample within PURE_TOLERANCE of the noise floor (pure pixels); else the mean of the purest
    # init_class_fraction of the pixels each endmember dominates (largest FCLS abundance). The
    # lowest FCLS reconstruction error on the sample wins within each family.
    "init": "best",
    "init_class_fraction": 0.25,
    "init_topk": [10, 30, 100],
    # early stopping: a fixed held-out-band validation loss every val_every epochs (epoch 0 =
    # the start); the best state is kept; stop after `patience` evaluations without improvement
    "val_every": 5,
    "patience": 2,
    # mixing model: "linear" (Y = E·A), "scaled" (Y = s·E·A, a per-pixel brightness s), or "auto":
    # the untrained map on the validation crops scores both on `mixing_splits` band splits
    # (solve on half the bands, reconstruct the other half) and takes scaled when its held-out
    # error is more than `mixing_margin` below linear's (tuning scenes: Samson 78 % below, the
    # variability sets 21-26 % (P = 4) and 3-7 % (P = 6), exact synthetic mixtures 0-1 % above;
    # margin 0.05 vs 0.02 compared by `python -m benchmarks.unmix_tuning`, docs/models/deq_unmix.md)
    "mixing": "auto",
    "mixing_margin": 0.05,
    "mixing_splits": 8,
}

MIXING_MODELS = ("auto", "linear", "scaled")

#: the kept state's solver must converge on at least this share of the validation pixels at the
#: inference cap (:func:`_keep_converging_state`)
MIN_CONVERGED = 0.95


@dataclass
class UnmixFit:
    """A fitted DEQ-Unmix model of one scene (endmembers, network, provenance)."""

    endmembers: np.ndarray  # (L_good, P) float32
    names: list[str]
    wavelengths: np.ndarray  # (L_good,) nm, NaN when unknown
    good_band: np.ndarray  # (B,) bool, the scene's good-band mask
    state: dict[str, torch.Tensor]  # correction-net parameters ("net.*")
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        E = np.asarray(self.endmembers)
        if E.ndim != 2 or E.shape[1] < 2:
            raise ModelError(f"endmembers must be L×P with P >= 2, got shape {E.shape!r}")
        if len(self.names) != E.shape[1]:
            raise ModelError(
                f"{len(self.names)!r} names for {E.shape[1]!r} endmembers; give one name each"
            )
        if int(np.sum(self.good_band)) != E.shape[0] or len(self.wavelengths) != E.shape[0]:
            raise ModelError(
                f"endmembers have {E.shape[0]!r} bands but good_band marks "
                f"{int(np.sum(self.good_band))!r} and there are {len(self.wavelengths)!r} "
                "wavelengths; they must agree"
            )

    @property
    def n_endmembers(self) -> int:
        return int(self.endmembers.shape[1])

    @property
    def mixing(self) -> str:
        """The mixing model in words: ``linear (Y = E·A)`` or ``scaled (Y = s·E·A, ...)``, with the
        held-out gain where the ``auto`` rule chose it."""
        rec = self.provenance.get("mixing", {})
        scaled = bool(self.config.get("scaled", False))
        text = "scaled (Y = s·E·A, per-pixel brightness s)" if scaled else "linear (Y = E·A)"
        if rec.get("gain") is not None:
            text += (
                f", chosen on held-out bands: scaled {-100 * rec['gain']:+.0f} % error vs linear"
            )
        return text

    def model(self) -> DEQUnmix:
        """Rebuild the module (eval mode) from the stored endmembers, state and config."""
        c = self.config
        # fresh, aligned copies: tensors memory-mapped from a file can take other SIMD paths, and
        # last-bit differences must not make a reloaded fit differ from the original
        m = DEQUnmix(
            torch.tensor(np.array(self.endmembers, dtype=np.float32, copy=True)),
            hidden=int(c.get("hidden", DEFAULTS["hidden"])),
            tol=float(c.get("tol", DEFAULTS["tol"])),
            max_iter=int(c.get("max_iter", DEFAULTS["train_max_iter"])),
            eval_max_iter=int(c.get("eval_max_iter", DEFAULTS["eval_max_iter"])),
            backward_max_iter=int(c.get("max_iter", DEFAULTS["train_max_iter"])),
            m=int(c.get("m", DEFAULTS["anderson_m"])),
            scaled=bool(c.get("scaled", False)),
        )
        m.net.load_state_dict({k.removeprefix("net."): v for k, v in self.state.items()})
        return m.eval()

    def save(self, directory: str | Path) -> Path:
        """Write ``unmix_fit.safetensors`` (tensors) + ``unmix_fit.json`` (the rest); no pickle."""
        from safetensors.torch import save_file

        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
            tensors = {
                "endmembers": torch.from_numpy(
                    np.ascontiguousarray(self.endmembers, dtype=np.float32)
                ),
                "wavelengths": torch.from_numpy(
                    np.ascontiguousarray(self.wavelengths, dtype=np.float64)
                ),
                "good_band": torch.from_numpy(np.ascontiguousarray(self.good_band, dtype=np.uint8)),
            }
            tensors.update({k: v.detach().contiguous().cpu() for k, v in self.state.items()})
            save_file(tensors, str(d / _TENSORS), metadata={"format": FIT_FORMAT})
            meta = {
                "format": FIT_FORMAT,
                "names": self.names,
                "config": self.config,
                "provenance": self.provenance,
            }
            (d / _META).write_text(json.dumps(meta, indent=1, default=_json_default))
        except OSError as exc:
            raise WriteError(
                f"cannot write the unmixing fit to {str(d)!r}: {exc}; choose a writable directory"
            ) from exc
        return d

    @classmethod
    def load(cls, directory: str | Path) -> UnmixFit:
        """Read a fit written by :meth:`save`."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / _TENSORS).is_file() or not (d / _META).is_file():
            raise ModelError(
                f"no unmixing fit in {str(d)!r} (expected {_TENSORS!r} and {_META!r}); "
                "run fit_scene(...).save(directory) first"
            )
        meta = json.loads((d / _META).read_text())
        if meta.get("format") != FIT_FORMAT:
            raise ModelError(
                f"{str(d / _META)!r} has format {meta.get('format')!r}, expected {FIT_FORMAT!r}; "
                "refit the scene with this version"
            )
        t = {k: v.clone() for k, v in load_file(str(d / _TENSORS)).items()}
        return cls(
            endmembers=np.array(t.pop("endmembers").numpy(), copy=True),
            wavelengths=np.array(t.pop("wavelengths").numpy(), copy=True),
            good_band=t.pop("good_band").numpy().astype(bool),
            state=t,
            names=list(meta["names"]),
            config=dict(meta["config"]),
            provenance=dict(meta["provenance"]),
        )


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)!r}")


# ------------------------------------------------------------------ sampling


def _gather(data: Any, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Spectra (L, k) at pixel positions; dask arrays read only the chunks they touch."""
    if hasattr(data, "vindex"):
        # dask's vindex puts the point dimension first: (k, L), whatever k and L are (a shape
        # test would pick the wrong axis when k == L)
        return np.asarray(data.vindex[:, ys, xs].compute(scheduler=LOCAL_SCHEDULER)).T
    return np.asarray(data[:, ys, xs])


def sample_pixels_from(scene: xr.DataArray, n: int, seed: int) -> tuple[np.ndarray, dict]:
    """A seeded sample of up to ``n`` valid pixels over the good bands: ``(L_good, k)`` float64.

    Rejection sampling on the validity mask, so memory is the mask plus the sample.
    """
    good = good_band_index(scene)
    valid = np.asarray(valid_mask(scene).values)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise InputValidationError(
            f"scene {scene.attrs.get('source', '')!r} has no valid pixel (every pixel has a "
            "non-finite good band); check the nodata value or the crop"
        )
    k = min(int(n), n_valid)
    rng = np.random.default_rng(seed)
    H, W = valid.shape
    if k == n_valid:
        ys, xs = np.nonzero(valid)
    else:
        chosen: set[int] = set()
        while len(chosen) < k:
            cand = rng.integers(0, H * W, size=2 * (k - len(chosen)) + 16)
            for c in cand[valid.ravel()[cand]]:
                chosen.add(int(c))
                if len(chosen) == k:
                    break
        flat = np.sort(np.fromiter(chosen, dtype=np.int64))
        ys, xs = np.unravel_index(flat, (H, W))
    data = scene.isel(band=good).data
    Ys = _gather(data, ys, xs).astype(np.float64)
    rec = {
        "sample_pixels": k,
        "valid_pixels": n_valid,
        "seed": seed,
        "method": "uniform over valid pixels",
    }
    return Ys, rec


def window_starts(n: int, t: int) -> list[int]:
    """Starts of the fewest windows of length ``t`` that cover ``[0, n)``, spread evenly (the first
    at 0, the last ending at ``n``); one window at 0 when ``n <= t``."""
    if n <= t:
        return [0]
    k = -(-n // t)
    return [round(i * (n - t) / (k - 1)) for i in range(k)]


def _sample_tiles(
    scene: xr.DataArray, count: int, size: int, seed: int, fill: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Up to ``count`` distinct fit tiles ``(N, L, th, tw)``, nodata filled with ``fill``, and their record.

    The candidates are the windows of the grid that covers the scene with the fewest
    ``size × size`` windows (:func:`window_starts`: overlapping only as much as the scene size
    needs); a scene no larger than ``size`` is one window, the whole scene. Windows with at least
    50 % valid pixels are taken in a seeded random order without repeats, so the count is
    ``min(count, usable windows)``: a small scene is not fed to the fit several times per step.
    """
    good = good_band_index(scene)
    H, W = scene.sizes["y"], scene.sizes["x"]
    th, tw = int(min(size, H)), int(min(size, W))
    valid = np.asarray(valid_mask(scene).values)
    ys, xs = window_starts(H, th), window_starts(W, tw)
    grid = [(y0, x0) for y0 in ys for x0 in xs]
    usable = [g for g in grid if valid[g[0] : g[0] + th, g[1] : g[1] + tw].mean() >= 0.5]
    if not usable:
        raise InputValidationError(
            f"no {th}×{tw} window of scene {scene.attrs.get('source', '')!r} is at least half valid; "
            "lower fit_tile_size or check the nodata mask"
        )
    rng = np.random.default_rng(seed + 1)
    chosen = [usable[i] for i in rng.permutation(len(usable))[: int(count)]]
    tiles: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for y0, x0 in chosen:
        v = valid[y0 : y0 + th, x0 : x0 + tw]
        cube = np.asarray(
            scene.isel(band=good, y=slice(y0, y0 + th), x=slice(x0, x0 + tw)).values,
            dtype=np.float32,
        )
        tiles.append(np.where(v[None], cube, fill[:, None, None].astype(np.float32)))
        masks.append(v)
    rec = {
        "count": len(chosen),
        "requested": int(count),
        "size": [th, tw],
        "origins_yx": [[int(y0), int(x0)] for y0, x0 in chosen],
        "grid": [len(ys), len(xs)],
        "usable_windows": len(usable),
        "seed": seed + 1,
        "method": "distinct windows of the grid covering the scene, at least half valid, seeded order",
    }
    return np.stack(tiles), np.stack(masks), rec


# ------------------------------------------------------------------ endmember start


def class_pure_means(
    Ys: np.ndarray, E: np.ndarray, A: np.ndarray, fraction: float, min_pixels: int = 10
) -> tuple[np.ndarray, list[int]]:
    """Every endmember of ``E`` replaced by the mean of the purest ``fraction`` of the sample
    pixels it dominates (its class: the pixels where its FCLS abundance in ``A`` is the largest),
    at least ``min_pixels`` of them (the ``min_pixels`` largest abundances over the whole sample
    where the class is smaller). Returns the new ``E`` and the number of pixels averaged each.

    Why: a real material's pure pixels vary (illumination, depth, moisture, noise that is
    correlated across bands); VCA and N-FINDR return its most extreme pixels, and the means of
    its few purest pixels are still extremes. The typical pure spectrum is the mean over the
    core of the region the material dominates; the class size scales that core with the
    material's extent, so a rare material is averaged over few pixels only."""
    lab = np.argmax(A, axis=0)
    out = E.copy()
    counts: list[int] = []
    for j in range(E.shape[1]):
        idx = np.flatnonzero(lab == j)
        k = max(int(min_pixels), int(round(fraction * idx.size)))
        if idx.size < k:
            top = np.argsort(-A[j])[:k]
        else:
            top = idx[np.argsort(-A[j, idx], kind="stable")[:k]]
        out[:, j] = Ys[:, top].mean(axis=1)
        counts.append(int(top.size))
    return out, counts


def init_endmembers(
    Ys: np.ndarray,
    P: int,
    seed: int,
    method: str = "best",
    topk: list[int] | tuple[int, ...] = (10, 30, 100),
    *,
    class_fraction: float = 0.25,
) -> tuple[np.ndarray, dict]:
    """Blind endmember start from the pixel sample ``Ys`` (L×N): ``(E (L×P) ≥ 0, record)``.

    ``method="best"`` (no ground truth) first asks whether the linear mixing model explains the
    sample: the minimum-volume simplex (:func:`minvol`, started from VCA) is fitted, and if its
    FCLS reconstruction RMSE is within ``LMM_TOLERANCE`` of the noise floor (:func:`noise_floor`,
    what a perfect P-endmember model would leave), the data are a linear mixture and the
    minimum-volume simplex is the start (it needs no pure pixels). Otherwise (spectral
    variability, nonlinear mixing, outliers: every real scene measured so far, where the
    minimum-volume simplex is inflated by them) the candidates are VCA and N-FINDR with every
    endmember replaced by a mean of pure sample pixels, scored by their FCLS reconstruction RMSE
    on the sample; the lowest wins. First the extractions themselves and each with every
    endmember replaced by the mean of its ``k`` purest pixels (``k`` in ``topk``, only
    ``k <= N/(4P)``): if the best of them reconstructs the sample within ``PURE_TOLERANCE`` of the
    noise floor, the scene is a linear mixture with pure pixels and that candidate is the start.
    Otherwise (the pure pixels vary far beyond the noise: every real scene measured), the
    candidates are the **class means** instead: every endmember the mean of the purest
    ``class_fraction`` of the pixels it dominates (:func:`class_pure_means`); reconstruction error
    cannot choose between the two families, it always prefers the most extreme simplex.
    """
    _check_init_args(method, class_fraction)
    if method == "minvol":
        E, info = minvol(Ys, P, seed=seed)
        return np.clip(E, 0.0, None), {"method": "minvol", "seed": seed, "minvol": info}
    base = _extractions(Ys, P, seed, method)
    if method != "best":
        name, E, idx_list = base[0]
        return E, {"method": name, "seed": seed, "sample_indices": idx_list}
    return _best_start(Ys, P, seed, base, topk, class_fraction)


def _check_init_args(method: str, class_fraction: float) -> None:
    """Reject an unknown start rule or a class fraction outside (0, 1] before any extraction runs."""
    if method not in ("vca", "nfindr", "minvol", "best"):
        raise ConfigError(f"init must be 'vca', 'nfindr', 'minvol' or 'best', got {method!r}")
    if not 0.0 < float(class_fraction) <= 1.0:
        raise ConfigError(f"init_class_fraction must be in (0, 1], got {class_fraction!r}")


def _extractions(
    Ys: np.ndarray, P: int, seed: int, method: str
) -> list[tuple[str, np.ndarray, list[int]]]:
    """The pure-pixel extractions the rule needs (VCA, N-FINDR or both, VCA first, clipped to
    ``>= 0``) with the sample indices they picked; VCA first because "best" starts minvol from it."""
    base: list[tuple[str, np.ndarray, list[int]]] = []
    if method in ("vca", "best"):
        E, idx = vca(Ys, P, seed=seed)
        base.append(("vca", np.clip(E, 0.0, None), idx.tolist()))
    if method in ("nfindr", "best"):
        E, idx = nfindr(Ys, P, seed=seed)
        base.append(("nfindr", np.clip(E, 0.0, None), idx.tolist()))
    return base


def _fcls_rmse(Ys: np.ndarray, E: np.ndarray) -> tuple[float, np.ndarray]:
    """FCLS reconstruction RMSE of the sample with endmembers ``E`` and the abundances: the score
    every candidate start is ranked by (no ground truth)."""
    A = fcls(Ys, E)
    return float(np.sqrt(np.mean((Ys - E @ A) ** 2))), A


def _best_start(
    Ys: np.ndarray,
    P: int,
    seed: int,
    base: list[tuple[str, np.ndarray, list[int]]],
    topk: list[int] | tuple[int, ...],
    class_fraction: float,
) -> tuple[np.ndarray, dict]:
    """The ``"best"`` rule of :func:`init_endmembers`: the minimum-volume simplex where it reaches
    the noise floor, else the pure-pixel or the class-mean candidates (:func:`_choose_start`)."""
    noise_var = noise_variances(Ys)  # one noise estimate for the floor and the hinge
    floor = noise_floor(Ys, P, noise_var=noise_var)
    E_mv, mv_info = minvol(Ys, P, seed=seed, start=base[0][1], noise_var=noise_var)
    E_mv = np.clip(E_mv, 0.0, None)
    r_mv, _ = _fcls_rmse(Ys, E_mv)
    rec: dict[str, Any] = {
        "seed": seed,
        "noise_floor_rmse": floor,
        "minvol_rmse": r_mv,
        "minvol_rmse_over_floor": r_mv / floor if floor > 0 else None,
        "lmm_tolerance": LMM_TOLERANCE,
        "minvol": {**mv_info, "hinge_c": MINVOL_HINGE_C, "hinge_range": list(MINVOL_HINGE_RANGE)},
        "sample_indices": {b[0]: b[2] for b in base},
    }
    if floor > 0 and r_mv <= LMM_TOLERANCE * floor:
        rec.update(
            method="minvol",
            selection="linear model explains the sample (minimum-volume "
            "simplex at the noise floor): minimum-volume start",
        )
        return E_mv, rec
    cands, classes = _start_candidates(Ys, P, base, topk, class_fraction, rec)
    return _choose_start(cands, classes, floor, rec)


def _start_candidates(
    Ys: np.ndarray,
    P: int,
    base: list[tuple[str, np.ndarray, list[int]]],
    topk: list[int] | tuple[int, ...],
    class_fraction: float,
    rec: dict[str, Any],
) -> tuple[list[tuple[str, np.ndarray, float]], list[tuple[str, np.ndarray, float]]]:
    """The two families of starts with their FCLS RMSE: pure-pixel candidates (each extraction and
    the means of its ``k`` purest pixels, ``2 <= k <= N/(4P)``) and class means
    (:func:`class_pure_means`); the pixels averaged per class go to ``rec["class_pixels"]``."""
    N = Ys.shape[1]
    cands: list[tuple[str, np.ndarray, float]] = []
    classes: list[tuple[str, np.ndarray, float]] = []
    for name, E, _ in base:
        r, A = _fcls_rmse(Ys, E)
        cands.append((name, E, r))
        for k in sorted({int(k) for k in topk}):
            if k < 2 or k > N // (4 * P):
                continue
            top = np.argsort(-A, axis=1)[:, :k]
            Ek = np.stack([Ys[:, top[i]].mean(axis=1) for i in range(P)], axis=1)
            cands.append((f"{name}-top{k}", Ek, _fcls_rmse(Ys, Ek)[0]))
        Ec, counts = class_pure_means(Ys, E, A, float(class_fraction))
        classes.append((f"{name}-class{class_fraction:g}", Ec, _fcls_rmse(Ys, Ec)[0]))
        rec.setdefault("class_pixels", {})[name] = counts
    return cands, classes


def _choose_start(
    cands: list[tuple[str, np.ndarray, float]],
    classes: list[tuple[str, np.ndarray, float]],
    floor: float,
    rec: dict[str, Any],
) -> tuple[np.ndarray, dict]:
    """The best pure-pixel candidate if it is within ``PURE_TOLERANCE`` of the noise floor (a linear
    mixture with pure pixels), else the best class mean; ``rec`` says which and why."""
    best = min(cands, key=lambda c: c[2])
    rec["pure_pixel_rmse_over_floor"] = best[2] / floor if floor > 0 else None
    if not (floor > 0 and best[2] <= PURE_TOLERANCE * floor):
        name, E, _ = min(classes, key=lambda c: c[2])
        rec.update(
            method=name,
            selection="spectral variability (no pure-pixel simplex within "
            f"{PURE_TOLERANCE:g}x the noise floor): class means, the lowest FCLS reconstruction "
            "RMSE among them",
            candidates_rmse={c[0]: c[2] for c in classes},
            pure_pixel_candidates_rmse={c[0]: c[2] for c in cands},
        )
        return np.clip(E, 0.0, None), rec
    name, E, _ = best
    rec.update(
        method=name,
        selection="pure pixels: lowest FCLS reconstruction RMSE among the "
        "extractions and their purest-pixel means"
        f" (within {PURE_TOLERANCE:g}x the noise floor: a linear mixture with pure pixels, "
        "where averaging a class would only shrink the simplex)",
        candidates_rmse={c[0]: c[2] for c in cands},
    )
    return np.clip(E, 0.0, None), rec


# ------------------------------------------------------------------ fit


def hysime_criterion(Ys: np.ndarray) -> dict[str, Any]:
    """The evidence for HySime's number of endmembers: its criterion (projected noise power ×2
    minus projected data power; every negative direction is kept) for every eigen-direction, and
    the data and noise powers of the first 12. Recomputes :func:`workers.unmix.classical.hysime`'s quantities (same noise estimate)."""
    from workers.unmix.classical import estimate_noise

    Y = np.asarray(Ys, dtype=np.float64)
    L, N = Y.shape
    W, Rw = estimate_noise(Y)
    X = Y - W
    Rx = X @ X.T / N
    U = np.linalg.svd(Rx)[0]
    Rw = Rw + np.trace(Rx) / L / 1e5 * np.eye(L)
    Py = np.einsum("li,lk,ki->i", U, Y @ Y.T / N, U)
    Pn = np.einsum("li,lk,ki->i", U, Rw, U)
    cost = 2 * Pn - Py
    return {
        "criterion": "2·noise power − data power per eigen-direction of the signal correlation; "
        "the subspace dimension is the number of negative values",
        "negative": int(np.sum(cost < 0)),
        "cost": [float(f"{c:.4g}") for c in cost],
        "data_power_first12": Py[:12].tolist(),
        "noise_power_first12": Pn[:12].tolist(),
    }


def training_loss_falls(curve: list[float]) -> bool:
    """Whether the per-step training losses still fall: the least-squares slope over all steps so far
    is negative. Each step scores a random crop and band split, so single steps are noisy; the
    slope over the whole curve is the trend."""
    if len(curve) < 2:
        return False
    y = np.asarray(curve, dtype=np.float64)
    x = np.arange(y.size, dtype=np.float64)
    return bool(np.polyfit(x, y, 1)[0] < 0)


def _check_fit_args(
    n_endmembers: int | None,
    sample_pixels: int,
    fit_tiles: int,
    fit_tile_size: int,
    max_epochs: int,
) -> None:
    if n_endmembers is not None and n_endmembers < 2:
        raise ConfigError(f"n_endmembers must be >= 2 or None (estimate), got {n_endmembers!r}")
    if sample_pixels < 10:
        raise ConfigError(f"sample_pixels must be >= 10, got {sample_pixels!r}")
    if fit_tiles < 1 or fit_tile_size < 4:
        raise ConfigError(
            f"need fit_tiles >= 1 and fit_tile_size >= 4, got {fit_tiles!r} and {fit_tile_size!r}"
        )
    if max_epochs < 0:
        raise ConfigError(f"max_epochs must be >= 0, got {max_epochs!r}")


def fit_scene(
    scene: xr.DataArray,
    n_endmembers: int | None = None,
    *,
    seed: int = 0,
    sample_pixels: int = 20000,
    fit_tiles: int = 8,
    fit_tile_size: int = 64,
    max_epochs: int = DEFAULT_EPOCHS,
    options: dict[str, Any] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> UnmixFit:
    """Fit DEQ-Unmix blindly to one canonical scene (dims band, y, x; NaN nodata).

    1. seeded sample of valid pixels on the good bands; ``P`` given or from HySime;
    2. the start of ``E`` from that sample (:func:`init_endmembers`: the minimum-volume simplex
       where the linear model explains the sample to its noise floor, else VCA / N-FINDR /
       purest-pixel averages or class means, the one with the lowest FCLS reconstruction error);
    3. the fit tiles: up to ``fit_tiles`` distinct, at least half valid windows of the grid that
       covers the scene with ``fit_tile_size`` windows (:func:`_sample_tiles`; a scene no larger
       than that is one tile, the whole scene);
    4. up to ``max_epochs`` Adam steps on a random crop of every fit tile, on the correction net
       and on ``S`` in ``E = E_start·exp(S)``; every ``val_every`` steps a fixed held-out-band
       validation loss is computed and the best state (the start included) is kept, with early
       stopping after ``patience`` evaluations without improvement, not counting those where
       the start is still the best state and the training loss still falls
       (:func:`training_loss_falls`); the record says why the fit stopped (``stop_reason``) and
       why it kept its start (``kept_start``), and how many pixels of the validation crops the
       solver converged on at the inference cap (``solver_check``). Loss: band-split
       self-supervision: each step solves the fixed point on a random half of the bands and scores
       the reconstruction ``‖Y − E·A*‖²`` on the other half (noise is independent across bands,
       so the held-out error tracks the clean error and rewards spatially coherent abundances),
       relative to the held-out signal power.
    """
    _check_fit_args(n_endmembers, sample_pixels, fit_tiles, fit_tile_size, max_epochs)
    validate_scene(scene)
    tune_allocator()
    opts = _fit_options(options)
    t_start = time.perf_counter()
    Ys, sample_rec = sample_pixels_from(scene, sample_pixels, seed)
    P, p_rec = _endmember_count(Ys, n_endmembers)
    E0, init_rec = init_endmembers(
        Ys,
        P,
        seed,
        str(opts["init"]),
        list(opts["init_topk"]),
        class_fraction=float(opts["init_class_fraction"]),
    )
    fill = E0.mean(axis=1)
    tiles, tmask, tiles_rec = _sample_tiles(scene, fit_tiles, fit_tile_size, seed, fill)

    torch.manual_seed(seed)
    model = _start_model(E0, opts)
    data = _fit_data(tiles, tmask, opts, seed)
    mixing_rec = _choose_mixing(model, data, opts, seed)
    cfg = _TrainSettings(
        max_epochs=max_epochs,
        val_every=int(opts["val_every"]),
        patience=int(opts["patience"]),
        lr_net=float(opts["lr_net"]),
        lr_endmembers=float(opts["lr_endmembers"]),
    )
    state = _train(model, data, cfg, seed, progress)
    solver_check = _keep_converging_state(model, data, P, opts, state)
    records = {
        "sample": sample_rec,
        "n_endmembers": p_rec,
        "endmember_init": init_rec,
        "fit_tiles": tiles_rec,
        "mixing": mixing_rec,
    }
    return _fit_result(scene, model, E0, opts, max_epochs, records, state, solver_check, t_start)


def _start_model(E0: np.ndarray, opts: dict[str, Any]) -> DEQUnmix:
    """The untrained module from the endmember start ``E0`` and the fit options."""
    return DEQUnmix(
        torch.from_numpy(E0.astype(np.float32)),
        hidden=int(opts["hidden"]),
        tol=float(opts["tol"]),
        max_iter=int(opts["train_max_iter"]),
        eval_max_iter=int(opts["eval_max_iter"]),
        backward_max_iter=int(opts["train_max_iter"]),
        m=int(opts["anderson_m"]),
    )


def _fit_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``options``; an unknown name is an error (a typo would
    otherwise be ignored silently)."""
    opts = {**DEFAULTS, **(options or {})}
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown fit options {sorted(unknown)!r}; valid: {sorted(DEFAULTS)!r}")
    if opts["mixing"] not in MIXING_MODELS:
        raise ConfigError(
            f"fit option mixing must be one of {list(MIXING_MODELS)!r}, got {opts['mixing']!r}"
        )
    if int(opts["mixing_splits"]) < 1 or not 0.0 <= float(opts["mixing_margin"]) < 1.0:
        raise ConfigError(
            f"need mixing_splits >= 1 and mixing_margin in [0, 1), got {opts['mixing_splits']!r} "
            f"and {opts['mixing_margin']!r}"
        )
    return opts


def _endmember_count(Ys: np.ndarray, n_endmembers: int | None) -> tuple[int, dict[str, Any]]:
    """``P`` and its record: given, or HySime's estimate on the sample with its evidence; it must
    not exceed the sample's pixels or bands (no extraction could find more)."""
    if n_endmembers is None:
        P, p_rec = estimate_n_endmembers(Ys)
        p_rec["evidence"] = hysime_criterion(Ys)
    else:
        P, p_rec = int(n_endmembers), {"method": "given", "p": int(n_endmembers)}
    if P > min(Ys.shape):
        raise ConfigError(
            f"{P!r} endmembers cannot be extracted from {Ys.shape[1]!r} pixels × {Ys.shape[0]!r} "
            "bands; lower n_endmembers or sample more pixels"
        )
    return P, p_rec


@dataclass(frozen=True)
class _TrainSettings:
    """The training loop's settings: step count, validation cadence, patience, Adam steps."""

    max_epochs: int
    val_every: int
    patience: int
    lr_net: float
    lr_endmembers: float


@dataclass(frozen=True)
class _FitData:
    """What the fit trains and validates on: the fit tiles ``(N, L, th, tw)`` with their validity
    masks ``(N, 1, th, tw)``, the training crop size, the number of held-out bands per step, and the
    fixed validation set (the central crop of every tile with a band split of its own seed)."""

    tiles: torch.Tensor
    mask: torch.Tensor
    crop: tuple[int, int]
    n_hold: int
    val_tiles: torch.Tensor
    val_mask: torch.Tensor
    val_fit: torch.Tensor | None
    val_score: torch.Tensor


@dataclass
class _FitState:
    """The training loop's state: curves, the best validated state (endmembers, net parameters)
    and the early-stopping bookkeeping that ends up in the fit record."""

    best_state: tuple[torch.Tensor, dict[str, torch.Tensor]]
    stop_reason: str
    curve: list[float] = field(default_factory=list)
    iters: list[float] = field(default_factory=list)
    val_curve: list[list[float]] = field(default_factory=list)
    best_val: float = np.inf
    best_epoch: int = 0
    bad: int = 0
    stopped_early: bool = False
    # validations not counted against patience: the start still best, loss falling
    waited: list[int] = field(default_factory=list)
    kept_start: str | None = None
    # every validated state (the start at epoch 0 included): (validation loss, epoch, (E, net))
    validated: list[tuple[float, int, tuple[torch.Tensor, dict[str, torch.Tensor]]]] = field(
        default_factory=list
    )
    # validated states passed over because their solver converged on too few pixels at the cap
    unconverged: list[dict[str, Any]] = field(default_factory=list)


def _band_split(
    g: torch.Generator, L: int, n_hold: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A random split of the ``L`` bands: the bands the solver sees (``None``: all) and the
    ``n_hold`` held-out bands the reconstruction is scored on (all bands when none are held out)."""
    if not n_hold:
        return None, torch.ones(L, dtype=torch.bool)
    perm = torch.randperm(L, generator=g)
    fit_mask = torch.ones(L, dtype=torch.bool)
    fit_mask[perm[:n_hold]] = False
    return fit_mask, ~fit_mask


def _fit_data(tiles: np.ndarray, tmask: np.ndarray, opts: dict[str, Any], seed: int) -> _FitData:
    """The fit tiles as tensors, the crop size and held-out band count from ``opts``, and the fixed
    validation crops (central, one per tile) with their band split (seed ``seed + 3``)."""
    Yt = torch.from_numpy(tiles)
    M = torch.from_numpy(tmask[:, None].astype(np.float32))
    L = Yt.shape[1]
    n_hold = (
        max(1, int(round(float(opts["holdout_fraction"]) * L)))
        if opts["holdout_fraction"] > 0
        else 0
    )
    th, tw = int(Yt.shape[-2]), int(Yt.shape[-1])
    ch, cw = int(min(int(opts["train_crop"]), th)), int(min(int(opts["train_crop"]), tw))
    cy, cx = (th - ch) // 2, (tw - cw) // 2
    Yv, Mv = Yt[..., cy : cy + ch, cx : cx + cw], M[..., cy : cy + ch, cx : cx + cw]
    v_fit, v_score = _band_split(torch.Generator().manual_seed(seed + 3), L, n_hold)
    return _FitData(
        tiles=Yt,
        mask=M,
        crop=(ch, cw),
        n_hold=n_hold,
        val_tiles=Yv,
        val_mask=Mv,
        val_fit=v_fit,
        val_score=v_score,
    )


def _heldout_loss(
    model: DEQUnmix,
    Yc: torch.Tensor,
    Mc: torch.Tensor,
    fit_mask: torch.Tensor | None,
    score: torch.Tensor,
) -> tuple[torch.Tensor, Any]:
    """Band-split self-supervision: solve on the ``fit_mask`` bands, score the reconstruction on the
    ``score`` bands over valid pixels, relative to the held-out signal power; and the solver stats."""
    A, st = model(Yc, band_mask=fit_mask)
    # the brightness of the scaled model is estimated on the bands the solver saw
    rec = torch.einsum("lp,nphw->nlhw", model.E[score], A) * model.scale(A, Yc, fit_mask)
    target = Yc[:, score]
    n = (Mc.sum() * int(score.sum())).clamp_min(1.0)
    err = (((target - rec) ** 2) * Mc).sum() / n
    return err / ((target**2) * Mc).sum().div(n).clamp_min(1e-12), st


def _validate(model: DEQUnmix, data: _FitData) -> float:
    """The fixed held-out-band validation loss (no gradients)."""
    with torch.no_grad():
        return float(
            _heldout_loss(model, data.val_tiles, data.val_mask, data.val_fit, data.val_score)[0]
        )


def _mean_heldout(
    model: DEQUnmix,
    data: _FitData,
    splits: list[tuple[torch.Tensor | None, torch.Tensor]],
    scaled: bool,
) -> float:
    """The mean held-out-band loss of ``model`` (solved to the inference cap) on the validation
    crops over the band ``splits``, with the linear or the scaled mixing model."""
    was_training, model.scaled = model.training, scaled
    model.eval()
    with torch.no_grad():
        total = sum(
            float(_heldout_loss(model, data.val_tiles, data.val_mask, f, sc)[0]) for f, sc in splits
        )
    model.train(was_training)
    return total / len(splits)


def _choose_mixing(
    model: DEQUnmix, data: _FitData, opts: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Set ``model.scaled`` from the ``mixing`` option and return its record.

    ``auto``: the untrained map (projected gradient from the start endmembers) on the validation
    crops, for ``mixing_splits`` seeded band splits (solve on the kept bands, score the
    reconstruction of the held-out ones): scaled when its mean held-out error is more than
    ``mixing_margin`` (relative) below linear's. Held-out bands keep the choice honest: the
    scaled model has one more free value per pixel and always fits the bands it sees better."""
    choice = str(opts["mixing"])
    rec: dict[str, Any] = {"option": choice}
    if choice == "auto":
        if not data.n_hold:
            raise ConfigError(
                "mixing 'auto' scores held-out bands: set holdout_fraction > 0 or choose "
                "mixing 'linear' or 'scaled'"
            )
        g = torch.Generator().manual_seed(seed + 4)
        splits = [
            _band_split(g, int(data.tiles.shape[1]), data.n_hold)
            for _ in range(int(opts["mixing_splits"]))
        ]
        loss = {
            name: _mean_heldout(model, data, splits, name == "scaled")
            for name in ("linear", "scaled")
        }
        gain = 1.0 - loss["scaled"] / loss["linear"] if loss["linear"] > 0 else 0.0
        choice = "scaled" if gain > float(opts["mixing_margin"]) else "linear"
        rec.update(
            heldout_loss_linear=loss["linear"],
            heldout_loss_scaled=loss["scaled"],
            gain=gain,
            margin=float(opts["mixing_margin"]),
            splits=len(splits),
            rule="scaled when its held-out-band error (untrained map, validation crops) is more "
            "than `margin` below linear's",
        )
    model.scaled = choice == "scaled"
    rec["model"] = choice
    return rec


def _net_copy(model: DEQUnmix) -> dict[str, torch.Tensor]:
    """A detached copy of the correction net's parameters (for the best validated state)."""
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


def _train_step(
    model: DEQUnmix,
    data: _FitData,
    S: torch.Tensor,
    E_start: torch.Tensor,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> tuple[torch.Tensor, Any]:
    """One Adam step on a random crop of every fit tile and a random band split; the endmembers
    are updated through ``E = E_start·exp(S)`` (positive, relative steps) and projected."""
    th, tw = int(data.tiles.shape[-2]), int(data.tiles.shape[-1])
    ch, cw = data.crop
    oy = int(torch.randint(0, th - ch + 1, (1,), generator=gen))
    ox = int(torch.randint(0, tw - cw + 1, (1,), generator=gen))
    Yc, Mc = data.tiles[..., oy : oy + ch, ox : ox + cw], data.mask[..., oy : oy + ch, ox : ox + cw]
    fit_mask, score = _band_split(gen, int(data.tiles.shape[1]), data.n_hold)
    loss, st = _heldout_loss(model, Yc, Mc, fit_mask, score)
    opt.zero_grad()
    model.E.grad = None
    loss.backward()
    with torch.no_grad():  # chain rule through E = E_start·exp(S)
        S.grad = model.E.grad * model.E if model.E.grad is not None else torch.zeros_like(S)
    opt.step()
    with torch.no_grad():
        model.E.copy_(E_start * torch.exp(S))
    model.project_()
    return loss, st


def _train(
    model: DEQUnmix,
    data: _FitData,
    cfg: _TrainSettings,
    seed: int,
    progress: Callable[[int, float], None] | None,
) -> _FitState:
    """Up to ``cfg.max_epochs`` training steps with validation every ``cfg.val_every`` steps and
    early stopping; the model ends in eval mode, in the best validated state (epoch 0: the start)."""
    E_start = model.E.detach().clone()
    # E = E_start·exp(S): positive by construction, relative steps for dark and bright spectra
    S = torch.zeros_like(E_start, requires_grad=True)
    opt = torch.optim.Adam(
        [
            {"params": model.net.parameters(), "lr": cfg.lr_net},
            {"params": [S], "lr": cfg.lr_endmembers},
        ]
    )
    gen = torch.Generator().manual_seed(seed + 2)
    model.train()
    state = _FitState(
        best_state=(E_start.clone(), _net_copy(model)),
        stop_reason="max_epochs" if cfg.max_epochs > 0 else "no training (max_epochs 0)",
    )
    if cfg.max_epochs > 0 and cfg.val_every > 0:
        state.best_val = _validate(model, data)
        state.val_curve.append([0, state.best_val])
        state.validated.append((state.best_val, 0, state.best_state))
    for epoch in range(cfg.max_epochs):
        loss, st = _train_step(model, data, S, E_start, opt, gen)
        state.curve.append(float(loss.detach()))
        state.iters.append(float(st.iterations.float().mean()))
        if progress is not None:
            progress(epoch, state.curve[-1])
        if cfg.val_every > 0 and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.max_epochs):
            if _record_validation(state, model, epoch + 1, _validate(model, data), cfg.patience):
                break
    state.kept_start = _kept_start_reason(state, cfg)
    if (
        cfg.val_every > 0 and cfg.max_epochs > 0
    ):  # keep the best validated state (epoch 0: the start)
        _load_state(model, state.best_state)
    model.eval()
    return state


def _record_validation(
    state: _FitState, model: DEQUnmix, epoch: int, v: float, patience: int
) -> bool:
    """Record the validation loss ``v`` after ``epoch`` steps: keep the state if it is the best so
    far, else count it against patience (unless the start is still best and the training loss still
    falls). Returns whether the fit stops early."""
    state.val_curve.append([epoch, v])
    snapshot = (model.E.detach().clone(), _net_copy(model))
    state.validated.append((v, epoch, snapshot))
    if v < state.best_val:
        state.best_val, state.best_epoch, state.bad = v, epoch, 0
        state.best_state = snapshot
    elif state.best_epoch == 0 and training_loss_falls(state.curve):
        # the start is still the best validated state but the fit is still learning: an
        # early stop here would return the start, so patience waits
        state.waited.append(epoch)
    else:
        state.bad += 1
        if state.bad >= patience:
            state.stopped_early = True
            state.stop_reason = (
                f"patience: {patience} validations without improvement on epoch "
                f"{state.best_epoch}"
                + ("" if state.best_epoch else ", and the training loss no longer falls")
            )
            return True
    return False


def _kept_start_reason(state: _FitState, cfg: _TrainSettings) -> str | None:
    """Why the fit kept its start (no validated state beat it), or ``None`` when it did not."""
    if cfg.val_every > 0 and cfg.max_epochs > 0 and state.best_epoch == 0:
        return (
            f"no validated state (epochs {[int(e) for e, _ in state.val_curve[1:]]}) had a lower "
            f"held-out-band validation loss than the start ({state.val_curve[0][1]:.4g}); "
            + (
                "the training loss no longer fell"
                if state.stopped_early
                else f"stopped at max_epochs {cfg.max_epochs}"
            )
        )
    return None


def _keep_converging_state(
    model: DEQUnmix, data: _FitData, P: int, opts: dict[str, Any], state: _FitState
) -> dict[str, Any]:
    """The solver check of the kept state, which must converge on at least
    :data:`MIN_CONVERGED` of the validation pixels at the inference cap: a trained map whose fixed
    point the solver does not reach gives abundances that depend on the cap, not on the data.
    Validated states are tried from the lowest validation loss up (the start included); the first
    that converges is kept and the ones passed over are recorded in ``state.unconverged``. When
    none does, the best validated state stays, and the record says so."""
    check = _solver_check(model, data, P, opts)
    if _converged_share(check) >= MIN_CONVERGED or len(state.validated) < 2:
        return check
    best_state, best_check = state.best_state, check
    for v, epoch, st in sorted(state.validated, key=lambda c: (c[0], c[1])):
        if epoch != state.best_epoch:
            _load_state(model, st)
            check = _solver_check(model, data, P, opts)
        if _converged_share(check) >= MIN_CONVERGED:
            state.best_val, state.best_epoch, state.best_state = v, epoch, st
            state.kept_start = None
            if epoch == 0:
                state.kept_start = (
                    "every trained state's solver converged on fewer than "
                    f"{100 * MIN_CONVERGED:g} % of the validation pixels at the inference cap "
                    f"(epochs {[u['epoch'] for u in state.unconverged]})"
                )
            return check
        state.unconverged.append(
            {"epoch": epoch, "val_loss": v, "converged_share": _converged_share(check)}
        )
    _load_state(model, best_state)
    best_check["note"] = (
        f"no validated state converged on {100 * MIN_CONVERGED:g} % of the validation pixels; "
        "kept the one with the lowest validation loss"
    )
    return best_check


def _converged_share(check: dict[str, Any]) -> float:
    return check["converged_pixels"] / check["pixels"] if check["pixels"] else 1.0


def _load_state(model: DEQUnmix, st: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    """Put a stored (endmembers, net parameters) state into ``model``."""
    with torch.no_grad():
        model.E.copy_(st[0])
    model.net.load_state_dict(st[1])


def _solver_check(model: DEQUnmix, data: _FitData, P: int, opts: dict[str, Any]) -> dict[str, Any]:
    """The kept state's solver at the inference cap on the validation crops: converged pixels,
    reconstruction RMSE overall and per dominant endmember (valid pixels only)."""
    Yv, Mv = data.val_tiles, data.val_mask
    with torch.no_grad():
        A_v, st_v = model(Yv)
        res_v = torch.sqrt(((model.reconstruct(A_v, Yv) - Yv) ** 2).mean(dim=1)).reshape(-1)
    valid_v = Mv.reshape(-1) > 0
    conv_v = st_v.converged[valid_v]
    # per-endmember residuals: reconstruction RMSE of the pixels each endmember dominates
    dom = A_v.argmax(dim=1).reshape(-1)[valid_v]
    res_valid = res_v[valid_v]
    per_em = {
        f"em{i + 1}": {
            "pixels": int((dom == i).sum()),
            "rmse": float(res_valid[dom == i].mean()) if bool((dom == i).any()) else None,
        }
        for i in range(P)
    }
    return {
        "pixels": int(conv_v.numel()),
        "converged_pixels": int(conv_v.sum()),
        "cap": int(opts["eval_max_iter"]),
        "tol": float(opts["tol"]),
        "where": "valid pixels of the central crops of the fit tiles, all good bands",
        "residual_rmse": float(res_valid.mean()) if res_valid.numel() else None,
        "residual_by_dominant_endmember": per_em,
    }


def _fit_result(
    scene: xr.DataArray,
    model: DEQUnmix,
    E0: np.ndarray,
    opts: dict[str, Any],
    max_epochs: int,
    records: dict[str, Any],
    state: _FitState,
    solver_check: dict[str, Any],
    t_start: float,
) -> UnmixFit:
    """The :class:`UnmixFit` of the trained model with its provenance: the scene, the sample, ``P``,
    start and fit-tile ``records`` (in that order), options, curves, why the fit stopped, the
    solver check, timing, environment and the spectra (fitted and start)."""
    wl_all = np.asarray(scene["wavelength"].values, dtype=np.float64)
    good = good_band_index(scene)
    gb = np.asarray(scene["good_band"].values, dtype=bool)
    E_fit = np.ascontiguousarray(model.E.detach().numpy(), dtype=np.float32)
    names = [f"em{i + 1}" for i in range(E_fit.shape[1])]
    provenance = {
        "model": "deq-unmix",
        "scene": str(scene.attrs.get("source", "")),
        "scene_shape": [int(s) for s in scene.shape],
        "good_bands": int(good.size),
        **records,
        "options": opts,
        "max_epochs": max_epochs,
        "loss_curve": state.curve,
        "val_curve": state.val_curve,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "stop_reason": state.stop_reason,
        "patience_waited_at": state.waited,
        "kept_start": state.kept_start,
        "passed_over_unconverged": state.unconverged,
        "train_solver_iterations_mean": state.iters,
        "solver_check": solver_check,
        "wall_time_s": time.perf_counter() - t_start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "endmembers": {
            "wavelength_nm": wl_all[good].tolist(),
            "spectra": {n: E_fit[:, i].tolist() for i, n in enumerate(names)},
            "start": {n: E0[:, i].tolist() for i, n in enumerate(names)},
        },
    }
    config = {
        **model.config(),
        "tol": float(opts["tol"]),
        "eval_max_iter": int(opts["eval_max_iter"]),
    }
    return UnmixFit(
        endmembers=E_fit,
        names=names,
        wavelengths=wl_all[good],
        good_band=gb,
        state={f"net.{k}": v.detach().clone() for k, v in model.net.state_dict().items()},
        config=config,
        provenance=provenance,
    )


# ------------------------------------------------------------------ apply


def apply_fit(
    fit: UnmixFit, cube: np.ndarray, *, model: DEQUnmix | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Unmix one tile: ``cube`` (B_good, H, W) float32, NaN nodata.

    Returns abundances (P, H, W) (NaN where nodata; every valid pixel on the simplex), the
    reconstruction RMSE map (H, W) and solver stats: ``iterations``, ``residual`` (worst over the
    tile's valid pixels), ``converged`` (all of them), ``converged_pixels`` of ``valid_pixels``
    (pixels whose solve reached the tolerance within the cap). Nodata pixels are filled with the mean endmember
    before solving (a tile-independent value, so seams do not depend on the tiling). Pass
    ``model=fit.model()`` to reuse one module across tiles.
    """
    cube = np.asarray(cube)
    E = np.asarray(fit.endmembers, dtype=np.float32)
    if cube.ndim != 3 or cube.shape[0] != E.shape[0]:
        raise InputValidationError(
            f"cube must be (bands, y, x) with the fit's {E.shape[0]!r} good bands, got shape "
            f"{cube.shape!r}; select the scene's good bands (fit.good_band) first"
        )
    valid = np.isfinite(cube).all(axis=0)
    P = E.shape[1]
    H, W = cube.shape[1:]
    A = np.full((P, H, W), np.nan, dtype=np.float32)
    rmse = np.full((H, W), np.nan, dtype=np.float32)
    if not valid.any():
        return (
            A,
            rmse,
            {
                "iterations": 0,
                "residual": 0.0,
                "converged": True,
                "converged_pixels": 0,
                "valid_pixels": 0,
            },
        )
    fill = E.mean(axis=1)
    filled = np.where(valid[None], cube, fill[:, None, None]).astype(np.float32)
    m = model if model is not None else fit.model()
    Yt = torch.from_numpy(filled[None])
    with torch.no_grad():
        At, st = m(Yt)
        rec = m.reconstruct(At, Yt)[0].numpy()
    Af = At[0].numpy()
    r = np.sqrt(np.mean((filled - rec) ** 2, axis=0))
    A[:, valid] = Af[:, valid]
    rmse[valid] = r[valid]
    vflat = torch.from_numpy(valid.ravel())
    conv = st.converged[vflat]
    stats = {
        "iterations": int(st.iterations[vflat].max()),
        "residual": float(st.residual[vflat].max()),
        "converged": bool(conv.all()),
        "converged_pixels": int(conv.sum()),
        "valid_pixels": int(conv.numel()),
    }
    return A, rmse, stats


def write_endmembers(fit: UnmixFit, path_csv: str | Path, path_json: str | Path) -> None:
    """Endmember spectra with wavelengths: CSV (one row per band) and JSON."""
    E = np.asarray(fit.endmembers, dtype=np.float64)
    wl = np.asarray(fit.wavelengths, dtype=np.float64)
    try:
        with open(path_csv, "w") as fh:
            fh.write(",".join(["wavelength_nm", *fit.names]) + "\n")
            for i in range(E.shape[0]):
                fh.write(",".join([repr(float(wl[i]))] + [repr(float(v)) for v in E[i]]) + "\n")
        Path(path_json).write_text(
            json.dumps(
                {
                    "wavelength_nm": [None if not np.isfinite(w) else float(w) for w in wl],
                    "endmembers": {n: E[:, i].tolist() for i, n in enumerate(fit.names)},
                },
                indent=1,
            )
        )
    except OSError as exc:
        raise WriteError(
            f"cannot write endmembers to {str(path_csv)!r}/{str(path_json)!r}: {exc}"
        ) from exc
