"""Model conversion: `quantize_model(model, config, calibration)` replaces the linear layers
of a causal LM's decoder (and, if asked, lm_head) with QuantizedLinear modules of one codec.

A config is a QuantConfig, or a name from NAMED_CONFIGS ("qamw-5.5", "aaac-int4", "nf4", ...),
or "method:key=value,key=value" for any registered codec with explicit options
(e.g. "qamw:bits=9,codebook=polar"); either may end in "@field=value,..." to set QuantConfig
fields (e.g. "qamw-5.5-ef@bit_allocation=true,sequential=false")."""
import dataclasses
import importlib
import json
import re
import time
from typing import Optional

import torch

from .quantized_linear import CODECS, QuantizedLinear

CODEC_MODULES = ("qamw_ext.baselines", "qamw_ext.qamw", "qamw_ext.aaac")


class ConfigError(ValueError):
    pass


def load_codecs():
    """Import the codec modules so that they register themselves; returns {module: error}
    for the ones that could not be imported (not built yet, say)."""
    errors = {}
    for mod in CODEC_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            errors[mod] = str(e)
    return errors


QAMW_BITS = {"3.5": 7, "4": 8, "4.5": 9, "5": 10, "5.5": 11, "6": 12}

# name -> (method, options, calibrate, description[, QuantConfig fields])
NAMED_CONFIGS = {}
for _bpw, _b in QAMW_BITS.items():
    NAMED_CONFIGS[f"qamw-{_bpw}"] = ("qamw", {"bits": _b}, True,
                                     f"QAM-W, {_b} bits per 2-D pair (~{_bpw} bpw), "
                                     "activation-aware scaling")
    NAMED_CONFIGS[f"polar-{_bpw}"] = ("qamw", {"bits": _b, "codebook": "polar"}, True,
                                      f"QAM-W polar ablation (amplitude x phase), {_b} bits/pair")
    NAMED_CONFIGS[f"qamw-{_bpw}-ef"] = ("qamw", {"bits": _b, "error_feedback": True}, True,
                                        f"QAM-W, {_b} bits per 2-D pair (~{_bpw} bpw), "
                                        "activation-aware scaling, error feedback (H = X^T X)")
    NAMED_CONFIGS[f"qamw-{_bpw}-best"] = ("qamw", {"bits": _b, "error_feedback": True,
                                                   "block_size": "largest"}, True,
                                          f"QAM-W ~{_bpw} bpw on average with every quality "
                                          "lever: error feedback, the largest Hadamard block "
                                          "(the whole dimension where it can be), bits "
                                          "allocated per layer", {"bit_allocation": True})
    NAMED_CONFIGS[f"qamw-{_bpw}-noscale"] = ("qamw", {"bits": _b, "alpha": 0.0}, True,
                                             f"QAM-W {_b} bits/pair without activation-aware "
                                             "scaling (alpha = 0)")
NAMED_CONFIGS.update({
    "aaac-int4": ("aaac", {"variant": "int4"}, True,
                  "AAAC INT4-style: group 128, fp16 scales, two learned 16-entry codebooks"),
    "aaac-int4-ef": ("aaac", {"variant": "int4", "error_feedback": True}, True,
                     "AAAC INT4-style, codes rounded with error feedback (H = X^T X)"),
    "aaac-int4-awq": ("aaac", {"variant": "int4", "channel_scaling": True}, True,
                      "AAAC INT4-style with AWQ-style channel scaling"),
    "aaac-nvfp4": ("aaac", {"variant": "nvfp4"}, True,
                   "AAAC NVFP4-style: group 16, FP8 E4M3 scales + fp32 tensor scale"),
    "aaac-nvfp4-awq": ("aaac", {"variant": "nvfp4", "channel_scaling": True}, True,
                       "AAAC NVFP4-style with AWQ-style channel scaling"),
    "rtn-int4-g128": ("rtn", {"group_size": 128}, False,
                      "round-to-nearest asymmetric INT4, group 128 (data-free)"),
    # AAAC INT4 falls back to groups of 64 where 128 does not divide in_features (576 in
    # SmolLM2-135M): RTN at group 64 is its baseline at no fewer bits.
    "rtn-int4-g64": ("rtn", {"group_size": 64}, False,
                     "round-to-nearest asymmetric INT4, group 64 (data-free)"),
    "gptq-int4-g128": ("rtn", {"group_size": 128, "error_feedback": True}, True,
                       "GPTQ: INT4 g128 (the RTN format) rounded with error feedback"),
    "nf4": ("nf4", {"group_size": 64}, False, "NormalFloat4, absmax per group of 64 (data-free)"),
})
ALIASES = {"rtn": "rtn-int4-g128", "rtn-int4": "rtn-int4-g128", "aaac": "aaac-int4",
           "qamw": "qamw-4"}


@dataclasses.dataclass
class QuantConfig:
    """What to quantize and how.

    method/options: the codec (a key of CODECS) and its from_linear keyword options.
    calibrate: collect LayerStats (False: the codec gets stats=None, no data pass).
    include_lm_head: also quantize lm_head (unties it from the embedding).
    exclude: regular expressions; a linear whose full name matches one is left in full
    precision. calib_*: calibration set size; sequential: calibrate each group of linears
    inside a decoder layer after the groups before it are quantized, and each decoder layer
    on the outputs of the quantized layers before it (False: every statistic comes from
    the full-precision model). bit_allocation: choose each linear's "bits" from its
    measured sensitivity, at the storage of options["bits"] everywhere (qamw_ext.allocation).
    layer_options: {full linear name: {option: value}} overriding options for that linear.
    fuse_siblings: quantize the linears that read one input (q/k/v, gate/up) as one layer of
    their rows, so that decoding runs one GEMV for them (qamw_ext.fusion). Each is quantized
    as its own layer and keeps its per-layer choices (QAM-W's channel scale, AAAC's codebooks)
    inside the fused one: the fused model computes exactly what the unfused one does."""
    method: str
    options: dict = dataclasses.field(default_factory=dict)
    name: Optional[str] = None
    calibrate: bool = True
    include_lm_head: bool = False
    exclude: tuple = ()
    calib_tokens: int = 8192
    calib_length: int = 512
    calib_batch: int = 4
    sample_rows: int = 256
    sequential: bool = True
    hessian: Optional[bool] = None   # None: ask the codec (QuantizedLinear.uses_hessian)
    seed: int = 0
    bit_allocation: bool = False
    fuse_siblings: bool = False
    layer_options: dict = dataclasses.field(default_factory=dict)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown QuantConfig fields: {sorted(unknown)}")
        d = dict(d)
        d["exclude"] = tuple(d.get("exclude", ()))
        return cls(**d)

    @property
    def label(self):
        if self.name:
            return self.name
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}:{opts}" if opts else self.method


def _parse_value(v):
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def config_names():
    return sorted(NAMED_CONFIGS)


def get_config(spec, **overrides):
    """A QuantConfig from a QuantConfig, a dict, a named config or 'method:key=val,...'."""
    if isinstance(spec, QuantConfig):
        cfg = dataclasses.replace(spec)
    elif isinstance(spec, dict):
        cfg = QuantConfig.from_dict(spec)
    elif isinstance(spec, str):
        spec, _, fields = spec.partition("@")
        name = ALIASES.get(spec.strip(), spec.strip())
        if name in NAMED_CONFIGS:
            method, options, calibrate, _, *fields_of_name = NAMED_CONFIGS[name]
            cfg = QuantConfig(method=method, options=dict(options), name=name,
                              calibrate=calibrate, **(fields_of_name[0] if fields_of_name else {}))
        elif ":" in name or name in CODECS:
            method, _, rest = name.partition(":")
            options = {}
            for item in filter(None, (p.strip() for p in rest.split(","))):
                if "=" not in item:
                    raise ConfigError(f"bad option {item!r} in {spec!r}: use key=value")
                k, v = item.split("=", 1)
                options[k.strip()] = _parse_value(v.strip())
            cfg = QuantConfig(method=method.strip(), options=options, name=name)
        else:
            raise ConfigError(f"unknown quantization config {spec!r}; known: "
                              f"{', '.join(config_names())} (or 'method:key=value,...' with "
                              f"method one of {sorted(CODECS) or ['rtn', 'nf4', 'qamw', 'aaac']})")
    else:
        raise ConfigError(f"a quantization config must be a name, dict or QuantConfig, "
                          f"not {type(spec).__name__}")
    if isinstance(spec, str) and fields:
        known = {f.name for f in dataclasses.fields(QuantConfig)} - {
            "method", "options", "name", "layer_options"}
        for item in filter(None, (p.strip() for p in fields.split(","))):
            k, eq, v = item.partition("=")
            k = k.strip()
            if not eq or k not in known:
                raise ConfigError(f"bad field {item!r} after '@' in the config: use field=value "
                                  f"with field one of {sorted(known)}")
            # exclude takes one regular expression here (QuantConfig holds a tuple of them)
            setattr(cfg, k, (v.strip(),) if k == "exclude" else _parse_value(v.strip()))
        cfg.name = f"{cfg.label}@{fields}"
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


def codec_class(method):
    if method not in CODECS:
        errors = load_codecs()
    if method not in CODECS:
        hint = "; ".join(f"{m}: {e}" for m, e in errors.items())
        raise ConfigError(f"no codec registered for method {method!r} (registered: "
                          f"{sorted(CODECS)}){'; import errors: ' + hint if hint else ''}")
    return CODECS[method]


def target_linears(model, cfg):
    """Full names of the linears that cfg quantizes."""
    from .calibration import find_decoder_layers

    prefix, _ = find_decoder_layers(model)
    pats = [re.compile(p) for p in cfg.exclude]
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        inside = name.startswith(prefix + ".") if prefix else True
        is_head = name == "lm_head" or mod is _output_head(model)
        if not (inside or (cfg.include_lm_head and is_head)):
            continue
        if any(p.search(name) for p in pats):
            continue
        out.append(name)
    return out


def _output_head(model):
    try:
        return model.get_output_embeddings()
    except Exception:
        return None


def _untie_head(model, names):
    head = _output_head(model)
    if head is None:
        return
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    if head_name in names and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
        head.weight = torch.nn.Parameter(head.weight.detach().clone())


def quantized_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantize_model(model, config, calibration=None, *, progress=True, log=print):
    """Quantize `model` in place and return it.

    config: QuantConfig, config name, or 'method:key=val'. calibration: (count, length)
    int64 token ids (e.g. qamw_ext.data.default_calibration(tokenizer)); required when the
    config calibrates. A report is left in `model.qamw_report` and the config in
    `model.qamw_config`."""
    cfg = get_config(config)
    cls = codec_class(cfg.method)
    if quantized_modules(model):
        raise ConfigError("this model is already quantized")
    names = target_linears(model, cfg)
    if not names:
        raise ConfigError("no linear layer matches the config (check `exclude`)")
    if cfg.fuse_siblings and not cfg.calibrate:
        raise ConfigError(f"fuse_siblings needs a calibrating config ({cfg.label} is data-free): "
                          "the siblings are found by the input they share")
    device = next(model.parameters()).device
    model.eval()
    _untie_head(model, names)
    per_layer = {}
    t0 = time.time()
    batches = None
    if cfg.calibrate or cfg.bit_allocation:
        if calibration is None:
            raise ConfigError(f"config {cfg.label} needs calibration data")
        calibration = torch.as_tensor(calibration)
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ConfigError("calibration must be a (count, length) tensor of token ids")
        batches = list(torch.split(calibration.to(torch.int64).to(device), cfg.calib_batch))
    layer_options = {n: dict(o) for n, o in cfg.layer_options.items()}
    allocation = None
    if cfg.bit_allocation:
        from .allocation import plan

        choice, allocation = plan(model, names, cls, cfg.options, batches,
                                  sample_rows=cfg.sample_rows, seed=cfg.seed,
                                  fuse=cfg.fuse_siblings, log=log)
        for n, b in choice.items():
            layer_options.setdefault(n, {}).setdefault("bits", b)

    def quantize_fn(name, linear, stats, members=None):
        """linear: an nn.Linear, or with members (fused siblings) the list of theirs."""
        t = time.time()
        own = [layer_options.get(n, {}) for n in (members or [name])]
        if any(o != own[0] for o in own):
            raise ConfigError(f"layer_options differ between the fused siblings {members}; "
                              "give them the same options or set fuse_siblings=false")
        options = {**cfg.options, **own[0]}
        try:
            q = (cls.from_siblings(linear, stats, **options) if members else
                 cls.from_linear(linear, stats, **options))
        except TypeError as e:
            raise ConfigError(f"codec {cfg.method!r} rejected options {options}: {e}") from None
        q = q.to(device)
        per_layer[name] = {"bits_per_weight": q.bits_per_weight(), "seconds": time.time() - t,
                           "numel": q.in_features * q.out_features}
        return q

    if cfg.calibrate:
        hessian = cfg.hessian if cfg.hessian is not None else cls.uses_hessian(cfg.options)
        from .calibration import calibrate_and_replace

        calibrate_and_replace(model, batches, quantize_fn, set(names), sequential=cfg.sequential,
                              sample_rows=cfg.sample_rows, hessian=hessian, seed=cfg.seed,
                              progress=progress, fuse=cfg.fuse_siblings)
    else:
        from tqdm.auto import tqdm

        from .calibration import set_submodule

        for name in tqdm(names, desc="quantize", unit="linear", disable=not progress):
            set_submodule(model, name, quantize_fn(name, model.get_submodule(name), None))
    seconds = time.time() - t0
    numel = sum(v["numel"] for v in per_layer.values())
    bits = sum(v["bits_per_weight"] * v["numel"] for v in per_layer.values())
    model.qamw_config = cfg
    model.qamw_report = {
        "config": cfg.label, "method": cfg.method, "options": cfg.options,
        "seconds": seconds, "linears": len(per_layer), "quantized_weights": numel,
        "bits_per_weight": bits / numel, "layers": per_layer,
    }
    if allocation is not None:
        model.qamw_report["allocation"] = allocation
    if log:
        log(f"[qamw] {cfg.label}: {len(per_layer)} linears, {bits / numel:.3f} bits/weight, "
            f"{seconds:.1f} s")
    return model


def model_storage(model):
    """Bytes of the model's state (tied tensors once): quantized linears, other tensors."""
    seen, q_bytes, other = set(), 0, 0
    qnames = quantized_modules(model)
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        owner = name.rpartition(".")[0]
        if owner in qnames:
            q_bytes += t.numel() * t.element_size()
        else:
            other += t.numel() * t.element_size()
    return {"quantized_bytes": q_bytes, "other_bytes": other, "total_bytes": q_bytes + other}


def describe_configs():
    return "\n".join(f"  {n:22s} {NAMED_CONFIGS[n][3]}" for n in config_names())


def config_json(cfg):
    return json.dumps(cfg.to_dict(), sort_keys=True)
