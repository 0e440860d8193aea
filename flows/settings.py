"""Settings of the flows: where the demo scene and the deploy files are, the sweep's parameters.

The run options themselves are one table (:mod:`flows.options`); this module adds what only a
sweep has (its scene source and concurrency).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.options import RunOptions

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DIR = REPO_ROOT / "deploy"
SENSORS_FILE = DEPLOY_DIR / "sensors.yaml"
DEMO_SCENE = REPO_ROOT / "tests" / "data" / "demo" / "enmap_potsdam_mosaic_18tiles.tif"
#: environment variable naming the demo scene where the package is installed without the checkout
DEMO_SCENE_ENV = "HYPERDEQ_DEMO_SCENE"
#: the window ``(row0, row1, col0, col1)`` of DEMO_SCENE that ``hyperdeq demo`` processes by default:
#: 96 × 96 px (2 × 2 tiles of 64 px, 11 % nodata in two corners) so that the full flow (DECSC +
#: DEQ-Unmix) stays within minutes on a 2-core laptop; ``hyperdeq demo --full`` takes the whole mosaic
DEMO_WINDOW = (80, 176, 64, 160)


def demo_scene() -> Path:
    """The demo scene: ``$HYPERDEQ_DEMO_SCENE`` when set, else the checkout's copy."""
    import os

    from pipeline.errors import ConfigError

    p = Path(os.environ[DEMO_SCENE_ENV]) if os.environ.get(DEMO_SCENE_ENV) else DEMO_SCENE
    if not p.is_file():
        raise ConfigError(
            f"demo scene {str(p)!r} is missing; set {DEMO_SCENE_ENV} to the file "
            "(tests/data/demo/enmap_potsdam_mosaic_18tiles.tif of a checkout) or reinstall from a checkout"
        )
    return p


class SweepParams(BaseModel):
    """Parameters of one ``sweep_archive`` run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str | None = Field(None, description="archive root to scan with the sensor patterns")
    list_file: str | None = Field(None, description="text file with one scene path per line")
    out_root: str = "hyperdeq-out"
    sensors: list[str] | None = Field(None, description="sensor presets to use (default: all)")
    patterns: list[str] | None = Field(None, description="glob patterns overriding the presets")
    max_concurrent: int = Field(2, gt=0, description="scenes processed at the same time")
    options: RunOptions = RunOptions()  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _one_source(self) -> SweepParams:
        if (self.root is None) == (self.list_file is None):
            raise ValueError(
                f"give exactly one of root={self.root!r} (scan with patterns) or "
                f"list_file={self.list_file!r} (explicit scene list)"
            )
        if self.list_file is not None and (self.patterns or self.sensors):
            raise ValueError("patterns/sensors only apply to root scans, not to a list_file")
        return self
