"""CLI commands of the denoiser area: ``hyperdeq train denoiser`` and ``hyperdeq train guard``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def train_denoiser(
    data: Path = typer.Option(
        Path("../shared/data"), help="shared real-data folder (CAVE + crops)"
    ),
    out: Path = typer.Option(
        Path("runs/decsc"), help="output folder: checkpoint, JSON-lines log, weights"
    ),
    minutes: float = typer.Option(50.0, help="wall-clock budget (the LR schedule follows it)"),
    max_steps: int = typer.Option(100_000, help="step cap"),
    batch: int = typer.Option(4, help="patches per step"),
    patch: int = typer.Option(40, help="patch size in pixels"),
    lr: float = typer.Option(1e-3, help="peak learning rate (cosine decay)"),
    seed: int = typer.Option(0, help="seed for patches, noise and init"),
    threads: int = typer.Option(2, help="torch CPU threads"),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint.pt"),
    init_weights: Path = typer.Option(
        None,
        help="fine-tune from these safetensors weights (same --arch; "
        "fresh optimiser and schedule; use another --seed for new batches)",
    ),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    arch: str = typer.Option(
        "shipped", help="shipped (the registry's model) or full (larger; GPU)"
    ),
    loader_workers: int = typer.Option(
        0, help="processes building batches (0: in the training loop)"
    ),
    loss: str = typer.Option(
        "l1",
        help="l1, or l1-noise-relative (each band's error divided by its noise "
        "level: nearly clean bands count as much as noisy ones in dB)",
    ),
    extra_fraction: float = typer.Option(
        0.25, help="share of patches drawn from the remote-sensing crops (the rest from CAVE); 0..1"
    ),
    residual_weight: float = typer.Option(
        0.05,
        help="fixed-point residual regulariser weight (relative "
        "residual of the training forward's last step)",
    ),
    train_iters: int = typer.Option(
        None, help="forward solver iterations per training step (default: the registry's, 6)"
    ),
    install: bool = typer.Option(
        False, help="copy the weights to workers/weights/decsc.safetensors"
    ),
) -> None:
    """Train the DECSC denoiser on real data with blind protocol noise; export safetensors."""
    from workers.denoise.train import TrainConfig

    cfg = TrainConfig(
        data_dir=data,
        out_dir=out,
        minutes=minutes,
        max_steps=max_steps,
        batch=batch,
        patch=patch,
        lr=lr,
        seed=seed,
        threads=threads,
        resume=resume,
        device=device,
        arch=arch,
        loader_workers=loader_workers,
        init_weights=init_weights,
        loss=loss,
        extra_fraction=extra_fraction,
        residual_weight=residual_weight,
        train_iters=train_iters,
    )
    _run_training(cfg, install)


def _run_training(cfg: Any, install: bool) -> None:
    """Train with a progress line per step on the console; optionally install the weights."""
    import shutil

    from rich.console import Console

    from pipeline.hashing import sha256_file
    from workers.denoise.train import train
    from workers.registry import WEIGHTS_DIR

    console = Console()

    def show(rec: dict) -> None:
        line = (
            f"step {rec['step']:5d}  {rec['elapsed_s'] / 60:5.1f} min  loss {rec['loss']:.4f}  "
            f"psnr {rec['psnr']:.2f} (noisy {rec['psnr_noisy']:.2f})  it {rec['iterations']:.1f}  "
            f"res {rec['residual']:.3g}  lr {rec['lr']:.2e}"
        )
        if "val" in rec:
            line += "  val " + " ".join(
                f"{k}={v['out']}/{v['noisy']}" for k, v in rec["val"].items()
            )
        console.print(line)

    weights = train(cfg, progress=show)
    console.print(f"weights: {weights}  sha256 {sha256_file(weights)}")
    if install:
        dest = WEIGHTS_DIR / "decsc.safetensors"
        shutil.copyfile(weights, dest)
        console.print(
            f"installed to {dest}; update the shipped entry's sha256 in workers/denoise/spec.py"
        )


def train_guard_cmd(
    data: Path = typer.Option(
        Path("../shared/data"), help="shared real-data folder (CAVE + crops)"
    ),
    out: Path = typer.Option(Path("runs/decsc_guard.safetensors"), help="output safetensors file"),
    patches: int = typer.Option(
        480, help="training patches (64x64x31; a quarter from remote-sensing crops)"
    ),
    val_patches: int = typer.Option(120, help="validation patches from the held-out CAVE scenes"),
    seed: int = typer.Option(0, help="seed for patches and noise (+11/+12/+13) and the fit"),
    threads: int = typer.Option(2, help="torch CPU threads"),
    weights: Path = typer.Option(
        None,
        help="DECSC weights whose outputs the guard learns from "
        "(default: the shipped file); new DECSC weights need a new guard",
    ),
    install: bool = typer.Option(
        False, help="copy the result to workers/weights/decsc_guard.safetensors"
    ),
) -> None:
    """Train the DECSC band guard (per-band blend toward the input where the model over-smooths)."""
    import json
    import shutil

    import torch
    from rich.console import Console

    from workers.denoise.guard import GUARD_FILE
    from workers.denoise.guard_train import train_guard

    console = Console()
    torch.set_num_threads(max(1, threads))
    path, sha, report = train_guard(
        data,
        out,
        patches=patches,
        val_patches=val_patches,
        seed=seed,
        weights=weights,
        say=console.print,
    )
    console.print(
        "held-out CAVE patches (MPSNR gain dB; bands worse than the input before -> after):"
    )
    for case, r in report.items():
        console.print(
            f"  {case:11s} {r['gain_db']:+.3f} dB  {r['bands_worse_than_input_before']} -> "
            f"{r['bands_worse_than_input_after']} of {r['bands']}"
        )
    console.print(f"guard: {path}  sha256 {sha}")
    (Path(out).with_suffix(".json")).write_text(
        json.dumps({"sha256": sha, "validation": report}, indent=1)
    )
    if install:
        shutil.copyfile(path, GUARD_FILE)
        console.print(
            f"installed to {GUARD_FILE}; set GUARD_WEIGHTS_SHA256 = {sha!r} in workers/denoise/spec.py"
        )


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add ``train denoiser`` and ``train guard`` to the ``train`` group."""
    groups["train"].command("denoiser")(train_denoiser)
    groups["train"].command("guard")(train_guard_cmd)
