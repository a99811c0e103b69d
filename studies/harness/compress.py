"""Save a model folder as compressed-tensors checkpoints with llm-compressor, for precision `saved`
(tasks/precisions/saved.py). Data-free: 4-bit integer weights by round-to-nearest in groups of 64 (W4A16; SmolLM2's
width, 576, is no multiple of 128), and fp8 weights with fp8 activations scaled per token at run time (FP8 dynamic);
the output head stays fp16. llm-compressor pins transformers and torch: run it in an environment of its own.

  python compress.py MODEL_FOLDER OUT_FOLDER NAME   # writes OUT_FOLDER/NAME-W4A16-G64 and OUT_FOLDER/NAME-FP8-dynamic
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

W4A16_G64 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                            "strategy": "group", "group_size": 64}}}
RECIPES = {"W4A16-G64": dict(config_groups=W4A16_G64), "FP8-dynamic": dict(targets="Linear", scheme="FP8_DYNAMIC")}


def main(model_folder: str, out: str, name: str) -> int:
    for suffix, recipe in RECIPES.items():
        model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float16)
        tokenizer = AutoTokenizer.from_pretrained(model_folder)
        target = Path(out) / f"{name}-{suffix}"
        oneshot(model=model, recipe=QuantizationModifier(ignore=["lm_head"], **recipe))
        model.save_pretrained(target, save_compressed=True)
        tokenizer.save_pretrained(target)
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
