"""``hyperdeq eval unmixer`` pieces: scoring of a real run, the report, and its kept notes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workers.unmix.evaluate import NOTES_MARKER, Case, run_case, write_report


@pytest.fixture(scope="module")
def case(test_data):
    """3 real USGS spectra, Dirichlet abundances without pure pixels, 30 dB, 30×30 pixels."""
    z = np.load(test_data / "unmix" / "unmix_crops.npz")
    E = z["usgs_spectra"][:, [0, 2, 4]].astype(np.float64)
    rng = np.random.default_rng(11)
    A = rng.dirichlet(np.ones(3), size=900).T
    Y = E @ A
    Y = Y + np.sqrt(np.mean(Y**2) / 1e3) * rng.standard_normal(Y.shape)
    return Case("usgs3", Y.reshape(-1, 30, 30), E, A, ["a", "b", "c"], z["usgs_wavelength_nm"], "test mixture")


def test_run_case_scores_and_report_keeps_notes(case, tmp_path):
    res = run_case(case, seed=0, max_epochs=2)
    for meth in ("deq-unmix", "vca+fcls", "nfindr+fcls"):
        r = res[meth]
        assert set(r["sad_deg"]) == {"a", "b", "c"} and sorted(r["matching"]) == [0, 1, 2]
        assert 0 <= r["sad_mean_deg"] < 20 and 0 <= r["abundance_rmse"] < 0.5
    # no pure pixels, a linear mixture: the blind start is the minimum-volume simplex, which
    # beats VCA's mixed-pixel vertices
    assert res["deq-unmix"]["sad_mean_deg"] < res["vca+fcls"]["sad_mean_deg"]
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    env = {"device": "CPU: test", "cpu_count": 2, "torch_threads": 1, "torch": "t", "numpy": "n",
           "scipy": "s", "python": "p"}
    write_report([res], env, "hyperdeq eval unmixer", md, js, {"seed": 0})
    text = md.read_text()
    assert "| usgs3 | 3 | deq-unmix |" in text and NOTES_MARKER not in text
    assert json.loads(js.read_text())["results"][0]["scene"] == "usgs3"
    md.write_text(text + "\n" + NOTES_MARKER + "\n## Targets\nwritten by hand\n")
    write_report([res], env, "hyperdeq eval unmixer", md, js, {"seed": 0})
    again = md.read_text()
    assert again.count("| usgs3 | 3 | deq-unmix |") == 1
    assert again.endswith(NOTES_MARKER + "\n## Targets\nwritten by hand\n")


@pytest.mark.parametrize("snr_db", [5.0, 40.0])
def test_abundance_floors_bayes_beats_fcls_at_low_snr_and_refuses_at_high(test_data, snr_db):
    """At 5 dB the Bayes floor (posterior mean under the true model) is below FCLS with the true
    endmembers and far below the prior mean (1/P everywhere): a wrong sign or scale in the
    importance weights would break that. At 40 dB the posterior is far narrower than the prior,
    the effective number of prior draws per pixel collapses, and no floor is claimed."""
    from workers.unmix.evaluate import abundance_floors

    z = np.load(test_data / "unmix" / "unmix_crops.npz")
    E = z["usgs_spectra"][:, [0, 2, 4]].astype(np.float64)
    rng = np.random.default_rng(5)
    A = rng.dirichlet(np.ones(3), size=400).T
    Y = E @ A
    sigma = float(np.sqrt(np.mean(Y**2) / 10 ** (snr_db / 10)))
    Y = Y + sigma * rng.standard_normal(Y.shape)
    c = Case("usgs3", Y.reshape(-1, 20, 20), E, A, ["a", "b", "c"], None, "", sigma)
    f = abundance_floors(c, prior_samples=20000)
    prior_mean = float(np.sqrt(np.mean((A - 1 / 3) ** 2)))
    if snr_db < 10:
        assert f["mmse_ess_median"] >= 100
        assert f["mmse_true_e"] < 0.97 * f["fcls_true_e"] and f["mmse_true_e"] < 0.5 * prior_mean
    else:  # a posterior far narrower than the prior: prior draws cannot resolve it, so no floor
        assert f["mmse_ess_median"] < 100 and f["mmse_true_e"] is None and f["fcls_true_e"] < 0.05
    with pytest.raises(Exception, match="known noise"):
        abundance_floors(Case("real", Y.reshape(-1, 20, 20), E, A, ["a", "b", "c"], None))
