"""The `das` suite: DAS training speed and IIA at 500 steps, jaxinterp against pyvene.

Task: modular addition. The input is `a b =` (a, b in 0..P-1; `=` is token P) and the model predicts
S = (a + b) mod P at `=`. The high-level variable is S; interchanging it from a source input gives
the counterfactual label S(source).

The model: a 2-layer GPT-2 (d_model 64, d_mlp 256, 4 heads) whose layer-1 attention output is held
at zero, so everything the answer depends on passes through position 2 after block 0. It is trained
here with torch on all P^2 inputs and saved as a HF checkpoint, so that pyvene runs the very weights
jaxinterp loads with `from_pretrained`. DAS for S at position 2 (`=`), at two widths:

  width 64:  the residual stream after block 0 (`blocks.0.hook_resid_post`; pyvene: layer 0
             "block_output"), k = 16 interchanged rotated dimensions;
  width 256: the MLP hidden layer of block 0 (`blocks.0.mlp.hook_post`; pyvene: layer 0
             "mlp_activation"), k = 64.

Each library uses its defaults: jaxinterp `init_rotated_space` + `train_interventions` (Adam,
lr 1e-2); pyvene `RotatedSpaceIntervention` with Adam at lr 1e-3, as in its DAS tutorial. Same
data, same batches (batch 64), 500 steps; IIA on 1,024 held-out pairs. The step time is the mean
over the steps of a warm run: for jaxinterp a second `train_interventions` call after a 2-step
call that compiles (so host-side batching is included); for pyvene the steps after the first 2.
pyvene is optional: without it (`import pyvene` fails) its columns are left out. On CPU, torch runs
on one thread (pyvene's fastest setting here: 32 ms/step against 420 ms with 2 threads on the
loaded 2-core machine); run with OPENBLAS_NUM_THREADS=1 on a shared machine, as LAPACK's threads
(jaxinterp's QR, pyvene's matrix exponential) otherwise spin against other processes.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from jaxinterp.interventions import Where
from jaxinterp.interventions import training as tr
from jaxinterp.models.pretrained import from_pretrained

P = 17  # modulus; token P is `=`
WIDTHS = {64: ("blocks.0.hook_resid_post", "block_output", 16),
          256: ("blocks.0.mlp.hook_post", "mlp_activation", 64)}
POSITION = 2  # the `=` token


def all_inputs() -> np.ndarray:
  """The P^2 inputs `a b =`: Int[ndarray, "P*P 3"]."""
  a, b = np.meshgrid(np.arange(P), np.arange(P), indexing="ij")
  return np.stack([a.ravel(), b.ravel(), np.full(P * P, P)], 1).astype(np.int32)


def interchange_data(n: int, seed: int) -> dict:
  """(base, source, label) triples for interchanging S = (a + b) mod P."""
  rng = np.random.default_rng(seed)
  x = all_inputs()
  base, src = x[rng.integers(0, len(x), n)], x[rng.integers(0, len(x), n)]
  return {"base": base, "source": src, "label": ((src[:, 0] + src[:, 1]) % P).astype(np.int32)}


def train_model(out_dir: str, steps: int = 600, seed: int = 0) -> str:
  """Train the model on all P^2 inputs with torch and save it as a HF checkpoint (once)."""
  if os.path.exists(os.path.join(out_dir, "config.json")):
    return out_dir
  import torch
  import transformers
  torch.manual_seed(seed)
  conf = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=256, vocab_size=P + 1,
                                 n_positions=3, bos_token_id=P, eos_token_id=P, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0)
  model = transformers.GPT2LMHeadModel(conf)
  cut = model.transformer.h[1].attn.c_proj  # layer 1's attention writes nothing
  with torch.no_grad():
    cut.weight.zero_()
    cut.bias.zero_()
  cut.weight.requires_grad_(False)
  cut.bias.requires_grad_(False)
  opt = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=1e-2,
                          weight_decay=0.01)
  x = all_inputs()
  toks = torch.as_tensor(x, dtype=torch.long)
  labels = torch.as_tensor((x[:, 0] + x[:, 1]) % P, dtype=torch.long)
  for _ in range(steps):
    loss = torch.nn.functional.cross_entropy(model(toks).logits[:, -1], labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
  model.eval()
  tmp = out_dir + ".tmp"
  model.save_pretrained(tmp)
  os.replace(tmp, out_dir)
  return out_dir


def have_pyvene() -> bool:
  """Whether pyvene imports (it is optional and not installed in CI)."""
  try:
    import pyvene  # noqa: F401
  except Exception:  # absent, or incompatible with the installed torch/transformers
    return False
  return True


def batches(n: int, batch: int, steps: int, seed: int) -> list:
  """The example indices of each step: the very draws `train_interventions` makes."""
  rng = np.random.default_rng(seed)
  return [rng.choice(n, size=min(batch, n), replace=False) for _ in range(steps)]


def jax_das(model_dir: str, width: int, train: dict, held: dict, steps: int, batch: int,
            seed: int) -> dict:
  """DAS with jaxinterp's defaults; per-step time of a warm run, IIA after `steps`."""
  m = from_pretrained(model_dir)
  site, _, k = WIDTHS[width]
  d = m.cfg.d_mlp if "mlp" in site else m.cfg.d_model
  tmpl = {site: tr.init_rotated_space(jax.random.PRNGKey(seed), d, k,
                                      where=Where.of(positions=POSITION))}
  t0 = time.perf_counter()
  tr.train_interventions(m.cfg, m.params, tmpl, train, steps=2, batch_size=batch, seed=seed)
  first = time.perf_counter() - t0  # compile + 2 steps
  t0 = time.perf_counter()
  trained, hist = tr.train_interventions(m.cfg, m.params, tmpl, train, steps=steps,
                                         batch_size=batch, seed=seed)
  jax.block_until_ready(trained)
  train_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  acc = tr.iia(m.cfg, m.params, trained, held)
  iia_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  tr.iia(m.cfg, m.params, trained, held)
  return dict(impl="jaxinterp", step_s=train_s / steps, first_call_s=first, iia=acc,
              iia_first_s=iia_first, iia_warm_s=time.perf_counter() - t0,
              final_loss=hist["loss"][-1])


def pyvene_das(model_dir: str, width: int, train: dict, held: dict, steps: int, batch: int,
               seed: int) -> dict:
  """DAS with pyvene's RotatedSpaceIntervention and its tutorial's Adam at lr 1e-3."""
  import pyvene as pv
  import torch
  import transformers
  torch.manual_seed(seed)
  if not torch.cuda.is_available():
    torch.set_num_threads(1)  # tiny ops: pyvene's fastest setting on the shared 2-core CPU
  model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
  _, component, k = WIDTHS[width]
  config = pv.IntervenableConfig(representations=[pv.RepresentationConfig(0, component, "pos", 1)],
                                 intervention_types=pv.RotatedSpaceIntervention)
  ivm = pv.IntervenableModel(config, model)
  ivm.disable_model_gradients()
  iv = next(iter(ivm.interventions.values()))
  iv = iv[0] if isinstance(iv, tuple) else iv
  iv.set_interchange_dim(k)
  opt = torch.optim.Adam(iv.rotate_layer.parameters(), lr=1e-3)

  def t(a):
    return torch.as_tensor(np.asarray(a, np.int64))

  def run(b, s):
    loc = {"sources->base": ([[[POSITION]] * len(b)], [[[POSITION]] * len(b)])}
    _, out = ivm({"input_ids": t(b)}, [{"input_ids": t(s)}], loc)
    return out.logits[:, -1]

  def step(idx):
    logits = run(train["base"][idx], train["source"][idx])
    loss = torch.nn.functional.cross_entropy(logits, t(train["label"][idx]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  draws = batches(len(train["base"]), batch, steps, seed)
  t0 = time.perf_counter()
  for idx in draws[:2]:
    step(idx)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for idx in draws[2:]:
    loss = step(idx)
  train_s = (time.perf_counter() - t0) / max(1, steps - 2)

  def evaluate():
    correct = 0
    with torch.no_grad():
      for i in range(0, len(held["base"]), 1024):
        lg = run(held["base"][i:i + 1024], held["source"][i:i + 1024])
        correct += int((lg.argmax(-1).numpy() == held["label"][i:i + 1024]).sum())
    return correct / len(held["base"])

  t0 = time.perf_counter()
  acc = evaluate()
  iia_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  evaluate()
  return dict(impl="pyvene", step_s=train_s, first_call_s=first, iia=acc, iia_first_s=iia_first,
              iia_warm_s=time.perf_counter() - t0, final_loss=float(loss.detach()),
              torch_threads=torch.get_num_threads())


def suite_das(workdir: str, quick: bool, seeds=(0, 1, 2), steps: int = 500, batch: int = 64,
              log=print) -> list:
  """Rows of the `das` suite: one per (width, seed, library), plus a summary per width."""
  if quick:  # a smoke run: a barely trained model, 20 steps, one seed
    seeds, steps = seeds[:1], 20
  model_dir = train_model(os.path.join(workdir, "das_modsum" + ("_quick" if quick else "")),
                          steps=30 if quick else 600)
  train, held = interchange_data(4096, 1), interchange_data(1024, 2)
  libs = [("jaxinterp", jax_das)] + ([("pyvene", pyvene_das)] if have_pyvene() else [])
  rows = []
  for width in WIDTHS:
    for seed in seeds:
      for name, fn in libs:
        log(f"[das] width {width} seed {seed}: {name}, {steps} steps")
        r = fn(model_dir, width, train, held, steps, batch, seed)
        rows.append(dict(suite="das", width=width, site=WIDTHS[width][0], k=WIDTHS[width][2],
                         seed=seed, steps=steps, batch_size=batch, **r))
    mine = [r for r in rows if r["width"] == width and r["impl"] == "jaxinterp"]
    theirs = [r for r in rows if r["width"] == width and r["impl"] == "pyvene"]
    summary = dict(suite="das", width=width, summary=True, steps=steps,
                   iia_jaxinterp=float(np.mean([r["iia"] for r in mine])),
                   step_s_jaxinterp=float(np.median([r["step_s"] for r in mine])))
    if theirs:
      summary.update(iia_pyvene=float(np.mean([r["iia"] for r in theirs])),
                     step_s_pyvene=float(np.median([r["step_s"] for r in theirs])))
      summary["step_speedup_vs_pyvene"] = summary["step_s_pyvene"] / summary["step_s_jaxinterp"]
    rows.append(summary)
  return rows
