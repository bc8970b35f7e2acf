"""Hugging Face interop: import a model folder (config, safetensors, tokenizer) into our
transformer, sharded on a mesh; export ours to a folder `transformers` loads."""

from research.hf.load import HFModel, is_hf_folder, load_hf

__all__ = ["HFModel", "is_hf_folder", "load_hf"]
