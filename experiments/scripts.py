"""Console-script entry points installed with jaxinterp: `jaxinterp-find-circuit` runs
`experiments/find_circuit.py`'s `main` as `python -m experiments.find_circuit` does, and so on.

Each entry imports its binary only when called, so one binary's flags never meet another's.
"""

from __future__ import annotations

import importlib

from jaxinterp.experiments import cli


def _run(name: str) -> None:
  module = importlib.import_module(f"jaxinterp.experiments.{name}")
  cli.run(module.main, module.__name__)


def find_circuit() -> None:
  """`jaxinterp-find-circuit`: experiments/find_circuit.py."""
  _run("find_circuit")


def evaluate_circuit() -> None:
  """`jaxinterp-evaluate-circuit`: experiments/evaluate_circuit.py."""
  _run("evaluate_circuit")


def activation_patching() -> None:
  """`jaxinterp-activation-patching`: experiments/activation_patching.py."""
  _run("activation_patching")


def convert_checkpoint() -> None:
  """`jaxinterp-convert-checkpoint`: experiments/convert_checkpoint.py."""
  _run("convert_checkpoint")


def train_das() -> None:
  """`jaxinterp-train-das`: experiments/train_das.py."""
  _run("train_das")


def train_toy_model() -> None:
  """`jaxinterp-train-toy-model`: experiments/train_toy_model.py."""
  _run("train_toy_model")


def ground_truth() -> None:
  """`jaxinterp-ground-truth`: experiments/ground_truth.py."""
  _run("ground_truth")


def view() -> None:
  """`jaxinterp-view`: experiments/view.py (the HTML viewer)."""
  _run("view")


def compare_circuits() -> None:
  """`jaxinterp-compare-circuits`: experiments/compare_circuits.py."""
  _run("compare_circuits")


def attribution_graph() -> None:
  """`jaxinterp-attribution-graph`: experiments/attribution_graph.py."""
  _run("attribution_graph")


def train_transcoders() -> None:
  """`jaxinterp-train-transcoders`: experiments/train_transcoders.py."""
  _run("train_transcoders")


def explain_attention() -> None:
  """`jaxinterp-explain-attention`: experiments/explain_attention.py."""
  _run("explain_attention")


SCRIPTS = {"jaxinterp-find-circuit": find_circuit, "jaxinterp-evaluate-circuit": evaluate_circuit,
           "jaxinterp-activation-patching": activation_patching,
           "jaxinterp-convert-checkpoint": convert_checkpoint, "jaxinterp-train-das": train_das,
           "jaxinterp-train-toy-model": train_toy_model, "jaxinterp-ground-truth": ground_truth,
           "jaxinterp-view": view, "jaxinterp-compare-circuits": compare_circuits,
           "jaxinterp-attribution-graph": attribution_graph,
           "jaxinterp-train-transcoders": train_transcoders,
           "jaxinterp-explain-attention": explain_attention}
