"""Byte-level BPE tokenizer with the DeepSeek-V3 special tokens, chat format, tool calls and FIM.

Training and encoding run on the Hugging Face ``tokenizers`` library; :class:`Tokenizer` wraps its
``Tokenizer`` and saves the Hugging Face layout (``tokenizer.json``, ``tokenizer_config.json`` with a
Jinja ``chat_template``, ``special_tokens_map.json``) so ``transformers.AutoTokenizer`` loads it.

**Special tokens** (:data:`SPECIAL_TOKENS`) take the lowest ids in a fixed order: BOS is 0, EOS is 1
and pad is 2, as in the released V3 tokenizer and our model configs (``bos_token_id=0``,
``eos_token_id=1``).

**User text never becomes a special token.** :meth:`Tokenizer.encode` treats the special strings as
ordinary text (byte-level pieces), so a prompt that contains ``<｜end▁of▁sentence｜>`` or ``</think>``
can't end a turn or forge a tool call. Special ids enter a sequence only where this module puts them:
:meth:`Tokenizer.render_chat`, :meth:`Tokenizer.format_fim`, :attr:`Tokenizer.bos_id` and friends.
(``transformers`` loading our files does match special strings inside text -- that is its default
and what makes its ``apply_chat_template(tokenize=True)`` work; don't feed it untrusted text.)

**Chat format** (one convention, shared by :func:`render_chat_text`, :meth:`Tokenizer.render_chat`
and the saved Jinja template :data:`CHAT_TEMPLATE`)::

    <｜begin▁of▁sentence｜>SYSTEM
    <｜User｜>USER
    <｜Assistant｜></think>REPLY<｜end▁of▁sentence｜>
    <｜User｜>USER
    <｜Assistant｜>                                  <- generation prompt, followed by
        </think>   (non-thinking)   or   <think>   (thinking)

(shown on several lines for reading; nothing is inserted between the pieces).

* SYSTEM is every ``system`` message's content joined with ``"\\n\\n"`` (wherever they appear), then,
  when ``tools`` are given, :data:`TOOLS_HEADER` and one JSON schema per line.
* Every assistant message opens with ``<｜Assistant｜>`` and a think marker, as DeepSeek-V3.1 does:
  ``</think>`` in non-thinking mode and for every turn before the last user message (their
  reasoning is dropped, as V3.1 drops it from history); in thinking mode the assistant messages
  after the last user message (the turn being trained or continued) are
  ``<think>REASONING</think>CONTENT``. Reasoning comes from ``reasoning_content`` (or the aliases
  ``thinking`` / ``reasoning``) or from content of the form ``REASONING</think>CONTENT``.
* Tool calls (OpenAI style ``tool_calls``) follow the content, V3 style::

      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
      ...more calls...<｜tool▁calls▁end｜><｜end▁of▁sentence｜>

* ``tool`` messages in a row share one block:
  ``<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>OUT<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>``.
  Unlike V3 (which continues the reply right after the outputs), the next assistant message opens
  with ``<｜Assistant｜>`` and its marker like every other one, so thinking works after tool results
  and the generation prompt is the same everywhere.

**FIM** (PSM): ``<｜fim▁begin｜>PREFIX<｜fim▁hole｜>SUFFIX<｜fim▁end｜>MIDDLE<｜end▁of▁sentence｜>``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

# ---------------------------------------------------------------------------------------------
# Special tokens. U+FF5C is the fullwidth vertical bar "｜", U+2581 the "▁" word-boundary mark.

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"

# The order is the id order of a trained tokenizer: BOS 0, EOS 1, pad 2 (the released V3 ids too).
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN,
    FIM_BEGIN, FIM_HOLE, FIM_END,
    TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, TOOL_SEP, TOOL_CALL_END, TOOL_CALLS_END,
    TOOL_OUTPUTS_BEGIN, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_OUTPUTS_END,
    THINK_BEGIN, THINK_END,
)

# What tokenizer_config.json advertises; V3's own tokenizer_config uses the same value.
DEFAULT_MODEL_MAX_LENGTH = 131072

# Texts longer than this are encoded through the batch entry point, which releases the GIL.
_GIL_FREE_CHARS = 4096

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# Put in front of the tool schemas in the system part. Plain ASCII and free of special-token
# strings on purpose: it is encoded as text, and the Jinja template embeds it as a string literal.
TOOLS_HEADER = (
    "## Tools\n"
    "You can call the functions below; each line is one function's JSON schema. To call functions, "
    "reply with a tool-call block; their results come back to you in a tool-output block."
)


class TokenizerError(RuntimeError):
    """A tokenizer can't be loaded or used safely; the message names the file or token."""


# ---------------------------------------------------------------------------------------------
# Training


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` with :data:`SPECIAL_TOKENS` at ids 0, 1, ...

    ``vocab_size`` counts the special tokens and the 256 byte symbols. The same ``texts`` give the
    same vocabulary and merges every time (the ``tokenizers`` trainer breaks count ties by pair).
    """
    n_fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size={vocab_size} is below the {n_fixed} special + byte tokens")
    backend = tokenizers.Tokenizer(models.BPE())
    # No normalizer: any normalization (NFC, lowercasing...) would break decode(encode(s)) == s.
    # GPT-2 style pre-splitting (use_regex) keeps merges inside words/numbers/punctuation runs, which
    # also means no merge can ever spell "<think>" or "</think>" as one ordinary token.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        # The trainer gives special tokens the first ids, in list order.
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        # All 256 byte symbols, seen in the corpus or not, so any unicode text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


# ---------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """A byte-level BPE tokenizer with the DeepSeek-V3 specials, chat format and FIM.

    Wraps (and takes ownership of) a ``tokenizers.Tokenizer``, switching its
    ``encode_special_tokens`` on: every ``encode*`` method here treats special-token strings in the
    text as plain text. Special ids come only from :meth:`token_id`, the ``*_id`` properties,
    :meth:`render_chat` and :meth:`format_fim`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH):
        self._backend = backend
        self.model_max_length = int(model_max_length)
        # Not part of tokenizer.json nor of the pickled state: set here, and again in __setstate__.
        self._backend.encode_special_tokens = True
        # Ids that user text must never produce: our specials present in this vocabulary plus
        # anything the file itself flags as special.
        self._special_id_of = {t: i for t in SPECIAL_TOKENS if (i := backend.token_to_id(t)) is not None}
        flagged = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        self._special_ids = frozenset(flagged | set(self._special_id_of.values()))
        for required in (BOS_TOKEN, EOS_TOKEN):
            if required not in self._special_id_of:
                raise TokenizerError(f"the vocabulary has no {required!r} token")
        # A tokenizer file can hold one of our specials as a *non*-special added token (R1 does that
        # for <think>); the library would then match it inside user text. Refuse such a file.
        for tok in self._special_id_of:
            leaked = self._special_ids.intersection(self.encode(tok))
            if leaked:
                raise TokenizerError(
                    f"encoding the text {tok!r} yields special ids {sorted(leaked)}: this tokenizer "
                    "file registers it as a non-special added token, so user text could inject it")

    # -- pickling: the library's pickle goes through JSON and forgets encode_special_tokens ------

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_json": self._backend.to_str(), "model_max_length": self.model_max_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["tokenizer_json"]), state["model_max_length"])

    # -- vocabulary -------------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (keep its ``encode_special_tokens`` on)."""
        return self._backend

    def fingerprint(self) -> str:
        """A hash of the whole tokenizer (vocab, merges, specials): equal fingerprints encode alike."""
        return hashlib.sha256(self._backend.to_str().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's ``vocab_size`` may round this up)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        """Id of ``<｜begin▁of▁sentence｜>`` (0 in a trained tokenizer)."""
        return self._special_id_of[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        """Id of ``<｜end▁of▁sentence｜>`` (1 in a trained tokenizer)."""
        return self._special_id_of[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        """The pad token's id, or EOS's when the vocabulary has no pad token."""
        return self._special_id_of.get(PAD_TOKEN, self.eos_id)

    @property
    def special_ids(self) -> frozenset[int]:
        """Every special-token id; :meth:`encode` never returns one of them."""
        return self._special_ids

    def token_id(self, token: str) -> int:
        """The id of a special token such as ``"<｜User｜>"``; ``KeyError`` if the vocabulary lacks it."""
        try:
            return self._special_id_of[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of this tokenizer") from None

    def stop_ids(self, extra: Iterable[int | None] = (), eos: bool = True) -> tuple[int, ...]:
        """The ids that end an assistant reply, sorted: EOS, and ``<｜User｜>`` when the vocabulary has it
        (a model that starts the next user turn has finished its reply), plus ``extra`` (``None`` is
        skipped, e.g. a config's unset ``eos_token_id``).

        eos=False leaves EOS out, for an engine that stops at EOS itself unless told to ignore it.
        """
        ids = {int(i) for i in extra if i is not None}
        if eos:
            ids.add(self.eos_id)
        if USER_TOKEN in self._special_id_of:
            ids.add(self._special_id_of[USER_TOKEN])
        return tuple(sorted(ids))

    # -- encode / decode --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it are encoded as ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if len(text) > _GIL_FREE_CHARS:
            # The library's single-text entry point holds the GIL for the whole call (seconds for a few
            # MB, freezing every other thread); its batch entry point releases it, with the same ids.
            return self._backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of many texts at once, in parallel inside the library."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch() takes str items, got {type(t).__name__}")
        # The _fast variant skips offset bookkeeping we don't use.
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, tuple, numpy array or tensor). Byte sequences cut inside a
        UTF-8 character decode to U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = False) -> DecodeStream:
        """An incremental decoder for generated ids (see :class:`DecodeStream`)."""
        return DecodeStream(self, skip_special_tokens)

    # -- chat and FIM -----------------------------------------------------------------------------

    def _ids_of(self, pieces: list[_Piece]) -> list[list[int]]:
        return [[self.token_id(text)] if special else self.encode(text) for text, special, _ in pieces]

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        thinking: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a conversation in the module's chat format.

        Built piece by piece -- special ids where the format puts them, :meth:`encode` for every text
        piece -- so no message can inject a special token. ``decode(render_chat(...))`` equals
        :func:`render_chat_text` with the same arguments.
        """
        pieces = _chat_pieces(messages, add_generation_prompt, thinking, tools)
        return [i for ids in self._ids_of(pieces) for i in ids]

    def render_chat_text(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        thinking: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Same as the module-level :func:`render_chat_text`."""
        return render_chat_text(messages, add_generation_prompt, thinking, tools)

    def render_chat_with_mask(
        self,
        messages: Sequence[Mapping[str, Any]],
        thinking: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[list[int], list[bool]]:
        """``render_chat(messages, add_generation_prompt=False, ...)`` and, per token, whether the
        assistant generates it (the SFT loss mask).

        True for what follows an assistant message's generation prompt (``<｜Assistant｜>`` plus its
        ``</think>`` or ``<think>``): reasoning, ``</think>`` closing it, content, tool calls, EOS.
        """
        pieces = _chat_pieces(messages, False, thinking, tools)
        ids: list[int] = []
        mask: list[bool] = []
        for (_, _, generated), piece_ids in zip(pieces, self._ids_of(pieces)):
            ids += piece_ids
            mask += [generated] * len(piece_ids)
        return ids, mask

    def format_fim(
        self,
        prefix: str | Sequence[int],
        suffix: str | Sequence[int],
        middle: str | Sequence[int] | None = None,
    ) -> list[int]:
        """PSM fill-in-the-middle ids: ``<｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>``,
        then ``middle`` and EOS when ``middle`` is given (training); without them it is the prompt.

        Each part is text (encoded with :meth:`encode`) or already token ids (used as they are).
        """
        def ids(part: str | Sequence[int]) -> list[int]:
            return self.encode(part) if isinstance(part, str) else [int(i) for i in part]

        begin, hole, end = fim_ids(self)
        out = [begin, *ids(prefix), hole, *ids(suffix), end]
        if middle is not None:
            out += [*ids(middle), self.eos_id]
        return out

    # -- files ------------------------------------------------------------------------------------

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write the Hugging Face layout into ``directory`` (created if needed):
        ``tokenizer.json``, ``tokenizer_config.json`` (with :data:`CHAT_TEMPLATE`) and
        ``special_tokens_map.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / TOKENIZER_FILE))
        present = self._special_id_of
        specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
        if PAD_TOKEN in present:
            specials["pad_token"] = PAD_TOKEN
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "model_max_length": int(model_max_length or self.model_max_length),
            # Our sequences get BOS from render_chat / the data pipeline, never implicitly.
            "add_bos_token": False,
            "add_eos_token": False,
            # Byte-level decoding is exact; "cleaning" spaces would break decode(encode(s)) == s.
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        _write_json(directory / TOKENIZER_CONFIG_FILE, config)
        _write_json(directory / SPECIAL_TOKENS_MAP_FILE, {
            **specials,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t in present and t not in specials.values()],
        })

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding ``tokenizer.json`` (ours or the released V3 one) or from
        the ``tokenizer.json`` file itself. Raises :class:`TokenizerError` naming the file when it is
        missing or unreadable."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not path.exists():
            raise TokenizerError(f"can't load a tokenizer from {path}: the path does not exist")
        if not file.is_file():
            raise TokenizerError(f"can't load a tokenizer from directory {path}: it has no {TOKENIZER_FILE}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for bad JSON or schema
            raise TokenizerError(f"{file} is not a valid tokenizers JSON file: {e}") from e
        model_max_length = DEFAULT_MODEL_MAX_LENGTH
        config_file = file.parent / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            try:
                value = json.loads(config_file.read_text(encoding="utf-8")).get("model_max_length")
            except (ValueError, AttributeError) as e:
                raise TokenizerError(f"{config_file} is not a valid JSON object: {e}") from e
            # transformers writes a huge float (1e30) for "no limit"; keep the default then.
            if isinstance(value, int) and 0 < value < 2**40:
                model_max_length = value
        return cls(backend, model_max_length)


class DecodeStream:
    """Incremental detokenization for generation: feed ids one at a time, get text chunks.

    :meth:`step` returns ``""`` while the ids so far end inside a UTF-8 character (byte-level BPE
    splits characters across tokens); the concatenated chunks equal ``decode`` of all ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._backend = tokenizer.backend
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (possibly empty)."""
        return self._stream.step(self._backend, int(token_id)) or ""


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Chat format. _chat_pieces is the one definition; ids, text and mask are all read off it, and
# CHAT_TEMPLATE is its Jinja transcription (tests hold the two equal).

# (text, is_special, generated_by_assistant)
_Piece = tuple[str, bool, bool]

# transformers copies a message's reasoning from these keys, first non-None wins; so do we.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _text_field(message: Mapping[str, Any], key: str) -> str:
    value = message.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"message {key!r} must be a string, got {type(value).__name__}")
    return value


def _split_reply(message: Mapping[str, Any]) -> tuple[str, str]:
    """(reasoning, content) of an assistant message."""
    content = _text_field(message, "content")
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    reasoning = str(reasoning) if reasoning else ""
    if THINK_END in content:
        embedded, content = split_thinking(content)
        reasoning = reasoning or embedded
    return reasoning, content


def _tool_call_text(call: Mapping[str, Any]) -> tuple[str, str]:
    """(type, "NAME\\n```json\\nARGS\\n```") of one OpenAI-style tool call."""
    fn = call.get("function") or call
    args = fn.get("arguments")
    if not isinstance(args, str):
        # Same as transformers' tojson filter, so the Jinja template renders the same text.
        args = json.dumps(args, ensure_ascii=False)
    return call.get("type") or "function", f"{fn['name']}\n```json\n{args}\n```"


def _system_text(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> str:
    system = "\n\n".join(_text_field(m, "content") for m in messages if m.get("role") == "system")
    if tools:
        tool_text = TOOLS_HEADER + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        system = f"{system}\n\n{tool_text}" if system else tool_text
    return system


def _chat_pieces(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    thinking: bool,
    tools: Sequence[Mapping[str, Any]] | None,
) -> list[_Piece]:
    for m in messages:
        if not isinstance(m, Mapping):
            raise TypeError(f"a message must be a mapping with 'role' and 'content', got {type(m).__name__}")
    pieces: list[_Piece] = []

    def special(token: str, generated: bool = False) -> None:
        pieces.append((token, True, generated))

    def text(s: str, generated: bool = False) -> None:
        if s:  # an empty piece adds no ids and no text
            pieces.append((s, False, generated))

    special(BOS_TOKEN)
    text(_system_text(messages, tools))
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    in_outputs = False
    for i, m in enumerate(messages):
        role = m.get("role")
        if in_outputs and role != "tool":
            special(TOOL_OUTPUTS_END)
            in_outputs = False
        if role == "system":
            continue  # already in the system part
        elif role == "user":
            special(USER_TOKEN)
            text(_text_field(m, "content"))
        elif role == "assistant":
            reasoning, content = _split_reply(m)
            special(ASSISTANT_TOKEN)
            if thinking and i > last_user:
                special(THINK_BEGIN)
                text(reasoning, True)
                special(THINK_END, True)
            else:
                special(THINK_END)
            text(content, True)
            calls = m.get("tool_calls")
            if calls:
                special(TOOL_CALLS_BEGIN, True)
                for call in calls:
                    kind, body = _tool_call_text(call)
                    special(TOOL_CALL_BEGIN, True)
                    text(kind, True)
                    special(TOOL_SEP, True)
                    text(body, True)
                    special(TOOL_CALL_END, True)
                special(TOOL_CALLS_END, True)
            special(EOS_TOKEN, True)
        elif role == "tool":
            if not in_outputs:
                special(TOOL_OUTPUTS_BEGIN)
                in_outputs = True
            special(TOOL_OUTPUT_BEGIN)
            text(_text_field(m, "content"))
            special(TOOL_OUTPUT_END)
        else:
            raise ValueError(f"unknown message role {role!r} (expected system, user, assistant or tool)")
    if in_outputs:
        special(TOOL_OUTPUTS_END)
    if add_generation_prompt:
        special(ASSISTANT_TOKEN)
        special(THINK_BEGIN if thinking else THINK_END)
    return pieces


def render_chat_text(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    thinking: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """A conversation in the module's chat format, as text (special tokens spelled out).

    ``messages`` are dicts with ``role`` (system / user / assistant / tool) and ``content``;
    assistant messages may carry ``tool_calls`` (OpenAI style: ``{"type": "function", "function":
    {"name", "arguments"}}``, arguments a JSON string or an object) and ``reasoning_content``.
    ``tools`` are JSON schemas (OpenAI style), described in the system part. The saved
    :data:`CHAT_TEMPLATE` renders the same text through ``transformers``' ``apply_chat_template``.
    """
    return "".join(t for t, _, _ in _chat_pieces(messages, add_generation_prompt, thinking, tools))


# The Jinja transcription of _chat_pieces, saved as tokenizer_config.json's chat_template. It is
# rendered by transformers with trim_blocks/lstrip_blocks; every tag strips whitespace ("-") and all
# output comes from {{ }} so the layout of this source doesn't leak into the text.
# Message fields are read by subscript (m['content'], guarded with `'key' in m` where a field may be
# absent), never with m.get(): llama.cpp's template engine learns which roles and fields a template
# supports by running it on probe messages and recording which fields it subscripted; a field read
# through .get() counts as unread, and llama-server then folds the system message into the user
# turn and drops tool calls. Reasoning is read only for the turns that show it, so the same probe
# rightly finds that history reasoning is not kept. Only filters and string methods that the
# common engines share (transformers' jinja2, minijinja, llama.cpp) are used: split() without a
# maxsplit (older llama.cpp ignores it), join, strip/lstrip, startswith, slicing, tojson.
CHAT_TEMPLATE = r"""{#- dsv3 chat template: renders exactly what dsv3.tokenizer.render_chat_text renders. -#}
{#- `thinking` is ours and DeepSeek's; llama-server and vLLM's chat_template_kwargs say `enable_thinking`. -#}
{%- set thinking = thinking | default(enable_thinking | default(false)) -%}
{%- set add_generation_prompt = add_generation_prompt | default(false) -%}
{%- set ns = namespace(system='', has_system=false, last_user=-1, in_outputs=false, tool_text='',
                       reasoning='', found=false) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}
    {%- set ns.system = (ns.system ~ '\n\n' if ns.has_system else '') ~ ((m['content'] if 'content' in m else none) or '') -%}
    {%- set ns.has_system = true -%}
  {%- elif m['role'] == 'user' -%}
    {%- set ns.last_user = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- if tools -%}
  {%- set ns.tool_text = @TOOLS_HEADER@ -%}
  {%- for t in tools -%}
    {%- set ns.tool_text = ns.tool_text ~ '\n' ~ (t | tojson) -%}
  {%- endfor -%}
  {%- set ns.system = (ns.system ~ '\n\n' ~ ns.tool_text) if ns.system else ns.tool_text -%}
{%- endif -%}
{{- '<｜begin▁of▁sentence｜>' ~ ns.system -}}
{%- for m in messages -%}
  {%- if ns.in_outputs and m['role'] != 'tool' -%}
    {{- '<｜tool▁outputs▁end｜>' -}}
    {%- set ns.in_outputs = false -%}
  {%- endif -%}
  {%- if m['role'] == 'system' -%}
  {%- elif m['role'] == 'user' -%}
    {{- '<｜User｜>' ~ ((m['content'] if 'content' in m else none) or '') -}}
  {%- elif m['role'] == 'assistant' -%}
    {%- set content = (m['content'] if 'content' in m else none) or '' -%}
    {%- set head = '' -%}
    {%- if '</think>' in content -%}
      {%- set parts = content.split('</think>') -%}
      {%- set head = parts[0].strip() -%}
      {%- if head.startswith('<think>') -%}
        {%- set head = head[7:].strip() -%}
      {%- endif -%}
      {%- set content = (parts[1:] | join('</think>')).lstrip() -%}
    {%- endif -%}
    {{- '<｜Assistant｜>' -}}
    {%- if thinking and loop.index0 > ns.last_user -%}
      {#- the first of reasoning_content / thinking / reasoning that is not null, else the embedded part -#}
      {%- set ns.reasoning = '' -%}
      {%- set ns.found = false -%}
      {%- for key in ['reasoning_content', 'thinking', 'reasoning'] -%}
        {%- if not ns.found and key in m and m[key] is not none -%}
          {%- set ns.reasoning = m[key] -%}
          {%- set ns.found = true -%}
        {%- endif -%}
      {%- endfor -%}
      {{- '<think>' ~ ((ns.reasoning | string if ns.reasoning else '') or head) ~ '</think>' -}}
    {%- else -%}
      {{- '</think>' -}}
    {%- endif -%}
    {{- content -}}
    {%- if 'tool_calls' in m and m['tool_calls'] -%}
      {{- '<｜tool▁calls▁begin｜>' -}}
      {%- for call in m['tool_calls'] -%}
        {%- set fn = (call['function'] if 'function' in call else none) or call -%}
        {%- set args = fn['arguments'] if 'arguments' in fn else none -%}
        {%- if args is not string -%}
          {%- set args = args | tojson -%}
        {%- endif -%}
        {{- '<｜tool▁call▁begin｜>' ~ ((call['type'] if 'type' in call else none) or 'function') ~ '<｜tool▁sep｜>' -}}
        {{- fn['name'] ~ '\n```json\n' ~ args ~ '\n```' ~ '<｜tool▁call▁end｜>' -}}
      {%- endfor -%}
      {{- '<｜tool▁calls▁end｜>' -}}
    {%- endif -%}
    {{- '<｜end▁of▁sentence｜>' -}}
  {%- elif m['role'] == 'tool' -%}
    {%- if not ns.in_outputs -%}
      {{- '<｜tool▁outputs▁begin｜>' -}}
      {%- set ns.in_outputs = true -%}
    {%- endif -%}
    {{- '<｜tool▁output▁begin｜>' ~ ((m['content'] if 'content' in m else none) or '') ~ '<｜tool▁output▁end｜>' -}}
  {%- else -%}
    {{- raise_exception('unknown message role ' ~ (m['role'] if 'role' in m else 'none')) -}}
  {%- endif -%}
{%- endfor -%}
{%- if ns.in_outputs -%}
  {{- '<｜tool▁outputs▁end｜>' -}}
{%- endif -%}
{%- if add_generation_prompt -%}
  {{- '<｜Assistant｜>' ~ ('<think>' if thinking else '</think>') -}}
{%- endif -%}""".replace("@TOOLS_HEADER@", json.dumps(TOOLS_HEADER))  # ASCII, so a valid Jinja literal


# ---------------------------------------------------------------------------------------------
# Parsing model output


def split_thinking(text: str) -> tuple[str, str]:
    """Split a reply into ``(reasoning, content)`` at the first ``</think>``.

    A leading ``<think>`` is dropped and the reasoning stripped; the content loses its leading
    whitespace. Without ``</think>``: text opening with ``<think>`` is all (unfinished) reasoning,
    anything else is all content.
    """
    head, sep, tail = text.partition(THINK_END)
    if not sep:
        if text.lstrip().startswith(THINK_BEGIN):
            return text.lstrip()[len(THINK_BEGIN):].strip(), ""
        return "", text
    reasoning = head.strip()
    if reasoning.startswith(THINK_BEGIN):
        reasoning = reasoning[len(THINK_BEGIN):].strip()
    return reasoning, tail.lstrip()


def _strip_fences(args: str) -> str:
    args = args.strip()
    if args.startswith("```"):
        # drop the opening fence line (```json, ``` or ```JSON)
        args = args.partition("\n")[2] if "\n" in args else args[3:]
    if args.rstrip().endswith("```"):
        args = args.rstrip()[:-3]
    return args.strip()


def _parse_call(body: str) -> dict[str, str] | None:
    head, sep, tail = body.partition(TOOL_SEP)
    if not sep:
        return None
    if "\n" in tail.strip():
        # V3: TYPE<sep>NAME\n```json\nARGS\n```
        name, _, args = tail.strip().partition("\n")
    elif "{" in tail and head.strip() == "function":
        # V3 with the newline and fences lost: TYPE<sep>NAME{...}
        cut = tail.index("{")
        name, args = tail[:cut], tail[cut:]
    else:
        # V3.1: NAME<sep>ARGS
        name, args = head, tail
    name = name.strip()
    return {"name": name, "arguments": _strip_fences(args)} if name else None


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, str]]]:
    """Split decoded model output (special tokens kept) into ``(content, calls)``.

    ``calls`` are ``{"name": ..., "arguments": JSON string}`` in order. ``content`` is the text
    before ``<｜tool▁calls▁begin｜>`` (or all of it, minus a trailing EOS, when there is no call).
    Tolerant of missing ```json fences, of the V3.1 ``NAME<｜tool▁sep｜>ARGS`` layout and of a
    missing ``<｜tool▁call▁end｜>`` before ``<｜tool▁calls▁end｜>``; a call cut off by the end of
    the text (generation stopped early) is dropped.
    """
    content, sep, rest = text.partition(TOOL_CALLS_BEGIN)
    if not sep:
        return text.removesuffix(EOS_TOKEN), []
    rest, closed, _ = rest.partition(TOOL_CALLS_END)
    chunks = rest.split(TOOL_CALL_BEGIN)[1:]
    calls = []
    for n, chunk in enumerate(chunks):
        body, ended, _ = chunk.partition(TOOL_CALL_END)
        if not ended and not (closed and n == len(chunks) - 1):
            continue  # incomplete call
        call = _parse_call(body)
        if call is not None:
            calls.append(call)
    return content, calls


# ---------------------------------------------------------------------------------------------
# FIM


def fim_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """Ids of ``<｜fim▁begin｜>``, ``<｜fim▁hole｜>``, ``<｜fim▁end｜>``."""
    return tokenizer.token_id(FIM_BEGIN), tokenizer.token_id(FIM_HOLE), tokenizer.token_id(FIM_END)


def format_fim(
    tokenizer: Tokenizer,
    prefix: str | Sequence[int],
    suffix: str | Sequence[int],
    middle: str | Sequence[int] | None = None,
) -> list[int]:
    """Same as :meth:`Tokenizer.format_fim`."""
    return tokenizer.format_fim(prefix, suffix, middle)
