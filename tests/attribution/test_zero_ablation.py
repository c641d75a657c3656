"""Zero ablation as EAP-IG defines it: the input node is TransformerLens' `hook_embed` (the token
embedding alone), so the position embedding is never ablated.

Checked against an independent reimplementation of the `eap` package's zero-ablation EAP
(`get_scores_eap` with `intervention='zero'` and the notebook metric `loss=True, mean=True`) on
TransformerLens hooks: `hook_embed`, `attn.hook_result` and `hook_mlp_out` are the senders, the
gradients are read at `hook_{q,k,v}_input`, `hook_mlp_in` and the last `hook_resid_post`.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxinterp.circuits.layout import valid_edges

torch = pytest.importorskip("torch")
transformer_lens = pytest.importorskip("transformer_lens")
if not hasattr(transformer_lens, "HookedTransformer"):
  pytest.skip("this transformer_lens has no HookedTransformer (install transformer-lens==3.9.0)",
              allow_module_level=True)

from benchmarks.tl_baseline import hooked_from_hf  # noqa: E402
from jaxinterp import attribution as A  # noqa: E402
from jaxinterp import models, tasks  # noqa: E402
from tests.attribution.torch_oracle import random_task_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def eap_zero_scores(tl, clean, mask, last, correct, incorrect) -> np.ndarray:
  """EAP-IG's EAP scores with zero ablation: sum over batch and positions of (0 - clean sender) .
  d(loss)/d(receiver input), divided by the number of examples; loss = -mean logit difference."""
  L, H, d = tl.cfg.n_layers, tl.cfg.n_heads, tl.cfg.d_model
  n_fwd, n_bwd = 1 + L * (H + 1), L * (3 * H + 1) + 1
  B, P = clean.shape
  diff = torch.zeros(B, P, n_fwd, d, dtype=tl.cfg.dtype)
  scores = torch.zeros(n_fwd, n_bwd, dtype=torch.float64)

  def sender(index):
    def hook(act, hook):
      diff[:, :, index] -= act.detach()  # zero ablation: nothing added for the corrupted run
      if index == 0:  # the weights need no gradient: start the backward pass at the embedding
        return act.detach().requires_grad_(True)
    return hook

  def receiver(prev, cols):
    def hook(grad, hook):
      g = grad.detach()
      g = g if g.ndim == 4 else g[:, :, None]
      scores[:prev, cols] += torch.einsum("bpfd,bprd->fr", diff[:, :, :prev], g).double()
    return hook

  fwd = [("hook_embed", sender(0))]
  bwd = []
  for li in range(L):
    first = 1 + li * (H + 1)
    fwd += [(f"blocks.{li}.attn.hook_result", sender(slice(first, first + H))),
            (f"blocks.{li}.hook_mlp_out", sender(first + H))]
    for j, x in enumerate("qkv"):
      cols = slice(li * (3 * H + 1) + j * H, li * (3 * H + 1) + (j + 1) * H)
      bwd.append((f"blocks.{li}.hook_{x}_input", receiver(first, cols)))
    mlp = li * (3 * H + 1) + 3 * H
    bwd.append((f"blocks.{li}.hook_mlp_in", receiver(first + H, slice(mlp, mlp + 1))))
  bwd.append((f"blocks.{L - 1}.hook_resid_post", receiver(n_fwd, slice(n_bwd - 1, n_bwd))))
  with tl.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
    logits = tl(clean, attention_mask=mask)
    rows = torch.arange(B)
    at = logits[rows, last]
    loss = -(at[rows, correct] - at[rows, incorrect]).mean()
    loss.backward()
  return (scores / B).numpy()


@pytest.mark.slow
def test_zero_ablation_eap_matches_eap_ig(hf_gpt2_dir):
  path, hf = hf_gpt2_dir
  model = models.from_pretrained(path)
  b = random_task_batch(97, n=8, pos=9, seed=5)
  ds = tasks.Dataset(task=tasks.get_task("logit-diff"), clean=b.clean.numpy().astype(np.int32),
                     corrupted=b.corrupted.numpy().astype(np.int32),
                     lengths=(b.last + 1).numpy().astype(np.int32),
                     labels={"correct": b.correct.numpy().astype(np.int32),
                             "incorrect": b.incorrect.numpy().astype(np.int32)})
  ours = A.attribute(model.cfg, model.params, ds, method="EAP", intervention="zero", batch_size=8,
                     quiet=True).scores
  tl = hooked_from_hf(hf)
  eap = eap_zero_scores(tl, b.clean, b.mask, b.last, b.correct, b.incorrect)
  valid = valid_edges(model.cfg)
  assert np.array_equal(eap != 0, valid & (eap != 0))  # eap fills only upstream senders
  # eap's score is -ours / batch size: its loss is the negated metric, its batch sums per-batch
  # means.
  want = -ours * 1.0 / len(ds)
  r_all = np.corrcoef(eap[valid], want[valid])[0, 1]
  r_input = np.corrcoef(eap[0][valid[0]], want[0][valid[0]])[0, 1]
  assert r_all >= 0.999 and r_input >= 0.999, (r_all, r_input)
  np.testing.assert_allclose(want[valid], eap[valid], atol=2e-4 * np.abs(eap).max())
  # Zeroing the position embedding too (the whole input node) is another definition.
  old = A.attribute(model.cfg, model.params, ds, method="EAP", intervention="zero-all",
                    batch_size=8, quiet=True).scores
  np.testing.assert_allclose(old[1:], ours[1:], atol=1e-6)  # only input edges differ
  assert np.corrcoef(eap[0][valid[0]], -old[0][valid[0]])[0, 1] < 0.99
