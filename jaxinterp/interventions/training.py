"""Training interventions (DAS and friends) with optax, causal models, IIA, saving and loading.

The model is frozen: its params are an argument of the jitted step but are never differentiated.
Only the *trainable fields* of each intervention (`type(iv).trainable`, e.g. the raw rotation of a
`RotatedSpace`) are optimised. Orthogonality is kept by parametrisation (`param="qr"` by default,
`"cayley"` for square rotations): the raw parameter is unconstrained and `orthogonalize` maps it to
an orthogonal matrix inside every forward, so plain optax optimisers apply. Sources, positions,
several interventions per site and the serial mode are described in
`jaxinterp.interventions.interchange`.

Interchange training data are (base, source, counterfactual label) triples: the source input is run
through the frozen model inside the step to get the source activation at each trained site, the
intervention swaps it into the base run, and the loss is the cross-entropy of the counterfactual
label at the label position (default: the last position; per example with `pos`).

  template = {"blocks.1.hook_resid_pre": init_rotated_space(key, d, k=4,
                                                           where=Where.of(positions=2))}
  trained, hist = train_interventions(cfg, params, template, data, steps=300)
  iia(cfg, params, trained, held_out)
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp.interventions import interchange
from jaxinterp.interventions.basic import ALL, InterventionError
from jaxinterp.interventions.das import BoundlessRotatedSpace, LowRankRotatedSpace, RotatedSpace
from jaxinterp.interventions.runner import Chain

Array = jax.Array


# --------------------------------------------------------------------------------------------------
# Initialisation and parameter plumbing


def _raw_rotation(key: Array, d: int, param: str, scale: float) -> Array:
  """The starting raw parameter of a d x d rotation: Float[Array, "d d"].

  "qr" (the default): a Haar-random orthogonal matrix times `scale` (pyvene's start: torch's
  orthogonal init); its entries are ~ scale / sqrt(d), so Adam's steps move R by the same angle at
  every width. "cayley": N(0, scale^2 / d) entries (the earlier default; learns slower at wide
  sites). "none": the Haar-random matrix itself.
  """
  g = jax.random.normal(key, (d, d))
  if param == "cayley":
    return g * (scale / np.sqrt(d))
  q, r = jnp.linalg.qr(g)
  q = q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :]
  return q if param == "none" else q * scale


def init_rotated_space(key: Array, d: int, k: int, *, param: str = "qr", where=ALL,
                       scale: float = 1.0, subspace=None) -> RotatedSpace:
  """A trainable DAS rotation (random start): first k of d rotated coordinates interchanged (or
  the rotated coordinates `subspace`). See `_raw_rotation` for the start and `param`."""
  sub = None if subspace is None else tuple(np.atleast_1d(np.asarray(subspace)).tolist())
  return RotatedSpace(_raw_rotation(key, d, param, scale), k=k, param=param, where=where,
                      subspace=sub)


def init_low_rank(key: Array, d: int, k: int, *, where=ALL,
                  scale: float = 1.0) -> LowRankRotatedSpace:
  """A trainable orthonormal d x k basis (QR parametrisation, random start with N(0, scale^2 / d)
  entries: the orthonormal start is the same at any scale, but Adam's steps are then the same
  angle at every width)."""
  raw = jax.random.normal(key, (d, k)) * (scale / np.sqrt(d))
  return LowRankRotatedSpace(raw, param="qr", where=where)


def init_boundless(key: Array, d: int, *, boundary: float = 0.5, temperature: float = 50.0,
                   param: str = "qr", where=ALL, scale: float = 1.0) -> BoundlessRotatedSpace:
  """A trainable Boundless DAS intervention (learnable boundary, sigmoid mask with temperature)."""
  return BoundlessRotatedSpace(_raw_rotation(key, d, param, scale),
                               boundary=jnp.asarray(boundary, jnp.float32),
                               temperature=jnp.asarray(temperature, jnp.float32), param=param,
                               where=where)


def _fields(iv) -> tuple[str, ...]:
  t = getattr(type(iv), "trainable", None)
  if not t:
    raise InterventionError(f"{type(iv).__name__} has no trainable parameters")
  return tuple(t)


def _param_keys(iv) -> list[tuple[str, int, str]]:
  """(key, item index, field) of each trainable array of a site's intervention; a `Chain`'s keys
  are "i.field" (its trainable items only), a single intervention's are its field names."""
  if not isinstance(iv, Chain):
    return [(f, 0, f) for f in _fields(iv)]
  keys = [(f"{i}.{f}", i, f) for i, it in enumerate(iv.items)
          for f in (getattr(type(it), "trainable", None) or ())]
  if not keys:
    raise InterventionError(f"none of the Chain's items ({[type(it).__name__ for it in iv.items]}) "
                            f"has trainable parameters")
  return keys


def tie_groups(interventions: Mapping[str, Any], tie) -> tuple:
  """Check parameter-sharing groups against the interventions; return them as a hashable tuple.

  Args:
    tie: groups of (site, key) pairs that are one parameter, e.g. one rotation for two sites, or
      for two items of a site's Chain: [[("blocks.0.hook_resid_post", "0.rotation"),
      ("blocks.0.hook_resid_post", "1.rotation")]]. The key is a field name, or "i.field" for the
      i-th item of a Chain (the keys of `trainable_params`). The first member's value is used.
  """
  ivs = interchange.normalize(interventions)
  shapes = {}
  for site, iv in ivs.items():
    its = interchange.items_of(iv)
    for key, i, f in _param_keys(iv):
      shapes[(site, key)] = jnp.shape(getattr(its[i], f))
  groups = tuple(tuple((str(s), str(k)) for s, k in g) for g in (tie or ()))
  seen = set()
  for g in groups:
    if len(g) < 2:
      raise InterventionError(f"a tie group needs two or more parameters, got {list(g)}")
    for p in g:
      if p not in shapes:
        raise InterventionError(f"tie names {p}, which is not a trainable parameter; have "
                                f"{sorted(shapes)}")
      if p in seen:
        raise InterventionError(f"{p} is in two tie groups")
      seen.add(p)
    if len({shapes[p] for p in g}) > 1:
      raise InterventionError(f"tied parameters have different shapes: "
                              f"{[(p, shapes[p]) for p in g]}")
  return groups


def trainable_params(interventions: Mapping[str, Any], tie=()) -> dict[str, dict[str, Array]]:
  """The trainable arrays of each intervention: {site: {key: array}} (key: see `tie_groups`); of
  each tie group only the first member is listed."""
  ivs = interchange.normalize(interventions)
  out = {}
  for site, iv in ivs.items():
    its = interchange.items_of(iv)
    out[site] = {k: jnp.asarray(getattr(its[i], f), jnp.float32) for k, i, f in _param_keys(iv)}
  for g in tie_groups(ivs, tie):
    for s, k in g[1:]:
      del out[s][k]
  return out


def merge_params(interventions: Mapping[str, Any], params: Mapping[str, Mapping[str, Array]],
                 tie=()) -> dict:
  """Interventions with their trainable fields replaced by `params` (inverse of
  trainable_params)."""
  full = {s: dict(p) for s, p in params.items()}
  for g in tie:
    for s, k in g[1:]:
      full.setdefault(s, {})[k] = params[g[0][0]][g[0][1]]
  out = {}
  for s, iv in interchange.normalize(interventions).items():
    p = full.get(s)
    if p and isinstance(iv, Chain):
      its = list(iv.items)
      for key, arr in p.items():
        i, f = key.split(".", 1)
        its[int(i)] = its[int(i)].replace(**{f: arr})
      iv = Chain(tuple(its))
    elif p:
      iv = iv.replace(**p)
    out[s] = iv
  return out


# --------------------------------------------------------------------------------------------------
# Loss, train step, IIA

intervened_logits = interchange.intervened_logits
# How often each cached jitted function was traced (= compiled for a new shape): "train_step",
# "iia".
TRACES: collections.Counter = collections.Counter()
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 32
_ADAM = optax.scale_by_adam()  # the default optimizer; its learning rates are a traced argument


def _cached(key, build):
  """A jitted function per static key (model config, optimizer, hooks, mode), built once."""
  try:
    hash(key)
  except TypeError:
    return build()
  if key not in _CACHE:
    _CACHE[key] = build()
    if len(_CACHE) > _CACHE_SIZE:
      _CACHE.popitem(last=False)
  _CACHE.move_to_end(key)
  return _CACHE[key]


def interchange_loss(tparams, template, cfg, model_params, batch, *, regularizer=None, tie=(),
                     mode: str = "parallel"):
  """Mean cross-entropy of the counterfactual labels (plus `regularizer(interventions)`), and the
  accuracy (IIA) on the batch."""
  ivs = merge_params(template, tparams, tie)
  lg = interchange.intervened_logits(cfg, jax.lax.stop_gradient(model_params), ivs, batch,
                                     mode=mode)
  labels = jnp.asarray(batch["label"])
  loss = optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()
  if regularizer is not None:
    loss = loss + regularizer(ivs)
  acc = (jnp.argmax(lg, -1) == labels).mean()
  return loss, acc


def make_train_step(cfg, optimizer: optax.GradientTransformation, *, regularizer=None, tie=(),
                    mode: str = "parallel"):
  """A jitted step `(tparams, opt_state, template, model_params, batch, learning_rates=None) ->
  (tparams, opt_state, loss, acc)` that updates only the intervention parameters `tparams` (from
  `trainable_params`).

  `template` holds the non-trainable fields (e.g. a temperature you anneal: it is a traced argument,
  so changing it does not recompile); the model params are an argument and never differentiated.
  `learning_rates` ({site: {key: scalar}}, traced) scales the optimizer's updates by -lr per
  parameter (for an optimizer that does not apply a learning rate itself, like the default
  `optax.scale_by_adam()`). The step is cached on (cfg, optimizer, regularizer, tie, mode): the
  same objects give the same function, which compiles once per shape.
  """
  tie = tuple(tuple(map(tuple, g)) for g in tie)

  def build():
    def step(tparams, opt_state, template, model_params, batch, learning_rates=None):
      TRACES["train_step"] += 1
      (loss, acc), grads = jax.value_and_grad(interchange_loss, has_aux=True)(
          tparams, template, cfg, model_params, batch, regularizer=regularizer, tie=tie, mode=mode)
      updates, opt_state = optimizer.update(grads, opt_state, tparams)
      if learning_rates is not None:
        updates = jax.tree.map(lambda u, lr: -lr * u, updates, learning_rates)
      return optax.apply_updates(tparams, updates), opt_state, loss, acc
    return jax.jit(step)

  return _cached(("step", cfg, optimizer, regularizer, tie, mode), build)


def learning_rates(tparams: Mapping[str, Mapping[str, Array]], learning_rate) -> dict:
  """Per-parameter learning rates {site: {key: Float[Array, ""]}}.

  Args:
    learning_rate: one float for all, or a mapping whose keys are (site, key) pairs, keys
      ("0.rotation"), field names ("rotation", "boundary") or "default", most specific first.
  """
  if not isinstance(learning_rate, Mapping):
    return jax.tree.map(lambda _: jnp.asarray(learning_rate, jnp.float32), tparams)
  used, out = set(), {}
  for s, p in tparams.items():
    out[s] = {}
    for key in p:
      for c in ((s, key), key, key.split(".")[-1], "default"):
        if c in learning_rate:
          out[s][key] = jnp.asarray(learning_rate[c], jnp.float32)
          used.add(c)
          break
      else:
        raise InterventionError(f"no learning rate for {key!r} at {s!r}; name it (or its field) in "
                                f"learning_rate, or give a 'default'")
  unused = [c for c in learning_rate if c not in used and c != "default"]
  if unused:
    raise InterventionError(f"learning_rate names {unused}, which match no trainable parameter")
  return out


def iia(cfg, model_params, interventions: Mapping[str, Any], data: Mapping[str, Any],
        batch_size: int = 1024, *, mode: str = "parallel") -> float:
  """Interchange-intervention accuracy: fraction of held-out pairs where the intervened model's
  argmax at the label position equals the counterfactual label.

  The last batch is padded to the batch size, so any number of pairs compiles once per shape.
  """
  tmpl, data = interchange.lift_positions(interventions, data)
  interchange.check_batch(data, tmpl)
  n = np.shape(data["base"])[0]
  bs = min(batch_size, n)
  fn = _iia_fn(cfg, mode)
  correct = 0
  for i in range(0, n, bs):
    idx = np.minimum(np.arange(i, i + bs), n - 1)
    hits = np.asarray(fn(tmpl, model_params, interchange.take(data, idx)))
    correct += int(hits[:min(bs, n - i)].sum())
  return correct / n


def _iia_fn(cfg, mode: str):
  def build():
    def f(ivs, model_params, b):
      TRACES["iia"] += 1
      lg = interchange.intervened_logits(cfg, model_params, ivs, b, mode=mode)
      return jnp.argmax(lg, -1) == jnp.asarray(b["label"])
    return jax.jit(f)
  return _cached(("iia", cfg, mode), build)


def _strong(tree):
  """Leaves as arrays of a fixed (not weak) dtype, so a traced argument keeps one signature."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), tree)


def _with_temperature(template: dict, t: float) -> dict:
  def one(it):
    if hasattr(it, "temperature"):
      return it.replace(temperature=jnp.asarray(t, jnp.asarray(it.temperature).dtype))
    return it
  return {s: interchange.with_items(iv, [one(it) for it in interchange.items_of(iv)])
          for s, iv in template.items()}


def train_interventions(cfg, model_params, template: Mapping[str, Any], data: Mapping[str, Any], *,
                        steps: int = 300, batch_size: int = 128, learning_rate=1e-2,
                        seed: int = 0, eval_data: Mapping[str, Any] | None = None,
                        temperature: Callable[[int], float] | None = None,
                        optimizer: optax.GradientTransformation | None = None,
                        log_every: int = 0, regularizer: Callable[[dict], Array] | None = None,
                        tie=(), mode: str = "parallel") -> tuple[dict, dict]:
  """Train the interventions in `template` on interchange data; the model stays frozen.

  Args:
    cfg, model_params: the frozen model.
    template: {site: intervention, or a Chain / list of them} with trainable fields (e.g. from
      `init_rotated_space`). A `WhereEach` with one row of positions per example of `data` is
      sliced with the examples of each batch.
    data: interchange pairs (see `jaxinterp.interventions.interchange`): "base", "source", "label",
      optional "pos", "base_mask", "source_mask", "positions", "source_positions".
    steps, batch_size, seed: optimisation (Adam unless `optimizer` is given).
    learning_rate: a float, or per parameter (see `learning_rates`), e.g. {"rotation": 1e-3,
      "boundary": 1e-2}; 0 keeps a parameter fixed. With `optimizer`, it must be a float (unused).
    eval_data: held-out pairs; the returned history then includes its IIA.
    temperature: step -> temperature for interventions with a `temperature` field (annealing).
    regularizer: interventions -> scalar added to the loss (e.g. a penalty on a boundary). Pass the
      same function object to reuse the compiled step.
    tie: parameters shared between sites or Chain items (see `tie_groups`).
    mode: "parallel", or "serial" (sources run through the model as intervened by the previous
      site; see `jaxinterp.interventions.interchange`).

  Returns:
    (trained {site: intervention}, history {"loss": [...], "acc": [...], "iia": float or None}).
    Compiles once per shape: a second call with the same shapes reuses the compiled step.
  """
  tmpl, data = interchange.lift_positions(template, data)
  interchange.check_batch(data, tmpl)
  tmpl = _strong(tmpl)
  tie = tie_groups(tmpl, tie)
  tparams = trainable_params(tmpl, tie)
  if optimizer is None:
    opt, lrs = _ADAM, learning_rates(tparams, learning_rate)
  elif isinstance(learning_rate, Mapping):
    raise InterventionError("per-parameter learning rates apply to the default Adam; with "
                            "`optimizer`, use optax.multi_transform")
  else:
    opt, lrs = optimizer, None
  opt_state = opt.init(tparams)
  step = make_train_step(cfg, opt, regularizer=regularizer, tie=tie, mode=mode)
  rng = np.random.default_rng(seed)
  n = np.shape(data["base"])[0]
  losses, accs = [], []
  for i in range(steps):
    if temperature is not None:
      tmpl = _with_temperature(tmpl, temperature(i))
    idx = rng.choice(n, size=min(batch_size, n), replace=False)
    tparams, opt_state, loss, acc = step(tparams, opt_state, tmpl, model_params,
                                         interchange.take(data, idx), lrs)
    if log_every and (i % log_every == 0 or i == steps - 1):
      losses.append(float(loss))
      accs.append(float(acc))
  if not log_every:
    losses, accs = [float(loss)], [float(acc)]
  trained = merge_params(tmpl, tparams, tie)
  hist = {"loss": losses, "acc": accs, "iia": None}
  if eval_data is not None:
    hist["iia"] = iia(cfg, model_params, trained, eval_data, mode=mode)
  return trained, hist
