"""``hyperdeq eval denoiser`` end to end on small centre crops of the real test scenes."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.errors import ConfigError
from pipeline.noise import add_noise
from workers.denoise.evaluate import EvalConfig, load_scene, render_markdown, run_eval, verdict


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_config_rejects_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="unknown test scene 'indian'"):
        EvalConfig(data=tmp_path, scenes=("indian",))
    with pytest.raises(ConfigError, match="unknown noise case 'gauss25'"):
        EvalConfig(data=tmp_path, cases=("gauss25",))
    with pytest.raises(ConfigError, match="unknown baseline 'bm3d'"):
        EvalConfig(data=tmp_path, baselines=("bm3d",))
    with pytest.raises(ConfigError, match="names one twice"):
        EvalConfig(data=tmp_path, cases=("gauss30", "gauss30"))
    with pytest.raises(ConfigError, match="crop must be >= 8"):
        EvalConfig(data=tmp_path, crop=4)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        EvalConfig(data=tmp_path, baselines=(), decsc=False)


def test_jasper_loader_is_column_major_and_scaled(shared_data):
    cube, meta = load_scene("jasper", shared_data)
    assert cube.shape == (198, 100, 100) and cube.dtype == np.float32
    assert cube.min() == 0.0 and cube.max() == 1.0 and "min-max" in meta["scaling"]
    # the column-major trap: a wrong reshape gives a scene without spatial smoothness
    neighbour_diff = np.abs(np.diff(cube[100], axis=1)).mean()
    assert neighbour_diff < 0.05
    pav, _ = load_scene("pavia_centre", shared_data, crop=20)
    assert pav.shape == (102, 20, 20) and 0 <= pav.min() and pav.max() <= 1


def test_eval_end_to_end_on_real_crops(shared_data, tmp_path):
    # `make test` installs the classical baselines (extra `baselines`, --no-deps)
    pytest.importorskip(
        "hyde", reason="install the 'baselines' extra as docs/evaluation.md explains"
    )
    from flows.cli import app

    md, js, cache = tmp_path / "r.md", tmp_path / "r.json", tmp_path / "cache.json"
    args = [
        "eval",
        "denoiser",
        "--data",
        str(shared_data),
        "--scenes",
        "jasper,pavia_centre",
        "--cases",
        "gauss30,band[0,95]",
        "--baselines",
        "wsrrr",
        "--crop",
        "16",
        "--out",
        str(md),
        "--json",
        str(js),
        "--cache",
        str(cache),
        "--threads",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    res = json.loads(js.read_text())
    assert [(r["scene"], r["case"]) for r in res["results"]] == [
        ("jasper", "gauss30"),
        ("jasper", "band[0,95]"),
        ("pavia_centre", "gauss30"),
        ("pavia_centre", "band[0,95]"),
    ]
    # the noisy cube is exactly the protocol's: fresh generator per scene x case
    clean, _ = load_scene("jasper", shared_data, crop=16)
    expected = add_noise(clean, "gauss30", np.random.default_rng(0))
    import hashlib

    assert res["results"][0]["noisy_sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()
    for r in res["results"]:
        noisy, ws = r["methods"]["noisy"], r["methods"]["wsrrr"]
        assert ws["mpsnr_db"] > noisy["mpsnr_db"]  # a real denoiser helps on real data
        assert 0 < ws["mssim"] <= 1 and ws["sam_deg"] >= 0 and ws["ergas"] > 0
        assert 0 <= ws["bands_worse_than_noisy"] <= 198
    g30 = res["results"][0]
    assert g30["oracle_sigma_255"] == pytest.approx(30.0)
    # noisy gauss30 MPSNR: sigma 30/255 gives 18.6 dB before clamping, a bit more after
    assert 18.0 < g30["methods"]["noisy"]["mpsnr_db"] < 22.0
    # DECSC: either measured with convergence stats, or skipped with the reason
    if res["decsc"]["status"] == "ok":
        d = g30["methods"]["decsc"]
        assert "mpsnr_db" in d and d["converged_fraction"] in (0.0, 1.0)
        assert d["guard"] is True and 0.0 <= d["guard_w_mean"] <= d["guard_w_max"] <= 1.0
        assert (
            res["decsc"]["band_guard"]["status"] == "on"
            and len(res["decsc"]["band_guard"]["sha256"]) == 64
        )
        assert "DECSC convergence" in md.read_text()
    else:
        assert res["decsc"]["note"] and "DECSC: **skipped**" in md.read_text()
    text = md.read_text()
    assert "hyperdeq eval denoiser" in text and "## Verdict" in text
    assert "| jasper | gauss30 |" in text and "| pavia_centre | band[0,95] |" in text
    assert res["environment"]["versions"]["torch"].startswith("2.")
    assert [v["case"] for v in res["verdict"]] == ["gauss30", "band[0,95]"] * 2
    # the cache holds each baseline result once and is reused on a second run
    assert len(json.loads(cache.read_text())) == 4
    again = run_eval(
        EvalConfig(
            data=shared_data,
            scenes=("jasper",),
            cases=("gauss30",),
            baselines=("wsrrr",),
            crop=16,
            decsc=False,
            cache=cache,
        )
    )
    ws2 = again["results"][0]["methods"]["wsrrr"]
    assert ws2["cached"] and ws2["mpsnr_db"] == g30["methods"]["wsrrr"]["mpsnr_db"]


def test_missing_baseline_is_skipped_with_a_note(shared_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "hyde", None)  # as if hyde-images were not installed
    res = run_eval(
        EvalConfig(
            data=shared_data,
            scenes=("pavia_centre",),
            cases=("mixture",),
            baselines=("fasthyde",),
            crop=12,
            decsc=False,
        )
    )
    assert "fasthyde" in res["skipped_baselines"]
    assert set(res["results"][0]["methods"]) == {"noisy"}
    text = render_markdown(res)
    assert "baseline `fasthyde` **skipped**" in text and "no anchor ran" in text


def test_verdict_margins():
    rows = [
        {
            "scene": "s",
            "case": "mixture",
            "methods": {
                "noisy": {"mpsnr_db": 15.0},
                "decsc": {"mpsnr_db": 30.0},
                "l1hymixde": {"mpsnr_db": 27.5},
                "fasthyde": {"mpsnr_db": 12.0},
                "bm4d": {"error": "x"},
            },
        }
    ]
    (v,) = verdict(rows)
    assert v["best_anchor"] == "l1hymixde" and v["margin_db"] == pytest.approx(2.5)
    assert v["status"] == "FAIL"  # mixture needs +3 dB
    rows[0]["methods"]["decsc"]["mpsnr_db"] = 30.6
    assert verdict(rows)[0]["status"] == "PASS"
