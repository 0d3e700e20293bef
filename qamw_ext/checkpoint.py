"""Save and load quantized models: safetensors plus a `quantization_config` in config.json.

Layout of a saved directory (format version 5; version 4's QAM-W layers had no
"codebook_points" and held the trained fp32 codewords, version 3's fused layers shared one
channel scale, version 2 had no fused layers, all still read; version 1 had no per-tensor
checksums):
  config.json        the model's transformers config with
                     quantization_config = {"quant_method": "qamw_ext", "format_version": 5,
                     "config": QuantConfig, "modules": {name: codec meta}, "fused":
                     {fused layer name: [sibling names in row order]}, "tensors":
                     {name: [dtype, shape, sha256 of its bytes]}, "tied": {name: name},
                     "weights_sha256": sha256 of model.safetensors}
  model.safetensors  every tensor of the state dict (tied tensors once), no pickle
  tokenizer files, generation_config.json (when given)

Saving is atomic: everything is written into a hidden temporary directory beside the target
that is renamed into place only when complete (and removed on any error); an existing target
is swapped with it in one step where the OS can (Linux renameat2), so a save interrupted at
any point leaves either the old model or the new one at the target, never a partial one.

Loading rebuilds the model's structure from config.json (transformers `from_config`, then
each listed linear replaced by `CODECS[method].from_meta(meta)`, fused siblings by views of
their fused layer), and refuses a checkpoint
unless the format version is known, the weights file's SHA-256 matches, and the file holds
exactly the tensors that structure expects, each with the expected shape, dtype and SHA-256
(a damaged file is reported by the names of the tensors that no longer match).

transformers integration: importing qamw_ext registers the "qamw_ext" quantization method
with transformers (`register_quantization_config` / `register_quantizer`), so
`AutoModelForCausalLM.from_pretrained(saved_dir)` works; its quantizer rebuilds the codec
modules and then loads the weights through the same strict loader. `load_quantized(dir)`
is the direct way."""
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile

import torch

from .fusion import FusedSlice, fuse_siblings, fused_groups, fused_name
from .quantized_linear import QuantizedLinear

FORMAT_VERSION = 5
READ_VERSIONS = (2, 3, 4, 5)
QUANT_METHOD = "qamw_ext"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    pass


_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn)}


def _dtype_name(dt):
    return str(dt).replace("torch.", "")


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_sha256(t):
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                          ).hexdigest()


def _exchange(a, b):
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).
    False where the OS or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _unique_state(model):
    """(tensors to store {name: tensor}, tied {dropped name: stored name})."""
    out, tied, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.numel(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    return out, tied


def quantized_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantization_config_dict(model, tensors=None, tied=None):
    from . import __version__

    qcfg = getattr(model, "qamw_config", None)
    modules = {n: m.meta() for n, m in quantized_modules(model).items()}
    d = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
         "qamw_ext_version": __version__,
         "config": qcfg.to_dict() if qcfg is not None else None,
         "modules": modules, "fused": fused_groups(model)}
    if tensors is not None:
        d["tensors"] = {n: [_dtype_name(t.dtype), list(t.shape), _tensor_sha256(t)]
                        for n, t in tensors.items()}
    if tied is not None:
        d["tied"] = dict(tied)
    report = getattr(model, "qamw_report", None)
    if report:
        d["bits_per_weight"] = report.get("bits_per_weight")
    return d


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(parent, base):
    """Delete the hidden .tmp- directories that saves of `base` left behind when their
    process was killed (the pid is in the name). They hold a partial save, or a replaced
    model whose replacement was already in place. A .old- directory can be the only copy of
    the previous model, so it is never touched."""
    pattern = re.compile(rf"^\.{re.escape(base)}\.tmp-(\d+)-")
    for entry in os.listdir(parent):
        match = pattern.match(entry)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def save_quantized(model, out_dir, tokenizer=None, overwrite=False, extra=None):
    """Write a quantized model to out_dir atomically. Returns out_dir."""
    from safetensors.torch import save_file

    if not quantized_modules(model):
        raise CheckpointError("the model has no quantized layers: run quantize_model first")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir} already exists (pass overwrite=True / --overwrite)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, os.path.basename(out_dir))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-", dir=parent)
    try:
        tensors, tied = _unique_state(model)
        wpath = os.path.join(tmp, WEIGHTS_NAME)
        qdict = quantization_config_dict(model, tensors, tied)
        # The layer descriptions also travel with the weights, so that an edited config.json
        # is caught.
        save_file(tensors, wpath, metadata={
            "format": "pt", "quant_method": QUANT_METHOD, "format_version": str(FORMAT_VERSION),
            "qamw_modules": json.dumps(qdict["modules"], sort_keys=True),
            "qamw_fused": json.dumps(qdict["fused"], sort_keys=True)})
        qdict["weights_sha256"] = _sha256(wpath)
        if extra:
            qdict["extra"] = extra
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["quantization_config"] = qdict
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir) and _exchange(tmp, out_dir):
            shutil.rmtree(tmp, ignore_errors=True)    # now the old model
        elif os.path.exists(out_dir):
            # No atomic swap here: for a moment between the two renames the target is absent
            # (the old model is still whole under the hidden .old- name).
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_quantization_config(path):
    """The checked quantization_config of a saved directory (and the raw config dict)."""
    from .models import ModelError, read_config_json

    try:
        raw = read_config_json(path)
    except ModelError as e:
        raise CheckpointError(str(e)) from None
    q = raw.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a qamw_ext checkpoint (config.json has no "
                              f"quantization_config with quant_method {QUANT_METHOD!r})")
    version = q.get("format_version")
    if version not in READ_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported "
                              f"(this qamw_ext reads versions {READ_VERSIONS})")
    for key in ("modules", "tensors", "weights_sha256"):
        if key not in q:
            raise CheckpointError(f"{path}: quantization_config lacks {key!r}")
    if not isinstance(q["modules"], dict) or not q["modules"]:
        raise CheckpointError(f"{path}: quantization_config.modules is empty or malformed")
    if not isinstance(q["weights_sha256"], str) or not re.fullmatch("[0-9a-f]{64}",
                                                                    q["weights_sha256"]):
        raise CheckpointError(f"{path}: quantization_config.weights_sha256 is not a SHA-256")
    fused = q.setdefault("fused", {})
    if not isinstance(fused, dict) or not all(
            name in q["modules"] and isinstance(sib, list) and len(sib) > 1 and
            all(isinstance(n, str) for n in sib) for name, sib in fused.items()):
        raise CheckpointError(f"{path}: quantization_config.fused is malformed (expected "
                              "{fused layer listed in modules: [two or more sibling names]})")
    tensors = q["tensors"]
    if not isinstance(tensors, dict) or not all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and
            isinstance(r[1], list) and isinstance(r[2], str) for r in tensors.values()):
        raise CheckpointError(f"{path}: quantization_config.tensors is malformed (expected "
                              "{name: [dtype, shape, sha256]})")
    return q, raw


def _linear_at(model, name):
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"checkpoint lists module {name!r}, which this model "
                              "architecture does not have") from None
    if not isinstance(old, (torch.nn.Linear, QuantizedLinear, FusedSlice)):
        raise CheckpointError(f"{name} is a {type(old).__name__}, not a linear layer")
    return old


def _fused_shape(model, name, siblings):
    """(in_features, [out_features of each sibling]) that the fused layer `name` of
    `siblings` must have."""
    parent, _, attr = name.rpartition(".")
    if any(s.rpartition(".")[0] != parent for s in siblings):
        raise CheckpointError(f"fused layer {name}: its siblings {siblings} are not all "
                              f"children of {parent or 'the model'}")
    if attr != fused_name([s.rpartition(".")[2] for s in siblings]):
        raise CheckpointError(f"fused layer {name}: the name does not follow from its "
                              f"siblings {siblings}")
    olds = [_linear_at(model, s) for s in siblings]
    if len({m.in_features for m in olds}) != 1:
        raise CheckpointError(f"fused layer {name}: its siblings {siblings} read inputs of "
                              f"different sizes {[m.in_features for m in olds]}")
    return olds[0].in_features, [m.out_features for m in olds]


def _replace_modules(model, modules, fused=None, device=None):
    from .calibration import set_submodule
    from .convert import codec_class

    fused = fused or {}
    for name, meta in modules.items():
        if not isinstance(meta, dict) or "method" not in meta:
            raise CheckpointError(f"malformed meta for module {name!r}")
        rows = None
        if name in fused:
            n, rows = _fused_shape(model, name, fused[name])
            want = n, sum(rows)
        else:
            old = _linear_at(model, name)
            want = old.in_features, old.out_features
        try:
            cls = codec_class(meta["method"])
        except ValueError as e:
            raise CheckpointError(f"{name}: {e}") from None
        try:
            new = cls.from_meta(meta)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{name}: invalid codec meta {meta}: {e}") from None
        if (new.in_features, new.out_features) != want:
            raise CheckpointError(
                f"{name}: meta says {new.in_features}->{new.out_features}, the model has "
                f"{want[0]}->{want[1]}")
        if new.sibling_rows not in (None, rows):
            raise CheckpointError(f"{name}: meta gives its siblings {new.sibling_rows} rows, "
                                  f"the model's {fused.get(name)} have {rows}")
        if device is not None:
            new = new.to(device)
        if name in fused:
            parent = name.rpartition(".")[0]
            fuse_siblings(model.get_submodule(parent), [s.rpartition(".")[2] for s in fused[name]],
                          new)
        else:
            set_submodule(model, name, new)


def _read_weights(path, q):
    """{name: tensor} from the directory's safetensors file, after the integrity checks."""
    from safetensors import SafetensorError, safe_open

    wpath = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
    sha = _sha256(wpath)
    if sha != q["weights_sha256"]:
        raise CheckpointError(f"{wpath} is truncated or was modified: its SHA-256 {sha[:16]}... "
                              f"does not match the {q['weights_sha256'][:16]}... recorded at save"
                              f" ({_damage(wpath, q['tensors'])})")
    try:
        with safe_open(wpath, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("quant_method") != QUANT_METHOD or \
                    meta.get("format_version") != str(q["format_version"]):
                raise CheckpointError(f"{wpath}: not a qamw_ext format-{q['format_version']} "
                                      f"file (metadata {meta})")
            try:
                file_modules = json.loads(meta.get("qamw_modules", "null"))
            except json.JSONDecodeError:
                file_modules = None
            try:
                file_fused = json.loads(meta.get("qamw_fused", "{}"))
            except json.JSONDecodeError:
                file_fused = None
            if file_modules != q["modules"] or file_fused != q["fused"]:
                raise CheckpointError(f"{path}: the layer descriptions in config.json do not "
                                      f"match those stored with the weights (edited config?)")
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{wpath} is not a valid safetensors file: {e}") from None


def _damage(wpath, manifest):
    """Which part of a weights file that failed its checksum is damaged, in words."""
    from safetensors import safe_open

    try:
        with safe_open(wpath, framework="pt") as f:
            bad = [k for k in f.keys()
                   if k not in manifest or _tensor_sha256(f.get_tensor(k)) != manifest[k][2]]
            missing = sorted(set(manifest) - set(f.keys()))
    except Exception as e:   # whatever the damaged header or data makes the reader raise
        return f"its header or size is damaged: {type(e).__name__}: {e}"
    if bad or missing:
        return (f"tensors that differ from their checksums: {bad[:8]}"
                f"{' ...' if len(bad) > 8 else ''}" + (f", missing: {missing[:8]}" if missing else ""))
    return "every tensor matches its checksum, so its header or metadata was changed"


def validate_tensors(model, tensors, q):
    """Every tensor the model expects, and no other, each with the right shape and dtype."""
    expected, tied = _unique_state(model)
    problems = []
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensors: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for name in sorted(set(expected) & set(tensors)):
        e, t = expected[name], tensors[name]
        if tuple(t.shape) != tuple(e.shape) or t.dtype != e.dtype:
            problems.append(f"{name}: file has {_dtype_name(t.dtype)}{list(t.shape)}, the model "
                            f"expects {_dtype_name(e.dtype)}{list(e.shape)}")
    manifest = q["tensors"]
    for name, t in tensors.items():
        rec = manifest.get(name)
        if rec is None or rec[0] != _dtype_name(t.dtype) or list(rec[1]) != list(t.shape):
            problems.append(f"{name}: does not match config.json's tensor list "
                            f"({rec[:2] if rec else None})")
        elif _tensor_sha256(t) != rec[2]:
            problems.append(f"{name}: its bytes do not match the SHA-256 recorded at save")
    if problems:
        raise CheckpointError("checkpoint does not match the model it describes:\n  " +
                              "\n  ".join(problems[:20]))
    return tied


def _load_tensors_into(model, tensors, tied):
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    bad_missing = [m for m in missing if m not in tied]
    if bad_missing or unexpected:
        raise CheckpointError(f"state dict load failed: missing {bad_missing}, "
                              f"unexpected {unexpected}")


def _build_skeleton(raw):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(raw)
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("config.json has no model_type")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:    # other transformers versions: initialise (slower, same result)
        import contextlib

        no_init_weights = contextlib.nullcontext
    try:
        config = AutoConfig.for_model(model_type, **cfg)
        with no_init_weights():   # every tensor is overwritten from the checkpoint
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, str(
                cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")))
        model.tie_weights()
    except Exception as e:
        raise CheckpointError(f"cannot build a causal LM from config.json: {e}") from None
    return model


def load_quantized(path, device="cpu"):
    """A saved quantized model, validated tensor by tensor (see module docstring)."""
    from .models import _silence_transformers

    _silence_transformers()
    q, raw = read_quantization_config(path)
    tensors = _read_weights(path, q)
    model = _build_skeleton(raw)
    _replace_modules(model, q["modules"], q["fused"])
    tied = validate_tensors(model, tensors, q)
    _load_tensors_into(model, tensors, tied)
    _attach_config(model, q)
    return model.to(device).eval()


def _attach_config(model, q):
    from .convert import QuantConfig

    if q.get("config"):
        try:
            model.qamw_config = QuantConfig.from_dict(q["config"])
        except Exception as e:
            raise CheckpointError(f"quantization_config.config is invalid: {e}") from None


# ------------------------------------------------------------ transformers integration

def _register_with_transformers():
    """Register the qamw_ext quantization method with transformers, if it has the hooks."""
    try:
        from transformers.quantizers import HfQuantizer
        from transformers.quantizers.auto import (AUTO_QUANTIZER_MAPPING,
                                                  register_quantization_config,
                                                  register_quantizer)
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except Exception:   # an older/newer transformers without these hooks: load_quantized only
        return False
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return True

    @register_quantization_config(QUANT_METHOD)
    class QamwExtConfig(QuantizationConfigMixin):
        def __init__(self, **kwargs):
            self.quant_method = QUANT_METHOD
            for k, v in kwargs.items():
                setattr(self, k, v)

        def to_dict(self):
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @register_quantizer(QUANT_METHOD)
    class QamwExtQuantizer(HfQuantizer):
        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            if self.quantization_config.to_dict().get("format_version") not in READ_VERSIONS:
                raise CheckpointError(
                    f"qamw_ext checkpoint format version "
                    f"{self.quantization_config.to_dict().get('format_version')!r} is not "
                    f"supported (this qamw_ext reads versions {READ_VERSIONS})")

        def update_dtype(self, dtype):
            return dtype

        def _process_model_before_weight_loading(self, model, **kwargs):
            # The skeleton is on the meta device here: swap in codec modules so that the
            # parameter names and shapes match the checkpoint.
            q = self.quantization_config.to_dict()
            with torch.device("meta"):
                _replace_modules(model, q["modules"], q.get("fused"))
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            # Whatever transformers loaded, reload every tensor through the strict loader.
            path = getattr(model, "name_or_path", None) or \
                getattr(model.config, "_name_or_path", None)
            if not path or not os.path.isdir(path):
                raise CheckpointError("qamw_ext: from_pretrained works for local directories "
                                      "only; use qamw_ext.load_quantized(dir)")
            q, _ = read_quantization_config(path)
            tensors = _read_weights(path, q)
            device = next(iter(tensors.values())).device
            try:
                device = next(model.parameters()).device
            except StopIteration:
                pass
            _replace_modules(model, q["modules"], q["fused"], device="cpu")
            tied = validate_tensors(model, tensors, q)
            _load_tensors_into(model, tensors, tied)
            model.to(device)
            _attach_config(model, q)
            return model

        @property
        def is_trainable(self):
            return False

        def is_serializable(self):
            return False   # save with qamw_ext.save_quantized

    return True


TRANSFORMERS_REGISTERED = _register_with_transformers()
