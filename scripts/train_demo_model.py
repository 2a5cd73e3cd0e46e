"""Train the bundled demo BLIP on easy-VQA (seeded, 2 CPU cores, under 30 minutes).

    python scripts/train_demo_model.py --out blip_trace_widgets/demo_model

The result is a plain Hugging Face folder (config.json, model.safetensors and the
processor files) that loads with ``BlipForQuestionAnswering.from_pretrained``.
It keeps BLIP's architecture with small widths: a toy for learning the tool, not BLIP.
Accuracy is measured separately by ``scripts/evaluate_demo_model.py``.
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
    BlipConfig,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
)

from blip_trace_widgets.core.portable import save_portable

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
SHAPES = ["circle", "rectangle", "triangle"]
COLORS = ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"]
IMAGE_SIZE = 64
PATCH_SIZE = 8


def build_vocab() -> dict[str, int]:
    """WordPiece vocabulary: BERT's specials, then every word of the training questions and answers."""
    texts, answers, _ = easy_vqa.get_train_questions()
    words: set[str] = set(easy_vqa.get_answers())
    for text in texts:
        words.update(re.findall(r"[a-z]+|[^\sa-z]", text.lower()))
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(words))}


def build_processor(vocab: dict[str, int]) -> BlipProcessor:
    # transformers 5 ignores vocab_file=; the vocabulary must be passed as vocab=.
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    sample = "what color is the shape?"
    ids = tokenizer(sample)["input_ids"]
    assert tokenizer.unk_token_id not in ids, "tokenizer lost its vocabulary"
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "what", "color", "is", "the", "shape", "?", "[SEP]"]
    return processor


def build_config(vocab: dict[str, int], layers: int, width: int) -> BlipConfig:
    text = dict(
        vocab_size=len(vocab),
        hidden_size=width,
        encoder_hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=vocab["[DEC]"],
        pad_token_id=vocab["[PAD]"],
        sep_token_id=vocab["[SEP]"],
        eos_token_id=vocab["[SEP]"],
    )
    vision = dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        initializer_range=0.02,
    )
    return BlipConfig(text_config=text, vision_config=vision)


def load_split(split: str, processor: BlipProcessor):
    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    order = sorted(paths)
    index = {image_id: i for i, image_id in enumerate(order)}
    pixels = []
    for start in range(0, len(order), 500):
        images = [Image.open(paths[i]).convert("RGB") for i in order[start : start + 500]]
        pixels.append(processor.image_processor(images, return_tensors="pt")["pixel_values"])
    pixel_values = torch.cat(pixels)
    tok = processor.tokenizer
    questions = [tok(t)["input_ids"] for t in texts]
    answer_ids = [tok.convert_tokens_to_ids(a) for a in answers]
    image_rows = [index[i] for i in image_ids]
    return pixel_values, questions, answer_ids, image_rows, texts, answers


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips: they change neither a shape's kind nor its colour."""
    flip = torch.rand(pixels.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], pixels.flip(3), pixels)


def pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return ids, mask


def image_labels(answers: list[str], image_rows: list[int], n_images: int) -> torch.Tensor:
    """Per training image, its shape and colour index (-100 where no question reveals it)."""
    labels = torch.full((n_images, 2), -100, dtype=torch.long)
    for answer, row in zip(answers, image_rows):
        if answer in SHAPES:
            labels[row, 0] = SHAPES.index(answer)
        elif answer in COLORS:
            labels[row, 1] = COLORS.index(answer)
    return labels


def answer_loss(model, config, pixel_values, input_ids, attention_mask, answer_ids, image_rows, probe=None, labels=None):
    """Teacher-forced loss of ``[DEC] answer [SEP]``, with one vision pass per image.

    With ``probe`` (a linear layer on the mean image embedding, used only during training
    and not saved), the vision encoder also gets a direct shape-and-colour signal, which
    lets a ViT trained from scratch learn shapes within the time budget.
    """
    per_image = model.vision_model(pixel_values=pixel_values).last_hidden_state
    aux = 0.0
    if probe is not None:
        logits = probe(per_image.mean(1))
        aux = F.cross_entropy(logits[:, : len(SHAPES)], labels[:, 0], ignore_index=-100) + F.cross_entropy(
            logits[:, len(SHAPES) :], labels[:, 1], ignore_index=-100
        )
    image_embeds = per_image[image_rows]
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    question = model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
    ).last_hidden_state
    tc = config.text_config
    dec = torch.stack(
        [torch.full_like(answer_ids, tc.bos_token_id), answer_ids, torch.full_like(answer_ids, tc.sep_token_id)], 1
    )
    logits = model.text_decoder(
        input_ids=dec, encoder_hidden_states=question, encoder_attention_mask=attention_mask
    ).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), dec[:, 1:].reshape(-1)) + aux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("blip_trace_widgets/demo_model"))
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--images-per-step", type=int, default=128)
    parser.add_argument("--questions-per-image", type=int, default=4,
                        help="questions drawn per image and step (0: all of them)")
    parser.add_argument("--layers", type=int, default=4)
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

    vocab = build_vocab()
    processor = build_processor(vocab)
    config = build_config(vocab, args.layers, args.width)
    model = BlipForQuestionAnswering(config)
    pixel_values, questions, answer_ids, image_rows, _, answer_texts = load_split("train", processor)
    labels = image_labels(answer_texts, image_rows, pixel_values.shape[0])
    probe = torch.nn.Linear(args.width, len(SHAPES) + len(COLORS))
    by_image: dict[int, list[int]] = {}
    for q, row in enumerate(image_rows):
        by_image.setdefault(row, []).append(q)
    n_images = pixel_values.shape[0]
    steps_per_epoch = n_images // args.images_per_step
    total_steps = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=args.lr, weight_decay=0.05)
    warmup = steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, total_steps) / total_steps)),
    )
    generator = torch.Generator().manual_seed(args.seed)
    pad_id = vocab["[PAD]"]
    log = []
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(n_images, generator=generator).tolist()
        losses = []
        for step in range(steps_per_epoch):
            images = perm[step * args.images_per_step : (step + 1) * args.images_per_step]
            rows, qs = [], []
            for local, image in enumerate(images):
                pool = by_image.get(image, [])
                if args.questions_per_image and len(pool) > args.questions_per_image:
                    picks = torch.randperm(len(pool), generator=generator)[: args.questions_per_image]
                    pool = [pool[int(i)] for i in picks]
                for q in pool:
                    rows.append(local)
                    qs.append(q)
            input_ids, mask = pad([questions[q] for q in qs], pad_id)
            answers = torch.tensor([answer_ids[q] for q in qs])
            loss = answer_loss(
                model, config, augment(pixel_values[images], generator), input_ids, mask, answers, torch.tensor(rows),
                probe, labels[images],
            )
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "minutes": (time.time() - started) / 60}
        log.append(entry)
        print(json.dumps(entry), flush=True)

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    save_portable(model, processor, args.out)  # readable by transformers 4.4x and 5.x
    info = {
        "command": "python scripts/train_demo_model.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
        ),
        "train_minutes": round((time.time() - started) / 60, 2),
        "torch": torch.__version__,
        "log": log,
    }
    (args.out / "training_log.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {args.out} in {info['train_minutes']} min")


if __name__ == "__main__":
    main()
