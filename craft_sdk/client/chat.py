"""A chat VLM over the OpenAI-compatible chat completions API, as a text-only black box.

Classification is a multiple-choice question per image (``docs/wire-format.md``, "Chat VLMs")::

    Which option completes the description of this image: "<context> ___."?
    A. <class 1>
    B. <class 2>
    ...
    Answer with the option's letter only.

sent with the image as a PNG data URI, ``max_tokens=1``. Options are labelled by letters, not
numbers: ``A``-``T`` are one token in every common tokenizer, while numbers from 10 up split into
several digit tokens in many (Llama, Qwen), which would make the answer's first token ambiguous.

**Logprobs mode** (default, ``samples=0``): ``logprobs=True, top_logprobs=20, temperature=0``.
The answer token's ``top_logprobs`` give the options' probabilities: tokens are matched to letters
after stripping spaces and a trailing ``.``/``)``/``:`` (variants add up); options not listed share
the unlisted mass ``1 - sum(listed)`` equally, each capped at the smallest listed probability (floor
1e-6). Scores are the log-probabilities renormalised over the options.

**More than 20 classes** (the top-logprobs limit): groups of at most 20 options, the first class
(the *reference*) as option ``A`` of every group and 19 other classes each. Under the choice
model every softmax answer obeys (ratios of two options do not depend on the others), the score
of class c in group g is ``log p_g(c) - log p_g(reference)``: the full distribution is recovered
exactly, and softmax of the scores equals the model's probabilities over all C classes. Cost:
``ceil((C - 1) / 19)`` requests per image instead of 1.

**Sampled mode** (``samples=n``, for endpoints without logprobs): one request with ``n=n`` and
``temperature=1`` per image and group (more requests if the endpoint returns fewer choices);
probabilities are add-alpha smoothed frequencies ``(count + alpha) / (answers + alpha * k)`` over
the k options; cost ``n`` output tokens per request.

**Refused, filtered or unparseable answers** (``message.refusal`` set, ``finish_reason:
"content_filter"``, or no option letter in the answer) are counted in :attr:`ChatVLMClient.problems`
and logged as a warning; such a row (or group) scores uniform (all its options equal), which the
caller sees as a maximally unsure prediction, never a dropped row. In sampled mode a bad sample is
counted and left out of the frequencies.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ClientError, ConfigError
from .base import DEFAULT_TEMPLATE, BaseClient, Capabilities
from .hosted import IMAGE_TOKENS, Transport, parse_model_url, text_tokens, usage_tokens
from .usage import TEMPLATE_TOKENS, ProviderUsage, attempt_bound

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRST"
TOP_LOGPROBS = 20  # the common API's limit, and the largest group
_QUESTION = 'Which option completes the description of this image: "{template} ___."?'
_INSTRUCTION = "Answer with the option's letter only."
_QUESTION_RE = re.compile(r'^Which option completes the description of this image: "(.*) ___\."\?$')
_OPTION_RE = re.compile(r"^([A-T])\. (.+)$")
_ANSWER_RE = re.compile(r"^\s*\(?([A-T])(?:[\s.):,]|$)")
PROBLEMS = ("refused", "filtered", "unparseable")


def build_question(template: str, options: Sequence[str]) -> str:
    """The multiple-choice question for ``options`` (at most 20) under a context ``template``."""
    lines = [_QUESTION.format(template=template)]
    lines += [f"{LETTERS[i]}. {name}" for i, name in enumerate(options)]
    lines.append(_INSTRUCTION)
    return "\n".join(lines)


def parse_question(text: str) -> tuple[str, list[str]]:
    """(context template, options) of a :func:`build_question` text; the default template when none is stated.

    Raises:
        ClientError: no lettered options ``A. ...`` in order.
    """
    template, options = DEFAULT_TEMPLATE, []
    for line in map(str.strip, text.splitlines()):
        q, o = _QUESTION_RE.match(line), _OPTION_RE.match(line)
        if q:
            template = q.group(1)
        elif o and len(options) < len(LETTERS) and o.group(1) == LETTERS[len(options)]:
            options.append(o.group(2).strip())
    if not options:
        raise ClientError("the message lists no options 'A. <name>', 'B. <name>', ... ")
    return template, options


def answer_letter(text: str | None) -> str | None:
    """The option letter an answer starts with (``"B"``, ``" B."``, ``"(B)"``), or None."""
    m = _ANSWER_RE.match(text or "")
    return m.group(1) if m else None


def groups_of(n_classes: int, size: int = TOP_LOGPROBS) -> list[list[int]]:
    """Class indices per request: all classes when they fit, else the reference 0 plus ``size - 1`` others each."""
    if n_classes <= size:
        return [list(range(n_classes))]
    rest = list(range(1, n_classes))
    return [[0, *rest[i : i + size - 1]] for i in range(0, len(rest), size - 1)]


@dataclass(frozen=True)
class ChatConfig:
    """Options of a :class:`ChatVLMClient`.

    Args:
        samples: 0 = logprobs mode; n > 0 = n sampled answers per image and group (endpoints without logprobs).
        alpha: add-alpha smoothing of sampled frequencies.
        group_size: options per request, 2-20 (the top-logprobs limit).
        max_concurrency: requests in flight at once.
        max_retries: the openai client's retries (429 honours Retry-After).
        timeout: seconds per request.
        image_tokens: tokens an image is assumed to cost in :meth:`ChatVLMClient.estimate_usage`.
        cache_size: image sets kept (encoded PNGs).
    """

    samples: int = 0
    alpha: float = 1.0
    group_size: int = TOP_LOGPROBS
    max_concurrency: int = 8
    max_retries: int = 6
    timeout: float = 120.0
    image_tokens: int = IMAGE_TOKENS
    cache_size: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.samples <= 128:
            raise ConfigError(f"samples must be 0 (logprobs) or 1-128 sampled answers, got {self.samples}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha (smoothing) must be > 0, got {self.alpha}")
        if not 2 <= self.group_size <= TOP_LOGPROBS:
            raise ConfigError(f"group_size must be 2-{TOP_LOGPROBS}, got {self.group_size}")
        if self.max_concurrency < 1 or self.max_retries < 0 or self.cache_size < 1 or self.image_tokens < 0:
            raise ConfigError("max_concurrency and cache_size must be >= 1, max_retries and image_tokens >= 0")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")


class ChatVLMClient(BaseClient):
    """A text-only black box behind an OpenAI-compatible chat completions endpoint.

    Args:
        base_url: the openai ``base_url``, e.g. ``"http://127.0.0.1:8765/v1"``.
        model: the ``model`` field of every request.
        api_key: bearer key; default ``CRAFT_API_KEY``.
        model_id: identifier stored in adapters (default ``"chat:<base_url>?model=<model>"``).
        config: a :class:`ChatConfig`; keyword ``overrides`` replace its fields.

    ``predict`` returns log-probabilities [N, C] (``output="logits"``: their softmax is the model's
    answer distribution over the classes). ``usage`` counts requests (retries included), images and
    the endpoint's tokens; ``problems`` counts refused, filtered and unparseable answers.

    Example:
        >>> client = ChatVLMClient("http://127.0.0.1:8765/v1", "demo", api_key="...")  # doctest: +SKIP
        >>> client.predict(images, ["cat", "dog"], "a photo of a").shape              # doctest: +SKIP
        (2, 2)
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, model_id: str | None = None,
                 config: ChatConfig | None = None, **overrides: Any) -> None:
        try:
            self.config = replace(config or ChatConfig(), **overrides)
        except TypeError:
            raise ConfigError(f"unknown ChatVLMClient option(s) {sorted(overrides)}; valid: {sorted(ChatConfig.__dataclass_fields__)}") from None
        super().__init__(self.config.cache_size)
        self.base_url, self.model = base_url, model
        self.usage = ProviderUsage()
        self.problems: Counter[str] = Counter({p: 0 for p in PROBLEMS})
        self._caps = Capabilities(model_id or f"chat:{base_url}?model={model}", output="logits")
        self._wire = Transport(base_url, api_key, self.usage, max_retries=self.config.max_retries,
                               timeout=self.config.timeout, max_concurrency=self.config.max_concurrency)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> ChatVLMClient:
        """From ``http(s)://HOST[:PORT]/v1?model=NAME[&samples=N]`` (the part after ``chat+``)."""
        parsed = parse_model_url(url, ["samples"])
        if "samples" in parsed.options:
            kwargs.setdefault("samples", _int_option(parsed.options["samples"], "samples"))
        return cls(parsed.base_url, parsed.model, **kwargs)

    # ------------------------------------------------------------------ protocol

    def capabilities(self, template: str = DEFAULT_TEMPLATE) -> Capabilities:
        """Text only, log-probabilities; no request is made."""
        if not template.strip() or "\n" in template or '"' in template:
            raise ClientError(f"template {template!r} must be one line of text without double quotes")
        return self._caps

    def _prepare(self, images: list[Image.Image]) -> list[str]:
        return [data_uri(im) for im in images]

    def _predict_images(self, prepared: list[str], class_names: list[str], template: str, offsets: np.ndarray | None) -> np.ndarray:
        bad = [n for n in class_names if "\n" in n]
        if bad:
            raise ClientError(f"class name(s) {bad[:3]} contain a line break; use one-line class names", unbilled=True)
        groups = groups_of(len(class_names), self.config.group_size)
        before = self.problems.copy()
        jobs = [(uri, g) for uri in prepared for g in groups]
        rows = self._wire.map(lambda job: self._ask(job[0], [class_names[c] for c in job[1]], template), jobs)
        out = np.zeros((len(prepared), len(class_names)), np.float32)
        for (i, g), lp in zip(((i, g) for i in range(len(prepared)) for g in groups), rows):
            out[i, g] = lp if len(groups) == 1 else lp - lp[0]  # shared reference: log p(c) - log p(ref)
        new = {p: self.problems[p] - before[p] for p in PROBLEMS}
        if any(new.values()):
            logger.warning("chat answers scored uniform: %s of %d requests", ", ".join(f"{v} {k}" for k, v in new.items() if v), len(jobs))
        return out[None]

    def _ask(self, uri: str, options: list[str], template: str) -> np.ndarray:
        """Log-probabilities [k] over one group's options for one image."""
        question = build_question(template, options)
        messages = [{"role": "user", "content": [{"type": "text", "text": question},
                                                  {"type": "image_url", "image_url": {"url": uri}}]}]
        if self.config.samples == 0:
            answer = self._create(messages, question, 1, logprobs=True, top_logprobs=TOP_LOGPROBS, temperature=0)
            return self._from_logprobs(answer, len(options))
        counts, answered = np.zeros(len(options)), 0
        for _ in range(self.config.samples):  # endpoints that ignore n answer one choice per request
            answer = self._create(messages, question, self.config.samples - answered, temperature=1)
            choices = answer.get("choices") or []
            for choice in choices:
                letter = self._letter(choice)
                if letter is not None and LETTERS.index(letter) < len(options):
                    counts[LETTERS.index(letter)] += 1
            answered += max(1, len(choices))
            if answered >= self.config.samples:
                break
        probs = (counts + self.config.alpha) / (counts.sum() + self.config.alpha * len(options))
        return np.log(probs)

    def _create(self, messages: list[dict[str, Any]], question: str, n: int, **params: Any) -> dict[str, Any]:
        """One chat completion (``max_tokens=1``), its usage counted; the answer as a dict."""
        def send(headers: dict[str, str]) -> Any:
            return self._wire.openai.chat.completions.create(
                model=self.model, messages=messages, max_tokens=1, n=n, extra_headers=headers, **params)

        bound = attempt_bound(texts=[question], images=1, image_tokens=self.config.image_tokens, output_tokens=n,
                              overhead=TEMPLATE_TOKENS)
        answer = self._wire.call("chat completion", bound, send).model_dump()
        tokens = usage_tokens(answer) or (text_tokens(question) + self.config.image_tokens, n)
        self.usage.add(input_tokens=tokens[0], output_tokens=tokens[1])
        return answer

    def _letter(self, choice: dict[str, Any]) -> str | None:
        """The answer letter of a sampled choice, or None (counted as a problem)."""
        problem = _problem(choice)
        letter = None if problem else answer_letter((choice.get("message") or {}).get("content"))
        if problem or letter is None:
            self._count(problem or "unparseable")
        return letter

    def _from_logprobs(self, answer: dict[str, Any], k: int) -> np.ndarray:
        choices = answer.get("choices") or []
        choice = choices[0] if choices else {}
        problem = "unparseable" if not choices else _problem(choice)
        if problem:
            self._count(problem)
            return np.full(k, -math.log(k))
        content = ((choice.get("logprobs") or {}).get("content")) or []
        if not content or not content[0].get("top_logprobs"):
            raise ClientError("the endpoint answered without top_logprobs; use sampled answers instead "
                              "(samples=N, or &samples=N in the chat+ model string)")
        probs = _option_probs(content[0]["top_logprobs"], k)
        if probs is None:
            self._count("unparseable")
            return np.full(k, -math.log(k))
        return np.log(probs)

    def _count(self, problem: str) -> None:
        with self._lock:
            self.problems[problem] += 1

    # ------------------------------------------------------------------ cost

    def estimate_usage(self, n_images: int, class_names: Sequence[str], template: str = DEFAULT_TEMPLATE,
                       n_prompts: int = 1) -> ProviderUsage:
        """What ``n_prompts`` predictions over ``n_images`` images would bill, before sending anything.

        Rule: one request (one image) per image, group and prompt; input tokens by the token rule of
        :mod:`~craft_sdk.client.hosted` (question text + ``image_tokens``); output tokens 1 per request
        (logprobs) or ``samples`` per request (sampled; an endpoint that ignores ``n`` needs ``samples``
        requests instead, each billing the input again).
        """
        names = list(class_names)
        groups = groups_of(len(names), self.config.group_size)
        per_image = sum(text_tokens(build_question(template, [names[c] for c in g])) + self.config.image_tokens for g in groups)
        requests = n_prompts * n_images * len(groups)
        return ProviderUsage(requests, requests, n_prompts * n_images * per_image, requests * max(1, self.config.samples))

    def close(self) -> None:
        """Stop the request threads and close the connections."""
        self._wire.close()

    def __enter__(self) -> ChatVLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _problem(choice: dict[str, Any]) -> str | None:
    if choice.get("finish_reason") == "content_filter":
        return "filtered"
    if (choice.get("message") or {}).get("refusal"):
        return "refused"
    return None


def _option_probs(top: list[dict[str, Any]], k: int) -> np.ndarray | None:
    """Probabilities [k] of the options from an answer token's ``top_logprobs`` (module docstring's rule)."""
    listed = np.zeros(k)
    seen = np.zeros(k, bool)
    for item in top:
        token, lp = str(item.get("token", "")).strip().rstrip(".):"), item.get("logprob")
        if len(token) == 1 and token in LETTERS[:k] and isinstance(lp, (int, float)) and math.isfinite(lp):
            listed[LETTERS.index(token)] += math.exp(lp)
            seen[LETTERS.index(token)] = True
    if not seen.any():
        return None
    if not seen.all():
        total = sum(math.exp(i["logprob"]) for i in top if isinstance(i.get("logprob"), (int, float)) and math.isfinite(i["logprob"]))
        share = max(1.0 - total, 0.0) / (~seen).sum()
        listed[~seen] = max(min(share, listed[seen].min()), 1e-6)
    return listed / listed.sum()


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _int_option(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
