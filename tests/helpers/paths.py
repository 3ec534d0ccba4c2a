"""Where the tests find the repository and their fixtures, whichever tier folder a test module sits in."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent  # tests/
REPO = TESTS.parent
DATA = TESTS / "data"  # small fixtures shipped with the tests (never ../shared)
TRAINING = REPO / "training"
