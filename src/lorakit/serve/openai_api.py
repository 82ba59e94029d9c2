"""The OpenAI API on the engine: a request's body becomes sequences for the engine, and their events become
OpenAI's response (one JSON body, or server-sent events when streaming)."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from lorakit.adapter_folder import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, inspect_adapter
from lorakit.errors import AdapterLoadError, LoraKitError

from .detokenize import TokenLogprob
from .engine import Engine, Output, Sequence
from .metrics import ServerMetrics
from .registry import AdapterBusyError, AdapterPathError, UnknownAdapterError
from .sampling import SamplingParams
from .schemas import APIError, ChatCompletionRequest, CompletionRequest, message_text

MAX_STOP = 4
MAX_SEQUENCES_PER_REQUEST = 64  # prompts x n
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, 100 all but forces it


def _refuse_unsupported(**asks: bool) -> None:
    """A 400 naming the first OpenAI parameter whose value asks for something lorakit serve does not do.

    Each flag says whether the request's value really asks for it: a value that changes nothing (logprobs
    null, echo false, response_format text) is accepted, so clients that send defaults keep working.
    """
    for param, asked in asks.items():
        if asked:
            what = "Tool calling is" if param in ("tools", "tool_choice", "functions", "function_call") \
                else f"'{param}' is"
            raise APIError(400, f"{what} not supported by lorakit serve; leave '{param}' unset.", param=param,
                           code="unsupported_parameter")


def _refuse_response_format(req) -> None:
    kind = req.response_format.type if req.response_format is not None else "text"
    if kind != "text":
        raise APIError(400, f"response_format type '{kind}' is not supported by lorakit serve: it cannot constrain "
                       "the output to JSON. Leave response_format unset (or type 'text'), ask for JSON in the "
                       "prompt, and parse the text yourself.", param="response_format",
                       code="unsupported_parameter")


def _adapter_api_error(exc: BaseException) -> Optional[APIError]:
    """The client-facing error for an adapter problem, whether submit raised it or it ended a queued
    sequence; None for anything else."""
    if isinstance(exc, UnknownAdapterError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, AdapterPathError):
        return APIError(403, str(exc), param="lora_path", code="adapter_path_not_allowed")
    if isinstance(exc, AdapterBusyError):
        return APIError(503, str(exc), "server_busy", code="adapters_busy")
    if isinstance(exc, AdapterLoadError):
        return APIError(400, str(exc), code="adapter_error")
    return None


def _sequence_error(exc: BaseException) -> APIError:
    """What a client sees for a sequence that ended with an error."""
    return _adapter_api_error(exc) or APIError(500, f"Generation failed: {exc}", "server_error")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Results:
    """Collects Output events from the engine thread into this event loop, tagged with the choice index."""

    def __init__(self, count: int):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = count

    def sink(self, index: int):
        def put(out: Output) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
        return put

    async def __aiter__(self) -> AsyncIterator[tuple[int, Output]]:
        while self.pending:
            index, out = await self.queue.get()
            if out.finish_reason is not None:
                self.pending -= 1
            yield index, out


class OpenAIAPI:
    def __init__(self, engine: Engine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics
        self.tokenizer = copy.deepcopy(engine.tokenizer)  # the engine thread decodes with its own copy
        self.max_len = engine.config.max_model_len
        self.created = int(time.time())
        self._summaries: dict = {}  # adapter path -> (file times, summary) for the model cards

    # -- models ---------------------------------------------------------------------------------------
    def model_cards(self) -> list[dict]:
        engine = self.engine
        cards = [{"id": engine.base_name, "object": "model", "created": self.created, "owned_by": "lorakit",
                  "root": engine.base_name, "parent": None, "max_model_len": self.max_len}]
        resident = set(engine.registry.resident())
        for info in engine.registry.list():
            card = {"id": info.name, "object": "model", "created": info.created, "owned_by": "lorakit",
                    "root": str(info.path), "parent": engine.base_name,
                    "status": "loaded" if info.name in resident else "available"}
            if info.load_error is not None:  # requests for it fail until its files are fixed
                card["status"], card["error"] = "error", info.load_error
            card["lorakit"] = {"source": info.source, **self._adapter_summary(info.path)}
            cards.append(card)
        return cards

    def _adapter_summary(self, path) -> dict:
        """Rank, targets and size of the adapter in `path` (for the playground's adapter list); read once per
        version of its files: /v1/models is polled, and inspecting sums the folder's sizes."""
        try:
            stamp = tuple((path / name).stat().st_mtime_ns if (path / name).exists() else 0
                          for name in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME))
        except OSError as exc:
            return {"error": f"{path} cannot be read: {exc}"}
        cached = self._summaries.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            info = inspect_adapter(path)
            summary = {"rank": info["r"], "alpha": info["lora_alpha"], "targets": info["target_modules"],
                       "use_dora": bool(info["use_dora"]), "parameters": info["parameters"],
                       "weights_bytes": info["weights_bytes"], "base_model": info["base_model_name_or_path"]}
        except (LoraKitError, OSError) as exc:  # a damaged folder is listed with what is wrong with it
            summary = {"error": str(exc)}
        self._summaries[path] = (stamp, summary)
        return summary

    def adapter_for(self, model: str) -> Optional[str]:
        if model == self.engine.base_name:
            return None
        if not self.engine.registry.exists(model):
            names = ", ".join(self.engine.registry.available())
            raise APIError(404, f"The model '{model}' does not exist. Available models: {names}.",
                           param="model", code="model_not_found")
        return model

    async def engine_call(self, fn):
        """Run fn on the engine thread; map lorakit errors to HTTP errors."""
        return await self.wait(self.engine.call(fn))

    async def wait(self, future):
        try:
            return await asyncio.wrap_future(future)
        except (LoraKitError, ValueError, FileNotFoundError) as exc:
            raise (_adapter_api_error(exc) or APIError(400, str(exc), code="adapter_error")) from None

    # -- request parsing ------------------------------------------------------------------------------
    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = len(self.tokenizer)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is out of range for this model (0..{vocab - 1}).",
                           param="prompt", code="invalid_value")
        return ids

    def _prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            prompts = [self.tokenizer(p)["input_ids"]]
        elif p and isinstance(p[0], str):
            prompts = [self.tokenizer(s)["input_ids"] for s in p]
        elif p and isinstance(p[0], list):
            prompts = [self._check_ids(ids) for ids in p]
        else:
            prompts = [self._check_ids(list(p))]
        if not prompts or any(len(ids) == 0 for ids in prompts):
            raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        return prompts

    def _prompt_texts(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """What echo repeats: the prompt strings as sent; prompts sent as token ids, decoded."""
        if isinstance(req.prompt, str):
            return [req.prompt]
        if isinstance(req.prompt[0], str):
            return list(req.prompt)
        return [self.tokenizer.decode(ids) for ids in prompts]

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "This base model's tokenizer has no chat template; use /v1/completions.",
                           param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m)}
                    for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises for conversations the template rejects
            raise APIError(400, f"The chat template rejected these messages: {exc}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _logit_bias(self, bias: Optional[dict[str, float]]) -> dict[int, float]:
        vocab = len(self.tokenizer)
        checked: dict[int, float] = {}
        for key, value in (bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if not 0 <= token < vocab:
                raise APIError(400, f"'logit_bias' key {key!r} is not a token id of this model: use token ids "
                               f"0..{vocab - 1} written as strings.", param="logit_bias", code="invalid_value")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise APIError(400, f"'logit_bias' value {value} for token {key} is out of range: use "
                               f"{-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}.", param="logit_bias",
                               code="invalid_value")
            checked[token] = value
        return checked

    def _params(self, req, prompt_lens: list[int], max_tokens: Optional[int], what: str,
                logprobs: Optional[int] = None, echo: bool = False) -> list[SamplingParams]:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(400, f"'stop' takes up to {MAX_STOP} non-empty strings.", param="stop",
                           code="invalid_value")
        longest = max(prompt_lens)
        if longest >= self.max_len:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens, but the "
                           f"{what} has {longest} tokens. Shorten the {what}.", param=what,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = self.max_len - longest
        if max_tokens < (0 if echo else 1):  # with echo, 0 asks for the prompt (and its log probabilities) only
            raise APIError(400, f"'max_tokens' must be at least {0 if echo else 1}, got {max_tokens}.",
                           param="max_tokens", code="invalid_value")
        if longest + max_tokens > self.max_len:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens. However, you "
                           f"requested {longest + max_tokens} tokens ({longest} in the {what}, {max_tokens} in "
                           f"the completion). Reduce the {what} or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        logit_bias = self._logit_bias(req.logit_bias)
        n = req.n or 1
        return [SamplingParams(max_tokens=max_tokens,
                               temperature=1.0 if req.temperature is None else req.temperature,
                               top_p=1.0 if req.top_p is None else req.top_p, stop=tuple(stop),
                               seed=None if req.seed is None else req.seed + i, ignore_eos=req.ignore_eos,
                               logit_bias=logit_bias, top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0,
                               presence_penalty=req.presence_penalty or 0.0,
                               frequency_penalty=req.frequency_penalty or 0.0,
                               repetition_penalty=req.repetition_penalty or 1.0, logprobs=logprobs,
                               prompt_logprobs=logprobs if echo else None)
                for i in range(n)]

    # -- endpoints ------------------------------------------------------------------------------------
    async def completions(self, request: Request, req: CompletionRequest):
        _refuse_unsupported(suffix=bool(req.suffix),
                            best_of=req.best_of is not None and req.best_of != (req.n or 1))
        _refuse_response_format(req)
        adapter = await asyncio.to_thread(self.adapter_for, req.model)
        prompts = self._prompts(req)
        params = self._params(req, [len(p) for p in prompts], req.max_tokens, "prompt", req.logprobs, bool(req.echo))
        jobs = [(ids, p) for ids in prompts for p in params]
        echoes = [text for text in self._prompt_texts(req, prompts) for _ in params] if req.echo else None
        if len(jobs) > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(400, f"This request asks for {len(jobs)} completions (prompts x n); the limit is "
                           f"{MAX_SEQUENCES_PER_REQUEST}. Split it into several requests.", param="prompt",
                           code="invalid_value")
        # Every prompt counts once, however many choices (n) it gets; equal prompts each count.
        return await self._run(request, req, adapter, jobs, sum(len(ids) for ids in prompts), chat=False,
                               echoes=echoes)

    async def chat(self, request: Request, req: ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs",
                           code="invalid_value")
        _refuse_unsupported(tools=bool(req.tools),
                            functions=bool(req.functions),
                            tool_choice=req.tool_choice not in (None, "none", "auto"),
                            function_call=req.function_call not in (None, "none", "auto"),
                            audio=req.audio is not None)
        _refuse_response_format(req)
        adapter = await asyncio.to_thread(self.adapter_for, req.model)
        ids = self._chat_prompt(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self._params(req, [len(ids)], max_tokens, "messages",
                              (req.top_logprobs or 0) if req.logprobs else None)
        return await self._run(request, req, adapter, [(ids, p) for p in params], len(ids), chat=True)

    async def _run(self, request: Request, req, adapter: Optional[str], jobs, prompt_tokens: int, chat: bool,
                   echoes: Optional[list[str]] = None):
        results = _Results(len(jobs))
        seqs = [Sequence(ids, adapter, params, results.sink(i)) for i, (ids, params) in enumerate(jobs)]
        await self.wait(self.engine.submit(seqs))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(results, seqs, rid, req.model, chat, usage, prompt_tokens, echoes),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, results, seqs, rid, req.model, chat, prompt_tokens, echoes)

    async def _collect(self, request, results: _Results, seqs, rid, model, chat, prompt_tokens, echoes=None):
        watcher = asyncio.create_task(_cancel_on_disconnect(request, seqs))
        texts = [[echoes[i]] if echoes else [] for i in range(len(seqs))]
        logprobs: list[list[TokenLogprob]] = [[] for _ in seqs]
        finals: dict[int, Output] = {}
        try:
            async for index, out in results:
                if out.error is not None:
                    raise _sequence_error(out.error)
                texts[index].append(out.text)
                logprobs[index].extend(out.prompt_logprobs + out.logprobs)
                if out.finish_reason is not None:
                    finals[index] = out
        finally:
            watcher.cancel()
            for seq in seqs:
                seq.cancel()
        choices = []
        for i in range(len(seqs)):
            text = "".join(texts[i])
            choice = {"index": i, "logprobs": _logprobs_body(seqs[i], logprobs[i], chat),
                      "finish_reason": finals[i].finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        completion_tokens = sum(o.completion_tokens for o in finals.values())
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model, "system_fingerprint": None, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def _stream(self, results: _Results, seqs, rid, model, chat, include_usage, prompt_tokens, echoes=None):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, usage=None) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return _sse(body)

        completion_tokens = 0
        pending: dict[int, list[TokenLogprob]] = {}  # log probabilities of tokens whose text is held back
        offsets = [0] * len(seqs)  # completions: where each choice's next token starts in its text
        echoed: set[int] = set()
        try:
            if chat:
                for i in range(len(seqs)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            async for index, out in results:
                if out.error is not None:  # the status line (200) is sent already: the error is an event
                    yield _sse(_sequence_error(out.error).body())
                    break
                if out.finish_reason is not None:
                    completion_tokens += out.completion_tokens
                if echoes and index not in echoed:  # the prompt first, with its log probabilities if asked
                    echoed.add(index)
                    yield chunk([{"index": index, "text": echoes[index],
                                  "logprobs": _logprobs_body(seqs[index], out.prompt_logprobs, chat),
                                  "finish_reason": None}])
                    offsets[index] += sum(len(e.token) for e in out.prompt_logprobs)
                pending.setdefault(index, []).extend(out.logprobs)
                if not out.text and out.finish_reason is None:
                    continue
                entries = pending.pop(index)
                logprobs = _logprobs_body(seqs[index], entries, chat, offsets[index])
                offsets[index] += sum(len(e.token) for e in entries)
                if chat:
                    delta = {"content": out.text} if out.text else {}
                    if out.text and out.finish_reason is not None:  # text first, then the closing chunk
                        yield chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
                        delta, logprobs = {}, None
                    yield chunk([{"index": index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": out.finish_reason}])
                else:
                    yield chunk([{"index": index, "text": out.text, "logprobs": logprobs,
                                  "finish_reason": out.finish_reason}])
            else:
                if include_usage:
                    yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens})
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects and the response task is cancelled
            for seq in seqs:
                seq.cancel()
            self.engine.wake()


def _logprobs_body(seq: Sequence, entries: list[TokenLogprob], chat: bool, start: int = 0) -> Optional[dict]:
    """OpenAI's `logprobs` object of a choice (or of one streamed chunk, whose first token starts at `start` in
    the completion's text); None when it was not asked for."""
    if seq.params.logprobs is None:
        return None
    if chat:
        def one(e: TokenLogprob) -> dict:
            return {"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes)}

        return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.top]} for e in entries], "refusal": None}
    offsets, at = [], start  # the legacy format gives each token's start in the completion's text
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            # a prompt's first token has no log probability, and no alternatives (null, as OpenAI gives it)
            "top_logprobs": [None if e.logprob is None else {t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": offsets}


async def _cancel_on_disconnect(request: Request, seqs: list[Sequence]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for seq in seqs:
                seq.cancel()
            return
