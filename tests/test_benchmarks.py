"""The GPU benchmarks' logic, run here on the CPU with tiny shapes (their --smoke modes): a GPU
run of scripts/gpu_check.sh gets one try, so its JSON, byte counts and ratios are checked
before it. Also the decode benchmark's step against the transformers Llama forward, that
the benchmarked model shapes suit every codec without padding, and the shared-memory bank
model behind the GPU predictions."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
sys.path.insert(0, BENCHMARKS)
import bench_decode  # noqa: E402
import bench_ops  # noqa: E402
import profile_gemv  # noqa: E402
import quality  # noqa: E402
import quality_fusion  # noqa: E402
import sass_loops  # noqa: E402
import smem_wavefronts  # noqa: E402
from random_layers import CODECS  # noqa: E402

from qamw_ext.convert import codec_class  # noqa: E402


def positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_ops_smoke_writes_every_figure(tmp_path, one_thread):
    out = tmp_path / "ops.json"
    bench_ops.main(["--smoke", "--out", str(out)])
    record = json.loads(out.read_text())
    for key in ("command", "date", "torch", "device", "settings", "copy", "results", "targets"):
        assert key in record
    assert record["command"].endswith("benchmarks/bench_ops.py --smoke --out " + str(out))
    assert positive(record["copy"]["gbps"])
    s = bench_ops.SMOKE
    gemv = [r for r in record["results"] if r["op"] == "gemv"]
    assert len(gemv) == (len(s["gemv_shapes"]) * len(s["dtypes"]) * len(s["batches"])
                         * len(bench_ops.GEMV_CODECS))
    for r in gemv:
        for key in ("ms", "gbps", "frac_of_copy", "dense_linear_ms", "dense_gbps",
                    "speedup_vs_dense", "bits_per_weight"):
            assert positive(r[key]), (key, r)
        assert r["copies"] >= 2 and r["dense_copies"] >= 2
        assert ("no_pdl_ms" in r) == (r["batch"] == 1)   # timed with and without PDL
        if r["batch"] == 1:
            assert positive(r["no_pdl_ms"]) and positive(r["pdl_speedup"])
        # QAM-W and AAAC are timed with both kernel families: the other is CUDA cores from
        # the batch where tensor cores become the default
        assert ("other_kernel" in r) == (r["codec"] in bench_ops.MMA_CODECS)
        if "other_kernel" in r:
            below = r["batch"] < bench_ops.MMA_FROM_BATCH.get(r["codec"], 2)
            assert r["other_kernel"] == ("tensor cores" if below else "CUDA cores")
            assert positive(r["other_kernel_ms"]) and positive(r["other_kernel_speedup_vs_dense"])
        # The default kernel also with codewords that are not bf16 values (not AAAC at batch
        # 1, whose CUDA-core kernel decodes both alike)
        timed = r["codec"] in bench_ops.BF16_CODEWORD_CODECS and (
            r["batch"] > 1 or r["codec"].startswith("qamw"))
        assert ("fp32_codewords_ms" in r) == timed
        if timed:
            assert positive(r["fp32_codewords_ms"])
            assert r["bf16_codewords_speedup"] == pytest.approx(r["fp32_codewords_ms"] / r["ms"])
        # QAM-W's batch 1 on tensor cores, in clusters, alone, and rotated once
        assert ("mma_cluster_ms" in r) == (r["batch"] == 1 and r["codec"].startswith("qamw"))
        if "mma_cluster_ms" in r:
            for key in ("mma_alone_ms", "cluster_speedup", "mma_rotate_once_ms",
                        "cluster_vs_rotate_once"):
                assert positive(r[key]), (key, r)
            on_mma = r["other_kernel"] == "CUDA cores"   # tensor cores by default
            assert r["mma_cluster_ms"] == (r["ms"] if on_mma else r["other_kernel_ms"])
        m, n = r["shape"]
        io = r["batch"] * (m + n) * 2     # fp16 / bf16 activation and output
        assert r["dense_bytes"] == m * n * 2 + io
        if r["codec"].startswith("qamw"):
            bits = CODECS[r["codec"]]["bits"]
            # codes, fp32 row and channel scales, fp32 codebook, int8 signs
            assert r["bytes"] == m * n // 2 * bits // 8 + 4 * m + 4 * n + 8 * 2 ** bits + n + io
        elif r["codec"] == "aaac-int4":   # codes, fp16 scales per 128, two fp32 codebooks
            assert r["bytes"] == m * n // 2 + 2 * m * n // 128 + 128 + io
    hadamard = [r for r in record["results"] if r["op"] == "hadamard"]
    assert len(hadamard) == len(s["dtypes"]) * len(s["hadamard_blocks"])
    for r in hadamard:
        assert r["shape"][1] % r["block"] == 0
        for key in ("ms", "clone_ms", "time_vs_clone", "gbps"):
            assert positive(r[key]), (key, r)
    assert [t["target"] for t in record["targets"]][0].startswith("GEMV batch 1")
    assert all(0 <= t["met"] <= t["of"] and t["of"] > 0 for t in record["targets"])
    table = (tmp_path / "ops.md").read_text()
    for heading in ("## GEMV, batch 1", "without programmatic dependent launch",
                    "## GEMV, batches > 1", "## GEMV: tensor-core and CUDA-core kernels",
                    "where the activation is rotated",
                    "## Block Hadamard", "## Targets"):
        assert heading in table


def test_cpu_gemv_benchmark_rotates_over_copies_beyond_the_cache(monkeypatch):
    seen = []
    call = bench_ops.cycle_calls(seen.append, ["a", "b", "c"])
    for _ in range(7):
        call()
    assert seen == ["a", "b", "c", "a", "b", "c", "a"]

    assert bench_ops.cpu_rotation_bytes() >= 64 << 20
    rotation = 1 << 20   # small shapes: a small rotation, to keep the copies few
    monkeypatch.setattr(bench_ops, "cpu_rotation_bytes", lambda: rotation)
    monkeypatch.setattr(bench_ops, "timeit",
                        lambda fn, device, min_time: [fn() for _ in range(2)] and 1e-3)
    rows = bench_ops.bench_gemv("cpu", 256, 512, torch.float32)
    assert len(rows) == 4 * 5
    for r in rows:
        codes_and_scales = r["bits_per_weight"] * 256 * 512 / 8   # a copy holds its codebooks too
        assert r["copies"] >= 2 and r["copies"] * codes_and_scales >= 0.8 * rotation, r
        assert r["dense_copies"] * 256 * 512 * 4 >= rotation, r
        assert r["speedup_vs_dense"] == 1.0, r


def test_paired_times_takes_the_median_of_per_round_ratios(monkeypatch):
    # Rounds of (baseline, timed): ratios 5, 1, 3, 1, 3 (median 3), where the ratio of the
    # medians would be 3 / 2.
    times = iter([10.0, 2.0, 1.0, 1.0, 3.0, 1.0, 2.0, 2.0, 9.0, 3.0])
    monkeypatch.setattr(bench_ops, "timeit", lambda fn, device, min_time: next(times))
    baseline, timed, ratio = bench_ops.paired_times(None, None, "cpu")
    assert (baseline, timed, ratio) == (3.0, 2.0, 3.0)


def test_bench_ops_compares_a_hadamard_transform_and_its_agreement(monkeypatch, tmp_path):
    """The Dao FHT columns with stand-ins for it: the dense Sylvester-order product agrees with
    ops.hadamard; a transform in another order is timed but flagged by its difference; a source
    that does not build leaves the reason in the record and the suite goes on."""
    from scipy.linalg import hadamard as sylvester

    def dense(x, scale):
        return x @ torch.from_numpy(sylvester(x.shape[-1])).to(x) * scale

    def reversed_order(x, scale):
        return dense(x, scale).flip(-1)

    s = dict(bench_ops.SMOKE)
    rows = {name: bench_ops.bench_hadamard_suite(torch.float32, 128, "cpu", s, 1.0, fn)
            for name, fn in (("dense", dense), ("reversed", reversed_order))}
    for r in rows.values():
        assert positive(r["dao_fht_ms"]) and positive(r["time_vs_dao_fht"])
    assert rows["dense"]["dao_fht_difference"] < 1e-5
    assert rows["reversed"]["dao_fht_difference"] > 0.5

    dao, error = bench_ops.dao_hadamard_transform(str(tmp_path))
    assert dao is None and "not a fast-hadamard-transform checkout" in error
    out = tmp_path / "ops.json"
    monkeypatch.setitem(bench_ops.SMOKE, "gemv_shapes", [])
    bench_ops.main(["--smoke", "--dao-fht-src", str(tmp_path), "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["dao_fast_hadamard_transform"] is False
    assert "checkout" in record["dao_fht_error"] and "checkout" in (tmp_path / "ops.md").read_text()


def test_bench_ops_dtypes_and_hadamard_blocks_narrow_the_suite(tmp_path, one_thread):
    out = tmp_path / "ops.json"
    bench_ops.main(["--smoke", "--dtypes", "fp16", "--hadamard-blocks", "none",
                    "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert {r["dtype"] for r in results if r["op"] == "gemv"} == {"torch.float16"}
    assert not [r for r in results if r["op"] == "hadamard"]
    bench_ops.main(["--smoke", "--dtypes", "bf16", "--hadamard-blocks", "256",
                    "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["block"] for r in results if r["op"] == "hadamard"] == [256]
    with pytest.raises(SystemExit):
        bench_ops.main(["--smoke", "--dtypes", "fp8"])


def test_bench_decode_smoke_writes_every_figure(tmp_path, one_thread):
    out = tmp_path / "decode.json"
    bench_decode.main(["--smoke", "--out", str(out)])
    record = json.loads(out.read_text())
    for key in ("command", "date", "torch", "transformers", "device", "model", "copy",
                "results"):
        assert key in record
    rows = {r["config"]: r for r in record["results"]}
    assert list(rows) == bench_decode.DEFAULT_CONFIGS.split(",")
    shape = bench_decode.SHAPES["tiny"]
    hidden, inter, layers = (shape["hidden_size"], shape["intermediate_size"],
                             shape["num_hidden_layers"])
    kv_dim = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linear_weights = layers * (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter)
    for name, r in rows.items():
        assert "error" not in r, r
        for key in ("tokens_per_s", "ms_per_token", "implied_gbps", "frac_of_copy",
                    "speedup_vs_bf16", "decoder_linears_ms_per_token"):
            assert positive(r[key]), (key, r)
        assert r["bytes_per_token"] == sum(r["bytes"].values())
        assert r["head"] == ("qamw-5.5" if "+head" in name else None)
        if not r["head"]:
            assert r["bytes"]["lm_head"] == shape["vocab_size"] * hidden * 2
        else:   # 5.5 bpw codes, the per-row scales, the 2^11-entry codebook and signs
            assert r["bytes"]["lm_head"] < 0.4 * shape["vocab_size"] * hidden * 2
        fused = "+fused" in name
        assert r["fused"] is fused
        if name.startswith("bf16"):
            assert r["bytes"]["linears"] == 2 * linear_weights
        else:
            # fused: q/k/v as one layer, gate/up as one
            per_layer, hidden_inputs = (4, 3) if fused else (7, 6)
            assert r["quantized_linears"] == per_layer * layers + bool(r["head"])
            assert r["padded_linears"] == 0
            # Read but not stored: QAM-W's shared codebook and seed-derived signs, per linear.
            unstored = 0
            if name.startswith("qamw"):
                bits = CODECS[name.split("+")[0]]["bits"]
                unstored = layers * (per_layer * 8 * 2 ** bits + hidden_inputs * hidden + inter)
            if not r["head"]:   # (bits_per_weight then averages over lm_head too)
                assert r["bytes"]["linears"] == pytest.approx(
                    r["bits_per_weight"] * linear_weights / 8 + unstored, rel=1e-3)
    assert rows["qamw-4"]["bits_per_weight"] < rows["qamw-5.5"]["bits_per_weight"]
    with_head = rows["qamw-4+fused+head=qamw-5.5"]
    assert with_head["bytes"]["linears"] == rows["qamw-4+fused"]["bytes"]["linears"]
    assert with_head["bytes"]["lm_head"] > rows["qamw-4+fused"]["bytes"]["lm_head"] * 5.5 / 16
    assert bench_decode.parse_config("aaac-int4+head+fused") == (
        "aaac-int4", {"fused": True, "head": "aaac-int4", "pdl": True, "glue_pdl": False,
                      "mma": False, "clusters": True, "rotate_once": False})
    assert bench_decode.parse_config("qamw-4+fused+nopdl+gluepdl+mma+alone+once") == (
        "qamw-4", {"fused": True, "head": None, "pdl": False, "glue_pdl": True, "mma": True,
                   "clusters": False, "rotate_once": True})
    for bad in ("bf16+head", "qamw-4+head=bf16", "qamw-4+fast", "int4", "qamw-4+fused=1",
                "qamw-4+nopdl=1", "qamw-4+mma=1", "qamw-4+alone=1", "qamw-4+once=1"):
        with pytest.raises(ValueError, match="unknown config"):
            bench_decode.parse_config(bad)
    assert "| qamw-4 |" in (tmp_path / "decode.md").read_text()


def test_decode_step_matches_the_llama_forward(one_thread):
    torch.manual_seed(0)
    model = bench_decode.build_model("tiny", "cpu", torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
        decoder = bench_decode.StaticDecoder(model, max_len=16)
        decoder.reset()
        steps = []
        for token in ids[0]:
            decoder.token.fill_(int(token))   # teacher forcing instead of the argmax
            steps.append(decoder.step())
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-4, atol=1e-4)
    assert int(decoder.pos) == ids.shape[1]


def test_fused_step_matches_the_unfused(one_thread):
    """A "+fused" config runs the same weights: q/k/v and gate/up as one layer each."""
    torch.manual_seed(0)
    model = bench_decode.build_model("tiny", "cpu", torch.float32)
    names = bench_decode.decoder_linear_names(model)
    dense_qkv = model.model.layers[1].self_attn.k_proj
    with torch.no_grad():
        decoder = bench_decode.StaticDecoder(model, max_len=8)
        decoder.reset()
        want = [decoder.step() for _ in range(3)]
        replaced = bench_decode.quantize_randomly(model, names, "bf16+fused", "cpu", None)
        assert len(bench_decode.step_linear_names(model)) == 4 * 2
        decoder.reset()
        got = [decoder.step() for _ in range(3)]
    bench_decode.restore(model, replaced)
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=1e-5, atol=1e-5)
    assert model.model.layers[1].self_attn.k_proj is dense_qkv
    assert not hasattr(model.model.layers[1].self_attn, "q_k_v_proj")
    assert bench_decode.step_linear_names(model) == names


@pytest.mark.parametrize("config", ["qamw-4", "qamw-4+fused"])
def test_compiled_layer_step_matches_eager_and_compiles_once(one_thread, config):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = bench_decode.build_model("tiny", "cpu", torch.float32)
    names = bench_decode.decoder_linear_names(model)
    bench_decode.quantize_randomly(model, names, config, "cpu", torch.Generator().manual_seed(1))
    if "+fused" in config:   # each sibling its own channel scale, as the conversion gives
        qkv = model.model.layers[0].self_attn.q_k_v_proj
        assert qkv.sibling_rows and qkv.channel_scale.shape[0] == 3
    torch.compiler.reset()
    counters.clear()
    with torch.no_grad():
        decoder = bench_decode.StaticDecoder(model, max_len=16, compile=True)
        diff, compile_s = bench_decode.compiled_vs_eager(model, decoder, steps=4)
    assert diff < 1e-4 and compile_s > 0
    # Both layers ran through one compiled graph: the qamw_ext ops traced without a break,
    # and the second layer's modules did not trigger a recompile.
    assert counters["stats"]["unique_graphs"] == 1
    assert int(decoder.pos) == 4


def test_bench_decode_compile_records_its_check(monkeypatch, tmp_path, one_thread):
    # One compile per code object: the second config compiles only if each decoder starts
    # from a clean Dynamo cache (the full run has 15 configs against a limit of 8).
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    out = tmp_path / "decode.json"
    bench_decode.main(["--smoke", "--compile", "--configs", "bf16,aaac-int4+gluepdl",
                       "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["config"] for r in rows] == ["bf16", "aaac-int4+gluepdl"]
    assert rows[1]["glue_pdl"] is True   # an option this torch.compile accepts
    for r in rows:
        assert r["compiled"] is True and positive(r["compile_s"]) and positive(r["tokens_per_s"])
        # bf16 logits of order 1: fused kernels round differently, by a few bf16 ulps.
        assert 0 <= r["compiled_vs_eager_max_abs_diff"] < 0.1
    assert "torch.compile" in (tmp_path / "decode.md").read_text()


def decode_rows_and_switch_seen(monkeypatch, tmp_path, configs, name):
    """bench_decode's rows for `configs`, and the value of os.environ[name] while each was
    timed."""
    seen = []
    time_decode = bench_decode.time_decode

    def spy(*args):
        seen.append(os.environ.get(name))
        return time_decode(*args)

    monkeypatch.setattr(bench_decode, "time_decode", spy)
    bench_decode.main(["--smoke", "--configs", configs, "--out", str(tmp_path / "decode.json")])
    return json.loads((tmp_path / "decode.json").read_text())["results"], seen


# A suffix's switch, set while the config is built, compiled and timed (the launchers read it at
# each launch), and the environment as it was afterwards: (configs, variable, its value before,
# its values seen while each config was timed, the row's flag, its value in each row).
SWITCHED_CONFIGS = [
    ("qamw-4+fused+mma,aaac-int4", "QAMW_GEMV_MMA", None, ["1", None], "mma", [True, False]),
    ("qamw-4+fused+alone,qamw-4", "QAMW_GEMV_CLUSTER", None, ["0", None], "clusters",
     [False, True]),
    ("qamw-4,qamw-4+fused+once", "QAMW_GEMV_ROTATE_ONCE", None, [None, "1"], "rotate_once",
     [False, True]),
    ("qamw-4,qamw-4+nopdl,aaac-int4", "QAMW_PDL", "1", ["1", "0", "1"], "pdl",
     [True, False, True]),
]


@pytest.mark.parametrize("configs,name,before,seen_want,flag,flags", SWITCHED_CONFIGS,
                         ids=["mma", "alone", "once", "nopdl"])
def test_bench_decode_suffix_switches_the_kernels(monkeypatch, tmp_path, one_thread, configs,
                                                  name, before, seen_want, flag, flags):
    """+mma: QAMW_GEMV_MMA=1 (tensor-core GEMVs); +alone: QAMW_GEMV_CLUSTER=0 (no clusters of
    CTAs); +once: QAMW_GEMV_ROTATE_ONCE=1 (the activation rotated by a kernel of its own);
    +nopdl: QAMW_PDL=0 (plain launches)."""
    if before is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, before)
    rows, seen = decode_rows_and_switch_seen(monkeypatch, tmp_path, configs, name)
    assert seen == seen_want and os.environ.get(name) == before
    assert [r[flag] for r in rows] == flags


@pytest.mark.parametrize("shape", ["llama3-8b", "llama2-7b"])
def test_benchmarked_shapes_suit_every_codec(shape):
    dims = bench_decode.SHAPES[shape]
    for n in (dims["hidden_size"], dims["intermediate_size"]):
        for codec, meta in CODECS.items():
            layer = codec_class(meta["method"]).from_meta(
                dict(meta, in_features=n, out_features=1, bias=False))
            assert layer.padded_in == n, (shape, codec, n)


def test_bank_model_counts_conflicts_and_broadcasts():
    rng = np.random.default_rng(1)
    # 16 copies: each half-warp lane on its own bank pair, whatever the codes.
    assert smem_wavefronts.codebook_wavefronts(8, 16, 200, rng) == 2.0
    # 8 copies: lanes l and l + 8 collide on half of the codes; one copy: ~3x the minimum.
    assert 3.8 < smem_wavefronts.codebook_wavefronts(11, 8, 2000, rng) <= 4.0
    assert smem_wavefronts.codebook_wavefronts(8, 1, 2000, rng) > 5.0
    # half2 codewords: a warp is served at once, so 32 copies take one wavefront; with 16,
    # lanes l and l + 16 share a copy and its banks.
    assert smem_wavefronts.codebook_wavefronts(8, 32, 200, rng, entry_bytes=4) == 1.0
    assert smem_wavefronts.codebook_wavefronts(11, 16, 200, rng, entry_bytes=4) == 2.0
    # Every lane on one word: a broadcast, one wavefront per half-warp.
    assert smem_wavefronts.wavefronts([[0, 1]] * 32, 16) == 2
    # 16 lanes of a half-warp on one bank, different words: 16 wavefronts each.
    assert smem_wavefronts.wavefronts([[32 * lane] for lane in range(32)], 16) == 32
    # Staging and rotating a 4096-value row, blocks of 1024. v2: every pass of 8 values 1 or 8
    # apart conflicts (8 and 4 ways). v3: those bits are done in registers and shuffles, the
    # rotated stores and the passes from bit 5 up take the minimum (4096 * 4 bytes / 128 each).
    assert smem_wavefronts.rotation_wavefronts(4096, 1024, "v2") == 4096
    assert smem_wavefronts.staging_wavefronts(4096, swizzled=True) == 128
    assert smem_wavefronts.fwht_wavefronts(4096, 1024, first_bit=5) == 2 * 2 * 128
    assert smem_wavefronts.rotation_wavefronts(4096, 1024, "v3") == 640
    # The padded activation layouts are conflict-free: the minimum for 8- and 16-byte loads.
    assert smem_wavefronts.activation_wavefronts(16, 8) == 2
    assert smem_wavefronts.activation_wavefronts(16, 8, unit=64) == 2
    assert smem_wavefronts.activation_wavefronts(32, 16) == 4


def test_profile_gemv_smoke_calls_every_codec(one_thread):
    calls = profile_gemv.main(["--smoke", "--device", "cpu"])
    assert calls == [f"{codec} 64x256 batch 1" for codec in profile_gemv.CODECS]
    calls = profile_gemv.main(["--smoke", "--device", "cpu", "--batches", "1,16",
                               "--codecs", "qamw-4"])
    assert calls == ["qamw-4 64x256 batch 1", "qamw-4 64x256 batch 16"]
    with pytest.raises(SystemExit):
        profile_gemv.main(["--smoke", "--device", "cpu", "--codecs", "qamw-9"])


def test_quality_fusion_configs_resolve():
    from qamw_ext.convert import get_config

    cfgs = [get_config(c) for c in quality_fusion.configs()]
    assert len({c.label for c in cfgs}) == len(cfgs)
    assert sum(c.fuse_siblings for c in cfgs) == 4
    assert [c.layer_options for c in cfgs if c.include_lm_head] == [{}, {"lm_head": {"bits": 11}}]
    assert {c.options.get("seed", 0) for c in cfgs if c.method == "qamw"} == {0, 1}


def test_quality_script_records_a_complete_table(tmp_path):
    from conftest_pipeline import save_tiny

    save_tiny(str(tmp_path / "tiny"))
    quality.main(["--model", str(tmp_path / "tiny"), "--configs", "rtn-int4-g128;nf4",
                  "--eval-tokens", "256", "--window", "128", "--name", "q", "--out-dir",
                  str(tmp_path), "--no-progress"])
    record = json.loads((tmp_path / "q.json").read_text())
    assert record["complete"] is True and record["command"].endswith("--no-progress")
    assert [r["config"] for r in record["rows"]] == ["rtn-int4-g128", "nf4"]
    assert all(r["kl"] > 0 for r in record["rows"])
    assert "| nf4 |" in (tmp_path / "q.md").read_text()


# Three functions as cuobjdump -sass prints them: the first has an outer loop (0x0010-0x0070)
# around an inner one (0x0020-0x0050) that holds both HMMAs; the second has no HMMA; the third
# two loops one after the other, each with an HMMA, the first with two branches to its head.
SASS = """
        Function : kernel_a
        /*0000*/                   MOV R1, c[0x0][0x28] ;      /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDS.64 R8, [R6] ;
        /*0030*/                   HMMA.16816.F32.BF16 R12, R8, R4, R12 ;
        /*0040*/              @!P0 HMMA.16816.F32.BF16 R16, R8, R4, R16 ;
        /*0050*/               @P1 BRA 0x20 ;
        /*0060*/                   PRMT R7, R5, 0x4440, RZ ;
        /*0070*/                   BRA 0x10 ;
        /*0080*/                   EXIT ;
        Function : kernel_b
        /*0000*/                   LDS R8, [R6] ;
        /*0010*/                   BRA 0x0 ;
        Function : kernel_c
        /*0000*/                   LDS R8, [R6] ;
        /*0010*/               @P0 BRA 0x0 ;
        /*0020*/                   HMMA.16816.F32.BF16 R12, R8, R4, R12 ;
        /*0030*/               @P1 BRA 0x0 ;
        /*0040*/                   LDS R8, [R6] ;
        /*0050*/                   HMMA.16816.F32.BF16 R12, R8, R4, R12 ;
        /*0060*/               @P1 BRA 0x40 ;
"""


def test_sass_loops_finds_the_innermost_loops_of_the_op():
    functions = dict(sass_loops.functions(SASS))
    assert list(functions) == ["kernel_a", "kernel_b", "kernel_c"]
    code = functions["kernel_a"]
    assert [sass_loops.opcode(text) for _, text in code][2:5] == ["LDS", "HMMA", "HMMA"]
    assert sass_loops.main_loops(code, "HMMA") == [(2, 5)]
    assert sass_loops.main_loops(code, "PRMT") == [(1, 7)]
    assert sass_loops.main_loops(functions["kernel_b"], "HMMA") == []
    assert sass_loops.main_loops(functions["kernel_c"], "HMMA") == [(0, 3), (4, 6)]

