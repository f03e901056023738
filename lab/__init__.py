"""The lab: recipe -> dataset -> train -> merge -> serve -> probe -> report."""

from pathlib import Path

__version__ = "0.1.0"

ROOT = Path(__file__).resolve().parent.parent  # the repository (and /opt/lab/app in the images)
