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
LATENT_IN = {"q_a_proj", "kv_a_proj_with_mqa", "kv_a_proj", "kv_proj"}  # MLA-style down-projections
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


def norm_consumers(block: nn.Module, side_inputs: dict[str, set[str]] | None = None) -> dict[str, list[str]]:
    """norm child name -> the children its output is passed to, in call order (from the forward's source).
    `side_inputs`, when given, gets child name -> the children whose outputs it is also given in arguments
    after its first (Inkling-2's attention: key and value states from their own norms)."""
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
    escaped: set[str] = set()  # children whose output is also read by something other than a child's input

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
                side = sources(extra)
                escaped.update(side)
                if side_inputs is not None:
                    side_inputs.setdefault(name, set()).update(side)
            return {name}
        if isinstance(expr, ast.Name):
            return set(env.get(expr.id, set()))
        if (
            isinstance(expr, ast.Call)
            and isinstance(expr.func, ast.Attribute)
            and expr.func.attr in _CASTS
            and child_call(expr.func.value) is not None
        ):  # `self.norm(x).to(x.dtype)` (DBRX): a cast of a child's output is that output
            for arg in [*expr.args, *(k.value for k in expr.keywords)]:
                sources(arg)
            return sources(expr.func.value)
        if (
            isinstance(expr, ast.Call)
            and isinstance(expr.func, ast.Attribute)
            and isinstance(expr.func.value, ast.Name)
            and expr.func.value.id == "self"
            and expr.func.attr not in children
            and not hasattr(type(block), expr.func.attr)
        ):
            return (
                set()
            )  # a module this block does not have (the other layer type's branch of a hybrid block)
        for sub in ast.iter_child_nodes(expr):  # arithmetic, attribute calls: the value is used, not aliased
            escaped.update(sources(sub))
        return set()

    def flag(test: ast.AST) -> bool | None:
        """The value of `self.<flag>` / `not self.<flag>` when the block holds that bool (Bloom's
        apply_residual_connection_post_layernorm, which decides whether the residual is the normed input)."""
        negate = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
        node = test.operand if negate else test
        if not (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
        ):
            return None
        value = block.__dict__.get(node.attr)  # a plain attribute, not a child module or a property
        return (not value if negate else value) if isinstance(value, bool) else None

    def run(stmts: Iterable[ast.stmt]) -> None:
        for st in stmts:
            if isinstance(st, (ast.Assign, ast.AnnAssign)):
                value = sources(st.value)
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                for t in targets:
                    first = t.elts[0] if isinstance(t, ast.Tuple) and t.elts else t
                    if isinstance(first, ast.Name):
                        env[first.id] = value
            elif (
                isinstance(st, ast.If) and flag(st.test) is not None
            ):  # a flag the block holds: as it will run
                run(st.body if flag(st.test) else st.orelse)
            elif isinstance(st, ast.If):  # branches (layer types of a hybrid block) start from the same state
                sources(st.test)
                before = {k: set(v) for k, v in env.items()}
                run(st.body)
                after_body = {k: set(v) for k, v in env.items()}
                if st.orelse:  # `if / else`, `if / elif`: either branch's values may follow
                    env.clear()
                    env.update(before)
                    run(st.orelse)
                    for k, v in after_body.items():
                        env[k] = env.get(k, set()) | v
                # no else: the branch is taken to run (a layer type's `elif` ends the chain of a hybrid block)
            elif isinstance(st, (ast.For, ast.While, ast.With)):
                for field in ("test", "iter"):
                    if hasattr(st, field):
                        sources(getattr(st, field))
                run(st.body)
                run(getattr(st, "orelse", []))
            elif isinstance(st, ast.Return):
                escaped.update(sources(st.value))
            elif isinstance(st, ast.Expr):
                sources(st.value)

    run(fn.body)
    return {
        n: list(dict.fromkeys(c for c in edges.get(n, []) if c != n))
        for n, mod in children.items()
        if is_norm(mod) and n not in escaped
    } | {n: ESCAPED for n in escaped if n in children and is_norm(children[n]) and edges.get(n)}


_CASTS = {"to", "type_as", "float", "half", "bfloat16", "contiguous"}  # methods that keep a tensor's values
ESCAPED = ["<escaped>"]  # norm_consumers' value for a norm whose output also feeds arithmetic (a residual)


_OUTPUT_NAMES = {n.lower() for n in O | DOWN}


def _is_output_name(name: str) -> bool:
    """An output projection by its name, whatever the case (ModernBERT's `Wo`, `out_proj`, `output_linear`)."""
    low = name.lower()
    return low in _OUTPUT_NAMES or low.startswith(("out", "o_")) or low.endswith("_out")


def _linears(mod: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in mod.named_children() if isinstance(m, nn.Linear)}


def _role(names: Iterable[str], roles: set[str]) -> list[str]:
    return [n for n in names if n in roles]


def block_specs(block: nn.Module, hidden: int):
    """The MappingSpecs of one (prepared, experts unfused) block; StructureError names what is not mapped."""
    from awqforge.arch import MappingSpec

    specs: list[MappingSpec] = []
    mapped: set[str] = set()  # children whose linears are accounted for
    side: dict[str, set[str]] = {}
    consumers = norm_consumers(block, side)
    children = dict(block.named_children())
    # a child given the outputs of two norms (Inkling-2's attention: q_input_layernorm's as its input,
    # k_ and v_input_layernorm's beside it): which of its linears reads which is not known here, so no norm is
    # folded into them
    fed_twice = {
        u
        for u in children
        if not isinstance(children[u], nn.Linear)
        and sum(u in users for users in consumers.values() if users is not ESCAPED)
        + sum(is_norm(children[n]) for n in side.get(u, ()) if n in children)
        > 1
    }
    for norm, users in consumers.items():
        if users is ESCAPED:
            # its output is also read outside the modules it feeds (MiniMax's residual taken from the normed
            # input, Falcon-H1's input multipliers): a scale folded into it would change those reads. Its
            # users' inner mappings still apply (below); their input linears get plain rounding.
            continue
        fed: list[str] = []
        absorb: list[str] = []
        inner: list[MappingSpec] = []
        disabled: str | None = None
        for user in users:
            mod = children[user]
            if isinstance(mod, nn.Linear):
                fed.append(user)
                continue
            parts = _consumer(user, mod, hidden)
            if user not in fed_twice:
                fed += parts["fed"]
                absorb += parts["absorb"]
                disabled = disabled or parts.get("disabled")
            inner += parts["inner"]
            mapped.add(user)
        if fed:
            only = users[0] if len(users) == 1 and not isinstance(children[users[0]], nn.Linear) else None
            specs.append(MappingSpec(norm, tuple(fed), only, absorb=tuple(absorb), disabled=disabled))
        specs += inner
    # children with linears that no norm feeds (post-norm blocks): their inner mappings still apply; a child
    # that is itself a sub-layer (its own norms feeding its linears: DBRX's norm_attn_norm, a hybrid layer's
    # wrapped decoder layers) is read like a block
    for name, mod in children.items():
        if (
            name in mapped
            or isinstance(mod, nn.Linear)
            or not any(isinstance(m, nn.Linear) for m in mod.modules())
        ):
            continue
        nested = _sub_layer_specs(name, mod, hidden)
        specs += nested if nested is not None else _consumer(name, mod, hidden)["inner"]
    return specs


def _sub_layer_specs(name: str, mod: nn.Module, hidden: int) -> list | None:
    """The specs of a child read as a block, names prefixed with the child's, when one of its own norms feeds
    one of its linears; else None."""
    import dataclasses

    if not any(is_norm(m) for m in mod.children()):
        return None
    try:
        inner = block_specs(mod, hidden)
    except StructureError:
        return None
    norms = {n for n, m in mod.named_children() if is_norm(m)}
    if not any(sp.prev in norms for sp in inner):
        return None

    def pre(n: str | None) -> str | None:
        return None if n is None else f"{name}.{n}"

    return [
        dataclasses.replace(
            sp,
            prev=pre(sp.prev),
            linears=tuple(pre(n) for n in sp.linears),
            inspect=pre(sp.inspect),
            absorb=tuple(pre(n) for n in sp.absorb),
        )
        for sp in inner
    ]


def _consumer(name: str, mod: nn.Module, hidden: int) -> dict:
    """What a child called with a norm's output contains: fed linears, routers, inner mappings.

    Linears no rule maps are left to plain rounding (the block reports them); a child whose linears none reads
    the block's input width contributes nothing to the norm's mapping."""
    from awqforge.arch import MappingSpec

    lin = _linears(mod)
    sub = dict(mod.named_children())
    experts = sub.get("experts")
    if experts is not None and not isinstance(experts, nn.Linear):
        return _moe(name, mod, sub, experts, lin, hidden)
    names = list(lin)
    gate_up, gate, up, down = _role(names, GATE_UP), _role(names, GATE), _role(names, UP), _role(names, DOWN)
    is_attention = bool(_role(names, QKV | Q | K | V | LATENT_IN))
    if (
        not is_attention
        and (gate_up or up)
        and down
        and len(names) == len(gate_up) + len(gate) + len(up) + len(down[:1])
    ):
        d = f"{name}.{down[0]}"
        sub_norm = _sub_norm_specs(name, mod, down[0])
        if sub_norm is not None:  # a norm between the activation and down (BitNet's ffn_sub_norm)
            return {"fed": [f"{name}.{n}" for n in gate_up + gate + up], "absorb": [], "inner": sub_norm}
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
    # attention (q/k/v, fused qkv, latent q/kv down-projections, extra gates) or a mixer (linear attention,
    # state-space): every linear reading the block's width is fed by the norm, except output projections.
    # The loss is measured on the whole child's output, so a scale that does not commute with it is not chosen.
    fed = [n for n in names if lin[n].in_features == hidden and not _is_output_name(n)]
    if (
        is_attention
    ):  # q/k/v first; only those reading the block's width (RWKV's channel mix: `value` reads 4x)
        qkv_first = [n for n in names if n in QKV | Q | K | V and lin[n].in_features == hidden]
        fed = qkv_first + [n for n in fed if n not in QKV | Q | K | V]
    wrapped = [
        c
        for c, m in sub.items()
        if not isinstance(m, nn.Linear)
        and any(isinstance(x, nn.Linear) and x.in_features == hidden for x in m.modules())
    ]
    if wrapped and not is_attention:
        # no q/k/v of its own, but linears inside sub-modules (Inkling-2's q/k/v projections) that may read
        # the input too: a fold into the direct ones alone would change theirs
        fed = []
    qkv, v, o = _role(names, QKV), _role(names, V), _role(names, O)
    sub_norm = _sub_norm_specs(name, mod, o[0]) if o else None
    if sub_norm is not None:  # a norm on the attention output (BitNet's attn_sub_norm, DiffLlama's groupnorm)
        inner_norm = sub_norm
        qkv = v = []
    else:
        inner_norm = []
    v_norm = next((n for n in sub if n in V_NORMS), None)
    if o and not v_norm and not _attention_output_is_linear_in_v(mod, lin[o[0]].in_features):
        qkv = v = []  # a gate or a norm between attention and its output projection: no v -> o scale
    # the forward, followed: linears inside sub-modules that read the input or a latent norm's output (a DSA
    # attention's indexer: wk and weights_proj read the input, wq_b reads q_a_layernorm's output) take the
    # same scales as the mapping's own linears; one such child whose forward cannot be read leaves the mapping
    # disabled. (A child whose only input readers are nested ones gets no mapping from this, as before.)
    flow = consumer_reads(mod)
    reads, unfollowed = flow if flow is not None else ({}, {})
    if fed:
        fed += [r for r in reads.get(IN, []) if "." in r]
    if IN in unfollowed and fed:
        disabled = f"its output also reaches {name}.{unfollowed[IN]}, whose reads are not followed"
    elif flow is None and fed and wrapped:
        disabled = f"{name}.forward could not be read, and its sub-modules {', '.join(wrapped)} hold linears"
    else:
        disabled = None
    inner = list(inner_norm)
    if qkv and o:
        inner.append(MappingSpec(f"{name}.{qkv[0]}", (f"{name}.{o[0]}",), f"{name}.{o[0]}", prev_rows="v"))
    elif v and o:
        # a norm on the values (Gemma 4's v_norm) re-normalises what v_proj's scaled rows give o_proj: the
        # mapping is kept, disabled, so the report names why
        reason = f"{name}.{v_norm} normalises v between v_proj and o_proj: scales would not commute"
        inner.append(
            MappingSpec(
                f"{name}.{v[0]}", (f"{name}.{o[0]}",), f"{name}.{o[0]}", disabled=reason if v_norm else None
            )
        )
    # latent norms (MLA): `q_a_layernorm` feeds `q_b_proj`, `kv_a_layernorm` feeds `kv_b_proj`
    for norm_name, norm in sub.items():
        target = re.sub(r"_a_(layer)?norm$", "_b_proj", norm_name)
        if (
            target != norm_name
            and target in lin
            and is_norm(norm)
            and norm.weight.numel() == lin[target].in_features
        ):
            t = f"{name}.{target}"
            more = [f"{name}.{r}" for r in reads.get(norm_name, []) if r != target]
            reason = (
                f"its output also reaches {name}.{unfollowed[norm_name]}, whose reads are not followed"
                if norm_name in unfollowed
                else None
            )
            # several readers: the loss is on each linear's own output
            inner.append(MappingSpec(f"{name}.{norm_name}", (t, *more), None if more else t, disabled=reason))
    return {
        "fed": [f"{name}.{n}" for n in dict.fromkeys(fed)],
        "absorb": [],
        "inner": inner,
        "disabled": disabled,
    }


IN = "<input>"  # _follow's label for the consumer's input (the norm's output)


class _Unfollowed(Exception):
    """A source that _follow cannot read (no source, a call whose arguments cannot be matched to parameters)."""


def _fn_ast(fn) -> ast.FunctionDef:
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        return next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef))
    except (OSError, TypeError, StopIteration, SyntaxError) as exc:
        raise _Unfollowed(str(exc)) from exc


def _bind_args(fn: ast.FunctionDef, call: ast.Call, labelled) -> dict[str, set[str]]:
    """The callee's parameter name -> labels, for the call's arguments that carry labels (`labelled(expr)`)."""
    params = [a.arg for a in [*fn.args.posonlyargs, *fn.args.args]][1:]  # without self
    named = set(params) | {a.arg for a in fn.args.kwonlyargs}
    out: dict[str, set[str]] = {}
    for i, arg in enumerate(call.args):
        labels = labelled(arg)
        if not labels:
            continue
        if isinstance(arg, ast.Starred) or i >= len(params):
            raise _Unfollowed(f"argument {i} has no named parameter")
        out.setdefault(params[i], set()).update(labels)
    for kw in call.keywords:
        labels = labelled(kw.value)
        if not labels:
            continue
        if kw.arg is None or kw.arg not in named:
            raise _Unfollowed(f"keyword {kw.arg} has no named parameter")
        out.setdefault(kw.arg, set()).update(labels)
    return out


def _follow(
    mod: nn.Module, fn, env: dict[str, set[str]], prefix: str, reads, unfollowed, norms: bool, depth: int
):
    """Which linears read which labelled tensors, read from `fn`'s source (a method of `mod`) as a dataflow.

    A label follows a value through names, casts (`x.to(dtype)`) and products / quotients with unlabelled
    values (per-channel scales pass through those); a child module called with a labelled value is followed
    into its forward when it holds linears (a DSA attention's indexer given the attention's input), as is a
    method of the module. `reads`: label -> linear paths (relative to the top module); `unfollowed`: label ->
    the child it reached whose forward could not be read. With `norms`, the outputs of `mod`'s norm children
    are labels of their own (an MLA attention's q_a_layernorm)."""
    tree = _fn_ast(fn)
    children = dict(mod.named_children())

    def holds_linear(m: nn.Module) -> bool:
        return any(isinstance(x, nn.Linear) for x in m.modules())

    def value(expr: ast.AST | None) -> set[str]:
        """The labels an expression's value carries; every call inside it is visited."""
        if expr is None:
            return set()
        if isinstance(expr, ast.Name):
            return set(env.get(expr.id, set()))
        if isinstance(expr, ast.Call):
            return call(expr)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Div)):
            left, right = value(expr.left), value(expr.right)
            if isinstance(expr.op, ast.Div):
                return left if not right else set()
            return left ^ right if not (left and right) else set()
        if isinstance(expr, ast.IfExp):
            value(expr.test)
            return value(expr.body) | value(expr.orelse)
        for sub in ast.iter_child_nodes(expr):
            value(sub)
        return set()

    def call(expr: ast.Call) -> set[str]:
        f = expr.func
        if isinstance(f, ast.Attribute) and f.attr in _CASTS:  # x.to(dtype): the same values
            base = value(f.value)
            for a in [*expr.args, *(k.value for k in expr.keywords)]:
                value(a)
            return base
        is_self = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self"
        if not is_self:
            for sub in ast.iter_child_nodes(expr):
                value(sub)
            return set()
        args = {id(a): value(a) for a in [*expr.args, *(k.value for k in expr.keywords)]}

        def labelled(a: ast.AST) -> set[str]:
            return args.get(id(a), set())

        name = f.attr
        child = children.get(name)
        path = f"{prefix}{name}"
        if isinstance(child, nn.Linear):
            first = expr.args[0] if expr.args else next((k.value for k in expr.keywords), None)
            for label in labelled(first) if first is not None else ():
                reads.setdefault(label, []).append(path)
            return set()
        if child is not None:
            if norms and is_norm(child):
                return {name}
            carried = set().union(*args.values()) if args else set()
            if not carried or not holds_linear(child):
                return set()
            try:
                if depth > 6:
                    raise _Unfollowed("too deep")
                sub_fn = type(child).forward
                sub_env = _bind_args(_fn_ast(sub_fn), expr, labelled)
                _follow(child, sub_fn, sub_env, f"{path}.", reads, unfollowed, False, depth + 1)
            except _Unfollowed:
                for label in carried:
                    unfollowed.setdefault(label, path)
            return set()
        method = inspect.getattr_static(type(mod), name, None)
        carried = set().union(*args.values()) if args else set()
        if carried and inspect.isfunction(method) and depth <= 6:  # a method of the module: read as inline
            try:
                sub_env = _bind_args(_fn_ast(method), expr, labelled)
                _follow(mod, method, sub_env, prefix, reads, unfollowed, norms, depth + 1)
            except _Unfollowed:
                for label in carried:
                    unfollowed.setdefault(label, f"{prefix}{name}")
        return set()

    def assign(target: ast.AST, labels: set[str], val: ast.AST | None) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = labels
        elif isinstance(target, (ast.Tuple, ast.List)):
            elts = val.elts if isinstance(val, (ast.Tuple, ast.List)) else None
            for i, t in enumerate(target.elts):
                if elts is not None and len(elts) == len(target.elts):
                    assign(t, env_value_cache.get(id(elts[i]), set()), None)
                else:
                    assign(t, set(), None)

    env_value_cache: dict[int, set[str]] = {}

    def run(stmts) -> None:
        for st in stmts:
            if isinstance(st, (ast.Assign, ast.AnnAssign)):
                if isinstance(st.value, (ast.Tuple, ast.List)):
                    for e in st.value.elts:
                        env_value_cache[id(e)] = value(e)
                    labels: set[str] = set()
                else:
                    labels = value(st.value)
                for t in st.targets if isinstance(st, ast.Assign) else [st.target]:
                    assign(t, labels, st.value)
            elif isinstance(st, ast.AugAssign):
                other = value(st.value)
                if isinstance(st.target, ast.Name):
                    keep = isinstance(st.op, (ast.Mult, ast.Div)) and not other
                    env[st.target.id] = env.get(st.target.id, set()) if keep else set()
            elif isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            else:
                for field, sub in ast.iter_fields(st):
                    if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                        run(sub)
                    elif isinstance(sub, list):
                        for x in sub:
                            if isinstance(x, ast.AST) and not isinstance(x, ast.excepthandler):
                                value(x)
                            elif isinstance(x, ast.excepthandler):
                                run(x.body)
                    elif isinstance(sub, ast.AST) and field not in ("target",):
                        value(sub)

    run(tree.body)


def consumer_reads(mod: nn.Module) -> tuple[dict[str, list[str]], dict[str, str]] | None:
    """For a child called with a norm's output: label -> the linears (paths relative to it, nested ones
    included) that read its input (label IN) or one of its own norms' outputs (label: the norm's name), and
    label -> a child the value reaches whose forward could not be read. None when its forward cannot be read."""
    reads: dict[str, list[str]] = {}
    unfollowed: dict[str, str] = {}
    try:
        fn = type(mod).forward
        tree = _fn_ast(fn)
        params = [a.arg for a in [*tree.args.posonlyargs, *tree.args.args]][1:]
        if not params:
            return None
        _follow(mod, fn, {params[0]: {IN}}, "", reads, unfollowed, True, 0)
    except Exception:  # _Unfollowed, or source this reading does not expect: as an unreadable forward
        return None
    return {k: list(dict.fromkeys(v)) for k, v in reads.items()}, unfollowed


_QK_NORM = re.compile(r"^(q|k|kv|query|key)(_a)?_?(layer)?norm$")


def _sub_norm_specs(name: str, mod: nn.Module, out_linear: str) -> list | None:
    """None when `mod` has no norm besides q/k norms; else the mappings of a norm feeding the output linear
    directly (norm -> out_linear, possibly empty when the norm's output goes through arithmetic first)."""
    from awqforge.arch import MappingSpec

    norms = [n for n, m in mod.named_children() if is_norm(m) and not _QK_NORM.match(n)]
    if not norms:
        return None
    try:
        consumers = norm_consumers(mod)
    except StructureError:
        return []
    o = f"{name}.{out_linear}"
    return [
        MappingSpec(f"{name}.{n}", (o,), o)
        for n in norms
        if consumers.get(n) == [out_linear] and consumers.get(n) is not ESCAPED
    ]


def _attention_output_is_linear_in_v(mod: nn.Module, o_width: int) -> bool:
    """Whether o_proj reads softmax(qk) @ v as is, read from the forward's source: no gate (Qwen3-Next's sigmoid
    gate from q_proj, MiniMax's output gate) and no `self.norm(...)` on the attention output (linear attention's
    output norm; q_norm / k_norm on q and k do not matter), and no clamp of the projected states (DBRX's
    `qkv_states.clamp(...)`: a clamp of v / s is not the clamp of v, divided by s; clamps of positions are)."""
    del o_width
    try:
        src = inspect.getsource(type(mod).forward)
    except (OSError, TypeError):
        return False
    return not re.search(r"gate|sigmoid|(?<!q_)(?<!k_)norm\(|(states|qkv|value)\.(clamp|clip)\(", src)


def _moe(name: str, mod: nn.Module, sub: dict, experts: nn.Module, lin: dict, hidden: int) -> dict:
    """An MoE block: routed experts (unfused into per-expert linears, or kept fused in full precision where
    they cannot be: biases, clamped activations), shared experts, and a router that absorbs the scales."""
    from awqforge.arch import MappingSpec

    fed: list[str] = []
    inner: list[MappingSpec] = []
    if isinstance(experts, nn.ModuleList) and len(experts):
        e0 = dict(experts[0].named_children())
        gate, up, down = _role(e0, GATE), _role(e0, UP), _role(e0, DOWN)
        if gate and up and down:
            fed = [f"{name}.experts.*.{gate[0]}", f"{name}.experts.*.{up[0]}"]
            inner = [
                MappingSpec(
                    f"{name}.experts.*.{up[0]}",
                    (f"{name}.experts.*.{down[0]}",),
                    f"{name}.experts.*.{down[0]}",
                )
            ]
    routers = []
    for r, m in sub.items():
        if not (r in ROUTERS or "router" in r or r.endswith("gate")) or any(s in r for s in SHARED):
            continue
        # the router's own weight, or its one linear child (Hunyuan's `gate.wg`)
        own = [("", m)] if isinstance(getattr(m, "weight", None), torch.Tensor) else list(_linears(m).items())
        for child, w_mod in own[:1] if len(own) == 1 else []:
            if w_mod.weight.dim() == 2 and w_mod.weight.shape[-1] == hidden:
                routers.append(f"{name}.{r}" + (f".{child}" if child else ""))
    absorb = routers + [f"{name}.{n}" for n in lin if n.startswith("shared_expert_gate")]
    for s in SHARED:
        if s in sub:
            part = _consumer(f"{name}.{s}", sub[s], hidden)
            fed += part["fed"]
            inner += part["inner"]
    if not routers:  # a router this rule cannot find would be left unscaled: nothing is fed from the norm
        fed = []
    if not isinstance(
        experts, nn.ModuleList
    ):  # fused experts kept FP read the same input: they cannot absorb
        fed = []
    return {"fed": fed, "absorb": absorb, "inner": inner}


def structural_specs(model: nn.Module, layers_attr: str, prepare) -> tuple:
    """The union, in order, of every block's specs (blocks may differ: dense and MoE layers)."""
    hidden = model.config.get_text_config().hidden_size
    layers = model.get_submodule(layers_attr)
    if not any(isinstance(m, nn.Linear) for m in layers.modules()):
        kinds = sorted(
            {
                type(m).__name__
                for m in layers[0].modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor) and not is_norm(m)
            }
        )
        raise StructureError(
            f"{layers_attr}.0 has no nn.Linear to quantize (its weights are in: {', '.join(kinds[:6]) or 'nothing'})"
        )
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
