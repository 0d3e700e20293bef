"""Sibling fusion: linears that read the same input (q/k/v; gate/up) become one layer whose
rows are theirs, in order, so that a decode step runs one GEMV where it ran two or three: one
launch and one pass over the weights. A quantized fused layer (QuantizedLinear.fuse) keeps
each sibling's per-layer parameters, and its kernels give each sibling's rows their own
(sibling_rows of the GEMV ops), so fusing changes no output.

`fuse_siblings(parent, names, layer)` registers `layer` on `parent` as `fused_name(names)` and
replaces each sibling by a FusedSlice, a view of its rows of the layer's output. The model's
own forward is unchanged: it still calls q_proj(x), k_proj(x) and v_proj(x). The first of
these runs the fused layer; the others, called with the same input tensor, take their slice of
that output. `sibling_outputs(parent, names, x)` is the functional form, for code that is
compiled (the step of benchmarks/bench_decode.py)."""
import weakref

import torch


def sibling_parent(names):
    """The name of the module whose children `names` (full or relative names, sharing one
    input) are, when there are at least two of them and one parent: the groups that fuse.
    None otherwise."""
    parents = {n.rpartition(".")[0] for n in names}
    return parents.pop() if len(names) > 1 and len(parents) == 1 else None


def fused_name(names):
    """The attribute name of the fused layer of sibling linears: q_proj, k_proj, v_proj ->
    q_k_v_proj; gate_proj, up_proj -> gate_up_proj."""
    stems = [n.removesuffix("_proj") for n in names]
    return "_".join(stems) + ("_proj" if any(n.endswith("_proj") for n in names) else "")


class _Group:
    """The fused layer and its last output, held until every sibling has taken its slice.
    Not a Module, so that the layer is registered once (on the parent), not once per
    sibling."""

    def __init__(self, layer, sizes):
        self.layer = layer
        self.sizes = list(sizes)
        self._clear()

    def _clear(self):
        self.input, self.version, self.outputs, self.taken = None, None, None, set()

    def output(self, index, x):
        # Recompute when the input is another tensor (or was changed in place), or when this
        # sibling has already taken its slice of the pending output.
        version = _version(x)
        if (self.input is None or self.input() is not x or version != self.version
                or index in self.taken):
            self.outputs = list(self.layer(x).split(self.sizes, dim=-1))
            self.input, self.version, self.taken = weakref.ref(x), version, set()
        out = self.outputs[index]
        self.outputs[index] = None
        self.taken.add(index)
        if len(self.taken) == len(self.sizes):
            self._clear()
        return out


def _version(x):
    try:
        return x._version
    except RuntimeError:   # inference-mode tensors keep no version counter
        return None


class FusedSlice(torch.nn.Module):
    """Sibling `index` of a fused layer: its out_features rows of the fused output."""

    def __init__(self, group, index):
        super().__init__()
        self.group = group
        self.index = index
        self.in_features = group.layer.in_features
        self.out_features = group.sizes[index]

    @property
    def layer(self):
        return self.group.layer

    @torch.compiler.disable   # the shared output is Python state; compiled code uses
    def forward(self, x):     # sibling_outputs
        return self.group.output(self.index, x)

    def extra_repr(self):
        offset = sum(self.group.sizes[:self.index])
        return (f"rows {offset}:{offset + self.out_features} of a fused layer of "
                f"{len(self.group.sizes)}")


def fuse_siblings(parent, names, layer):
    """Register `layer` (in_features -> the sum of the siblings' out_features) on `parent`
    as fused_name(names) and replace the children `names` by FusedSlice views of it.
    Returns the fused layer's attribute name."""
    olds = [getattr(parent, n) for n in names]
    sizes = [m.out_features for m in olds]
    if any(m.in_features != layer.in_features for m in olds) or sum(sizes) != layer.out_features:
        raise ValueError(f"cannot fuse {names} ({[(m.in_features, m.out_features) for m in olds]})"
                         f" into a layer of {layer.in_features} -> {layer.out_features}")
    attr = fused_name(names)
    parent.add_module(attr, layer)
    group = _Group(layer, sizes)
    for i, n in enumerate(names):
        setattr(parent, n, FusedSlice(group, i))
    return attr


def concatenated_linear(linears):
    """One nn.Linear whose rows (and bias) are those of `linears`, in order."""
    first = linears[0]
    has_bias = [m.bias is not None for m in linears]
    out = torch.nn.Linear(first.in_features, sum(m.out_features for m in linears),
                          bias=any(has_bias), device=first.weight.device,
                          dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in linears]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([m.bias if m.bias is not None else
                                      torch.zeros_like(m.weight[:, 0]) for m in linears]))
    return out


def fused_groups(model):
    """{full name of a fused layer: [full names of its siblings, in row order]}."""
    names = {id(m): n for n, m in model.named_modules()}
    groups = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FusedSlice):
            siblings = groups.setdefault(names[id(mod.layer)], [None] * len(mod.group.sizes))
            siblings[mod.index] = name
    return groups


def sibling_outputs(parent, names, x):
    """The outputs of the children `names` of `parent` on input x: one call of their fused
    layer when they are its siblings in row order, else one call each."""
    mods = [getattr(parent, n) for n in names]
    if (all(isinstance(m, FusedSlice) for m in mods) and
            all(m.group is mods[0].group and m.index == i for i, m in enumerate(mods)) and
            len(mods) == len(mods[0].group.sizes)):
        return tuple(mods[0].layer(x).split(mods[0].group.sizes, dim=-1))
    return tuple(m(x) for m in mods)


def fuse_quantized(model, input_ids=None):
    """Fuse the sibling layers of an already quantized model: the quantized linears of one
    module that read the same input (found by one forward of `input_ids`, default two
    tokens) become one layer (QuantizedLinear.fuse), as a conversion with
    fuse_siblings=True would have made them. Exact: outputs do not change. Returns
    ({fused layer name: [sibling names]}, {sibling names joined by ", ": why a group was
    left as it was}): a codec without per-layer buffers (rtn, nf4: fuse it at conversion),
    or siblings of different options (bits)."""
    from .calibration import input_key
    from .quantized_linear import QuantizedLinear

    owned = {id(m.layer) for m in model.modules() if isinstance(m, FusedSlice)}
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, QuantizedLinear) and id(m) not in owned}
    # input key -> (the input, held alive so that its address is not reused; [names in call
    # order]), for each linear's first call
    seen, called = {}, set()

    def hook(name):
        def record(mod, args):
            if name not in called:
                called.add(name)
                seen.setdefault(input_key(args[0]), (args[0], []))[1].append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids if input_ids is not None else
                  torch.zeros(1, 2, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    fused, skipped = {}, {}
    for _, names in seen.values():
        parent_name = sibling_parent(names)
        if parent_name is None:
            continue
        mods = [layers[n] for n in names]
        try:
            if len({type(m) for m in mods}) > 1:
                raise ValueError("different codecs")
            layer = type(mods[0]).fuse(mods)
        except ValueError as e:
            skipped[", ".join(names)] = str(e)
            continue
        children = [n.rpartition(".")[2] for n in names]
        attr = fuse_siblings(model.get_submodule(parent_name), children, layer)
        fused[".".join(filter(None, (parent_name, attr)))] = names
    if fused and getattr(model, "qamw_config", None) is not None:
        model.qamw_config.fuse_siblings = True
    return fused, skipped
