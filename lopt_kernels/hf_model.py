"""What lopt_kernels knows about how a Hugging Face causal LM runs, beyond where its layer stack is (``discovery``).

- its forward: how it turns the output head's logits into the loss (read from its source, structurally), the
  config attributes that transform logits, a mixture-of-experts model's router-loss coefficient;
- how it calls its layers: transformers' gradient-checkpointing function (and the shim for transformers < 5.23,
  which checkpoints a layer's whole ``__call__``), the KV cache object among a layer call's arguments, the batch
  entries every layer reads (positions, packed-sequence offsets), how the backbone's loop calls a layer (what it
  reads of the output, what it hands to the next call).

Nothing here imports transformers at module level or knows about LoPT's hooks' state.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn
from torch.utils.checkpoint import checkpoint

# ---- the backbone's forward: which of its modules run before and after the layer stack -------------------------


@functools.lru_cache(maxsize=None)
def children_around_layers(cls, layers: str) -> tuple[frozenset, frozenset]:
    """``(before, after)``: the names of ``self.<child>`` attributes that ``cls.forward`` first reads before the loop
    over ``self.<layers>`` and those it first reads after that loop ends, read from its source. Registration order
    does not say which side a module is on: OPT registers its final LayerNorm and ``project_out`` (applied after the
    layers) before its layer stack. Empty sets when the source cannot be read or has no such loop."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return frozenset(), frozenset()

    def self_attrs(node):
        return [n for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                and n.value.id == "self"]

    loops = [loop for loop, _ in _layer_loops(tree, layers)]
    if not loops:
        return frozenset(), frozenset()
    loop = min(loops, key=lambda n: (n.lineno, n.col_offset))
    start, end = (loop.lineno, loop.col_offset), (loop.end_lineno, loop.end_col_offset)
    first: dict[str, tuple[int, int]] = {}
    for attr in self_attrs(tree):
        pos = (attr.lineno, attr.col_offset)
        if attr.attr not in first or pos < first[attr.attr]:
            first[attr.attr] = pos
    before = frozenset(name for name, pos in first.items() if pos < start)
    after = frozenset(name for name, pos in first.items() if pos > end)
    return before, after


# ---- the forward: logits and loss -----------------------------------------------------------------------------

# Config attributes through which a family transforms logits beyond ``lm_head(hidden)``; the fused
# task loss honours only final-logit soft-capping and steps aside for the others.
LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "logit_scale_factor")


_CASTS = ("float", "to", "contiguous")  # calls on the logits that leave the loss unchanged


def _uncast(node):
    """``node`` without the casts around it (``x.float().contiguous()`` -> ``x``)."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _CASTS:
        node = node.func.value
    return node


def _head_call(node, head: str = "lm_head") -> bool:
    """Whether ``node`` is the output head (the model's attribute ``head``) applied to hidden states
    (``self.lm_head(...)``, possibly cast)."""
    node = _uncast(node)
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Call):  # self.get_output_embeddings()(hidden)
        func = func.func
        return isinstance(func, ast.Attribute) and func.attr == "get_output_embeddings"
    return isinstance(func, ast.Attribute) and func.attr == head


def _cast_of(node, names: set) -> bool:
    """Whether ``node`` is one of ``names`` only cast (``logits.float()``)."""
    node = _uncast(node)
    return isinstance(node, ast.Name) and node.id in names


def _tanh_of(node, names: set) -> bool:
    """Whether ``node`` is ``torch.tanh(name)`` (or ``tanh`` by another path) of one of ``names``."""
    return (isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "tanh" and _cast_of(node.args[0], names))


def _scale_attribute(node, names: set, head: str = "lm_head") -> tuple | None:
    """For ``name * self.a.b`` / ``name / self.a.b`` (or the head call in place of ``name``): ``("a", "b")``."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div))):
        return None
    for operand, other in ((node.left, node.right), (node.right, node.left)):
        if not (_cast_of(operand, names) or _head_call(operand, head)) or (isinstance(node.op, ast.Div) and operand is node.right):
            continue
        chain = []
        while isinstance(other, ast.Attribute):
            chain.append(other.attr)
            other = other.value
        if isinstance(other, ast.Name) and other.id == "self" and chain:
            return tuple(reversed(chain))
    return None


@functools.lru_cache(maxsize=None)
def logit_transforms_in_forward(cls, head: str = "lm_head") -> tuple:
    """The statements of ``cls.forward`` that change the output head's logits before the loss (a scale, a soft cap
    other than ``final_logit_softcapping``, a vocabulary slice), read from its source, as ``(text, scale)`` pairs:
    ``scale`` is the attribute path (from the model) of a plain multiplier or divisor, else None. Empty when the
    logits are the head's output (or only soft-capped by ``final_logit_softcapping``, which the fused loss applies).
    Read structurally, so that a family added by a later transformers release is checked as well."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return (("its forward's source, to check it for logit changes, could not be read", None),)
    statements = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))]
    head_vars = set()
    for node in statements:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if len(targets) == 1 and isinstance(targets[0], ast.Name) and node.value is not None and _head_call(node.value, head):
            head_vars.add(targets[0].id)
    found = []
    for node in statements:  # the head's output inside a larger expression
        if node.value is not None and not _head_call(node.value, head) and any(_head_call(n, head)
                                                                             for n in ast.walk(node.value)):
            found.append((ast.get_source_segment(source, node), _scale_attribute(node.value, head_vars, head)))
    for node in statements:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        written = {t.id if isinstance(t, ast.Name) else getattr(t.value, "id", None)
                   for t in targets if isinstance(t, (ast.Name, ast.Subscript))}
        if not written & head_vars or (node.value is not None and _head_call(node.value, head)):
            continue
        text = ast.get_source_segment(source, node) or ""
        if "final_logit_softcapping" in text or (node.value is not None and _cast_of(node.value, head_vars)):
            continue
        if "final_logit_softcapping" in source and _tanh_of(node.value, head_vars):
            continue  # the middle of ``logits / cap; tanh(logits); logits * cap``, which the fused loss applies
        found.append((text, _scale_attribute(node.value, head_vars, head) if node.value is not None else None))
    return tuple(found)


@functools.lru_cache(maxsize=None)
def forward_calls_loss_function(cls) -> bool:
    """Whether ``cls.forward`` computes its loss by calling ``self.loss_function(...)`` (read from its source), the
    one the fused task loss reproduces (``ForCausalLMLoss``: labels shifted by one inside). Decoder halves of
    encoder-decoder families (BART, Whisper, TrOCR...), XLNet, XLM and CPM-Ant call their own ``CrossEntropyLoss``
    on labels that are not shifted; an unreadable source counts as not calling it."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    return any(_is_loss_function_call(node) for node in ast.walk(tree))


def _is_loss_function_call(node) -> bool:
    """Whether ``node`` is the model's own loss function applied (``self.loss_function(...)``)."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "loss_function"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "self")


@functools.lru_cache(maxsize=None)
def loss_terms_from_logits_in_forward(cls, head: str = "lm_head") -> tuple:
    """The statements of ``cls.forward`` that set or add to ``loss`` from the output head's logits other than through
    ``self.loss_function`` (Bamba's z-loss, ``loss = loss + self.z_loss_coefficient * z_loss`` with ``z_loss`` the
    logits' squared log-partition), read from its source: a fused task loss, which computes only the loss function
    from the head's input, would leave them out. Values derived from the logits are followed through assignments in
    order. Empty when the loss is the loss function's (plus terms that do not read the logits, such as a router
    loss)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return ()
    statements = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                         and n.value is not None), key=lambda n: (n.lineno, n.col_offset))
    derived: set = set()  # names holding the head's logits or values computed from them
    found = []
    for node in statements:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = {t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)}
        if _is_loss_function_call(node.value):
            continue  # the loss the fused loss computes
        reads = _head_call(node.value, head) or any(
            isinstance(n, ast.Name) and n.id in derived for n in ast.walk(node.value)) or any(
            _head_call(n, head) for n in ast.walk(node.value))
        if not reads:
            continue
        if "loss" in names:
            found.append(ast.get_source_segment(source, node))
        else:
            derived |= names
    return tuple(found)


def identity_scale(lm, path) -> bool:
    """Whether the model attribute at ``path`` is a multiplier of 1 (or unset), which changes no logit."""
    value = lm
    try:
        for name in path:
            value = getattr(value, name)
    except AttributeError:
        return False
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1)


def router_loss_coef(lm) -> float | None:
    """The coefficient with which a MoE causal LM adds its router load-balancing loss (``output.aux_loss``)
    to its task loss (``loss += coef * aux_loss``, every transformers MoE family), or None."""
    for attr in ("router_aux_loss_coef", "aux_loss_coef"):
        coef = getattr(lm, attr, None)
        if isinstance(coef, (int, float)):
            return coef
    return None


# ---- how it calls its layers -----------------------------------------------------------------------------------

# Batch entries besides input_ids, attention_mask and labels that a stage passes to the model's forward.
PER_TOKEN_INPUTS = ("position_ids", "token_type_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                    "seq_idx")


@dataclass(frozen=True)
class LayerCallSite:
    """How the backbone's loop over its layer stack calls a layer and reads what it returns.

    ``outputs``: 0 where the loop takes the layer's output as the hidden states; n where it unpacks a tuple of n
    (``hidden_states, router_states = layer(...)``) or indexes the output (``outputs[0]``: n is one more than the
    largest index read). ``carried``: what the loop hands from one layer's call to the next besides the hidden states
    (ZAYA's router states, a sparse-attention indexer's selection), as ``(name, output index, argument)``, the
    argument a position in the call's arguments or a keyword."""

    outputs: int = 0
    carried: tuple = ()

    def stand_in_output(self, hidden):
        """What a layer that does not run here returns in its place: its input hidden states, in the output's
        structure (the other entries None)."""
        return hidden if self.outputs == 0 else (hidden, *([None] * (self.outputs - 1)))


def _layer_loops(tree, layers_attr: str):
    """The ``for`` loops of a parsed forward that iterate ``self.<layers_attr>`` (directly, sliced, enumerated or
    zipped), with the name each iteration binds the layer to."""
    for loop in (n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.AsyncFor))):
        if not any(isinstance(n, ast.Attribute) and n.attr == layers_attr and isinstance(n.value, ast.Name)
                   and n.value.id == "self" for n in ast.walk(loop.iter)):
            continue
        names = [t for t in (loop.target.elts if isinstance(loop.target, ast.Tuple) else [loop.target])
                 if isinstance(t, ast.Name)]
        yield loop, names


@functools.lru_cache(maxsize=None)
def layer_call_site(cls, layers_attr: str) -> LayerCallSite | None:
    """How the backbone class ``cls``'s forward calls its layers (:class:`LayerCallSite`), read from its source;
    None when no loop over ``self.<layers_attr>`` that calls the layer could be read. A value the caller passes to
    the forward is a cache (RWKV's recurrent ``state``), which training without one leaves None: not carried."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    function = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    arguments = set() if function is None else {a.arg for a in (*function.args.args, *function.args.kwonlyargs)}
    for loop, names in _layer_loops(tree, layers_attr):
        body = [n for stmt in loop.body for n in ast.walk(stmt)]
        calls = [n for n in body if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id in {t.id for t in names}]
        if not calls:
            continue
        outputs, results, whole = 0, {}, set()  # results: name -> output index
        for node in body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and node.value in calls:
                bound = node.targets[0]
                if isinstance(bound, ast.Tuple):
                    outputs = max(outputs, len(bound.elts))
                    results.update((e.id, k) for k, e in enumerate(bound.elts) if k and isinstance(e, ast.Name))
                elif isinstance(bound, ast.Name):
                    whole.add(bound.id)
            elif isinstance(node, ast.Subscript) and node.value in calls and isinstance(node.slice, ast.Constant):
                outputs = max(outputs, node.slice.value + 1)  # layer(...)[0]
        for node in body:  # outputs[k], and state = outputs[k] (k > 0: a value the layer hands on)
            if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in whole
                    and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)):
                outputs = max(outputs, node.slice.value + 1)
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, ast.Subscript) and isinstance(node.value.value, ast.Name)
                    and node.value.value.id in whole and isinstance(node.value.slice, ast.Constant)
                    and node.value.slice.value != 0):
                results[node.targets[0].id] = node.value.slice.value
        carried = []
        for call in calls:
            passed = [(a.id, j) for j, a in enumerate(call.args) if isinstance(a, ast.Name)]
            passed += [(k.value.id, k.arg) for k in call.keywords if k.arg and isinstance(k.value, ast.Name)]
            carried += [(name, results[name], where) for name, where in passed
                        if name in results and name not in arguments]
        return LayerCallSite(outputs=outputs, carried=tuple(dict.fromkeys(carried)))
    return None


def is_kv_cache(value) -> bool:
    """Whether ``value`` is a transformers KV cache object (``DynamicCache``, ``StaticCache``...), by its class name."""
    return type(value).__name__.endswith("Cache") and hasattr(value, "update")


def cache_in(args, kwargs):
    """The KV cache object among a layer call's (or a forward's) arguments, or None."""
    for value in (*args, *kwargs.values()):
        if is_kv_cache(value):
            return value
    return None


def without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A layer call that neither reads nor writes a KV cache (training does not need one, and a replay
    must not append to it a second time)."""
    args = tuple(None if is_kv_cache(a) else a for a in args)
    kwargs = {k: (None if is_kv_cache(v) else v) for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def drop_cache(output):
    """The backbone output without its KV cache (which the activation-free blocks did not fill)."""
    if isinstance(output, tuple):
        return tuple(None if is_kv_cache(v) else v for v in output)
    if hasattr(output, "items"):
        return type(output)(**{k: (None if is_kv_cache(v) else v) for k, v in output.items()})
    return None


@contextmanager
def outputs_not_recorded():
    """transformers' output capture paused: while a model's forward runs, forward hooks on its submodules record
    ``output_hidden_states``, ``output_attentions`` and a mixture-of-experts model's router logits (for the
    router load-balancing loss) into the forward's collector (``transformers.utils.output_capturing``). A
    checkpointed layer recomputed inside that forward (eager mode's local backward) would record its submodules'
    outputs a second time: a MoE model's router-logit tuple one entry per recomputed layer too long, and its
    router loss built partly from the recomputation's graph. Nothing to do where transformers has no such
    collector."""
    try:
        from transformers.utils import output_capturing  # noqa: PLC0415
    except ImportError:  # pragma: no cover - transformers without output capture
        yield
        return
    collector = getattr(output_capturing, "_active_collector", None)
    if collector is None or collector.get() is None:
        yield
        return
    token = collector.set(None)
    try:
        yield
    finally:
        collector.reset(token)


def non_reentrant_checkpoint(func):
    """``func`` (a layer's ``_gradient_checkpointing_func``) with ``use_reentrant=False``, or None when it
    already is. The eager local backward is a ``torch.autograd.grad``, which reentrant checkpointing refuses;
    both kinds recompute the same values (same RNG and autocast replay)."""
    if isinstance(func, functools.partial):
        if func.keywords.get("use_reentrant") is False:
            return None
        return functools.partial(func.func, *func.args, **{**func.keywords, "use_reentrant": False})
    if func is checkpoint:
        return functools.partial(checkpoint, use_reentrant=False)
    return None


class HooksOutsideCheckpoint:
    """A layer's ``_gradient_checkpointing_func`` that keeps this library's layer hooks outside the checkpoint.

    transformers < 5.23 checkpoints a layer's whole ``__call__`` (``checkpoint(partial(super().__call__, **kw),
    *args)``), hooks included, so our hooks would run inside the checkpointed region and again in its recompute
    during the caller's backward: the recompute then met hooks with no forward state (stored mode: KeyError) or
    a layer input the pre-hook had not swapped (eager mode with LoRA: checkpoint's metadata check failed).
    Newer transformers checkpoint ``forward`` only. For such a call this runs our pre-hook before the checkpoint
    and our post-hook after it, and the checkpointed call (and every recompute of it) without them; any other
    call goes to the layer's own function unchanged."""

    def __init__(self, layer: nn.Module, inner, pre, post, bodies: list):
        """``pre`` / ``post``: the layer's forward pre-hook / hook (with kwargs; either may be None); ``bodies``:
        the list this puts the layer on while its checkpointed call runs (the hooks then return None)."""
        self.layer, self.inner, self.pre, self.post, self.bodies = layer, inner, pre, post, bodies

    def _wraps_module_call(self, fn) -> bool:
        method = getattr(fn, "func", None) if isinstance(fn, functools.partial) else None
        return getattr(method, "__func__", None) is nn.Module.__call__ and getattr(method, "__self__", None) is self.layer

    def __call__(self, fn, *args):
        if not self._wraps_module_call(fn):
            return self.inner(fn, *args)
        pre, post = self.pre, self.post
        kwargs = dict(fn.keywords)
        replaced = pre(self.layer, args, kwargs) if pre is not None else None
        if replaced is not None:
            args, kwargs = replaced
        call, bodies, layer = fn.func, self.bodies, self.layer

        def without_our_hooks(*a, **kw):
            bodies.append(layer)
            try:
                return call(*a, **kw)
            finally:
                bodies.pop()

        output = self.inner(functools.partial(without_our_hooks, **kwargs), *args)
        if post is not None:
            replaced = post(self.layer, args, kwargs, output)
            output = output if replaced is None else replaced
        return output
