"""The TransformerLens-hooks EAP-IG baseline agrees with the eager-torch one (and TL with HF).

Skipped unless a TransformerLens with `HookedTransformer` is installed (3.9.0 fits torch 2.13 and
transformers 5.x; 4.x removed `HookedTransformer`).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformer_lens = pytest.importorskip("transformer_lens")
if not hasattr(transformer_lens, "HookedTransformer"):
  pytest.skip(f"transformer_lens {getattr(transformer_lens, '__version__', '?')} has no "
              "HookedTransformer (4.x removed it; install transformer-lens==3.9.0)",
              allow_module_level=True)

from benchmarks.tl_baseline import hooked_from_hf, tl_eap_ig_inputs  # noqa: E402
from benchmarks.torch_baseline import torch_eap_ig_inputs  # noqa: E402

V, P = 100, 12


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "inverse-layer-scale"])
def models(request):
  torch.manual_seed(0)
  conf = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=32,
                                 bos_token_id=0, eos_token_id=0,
                                 scale_attn_by_inverse_layer_idx=request.param)
  hf = transformers.GPT2LMHeadModel(conf).eval()
  return hf, hooked_from_hf(hf)


def _batch():
  g = torch.Generator().manual_seed(1)
  lengths = torch.tensor([12, 9, 12, 6, 10, 12, 8])
  n = len(lengths)
  mask = (torch.arange(P)[None] < lengths[:, None]).long()
  clean = torch.randint(1, V, (n, P), generator=g)
  clean[:, 0] = 0
  corrupted = clean.clone()
  corrupted[:, 3] = torch.randint(1, V, (n,), generator=g)
  correct = torch.randint(1, V, (n,), generator=g)
  incorrect = torch.randint(1, V, (n,), generator=g)
  return clean * mask, corrupted * mask, mask, lengths - 1, correct, incorrect


def test_logits_equal_hf(models):
  hf, tl = models
  clean, _, mask, *_ = _batch()
  with torch.no_grad():
    want = hf(clean, attention_mask=mask).logits
    got = tl(clean, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(tl(clean), hf(clean).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps,batch_size", [(5, 3), (2, 16)])
def test_scores_match_torch_baseline(models, steps, batch_size):
  hf, tl = models
  args = _batch()
  want = torch_eap_ig_inputs(hf, *args, steps=steps, batch_size=batch_size)
  got = tl_eap_ig_inputs(tl, *args, steps=steps, batch_size=batch_size)
  H, L = 4, 2
  assert got.shape == want.shape == (1 + L * (H + 1), L * (3 * H + 1) + 1)
  scale = want.abs().max()
  assert scale > 0
  torch.testing.assert_close(got, want, atol=1e-4 * float(scale), rtol=0)
  # Invalid (downstream-sender) edges stay exactly zero in both.
  assert torch.equal(got == 0, want == 0)


def test_accepts_hf_model(models):
  hf, tl = models
  args = _batch()
  torch.testing.assert_close(tl_eap_ig_inputs(hf, *args, steps=2, batch_size=4),
                             tl_eap_ig_inputs(tl, *args, steps=2, batch_size=4), atol=0, rtol=0)


def test_bad_input_raises(models):
  from benchmarks.tl_baseline import TLBaselineError
  _, tl = models
  clean, corrupted, mask, last, correct, incorrect = _batch()
  with pytest.raises(TLBaselineError, match="equal"):
    tl_eap_ig_inputs(tl, clean, corrupted[:, :5], mask, last, correct, incorrect)
  with pytest.raises(TLBaselineError, match="steps"):
    tl_eap_ig_inputs(tl, clean, corrupted, mask, last, correct, incorrect, steps=0)
