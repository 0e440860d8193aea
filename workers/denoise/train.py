"""Train DECSC on real clean cubes with seeded, blind protocol noise.

Data (:mod:`workers.denoise.data`): CAVE (main) plus small remote-sensing crops; never the
denoising test scenes (Jasper Ridge, ``abu-beach-4``). Each step draws augmented patches, adds
one protocol noise case per patch drawn uniformly from ``pipeline.noise.NOISE_CASES`` (gauss
30/50, blind σ~U(10,70), band-dependent, correlated, mixture) and minimises the L1 error of the
DEQ output. Checkpoints allow resuming; every step appends a JSON line (loss, PSNR, solver
statistics) to the log.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, ReadError
from pipeline.noise import NOISE_CASES, add_noise

from .api import build_model, shipped_state, weights_metadata
from .data import HELD_OUT_CAVE, load_cave, load_training_data, sample_patch
from .decsc import DECSC

if TYPE_CHECKING:
    from workers.deq import SolverStats

LOSSES = ("l1", "l1-noise-relative")
#: added to each band's noise level in the noise-relative loss (the error a band keeps even when it
#: is clean: the model's own smoothing), in [0, 1] units
LOSS_NOISE_FLOOR = 3.0 / 255.0


def band_weights(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """Per-patch, per-band loss weights ``(N, B, 1, 1)`` ∝ 1 / (noise level + floor), mean 1.

    The noise level is the RMS of ``noisy − clean`` per band (known in training). The protocol's
    MPSNR averages per-band PSNR, a log scale: a nearly clean band smoothed by 2/255 loses as many
    dB as a noisy band left 10× worse, yet plain L1 over all bands barely sees it. Weighting each
    band's error by the inverse of its noise level aligns the loss with that (and with "never
    worse than the noisy input on any band"); with equal noise in every band it is plain L1.
    """
    level = (noisy - clean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
    w = 1.0 / (level + LOSS_NOISE_FLOOR)
    return w / w.mean(dim=1, keepdim=True)


@dataclass(frozen=True)
class TrainConfig:
    data_dir: Path
    out_dir: Path
    minutes: float = 50.0
    max_steps: int = 100_000
    batch: int = 4
    patch: int = 40
    lr: float = 1e-3
    min_lr: float = 2e-5
    residual_weight: float = 0.05  # fixed-point residual regulariser (keeps the map contractive)
    train_iters: int | None = (
        None  # forward solver iterations per training step (None: the registry's)
    )
    extra_fraction: float = 0.25  # share of patches drawn from the remote-sensing crops
    seed: int = 0
    checkpoint_every: int = 50
    val_every: int = 100
    threads: int = 2
    resume: bool = False
    init_weights: Path | None = (
        None  # start from these safetensors weights (fine-tuning; fresh optimiser)
    )
    device: str = "cpu"  # cpu | cuda | cuda:N
    arch: str = "shipped"  # ARCH_PRESETS key: shipped (registry config) or full
    loader_workers: int = 0  # >0: batches built in that many processes (GPU training)
    cases: tuple[str, ...] = field(default=NOISE_CASES)
    # "l1": plain L1 over all bands; "l1-noise-relative": each band's L1 divided by (its noise
    # level + LOSS_NOISE_FLOOR), weights normalised to mean 1 per patch (see band_weights)
    loss: str = "l1"

    def __post_init__(self) -> None:
        if self.batch < 1 or self.patch < 16 or self.minutes <= 0 or self.max_steps < 1:
            raise ConfigError(
                f"batch >= 1, patch >= 16, minutes > 0 and max_steps >= 1 required, got "
                f"{(self.batch, self.patch, self.minutes, self.max_steps)!r}"
            )
        if self.residual_weight < 0 or (self.train_iters is not None and self.train_iters < 1):
            raise ConfigError(
                f"residual_weight must be >= 0 and train_iters >= 1, got "
                f"{(self.residual_weight, self.train_iters)!r}"
            )
        if not 0 <= self.extra_fraction <= 1:
            raise ConfigError(f"extra_fraction must be in [0, 1], got {self.extra_fraction!r}")
        if self.resume and self.init_weights is not None:
            raise ConfigError(
                "give either --resume (continue OUT/checkpoint.pt) or --init-weights (fine-tune "
                "from a weights file), not both"
            )
        if self.loader_workers < 0:
            raise ConfigError(f"loader_workers must be >= 0, got {self.loader_workers!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {list(LOSSES)!r}, got {self.loss!r}")
        bad = [c for c in self.cases if c not in NOISE_CASES]
        if bad:
            raise ConfigError(f"unknown noise cases {bad!r}; valid: {list(NOISE_CASES)!r}")


def make_batch(
    cave: list[np.ndarray],
    extras: list[np.ndarray],
    cfg: TrainConfig,
    bands: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(clean, noisy, noise cases) for one step: ``cfg.batch`` augmented patches with seeded noise."""
    clean, noisy, cases = [], [], []
    for _ in range(cfg.batch):
        pool = extras if (extras and rng.random() < cfg.extra_fraction) else cave
        c = sample_patch(pool[int(rng.integers(len(pool)))], bands, cfg.patch, rng)
        case = cfg.cases[int(rng.integers(len(cfg.cases)))]
        clean.append(c)
        noisy.append(add_noise(c, case, rng))
        cases.append(case)
    return np.stack(clean), np.stack(noisy), cases


#: (cave, extras, cfg, bands) of a batch worker process, set by _pool_init from the pool's initargs
_POOL_STATE: tuple[list[np.ndarray], list[np.ndarray], TrainConfig, int] | None = None


def _pool_init(
    cave: list[np.ndarray], extras: list[np.ndarray], cfg: TrainConfig, bands: int
) -> None:
    """Batch worker start-up: keep the training data (sent once per worker) and use one torch thread."""
    global _POOL_STATE
    torch.set_num_threads(1)
    _POOL_STATE = (cave, extras, cfg, bands)


def _pool_batch(step: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Batch of training step ``step``, built in a worker process from its own per-step generator."""
    assert _POOL_STATE is not None, "batch workers start through _pool_init, which sets their data"
    cave, extras, cfg, bands = _POOL_STATE
    return make_batch(cave, extras, cfg, bands, np.random.default_rng([cfg.seed, step]))


class _BatchPrefetch:
    """Batches built ahead in ``workers`` processes, ``depth`` steps in flight.

    Each step's batch comes from a generator seeded with ``[seed, step]``, so the data do not
    depend on the number of workers or their timing, and a resumed run continues the same stream.
    The workers are *spawned* (a fork of a process that already runs threads -- torch's pool, a
    Prefect or Dask client -- can deadlock the child), and ``close`` cancels what is queued and
    waits for the at most ``workers`` batches being built (a ``multiprocessing.Pool.terminate``
    hung here once, its task thread blocked on the queue lock). A worker that dies raises
    ``BrokenProcessPool`` in :meth:`get` instead of leaving the training waiting forever.
    Cost of spawning: each worker gets its own copy of the training arrays (pickled once at
    start-up; the full CAVE set is ~0.9 GiB as float32, so 6 workers hold ~5.5 GiB more than
    forked ones sharing pages would) and imports torch (~2 s).
    """

    def __init__(
        self,
        cave: list[np.ndarray],
        extras: list[np.ndarray],
        cfg: TrainConfig,
        bands: int,
        start: int,
        workers: int,
        depth: int,
    ) -> None:
        import collections
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(
            max(1, workers),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_pool_init,
            initargs=(cave, extras, cfg, bands),
        )
        self.next_step = start
        self.pending: collections.deque[Any] = collections.deque()
        for _ in range(max(1, depth)):
            self._submit()

    def _submit(self) -> None:
        self.pending.append(self.pool.submit(_pool_batch, self.next_step))
        self.next_step += 1

    def get(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        x, y, cases = self.pending.popleft().result()
        self._submit()
        return torch.from_numpy(x), torch.from_numpy(y), cases

    def close(self) -> None:
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _closing(stream: _BatchPrefetch | None) -> Iterator[None]:
    try:
        yield
    finally:
        if stream is not None:
            stream.close()


def mpsnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over samples and bands of 10 log10(1 / MSE_band), output clamped to [0, 1]."""
    mse = ((x.clamp(0, 1) - ref) ** 2).flatten(2).mean(2).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def _lr(cfg: TrainConfig, step: int, elapsed: float) -> float:
    frac = min(1.0, max(step / cfg.max_steps, elapsed / (cfg.minutes * 60)))
    warm = min(1.0, (step + 1) / 20)
    return warm * (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac)))


def validation_set(data_dir: Path, bands: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Fixed noisy/clean 96x96 crops of the held-out CAVE scenes (seeded), one per case."""
    out = []
    for name in HELD_OUT_CAVE:
        p = data_dir / "cave" / name
        if not p.is_file():
            continue
        clean = load_cave(p)[:bands, 80:176, 80:176]
        for case in ("gauss30", "band[0,55]", "mixture"):
            noisy = add_noise(clean, case, np.random.default_rng(1234))
            out.append(
                (
                    f"{name.split('_ms')[0]}:{case}",
                    torch.from_numpy(noisy)[None],
                    torch.from_numpy(clean)[None],
                )
            )
    return out


def _init_run(
    cfg: TrainConfig, ckpt: Path
) -> tuple[
    DECSC, torch.optim.Optimizer, np.random.Generator, int, float, dict[str, str], torch.device
]:
    """Model, optimiser and data RNG for a run: fresh (optionally from ``cfg.init_weights``) or
    resumed from ``ckpt``; returns them with the step, the elapsed seconds before this run, the
    initial-weights provenance and the device."""
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"training device {cfg.device!r} asked for but torch sees no CUDA device; use --device cpu"
        )
    model: DECSC = build_model("cpu", cfg.arch).to(dev)
    if cfg.train_iters is not None:
        model.deq.cfg = replace(model.deq.cfg, max_iter=cfg.train_iters)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    step, elapsed_before = 0, 0.0
    init_note: dict[str, str] = {}
    if cfg.init_weights is not None:
        from workers.registry import sha256_file

        from .api import load_denoiser

        start = load_denoiser(
            "cpu", weights=cfg.init_weights, arch=cfg.arch
        )  # digest + config checked
        model.map.load_state_dict(start.map.state_dict())  # type: ignore[union-attr]
        init_note = {
            "init_weights": str(cfg.init_weights),
            "init_sha256": sha256_file(Path(cfg.init_weights)),
        }
    if cfg.resume and ckpt.is_file():
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed_before = int(state["step"]), float(state["elapsed"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
    return model, opt, rng, step, elapsed_before, init_note, dev


class _Rollback:
    """Divergence guard: DEQs can turn expansive; keep a known-good state and roll back to it
    (halving the learning rate) when a step's loss or fixed-point residual blows up."""

    def __init__(self, model: DECSC, opt: torch.optim.Optimizer) -> None:
        self.keep(model, opt)
        self.ema: float | None = None
        self.lr_scale = 1.0
        self.rollbacks = 0

    def keep(self, model: DECSC, opt: torch.optim.Optimizer) -> None:
        """Remember the current model and optimiser state as the known-good one."""
        self.good = {k: v.clone() for k, v in model.state_dict().items()}
        self.good_opt = copy.deepcopy(opt.state_dict())

    def step(
        self,
        model: DECSC,
        opt: torch.optim.Optimizer,
        lval: float,
        st: SolverStats,
        gnorm: torch.Tensor,
        step: int,
    ) -> bool:
        """Take the optimiser step, or roll back if diverging (returned); skip non-finite gradients."""
        diverging = (
            (not math.isfinite(lval))
            or float(st.residual.mean()) > 0.6
            or (self.ema is not None and step > 50 and lval > 3 * self.ema)
        )
        if diverging:
            model.load_state_dict(self.good)
            opt.load_state_dict(self.good_opt)
            self.lr_scale *= 0.5
            self.rollbacks += 1
        elif torch.isfinite(gnorm):
            opt.step()
            self.ema = lval if self.ema is None else 0.95 * self.ema + 0.05 * lval
        return diverging


def _next_batch(
    stream: _BatchPrefetch | None,
    cave: list[np.ndarray],
    extras: list[np.ndarray],
    cfg: TrainConfig,
    bands: int,
    rng: np.random.Generator,
    dev: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The next (clean, noisy, cases) batch on ``dev``: from the prefetch workers or built here."""
    if stream is not None:
        x, y, cases = stream.get()
    else:
        xc, yc, cases = make_batch(cave, extras, cfg, bands, rng)
        x, y = torch.from_numpy(xc), torch.from_numpy(yc)
    return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), cases


def _forward_backward(
    model: DECSC, opt: torch.optim.Optimizer, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, SolverStats, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (reconstruction plus weighted fixed-point residual) and its clipped gradients; returns
    the output, solver statistics, fixed-point residual, reconstruction loss, loss and grad norm."""
    out, st = model(y)
    fp_res = model.deq.last_train_residual
    assert fp_res is not None, "the DEQ did not record its training residual"
    if cfg.loss == "l1":
        rec_loss = F.l1_loss(out, x)
    else:
        rec_loss = ((out - x).abs() * band_weights(x, y)).mean()
    loss = rec_loss + cfg.residual_weight * fp_res.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    return out, st, fp_res, rec_loss, loss, gnorm


def train(cfg: TrainConfig, progress: Callable[[dict], None] | None = None) -> Path:
    """Train; returns the path of the exported safetensors weights (``out_dir/decsc.safetensors``)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = cfg.out_dir / "checkpoint.pt"
    log_path = cfg.out_dir / "train_log.jsonl"
    model, opt, rng, step, elapsed_before, init_note, dev = _init_run(cfg, ckpt)
    cave, extras, names = load_training_data(cfg.data_dir)
    val = [(n, a.to(dev), b.to(dev)) for n, a, b in validation_set(cfg.data_dir, model.cfg.bands)]
    stream = None
    if cfg.loader_workers > 0:
        stream = _BatchPrefetch(
            cave,
            extras,
            cfg,
            model.cfg.bands,
            step,
            cfg.loader_workers,
            depth=2 * cfg.loader_workers,
        )
    bands = model.cfg.bands
    t0 = time.time() - elapsed_before
    model.train()
    guard = _Rollback(model, opt)
    with _closing(stream), log_path.open("a") as log:
        _log_event(
            log,
            {
                "event": "start",
                "step": step,
                "config": {k: str(v) for k, v in asdict(cfg).items()},
                "cave_scenes": names,
                "extras": len(extras),
                **init_note,
            },
        )
        while step < cfg.max_steps and (time.time() - t0) < cfg.minutes * 60:
            x, y, cases = _next_batch(stream, cave, extras, cfg, bands, rng, dev)
            lr = guard.lr_scale * _lr(cfg, step, time.time() - t0)
            for g in opt.param_groups:
                g["lr"] = lr
            ts = time.time()
            out, st, fp_res, rec_loss, loss, gnorm = _forward_backward(model, opt, cfg, x, y)
            diverging = guard.step(model, opt, loss.item(), st, gnorm, step)
            step += 1
            if step % 25 == 0 and not diverging:
                guard.keep(model, opt)
            rec = _step_record(
                step,
                loss,
                rec_loss,
                fp_res,
                out,
                x,
                y,
                st,
                gnorm,
                lr,
                diverging,
                guard,
                cases,
                ts,
                t0,
            )
            if step % cfg.val_every == 0:
                rec["val"] = evaluate(model, val)
                model.train()
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if progress:
                progress(rec)
            if step % cfg.checkpoint_every == 0:
                _save_ckpt(model, opt, step, time.time() - t0, rng, ckpt)
        _save_ckpt(model, opt, step, time.time() - t0, rng, ckpt)
        final_val = evaluate(model, val)
        _log_event(
            log, {"event": "end", "step": step, "elapsed_s": time.time() - t0, "val": final_val}
        )
    return _export(model, cfg, step, time.time() - t0, final_val, init_note, dev)


def _log_event(log: Any, event: dict[str, Any]) -> None:
    log.write(json.dumps(event) + "\n")


def _step_record(
    step: int,
    loss: Any,
    rec_loss: Any,
    fp_res: Any,
    out: Any,
    x: Any,
    y: Any,
    st: Any,
    gnorm: Any,
    lr: float,
    diverging: bool,
    guard: Any,
    cases: Any,
    ts: float,
    t0: float,
) -> dict[str, Any]:
    """One training step's log line."""
    return {
        "step": step,
        "loss": loss.item(),
        "l1": rec_loss.item(),
        "fp_res": fp_res.mean().item(),
        "psnr": mpsnr(out.detach(), x),
        "psnr_noisy": mpsnr(y, x),
        "iterations": float(st.iterations.float().mean()),
        "residual": float(st.residual.mean()),
        "grad_norm": float(gnorm),
        "lr": lr,
        "rollback": diverging,
        "rollbacks": guard.rollbacks,
        "cases": cases,
        "step_s": time.time() - ts,
        "elapsed_s": time.time() - t0,
    }


def _export(
    model: Any,
    cfg: TrainConfig,
    step: int,
    wall_s: float,
    final_val: Any,
    init_note: dict[str, Any],
    dev: torch.device,
) -> Path:
    """Write the trained weights (``out_dir/decsc.safetensors``) with their metadata."""
    from safetensors.torch import save_file

    weights = cfg.out_dir / "decsc.safetensors"
    meta = weights_metadata(
        model,
        {
            "steps": step,
            "wall_s": round(wall_s, 1),
            "seed": cfg.seed,
            "batch": cfg.batch,
            "patch": cfg.patch,
            "val": final_val,
            "arch": cfg.arch,
            "device": _device_name(dev),
            **init_note,
        },
    )
    save_file(shipped_state(model), str(weights), metadata=meta)
    return weights


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return "cpu"


def _save_ckpt(
    model: DECSC,
    opt: torch.optim.Optimizer,
    step: int,
    elapsed: float,
    rng: np.random.Generator,
    path: Path,
) -> None:
    """Write a resume checkpoint that :func:`load_checkpoint` reads with ``weights_only=True``.

    Only tensors and plain Python values go in: the numpy RNG state (a dict holding 128-bit
    integers) is stored as a JSON string, step and elapsed time as int/float.
    """
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "step": int(step),
            "elapsed": float(elapsed),
            "rng": json.dumps(rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

    Returns ``model``/``opt`` state dicts, ``step``, ``elapsed``, ``torch_rng`` and ``rng`` (the
    numpy bit-generator state as a dict). A checkpoint holding anything but tensors and plain
    values (e.g. a hostile pickle) is refused with :class:`ReadError`.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ReadError(
            f"cannot load training checkpoint {str(path)!r} safely ({type(exc).__name__}: {exc}); "
            "it holds objects other than tensors and plain values, or is corrupt. Delete it and "
            "train without --resume"
        ) from exc
    if not isinstance(state, dict) or not {
        "model",
        "opt",
        "step",
        "elapsed",
        "rng",
        "torch_rng",
    } <= set(state):
        raise ReadError(
            f"training checkpoint {str(path)!r} lacks model/opt/step/elapsed/rng/torch_rng; "
            "delete it and train without --resume"
        )
    if isinstance(state["rng"], str):
        state["rng"] = json.loads(state["rng"])
    return state


@torch.no_grad()
def evaluate(
    model: DECSC, val: list[tuple[str, torch.Tensor, torch.Tensor]]
) -> dict[str, dict[str, float]]:
    """MPSNR (dB) of noisy input and output on the validation crops, plus solver iterations."""
    model.eval()
    res = {}
    for name, noisy, clean in val:
        out, st = model(noisy)
        res[name] = {
            "noisy": round(mpsnr(noisy, clean), 2),
            "out": round(mpsnr(out, clean), 2),
            "iterations": int(st.iterations.max()),
            "residual": float(st.residual.max()),
        }
    return res
