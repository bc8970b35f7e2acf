"""Import a Hugging Face model folder (config.json, safetensors shards, tokenizer.json).

Every parameter is created straight in its target sharding on the mesh with
``jax.make_array_from_callback``: each device's block is read from the safetensors file
(memory-mapped, sliced) and cast to the requested dtype, so no host ever holds the whole model,
nor even a whole tensor when the mesh splits it (a 70B import fits a pod host's memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from research.config import HFError, MeshConfig, ModelConfig
from research.data.tokenizer import BPETokenizer
from research.hf.config_map import family_of, model_config_from_hf
from research.hf.weights import IGNORED_SUFFIXES, Source, sources
from research.parallel.mesh import make_mesh
from research.train.shardings import abstract_params, param_shardings


@dataclass
class HFModel:
    """An imported model: its config, parameters (global arrays on ``mesh``) and tokenizer."""

    config: ModelConfig
    family: str
    graphdef: nnx.GraphDef
    params: dict
    mesh: Mesh
    tokenizer: BPETokenizer | None

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)


def is_hf_folder(path: str | Path) -> bool:
    """An HF model folder (config.json naming an architecture), not one of our run dirs."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "architectures" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise HFError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HFError(f"{path} is not valid JSON ({error}); re-download it") from None


class SafetensorsFolder:
    """The tensors of a folder's safetensors file(s): name -> file, sliced reads."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise HFError(
                f"{folder} has neither model.safetensors nor model.safetensors.index.json "
                "(PyTorch .bin checkpoints are not read: convert them to safetensors first)"
            )
        if weight_map is None:
            files = {"model.safetensors": folder / "model.safetensors"}
        else:
            files = {name: folder / name for name in sorted(set(weight_map.values()))}
        missing = [name for name, path in files.items() if not path.is_file()]
        if missing:
            raise HFError(
                f"{folder} is missing shard(s) {', '.join(missing)} listed in "
                "model.safetensors.index.json; download them again"
            )
        from safetensors import safe_open

        # framework="flax": numpy's safetensors reader has no bfloat16
        self._handles = {name: safe_open(str(p), framework="flax") for name, p in files.items()}
        if weight_map is None:
            handle = self._handles["model.safetensors"]
            weight_map = {key: "model.safetensors" for key in handle.keys()}
        self.weight_map: dict[str, str] = weight_map
        self.folder = folder

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise HFError(f"{self.folder} has no tensor {name!r}, which this architecture needs")
        return self._handles[self.weight_map[name]].get_slice(name)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return np.asarray(self._slice(name)[index])


def _hf_shape(source: Source, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that ``source`` converts to our ``shape`` (per expert if stacked)."""
    one = shape[1:] if source.stacked else shape
    size = int(np.prod(one, dtype=int))
    if source.kind == "copy":
        return tuple(one)
    if source.kind == "bias":
        return (size,)
    if source.kind == "linear":
        return (size // one[0], one[0])
    return (one[-1], size // one[-1])


def load_hf(
    folder: str | Path,
    mesh: Mesh | None = None,
    param_dtype: str = "float32",
    compute_dtype: str = "auto",
) -> HFModel:
    """Import ``folder``: parameters in ``param_dtype`` (an explicit cast of whatever the files
    hold), sharded over ``mesh`` (default: all local devices, data-parallel)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    family = family_of(hf)
    cfg = model_config_from_hf(hf, param_dtype, compute_dtype)
    tokenizer = load_tokenizer(folder, cfg.vocab_size)
    mesh = mesh or make_mesh(MeshConfig())
    tensors = SafetensorsFolder(folder)
    wanted = sources(cfg, family)
    _check_tensors(tensors, wanted, abstract_params(cfg, mesh))
    graphdef, _ = param_shardings(cfg, mesh)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: _load_leaf(tensors, wanted[_path_name(path)], leaf),
        abstract_params(cfg, mesh),
    )
    return HFModel(cfg, family, graphdef, params, mesh, tokenizer)


def _path_name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def _check_tensors(tensors: SafetensorsFolder, wanted: dict[str, Source], abstract: dict) -> None:
    """Every tensor present with the right shape, and none left over, before any read."""
    ours = {
        _path_name(path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    if set(ours) != set(wanted):  # a bug in sources(), not in the folder
        raise AssertionError(f"unmapped parameters: {sorted(set(ours) ^ set(wanted))}")
    used = set()
    for name, source in wanted.items():
        expected = _hf_shape(source, ours[name])
        for hf_name in source.names:
            used.add(hf_name)
            found = tensors.shape(hf_name)
            if found != expected:
                raise HFError(
                    f"{hf_name} has shape {list(found)} but config.json implies "
                    f"{list(expected)}; the weights do not belong to this config"
                )
    extra = [n for n in tensors.weight_map if n not in used and not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise HFError(
            f"{len(extra)} tensor(s) this architecture does not use, e.g. {extra[:3]}: the "
            "checkpoint has parts our model would silently drop"
        )


def _load_leaf(tensors: SafetensorsFolder, source: Source, leaf: jax.ShapeDtypeStruct):
    dtype = leaf.dtype

    def block(index):
        if source.fill is not None:
            shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape, strict=True))
            return np.full(shape, source.fill, dtype)
        return source.read(tensors.read, index, leaf.shape).astype(dtype)

    return jax.make_array_from_callback(leaf.shape, leaf.sharding, block)


def load_tokenizer(folder: Path, vocab_size: int) -> BPETokenizer | None:
    """tokenizer.json with HF ``tokenizers`` (None if the folder has none); refused when it
    produces ids the model has no embedding for."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = BPETokenizer(Tokenizer.from_file(str(path)))
    except Exception as error:  # tokenizers raises its own untyped Exception
        raise HFError(f"{path} is not a tokenizer `tokenizers` can read: {error}") from None
    if tokenizer.vocab_size > vocab_size:
        raise HFError(
            f"{path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{vocab_size}: ids past it have no embedding. Use the tokenizer that came with "
            "these weights"
        )
    return tokenizer
