"""What a trace scores for each head: a VQA answer, a word of a caption, or the match of a text.

    >>> from blip_trace_widgets import load_model, demo_samples, TraceConfig
    >>> from blip_trace_widgets.causal_trace.clean import CleanPass
    >>> from blip_trace_widgets.causal_trace.targets import Targets
    >>> image, _, _ = demo_samples()[0]
    >>> clean_pass = CleanPass(load_model("demo-caption"), image, "")
    >>> Targets(clean_pass).caption_words()
    ['a', 'red', 'triangle']
    >>> target = Targets(clean_pass).target(TraceConfig(block="caption_decoder", word=1))
    >>> target.tokens == tuple(clean_pass.bundle.tokenizer.convert_tokens_to_ids(["red"])), target.offset
    (True, 1)

Settings that mean nothing for a head (a caption word for VQA, an answer for image-text
matching, ITC restored through the ITM encoder) are refused here with an error naming what to use.
"""
from __future__ import annotations

from ..core.errors import BlipTraceError
from ..core.inputs import encode_answer
from ..core.names import facts
from ..core.roles import first_content_word, words_of
from ..core.scoring import Target
from ..models import anatomy
from . import stages
from .clean import CleanPass
from .config import TraceConfig


class Targets:
    """What each :class:`TraceConfig` scores on the clean pass of one (image, text)."""

    def __init__(self, clean_pass: CleanPass) -> None:
        self.clean_pass = clean_pass

    # ----- what is scored ----------------------------------------------------------------
    def caption_ids(self, caption: str | None) -> tuple[int, ...]:
        """Captioning: the caption's tokens after the prompt, the model's greedy caption or ``caption``."""
        if caption is None:
            if not self.clean_pass.clean.greedy_ids:
                raise BlipTraceError("the model gives an empty caption; pass answer='...' to score a caption")
            return tuple(self.clean_pass.clean.greedy_ids)
        return tuple(encode_answer(self.clean_pass.bundle.tokenizer, caption, "caption"))

    def caption_words(self, caption: str | None = None) -> list[str]:
        """Captioning: the words of the caption (the model's, or ``caption``), in order; ``word=k`` scores word k."""
        tokens = self.clean_pass.bundle.tokenizer.convert_ids_to_tokens(list(self.caption_ids(caption)))
        return [self.clean_pass.bundle.tokenizer.convert_tokens_to_string([tokens[i] for i in word]).strip()
                for word in words_of(tokens)]

    def caption_word(self, config: TraceConfig) -> int:
        """Captioning: the index of the caption word ``config`` scores: ``config.word``, or by default the first
        content word of the caption (the model's, or ``config.answer``)."""
        if config.word is not None:
            return int(config.word)
        return first_content_word(self.caption_words(config.answer))

    def answer_ids(self, answer: str | None) -> tuple[int, ...]:
        """VQA: tokens scored: the clean greedy first token, or the given answer's tokens."""
        if answer is None:
            if not self.clean_pass.clean.greedy_ids:
                raise BlipTraceError("the model gives an empty answer to this question; pass answer='...' to score one")
            return (self.clean_pass.clean.greedy_ids[0],)
        ids = tuple(self.clean_pass.task.answer_tokens(self.clean_pass.bundle.tokenizer, answer))
        limit = self.clean_pass.position_limit
        if len(ids) >= limit:
            raise BlipTraceError(f"the answer is {len(ids)} tokens long; the decoder reads at most {limit - 1}: shorten it")
        return ids

    def target(self, config: TraceConfig) -> Target:
        """What ``config`` scores for this model's head."""
        self.check_config(config)
        contrast = None
        if config.metric == "logit_diff":
            contrast = self.contrast_id(config)
        target = self.clean_pass.task.target(self, config, contrast)
        if contrast is not None and contrast == target.tokens[0] and config.contrast is None:
            said = self.clean_pass.bundle.tokenizer.decode([contrast]).strip()
            raise BlipTraceError(f"the model answers {said!r} on the counterfactual too, so the pair has no contrast: "
                                 "pick a counterfactual that changes its answer, or pass contrast='...'")
        if contrast is not None and contrast == target.tokens[0]:
            raise BlipTraceError(f"the contrast starts with the same token as the {self.clean_pass.task.scored}; "
                                 "pick another contrast")
        return target

    def scored_text(self, target: Target) -> str:
        """What a result scores, in words: the answer, the caption word, or "match"."""
        if target.readout != "decoder":
            return "match" if target.readout == "match" else "ITC similarity"
        return str(self.clean_pass.bundle.tokenizer.decode(list(target.tokens))).strip()

    def contrast_id(self, config: TraceConfig) -> int:
        """A logit difference's contrast token: ``config.contrast``'s first token, or for a counterfactual (an
        ``ImageSwap`` or ``WordSwap``, VQA) the first token of the model's own answer on the counterfactual input."""
        if config.contrast is not None:
            return int(self.clean_pass.task.answer_tokens(self.clean_pass.bundle.tokenizer, config.contrast, "contrast")[0])
        counterfactual = self.counterfactual_pass(config)
        if counterfactual is None or not counterfactual.clean.greedy_ids:
            raise BlipTraceError("metric='logit_diff' compares the answer with a contrast: pass contrast='...' (a "
                                 "counterfactual image or word swap on a VQA model supplies its own answer)")
        return int(counterfactual.clean.greedy_ids[0])

    def counterfactual_pass(self, config: TraceConfig) -> CleanPass | None:
        """The clean pass of the counterfactual input of an ``ImageSwap`` or ``WordSwap`` (VQA), else None."""
        from ..corruptions.kinds import ImageSwap, WordSwap

        corruption = config.corruption
        if not self.clean_pass.task.answers_counterfactuals or not isinstance(corruption, (ImageSwap, WordSwap)):
            return None
        if isinstance(corruption, ImageSwap):
            return CleanPass(self.clean_pass.bundle, corruption.other_image, self.clean_pass.question)
        return CleanPass(self.clean_pass.bundle, self.clean_pass.image, corruption.counterfactual(self.clean_pass.question))

    def check_config(self, config: TraceConfig) -> None:
        """Refuse settings that mean nothing for this model's head, naming what to use."""
        anatomy.check_head_block(self.clean_pass.head, config.block)
        self.clean_pass.task.check(config)
        stages.of(config.corrupt).check_model(self.clean_pass.task, facts(config.block))
