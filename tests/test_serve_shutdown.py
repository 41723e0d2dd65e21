"""`vla-peft serve` as a real process on loopback: SIGTERM / SIGINT let a request in flight finish,
refuse new connections, exit cleanly; a restarted server gives the same answers."""

from __future__ import annotations

import json
import signal
import socket
import time

import numpy as np
import pytest

from serve_synth import LOOPBACK, TASKS, free_port, observation, start_subprocess, stop_subprocess, write_bank
from vla_peft.serve.client import PolicyClient
from vla_peft.serve.wire import encode_observation


def answers(port: int) -> dict[str, np.ndarray]:
    client = PolicyClient(f"http://{LOOPBACK}:{port}")
    try:
        return {task: client.act(observation(5), "reach the red cube", task=task).chunk for task in TASKS}
    finally:
        client.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def shut_down_during_a_request(proc, port: int, sig: int) -> tuple[dict, int, str]:
    """Start an act request (headers and half its body sent), signal the server, check that new
    connections are refused, finish sending, and return the answer, the exit code and the output."""
    body = json.dumps({"task": "push", "instruction": "reach the red cube", "id": "in-flight",
                       "observation": encode_observation(observation(5), ["agentview"],
                                                         ["ee_pos", "gripper_states"])}).encode()
    sock = socket.create_connection((LOOPBACK, port), timeout=30)
    try:
        sock.sendall(b"POST /act HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
        time.sleep(0.3)  # the server has the request (headers read, body awaited)
        proc.send_signal(sig)
        deadline = time.monotonic() + 15
        while not refused(port):  # the listener closes first
            assert time.monotonic() < deadline, "the server kept accepting connections after the signal"
            time.sleep(0.05)
        assert proc.poll() is None  # ...while the request in flight keeps it alive
        sock.sendall(body[len(body) // 2:])
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    finally:
        sock.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    output, _ = proc.communicate(timeout=30)  # exits by itself once the request is answered
    return json.loads(payload), proc.returncode, output


@pytest.mark.slow
def test_signal_finishes_the_request_in_flight_and_a_restart_answers_the_same(tiny_llava_dir, tmp_path):
    bank_dir = write_bank(tiny_llava_dir, tmp_path / "bank")
    port = free_port()
    proc = start_subprocess(bank_dir, port, "--threads", "1")
    try:
        first = answers(port)
        answer, code, output = shut_down_during_a_request(proc, port, signal.SIGTERM)
    finally:
        stop_subprocess(proc)
    assert code == 0 and "server stopped" in output, output
    assert answer["id"] == "in-flight" and answer["task"] == "push"
    np.testing.assert_array_equal(np.asarray(answer["chunk"], np.float32), first["push"])

    proc = start_subprocess(bank_dir, port, "--threads", "1")  # the same port is free again
    try:
        again = answers(port)
        answer, code, output = shut_down_during_a_request(proc, port, signal.SIGINT)
    finally:
        stop_subprocess(proc)
    assert code == 0 and "server stopped" in output, output
    for task in TASKS:
        np.testing.assert_array_equal(again[task], first[task])
    np.testing.assert_array_equal(np.asarray(answer["chunk"], np.float32), first["push"])
