"""Tokenizers: byte-level (id = byte value; id 0, NUL, never in text, separates documents), SentencePiece, and
Hugging Face `tokenizers` (a tokenizer.json: a Hub model's, or a byte-level BPE trained here).

Each has `name`, `vocab_size`, `eos_id` (the document separator), `encode`, `decode`, `to_dict` (what a
manifest records), `save_files(dir)` (the files `to_dict` names) and `fingerprint()` (equal fingerprints,
equal tokenization).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens. Vocabulary 256; `eos_id` 0 marks the end of a document."""

    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if b"\x00" in data:
            raise ValueError("text contains a NUL byte, which the byte tokenizer reserves as the document separator")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr > 0) & (arr < 256)]  # drop separators and ids outside the byte range
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save_files(self, directory: str | Path) -> None:
        """Nothing to write: the byte tokenizer has no model file."""

    def fingerprint(self) -> str:
        return "byte"

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class SentencePieceTokenizer:
    """A SentencePiece model (BPE or unigram, byte fallback so any text encodes). `eos_id` separates documents."""

    name = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm  # only for SentencePiece models; the byte tokenizer (the default) needs none

        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"SentencePiece model {str(path)!r} not found; give a .model file written by SentencePiece")
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:
            raise ValueError(f"{str(path)!r} is not a SentencePiece model ({e})") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe") -> SentencePieceTokenizer:
        """Trains on `texts` (one document each), keeping whitespace exactly as it is (code needs it)."""
        import sentencepiece as spm  # only for SentencePiece models; the byte tokenizer (the default) needs none

        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"SentencePiece model_type={model_type!r}: use bpe or unigram")
        min_vocab = 256 + 4  # byte fallback pieces + unk, bos, eos, pad... below this SentencePiece cannot honour the size
        if vocab_size < min_vocab:
            raise ValueError(f"vocab_size={vocab_size} is too small for SentencePiece with byte fallback; use at least {min_vocab}")
        lines = (line for text in texts for line in text.splitlines() if line.strip())
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines,
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                character_coverage=1.0,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                split_by_whitespace=True,
                max_sentence_length=1 << 16,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(f"SentencePiece cannot train a vocab_size={vocab_size} model on this corpus: {str(e).strip()}") from None
        return cls(model.getvalue())

    def encode(self, text: str | bytes) -> np.ndarray:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr >= 0) & (arr < self.vocab_size) & (arr != self.eos_id)]
        return self._sp.decode(arr.tolist())

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    def save_files(self, directory: str | Path) -> None:
        self.save(Path(directory) / "tokenizer.model")

    def fingerprint(self) -> str:
        """sha256 of the SentencePiece model proto."""
        return hashlib.sha256(self.model_proto).hexdigest()

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "model_file": "tokenizer.model"}


# --- Hugging Face `tokenizers` (tokenizer.json) ------------------------------------------------------------------

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
END_OF_TEXT = "<|endoftext|>"  # the trained byte-level BPE's document separator (GPT-2's name for it), id 0
# Keys of a Hugging Face tokenizer_config.json that save_pretrained carries over from the directory it was loaded from.
_KEPT_CONFIG_KEYS = ("chat_template", "model_max_length", "pad_token", "unk_token", "padding_side")


def _token_content(value) -> str | None:
    """A tokenizer_config.json special token: a string, an AddedToken dict (`{"content": ...}`) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token {value!r} is neither a string nor an AddedToken dict with a 'content' string")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not readable JSON ({type(e).__name__}: {e}); restore the file from the model's source") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object; restore the file from the model's source")
    return data


def _special_ids(tok: tokenizers.Tokenizer, root: Path) -> tuple[int | None, int | None, dict]:
    """(bos_id, eos_id, kept tokenizer_config.json entries) of the Hugging Face model directory `root`.

    As transformers reads them: `bos_token`/`eos_token` in tokenizer_config.json (strings or AddedToken dicts,
    mapped to ids by the vocabulary); where tokenizer_config.json does not name one, `bos_token_id`/`eos_token_id`
    of generation_config.json, then config.json (an int, or a list whose first id is taken); else None.
    """
    ids: dict[str, int | None] = {"bos": None, "eos": None}
    found: set[str] = set()
    kept: dict = {}
    config_path = root / TOKENIZER_CONFIG
    if config_path.is_file():
        config = _read_json(config_path)
        kept = {k: config[k] for k in _KEPT_CONFIG_KEYS if k in config}
        for role in ids:
            if f"{role}_token" not in config:
                continue
            found.add(role)
            try:
                content = _token_content(config[f"{role}_token"])
            except ValueError as e:
                raise ValueError(f"{str(config_path)!r}: {role}_token: {e}") from None
            if content is not None:
                ids[role] = tok.token_to_id(content)
                if ids[role] is None:
                    raise ValueError(f"{str(config_path)!r} names {role}_token {content!r}, which is not in {TOKENIZER_JSON}'s vocabulary; fix the file")
    for name in ("generation_config.json", "config.json"):
        path = root / name
        if found == set(ids) or not path.is_file():
            continue
        config = _read_json(path)
        for role in set(ids) - found:
            value = config.get(f"{role}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{str(path)!r}: {role}_token_id={value!r} is not a token id; fix the file")
            ids[role] = value
            found.add(role)
    return ids["bos"], ids["eos"], kept


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (a tokenizer.json), with the BOS and EOS ids its model directory names.

    `encode(text)` gives the ids `transformers.AutoTokenizer.from_pretrained(dir)(text)["input_ids"]` gives: the
    tokenizer.json's post-processor adds its special tokens (a BOS for the Llama and Mistral families; none for
    Qwen2 or the byte-level BPE trained here). Text that spells a special token (e.g. "<|endoftext|>") encodes to
    that token, as in transformers. `decode` skips special tokens. `eos_id` separates documents in prepared data.
    """

    name = "hf"
    model_file = TOKENIZER_JSON

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_id: int | None, bos_id: int | None, config: dict | None = None):
        self.tokenizer = tokenizer
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        # Ids, not entries, size the embedding: a vocabulary with holes still needs max id + 1 rows.
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        for role, i in (("eos_id", eos_id), ("bos_id", bos_id)):
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"{role}={i} is outside the tokenizer's {self.vocab_size} ids")
        self.eos_id, self.bos_id = eos_id, bos_id
        self.config = dict(config or {})  # tokenizer_config.json entries carried over by save_pretrained
        # Whether the post-processor ends every encoding with eos (the packer appends one itself; see `encode_document`).
        empty = tokenizer.encode("").ids
        self.appends_eos = eos_id is not None and empty[-1:] == [eos_id]

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        """A tokenizer.json file, or a directory holding one (a Hugging Face model directory).

        BOS and EOS come from tokenizer_config.json, generation_config.json or config.json beside the file.
        """
        path = Path(path).expanduser()
        file = path / TOKENIZER_JSON if path.is_dir() else path
        if not file.is_file():
            raise ValueError(
                f"tokenizer {str(file)!r} not found; give a {TOKENIZER_JSON} file or a Hugging Face model directory holding one "
                "(or train one: scripts/prepare_data.py --tokenizer bpe --vocab_size N)"
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{str(file)!r} is not a Hugging Face {TOKENIZER_JSON} ({reason}); restore the file from the model's source") from None
        bos_id, eos_id, config = _special_ids(tok, file.parent)
        return cls(tok, eos_id=eos_id, bos_id=bos_id, config=config)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> HFTokenizer:
        """A byte-level BPE (GPT-2's scheme) trained on `texts` with `tokenizers`: any text round-trips exactly.

        The 256 byte symbols are the initial alphabet and "<|endoftext|>" (id 0) is the end-of-document token;
        there is no BOS. The vocabulary may end up smaller than `vocab_size` when the corpus has too few pairs.
        """
        min_vocab = 256 + 1
        if vocab_size < min_vocab:
            raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (256 byte symbols + {END_OF_TEXT}); use at least {min_vocab}")
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok, eos_id=tok.token_to_id(END_OF_TEXT), bos_id=None)

    def encode(self, text: str | bytes) -> np.ndarray:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)

    def encode_document(self, text: str) -> np.ndarray:
        """`encode(text)` as a prepared document: without a trailing eos the post-processor added (the packer appends one)."""
        ids = self.encode(text)
        return ids[:-1] if self.appends_eos and len(ids) else ids

    def decode(self, ids) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr >= 0) & (arr < self.vocab_size)]
        return self.tokenizer.decode(arr.tolist(), skip_special_tokens=True)

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.tokenizer.id_to_token(i)

    def save(self, path: str | Path) -> None:
        """The tokenizer.json alone (BOS/EOS are not in it: see `save_pretrained`)."""
        self.tokenizer.save(str(path))

    def save_pretrained(self, directory: str | Path) -> Path:
        """tokenizer.json and tokenizer_config.json in `directory`, as `AutoTokenizer.from_pretrained` reads them.

        `tokenizer_class` is "PreTrainedTokenizerFast", which transformers 4.x and 5.x both resolve and which
        uses tokenizer.json as it is (transformers 5 itself would write "TokenizersBackend", which 4.x cannot
        load; a model-specific class such as LlamaTokenizer may rebuild the pre-tokenizer).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save(directory / TOKENIZER_JSON)
        config = {
            **self.config,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.token(self.bos_id),
            "eos_token": self.token(self.eos_id),
            "clean_up_tokenization_spaces": False,
        }
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return directory

    def save_files(self, directory: str | Path) -> None:
        self.save_pretrained(directory)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer.json content and the BOS/EOS ids (stable for a given `tokenizers` version)."""
        content = json.dumps({"tokenizer": self.tokenizer.to_str(), "bos_id": self.bos_id, "eos_id": self.eos_id}, sort_keys=True)
        return hashlib.sha256(content.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "bos_id": self.bos_id, "model_file": self.model_file}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the one `pre_tokenizers.ByteLevel` applies before the model.

    tokenizers exposes only the 256 characters (`ByteLevel.alphabet()`, unordered), not which byte each stands
    for, so the table is written out here; `_byte_level_as_hf` checks it against the alphabet.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def _byte_level_as_hf() -> HFTokenizer:
    """ByteTokenizer as a tokenizer.json: a BPE without merges over the 256 byte symbols, id = byte value.

    Id 0, the document separator, is the special token "\\x00" (ByteTokenizer refuses NUL in text; here a NUL
    encodes to 0, the separator): every text ByteTokenizer accepts gets the same ids, and decoding skips 0 as
    ByteTokenizer's does. The regex split is off: without merges it cannot change the ids.
    """
    table = _bytes_to_unicode()
    alphabet = set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    if set(table.values()) != alphabet:  # tokenizers changed its byte table: these ids would be wrong
        raise ValueError(f"tokenizers {tokenizers.__version__}'s ByteLevel alphabet differs from GPT-2's byte table; the byte tokenizer cannot be converted")
    vocab = {"\x00": ByteTokenizer.eos_id, **{table[b]: b for b in range(1, 256)}}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken("\x00", special=True, normalized=False)])
    return HFTokenizer(tok, eos_id=ByteTokenizer.eos_id, bos_id=None)


def to_hf(tokenizer: ByteTokenizer | SentencePieceTokenizer | HFTokenizer) -> HFTokenizer:
    """The same tokenizer as a Hugging Face tokenizer.json (what an export to transformers ships)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    if isinstance(tokenizer, ByteTokenizer):
        return _byte_level_as_hf()
    if isinstance(tokenizer, SentencePieceTokenizer):
        # tokenizers' only converter, SentencePieceUnigramTokenizer.from_spm, reads unigram models alone and collapses
        # repeated spaces (jaxbig's models keep them); BPE models have none. transformers' convert_slow_tokenizer is
        # not a jaxbig dependency.
        raise ValueError(
            "a SentencePiece tokenizer has no exact tokenizer.json form in the tokenizers library; prepare the data with "
            "--tokenizer bpe (a byte-level BPE trained with tokenizers) to export the model to Hugging Face"
        )
    raise ValueError(f"no tokenizer.json form for {type(tokenizer).__name__}")


def tokenizer_from_dict(d: dict, root: str | Path) -> ByteTokenizer | SentencePieceTokenizer | HFTokenizer:
    """The tokenizer a manifest (prepared data, export) names; model files are relative to `root`.

    For "hf" the manifest's BOS/EOS ids are the ones the data was made with, whatever files lie beside tokenizer.json.
    """
    if d["name"] == ByteTokenizer.name:
        return ByteTokenizer()
    if d["name"] == SentencePieceTokenizer.name:
        return SentencePieceTokenizer.load(Path(root) / d["model_file"])
    if d["name"] == HFTokenizer.name:
        loaded = HFTokenizer.load(Path(root) / d["model_file"])
        return HFTokenizer(loaded.tokenizer, eos_id=d["eos_id"], bos_id=d["bos_id"], config=loaded.config)
    raise ValueError(f"unknown tokenizer {d['name']!r} in the manifest; jaxbig knows byte, sentencepiece and hf")
