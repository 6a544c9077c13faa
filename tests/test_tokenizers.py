"""Hugging Face tokenizers (tokenizer.json) next to bytes and SentencePiece: trained with `tokenizers`, converted
from bytes, saved so that transformers' AutoTokenizer (5.24, in .venv-peers) gives the same ids, used by a run.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tokenizers

from jaxbig.config import ConfigError, load_config
from jaxbig.data.prepare import PreparedData, prepare
from jaxbig.data.run import run_tokenizer
from jaxbig.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, to_hf, tokenizer_from_dict
from conftest import REPO, TINY_MODEL  # the shared tiny model and batch (tests/conftest.py)

# ASCII, Latin-1, a letter that is also one of GPT-2's byte symbols (U+0100), CJK, emoji (4-byte UTF-8), tabs, newlines, runs of spaces.
MIXED = ["def f(x):\n\treturn x  # é", "naïve café — ✓ 🙂👍🏽", "Ā is U+0100; 日本語\r\n", "   \t\t\n\n", "x"]


@pytest.fixture(scope="module")
def corpus(text_dir) -> list[str]:
    return [f.read_text() for f in sorted(text_dir.iterdir())]


@pytest.fixture(scope="module")
def bpe(corpus) -> HFTokenizer:
    return HFTokenizer.train(corpus, 400)


def _script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _llama_style(bpe: HFTokenizer, template: str) -> HFTokenizer:
    """`bpe` with <s> and </s> added and a TemplateProcessing post-processor, as a Llama tokenizer.json has."""
    tok = tokenizers.Tokenizer.from_str(bpe.tokenizer.to_str())
    tok.add_special_tokens(["<s>", "</s>"])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(single=template, special_tokens=[("<s>", bos), ("</s>", eos)])
    return HFTokenizer(tok, eos_id=eos, bos_id=bos)


def test_bpe_trained_with_tokenizers_round_trips_any_text(corpus, bpe):
    assert bpe.vocab_size == 400 and bpe.eos_id == 0 and bpe.bos_id is None
    for text in corpus + MIXED:
        ids = bpe.encode(text)
        assert ids.dtype == np.int32 and ids.min(initial=0) >= 0 and ids.max(initial=0) < 400
        assert bpe.decode(ids) == text
    assert sum(len(bpe.encode(t)) for t in corpus) < 0.7 * sum(len(t.encode()) for t in corpus)  # merges: fewer tokens than bytes
    assert bpe.decode([5, 0, 6]) == bpe.decode([5, 6])  # the separator is skipped, as ByteTokenizer skips 0


def test_byte_tokenizer_as_tokenizer_json_gives_the_same_ids():
    byte = ByteTokenizer()
    hf = to_hf(byte)
    assert (hf.vocab_size, hf.eos_id, hf.bos_id) == (256, 0, None)
    every_byte_char = "".join(chr(c) for c in range(1, 0x250))  # all of Latin-1 and GPT-2's remapped symbols as text
    for text in [*MIXED, every_byte_char, ""]:
        np.testing.assert_array_equal(hf.encode(text), byte.encode(text))
        assert hf.decode(hf.encode(text)) == text == byte.decode(byte.encode(text))
    ids = np.arange(256)  # any id sequence decodes alike, broken UTF-8 included (replacement characters)
    assert hf.decode(ids) == byte.decode(ids)
    assert to_hf(hf) is hf


def test_save_pretrained_and_load_keep_the_tokenizer(tmp_path, bpe):
    llama = _llama_style(bpe, "<s> $A")
    for name, tok in (("bpe", bpe), ("llama", llama), ("byte", to_hf(ByteTokenizer()))):
        loaded = HFTokenizer.load(tok.save_pretrained(tmp_path / name))
        assert (loaded.vocab_size, loaded.eos_id, loaded.bos_id, loaded.fingerprint()) == (tok.vocab_size, tok.eos_id, tok.bos_id, tok.fingerprint())
        assert HFTokenizer.load(tmp_path / name / "tokenizer.json").fingerprint() == tok.fingerprint()  # the file: specials from beside it
        assert json.loads((tmp_path / name / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert llama.encode("x")[0] == llama.bos_id  # the post-processor's BOS, as transformers adds it
    assert len({bpe.fingerprint(), llama.fingerprint(), to_hf(ByteTokenizer()).fingerprint()}) == 3
    assert ByteTokenizer().fingerprint() == "byte"
    d = tokenizer_from_dict(llama.to_dict(), tmp_path / "llama")
    assert d.fingerprint() == llama.fingerprint() and llama.to_dict()["model_file"] == "tokenizer.json"


def test_special_tokens_are_read_as_transformers_reads_them(tmp_path, bpe):
    llama = _llama_style(bpe, "<s> $A")
    llama.save(tmp_path / "tokenizer.json")
    assert (HFTokenizer.load(tmp_path).bos_id, HFTokenizer.load(tmp_path).eos_id) == (None, None)  # nothing names them
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": [3, 4]}))
    assert (HFTokenizer.load(tmp_path).bos_id, HFTokenizer.load(tmp_path).eos_id) == (7, 3)  # a list: the first
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert (HFTokenizer.load(tmp_path).bos_id, HFTokenizer.load(tmp_path).eos_id) == (7, 5)  # generation_config.json first
    added = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": added, "chat_template": "{{x}}"}))
    loaded = HFTokenizer.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_id) == (llama.bos_id, llama.eos_id)  # tokenizer_config.json first
    assert json.loads((loaded.save_pretrained(tmp_path / "out") / "tokenizer_config.json").read_text())["chat_template"] == "{{x}}"


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "tokenizer '{tmp}/tokenizer.json' not found; give a tokenizer.json file or a Hugging Face model directory"),
        ({"tokenizer.json": '{"version": "1.0", "model": '}, "'{tmp}/tokenizer.json' is not a Hugging Face tokenizer.json"),
        ({"tokenizer.json": "", "tokenizer_config.json": "{}"}, "'{tmp}/tokenizer.json' is not a Hugging Face tokenizer.json"),
        ({"tokenizer_config.json": "{not json"}, "'{tmp}/tokenizer_config.json' is not readable JSON"),
        ({"tokenizer_config.json": '{"eos_token": "<nope>"}'}, "names eos_token '<nope>', which is not in tokenizer.json's vocabulary"),
        ({"config.json": '{"eos_token_id": "2"}'}, "eos_token_id='2' is not a token id"),
        ({"config.json": '{"eos_token_id": 100000}'}, "eos_id=100000 is outside the tokenizer's 400 ids"),
    ],
)
def test_bad_tokenizer_files_are_refused_in_one_line(tmp_path, bpe, files, message):
    if "tokenizer.json" not in files and files:
        bpe.save(tmp_path / "tokenizer.json")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as e:
        HFTokenizer.load(tmp_path)
    assert message.format(tmp=tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_bpe_vocab_too_small_and_sentencepiece_conversion_are_refused(corpus):
    with pytest.raises(ValueError, match="vocab_size=256 is too small for a byte-level BPE"):
        HFTokenizer.train(corpus, 256)
    spm = SentencePieceTokenizer.train(corpus, 400)
    with pytest.raises(ValueError, match="no exact tokenizer.json form in the tokenizers library; prepare the data with --tokenizer bpe"):
        to_hf(spm)
    assert spm.fingerprint() == SentencePieceTokenizer(spm.model_proto).fingerprint() != SentencePieceTokenizer.train(corpus, 420).fingerprint()


# Runs in .venv-peers (transformers 5.24.0): what AutoTokenizer gives for each saved directory and text.
TRANSFORMERS = textwrap.dedent(
    """
    import json, sys
    import transformers
    from transformers import AutoTokenizer
    texts = json.loads(open(sys.argv[1]).read())
    out = {"version": transformers.__version__}
    for d in sys.argv[2:]:
        tok = AutoTokenizer.from_pretrained(d)
        ids = [tok(t)["input_ids"] for t in texts]
        out[d] = {"ids": ids, "text": [tok.decode(i, skip_special_tokens=True) for i in ids], "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    print(json.dumps(out))
    """
)


def test_transformers_autotokenizer_gives_the_same_ids(tmp_path, corpus, bpe):
    peers = REPO / ".venv-peers" / "bin" / "python"
    if not peers.is_file():
        pytest.fail(f"{peers} is missing: the reference venv with transformers; run `make test`, which builds it")
    toks = {
        "bpe": bpe,
        "byte": to_hf(ByteTokenizer()),
        "llama": _llama_style(bpe, "<s> $A"),  # BOS first (Llama 2/3, Mistral)
        "bos_eos": _llama_style(bpe, "<s> $A </s>"),
    }
    texts = [*MIXED, corpus[0][:2000], "text with <|endoftext|> and <s> inside", ""]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    (tmp_path / "ref.py").write_text(TRANSFORMERS)
    dirs = [str(tok.save_pretrained(tmp_path / name)) for name, tok in toks.items()]
    proc = subprocess.run([str(peers), str(tmp_path / "ref.py"), str(tmp_path / "texts.json"), *dirs], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ref["version"] == "5.24.0"
    for d, (name, tok) in zip(dirs, toks.items()):
        assert (ref[d]["bos"], ref[d]["eos"]) == (tok.bos_id, tok.eos_id), name
        for text, ids, decoded in zip(texts, ref[d]["ids"], ref[d]["text"]):
            assert tok.encode(text).tolist() == ids, (name, text)
            assert tok.decode(ids) == decoded, (name, text)


def test_prepared_documents_start_with_bos_and_end_once(tmp_path, text_dir, bpe):
    """A Llama-style tokenizer: each record is BOS + text (the packer appends the eos; the template's is not doubled)."""
    tok = _llama_style(bpe, "<s> $A </s>")
    tok.save_pretrained(tmp_path / "tok")
    prepare([str(text_dir)], tmp_path / "set", tokenizer=f"hf:{tmp_path / 'tok'}", val_fraction=0.2)
    data = PreparedData(tmp_path / "set")
    docs = data.documents("val")
    originals = {f.read_text() for f in text_dir.iterdir()}
    for i in range(len(docs)):
        ids = data.decode(docs[i])
        assert ids[0] == tok.bos_id and ids[-1] != tok.eos_id and tok.eos_id not in ids
        assert tok.decode(ids) in originals
    assert data.tokenizer.fingerprint() == tok.fingerprint()


def test_a_run_trains_on_bpe_data_and_generates_with_its_tokenizer(tmp_path, text_dir, capsys):
    """prepare_data --tokenizer bpe -> train -> scripts/generate.py decodes with the run's tokenizer."""
    from jaxbig.checkpoint.run import load_params
    from jaxbig.models.decode import generate
    from jaxbig.train.loop import train

    data = tmp_path / "data"
    assert _script_main("prepare_data")(["--input", str(text_dir), "--out", str(data), "--tokenizer", "bpe", "--vocab_size", "384", "--val_fraction", "0.2"]) == 0
    assert "tokenizer hf (vocab 384)" in capsys.readouterr().out
    run_dir = tmp_path / "run"
    overrides = [*TINY_MODEL, "train.eval_batches=1", f"train.run_dir={run_dir}", f"data.prepared={data}", "train.steps=2", "train.eval_every=2", "train.log_every=2", "optim.warmup_steps=1"]
    with pytest.raises(ConfigError, match="model.vocab_size=256 is smaller than the hf tokenizer's 384 tokens"):
        train(load_config(None, overrides), progress=False)
    cfg = load_config(None, [*overrides, "model.vocab_size=384"])
    train(cfg, progress=False)
    tok = run_tokenizer(cfg, run_dir)
    assert tok.fingerprint() == PreparedData(data).tokenizer.fingerprint()

    capsys.readouterr()  # the loop's log
    prompt = "def main(): é"
    assert _script_main("generate")(["--run_dir", str(run_dir), "--prompt", prompt, "--max_new_tokens", "12"]) == 0
    printed = capsys.readouterr().out
    # The same decoding, called here with the same arguments (the same program), then detokenized with the BPE.
    cfg, graphdef, params, _ = load_params(run_dir)
    ids = np.asarray(generate(graphdef, params, tok.encode(prompt)[None], __import__("jax").random.key(0), max_new_tokens=12, temperature=0.0, top_k=0))[0]
    eos = np.flatnonzero(ids == tok.eos_id)
    assert printed == prompt + tok.decode(ids[: eos[0]] if len(eos) else ids) + "\n"
    assert ids.max() < 384

    # A tokenizer.json in the run directory (an imported model's) is the run's tokenizer, ahead of the data's.
    other = to_hf(ByteTokenizer())
    other.save_pretrained(run_dir)
    assert run_tokenizer(cfg, run_dir).fingerprint() == other.fingerprint()
    (run_dir / "tokenizer.json").write_text("{broken")
    with pytest.raises(ConfigError, match=f"run_dir '{run_dir}': '{run_dir}/tokenizer.json' is not a Hugging Face tokenizer.json"):
        run_tokenizer(cfg, run_dir)
