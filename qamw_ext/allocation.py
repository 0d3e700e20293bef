"""Bit allocation: each layer's bits per pair from its measured sensitivity, so that the model
as a whole stores no more bits than the uniform config it replaces.

Sensitivity is the loss increase a layer's rounding error is predicted to cause. For a linear
with outputs y (one row per token) and output error dy, a second-order expansion of the
next-token loss with the empirical Fisher diagonal gives

    cost(layer, bits) = sum_o F_o * E_t[dy_to^2],   F_o = E_t[(dL / dy_to)^2],

F measured by one backward pass of the full-precision model over the calibration set, dy on
the calibration sample rows with the layer quantized at each candidate width (plain
rounding, at a fixed alpha: allocation ranks layers, it does not have to be the final
quantization). The allocation minimises the summed cost under the bit budget of the uniform
config (the exact storage of every layer, scales included) by greedy upgrades in order of
cost saved per bit; with costs convex in the bits, as they are here (each extra bit per pair
halves a codebook's distortion, roughly), greedy is optimal up to the last upgrade.

With fused siblings (fuse_siblings=True: q/k/v, gate/up quantized as one layer, one width),
each group of siblings is one unit of the allocation: its cost and storage at a width are the
sums of its members' (they read the same input, so with the fixed alpha their channel scales
are the same), and all members get the unit's width.
"""
import time

import torch

from .calibration import StatsAccumulator, input_key, sample_row_indices

SPREAD = 2        # candidate widths: the uniform width +- this many bits per pair
ALPHA = 0.5       # channel-scale exponent used to measure costs (most layers choose it)


def _fisher_and_stats(model, names, batches, sample_rows, seed):
    """({name: F (out,) fp32}, {name: LayerStats}, [[names reading one input tensor]]) of the
    full-precision model, in one forward and backward pass per batch (the next-token loss on
    the calibration text)."""
    total_rows = sum(b.numel() for b in batches)
    rows_idx = sample_row_indices(total_rows, sample_rows, seed)
    mods = {n: model.get_submodule(n) for n in names}
    accs = {n: StatsAccumulator(m.in_features, rows_idx, False, "cpu") for n, m in mods.items()}
    fisher = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    tokens = 0
    # first batch: input key -> (the input, held so that its address is not reused, [names])
    inputs, groups = {}, []

    def make_hook(name):
        def hook(mod, args, out):
            x = args[0]
            if tokens == 0:
                inputs.setdefault(input_key(x), (x, []))[1].append(name)
            accs[name].add(x.detach().cpu())

            def grad_hook(g, name=name):
                g = g.detach().reshape(-1, g.shape[-1]).to(torch.float64)
                fisher[name] += (g * g).sum(0).cpu()
            out.register_hook(grad_hook)
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in mods.items()]
    embed = model.get_input_embeddings()
    try:
        with torch.enable_grad():
            for ids in batches:
                emb = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits
                # Summed (not averaged) so F is per token: E_t[g^2] = fisher / tokens.
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    ids[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                if tokens == 0:
                    groups = [members for _, members in inputs.values()]
                    inputs.clear()
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    fisher = {n: (f / tokens).to(torch.float32) for n, f in fisher.items()}
    return fisher, {n: a.result() for n, a in accs.items()}, groups


def candidate_bits(bits, lo=4, hi=12):
    return list(range(max(lo, bits - SPREAD), min(hi, bits + SPREAD) + 1))


def layer_costs(model, names, fisher, stats, cls, options, candidates):
    """{name: {bits: (cost, storage bits of the layer)}}."""
    opts = dict(options, alpha=options.get("alpha", ALPHA), error_feedback=False,
                ef_search=False)
    if opts["alpha"] == "search":
        opts["alpha"] = ALPHA
    costs = {}
    for name in names:
        lin = model.get_submodule(name)
        w = lin.weight.detach().to(torch.float32)
        st = stats[name]
        x = st.sample.to(w.device)
        f = fisher[name].to(w.device)
        costs[name] = {}
        for b in candidates:
            q = cls.from_linear(lin, st, **dict(opts, bits=b))
            dy = x @ (w - q.dequantize()).T
            cost = float(((dy * dy).mean(0) * f).sum())
            costs[name][b] = (cost, q.bits_per_weight() * w.numel())
    return costs


def allocate(costs, budget):
    """{name: bits} minimising the summed cost with summed storage <= budget (bits). Starts
    every layer at its narrowest candidate and upgrades, one width at a time, the layer
    with the largest cost saved per bit spent that still fits."""
    choice = {n: min(c) for n, c in costs.items()}
    spent = sum(costs[n][b][1] for n, b in choice.items())
    if spent > budget:
        raise ValueError(f"the bit budget {budget:.0f} is below the narrowest allocation "
                         f"({spent:.0f} bits)")
    while True:
        best, best_rate = None, 0.0
        for n, b in choice.items():
            if b + 1 not in costs[n]:
                continue
            (c0, s0), (c1, s1) = costs[n][b], costs[n][b + 1]
            extra = s1 - s0
            if spent + extra > budget:
                continue
            rate = (c0 - c1) / extra if extra > 0 else float("inf")
            if rate > best_rate:   # an upgrade that saves nothing is not worth its bits
                best, best_rate = n, rate
        if best is None:
            return choice
        b = choice[best]
        spent += costs[best][b + 1][1] - costs[best][b][1]
        choice[best] = b + 1


def joint_costs(costs, groups):
    """The costs of `layer_costs` with each group of names (at least two) merged into one
    unit named by its first member: summed cost and storage at every width."""
    merged = dict(costs)
    for group in groups:
        for n in group:
            del merged[n]
        merged[group[0]] = {b: tuple(sum(costs[n][b][i] for n in group) for i in (0, 1))
                            for b in costs[group[0]]}
    return merged


def plan(model, names, cls, options, batches, *, sample_rows=256, seed=0, fuse=False,
         log=None):
    """Allocate bits per pair to the linears `names` of the full-precision `model` so that
    their total storage is at most that of options["bits"] everywhere; with fuse, one width
    for each group of siblings that calibration will fuse (qamw_ext.fusion). Returns
    ({name: bits}, report dict)."""
    from .fusion import sibling_parent

    if "bits" not in options:
        raise ValueError("bit allocation needs the config's average width: options['bits']")
    t0 = time.time()
    was_training = model.training
    model.eval()
    fisher, stats, groups = _fisher_and_stats(model, names, batches, sample_rows, seed)
    groups = [g for g in groups if fuse and sibling_parent(g) is not None]
    t1 = time.time()
    bits = options["bits"]
    candidates = candidate_bits(bits)
    costs = layer_costs(model, names, fisher, stats, cls, options, candidates)
    budget = sum(c[bits][1] for c in costs.values())
    choice = allocate(joint_costs(costs, groups), budget)
    for group in groups:
        choice.update({n: choice[group[0]] for n in group})
    model.train(was_training)
    spent = sum(costs[n][b][1] for n, b in choice.items())
    numel = sum(model.get_submodule(n).weight.numel() for n in names)
    uniform_cost = sum(c[bits][0] for c in costs.values())
    report = {
        "uniform_bits": bits, "candidates": candidates,
        "bits": choice,
        "histogram": {b: sum(1 for v in choice.values() if v == b) for b in candidates},
        "fused_groups": groups,
        "budget_bits_per_weight": budget / numel, "bits_per_weight": spent / numel,
        "predicted_cost": sum(costs[n][b][0] for n, b in choice.items()),
        "predicted_cost_uniform": uniform_cost,
        "fisher_seconds": t1 - t0, "seconds": time.time() - t0,
    }
    if log:
        log(f"[qamw] bit allocation: {report['histogram']} (bits per pair: layers), "
            f"predicted cost {report['predicted_cost']:.4g} vs uniform {uniform_cost:.4g}, "
            f"{report['seconds']:.1f} s")
    return choice, report
