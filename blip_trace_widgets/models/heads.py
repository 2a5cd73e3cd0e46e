"""BLIP's task heads, one class each: what a head reads, what it says, what a trace scores, and what it refuses.

    >>> from blip_trace_widgets.models.heads import of
    >>> head = of("caption")
    >>> head.label, head.blocks[0], head.text
    ('captioning', 'caption_decoder', 'prompt')
    >>> of("vqa").describe_answer("red"), of("itm").metric_label("prob")
    ("model's answer: 'red'", 'p(match)')

A head is picked once, from the model's transformers class (:func:`of` accepts a model, a bundle, a
tracer or a head's name), and everything that differs between heads is a method or an attribute of its
class. Adding a head is one subclass of :class:`Head` and one entry in :data:`BY_NAME`.

The methods that read a clean pass take a :class:`Reading`: the pass of one (image, text), as
:class:`~.clean.CleanPass` and the tracer provide it. This module sits under the model's anatomy and
above the names, so that every module can ask a head what it does without a cycle.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from html import escape
from typing import Any, ClassVar, Protocol

from ..core.errors import BlipTraceError
from ..core.inputs import check_question, encode_answer, encode_lm_prompt, encode_prompt, encode_question
from ..core.names import (
    ANSWER_DECODER,
    BLIP2,
    BLIP2_PROMPT,
    BLIP2_T5,
    CAPTION,
    CAPTION_DECODER,
    INSTRUCTBLIP,
    INSTRUCTBLIP_T5,
    ITM,
    ITM_ENCODER,
    LANGUAGE_MODEL,
    LM_DECODER,
    LM_ENCODER,
    MAX_ANSWER_TOKENS,
    MAX_CAPTION_TOKENS,
    METRIC_LABELS,
    QFORMER,
    QUESTION_ENCODER,
    VISION_ENCODER,
    VQA,
    Block,
    Metric,
    facts,
)
from ..core.roles import words_of
from ..core.scoring import Target

NUMBER_WORDS = {word: str(i) for i, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}


def normalize_answer(text: str | None) -> str:
    """Lower case, no surrounding punctuation, number words as digits ('Two.' and '2' match)."""
    if text is None:
        return ""
    words = text.strip().lower().strip(".!?,;: ").split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


class Reading(Protocol):
    """What a head reads from the clean pass of one (image, text)."""

    question: str
    question_ids: list[int]
    bundle: Any
    blocks: Any

    @property
    def clean(self) -> Any: ...

    @property
    def model_answer(self) -> str: ...

    @property
    def match_probability(self) -> float: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def position_limit(self) -> int: ...

    def decode(self, block: Any, states: Any, start: Sequence[int], limit: int) -> list[int]: ...


class Scoring(Protocol):
    """A reading's targets: which tokens an answer or a caption is (what a target is built from)."""

    @property
    def clean_pass(self) -> Reading: ...

    def caption_ids(self, caption: str | None) -> tuple[int, ...]: ...

    def answer_ids(self, answer: str | None) -> tuple[int, ...]: ...

    def caption_word(self, config: Any) -> int: ...


class Head(ABC):
    """One BLIP task head. Subclasses set the attributes and override what their head does differently."""

    name: ClassVar[str]
    label: ClassVar[str]  # in titles and messages
    architecture: ClassVar[str]  # the transformers class
    model_type: ClassVar[str] = "blip"  # its configuration's model_type
    processor: ClassVar[str] = "BlipProcessor"  # the transformers class of its processor
    blocks: ClassVar[tuple[Block, ...]]  # the first is the default block and the reader of the image
    #: The text block that reads the reader's states and gives the output (VQA's answer decoder), if any.
    decoder: ClassVar[Block | None] = None
    text: ClassVar[str]  # what the text input is, in controls
    scored: ClassVar[str]  # what a trace scores, in titles
    metrics: ClassVar[tuple[Metric, ...]]
    unit: ClassVar[str]  # what a sweep's items are, in titles
    said: ClassVar[str] = "model's answer"  # what the model's output is called
    #: The command-line option for the text, and whether a trace needs one (a captioner's prompt may be empty).
    text_option: ClassVar[str] = "--question"
    needs_text: ClassVar[bool] = True
    #: Whether a sweep reads a question set (VQA) or a caption subset.
    reads_questions: ClassVar[bool] = False
    #: The language model (its configuration's ``model_type``) a head is for; None: any, or none.
    language: ClassVar[str | None] = None
    #: Whether the model's answer on a counterfactual input supplies a logit difference's contrast.
    answers_counterfactuals: ClassVar[bool] = False
    #: Whether its output is a caption whose words are scored one at a time (``word=k``; ``word="all"`` traces each).
    scores_words: ClassVar[bool] = False
    #: Whether it says p(match) for an image and a text.
    matches: ClassVar[bool] = False
    #: Whether its model has a Q-Former whose output queries a language model reads (BLIP-2, InstructBLIP).
    has_queries: ClassVar[bool] = False
    #: Whether its Q-Former reads the question too, as an instruction (InstructBLIP).
    reads_instruction: ClassVar[bool] = False

    def check_every_word(self) -> None:
        """Refuses ``word="all"`` unless the head's output is a caption."""
        if not self.scores_words:
            raise BlipTraceError('word="all" traces every word of a caption: use it with a captioning model')

    def check_matches(self) -> None:
        """Refuses p(match) unless the head is an image-text matcher."""
        if not self.matches:
            raise BlipTraceError("p(match) comes from an image-text matching model: load one such as demo-itm")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @property
    def a_model(self) -> str:
        """The model, in messages: "a visual question answering model", "an image-text matching model"."""
        return f"{'an' if self.label[0].lower() in 'aeiou' else 'a'} {self.label} model"

    @property
    def default_block(self) -> Block:
        return self.blocks[0]

    @property
    def reader(self) -> Block:
        """The text block that cross-attends to the image embeddings."""
        return self.blocks[0]

    # ----- the text and the model's output ----------------------------------------------------------
    def encode(self, tokenizer: Any, text: Any, limit: int, bos: int) -> tuple[str, list[int]]:
        """The text as read (stripped) and its token ids as the model sees them."""
        checked = check_question(text, self.text)
        return checked, encode_question(tokenizer, checked, limit, self.text)

    def instruction(self, bundle: Any, text: str) -> tuple[int, ...]:
        """The tokens the Q-Former reads beside its queries (InstructBLIP's instruction); none for other heads."""
        return ()

    def greedy(self, reading: Reading, image_embeds: Any, run: Any) -> list[int]:
        """The tokens the model generates greedily on the clean input (none for a head that generates nothing)."""
        return []

    def answer_tokens(self, tokenizer: Any, answer: str, what: str = "answer") -> list[int]:
        """The tokens of an answer (or a contrast, or a caption) to score, as the model would say it."""
        return encode_answer(tokenizer, answer, what)

    def position_limit(self, model: Any) -> int:
        """The most tokens the text transformers read."""
        return int(model.config.text_config.max_position_embeddings)

    def start_token(self, model: Any) -> int:
        """The decoders' start token."""
        return int(model.config.text_config.bos_token_id)

    def model_answer(self, reading: Reading) -> str:
        """What the model says on the clean input, in words."""
        return str(reading.bundle.tokenizer.decode(reading.clean.greedy_ids, skip_special_tokens=True).strip())

    def describe_answer(self, answer: str, *, html: bool = False) -> str:
        """One line: what the model says (``answer``), for the command line or, with ``html``, an explorer."""
        return f"{self.said}: <b>{escape(answer)}</b>" if html else f"{self.said}: {answer!r}"

    def describe(self, reading: Reading, *, html: bool = False) -> str:
        """What the model reads and says: two lines for the command line, one for an explorer (``html``)."""
        said = self.describe_answer(reading.model_answer, html=html)
        return said if html else f"{self.text}: {reading.question}\n{said}"

    # ----- what a trace scores ----------------------------------------------------------------------
    def check(self, config: Any) -> None:
        """Refuse settings that mean nothing for this head, naming what to use."""
        if config.metric not in self.metrics:
            raise BlipTraceError(f"metric {config.metric!r} does not apply to {self.a_model}: use one of "
                                 f"{', '.join(self.metrics)}")
        self.check_word(config.word)

    def check_word(self, word: int | None) -> None:
        """Refuse a caption word for a head that scores no caption."""
        if word is not None:
            raise BlipTraceError("word picks a word of a caption: use it with a captioning model")

    @abstractmethod
    def target(self, scoring: Scoring, config: Any, contrast: int | None) -> Target:
        """What ``config`` scores on ``scoring.clean_pass``, with a logit difference's ``contrast`` token (None
        otherwise)."""

    def reader_text(self, block: str) -> str:
        """What ``block``'s positions are, in a knockout's labels: the decoder's the answer, the reader's the text."""
        return self.scored if block == self.decoder else self.text

    def scored_words(self, answer: str, config: dict[str, Any], metric: str) -> str:
        """What a result's scores are of, in words: "answer 'red'", "caption word 'red'", "match with '…'"."""
        return f"{self.scored} {answer!r}"

    def metric_label(self, metric: str) -> str:
        """The label of ``metric`` for this head: p(answer), p(caption word), p(match), ..."""
        return METRIC_LABELS.get(metric, metric).replace("answer", self.scored)

    def config_fields(self, config: Any, scoring: Scoring) -> dict[str, Any]:
        """The fields a result records besides the configuration's own (a captioner's word, resolved)."""
        return {}

    def knockout_fields(self, answer: str | None, word: int | None) -> dict[str, Any]:
        """The :class:`~.config.TraceConfig` fields that say what a knockout scores."""
        return {"answer": answer}

    # ----- sweeps and galleries ---------------------------------------------------------------------
    def item_text(self, item: Any) -> str:
        """The text the model reads for a dataset item: its question (VQA) or prompt (captioning)."""
        return str(item.question)

    def sweep_answer(self, item: Any, mode: str, index: int) -> str | None:
        """What a sweep scores for ``item``: None for the model's own answer, or the item's expected one."""
        if mode != "expected":
            return None
        if not item.answer:
            raise BlipTraceError(f"sample {index} has no expected answer to score; use answer='model'")
        return str(item.answer)

    def correct(self, model_answer: str, expected: str | None) -> bool | None:
        """Whether the model's answer is the expected one (None when there is none to compare with)."""
        return None if expected is None else normalize_answer(model_answer) == normalize_answer(expected)

    def gallery_entry(self, image: Any, caption: str) -> tuple[Any, str, str]:
        """A gallery entry of an image and its reference caption: (image, text, answer)."""
        return image, "", caption


class VqaHead(Head):
    name, label, architecture = VQA, "visual question answering", "BlipForQuestionAnswering"
    blocks = (QUESTION_ENCODER, ANSWER_DECODER, VISION_ENCODER)
    text, scored, unit = "question", "answer", "questions"
    decoder = ANSWER_DECODER
    metrics = ("prob", "logprob", "logit_diff")
    reads_questions = True
    answers_counterfactuals = True

    def greedy(self, reading: Reading, image_embeds: Any, run: Any) -> list[int]:
        return reading.decode(reading.blocks.last, run.output, [reading.bos_id], MAX_ANSWER_TOKENS)

    def target(self, scoring: Scoring, config: Any, contrast: int | None) -> Target:
        reading = scoring.clean_pass
        tokens = scoring.answer_ids(config.answer)
        return Target((reading.bos_id, *tokens[:-1]), tokens, 0, contrast)


class CaptionHead(Head):
    name, label, architecture = CAPTION, "captioning", "BlipForConditionalGeneration"
    blocks = (CAPTION_DECODER, VISION_ENCODER)
    text, scored, unit, said = "prompt", "caption word", "captions", "model's caption"
    metrics = ("prob", "logprob", "logit_diff")
    needs_text = False
    scores_words = True

    def encode(self, tokenizer: Any, text: Any, limit: int, bos: int) -> tuple[str, list[int]]:
        return encode_prompt(tokenizer, text, limit, bos)

    def greedy(self, reading: Reading, image_embeds: Any, run: Any) -> list[int]:
        return reading.decode(reading.blocks.reader, image_embeds, reading.question_ids, MAX_CAPTION_TOKENS)

    def describe(self, reading: Reading, *, html: bool = False) -> str:
        if html:  # the caption as it reads, after its prompt
            return self.describe_answer((reading.question + " " + reading.model_answer).strip(), html=True)
        return f"{self.text}: {reading.question!r}\n{self.describe_answer(reading.model_answer)}"

    def check_word(self, word: int | None) -> None:
        pass  # any word: the target checks it against the caption

    def target(self, scoring: Scoring, config: Any, contrast: int | None) -> Target:
        reading = scoring.clean_pass
        tokenizer = reading.bundle.tokenizer
        ids = scoring.caption_ids(config.answer)
        words = words_of(tokenizer.convert_ids_to_tokens(list(ids)))
        k = scoring.caption_word(config)
        if k >= len(words):
            raise BlipTraceError(f"word={k}, but the caption {tokenizer.decode(list(ids))!r} has "
                                 f"{len(words)} words: use 0 to {len(words) - 1}")
        start, end = words[k][0], words[k][-1] + 1
        inputs = (*reading.question_ids, *ids[: end - 1])
        if len(inputs) > reading.position_limit:
            raise BlipTraceError(f"the prompt and caption up to word {k} are {len(inputs)} tokens; the decoder reads "
                                 f"at most {reading.position_limit}: shorten them")
        return Target(inputs, ids[start:end], len(reading.question_ids) - 1 + start, contrast)

    def config_fields(self, config: Any, scoring: Scoring) -> dict[str, Any]:
        return {"word": scoring.caption_word(config)}

    def knockout_fields(self, answer: str | None, word: int | None) -> dict[str, Any]:
        return {"answer": answer, "word": word}

class ItmHead(Head):
    name, label, architecture = ITM, "image-text matching", "BlipForImageTextRetrieval"
    blocks = (ITM_ENCODER, VISION_ENCODER)
    text, scored, unit, said = "text", "match", "image-text pairs", "model"
    metrics = ("prob", "logprob", "itc")
    text_option = "--text"
    matches = True

    def model_answer(self, reading: Reading) -> str:
        return "match" if reading.match_probability >= 0.5 else "no match"

    def describe_answer(self, answer: str, *, html: bool = False, probability: float | None = None) -> str:
        p = f" (p(match) {probability:.{3 if html else 4}f})" if probability is not None else ""
        return f"{self.said}: <b>{escape(answer)}</b>{p}" if html else f"{self.said}: {answer}{p}"

    def describe(self, reading: Reading, *, html: bool = False) -> str:
        said = self.describe_answer(reading.model_answer, html=html, probability=reading.match_probability)
        return said if html else f"{self.text}: {reading.question}\n{said}"

    def check(self, config: Any) -> None:
        super().check(config)
        if config.answer is not None:
            raise BlipTraceError("image-text matching scores the match of the text itself: pass the caption to "
                                 "match as the text, and no answer")
        if config.metric == "itc" and not facts(config.block).image_side:
            raise BlipTraceError("ITC compares the image with the text read without the image, so restoring the "
                                 "ITM encoder cannot change it: trace block='vision_encoder', or use metric='prob'")

    def target(self, scoring: Scoring, config: Any, contrast: int | None) -> Target:
        return Target(tuple(scoring.clean_pass.question_ids), readout="itc" if config.metric == "itc" else "match")

    def scored_words(self, answer: str, config: dict[str, Any], metric: str) -> str:
        what = "ITC similarity" if metric == "itc" else "match"
        return f"{what} with {config.get('question', '')!r}"

    def knockout_fields(self, answer: str | None, word: int | None) -> dict[str, Any]:
        return {}

    def item_text(self, item: Any) -> str:
        if not item.answer:
            raise BlipTraceError("an image-text matching sweep matches each sample's caption: give samples one")
        return str(item.answer)

    def sweep_answer(self, item: Any, mode: str, index: int) -> str | None:
        return None  # the match of the text itself

    def correct(self, model_answer: str, expected: str | None) -> bool | None:
        return model_answer == "match"  # every item's text is its image's own caption

    def gallery_entry(self, image: Any, caption: str) -> tuple[Any, str, str]:
        return image, caption, caption


class Blip2Head(Head):
    """BLIP-2 with an OPT language model, answering questions: the vision encoder's output is read by the Q-Former's
    learned queries, which the language model reads, projected, before the prompt "Question: {q} Answer:"."""

    name, label, architecture = BLIP2, "BLIP-2 question answering", "Blip2ForConditionalGeneration"
    model_type, processor = "blip-2", "Blip2Processor"
    language: ClassVar[str | None] = None  # any language model but T5 (which the T5 heads take)
    blocks: ClassVar[tuple[Block, ...]] = (QFORMER, LANGUAGE_MODEL, VISION_ENCODER)
    decoder: ClassVar[Block | None] = LANGUAGE_MODEL
    text, scored, unit = "question", "answer", "questions"
    metrics = ("prob", "logprob", "logit_diff")
    reads_questions = True
    answers_counterfactuals = True
    #: The language model's prompt around the question.
    prompt: ClassVar[str] = BLIP2_PROMPT
    has_queries = True

    def encode(self, tokenizer: Any, text: Any, limit: int, bos: int) -> tuple[str, list[int]]:
        checked = check_question(text, self.text)
        return checked, encode_lm_prompt(tokenizer, self.prompt.format(checked), limit, bos)

    def queries(self, model: Any) -> int:
        return int(model.config.num_query_tokens)

    def position_limit(self, model: Any) -> int:
        """The language model's positions less the queries' and the longest answer's."""
        return super().position_limit(model) - self.queries(model) - MAX_ANSWER_TOKENS

    def stop_tokens(self, model: Any) -> tuple[int, ...]:
        """The tokens that end generation, as ``generate()`` reads them from the generation config."""
        stop = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if stop is None:
            stop = model.config.text_config.eos_token_id
        return tuple(int(t) for t in (stop if isinstance(stop, (list, tuple)) else [stop]))

    def greedy(self, reading: Reading, image_embeds: Any, run: Any) -> list[int]:
        model = reading.bundle.model
        return list(reading.blocks.last.generate(reading, run.output, reading.question_ids, MAX_ANSWER_TOKENS,
                                                 self.stop_tokens(model)))

    def answer_tokens(self, tokenizer: Any, answer: str, what: str = "answer") -> list[int]:
        return encode_answer(tokenizer, answer, what, lead=" ")  # after "Answer:", as the model says it

    def reader_text(self, block: str) -> str:
        names: dict[str, str] = {QFORMER: "queries", LANGUAGE_MODEL: "language model"}
        return names.get(block, self.text)

    def target(self, scoring: Scoring, config: Any, contrast: int | None) -> Target:
        reading = scoring.clean_pass
        tokens = scoring.answer_ids(config.answer)
        prompt = tuple(reading.question_ids)
        return Target((*prompt, *tokens[:-1]), tokens, self.queries(reading.bundle.model) + len(prompt) - 1, contrast)



class InstructBlipHead(Blip2Head):
    """InstructBLIP with an OPT language model, answering questions: as BLIP-2, but the question is the instruction,
    read by the Q-Former (its tokens after the queries, through the Q-Former's own tokenizer) and by the language
    model (after the projected queries), as ``InstructBlipProcessor`` gives it to both."""

    name, label, architecture = INSTRUCTBLIP, "InstructBLIP question answering", "InstructBlipForConditionalGeneration"
    model_type, processor = "instructblip", "InstructBlipProcessor"
    prompt = "{}"  # the instruction as it is, as the InstructBLIP model cards prompt
    reads_instruction = True

    def instruction(self, bundle: Any, text: str) -> tuple[int, ...]:
        tokenizer = getattr(bundle.processor, "qformer_tokenizer", None)
        if tokenizer is None:
            raise BlipTraceError("an InstructBLIP model needs its InstructBlipProcessor (with a qformer_tokenizer): "
                                 "load it with load_model(...) from the checkpoint's folder")
        limit = int(bundle.model.config.qformer_config.max_position_embeddings)
        return tuple(encode_question(tokenizer, text, limit, "instruction"))

    def reader_text(self, block: str) -> str:
        names: dict[str, str] = {QFORMER: "Q-Former", LANGUAGE_MODEL: "language model"}  # queries and instruction
        return names.get(block, self.text)



class T5Answering:
    """What a Flan-T5 language model changes, for BLIP-2's and InstructBLIP's heads: two blocks (its encoder reads
    the projected queries and the prompt, as T5's tokenizer gives it, with its end token; its decoder says the
    answer from its start token, cross-attending to the encoder), relative positions, T5's own answer tokens."""

    language: ClassVar[str | None] = "t5"
    blocks: ClassVar[tuple[Block, ...]] = (QFORMER, LM_ENCODER, LM_DECODER, VISION_ENCODER)
    decoder: ClassVar[Block | None] = LM_DECODER
    prompt: ClassVar[str]
    text: ClassVar[str]

    def encode(self, tokenizer: Any, text: Any, limit: int, bos: int) -> tuple[str, list[int]]:
        checked = check_question(text, self.text)
        return checked, encode_question(tokenizer, self.prompt.format(checked), limit, self.text)

    def position_limit(self, model: Any) -> int:
        """T5's positions are relative: the most its tokenizer takes (``n_positions``) less the queries'."""
        return int(getattr(model.config.text_config, "n_positions", 512)) - int(model.config.num_query_tokens)

    def start_token(self, model: Any) -> int:
        return int(model.config.text_config.decoder_start_token_id)

    def greedy(self, reading: Reading, image_embeds: Any, run: Any) -> list[int]:
        stop = Blip2Head.stop_tokens(self, reading.bundle.model)  # type: ignore[arg-type]
        return list(reading.blocks.last.generate(reading, run.output, [reading.bos_id], MAX_ANSWER_TOKENS, stop))

    def answer_tokens(self, tokenizer: Any, answer: str, what: str = "answer") -> list[int]:
        return encode_answer(tokenizer, answer, what)  # T5's tokenizer marks a word's start itself

    def reader_text(self, block: str) -> str:
        names: dict[str, str] = {QFORMER: "queries", LM_ENCODER: "language model's encoder",
                                 LM_DECODER: "answer"}
        return names.get(block, self.text)

    def target(self, scoring: Scoring, config: Any, contrast: int | None) -> Target:
        tokens = scoring.answer_ids(config.answer)
        return Target((scoring.clean_pass.bos_id, *tokens[:-1]), tokens, 0, contrast)


class Blip2T5Head(T5Answering, Blip2Head):
    """BLIP-2 with a Flan-T5 language model, answering questions (prompted "Question: {q} Answer:")."""

    name, label = BLIP2_T5, "BLIP-2 (Flan-T5) question answering"


class InstructBlipT5Head(T5Answering, InstructBlipHead):
    """InstructBLIP with a Flan-T5 language model: the instruction read by the Q-Former and the T5 encoder."""

    name, label = INSTRUCTBLIP_T5, "InstructBLIP (Flan-T5) question answering"

    def reader_text(self, block: str) -> str:
        return "Q-Former" if block == QFORMER else T5Answering.reader_text(self, block)


#: Every head, by name; the first is the default (a BLIP configuration that names no head).
BY_NAME: dict[str, Head] = {head.name: head for head in (VqaHead(), CaptionHead(), ItmHead(), Blip2Head(),
                                                          InstructBlipHead(), Blip2T5Head(), InstructBlipT5Head())}
#: The blocks of each head, the first its default.
BLOCKS_OF: dict[str, tuple[Block, ...]] = {name: head.blocks for name, head in BY_NAME.items()}


def of(source: Any) -> Head:
    """The head of a model, a bundle, a tracer or a result (anything with ``.head`` naming one), or of a name."""
    if isinstance(source, Head):
        return source
    if isinstance(source, str):
        if source not in BY_NAME:
            raise BlipTraceError(f"unknown head {source!r}: use one of {', '.join(BY_NAME)}")
        return BY_NAME[source]
    name = getattr(source, "head", None)
    if isinstance(name, str):
        return of(name)
    return head_of_model(source)


def head_of_model(model: object) -> Head:
    """Which BLIP head ``model`` is, from its transformers class; a clear error for anything else."""
    import transformers

    language = getattr(getattr(getattr(model, "config", None), "text_config", None), "model_type", None)
    heads = [head for head in BY_NAME.values() if isinstance(model, getattr(transformers, head.architecture))]
    for head in sorted(heads, key=lambda head: head.language is None):  # a head for this language model first
        if head.language in (None, language):
            return head
    names = ", ".join(dict.fromkeys(head.architecture for head in BY_NAME.values()))
    raise BlipTraceError(
        f"expected a transformers BLIP model ({names}), got {type(model).__name__}; "
        "load one with load_model('Salesforce/blip-vqa-base') or load_model('demo')")


def metric_label(metric: str, head: str = VQA) -> str:
    """The label of ``metric`` for the head named ``head``: p(answer), p(caption word), p(match), ..."""
    return BY_NAME[head].metric_label(metric) if head in BY_NAME else METRIC_LABELS.get(metric, metric)
