"""The contrastive task: SDXL's two text encoders pre-trained from scratch, for the bundled default model.

SDXL's text encoders are CLIP's (Radford et al. 2021, Sec. 2.3 and Fig. 3: L2-normalised image and text embeddings,
cosine similarity times a learned temperature, symmetric cross-entropy over the batch).  None can be downloaded
here, so the default model trains its own on the captioned emoji: both encoders jointly against one small image
tower (`ImageTower`, strided convolutions, then a linear map of the flattened 4 x 4 map, so a glyph's position is
kept for captions like "at the top left"); each encoder has its own joint space and temperature (the bigG-like one
through its own `text_projection`, the vector SDXL feeds the UNet; the CLIP-L-like one, without a projection in
SDXL, through a throw-away head); captions shared by several images of a batch are all positives (soft targets).
The tower and heads are kept in `final/clip_evaluator.safetensors`: the project's prompt-following measure
(`retrieval_accuracy` of a caption among distractors) on the held-out captions (`xldm.train.data.is_heldout`: ~3 %
of the emoji names, never trained on).  `xldm train --preset default-clip --data EMOJI_DIR --out RUN_DIR` (task
"clip", one process) also exports `final/model.safetensors` (the text encoders alone, SDXL base single-file
layout) and `final/metrics.json`.  The batches are pure functions of (seed, step) (`ContrastiveBatches`)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xldm.config import ModelConfig, TextEncoderConfig
from xldm.models.clip import CLIPTextModel
from xldm.train.config import TEXT_MODELS, TrainConfig
from xldm.train.parallel import Processes
from xldm.train.run import Run, StepResult, make_optimizer, update

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100 (Radford et al. 2021, Sec. 2.5)
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07 (same section)
EVAL_DISTRACTORS = 15  # retrieval among 16 captions: chance = 1/16


@dataclass(frozen=True)
class ImageTowerConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 128)  # one stride-2 stage each: 64 -> 4 px
    features: int = 256


class ImageTower(nn.Module):
    """Conv(3x3, stride 2) + GroupNorm + SiLU stages down to a 4 x 4 map, then a linear map of the flattened map."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for out in cfg.channels:
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            width = out
        self.convs = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.fc = nn.Linear(width * side * side, cfg.features)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(pixels).flatten(1))


class PooledText(NamedTuple):
    pooled: torch.Tensor  # (B, projection_dim or width)


class BagOfWords(nn.Module):
    """The static-embedding alternative to a CLIP text encoder (`TrainConfig.text_model` "bag-of-words"), measured
    against it on held-out retrieval: the mean of learned token embeddings between BOS and the first EOS, layer
    norm, then a linear map to the encoder's output width.  No attention and no word order: what a caption's
    words alone carry."""

    def __init__(self, te: TextEncoderConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(te.vocab_size, te.width)
        self.norm = nn.LayerNorm(te.width)
        self.projection = nn.Linear(te.width, te.projection_dim or te.width, bias=False)

    def forward(self, ids: torch.Tensor) -> PooledText:
        positions = torch.arange(ids.shape[1], device=ids.device)
        eos = ids.argmax(dim=1, keepdim=True)  # EOS 49407 is the largest CLIP id; the first one wins
        words = ((positions >= 1) & (positions < eos)).unsqueeze(-1).to(self.embedding.weight.dtype)
        mean = (self.embedding(ids) * words).sum(dim=1) / words.sum(dim=1).clamp(min=1.0)
        return PooledText(self.projection(self.norm(mean)))


# TrainConfig.text_model's names (validated there, xldm.train.config.TEXT_MODELS), in that order
TEXT_MODEL_CLASSES = dict(zip(TEXT_MODELS, (CLIPTextModel, BagOfWords), strict=True))


class ContrastiveModel(nn.Module):
    """The text encoders, the image tower and the heads that map both into one joint space per encoder."""

    def __init__(self, encoders: tuple[TextEncoderConfig, ...], tower: ImageTowerConfig = ImageTowerConfig(),
                 text_model: str = "transformer") -> None:
        super().__init__()
        self.encoder_configs = encoders
        self.tower_config = tower
        self.text_model = text_model
        dim = encoders[-1].projection_dim or encoders[-1].width  # the joint spaces: the bigG-like encoder's width
        self.text_encoders = nn.ModuleList(TEXT_MODEL_CLASSES[text_model](te) for te in encoders)
        # An encoder with its own projection of the right width (bigG) uses it; others get a head (discarded).
        self.text_heads = nn.ModuleList(
            nn.Identity() if te.projection_dim == dim else nn.Linear(te.projection_dim or te.width, dim, bias=False)
            for te in encoders)
        self.image_tower = ImageTower(tower)
        self.image_heads = nn.ModuleList(nn.Linear(tower.features, dim, bias=False) for _ in encoders)
        self.logit_scales = nn.Parameter(torch.full((len(encoders),), INIT_LOGIT_SCALE))

    def encode_images(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) in [-1, 1] -> one (B, dim) unit vector per encoder's joint space."""
        features = self.image_tower(pixels)
        return [F.normalize(head(features), dim=-1) for head in self.image_heads]

    def encode_texts(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """One (B, L) id tensor per encoder -> one (B, dim) unit vector per encoder (pooled output, then head)."""
        return [F.normalize(head(encoder(x).pooled), dim=-1)
                for encoder, head, x in zip(self.text_encoders, self.text_heads, ids)]


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3), with every row of the same caption a positive.
    image, text: (B, D) unit vectors of the same B pairs; caption_ids: (B,) ids, equal for equal captions."""
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * image @ text.t()
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    loss_images = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_texts = -(targets * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_images + loss_texts)


def retrieval_accuracy(similarity: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor | None = None) -> float:
    """Top-1 accuracy of picking each image's caption.  similarity: (N images, M captions); targets: (N,) the right
    caption of each image; candidates: optional (N, K) caption indices each image chooses among (its target
    included); None = all M captions.  A tie counts as a miss unless the target is the first of the tied candidates."""
    if candidates is None:
        candidates = torch.arange(similarity.shape[1]).expand(similarity.shape[0], -1)
    scores = similarity.gather(1, candidates)
    chosen = candidates.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
    return float((chosen == targets).float().mean())


def distractor_candidates(targets: torch.Tensor, num_captions: int, distractors: int, seed: int) -> torch.Tensor:
    """(N, 1 + distractors) caption indices: the target first, then distinct random other captions."""
    generator = torch.Generator().manual_seed(seed)
    k = min(distractors, num_captions - 1)
    rows = []
    for target in targets.tolist():
        others = torch.randperm(num_captions - 1, generator=generator)[:k]
        others = others + (others >= target).long()  # skip the target
        rows.append(torch.cat([torch.tensor([target]), others]))
    return torch.stack(rows)


@dataclass
class CaptionedImages:
    """Images as (N, 3, S, S) uint8 (padded to square with white, then resized), with caption indices."""

    pixels: torch.Tensor
    caption_index: torch.Tensor  # (N,) into `captions`
    captions: list[str]


def letterbox(image, size: int) -> np.ndarray:
    """An RGB image centred on a white square of its longer side, Lanczos-resized to size x size: (S, S, 3) uint8."""
    from PIL import Image

    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS))


def load_images(folder: str | os.PathLike, size: int, cache: Path | None = None) -> tuple[torch.Tensor, list[str]]:
    """Every captioned image of a folder (xldm.train.data.FolderSource), letterboxed onto white and resized to
    size x size; cached as .npy next to the run when `cache` is given (keyed by the folder's fingerprint, with
    the captions of the images kept).  An image that does not decode is left out with its caption, and a warning
    names how many and which (as the UNet loop's skipped.txt does); none decoding is an error."""
    import warnings

    from xldm.train.data import FolderSource, SkipSample, decode_image

    source = FolderSource(folder)
    if cache is not None:
        path = cache / f"images_{size}_{source.fingerprint}.npy"
        kept_path = path.with_suffix(".captions.json")
        if path.exists() and kept_path.exists():
            return torch.from_numpy(np.load(path)), json.loads(kept_path.read_text())
    arrays, captions = [], []
    skipped = [f"{key}: {reason}" for reason, keys in sorted(source.skipped.items()) for key in sorted(keys)]
    for sample in source.samples:
        try:
            image = decode_image(sample.path)
        except SkipSample as e:
            skipped.append(f"{sample.key}: {e.reason}")
            continue
        arrays.append(letterbox(image, size))
        captions.append(sample.caption)
    total = len(arrays) + len(skipped)
    if not arrays:
        raise ValueError(f"{folder}: none of its {total} images decodes ({'; '.join(skipped[:3])})")
    if skipped:
        warnings.warn(f"{folder}: {len(skipped)} of {total} images are left out (no caption, or they do not "
                      f"decode): "
                      f"{'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}", RuntimeWarning, stacklevel=2)
    pixels = np.stack(arrays).transpose(0, 3, 1, 2).copy()
    if cache is not None:
        from xldm.weights.io import atomic_write

        cache.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:  # (np.save to a path would append ".npy")
            np.save(f, pixels)
        with atomic_write(kept_path) as tmp:
            Path(tmp).write_text(json.dumps(captions))
    return torch.from_numpy(pixels), captions


def split_heldout(pixels: torch.Tensor, captions: list[str]) -> tuple[CaptionedImages, CaptionedImages]:
    """(training part, held-out part) by `xldm.train.data.is_heldout`."""
    from xldm.train.data import is_heldout

    def part(keep: list[int]) -> CaptionedImages:
        texts = sorted({captions[i] for i in keep})
        index = {t: j for j, t in enumerate(texts)}
        return CaptionedImages(pixels[keep], torch.tensor([index[captions[i]] for i in keep], dtype=torch.long),
                               texts)

    held = [is_heldout(c) for c in captions]
    return part([i for i, h in enumerate(held) if not h]), part([i for i, h in enumerate(held) if h])


def tokenize_captions(captions: list[str], encoders: tuple[TextEncoderConfig, ...]) -> list[torch.Tensor]:
    from xldm.tokenizer import CLIPTokenizer

    return [CLIPTokenizer.for_encoder(te)(captions) for te in encoders]


def trim_ids(ids: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns after the last EOS of the batch: with causal attention the pooled (EOS) output
    never sees later positions, so this is exact for the pooled vector and saves most of the 77 positions."""
    return ids[:, :int(ids.argmax(dim=1).max()) + 1]


def batch_indices(num: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Rows of (1-based) `step`: epoch e is a permutation seeded by (seed, e), cut into full batches."""
    per_epoch = num // batch_size
    if per_epoch < 1:
        raise ValueError(f"{num} training images cannot fill one batch of {batch_size}")
    epoch, position = divmod(step - 1, per_epoch)
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[position * batch_size:(position + 1) * batch_size]


def augment(pixels: torch.Tensor, seed: int, step: int, shift: int = 4) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [-1, 1], each image moved by up to `shift` px on white (seeded by step)."""
    generator = torch.Generator().manual_seed(seed * 7_919 + step)
    size = pixels.shape[-1]
    padded = F.pad(pixels.float(), (shift,) * 4, value=255.0)
    offsets = torch.randint(0, 2 * shift + 1, (pixels.shape[0], 2), generator=generator).tolist()
    moved = torch.stack([padded[i, :, t:t + size, l:l + size] for i, (t, l) in enumerate(offsets)])
    return moved / 127.5 - 1.0


@torch.no_grad()
def embed(model: ContrastiveModel, data: CaptionedImages, device: torch.device,
          batch_size: int = 256) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(image embeddings, caption embeddings), one (N, D) / (M, D) tensor per encoder."""
    model.eval()
    ids = tokenize_captions(data.captions, model.encoder_configs)
    images = [[e.cpu() for e in model.encode_images(data.pixels[i:i + batch_size].to(device).float() / 127.5 - 1.0)]
              for i in range(0, len(data.pixels), batch_size)]
    texts = [[e.cpu() for e in model.encode_texts([trim_ids(x[i:i + batch_size]).to(device) for x in ids])]
             for i in range(0, len(data.captions), batch_size)]
    model.train()
    return ([torch.cat([chunk[k] for chunk in images]) for k in range(len(ids))],
            [torch.cat([chunk[k] for chunk in texts]) for k in range(len(ids))])


def evaluate(model: ContrastiveModel, data: CaptionedImages, device: torch.device, *, seed: int = 0,
             distractors: int = EVAL_DISTRACTORS) -> dict[str, float]:
    """Retrieval accuracy of each image's caption among `distractors` other captions of `data`, per encoder
    ("encoder_0", "encoder_1") and with the two similarities summed ("both"); chance = 1 / (1 + distractors)."""
    images, texts = embed(model, data, device)
    candidates = distractor_candidates(data.caption_index, len(data.captions), distractors, seed)
    sims = [i @ t.t() for i, t in zip(images, texts)]
    result = {f"encoder_{k}": retrieval_accuracy(s, data.caption_index, candidates) for k, s in enumerate(sims)}
    result["both"] = retrieval_accuracy(sum(sims), data.caption_index, candidates)
    result["chance"] = 1.0 / (1 + min(distractors, len(data.captions) - 1))
    result["images"], result["captions"] = float(len(data.pixels)), float(len(data.captions))
    return result


def subset(data: CaptionedImages, count: int, seed: int) -> CaptionedImages:
    """`count` random images of `data` (their captions re-indexed), e.g. training images to compare with."""
    keep = torch.randperm(len(data.pixels), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    used = sorted({int(data.caption_index[i]) for i in keep})
    remap = {old: new for new, old in enumerate(used)}
    return CaptionedImages(data.pixels[keep], torch.tensor([remap[int(data.caption_index[i])] for i in keep]),
                           [data.captions[i] for i in used])


EVALUATOR_KEY = "xldm.clip_evaluator"


def export_text_encoders(encoders: list[nn.Module] | nn.ModuleList, config: ModelConfig,
                         path: str | os.PathLike) -> Path:
    """The text encoders alone as an SDXL single file of `config` (no UNet, no VAE)."""
    import copy

    from xldm.models.components import Components
    from xldm.weights.save import save_single_file

    modules = tuple(copy.deepcopy(e).cpu().eval() for e in encoders)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_single_file(Components(config=config, text_encoders=modules), path)


def save_evaluator(model: ContrastiveModel, path: str | os.PathLike) -> Path:
    """Every weight of the contrastive model (tower and heads included), configs in the header."""
    from xldm.weights.io import save_file

    meta = {"encoders": [asdict(te) for te in model.encoder_configs], "tower": asdict(model.tower_config),
            "text_model": model.text_model}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata={EVALUATOR_KEY: json.dumps(meta), "format": "pt"})
    return Path(path)


def load_evaluator(path: str | os.PathLike) -> ContrastiveModel:
    """The contrastive model saved by `save_evaluator` (for measuring how well images follow their prompts)."""
    from xldm.errors import CheckpointError
    from xldm.weights.io import open_checkpoint

    checkpoint = open_checkpoint(path)
    if EVALUATOR_KEY not in checkpoint.metadata:
        raise CheckpointError(f"{path}: not an evaluator file (its metadata has no {EVALUATOR_KEY!r}; "
                              "`xldm train --task clip` writes final/clip_evaluator.safetensors)")
    meta = json.loads(checkpoint.metadata[EVALUATOR_KEY])
    tower = ImageTowerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["tower"].items()})
    text_model = meta.get("text_model", "transformer")
    if text_model not in TEXT_MODEL_CLASSES:
        raise CheckpointError(f"{path}: evaluator text model {text_model!r}, expected one of {list(TEXT_MODELS)}")
    model = ContrastiveModel(tuple(TextEncoderConfig(**te) for te in meta["encoders"]), tower, text_model)
    model.load_state_dict(checkpoint.tensors(), strict=True)
    return model.eval()


class ContrastiveBatches:
    """The captioned images of `config.data` split by `is_heldout`; batch of step s = rows `batch_indices(s)` of the
    training part, `augment`ed for s.  Position = the last step served (the resumable state)."""

    def __init__(self, config: TrainConfig) -> None:
        pixels, captions = load_images(config.data, config.resolution, cache=Path(config.out) / "cache")
        self.train, self.heldout = split_heldout(pixels, captions)
        self.ids = tokenize_captions(self.train.captions, tuple(config.model_config.text_encoders))
        self.batch_size, self.seed, self.position = config.batch_size, config.seed, 0

    def __iter__(self):
        while True:
            self.position += 1
            rows = batch_indices(len(self.train.pixels), self.batch_size, self.seed, self.position)
            caption_ids = self.train.caption_index[rows]
            yield {"pixels": augment(self.train.pixels[rows], self.seed, self.position),
                   "ids": [x[caption_ids] for x in self.ids], "caption_ids": caption_ids}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def batches(config: TrainConfig, procs: Processes) -> ContrastiveBatches:
    if not config.data:
        raise ValueError("no training data: set --data IMAGE_FOLDER")
    return ContrastiveBatches(config)


def build(config: TrainConfig, procs: Processes, model: ContrastiveModel | None = None) -> Run:
    """The text encoders and the image tower, seeded by `config.seed`, all trained."""
    if procs.distributed:
        raise NotImplementedError("contrastive pre-training runs in one process")
    if model is None:
        torch.manual_seed(config.seed)
        model = ContrastiveModel(tuple(config.model_config.text_encoders),
                                 ImageTowerConfig(image_size=config.resolution), config.text_model)
    model = model.to(procs.device).train()
    # CLIP: no weight decay on gains, biases and the temperature (Radford et al. 2021, App. F); here: on no
    # tensor with fewer than two dimensions.
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    return Run(config=config, procs=procs, model=model, trainable={"contrastive": model},
               forward={"contrastive": model}, optimizer=make_optimizer(config, groups))


def loss(run: Run, batch: dict, step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sum of the per-encoder CLIP losses, the per-encoder losses) of a batch."""
    model = run.forward["contrastive"]
    caption_ids = batch["caption_ids"].to(run.device)
    with run.autocast():
        images = model.encode_images(batch["pixels"].to(run.device))
        texts = model.encode_texts([trim_ids(x).to(run.device) for x in batch["ids"]])
    losses = [clip_loss(i, t, s, caption_ids) for i, t, s in zip(images, texts, model.logit_scales)]
    return sum(losses), losses


def step(run: Run, batch: dict, step: int) -> StepResult:
    """One AdamW step on the summed loss; the temperatures then clamped (CLIP, Radford et al. 2021, Sec. 2.5)."""
    model = run.trainable["contrastive"]
    params = [p for _, p in run.named_trainable_parameters()]
    total, parts = loss(run, batch, step)

    def clamp() -> None:
        with torch.no_grad():
            model.logit_scales.clamp_(max=MAX_LOGIT_SCALE)

    result = update(run, total, step, params, extra={f"loss_{k}": float(x.detach()) for k, x in enumerate(parts)},
                    after=clamp)
    result.extra["temperature"] = [round(float(s), 3) for s in model.logit_scales.detach().exp()]
    return result


def export(run: Run, data: ContrastiveBatches, final: Path, gathered: dict | None = None) -> Path:
    """`final/metrics.json` (retrieval accuracy on the held-out part and on a sample of the training part),
    `final/clip_evaluator.safetensors` and `final/model.safetensors` (the text encoders), of the EMA weights (raw
    weights without EMA).  Bag-of-words encoders are no SDXL text encoders: their runs end at the metrics and the
    evaluator file (returned)."""
    config, device = run.config, run.device
    model = run.averaged("contrastive", device)
    heldout, train = data.heldout, data.train
    metrics = {"step": config.steps,
               "heldout": evaluate(model, heldout, device, seed=config.seed) if len(heldout.captions) > 1 else None,
               "train_sample": evaluate(model, subset(train, max(len(heldout.pixels), 64), config.seed), device,
                                        seed=config.seed)}
    final.mkdir(parents=True, exist_ok=True)
    (final / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    evaluator = save_evaluator(model, final / "clip_evaluator.safetensors")
    print(f"retrieval accuracy (1 of {1 + EVAL_DISTRACTORS}): {json.dumps(metrics)}", file=sys.stderr)
    if model.text_model != "transformer":
        return evaluator
    return export_text_encoders(list(model.text_encoders), config.model_config, final / "model.safetensors")
