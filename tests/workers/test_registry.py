"""Model registry: lookup by name, frozen specs, sha256-checked safetensors paths."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.errors import ModelError, WeightsError
from pipeline.hashing import sha256_file
from workers.registry import ModelSpec, WeightsRef, get_spec, list_models, verified_weights_path


def test_list_and_lookup_decsc() -> None:
    assert "decsc" in list_models()
    spec = get_spec("decsc")
    assert spec.name == "decsc" and spec.halo > 0 and spec.weights_file == "decsc.safetensors"
    assert (
        set(spec.weights) == {"shipped", "full", "guard"}
        and spec.solver.eval_max_iter == spec.solver["eval_max_iter"]
    )
    for key in spec.weights:  # every shipped file is present and matches its recorded sha256
        assert sha256_file(verified_weights_path(spec, key=key)) == spec.weights[key].sha256
    assert len(spec.weights_sha256 or "") == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.halo = 0  # type: ignore[misc]


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'dncnn'; valid models are \[.*'decsc'"):
        get_spec("dncnn")


def test_spec_rejects_contradictions() -> None:
    with pytest.raises(ModelError, match="halo must be >= 0"):
        ModelSpec(name="x", halo=-1, band_handling="any")
    with pytest.raises(
        ModelError, match=r"default weights 'full' are not among its weights \['shipped'\]"
    ):
        ModelSpec(
            name="x",
            halo=0,
            band_handling="any",
            weights={"shipped": WeightsRef("x.safetensors", "0" * 64)},
            default_weights="full",
        )


def test_shipped_decsc_weights_match_recorded_hash() -> None:
    spec = get_spec("decsc")
    p = verified_weights_path(spec)
    assert sha256_file(p) == spec.weights_sha256


def test_verified_path_refuses_pickles_and_missing(tmp_path: Path) -> None:
    spec = get_spec("decsc")
    with pytest.raises(WeightsError, match="must be a .safetensors file"):
        verified_weights_path(spec, tmp_path / "model.pt")
    with pytest.raises(WeightsError, match="does not exist"):
        verified_weights_path(spec, tmp_path / "nothere.safetensors")


def test_tampered_shipped_file_fails_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.registry as reg

    spec = get_spec("decsc")
    data = bytearray(Path(spec.weights_path).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "decsc.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(reg, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsError, match="has sha256 .* but model 'decsc' expects"):
        verified_weights_path(spec)
