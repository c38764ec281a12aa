"""Architecture adapters: where a model's decoder blocks are and which op feeds which linears.

Architecture knowledge is data, as in llm-compressor: a registry of `MappingSpec`s per model family
(the op whose output is scaled -> the linears that read it -> the module whose output measures the
loss). The specs are resolved against each block's actual module tree, so optional parts (a dense
layer inside an MoE model, a shared expert, per-expert linears) are discovered, and one generic
algorithm (`awqforge.awq`) runs over the result. A spec that cannot apply to a block comes back as a `Mapping`
with a `skip_reason`. Under grouped-query attention `v_proj` (kv_heads * head_dim outputs) and `o_proj`
(heads * head_dim inputs) differ in width: the mapping gets a `GQALayout`, one scale per KV channel repeated
over the query heads of its group as o_proj's input scale, which folds exactly (each query head reads its KV
head's values through a softmax-weighted sum, linear in v).

MoE experts: transformers 5.x stores a block's experts as fused 3D parameters
(`mlp.experts.gate_up_proj` [E, 2*I, H], `mlp.experts.down_proj` [E, H, I]; Llama 4 stores them [in, out] as
`torch.bmm` reads them: `feed_forward.experts.gate_up_proj` [E, H, 2*I], `down_proj` [E, I, H], in memory and
in its checkpoints). `ArchAdapter.prepare_block` replaces that module by `UnfusedExperts`, a ModuleList of
per-expert `nn.Linear`s named as in the original checkpoints (`mlp.experts.{e}.gate_proj|up_proj|down_proj`;
Mixtral `w1|w3|w2`), which is also the layout vLLM and AutoAWQ (and llm-compressor, for Llama 4) load
quantized experts from. `ArchAdapter.checkpoint_name` maps a module
name to its checkpoint tensor prefix (Mixtral: `.mlp.` -> `.block_sparse_moe.`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from awqforge.limits import SUPPORTED_GROUP_SIZES
from awqforge.patterns import matches_any, unmatched_patterns
from awqforge.quant import effective_group_size


class UnsupportedArchitecture(ValueError):
    """The model family has no adapter: refused before any work starts."""


@dataclass(frozen=True)
class MappingSpec:
    """One AWQ mapping as data; names are relative to a decoder block, `*` matches one name part.

    prev: the op whose output channels get divided by the scales (norm, linear, activation).
    linears: the linears reading that output; their input columns get multiplied by the scales.
    inspect: the module whose output measures the loss; None = the linears' own outputs.
    absorb: unquantized readers of the same input (MoE routers): they absorb the scales, never quantized.
    prev_rows: for a fused prev linear, which output rows feed `linears` ("v": the v part of a fused
        qkv, "up": the second half of a fused gate_up).
    disabled: a reason this spec is never applied (reported, not silently dropped).
    Wildcards in `prev` are bound by the match and substituted, in order, into the other names, so
    "mlp.experts.*.up_proj" -> "mlp.experts.*.down_proj" pairs each expert with itself.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    absorb: tuple[str, ...] = ()
    prev_rows: str | None = None
    disabled: str | None = None


@dataclass
class Mapping:
    """A `MappingSpec` resolved on one block: the modules themselves."""

    prev_name: str
    prev: nn.Module
    linear_names: list[str]
    linears: list[nn.Linear]
    inspect_name: str | None
    inspect: nn.Module | None
    absorb_names: list[str] = field(default_factory=list)
    absorb: list[nn.Module] = field(default_factory=list)
    prev_rows: slice | None = None
    norm_plus_one: bool = False
    skip_reason: str | None = None
    gqa: GQALayout | None = None  # prev's channels (KV heads) are read by several query heads each

    @property
    def scales_an_activation(self) -> bool:
        """Whether the scales go into a `ScaledActivation` (`<act>.scales`, a tensor the model has no slot for)."""
        return isinstance(self.prev, ScaledActivation) or not (
            isinstance(self.prev, nn.Linear) or any(True for _ in self.prev.parameters())
        )

    def to_linear(self, scales: torch.Tensor) -> torch.Tensor:
        """Scales over prev's channels -> the linears' input-channel scales (repeated over query heads)."""
        return scales if self.gqa is None else self.gqa.expand(scales)

    def to_prev(self, per_input: torch.Tensor) -> torch.Tensor:
        """A per-input-channel statistic of the linears -> prev's channels (mean over the query heads)."""
        return per_input if self.gqa is None else self.gqa.reduce(per_input)

    @property
    def name(self) -> str:
        return f"{self.prev_name}->{_summarize(self.linear_names)}"

    @property
    def linear_loss(self) -> bool:
        """True when the loss is on the linears' own outputs (exact from the input Gram matrix)."""
        return self.inspect is None or (len(self.linears) == 1 and self.inspect is self.linears[0])


@dataclass(frozen=True)
class GQALayout:
    """Grouped-query attention: query head h reads KV head h // n_rep (transformers' repeat_kv), so o_proj's
    input channel h * head_dim + d reads v channel (h // n_rep) * head_dim + d."""

    kv_heads: int
    n_rep: int
    head_dim: int

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """[kv_heads * head_dim] -> [kv_heads * n_rep * head_dim]."""
        kv, r, d = self.kv_heads, self.n_rep, self.head_dim
        return s.reshape(kv, 1, d).expand(kv, r, d).reshape(kv * r * d)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """[kv_heads * n_rep * head_dim] -> [kv_heads * head_dim], the mean over each group's query heads."""
        return x.reshape(self.kv_heads, self.n_rep, self.head_dim).mean(1).reshape(-1)


def _summarize(names: list[str]) -> str:
    if len(names) <= 4:
        return ",".join(names)
    return f"{names[0]},...,{names[-1]} ({len(names)} linears)"


@dataclass(frozen=True)
class ExpertLayout:
    """Per-expert linear names after unfusing (as the original checkpoints name them), and how the fused
    module lays out and routes: `in_out` = parameters stored [E, in, out] (Llama 4's bmm layout) rather than
    [E, out, in]; `dense_routing` = the fused forward takes every token for every expert, [E * T, H], already
    multiplied by its router score (0 for experts not chosen; Llama 4) rather than (hidden, top_k_index,
    top_k_weights)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    in_out: bool = False
    dense_routing: bool = False
    keep_fused: str | None = None  # why fused experts stay fused (and in full precision), if they do


class ScaledActivation(nn.Module):
    """act(x) / scales: how AWQ folds scales into an activation that is not positively homogeneous.

    The parameter is named `scales`, so the tensor is `<...>.act.scales` as AutoAWQ and vLLM expect.
    """

    def __init__(self, act: nn.Module, scales: torch.Tensor):
        super().__init__()
        self.act = act
        self.scales = nn.Parameter(scales.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) / self.scales.to(x.dtype)


class ExpertMLP(nn.Module):
    """One expert as three linears: down(act(gate(x)) * up(x))."""

    def __init__(
        self, layout: ExpertLayout, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: nn.Module
    ):
        super().__init__()
        self.layout = layout
        setattr(self, layout.gate, gate)
        setattr(self, layout.up, up)
        setattr(self, layout.down, down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        return getattr(self, lay.down)(self.act_fn(getattr(self, lay.gate)(x)) * getattr(self, lay.up)(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in replacement for transformers' fused `*Experts` module, one `ExpertMLP` per expert.

    Same forward signature and arithmetic as the fused module (hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]); experts that receive no token are not run.

    `token_keep` (bool [T], set by `quantize_block` during its FP pass over right-padded calibration rows):
    tokens outside it (padding) are routed to no expert, so the experts' statistics see real tokens only.
    Only the padding positions' outputs change, and no real token reads them (causal attention).
    """

    token_keep: torch.Tensor | None = None

    def __init__(self, experts: Iterable[ExpertMLP], num_experts: int):
        super().__init__(experts)
        self.num_experts = num_experts

    def _keep(self, n_tokens: int) -> torch.Tensor | None:
        keep = self.token_keep
        return keep if keep is not None and keep.numel() == n_tokens else None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        keep = self._keep(hidden_states.shape[0])
        if keep is not None:
            top_k_index = torch.where(keep.to(top_k_index.device)[:, None], top_k_index, -1)
        for expert_idx in torch.unique(top_k_index).tolist():
            if expert_idx < 0 or expert_idx >= self.num_experts:
                continue
            token_idx, top_k_pos = torch.where(top_k_index == expert_idx)
            out = self[expert_idx](hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


class UnfusedDenseExperts(UnfusedExperts):
    """Drop-in replacement for Llama 4's fused experts: input [E * T, H], expert e's tokens in rows
    e*T..(e+1)*T, already scaled by the router (zero rows for tokens not routed to e); output [E * T, H].

    Zero rows are not run: an expert has no bias and act(0) = 0, so its output there is 0 (exact), and the
    calibration statistics of each expert's linears see only the tokens routed to it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        out = torch.zeros_like(x)
        keep = self._keep(x.shape[1])
        for e in range(self.num_experts):
            routed = x[e].ne(0).any(-1)
            rows = torch.nonzero(routed if keep is None else routed & keep.to(routed.device)).squeeze(-1)
            if rows.numel():
                out[e].index_copy_(0, rows, self[e](x[e, rows]).to(out.dtype))
        return out.view(-1, hidden_states.shape[-1])


def unfuse_experts(experts: nn.Module, layout: ExpertLayout) -> UnfusedExperts:
    """Per-expert nn.Linear modules from fused [E, 2I, H] / [E, H, I] parameters (gate rows first), or
    [E, H, 2I] / [E, I, H] with `layout.in_out` (gate columns first)."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if layout.in_out:  # nn.Linear weights are [out, in]: a transposed view, copied below
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    n_exp, two_i, hidden = gate_up.shape
    inter = two_i // 2
    modules = []
    for e in range(n_exp):
        lin = [
            nn.Linear(hidden, inter, bias=False, device=gate_up.device, dtype=gate_up.dtype),
            nn.Linear(hidden, inter, bias=False, device=gate_up.device, dtype=gate_up.dtype),
            nn.Linear(inter, hidden, bias=False, device=down.device, dtype=down.dtype),
        ]
        if gate_up.device.type != "meta":
            with torch.no_grad():
                lin[0].weight.copy_(gate_up[e, :inter])
                lin[1].weight.copy_(gate_up[e, inter:])
                lin[2].weight.copy_(down[e])
        for m in lin:
            m.weight.requires_grad_(False)
        modules.append(ExpertMLP(layout, lin[0], lin[1], lin[2], experts.act_fn))
    return (UnfusedDenseExperts if layout.dense_routing else UnfusedExperts)(modules, n_exp)


def kept_fused_reason(experts: nn.Module, layout: ExpertLayout) -> str | None:
    """Why fused experts cannot become per-expert `ExpertMLP`s (down(act(gate(x)) * up(x)), gate rows first,
    no biases), or None when they can. Experts that cannot (gpt-oss: biases, interleaved gate/up rows and a
    clamped gated activation) stay fused and in full precision; the block's other linears are quantized."""
    if layout.keep_fused:
        return layout.keep_fused
    if not hasattr(experts, "act_fn"):
        return f"{type(experts).__name__} has no act_fn: its activation is not act(gate) * up"
    biases = [n for n, p in experts.named_parameters(recurse=False) if "bias" in n and p is not None]
    if biases:
        return f"{type(experts).__name__} has expert biases ({', '.join(biases)})"
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if not isinstance(down, torch.Tensor) or down.dim() != 3:
        return f"{type(experts).__name__}.down_proj is not a 3-D parameter"
    hidden_gu = gate_up.shape[1] if layout.in_out else gate_up.shape[2]
    hidden_d = down.shape[2] if layout.in_out else down.shape[1]
    if hidden_gu != hidden_d or gate_up.shape[0] != down.shape[0]:
        return f"{type(experts).__name__}: gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} layout"
    return None


_NEVER_QUANTIZE = (
    "lm_head",
    "*.mlp.gate",
    "mlp.gate",
    "*shared_expert_gate",
    "*.router",
    "router",
    "*.gate.wg",  # Hunyuan's router (a module holding one linear)
    "mlp.gate.wg",
    "*.router.gate",  # AFMoE's router (a module holding one linear)
    "router.gate",
    "*.router.layer",  # DBRX's router (a module holding one linear)
)


@dataclass(frozen=True)
class ArchAdapter:
    """Everything AWQForge knows about one model family."""

    family: str
    layers_attr: str
    specs: tuple[MappingSpec, ...]
    norm_plus_one: bool = False  # Gemma RMSNorm computes x * (1 + w)
    experts: ExpertLayout | None = None
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    kept_for_init: tuple[str, ...] = ()  # linears the model's _init_weights reads (keep_linears_read_at_init)

    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_attr.split("."):
            obj = getattr(obj, part)
        return obj

    def prepare_block(self, block: nn.Module) -> nn.Module:
        """Unfuse 3D expert parameters into per-expert linears (idempotent; works on the meta device)."""
        if self.experts is None:
            return block
        for name, mod in list(block.named_modules()):
            if (
                isinstance(getattr(mod, "gate_up_proj", None), nn.Parameter)
                and getattr(mod, "down_proj", None) is not None
            ):
                if mod.gate_up_proj.dim() != 3 or kept_fused_reason(mod, self.experts) is not None:
                    continue  # kept as is, in full precision (see kept_fused_reason)
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attr, unfuse_experts(mod, self.experts))
        return block

    def mappings(self, block: nn.Module) -> list[Mapping]:
        """Resolve the family's specs on this block; inapplicable ones come back with `skip_reason`."""
        self.prepare_block(block)
        modules = dict(block.named_modules())
        out: list[Mapping] = []
        for spec in self.specs:
            for prev_name, binds in _match(spec.prev, modules):
                linear_names = [n for pat in spec.linears for n, _ in _match(_bind(pat, binds), modules)]
                linear_names = [n for n in linear_names if isinstance(modules[n], nn.Linear)]
                if not linear_names:
                    continue
                inspect_name = _bind(spec.inspect, binds) if spec.inspect is not None else None
                if inspect_name is not None and inspect_name not in modules:
                    continue
                absorb_names = [n for pat in spec.absorb for n, _ in _match(_bind(pat, binds), modules)]
                m = Mapping(
                    prev_name=prev_name,
                    prev=modules[prev_name],
                    linear_names=linear_names,
                    linears=[modules[n] for n in linear_names],
                    inspect_name=inspect_name,
                    inspect=modules[inspect_name] if inspect_name is not None else None,
                    absorb_names=absorb_names,
                    absorb=[modules[n] for n in absorb_names],
                    norm_plus_one=self.norm_plus_one
                    and not isinstance(modules[prev_name], (nn.Linear, nn.LayerNorm)),
                    skip_reason=spec.disabled,
                )
                if m.skip_reason is None:
                    m.prev_rows, m.skip_reason, m.gqa = _prev_rows(spec, m, modules)
                out.append(m)
        _one_fold_per_prev(out)
        return out

    def never_quantize(self, name: str) -> bool:
        """lm_head and MoE routers stay in full precision, whatever the settings."""
        return any(fnmatch.fnmatchcase(name, p) for p in _NEVER_QUANTIZE)

    def weight_read_directly(self, block: nn.Module, name: str) -> bool:
        """Whether the linear's parent or another ancestor in the block (a transformers class) reads
        `self.<path to the linear>.weight` (Mamba's dt_proj in the discretisation; Ergo's decoder layer reads
        `self.self_attn.o_proj.weight.dtype`): a quantized layer has no `weight`, so such a linear stays in full precision. A read
        under a condition on the parent's own settings that does not hold for it does not count (Bloom's
        `if self.pretraining_tp > 1 and self.slow_but_exact:` path through `self.dense.weight`)."""
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):  # the parent, then each further ancestor up to the block
            parent_name, child = ".".join(parts[:i]), ".".join(parts[i:])
            parent = block.get_submodule(parent_name) if parent_name else block
            if f"self.{child}.weight" not in _forward_source(type(parent)):
                continue
            if any(
                all(_condition(test, parent) is not (not in_body) for test, in_body in conditions)
                for conditions in _weight_reads(type(parent), child)
            ):
                return True
        return False

    def quantizable_linears(
        self, block: nn.Module, skip_patterns: Iterable[str] = (), prefix: str = ""
    ) -> dict[str, nn.Linear]:
        """The block's linears that get quantized, by name relative to the block; `skip_patterns` are
        matched against full module names (`prefix`: the block's own, e.g. "model.layers.3"), so a caller
        that gives patterns must give the prefix (without it 'model.layers.0.*' would match nothing)."""
        self.prepare_block(block)
        skip = tuple(skip_patterns)
        if skip and not prefix:
            raise ValueError(
                "quantizable_linears: skip patterns match full module names; give the block prefix"
            )
        return {
            n: m
            for n, m in block.named_modules()
            if self.can_quantize(block, n, m) and not matches_any(f"{prefix}.{n}" if prefix else n, skip)
        }

    def can_quantize(self, block: nn.Module, name: str, module: nn.Module) -> bool:
        """Whether a module of the block (by block-relative name) is a linear this engine may quantize."""
        return (
            isinstance(module, nn.Linear)
            and type(module).forward
            is nn.Linear.forward  # a subclass with its own forward (FalconLinear): FP
            and not self.never_quantize(name)
            and not self.weight_read_directly(block, name)
            and name not in self.kept_for_init
        )

    def checkpoint_name(self, module_name: str) -> str:
        """The checkpoint tensor prefix of a module (full or block-relative name)."""
        name = f".{module_name}"
        for src, dst in self.checkpoint_renames:
            name = name.replace(src, dst)
        return name[1:]


_SOURCES: dict[type, str] = {}


def keep_linears_read_at_init(adapter: ArchAdapter, model: nn.Module) -> ArchAdapter:
    """The adapter keeping in full precision the linears whose weight the model's own `_init_weights` reads
    through their parent (FalconMamba's mixer.out_proj, NanoChat's self_attn.o_proj) or on the linear itself
    without checking it has one (RWKV's): transformers runs it on every module after loading, and a quantized
    linear has no `weight`, so the artifact would not load.

    Probed on `model`, a skeleton on the meta device: each linear's weight taken away in turn, its parent
    initialised."""
    from awqforge.streaming import init_weights_of

    # the init transformers runs on the blocks: their nearest PreTrainedModel's (a multimodal model's language model)
    init = init_weights_of(model, adapter.layers_attr) if hasattr(model, "_init_weights") else None
    kept, seen, n_linears = set(), {}, 0
    for block in adapter.get_layers(model) if init is not None else []:
        for parent_name, parent in block.named_modules():
            for child_name, child in parent.named_children():
                if not isinstance(child, nn.Linear):
                    continue
                n_linears += 1
                key = (type(parent), child_name)
                if key not in seen:  # read through the parent, or by the init of a linear itself (RWKV's)
                    seen[key] = _init_reads_weight(init, parent, child) or _init_reads_weight(
                        init, child, child
                    )
                if seen[key]:
                    kept.add(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not kept:
        return adapter
    return dataclasses.replace(adapter, kept_for_init=tuple(sorted(kept)))


def _init_reads_weight(init, parent: nn.Module, child: nn.Linear) -> bool:
    try:
        init(parent)
    except Exception:  # noqa: BLE001 - an init that fails with every weight present tells nothing
        return False
    weight = child._parameters.pop("weight")
    try:
        init(parent)
        return False
    except AttributeError:
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        child._parameters["weight"] = weight


def refuse_nothing_to_quantize(model: nn.Module, adapter: ArchAdapter) -> None:
    """Raise UnsupportedArchitecture, before any work, when no linear of the blocks can be quantized (Falcon's
    FalconLinear has its own forward; ModernBERT-decoder's init reads every linear's weight)."""
    if has_experts(model, adapter):
        return
    linears = set()
    for block in adapter.get_layers(model):
        for name, mod in block.named_modules():
            if adapter.can_quantize(block, name, mod):
                return
            if isinstance(mod, nn.Linear):
                linears.add(name)
    listed = ", ".join(sorted(linears)[:6]) + (", ..." if len(linears) > 6 else "")
    raise UnsupportedArchitecture(
        f"model type {getattr(model.config, 'model_type', None)!r}: none of its blocks' linears "
        f"({listed or 'none'}) can be quantized (a linear class with its own forward, or a weight that its "
        f"forward or transformers' initialisation reads), so no loadable quantized artifact of it could be "
        f"written; keep it in its original precision."
    )


def _forward_source(cls: type) -> str:
    if cls not in _SOURCES:
        import inspect

        try:  # the whole class: the weight may be read in a helper the forward calls (Mamba's slow_forward)
            _SOURCES[cls] = inspect.getsource(cls) if cls.__module__.startswith("transformers.") else ""
        except (OSError, TypeError):
            _SOURCES[cls] = ""
    return _SOURCES[cls]


_READS: dict[tuple[type, str], list] = {}


def _self_path(node) -> str | None:
    """`self.a.b` -> "a.b" (an attribute chain on self), else None."""
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join(reversed(parts)) if isinstance(node, ast.Name) and node.id == "self" and parts else None


def _weight_reads(cls: type, child: str) -> list[list[tuple]]:
    """Per read of `self.<child>.weight` in the class source (`child` may be a dotted path to a descendant),
    the `if` tests around it: (test, in its body)."""
    import ast
    import textwrap

    if (cls, child) not in _READS:
        reads: list[list[tuple]] = []
        try:
            tree = ast.parse(textwrap.dedent(_forward_source(cls)))
        except SyntaxError:
            tree = None

        def visit(node: ast.AST, conditions: list[tuple]) -> None:
            if isinstance(node, ast.Attribute) and node.attr == "weight" and _self_path(node.value) == child:
                reads.append(conditions)
            if isinstance(node, ast.If):
                visit(node.test, conditions)
                for sub in node.body:
                    visit(sub, [*conditions, (node.test, True)])
                for sub in node.orelse:
                    visit(sub, [*conditions, (node.test, False)])
                return
            for sub in ast.iter_child_nodes(node):
                visit(sub, conditions)

        if tree is None:
            reads.append([])  # unreadable: counted as read
        else:
            visit(tree, [])
        _READS[(cls, child)] = reads
    return _READS[(cls, child)]


def _condition(test, module: nn.Module) -> bool | None:
    """The value of an `if` test made of the module's own plain settings (`self.pretraining_tp > 1 and
    self.slow_but_exact`), constants, comparisons, and/or/not; None when it holds anything else."""
    import ast
    import operator

    compare = {
        ast.Gt: operator.gt,
        ast.GtE: operator.ge,
        ast.Lt: operator.lt,
        ast.LtE: operator.le,
        ast.Eq: operator.eq,
        ast.NotEq: operator.ne,
        ast.Is: operator.is_,
        ast.IsNot: operator.is_not,
    }
    missing = object()

    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            v = module.__dict__.get(node.attr, missing)
            return v if v is None or isinstance(v, (bool, int, float, str)) else missing
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            v = value(node.operand)
            return missing if v is missing else not v
        if isinstance(node, ast.BoolOp):
            vals = [value(v) for v in node.values]
            if any(v is missing for v in vals):
                return missing
            return all(vals) if isinstance(node.op, ast.And) else any(vals)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in compare:
            a, b = value(node.left), value(node.comparators[0])
            if a is missing or b is missing:
                return missing
            try:
                return compare[type(node.ops[0])](a, b)
            except TypeError:
                return missing
        return missing

    v = value(test)
    return None if v is missing else bool(v)


def _match(pattern: str, modules: dict[str, nn.Module]) -> list[tuple[str, tuple[str, ...]]]:
    if "*" not in pattern:
        return [(pattern, ())] if pattern in modules else []
    rx = re.compile("^" + re.escape(pattern).replace(r"\*", r"([^.]+)") + "$")
    hits = [(n, m.groups()) for n in modules if (m := rx.match(n))]
    return sorted(hits, key=lambda h: [int(g) if g.isdigit() else g for g in h[1]])


def _bind(pattern: str, binds: tuple[str, ...]) -> str:
    for b in binds:
        pattern = pattern.replace("*", b, 1)
    return pattern


def _one_fold_per_prev(maps: list[Mapping]) -> None:
    """Skip all but one of the applicable mappings that fold into the same op (same prev, same rows): the one
    with the most linears, the first on ties. A structural adapter's specs are the union over its blocks, so on
    a hybrid block another layer type's spec can resolve on part of what a norm feeds (Bailing's MLA
    `input_layernorm -> q_a_proj, kv_a_proj_with_mqa, g_proj` finds only g_proj on a linear-attention block);
    a second fold into the norm would rescale the other mapping's linears' inputs without their weights."""
    kept: dict[tuple, Mapping] = {}
    for m in sorted(maps, key=lambda m: -len(m.linears)):
        if m.skip_reason is not None:
            continue
        key = (id(m.prev), str(m.prev_rows))
        if key in kept:
            m.skip_reason = f"{kept[key].name} folds its scales into {m.prev_name} already"
        else:
            kept[key] = m


def _prev_rows(
    spec: MappingSpec, m: Mapping, modules: dict[str, nn.Module]
) -> tuple[slice | None, str | None, GQALayout | None]:
    """Which prev output rows feed the linears, how KV channels repeat over query heads (GQA), or why the
    mapping cannot apply."""
    width = m.linears[0].in_features
    prev = m.prev
    if isinstance(prev, nn.Linear):
        n_out = prev.out_features
        if spec.prev_rows == "v":
            # fused qkv = [q (heads*d), k (kv*d), v (kv*d)]; v width = o_proj width only without GQA
            if n_out == 3 * width:
                return slice(n_out - width, n_out), None, None
            v_rows = (n_out - width) // 2
            gqa, why = _gqa_layout(m, modules, v_rows)
            if gqa is None:
                return (
                    None,
                    (
                        f"the v part of {m.prev_name} ({v_rows} of {n_out} rows) does not match "
                        f"{m.linear_names[0]}'s input width {width}: {why}"
                    ),
                    None,
                )
            return slice(n_out - v_rows, n_out), None, gqa
        if spec.prev_rows == "up":
            if n_out != 2 * width:
                return None, f"{m.prev_name} has {n_out} rows, expected 2 x {width} for a fused gate_up", None
            return slice(width, n_out), None, None
        if n_out != width:
            gqa, why = _gqa_layout(m, modules, n_out)
            if gqa is None:
                return (
                    None,
                    (
                        f"shapes differ: {m.prev_name} has {n_out} outputs but {m.linear_names[0]} reads {width} "
                        f"channels: {why}"
                    ),
                    None,
                )
            return None, None, gqa
        return None, None, None
    weight = getattr(prev, "weight", None)
    if weight is not None and weight.dim() == 1 and weight.shape[0] != width:
        return (
            None,
            f"{m.prev_name} has {weight.shape[0]} channels but {m.linear_names[0]} reads {width}",
            None,
        )
    return None, None, None


def _gqa_layout(m: Mapping, modules: dict[str, nn.Module], v_width: int) -> tuple[GQALayout | None, str]:
    """The GQA layout of a v -> o mapping whose widths differ, from the attention module that holds both
    (its `head_dim`, else its config's), or (None, why not)."""
    width = m.linears[0].in_features
    if len(m.linears) != 1:
        return None, "not a single output projection"
    parent = m.prev_name.rpartition(".")[0]
    if parent != m.linear_names[0].rpartition(".")[0] or parent not in modules:
        return None, "v and the output projection are not in one attention module"
    attn = modules[parent]
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int):
        cfg = getattr(attn, "config", None)
        head_dim = getattr(cfg, "head_dim", None)
        if not isinstance(head_dim, int) and getattr(cfg, "num_attention_heads", None):
            head_dim = width // cfg.num_attention_heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        return None, f"{parent} states no head_dim, so no per-KV-channel scale can be folded"
    if (
        v_width % head_dim
        or width % head_dim
        or (width // head_dim) % (v_width // head_dim or 1)
        or not v_width
    ):
        return None, (
            f"head_dim {head_dim} does not split them into KV heads shared by whole groups of query heads, "
            "so no per-channel scale can be folded"
        )
    kv = v_width // head_dim
    return GQALayout(kv, width // head_dim // kv, head_dim), ""


# ---- the registry -----------------------------------------------------------------------------

_ATTN = MappingSpec(
    "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
)
_VO = MappingSpec("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj")
_MLP = MappingSpec("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp")
_UPDOWN = MappingSpec("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")
_LLAMA = (_ATTN, _VO, _MLP, _UPDOWN)
_GEMMA2 = (
    _ATTN,
    _VO,
    MappingSpec("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    _UPDOWN,
)


def _moe_specs(gate: str, up: str, down: str, shared: bool) -> tuple[MappingSpec, ...]:
    linears = (f"mlp.experts.*.{gate}", f"mlp.experts.*.{up}")
    absorb: tuple[str, ...] = ("mlp.gate",)
    extra: tuple[MappingSpec, ...] = ()
    if shared:
        linears += ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
        absorb += ("mlp.shared_expert_gate",)
        extra = (
            MappingSpec(
                "mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), "mlp.shared_expert.down_proj"
            ),
        )
    return (
        _ATTN,
        _VO,
        MappingSpec("post_attention_layernorm", linears, "mlp", absorb=absorb),
        MappingSpec(f"mlp.experts.*.{up}", (f"mlp.experts.*.{down}",), f"mlp.experts.*.{down}"),
        *extra,
        # dense layers inside an MoE model (Qwen2-MoE mlp_only_layers / decoder_sparse_step)
        _MLP,
        _UPDOWN,
    )


_PHI3 = (
    MappingSpec("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    MappingSpec("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_rows="v"),
    MappingSpec("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    MappingSpec("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_rows="up"),
)
_OPT = (
    MappingSpec(
        "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
    ),
    MappingSpec("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
    MappingSpec("final_layer_norm", ("fc1",), "fc1"),
    # ReLU is positively homogeneous: relu(x / s) = relu(x) / s, so fc1's rows take the scales exactly
    MappingSpec("fc1", ("fc2",), "fc2"),
)
_NEOX = (
    MappingSpec("input_layernorm", ("attention.query_key_value",), "attention"),
    MappingSpec(
        "attention.query_key_value",
        ("attention.dense",),
        "attention.dense",
        disabled="fused query_key_value interleaves q/k/v per head; AutoAWQ and llm-awq leave this mapping out",
    ),
    MappingSpec("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
    # GELU is not homogeneous: the scales go into a ScaledActivation (`mlp.act.scales`)
    MappingSpec("mlp.act", ("mlp.dense_4h_to_h",), "mlp.dense_4h_to_h"),
)

# DeepSeek-V2/V3: multi-head latent attention. The block input feeds the low-rank q and kv down-projections
# (or q_proj without a q LoRA rank); each latent has its own norm, which feeds the up-projection. kv_b's output
# interleaves k_nope and v per head, so no v -> o scale (as AutoAWQ's DeepSeek support). The router
# (mlp.gate, a TopkRouter) absorbs the scales and stays unquantized; the first_k_dense_replace layers are dense.
_DEEPSEEK = (
    MappingSpec(
        "input_layernorm",
        ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
        "self_attn",
    ),
    MappingSpec("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), "self_attn.q_b_proj"),
    MappingSpec("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "self_attn.kv_b_proj"),
    MappingSpec(
        "post_attention_layernorm",
        (
            "mlp.experts.*.gate_proj",
            "mlp.experts.*.up_proj",
            "mlp.shared_experts.gate_proj",
            "mlp.shared_experts.up_proj",
        ),
        "mlp",
        absorb=("mlp.gate",),
    ),
    MappingSpec("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), "mlp.experts.*.down_proj"),
    MappingSpec(
        "mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",), "mlp.shared_experts.down_proj"
    ),
    _MLP,
    _UPDOWN,
)

# Llama 4 (text): the MLP is `feed_forward`; MoE layers (moe_layers / interleave_moe_layer_step) hold routed
# experts (fused, [in, out]: unfused with ExpertLayout.in_out), a shared expert and a router (an nn.Linear that
# absorbs the scales and stays unquantized), the other layers a dense gated MLP. NoPE layers and the weightless
# QK L2 norm sit after q/k, so they change nothing here.
_LLAMA4 = (
    _ATTN,
    _VO,
    MappingSpec(
        "post_attention_layernorm",
        (
            "feed_forward.experts.*.gate_proj",
            "feed_forward.experts.*.up_proj",
            "feed_forward.shared_expert.gate_proj",
            "feed_forward.shared_expert.up_proj",
        ),
        "feed_forward",
        absorb=("feed_forward.router",),
    ),
    MappingSpec(
        "feed_forward.experts.*.up_proj",
        ("feed_forward.experts.*.down_proj",),
        "feed_forward.experts.*.down_proj",
    ),
    MappingSpec(
        "feed_forward.shared_expert.up_proj",
        ("feed_forward.shared_expert.down_proj",),
        "feed_forward.shared_expert.down_proj",
    ),
    MappingSpec(
        "post_attention_layernorm", ("feed_forward.gate_proj", "feed_forward.up_proj"), "feed_forward"
    ),
    MappingSpec("feed_forward.up_proj", ("feed_forward.down_proj",), "feed_forward.down_proj"),
)

_REGISTRY: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", "model.layers", _LLAMA),
    "mistral": ArchAdapter("mistral", "model.layers", _LLAMA),
    "qwen2": ArchAdapter("qwen2", "model.layers", _LLAMA),
    "qwen3": ArchAdapter("qwen3", "model.layers", _LLAMA),
    "gemma": ArchAdapter("gemma", "model.layers", _LLAMA, norm_plus_one=True),
    "gemma2": ArchAdapter("gemma2", "model.layers", _GEMMA2, norm_plus_one=True),
    "gemma3_text": ArchAdapter("gemma3_text", "model.layers", _GEMMA2, norm_plus_one=True),
    "phi3": ArchAdapter("phi3", "model.layers", _PHI3),
    "opt": ArchAdapter("opt", "model.decoder.layers", _OPT),
    "gpt_neox": ArchAdapter("gpt_neox", "gpt_neox.layers", _NEOX),
    "mixtral": ArchAdapter(
        "mixtral",
        "model.layers",
        _moe_specs("w1", "w3", "w2", shared=False),
        experts=ExpertLayout("w1", "w3", "w2"),
        checkpoint_renames=((".mlp.", ".block_sparse_moe."),),
    ),
    "qwen2_moe": ArchAdapter(
        "qwen2_moe",
        "model.layers",
        _moe_specs("gate_proj", "up_proj", "down_proj", shared=True),
        experts=ExpertLayout(),
    ),
    "qwen3_moe": ArchAdapter(
        "qwen3_moe",
        "model.layers",
        _moe_specs("gate_proj", "up_proj", "down_proj", shared=False),
        experts=ExpertLayout(),
    ),
    "deepseek_v2": ArchAdapter("deepseek_v2", "model.layers", _DEEPSEEK, experts=ExpertLayout()),
    "deepseek_v3": ArchAdapter("deepseek_v3", "model.layers", _DEEPSEEK, experts=ExpertLayout()),
    "llama4_text": ArchAdapter(
        "llama4_text", "model.layers", _LLAMA4, experts=ExpertLayout(in_out=True, dense_routing=True)
    ),
}

SUPPORTED_FAMILIES = tuple(_REGISTRY)

# Model types refused up front, as data: model_type -> (config field that must be falsy for the refusal not to
# apply, or None: always; what is missing). Everything else outside the registry goes to the structural
# fallback (awqforge.structure), which maps what it can and leaves the rest to labelled plain rounding.
_REFUSED: dict[str, tuple[str | None, str, str]] = {
    "hrm_text": (
        None,
        "its two decoder stacks run in a recurrence (each layer several times per token, on the other stack's "
        "outputs), which layer-by-layer calibration, running each layer once in order, cannot follow",
        "quantize it with a weight-only tool that needs no calibration",
    ),
    **dict.fromkeys(
        ("gemma4_assistant", "gemma4_unified_assistant"),
        (
            None,
            "it is a drafter whose forward reads its target model's hidden states and key/value cache "
            "(shared_kv_states), which calibrating it alone cannot provide",
            "quantize the target model and keep the drafter in its original precision",
        ),
    ),
    "inkling2_loop_text": (
        "loop_num_passes",
        "its middle layers (loop_layer_index_start to loop_layer_index_end) run `loop_num_passes` times per "
        "token, each pass on the previous pass's output, which layer-by-layer calibration, running each layer "
        "once in order, cannot follow",
        "quantize it with a weight-only tool that needs no calibration",
    ),
    "dory": (
        "n_recurrent_loops",
        "its recurrent stack runs `n_recurrent_loops` times per token, each pass on the previous pass's output, "
        "which layer-by-layer calibration, running each layer once in order, cannot follow",
        "quantize it with a weight-only tool that needs no calibration",
    ),
}

# Linear-like module classes the engine does not quantize, as data: class name -> (what is missing, how to
# proceed). A decoder whose blocks hold no nn.Linear, only these, is refused up front in one sentence.
_LINEAR_LIKE: dict[str, tuple[str, str]] = {
    "Conv1D": (
        "its blocks' linears are transformers' Conv1D (weight stored transposed, [in, out]), which transformers' "
        "compressed-tensors and AWQ loading never replace by quantized layers, so no artifact of it would load",
        "keep it in its original precision",
    ),
}

# Model types whose forward needs a config field that checkpoints may leave unset, as data: model_type -> (the
# field, what is missing, how to proceed). Refused up front, with or without the job's own mappings: the
# calibration forward would stop on it.
_NEEDS_FIELD: dict[str, tuple[str, str, str]] = {
    "xmod": (
        "default_language",
        "its forward picks its language adapters by `default_language`, which its config does not set",
        "set `default_language` in its config.json to the calibration text's language (one of its `languages`)",
    ),
}


def get_adapter(config, mappings=None) -> ArchAdapter:
    """The adapter for a transformers config (or model): the registry's, else the structural fallback
    (awqforge.structure); `mappings` (JobSpec.mappings) replace either's specs. Refuses up front, naming what
    it could not map."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    try:
        config.get_text_config()
    except ValueError as exc:  # MusicGen: a text encoder and a decoder, neither named the text model
        subs = [k for k in getattr(config, "sub_configs", {}) if k in str(exc)]
        raise _refuse(
            config,
            f"its config holds several text models ({', '.join(subs) or 'sub-configs'}) and names none as "
            "the decoder to quantize",
            how="keep it in its original precision",
        ) from exc
    needs = _NEEDS_FIELD.get(model_type)
    if needs is not None and getattr(config, needs[0], None) in (None, ""):
        raise _refuse(config, needs[1], how=needs[2])
    if mappings:
        return _user_adapter(config, mappings)
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        # post-LN OPT (opt-350m): the layer norms sit after attention / MLP and feed nothing we scale
        reason = "post-LN OPT (do_layer_norm_before=False): this norm does not feed these linears"
        specs = tuple(
            dataclasses.replace(sp, disabled=reason) if sp.prev.endswith("layer_norm") else sp for sp in _OPT
        )
        return dataclasses.replace(_REGISTRY["opt"], specs=specs)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    text_type = getattr(config.get_text_config(), "model_type", model_type)
    refused = _REFUSED.get(text_type) or _REFUSED.get(model_type)  # the drafters: by their own type
    if refused is not None and (refused[0] is None or getattr(config.get_text_config(), refused[0], None)):
        raise _refuse(config, refused[1], how=refused[2])
    from awqforge import multimodal

    if multimodal.is_multimodal(config):  # image-text-to-text: the text model's adapter (awqforge.multimodal)
        return multimodal.adapter(config)
    multimodal.refuse_unsupported_composite(config)
    return structural_adapter(config)


def registry_adapter(model_type: str | None) -> ArchAdapter | None:
    """The registry's adapter for a model_type, or None."""
    return _REGISTRY.get(model_type) if model_type else None


def _refuse(config, why: str, how: str | None = None) -> UnsupportedArchitecture:
    """One sentence: the model type, what is missing, how to proceed (never a library's class list)."""
    model_type = getattr(config, "model_type", None)
    if how is not None:
        return UnsupportedArchitecture(f"model type {model_type!r} is not supported: {why}; {how}.")
    why = why if len(why) <= 300 else why[:297] + "..."
    return UnsupportedArchitecture(
        f"model type {model_type!r} is not supported: {why}; give mappings with the job (JobSpec.mappings / "
        f"--mappings) or leave the modules it names unquantized with modules_to_not_convert."
    )


class MissingPackage(UnsupportedArchitecture):
    """transformers needs a package that is not installed to build the model (Gemma-3n's vision tower: PIL)."""


def _skeleton(config) -> nn.Module:
    from awqforge.multimodal import auto_model_class, short_error

    auto = auto_model_class(config)  # AutoModelForImageTextToText for multimodal configs
    try:
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=False)
    except ImportError as exc:
        package = re.search(r"requires the (\S+) library", str(exc))
        raise MissingPackage(
            f"model type {getattr(config, 'model_type', None)!r} cannot be built here: transformers needs "
            f"{'the ' + package.group(1) + ' library' if package else 'a package'} for it, which is not installed; "
            "install it and run the job again."
        ) from exc
    except Exception as exc:  # transformers has no model of that class for this config
        raise _refuse(
            config, f"transformers builds no {auto.__name__} from its config ({short_error(exc)})"
        ) from exc


_STRUCTURAL: dict[str, ArchAdapter] = {}


def structural_adapter(config) -> ArchAdapter:
    """An adapter read from the model's own decoder blocks (see awqforge.structure); cached per config."""
    from awqforge.structure import StructureError, find_layers, is_norm, norm_plus_one, structural_specs

    key = config.to_json_string() if hasattr(config, "to_json_string") else repr(config)
    if key in _STRUCTURAL:
        return _STRUCTURAL[key]
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    if n_layers is None:  # BLT: a patcher, a local encoder, a global transformer and a local decoder
        stacks = [k.removesuffix("_config") for k in getattr(config, "sub_configs", {})]
        raise _refuse(
            config,
            "its config gives no num_hidden_layers, so no single stack of decoder layers could be found"
            + (f" (it runs several: {', '.join(stacks)})" if stacks else ""),
            how="keep it in its original precision",
        )
    model = _skeleton(config)
    try:
        layers_attr = find_layers(model, n_layers)
        layout = _expert_layout(config, model)
        base = ArchAdapter(f"{config.model_type} (structural)", layers_attr, (), experts=layout)
        _refuse_linear_like(config, model.get_submodule(layers_attr))
        _refuse_tied_blocks(config, model, layers_attr)
        specs = structural_specs(model, layers_attr, base.prepare_block)
    except UnsupportedArchitecture:
        raise
    except StructureError as exc:
        raise _refuse(config, f"its decoder block could not be mapped ({exc})") from exc
    except Exception as exc:  # a module the structural reading does not expect: refused, not a crash
        raise _refuse(config, f"its decoder block could not be read ({type(exc).__name__}: {exc})") from exc
    block = base.get_layers(model)[0]
    plus_one = any(norm_plus_one(m) for m in block.modules() if is_norm(m))
    adapter = dataclasses.replace(base, specs=specs, norm_plus_one=plus_one)
    _STRUCTURAL[key] = adapter
    return adapter


def _refuse_linear_like(config, layers: nn.Module) -> None:
    """Refuse a decoder whose blocks hold no nn.Linear, only linear-like classes listed in `_LINEAR_LIKE`."""
    if any(isinstance(m, nn.Linear) for m in layers.modules()):
        return
    for m in layers.modules():
        known = _LINEAR_LIKE.get(type(m).__name__)
        if known is not None:
            raise _refuse(config, known[0], how=known[1])


def _refuse_tied_blocks(config, model: nn.Module, layers_attr: str) -> None:
    """Refuse a decoder whose layers share a sub-block's weights (Zamba's shared transformer, tied across its
    hybrid layers by `_tied_weights_keys` where tie_word_embeddings is set): each layer's pass would scale and
    round the same weights again, and transformers ties the layers' copies back to one on load."""
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return
    prefix = layers_attr.rsplit(".", 1)[-1] + "."
    for mod in model.modules():
        tied = getattr(mod, "_tied_weights_keys", None) or {}
        inside = sorted(t for t in tied.values() if isinstance(t, str) and t.startswith(prefix))
        if inside:
            raise _refuse(
                config,
                f"its decoder layers share the weights of one sub-block ({inside[0]}, tied to the same "
                "sub-block of other layers), which block-by-block quantization would scale and round once per "
                "layer that calls it",
                how="keep it in its original precision",
            )


def _expert_layout(config, model: nn.Module) -> ExpertLayout:
    """Per-expert linear names as transformers' conversion mapping for the model type reads them (PhiMoE,
    LFM2-MoE, MiniMax: `w1|w3|w2`; else gate_proj|up_proj|down_proj), or experts kept fused where it reads none."""
    keep = _per_expert_unreadable(config, model)
    if keep is not None:
        return ExpertLayout(keep_fused=keep)
    conversions = _loading_conversions(config, model)
    names = {}
    for c in conversions:
        srcs = [
            m.group(1)
            for src in getattr(c, "source_patterns", []) or []
            if (m := re.search(r"experts\.\*\.(\w+)\.weight", src))
        ]
        if len(srcs) == 2:
            names["gate"], names["up"] = srcs
        elif len(srcs) == 1:
            names["down"] = srcs[0]
    if len(names) == 3:
        return ExpertLayout(names["gate"], names["up"], names["down"])
    return ExpertLayout()


def _loading_conversions(config, model: nn.Module) -> list:
    """The checkpoint conversions transformers' loader applies to `model`: those of every sub-model's model type
    (`get_model_conversion_mapping`), not only the top one's. A multimodal model's per-expert merge belongs to
    its text model's type (Qwen3.5-MoE's `qwen3_5_moe_text`; `qwen3_5_moe` itself maps nothing)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        return list(get_model_conversion_mapping(model) or [])
    except Exception:  # noqa: BLE001 - an older transformers, or a skeleton it cannot walk: the top type's own
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            return list(get_checkpoint_conversion_mapping(getattr(config, "model_type", None)) or [])
        except Exception:  # noqa: BLE001
            return []


def _per_expert_unreadable(config, model: nn.Module) -> str | None:
    """Why per-expert linears would not load for this model type in transformers (None: they would).

    transformers >= 5 reads per-expert checkpoint tensors (`experts.{e}.gate_proj`, ...) into its fused
    experts only where its conversion mapping for the model type merges them (a WeightConverter whose source
    names `experts.*.`); for the others (GraniteMoE's `input_linear`, gpt-oss, JetMoE) a per-expert artifact
    would leave the experts uninitialised, so their fused experts are kept as they are, in full precision."""
    try:
        import transformers.conversion_mapping  # noqa: F401
    except ImportError:  # transformers < 5 has no fused experts: per-expert tensors are its own layout
        return None
    fused = [
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter) and m.gate_up_proj.dim() == 3
    ]
    if not fused:
        return None
    conversions = _loading_conversions(config, model)
    if any("experts.*." in src for c in conversions for src in getattr(c, "source_patterns", []) or []):
        return None
    return (
        f"transformers merges no per-expert tensors into {type(model.get_submodule(fused[0])).__name__} for "
        f"model type {getattr(config, 'model_type', None)!r}: experts kept fused, in full precision"
    )


def _user_adapter(config, mappings) -> ArchAdapter:
    """The registry's or the structural adapter with the job's mappings as its specs; each must resolve."""
    from awqforge.structure import StructureError, find_layers, is_norm, norm_plus_one

    specs = tuple(
        MappingSpec(
            m["prev"] if isinstance(m, dict) else m.prev,
            tuple(m["linears"] if isinstance(m, dict) else m.linears),
            m.get("inspect") if isinstance(m, dict) else m.inspect,
            absorb=tuple(m.get("absorb", ()) if isinstance(m, dict) else m.absorb),
            prev_rows=m.get("prev_rows") if isinstance(m, dict) else m.prev_rows,
        )
        for m in mappings
    )
    model = _skeleton(config)
    base = _REGISTRY.get(getattr(config, "model_type", None))
    if base is None:
        try:
            layers_attr = find_layers(model, config.get_text_config().num_hidden_layers)
        except StructureError as exc:
            raise _refuse(config, str(exc)) from exc
        base = ArchAdapter(f"{config.model_type} (user mappings)", layers_attr, (), experts=ExpertLayout())
        block = base.get_layers(model)[0]
        base = dataclasses.replace(
            base, norm_plus_one=any(norm_plus_one(m) for m in block.modules() if is_norm(m))
        )
    adapter = dataclasses.replace(base, family=f"{base.family.split(' ')[0]} (user mappings)", specs=specs)
    resolved = set()
    for block in adapter.get_layers(model):
        modules = dict(adapter.prepare_block(block).named_modules())
        for sp in specs:
            for _prev, binds in _match(sp.prev, modules):
                if any(_match(_bind(p, binds), modules) for p in sp.linears):
                    resolved.add(sp)
    missing = [f"{sp.prev} -> {', '.join(sp.linears)}" for sp in specs if sp not in resolved]
    if missing:
        raise UnsupportedArchitecture(
            f"mappings match no block of this model: {'; '.join(missing)}. Names are relative to a decoder "
            f"block ({adapter.layers_attr}.N), '*' matches one name part; block 0 has: "
            f"{', '.join(n for n, _ in adapter.get_layers(model)[0].named_modules() if n)[:600]}"
        )
    return adapter


def check_group_size(
    model_or_config, adapter: ArchAdapter, group_size: int, skip_patterns: Iterable[str] = ()
) -> None:
    """Raise ValueError naming the quantized layers whose input width `group_size` does not divide."""
    widths = _linear_widths(model_or_config, adapter, tuple(skip_patterns))
    bad: dict[str, int] = {}
    for name, width in widths.items():
        g = effective_group_size(width, group_size)
        if width % g:
            bad[_generic_name(name)] = width
    if not bad:
        return
    all_widths = set(widths.values())
    ok = [g for g in SUPPORTED_GROUP_SIZES if all(w % effective_group_size(w, g) == 0 for w in all_widths)]
    layers = ", ".join(f"{n} (input width {w})" for n, w in sorted(bad.items()))
    raise ValueError(
        f"group size {group_size} does not divide the input width of: {layers}. "
        f"Group sizes that work for this model: {', '.join(map(str, ok))}; "
        "or leave these layers unquantized with modules_to_not_convert."
    )


def check_module_patterns(model_or_config, adapter: ArchAdapter, patterns: Iterable[str]) -> None:
    """Raise ValueError naming the `modules_to_not_convert` patterns that match no module of the model."""
    patterns = list(patterns)
    if not patterns:
        return
    model = _meta_model(model_or_config)
    names = [n for n, _ in model.named_modules() if n]
    for i, block in enumerate(adapter.get_layers(model)):
        names += [f"{adapter.layers_attr}.{i}.{n}" for n, _ in _block_linear_widths(block, adapter)]
    missing = unmatched_patterns(patterns, names)
    if missing:
        examples = sorted({_generic_name(n) for n in names if n.startswith(f"{adapter.layers_attr}.0.")})
        raise ValueError(
            f"modules_to_not_convert: {', '.join(repr(p) for p in missing)} "
            f"match{'es' if len(missing) == 1 else ''} no module of this model. Patterns are globs over full "
            "module names, or their tails: e.g. 'mlp.down_proj', 'model.layers.0.*', "
            f"'{_generic_name(examples[-1]) if examples else 'lm_head'}'. This model's block 0 has: "
            f"{', '.join(examples[:12])}{', ...' if len(examples) > 12 else ''}"
        )


def _meta_model(model_or_config) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    from awqforge.multimodal import auto_model_class

    with torch.device("meta"):
        return auto_model_class(model_or_config).from_config(model_or_config)


def _generic_name(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", f".{name}.")[1:-1]


def _linear_widths(model_or_config, adapter: ArchAdapter, skip: tuple[str, ...]) -> dict[str, int]:
    model = _meta_model(model_or_config)
    widths = {}
    for i, block in enumerate(adapter.get_layers(model)):
        prefix = f"{adapter.layers_attr}.{i}"
        for name, width in _block_linear_widths(block, adapter):
            full = f"{prefix}.{name}"
            if (
                not adapter.never_quantize(name)
                and not (name in dict(block.named_modules()) and adapter.weight_read_directly(block, name))
                and not matches_any(full, skip)
            ):
                widths[full] = width
    return widths


def _block_linear_widths(block: nn.Module, adapter: ArchAdapter) -> Iterable[tuple[str, int]]:
    """(name, input width) of every linear, fused experts included, without unfusing anything."""
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            yield name, mod.in_features
        elif (
            adapter.experts is not None
            and isinstance(getattr(mod, "gate_up_proj", None), nn.Parameter)
            and mod.gate_up_proj.dim() == 3
            and kept_fused_reason(mod, adapter.experts) is None
        ):
            lay = adapter.experts
            if lay.in_out:  # [E, H, 2I] / [E, I, H]
                n_exp, hidden, _ = mod.gate_up_proj.shape
                inter = mod.down_proj.shape[1]
            else:  # [E, 2I, H] / [E, H, I]
                n_exp, _, hidden = mod.gate_up_proj.shape
                inter = mod.down_proj.shape[-1]
            for e in range(n_exp):
                yield f"{name}.{e}.{lay.gate}", hidden
                yield f"{name}.{e}.{lay.up}", hidden
                yield f"{name}.{e}.{lay.down}", inter


# -- MoE artifacts and the loaders that read them ---------------------------------------------------------------

MOE_ASYMMETRIC_CT = (
    "transformers >= 5 fuses MoE experts on load and decompresses compressed-tensors experts without their "
    "zero points (compressed-tensors' pack-quantized decompression then stops: 'Asymmetric quant requires "
    "zero-point values')"
)

MOE_AWQ = (
    "transformers loads AWQ checkpoints only through gptqmodel, whose layers replace linears and never the "
    "fused experts transformers >= 5 builds, so the experts' weights would be left unread"
)


def has_experts(model: nn.Module, adapter: ArchAdapter) -> bool:
    """Whether any decoder block holds MoE experts that get quantized (fused 3-D or already unfused; experts
    kept fused in full precision, see kept_fused_reason, are read like any dense tensor)."""
    for block in adapter.get_layers(model):
        for mod in block.modules():
            if isinstance(mod, UnfusedExperts) or (
                adapter.experts is not None
                and isinstance(getattr(mod, "gate_up_proj", None), nn.Parameter)
                and mod.gate_up_proj.dim() == 3
                and kept_fused_reason(mod, adapter.experts) is None
            ):
                return True
    return False


def check_format_support(
    model: nn.Module, adapter: ArchAdapter, formats: Iterable[str], zero_point: bool, model_type: str = ""
) -> None:
    """Raise ValueError, before any work, for an artifact format + settings that transformers could not load.

    MoE models (every transformers 5.x fuses their experts on load into 3-D parameters):
    - compressed-tensors with zero points: the expert decompression (transformers >= 5.13) reads each expert's
      `weight_packed`, `weight_scale` and `weight_shape` but not its `weight_zero_point`, and no layout we
      could write has a slot for them;
    - the AWQ format alone: transformers loads AWQ only through gptqmodel, whose layers replace `nn.Linear`s,
      never fused experts, so the per-expert `qweight`s are left unread in every 5.x. Written beside a
      compressed-tensors artifact (which transformers loads) it is kept: vLLM reads it."""
    formats = [getattr(f, "value", f) for f in formats]
    if not has_experts(model, adapter):
        return
    name = model_type or adapter.family
    if "compressed-tensors" in formats and zero_point:
        raise ValueError(
            f"{name}: compressed-tensors with zero points (asymmetric) is refused for MoE models because "
            f"{MOE_ASYMMETRIC_CT}; set zero_point=false (--symmetric)."
        )
    if "compressed-tensors" not in formats:
        raise ValueError(
            f"{name}: the AWQ format alone is refused for MoE models because {MOE_AWQ}; add format "
            f"'compressed-tensors' with zero_point=false (--symmetric), which transformers and vLLM load."
        )
