"""Fault injection on the policy server: poisoned requests among 32 clients fail alone and every
good request gets its exact answer; requests a hostile client can craft get a 4xx naming the
problem; a slow decode does not stall /health; a corrupt bundle in the bank, a server that was
down, a port in use, and kill -9 then restart."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import signal
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from eval_synth import one_torch_thread
from serve_synth import (LOOPBACK, TASKS, free_port, observation, serving, start_subprocess, stop_subprocess,
                         threaded_server)
from vla_peft.cli import build_parser, main
from vla_peft.policy.observation import MAX_INSTRUCTION_CHARS
from vla_peft.serve import wire
from vla_peft.serve.batcher import TaskBatcher
from vla_peft.serve.client import PolicyClient
from vla_peft.serve.server import create_app, load_bank
from vla_peft.serve.wire import encode_array, encode_image, encode_observation

INSTRUCTION = "reach the red cube"
one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def app(bank):
    return create_app(bank)


@pytest.fixture(scope="module")
def url(app):
    with serving(app) as address:
        yield address


def good_body(task: str, seed: int) -> dict:
    return {"task": task, "instruction": INSTRUCTION,
            "observation": encode_observation(observation(seed), ["agentview"], ["ee_pos", "gripper_states"])}


def request(url: str, method: str, path: str, payload=None, timeout: float = 60) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = None if payload is None else json.dumps(payload).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except json.JSONDecodeError:
            return response.status, {"error": raw.decode("utf-8", "replace")}
    finally:
        conn.close()


def png_claiming(width: int, height: int) -> dict:
    """A small PNG whose header says ``width`` x ``height`` (what a decompression bomb looks like
    before it is decoded: the 419 KB file of the issue decodes to 12000 x 12000)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return {"format": "png", "data": base64.b64encode(bytes(data)).decode()}


def poisoned(change):
    def make(body: dict) -> dict:
        body = json.loads(json.dumps(body))
        change(body)
        return body
    return make


def _set(path: str, value):
    def change(body: dict) -> None:
        *parents, last = path.split(".")
        target = body
        for key in parents:
            target = target[key]
        target[last] = value
    return change


POISONS = {  # what a hostile client sent (issue 20) -> the status and words it must get back
    "<image> in the instruction": (_set("instruction", "reach <image> the red cube"), 422, "reserved token '<image>'"),
    "state 1e300 (inf as float32)": (_set("observation.ee_pos", [1e300, 0.0, 0.0]), 422, "NaN or infinity"),
    "NaN state": (_set("observation.gripper_states", encode_array(np.array([np.nan, 0], np.float32))), 422,
                  "NaN or infinity"),
    "shape [2**40, 2**40, 3]": (_set("observation.agentview_rgb", {"dtype": "uint8", "shape": [2**40, 2**40, 3],
                                                                   "data": ""}), 422, "do not fill shape"),
    "76k-character instruction": (_set("instruction", "reach " * 12_700), 422, "over the limit of 1000"),
    "PNG decoding to 12000x12000": (_set("observation.agentview_rgb", png_claiming(12000, 12000)), 422,
                                    "12000x12000 but this task's policy expects 32x32"),
    "instruction not a string": (_set("instruction", 5), 422, "'instruction' must be a string"),
    "state of the wrong length": (_set("observation.ee_pos", [0.1, 0.2]), 422, "ee_pos (2) + gripper_states (2)"),
}


@pytest.mark.parametrize("case", list(POISONS))
def test_a_hostile_request_gets_a_4xx_naming_the_problem(case, url):
    change, status, words = POISONS[case]
    got, answer = request(url, "POST", "/act", poisoned(change)(good_body("reach", 0)))
    assert got == status, answer
    assert words in answer["error"], answer
    assert request(url, "POST", "/act", good_body("reach", 0))[0] == 200  # still serving


def alone_answers(url: str) -> dict:
    """Each good request's answer when it is the only one in its forward pass."""
    answers = {}
    for task in TASKS:
        for seed in range(2):
            status, answer = request(url, "POST", "/act", good_body(task, seed))
            assert status == 200 and answer["batch_size"] == 1
            answers[task, seed] = np.asarray(answer["chunk"], np.float32)
    return answers


def client_request(index: int, poison: bool) -> tuple[str, dict]:
    """Client ``index``'s request: a good one for its task and seed, or (every fourth) a poisoned one."""
    task, seed = list(TASKS)[index % len(TASKS)], index % 2
    if poison and index % 4 == 1:
        name = list(POISONS)[(index // 4) % len(POISONS)]
        return name, poisoned(POISONS[name][0])(good_body(task, seed))
    return "good", good_body(task, seed)


def held_round(app, url: str, poison: bool, clients: int = 32) -> dict[int, tuple[str, int, dict]]:
    """``clients`` clients (without the poisoned ones unless ``poison``), each with one request in
    flight at once, queued in a fixed order while the worker is held, then served together
    (batches of up to 16, in queue order)."""
    batcher = app.state.batcher
    holding, gate = threading.Event(), threading.Event()
    batcher.call(lambda _: (holding.set(), gate.wait(60)))
    assert holding.wait(30)
    results, threads = {}, []

    def send(index: int, kind: str, payload: dict) -> None:
        results[index] = (kind, *request(url, "POST", "/act", payload))

    try:
        for index in range(clients):
            kind, payload = client_request(index, poison=True)
            if kind != "good" and not poison:  # the clean round: the same good requests, nothing else
                continue
            queued = batcher._queue.qsize()
            thread = threading.Thread(target=send, args=(index, kind, payload))
            thread.start()
            threads.append(thread)
            if kind == "good":  # wait until it is queued, so the batches are the same in every round
                deadline = time.monotonic() + 30
                while batcher._queue.qsize() == queued and time.monotonic() < deadline:
                    time.sleep(0.005)
            else:  # refused before it is queued: answered while the worker is still held
                thread.join(30)
    finally:
        gate.set()
    for thread in threads:
        thread.join(60)
    return results


def test_poisoned_requests_among_32_clients_leave_every_good_answer_exact(app, url):
    """The issue's case: one client's bad request made the batched forward raise and failed the
    other clients' requests (188 of 192 got 500). Now each poisoned request gets its own 4xx and
    never joins a batch: every good answer is bit for bit the one it gets with no poison sent at
    all (same batches), and its task's and seed's answer (within float32 rounding of the batch size)."""
    alone = alone_answers(url)
    with_poison, clean = held_round(app, url, poison=True), held_round(app, url, poison=False)
    poisoned_count = 0
    for index, (kind, status, answer) in with_poison.items():
        if kind != "good":
            poisoned_count += 1
            assert status == POISONS[kind][1] and POISONS[kind][2] in answer["error"], (kind, answer)
            continue
        assert status == 200, (index, answer)
        chunk = np.asarray(answer["chunk"], np.float32)
        kind_clean, status_clean, answer_clean = clean[index]
        assert status_clean == 200 and answer_clean["batch_size"] == answer["batch_size"]
        np.testing.assert_array_equal(chunk, np.asarray(answer_clean["chunk"], np.float32))
        task, seed = list(TASKS)[index % len(TASKS)], index % 2
        assert answer["task"] == task
        np.testing.assert_allclose(chunk, alone[task, seed], rtol=0, atol=1e-6)
    assert poisoned_count == 8 and len(with_poison) == 32
    assert max(answer["batch_size"] for kind, _, answer in with_poison.values() if kind == "good") == 16


def test_32_clients_storming_with_poison_get_their_own_answers(url):
    """32 clients at once, free running, 3 requests each, every fourth client poisoning its second."""
    alone = alone_answers(url)
    failures, bad_answers, good_answers = [], [], []

    def client(index: int) -> None:
        try:
            for step in range(3):
                kind, payload = client_request(index, poison=step == 1)
                status, answer = request(url, "POST", "/act", payload)
                (good_answers if kind == "good" else bad_answers).append((index, kind, status, answer))
        except Exception as err:  # noqa: BLE001 - reported below
            failures.append(err)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures
    assert len(bad_answers) == 8 and len(good_answers) == 88
    for index, kind, status, answer in bad_answers:
        assert status == POISONS[kind][1] and POISONS[kind][2] in answer["error"], (kind, answer)
    for index, _, status, answer in good_answers:
        assert status == 200, answer
        task, seed = list(TASKS)[index % len(TASKS)], index % 2
        np.testing.assert_allclose(np.asarray(answer["chunk"], np.float32), alone[task, seed], rtol=0, atol=1e-6)


def test_a_request_that_slips_past_the_checks_fails_alone_in_its_batch(bank):
    """The second line of defence: requests queued unchecked (an '<image>' instruction makes the
    batch's forward raise); the batch is run again row by row, so only the bad rows fail and the
    others get exactly their single-request answers."""
    batcher = TaskBatcher(bank)
    try:
        holding, gate = threading.Event(), threading.Event()
        batcher.call(lambda _: (holding.set(), gate.wait(30)))
        assert holding.wait(30)
        jobs = [(task, seed, INSTRUCTION) for seed in range(2) for task in TASKS]
        jobs.insert(2, ("push", 0, "push <image> it"))
        jobs.append(("reach", 1, "reach <image>"))
        futures = [batcher.submit(task, {**observation(seed), "instruction": text}) for task, seed, text in jobs]
        gate.set()
        for future in futures:
            future.exception(60)
    finally:
        batcher.close()  # the worker is done with the bank: the references below cannot race it
    for (task, seed, text), future in zip(jobs, futures):
        if "<image>" in text:
            with pytest.raises(ValueError, match="reserved token '<image>'"):
                future.result()
            continue
        alone = bank.activate(task).predict_chunk({**observation(seed), "instruction": text})
        np.testing.assert_array_equal(future.result().chunk, alone)


def test_decoding_runs_off_the_event_loop(url, monkeypatch):
    """A slow image decode (the 12000x12000 PNG took 2.6 s) must not stall /health: here the decode
    blocks until released, and /health must answer meanwhile."""
    started, release = threading.Event(), threading.Event()
    decode = wire._decode_image_file

    def slow_decode(*args, **kwargs):
        started.set()
        release.wait(30)
        return decode(*args, **kwargs)

    monkeypatch.setattr(wire, "_decode_image_file", slow_decode)
    body = good_body("reach", 0)
    body["observation"]["agentview_rgb"] = encode_image(observation(0)["agentview_rgb"], "png")
    result = {}
    thread = threading.Thread(target=lambda: result.update(act=request(url, "POST", "/act", body)))
    thread.start()
    try:
        assert started.wait(30)
        status, health = request(url, "GET", "/health", timeout=5)  # times out if the loop is blocked
        assert status == 200 and health["status"] == "ok"
    finally:
        release.set()
        thread.join(60)
    assert result["act"][0] == 200


def broken_bank(bank_dir, folder):
    """The bank plus two damaged bundles: one with a malformed bundle.json, sorted first (so the
    base must come from another bundle), one with a truncated policy.safetensors."""
    shutil.copytree(bank_dir, folder)
    shutil.copytree(folder / "reach", folder / "a_garbled")
    (folder / "a_garbled" / "bundle" / "bundle.json").write_text('{"format_version": 1, "policy": {')
    shutil.copytree(folder / "reach", folder / "b_truncated")
    weights = folder / "b_truncated" / "bundle" / "policy.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return folder


def test_a_corrupt_bundle_in_the_bank_is_reported_and_the_others_are_served(bank_dir, tmp_path):
    bank = load_bank(broken_bank(bank_dir, tmp_path / "bank"))
    assert bank.names == sorted(TASKS)
    assert set(bank.failed) == {"a_garbled", "b_truncated"}
    assert "bundle.json is damaged" in bank.failed["a_garbled"]
    assert "policy.safetensors is damaged" in bank.failed["b_truncated"]
    assert "copy the bundle again" in bank.failed["b_truncated"]
    with threaded_server(bank) as address:
        status, health = request(address, "GET", "/health")
        assert status == 200 and health["tasks"] == sorted(TASKS) and set(health["failed"]) == set(bank.failed)
        assert set(request(address, "GET", "/tasks")[1]["failed"]) == set(bank.failed)
        assert request(address, "POST", "/act", good_body("push", 1))[0] == 200


def test_client_recovers_once_the_server_is_back(bank):
    """A client whose request failed while the server was down works again once it is up (it used
    to raise CannotSendRequest forever)."""
    port = free_port()
    client = PolicyClient(f"http://{LOOPBACK}:{port}", timeout=10)
    with pytest.raises(ConnectionRefusedError):
        client.health()
    for _ in range(2):  # up, down, up again
        with threaded_server(bank, port=port):
            assert client.act(observation(0), INSTRUCTION, task="reach").chunk.shape == (4, 4)
        with pytest.raises(OSError):
            client.health()


def test_port_in_use_is_refused_before_announcing(bank_dir, capsys):
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--bank", str(bank_dir), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert "serving" not in out
    assert f"cannot serve on 127.0.0.1:{port}" in err and "pass another --port" in err


def test_the_servers_instruction_limit_defaults_to_predict_chunks():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert serve.get_default("max_instruction_chars") == MAX_INSTRUCTION_CHARS


@pytest.mark.slow
def test_kill_9_then_restart_serves_again(bank_dir, tmp_path):
    """kill -9 the real server process mid-run; the same client gets the same answers from a server
    restarted on the same port; the damaged bundle is named in the log and in /health each time."""
    folder = broken_bank(bank_dir, tmp_path / "bank")
    port = free_port()
    client = PolicyClient(f"http://{LOOPBACK}:{port}", timeout=30)
    outputs, answers = [], []
    for _ in range(2):
        proc = start_subprocess(folder, port, "--threads", "1")
        try:
            assert set(client.health()["failed"]) == {"a_garbled", "b_truncated"}
            answers.append({task: client.act(observation(2), INSTRUCTION, task=task).chunk for task in TASKS})
        finally:
            outputs.append(stop_subprocess(proc, signal.SIGKILL)[1])
        with pytest.raises(OSError):
            client.health()
    for output in outputs:
        assert "warning: task 'b_truncated' is not served" in output and "policy.safetensors is damaged" in output
    for task in TASKS:
        np.testing.assert_array_equal(answers[0][task], answers[1][task])
