"""Generation client (VLM-CaR step 1): ask a VLM behind any OpenAI-compatible chat-completions
endpoint for a task's sub-tasks and one checker program per sub-task, verify, and send the failure
report back for a bounded number of rounds.

Nothing is ever sent anywhere unless a base URL and a model are configured explicitly. The API key
is read from the environment variable named by `VLMConfig.api_key_env` and only ever goes into the
Authorization header: its value is removed from every message sent and from the transcript. Requests
go through the official `openai` package (pip install 'furl_fast[vlm]'), which retries 429, 5xx,
timeouts and dropped connections with exponential backoff.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from furl_fast.rewards.code.program_set import ProgramSet, json_depth
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

_MAX_REPLY_JSON_DEPTH = 8  # a program set nests 3 deep; deeper replies are not parsed at all

METAWORLD_STATE_DESCRIPTION = (
    "state is the Meta-World v3 observation, a float array of 39 values: state[0:3] hand (gripper) "
    "xyz in metres, state[3] gripper opening, state[4:7] first object's xyz (for drawers: the "
    "handle; for buttons: the button), state[7:11] its quaternion, state[11:18] a second object's "
    "xyz + quaternion (zeros if none), state[18:36] the previous step's state[0:18], state[36:39] "
    "goal xyz (zeros when hidden). x points right, y away from the robot, z up."
)


class GenerationError(RuntimeError):
    """The endpoint could not be reached or answered something that is not a chat completion.
    `result` holds what was done before (the transcript included), so it can still be audited."""

    def __init__(self, message: str, result: GenerationResult | None = None):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class VLMConfig:
    """Where and how to ask the VLM. Empty base_url / model = not configured (nothing is called)."""

    base_url: str = ""
    """Endpoint root, e.g. 'https://api.openai.com/v1' or 'http://127.0.0.1:8000/v1'."""
    model: str = ""
    """Model name sent in the request (must accept image input)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable that holds the API key (any value, e.g. 'none', for a local
    server that checks none)."""
    timeout_s: float = 120.0
    """Time limit of one request."""
    max_retries: int = 4
    """Retries of a request that got 429, a 5xx, a timeout or a dropped connection (exponential
    backoff, or the server's Retry-After)."""
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
    if no reply could be parsed). reports: one verification report per verified round. transcript:
    every request (without the API key) and its response or error, in order."""

    accepted: bool
    program_set: ProgramSet | None
    rounds: int
    reports: list[VerificationReport] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    transcript: list[dict] = field(default_factory=list)


class VLMClient:
    """OpenAI-compatible chat-completions client that keeps a transcript of everything it sends and
    receives, with the API key's value removed."""

    def __init__(self, config: VLMConfig):
        if not config.configured:
            raise ValueError(
                "no VLM endpoint configured: give a base URL and a model (nothing is called "
                "otherwise), or use a hand-written reference program set"
            )
        if not config.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base URL must start with http:// or https://, got {config.base_url!r}")
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if not key:
            raise ValueError(
                f"environment variable {config.api_key_env or '(none named)'} holds no API key; set "
                "it (any value, e.g. 'none', for a local server that checks no key)"
            )
        try:
            import openai
        except ImportError:
            raise ValueError(
                "the openai package is not installed: pip install 'furl_fast[vlm]'"
            ) from None
        self.config = config
        self.transcript: list[dict] = []
        self._openai = openai
        self._key = key
        self._client = openai.OpenAI(
            api_key=key,
            base_url=config.base_url,
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )

    def redact(self, value):
        """value (str, or JSON-like lists/dicts of them) with the API key's value replaced."""
        if isinstance(value, str):
            return value.replace(self._key, "[API key]") if len(self._key) >= 4 else value
        if isinstance(value, list):
            return [self.redact(v) for v in value]
        if isinstance(value, dict):
            return {k: self.redact(v) for k, v in value.items()}
        return value

    def chat(self, messages: list[dict]) -> str:
        """Send the messages, return the first choice's text. GenerationError when the endpoint
        fails (after the retries) or answers something that is not a chat completion."""
        request = self.redact(
            {
                "model": self.config.model,
                "messages": messages,
                "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens,
            }
        )
        entry: dict = {"request": request}
        self.transcript.append(entry)
        url = self.config.base_url
        oa = self._openai
        try:
            completion = self._client.chat.completions.create(**request)
        except oa.APITimeoutError:
            error = (f"no answer from {url} within {self.config.timeout_s:g} s "
                     f"({self.config.max_retries} retries)")
        except oa.APIStatusError as e:
            error = f"HTTP {e.status_code} from {url}: {str(e.message)[:300]}"
        except oa.APIConnectionError as e:
            error = f"cannot reach {url}: {e}"
        except oa.OpenAIError as e:
            error = f"not a chat completion from {url}: {str(e)[:300]}"
        else:
            error = None
        if error is None:
            entry["response"] = self.redact(_jsonable(completion))
            try:
                content = completion.choices[0].message.content
            except (AttributeError, IndexError, TypeError):
                content = None
            if isinstance(content, list):  # some servers return content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if isinstance(content, str):
                return content
            error = f"not a chat completion from {url}: no text in the first choice"
        error = self.redact(" ".join(error.split()))
        entry["error"] = error
        raise GenerationError(error)


def _jsonable(completion) -> object:
    dump = getattr(completion, "model_dump", None)
    return dump(mode="json") if callable(dump) else str(completion)


def encode_png(frame: np.ndarray) -> bytes:
    """PNG bytes of one frame: (H, W, 3) uint8 RGB."""
    import imageio.v3 as iio

    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or 0 in frame.shape:
        raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    return iio.imwrite("<bytes>", frame, extension=".png")


def _data_url(frame: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(frame)).decode()


def build_messages(
    task_description: str,
    first_frame: np.ndarray,
    last_frame: np.ndarray,
    inputs: str = "state",
    state_description: str = METAWORLD_STATE_DESCRIPTION,
) -> list[dict]:
    """The first request: instructions, the task, and the first and last expert frames.
    inputs "frame": programs define `done(frame)`; "state": `done(frame, state)` (ProgramSet)."""
    h, w = np.asarray(first_frame).shape[:2]
    frame_text = (
        f"frame is the ({h}, {w}, 3) uint8 RGB camera image of the current step, from the same "
        "camera as the two images shown"
    )
    if inputs == "frame":
        signature = "`done(frame) -> bool`"
        observed = frame_text + ". Judge from the image alone."
    else:
        signature = "`done(frame, state) -> bool`"
        observed = frame_text + "; " + state_description
    system = (
        "You write reward code for a robot. Split the task into a short ordered list of sub-tasks "
        f"and write, for each, a Python program that defines {signature}, True once that sub-task "
        "is achieved. " + observed + " Programs may import only numpy and math (and cv2 if "
        "available); they cannot read or write files, use the network or other modules, or use "
        "names/attributes starting with an underscore. A program's module is run afresh at the "
        "start of every episode and done() is called on every step of it in order, so module-level "
        "variables (with `global`) may remember earlier steps, e.g. the initial object position. "
        "done() must return a bool and finish quickly. The programs are checked on recorded expert "
        "demonstrations (every sub-task must complete, in order) and on random-action episodes "
        "(all sub-tasks together may complete on at most 10% of them). Answer with one JSON object "
        'and nothing else: {"subtasks": [{"description": "...", "program": "..."}, ...]}'
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


def parse_program_set(reply: str, task: str, inputs: str = "state") -> ProgramSet:
    """Parse a VLM reply: a JSON object {"subtasks": [{"description", "program"}, ...]}, bare, in a
    fenced code block or with prose around it. inputs: what the programs were asked to read. Raises
    ValueError with the reason (never quoting the reply)."""
    candidates = re.findall(r"```(?:json)?\s*\n(.*?)```", reply, flags=re.DOTALL)
    start, end = reply.find("{"), reply.rfind("}")
    if start != -1 and end > start:
        candidates.append(reply[start : end + 1])
    last_error = "the reply contains no JSON object"
    for text in candidates:
        if json_depth(text) > _MAX_REPLY_JSON_DEPTH:
            last_error = f"the JSON nests deeper than {_MAX_REPLY_JSON_DEPTH} levels"
            continue
        try:
            data = json.loads(text)
            if isinstance(data, dict):
                data = {**data, "inputs": inputs}
            return ProgramSet.from_dict(data, task=task)
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
    inputs: str = "state",
    state_description: str = METAWORLD_STATE_DESCRIPTION,
    on_round: Callable[[int, str, VerificationReport | None], None] | None = None,
) -> GenerationResult:
    """Ask, verify, send back the failures; at most config.max_rounds requests.

    verify: e.g. `lambda ps: verifier.verify(ps, expert_rollouts, random_rollouts)`.
    first_frame, last_frame: (H, W, 3) uint8 frames of an expert rollout.
    inputs: "frame" or "state", what the programs may read (ProgramSet.inputs).
    on_round(round, event, report): progress callback; event is "asking", "unparseable",
    "accepted" or "rejected" (report given for the last two).
    The feedback sent back holds only the verification report (rates and the sandbox's error
    messages), never what a program printed. Raises GenerationError if the endpoint fails, with the
    result so far (and its transcript) as `.result`.
    """
    if config.max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {config.max_rounds}")
    client = VLMClient(config)
    messages = build_messages(task_description, first_frame, last_frame, inputs, state_description)
    result = GenerationResult(accepted=False, program_set=None, rounds=0,
                              transcript=client.transcript)
    notify = on_round or (lambda *args: None)
    for round_index in range(config.max_rounds):
        notify(round_index + 1, "asking", None)
        try:
            reply = client.chat(messages)
        except GenerationError as e:
            raise GenerationError(str(e), result) from None
        result.rounds = round_index + 1
        result.replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
        try:
            program_set = parse_program_set(reply, task, inputs)
        except ValueError as e:
            feedback = f"{e}. Answer with the JSON object only."
            log.info("round %d: unparseable reply: %s", result.rounds, e)
            notify(result.rounds, "unparseable", None)
        else:
            result.program_set = program_set
            report = verify(program_set)
            result.reports.append(report)
            notify(result.rounds, "accepted" if report.accepted else "rejected", report)
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
