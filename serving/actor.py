"""The serving Ray actor: a thin shell over ServingEngine.

Calls carry plain JSON-safe dicts; records and weights travel as safetensors bytes through
Redis. The actor is threaded (max_concurrency) so that stats, health checks and queued requests
are answered while one request decodes; the engine serialises decoding itself.
"""

from __future__ import annotations

import logging
import queue
import threading

import ray

from serving.engine import ServingEngine
from serving.record_writer import AsyncRecordWriter
from tide.config import from_dict
from tide.transport.redis_transport import RedisAnswerStream, RedisRecordStream, RedisWeightChannel, connect

_DONE = object()


@ray.remote(max_concurrency=16)
class ServingActor:
    def __init__(self, cfg: dict, redis_url: str, replica: str):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        self.cfg = from_dict(cfg)
        client = connect(redis_url)
        prefix = self.cfg.redis.prefix
        writer = AsyncRecordWriter(RedisRecordStream(client, prefix, self.cfg.redis.stream_maxlen),
                                   max_pending=self.cfg.serving.record_queue)
        answers = RedisAnswerStream(client, prefix, self.cfg.redis.answers_maxlen)
        self.engine = ServingEngine.build(self.cfg, replica, writer, RedisWeightChannel(client, prefix), answers)
        self.engine.start_weight_poller()
        self.engine.start_answer_sync()

    def ready(self) -> dict:
        return {"replica": self.engine.replica, "draft_version": self.engine.version,
                "model": self.engine.target.model_id}

    def tokenize(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        return self.engine.encode(prompt, messages)

    def detokenize(self, tokens: list[int]) -> str:
        return self.engine.target.tokenizer.decode(tokens, skip_special_tokens=True)

    def generate(self, prompt_ids: list[int], params: dict, request_id: str | None = None) -> dict:
        result = self.engine.generate(prompt_ids, self.engine.decode_params(**params), request_id)
        result["text"] = self.detokenize(result["tokens"])
        return result

    def generate_stream(self, prompt_ids: list[int], params: dict, request_id: str | None = None):
        """Yields {"tokens": [...]} per verify pass, then the final result dict."""
        q: queue.Queue = queue.Queue()
        box = {}

        def work():
            try:
                box["result"] = self.engine.generate(prompt_ids, self.engine.decode_params(**params),
                                                     request_id, on_tokens=lambda t: q.put(list(t)))
            except Exception as e:  # surfaced to the caller below (Cancelled: nobody is listening)
                box["error"] = e
            q.put(_DONE)

        threading.Thread(target=work, daemon=True).start()
        while (item := q.get()) is not _DONE:
            yield {"tokens": item}
        if "error" in box:
            raise box["error"]
        result = box["result"]
        result["text"] = self.detokenize(result["tokens"])
        yield result

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    def stats(self) -> dict:
        return self.engine.stats()

    def poll_weights(self) -> bool:
        return self.engine.poll_weights()

    def max_context(self) -> int:
        return self.cfg.model.max_context
