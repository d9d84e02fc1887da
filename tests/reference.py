"""An independent, straightforward LoPT implementation (the public reference's behaviour):
every activation stored, plain ``.detach()`` at block boundaries, an unfused aux decoder in
fp32 arithmetic, one ordinary backward. The library is tested against it."""

from __future__ import annotations

import copy

import torch
from torch import nn

# Where each family keeps its decoder layers (written out here on purpose: the reference must not
# share the library's structural discovery).
LAYER_PATHS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "mamba": "backbone.layers"}
# Mixture-of-experts routers inside a layer, whose first output (the router logits) feeds the router load-balancing
# loss: LoPT detaches the non-final blocks' (the task loss trains only the final block).
ROUTER_PATHS = {"mixtral": "mlp.gate"}


def layer_list(model, family):
    return model.get_submodule(LAYER_PATHS.get(family, "model.layers"))


def even_starts(num_layers, k):
    base, extra = divmod(num_layers, k)
    starts, pos = [0], 0
    for b in range(k - 1):
        pos += base + (1 if b < extra else 0)
        starts.append(pos)
    return starts + [num_layers]


class ReferenceDecoder(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        r = max(hidden // 4, 1)
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, r)
        self.up = nn.Linear(r, hidden)

    def forward(self, y):
        y = y.float()
        z = nn.functional.linear(nn.functional.layer_norm(y, self.norm.normalized_shape, self.norm.weight.float(),
                                                          self.norm.bias.float(), self.norm.eps),
                                 self.down.weight.float(), self.down.bias.float())
        return nn.functional.linear(nn.functional.gelu(z), self.up.weight.float(), self.up.bias.float())


class ReferenceLoPT:
    """Wraps an unpatched copy of a model; ``decoders_from`` supplies initial decoder weights."""

    def __init__(self, model, family, starts, decoders_from, lambda_aux=10.0):
        self.model = copy.deepcopy(model)
        inp, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if out.weight is inp.weight:
            out.weight = nn.Parameter(inp.weight.detach().clone())
        self.layers = layer_list(self.model, family)
        self.starts = starts
        if family in ROUTER_PATHS:
            for layer in self.layers[: starts[-2]]:
                router = layer.get_submodule(ROUTER_PATHS[family])
                # on the instance: before transformers' output-recording hooks see the logits
                router.forward = lambda *a, _forward=router.forward, **k: (
                    lambda out: (out[0].detach(), *out[1:]))(_forward(*a, **k))
        self.lambda_aux = lambda_aux
        self.decoders = nn.ModuleList()
        for src in decoders_from:
            dec = ReferenceDecoder(src.norm.normalized_shape[0]).to(src.norm.weight.device)
            dec.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
            self.decoders.append(dec)

    def parameters(self):
        return [*self.model.parameters(), *self.decoders.parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def step_loss(self, batch, num_items_in_batch=None):
        """Returns (loss, task, aux) for one micro-batch, as the reference computes them."""
        inputs, aux_terms, handles = {}, [], []
        for b in range(len(self.starts) - 2):
            first, last = self.layers[self.starts[b]], self.layers[self.starts[b + 1] - 1]

            def pre(mod, args, kwargs, b=b):
                inputs[b] = args[0] if args else kwargs["hidden_states"]

            def post(mod, args, kwargs, output, b=b):
                y = output[0] if isinstance(output, tuple) else output
                aux_terms.append(((self.decoders[b](y) - inputs[b].detach().float()) ** 2).mean())
                y = y.detach()
                return (y, *output[1:]) if isinstance(output, tuple) else y

            handles.append(first.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(last.register_forward_hook(post, with_kwargs=True))
        try:
            kwargs = dict(batch)
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            out = self.model(**kwargs)
        finally:
            for h in handles:
                h.remove()
        aux = torch.stack(aux_terms).mean()
        weight = 1.0
        if num_items_in_batch is not None:
            weight = (batch["labels"][..., 1:] != -100).sum() / num_items_in_batch
        return out.loss + self.lambda_aux * weight * aux, out.loss, aux


def named_grads(model, prefix_skip="lopt_aux_decoders"):
    return {n: p.grad for n, p in model.named_parameters() if not n.startswith(prefix_skip)}


def assert_grads_close(actual: dict, expected: dict, rtol=2e-3):
    """Every gradient within ``rtol`` of the reference's largest entry (None and zero count as equal)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        if e is None or a is None:
            other = a if e is None else e
            assert other is None or other.abs().max() == 0, f"{name}: one gradient is None, the other non-zero"
            continue
        scale = e.abs().max().item()
        err = (a.float() - e.float()).abs().max().item()
        assert err <= rtol * scale + 1e-10, f"{name}: max err {err:.3e} vs scale {scale:.3e}"
