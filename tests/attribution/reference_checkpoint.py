"""The checkpoints the reference-implementation tests share: random-init GPT-2, Llama (GQA),
GPT-NeoX (parallel blocks) and Gemma-2 models with the real GPT-2 tokenizer, saved as HF
directories that jaxinterp and the PyTorch tools both load."""

from __future__ import annotations

import pathlib
import shutil

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def write_random_gpt2(path: pathlib.Path, tokenizer: pathlib.Path,
                      family: str = "gpt2") -> pathlib.Path:
  """A random model (2 layers, d_model 32, 4 heads, 64 positions, GPT-2's vocabulary, torch seed
  0) at `path`, with the tokenizer files of the directory `tokenizer`; returns `path`. `family`:
  `gpt2`, `llama` (2 key/value heads for the 4 query heads), `neox` (parallel attention and MLP,
  rotary on half of each head) or `gemma2` (GQA, post-norms, soft-caps, a sliding window of 8 on
  layer 0)."""
  import torch
  import transformers
  torch.manual_seed(0)
  ids = dict(bos_token_id=50256, eos_token_id=50256)
  if family == "gpt2":
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64))
  elif family == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **ids))
  elif family == "neox":
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
        use_parallel_residual=True, **ids))
  elif family == "gemma2":
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        sliding_window=8, query_pre_attn_scalar=8, pad_token_id=0, **ids))
    with torch.no_grad():  # Gemma's norms scale by 1 + w, w initialised to 0: make them matter
      for name, p in model.named_parameters():
        if "norm" in name:
          p.add_(0.3 * torch.randn_like(p))
  else:
    raise ValueError(f"unknown family {family!r}")
  model.eval().save_pretrained(path)
  for f in TOKENIZER_FILES:
    shutil.copy(tokenizer / f, path / f)
  transformers.GPT2TokenizerFast(tokenizer_file=str(path / "tokenizer.json")).save_pretrained(path)
  return path


def hooked_on_cpu(path):
  """The `HookedTransformer` of the HF directory `path` (`benchmarks.tl_baseline.hooked_from_hf`)
  with its tokenizer, right padding, for the reference drivers: its parameters require gradients,
  as `from_pretrained` leaves them (the references' backward passes need it); the references'
  `torch.zeros(..., device='cuda')` allocate on the CPU; one torch thread."""
  import torch
  import transformers

  from benchmarks.eap_pipeline import cpu_for_cuda_allocations
  from benchmarks.tl_baseline import hooked_from_hf
  cpu_for_cuda_allocations(torch)
  torch.set_num_threads(1)
  model = hooked_from_hf(transformers.AutoModelForCausalLM.from_pretrained(path).eval())
  model.requires_grad_(True)
  model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(path),
                      default_padding_side="right")
  return model
