"""Structured pruning of Llama / Mistral / Qwen2 decoders into a genuinely smaller model.

Units removed (rows/columns are sliced out, so the tensors and the checkpoint shrink):

* MLP channel ``i``: row ``i`` of ``gate_proj`` and ``up_proj`` and column ``i`` of
  ``down_proj`` (``3·hidden`` weights, plus gate/up bias entries when ``mlp_bias``).
* KV group ``g`` (GQA): key/value head ``g`` and the ``heads // kv_heads`` query heads that read
  it — rows of ``q_proj``/``k_proj``/``v_proj`` (and their biases, Qwen2) and the matching
  columns of ``o_proj``. Removing whole groups keeps ``num_attention_heads / num_key_value_heads``
  and ``head_dim`` unchanged, so HF's ``repeat_kv`` still pairs every query head with its KV head.

Ratio definition: ``ratio`` is the fraction of the model's **total** parameters removed
(embeddings and LM head included, tied weights counted once), i.e. ``1 - params_after /
params_before`` — 8.03B → 6.42B is ratio 0.2. Every pruned layer loses the same number of
channels ``c`` and groups ``g``; the plan picks the integers whose removal is closest to the
target (``targets=both`` first takes the same fraction of KV groups as of the prunable share,
rounded, then fills the rest with MLP channels, which are fine-grained). The achieved ratio must
be within ``RATIO_TOLERANCE`` (0.01, absolute) of the target, otherwise — or when the target
exceeds what the chosen targets can remove while keeping ≥1 channel and ≥1 group per layer —
``UserError`` says which ratios are reachable.

Per-layer sizes and reloading: in transformers 5.23 ``LlamaConfig`` / ``MistralConfig`` /
``Qwen2Config`` are strict dataclasses whose ``intermediate_size``, ``num_attention_heads`` and
``num_key_value_heads`` must be ints (a per-layer list raises
``StrictDataclassFieldValidationError``) and every decoder layer is built from them. So:

* ``keep_layers=0`` (default): all layers are pruned alike, the config is updated
  (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads`` and an explicit
  ``head_dim``, since ``hidden_size // num_attention_heads`` no longer equals it — Qwen2Config
  has no ``head_dim`` field, but the extra attribute is saved and read back), and a plain
  ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` round-trips with identical logits.
* ``keep_layers=N > 0`` leaves the first and last ``N`` layers at full size: the sizes differ,
  which no vanilla config can describe. The config then holds the *pruned* layers' sizes plus
  ``config.pruned_layer_sizes`` (one ``{intermediate_size, num_attention_heads,
  num_key_value_heads}`` dict per layer); plain ``from_pretrained`` refuses it (size mismatch
  error, nothing silently re-initialised) and :func:`load_pruned_model` reloads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mlproject.errors import UserError

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
IMPORTANCES = ("magnitude", "activation")
TARGETS = ("mlp", "heads", "both")
LAYERWISE = ("uniform",)
RATIO_TOLERANCE = 0.01  # |achieved - target| allowed, as a fraction of total parameters
SIZES_KEY = "pruned_layer_sizes"


@dataclass
class PruneConfig:
    """Structured pruning settings."""

    ratio: float = 0.2
    """Fraction of the model's total parameters to remove, in (0, 1); achieved within 0.01."""
    importance: str = "magnitude"
    """``magnitude``: L2 norm of all weights of a channel / KV group. ``activation``
    (Wanda-style): Σ|W|·‖X‖ over the consumer matrix (``down_proj`` columns for a channel,
    ``o_proj`` columns for a group), with ‖X‖ the input-activation norm over calibration tokens."""
    targets: str = "mlp"
    """What to remove: ``mlp`` (intermediate channels), ``heads`` (whole KV groups) or ``both``.
    Heads are coarse (a few groups per layer), so ``heads`` alone reaches only a few ratios."""
    keep_layers: int = 0
    """Leave the first N and the last N decoder layers unpruned (0 = prune every layer).
    N > 0 gives non-uniform sizes: reload those with :func:`load_pruned_model`."""
    layerwise: str = "uniform"
    """How the removal is spread over pruned layers: ``uniform`` (same count in each), the only
    choice that vanilla HF configs can represent."""

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise UserError(f"prune ratio must be a number strictly between 0 and 1, got {self.ratio!r}")
        if self.importance not in IMPORTANCES:
            raise UserError(f"unknown importance {self.importance!r}; choose one of {', '.join(IMPORTANCES)}")
        if self.targets not in TARGETS:
            raise UserError(f"unknown prune targets {self.targets!r}; choose one of {', '.join(TARGETS)}")
        if isinstance(self.keep_layers, bool) or not isinstance(self.keep_layers, int) or self.keep_layers < 0:
            raise UserError(f"keep_layers must be an integer >= 0, got {self.keep_layers!r}")
        if self.layerwise not in LAYERWISE:
            raise UserError(f"unknown layerwise mode {self.layerwise!r}; choose one of {', '.join(LAYERWISE)}")


@dataclass
class PruneReport:
    """What ``prune_model`` did."""

    params_before: int
    """Total parameters before (tied weights once)."""
    params_after: int
    """Total parameters after."""
    target_ratio: float
    """The requested ``ratio``."""
    achieved_ratio: float
    """``1 - params_after / params_before``."""
    pruned_layers: list[int]
    """Indices of the decoder layers that were pruned."""
    channels_removed: int
    """MLP channels removed from each pruned layer."""
    kv_groups_removed: int
    """KV groups (one KV head + its query heads) removed from each pruned layer."""
    layer_sizes: list[dict[str, int]] = field(default_factory=list)
    """Per decoder layer: kept ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``."""
    uniform: bool = True
    """All layers share one size (plain ``from_pretrained`` reloads the model)."""
    kept: dict = field(default_factory=dict)
    """What was kept, as index tensors: ``layers.<i>.mlp`` (MLP channels) and ``layers.<i>.kv``
    (KV groups) of each pruned layer; :func:`apply_kept` re-applies them to the unpruned model
    (a prune run's recipe stores them: < 1 MB at 7B)."""


# ---------------------------------------------------------------------------------------------
# model structure

def _check_model(model) -> None:
    arch = getattr(getattr(model, "config", None), "model_type", None)
    if arch not in SUPPORTED_ARCHS:
        raise UserError(
            f"structured pruning does not support architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    for i, layer in enumerate(_layers(model)):
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.q_proj,
                    layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            if not lin.weight.dtype.is_floating_point:
                raise UserError(f"layer {i} holds {lin.weight.dtype} weights (quantized?); prune a float model")


def _layers(model):
    return model.model.layers


def _attn_shape(layer) -> tuple[int, int, int]:
    """(kv_heads, query heads per kv head, head_dim) of one decoder layer, read from its tensors."""
    attn = layer.self_attn
    hd = attn.head_dim
    kv = attn.k_proj.out_features // hd
    return kv, attn.q_proj.out_features // hd // kv, hd


def _bias_n(lin) -> int:
    return 0 if lin.bias is None else 1


def _channel_cost(layer) -> int:
    mlp = layer.mlp
    return (mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
            + _bias_n(mlp.gate_proj) + _bias_n(mlp.up_proj))


def _group_cost(layer) -> int:
    attn = layer.self_attn
    _, rep, hd = _attn_shape(layer)
    q = rep * hd * (attn.q_proj.in_features + _bias_n(attn.q_proj))
    kv = hd * (attn.k_proj.in_features + _bias_n(attn.k_proj) + attn.v_proj.in_features + _bias_n(attn.v_proj))
    return q + kv + rep * hd * attn.o_proj.out_features


def count_params(model) -> int:
    """Total parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


def layer_sizes(model) -> list[dict[str, int]]:
    """Per decoder layer: its actual ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``."""
    out = []
    for layer in _layers(model):
        kv, rep, _ = _attn_shape(layer)
        out.append({"intermediate_size": layer.mlp.down_proj.in_features,
                    "num_attention_heads": kv * rep, "num_key_value_heads": kv})
    return out


# ---------------------------------------------------------------------------------------------
# planning

def _plan(cfg: PruneConfig, total: int, n_pruned: int, inter: int, kv: int,
          c_cost: int, g_cost: int) -> tuple[int, int]:
    """(channels, groups) to remove from every pruned layer so the total removal hits the ratio."""
    use_mlp = cfg.targets in ("mlp", "both")
    use_heads = cfg.targets in ("heads", "both")
    max_c = inter - 1 if use_mlp else 0
    max_g = kv - 1 if use_heads else 0
    per_layer = cfg.ratio * total / n_pruned
    max_ratio = n_pruned * (max_c * c_cost + max_g * g_cost) / total
    if cfg.ratio > max_ratio + RATIO_TOLERANCE:
        raise UserError(
            f"prune ratio {cfg.ratio:g} is more than targets={cfg.targets} can remove "
            f"(at most {max_ratio:.3f} of all parameters over {n_pruned} pruned layers, "
            "keeping one channel and one KV group per layer)"
        )
    if cfg.targets == "heads":
        g, c = min(max_g, round(per_layer / g_cost)), 0
    elif cfg.targets == "mlp":
        g, c = 0, min(max_c, round(per_layer / c_cost))
    else:
        share = per_layer / (inter * c_cost + kv * g_cost)
        g = min(max_g, round(share * kv), int(per_layer // g_cost))
        c = min(max_c, max(0, round((per_layer - g * g_cost) / c_cost)))
    achieved = n_pruned * (c * c_cost + g * g_cost) / total
    if abs(achieved - cfg.ratio) > RATIO_TOLERANCE:
        if cfg.targets == "heads":
            options = ", ".join(f"{n_pruned * k * g_cost / total:.3f}" for k in range(1, max_g + 1))
            hint = f"removing whole KV groups reaches only {options}; use targets=both or mlp"
        else:
            hint = f"the nearest reachable ratio is {achieved:.3f}"
        raise UserError(f"prune ratio {cfg.ratio:g} cannot be met within {RATIO_TOLERANCE}: {hint}")
    return c, g


# ---------------------------------------------------------------------------------------------
# importance

def _collect_input_norms(model, layer_ids: list[int], targets: str, calibration_ids, batch_size: int):
    """Sum of squared inputs per feature of ``down_proj`` / ``o_proj`` over all calibration tokens."""
    import torch

    sums: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def hook(key):
        def fn(_mod, args):
            x = args[0].detach().float()
            sq = x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0)
            sums[key] = sums[key] + sq if key in sums else sq
        return fn

    layers = _layers(model)
    for i in layer_ids:
        if targets in ("mlp", "both"):
            handles.append(layers[i].mlp.down_proj.register_forward_pre_hook(hook((i, "mlp"))))
        if targets in ("heads", "both"):
            handles.append(layers[i].self_attn.o_proj.register_forward_pre_hook(hook((i, "attn"))))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, calibration_ids.shape[0], batch_size):
                batch = calibration_ids[start:start + batch_size].to(device)
                # Only the hooked inputs matter: skip the [batch, seq, vocab] logits (400 MB for
                # SmolLM2 at 8x256 tokens, more than the model's own decoder activations).
                model(input_ids=batch, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v.sqrt() for k, v in sums.items()}


def _channel_scores(layer, norms):
    mlp = layer.mlp
    down = mlp.down_proj.weight.detach().float()
    if norms is None:
        sq = (mlp.gate_proj.weight.detach().float().pow(2).sum(1) + mlp.up_proj.weight.detach().float().pow(2).sum(1)
              + down.pow(2).sum(0))
        return sq.sqrt()
    return down.abs().sum(0) * norms.to(down.device)  # Wanda Σ_r |W_ri|·‖X_i‖ on down_proj's inputs


def _group_scores(layer, norms):
    attn = layer.self_attn
    kv, rep, hd = _attn_shape(layer)
    o = attn.o_proj.weight.detach().float()  # [hidden, kv*rep*hd]; column block g·rep·hd… is group g
    if norms is not None:
        per_col = o.abs().sum(0) * norms.to(o.device)
        return per_col.reshape(kv, rep * hd).sum(1)
    q = attn.q_proj.weight.detach().float().pow(2).sum(1).reshape(kv, rep * hd).sum(1)
    k = attn.k_proj.weight.detach().float().pow(2).sum(1).reshape(kv, hd).sum(1)
    v = attn.v_proj.weight.detach().float().pow(2).sum(1).reshape(kv, hd).sum(1)
    oo = o.pow(2).sum(0).reshape(kv, rep * hd).sum(1)
    return (q + k + v + oo).sqrt()


# ---------------------------------------------------------------------------------------------
# surgery

def _slice_linear(lin, idx, dim: int) -> None:
    """Keep entries ``idx`` of ``lin`` along ``dim`` (0: output rows + bias, 1: input columns)."""
    import torch

    w = lin.weight
    idx = idx.to(w.device)
    new_w = w.detach().index_select(dim, idx).clone()
    lin.weight = torch.nn.Parameter(new_w, requires_grad=w.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            b = lin.bias
            lin.bias = torch.nn.Parameter(b.detach().index_select(0, idx).clone(), requires_grad=b.requires_grad)
        lin.out_features = new_w.shape[0]
    else:
        lin.in_features = new_w.shape[1]


def _shrink_mlp(layer, keep) -> None:
    mlp = layer.mlp
    _slice_linear(mlp.gate_proj, keep, 0)
    _slice_linear(mlp.up_proj, keep, 0)
    _slice_linear(mlp.down_proj, keep, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())


def _shrink_attn(layer, keep_groups) -> None:
    import torch

    attn = layer.self_attn
    _, rep, hd = _attn_shape(layer)
    ar = torch.arange(hd)
    kv_rows = torch.cat([g * hd + ar for g in keep_groups.tolist()])
    q_rows = torch.cat([(g * rep + r) * hd + ar for g in keep_groups.tolist() for r in range(rep)])
    _slice_linear(attn.q_proj, q_rows, 0)
    _slice_linear(attn.k_proj, kv_rows, 0)
    _slice_linear(attn.v_proj, kv_rows, 0)
    _slice_linear(attn.o_proj, q_rows, 1)
    n_kv = int(keep_groups.numel())
    for name, value in (("num_heads", n_kv * rep), ("num_attention_heads", n_kv * rep),
                        ("num_key_value_heads", n_kv)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def _keep_top(scores, n_keep: int):
    import torch

    return torch.sort(torch.topk(scores, n_keep).indices).values.cpu()


def _apply_sizes_to_config(config, sizes: list[dict[str, int]], pruned: list[int], head_dim: int) -> bool:
    ref = sizes[pruned[0]] if pruned else sizes[0]
    config.intermediate_size = ref["intermediate_size"]
    config.num_attention_heads = ref["num_attention_heads"]
    config.num_key_value_heads = ref["num_key_value_heads"]
    config.head_dim = head_dim
    uniform = all(s == ref for s in sizes)
    if uniform:
        if hasattr(config, SIZES_KEY):
            delattr(config, SIZES_KEY)
    else:
        setattr(config, SIZES_KEY, sizes)
    return uniform


@dataclass
class PrunePlan:
    """What :func:`prune_model` will remove, decided from the model's shapes alone."""

    pruned_layers: list[int]
    channels: int
    """MLP channels removed from each pruned layer."""
    kv_groups: int
    """KV groups removed from each pruned layer."""
    intermediate_size: int
    kv_heads: int
    head_dim: int
    params_before: int
    params_after: int


def check_plan(model, cfg: PruneConfig) -> PrunePlan:
    """Check the architecture, the layers and that ``cfg.ratio`` is reachable; plan the removal.

    Reads only shapes and dtypes, so it also works on a meta-device model built from a config
    (a step checks its settings this way before any weight is loaded). Raises ``UserError``.
    """
    _check_model(model)
    layers = _layers(model)
    n = len(layers)
    if 2 * cfg.keep_layers >= n:
        raise UserError(f"keep_layers={cfg.keep_layers} keeps all {n} decoder layers; nothing left to prune")
    pruned = list(range(cfg.keep_layers, n - cfg.keep_layers))
    shapes = {(layers[i].mlp.down_proj.in_features, *_attn_shape(layers[i]), _channel_cost(layers[i]),
               _group_cost(layers[i])) for i in pruned}
    if len(shapes) != 1:
        raise UserError("layers to prune differ in size (already pruned non-uniformly?); prune the original model")
    inter, kv, _rep, head_dim, c_cost, g_cost = shapes.pop()
    before = count_params(model)
    c, g = _plan(cfg, before, len(pruned), inter, kv, c_cost, g_cost)
    return PrunePlan(pruned_layers=pruned, channels=c, kv_groups=g, intermediate_size=inter, kv_heads=kv,
                     head_dim=head_dim, params_before=before,
                     params_after=before - len(pruned) * (c * c_cost + g * g_cost))


def prune_model(model, cfg: PruneConfig, calibration_ids=None, batch_size: int = 8) -> PruneReport:
    """Structured-prune ``model`` in place to remove ``cfg.ratio`` of its parameters.

    Args:
        model: a Llama / Mistral / Qwen2 ``*ForCausalLM`` with float weights.
        cfg: what and how much to prune.
        calibration_ids: ``LongTensor [n_sequences, seq_len]`` of token ids (no padding) whose
            activations drive ``importance=activation``; required there, ignored otherwise.
        batch_size: calibration sequences per forward pass.
    """
    import torch

    plan = check_plan(model, cfg)
    if cfg.importance == "activation":
        if calibration_ids is None or calibration_ids.numel() == 0:
            raise UserError("importance=activation needs calibration token ids")
        if calibration_ids.dim() != 2:
            raise UserError(f"calibration_ids must be [n_sequences, seq_len], got {tuple(calibration_ids.shape)}")
    layers = _layers(model)
    n = len(layers)
    pruned, c, g = plan.pruned_layers, plan.channels, plan.kv_groups
    inter, kv, head_dim = plan.intermediate_size, plan.kv_heads, plan.head_dim
    before = plan.params_before
    log.info("pruning %d of %d layers: -%d MLP channels (of %d), -%d KV groups (of %d) each",
             len(pruned), n, c, inter, g, kv)

    norms = None
    if cfg.importance == "activation":
        norms = _collect_input_norms(model, pruned, cfg.targets, calibration_ids, batch_size)
    kept = {}
    with torch.no_grad():
        for i in pruned:
            layer = layers[i]
            if c:
                scores = _channel_scores(layer, None if norms is None else norms[(i, "mlp")])
                kept[f"layers.{i}.mlp"] = _keep_top(scores, inter - c)
                _shrink_mlp(layer, kept[f"layers.{i}.mlp"])
            if g:
                scores = _group_scores(layer, None if norms is None else norms[(i, "attn")])
                kept[f"layers.{i}.kv"] = _keep_top(scores, kv - g)
                _shrink_attn(layer, kept[f"layers.{i}.kv"])
    sizes = layer_sizes(model)
    uniform = _apply_sizes_to_config(model.config, sizes, pruned, head_dim)
    after = count_params(model)
    report = PruneReport(
        params_before=before, params_after=after, target_ratio=cfg.ratio,
        achieved_ratio=1 - after / before, pruned_layers=pruned, channels_removed=c,
        kv_groups_removed=g, layer_sizes=sizes, uniform=uniform,
        kept={k: v.to(torch.int16 if v.numel() and int(v.max()) < 2**15 else torch.int32) for k, v in kept.items()},
    )
    log.info("pruned %d → %d parameters (ratio %.4f, target %.4f)", before, after,
             report.achieved_ratio, cfg.ratio)
    return report


def apply_kept(model, kept: dict) -> None:
    """Re-apply a pruning to the model it was decided on: keep the MLP channels / KV groups that
    ``kept`` (:attr:`PruneReport.kept`) names and resize the config, as :func:`prune_model` did.
    Index selection only: the result equals the pruned model bit for bit."""
    import torch

    _check_model(model)
    layers = _layers(model)
    head_dim = _attn_shape(layers[0])[2]
    pruned = sorted({int(k.split(".")[1]) for k in kept})
    if pruned and pruned[-1] >= len(layers):
        raise UserError(f"the pruning names layer {pruned[-1]} but the model has {len(layers)} decoder layers")
    with torch.no_grad():
        for i in pruned:
            if f"layers.{i}.mlp" in kept:
                _shrink_mlp(layers[i], kept[f"layers.{i}.mlp"].long())
            if f"layers.{i}.kv" in kept:
                _shrink_attn(layers[i], kept[f"layers.{i}.kv"].long())
    _apply_sizes_to_config(model.config, layer_sizes(model), pruned, head_dim)


def load_pruned_model(path, dtype=None):
    """Load a checkpoint written by ``save_pretrained`` after :func:`prune_model`.

    Uniform checkpoints go straight to ``AutoModelForCausalLM.from_pretrained``. Non-uniform
    ones (``keep_layers > 0``, ``config.pruned_layer_sizes`` set) are built on the meta device,
    each layer is resized to its recorded shape, and the safetensors weights are assigned.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    sizes = getattr(config, SIZES_KEY, None)
    if not sizes:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} holds no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for layer, size in zip(_layers(model), sizes):
            _shrink_mlp(layer, torch.arange(size["intermediate_size"]))
            _shrink_attn(layer, torch.arange(size["num_key_value_heads"]))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match its pruned layer sizes "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: rebuild them for real.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise UserError(f"{path}: tensors left uninitialised after loading: {leftover[:3]}")
    model.eval()
    return model
