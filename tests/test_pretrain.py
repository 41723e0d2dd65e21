"""The tiny base's pretraining: questions agree with the simulator, training learns, resumes, loads."""

from __future__ import annotations

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import envs  # noqa: F401  (registers the tasks, picks the GL backend)
from envs.scene import COLOURS
from vla_peft.models import load_vlm
from vla_peft.models.image_norm import load_image_norm
from vla_peft.models.tiny import ACTION_PROMPT
from vla_peft.pretrain.questions import ask
from vla_peft.pretrain.scene_code import KINDS, codebook, scene_code
from vla_peft.pretrain.scenes import SceneSet, describe, render_scenes
from vla_peft.pretrain.base import SHIPPED, default_base_path
from vla_peft.pretrain.train import PretrainConfig, evaluate_checkpoint, pretrain


def test_projected_objects_show_their_colour_in_the_rendered_image():
    """Every visible cube/pad projects onto a pixel of its own colour (privileged state == pixels)."""
    env = gym.make("vla_peft/Push-v0", image_size=64, render_images=False)
    checked = 0
    try:
        for seed in range(6):
            env.reset(seed=seed)
            for camera in ("agentview", "wrist"):
                image = env.unwrapped.render_camera(camera).astype(float) / 255
                for o in describe(env, camera)["objects"]:
                    if not o["visible"]:
                        continue
                    x, y = int(o["u"] * 64), int(o["v"] * 64)
                    patch = image[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].reshape(-1, 3)
                    distances = {c: np.min(np.linalg.norm(patch - np.array(rgb), axis=1)) for c, rgb in COLOURS.items()}
                    assert min(distances, key=distances.get) == o["colour"], (seed, camera, o)
                    checked += 1
    finally:
        env.close()
    assert checked >= 20


def test_answers_agree_with_privileged_state():
    """exists / count / left-right answers follow the env's own colours and world positions."""
    env = gym.make("vla_peft/Reach-v0", image_size=64, render_images=False)
    rng = np.random.default_rng(0)
    try:
        for seed in range(20):
            env.reset(seed=seed)
            base, state = env.unwrapped, env.unwrapped.privileged_state()
            scene = describe(env, "agentview")  # at reset every cube is in the agentview image
            assert ask(scene, "count", rng) in {("how many cubes are there?", " three"), ("how many pads are there?", " zero")}
            question, answer = next(qa for qa in iter(lambda: ask(scene, "exists", rng), 0) if qa is not None)
            colour, kind = question.removeprefix("is there a ").removesuffix("?").split()
            assert answer == (" yes" if kind == "cube" and colour in base.cube_colours else " no")
            for _ in range(5):
                qa = ask(scene, "relation", rng)
                if qa is None or not any(w in qa[0] for w in (" left of ", " right of ")):
                    continue
                words = qa[0].removeprefix("is the ").removesuffix("?").split()
                a, b = base.cube_colours.index(words[0]), base.cube_colours.index(words[-2])
                # the agentview camera looks along -x, so image-right is world +y
                a_left_of_b = state["cube_pos"][a][1] < state["cube_pos"][b][1]
                assert qa[1] == (" yes" if a_left_of_b == (words[2] == "left") else " no"), (seed, qa)
    finally:
        env.close()


def test_instruction_questions_use_the_policy_prompt_and_answer_where_the_named_objects_are():
    env = gym.make("vla_peft/PickPlace-v0", image_size=64, render_images=False)
    rng = np.random.default_rng(0)
    numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    def fine(x):  # 32 bins per axis, as two digit words
        return [numbers[int(x * 32) // 10], numbers[int(x * 32) % 10]]

    def coarse(x):
        return [numbers[int(x * 8)]]

    try:
        for seed in range(10):
            env.reset(seed=seed)
            scene = describe(env, "agentview")
            for qtype, to_words in (("instruction", coarse), ("instruction_fine", fine)):
                qa = ask(scene, qtype, rng)
                if qa is None:
                    continue
                question, answer = qa
                assert question.startswith(ACTION_PROMPT.split("{")[0]) and question.endswith("?")
                named = [w for w in question.split() if w in COLOURS]
                cube = next(o for o in scene["objects"] if o["kind"] == "cube" and o["colour"] == named[0] and o["visible"])
                bins = answer.split()
                where = to_words(cube["u"]) + to_words(cube["v"])
                assert bins[: len(where)] == where, (question, answer)
                assert ("then" in bins) == (len(named) == 2)
    finally:
        env.close()


def test_scene_code_puts_each_object_in_its_patch_and_leaves_empty_patches_zero():
    code = codebook(0, 32)
    red_cube = {"kind": "cube", "colour": "red", "u": 0.30, "v": 0.80, "visible": True}  # patch (col 1, row 3), bins (2, 6)
    hidden_pad = {"kind": "pad", "colour": "blue", "u": 0.9, "v": 0.1, "visible": False}
    closed_gripper = {"u": 0.95, "v": 0.05, "visible": True, "open": False}  # patch (3, 0), bins (7, 0)
    out = scene_code([{"objects": [red_cube, hidden_pad], "gripper": closed_gripper}], grid=4, code=code)[0]
    colours = sorted(COLOURS)
    torch.testing.assert_close(out[3 * 4 + 1], code["kind"][colours.index("red")] + code["column"][2] + code["row"][6])
    torch.testing.assert_close(out[0 * 4 + 3], code["kind"][KINDS - 1] + code["column"][7] + code["row"][0])
    assert int((out.abs().sum(1) > 0).sum()) == 2  # the hidden pad adds nothing
    torch.testing.assert_close(codebook(0, 32)["kind"], code["kind"])  # fixed by the seed


# two vision-stage steps first (the locator alone), so both stages and a resume across them are run
TINY = dict(vision_steps=2, vision_batch=6, locator_weight=1.0, steps=8, batch_size=4, turns=4, warmup=2, train_images=48, eval_images=24, eval_per_type=4, easy_fraction=0.25)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    return out, pretrain(out, PretrainConfig(**TINY, lr=3e-3), threads=1)


def test_pretraining_reduces_loss_and_writes_a_loadable_checkpoint(trained):
    out, report = trained
    assert report["final_loss"] < report["initial_loss"] - 0.5
    model, processor = load_vlm(out)
    assert processor is not None and processor.tokenizer.decode(processor.tokenizer("where is the red cube?")["input_ids"]) == "where is the red cube?"
    norm = load_image_norm(out)
    scenes = SceneSet.load(out / "train_state" / "scenes_eval.safetensors")
    pixels = norm.pixel_values(scenes.images[:2].numpy(), scenes.annotations[0]["camera"])
    assert pixels.shape == (2, 3, 64, 64) and abs(float(pixels.mean())) < 1.0
    assert set(report["held_out"]) >= {"where", "region", "colour_of", "exists", "caption"}
    assert (out / "pretrain_eval.json").is_file() and not list(out.glob("*.tmp"))


def _saved_step(out) -> int:
    with safe_open(str(out / "train_state" / "state.safetensors"), framework="pt") as f:
        return int(f.metadata()["step"])


@pytest.mark.slow
def test_resumed_run_ends_where_an_uninterrupted_one_does(trained, tmp_path):
    out_full, _ = trained
    cfg = PretrainConfig(**TINY, lr=3e-3)
    shutil.copytree(out_full / "train_state", tmp_path / "train_state", ignore=shutil.ignore_patterns("state.*"))
    pretrain(tmp_path, cfg, resume=True, minutes=0.0, threads=1)  # stops (and saves) after its first step
    assert _saved_step(tmp_path) == 1
    with pytest.raises(FileExistsError):
        pretrain(tmp_path, cfg, threads=1)
    report = pretrain(tmp_path, cfg, resume=True, threads=1)
    assert report["steps_done"] == cfg.vision_steps + cfg.steps
    resumed, full = load_file(tmp_path / "model.safetensors"), load_file(out_full / "model.safetensors")
    for name, tensor in full.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_language_stage_extends_a_finished_run_and_leaves_the_vision_side_exactly_as_it_was(trained, tmp_path):
    out_full, _ = trained
    shutil.copytree(out_full, tmp_path, dirs_exist_ok=True)
    report = pretrain(tmp_path, PretrainConfig(**TINY, lr=3e-3, lm_steps=3), resume=True, threads=1)
    assert report["steps_done"] == TINY["vision_steps"] + TINY["steps"] + 3
    before, after = load_file(out_full / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    vision = [n for n in before if "vision_tower" in n or "multi_modal_projector" in n]
    language = [n for n in before if "language_model" in n and "layers" in n]
    assert vision and language
    assert all(torch.equal(before[n], after[n]) for n in vision)
    assert any(not torch.equal(before[n], after[n]) for n in language)
    with pytest.raises(ValueError, match="different recipe"):  # its LLaVA stage is over: its length is fixed
        pretrain(tmp_path, PretrainConfig(**{**TINY, "steps": 9}, lr=3e-3, lm_steps=3), resume=True, threads=1)


def test_refine_trains_the_locator_alone_first_then_the_vision_side_then_the_language_model(trained, tmp_path):
    """The refine recipe's stages on a finished base: each moves only what it should."""
    base, _ = trained
    cfg = PretrainConfig(**{**TINY, "vision_steps": 3, "head_only_steps": 2, "steps": 0, "lm_steps": 0},
                         init=str(base), expert_images=12, table_weight=1.0, locator_lr=3e-3, lr=3e-3)
    start = load_file(base / "model.safetensors")
    vision = [n for n in start if "vision_tower" in n or "multi_modal_projector" in n]
    language = [n for n in start if "language_model" in n and "layers" in n]

    def changed(out, names, than=start):
        now = load_file(out / "model.safetensors")
        return [n for n in names if not torch.equal(now[n], than[n])]

    pretrain(tmp_path, cfg, minutes=0.0, threads=1)  # stops after step 0: the locator alone has learned
    assert changed(tmp_path, vision + language) == []
    assert json.loads((tmp_path / "pretrain_recipe.json").read_text())["init"] == str(base)
    pretrain(tmp_path, cfg, resume=True, threads=1)  # step 2 trains the vision side too
    assert changed(tmp_path, vision) and changed(tmp_path, language) == []
    refined = load_file(tmp_path / "model.safetensors")
    report = pretrain(tmp_path, PretrainConfig(**{**cfg.__dict__, "lm_steps": 2}), resume=True, threads=1)
    assert changed(tmp_path, vision, refined) == [] and changed(tmp_path, language, refined)
    assert report["steps_done"] == 5
    assert torch.equal(load_image_norm(tmp_path).means["agentview"], load_image_norm(base).means["agentview"])


def test_scene_rendering_is_deterministic():
    a, b = render_scenes(6, seed=3, image_size=64, progress=False), render_scenes(6, seed=3, image_size=64, progress=False)
    assert torch.equal(a.images, b.images) and a.annotations == b.annotations


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="no base shipped in this checkout")
def test_shipped_base_grounds_colours_well_above_chance():
    """The shipped base, on scenes it never saw, binds colour words to places."""
    path = default_base_path(build=False)  # the shipped copy: returns at once, never trains
    assert path == SHIPPED
    fine = json.loads((path / "pretrain_recipe.json").read_text())["fine_answers"]  # its instructions answer in 32 bins
    types = ("where", "colour_of", "caption", "instruction_fine" if fine else "instruction")
    report = evaluate_checkpoint(path, images=300, per_type=100, seed=424242, types=types)
    for qtype, r in report.items():
        assert r["accuracy"] > r["chance"] + 0.15, (qtype, r)


def test_posed_scenes_put_held_cubes_at_the_grasp_point_and_give_every_scene_a_new_layout():
    scenes = render_scenes(40, seed=5, image_size=64, posed_fraction=1.0, progress=False)
    layouts = {tuple(round(o["x"], 4) for o in a["objects"]) for a in scenes.annotations}
    assert len(layouts) == 20  # one snapshot (both cameras) per episode: 20 distinct layouts
    held = [a for a in scenes.annotations if any(
        np.allclose([o["x"], o["y"], o["z"]], [a["gripper"][k] for k in "xyz"], atol=1e-6) for o in a["objects"])]
    assert held and all(not a["gripper"]["open"] for a in held)  # fingers closed on the cube


def test_locator_targets_name_every_visible_thing_and_its_loss_learns_a_position():
    from vla_peft.pretrain.locator import GRIPPER, Locator, name_index, targets

    here = {"x": 0.0, "y": 0.0, "z": 0.0}
    scene = {"objects": [{"kind": "cube", "colour": "red", "u": 0.3, "v": 0.8, "visible": True, **here},
                         {"kind": "pad", "colour": "blue", "u": 0.9, "v": 0.1, "visible": False, **here}],
             "gripper": {"u": 0.6, "v": 0.2, "visible": True, "open": True, **here}}
    names, uv, xyz, mask = targets([scene])
    assert names[0].tolist() == [name_index("cube", "red"), GRIPPER] and mask.all()
    assert torch.allclose(uv[0], torch.tensor([[0.3, 0.8], [0.6, 0.2]]))
    # tokens that carry the position in one coordinate: the head must learn to read it
    torch.manual_seed(0)
    locator = Locator(16, width=32)
    opt = torch.optim.Adam(locator.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        u = torch.rand(32)
        tokens = torch.zeros(32, 4, 16)
        tokens[:, 0, 0], tokens[:, 0, 1] = u, 1.0
        batch = [{"objects": [{"kind": "cube", "colour": "red", "u": float(x), "v": 0.5, "visible": True, **here}],
                  "gripper": {"visible": False}} for x in u]
        loss = locator.loss(tokens, batch)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    # with the table target it also reads the height the tokens carry
    torch.manual_seed(0)
    locator = Locator(16, width=32, table=True)
    opt = torch.optim.Adam(locator.parameters(), lr=3e-3)
    errors = []
    for _ in range(300):
        z = torch.rand(32) * 0.2
        tokens = torch.zeros(32, 4, 16)
        tokens[:, 0, 0], tokens[:, 0, 1] = z * 5, 1.0
        batch = [{"objects": [{"kind": "cube", "colour": "red", "u": 0.5, "v": 0.5, "visible": True, "x": 0.0, "y": 0.0,
                               "z": float(h)}], "gripper": {"visible": False}} for h in z]
        loss = locator.loss(tokens, batch, table_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        errors.append((locator(tokens, torch.zeros(32, 1, dtype=torch.long) + name_index("cube", "red"))[1][:, 0, 2] - z).abs().mean().item())
    assert errors[-1] < 0.2 * errors[0] and errors[-1] < 0.01  # metres
