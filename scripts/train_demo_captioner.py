"""Train the bundled demo captioner and image-text matcher on easy-VQA (seeded, 2 CPU cores).

    python scripts/train_demo_captioner.py

Writes two plain Hugging Face folders next to the VQA demo model:
``blip_trace_widgets/demo_caption`` (a ``BlipForConditionalGeneration``) and
``blip_trace_widgets/demo_itm`` (a ``BlipForImageTextRetrieval``). Both start from the VQA
demo model's vision encoder and tokenizer and are trained together, sharing one vision
encoder, on the captions :func:`blip_trace_widgets.datasets.easy_vqa.easy_vqa_captions` builds from the
dataset's own questions ("a red circle"). Weights are stored in float16 to keep the package
small; load them in float32. Accuracy is measured by ``scripts/evaluate_demo_captioner.py``.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipProcessor,
)

from blip_trace_widgets.core.portable import save_portable
from blip_trace_widgets.datasets.easy_vqa import COLORS, SHAPES, easy_vqa_captions
from blip_trace_widgets.models.loading import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1] / "blip_trace_widgets"


def load_images(processor: BlipProcessor, split: str) -> tuple[torch.Tensor, list[str]]:
    pairs = easy_vqa_captions(split)
    pixels = []
    for start in range(0, len(pairs), 500):
        images = [Image.open(path).convert("RGB") for path, _ in pairs[start : start + 500]]
        pixels.append(processor.image_processor(images, return_tensors="pt")["pixel_values"])
    return torch.cat(pixels), [caption for _, caption in pairs]


def mismatch(caption: str, generator: torch.Generator) -> str:
    """A caption that differs from ``caption`` in its colour, its shape, or both (a hard negative)."""
    _, color, shape = caption.split()
    change = int(torch.randint(3, (1,), generator=generator))
    if change in (0, 2):
        color = [c for c in COLORS if c != color][int(torch.randint(len(COLORS) - 1, (1,), generator=generator))]
    if change in (1, 2):
        shape = [s for s in SHAPES if s != shape][int(torch.randint(len(SHAPES) - 1, (1,), generator=generator))]
    return f"a {color} {shape}"


def tokens(processor: BlipProcessor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = processor.tokenizer(captions, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def losses(captioner, matcher, config, pixels, captions, processor, generator):
    """Caption loss (teacher-forced ``[DEC] caption [SEP]``, as ``generate()`` starts), ITM loss on
    matched and hard mismatched pairs, and ITC loss (captions that are equal count as matches)."""
    image = captioner.vision_model(pixel_values=pixels).last_hidden_state
    image_mask = torch.ones(image.shape[:2], dtype=torch.long)
    ids, mask = tokens(processor, captions)
    dec = ids.clone()
    dec[:, 0] = config.text_config.bos_token_id
    logits = captioner.text_decoder(input_ids=dec, attention_mask=mask, encoder_hidden_states=image,
                                    encoder_attention_mask=image_mask).logits
    targets = dec[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    caption_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    wrong = [mismatch(c, generator) for c in captions]
    both_ids, both_mask = tokens(processor, captions + wrong)
    both_image = torch.cat([image, image])
    states = matcher.text_encoder(input_ids=both_ids, attention_mask=both_mask, encoder_hidden_states=both_image,
                                  encoder_attention_mask=torch.cat([image_mask, image_mask])).last_hidden_state
    labels = torch.cat([torch.ones(len(captions)), torch.zeros(len(captions))]).long()
    itm_loss = F.cross_entropy(matcher.itm_head(states[:, 0]), labels)

    text = matcher.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    image_feat = F.normalize(matcher.vision_proj(image[:, 0]), dim=-1)
    text_feat = F.normalize(matcher.text_proj(text[:, 0]), dim=-1)
    similarity = image_feat @ text_feat.t() / 0.07
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float)
    same = same / same.sum(1, keepdim=True)
    itc_loss = -(same * similarity.log_softmax(1)).sum(1).mean() - (same * similarity.t().log_softmax(1)).sum(1).mean()
    return caption_loss, itm_loss, itc_loss


def build(config: BlipConfig, vqa: BlipForQuestionAnswering):
    captioner = BlipForConditionalGeneration(config)
    matcher = BlipForImageTextRetrieval(config)
    captioner.vision_model.load_state_dict(vqa.vision_model.state_dict())
    matcher.vision_model = captioner.vision_model  # one vision encoder while training; saved in both
    # the VQA model's text layers are a good start: same vocabulary, same widths
    captioner.text_decoder.load_state_dict(vqa.text_decoder.state_dict())
    matcher.text_encoder.load_state_dict(vqa.text_encoder.state_dict(), strict=False)
    return captioner, matcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caption-out", type=Path, default=ROOT / "demo_caption")
    parser.add_argument("--itm-out", type=Path, default=ROOT / "demo_itm")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()

    vqa = BlipForQuestionAnswering.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    processor = BlipProcessor.from_pretrained(DEMO_MODEL_DIR)
    config = BlipConfig.from_dict({**vqa.config.to_dict(), "architectures": None})
    config.image_text_hidden_size = 64
    captioner, matcher = build(config, vqa)
    pixels, captions = load_images(processor, "train")
    parameters = list({id(p): p for p in [*captioner.parameters(), *matcher.parameters()]}.values())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.05)
    steps_per_epoch = len(captions) // args.batch
    total = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(args.seed)
    log = []
    captioner.train()
    matcher.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(captions), generator=generator).tolist()
        sums = np.zeros(3)
        for step in range(steps_per_epoch):
            rows = order[step * args.batch : (step + 1) * args.batch]
            batch = pixels[rows]
            flip = torch.rand(len(rows), generator=generator) < 0.5  # flips keep colour and shape
            batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
            parts = losses(captioner, matcher, config, batch, [captions[r] for r in rows], processor, generator)
            loss = sum(parts)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            sums += [p.item() for p in parts]
        entry = {"epoch": epoch + 1, **dict(zip(("caption", "itm", "itc"), (sums / steps_per_epoch).round(4).tolist())),
                 "minutes": round((time.time() - started) / 60, 2)}
        log.append(entry)
        print(json.dumps(entry), flush=True)

    command = "python scripts/train_demo_captioner.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not k.endswith("_out"))
    for model, out, architecture in ((captioner, args.caption_out, "BlipForConditionalGeneration"),
                                     (matcher, args.itm_out, "BlipForImageTextRetrieval")):
        model.eval()
        model.config.architectures = [architecture]
        out.mkdir(parents=True, exist_ok=True)
        save_portable(model.half(), processor, out)  # float16 on disk: the package's model data stays under 25 MB
        model.float()
        info = {"command": command, "train_minutes": round((time.time() - started) / 60, 2),
                "torch": torch.__version__, "log": log}
        (out / "training_log.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"saved {architecture} to {out}")


if __name__ == "__main__":
    main()
