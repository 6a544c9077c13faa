"""transformers as the reference for jaxbig's Hugging Face import/export (runs in the reference venv, not in pytest's).

This script runs under `.venv-peers/bin/python` (Python 3.11, torch 2.13.0 CPU, transformers 5.24.0; pinned in
benchmarks/peers/requirements.txt, built by `make test`), because a PyTorch CPU wheel is light only for Python 3.11.
`tests/test_interop.py` calls it through `subprocess`; nothing here imports jaxbig.

    python tests/hf_reference.py fixtures OUT_DIR
        Makes the test fixtures with transformers itself: one tiny random-initialised model per supported case,
        `save_pretrained` into OUT_DIR/<case>/, each with a byte-level BPE tokenizer trained by `tokenizers` and
        saved by transformers, and OUT_DIR/<case>/reference.npz holding what transformers computes for it
        (float32 logits of fixed random tokens, greedy continuations of fixed prompts). See CASES.

    python tests/hf_reference.py large OUT_DIR [DTYPE]
        A 155M-param Llama saved by transformers (make_large), for benchmarks/import_memory.py.

    python tests/hf_reference.py run MODEL_DIR INPUTS.npz OUT.npz
        Loads MODEL_DIR with `AutoModelForCausalLM.from_pretrained(dtype=float32)` and `AutoTokenizer` exactly as a
        user would, and writes the logits of INPUTS.npz's `tokens_BT`, `model.generate(do_sample=False)` from its
        `prompt_BP` (`new_tokens` tokens, no early stop), the loading report (missing/unexpected/mismatched keys)
        and, when INPUTS.npz has `texts`, the tokenizer's ids for each text.

Fixture weights: transformers' own init (normal(0, initializer_range) for matrices) with a larger std than the
default 0.02 so logits are spread and greedy choices are not near-ties, RMSNorm weights and Qwen2's q/k/v biases
(which transformers initialises to 1 and 0) set to random values so that a wrong mapping of them cannot pass.
"""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SEED = 1234
TOKENS_SHAPE = (2, 24)  # [B, T] for the logits
PROMPT_SHAPE = (2, 8)  # [B, P] for greedy generation
NEW_TOKENS = 32
VOCAB = 320  # the model's rows; the tokenizer (byte-level BPE) has at most this many tokens

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
)

# case -> (config class, config kwargs, save options)
CASES = {
    "llama_gqa": ("LlamaConfig", dict(_COMMON, num_key_value_heads=2), {}),
    "llama3_rope": (  # Llama 3.1-style rope scaling; original context 32 so all three frequency bands occur at head_dim 16
        "LlamaConfig",
        dict(
            _COMMON,
            num_key_value_heads=1,
            rope_parameters=dict(
                rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
        {},
    ),
    "llama_tied": ("LlamaConfig", dict(_COMMON, num_key_value_heads=4, tie_word_embeddings=True), {}),  # as Llama 3.2 1B
    "mistral": ("MistralConfig", dict(_COMMON, num_key_value_heads=2, head_dim=32, sliding_window=None, rope_theta=1e6), {}),
    "qwen2": ("Qwen2Config", dict(_COMMON, num_key_value_heads=2, use_sliding_window=False, rope_theta=1e6, rms_norm_eps=1e-6), {}),
    "llama_sharded": ("LlamaConfig", dict(_COMMON, num_key_value_heads=2), {"max_shard_size": "100KB"}),
    "llama_bf16": ("LlamaConfig", dict(_COMMON, num_key_value_heads=2), {"dtype": "bfloat16"}),
}


def train_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (as GPT-2 and Llama 3 use) trained by `tokenizers` on a stdlib module's source."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def inputs(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {
        "tokens_BT": rng.integers(0, vocab, TOKENS_SHAPE).astype(np.int64),
        "prompt_BP": rng.integers(0, vocab, PROMPT_SHAPE).astype(np.int64),
        "new_tokens": np.array(NEW_TOKENS),
    }


def compute(model, tokenizer, ins: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    with torch.no_grad():
        out["logits_BTV"] = model(torch.from_numpy(ins["tokens_BT"])).logits.float().numpy()
        prompt = torch.from_numpy(ins["prompt_BP"])
        n = int(ins["new_tokens"])
        gen = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )
        out["greedy_BN"] = gen[:, prompt.shape[1] :].numpy()
        # The logits greedy decoding chose from, teacher-forced on its own output: what a near-tie check needs.
        out["greedy_logits_BNV"] = model(gen).logits[:, prompt.shape[1] - 1 : -1].float().numpy()
    if "texts" in ins and tokenizer is not None:
        texts = [str(t) for t in ins["texts"]]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        out["text_ids"] = np.array(json.dumps(ids))
        out["text_decoded"] = np.array(json.dumps([tokenizer.decode(i) for i in ids]))
    return out


def make_fixtures(out_dir: Path) -> None:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    tokenizer = train_tokenizer()
    for case, (config_cls, kwargs, save) in CASES.items():
        cfg = getattr(transformers, config_cls)(
            **kwargs, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype="float32"
        )
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        _randomize(model, gen)
        case_dir = out_dir / case
        if save.get("dtype") == "bfloat16":
            model = model.to(torch.bfloat16)
        model.save_pretrained(case_dir, **({"max_shard_size": save["max_shard_size"]} if "max_shard_size" in save else {}))
        tokenizer.save_pretrained(case_dir)
        # The reference numbers come from the saved files as a user loads them (float32), not from the object above.
        loaded = transformers.AutoModelForCausalLM.from_pretrained(case_dir, dtype=torch.float32).eval()
        ins = inputs(VOCAB)
        np.savez(case_dir / "reference.npz", **ins, **compute(loaded, None, ins))
    (out_dir / "versions.json").write_text(
        json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "seed": SEED, "cases": list(CASES)})
    )


def make_large(out_dir: Path, dtype: str) -> None:
    """A Llama of 155M params (d 1024, 8 layers, 16 heads / 4 KV, SwiGLU 2816, vocab 32000, untied), for measuring an
    import's peak memory (benchmarks/import_memory.py); transformers' own init, saved in `dtype` as one safetensors file."""
    torch.manual_seed(SEED)
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, dtype=dtype,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out_dir, max_shard_size="100GB")
    train_tokenizer().save_pretrained(out_dir)


def run(model_dir: Path, inputs_path: Path, out_path: Path) -> None:
    ins = dict(np.load(inputs_path))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir) if (model_dir / "tokenizer.json").exists() else None
    out = compute(model.eval(), tokenizer, ins)
    out["loading_info"] = np.array(json.dumps({k: sorted(map(str, v)) for k, v in info.items()}))
    out["architecture"] = np.array(type(model).__name__)
    np.savez(out_path, **out)


if __name__ == "__main__":
    torch.set_num_threads(1)  # deterministic and polite: the test session runs beside it
    if sys.argv[1:2] == ["fixtures"]:
        make_fixtures(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["large"]:
        make_large(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "bfloat16")
    elif sys.argv[1:2] == ["run"]:
        run(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(__doc__)
