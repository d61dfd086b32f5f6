"""QAT on real text: tokenize, train fp32, plan, emit, prepare_qat, train, convert, and measure."""

from __future__ import annotations

import copy
import io
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.ao.quantization as tq
from torch import nn

from .emit import emit
from .errors import PlannerError
from .models import ModelSpec
from .plan import Plan, plan, takes_keyword

logger = logging.getLogger(__name__)

__all__ = ["QATConfig", "QATResult", "ByteTokenizer", "run_qat", "perplexity"]

StepCallback = Callable[[str, int, int, float], None]


class ByteTokenizer:
    """Byte-level tokenizer: each UTF-8 byte is one token, so the vocabulary is 256 and nothing is trained."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@dataclass
class QATConfig:
    """Settings of one QAT run; steps are optimizer steps over random windows of ``seq_len`` tokens."""

    text: Path
    float_steps: int = 300
    qat_steps: int = 100
    seq_len: int = 128
    batch_size: int = 16
    float_lr: float = 3e-3
    qat_lr: float = 3e-4
    eval_windows: int = 64
    latency_runs: int = 20
    seed: int = 0
    out: Path | None = None
    rules: str | list[str] = "default"


@dataclass
class QATResult:
    """Measurements of one QAT run, all taken in the same process."""

    perplexity: dict[str, float]
    latency_ms: dict[str, float]
    state_dict_bytes: dict[str, int]
    tokenizer: str
    train_tokens: int
    validation_tokens: int
    plan: Plan
    converted: nn.Module = field(repr=False)
    substitution_checks: dict[str, float | None] = field(default_factory=dict)


def _tokenize(spec: ModelSpec, text: str):
    if spec.folder is not None and spec.extra.get("has_tokenizer"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.folder)
        return tokenizer.encode(text), f"{type(tokenizer).__name__} from {spec.folder}", None
    tokenizer = ByteTokenizer()
    return tokenizer.encode(text), "byte-level (256 tokens)", tokenizer.vocab_size


def _batches(data: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([data[s:s + seq_len] for s in starts.tolist()])


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=ids, use_cache=False) if takes_keyword(model, "use_cache") else model(ids)
    return output.logits if hasattr(output, "logits") else output


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = _logits(model, ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def perplexity(model: nn.Module, data: torch.Tensor, seq_len: int, windows: int) -> float:
    """Return exp(mean next-token cross-entropy) over up to ``windows`` non-overlapping windows of ``data``."""
    count = min(windows, (len(data) - 1) // seq_len)
    if count < 1:
        raise PlannerError(f"validation text has {len(data)} tokens, fewer than one window of {seq_len + 1}; use a longer text")
    ids = torch.stack([data[i * seq_len:(i + 1) * seq_len + 1] for i in range(count)])
    losses = []
    with torch.no_grad():
        for chunk in ids.split(8):
            losses.append(_loss(model, chunk).item() * len(chunk))
    return math.exp(sum(losses) / count)


def _train(model, batches, steps: int, lr: float, phase: str, on_step: StepCallback | None) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    model.train()
    for step in range(steps):
        loss = _loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step:
            on_step(phase, step + 1, steps, loss.item())


def _latency_ms(model: nn.Module, seq_len: int, vocab_size: int, runs: int) -> float:
    ids = torch.randint(0, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            _logits(model, ids)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            _logits(model, ids)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def run_qat(spec: ModelSpec, config: QATConfig, on_step: StepCallback | None = None) -> QATResult:
    """Train ``spec``'s model on a text file in fp32, then plan, emit, QAT-train and convert it to int8.

    Built-in models start from random weights, so ``float_steps`` of fp32 training come first; a local
    folder with weights can use ``float_steps=0``. 10% of the tokens (the end of the text) are held
    out for validation. Perplexity, latency (median of ``latency_runs`` forwards, batch 1) and
    state-dict size are measured for fp32, fake-quant and int8 in this process.

    Raises:
        PlannerError: the text is too short, or planning, emission or conversion fails.
    """
    torch.manual_seed(config.seed)
    text = Path(config.text).read_text(encoding="utf-8")
    ids, tokenizer_name, vocab_size = _tokenize(spec, text)
    data = torch.tensor(ids, dtype=torch.long)
    split = int(len(data) * 0.9)
    train_data, validation = data[:split], data[split:]
    window = config.seq_len + 1
    if len(train_data) <= window or len(validation) < window:
        raise PlannerError(
            f"{config.text} has {len(data)} tokens; with --seq-len {config.seq_len} QAT needs at least "
            f"{10 * window + 1} so that the held-out 10% holds one window; use a longer text or a smaller --seq-len"
        )
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(train_data, window, config.batch_size, generator)

    model = spec.model("cpu", vocab_size)
    if not hasattr(getattr(model, "config", None), "vocab_size"):
        raise PlannerError(
            f"qat trains causal language models (token ids in, logits out), and {type(model).__name__} is not a "
            "Hugging Face model with a vocabulary; use plan and validate for other models"
        )
    vocab = vocab_size or model.config.vocab_size
    _train(model, batches, config.float_steps, config.float_lr, "fp32", on_step)
    model.eval()
    result_ppl = {"fp32": perplexity(model, validation, config.seq_len, config.eval_windows)}

    example = {"input_ids": torch.zeros(1, config.seq_len, dtype=torch.long, device="meta")}
    meta_model = spec.model("meta", vocab_size)
    the_plan = plan(meta_model, example, rules=config.rules)
    prepared = emit(model, the_plan)
    tq.prepare_qat(prepared, inplace=True)
    _train(prepared, batches, config.qat_steps, config.qat_lr, "qat", on_step)

    prepared.eval()
    prepared.apply(tq.disable_observer)
    result_ppl["fake-quant"] = perplexity(prepared, validation, config.seq_len, config.eval_windows)
    converted = tq.convert(copy.deepcopy(prepared), inplace=False)
    result_ppl["int8"] = perplexity(converted, validation, config.seq_len, config.eval_windows)

    latency = {
        "fp32": _latency_ms(model, config.seq_len, vocab, config.latency_runs),
        "int8": _latency_ms(converted, config.seq_len, vocab, config.latency_runs),
    }
    sizes = {"fp32": _state_dict_bytes(model), "int8": _state_dict_bytes(converted)}
    if config.out is not None:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(converted.state_dict(), out / "model_int8.pt")
        the_plan.save(out / "plan.json")
    return QATResult(
        perplexity=result_ppl, latency_ms=latency, state_dict_bytes=sizes, tokenizer=tokenizer_name,
        train_tokens=len(train_data), validation_tokens=len(validation), plan=the_plan, converted=converted,
        substitution_checks=getattr(prepared, "qat_planner_checks", {}),
    )
