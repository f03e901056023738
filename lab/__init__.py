"""The lab: recipe -> dataset -> train -> merge -> serve -> probe -> report."""

__version__ = "0.1.0"
