"""Denoiser API for the tile engine: load the shipped DECSC weights, denoise (B, H, W) cubes.

Any band count runs with one set of weights: the model is applied on a sliding spectral window
(``SPEC.config["bands"]`` bands, stride ``window_stride``) and the overlapping window outputs are
blended with Hann weights; fewer bands than the window are symmetrically padded along the
spectrum. Nodata (NaN) pixels are filled with the band mean for the model and NaN again on output.
The band guard (:mod:`workers.denoise.guard`) then hands part of the input back per band where
the model over-smooths (on by default; ``guard=False`` turns it off).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pipeline.errors import InputValidationError, WeightsError
from workers.registry import get_spec, verified_weights_path

from .decsc import DECSC, DECSCConfig, estimate_sigma

MODEL_NAME = "decsc"
_CFG_KEYS = set(asdict(DECSCConfig()))


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensor names, shapes, dtypes and bytes (stored in the file's metadata)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def shipped_state(model: DECSC) -> dict[str, torch.Tensor]:
    """The tensors to ship: the fixed-point map's parameters once (``deq.func`` aliases ``map``)."""
    return {f"map.{k}": v.detach().cpu().contiguous() for k, v in model.map.state_dict().items()}


def weights_metadata(model: DECSC, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """safetensors metadata recording what these weights are (checked by :func:`load_denoiser`)."""
    spec = get_spec(MODEL_NAME)
    meta = {
        "model": MODEL_NAME,
        "config": json.dumps(
            {**asdict(model.cfg), "window_stride": spec.config["window_stride"]}, sort_keys=True
        ),
        "tensors_sha256": tensors_digest(shipped_state(model)),
    }
    if extra:
        meta["training"] = json.dumps(extra, sort_keys=True)
    return meta


#: architecture presets: ``shipped`` is the registry's (CPU-sized) model, ``full`` the larger
#: configuration of the model card (trained on a GPU; not loadable as the shipped weights)
ARCH_PRESETS: dict[str, dict[str, int]] = {
    "shipped": {},
    "full": {"shared_features": 96, "unshared_features": 16, "heads": 4},
}


def check_arch(arch: str) -> str:
    if arch not in ARCH_PRESETS:
        raise InputValidationError(
            f"unknown DECSC architecture {arch!r}; choose from {sorted(ARCH_PRESETS)!r}"
        )
    return arch


def arch_weights(arch: str = "shipped") -> tuple[Path, str]:
    """(path, expected sha256) of the weights shipped for architecture ``arch``."""
    ref = get_spec(MODEL_NAME).weights_ref(check_arch(arch))
    return ref.path, ref.sha256


def build_model(device: str = "cpu", arch: str = "shipped") -> DECSC:
    """An untrained DECSC with the registry's architecture (or a preset of ``ARCH_PRESETS``) and solver settings."""
    check_arch(arch)
    spec = get_spec(MODEL_NAME)
    cfg = DECSCConfig(
        **{**{k: v for k, v in spec.config.items() if k in _CFG_KEYS}, **ARCH_PRESETS[arch]}
    )
    s = spec.solver
    model = DECSC(
        cfg,
        tol=s["tol"],
        max_iter=s["max_iter"],
        eval_max_iter=s["eval_max_iter"],
        backward=s["backward"],
        backward_max_iter=s["backward_max_iter"],
        m=s["m"],
        phantom_steps=s["phantom_steps"],
        phantom_tau=s["phantom_tau"],
    )
    return model.to(device)


def load_denoiser(
    device: str = "cpu", weights: str | Path | None = None, arch: str = "shipped"
) -> nn.Module:
    """The DECSC denoiser with its shipped (or given) safetensors weights, in eval mode.

    ``arch`` names the architecture preset the weights were trained with (``ARCH_PRESETS``);
    without ``weights`` the file shipped for that architecture is used, its sha256 checked.

    Raises :class:`WeightsError` when the file is missing, not safetensors, fails its sha256
    check, was written for another model or configuration, or its tensors were modified.
    """
    from safetensors import SafetensorError, safe_open

    from workers.allocator import tune_allocator

    tune_allocator()  # the model's tensors reuse freed memory (1.7x faster on CPUs)
    check_arch(arch)
    spec = get_spec(MODEL_NAME)
    path = verified_weights_path(spec, weights, key=arch)  # shipped files: sha256 checked
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"cannot read weights file {str(path)!r} as safetensors ({exc}); reinstall hyperdeq or retrain"
        ) from exc
    if meta.get("model") != MODEL_NAME:
        raise WeightsError(
            f"weights file {str(path)!r} is for model {meta.get('model')!r}, not {MODEL_NAME!r}; "
            "pass the DECSC weights (workers/weights/decsc.safetensors)"
        )
    expected_cfg = {**spec.config, **ARCH_PRESETS[arch]}
    got_cfg = json.loads(meta.get("config", "{}"))
    if got_cfg != expected_cfg:
        raise WeightsError(
            f"weights file {str(path)!r} has DECSC config {got_cfg!r} but the registry expects "
            f"{expected_cfg!r}; retrain or use the matching hyperdeq version"
        )
    if meta.get("tensors_sha256") != tensors_digest(state):
        raise WeightsError(
            f"weights file {str(path)!r}: tensor contents do not match the digest recorded in its "
            f"metadata ({meta.get('tensors_sha256')!r}); the file was modified, retrain or reinstall"
        )
    model = build_model("cpu", arch)
    try:
        if not all(k.startswith("map.") for k in state):
            raise RuntimeError(
                f"unexpected tensor names {sorted(k for k in state if not k.startswith('map.'))!r}"
            )
        model.map.load_state_dict({k[4:]: v for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"weights file {str(path)!r} does not fit the DECSC architecture: {exc}"
        ) from exc
    return model.to(device).eval()


def _band_windows(n_bands: int, size: int, stride: int) -> list[int]:
    """Start indices of spectral windows covering ``n_bands`` (last one flush with the end)."""
    if n_bands <= size:
        return [0]
    starts = list(range(0, n_bands - size + 1, stride))
    if starts[-1] != n_bands - size:
        starts.append(n_bands - size)
    return starts


def _hann(size: int) -> np.ndarray:
    """Strictly positive Hann weights so every band keeps a non-zero total weight."""
    return np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2


def _symmetric_index(n_bands: int, size: int) -> np.ndarray:
    """Band indices of a symmetric extension of ``n_bands`` bands to ``size`` (n_bands < size)."""
    period = np.concatenate([np.arange(n_bands), np.arange(n_bands)[::-1]])
    return period[np.arange(size) % len(period)]


def _check_cube(cube: np.ndarray) -> np.ndarray:
    cube = np.asarray(cube)
    if cube.ndim != 3 or min(cube.shape) < 1:
        raise InputValidationError(
            f"denoise_cube expects a (bands, y, x) cube, got shape {cube.shape!r}"
        )
    if not np.issubdtype(cube.dtype, np.floating):
        raise InputValidationError(
            f"denoise_cube expects float reflectance (roughly [0, 1]) with NaN nodata, got dtype {cube.dtype!r}; "
            "scale the cube to reflectance first"
        )
    if cube.shape[1] < 2 or cube.shape[2] < 2:
        raise InputValidationError(
            f"denoise_cube needs at least 2x2 pixels, got shape {cube.shape!r}"
        )
    return cube.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=1)
def shipped_guard() -> Any:
    """The shipped band guard (:mod:`workers.denoise.guard`), loaded once per process."""
    from .guard import load_guard

    return load_guard()


@torch.no_grad()
def _model_pass(
    model: nn.Module,
    filled: np.ndarray,
    valid: np.ndarray,
    *,
    device: str,
    max_iter: int | None,
    window_batch: int,
    sigma_from: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One DECSC pass over a NaN-free (B, H, W) cube: (output, blind σ per band, solver stats);
    σ is estimated from ``sigma_from`` (same shape) when given, else from ``filled``."""
    b, h, w = filled.shape
    y = torch.from_numpy(filled).to(device)
    src = (
        y
        if sigma_from is None
        else torch.from_numpy(np.ascontiguousarray(sigma_from, dtype=np.float32)).to(device)
    )
    sigma = estimate_sigma(src[None], torch.from_numpy(valid).to(device)[None])[0]
    size = int(model.cfg.bands)  # type: ignore[union-attr,arg-type]
    stride = get_spec(MODEL_NAME).config["window_stride"]
    if b < size:
        idx = torch.from_numpy(_symmetric_index(b, size)).to(device)
        ys, ss, starts = y[idx][None], sigma[idx][None], [0]
    else:
        starts = _band_windows(b, size, stride)
        ys = torch.stack([y[s : s + size] for s in starts])
        ss = torch.stack([sigma[s : s + size] for s in starts])
    outs, its, res, conv = [], [], [], []
    for i in range(0, len(starts), window_batch):
        o, st = model(ys[i : i + window_batch], ss[i : i + window_batch], max_iter=max_iter)
        outs.append(o)
        its.append(st.iterations)
        res.append(st.residual)
        conv.append(st.converged)
    out_w = torch.cat(outs).cpu().numpy().astype(np.float32)
    if b < size:
        out = out_w[0, :b]
    else:
        wgt = _hann(size).astype(np.float32)
        acc = np.zeros((b, h, w), np.float32)
        norm = np.zeros(b, np.float32)
        for k, s in enumerate(starts):
            acc[s : s + size] += wgt[:, None, None] * out_w[k]
            norm[s : s + size] += wgt
        out = acc / norm[:, None, None]
    stats = {
        "iterations": int(torch.cat(its).max()),
        "residual": float(torch.cat(res).max()),
        "converged": bool(torch.cat(conv).all()),
        "windows": len(starts),
        # the arithmetic the model ran in (recorded per tile in run.json)
        "precision": str(outs[0].dtype).removeprefix("torch."),
    }
    return out, sigma.cpu().numpy(), stats


#: what :func:`denoise_cube` does with the band guard: ``apply`` it, only report its ``weights``, or ``off``
GuardMode = Literal["apply", "weights", "off"]
GUARD_MODES: tuple[str, ...] = ("apply", "weights", "off")


def _subspace_k(subspace: int) -> int:
    """``subspace`` of :func:`denoise_cube` checked: 0 (off) or a dimension from 1 to 64."""
    if (
        isinstance(subspace, int | np.integer)
        and not isinstance(subspace, bool)
        and 0 <= int(subspace) <= 64
    ):
        return int(subspace)
    raise InputValidationError(
        f"subspace must be 0 (off) or a dimension from 1 to 64, got {subspace!r}; "
        "the pipeline's default is workers.denoise.subspace.DEFAULT_K"
    )


def _subspace_pass(
    model: nn.Module,
    filled: np.ndarray,
    out: np.ndarray,
    sigma: np.ndarray,
    valid: np.ndarray,
    stuck: np.ndarray,
    k: int,
    stats: dict[str, Any],
    guard_model: Any,
    pass_kw: dict[str, Any],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Second, spectral-subspace pass over the first pass ``out``: guard, clean, project onto the
    top-``k`` directions, run the model again, and blend; folds the worst solver statistics of
    both passes into ``stats`` (in place) and returns the new output and the subspace record."""
    from .guard import apply_guard
    from .subspace import clean_input, project, project_own, uniform_noise_weight

    g1 = guard_model if guard_model is not None else shipped_guard()
    d1, _ = apply_guard(g1, filled, out, sigma, valid)
    yc, c_stats = clean_input(filled, d1, valid, stuck)  # the same input: reuse its stuck mask
    yp, p_stats = project(yc, sigma, valid, k)
    d2, _, st2 = _model_pass(model, yp.astype(np.float32), valid, **pass_kw)
    out = project_own(d2, valid, k).astype(np.float32)
    w1, spread = uniform_noise_weight(sigma)
    if w1 > 0:  # step 5b: i.i.d.-like noise: average with the projected first pass
        out *= np.float32(1.0 - w1)  # in place: tiles can be large
        out += np.float32(w1) * project_own(d1, valid, k)
    stats.update(
        iterations=max(stats["iterations"], st2["iterations"]),  # worst of both passes
        residual=max(stats["residual"], st2["residual"]),
        converged=stats["converged"] and st2["converged"],
    )
    sub_stats = {
        "subspace_k": p_stats["k"],
        "subspace_outside": p_stats["pixels_kept_outside"],
        "subspace_impulses": c_stats["impulse_pixels"],
        "subspace_stuck": c_stats["stuck_pixels"],
        "subspace_lines": c_stats["lines_removed"],
        "subspace_blend": round(w1, 4),
        "subspace_sigma_spread": round(min(spread, 1e6), 4),
    }
    return out, sub_stats


def _band_guard(
    guard: GuardMode,
    guard_model: Any,
    filled: np.ndarray,
    out: np.ndarray,
    sigma: np.ndarray,
    valid: np.ndarray,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The band guard per ``guard`` mode: per-band weights of the input handed back, applied
    (``"apply"``) or only reported (``"weights"``); ``"off"`` leaves ``out`` as is."""
    if guard == "off":
        return out, {"guard": False}
    from .guard import guard_weights

    g = guard_model if guard_model is not None else shipped_guard()
    gw = guard_weights(g, filled, out, sigma, valid)
    if guard != "weights":
        out = (out + gw[:, None, None] * (filled - out)).astype(np.float32)
    guard_stats = {
        "guard": True,
        "guard_applied": guard != "weights",
        "guard_w_mean": float(gw.mean()),
        "guard_w_max": float(gw.max()),
        "guard_bands_half": int(np.sum(gw > 0.5)),
        "guard_w": [float(v) for v in gw],
        "guard_n": int(valid.sum()),
    }
    return out, guard_stats


#: the statistics of a cube without a single valid pixel (nothing to solve)
_NO_PIXELS: dict[str, Any] = {"iterations": 0, "residual": 0.0, "converged": True, "windows": 0}


@torch.no_grad()
def denoise_cube(
    model: nn.Module,
    cube: np.ndarray,
    *,
    device: str = "cpu",
    max_iter: int | None = None,
    window_batch: int = 2,
    guard: GuardMode = "apply",
    guard_model: Any = None,
    subspace: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Denoise one (B, H, W) cube (floats, reflectance scale); NaN pixels stay NaN.

    ``guard``: ``"apply"`` (default) applies the band guard after the model (per band,
    ``out = d + w_b (y − d)``: part of the input handed back where the model over-smooths a
    band, see :mod:`workers.denoise.guard`); ``"off"`` returns the model's output as is;
    ``"weights"`` returns the model's output and only reports the guard's weights (``guard_w``,
    over ``guard_n`` valid pixels): the tile engine applies one scene-wide weight per band when it
    blends the tiles. ``guard_model``: a :class:`workers.denoise.guard.BandGuard` to use instead of
    the shipped one.

    ``subspace``: a dimension ``k`` from 1 to 64 runs the spectral-subspace pass
    (:mod:`workers.denoise.subspace`: the model, cleaning, projection onto the cube's top-``k``
    noise-whitened spectral directions, the model again; twice the compute, several dB better on
    band-dependent and mixed noise); its first pass always uses the guard; 0 (default here; the
    pipeline and ``hyperdeq eval denoiser`` use ``DEFAULT_K``) is the model alone.

    Returns the denoised cube and the worst solver statistics over the spectral windows (and
    both passes): ``{"iterations": int, "residual": float, "converged": bool, "windows": int}``,
    plus the guard's per-band weights summarised (``guard``, ``guard_w_mean``, ``guard_w_max``,
    ``guard_bands_half``: bands with ``w > 0.5``) and, with the subspace pass, ``subspace_k``,
    ``subspace_outside`` (pixels kept unprojected), ``subspace_impulses``, ``subspace_stuck`` and
    ``subspace_lines`` (input pixels cleaned, of them stuck values, and column/row offsets removed);
    ``stuck_filled``: stuck input pixels (:func:`workers.denoise.subspace.stuck_pixels`) that the
    model's first pass saw replaced by a local average of their band.
    """
    cube = _check_cube(cube)
    k = _subspace_k(subspace)
    b, h, w = cube.shape
    valid = np.isfinite(cube).all(axis=0)
    if not valid.any():
        return np.full_like(cube, np.nan), dict(_NO_PIXELS)
    if guard not in GUARD_MODES:
        raise InputValidationError(f"guard must be one of {list(GUARD_MODES)!r}, got {guard!r}")
    filled = cube.copy()
    means = np.array([cube[i][valid].mean() for i in range(b)], dtype=np.float32)
    filled[:, ~valid] = means[:, None]
    pass_kw: dict[str, Any] = {"device": device, "max_iter": max_iter, "window_batch": window_batch}
    from .subspace import fill_stuck, stuck_pixels

    stuck = stuck_pixels(filled, valid)  # impulses, saturated, dead pixels: no information
    n_stuck = int(stuck.sum())
    # the model sees them replaced by their band's local average; σ (and the guard, and the
    # subspace pass's cleaning) still see the raw input, where those bands are noisy
    model_in = fill_stuck(filled, stuck, valid) if n_stuck else filled
    out, sigma, stats = _model_pass(
        model, model_in, valid, **pass_kw, sigma_from=filled if n_stuck else None
    )
    del model_in
    stats["stuck_filled"] = n_stuck
    sub_stats: dict[str, Any] = {}
    if k and (b < 2 * k or int(valid.sum()) < 2 * b):
        # too few bands for a k-dimensional subspace to remove noise, or too few pixels to
        # estimate it: the model alone (recorded, so a run says the pass did not happen)
        skipped = f"{b} bands, {int(valid.sum())} pixels < 2k bands / 2B pixels"
        sub_stats, k = {"subspace_k": 0, "subspace_skipped": skipped}, 0
    if k:
        out, sub_stats = _subspace_pass(
            model, filled, out, sigma, valid, stuck, k, stats, guard_model, pass_kw
        )
    out, guard_stats = _band_guard(guard, guard_model, filled, out, sigma, valid)
    out[:, ~valid] = np.nan
    return out, {**stats, **guard_stats, **sub_stats}


def denoise_batch(
    model: nn.Module,
    cubes: list[np.ndarray],
    *,
    device: str = "cpu",
    max_iter: int | None = None,
    guard: GuardMode = "apply",
    subspace: int = 0,
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """:func:`denoise_cube` over several tiles in one call (one result per cube, same order)."""
    return [
        denoise_cube(model, c, device=device, max_iter=max_iter, guard=guard, subspace=subspace)
        for c in cubes
    ]
