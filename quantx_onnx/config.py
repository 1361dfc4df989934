"""What the user asks of `optimize`: bits, groups, grid, target, exclusions, method."""

from __future__ import annotations

import dataclasses
import re

from .errors import InputError
from .format import MAX_GROUP, SUPPORTED_BITS

LM_HEAD = r"(^|[/.])lm_head([/.]|$)"  # node or weight names of an (untied) output projection
METHODS = ("rtn", "mse", "gptq", "awq", "codebook", "auto")


# Calibrated runs default to groups of 32 with hierarchical 4-bit sub-scales (the best
# measured recipe, docs/ACCURACY.md); data-free runs to groups of 64 with fp16 scales.
CALIBRATED_GROUP = (32, 4, 8)  # group size, scale bits, super-group
DATA_FREE_GROUP = (64, 0, 8)
# A calibrated model's default size: this many bits per weight above --bits, averaged over
# every quantized weight, embedding table included (3.7 for a 3-bit model; the 4-bit table
# alone costs ~4.6). The allocator spends it where the measured sensitivity says.
BUDGET_MARGIN_BITS = 0.7
E2E_EPOCHS = 1  # default end-to-end tuning passes over the calibration batches (2: no better)
# Input channels one tuned scale multiplier covers in a decoder's end-to-end step (a super-scale
# block of the default format), not whole columns: lower perplexity on both held-out texts in
# every SmolLM2 comparison, for 24-36% more tuning time on a CPU (docs/ACCURACY.md)
E2E_SPAN = 256


CALIB_BATCH_TOKENS = 2048  # tokens per calibration batch by default (4 windows of 512)
# Self-generated text: documents of 256 tokens rather than 512 (at 64 documents: 20 s less
# generation; two seeds: -1.7% Wikipedia, -1.1% Lee perplexity), 96 of them rather than 64
# (GPTQ's Hessians on 50% more tokens: -0.3% on both texts over three seeds, one of them worse:
# small, at the size of the seed spread, and under 80 s)
SELF_SAMPLES = 96
SELF_SEQ_LEN = 256
# ... of which the end-to-end step tunes on the first SELF_TUNED_SAMPLES: tuning on all 96
# gained nothing (GPTQ on 64, tuning on 96: Lee as with 64) and took 70-100 s longer
SELF_TUNED_SAMPLES = 64
# ... each cut from a document after its first SELF_SKIP tokens (separator, drawn word and the
# first generated ones), so windows start mid-text as real text's do (docs/ACCURACY.md)
SELF_SKIP = 16
TEXT_SAMPLES = 64  # windows of real text by default
TEXT_SEQ_LEN = 512
# Own-text windows the end-to-end step adds to given calibration text (--e2e-samples): on
# SmolLM2 calibrated on Wikipedia, 64 / 128 / 256 gave Lee 36.20 / 35.78 / 35.61, own text
# and tuning taking 442 / 624 / 972 s (docs/ACCURACY.md); 128 is the cheap part of that gain
E2E_SELF_SAMPLES = 128


@dataclasses.dataclass
class QuantConfig:
    bits: int = 3
    group_size: int | None = None  # 0 = per-channel; None: 32 calibrated, 64 data-free
    symmetric: bool = False
    target: str = "auto"
    accuracy_level: int | None = None  # None: the target's default
    exclude: tuple[str, ...] = ()  # regexes on node or weight names
    method: str | None = None  # None: auto with calibration data, else rtn
    scale_bits: int | None = None  # hierarchical scales (0 = plain fp16 scale per group)
    super_group: int = 8
    embeddings: bool = True  # also quantize Gather tables (shared with a tied lm_head)
    # Embedding tables and the lm_head (often one tied matrix) are the most sensitive weights
    # of an LLM: by default they get max(bits, 4) bits in groups of 32. 0: the same recipe as
    # the rest.
    embedding_bits: int | None = None
    embedding_group_size: int = 32
    fuse_attention: bool = True  # decoder attention -> com.microsoft GroupQueryAttention
    # ... saved as com.quantx QxGroupQueryAttention (QuantX's decode kernel) unless --portable
    qx_attention: bool = True
    scale_dtype: str = "float16"
    # calibration
    calib: str | None = None  # text file, gensim:* corpus, .npy/.npz token ids, or "self"
    data_free: bool = False  # never calibrate (a decoder export otherwise generates its text)
    calib_samples: int | None = None  # None: samples_for() picks by source
    calib_seq_len: int | None = None  # None: seq_len_for() picks by source
    calib_batch: int | None = None  # windows per batch (None: batch_windows() picks)
    sequential: bool = True  # later layers calibrate on the quantized earlier ones
    hessian: str = "norm"  # token weighting of the Hessian: norm (1/mean x^2) or plain
    threads: int | None = None
    seed: int = 0
    report: str | None = None  # write the per-weight report as JSON here
    # bit allocation (calibrated runs): a budget in bits per quantized weight or in MB of
    # packed weights; None: --bits + BUDGET_MARGIN_BITS; uniform=True keeps one recipe
    budget_bpw: float | None = None
    budget_mb: float | None = None
    uniform: bool = False
    e2e_epochs: int | None = None  # end-to-end tuning passes (None: E2E_EPOCHS calibrated)
    e2e_rounding: bool = False  # end-to-end tuning also moves codes by one step (learned)
    # text the end-to-end step tunes on besides the calibration text: None = "self" (the model's
    # own text) when a decoder calibrates on given text, else nothing; "none": nothing
    e2e_text: str | None = None
    # windows of that text (None: E2E_SELF_SAMPLES for own text); with the model's own text as
    # the whole calibration and no --e2e-text: the first windows of it tuned on (None:
    # SELF_TUNED_SAMPLES)
    e2e_samples: int | None = None
    # input channels one tuned scale multiplier covers (0: a whole column), rounded up to the
    # format's top-level scale blocks (calibration/e2e.py, scale_span); None: E2E_SPAN, but
    # whole columns for encoders (encoder_defaults: not measured there)
    e2e_span: int | None = None
    block_steps: int = 0  # learned rounding per decoder layer (block reconstruction); 0: off
    # error propagation: each weight is fitted to the float layer's output on the quantized
    # model's inputs, this fraction of the way (calibration/stats.py). None: off for decoders
    # (with their end-to-end tuning it measured no better, docs/ACCURACY.md), ENCODER_PROPAGATION
    # for encoders (calibration/encoders.py, encoder_defaults)
    propagation: float | None = None
    device: str = "cpu"  # torch device of the heavy calibration steps: cpu, cuda, cuda:N
    overrides: tuple[str, ...] = ()  # "REGEX=bits:4,group:32": per-weight recipe changes
    portable: bool = False  # write stock-ORT operators instead of QuantX nodes (portable.py)
    # quantize each GPTQ'd matrix in a randomized Hadamard basis (rotation.py; the kernels
    # rotate its activations). None: on for calibrated runs with QuantX nodes (SmolLM2's
    # default: 13-19% less perplexity loss, docs/ACCURACY.md)
    rotate: bool | None = None
    # VLM folders (quantx_onnx.vlm): per-component bits ("vision=4,text=3") and calibration
    # images (a folder or one file)
    components: tuple[str, ...] = ()
    calib_images: str | None = None
    # trade-offs (issue 10): a decode speed budget against fp32 from the target's cost model,
    # a held-out perplexity bound (tradeoff.py), and the wider plan search of explicit budgets
    speedup: float | None = None
    max_ppl_increase: float | None = None  # fraction: 0.1 = at most +10% perplexity
    plan_search: bool | None = None  # None: on when a budget or --speedup was given

    def batch_windows(self, seq_len: int | None = None) -> int:
        """Windows per calibration batch for windows of ``seq_len`` tokens (default
        --calib-seq-len, else TEXT_SEQ_LEN): --calib-batch when given, else 4 windows of up to
        CALIB_BATCH_TOKENS / 4 tokens and fewer, longer ones (the backward passes of the
        sensitivity and end-to-end steps keep every layer's attention scores of a batch:
        memory grows with the square of the window length)."""
        if self.calib_batch is not None:
            return self.calib_batch
        seq_len = seq_len or self.calib_seq_len or TEXT_SEQ_LEN
        return max(1, min(4, CALIB_BATCH_TOKENS // seq_len))

    def seq_len_for(self, calib: str | None) -> int:
        """Tokens per calibration window: --calib-seq-len when given, else SELF_SEQ_LEN when
        the model writes all its text and TEXT_SEQ_LEN when real text is read."""
        if self.calib_seq_len is not None:
            return self.calib_seq_len
        return SELF_SEQ_LEN if _all_self(calib) else TEXT_SEQ_LEN

    def samples_for(self, calib: str | None) -> int:
        """Calibration windows for the source spec ``calib``: --calib-samples when given, else
        SELF_SAMPLES when the model writes all its text (of SELF_SEQ_LEN tokens: generation is
        the slow part) and TEXT_SAMPLES when real text is read (of TEXT_SEQ_LEN: twice the
        tokens measured 22.11 -> 21.72 on Wikipedia, 37.33 -> 36.63 on Lee; docs/ACCURACY.md)."""
        if self.calib_samples is not None:
            return self.calib_samples
        return SELF_SAMPLES if _all_self(calib) else TEXT_SAMPLES

    def tuned_windows(self) -> int | None:
        """How many of the calibration windows (the first ones) the end-to-end step tunes on:
        all (None) for given text; with the model's own text alone, --e2e-samples when given
        without --e2e-text, else SELF_TUNED_SAMPLES (the slowest step per token; it gained
        nothing from the windows GPTQ reads beyond those)."""
        if not _all_self(self.calib):
            return None
        if self.e2e_samples is not None and self.e2e_text is None:
            return self.e2e_samples
        return SELF_TUNED_SAMPLES

    def parsed_overrides(self) -> list[tuple[str, dict]]:
        """User overrides, after the built-in one for the lm_head (embedding tables get theirs
        by structure, see pipeline)."""
        from .recipes import parse_override

        builtin = [(LM_HEAD, self.embedding_fields())] if self.embedding_bits != 0 else []
        try:
            return builtin + [parse_override(o) for o in self.overrides]
        except ValueError as e:
            raise InputError(str(e)) from None

    def user_overrides(self, parsed: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        """``parsed`` (:meth:`parsed_overrides`) without the built-in lm_head override at its
        head: the user's own, which pin the weights they name."""
        return parsed[1:] if self.embedding_bits != 0 else parsed

    def embedding_fields(self, matmul_reads: bool = True) -> dict:
        """The recipe fields of an embedding table or lm_head. ``matmul_reads``: a MatMul reads
        the weight (an lm_head, tied to a table or not), so it is rotated as the run's other
        matrices are (QxGather un-rotates the rows it returns); a table only gathered keeps
        its basis (rotation measured only where the lm_head reads it: docs/ACCURACY.md)."""
        bits = max(self.bits, 4) if self.embedding_bits is None else self.embedding_bits
        return {
            "bits": bits,
            "group_size": self.embedding_group_size,
            "scale_bits": 0,
            "rotate": bool(self.rotate) and matmul_reads,
        }

    @property
    def resolved_method(self) -> str:
        if self.method:
            return self.method
        return "gptq" if self.calib else "rtn"

    @property
    def calibrated(self) -> bool:
        return bool(self.calib) and self.resolved_method not in ("rtn", "mse", "codebook")

    def resolved(self) -> QuantConfig:
        """Every unset default filled in (groups, scales, budget, tuning) for how this run
        calibrates; call after ``calib`` is settled."""
        cal = bool(self.calib)
        group, scale_bits, super_group = CALIBRATED_GROUP if cal else DATA_FREE_GROUP
        fields = {}
        if self.group_size is None:
            fields["group_size"] = group
            if self.scale_bits is None and not self.symmetric:
                fields["scale_bits"], fields["super_group"] = scale_bits, super_group
        if fields.get("scale_bits", self.scale_bits) is None:
            fields["scale_bits"] = 0
        if self.e2e_epochs is None:
            fields["e2e_epochs"] = E2E_EPOCHS if self.calibrated else 0
        if self.rotate is None:  # stock ONNX Runtime has no rotated MatMul (portable.py)
            fields["rotate"] = self.calibrated and not self.portable
        if self.propagation is None:  # encoders got theirs from encoder_defaults
            fields["propagation"] = 0.0
        if self.e2e_span is None:  # encoders got 0 from encoder_defaults
            fields["e2e_span"] = E2E_SPAN
        if self.plan_search is None:
            fields["plan_search"] = any(
                v is not None for v in (self.budget_bpw, self.budget_mb, self.speedup)
            )
        if (
            self.calibrated
            and self.bits <= 4  # an 8-bit model has no margin worth allocating
            and not self.uniform
            and self.budget_bpw is None
            and self.budget_mb is None
        ):
            fields["budget_bpw"] = self.bits + BUDGET_MARGIN_BITS
        return dataclasses.replace(self, **fields)

    @property
    def allocating(self) -> bool:
        return not self.uniform and (self.budget_bpw is not None or self.budget_mb is not None)

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise InputError(
                f"--bits {self.bits}: choose one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
        g = self.group_size
        if g is not None and g != 0 and (g % 16 or not 16 <= g <= MAX_GROUP):
            raise InputError(
                f"--group-size {g}: must be 0 (per-channel) or a multiple of 16 "
                f"in [16, {MAX_GROUP}]"
            )
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"--accuracy-level {self.accuracy_level}: must be 0..4")
        if self.method is not None and self.method not in METHODS:
            raise InputError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if (
            (self.calib_samples is not None and self.calib_samples < 1)
            or (self.calib_seq_len is not None and self.calib_seq_len < 2)
            or (self.calib_batch is not None and self.calib_batch < 1)
        ):
            raise InputError("--calib-samples >= 1, --calib-seq-len >= 2 and batch >= 1 required")
        if self.e2e_samples is not None and self.e2e_samples < 1:
            raise InputError(f"--e2e-samples {self.e2e_samples}: must be >= 1")
        if self.e2e_span is not None and self.e2e_span < 0:
            raise InputError(f"--e2e-span {self.e2e_span}: must be >= 0 (0: whole columns)")
        if self.hessian not in ("norm", "plain"):
            raise InputError(f"--hessian {self.hessian!r}: choose norm or plain")
        if self.embedding_bits not in (None, 0, *SUPPORTED_BITS):
            raise InputError(
                f"--embedding-bits {self.embedding_bits}: choose 0 or one of "
                f"{', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.data_free and (self.calib or self.calib_images):
            raise InputError("--data-free and --calib-text/--calib-images exclude each other")
        if self.portable and self.rotate:
            raise InputError(
                "--rotate and --portable exclude each other: stock ONNX Runtime has no operator "
                "that rotates a MatMul's activations"
            )
        if self.budget_bpw is not None and self.budget_mb is not None:
            raise InputError("give one of --budget-bpw and --budget-mb")
        if self.budget_bpw is not None and not 1.0 < self.budget_bpw <= 32:
            raise InputError(f"--budget-bpw {self.budget_bpw}: must be in (1, 32]")
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise InputError(f"--budget-mb {self.budget_mb}: must be positive")
        if (self.budget_bpw is not None or self.budget_mb is not None) and self.data_free:
            raise InputError("a budget is allocated from calibration: drop --data-free")
        if self.speedup is not None and not self.speedup > 0:
            raise InputError(f"--speedup {self.speedup}: must be positive")
        if self.max_ppl_increase is not None and not self.max_ppl_increase > 0:
            raise InputError(f"--max-ppl-increase {self.max_ppl_increase}: must be positive")
        if (self.speedup or self.max_ppl_increase) and (self.uniform or self.data_free):
            raise InputError(
                "--speedup/--max-ppl-increase plan from calibration: drop --uniform/--data-free"
            )
        if self.propagation is not None and not 0.0 <= self.propagation <= 1.0:
            raise InputError(f"--propagation {self.propagation}: must be in [0, 1]")
        if self.propagation and (not self.sequential or self.data_free):
            raise InputError(
                "--propagation fits to calibration, layer after layer: drop "
                "--no-sequential/--data-free"
            )
        if self.block_steps < 0:
            raise InputError(f"--block-steps {self.block_steps}: must be >= 0")
        if self.e2e_epochs is not None and self.e2e_epochs < 0:
            raise InputError(f"--e2e-epochs {self.e2e_epochs}: must be >= 0")
        if not (self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise InputError(f"--device {self.device!r}: choose cpu, cuda or cuda:N")
        if self.scale_bits and not 2 <= self.scale_bits <= 8:
            raise InputError(f"--scale-bits {self.scale_bits}: must be 0 or in [2, 8]")
        if self.scale_bits and self.symmetric:
            raise InputError("--scale-bits needs asymmetric quantization (drop --symmetric)")
        if self.scale_bits and self.super_group < 2:
            raise InputError(f"--super-group {self.super_group}: must be >= 2")
        if self.scale_dtype not in ("float16", "float32"):
            raise InputError(f"scale dtype {self.scale_dtype!r}: float16 or float32")
        # every override must itself make a valid recipe (the built-in ones are fixed)
        for _, fields in self.parsed_overrides()[1 if self.embedding_bits != 0 else 0 :]:
            dataclasses.replace(self, overrides=(), embedding_bits=0, **fields).validate()
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InputError(
                    f"--exclude {pattern!r}: invalid regular expression ({e})"
                ) from None


def _all_self(calib: str | None) -> bool:
    """Whether the source spec ``calib`` is the model's own text alone (``self``)."""
    return all(s == "self" for s in (calib or "").split("+"))
