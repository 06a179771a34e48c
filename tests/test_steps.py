"""The shared train step: gradient accumulation gives the same update whatever the micro-batch split or mesh."""
import jax
import numpy as np
import optax
from flax import nnx

from jaxrlhf import losses
from jaxrlhf.models import from_pretrained
from jaxrlhf.train.steps import init_optimizer, make_train_step, stack_micro_batches
from sharding import make_mesh
from tests.tiny import save_tiny


def nll(model, b):
    logp = losses.logprobs_from_logits(model(b["ids"], b["mask"])[:, :-1], b["ids"][:, 1:])
    return losses.token_mean_over_batch(-logp, b["mask"][:, 1:], b["num_tokens"]), {}


def one_update(path, mesh_text, micro, batch):
    mesh = make_mesh(mesh_text)
    graphdef, state = nnx.split(from_pretrained(path, mesh=mesh))
    params = state.to_pure_dict()
    # Plain SGD with lr 1: the update IS the accumulated gradient (Adam's first step would be ~sign(g), which
    # turns fp32 summation-order noise on near-zero entries into full-size differences).
    tx = optax.sgd(1.0)
    opt = init_optimizer(tx, params, mesh)
    step = make_train_step(graphdef, nll, tx, params=params, opt_state=opt, mesh=mesh)
    params, opt, metrics = step(params, opt, stack_micro_batches(batch, micro))
    return jax.tree_util.tree_map(np.asarray, params), float(metrics["loss"]), float(metrics["grad_norm"])


def test_micro_batch_split_and_mesh_do_not_change_the_update(tmp_path):
    save_tiny("qwen2", tmp_path)
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 96, (16, 10))
    mask = (np.arange(10)[None] < rng.randint(3, 11, (16, 1))).astype(np.int32)  # ragged right padding
    batch = {"ids": ids * mask, "mask": mask, "num_tokens": np.float32(mask[:, 1:].sum())}
    ref_params, ref_loss, ref_norm = one_update(str(tmp_path), "4x2", 16, batch)
    for mesh_text, micro in (("4x2", 4), ("8x1", 8), ("1x8", 2)):
        params, loss, norm = one_update(str(tmp_path), mesh_text, micro, batch)
        assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss) and abs(norm - ref_norm) < 1e-4 * ref_norm
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=1e-6)  # fp32 summation order only
