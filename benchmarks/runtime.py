"""int8 forward latency of GPT-2 small: qat-planner's plans against fp32, hand placements, FX graph mode and PT2E.

Every model is built from one random GPT-2 small (latency does not depend on the weights) and timed
in this process on the same token ids, batch 1. The eager int8 models are converted after
prepare_qat and one observed forward. Methods:

- ``fp32``: the Hugging Face model;
- ``every Linear wrapped``: by hand, each projection (Conv1D swapped for Linear) and the LM head in
  its own nn.Sequential(QuantStub, Linear, DeQuantStub);
- ``wrapped, MLP int8``: the same, with c_fc -> GELU -> c_proj kept int8 (the best placement by hand);
- ``qat-planner bytes``: the default plan (fewest converted elements), emitted by qat-planner;
- ``qat-planner latency``: the plan of ``objective="latency"`` with the cost model calibrated in this run;
- ``latency + merge_dequantize``: the same converted model after ``planner.merge_dequantize(converted,
  plan=plan)``, which runs each int8 Linear and the dequantize after it as one oneDNN call with fp32
  output, with the MLP's GELU folded into c_fc's call;
- ``FX graph mode``: a hand-written GPT-2 with the same weights through prepare_qat_fx/convert_fx,
  Linear and GELU quantized, since the Hugging Face model cannot be fx-traced;
- ``PT2E``, ``PT2E compiled``: torchao's X86InductorQuantizer on the exported model (Conv1D swapped for
  Linear first), run as the converted graph and after torch.compile; skipped when torchao is missing.

Prints min/median/max of repeated runs, the speed-up over fp32 and the page faults per forward, the
predicted latency of the latency plan (with and without the merge) next to the measured one, and a
profile of the int8 models at the profile length.

Every method returns a new vocabulary-sized logits tensor (25 MB at 128 tokens), and glibc's malloc
hands buffers that large back to the OS when they are freed, so depending on the allocation history a
forward may page-fault on 25-50 MB of fresh memory and take 10-70 ms longer, at random. The script
therefore runs itself with glibc told to keep freed memory (the variables in ``MALLOC_SETTINGS``), which
a caching allocator such as jemalloc or tcmalloc does too; ``--system-malloc`` times the default.

    python benchmarks/runtime.py [--seq-lens 32 128 512] [--threads 1 2] [--repeats 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections import defaultdict

import torch
import torch._inductor.config
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel

import planner
from planner.costs import calibrate, predict
from planner.models import gpt2_config


def convert_eager(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """prepare_qat, one observed forward and convert: enough for timing, which does not depend on the weights."""
    model.train()
    tq.prepare_qat(model, inplace=True)
    with torch.no_grad():
        model(example)
    model.eval()
    return tq.convert(model, inplace=False)


def _linear_from(conv) -> nn.Linear:
    """Return the nn.Linear equal to a transformers Conv1D (whose weight is stored as (in, out))."""
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


def by_hand(model: GPT2LMHeadModel, mlp_int8: bool) -> nn.Module:
    """Return a placement users write by hand: every projection as QuantStub -> Linear -> DeQuantStub.

    With ``mlp_int8`` the MLP runs QuantStub -> c_fc -> GELU -> c_proj -> DeQuantStub, GELU swapped for
    torch's tanh GELU because transformers' formula has no int8 kernel. The LM head is wrapped too.
    """
    qconfig = tq.get_default_qat_qconfig("x86")
    model = copy.deepcopy(model)

    def island(*modules: nn.Module) -> nn.Sequential:
        wrapped = nn.Sequential(*modules)
        wrapped.qconfig = qconfig
        return wrapped

    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        attn.c_attn = island(tq.QuantStub(), _linear_from(attn.c_attn), tq.DeQuantStub())
        attn.c_proj = island(tq.QuantStub(), _linear_from(attn.c_proj), tq.DeQuantStub())
        if mlp_int8:
            mlp.c_fc = island(tq.QuantStub(), _linear_from(mlp.c_fc))
            mlp.act = nn.GELU(approximate="tanh")
            mlp.c_proj = island(_linear_from(mlp.c_proj), tq.DeQuantStub())
        else:
            mlp.c_fc = island(tq.QuantStub(), _linear_from(mlp.c_fc), tq.DeQuantStub())
            mlp.c_proj = island(tq.QuantStub(), _linear_from(mlp.c_proj), tq.DeQuantStub())
    model.lm_head = island(tq.QuantStub(), model.lm_head, tq.DeQuantStub())
    return model


# ---------------------------------------------------------------- FX graph mode on a hand-written GPT-2


class HandBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU(approximate="tanh")
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.reshape(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))


class HandGPT2(nn.Module):
    """GPT-2 written with nn.Linear and no control flow on shapes, so torch.fx can trace it."""

    def __init__(self, hf: GPT2LMHeadModel):
        super().__init__()
        config = hf.config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(HandBlock(config.n_embd, config.n_head) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._copy_weights(hf)

    def _copy_weights(self, hf: GPT2LMHeadModel) -> None:
        source = hf.transformer
        with torch.no_grad():
            self.wte.weight.copy_(source.wte.weight)
            self.wpe.weight.copy_(source.wpe.weight)
            self.ln_f.load_state_dict(source.ln_f.state_dict())
            self.lm_head.weight.copy_(hf.lm_head.weight)
            for mine, theirs in zip(self.h, source.h):
                mine.ln_1.load_state_dict(theirs.ln_1.state_dict())
                mine.ln_2.load_state_dict(theirs.ln_2.state_dict())
                # Conv1D stores its weight as (in, out); Linear as (out, in).
                for linear, conv in ((mine.c_attn, theirs.attn.c_attn), (mine.attn_proj, theirs.attn.c_proj),
                                     (mine.c_fc, theirs.mlp.c_fc), (mine.mlp_proj, theirs.mlp.c_proj)):
                    linear.weight.copy_(conv.weight.t())
                    linear.bias.copy_(conv.bias)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def fx_graph_mode(hf: GPT2LMHeadModel, example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import QConfigMapping, get_default_qat_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    hand = HandGPT2(hf).train()
    qconfig = get_default_qat_qconfig("x86")
    mapping = QConfigMapping().set_object_type(nn.Linear, qconfig).set_object_type(nn.GELU, qconfig)
    prepared = prepare_qat_fx(hand, mapping, (example,))
    with torch.no_grad():
        prepared(example)
    return convert_fx(prepared.eval())


def check_hand_written(hf: GPT2LMHeadModel, ids: torch.Tensor) -> float:
    """Largest logit difference between the hand-written GPT-2 and the Hugging Face one (same weights)."""
    with torch.no_grad():
        return (HandGPT2(hf).eval()(ids) - hf(ids).logits).abs().max().item()


# ---------------------------------------------------------------- PT2E (torchao)


def linear_gpt2(hf: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Copy ``hf`` with every Conv1D replaced by the equivalent nn.Linear, as PT2E's quantizer expects."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(hf)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.weight.shape[0], module.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model.eval()


def pt2e(hf: GPT2LMHeadModel, seq_len: int, compiled: bool):
    """PT2E-quantized GPT-2 for one sequence length, or None without torchao. Returns (model, seconds to build)."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        return None, 0.0
    started = time.perf_counter()
    ids = torch.randint(0, hf.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
    model = linear_gpt2(hf)
    exported = torch.export.export(model, (), {"input_ids": ids, "use_cache": False}, strict=False).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    prepared(input_ids=ids, use_cache=False)
    converted = convert_pt2e(prepared)

    def forward(input_ids):
        return converted(input_ids=input_ids, use_cache=False)

    if compiled:
        # Freezing turns the weights into constants, which inductor needs to lower the
        # quantize/dequantize patterns around each Linear to oneDNN int8 kernels.
        torch._inductor.config.freezing = True
        runner = torch.compile(forward)
        with torch.no_grad():
            runner(ids)  # compile now, so the timed runs measure the compiled code
        return runner, time.perf_counter() - started
    return forward, time.perf_counter() - started


# ---------------------------------------------------------------- timing and profile


# glibc keeps freed buffers up to 32 MiB (its largest mmap threshold) and stops returning memory to the OS.
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def measure(models: dict, ids: torch.Tensor, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Milliseconds and minor page faults of each model's forward, taken in turns (one run of each per
    round), so a slow spell of the machine falls on every model rather than on whichever ran then."""
    times: dict[str, list[float]] = {name: [] for name in models}
    faults: dict[str, list[int]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            if isinstance(model, nn.Module):
                model.eval()
            for _ in range(3):
                model(ids)
        for _ in range(repeats):
            for name, model in models.items():
                faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                started = time.perf_counter()
                model(ids)
                times[name].append((time.perf_counter() - started) * 1000)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
    return times, faults


PROFILE_CATEGORIES = (  # (category, substrings of profiler op names), first match wins
    ("int8 linear", ("quantized::linear", "onednn::qlinear", "qlinear")),
    ("conversions", ("quantize_per_tensor", "dequantize", "quantize_per_channel", "quantized_decomposed")),
    ("fp32 linear", ("aten::addmm", "aten::mm", "aten::linear")),
    ("fp32 attention", ("scaled_dot_product", "aten::bmm", "aten::matmul", "aten::baddbmm", "_softmax", "flash_attention")),
    ("LayerNorm", ("layer_norm",)),
    ("GELU", ("gelu", "aten::tanh", "aten::pow")),
)


def profile(model, ids: torch.Tensor, runs: int = 5) -> dict[str, float]:
    """Share of self CPU time per category over ``runs`` forwards; compiled kernels count by their op names."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        model(ids)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(ids)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        name = event.key.lower()
        category = next((c for c, keys in PROFILE_CATEGORIES if any(k.lower() in name for k in keys)), "rest")
        totals[category] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {c: totals.get(c, 0.0) / whole for c, _ in PROFILE_CATEGORIES + (("rest", ()),)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--profile-seq-len", type=int, default=128)
    parser.add_argument("--no-pt2e", action="store_true", help="skip PT2E (its compile takes about a minute per length)")
    parser.add_argument("--json", help="also write the rows, predictions and profiles to this JSON file")
    parser.add_argument("--system-malloc", action="store_true", help="time with glibc's default settings (see above)")
    args = parser.parse_args()
    if not args.system_malloc and any(os.environ.get(k) != v for k, v in MALLOC_SETTINGS.items()):
        # The settings are read when the process starts, so run again with them.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_SETTINGS})
    warnings.simplefilter("ignore")
    torch.manual_seed(0)

    config = gpt2_config("gpt2")
    base = GPT2LMHeadModel(config).eval()
    example = torch.randint(0, config.vocab_size, (1, 32))
    meta = GPT2LMHeadModel(config).to("meta").eval()

    started = time.perf_counter()
    cost_models = {threads: calibrate(threads) for threads in args.threads}
    calibration_s = time.perf_counter() - started
    plan_threads = max(args.threads)
    plan_inputs = {"input_ids": torch.zeros(1, 128, dtype=torch.long, device="meta")}
    latency_plan = planner.plan(meta, plan_inputs, objective="latency", cost_model=cost_models[plan_threads])

    eager = {
        "fp32": base,
        "every Linear wrapped": convert_eager(by_hand(base, mlp_int8=False), example),
        "wrapped, MLP int8": convert_eager(by_hand(base, mlp_int8=True), example),
        "qat-planner bytes": convert_eager(planner.emit(base, planner.plan(meta, plan_inputs)), example),
        "qat-planner latency": convert_eager(planner.emit(base, latency_plan), example),
        "latency + merge_dequantize": None,  # filled below from the converted latency model
        "FX graph mode": fx_graph_mode(base, example),
    }
    eager["latency + merge_dequantize"] = planner.merge_dequantize(eager["qat-planner latency"], plan=latency_plan)
    hand_error = check_hand_written(base, example)
    with torch.no_grad():  # before prepare_qat the stubs are identities, so the placements by hand compute fp32 GPT-2
        placement_error = max((by_hand(base, m)(example).logits - base(example).logits).abs().max().item() for m in (False, True))

    allocator = "glibc defaults" if args.system_malloc else " ".join(f"{k}={v}" for k, v in MALLOC_SETTINGS.items())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
          f"engine {torch.backends.quantized.engine}; GPT-2 small, batch 1, random weights; malloc: {allocator}")
    print(f"cost models calibrated in {calibration_s:.1f} s; latency plan made at seq 128 with the {plan_threads}-thread model: "
          f"{latency_plan.stats.conversions} conversions, MLP activation {latency_plan.nodes['transformer.h.0.mlp.act'].domain}")
    print(f"hand-written GPT-2 for FX matches the Hugging Face logits within {hand_error:.1e}; "
          f"the placements by hand before prepare_qat within {placement_error:.1e}")
    print()
    print(f"{'threads':>7} {'seq':>5} {'method':27} {'ms min/median/max':>24} {'speed-up':>9} {'faults/fwd':>10}")
    rows, predictions, builds = [], [], {}
    compiled_for_profile = None
    for seq_len in args.seq_lens:
        ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
        models = dict(eager)
        if not args.no_pt2e:
            for compiled in (False, True):
                name = "PT2E compiled" if compiled else "PT2E"
                runner, seconds = pt2e(base, seq_len, compiled)
                if runner is not None:
                    models[name] = runner
                    builds[f"{name} seq {seq_len}"] = seconds
                    if compiled and seq_len == args.profile_seq_len:
                        compiled_for_profile = runner
        for threads in args.threads:
            torch.set_num_threads(threads)
            reference = None
            measured_times, measured_faults = measure(models, ids, args.repeats)
            for name, times in measured_times.items():
                median = statistics.median(times)
                reference = reference or median
                faults = statistics.median(measured_faults[name])
                row = {"threads": threads, "seq_len": seq_len, "method": name, "ms_min": min(times), "ms_median": median,
                       "ms_max": max(times), "speedup": reference / median, "page_faults": faults}
                rows.append(row)
                print(f"{threads:>7} {seq_len:>5} {name:27} {min(times):7.1f} {median:7.1f} {max(times):7.1f} "
                      f"{row['speedup']:8.2f}x {faults:10.0f}")
            inputs = {"input_ids": torch.zeros(1, seq_len, dtype=torch.long, device="meta")}
            for method, merged in (("qat-planner latency", False), ("latency + merge_dequantize", True)):
                measured = next(r["ms_median"] for r in rows[::-1] if r["method"] == method)
                predicted = predict(meta, inputs, latency_plan, cost_models[threads], merged=merged).total_ms
                predictions.append({"threads": threads, "seq_len": seq_len, "method": method,
                                    "predicted_ms": predicted, "measured_ms": measured})

    print()
    print("latency plan: predicted against measured int8 forward")
    print(f"{'threads':>7} {'seq':>5} {'method':27} {'predicted ms':>13} {'measured ms':>12} {'error':>7}")
    for p in predictions:
        print(f"{p['threads']:>7} {p['seq_len']:>5} {p['method']:27} {p['predicted_ms']:13.1f} {p['measured_ms']:12.1f} "
              f"{p['predicted_ms'] / p['measured_ms'] - 1:+7.0%}")

    best_hand = {}
    for r in rows:
        if r["method"] in ("every Linear wrapped", "wrapped, MLP int8"):  # the placements by hand
            key = (r["threads"], r["seq_len"])
            best_hand[key] = min(best_hand.get(key, math.inf), r["ms_median"])
    print()
    print("latency plan against the best hand placement (ratio > 1: the plan is faster)")
    print(f"{'threads':>7} {'seq':>5} {'latency plan':>13} {'+ merge_dequantize':>19}")
    for r in rows:
        if r["method"] == "qat-planner latency":
            key = (r["threads"], r["seq_len"])
            merged = next(m for m in rows if m["method"] == "latency + merge_dequantize" and (m["threads"], m["seq_len"]) == key)
            print(f"{r['threads']:>7} {r['seq_len']:>5} {best_hand[key] / r['ms_median']:13.3f} {best_hand[key] / merged['ms_median']:19.3f}")

    torch.set_num_threads(plan_threads)
    ids = torch.randint(0, config.vocab_size, (1, args.profile_seq_len), generator=torch.Generator().manual_seed(7))
    profiled = {"qat-planner latency": eager["qat-planner latency"], "latency + merge_dequantize": eager["latency + merge_dequantize"],
                "every Linear wrapped": eager["every Linear wrapped"]}
    if not args.no_pt2e:
        runner = compiled_for_profile or pt2e(base, args.profile_seq_len, compiled=True)[0]
        if runner is not None:
            profiled["PT2E compiled"] = runner
    profiles = {name: profile(model, ids) for name, model in profiled.items()}
    categories = list(next(iter(profiles.values())))
    print()
    print(f"profile at seq {args.profile_seq_len}, {plan_threads} thread{'s' if plan_threads != 1 else ''}: share of self CPU time")
    print(f"{'method':27} " + " ".join(f"{c:>14}" for c in categories))
    for name, shares in profiles.items():
        print(f"{name:27} " + " ".join(f"{shares[c]:14.1%}" for c in categories))
    if builds:
        print()
        print("PT2E build time (export, prepare, calibrate, convert, compile): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in builds.items()))
    print("latency plan predicted split at seq 128: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in list(latency_plan.latency.by_class.items())[:8]))

    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"rows": rows, "predictions": predictions, "profiles": profiles, "builds_s": builds,
                       "torch": torch.__version__, "machine": platform.machine(), "cores": os.cpu_count()}, out, indent=2)


if __name__ == "__main__":
    main()
