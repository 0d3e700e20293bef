"""End-to-end decode speed of a Llama-architecture model with random weights: batch 1, greedy,
a static KV cache, one decode step captured in a CUDA graph and replayed. Configs: the bf16
model, and the same model with every decoder linear replaced by a quantized layer with random
codes and scales of the right shapes and dtypes (speed does not depend on the values; see
random_layers.py): QAM-W 4 and 5.5 bpw and AAAC int4 by default. Suffixes: "+fused" runs
q/k/v and gate/up as one layer each, as `fuse_siblings=True` converts them (qamw_ext.fusion;
bf16+fused is the dense baseline with the same fusion); "+head" quantizes lm_head too, as
`include_lm_head=True` does, with the config's codec, or "+head=CODEC" with another (a wider
one, as layer_options can give it). Otherwise the embeddings and lm_head stay bf16, as
qamw_ext.convert leaves them. The GEMV kernels launch overlapped with the kernel before them
(programmatic dependent launch, sm_90+): "+nopdl" launches them plainly (QAMW_PDL=0), and
"+gluepdl" has Inductor's compiled glue launch overlapped too (triton.enable_pdl); "+mma" runs
the batch-1 GEMVs on the tensor-core kernels (QAMW_GEMV_MMA=1) where a weight allows; "+alone"
runs QAM-W's batch-1 tensor-core GEMVs with each CTA alone, not in clusters of CTAs that
split the k-blocks (QAMW_GEMV_CLUSTER=0; clusters need sm_90); "+once" has a kernel of its own
rotate QAM-W's batch-1 activation once, before the GEMV, instead of each CTA or cluster
(QAMW_GEMV_ROTATE_ONCE=1). Reports
tokens/s, the bytes read per token, the bandwidth they imply and its fraction of the
device-to-device copy bandwidth measured in the same run; JSON to --out and a markdown table
beside it.

    python benchmarks/bench_decode.py --device cuda --out DIR/decode_cuda.json
    python benchmarks/bench_decode.py --device cuda --compile --out DIR/decode_compiled.json
    python benchmarks/bench_decode.py --smoke --out F.json    # a tiny model on the CPU, eagerly

The step runs the model's own modules (embedding, RMSNorms, projections, MLPs, lm_head, the
rotary frequencies) but not its forward: the forward's mask and cache code changes between
transformers versions, and some versions branch on device values on the host, which a graph
capture refuses. tests/test_benchmarks.py checks the step's logits against the forward's.
If a capture fails, that config is timed eagerly and its row says so.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_ops import (bench_copy, command_line, environment, md_table,  # noqa: E402
                       plain_launches, time_calls)
from random_layers import CODECS, buffer_bytes, random_fused_layer, random_layer  # noqa: E402

from qamw_ext.calibration import set_submodule  # noqa: E402
from qamw_ext.convert import get_config, target_linears  # noqa: E402
from qamw_ext.evaluate import machine_info  # noqa: E402
from qamw_ext.fusion import concatenated_linear, fuse_siblings, sibling_outputs  # noqa: E402
from qamw_ext.quantized_linear import QuantizedLinear  # noqa: E402

# Every in_features here (4096, 11008, 14336) suits every codec's block and group rules
# (qamw.choose_block, aaac.choose_group) without padding; the rows record the blocks used.
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}
DEFAULT_CONFIGS = ("bf16,bf16+fused,qamw-4,qamw-4+fused,qamw-4+fused+head=qamw-5.5,qamw-5.5,"
                   "qamw-5.5+fused,aaac-int4,aaac-int4+fused")
# The sibling linears of a Llama decoder layer, fused in the "+fused" configs.
SIBLINGS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
MiB = 1 << 20


def build_model(shape, device, dtype=torch.bfloat16):
    """LlamaForCausalLM of a SHAPES entry with random weights, made directly on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def rope_cos_sin(rotary, positions):
    """(positions, d) cos and sin of the rotary embedding as the transformers Llama applies it
    (halves, not pairs; attention scaling folded in)."""
    angles = torch.outer(torch.arange(positions, dtype=torch.float32),
                         rotary.inv_freq.detach().cpu().float())
    angles = torch.cat((angles, angles), dim=-1)
    scaling = getattr(rotary, "attention_scaling", 1.0)
    return angles.cos() * scaling, angles.sin() * scaling


def rope_rotations(cos, sin):
    """(positions, d, d) matrices R with q @ R[p] = q cos_p + rotate_half(q) sin_p: in the
    eager step, one small matmul per projection instead of five elementwise kernels."""
    half = cos.shape[1] // 2
    lower = torch.arange(half)
    rot = torch.diag_embed(cos)
    rot[:, lower + half, lower] = -sin[:, :half]   # out[j] -= q[j + d/2] sin[j]
    rot[:, lower, lower + half] = sin[:, half:]    # out[j + d/2] += q[j] sin[j + d/2]
    return rot


def apply_rope(x, rope):
    """x (heads, d) rotated by rope: a rope_rotations matrix (eager), or (cos, sin) rows
    (compiled: Inductor fuses the elementwise form into the kernels around it)."""
    if isinstance(rope, torch.Tensor):
        return x @ rope
    cos, sin = rope
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rms_norm(norm, x):
    """The model's RMSNorm module as one fused op."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)


class StaticDecoder:
    """Greedy decoding of a Llama model one token at a time with a static KV cache of max_len
    positions. The token and position live in device tensors that step() advances, and no
    step synchronises with the host or changes shape, so a step can be captured in a CUDA
    graph and replayed. Each kernel of the step costs a launch even in a graph, so the glue
    between the linears is kept to few kernels (fused RMSNorm, RoPE as a matmul, SDPA).
    q/k/v and gate/up go through sibling_outputs: one call when they are fused.

    compile=True compiles one decoder layer's step with torch.compile (Inductor fuses the glue
    around the linears, RoPE in its elementwise form included; the qamw_ext ops stay opaque,
    traced through their fake kernels). Every
    layer has the same structure, so the one compiled layer serves all of them, and the
    compile time does not grow with depth."""

    def __init__(self, model, max_len, compile=False, glue_pdl=False):
        cfg, inner = model.config, model.model
        self.model, self.max_len = model, max_len
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        weight = inner.embed_tokens.weight
        dev, dtype = weight.device, weight.dtype
        shape = (1, self.kv_heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dtype) for _ in inner.layers]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dtype) for _ in inner.layers]
        rotary = getattr(inner, "rotary_emb", None) or inner.layers[0].self_attn.rotary_emb
        cos, sin = rope_cos_sin(rotary, max_len)
        self.cos, self.sin = cos.to(dev, dtype), sin.to(dev, dtype)
        self.rotations = None if compile else rope_rotations(cos, sin).to(dev, dtype)
        self.positions = torch.arange(max_len, device=dev)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        # glue_pdl: Inductor's kernels launch overlapped too (programmatic dependent launch).
        options = {"triton.enable_pdl": True} if glue_pdl else None
        if compile:
            # Dynamo keys its compiled graphs on _layer_step's code, shared by every decoder of
            # the run: without a reset, configs after the recompile limit (8) fail to compile.
            torch._dynamo.reset()
        self.layer_step = (torch.compile(self._layer_step, fullgraph=True, options=options)
                           if compile else self._layer_step)

    def reset(self, token=1):
        """Back to position 0 (later cache entries are masked, so they need no clearing)."""
        self.token.fill_(token)
        self.pos.zero_()

    def step(self):
        """Logits (1, 1, vocab) for the current token; writes its K/V, then advances the
        token to the argmax and the position by one."""
        inner = self.model.model
        h = inner.embed_tokens(self.token)
        rot = (self.rotations.index_select(0, self.pos)[0] if self.rotations is not None else
               (self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)))
        visible = (self.positions <= self.pos).view(1, 1, 1, -1)
        for layer, kc, vc in zip(inner.layers, self.k_cache, self.v_cache):
            h = self.layer_step(layer, h, rot, visible, kc, vc)
        logits = self.model.lm_head(rms_norm(inner.norm, h))
        self.token.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits

    def _layer_step(self, layer, h, rot, visible, kc, vc):
        x = rms_norm(layer.input_layernorm, h)
        h = h + self._attention(layer.self_attn, x, rot, visible, kc, vc)
        mlp = layer.mlp
        gate, up = sibling_outputs(mlp, ("gate_proj", "up_proj"),
                                   rms_norm(layer.post_attention_layernorm, h))
        return h + mlp.down_proj(mlp.act_fn(gate) * up)

    def _attention(self, attn, x, rot, visible, kc, vc):
        d = self.head_dim
        q, k, v = sibling_outputs(attn, ("q_proj", "k_proj", "v_proj"), x)
        q = apply_rope(q.reshape(self.heads, d), rot).view(1, self.heads, 1, d)
        k = apply_rope(k.reshape(self.kv_heads, d), rot).view(1, self.kv_heads, 1, d)
        v = v.reshape(1, self.kv_heads, 1, d)
        kc.index_copy_(2, self.pos, k)
        vc.index_copy_(2, self.pos, v)
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=visible,
                                           enable_gqa=self.kv_heads != self.heads)
        return attn.o_proj(o.reshape(1, 1, self.heads * d))


def bytes_per_token(model, decoder):
    """What one decode step reads and writes, by part: every linear's weight (codes, scales,
    codebooks, signs, channel scales, or the dense weight), the norms, one embedding row, the
    whole static KV cache (attention reads it all, masked) and the new K/V. Activations are
    left out (a few hundred KiB)."""
    linear_types = (torch.nn.Linear, QuantizedLinear)
    head = model.lm_head
    parts = dict(linears=0, lm_head=buffer_bytes(head), norms=0)
    for _, mod in model.named_modules():
        if isinstance(mod, linear_types) and mod is not head:
            parts["linears"] += buffer_bytes(mod)
        elif type(mod).__name__.endswith("RMSNorm"):
            parts["norms"] += buffer_bytes(mod)
    emb = model.model.embed_tokens.weight
    parts["embedding_row"] = emb.shape[1] * emb.element_size()
    cache = decoder.k_cache + decoder.v_cache
    parts["kv_cache_read"] = sum(c.numel() * c.element_size() for c in cache)
    parts["kv_cache_write"] = parts["kv_cache_read"] // decoder.max_len
    return sum(parts.values()), parts


def decoder_linear_names(model):
    """The linears a named config quantizes (every decoder linear; not lm_head), in order."""
    return target_linears(model, get_config("qamw-4"))


def step_linear_names(model):
    """The linear layers a decode step runs (fused layers once, not their slices)."""
    prefix = "model.layers."
    return [n for n, m in model.named_modules() if n.startswith(prefix)
            and isinstance(m, (torch.nn.Linear, QuantizedLinear))]


def parse_config(name):
    """(codec or "bf16", {"fused": bool, "head": lm_head's codec or None, "pdl": bool,
    "glue_pdl": bool, "mma": bool, "clusters": bool, "rotate_once": bool}) of a config name
    such as qamw-4+fused+head (lm_head as qamw-4), qamw-4+head=qamw-5.5 or qamw-4+fused+nopdl."""
    codec, *suffixes = name.split("+")
    flags = {"fused": False, "head": None, "pdl": True, "glue_pdl": False, "mma": False,
             "clusters": True, "rotate_once": False}
    for suffix in suffixes:
        key, eq, value = suffix.partition("=")
        if key == "fused" and not eq:
            flags["fused"] = True
        elif key == "nopdl" and not eq:
            flags["pdl"] = False
        elif key == "gluepdl" and not eq:
            flags["glue_pdl"] = True
        elif key == "mma" and not eq:
            flags["mma"] = True
        elif key == "alone" and not eq:
            flags["clusters"] = False
        elif key == "once" and not eq:
            flags["rotate_once"] = True
        elif key == "head" and codec != "bf16" and (value if eq else codec) in CODECS:
            flags["head"] = value if eq else codec
        else:
            codec = None
    if codec not in ("bf16", *CODECS):
        raise ValueError(f"unknown config {name!r}: bf16 or one of {', '.join(CODECS)}, then "
                         f"optionally +fused, +nopdl, +gluepdl, +mma, +alone, +once, and for "
                         f"a codec +head or +head=CODEC")
    return codec, flags


def quantize_randomly(model, names, config, device, generator):
    """Replace the linears `names` with random layers of the config's codec ("bf16" keeps
    the dense ones); with "+fused", each decoder layer's siblings (SIBLINGS) by one layer of
    their rows; with "+head", lm_head too. Returns {name: the module it replaced} to restore
    them (a fused layer's name maps to None: it is removed)."""
    codec, flags = parse_config(config)
    fuse = flags["fused"]
    replaced = {}
    if flags["head"]:
        dense = model.lm_head
        model.lm_head = random_layer(flags["head"], dense.in_features, dense.out_features,
                                     device, generator)
        replaced["lm_head"] = dense
    if fuse:
        for i, layer in enumerate(model.model.layers):
            for parent_name, children in SIBLINGS:
                parent = getattr(layer, parent_name)
                olds = [getattr(parent, c) for c in children]
                fused = (concatenated_linear(olds) if codec == "bf16" else
                         random_fused_layer(codec, olds[0].in_features,
                                            [m.out_features for m in olds], device, generator))
                attr = fuse_siblings(parent, children, fused)
                base = f"model.layers.{i}.{parent_name}"
                replaced.update({f"{base}.{c}": m for c, m in zip(children, olds)})
                replaced[f"{base}.{attr}"] = None
    for name in names:
        if name in replaced or codec == "bf16":
            continue
        dense = model.get_submodule(name)
        set_submodule(model, name, random_layer(codec, dense.in_features, dense.out_features,
                                                device, generator))
        replaced[name] = dense
    return replaced


def restore(model, replaced):
    """Undo quantize_randomly."""
    for name, module in replaced.items():
        if module is None:
            parent, _, attr = name.rpartition(".")
            delattr(model.get_submodule(parent), attr)
        else:
            set_submodule(model, name, module)


def layer_summary(model):
    """Bits per weight over the quantized linears, and the blocks / groups they use."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return {}
    weights = sum(m.in_features * m.out_features for m in layers)
    bits = sum(m.bits_per_weight() * m.in_features * m.out_features for m in layers)
    blocks = sorted({getattr(m, "block_size", None) or getattr(m, "group_size", None)
                     for m in layers})
    return dict(quantized_linears=len(layers), bits_per_weight=bits / weights,
                blocks_or_groups=blocks,
                padded_linears=sum(m.padded_in != m.in_features for m in layers))


def compiled_vs_eager(model, decoder, steps=3):
    """(max |logit difference| between `decoder`, compiled, and an eager twin over `steps`
    steps fed the same tokens, seconds the compiled decoder's first step took: its compile)."""
    eager = StaticDecoder(model, decoder.max_len)
    eager.reset()
    decoder.reset()
    start = time.perf_counter()
    diff = (decoder.step().float() - eager.step().float()).abs().max().item()
    compile_s = time.perf_counter() - start
    for _ in range(steps - 1):
        decoder.token.copy_(eager.token)
        diff = max(diff, (decoder.step().float() - eager.step().float()).abs().max().item())
    return diff, compile_s


def time_decode(decoder, device, warmup, tokens, repeats):
    """(median seconds per token, how it was timed, graph-vs-eager max |logit difference|).
    CUDA: a graph of one step replayed token after token, events around groups of tokens."""
    per_group = max(1, tokens // repeats)
    check = None
    run, timing = decoder.step, "eager (wall clock)"
    if device == "cuda":
        timing = "cuda graph"
        side = torch.cuda.Stream()   # warm-up off the capture stream, as torch advises
        side.wait_stream(torch.cuda.current_stream())
        decoder.reset()
        with torch.cuda.stream(side):
            for _ in range(3):
                decoder.step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            # relaxed: the kernel launchers' attribute and occupancy queries are no stream work.
            with torch.cuda.graph(graph, capture_error_mode="relaxed"):
                graph_logits = decoder.step()
            decoder.reset()
            eager_logits = decoder.step().float()
            decoder.reset()
            graph.replay()
            check = (graph_logits.float() - eager_logits).abs().max().item()
            run = graph.replay
        except Exception as e:  # the eager figure is still worth having
            timing = f"eager ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            torch.cuda.synchronize()
    decoder.reset()
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_group):
                run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / per_group)
        else:
            start = time.perf_counter()
            for _ in range(per_group):
                run()
            times.append((time.perf_counter() - start) / per_group)
    return statistics.median(times), timing, check


def time_linears(model, names, device, repeats):
    """(seconds per token in the decoder's linears alone, how it was timed): each called once
    on a static batch-1 input, in layer order, as one graph; what the GEMV kernels cost
    without the glue between them."""
    mods = [model.get_submodule(name) for name in names]
    dtype = model.model.embed_tokens.weight.dtype
    inputs = {}
    for mod in mods:
        inputs.setdefault(mod.in_features,
                          torch.randn(1, mod.in_features, device=device, dtype=dtype))
    per_call, timing = time_calls([partial(mod, inputs[mod.in_features]) for mod in mods],
                                  device, len(mods), repeats)
    return per_call * len(mods), timing


def bench_config(name, model, linear_names, args, generator, copy_gbps):
    """One row: decode speed of `model` with the linears `linear_names` as `name` ("bf16" or a
    codec)."""
    replaced = quantize_randomly(model, linear_names, name, args.device, generator)
    linear_names = step_linear_names(model)
    codec, flags = parse_config(name)
    try:
        with contextlib.ExitStack() as switches:
            if not flags["pdl"]:
                switches.enter_context(plain_launches())
            if flags["mma"]:
                switches.enter_context(environment("QAMW_GEMV_MMA", "1"))
            if not flags["clusters"]:
                switches.enter_context(environment("QAMW_GEMV_CLUSTER", "0"))
            if flags["rotate_once"]:
                switches.enter_context(environment("QAMW_GEMV_ROTATE_ONCE", "1"))
            row = time_config(name, model, linear_names, args, copy_gbps, codec, flags)
    finally:
        restore(model, replaced)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return row


def time_config(name, model, linear_names, args, copy_gbps, codec, flags):
    """bench_config's row, once the model holds the config's layers."""
    decoder = StaticDecoder(model, args.max_len, compile=args.compile, glue_pdl=flags["glue_pdl"])
    compiled = {}
    with torch.no_grad():
        if args.compile:
            try:
                diff, compile_s = compiled_vs_eager(model, decoder)
                compiled = dict(compiled_vs_eager_max_abs_diff=diff, compile_s=compile_s)
            except Exception as e:  # the uncompiled figure is still worth having
                compiled = dict(compile_error=f"{type(e).__name__}: {e}"[:300])
                decoder = StaticDecoder(model, args.max_len)
        sec, timing, check = time_decode(decoder, args.device, args.warmup, args.tokens,
                                         args.repeats)
        lin_sec, lin_timing = time_linears(model, linear_names, args.device,
                                           max(5, args.repeats))
    total, parts = bytes_per_token(model, decoder)
    return dict(config=name, codec=CODECS.get(codec), **flags, **layer_summary(model),
                tokens_per_s=1.0 / sec, ms_per_token=sec * 1e3, timing=timing,
                graph_vs_eager_max_abs_diff=check, bytes_per_token=total, bytes=parts,
                implied_gbps=total / sec / 1e9, frac_of_copy=total / sec / 1e9 / copy_gbps,
                decoder_linears_ms_per_token=lin_sec * 1e3,
                decoder_linears_gbps=parts["linears"] / lin_sec / 1e9,
                decoder_linears_frac_of_copy=parts["linears"] / lin_sec / 1e9 / copy_gbps,
                decoder_linears_timing=lin_timing,
                compiled=args.compile and "compile_error" not in compiled, **compiled)


def markdown(record):
    rows = record["results"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["config"]] + [""] * 10 + [f"FAILED: {r['error']}"])
            continue
        table.append([r["config"], f"{r.get('bits_per_weight', 16):.3f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['ms_per_token']:.2f}",
                      f"{r['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in r else "-",
                      f"{r['bytes_per_token'] / 1e9:.3f}", f"{r['implied_gbps']:.0f}",
                      f"{100 * r['frac_of_copy']:.0f}%",
                      f"{r['decoder_linears_ms_per_token']:.2f}",
                      f"{100 * r['decoder_linears_frac_of_copy']:.0f}%",
                      f"{r['decoder_linears_speedup_vs_bf16']:.2f}x"
                      if "decoder_linears_speedup_vs_bf16" in r else "-",
                      r["timing"] + (", torch.compile" if r.get("compiled") else "")])
    shape = record["model"]
    lines = [f"# Decode speed on {record['device']}", "",
             f"{record['date']}, torch {record['torch']}, transformers {record['transformers']}; "
             f"`{record['command']}`.", "",
             f"Llama-architecture model `{record['shape']}` with random weights (hidden "
             f"{shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
             f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads, "
             f"{shape['num_key_value_heads']} KV heads, vocab {shape['vocab_size']}); batch 1, "
             f"greedy, static KV cache of {record['max_len']} positions; median per token over "
             f"{record['repeats']} groups of {record['tokens'] // record['repeats']} tokens after "
             f"{record['warmup']} warm-up tokens. Embeddings stay bf16, and lm_head unless the config "
             f"has +head; +fused: q/k/v and gate/up as one layer each. "
             f"Device-to-device copy: {record['copy']['gbps']:.0f} GB/s.", ""]
    lines += md_table(["config", "bits/weight (linears)", "tokens/s", "ms/token", "x bf16",
                       "GB read/token", "implied GB/s", "% of copy", "decoder linears ms/token",
                       "linears % of copy", "linears x bf16", "timing"], table)
    lines += ["Decoder linears: the step's linears alone, each called once on a static input in "
              "layer order (one graph): the kernels' share of the step; the rest is lm_head, "
              "attention and the elementwise glue.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="default: cuda, or cpu with --smoke")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"bf16 and/or codecs of random_layers.CODECS ({', '.join(CODECS)}),"
                             " each optionally with +fused (q/k/v and gate/up as one layer "
                             "each), +nopdl, +gluepdl, +mma, +alone or +once (see above) and, "
                             "for a codec, +head or +head=CODEC (lm_head quantized too)")
    parser.add_argument("--tokens", type=int, default=128, help="timed tokens per config")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4, help="groups the tokens are timed in")
    parser.add_argument("--max-len", type=int, default=256, help="static KV cache positions")
    parser.add_argument("--compile", action="store_true",
                        help="compile each decoder layer's step with torch.compile (one "
                             "compiled layer serves all: same structure)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on the CPU, few tokens: checks the logic")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    command = command_line(__file__, sys.argv[1:] if argv is None else list(argv))
    if args.smoke:
        args.shape, args.tokens, args.warmup, args.repeats, args.max_len = "tiny", 8, 2, 2, 32
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.warmup + args.tokens > args.max_len or args.max_len < 3:
        parser.error("--warmup + --tokens must fit in --max-len")
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        try:
            parse_config(c)
        except ValueError as e:
            parser.error(str(e))

    import transformers
    copy = bench_copy(args.device, dict(copy_bytes=(4 if args.smoke else 512) * MiB, calls=8,
                                        repeats=5))
    record = dict(command=command, date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  torch=torch.__version__, transformers=transformers.__version__,
                  cuda=torch.version.cuda,
                  device=(torch.cuda.get_device_name() if args.device == "cuda"
                          else machine_info().get("cpu", "cpu")),
                  machine=machine_info(), shape=args.shape, model=SHAPES[args.shape],
                  max_len=args.max_len, tokens=args.tokens, warmup=args.warmup,
                  repeats=args.repeats, copy=copy, results=[])
    print(json.dumps(copy), flush=True)
    start = time.perf_counter()
    model = build_model(args.shape, args.device)
    record["model_build_s"] = time.perf_counter() - start
    record["parameters"] = sum(p.numel() for p in model.parameters())
    generator = torch.Generator(args.device).manual_seed(0)
    linear_names = decoder_linear_names(model)
    base = None
    for name in configs:
        start = time.perf_counter()
        try:
            row = bench_config(name, model, linear_names, args, generator, copy["gbps"])
        except Exception as e:  # one failing config must not cost the others' figures
            row = dict(config=name, error=f"{type(e).__name__}: {e}"[:300])
        row["wall_s"] = time.perf_counter() - start
        if name == "bf16" and "tokens_per_s" in row:
            base = row
        if base and "tokens_per_s" in row:
            row["speedup_vs_bf16"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["decoder_linears_speedup_vs_bf16"] = (base["decoder_linears_ms_per_token"]
                                                      / row["decoder_linears_ms_per_token"])
        record["results"].append(row)
        print(json.dumps(row), flush=True)
        if args.device == "cuda":
            record["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        if args.out:   # after every config, so that a time limit keeps what was measured
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
            with open(args.out.removesuffix(".json") + ".md", "w") as f:
                f.write(markdown(record) + "\n")
    return record


if __name__ == "__main__":
    main()
