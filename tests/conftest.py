import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tracking.mode defaults to auto, which follows WANDB_MODE: no test tracks unless it asks for a mode itself
# (set, not setdefault, so that a shell's WANDB_MODE=online never uploads a test run).
os.environ["WANDB_MODE"] = "disabled"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def repo() -> Path:
    return REPO
