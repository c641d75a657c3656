"""Circuits known exactly, and how well each attribution method recovers them.

Modules:
- `truth`: the ground-truth edges of a tracr-compiled model (read off its weights) and of the
  bundled toy model, and edge/node AUROC of a method's scores against them;
- `tracr_tasks`: RASP programs as tasks (compiling with tracr, tracr's library, clean/corrupted
  data);
- `toy`: the bundled toy induction model and its data;
- `recovery`: every method under every ablation on a known circuit (`benchmark`, `write_case`);
- `runner`: `ground_truth(config, out)`, experiments/ground_truth.py's pipeline over `recovery`;
- `toy_training`: training the bundled toy model (`train_toy_model(config, out)`,
  experiments/train_toy_model.py's pipeline);
- `ioi_model`: a small GPT-2-family model trained here to do IOI on EAP-IG's IOI templates (no
  pretrained GPT-2 is reachable), for span-level IOI circuits on a model that does the task.

tracr is optional (`pip install "jaxinterp[tracr]"`); importing these modules does not need it.
"""
