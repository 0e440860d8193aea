"""The input hash (which names a run and decides reuse) covers the files a reader reads beside the scene.

Real ENVI (Gamsberg: data file + .hdr) and GeoTIFF with a PAM .aux.xml (EnMAP Berlin) from tests/data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import provenance as prov
from tests.pipeline.test_readers import BERLIN, GAMSBERG


def _envi_copy(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "scene.bsq"
    shutil.copy(GAMSBERG, data)
    hdr = tmp_path / "scene.bsq.hdr"
    shutil.copy(GAMSBERG.with_suffix(".hdr"), hdr)
    return data, hdr


def test_envi_header_edit_changes_the_data_files_hash(tmp_path: Path) -> None:
    data, hdr = _envi_copy(tmp_path)
    before = prov.sha256_path(data)
    hdr.write_text(hdr.read_text() + "bbl = {" + ", ".join(["0"] * 5 + ["1"] * 184) + "}\n")
    assert prov.sha256_path(data) != before
    assert prov.sidecar_files(data) == [hdr]


def test_envi_data_edit_changes_the_headers_hash(tmp_path: Path) -> None:
    data, hdr = _envi_copy(tmp_path)
    before = prov.sha256_path(hdr)
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert prov.sha256_path(hdr) != before


def test_aux_xml_edit_changes_the_geotiffs_hash(tmp_path: Path) -> None:
    tif = tmp_path / "enmap.tif"
    shutil.copy(BERLIN, tif)
    shutil.copy(str(BERLIN) + ".aux.xml", str(tif) + ".aux.xml")
    before = prov.sha256_path(tif)
    aux = Path(str(tif) + ".aux.xml")
    aux.write_text(aux.read_text().replace("0.46", "0.47", 1))
    assert prov.sha256_path(tif) != before


def test_plain_file_hash_is_its_own_sha256(tmp_path: Path) -> None:
    f = tmp_path / "scene.tif"
    f.write_bytes(b"hello")
    assert prov.sidecar_files(f) == []
    assert prov.sha256_path(f) == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
