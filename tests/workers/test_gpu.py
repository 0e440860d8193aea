"""CUDA checks (marker ``gpu``: skipped without a CUDA device, run on a GPU machine).

They use only torch, numpy and the shipped data, so they also run where the geospatial
stack is absent. Command used on the H100: ``python -m pytest -m gpu tests/workers/test_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.noise import add_noise

DATA = Path(__file__).resolve().parents[1] / "data" / "decsc"
pytestmark = pytest.mark.gpu


def _pavia() -> np.ndarray:
    with np.load(DATA / "paviaU_24x24x102.npz") as d:
        c = d["cube"].astype(np.float32)
    return (c - c.min()) / (c.max() - c.min())


def test_denoise_on_cuda_matches_cpu() -> None:
    """Same weights, same noisy real cube (102 bands, 6 spectral windows): CUDA output ≈ CPU output."""
    from workers.denoise.api import denoise_cube, load_denoiser

    clean = _pavia()
    noisy = add_noise(clean, "gauss30", np.random.default_rng(0))
    out_cpu, st_cpu = denoise_cube(load_denoiser("cpu"), noisy, device="cpu")
    out_gpu, st_gpu = denoise_cube(load_denoiser("cuda"), noisy, device="cuda")
    assert out_gpu.dtype == np.float32 and out_gpu.shape == clean.shape
    # float32 on both; TF32 convolutions on the GPU and Anderson's Gram solve move the last digits
    assert np.abs(out_gpu - out_cpu).max() < 2e-2
    assert np.sqrt(np.mean((out_gpu - out_cpu) ** 2)) < 2e-3
    assert st_gpu["windows"] == st_cpu["windows"]


def test_training_step_on_cuda_keeps_parameters_on_device(tmp_path: Path) -> None:
    """One optimiser step of the DEQ on the GPU: finite loss, parameters change, nothing left on the CPU."""
    from workers.denoise.api import build_model

    torch.manual_seed(0)
    model = build_model("cuda").train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    clean = torch.from_numpy(_pavia()[:31])[None].cuda()
    noisy = clean + 30 / 255 * torch.randn_like(clean)
    out, st = model(noisy)
    loss = (out - clean).abs().mean() + 0.05 * model.deq.last_train_residual.mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert int(st.iterations.max()) >= 1


def test_deq_unmix_on_cuda_matches_cpu() -> None:
    """The unmixer's DEQ on the GPU gives the CPU's abundances (on the simplex) for a real cube."""
    from workers.unmix.classical import vca
    from workers.unmix.deq_unmix import DEQUnmix

    cube = _pavia()
    Y = cube.reshape(cube.shape[0], -1).astype(np.float64)
    E, _ = vca(Y, 4, seed=0)
    torch.manual_seed(0)
    m = DEQUnmix(torch.tensor(np.clip(E, 0, None), dtype=torch.float32)).eval()
    x = torch.from_numpy(cube)[None]
    with torch.no_grad():
        a_cpu, _ = m(x)
        a_gpu, _ = m.to("cuda")(x.cuda())
    a_gpu = a_gpu.cpu()
    assert torch.allclose(a_gpu.sum(1), torch.ones_like(a_gpu.sum(1)), atol=1e-4)
    assert (a_gpu >= -1e-6).all()
    assert (a_gpu - a_cpu).abs().max() < 1e-2
