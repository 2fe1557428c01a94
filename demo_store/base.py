"""What a demo-store artifact is: a recipe that writes one ``<name>/<version>`` dir."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class BuildContext:
    store: Path                          # root of the local store being built
    progress: Callable[[str], None]      # one line of progress for the user
    data_dir: Path = DATA_DIR            # shipped source data (demo_store/data)
    seed: int = 0

    def version_dir(self, name: str, version: str) -> Path:
        """Where an already-built artifact lives (for artifacts that depend on it)."""
        return self.store / name / version


@dataclass(frozen=True)
class Artifact:
    name: str
    version: str
    # Writes every file plus model.yaml into ``out`` (an empty temporary dir that is
    # renamed into place only when build returns, so a failed build leaves nothing).
    build: Callable[[Path, BuildContext], None]
    # Bump when the recipe or its data changes, to force a rebuild of stores built before.
    fingerprint: str = "1"
    depends: tuple[str, ...] = ()        # "name/version" of artifacts used while building

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"
