"""Shared fixtures: tiny random-init HF checkpoints built with transformers, and the shared data
dir."""

import os
import pathlib
import resource

import numpy as np
import pytest

from jaxinterp.runtime import compilation_cache

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
requires_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared is absent")

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent compilation cache for the whole suite: the library tests in this process and every
# binary they start (through $JAXINTERP_COMPILATION_CACHE), so a kernel compiled once (the bundled
# toy's, the tiny test models') is read back by every later process and by the next run. Entries
# are written atomically (`jaxinterp.runtime.compilation_cache.AtomicFileCache`), so the parallel
# streams of CI and several local runs share one directory safely. $JAXINTERP_TEST_COMPILATION_CACHE
# names it (CI gives each run its own; empty: no cache); the default is a directory of its own
# beside the binaries' default (~/.cache/jaxinterp/xla). The tests of --compilation_cache pass
# their own directories.
TEST_CACHE = os.environ.get("JAXINTERP_TEST_COMPILATION_CACHE", os.path.join(
    os.path.expanduser("~"), ".cache", "jaxinterp", "test-xla"))
os.environ["JAXINTERP_COMPILATION_CACHE"] = TEST_CACHE


def pytest_configure(config):
  """The fast suite (the default `-m 'not slow'`) compiles without XLA:CPU's backend (LLVM)
  optimisation: its tiny models spend their time compiling, and this cuts its CPU time by about a
  quarter. It changes how fast the compiled code runs and, slightly, its rounding, not
  what the fast tests check: they compare runs made under the same flag, or
  other implementations within tolerances. The slow suite keeps the optimised code: its
  mask-training tests follow optimisation paths whose rounding decides near-ties in the learned
  masks. Subprocesses inherit the flag. Then the suite's persistent compilation cache is
  enabled (`TEST_CACHE`; off where $JAXINTERP_TEST_COMPILATION_CACHE is empty)."""
  if (config.getoption("markexpr") == "not slow"
      and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()
  if TEST_CACHE:
    compilation_cache.enable(TEST_CACHE)  # the flags are part of every entry's key


def pytest_terminal_summary(terminalreporter):
  """The run's CPU time (this process and the binaries it started and waited for): the fast
  suite's budget is 10 minutes of it (docs/contributing.md)."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  user, system = own.ru_utime + kids.ru_utime, own.ru_stime + kids.ru_stime
  terminalreporter.write_line(f"CPU time: {user:.0f} s user + {system:.0f} s system = "
                              f"{(user + system) / 60:.1f} min")


@pytest.fixture(scope="module")
def torch_one_thread():
  """Run a module's torch code on one thread (the test machine's cores are shared; tiny ops are
  much faster single-threaded)."""
  import torch
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


def hf_config(kind: str):
  """A tiny transformers config of each supported family."""
  import transformers as T
  if kind == "gpt2":
    return T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
  if kind == "gpt_neox":
    return T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, vocab_size=97, max_position_embeddings=64,
                           rotary_pct=0.5, bos_token_id=0, eos_token_id=0)
  if kind == "llama":
    return T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, vocab_size=97,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8},
                         bos_token_id=0, eos_token_id=0)
  if kind == "qwen2":
    return T.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, vocab_size=97,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=0)
  if kind == "gemma2":
    return T.Gemma2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=48, vocab_size=97,
                          max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=5.0,
                          final_logit_softcapping=3.0, query_pre_attn_scalar=12,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
  raise ValueError(kind)


FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "gemma2")


def build_hf_model(kind: str, seed: int = 0):
  """Random-init HF causal LM with non-trivial norms and biases (so the mapping is really tested).
  """
  import torch
  import transformers as T
  torch.manual_seed(seed)
  cls = {"gpt2": T.GPT2LMHeadModel, "gpt_neox": T.GPTNeoXForCausalLM, "llama": T.LlamaForCausalLM,
         "qwen2": T.Qwen2ForCausalLM, "gemma2": T.Gemma2ForCausalLM}[kind]
  model = cls(hf_config(kind)).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:  # norms and biases
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_hf(model, path, **kw) -> str:
  model.save_pretrained(str(path), **kw)
  return str(path)


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
  model = build_hf_model("gpt2")
  return save_hf(model, tmp_path_factory.mktemp("gpt2")), model


def random_tokens(shape, vocab=97, seed=0):
  return np.random.RandomState(seed).randint(1, vocab, shape).astype(np.int32)
