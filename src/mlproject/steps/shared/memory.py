"""What a step holds in memory at its peak, estimated before anything loads (pure arithmetic).

A step's work is a sequence of *phases* (load, train, evaluate …); memory is freed between
them, so the peak is the largest phase, and a phase is a sum of named *parts* (weights,
optimizer state, activations, KV cache …), each with the parameters that lower it. The
inputs are the model's shape (``ModelShape``: parameter count, the config's sizes, the linear
layers of a weightless model) and what the step will do (``Work``). Nothing here imports
torch or touches a device: ``checks.check_memory`` gathers the inputs and compares.

Known gaps (each small next to what is counted, or unknown before the run): the CUDA context
and allocator slack, lm-eval's log-likelihood logits (short requests), calibration activations,
a KL ``reference=`` model scored in the same process, and a packed checkpoint reloaded beside
its float model (AutoRound).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GB = 1e9
#: bitsandbytes NF4 with double quantization: 4 bits, an 8-bit absmax per 64 weights and an
#: fp32 scale per 256 absmax (QLoRA paper, section 3): 4.127 bits per weight.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
#: lm-eval's generation prompts are shorter than most models' context; a KV cache is sized for
#: prompts of at most this many tokens (a 5-shot gsm8k prompt is ~900, humaneval's ~150) plus
#: the task's ``max_gen_toks``, capped by the model's context.
GEN_PROMPT_TOKENS = 1024
SMALLER = "a smaller model (model=smollm2)"


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a model's memory; zeros where unknown (then only weights count)."""

    params: int
    layers: int = 0
    hidden: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    vocab: int = 0
    context: int = 0
    #: (module name, in_features, out_features) of every linear layer but the output head
    linears: tuple[tuple[str, int, int], ...] = ()
    eager_attention: bool = False  # attention scores materialized (transformers' default, sdpa, does not)

    @classmethod
    def from_config(cls, config: Any, params: int, model: Any = None) -> "ModelShape":
        """Sizes from a transformers config (its ``text_config`` first); ``model``: a weightless
        (meta-device) model whose linear layers LoRA and quantization count."""
        cfg = getattr(config, "text_config", None) or config

        def size(*names: str) -> int:
            for name in names:
                value = getattr(cfg, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
            return 0

        hidden, heads = size("hidden_size", "n_embd", "d_model"), size("num_attention_heads", "n_head")
        return cls(
            params=params, layers=size("num_hidden_layers", "n_layer"), hidden=hidden, heads=heads,
            kv_heads=size("num_key_value_heads") or heads,
            head_dim=size("head_dim") or (hidden // heads if heads else 0), vocab=size("vocab_size"),
            context=size("n_positions", "max_position_embeddings", "n_ctx"),
            linears=linear_shapes(model) if model is not None else (),
            eager_attention=getattr(cfg, "_attn_implementation", None) == "eager")

    @property
    def linear_params(self) -> int:
        return sum(i * o for _, i, o in self.linears)


def linear_shapes(model: Any) -> tuple[tuple[str, int, int], ...]:
    """(name, in, out) of the model's linear layers, its output head left out (peft's ``all-linear``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return tuple((name, m.in_features, m.out_features) for name, m in model.named_modules()
                 if type(m).__name__ == "Linear" and m is not head)


def lora_params(shape: ModelShape, r: int, target_modules: str = "all-linear") -> int:
    """Parameters LoRA adds at rank ``r``: r × (in + out) per targeted linear layer (peft's
    matching: ``all-linear``, or names equal to a module's name or its last components)."""
    keys = None if target_modules.strip() == "all-linear" else [k.strip() for k in target_modules.split(",")]

    def targeted(name: str) -> bool:
        return keys is None or any(name == k or name.endswith("." + k) for k in keys)

    return sum(r * (i + o) for name, i, o in shape.linears if targeted(name))


@dataclass(frozen=True)
class Training:
    """What fine-tuning does (``FinetuneStepConfig``'s fields of the same names)."""

    finetuning: str = "lora"  # lora, qlora, full
    method: str = "sft"  # sft, dpo
    train_batch_size: int = 4
    max_length: int = 512
    lora_r: int = 16
    target_modules: str = "all-linear"
    gradient_checkpointing: bool = False
    merge: bool = False
    eval_before: bool = False
    eval_after: bool = True


@dataclass(frozen=True)
class Evaluation:
    """What the evaluation computes: lm-eval's ``batch_size`` (``auto`` counts as 1: lm-eval
    then finds what fits), the most tokens a generation task generates (0: none generates),
    the PPL window (0: no PPL) and windows per forward pass."""

    batch_size: int = 16
    generation_tokens: int = 0
    ppl_seqlen: int = 0
    ppl_batch_size: int = 1


@dataclass(frozen=True)
class Work:
    """What a step will do, as far as memory goes."""

    step: str
    dtype_bytes: int  # the working dtype's bytes per value (bfloat16: 2)
    cuda: bool = False
    load_bits: float | None = None  # quantized while loading (bitsandbytes): bits per linear weight
    merge_first: bool = False  # an adapter is merged in float before quantizing while loading
    training: Training | None = None
    evaluation: Evaluation | None = None
    kept: float = 1.0  # prune: the fraction of parameters the evaluated model keeps


@dataclass(frozen=True)
class Part:
    name: str
    bytes: float
    knobs: tuple[str, ...] = ()  # the parameters that lower it


@dataclass
class Estimate:
    """Bytes per part per phase; the peak is the largest phase."""

    phases: dict[str, list[Part]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def phase_bytes(self, phase: str) -> float:
        return sum(p.bytes for p in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def total(self) -> float:
        return self.phase_bytes(self.peak_phase) if self.phases else 0.0

    def part(self, name: str) -> float:
        """The largest value of part ``name`` over the phases (0 when no phase has it)."""
        return max((p.bytes for parts in self.phases.values() for p in parts if p.name == name), default=0.0)

    def largest(self) -> list[Part]:
        """The peak phase's parts, largest first, empty ones left out."""
        return sorted((p for p in self.phases[self.peak_phase] if p.bytes > 0), key=lambda p: -p.bytes)

    def describe(self, n: int = 4) -> str:
        """``~31.2 GB at its peak (training: weights 14.5 GB, optimizer 8.1 GB, …)``."""
        parts = self.largest()
        shown = ", ".join(f"{p.name} {gb(p.bytes)}" for p in parts[:n]) + (", …" if len(parts) > n else "")
        return f"~{gb(self.total)} at its peak ({self.peak_phase}: {shown})"

    def knobs(self, n: int = 3) -> list[str]:
        """The parameters that lower the peak's ``n`` largest parts, most effective first."""
        out: list[str] = []
        for p in self.largest()[:n]:
            out += [k for k in p.knobs if k not in out]
        return [k for k in out if k != SMALLER] + [SMALLER]


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def weight_bytes(shape: ModelShape, dtype_bytes: float, linear_bits: float | None = None,
                 other_bytes: float | None = None) -> float:
    """The weights: every parameter at ``dtype_bytes``; with ``linear_bits`` the linear layers
    (output head aside: bitsandbytes keeps it) at that many bits and the rest at ``other_bytes``
    (default ``dtype_bytes``). Without the layer list every parameter counts at ``linear_bits``."""
    if linear_bits is None:
        return shape.params * dtype_bytes
    if not shape.linears:
        return shape.params * linear_bits / 8
    linear = min(shape.linear_params, shape.params)
    return linear * linear_bits / 8 + (shape.params - linear) * (other_bytes or dtype_bytes)


def activation_bytes(shape: ModelShape, batch: int, seq: int, act_bytes: float,
                     checkpointing: bool = False) -> float:
    """Activations a training forward keeps for the backward, all layers.

    Per layer ``s·b·h·(34 + 5·a·s/h)`` bytes at 16-bit activations (Korthikanti et al. 2022,
    "Reducing Activation Recomputation in Large Transformer Models", eq. 1, no parallelism);
    the ``5·a·s/h`` term is the attention scores, softmax and its dropout, which fused attention
    (transformers' default ``sdpa``) does not store: counted only for eager attention. Scaled by
    ``act_bytes / 2`` (fp32 activations on CPU). With gradient checkpointing only each layer's
    input (``2·s·b·h`` bytes) is kept, plus one layer's activations while it is recomputed.
    """
    if not (shape.layers and shape.hidden):
        return 0.0
    s, b, h = seq, batch, shape.hidden
    scores = 5 * shape.heads * s / h if shape.eager_attention else 0.0
    layer = s * b * h * (34 + scores) * act_bytes / 2
    if checkpointing:
        return shape.layers * s * b * h * act_bytes + layer
    return shape.layers * layer


def logit_bytes(shape: ModelShape, batch: int, seq: int, act_bytes: float) -> float:
    """Training logits: ``batch × seq × vocab`` in the compute dtype (kept for the backward) and
    their fp32 copy in the loss (transformers' ``ForCausalLMLoss`` upcasts)."""
    return batch * seq * shape.vocab * (act_bytes + 4)


def kv_cache_bytes(shape: ModelShape, batch: int, context: int, dtype_bytes: float) -> float:
    """Keys and values of every layer: ``2 × layers × kv_heads × head_dim × context × batch × bytes``."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * context * batch * dtype_bytes


def ppl_logit_bytes(shape: ModelShape, batch: int, window: int) -> float:
    """A PPL forward's fp32 next-token logits ``batch × window × vocab`` and the loss's
    log-softmax of the same size (``evaluation.perplexity``)."""
    return batch * window * shape.vocab * 4 * 2


def _evaluation_phases(label: str, base: list[Part], shape: ModelShape, ev: Evaluation | None,
                       dtype_bytes: float) -> dict[str, list[Part]]:
    if ev is None:
        return {}
    out: dict[str, list[Part]] = {}
    if ev.ppl_seqlen:
        window = min(ev.ppl_seqlen, shape.context) if shape.context else ev.ppl_seqlen
        out[f"{label} perplexity"] = [*base, Part("PPL logits", ppl_logit_bytes(shape, ev.ppl_batch_size, window),
                                                  ("ppl_batch_size", "seqlen"))]
    if ev.generation_tokens:
        context = GEN_PROMPT_TOKENS + ev.generation_tokens
        context = min(context, shape.context) if shape.context else context
        out[f"{label} generation"] = [*base, Part("KV cache", kv_cache_bytes(shape, ev.batch_size, context, dtype_bytes),
                                                  ("batch_size", "tasks"))]
    return out or {label: list(base)}


def _weights_knobs(work: Work, dtype_bytes: float) -> tuple[str, ...]:
    return ((() if work.cuda else ("device=cuda",)) + (("dtype=bfloat16",) if dtype_bytes >= 4 else ())
            + (("finetuning=qlora",) if work.training and work.training.finetuning != "qlora" else ())
            + (SMALLER,))


def estimate(shape: ModelShape, work: Work) -> Estimate:
    """The step's phases and their parts (see the module docstring)."""
    db = work.dtype_bytes
    wk = _weights_knobs(work, db)
    if work.training is not None:
        return _training(shape, work, wk)
    phases: dict[str, list[Part]] = {}
    notes: tuple[str, ...] = ()
    if work.load_bits is not None and work.merge_first:
        # load_merged: the adapter is merged into float weights, saved, freed, then quantized while loading
        phases["adapter merge"] = [Part("float weights", weight_bytes(shape, db), wk)]
    loaded = weight_bytes(shape, db, work.load_bits)
    phases[{"evaluate": "load"}.get(work.step, work.step)] = [Part("weights", loaded, wk)]
    if work.kept < 1.0:  # the evaluated model is the pruned one
        loaded *= work.kept
    phases.update(_evaluation_phases("evaluation", [Part("weights", loaded, wk)], shape, work.evaluation, db))
    if not shape.layers:
        notes += ("weights only (the model's config is not readable before loading)",)
    return Estimate(phases, notes)


def _training(shape: ModelShape, work: Work, wk: tuple[str, ...]) -> Estimate:
    t = work.training
    db = work.dtype_bytes
    act = 2 if work.cuda else db  # bf16 autocast on CUDA (training.trainer._precision); as loaded on CPU
    phases: dict[str, list[Part]] = {}
    full = Part("weights", weight_bytes(shape, db), wk)
    if t.finetuning == "qlora":
        # prepare_model_for_kbit_training casts what stays unquantized (embeddings, head, norms) to fp32
        base = Part("weights (nf4)", weight_bytes(shape, db, NF4_BITS, other_bytes=4), wk)
    else:
        base = full
    if t.eval_before:  # qlora: the full-precision input is evaluated, freed, then loaded in 4-bit
        phases.update(_evaluation_phases("evaluation before", [full if t.finetuning == "qlora" else base], shape,
                                         work.evaluation, db))
    batch = t.train_batch_size * (2 if t.method == "dpo" else 1)  # dpo: chosen and rejected in one forward
    seq_knobs = ("train_batch_size", "max_length")
    train = [base]
    if t.finetuning == "full":
        n = shape.params
        state = db  # torch's AdamW keeps its moments in the parameters' dtype; bf16 is autocast, no fp32 master copy
        train += [Part("gradients", n * state, ("finetuning=lora",)),
                  Part("optimizer", 2 * n * state, ("finetuning=lora",))]
        if t.method == "dpo":  # trl's DPOTrainer loads a frozen reference copy (LoRA disables the adapter instead)
            train.append(Part("reference model", weight_bytes(shape, db), ("finetuning=lora",)))
    else:
        n = lora_params(shape, t.lora_r, t.target_modules)
        # peft keeps adapters in fp32; trl casts a quantized model's adapters to the bf16 compute dtype
        state = 2 if t.finetuning == "qlora" and work.cuda else 4
        train += [Part("LoRA adapters", n * state, ("lora_r", "target_modules")),
                  Part("gradients", n * state, ("lora_r", "target_modules")),
                  Part("optimizer", 2 * n * state, ("lora_r", "target_modules"))]
    checkpoint_knob = () if t.gradient_checkpointing else ("gradient_checkpointing=true",)
    train += [Part("activations", activation_bytes(shape, batch, t.max_length, act, t.gradient_checkpointing),
                   seq_knobs + checkpoint_knob),
              Part("logits", logit_bytes(shape, batch, t.max_length, act), seq_knobs)]
    phases["training"] = train
    after = [base]
    if t.merge and t.finetuning == "qlora":  # the 4-bit base is dequantized into a float copy to merge into
        after.append(Part("merged copy", shape.params * (2 if work.cuda else 4), ("merge=false",)))
    if t.eval_after:
        phases.update(_evaluation_phases("evaluation after", after, shape, work.evaluation, db))
    elif len(after) > 1:
        phases["merge"] = after
    notes = () if shape.layers else ("weights and optimizer only (the model's config is not readable before loading)",)
    return Estimate(phases, notes)
