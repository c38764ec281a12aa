"""The structural fallback: AWQ mappings read from a decoder block's module tree and its forward's source.

For a `model_type` the registry (awqforge.arch) does not know, the block of a meta-device skeleton is read:

- the block's `forward` source is parsed (ast) and followed as a dataflow over its local variables, which gives
  which norm's output each child module is called with (`norm -> self_attn`, `norm -> mlp`, one norm feeding
  both in a parallel block as Cohere's, or none as Olmo2's post-norm blocks);
- each consumer is classified by its linears' names: attention (q/k/v or fused qkv, and its output
  projection), a gated MLP (gate/up or fused gate_up, and down), an MoE block (`experts` with per-expert
  gate/up/down, shared experts, a router that absorbs the scales and stays unquantized);
- the norm class's forward source tells a Gemma-style `x * (1 + w)` norm.

The result is an ordinary `ArchAdapter` over `MappingSpec`s, so the one algorithm runs as for a registry
family; v -> o and fused-row mappings are checked against shapes per block as always. A block whose
structure cannot be read is refused up front, naming the module that could not be mapped.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Iterable

import torch
from torch import nn

Q = {"q_proj", "query", "wq", "q"}
K = {"k_proj", "key", "wk", "k"}
V = {"v_proj", "value", "wv", "v"}
QKV = {"qkv_proj", "query_key_value", "Wqkv", "c_attn", "qkv"}
O = {"o_proj", "out_proj", "dense", "wo", "c_proj", "o"}  # noqa: E741
GATE = {"gate_proj", "w1", "wi_0"}
UP = {"up_proj", "w3", "wi_1", "c_fc", "fc1", "fc_in", "dense_h_to_4h"}
GATE_UP = {"gate_up_proj"}
DOWN = {"down_proj", "w2", "c_proj", "fc2", "fc_out", "dense_4h_to_h", "wo"}
ROUTERS = {"gate", "router"}
V_NORMS = {"v_norm", "value_norm"}
SHARED = ("shared_expert", "shared_experts", "shared_mlp")
LAYER_LISTS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.layers",
    "layers",
    "model.language_model.layers",  # image-text-to-text models (awqforge.multimodal)
    "language_model.model.layers",
    "model.text_model.layers",  # Idefics3, SmolVLM
)


def is_qk(name: str) -> bool:
    """A q or k projection (or a fused qkv), by the names the structural fallback knows: these get no clip
    search, because their error goes through q k^T, not a linear output."""
    return name.rsplit(".", 1)[-1] in Q | K | QKV


class StructureError(ValueError):
    """The block's structure could not be read into mappings (the message names what)."""


def find_layers(model: nn.Module, n_layers: int) -> str:
    """The dotted path of the decoder layers' ModuleList."""
    modules = dict(model.named_modules())
    for path in LAYER_LISTS:
        if isinstance(modules.get(path), nn.ModuleList) and len(modules[path]) == n_layers:
            return path
    for path, mod in modules.items():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and path:
            return path
    raise StructureError(f"no list of {n_layers} decoder layers found in {type(model).__name__}")


def norm_plus_one(norm: nn.Module) -> bool:
    """Whether a norm computes x_hat * (1 + w) (Gemma), read from its forward's source."""
    try:
        src = inspect.getsource(type(norm).forward)
    except (OSError, TypeError):
        return False
    return bool(re.search(r"\(\s*1(\.0)?\s*\+\s*self\.weight", src))


def is_norm(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (
        not list(mod.children())
        and isinstance(w, torch.Tensor)
        and w.dim() == 1
        and not isinstance(mod, (nn.Linear, nn.Embedding))
    )


def norm_consumers(block: nn.Module) -> dict[str, list[str]]:
    """norm child name -> the children its output is passed to, in call order (from the forward's source)."""
    try:
        src = textwrap.dedent(inspect.getsource(type(block).forward))
        fn = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef))
    except (OSError, TypeError, StopIteration, SyntaxError) as exc:
        raise StructureError(
            f"the source of {type(block).__name__}.forward could not be read: {exc}"
        ) from exc
    children = dict(block.named_children())
    params = [a.arg for a in fn.args.args[1:]]
    env: dict[str, set[str]] = {params[0]: {"<input>"}} if params else {}
    edges: dict[str, list[str]] = {}

    def child_call(node: ast.AST) -> str | None:
        if isinstance(node, ast.Subscript):
            node = node.value
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "self"
            and node.func.attr in children
        ):
            return node.func.attr
        return None

    def sources(expr: ast.AST | None) -> set[str]:
        """Which child's raw output (or the block input) an expression is; records nested call edges."""
        if expr is None:
            return set()
        name = child_call(expr)
        if name is not None:
            call = expr.value if isinstance(expr, ast.Subscript) else expr
            arg = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg), None)
            for src_name in sources(arg):
                edges.setdefault(src_name, []).append(name)
            for extra in [*call.args[1:], *(k.value for k in call.keywords if k.value is not arg)]:
                sources(extra)
            return {name}
        if isinstance(expr, ast.Name):
            return set(env.get(expr.id, set()))
        for sub in ast.iter_child_nodes(expr):
            sources(sub)
        return set()

    def run(stmts: Iterable[ast.stmt]) -> None:
        for st in stmts:
            if isinstance(st, (ast.Assign, ast.AnnAssign)):
                value = sources(st.value)
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                for t in targets:
                    first = t.elts[0] if isinstance(t, ast.Tuple) and t.elts else t
                    if isinstance(first, ast.Name):
                        env[first.id] = value
            elif isinstance(st, (ast.If, ast.For, ast.While, ast.With)):
                for field in ("test", "iter"):
                    if hasattr(st, field):
                        sources(getattr(st, field))
                run(st.body)
                run(getattr(st, "orelse", []))
            elif isinstance(st, (ast.Expr, ast.Return)):
                sources(st.value)

    run(fn.body)
    return {
        n: list(dict.fromkeys(c for c in edges.get(n, []) if c != n))
        for n, mod in children.items()
        if is_norm(mod)
    }


def _linears(mod: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in mod.named_children() if isinstance(m, nn.Linear)}


def _role(names: Iterable[str], roles: set[str]) -> list[str]:
    return [n for n in names if n in roles]


def block_specs(block: nn.Module, hidden: int):
    """The MappingSpecs of one (prepared, experts unfused) block; StructureError names what is not mapped."""
    from awqforge.arch import MappingSpec

    specs: list[MappingSpec] = []
    mapped: set[str] = set()  # children whose linears are accounted for
    consumers = norm_consumers(block)
    children = dict(block.named_children())
    for norm, users in consumers.items():
        fed: list[str] = []
        absorb: list[str] = []
        inner: list[MappingSpec] = []
        for user in users:
            mod = children[user]
            if isinstance(mod, nn.Linear):
                fed.append(user)
                continue
            parts = _consumer(user, mod, hidden)
            fed += parts["fed"]
            absorb += parts["absorb"]
            inner += parts["inner"]
            mapped.add(user)
        if fed:
            only = users[0] if len(users) == 1 and not isinstance(children[users[0]], nn.Linear) else None
            specs.append(MappingSpec(norm, tuple(fed), only, absorb=tuple(absorb)))
        specs += inner
    # children with linears that no norm feeds (post-norm blocks): their inner mappings still apply
    for name, mod in children.items():
        if (
            name in mapped
            or isinstance(mod, nn.Linear)
            or not any(isinstance(m, nn.Linear) for m in mod.modules())
        ):
            continue
        specs += _consumer(name, mod, hidden)["inner"]
    return specs


def _consumer(name: str, mod: nn.Module, hidden: int) -> dict:
    """What a child called with a norm's output contains: fed linears, routers, inner mappings."""
    from awqforge.arch import MappingSpec

    lin = _linears(mod)
    sub = dict(mod.named_children())
    experts = sub.get("experts")
    if isinstance(experts, nn.ModuleList) and len(experts):
        e0 = dict(experts[0].named_children())
        gate, up, down = _role(e0, GATE), _role(e0, UP), _role(e0, DOWN)
        if not (gate and up and down):
            raise StructureError(
                f"{name}.experts.0: expert linears {sorted(e0)} are not gate/up/down projections"
            )
        fed = [f"{name}.experts.*.{gate[0]}", f"{name}.experts.*.{up[0]}"]
        inner = [
            MappingSpec(
                f"{name}.experts.*.{up[0]}", (f"{name}.experts.*.{down[0]}",), f"{name}.experts.*.{down[0]}"
            )
        ]
        absorb = [f"{name}.{r}" for r in ROUTERS if r in sub and getattr(sub[r], "weight", None) is not None]
        if not absorb:
            raise StructureError(f"{name}: an MoE block without a router named {sorted(ROUTERS)}")
        absorb += [f"{name}.{n}" for n in lin if n.startswith("shared_expert_gate")]
        for s in SHARED:
            if s in sub:
                part = _consumer(f"{name}.{s}", sub[s], hidden)
                fed += part["fed"]
                inner += part["inner"]
        return {"fed": fed, "absorb": absorb, "inner": inner}
    names = list(lin)
    if _role(names, QKV) or _role(names, Q | K | V):
        qkv, v, o = _role(names, QKV), _role(names, V), _role(names, O)
        fed = qkv or [n for n in names if n in Q | K | V]
        unknown = [n for n in names if n not in fed and n not in O]
        if unknown or not o:
            raise StructureError(
                f"{name}: attention linears {unknown or names} are not q/k/v/o projections (no output projection)"
                if not o
                else f"{name}: attention linears {unknown} are not q/k/v/o projections"
            )
        inner = []
        if qkv:
            inner.append(
                MappingSpec(f"{name}.{qkv[0]}", (f"{name}.{o[0]}",), f"{name}.{o[0]}", prev_rows="v")
            )
        elif v:
            # a norm on the values (Gemma 4's v_norm) re-normalises what v_proj's scaled rows give o_proj
            v_norm = next((n for n in sub if n in V_NORMS), None)
            reason = f"{name}.{v_norm} normalises v between v_proj and o_proj: scales would not commute"
            inner.append(
                MappingSpec(
                    f"{name}.{v[0]}",
                    (f"{name}.{o[0]}",),
                    f"{name}.{o[0]}",
                    disabled=reason if v_norm else None,
                )
            )
        return {"fed": [f"{name}.{n}" for n in fed], "absorb": [], "inner": inner}
    gate_up, gate, up, down = _role(names, GATE_UP), _role(names, GATE), _role(names, UP), _role(names, DOWN)
    if (gate_up or up) and down and len(names) == len(gate_up) + len(gate) + len(up) + len(down[:1]):
        d = f"{name}.{down[0]}"
        if gate_up:
            return {
                "fed": [f"{name}.{gate_up[0]}"],
                "absorb": [],
                "inner": [MappingSpec(f"{name}.{gate_up[0]}", (d,), d, prev_rows="up")],
            }
        reason = (
            None
            if gate
            else "no gate: the activation between up and down is not known to commute with scaling"
        )
        return {
            "fed": [f"{name}.{n}" for n in gate + up],
            "absorb": [],
            "inner": [MappingSpec(f"{name}.{up[0]}", (d,), d, disabled=reason)],
        }
    raise StructureError(
        f"{name} ({type(mod).__name__}): linears {names or 'none'} are neither attention (q/k/v/o), a gated MLP "
        "(gate/up/down) nor an MoE block (experts + router)"
    )


def structural_specs(model: nn.Module, layers_attr: str, prepare) -> tuple:
    """The union, in order, of every block's specs (blocks may differ: dense and MoE layers)."""
    hidden = model.config.get_text_config().hidden_size
    layers = model.get_submodule(layers_attr)
    out: dict = {}
    for i, block in enumerate(layers):
        try:
            for sp in block_specs(prepare(block), hidden):
                out.setdefault(sp, None)
        except StructureError as exc:
            raise StructureError(f"{layers_attr}.{i}: {exc}") from exc
    if not out:
        raise StructureError(f"{layers_attr}.0: no norm feeds a linear, so no mapping could be read")
    return tuple(out)
