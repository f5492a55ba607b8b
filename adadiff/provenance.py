"""What a model folder was trained on, for the demo, the model card and later training runs.

``adadiff train ship`` writes ``training.json`` next to the weights: which stage used which
photo, the project's hold-out and validation sets at the time, and where each component came
from (trained in this run, or reused from another model folder). Folders shipped before the
record existed have only ``MODEL_CARD.md``; its photo table is read instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adadiff.errors import ModelFolderError

RECORD = "training.json"
MODEL_CARD = "MODEL_CARD.md"


@dataclass(frozen=True)
class TrainingRecord:
    """photos: photo name -> the stages that trained on it; sources: component -> its origin."""

    photos: dict[str, tuple[str, ...]]
    holdout: tuple[str, ...] = ()
    validation: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    def stages_of(self, photo: str) -> tuple[str, ...]:
        return self.photos.get(photo, ())

    def seen(self, names: tuple[str, ...] | list[str]) -> dict[str, tuple[str, ...]]:
        """The given photos that some stage trained on, with those stages."""
        return {n: self.photos[n] for n in names if self.photos.get(n)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "photos": {k: list(v) for k, v in self.photos.items()},
            "holdout": list(self.holdout),
            "validation": list(self.validation),
            "sources": dict(self.sources),
        }


def write_record(folder: str | Path, record: TrainingRecord) -> Path:
    path = Path(folder) / RECORD
    path.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return path


def read_record(folder: str | Path | None) -> TrainingRecord | None:
    """The folder's training record, else one built from its card's photo table; None when
    the folder has neither (a random-init preset, a converted checkpoint)."""
    if folder is None:
        return None
    folder = Path(folder)
    path = folder / RECORD
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            stages = raw["photos"].values()
            if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in stages):
                raise TypeError("each photo must map to a list of stage names")
            return TrainingRecord(
                photos={str(k): tuple(v) for k, v in raw["photos"].items()},
                holdout=tuple(raw.get("holdout", ())),
                validation=tuple(raw.get("validation", ())),
                sources={str(k): str(v) for k, v in raw.get("sources", {}).items()},
            )
        # ValueError: not JSON, or not UTF-8 (UnicodeDecodeError)
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ModelFolderError(
                f"{path} is not a readable training record ({exc}); ship the folder again "
                "with `adadiff train ship` or delete the file"
            ) from exc
    card = folder / MODEL_CARD
    if card.is_file():
        return TrainingRecord(photos=_card_photos(read_card(card)))
    return None


def read_card(card: Path) -> str:
    """The text of a model card; ``ModelFolderError`` where it cannot be read as UTF-8."""
    try:
        return card.read_text()
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 (an editor's Latin-1)
        raise ModelFolderError(
            f"{card} is not a readable model card ({exc}); save it as UTF-8 or restore it "
            "from the folder it was copied from"
        ) from exc


def _card_photos(text: str) -> dict[str, tuple[str, ...]]:
    """The ``| photo | source | licence / statement | used by |`` table of a model card."""
    photos: dict[str, tuple[str, ...]] = {}
    in_table = False
    for line in text.splitlines():
        if line.startswith("| photo | source |"):
            in_table = True
        elif in_table and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            photos[cells[0]] = tuple(s.strip() for s in cells[-1].split(",") if s.strip())
        elif in_table and not line.startswith("|"):
            break
    return photos
