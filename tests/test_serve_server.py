"""Policy server on loopback: closed loop through it equals in process, concurrent mixed tasks
answer for their own task, bad requests get a 4xx naming the problem and the server goes on."""

from __future__ import annotations

import base64
import http.client
import json
import threading

import numpy as np
import pytest

from eval_synth import one_torch_thread
from serve_synth import THRESHOLD_ENV, TASKS, observation, threaded_server
from vla_peft.cli import build_parser, main
from vla_peft.eval import EvalConfig, evaluate
from vla_peft.policy.bundle import load_bundle
from vla_peft.serve.batcher import TaskBatcher
from vla_peft.serve.client import PolicyClient, RemotePolicy, ServerError
from vla_peft.serve.remote_eval import evaluate_remote
from vla_peft.serve.server import run_server
from vla_peft.serve.wire import decode_array, encode_array, encode_image, encode_observation

MAX_BYTES = 64 * 1024  # a 32x32 frame is ~4 KB of base64


one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def url(bank):
    with threaded_server(bank, max_request_bytes=MAX_BYTES) as address:
        yield address


@pytest.fixture(scope="module")
def client(url):
    return PolicyClient(url)


class Recording:
    """A policy wrapper that keeps every chunk it hands to the evaluator."""

    def __init__(self, policy) -> None:
        self.policy, self.config, self.chunks = policy, policy.config, []

    def predict_chunk(self, obs, binarize_gripper=None):
        chunk = self.policy.predict_chunk(obs, binarize_gripper=binarize_gripper)
        self.chunks.append(chunk)
        return chunk


def good_body(task: str = "reach", seed: int = 0, tag=None) -> dict:
    return {"task": task, "id": tag, "instruction": "reach the red cube",
            "observation": encode_observation(observation(seed), ["agentview"], ["ee_pos", "gripper_states"])}


def post(url: str, path: str, payload: bytes, headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


# ---------------------------------------------------------------------- acceptance 1: closed loop
def test_closed_loop_through_server_equals_in_process(bank_dir, client, tmp_path):
    """Same bundles, same seeds: in process and through the server give the same episodes (success,
    length, return) and the same action chunks, on our Reach/Push tasks and on an env whose success
    depends on the actions (so success itself is compared, not only 0 = 0)."""
    runs = {"ours": ({"Reach": "reach", "Push": "push"}, dict(episodes=2, seed=11, max_steps=4)),
            "threshold": ({"reach": "reach", "push": "push"}, dict(episodes=6, seed=0, env_id=THRESHOLD_ENV))}
    for label, (envs, config) in runs.items():
        local = {env: Recording(load_bundle(bank_dir / task / "bundle")) for env, task in envs.items()}
        remote = {env: Recording(RemotePolicy(client, task)) for env, task in envs.items()}
        info_local = evaluate(list(envs), local.__getitem__,
                              EvalConfig(**config, progress=False, out=str(tmp_path / label / "local")))
        info_remote = evaluate(list(envs), remote.__getitem__,
                               EvalConfig(**config, progress=False, out=str(tmp_path / label / "remote")))
        assert info_remote["results"] == info_local["results"]  # success, length, return of every episode
        for env in envs:
            assert len(remote[env].chunks) == len(local[env].chunks) > 0
            for got, want in zip(remote[env].chunks, local[env].chunks):
                np.testing.assert_allclose(got, want, atol=1e-6)
    successes = [s["successes"] for s in info_local["results"]["per_task"].values()]
    assert all(0 < n < 6 for n in successes), successes  # the threshold env really tells episodes apart
    # the packaged runner gives the same results
    runner = evaluate_remote(client, {"reach": "reach"},
                             EvalConfig(**runs["threshold"][1], progress=False, out=str(tmp_path / "runner")))
    assert runner["results"]["per_task"] == {"reach": info_local["results"]["per_task"]["reach"]}


# ---------------------------------------------------------------------- concurrency
def test_concurrent_clients_mixing_tasks_get_their_own_task(client, url):
    reference = {(task, seed): client.act(observation(seed), "reach the red cube", task=task).chunk
                 for task in TASKS for seed in range(2)}
    answers, failures = [], []

    def worker(index: int) -> None:
        mine = PolicyClient(url)
        try:
            for i in range(6):
                task, seed = list(TASKS)[(index + i) % len(TASKS)], (index * i) % 2
                tag = f"{index}-{i}"
                got = mine.act(observation(seed), "reach the red cube", task=task, request_id=tag)
                answers.append((task, seed, tag, got))
        except Exception as err:  # noqa: BLE001 - reported below
            failures.append(err)
        finally:
            mine.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    assert len(answers) == 36
    for task, seed, tag, got in answers:
        assert (got.task, got.id) == (task, tag)
        np.testing.assert_allclose(got.chunk, reference[(task, seed)], atol=1e-5)


def test_waiting_requests_of_different_tasks_share_one_mixed_batch(bank):
    batcher = TaskBatcher(bank)
    try:
        holding, gate = threading.Event(), threading.Event()
        batcher.call(lambda _: (holding.set(), gate.wait(10)))  # holds the worker while the requests queue up
        assert holding.wait(10)  # else the worker may take the first request in the same sweep as the call
        jobs = [(task, seed) for seed in range(2) for task in TASKS]
        futures = [batcher.submit(task, {**observation(seed), "instruction": "reach the red cube"})
                   for task, seed in jobs]
        gate.set()
        answers = [f.result(30) for f in futures]
    finally:
        batcher.close()
    assert {a.batch_size for a in answers} == {len(jobs)}  # one forward pass for all of them
    for (task, seed), answer in zip(jobs, answers):
        alone = bank.activate(task).predict_chunk({**observation(seed), "instruction": "reach the red cube"})
        np.testing.assert_allclose(answer.chunk, alone, atol=1e-5)


def test_activate_sets_the_default_task(client):
    client.activate("push")
    assert client.health()["active"] == "push"
    chunk = client.act(observation(3), "reach the red cube").chunk  # no task named: the active one
    np.testing.assert_array_equal(chunk, client.act(observation(3), "reach the red cube", task="push").chunk)
    client.activate("reach")


def test_png_images_act_like_raw_ones(client, url):
    body = good_body()
    body["observation"]["agentview_rgb"] = encode_image(observation(0)["agentview_rgb"], "png")
    status, answer = post(url, "/act", json.dumps(body).encode())
    assert status == 200
    np.testing.assert_array_equal(answer["chunk"], client.act(observation(0), "reach the red cube", task="reach").chunk)


def test_wire_round_trip_is_exact():
    for array in (np.arange(24, dtype=np.uint8).reshape(2, 4, 3), np.linspace(-1, 1, 7, dtype=np.float32)):
        out = decode_array(json.loads(json.dumps(encode_array(array))), "x")
        assert out.dtype == array.dtype and np.array_equal(out, array)


# ---------------------------------------------------------------------- acceptance 3: bad requests
def _replace(path: str, value):
    def change(body: dict) -> bytes:
        target = body
        *parents, last = path.split(".")
        for key in parents:
            target = target[key]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
        return json.dumps(body).encode()
    return change


DELETE = object()
BAD_REQUESTS = {
    "malformed body": (lambda body: b'{"task": "reach", "observation": ', 400, "malformed body"),
    "not an object": (lambda body: b"[1, 2, 3]", 400, "must be an object"),
    "wrong image size": (_replace("observation.agentview_rgb",
                                  encode_array(np.zeros((16, 16, 3), np.uint8))), 422, "expects 32x32"),
    "wrong image dtype": (_replace("observation.agentview_rgb",
                                   encode_array(np.zeros((32, 32, 3), np.float32))), 422, "expected uint8"),
    "bytes do not fill the shape": (_replace("observation.agentview_rgb",
                                             {"dtype": "uint8", "shape": [32, 32, 3], "data": "AAAA"}), 422,
                                    "do not fill shape"),
    "not base64": (_replace("observation.agentview_rgb", {"dtype": "uint8", "shape": [1], "data": "!!"}), 422,
                   "not valid base64"),
    "not an image file": (_replace("observation.agentview_rgb",
                                   {"format": "png", "data": base64.b64encode(b"GIF89a nope").decode()}), 422,
                          "not a readable png"),
    "unknown task": (_replace("task", "fly"), 404, "unknown task 'fly'"),
    "missing instruction": (_replace("instruction", DELETE), 422, "missing field(s) ['instruction']"),
    "missing camera": (_replace("observation.agentview_rgb", DELETE), 422, "no image 'agentview_rgb'"),
    "missing state": (_replace("observation.ee_pos", DELETE), 422, "no state key 'ee_pos'"),
    "wrong state size": (_replace("observation.ee_pos", [0.1, 0.2]), 422, "state_dim=5"),
    "nan state": (_replace("observation.gripper_states", encode_array(np.array([np.nan, 0], np.float32))), 422,
                  "NaN"),
    "oversized payload": (_replace("padding", "x" * (MAX_BYTES + 1)), 413, "over the server's limit"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_naming_the_problem_and_the_server_goes_on(case, url, client):
    make, status, words = BAD_REQUESTS[case]
    got, answer = post(url, "/act", make(good_body()))
    assert got == status, answer
    assert words in answer["error"]
    assert client.act(observation(0), "reach the red cube", task="reach").chunk.shape == (4, 4)  # still serving


def test_metrics_count_requests_errors_and_latency(client, url):
    before = client.metrics()
    post(url, "/act", b"not json")
    client.act(observation(0), "reach the red cube", task="head")
    after = client.metrics()
    assert after["client_errors"] == before["client_errors"] + 1
    assert after["server_errors"] == 0
    assert after["per_task"]["head"] == before["per_task"].get("head", 0) + 1
    assert 0 < after["act_latency_ms"]["p50"] <= after["act_latency_ms"]["p95"]


def test_a_failure_inside_the_model_is_a_counted_500_and_the_server_goes_on(bank, client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(bank.policies["head"], "predict_chunk", broken)
    before = client.metrics()["server_errors"]
    with pytest.raises(ServerError) as info:
        client.act(observation(0), "reach the red cube", task="head")
    assert info.value.status == 500
    assert client.metrics()["server_errors"] == before + 1
    assert client.act(observation(0), "reach the red cube", task="reach").task == "reach"


def test_client_error_names_the_problem(client):
    with pytest.raises(ServerError, match="unknown task 'fly'") as info:
        client.activate("fly")
    assert info.value.status == 404


def test_token_is_required_when_set(bank):
    with threaded_server(bank, token="s3cret") as address:
        status, answer = post(address, "/act", json.dumps(good_body()).encode())
        assert status == 401 and "Authorization: Bearer" in answer["error"]
        status, _ = post(address, "/act", json.dumps(good_body()).encode(), {"Authorization": "Bearer wrong"})
        assert status == 401
        authorised = PolicyClient(address, token="s3cret")
        assert authorised.act(observation(0), "reach the red cube", task="reach").chunk.shape == (4, 4)


def test_wider_host_without_token_is_refused(bank):
    with pytest.raises(ValueError, match="set a shared token"):
        run_server(bank, host="0.0.0.0", port=1)


def test_serve_command_refuses_bad_setups_before_loading(bank_dir, tmp_path, capsys):
    assert main(["serve", "--bank", str(bank_dir), "--host", "0.0.0.0"]) == 2
    assert "set a shared token" in capsys.readouterr().err
    assert main(["serve", "--bank", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty" / "x").mkdir(parents=True)
    assert main(["serve", "--bank", str(tmp_path / "empty")]) == 2
    assert "no task bundles" in capsys.readouterr().err


def test_serve_help_gives_every_option_a_default():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    for action in serve._actions:
        if action.option_strings and action.dest not in ("help", "bank"):
            assert "(default:" in action.help, action.dest
