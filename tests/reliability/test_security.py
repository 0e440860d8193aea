"""Security: weights only from verified safetensors, configuration as data, confined output paths,
TLS between Dask processes, an authenticated Prefect server.

Refusals are proved, not assumed: hostile files carry a payload that would create a marker file
if it were ever executed (unpickled or YAML-constructed), and the tests check the marker is absent.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.errors import ConfigError, WeightsError, WriteError
from tests.reliability._data import ROOT


class _Payload:
    """Unpickling this creates ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _hostile_pickle(dest: Path, marker: Path) -> Path:
    dest.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    return dest


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".safetensors"])
def test_pickled_weights_refused_without_unpickling(case, suffix: str, tmp_path: Path) -> None:
    case(
        "security",
        f"a pickled checkpoint with a code-executing payload, named decsc{suffix}, given as weights",
        "WeightsError; the payload never runs (marker file absent)",
    )
    from workers.denoise.api import load_denoiser
    from workers.registry import get_spec, verified_weights_path

    marker = tmp_path / "pwned"
    p = _hostile_pickle(tmp_path / f"decsc{suffix}", marker)
    with pytest.raises(WeightsError) as info:
        load_denoiser("cpu", weights=p)
    if suffix != ".safetensors":
        assert "pickled checkpoints are refused" in str(info.value)
        with pytest.raises(WeightsError, match=r"must be a \.safetensors file"):
            verified_weights_path(get_spec("decsc"), p)
    else:
        assert "cannot read weights file" in str(info.value)
    assert not marker.exists(), "the pickle payload was executed"
    # the payload is live: unpickling it really would create the marker
    pickle.loads(p.read_bytes())
    assert marker.exists()
    case.measure(error=str(info.value)[:120], payload_ran_during_load=False)


def test_installed_weights_hash_checked_before_loading(
    case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case(
        "security",
        "installed weights folder holding a decsc.safetensors that is not the released file",
        "WeightsError naming both sha256s before any tensor is read",
    )
    import workers.registry as reg

    (tmp_path / "decsc.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    monkeypatch.setattr(reg, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(
        WeightsError, match=r"has sha256 '[0-9a-f]{64}' but model 'decsc' expects '[0-9a-f]{64}'"
    ):
        reg.verified_weights_path(reg.get_spec("decsc"))
    from workers.denoise.api import load_denoiser

    with pytest.raises(WeightsError, match=r"has sha256"):
        load_denoiser("cpu")


def test_yaml_python_tags_refused(case, tmp_path: Path) -> None:
    case(
        "security",
        "cluster recipe and sensor presets YAML with !!python/object/apply tags",
        "ConfigError (yaml.safe_load); the tag's callable never runs",
    )
    from flows.sweep import load_sensors
    from workers.cluster import load_recipe

    marker = tmp_path / "pwned"
    evil = f"cluster: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n"
    p = tmp_path / "recipe.yaml"
    p.write_text(evil)
    with pytest.raises(ConfigError, match=r"cannot read cluster recipe .*python/object"):
        load_recipe(str(p))
    s = tmp_path / "sensors.yaml"
    s.write_text("sensors: !!python/object/new:os.system ['touch " + str(marker) + "']\n")
    with pytest.raises(ConfigError, match=r"cannot read sensor presets"):
        load_sensors(s)
    assert not marker.exists()
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(evil)
    case.measure(payload_ran=False)


def test_recipe_code_keys_refused_unless_allowed(case, demo_crop: Path, tmp_path: Path) -> None:
    case(
        "security",
        "`hyperdeq run --recipe FILE` whose cluster mapping preloads a Python file "
        "(cluster: preload: [x.py]; issue 21 item 5)",
        "exit 2 naming the key and --allow-recipe-code, before any cluster starts; x.py never runs (marker "
        "absent); with --allow-recipe-code (allow_code=True) the recipe is accepted and the preload really runs",
    )
    from distributed import LocalCluster

    from flows.options import build
    from tests.reliability._helpers import refuse_cli
    from workers.cluster import ClusterSpec, load_recipe

    marker = tmp_path / "pwned"
    code = tmp_path / "x.py"
    code.write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"cluster": {"preload": [str(code)]}}))
    refused = r"cluster recipe '.*recipe\.yaml' sets \['cluster\.preload'\], which make the cluster load and run code; "
    measured, problems = refuse_cli(
        [
            "run",
            str(demo_crop),
            "--out",
            str(tmp_path / "out"),
            "--no-unmix",
            "--recipe",
            str(recipe),
        ],
        tmp_path,
        refused + r".*--allow-recipe-code",
    )
    case.measure(**measured)
    assert not problems, "\n".join(problems)
    assert not marker.exists(), "the recipe's preload ran although the recipe was refused"
    with pytest.raises(ConfigError, match=refused):
        load_recipe(str(recipe))
    with pytest.raises(ConfigError, match=refused):
        ClusterSpec(recipe=str(recipe))
    # opted in, as --allow-recipe-code does: accepted, and the preload is live (it runs on the workers)
    _job, spec = build({"recipe": str(recipe), "allow_recipe_code": True, "unmix": False})
    kw = spec.cluster_kwargs()
    assert spec.allow_code and kw["preload"] == [str(code)]
    with LocalCluster(**{**kw, "n_workers": 1}, processes=False, dashboard_address=None):
        pass
    assert marker.exists(), "the allowed preload did not run"
    case.measure(payload_ran_when_refused=False, payload_ran_when_allowed=True)


HOSTILE = [
    "../../etc/passwd",
    "..",
    "/etc/shadow",
    "a/../../../b",
    "..\\..\\windows",
    "~root/.ssh",
    ".bashrc",
    "scene\x00.tif",
    "x" * 500,
]


@pytest.mark.parametrize("name", HOSTILE, ids=[repr(n)[:20] for n in HOSTILE])
def test_output_path_confined(case, name: str, tmp_path: Path) -> None:
    case(
        "security",
        f"scene name {name[:40]!r} used for the output folder",
        "the run folder lies under the output root (safe_name), any escaping path raises WriteError",
    )
    from pipeline.writers import confined_path, safe_name

    root = tmp_path / "out"
    root.mkdir()
    p = confined_path(root, safe_name(name), "0123abcd")
    assert (
        root.resolve() in p.parents
        and "/" not in safe_name(name)
        and not safe_name(name).startswith(".")
    )
    if ".." in name or name.startswith(("/", "~")):
        with pytest.raises(WriteError, match=r"escapes the output root"):
            confined_path(root, name.replace("\\", "/").replace("~", "/"), "run")
    case.measure(folder=str(p.relative_to(root.resolve()))[:60])


def test_output_confined_end_to_end(case, demo_crop: Path, tmp_path: Path) -> None:
    case(
        "security",
        "a full run of a scene file named '..;..;etc passwd$(id).tif', and an output root "
        "whose run folder is a symlink pointing outside",
        "every file written lies under the output root; the symlinked run folder raises WriteError",
    )
    from pipeline.config import RunConfig
    from workers.infer import IdentityTileModel
    from workers.run import Job, plan_run, run_scene

    scene = tmp_path / "in" / "..;..;etc passwd$(id).tif"
    scene.parent.mkdir()
    scene.write_bytes(demo_crop.read_bytes())
    out = tmp_path / "out"
    before = {p for p in tmp_path.rglob("*")}
    models = {"denoise": IdentityTileModel()}
    with ThreadPoolExecutor(2) as ex:
        res = run_scene(
            scene, Job(RunConfig(out_root=out, tile=32, halo=4), unmix=None), ex, tile_models=models
        )
    assert res.status == "complete"
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(
        p.resolve() == out.resolve() or out.resolve() in p.resolve().parents for p in new
    )
    # a run folder that is a symlink to somewhere else is refused, never followed
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out2 = tmp_path / "out2"
    out2.mkdir()
    plan_name = "scene"
    (out2 / plan_name).symlink_to(outside, target_is_directory=True)
    sym_scene = tmp_path / "in" / "scene.tif"
    sym_scene.write_bytes(demo_crop.read_bytes())
    with pytest.raises(WriteError, match=r"escapes the output root"):
        plan_run(
            sym_scene,
            Job(RunConfig(out_root=out2, tile=32, halo=4), unmix=None),
            tile_models=models,
        )
    assert not any(outside.iterdir())
    case.measure(files_written=len(new), run_folder=str(res.run_dir.relative_to(out.resolve())))


def test_dask_recipe_uses_tls(case) -> None:
    case(
        "security",
        "deploy/cluster/tls.yaml (Dask scheduler <-> workers <-> clients)",
        "require-encryption, tls:// default scheme, CA + per-role cert/key, TLS >= 1.2; docs explain it",
    )
    d = yaml.safe_load((ROOT / "deploy" / "cluster" / "tls.yaml").read_text())
    comm = d["distributed"]["comm"]
    assert comm["require-encryption"] is True and comm["default-scheme"] == "tls"
    tls = comm["tls"]
    assert tls["ca-file"] and str(tls.get("min-version")) in ("1.2", "1.3")
    for role in ("scheduler", "worker", "client"):
        assert tls[role]["cert"] and tls[role]["key"], role
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert "tls.yaml" in docs and "--protocol tls" in docs
    case.measure(roles_with_certs=["scheduler", "worker", "client"])


def test_prefect_server_auth_documented(case) -> None:
    case(
        "security",
        "docs on putting the Prefect server behind authentication",
        "docs/prefect.md or docs/deploy.md name the auth settings (server and client side)",
    )
    text = "".join(
        (ROOT / "docs" / n).read_text()
        for n in ("prefect.md", "deploy.md")
        if (ROOT / "docs" / n).is_file()
    )
    assert "PREFECT_SERVER_API_AUTH_STRING" in text and "PREFECT_API_AUTH_STRING" in text
    assert "HTTPS" in text or "TLS" in text
    case.measure(found="PREFECT_SERVER_API_AUTH_STRING + PREFECT_API_AUTH_STRING + HTTPS proxy")


def test_no_unsafe_loaders_in_code(case) -> None:
    case(
        "security",
        "source scan of pipeline/, workers/, flows/ for unsafe loaders",
        "no yaml.load without SafeLoader, no pickle.load, no torch.load without weights_only=True, no allow_pickle=True",
    )
    bad = []
    for pkg in ("pipeline", "workers", "flows"):
        for f in (ROOT / pkg).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                torch_unsafe = "torch.load(" in code and "weights_only=True" not in code
                if torch_unsafe or any(
                    s in code
                    for s in (
                        "yaml.load(",
                        "yaml.unsafe_load",
                        "pickle.load",
                        "allow_pickle=True",
                        "yaml.full_load",
                    )
                ):
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, bad
    case.measure(
        files_scanned=sum(
            1 for pkg in ("pipeline", "workers", "flows") for _ in (ROOT / pkg).rglob("*.py")
        )
    )


def test_env_has_no_pickle_path_for_weights(case, tmp_path: Path) -> None:
    case(
        "security",
        "a DECSC safetensors whose metadata claims another architecture config",
        "WeightsError before the state dict is loaded into the module",
    )
    from safetensors.torch import save_file

    from workers.denoise.api import build_model, weights_metadata

    m = build_model()
    meta = weights_metadata(m)
    meta["config"] = meta["config"].replace('"bands": 31', '"bands": 62')
    p = tmp_path / "decsc.safetensors"
    save_file(
        {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()},
        str(p),
        metadata=meta,
    )
    from workers.denoise.api import load_denoiser

    with pytest.raises(WeightsError, match=r"has DECSC config .* but the registry expects"):
        load_denoiser("cpu", weights=p)
    assert os.path.getsize(p) > 0
