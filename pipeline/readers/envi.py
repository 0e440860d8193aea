"""ENVI reader: our own small ``.hdr`` parser plus ``numpy.memmap`` windows (bsq, bil, bip).

Honours ``byte order``, ``header offset``, ``data type``, ``interleave``, ``map info`` and
``coordinate system string`` (CRS + transform), ``wavelength units`` (µm/nm), ``wavelength``,
``fwhm``, ``bbl``, ``reflectance scale factor`` and ``data ignore value``. The header is checked
against the data file size before anything is read, and a small sample is checked for a wrongly
declared byte order (the values would otherwise be silently absurd).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputValidationError, ReadError
from pipeline.readers._base import (
    SceneSource,
    check_options,
    looks_byteswapped,
    parse_number_list,
    wavelengths_to_nm,
)

OPTIONS: tuple[str, ...] = ()

#: ENVI ``data type`` codes → numpy kinds (byte order applied separately)
ENVI_DTYPES: dict[int, str] = {
    1: "u1",
    2: "i2",
    3: "i4",
    4: "f4",
    5: "f8",
    6: "c8",
    9: "c16",
    12: "u2",
    13: "u4",
    14: "i8",
    15: "u8",
}


def parse_header(text: str, *, source: Any = "") -> dict[str, str]:
    """Parse an ENVI header into ``{lower-case key: raw value}`` (braced values keep their braces)."""
    lines = text.splitlines()
    if not lines or lines[0].strip().upper() != "ENVI":
        raise ReadError(
            f"{str(source)!r} is not an ENVI header: the first line must be 'ENVI', got "
            f"{(lines[0] if lines else '')!r}. Point to the .hdr written with the data file."
        )
    out: dict[str, str] = {}
    i = 1
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith(";") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if value.startswith("{"):
            parts = [value]
            while "}" not in parts[-1] and i < len(lines):
                parts.append(lines[i])
                i += 1
            if "}" not in parts[-1]:
                raise ReadError(
                    f"ENVI header {str(source)!r}: the value of {key.strip()!r} opens '{{' but never "
                    "closes it; the header is truncated or corrupt. Fix or rewrite the header."
                )
            value = "\n".join(parts)
        out[re.sub(r"\s+", " ", key.strip().lower())] = value
    return out


def _int(hdr: dict[str, str], key: str, src: Any, default: int | None = None) -> int:
    if key not in hdr:
        if default is not None:
            return default
        raise ReadError(
            f"ENVI header {str(src)!r} lacks the required key {key!r}; add it (see the ENVI header spec)."
        )
    try:
        return int(hdr[key].strip())
    except ValueError:
        raise ReadError(
            f"ENVI header {str(src)!r}: {key!r} must be an integer, got {hdr[key]!r}; fix the header."
        ) from None


def _float(hdr: dict[str, str], key: str, src: Any) -> float | None:
    """The first number of ``key`` (None when absent); a non-numeric value is a header error."""
    if key not in hdr:
        return None
    try:
        values = parse_number_list(hdr[key])
    except ValueError:
        values = []
    if not values:
        raise ReadError(
            f"ENVI header {str(src)!r}: {key!r} must be a number, got {hdr[key].strip()!r}; "
            "fix the header or remove the key."
        )
    return values[0]


def _list(hdr: dict[str, str], key: str) -> list[str] | None:
    if key not in hdr:
        return None
    return [
        t.strip() for t in hdr[key].strip().strip("{}").replace("\n", " ").split(",") if t.strip()
    ]


def find_header(path: Path) -> tuple[Path, Path]:
    """``(header, data)`` for a path naming either the ``.hdr`` or the data file."""
    if path.suffix.lower() == ".hdr":
        hdr = path
        for cand in (
            path.with_suffix(""),
            *(path.with_suffix(e) for e in (".bsq", ".bil", ".bip", ".img", ".dat", ".raw")),
        ):
            if cand.is_file():
                return hdr, cand
        raise ReadError(
            f"ENVI header {str(path)!r} has no data file beside it (looked for "
            f"{str(path.with_suffix(''))!r} and .bsq/.bil/.bip/.img/.dat/.raw); copy the data file too."
        )
    for cand in (Path(str(path) + ".hdr"), path.with_suffix(".hdr")):
        if cand.is_file():
            return cand, path
    raise ReadError(
        f"no ENVI header found for {str(path)!r} (looked for {str(path) + '.hdr'!r} and "
        f"{str(path.with_suffix('.hdr'))!r}); ENVI data need their .hdr file."
    )


def _map_info(hdr: dict[str, str], src: Any) -> tuple[Any, Any]:
    """``map info`` (+ ``coordinate system string``) → (affine transform, CRS or None)."""
    from affine import Affine
    from rasterio.crs import CRS

    items = _list(hdr, "map info")
    crs = None
    if "coordinate system string" in hdr:
        wkt = hdr["coordinate system string"].strip().strip("{}").strip()
        try:
            crs = CRS.from_wkt(wkt)
        except Exception as exc:
            raise ReadError(
                f"ENVI header {str(src)!r}: cannot parse 'coordinate system string' {wkt[:80]!r}: "
                f"{exc}. Fix the WKT or remove it and give the UTM zone in 'map info'."
            ) from exc
    if not items:
        return None, crs
    try:
        proj = items[0].strip().lower()
        refx, refy, mapx, mapy, px, py = (float(v) for v in items[1:7])
    except (ValueError, IndexError):
        raise ReadError(
            f"ENVI header {str(src)!r}: 'map info' {hdr['map info']!r} does not hold projection, "
            "reference pixel, map coordinates and pixel size; fix the header."
        ) from None
    if not (np.isfinite([refx, refy, mapx, mapy, px, py]).all() and px != 0 and py != 0):
        raise ReadError(
            f"ENVI header {str(src)!r}: 'map info' pixel size ({px!r}, {py!r}) must be non-zero and "
            f"finite (reference pixel and map coordinates too); fix the header or remove 'map info'."
        )
    rotation = 0.0
    for it in items[7:]:
        if it.lower().startswith("rotation="):
            try:
                rotation = float(it.split("=", 1)[1])
            except ValueError:
                raise ReadError(
                    f"ENVI header {str(src)!r}: 'map info' rotation {it!r} is not a number; fix the header."
                ) from None
    if rotation:
        raise ReadError(
            f"ENVI header {str(src)!r}: rotated map info (rotation={rotation!r}) is not supported; "
            "resample the scene north-up first (e.g. gdalwarp)."
        )
    if crs is None:
        if proj == "utm" and len(items) >= 9:
            try:
                zone = float(items[7])
            except ValueError:
                zone = float("nan")
            if not (zone.is_integer() and 1 <= zone <= 60):
                raise ReadError(
                    f"ENVI header {str(src)!r}: 'map info' UTM zone {items[7]!r} is not a zone "
                    "number 1-60; fix the header (or give the CRS in 'coordinate system string')."
                )
            south = items[8].strip().lower().startswith("s")
            datum = " ".join(items[9:10]).lower()
            if "wgs" in datum or not datum:
                crs = CRS.from_epsg((32700 if south else 32600) + int(zone))
        elif proj.startswith("geographic"):
            crs = CRS.from_epsg(4326)
    # ENVI reference pixel (1, 1) is the upper-left corner of the upper-left pixel
    transform = Affine(px, 0.0, mapx - (refx - 1.0) * px, 0.0, -py, mapy + (refy - 1.0) * py)
    return transform, crs


def _raw_dtype(hdr: dict[str, str], hdr_path: Path, data_path: Path) -> tuple[int, int, np.dtype]:
    """``(data type code, byte order, numpy dtype)`` of the data file, from the header.

    Refuses unknown codes, byte orders other than 0/1 and non-real (e.g. complex) types, which
    hyperdeq cannot process.
    """
    code = _int(hdr, "data type", hdr_path)
    if code not in ENVI_DTYPES:
        raise ReadError(
            f"ENVI header {str(hdr_path)!r}: unknown 'data type' {code!r}; valid codes: "
            f"{sorted(ENVI_DTYPES)!r}."
        )
    bo = _int(hdr, "byte order", hdr_path, default=0)
    if bo not in (0, 1):
        raise ReadError(
            f"ENVI header {str(hdr_path)!r}: 'byte order' must be 0 (little) or 1 (big), got {bo!r}."
        )
    kind = ENVI_DTYPES[code]
    raw_dtype = np.dtype(("<" if bo == 0 else ">") + kind)
    if raw_dtype.kind not in "iuf":
        raise InputValidationError(
            f"non-numeric data type {str(raw_dtype)!r} (ENVI data type {code!r}) in "
            f"{str(data_path)!r}; hyperdeq reads real integer or floating-point cubes only. "
            "Convert the data (e.g. take the magnitude of complex values) first."
        )
    return code, bo, raw_dtype


def _spectral_axes(
    hdr: dict[str, str], hdr_path: Path
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Band centres and FWHM in nm from the header (None where absent or given as band indices)."""
    units = hdr.get("wavelength units")
    wl = _list(hdr, "wavelength")
    fw = _list(hdr, "fwhm")
    try:
        wl_v = np.asarray([float(v) for v in wl], dtype=np.float64) if wl else None
        fw_v = np.asarray([float(v) for v in fw], dtype=np.float64) if fw else None
    except ValueError as exc:
        raise InputValidationError(
            f"ENVI header {str(hdr_path)!r}: non-numeric wavelength/fwhm entry ({exc}); fix the header."
        ) from None
    if units and units.strip().lower() == "unknown":
        units = None
    if (
        units and units.strip().lower() == "index"
    ):  # ENVI: the values are band numbers, not wavelengths
        wl_v = fw_v = None
    wavelength = wavelengths_to_nm(wl_v, units, source=hdr_path)
    fwhm = wavelengths_to_nm(wl_v, units, source=hdr_path, fwhm=fw_v) if fw_v is not None else None
    return wavelength, fwhm


def _good_bands(hdr: dict[str, str], hdr_path: Path) -> np.ndarray | None:
    """The header's bad-band list (``bbl``) as a good-band mask, or None when it has none."""
    bbl = _list(hdr, "bbl")
    try:
        return np.asarray([float(b) != 0 for b in bbl], dtype=bool) if bbl else None
    except ValueError as exc:
        raise InputValidationError(
            f"ENVI header {str(hdr_path)!r}: non-numeric 'bbl' entry ({exc}); bbl holds 1 (good "
            "band) or 0 (bad band) per band. Fix the header."
        ) from None


class EnviSource(SceneSource):
    """An ENVI cube: header parsed once; windows read through ``numpy.memmap``."""

    reader = "envi"

    def __init__(self, path: Path, **options: Any) -> None:
        check_options(self.reader, options, OPTIONS)
        hdr_path, data_path = find_header(path)
        self.header_path, self.path = hdr_path, data_path
        self.attrs = {"envi_header": str(hdr_path)}
        try:
            hdr = parse_header(hdr_path.read_text(errors="replace"), source=hdr_path)
        except OSError as exc:
            raise ReadError(
                f"cannot read ENVI header {str(hdr_path)!r}: {exc}; check permissions."
            ) from exc
        self.header = hdr
        ns, nl, nb = (_int(hdr, k, hdr_path) for k in ("samples", "lines", "bands"))
        self.offset = _int(hdr, "header offset", hdr_path, default=0)
        for key, value in (
            ("samples", ns),
            ("lines", nl),
            ("bands", nb),
            ("header offset", self.offset),
        ):
            if value < 0:
                raise ReadError(
                    f"ENVI header {str(hdr_path)!r}: {key!r} must be zero or positive, got {value!r}; "
                    "fix the header."
                )
        code, bo, self.raw_dtype = _raw_dtype(hdr, hdr_path, data_path)
        self.byte_order = bo
        self.interleave = hdr.get("interleave", "bsq").strip().lower()
        if self.interleave not in ("bsq", "bil", "bip"):
            raise ReadError(
                f"ENVI header {str(hdr_path)!r}: interleave {self.interleave!r} is not one of "
                "'bsq', 'bil', 'bip'; fix the header."
            )
        self.shape = (nb, nl, ns)
        expected = self.offset + nb * nl * ns * self.raw_dtype.itemsize
        actual = data_path.stat().st_size
        if actual != expected:
            raise ReadError(
                f"ENVI data file {str(data_path)!r} has {actual!r} bytes but its header "
                f"(samples={ns}, lines={nl}, bands={nb}, data type={code}, header offset="
                f"{self.offset}) implies {expected!r}; the data are truncated or the header is "
                "wrong. Re-copy the data or fix samples/lines/bands/data type in the header."
            )
        self.wavelength, self.fwhm = _spectral_axes(hdr, hdr_path)
        self.good_band = _good_bands(hdr, hdr_path)
        ignore = _float(hdr, "data ignore value", hdr_path)
        self.nodata = options.get("nodata", ignore)
        self.transform, self.crs = _map_info(hdr, hdr_path)
        if nb * nl * ns and looks_byteswapped(self.sample_raw()):
            raise InputValidationError(
                f"ENVI data {str(data_path)!r} look byte-swapped: with the declared 'byte order = "
                f"{bo!r}' the values are absurd, with byte order {1 - bo!r} they are plausible. "
                f"Fix the header ('byte order = {1 - bo}')."
            )
        meta_scale = _float(hdr, "reflectance scale factor", hdr_path)
        if nb * nl * ns:
            self.resolve_scale(
                options.get("scale_factor"), meta_scale, "ENVI 'reflectance scale factor'"
            )
        if "description" in hdr:
            self.attrs["description"] = hdr["description"].strip().strip("{}").strip()

    def _memmap(self) -> np.ndarray:
        nb, nl, ns = self.shape
        shape = {"bsq": (nb, nl, ns), "bil": (nl, nb, ns), "bip": (nl, ns, nb)}[self.interleave]
        return np.memmap(self.path, dtype=self.raw_dtype, mode="r", offset=self.offset, shape=shape)

    fresh_reads = True

    def read_raw(
        self, y0: int, y1: int, x0: int, x1: int, bands: np.ndarray | None = None
    ) -> np.ndarray:
        mm = self._memmap()
        if self.interleave == "bsq":
            block = mm[:, y0:y1, x0:x1]
        elif self.interleave == "bil":
            block = mm[y0:y1, :, x0:x1].transpose(1, 0, 2)
        else:
            block = mm[y0:y1, x0:x1, :].transpose(2, 0, 1)
        if bands is not None:
            block = block[bands]
        out = np.array(block, dtype=self.raw_dtype.newbyteorder("="))
        del mm
        return out


def open_envi(path: Path, **options: Any) -> EnviSource:
    """Open an ENVI cube (give the data file or its ``.hdr``)."""
    return EnviSource(path, **options)


def write_envi_header(path: Path, fields: dict[str, Any]) -> None:
    """Write a minimal ENVI header (used by tests and the benchmark to create ENVI files)."""
    lines = ["ENVI"]
    for k, v in fields.items():
        if isinstance(v, (list, tuple, np.ndarray)):
            v = "{" + ", ".join(str(x) for x in v) + "}"
        lines.append(f"{k} = {v}")
    path.write_text("\n".join(lines) + "\n")
