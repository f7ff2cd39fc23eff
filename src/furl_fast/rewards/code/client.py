"""Generation client (VLM-CaR step 1): ask a VLM behind any OpenAI-compatible chat-completions
endpoint for a task's sub-tasks and one checker program per sub-task, verify, and send the failure
report back for a bounded number of rounds.

Nothing is ever sent anywhere unless a base URL and a model are configured explicitly. The API key
is read from the environment variable named by `VLMConfig.api_key_env` and only ever goes into the
Authorization header. Standard library only (urllib, zlib for the PNG frames).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from furl_fast.rewards.code.program_set import ProgramSet
from furl_fast.rewards.code.verifier import VerificationReport

__all__ = [
    "GenerationError",
    "GenerationResult",
    "VLMClient",
    "VLMConfig",
    "encode_png",
    "generate_program_set",
    "parse_program_set",
]

log = logging.getLogger(__name__)

_MAX_RESPONSE_BYTES = 16 * 2**20

METAWORLD_STATE_DESCRIPTION = (
    "state is the Meta-World v3 observation, a float array of 39 values: state[0:3] hand (gripper) "
    "xyz in metres, state[3] gripper opening, state[4:7] first object's xyz (for drawers: the "
    "handle; for buttons: the button), state[7:11] its quaternion, state[11:18] a second object's "
    "xyz + quaternion (zeros if none), state[18:36] the previous step's state[0:18], state[36:39] "
    "goal xyz (zeros when hidden). x points right, y away from the robot, z up."
)


class GenerationError(RuntimeError):
    """The endpoint could not be reached or answered something that is not a chat completion."""


@dataclass(frozen=True)
class VLMConfig:
    """Where and how to ask the VLM. Empty base_url / model = not configured (nothing is called)."""

    base_url: str = ""
    """Endpoint root, e.g. 'https://api.openai.com/v1' or 'http://127.0.0.1:8000/v1';
    '/chat/completions' is appended."""
    model: str = ""
    """Model name sent in the request (must accept image input)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable that holds the API key; '' for endpoints without a key."""
    timeout_s: float = 120.0
    """Socket timeout of one request."""
    max_rounds: int = 3
    """Generation rounds at most: the first request plus up to max_rounds - 1 feedback rounds."""
    temperature: float = 0.0
    max_tokens: int = 4096

    @property
    def configured(self) -> bool:
        return bool(self.base_url and self.model)


@dataclass
class GenerationResult:
    """accepted: the final program set passed verification. program_set: the last parsed set (None
    if no reply could be parsed). reports: one verification report per verified round."""

    accepted: bool
    program_set: ProgramSet | None
    rounds: int
    reports: list[VerificationReport] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)


class VLMClient:
    """Minimal OpenAI-compatible chat-completions client."""

    def __init__(self, config: VLMConfig):
        if not config.configured:
            raise ValueError(
                "no VLM endpoint configured: set VLMConfig.base_url and VLMConfig.model (nothing is "
                "called otherwise), or use a reference program set"
            )
        if not config.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {config.base_url!r}"
            )
        self.config = config
        self._key = None
        if config.api_key_env:
            self._key = os.environ.get(config.api_key_env)
            if not self._key:
                raise ValueError(
                    f"environment variable {config.api_key_env} (VLMConfig.api_key_env) holds no API "
                    "key; set it, or set api_key_env='' for an endpoint that needs none"
                )

    def chat(self, messages: list[dict]) -> str:
        """POST the messages, return the first choice's text."""
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        body = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                raw = response.read(_MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as e:
            detail = e.read(2000).decode(errors="replace") if e.fp else ""
            raise GenerationError(f"HTTP {e.code} from {url}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise GenerationError(f"cannot reach {url}: {e}") from None
        if len(raw) > _MAX_RESPONSE_BYTES:
            raise GenerationError(f"response from {url} is larger than {_MAX_RESPONSE_BYTES} bytes")
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise GenerationError(f"not a chat completion from {url}: {raw[:500]!r}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise GenerationError(f"chat completion from {url} has no text content")
        return content


def encode_png(frame: np.ndarray) -> bytes:
    """PNG bytes of one frame: (H, W, 3) uint8 RGB. Filter type 0 on every row, zlib level 6."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or 0 in frame.shape:
        raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    h, w, _ = frame.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), frame.reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit truecolour, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def _data_url(frame: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(frame)).decode()


def build_messages(
    task_description: str,
    first_frame: np.ndarray,
    last_frame: np.ndarray,
    state_description: str = METAWORLD_STATE_DESCRIPTION,
) -> list[dict]:
    """The first request: instructions, the task, and the first and last expert frames."""
    system = (
        "You write reward code for a robot. Split the task into a short ordered list of sub-tasks "
        "and write, for each, a Python program that defines `done(frame, state) -> bool`, True once "
        "that sub-task is achieved. frame is a (H, W, 3) uint8 RGB image; "
        + state_description
        + " Programs may import only numpy and math (and cv2 if available); they cannot read or "
        "write files, use the network or other modules, or use names/attributes starting with "
        "an underscore. A program's module is run afresh at the start of every episode and done() "
        "is called on every step of it in order, so module-level variables (with `global`) may "
        "remember earlier steps, e.g. the initial object position. done() must return a bool and "
        "finish quickly. Answer with one JSON object and nothing else: "
        '{"subtasks": [{"description": "...", "program": "..."}, ...]}'
    )
    user = [
        {
            "type": "text",
            "text": f"Task: {task_description}\nThe two images are the first and the last frame "
            "of a successful expert demonstration.",
        },
        {"type": "image_url", "image_url": {"url": _data_url(first_frame)}},
        {"type": "image_url", "image_url": {"url": _data_url(last_frame)}},
    ]
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_program_set(reply: str, task: str) -> ProgramSet:
    """Parse a VLM reply: a JSON object {"subtasks": [{"description", "program"}, ...]}, bare or
    in a fenced code block. Raises ValueError with the reason."""
    candidates = re.findall(r"```(?:json)?\s*\n(.*?)```", reply, flags=re.DOTALL)
    start, end = reply.find("{"), reply.rfind("}")
    if start != -1 and end > start:
        candidates.append(reply[start : end + 1])
    last_error = "the reply contains no JSON object"
    for text in candidates:
        try:
            return ProgramSet.from_dict(json.loads(text), task=task)
        except (ValueError, TypeError) as e:
            last_error = str(e)
    raise ValueError(f"cannot parse the reply as a program set: {last_error}")


def generate_program_set(
    task: str,
    task_description: str,
    first_frame: np.ndarray,
    last_frame: np.ndarray,
    verify: Callable[[ProgramSet], VerificationReport],
    config: VLMConfig,
    state_description: str = METAWORLD_STATE_DESCRIPTION,
) -> GenerationResult:
    """Ask, verify, send back the failures; at most config.max_rounds requests.

    verify: e.g. `lambda ps: verifier.verify(ps, expert_rollouts, random_rollouts)`.
    first_frame, last_frame: (H, W, 3) uint8 frames of an expert rollout.
    Raises GenerationError if the endpoint fails; an unparseable or rejected reply is fed back.
    """
    if config.max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {config.max_rounds}")
    client = VLMClient(config)
    messages = build_messages(task_description, first_frame, last_frame, state_description)
    result = GenerationResult(accepted=False, program_set=None, rounds=0)
    for round_index in range(config.max_rounds):
        reply = client.chat(messages)
        result.rounds = round_index + 1
        result.replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
        try:
            program_set = parse_program_set(reply, task)
        except ValueError as e:
            feedback = f"{e}. Answer with the JSON object only."
            log.info("round %d: unparseable reply: %s", result.rounds, e)
        else:
            result.program_set = program_set
            report = verify(program_set)
            result.reports.append(report)
            log.info("round %d: %s", result.rounds, "accepted" if report.accepted else "rejected")
            if report.accepted:
                result.accepted = True
                return result
            feedback = (
                "The programs failed verification on recorded rollouts (expert demonstrations "
                "must complete every sub-task in order; random-action rollouts must not).\n"
                + report.summary()
                + "\nFix the programs and answer with the complete JSON object again."
            )
        messages.append({"role": "user", "content": feedback})
    return result
