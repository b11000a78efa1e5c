"""Japanese tokenization: MeCab word split (fugashi + unidic-lite), then WordPiece, loadable by AutoTokenizer.

The layout is the one cl-tohoku/bert-base-japanese-v3 uses (``BertJapaneseTokenizer`` with
``word_tokenizer_type="mecab"`` and unidic-lite), so a hub model and the project's own vocabulary
go through the same code: ``load_tokenizer("cl-tohoku/bert-base-japanese-v3")`` or a local folder.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import AutoTokenizer, BertJapaneseTokenizer, PreTrainedTokenizerBase

from mlplatform.storage import cache_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MECAB_KWARGS = {"mecab_dic": "unidic_lite"}


class TokenizerSetupError(RuntimeError):
    """MeCab cannot run here; the message says what to install."""


def preflight_mecab() -> None:
    """Start MeCab once through fugashi with unidic-lite, or fail at once with what to install.

    Raises:
        TokenizerSetupError: fugashi or unidic-lite is missing or MeCab fails to initialise.
    """
    try:
        from transformers.models.bert_japanese.tokenization_bert_japanese import MecabTokenizer

        MecabTokenizer(mecab_dic="unidic_lite").tokenize("テスト")
    except (ImportError, ModuleNotFoundError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerSetupError(
            f"MeCab could not start ({reason}); install the tokenizer's dependencies with "
            "`pip install fugashi unidic-lite` (the 500 MB full `unidic` package is not needed)"
        ) from None


@functools.cache
def _mecab():
    """One MeCab per process: starting it reads the dictionary, too slow to repeat per request."""
    from transformers.models.bert_japanese.tokenization_bert_japanese import MecabTokenizer

    return MecabTokenizer(mecab_dic="unidic_lite")


def word_split(texts: Iterable[str]) -> list[list[str]]:
    """MeCab words of each text, normalised (NFKC) exactly as BertJapaneseTokenizer does it."""
    mecab = _mecab()
    return [mecab.tokenize(text) for text in texts]


def train_tokenizer(
    texts: Sequence[str], out_dir: str | Path, *, vocab_size: int = 8000, model_max_length: int = 128
) -> PreTrainedTokenizerBase:
    """Learn a WordPiece vocabulary over MeCab words of ``texts`` and save it in Hugging Face format.

    Args:
        texts: the training corpus.
        out_dir: folder for ``vocab.txt`` and ``tokenizer_config.json``.
        vocab_size: upper bound on the vocabulary, special tokens included.
        model_max_length: longest input the model accepts; longer texts are truncated.

    Returns:
        The saved tokenizer, as ``AutoTokenizer.from_pretrained(out_dir)`` loads it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    preflight_mecab()
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##", show_progress=False
    )
    wordpiece.train_from_iterator((" ".join(words) for words in word_split(texts)), trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = sorted(wordpiece.get_vocab().items(), key=lambda item: item[1])
    (out_dir / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    tokenizer = BertJapaneseTokenizer(
        vocab_file=str(out_dir / "vocab.txt"),
        do_lower_case=False,
        word_tokenizer_type="mecab",
        subword_tokenizer_type="wordpiece",
        mecab_kwargs=MECAB_KWARGS,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A hub name (``cl-tohoku/bert-base-japanese-v3``) or a local folder, through AutoTokenizer.

    Raises:
        TokenizerSetupError: MeCab cannot run.
        FileNotFoundError: a local path that does not exist, or a hub name that is not cached
            while offline.
    """
    preflight_mecab()
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as e:
        raise FileNotFoundError(f"no tokenizer at {str(name_or_path)!r}: {str(e).splitlines()[0]}") from None


def default_tokenizer(texts: Sequence[str], *, vocab_size: int = 8000) -> PreTrainedTokenizerBase:
    """The project's own tokenizer for ``texts``, trained once and cached by content."""
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:12]
    folder = cache_dir() / "tokenizers" / f"wordpiece-{vocab_size}-{digest}"
    if (folder / "tokenizer_config.json").is_file():
        return load_tokenizer(folder)
    return train_tokenizer(texts, folder, vocab_size=vocab_size)
