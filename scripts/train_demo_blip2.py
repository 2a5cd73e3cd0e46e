"""Train the bundled demo BLIP-2 on easy-VQA (seeded, 2 CPU cores, minutes).

    python scripts/train_demo_blip2.py --out blip_trace_widgets/demo_blip2

The result is a plain Hugging Face folder that loads with ``Blip2ForConditionalGeneration.from_pretrained`` and
``Blip2Processor.from_pretrained``, and answers with plain ``generate()`` on the processor's output for
"Question: {q} Answer:". It keeps BLIP-2's architecture at toy sizes: a ViT, a Q-Former whose 8 learned queries
cross-attend to the image every other layer, a projection, and an OPT decoder.

As BLIP-2 keeps a pretrained image encoder frozen, this one takes the bundled BLIP demo's ViT (itself trained from
scratch on easy-VQA by ``scripts/train_demo_model.py``) and freezes it; the Q-Former, the projection and the language
model are trained from scratch. BLIP-2 trains its Q-Former first with contrastive, matching and captioning losses;
here there is one stage: the answer's tokens (then [SEP]) given the queries and the prompt, plus, during training
only, a linear probe on the queries' mean output that predicts the image's shape and colour (as the BLIP demo's
script does on its ViT).
Accuracy is measured separately by ``scripts/evaluate_demo_blip2.py``.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import easy_vqa
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipForQuestionAnswering,
    BlipImageProcessor,
)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PROMPT = "Question: {} Answer:"  # BLIP-2's VQA prompt for OPT
SHAPES = ["circle", "rectangle", "triangle"]
COLORS = ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"]
IMAGE_SIZE = 64
BLIP_DEMO = Path(__file__).resolve().parent.parent / "blip_trace_widgets" / "demo_model"


def build_vocab() -> dict[str, int]:
    """WordPiece vocabulary: BERT's specials, then every word of the training questions, the answers and the prompt."""
    texts, _, _ = easy_vqa.get_train_questions()
    words: set[str] = set(easy_vqa.get_answers()) | {"question", "answer", ":"}
    for text in texts:
        words.update(re.findall(r"[a-z]+|[^\sa-z]", text.lower()))
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(words))}


def build_processor(vocab: dict[str, int], queries: int) -> Blip2Processor:
    """A Blip2Processor whose tokenizer starts a text with [CLS] and adds no [SEP] (as OPT's starts with </s> and
    ends with nothing): a prompt then reads as the language model was trained on it. The tokenizer is BERT's
    WordPiece with that template, saved whole in tokenizer.json (a BertTokenizer would rebuild BERT's template)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = BertTokenizer(vocab=vocab, do_lower_case=True).backend_tokenizer
    backend.post_processor = TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B",
                                                special_tokens=[("[CLS]", vocab["[CLS]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", bos_token="[CLS]",
                                        eos_token="[SEP]")
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=queries)
    ids = processor.tokenizer(PROMPT.format("what color is the shape?"))["input_ids"]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "question", ":", "what", "color", "is", "the", "shape", "?", "answer", ":"], tokens
    return processor


def build_config(processor: Blip2Processor, vision: dict, queries: int, layers: int, width: int,
                 lm_layers: int) -> Blip2Config:
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    qformer = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * width,
                   encoder_hidden_size=vision["hidden_size"], cross_attention_frequency=2, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, vocab_size=len(tokenizer))
    text = dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=lm_layers,
                num_attention_heads=4, ffn_dim=4 * width, max_position_embeddings=64, word_embed_proj_dim=width,
                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id, dropout=0.0, attention_dropout=0.0, do_layer_norm_before=True)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=queries,
                       image_token_index=image_token)


def copy_blip_vision(model: Blip2ForConditionalGeneration) -> None:
    """Copy the BLIP demo's ViT into ``model`` (the same module names and shapes: BLIP-2's ViT is BLIP's)."""
    blip = BlipForQuestionAnswering.from_pretrained(BLIP_DEMO)
    missing, unexpected = model.vision_model.load_state_dict(blip.vision_model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)


def vision_config() -> dict:
    blip = json.loads((BLIP_DEMO / "config.json").read_text())["vision_config"]
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
            "layer_norm_eps", "hidden_act")
    return {**{k: blip[k] for k in keys}, "qkv_bias": True, "attention_dropout": 0.0}


def load_split(split: str, processor: Blip2Processor):
    texts, answers, image_ids = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    order = sorted(paths)
    index = {image_id: i for i, image_id in enumerate(order)}
    pixels = []
    for start in range(0, len(order), 500):
        images = [Image.open(paths[i]).convert("RGB") for i in order[start: start + 500]]
        pixels.append(processor.image_processor(images, return_tensors="pt")["pixel_values"])
    tokenizer = processor.tokenizer
    prompts = [tokenizer(PROMPT.format(t))["input_ids"] for t in texts]
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    return torch.cat(pixels), prompts, answer_ids, [index[i] for i in image_ids], texts, answers


@torch.no_grad()
def image_embeddings(model: Blip2ForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen ViT's output for every image and its mirror image: [2, N, P, D] (flips change no shape or colour)."""
    out = []
    for batch in (pixels, pixels.flip(3)):
        out.append(torch.cat([model.vision_model(pixel_values=batch[i: i + 250]).last_hidden_state
                              for i in range(0, len(batch), 250)]))
    return torch.stack(out)


def image_labels(answers: list[str], image_rows: list[int], n_images: int) -> torch.Tensor:
    """Per training image, its shape and colour index (-100 where no question reveals it), as the BLIP demo's."""
    labels = torch.full((n_images, 2), -100, dtype=torch.long)
    for answer, row in zip(answers, image_rows):
        if answer in SHAPES:
            labels[row, 0] = SHAPES.index(answer)
        elif answer in COLORS:
            labels[row, 1] = COLORS.index(answer)
    return labels


def probe_loss(probe, states, labels):
    """A linear probe on the mean of the Q-Former's outputs predicts the image's shape and colour: during training
    only (it is not saved), a direct signal that the queries carry what the questions ask, in the spirit of BLIP-2's
    first stage, which trains the Q-Former to represent the image before any language model reads it."""
    logits = probe(states.mean(1))
    return (F.cross_entropy(logits[:, : len(SHAPES)], labels[:, 0], ignore_index=-100)
            + F.cross_entropy(logits[:, len(SHAPES):], labels[:, 1], ignore_index=-100))


def answer_loss(model, embeds, prompts, answers, sep, pad, probe=None, labels=None):
    """Teacher-forced cross-entropy of the answer's tokens and [SEP] after [queries, prompt] (right-padded: the
    decoder is causal, so padding after a row's end changes none of its scored positions), plus the probe's."""
    query = model.query_tokens.expand(embeds.shape[0], -1, -1)
    states = model.qformer(query_embeds=query, encoder_hidden_states=embeds).last_hidden_state
    aux = probe_loss(probe, states, labels) if probe is not None else 0.0
    image = model.language_projection(states)
    rows = [p + a + [sep] for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, : len(r)] = torch.tensor(r)
        targets[i, len(p) - 1: len(r) - 1] = torch.tensor(r[len(p):])  # position t predicts token t + 1
    embeds_text = model.language_model.get_input_embeddings()(ids)
    logits = model.language_model(inputs_embeds=torch.cat([image, embeds_text], 1)).logits[:, image.shape[1]:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100) + aux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("blip_trace_widgets/demo_blip2"))
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4, help="Q-Former layers")
    parser.add_argument("--lm-layers", type=int, default=6, help="language-model layers")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()

    processor = build_processor(build_vocab(), args.queries)
    config = build_config(processor, vision_config(), args.queries, args.layers, args.width, args.lm_layers)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # BLIP-2 starts its queries from a normal distribution (its init_std is 0.02)
        model.query_tokens.normal_(0, config.qformer_config.initializer_range)
    copy_blip_vision(model)
    model.vision_model.requires_grad_(False)
    pixels, prompts, answer_ids, image_rows, _, answer_texts = load_split("train", processor)
    labels = image_labels(answer_texts, image_rows, pixels.shape[0])
    probe = torch.nn.Linear(args.width, len(SHAPES) + len(COLORS))
    embeds = image_embeddings(model.eval(), pixels)
    print(f"image embeddings {tuple(embeds.shape)} in {time.time() - started:.0f} s", flush=True)
    trained = [p for n, p in model.named_parameters() if not n.startswith("vision_model.")] + list(probe.parameters())
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.05)
    steps_per_epoch = len(prompts) // args.batch
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch // 2
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(args.seed)
    tokenizer = processor.tokenizer
    log = []
    model.train()
    model.vision_model.eval()
    for epoch in range(args.epochs):
        order = torch.randperm(len(prompts), generator=generator).tolist()
        flips = torch.randint(0, 2, (len(prompts),), generator=generator).tolist()
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * args.batch: (step + 1) * args.batch]
            images = embeds[[flips[q] for q in batch], [image_rows[q] for q in batch]]
            loss = answer_loss(model, images, [prompts[q] for q in batch], [answer_ids[q] for q in batch],
                               tokenizer.sep_token_id, tokenizer.pad_token_id, probe,
                               labels[[image_rows[q] for q in batch]])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "minutes": (time.time() - started) / 60}
        log.append(entry)
        print(json.dumps(entry), flush=True)

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    reread = Blip2Processor.from_pretrained(args.out).tokenizer(PROMPT.format("what color is the shape?"))["input_ids"]
    assert reread == processor.tokenizer(PROMPT.format("what color is the shape?"))["input_ids"], "the tokenizer changed"
    info = {
        "command": "python scripts/train_demo_blip2.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "train_minutes": round((time.time() - started) / 60, 2),
        "torch": torch.__version__,
        "log": log,
    }
    (args.out / "training_log.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {args.out} in {info['train_minutes']} min")


if __name__ == "__main__":
    main()
