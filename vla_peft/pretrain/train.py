"""LLaVA-style pretraining of the tiny base: next-token loss on the answer, image + question as context.

The whole recipe reads top to bottom: render scenes, fit the per-pixel input normalisation,
optionally train the vision side alone on the locator first (``vision_steps``), then train
every weight of a fresh tiny LLaVA on questions drawn per step (easy mix first, full mix after)
with two targets for the image tokens — the scene code (scene_code.py) and the locator
(locator.py: where each named thing is, precisely) — optionally go on training the language
model alone with the vision side frozen (``lm_steps``), save a normal transformers checkpoint,
and score it on held-out scenes.
Batches are a pure function of (seed, step), so a resumed run sees the same data as an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vla_peft.models.image_norm import ImageNorm, load_image_norm, save_image_norm
from vla_peft.models.processor import save_processor
from vla_peft.models.tiny import TinyLlavaSpec, build_tiny_llava
from vla_peft.pretrain.locator import Locator
from vla_peft.pretrain.questions import EASY_MIX, FINE_EASY_MIX, FINE_FULL_MIX, FULL_MIX, QUESTION_TYPES, ask
from vla_peft.pretrain.scene_code import codebook, scene_code
from vla_peft.pretrain.scenes import CAMERAS, SceneSet, render_scenes

VISION_SIDE = ("vlm.model.vision_tower", "vlm.model.multi_modal_projector", "locator")  # parameter names
STATE_DIR = "train_state"  # resume files, kept out of the checkpoint proper
EVAL_FILE = "pretrain_eval.json"
RECIPE_FILE = "pretrain_recipe.json"


@dataclass
class PretrainConfig:
    """Everything that decides the result; written beside the checkpoint."""

    steps: int = 3000  # steps of the LLaVA stage (the language model reads the image tokens)
    vision_steps: int = 0  # a first stage before those: vision tower, projector and locator alone, no LM
    vision_batch: int = 80  # images per vision-stage step (no LM pass, so a step is cheap)
    vision_stage_lr: float = 2e-3  # the vision stage's peak learning rate
    seed: int = 0
    batch_size: int = 16  # images per step
    turns: int = 4  # questions per image (multi-turn), so 64 answers per step
    lr: float = 3e-4  # the language model's; measured: at 2e-3 the from-scratch LM stayed at the answer prior
    vision_lr: float = 2e-3  # vision tower and projector: they learn the scene code fast at this rate
    lm_steps: int = 0  # a last stage after those: the LLaVA loss with the vision side frozen (only the LM learns)
    warmup: int = 100
    code_weight: float = 1.0  # weight of the image-token loss (scene_code.py) that teaches the vision tower
    code_fraction: float = 0.4  # share of steps in which the LM reads the scene code instead of the vision tower
    code_images: int = 48  # extra images per step that train only the vision side (no LM pass: cheap)
    locator_weight: float = 0.0  # weight of the locator loss (locator.py), in tenths of the image
    weight_decay: float = 0.01
    easy_fraction: float = 0.2  # share of steps drawn from the easy question mix
    train_images: int = 8000
    posed_fraction: float = 0.0  # share of episodes that are one posed scene (scenes.py): more distinct layouts
    eval_images: int = 800
    eval_per_type: int = 150
    fine_answers: bool = False  # `locate` questions and `instruction_fine` (32 bins per axis) in the mixes
    pos_embed_scale: float = 10.0  # louder position embeddings at init, so patches know where they are
    spec: TinyLlavaSpec = field(default_factory=TinyLlavaSpec)
    init: str = ""  # a `pretrain-base` checkpoint to start from (weights and input normalisation), not a fresh model
    expert_images: int = 0  # frames of the experts' own episodes (action noise 0.1) added to the training scenes
    table_weight: float = 0.0  # the locator also regresses each thing's table (x, y, z), at this weight (locator.py)
    head_only_steps: int = 0  # first vision-stage steps in which only the locator learns (a fresh head, a trained tower)
    locator_lr: float = 0.0  # the locator's peak lr in the vision stage (0: the stage's vision_stage_lr)


# The locator recipe (issue 17): many posed scenes, the locator as the vision tower's direct target,
# fine answers. Measured: its frozen image tokens locate the named cube better than the shipped
# base's (probe 4.4 vs 5.1 cm), yet LoRA on it scored lower on Reach (76 vs 88 %); see docs/results.md.
LOCATOR_RECIPE = {"steps": 4000, "train_images": 80000, "posed_fraction": 0.9, "code_images": 64,
                  "locator_weight": 1.0, "fine_answers": True}
# The vision-first recipe: patches of 8 pixels (64 image tokens, not 16) and a vision stage that
# trains the tower on the locator alone before the LLaVA stage. Measured on the vision side
# alone, held-out expert frames, agentview: patch 16 plateaued near 2.9 px RMS after 3,000
# steps; patch 8 reached 1.6 px after 1,200 (docs/base-models.md). The scene code is dropped:
# the LM reads the trained tower from its first step, and the code's loss on tokens shaped by
# the locator alone started at 490x its scale (it would have swamped every other gradient).
# Then 3,000 steps of the language model alone (lm_steps): after the 1,500 LLaVA steps it answered
# `where` at 33 %; the vision side stays frozen so the positions it learned do not move.
VISION_FIRST_RECIPE = {**LOCATOR_RECIPE, "vision_steps": 3000, "steps": 1500, "vision_lr": 5e-4, "lm_steps": 3000,
                       "code_weight": 0.0, "code_fraction": 0.0, "spec": TinyLlavaSpec(patch_size=8)}
# The refine recipe starts from a vision-first base (`--init`): its vision side, on the locator with the
# table target, on frames of the experts' own episodes beside posed scenes, then its language model
# realigned to the tokens that changed. Why: a probe read the shipped base's free cubes at 1.1 cm but
# held ones at 3.5-5.9. Measured on the shipped base (docs/results.md): the probe's cubes 2.13 -> 1.63 cm,
# held and stacked cubes 5.9 -> 3.8, free ones 1.12 -> 1.24, but LoRA on it: PickPlace 4 % (shipped 52 %); not shipped.
REFINE_RECIPE = {**VISION_FIRST_RECIPE, "vision_steps": 2000, "steps": 0, "lm_steps": 1500, "train_images": 40000,
                 "expert_images": 60000, "table_weight": 1.0, "head_only_steps": 300, "vision_stage_lr": 5e-4,
                 "locator_lr": 2e-3}
# scene-code: the first shipped base's recipe (the PretrainConfig defaults); vision-first is shipped now.
RECIPES = {"scene-code": {}, "locator": LOCATOR_RECIPE, "vision-first": VISION_FIRST_RECIPE, "refine": REFINE_RECIPE}


class QATokenizer:
    """Token ids of LLaVA-1.5 turns, cached per string:
    "<s>USER: <image>*N\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>..."."""

    def __init__(self, tokenizer, num_image_tokens: int) -> None:
        self.tok = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.n = num_image_tokens
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it is an answer token (the only ones with loss)."""
        ids = [self.tok.bos_token_id] + self._ids("USER: ") + [self.image_id] * self.n
        is_answer = [False] * len(ids)
        for k, (question, answer) in enumerate(turns):
            prompt = self._ids(f"\n{question} ASSISTANT:" if k == 0 else f"USER: {question} ASSISTANT:")
            reply = self._ids(answer) + [self.tok.eos_token_id]
            ids += prompt + reply
            is_answer += [False] * len(prompt) + [True] * len(reply)
        return ids, is_answer


def fit_image_norm(scenes: SceneSet) -> ImageNorm:
    """Mean image per camera (the static background) and the std of what remains."""
    cams = np.array([a["camera"] for a in scenes.annotations])
    means, residual_sq, count = {}, 0.0, 0
    for cam in CAMERAS:
        x = scenes.images[torch.from_numpy(cams == cam)].permute(0, 3, 1, 2).float().div_(255.0)
        means[cam] = x.mean(0)
        residual_sq += float(((x - means[cam]) ** 2).sum())
        count += x.numel()
    return ImageNorm(means=means, std=math.sqrt(residual_sq / count))


def collate(items: list[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (loss on the answer tokens only)."""
    length = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), length), pad_id)
    labels = torch.full((len(items), length), -100)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, (seq, is_answer) in enumerate(items):
        seq_t = torch.tensor(seq)
        ids[i, : len(seq)] = seq_t
        labels[i, : len(seq)] = seq_t.masked_fill(~torch.tensor(is_answer), -100)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def draw_conversations(
    scenes: SceneSet, mix: dict[str, float], n_images: int, turns: int, rng: np.random.Generator
) -> list[tuple[int, list[tuple[str, str, str]]]]:
    """``n_images`` (image index, [(qtype, question, answer)] * turns), types drawn with the mix's weights.

    Several questions share one image, as in LLaVA's multi-turn data: the image tokens, most of
    each sequence, are then paid once per ``turns`` answers. No question repeats in a conversation.
    """
    types = list(mix)
    p = np.array([mix[t] for t in types], dtype=float)
    p /= p.sum()
    out = []
    while len(out) < n_images:
        i = int(rng.integers(len(scenes)))
        chat: list[tuple[str, str, str]] = []
        for _ in range(4 * turns):
            qtype = types[rng.choice(len(types), p=p)]
            qa = ask(scenes.annotations[i], qtype, rng)
            if qa is not None and all(qa[0] != q for _, q, _ in chat):
                chat.append((qtype, *qa))
            if len(chat) == turns:
                break
        if chat:
            out.append((i, chat))
    return out


def make_batch(scenes: SceneSet, norm: ImageNorm, qat: QATokenizer, conversations) -> dict[str, torch.Tensor]:
    """Model inputs and answer-only labels for ``conversations`` [(image index, [(qtype, q, a)])]."""
    items = [qat.conversation([(q, a) for _, q, a in chat]) for _, chat in conversations]
    batch = collate(items, qat.tok.pad_token_id)
    batch["pixel_values"] = make_pixels(scenes, norm, [i for i, _ in conversations])
    return batch


def make_pixels(scenes: SceneSet, norm: ImageNorm, indices) -> torch.Tensor:
    """The base's input: (image/255 - mean scene of that camera) / std, (B, 3, H, W)."""
    means = torch.stack([norm.means[scenes.annotations[i]["camera"]] for i in indices])
    pixels = scenes.images[torch.as_tensor(indices)].permute(0, 3, 1, 2).float().div_(255.0)
    return (pixels - means).div_(norm.std)


def lr_at(step: int, cfg: PretrainConfig, peak: float | None = None, steps: int | None = None) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak (default: the LLaVA stage's)."""
    peak = cfg.lr if peak is None else peak
    steps = cfg.steps if steps is None else steps
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, steps - cfg.warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(
    model,
    scenes: SceneSet,
    norm: ImageNorm,
    qat: QATokenizer,
    per_type: int,
    seed: int,
    types: tuple[str, ...] = tuple(QUESTION_TYPES),
) -> dict:
    """Exact-match accuracy per question type on ``scenes``, beside the majority-answer baseline.

    Teacher-forced: an answer counts as right when every answer token is the model's argmax,
    which is exactly when greedy decoding would produce it.
    """
    model.eval()
    rng = np.random.default_rng(seed)
    report = {}
    for qtype in types:
        questions = draw_conversations(scenes, {qtype: 1.0}, per_type, 1, rng)
        correct = 0
        for start in range(0, len(questions), 64):
            chunk = questions[start : start + 64]
            batch = make_batch(scenes, norm, qat, chunk)
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1]
            target = labels[:, 1:]
            ok = (logits.argmax(-1) == target) | (target == -100)
            correct += int(ok.all(dim=1).sum())
        answers = [chat[0][2] for _, chat in questions]
        majority = max(answers.count(a) for a in set(answers)) / len(answers)
        report[qtype] = {"accuracy": correct / len(questions), "chance": majority, "n": len(questions)}
    return report


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(out: Path, model, tokenizer, norm: ImageNorm) -> None:
    """Write a normal transformers checkpoint (+ image_norm.safetensors) file by file, atomically."""
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    processor = save_processor(staging, tokenizer, model.config)
    del processor
    save_image_norm(staging, norm)
    for f in sorted(staging.iterdir()):
        os.replace(f, out / f.name)
    staging.rmdir()


def _save_state(path: Path, model: torch.nn.Module, optimizer, step: int, cfg: PretrainConfig) -> None:
    """Model, AdamW moments and step in ONE safetensors file, so a resume never mixes versions."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(st[key]).detach().clone().contiguous()
    meta = {"step": str(step), "config": json.dumps(_config_dict(cfg))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_state(path: Path, model: torch.nn.Module, optimizer) -> tuple[int, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for n, p in model.named_parameters():
        if f"optim.{n}.exp_avg" in tensors:
            optimizer.state[p] = {key: tensors[f"optim.{n}.{key}"] for key in ("exp_avg", "exp_avg_sq", "step")}
    return int(meta["step"]), json.loads(meta["config"])


def _config_dict(cfg: PretrainConfig) -> dict:
    return asdict(cfg)


def _scenes(path: Path, n: int, seed: int, size: int, posed_fraction: float, expert: bool = False) -> SceneSet:
    """Rendered once per output dir and cached there, so a resume does not render again.
    ``expert``: frames of the experts' episodes, 6 snapshots each, action noise 0.1, no dashes."""
    if path.is_file():
        scenes = SceneSet.load(path)
        if len(scenes) == n and scenes.images.shape[1] == size:
            return scenes
    how = dict(snapshots_per_episode=6, action_noise=0.1, dash_fraction=0.0) if expert else {}
    scenes = render_scenes(n, seed=seed, image_size=size, posed_fraction=posed_fraction, **how)
    scenes.save(path)
    return scenes


def _part(name: str) -> str:
    """Which optimiser part a parameter of the trained modules belongs to: vision, locator or lm."""
    return "locator" if name.startswith("locator") else "vision" if name.startswith(VISION_SIDE) else "lm"


def load_checkpoint(path: str | Path):
    """The model, processor and input normalisation of a `pretrain-base` checkpoint."""
    from vla_peft.models import load_vlm

    model, processor = load_vlm(path)
    norm = load_image_norm(path)
    if norm is None or processor is None:
        raise FileNotFoundError(f"{path} lacks image_norm.safetensors or its processor; it is not a `vla-peft pretrain-base` checkpoint")
    return model, processor, norm


def _start_from(path: str, spec: TinyLlavaSpec):
    """The model, tokenizer and input normalisation of a `pretrain-base` checkpoint of ``spec``'s shape."""
    model, processor, norm = load_checkpoint(path)
    vision = model.config.vision_config
    if (vision.image_size, vision.patch_size, model.config.text_config.hidden_size) != (spec.image_size, spec.patch_size, spec.text_hidden):
        raise ValueError(f"--init {path}: image {vision.image_size} px, patch {vision.patch_size}, LM width "
                         f"{model.config.text_config.hidden_size}; this recipe's are {spec.image_size}, {spec.patch_size}, {spec.text_hidden}")
    return model, processor.tokenizer, norm


def pretrain(
    out: str | Path,
    cfg: PretrainConfig,
    resume: bool = False,
    minutes: float | None = None,
    threads: int | None = None,
) -> dict:
    """Pretrain (or resume) into ``out``; return the held-out report also saved as JSON there.

    ``minutes`` stops early (after saving) when the wall-clock budget is spent; the schedule
    still follows ``cfg.steps``, so an early stop resumes where it left off. ``threads``
    sets torch's CPU threads (1 was 2-4x faster than 2 on a machine shared with other jobs).
    """
    torch.set_flush_denormal(True)  # measured: denormals slowed tiny-model training 4-5x
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    state_dir = out / STATE_DIR
    state_file = state_dir / "state.safetensors"
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue that run or choose a new --out")
    state_dir.mkdir(parents=True, exist_ok=True)

    spec = cfg.spec
    if cfg.head_only_steps and cfg.head_only_steps >= cfg.vision_steps:
        raise ValueError(f"head_only_steps ({cfg.head_only_steps}) must be fewer than vision_steps ({cfg.vision_steps})")
    train = _scenes(state_dir / "scenes_train.safetensors", cfg.train_images, cfg.seed, spec.image_size, cfg.posed_fraction)
    if cfg.expert_images:
        expert = _scenes(state_dir / "scenes_expert.safetensors", cfg.expert_images, cfg.seed + 2_000_003,
                         spec.image_size, 0.0, expert=True)
        train = SceneSet(images=torch.cat([train.images, expert.images]), annotations=train.annotations + expert.annotations)
    held_out = _scenes(
        state_dir / "scenes_eval.safetensors", cfg.eval_images, cfg.seed + 1_000_003, spec.image_size, cfg.posed_fraction
    )
    if cfg.init:
        model, tokenizer, norm = _start_from(cfg.init, spec)
    else:
        norm = fit_image_norm(train)
        model, tokenizer = build_tiny_llava(cfg.seed, spec)
        with torch.no_grad():
            model.model.vision_tower.embeddings.position_embedding.weight.mul_(cfg.pos_embed_scale)
    # A hook on the projector hands its output (the image tokens) to the image-token loss and,
    # while the LM still reads the scene code, puts the code in its place.
    code = codebook(cfg.seed, spec.text_hidden)
    tokens: dict[str, torch.Tensor | None] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda m, i, o: tokens.update(vision=o) or tokens.get("replace")
    )
    # Everything trained, in one module so that resume files hold it all; only `vlm` is shipped.
    trained = torch.nn.ModuleDict({"vlm": model})
    if cfg.vision_steps and not cfg.locator_weight:
        raise ValueError("vision_steps trains the vision side on the locator alone: set locator_weight > 0 too")
    if cfg.locator_weight:
        torch.manual_seed(cfg.seed)
        trained["locator"] = Locator(spec.text_hidden, table=cfg.table_weight > 0)
    trained.train()
    trained.requires_grad_(True)
    groups = []
    for part in ("vision", "locator", "lm"):
        for decays in (True, False):
            params = [p for n, p in trained.named_parameters()
                      if _part(n) == part and (p.ndim >= 2 and "embed" not in n) == decays]
            if params:
                groups.append({"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, "part": part})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    start = 0
    if resume and state_file.is_file():
        start, saved = _load_state(state_file, trained, optimizer)
        # More --steps (or --lm-steps) may extend a run not yet past that stage (its cosine then
        # follows the new length); anything else must match, or the result would belong to no recipe.
        past_llava = start > cfg.vision_steps + min(cfg.steps, saved["steps"])
        if ({**saved, "steps": cfg.steps, "lm_steps": cfg.lm_steps} != _config_dict(cfg)
                or (past_llava and saved["steps"] != cfg.steps) or cfg.vision_steps + cfg.steps + cfg.lm_steps < start):
            raise ValueError(f"{out} was started with a different recipe ({saved}); resume it with the same options")
    grid = spec.image_size // spec.patch_size  # image patches per side
    qat = QATokenizer(tokenizer, grid * grid)

    _atomic_json(out / RECIPE_FILE, _config_dict(cfg))
    began = time.monotonic()
    losses: list[float] = []
    code_losses: list[float] = []
    locator_losses: list[float] = []
    total = cfg.vision_steps + cfg.steps + cfg.lm_steps
    bar = tqdm(range(start, total), initial=start, total=total, desc="pretraining", unit="step")
    step = start
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])
        llava_step = step - cfg.vision_steps
        if step < cfg.vision_steps:
            locator_losses.append(_vision_step(trained, train, norm, tokens, optimizer, step, cfg, rng))
            if step % 10 == 0:
                bar.set_postfix(stage="vision", locator=f"{np.mean(locator_losses[-50:]):.4f}")
        elif llava_step >= cfg.steps:
            losses.append(_language_step(trained, train, norm, qat, tokens, optimizer, llava_step - cfg.steps, cfg, rng))
            if step % 10 == 0:
                bar.set_postfix(stage="language", loss=f"{np.mean(losses[-50:]):.3f}")
        else:
            easy, full = (FINE_EASY_MIX, FINE_FULL_MIX) if cfg.fine_answers else (EASY_MIX, FULL_MIX)
            mix = easy if llava_step < cfg.easy_fraction * cfg.steps else full
            conversations = draw_conversations(train, mix, cfg.batch_size, cfg.turns, rng)
            batch = make_batch(train, norm, qat, conversations)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(llava_step, cfg) * (cfg.vision_lr / cfg.lr if group["part"] != "lm" else 1.0)
            extra = rng.integers(len(train), size=cfg.code_images)
            tokens["replace"] = None
            model.model.get_image_features(pixel_values=make_pixels(train, norm, extra))
            extra_tokens = tokens["vision"]
            reads_code = llava_step < cfg.code_fraction * cfg.steps
            target = None
            if reads_code or cfg.code_weight:
                target = scene_code([train.annotations[i] for i, _ in conversations], grid, code)
            tokens["replace"] = target if reads_code else None
            loss = model(**batch).loss
            vision = torch.cat([tokens["vision"], extra_tokens])
            code_loss = torch.zeros(())
            if cfg.code_weight:  # relative squared error: 1.0 is what all-zero image tokens would score
                target = torch.cat([target, scene_code([train.annotations[i] for i in extra], grid, code)])
                code_loss = (vision - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-6)
            seen = [train.annotations[i] for i, _ in conversations] + [train.annotations[i] for i in extra]
            locator_loss = trained["locator"].loss(vision, seen, cfg.table_weight) if cfg.locator_weight else torch.zeros(())
            (loss + cfg.code_weight * code_loss + cfg.locator_weight * locator_loss).backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            code_losses.append(code_loss.item())
            locator_losses.append(locator_loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", code=f"{np.mean(code_losses[-50:]):.4f}",
                                locator=f"{np.mean(locator_losses[-50:]):.4f}")
        if _checkpoint(state_file, trained, optimizer, step, cfg, began, minutes):
            step += 1
            break
    else:
        step = total
    bar.close()
    seconds = time.monotonic() - began
    _save_state(state_file, trained, optimizer, step, cfg)
    tokens["replace"] = None
    hook.remove()
    model.eval()
    model.requires_grad_(False)
    save_checkpoint(out, model, tokenizer, norm)
    report = {
        "steps_done": step,
        "steps_planned": total,
        "train_seconds_this_run": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "initial_loss": float(np.mean(losses[: max(1, min(10, len(losses) // 4))])) if losses else None,
        "final_loss": _final(losses),
        "final_code_loss": _final(code_losses) if cfg.code_weight else None,
        "final_locator_loss": _final(locator_losses) if cfg.locator_weight else None,
        "held_out": evaluate(model, held_out, norm, qat, cfg.eval_per_type, seed=cfg.seed + 7),
    }
    _atomic_json(out / EVAL_FILE, report)
    return report


def _vision_step(trained, train: SceneSet, norm: ImageNorm, tokens: dict, optimizer, step: int,
                 cfg: PretrainConfig, rng: np.random.Generator) -> float:
    """One vision-stage step: the locator's loss on ``vision_batch`` images, the LM untouched
    (it has no gradient, so AdamW skips it). Measured: the vision tower alone on this target
    learns positions faster than inside the full model, where it shares the step with the LM.
    For the first ``head_only_steps`` the vision tower and projector have no gradient either, so a
    fresh locator on a trained tower fits before its gradients reach the tower."""
    for group in optimizer.param_groups:
        peak = (cfg.locator_lr or cfg.vision_stage_lr) if group["part"] == "locator" else cfg.vision_stage_lr
        group["lr"] = lr_at(step, cfg, peak, cfg.vision_steps) if group["part"] != "lm" else 0.0
    for name, p in trained.named_parameters():
        if _part(name) == "vision":
            p.requires_grad_(step >= cfg.head_only_steps)
    images = rng.integers(len(train), size=cfg.vision_batch)
    tokens["replace"] = None
    trained["vlm"].model.get_image_features(pixel_values=make_pixels(train, norm, images))
    loss = trained["locator"].loss(tokens["vision"], [train.annotations[i] for i in images], cfg.table_weight)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _language_step(trained, train: SceneSet, norm: ImageNorm, qat: QATokenizer, tokens: dict, optimizer,
                   step: int, cfg: PretrainConfig, rng: np.random.Generator) -> float:
    """One step of the last stage: the LLaVA loss on the full mix, the vision side frozen.

    Measured: 1,500 LLaVA steps left the vision-first base's language model weak (`where` 33 %),
    and more steps with the vision side still learning would move the positions its locator
    taught. Frozen, the image tokens stay exactly what the perception probe measured.
    """
    for name, p in trained.named_parameters():
        if name.startswith(VISION_SIDE):
            p.requires_grad_(False)  # no gradient: AdamW then leaves them (and their moments) alone
    for group in optimizer.param_groups:
        if group["part"] == "lm":
            group["lr"] = lr_at(step, cfg, cfg.lr, cfg.lm_steps)
    mix = FINE_FULL_MIX if cfg.fine_answers else FULL_MIX
    tokens["replace"] = None
    batch = make_batch(train, norm, qat, draw_conversations(train, mix, cfg.batch_size, cfg.turns, rng))
    loss = trained["vlm"](**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _checkpoint(path: Path, trained, optimizer, step: int, cfg: PretrainConfig, began: float, minutes) -> bool:
    """Save every 200 steps and when the time budget is spent; True means stop now."""
    out_of_time = minutes is not None and time.monotonic() - began > 60 * minutes
    if (step + 1) % 200 == 0 or out_of_time:
        _save_state(path, trained, optimizer, step + 1, cfg)
    return out_of_time


def _final(values: list[float]) -> float | None:
    """The mean of the last quarter of a run's values (at most 50), or None for a run of no steps."""
    return float(np.mean(values[-max(1, min(50, len(values) // 4)) :])) if values else None


def format_report(report: dict) -> str:
    """The held-out table a person reads at the end of a run."""
    lines = [f"{'question type':<15} {'accuracy':>9} {'chance':>7} {'n':>5}"]
    for qtype, r in report["held_out"].items():
        lines.append(f"{qtype:<15} {r['accuracy']:>9.1%} {r['chance']:>7.1%} {r['n']:>5}")
    lines.append(
        f"steps {report['steps_done']}/{report['steps_planned']}, "
        f"{report['train_seconds_this_run'] / 60:.1f} min of training on {report['torch_threads']} threads, "
        f"final loss {report['final_loss']:.3f}" if report["final_loss"] is not None else ""
    )
    return "\n".join(lines)


def evaluate_checkpoint(
    path: str | Path, images: int, per_type: int, seed: int, types: tuple[str, ...] = tuple(QUESTION_TYPES)
) -> dict:
    """Score a saved base on freshly rendered scenes (``seed`` should differ from its training seed)."""
    model, processor, norm = load_checkpoint(path)
    size = model.config.vision_config.image_size
    scenes = render_scenes(images, seed=seed, image_size=size, progress=False)
    qat = QATokenizer(processor.tokenizer, model.config.image_seq_length)
    return evaluate(model, scenes, norm, qat, per_type, seed, types)
