"""MATLAB ``.mat`` benchmark cubes: v5 through ``scipy.io``, v7.3 (HDF5) through ``h5py``.

Two layouts occur in the benchmark files:

* a 3-D variable ``(rows, cols, bands)`` (Pavia, Urban, Cuprite, ABU, MUUFL);
* the unmixing layout: ``Y`` (bands × pixels) plus ``lines``/``cols``. ``Y`` is MATLAB
  column-major, so the cube is ``Y.T.reshape(rows, cols, bands, order="F")`` (the "Y trap").

``variable=`` picks the variable; otherwise the only 3-D numeric variable is used, then ``Y`` +
(rows, cols). Anything else raises an error that lists the variables found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputValidationError, ReadError
from pipeline.readers._base import SceneSource, check_options, wavelengths_to_nm

OPTIONS: tuple[str, ...] = ("variable", "rows", "cols", "wavelength_variable")
_ROW_KEYS = ("lines", "rows", "nRow", "nrow", "nr")
_COL_KEYS = ("cols", "samples", "nCol", "ncol", "nc")
_WL_KEYS = ("wavelengths", "wavelength", "wavlength", "wl", "lambda", "wave")


def is_v73(path: Path) -> bool:
    """MATLAB v7.3 files are HDF5 with a 512-byte user block."""
    with open(path, "rb") as f:
        head = f.read(520)
    return head[512:520] == b"\x89HDF\r\n\x1a\n" or head[:8] == b"\x89HDF\r\n\x1a\n"


def _load(path: Path) -> dict[str, np.ndarray]:
    """All numeric arrays of the file, in MATLAB's (row-major-as-seen-by-MATLAB) orientation."""
    if is_v73(path):
        import h5py

        out: dict[str, np.ndarray] = {}
        try:
            with h5py.File(path, "r") as f:
                for k, ds in f.items():
                    if isinstance(ds, h5py.Dataset) and not k.startswith("#"):
                        # h5py sees MATLAB's column-major arrays transposed
                        out[k] = np.asarray(ds[()]).T
        except OSError as exc:
            raise ReadError(
                f"cannot read MATLAB v7.3 file {str(path)!r}: {exc}; re-copy it."
            ) from exc
        return out
    import scipy.io

    try:
        raw = scipy.io.loadmat(path)
    except Exception as exc:
        raise ReadError(
            f"cannot read MATLAB file {str(path)!r}: {exc}; re-save it with save(..., '-v7') or '-v7.3'."
        ) from exc
    return {k: v for k, v in raw.items() if not k.startswith("__") and isinstance(v, np.ndarray)}


def _describe(vars_: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in sorted(vars_.items())) or "none"


def _scalar(vars_: dict[str, np.ndarray], keys: tuple[str, ...]) -> int | None:
    for k in keys:
        if k in vars_ and np.asarray(vars_[k]).size == 1:
            return int(np.asarray(vars_[k]).ravel()[0])
    return None


class MatSource(SceneSource):
    """A cube held in memory (the benchmark files are small); windows are slices."""

    reader = "mat"

    def __init__(self, path: Path, **options: Any) -> None:
        check_options(self.reader, options, OPTIONS)
        self.path = path
        vars_ = _load(path)
        name = options.get("variable")
        cube = self._pick(vars_, name, options)
        if cube.dtype.kind not in "iuf":
            raise InputValidationError(
                f"variable {self.attrs['variable']!r} of {str(path)!r} has non-numeric dtype "
                f"{str(cube.dtype)!r}; pick a real numeric cube with variable=<name> "
                f"(variables: {_describe(vars_)})."
            )
        # (rows, cols, bands) → (band, y, x)
        self._cube = np.ascontiguousarray(np.transpose(cube, (2, 0, 1)))
        self.shape = tuple(int(s) for s in self._cube.shape)  # type: ignore[assignment]
        self.raw_dtype = self._cube.dtype
        self.nodata = options.get("nodata")
        wl_name = options.get("wavelength_variable")
        wl = None
        for k in (wl_name,) if wl_name else _WL_KEYS:
            if k in vars_ and np.asarray(vars_[k]).size == self.shape[0]:
                wl = np.asarray(vars_[k], dtype=np.float64).ravel()
                self.attrs["wavelength_variable"] = k
                break
        self.wavelength = wavelengths_to_nm(wl, None, source=path)
        if self.shape[0] * self.shape[1] * self.shape[2]:
            self.resolve_scale(options.get("scale_factor"), None, "")

    def _pick(
        self, vars_: dict[str, np.ndarray], name: str | None, options: dict[str, Any]
    ) -> np.ndarray:
        self.attrs = {}
        if name is not None:
            if name not in vars_:
                raise InputValidationError(
                    f"variable {name!r} not found in {str(self.path)!r}; variables: {_describe(vars_)}. "
                    "Pass variable=<one of these>."
                )
            arr = np.asarray(vars_[name])
            self.attrs["variable"] = name
            if arr.ndim == 3:
                return arr
            if arr.ndim == 2:
                return self._unfold(arr, vars_, name, options)
            raise InputValidationError(
                f"variable {name!r} of {str(self.path)!r} has shape {arr.shape!r}; expected a 3-D "
                "(rows, cols, bands) cube or a 2-D (bands, pixels) matrix with rows/cols."
            )
        if (
            "Y" in vars_
            and vars_["Y"].ndim == 2
            and (options.get("rows") or _scalar(vars_, _ROW_KEYS))
        ):
            # unmixing layout: Y (bands × pixels) beats 3-D abundance maps such as S_GT
            self.attrs["variable"] = "Y"
            return self._unfold(np.asarray(vars_["Y"]), vars_, "Y", options)
        cubes = {k: v for k, v in vars_.items() if v.ndim == 3 and v.dtype.kind in "iuf"}
        if len(cubes) == 1:
            k = next(iter(cubes))
            self.attrs["variable"] = k
            return cubes[k]
        if len(cubes) > 1:
            raise InputValidationError(
                f"{str(self.path)!r} holds several 3-D cubes ({sorted(cubes)!r}); pass variable=<name>. "
                f"Variables: {_describe(vars_)}."
            )
        if "Y" in vars_ and vars_["Y"].ndim == 2:
            self.attrs["variable"] = "Y"
            return self._unfold(np.asarray(vars_["Y"]), vars_, "Y", options)
        raise InputValidationError(
            f"no hyperspectral cube found in {str(self.path)!r}: expected one 3-D variable or 'Y' "
            f"(bands × pixels) with rows/cols; variables: {_describe(vars_)}. Pass variable=<name>."
        )

    def _unfold(
        self, y: np.ndarray, vars_: dict[str, np.ndarray], name: str, options: dict[str, Any]
    ) -> np.ndarray:
        rows = options.get("rows") or _scalar(vars_, _ROW_KEYS)
        cols = options.get("cols") or _scalar(vars_, _COL_KEYS)
        if rows is None or cols is None:
            raise InputValidationError(
                f"variable {name!r} of {str(self.path)!r} is a 2-D matrix {y.shape!r} but the file has "
                f"no rows/cols ({'/'.join(_ROW_KEYS)}, {'/'.join(_COL_KEYS)}); pass rows=<n>, cols=<n>. "
                f"Variables: {_describe(vars_)}."
            )
        bands, pixels = y.shape
        if rows * cols != pixels:
            if rows * cols == bands:  # stored pixels × bands
                y = y.T
                bands, pixels = y.shape
            else:
                raise InputValidationError(
                    f"variable {name!r} of {str(self.path)!r} has shape {y.shape!r}, which does not hold "
                    f"rows × cols = {rows} × {cols} = {rows * cols!r} pixels; fix rows/cols."
                )
        self.attrs["unfolded"] = f"{name}.T.reshape({rows}, {cols}, {bands}, order='F')"
        # MATLAB column-major: pixel index = row + col * rows
        return y.T.reshape(rows, cols, bands, order="F")

    def read_raw(
        self, y0: int, y1: int, x0: int, x1: int, bands: np.ndarray | None = None
    ) -> np.ndarray:
        block = self._cube[:, y0:y1, x0:x1]
        return block if bands is None else block[bands]

    def to_dataarray(self, chunk: int = 256) -> Any:
        """In memory already: canonical numpy array, values validated now (cheap)."""
        from pipeline.scene import check_scene_values

        nb, ny, nx = self.shape
        oor = np.zeros(nb, dtype=np.int64)
        da = self.build(self.read(0, ny, 0, nx, out_of_range=oor))
        da.attrs["out_of_range_per_band"] = oor.tolist()
        # as in the ingest: a good band without one finite value becomes a bad band
        good = np.asarray(da["good_band"].values, dtype=bool)
        empty = good & ~np.isfinite(np.asarray(da.values)).any(axis=(1, 2))
        if empty.any() and not empty[good].all():
            da = da.assign_coords(good_band=("band", good & ~empty))
            da.attrs["nodata_bands"] = np.flatnonzero(empty).tolist()
        check_scene_values(da)
        return da


def open_mat(path: Path, **options: Any) -> MatSource:
    """Open a MATLAB benchmark cube."""
    return MatSource(path, **options)
