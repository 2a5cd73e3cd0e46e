"""Train the bundled demo InstructBLIP on easy-VQA, starting from the demo BLIP-2 (seeded, 2 CPU cores, minutes).

    python scripts/train_demo_instructblip.py --out blip_trace_widgets/demo_instructblip

The result is a plain Hugging Face folder that loads with ``InstructBlipForConditionalGeneration.from_pretrained``
and ``InstructBlipProcessor.from_pretrained``, and answers with plain ``generate()`` on the processor's output for
the question itself, as InstructBLIP reads it: the Q-Former reads the question after its 8 queries (its own
tokenizer, with [CLS] and [SEP]), and the language model reads it after the projected queries.

InstructBLIP starts from a trained BLIP-2 and instruction-tunes it; so does this demo. Every module the two share is
copied from ``demo-blip2`` (the frozen ViT, the queries, the Q-Former's layers, the projection and the OPT language
model); what InstructBLIP adds is initialised from what is nearest: the Q-Former's word embeddings from the language
model's (the same vocabulary and width), the instruction tokens' feed-forward from the queries', and learned positions
from zero. Then every module but the ViT is trained on easy-VQA's training questions, the answer's tokens (then
[SEP]) given the queries and the question, with the BLIP-2 script's probe on the queries during training only.
Accuracy is measured separately by ``scripts/evaluate_demo_instructblip.py``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    BertTokenizer,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_blip2 as blip2  # noqa: E402  (the BLIP-2 demo's data, probe and image embeddings)

BLIP2_DEMO = Path(__file__).resolve().parent.parent / "blip_trace_widgets" / "demo_blip2"


def build(blip2_folder: Path) -> tuple[InstructBlipForConditionalGeneration, InstructBlipProcessor]:
    """The InstructBLIP demo before training: the BLIP-2 demo's modules, and InstructBLIP's own initialised."""
    source = Blip2ForConditionalGeneration.from_pretrained(blip2_folder)
    before = Blip2Processor.from_pretrained(blip2_folder)
    vocab = before.tokenizer.get_vocab()
    qformer_tokenizer = BertTokenizer(vocab=dict(sorted(vocab.items(), key=lambda kv: kv[1])), do_lower_case=True)
    processor = InstructBlipProcessor(image_processor=before.image_processor, tokenizer=before.tokenizer,
                                      qformer_tokenizer=qformer_tokenizer, num_query_tokens=source.config.num_query_tokens)
    config = source.config.to_dict()
    qformer = {**config["qformer_config"], "vocab_size": len(vocab), "max_position_embeddings": 64}
    model = InstructBlipForConditionalGeneration(InstructBlipConfig(
        vision_config=config["vision_config"], qformer_config=qformer, text_config=config["text_config"],
        num_query_tokens=config["num_query_tokens"], image_token_index=config["image_token_index"]))
    state = {("qformer.embeddings.layernorm" + k[len("qformer.layernorm"):] if k.startswith("qformer.layernorm")
              else k): v for k, v in source.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        for module in model.qformer.encoder.layer:  # the text feed-forward from the queries'
            module.intermediate.load_state_dict(module.intermediate_query.state_dict())
            module.output.load_state_dict(module.output_query.state_dict())
        model.qformer.embeddings.word_embeddings.weight.copy_(model.language_model.get_input_embeddings().weight)
        model.qformer.embeddings.position_embeddings.weight.zero_()
    new = {k for k in missing if not k.startswith(("qformer.embeddings.", "qformer.encoder.layer"))}
    assert not new, new
    return model, processor


def instruction_batch(tokenizer, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The Q-Former's instruction tokens, right-padded, and their attention mask."""
    encoded = tokenizer(questions, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def answer_loss(model, processor, embeds, questions, prompts, answers, probe=None, labels=None):
    """Teacher-forced cross-entropy of the answer's tokens and [SEP] after [queries, question], the Q-Former reading
    the question too (its padding masked), plus the probe's."""
    ids, mask = instruction_batch(processor.qformer_tokenizer, questions)
    query = model.query_tokens.expand(embeds.shape[0], -1, -1)
    full = torch.cat([torch.ones(query.shape[:2], dtype=mask.dtype), mask], 1)
    states = model.qformer(input_ids=ids, attention_mask=full, query_embeds=query,
                           encoder_hidden_states=embeds).last_hidden_state[:, : query.shape[1]]
    aux = blip2.probe_loss(probe, states, labels) if probe is not None else 0.0
    image = model.language_projection(states)
    tokenizer = processor.tokenizer
    rows = [p + a + [tokenizer.sep_token_id] for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    text = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        text[i, : len(r)] = torch.tensor(r)
        targets[i, len(p) - 1: len(r) - 1] = torch.tensor(r[len(p):])
    embeds_text = model.language_model.get_input_embeddings()(text)
    logits = model.language_model(inputs_embeds=torch.cat([image, embeds_text], 1)).logits[:, image.shape[1]:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100) + aux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("blip_trace_widgets/demo_instructblip"))
    parser.add_argument("--blip2", type=Path, default=BLIP2_DEMO)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()
    model, processor = build(args.blip2)
    model.vision_model.requires_grad_(False)
    texts = __import__("easy_vqa").get_train_questions()[0]
    pixels, _, answer_ids, image_rows, _, answer_texts = blip2.load_split("train", processor)
    prompts = [processor.tokenizer(t)["input_ids"] for t in texts]  # the question itself: [CLS] and its tokens
    labels = blip2.image_labels(answer_texts, image_rows, pixels.shape[0])
    probe = torch.nn.Linear(model.config.qformer_config.hidden_size, len(blip2.SHAPES) + len(blip2.COLORS))
    embeds = blip2.image_embeddings(model.eval(), pixels)
    print(f"image embeddings {tuple(embeds.shape)} in {time.time() - started:.0f} s", flush=True)
    trained = [p for n, p in model.named_parameters() if not n.startswith("vision_model.")] + list(probe.parameters())
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.05)
    steps_per_epoch = len(prompts) // args.batch
    total = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(args.seed)
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
            loss = answer_loss(model, processor, images, [texts[q] for q in batch], [prompts[q] for q in batch],
                               [answer_ids[q] for q in batch], probe, labels[[image_rows[q] for q in batch]])
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
    model.half().save_pretrained(args.out)  # float16 on disk: the package's model data stay within 40 MB
    processor.save_pretrained(args.out)
    info = {"command": "python scripts/train_demo_instructblip.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "blip2")),
            "started_from": "demo-blip2", "train_minutes": round((time.time() - started) / 60, 2),
            "torch": torch.__version__, "log": log}
    (args.out / "training_log.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {args.out} in {info['train_minutes']} min")


if __name__ == "__main__":
    main()
