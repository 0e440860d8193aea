"""Tile models: protocol, picklability, per-process cache, real DEQ-Unmix fit on a real crop."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.errors import ModelError, WeightsError
from pipeline.hashing import sha256_tree
from pipeline.runner import TileModel
from tests.pipeline.test_tiles import real_crop
from workers import infer


def test_identity_model_is_a_picklable_tile_model() -> None:
    m = infer.IdentityTileModel(halo=3)
    assert isinstance(m, TileModel)
    back = pickle.loads(pickle.dumps(m))
    assert back == m
    cube = np.random.default_rng(0).random((5, 7, 9), dtype=np.float32)
    out, st = back(cube)
    assert out is not cube and np.array_equal(out, cube)
    assert st["converged"] is True and st["worker"]


def test_model_cache_loads_once_per_process() -> None:
    calls: list[int] = []

    def loader() -> object:
        calls.append(1)
        return object()

    key = ("test-cache", id(calls))
    a = infer.get_model(key, loader)
    b = infer.get_model(key, loader)
    assert a is b and len(calls) == 1 and key in infer.cached_keys()


def test_denoise_tile_model_uses_the_registry_halo_and_hash() -> None:
    from workers.registry import get_spec

    spec = get_spec("decsc")
    m = infer.DenoiseTileModel.from_registry("cpu")
    assert isinstance(m, TileModel)
    assert m.halo == spec.halo and m.weights_sha256 == spec.weights_sha256
    assert pickle.loads(pickle.dumps(m)) == m


def test_cuda_without_a_device_is_refused() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(
        ModelError, match=r"device 'cuda' was asked for but no CUDA device is present"
    ):
        infer.resolve_device("cuda")
    assert infer.resolve_device("auto") == "cpu"


def test_plugin_refuses_unverified_weights_or_loads_them_once() -> None:
    from workers.plugin import ModelPlugin
    from workers.registry import get_spec, verified_weights_path

    plugin = ModelPlugin(models=("decsc",), torch_threads=None)
    worker = SimpleNamespace()
    try:
        verified_weights_path(get_spec("decsc"))
    except WeightsError:
        with pytest.raises(WeightsError, match="decsc"):
            plugin.setup(worker)
        assert not hasattr(worker, "hyperdeq_models")
        return
    plugin.setup(worker)
    plugin.setup(worker)
    assert worker.hyperdeq_models == {"decsc": get_spec("decsc").weights_sha256}
    sha = get_spec("decsc").weights_sha256
    assert sum(k[0] == "decsc" and k[-1] == sha for k in infer.cached_keys()) == 1


@pytest.mark.slow
def test_unmix_tile_model_on_a_real_fit(tmp_path: Path) -> None:
    import torch

    from workers.unmix.fit import fit_scene

    torch.set_num_threads(1)
    scene = real_crop(0, 0, 40, 40)  # fully valid part of the mosaic
    fit = fit_scene(
        scene, 3, seed=0, max_epochs=2, fit_tile_size=24, fit_tiles=2, sample_pixels=1000
    )
    fit.save(tmp_path / "fit")
    m = infer.UnmixTileModel.from_fit(tmp_path / "fit")
    assert isinstance(m, TileModel) and m.out_names == (*fit.names, "rmse")
    assert m.weights_sha256 == sha256_tree(tmp_path / "fit")
    m = pickle.loads(pickle.dumps(m))
    cube = np.asarray(scene.values[scene["good_band"].values][:, :20, :20])
    cube[:, :3, :3] = np.nan
    out, st = m(cube)
    assert out.shape == (4, 20, 20)
    assert np.isnan(out[:, :3, :3]).all()
    ab = out[:3, 5:, 5:]
    np.testing.assert_allclose(ab.sum(axis=0), 1.0, atol=1e-3)
    assert np.isfinite(out[3, 5:, 5:]).all() and (out[3, 5:, 5:] >= 0).all()
    assert set(st) >= {"iterations", "residual", "converged", "device", "worker"}


def test_plugin_of_a_connecting_client_keeps_the_owners_thread_count() -> None:
    """A sweep's scenes connect to the sweep's cluster and register the plugin again: with
    ``keep_threads`` they must not lower the torch threads the cluster's owner chose."""
    from workers.plugin import ModelPlugin
    from workers.registry import get_spec, verified_weights_path

    try:
        verified_weights_path(get_spec("decsc"))
    except WeightsError:
        pytest.skip("shipped DECSC weights not installed")
    import torch

    before = torch.get_num_threads()
    worker = SimpleNamespace()
    try:
        ModelPlugin(models=("decsc",), torch_threads=2).setup(worker)
        assert worker.hyperdeq_torch_threads == 2 and torch.get_num_threads() == 2
        ModelPlugin(models=("decsc",), torch_threads=1, keep_threads=True).setup(worker)
        assert worker.hyperdeq_torch_threads == 2 and torch.get_num_threads() == 2
        ModelPlugin(models=("decsc",), torch_threads=1).setup(worker)  # the owner may change it
        assert worker.hyperdeq_torch_threads == 1 and torch.get_num_threads() == 1
        fresh = SimpleNamespace()  # nothing set yet: a connecting client's count applies
        ModelPlugin(models=("decsc",), torch_threads=2, keep_threads=True).setup(fresh)
        assert fresh.hyperdeq_torch_threads == 2
    finally:
        torch.set_num_threads(before)
