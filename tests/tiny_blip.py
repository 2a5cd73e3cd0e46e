"""Tiny BLIP models built from BlipConfig (random weights) for fast tests."""
from __future__ import annotations

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
)

WORDS = ["what", "color", "is", "the", "shape", "?", "red", "blue", "green", "circle", "yes", "no", "a", "there"]
VOCAB = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS])}


def make_tokenizer(vocab: dict[str, int]) -> BertTokenizer:
    """A WordPiece tokenizer over ``vocab``: transformers 5 takes ``vocab=`` (it ignores ``vocab_file=``),
    transformers 4 needs a vocabulary file."""
    import inspect
    import tempfile

    if "vocab" in inspect.signature(BertTokenizer.__init__).parameters:
        tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    else:  # transformers 4.x
        path = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        path.write("\n".join(sorted(vocab, key=vocab.get)) + "\n")
        path.close()
        tokenizer = BertTokenizer(vocab_file=path.name, do_lower_case=True)
    ids = tokenizer("what color")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[1:3] == ["what", "color"], "the tokenizer lost its vocabulary"
    return tokenizer


def tiny_processor(image_size: int = 32) -> BlipProcessor:
    tokenizer = make_tokenizer(VOCAB)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_config(layers: int = 3, width: int = 32, image_size: int = 32, positions: int = 16) -> BlipConfig:
    text = dict(
        vocab_size=len(VOCAB), hidden_size=width, encoder_hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=positions, initializer_range=0.3,
        bos_token_id=VOCAB["[DEC]"], pad_token_id=0, sep_token_id=VOCAB["[SEP]"], eos_token_id=VOCAB["[SEP]"],
    )
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, initializer_range=0.3)
    return BlipConfig(text_config=text, vision_config=vision)


def tiny_model(seed: int = 0, **kw) -> BlipForQuestionAnswering:
    torch.manual_seed(seed)
    return BlipForQuestionAnswering(tiny_config(**kw))


def tiny_captioner(seed: int = 0, **kw) -> BlipForConditionalGeneration:
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(tiny_config(**kw))


def tiny_matcher(seed: int = 0, **kw) -> BlipForImageTextRetrieval:
    torch.manual_seed(seed)
    config = tiny_config(**kw)
    config.image_text_hidden_size = 16
    return BlipForImageTextRetrieval(config)


#: BLIP-2's vocabulary for tests: BLIP's, the image placeholder, and the prompt's words.
BLIP2_VOCAB = {**VOCAB, **{t: len(VOCAB) + i for i, t in enumerate(["<image>", "question", "answer", ":"])}}


def tiny_blip2_processor(image_size: int = 32, queries: int = 4):
    """A Blip2Processor over a WordPiece tokenizer (OPT's byte-level BPE needs files a test cannot fetch)."""
    from transformers import Blip2Processor

    tokenizer = make_tokenizer(BLIP2_VOCAB)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=queries)


def tiny_blip2_config(layers: int = 3, width: int = 32, image_size: int = 32, queries: int = 4,
                      cross_every: int = 2, positions: int = 48):
    from transformers import Blip2Config

    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, qkv_bias=True, initializer_range=0.3)
    qformer = dict(vocab_size=len(BLIP2_VOCAB), hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                   intermediate_size=2 * width, encoder_hidden_size=width, cross_attention_frequency=cross_every,
                   initializer_range=0.3)
    text = dict(model_type="opt", vocab_size=len(BLIP2_VOCAB), hidden_size=width, num_hidden_layers=layers,
                num_attention_heads=4, ffn_dim=2 * width, max_position_embeddings=positions, word_embed_proj_dim=width,
                bos_token_id=VOCAB["[CLS]"], eos_token_id=VOCAB["[SEP]"], pad_token_id=0, init_std=0.3)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=queries,
                       image_token_index=BLIP2_VOCAB["<image>"], initializer_range=0.3)


def tiny_blip2(seed: int = 0, **kw):
    """A tiny Blip2ForConditionalGeneration with an OPT language model (random weights)."""
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(tiny_blip2_config(**kw))
    with torch.no_grad():  # the learned queries start at zero: make them differ, as a trained model's do
        model.query_tokens.normal_(0, 1)
    return model.eval()


def tiny_instructblip_processor(image_size: int = 32, queries: int = 4):
    """An InstructBlipProcessor: WordPiece tokenizers for the language model and the Q-Former (BLIP's vocabulary)."""
    from transformers import InstructBlipProcessor

    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return InstructBlipProcessor(image_processor=image_processor, tokenizer=make_tokenizer(BLIP2_VOCAB),
                                 qformer_tokenizer=make_tokenizer(VOCAB), num_query_tokens=queries)


def tiny_llama_text_config(layers: int = 3, width: int = 32, positions: int = 48) -> dict:
    """A Vicuna-like (LLaMA) language model's configuration: 4 query heads sharing 2 key/value heads (grouped)."""
    return dict(model_type="llama", vocab_size=len(BLIP2_VOCAB), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=positions, bos_token_id=VOCAB["[CLS]"], eos_token_id=VOCAB["[SEP]"],
                pad_token_id=0, initializer_range=0.3, tie_word_embeddings=False)


def tiny_instructblip(seed: int = 0, layers: int = 3, width: int = 32, image_size: int = 32, queries: int = 4,
                      cross_every: int = 2, language: str = "opt"):
    """A tiny InstructBlipForConditionalGeneration with an OPT (or, ``language="llama"``, a Vicuna-like) language
    model (random weights)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    base = tiny_blip2_config(layers=layers, width=width, image_size=image_size, queries=queries,
                             cross_every=cross_every)
    qformer = {**base.qformer_config.to_dict(), "vocab_size": len(VOCAB), "max_position_embeddings": 32}
    text = tiny_llama_text_config(layers, width) if language == "llama" else base.text_config.to_dict()
    config = InstructBlipConfig(vision_config=base.vision_config.to_dict(), qformer_config=qformer,
                                text_config=text, num_query_tokens=queries,
                                image_token_index=BLIP2_VOCAB["<image>"], initializer_range=0.3)
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():  # the learned queries start at zero: make them differ, as a trained model's do
        model.query_tokens.normal_(0, 1)
    return model.eval()


def tiny_t5_text_config(layers: int = 2, decoder_layers: int = 2, width: int = 32) -> dict:
    """A Flan-T5-like language model's configuration: gated GELU, untied head, relative positions (as many decoder as
    encoder layers: transformers 5.24's generate() fails on a T5 whose decoder has more)."""
    return dict(model_type="t5", vocab_size=len(BLIP2_VOCAB), d_model=width, d_kv=width // 4, d_ff=2 * width,
                num_layers=layers, num_decoder_layers=decoder_layers, num_heads=4, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=VOCAB["[SEP]"],
                relative_attention_num_buckets=8, relative_attention_max_distance=16, initializer_factor=1.5)


def tiny_blip2_t5(seed: int = 0, queries: int = 4, instruct: bool = False):
    """A tiny Blip2ForConditionalGeneration (or, with ``instruct``, InstructBLIP) with a Flan-T5-like language model."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
    )

    base = tiny_blip2_config(queries=queries)
    qformer = base.qformer_config.to_dict()
    if instruct:
        qformer.update(vocab_size=len(VOCAB), max_position_embeddings=32)
    config_class, model_class = ((InstructBlipConfig, InstructBlipForConditionalGeneration) if instruct
                                 else (Blip2Config, Blip2ForConditionalGeneration))
    config = config_class(vision_config=base.vision_config.to_dict(), qformer_config=qformer,
                          text_config=tiny_t5_text_config(), num_query_tokens=queries,
                          image_token_index=BLIP2_VOCAB["<image>"], initializer_range=0.3)
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        model.query_tokens.normal_(0, 1)
    return model.eval()
