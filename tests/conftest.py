import os

# Tests never reach the Hugging Face hub: everything they need is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Bit for bit: on an x86 CPU with AVX-512, Intel MKL (torch's BLAS there) picks its code path by the data's memory
# alignment unless told not to, so two runs of the same training (in one process, or the library and sd-scripts'
# command line) differ in the last bits (measured: 1.6e-7 in a LoRA weight after 5 steps; bit-identical with it).
# MKL reads this once, before its first call: set here, before any test imports torch, and inherited by every
# subprocess a test starts (the command line, the workers). Nothing else changes: AVX2 machines and Apple Silicon
# compute as they did. docs/engine.md, "Bit for bit".
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
