"""Calibration: per-linear input statistics, collected layer by layer.

The model is never run whole on the calibration set. The inputs of the first decoder layer
are captured once; then each decoder layer in turn is run on its inputs with forward
hooks on its linear layers (collecting LayerStats), its linears are quantized, and the
quantized layer is run once more to produce the next layer's inputs. So the statistics of
every layer are measured on the outputs of the already-quantized earlier layers, and
memory holds one decoder layer's inputs and outputs at a time.

Within a layer, linears that read the same tensor (q/k/v; gate/up) form a group, and with
`sequential=True` each group is calibrated after the groups before it are quantized (the
forward pass stops as soon as the group's input has been seen). `sequential=False` is the
ablation: every layer's statistics come from the full-precision model. With `fuse=True` the
linears of a group (children of one module) become one layer of their rows, each quantized
as its own layer first (QuantizedLinear.from_siblings): one GEMV for them at decode time."""
import time
from typing import Callable, Dict, List, Optional

import torch

from .quantized_linear import LayerStats


class CalibrationError(RuntimeError):
    pass


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


class StatsAccumulator:
    """Running E|x|, E[x^2], optional X^T X, and a seeded subsample of rows.

    `sample_rows`: sorted global row indices (over the whole calibration set, rows counted
    in the order they arrive) to keep as the `sample`."""

    def __init__(self, n, sample_rows, hessian=False, device="cpu"):
        self.n = n
        self.sum_abs = torch.zeros(n, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.hessian = torch.zeros(n, n, dtype=torch.float32, device=device) if hessian else None
        self.sample_rows = sample_rows
        self.samples = []
        self.rows = 0

    def add(self, x):
        x = x.detach().reshape(-1, self.n).to(torch.float32)
        r = x.shape[0]
        self.sum_abs += x.abs().sum(0).to(torch.float64)
        self.sum_sq += (x * x).sum(0).to(torch.float64)
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)
        lo, hi = self.rows, self.rows + r
        idx = self.sample_rows
        sel = idx[(idx >= lo) & (idx < hi)] - lo
        if sel.numel():
            self.samples.append(x[sel.to(x.device)].clone())
        self.rows = hi

    def result(self):
        if self.rows == 0:
            raise CalibrationError("no calibration rows reached this layer")
        n = self.rows
        sample = (torch.cat(self.samples) if self.samples
                  else torch.zeros(0, self.n, device=self.sum_abs.device))
        return LayerStats(
            mean_abs=(self.sum_abs / n).to(torch.float32).cpu(),
            mean_sq=(self.sum_sq / n).to(torch.float32).cpu(),
            sample=sample.cpu(),
            tokens=n,
            hessian=None if self.hessian is None else (self.hessian / n).cpu())


def find_decoder_layers(model):
    """(prefix, ModuleList) of the decoder blocks: the ModuleList whose length is
    config.num_hidden_layers (Llama, Mistral, Qwen, Gemma, Phi, GPT-2, ...)."""
    want = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            if want is not None and len(mod) == want:
                return name, mod
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise CalibrationError(f"{type(model).__name__} has no list of decoder layers")
    return best


def linear_names(module):
    """Names (relative to module) of its nn.Linear submodules, in registration order."""
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def sample_row_indices(total_rows, count, seed):
    g = torch.Generator().manual_seed(seed + 7919)
    count = min(count, total_rows)
    return torch.randperm(total_rows, generator=g)[:count].sort().values


def _run_to_hook(model, handle, batches):
    """Run the model on every batch of token ids up to the pre-hook `handle` (which ends the
    pass by raising _Stop), then remove the hook."""
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()


def capture_layer_inputs(model, layers, batches):
    """Run the model up to its first decoder layer for every batch of token ids:
    ([hidden states], [kwargs]) as the first layer receives them."""
    inputs, kwargs_list = [], []

    def hook(mod, args, kwargs):
        if args:
            h, rest = args[0], args[1:]
            if rest:
                raise CalibrationError("decoder layer takes extra positional arguments")
        else:
            h = kwargs.pop("hidden_states")
        inputs.append(h.detach())
        kwargs_list.append(dict(kwargs))
        raise _Stop

    _run_to_hook(model, layers[0].register_forward_pre_hook(hook, with_kwargs=True), batches)
    if len(inputs) != len(batches):
        raise CalibrationError("the first decoder layer was not reached")
    return inputs, kwargs_list


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_layer(layer, inputs, kwargs_list):
    with torch.no_grad():
        return [_layer_out(layer(h, **kw)).detach() for h, kw in zip(inputs, kwargs_list)]


def input_key(x):
    """What identifies one input tensor among a forward's linears: linears whose inputs have
    the same key read the same tensor (while it is held alive, so that its address is not
    reused)."""
    return x.data_ptr(), tuple(x.shape), x.stride()


def collect_layer_stats(layer, names, inputs, kwargs_list, sample_rows, hessian=False,
                        stop_after=None):
    """Run `layer` on all inputs with hooks on the linears `names`. Returns
    ({name: LayerStats}, [[names sharing one input] in call order]). With stop_after set (a
    set of names), the pass ends as soon as all of them have seen their input."""
    mods = dict(layer.named_modules())
    accs: Dict[str, StatsAccumulator] = {}
    leader: Dict[str, str] = {}          # linear name -> name owning its accumulator
    order: List[str] = []                # first-call order of linears
    state = {"seen": {}, "called": set()}

    def make_hook(name):
        def hook(mod, args):
            x = args[0]
            key = input_key(x)
            seen = state["seen"]
            if name not in leader:
                if key in seen:
                    leader[name] = seen[key][0]
                else:
                    leader[name] = name
                    accs[name] = StatsAccumulator(x.shape[-1], sample_rows, hessian, x.device)
                order.append(name)
            if leader[name] == name:
                accs[name].add(x)
                # Hold the tensor for the rest of the pass: once freed, its address could be
                # reused by another linear's input, which would then look shared.
                seen[key] = (name, x)
            state["called"].add(name)
            if stop_after is not None and stop_after <= state["called"]:
                raise _Stop
        return hook

    handles = [mods[n].register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        with torch.no_grad():
            for h, kw in zip(inputs, kwargs_list):
                state["seen"] = {}
                state["called"] = set()
                try:
                    layer(h, **kw)
                except _Stop:
                    pass
    finally:
        for hd in handles:
            hd.remove()
    missing = [n for n in names if n not in leader]
    if missing:
        raise CalibrationError(f"linears never called during calibration: {missing}")
    results = {n: accs[n].result() for n in accs}
    stats = {n: results[leader[n]] for n in names}
    groups: List[List[str]] = []
    for n in order:
        if leader[n] == n:
            groups.append([n])
        else:
            next(g for g in groups if g[0] == leader[n]).append(n)
    return stats, groups


def set_submodule(root, name, new):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _replace_group(layer, lp, group, stats, quantize_fn, fuse):
    """Replace the linears of one group (names relative to `layer`, sharing one input):
    each by quantize_fn's module, or with fuse, all by one module of their rows when they
    are children of one module. Returns their full names."""
    from .fusion import fuse_siblings, fused_name, sibling_parent

    parent_name = sibling_parent(group)
    if fuse and parent_name is not None:
        parent = layer.get_submodule(parent_name)
        children = [n.rpartition(".")[2] for n in group]
        name = ".".join(filter(None, (lp, parent_name, fused_name(children))))
        fuse_siblings(parent, children, quantize_fn(
            name, [getattr(parent, c) for c in children], stats[group[0]],
            members=[f"{lp}.{n}" for n in group]))
    else:
        for n in group:
            set_submodule(layer, n, quantize_fn(f"{lp}.{n}", layer.get_submodule(n), stats[n]))
    return {f"{lp}.{n}" for n in group}


def calibrate_and_replace(model, batches, quantize_fn: Callable, targets, *, sequential=True,
                          sample_rows=256, hessian=False, seed=0, progress=True,
                          fuse=False, log: Optional[Callable] = None):
    """Layer-by-layer calibration and replacement.

    batches: list of (b, t) token-id tensors on the model's device.
    quantize_fn(full_name, linear, stats) -> new module; for a fused group,
    quantize_fn(fused full name, [the siblings' linears], stats, members=[their full names])
    -> one module of their rows.
    targets: set of full module names (linears) to quantize; linears of a decoder layer that
    are not targets are left alone. A target outside the decoder layers (e.g. lm_head) is
    calibrated afterwards with one forward pass of the quantized model."""
    from tqdm.auto import tqdm

    prefix, layers = find_decoder_layers(model)
    total_rows = sum(b.numel() for b in batches)
    rows_idx = sample_row_indices(total_rows, sample_rows, seed)
    t0 = time.time()
    inputs, kwargs_list = capture_layer_inputs(model, layers, batches)
    done = set()
    group_cache = {}
    bar = tqdm(range(len(layers)), desc="calibrate+quantize", unit="layer", disable=not progress)
    for i in bar:
        layer = layers[i]
        lp = f"{prefix}.{i}" if prefix else str(i)
        names = [n for n in linear_names(layer) if f"{lp}.{n}" in targets]
        next_inputs = None   # the quantized layer's outputs, unless set to the full-precision's
        if names:
            if sequential:
                # A probe on one batch finds the groups (linears sharing one input) in call
                # order; each group is then calibrated with a pass that stops at its input.
                # (Layers with the same linears share the probe's answer.)
                key = tuple(names)
                if key not in group_cache:
                    group_cache[key] = collect_layer_stats(layer, names, inputs[:1],
                                                           kwargs_list[:1], rows_idx[:0], False)[1]
                groups = group_cache[key]
                for group in groups:
                    stats, _ = collect_layer_stats(layer, group, inputs, kwargs_list, rows_idx,
                                                   hessian, stop_after=set(group))
                    done |= _replace_group(layer, lp, group, stats, quantize_fn, fuse)
            else:
                # Every statistic from the full-precision model: the next layer's inputs
                # are this layer's outputs before it is quantized.
                stats, groups = collect_layer_stats(layer, names, inputs, kwargs_list, rows_idx,
                                                    hessian)
                next_inputs = run_layer(layer, inputs, kwargs_list)
                for group in groups:
                    done |= _replace_group(layer, lp, group, stats, quantize_fn, fuse)
        if next_inputs is None:
            from .evaluate import materialized

            with materialized(layer):   # dequantize each weight once, not once per batch
                next_inputs = run_layer(layer, inputs, kwargs_list)
        inputs = next_inputs
        bar.set_postfix(quantized=len(done))
    del inputs
    rest = sorted(t for t in targets if t not in done)
    for name in rest:  # e.g. lm_head: its input is the final norm's output
        mod = model.get_submodule(name)
        stats, _ = _module_input_stats(model, name, mod, batches, rows_idx, hessian)
        set_submodule(model, name, quantize_fn(name, mod, stats))
        done.add(name)
    if log:
        log(f"calibrated and quantized {len(done)} linears in {time.time() - t0:.1f} s")
    return done


def _module_input_stats(model, name, mod, batches, rows_idx, hessian):
    acc = {}

    def hook(m, args):
        x = args[0]
        if "a" not in acc:
            acc["a"] = StatsAccumulator(x.shape[-1], rows_idx, hessian, x.device)
        acc["a"].add(x)
        raise _Stop

    _run_to_hook(model, mod.register_forward_pre_hook(hook), batches)
    if "a" not in acc:
        raise CalibrationError(f"{name} was never called during calibration")
    return acc["a"].result(), None
