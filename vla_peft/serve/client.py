"""The robot side: a small client for the control loop, and a policy-like object over it.

``PolicyClient`` keeps one HTTP/1.1 connection open per thread (standard library http.client
and numpy, no HTTP dependency). ``RemotePolicy`` looks like a
``VLAPolicy`` to the evaluator (``config`` and a batched ``predict_chunk``), so
``vla_peft.eval`` runs the same closed loop through the server as in process.
"""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from vla_peft.serve.wire import encode_observation


class ServerError(RuntimeError):
    """The server answered with an error (its message says what was wrong with the request)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"policy server answered {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Action:
    chunk: np.ndarray      # (K, A) raw actions, in the environment's units
    action: np.ndarray     # chunk[0]: the next action
    task: str              # the task the server acted for
    id: str | int | None   # the request's tag, echoed
    latency_ms: float      # server-side time for this request
    batch_size: int        # requests that shared its forward pass


class PolicyClient:
    """``PolicyClient("http://127.0.0.1:8000").act(obs, instruction, task="reach").action``.

    One connection per thread (the client may be shared by threads of one process). When the
    server is unreachable a request raises (``ConnectionRefusedError``, a timeout...); the next
    request connects afresh, so the client works again as soon as the server is back."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 30.0,
                 image_format: str = "raw") -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"server url {url!r} must look like http://HOST:PORT")
        self.host, self.port = parts.hostname, parts.port or 80
        self.token, self.timeout, self.image_format = token, timeout, image_format
        self._local = threading.local()
        self._tasks: dict | None = None

    # ------------------------------------------------------------------ endpoints
    def health(self) -> dict:
        return self._request("GET", "/health")

    def tasks(self) -> dict:
        """Task name -> {"config": policy config dict, "method": ...} (cached)."""
        if self._tasks is None:
            self._tasks = self._request("GET", "/tasks")["tasks"]
        return self._tasks

    def activate(self, task: str) -> None:
        self._request("POST", "/activate", {"task": task})

    def metrics(self) -> dict:
        return self._request("GET", "/metrics")

    def act(self, obs: dict, instruction: str, task: str | None = None, request_id: str | int | None = None,
            binarize_gripper: bool | None = None) -> Action:
        """Send one (unbatched) environment observation; cameras and state keys are taken from the
        task's config, other entries of ``obs`` stay home."""
        config = self.tasks()[task]["config"] if task is not None else self._active_config()
        body = {"task": task, "id": request_id, "instruction": instruction, "binarize_gripper": binarize_gripper,
                "observation": encode_observation(obs, config["cameras"], config["state_keys"], self.image_format)}
        if task is None:
            del body["task"]
        answer = self._request("POST", "/act", body)
        chunk = np.asarray(answer["chunk"], dtype=np.float32)
        return Action(chunk, chunk[0], answer["task"], answer["id"], answer["latency_ms"], answer["batch_size"])

    def _active_config(self) -> dict:
        active = self.health()["active"]
        return self.tasks()[active]["config"]

    # ------------------------------------------------------------------ transport
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return conn

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):
            reused = getattr(self._local, "conn", None) is not None
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (OSError, http.client.HTTPException) as err:
                self.close()  # any failure leaves the connection unusable: the next request opens a new one
                stale = isinstance(err, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                if attempt or not (reused and stale):  # only a kept-alive connection the server dropped is retried
                    raise
        try:
            content = json.loads(payload)
        except json.JSONDecodeError:
            content = {"error": payload[:200].decode("utf-8", "replace")}
        if response.status >= 400:
            raise ServerError(response.status, content.get("error") or content.get("detail") or str(content))
        return content

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class RemotePolicy:
    """A policy for ``vla_peft.eval`` that acts through the server for one task."""

    def __init__(self, client: PolicyClient, task: str) -> None:
        from vla_peft.policy import PolicyConfig

        tasks = client.tasks()
        if task not in tasks:
            raise KeyError(f"the server has no task {task!r}; it serves {sorted(tasks)}")
        self.client, self.task = client, task
        self.config = PolicyConfig.from_dict(tasks[task]["config"])

    def predict_chunk(self, obs: dict, binarize_gripper: bool | None = None) -> np.ndarray:
        """(K, A) for one observation, (B, K, A) for a batch: one request per observation."""
        if isinstance(obs["instruction"], str):
            return self.client.act(obs, obs["instruction"], self.task, binarize_gripper=binarize_gripper).chunk
        chunks = []
        for i, instruction in enumerate(obs["instruction"]):
            single = {k: v[i] for k, v in obs.items() if k != "instruction"}
            chunks.append(self.client.act(single, instruction, self.task, binarize_gripper=binarize_gripper).chunk)
        return np.stack(chunks)
