"""The patched output declares task_loss/aux_loss as fields: pytree round trips (DDP, compile) and pickling work."""

import pickle

import torch
from torch.utils import _pytree as pytree

import lopt_kernels
from tiny_models import batch, tiny_model


def test_output_survives_pytree_round_trip_and_pickle():
    model = lopt_kernels.patch(tiny_model("llama"))
    out = model(**batch())
    leaves, spec = pytree.tree_flatten(out)
    back = pytree.tree_unflatten(leaves, spec)
    assert type(back) is type(out) and list(back.keys()) == list(out.keys())
    assert back.aux_loss is out.aux_loss and back.task_loss is out.task_loss
    detached = type(out)(**{k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()})
    again = pickle.loads(pickle.dumps(detached))
    torch.testing.assert_close(again.aux_loss, out.aux_loss.detach())
    assert isinstance(out, type(tiny_model("llama")(**batch())))  # still the model's own output class
