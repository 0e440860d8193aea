"""Denoising evaluation: DECSC against classical anchors on the project's test scenes.

Implements the denoising part of the evaluation protocol (``docs/evaluation.md``): each test
scene is scaled to [0, 1], every noise case is added with a fresh ``np.random.default_rng(seed)``
(so a case's noise does not depend on which other cases run), and every method is scored on its
output clamped to [0, 1] (non-finite output values count as 0 and are reported). The result is a
plain dict (JSON-ready) that :func:`render_markdown` turns into the report.

Classical baseline results can be cached (``cache``): the key holds the scene, crop, case, seed,
method, the sha256 of the noisy cube and the baseline package versions, so a cached number is the
one this code would measure again; the report marks cached rows and their original timestamp.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, HyperdeqError, ReadError
from pipeline.metrics import band_psnr, ergas, mssim, sam_degrees
from pipeline.noise import NOISE_CASES, add_noise_with_info, check_case, is_iid_gaussian
from pipeline.provenance import portable
from workers.baselines import BASELINE_NAMES, CaseInfo, availability, get_baseline

DEFAULT_CASES: tuple[str, ...] = (
    "gauss30",
    "gauss50",
    "band[0,55]",
    "band[0,95]",
    "corr",
    "mixture",
)
# (case, margin in dB over the best classical anchor) the DECSC targets of issue 8
TARGETS: tuple[tuple[str, float], ...] = (("gauss30", 1.0), ("band[0,95]", 1.0), ("mixture", 3.0))
DECSC = "decsc"
NOISY = "noisy"


# ---------------------------------------------------------------- scenes


def _load_jasper(data: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Jasper Ridge: ``Y`` 198×10000 uint16, MATLAB column-major; min-max over the whole cube."""
    import scipy.io

    path = data / "jasper_ridge" / "Jasper.mat"
    y = _loadmat(path, "Y", scipy.io)
    cube = y.T.reshape(100, 100, y.shape[0], order="F").transpose(2, 0, 1).astype(np.float64)
    lo, hi = float(cube.min()), float(cube.max())
    return ((cube - lo) / (hi - lo)).astype(np.float32), {
        "file": "jasper_ridge/Jasper.mat",
        "scaling": f"min-max over the whole cube (min {lo:g}, max {hi:g})",
    }


def _load_pavia_centre(data: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """ROSIS Pavia Centre crop (ABU beach-4): ``data`` 100×100×102 already in [0, 1]."""
    import scipy.io

    path = data / "anomaly_abu" / "abu-beach-4.mat"
    cube = _loadmat(path, "data", scipy.io).transpose(2, 0, 1).astype(np.float32)
    return cube, {"file": "anomaly_abu/abu-beach-4.mat", "scaling": "none (already in [0, 1])"}


def _loadmat(path: Path, key: str, sio: Any) -> np.ndarray:
    if not path.is_file():
        raise ReadError(
            f"test scene file {str(path)!r} does not exist; pass --data pointing at the shared "
            "data folder (the one holding jasper_ridge/ and anomaly_abu/)"
        )
    return np.asarray(sio.loadmat(str(path))[key])


SCENES: dict[str, Callable[[Path], tuple[np.ndarray, dict[str, Any]]]] = {
    "jasper": _load_jasper,
    "pavia_centre": _load_pavia_centre,
}


def load_scene(name: str, data: Path, crop: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Clean ``(B, H, W)`` cube in [0, 1] of test scene ``name`` (centre ``crop``×``crop`` if given)."""
    if name not in SCENES:
        raise ConfigError(f"unknown test scene {name!r}; valid scenes are {list(SCENES)!r}")
    cube, meta = SCENES[name](Path(data))
    if crop is not None:
        _, h, w = cube.shape
        c = min(crop, h, w)
        y0, x0 = (h - c) // 2, (w - c) // 2
        cube = np.ascontiguousarray(cube[:, y0 : y0 + c, x0 : x0 + c])
        meta["crop"] = f"centre {c}x{c} (rows {y0}:{y0 + c}, cols {x0}:{x0 + c})"
    meta["shape_bhw"] = list(cube.shape)
    return cube, meta


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EvalConfig:
    """What one evaluation run measures; contradictory options are rejected here."""

    data: Path
    scenes: tuple[str, ...] = ("jasper", "pavia_centre")
    cases: tuple[str, ...] = DEFAULT_CASES
    baselines: tuple[str, ...] = BASELINE_NAMES
    seed: int = 0
    crop: int | None = None
    decsc: bool = True
    device: str = "cpu"
    threads: int | None = None
    cache: Path | None = None
    weights: Path | None = None  # DECSC weights other than the shipped file
    arch: str = "shipped"  # architecture preset of those weights (workers.denoise.api.ARCH_PRESETS)
    guard: bool = True  # the band guard after DECSC (workers.denoise.guard), as in the pipeline
    subspace: int = 8  # DECSC's spectral-subspace pass dimension (workers.denoise.subspace), 0: off; as in the pipeline
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.scenes:
            raise ConfigError("no scene to evaluate; pass --scenes jasper,pavia_centre")
        for s in self.scenes:
            if s not in SCENES:
                raise ConfigError(f"unknown test scene {s!r}; valid scenes are {list(SCENES)!r}")
        if not self.cases:
            raise ConfigError(f"no noise case to evaluate; choose from {list(NOISE_CASES)!r}")
        for c in self.cases:
            check_case(c)
        for b in self.baselines:
            get_baseline(b)
        if (
            not isinstance(self.subspace, int)
            or isinstance(self.subspace, bool)
            or not 0 <= self.subspace <= 64
        ):
            raise ConfigError(
                f"subspace must be an integer from 0 (off) to 64, got {self.subspace!r}"
            )
        for what, seq in (
            ("scene", self.scenes),
            ("case", self.cases),
            ("baseline", self.baselines),
        ):
            if len(set(seq)) != len(seq):
                raise ConfigError(f"{what} list {list(seq)!r} names one twice; give each once")
        if self.crop is not None and self.crop < 8:
            raise ConfigError(
                f"crop must be >= 8 pixels, got {self.crop!r} (SSIM needs an 11x11 window)"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads!r}")
        if not self.decsc and not self.baselines:
            raise ConfigError("nothing to evaluate: DECSC is off and no baseline is selected")


# ---------------------------------------------------------------- scoring


def score(
    clean: np.ndarray, output: np.ndarray, noisy_band_psnr: np.ndarray | None
) -> dict[str, Any]:
    """Protocol metrics of ``output`` clamped to [0, 1]; non-finite values count as 0."""
    out = np.asarray(output, dtype=np.float64)
    nonfinite = int(np.sum(~np.isfinite(out)))
    out = np.clip(np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    bp = band_psnr(clean, out)
    res: dict[str, Any] = {
        "mpsnr_db": float(np.mean(bp)),
        "mssim": mssim(clean, out),
        "sam_deg": sam_degrees(clean, out),
        "ergas": ergas(clean, out),
        "nonfinite_values": nonfinite,
    }
    if noisy_band_psnr is not None:
        res["bands_worse_than_noisy"] = int(np.sum(bp < noisy_band_psnr))
        res["min_band_gain_db"] = float(np.min(bp - noisy_band_psnr))
    return res


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


class _Cache:
    """Baseline results on disk (JSON), keyed by everything that determines them."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"baseline cache {str(self.path)!r} is not valid JSON ({exc}); delete it to re-measure"
            ) from exc
        return data

    def get(self, key: str) -> dict[str, Any] | None:
        if key not in self.entries:  # another run may have measured it meanwhile
            self.entries.update(self._read())
        return self.entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.entries.update(self._read())
        self.entries[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        tmp.replace(self.path)


# ---------------------------------------------------------------- DECSC


def _load_decsc(
    device: str, weights: Path | None = None, arch: str = "shipped"
) -> tuple[Any, Any, dict[str, Any]] | tuple[None, None, dict[str, Any]]:
    """(model, denoise_cube, info) from ``workers.denoise.api``, or (None, None, why-skipped).

    ``weights``/``arch``: another weights file (e.g. the GPU-sized ``full`` model) instead of the
    shipped one; its own metadata digest is still verified."""
    try:
        from workers.denoise import api
    except ImportError as exc:
        return (
            None,
            None,
            {"status": "skipped", "note": f"workers.denoise.api not importable: {exc}"},
        )
    try:
        model = api.load_denoiser(device=device, weights=weights, arch=arch)
    except (HyperdeqError, OSError) as exc:
        return None, None, {"status": "skipped", "note": f"DECSC weights not loadable: {exc}"}
    info: dict[str, Any] = {"status": "ok", "device": device}
    try:
        from workers.registry import get_spec, sha256_file

        spec = get_spec("decsc")
        info["arch"] = arch
        if weights is not None:
            info["weights_file"] = str(weights)
            info["weights_sha256"] = sha256_file(Path(weights))
        elif spec.weights_path is not None and spec.weights_path.is_file():
            info["weights_file"] = spec.weights_file
            info["weights_sha256"] = sha256_file(spec.weights_path)
        info["solver"] = dict(spec.solver)
    except HyperdeqError as exc:  # provenance only: never stop the eval for it
        info["spec_note"] = str(exc)
    return model, api.denoise_cube, info


def _guard_info(on: bool) -> dict[str, Any]:
    """Provenance of the band guard: on/off, its file and sha256."""
    if not on:
        return {"status": "off"}
    from .guard import GUARD_FILE
    from .spec import GUARD_WEIGHTS_SHA256

    return {"status": "on", "file": GUARD_FILE.name, "sha256": GUARD_WEIGHTS_SHA256}


def _decsc_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Solver statistics of one cube: ``denoise_cube`` gives the worst over its spectral windows
    (``converged`` True only when every window converged), so the fraction is per cube."""
    conv = np.asarray(stats.get("converged", []), dtype=bool).ravel()
    it = np.asarray(stats.get("iterations", []), dtype=np.float64).ravel()
    resid = np.asarray(stats.get("residual", []), dtype=np.float64).ravel()
    return {
        "converged_fraction": float(conv.mean()) if conv.size else None,
        "solves": int(stats.get("windows", conv.size)),
        "iterations_mean": float(it.mean()) if it.size else None,
        "iterations_max": float(it.max()) if it.size else None,
        "residual_max": float(resid.max()) if resid.size else None,
        **{
            k: stats[k]
            for k in (
                "stuck_filled",
                "guard",
                "guard_w_mean",
                "guard_w_max",
                "guard_bands_half",
                "subspace_k",
                "subspace_outside",
                "subspace_impulses",
                "subspace_stuck",
                "subspace_lines",
                "subspace_blend",
                "subspace_sigma_spread",
            )
            if k in stats
        },
    }


# ---------------------------------------------------------------- the run


def environment(config: EvalConfig) -> dict[str, Any]:
    """Device, versions and the exact command: printed next to every number."""
    from pipeline.environment import cpu_model

    cpu = cpu_model()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import torch

    dev = config.device
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name(0)})"
    return {
        "command": portable(config.command),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "decsc_device": dev,
        "python": sys.version.split()[0],
        "git_commit": commit or "unknown",
        "versions": {
            d: _version(d)
            for d in (
                "hyperdeq",
                "numpy",
                "scipy",
                "torch",
                "scikit-image",
                "hyde-images",
                "bm3d",
                "bm4d",
            )
        },
    }


def _split_baselines(
    config: EvalConfig, say: Callable[[str], None]
) -> tuple[list[str], dict[str, str]]:
    """The requested baselines that can run here, and why the others cannot (each said once)."""
    skipped: dict[str, str] = {}
    runnable: list[str] = []
    for name in config.baselines:
        ok, why = availability(name)
        if ok:
            runnable.append(name)
        else:
            skipped[name] = why
            say(why)
    return runnable, skipped


def _decsc_setup(config: EvalConfig, say: Callable[[str], None]) -> tuple[Any, Any, dict[str, Any]]:
    """(model, denoise_cube, provenance) for DECSC, or (None, None, why not) when it is off or
    cannot load; the provenance records the band guard and the subspace pass of this run."""
    model = denoise_cube = None
    decsc_info: dict[str, Any] = {"status": "off", "note": "DECSC not requested (--no-decsc)"}
    if config.decsc:
        model, denoise_cube, decsc_info = _load_decsc(config.device, config.weights, config.arch)
        if model is None:
            say(f"DECSC skipped: {decsc_info['note']}")
        else:
            decsc_info["band_guard"] = _guard_info(config.guard)
            decsc_info["subspace"] = (
                {"status": "on", "k": config.subspace, "module": "workers.denoise.subspace"}
                if config.subspace
                else {"status": "off"}
            )
    return model, denoise_cube, decsc_info


def _measure_decsc(
    config: EvalConfig,
    model: Any,
    denoise_cube: Any,
    clean: np.ndarray,
    noisy: np.ndarray,
    noisy_bp: Any,
) -> dict[str, Any]:
    """Score DECSC on one noisy cube with its time and solver statistics; a refusal is recorded
    as an error rather than ending the run."""
    t0 = time.perf_counter()
    try:
        kw: dict[str, Any] = {} if config.device == "cpu" else {"device": config.device}
        out, stats = denoise_cube(
            model,
            noisy.astype(np.float32),
            guard="apply" if config.guard else "off",
            subspace=config.subspace or 0,
            **kw,
        )
        dt = time.perf_counter() - t0
        res = score(clean, out, noisy_bp) | {"time_s": dt} | _decsc_stats(dict(stats))
    except HyperdeqError as exc:
        res = {"error": f"{type(exc).__name__}: {exc}"}
    return res


def _measure_baseline(
    name: str,
    cache: _Cache,
    config: EvalConfig,
    scene: str,
    meta: dict[str, Any],
    case: str,
    noisy_hash: str,
    clean: np.ndarray,
    noisy: np.ndarray,
    info: CaseInfo,
    noisy_bp: Any,
) -> dict[str, Any]:
    """Score one classical baseline on one noisy cube, from the cache when everything that
    determines the result matches; successful measurements are cached, failures reported."""
    bl = get_baseline(name)
    key = "|".join(
        [
            scene,
            meta.get("crop", "full"),
            case,
            str(config.seed),
            name,
            noisy_hash,
            json.dumps(bl.versions(), sort_keys=True),
        ]
    )
    cached = cache.get(key)
    if cached is not None:
        return dict(cached) | {"cached": True}
    t0 = time.perf_counter()
    try:
        out = bl.denoise(noisy, info)
        dt = time.perf_counter() - t0
        res = score(clean, out, noisy_bp) | {"time_s": dt}
    except Exception as exc:  # noqa: BLE001 - a failing anchor is reported, not fatal
        res = {"error": f"{type(exc).__name__}: {exc}"}
    res["measured_utc"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if "error" not in res:
        cache.put(key, res)
    return res


def run_eval(
    config: EvalConfig,
    progress: Callable[[str], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure every scene × case × method of ``config``; returns the JSON-ready result.

    ``on_result`` receives the partial result after each scene × case (to write the report as
    the run goes, so an interrupted run still leaves what it measured)."""
    say = progress or (lambda _msg: None)
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    cache = _Cache(config.cache)
    runnable, skipped = _split_baselines(config, say)
    model, denoise_cube, decsc_info = _decsc_setup(config, say)

    env = environment(config)
    results: list[dict[str, Any]] = []
    scenes_meta: dict[str, Any] = {}
    for scene in config.scenes:
        clean, meta = load_scene(scene, config.data, config.crop)
        scenes_meta[scene] = meta
        for case in config.cases:
            noisy, sigmas, groups = add_noise_with_info(
                clean, case, np.random.default_rng(config.seed)
            )
            info = CaseInfo(case, sigmas)
            noisy_hash = _sha256(noisy)
            row: dict[str, Any] = {
                "scene": scene,
                "case": case,
                "iid_gaussian": is_iid_gaussian(case),
                "oracle_sigma_255": info.oracle_sigma * 255.0,
                "noisy_sha256": noisy_hash,
                "methods": {},
            }
            noisy_bp = band_psnr(clean, np.clip(noisy, 0.0, 1.0))
            row["methods"][NOISY] = score(clean, noisy, None) | {"time_s": 0.0}
            say(f"{scene} {case}: noisy {row['methods'][NOISY]['mpsnr_db']:.2f} dB")

            if model is not None and denoise_cube is not None:
                res = _measure_decsc(config, model, denoise_cube, clean, noisy, noisy_bp)
                row["methods"][DECSC] = res
                say(f"{scene} {case}: decsc {res.get('mpsnr_db', float('nan')):.2f} dB")

            for name in runnable:
                res = _measure_baseline(
                    name, cache, config, scene, meta, case, noisy_hash, clean, noisy, info, noisy_bp
                )
                row["methods"][name] = res
                say(f"{scene} {case}: {name} {res.get('mpsnr_db', float('nan')):.2f} dB")
            if groups is not None:
                row["mixture_group_size"] = len(groups.stripes)
            results.append(row)
            if on_result is not None:
                on_result(_assemble(config, env, scenes_meta, decsc_info, skipped, results))

    return _assemble(config, env, scenes_meta, decsc_info, skipped, results)


def _assemble(
    config: EvalConfig,
    env: dict[str, Any],
    scenes_meta: dict[str, Any],
    decsc_info: dict[str, Any],
    skipped: dict[str, str],
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "protocol": "docs/evaluation.md (denoising)",
        "environment": env,
        "config": {
            k: (portable(str(v)) if isinstance(v, Path) else v) for k, v in asdict(config).items()
        },
        "scenes": dict(scenes_meta),
        "decsc": decsc_info,
        "baselines": {
            n: {"settings": get_baseline(n).settings, "versions": get_baseline(n).versions()}
            for n in config.baselines
        },
        "skipped_baselines": skipped,
        "results": list(results),
        "decsc_convergence": _convergence(results),
        "verdict": verdict(results),
    }


def _convergence(results: list[dict[str, Any]]) -> dict[str, Any]:
    """How many evaluated cubes DECSC solved to tolerance (every spectral window converged)."""
    runs = [
        r["methods"][DECSC] for r in results if "converged_fraction" in r["methods"].get(DECSC, {})
    ]
    done = sum(1 for m in runs if m["converged_fraction"] == 1.0)
    return {"cubes": len(runs), "converged": done, "fraction": done / len(runs) if runs else None}


def verdict(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DECSC against the best classical anchor where the issue sets a target."""
    rows = []
    for r in results:
        for case, margin in TARGETS:
            if r["case"] != case:
                continue
            anchors = {
                n: m["mpsnr_db"]
                for n, m in r["methods"].items()
                if n not in (NOISY, DECSC) and "mpsnr_db" in m
            }
            d = r["methods"].get(DECSC, {})
            best = max(anchors, key=lambda n: anchors[n]) if anchors else None
            row: dict[str, Any] = {
                "scene": r["scene"],
                "case": case,
                "target_margin_db": margin,
                "decsc_mpsnr_db": d.get("mpsnr_db"),
                "best_anchor": best,
                "best_anchor_mpsnr_db": anchors.get(best) if best else None,
            }
            if row["decsc_mpsnr_db"] is None or best is None:
                row["margin_db"] = None
                row["status"] = "not measured" if best else "no anchor ran"
            else:
                row["margin_db"] = row["decsc_mpsnr_db"] - anchors[best]
                row["status"] = "PASS" if row["margin_db"] >= margin else "FAIL"
            rows.append(row)
    return rows


# ---------------------------------------------------------------- report


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if np.isinf(v):
            return "inf"
        return f"{v:.{nd}f}"
    return str(v)


def _md_decsc(d: dict[str, Any]) -> list[str]:
    """Header lines on DECSC: weights and their digest, band guard and subspace pass, or why it
    did not run."""
    lines: list[str] = []
    if d.get("status") == "ok":
        lines.append(
            f"- DECSC weights: `{d.get('weights_file', '?')}` sha256 `{d.get('weights_sha256', '?')}`"
        )
        g = d.get("band_guard") or {}
        if g.get("status") == "on":
            lines.append(
                f"- DECSC band guard: on, `{g.get('file')}` sha256 `{g.get('sha256')}` "
                "(`--no-guard` for the model's output alone)"
            )
        elif g:
            lines.append("- DECSC band guard: **off** (`--no-guard`)")
        sp = d.get("subspace") or {}
        if sp.get("status") == "on":
            lines.append(
                f"- DECSC spectral-subspace pass: on, k = {sp.get('k')} (`workers/denoise/subspace.py`; "
                "`--subspace 0` for the model alone)"
            )
        elif sp:
            lines.append(
                "- DECSC spectral-subspace pass: **off** (`--subspace 0`): the model alone"
            )
    else:
        lines.append(f"- DECSC: **{d.get('status')}**: {d.get('note')}")
    return lines


def _md_verdict_and_summary(res: dict[str, Any], methods: list[str]) -> list[str]:
    """The verdict table against the issue's targets, DECSC's convergence count, and the MPSNR
    summary of every method per scene × case."""
    lines: list[str] = []
    lines += ["", "## Verdict (targets of issue 8: MPSNR ≥ best anchor + margin)", ""]
    lines += [
        "| scene | case | DECSC MPSNR (dB) | best anchor | anchor MPSNR (dB) | margin (dB) | target | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in res["verdict"]:
        lines.append(
            f"| {v['scene']} | {v['case']} | {_fmt(v['decsc_mpsnr_db'])} | {v['best_anchor'] or '–'} | "
            f"{_fmt(v['best_anchor_mpsnr_db'])} | {_fmt(v['margin_db'])} | +{v['target_margin_db']:g} | "
            f"{v['status']} |"
        )

    c = res.get("decsc_convergence", {})
    if c.get("cubes"):
        lines += [
            "",
            f"DECSC convergence: {c['converged']} of {c['cubes']} cubes converged in every "
            f"spectral window (fraction {c['fraction']:.2f}).",
        ]
    lines += ["", "## MPSNR (dB) summary", ""]
    lines.append("| scene | case | " + " | ".join(methods) + " |")
    lines.append("|---|---|" + "---|" * len(methods))
    for r in res["results"]:
        cells = []
        for m in methods:
            mm = r["methods"].get(m)
            cells.append(
                "–" if mm is None else ("error" if "error" in mm else _fmt(mm["mpsnr_db"]))
            )
        lines.append(f"| {r['scene']} | {r['case']} | " + " | ".join(cells) + " |")
    return lines


def _md_notes(m: str, mm: dict[str, Any]) -> list[str]:
    """Notes column of one method's row: non-finite values, cache origin, and for DECSC its
    solver convergence, band guard and subspace pass."""
    notes = []
    if mm.get("nonfinite_values"):
        notes.append(f"{mm['nonfinite_values']} non-finite values scored as 0")
    if mm.get("cached"):
        notes.append(f"cached, measured {mm.get('measured_utc', '?')}")
    if m == DECSC:
        notes.append(
            f"converged {_fmt(mm.get('converged_fraction'), 2)} ({mm.get('solves')} spectral windows), "
            f"iters mean {_fmt(mm.get('iterations_mean'), 1)} max {_fmt(mm.get('iterations_max'), 0)}, "
            f"max residual {_fmt(mm.get('residual_max'), 4)}"
        )
        if mm.get("guard"):
            notes.append(
                f"guard w mean {_fmt(mm.get('guard_w_mean'), 3)} max {_fmt(mm.get('guard_w_max'), 2)}, "
                f"{mm.get('guard_bands_half')} bands w > 0.5"
            )
        if mm.get("subspace_k"):
            notes.append(
                f"subspace k {mm['subspace_k']}: {mm.get('subspace_outside')} pixels kept outside, "
                f"{mm.get('subspace_impulses')} impulse pixels ({mm.get('subspace_stuck', 0)} stuck) and "
                f"{mm.get('subspace_lines')} "
                "line offsets cleaned"
                + (
                    f", σ spread {_fmt(mm.get('subspace_sigma_spread'), 2)} → blend "
                    f"{_fmt(mm.get('subspace_blend'), 2)}"
                    if "subspace_blend" in mm
                    else ""
                )
            )
    return notes


def _md_per_case(res: dict[str, Any], methods: list[str]) -> list[str]:
    """One table per scene × case: every metric of every method that ran, with notes."""
    lines: list[str] = []
    lines += ["", "## Per scene and case", ""]
    for r in res["results"]:
        lines += [
            f"### {r['scene']} / {r['case']} (oracle σ {r['oracle_sigma_255']:.1f}/255)",
            "",
            "| method | MPSNR (dB) | MSSIM | SAM (°) | ERGAS | time (s) | bands worse than noisy | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in methods:
            mm = r["methods"].get(m)
            if mm is None:
                continue
            if "error" in mm:
                lines.append(f"| {m} | – | – | – | – | – | – | failed: {mm['error'][:160]} |")
                continue
            notes = _md_notes(m, mm)
            lines.append(
                f"| {m} | {_fmt(mm['mpsnr_db'])} | {_fmt(mm['mssim'], 4)} | {_fmt(mm['sam_deg'])} | "
                f"{_fmt(mm['ergas'])} | {_fmt(mm['time_s'], 1)} | "
                f"{_fmt(mm.get('bands_worse_than_noisy'))} | {'; '.join(notes)} |"
            )
        lines.append("")
    return lines


def render_markdown(res: dict[str, Any]) -> str:
    """The human report: environment, MPSNR summary, per-case tables, verdict, notes."""
    env = res["environment"]
    methods = [NOISY, DECSC, *res["config"]["baselines"]]
    lines = [
        "# Denoising evaluation: DECSC vs classical anchors",
        "",
        "Protocol: `docs/evaluation.md` (MPSNR in dB, mean of per-band PSNR, peak 1; MSSIM; SAM in "
        "degrees; ERGAS; outputs clamped to [0, 1]; noise seeded per scene × case).",
        "",
        f"- command: `{env['command']}`",
        f"- date: {env['date_utc']}; git commit {env['git_commit']}",
        f"- device: {env['cpu']} ({env['cpu_count']} cores visible, torch threads "
        f"{env['torch_threads']}); DECSC on {env['decsc_device']}",
        f"- versions: python {env['python']}, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
    ]
    lines += _md_decsc(res["decsc"])
    for name, why in res["skipped_baselines"].items():
        lines.append(f"- baseline `{name}` **skipped**: {why}")
    for name, b in res["baselines"].items():
        lines.append(
            f"- `{name}`: {b['settings']} ({', '.join(f'{k} {v}' for k, v in b['versions'].items())})"
        )
    for scene, meta in res["scenes"].items():
        lines.append(
            f"- scene `{scene}`: `{meta['file']}`, (B, H, W) = {tuple(meta['shape_bhw'])}, "
            f"scaling {meta['scaling']}" + (f", {meta['crop']}" if "crop" in meta else "")
        )

    missing_cases = [c for c in DEFAULT_CASES if c not in res["config"]["cases"]]
    missing_bl = [b for b in BASELINE_NAMES if b not in res["config"]["baselines"]]
    if missing_cases or missing_bl or res["config"].get("crop"):
        lines.append(
            "- **not part of this run**: "
            + "; ".join(
                x
                for x in (
                    f"default cases {missing_cases}" if missing_cases else "",
                    f"baselines {missing_bl}" if missing_bl else "",
                    f"full scenes (centre crop {res['config']['crop']})"
                    if res["config"].get("crop")
                    else "",
                )
                if x
            )
        )
    lines += _md_verdict_and_summary(res, methods)
    lines += _md_per_case(res, methods)
    lines += [
        "Bands worse than noisy: number of bands whose PSNR after denoising is below that of the "
        'noisy input (clamped to [0, 1]); 0 is the goal ("never worse than the input").',
        "",
    ]
    return "\n".join(lines)


def write_report(res: dict[str, Any], md_path: Path, json_path: Path) -> None:
    """Write the markdown report and the JSON result (parents created)."""
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(render_markdown(res))
    json_path.write_text(json.dumps(res, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs (e.g. one process per scene): results concatenated, the
    verdict and convergence recomputed, every run's command and environment kept."""
    if not parts:
        raise ConfigError("merge_results needs at least one result; got an empty list")
    base = dict(parts[0])
    results = [r for p in parts for r in p["results"]]
    base["results"] = results
    base["scenes"] = {k: v for p in parts for k, v in p["scenes"].items()}
    base["skipped_baselines"] = {k: v for p in parts for k, v in p["skipped_baselines"].items()}
    base["runs"] = [p["environment"] for p in parts]
    env = dict(parts[0]["environment"])
    env["command"] = " ; ".join(p["environment"]["command"] for p in parts) + " (merged)"
    base["environment"] = env
    base["config"] = dict(parts[0]["config"])
    base["config"]["scenes"] = list(base["scenes"])
    base["decsc_convergence"] = _convergence(results)
    base["verdict"] = verdict(results)
    return base
