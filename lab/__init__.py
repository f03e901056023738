"""The lab: recipe -> dataset -> train -> merge -> serve -> probe -> report."""

import logging
from pathlib import Path

__version__ = "0.1.0"

ROOT = Path(__file__).resolve().parent.parent  # the repository (and /opt/lab/app in the images)

# On CPUs with AVX512-BF16, importing bitsandbytes (peft does) tries to fetch a kernel from the
# Hugging Face Hub through the `kernels` package, which the lab does not install, and warns on
# stderr; bitsandbytes then uses its own CPU kernel. The warning would break the lab's one-line
# errors, and the fallback is what the lab wants offline anyway.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
