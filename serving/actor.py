"""The serving Ray actor: a thin shell over ServingEngine.

Calls carry plain JSON-safe dicts; records and weights travel as safetensors bytes through
Redis. The actor is threaded: each request's call waits on its thread while the engine's batch
loop decodes it with the others, and stats and health checks are answered meanwhile (the
controller sizes max_concurrency to the batch and the queue).
"""

from __future__ import annotations

import logging
import queue
import threading

import ray

from serving.engine import ServingEngine
from serving.record_writer import AsyncRecordWriter
from tide.config import from_dict
from tide.malloc import bound_heap
from tide.transport.redis_transport import (
    RedisAnswerStream,
    RedisLoadBoard,
    RedisRecordStream,
    RedisWeightChannel,
    connect,
)

_DONE = object()


def text_deltas(arrivals, detokenize):
    """{"tokens": [...], "text": the new text} per arrival ((token lists, whether it is the last)),
    the text of all tokens so far decoded once per arrival; held back while a multi-byte
    character is incomplete, but for the last."""
    tokens: list[int] = []
    new: list[int] = []
    sent = ""
    for chunks, last in arrivals:
        for chunk in chunks:
            new += chunk
            tokens += chunk
        if new:
            text = detokenize(tokens)
            if last or not text.endswith("\ufffd"):
                yield {"tokens": new, "text": text[len(sent):]}
                new, sent = [], max(text, sent, key=len)


@ray.remote(max_concurrency=16)
class ServingActor:
    def __init__(self, cfg: dict, redis_url: str, replica: str, weights_key: str | None = None):
        """weights_key: hex of the key published drafts are signed with (None: unsigned)."""
        bound_heap(arenas=2)  # before the target loads: see tide/malloc.py
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        self.cfg = from_dict(cfg)
        client = connect(redis_url)
        rc = self.cfg.redis
        writer = AsyncRecordWriter(RedisRecordStream(client, rc.prefix, rc.records_mb << 20),
                                   max_pending=self.cfg.serving.record_queue)
        answers = RedisAnswerStream(client, rc.prefix, rc.answers_mb << 20)
        weights = RedisWeightChannel(client, rc.prefix, rc.keep_versions,
                                     bytes.fromhex(weights_key) if weights_key else None)
        self.engine = ServingEngine.build(self.cfg, replica, writer, weights, answers)
        self.engine.start_weight_poller()
        self.engine.start_answer_sync()
        self.engine.start_load_marks(RedisLoadBoard(client, rc.prefix))

    def ready(self) -> dict:
        return {"replica": self.engine.replica, "draft_version": self.engine.version,
                "model": self.engine.target.model_id,
                "vocab": self.engine.target.model.get_input_embeddings().num_embeddings}

    def tokenize(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        return self.engine.encode(prompt, messages)

    def detokenize(self, tokens: list[int]) -> str:
        return self.engine.target.tokenizer.decode(tokens, skip_special_tokens=True)

    def _stop_watch(self, stops: list[str], then=None):
        """An on_tokens callback that ends decoding once a stop string appears in the text (the
        HTTP front cuts the text there); `then` also gets every token batch."""
        tokens: list[int] = []
        tail = max((len(s) for s in stops), default=0) + 16  # tokens: each one is >= 1 character

        def watch(new: list[int]) -> bool:
            if then is not None:
                then(new)
            tokens.extend(new)
            text = self.detokenize(tokens[-(tail + len(new)):])
            return any(s in text for s in stops)

        return watch if stops or then is not None else None

    def generate(self, prompt_ids: list[int], params: dict, request_id: str | None = None) -> dict:
        params = dict(params)
        on_tokens = self._stop_watch(params.pop("stop", None) or [])
        result = self.engine.generate(prompt_ids, self.engine.decode_params(**params), request_id,
                                      on_tokens=on_tokens)
        result["text"] = self.detokenize(result["tokens"])
        return result

    def generate_stream(self, prompt_ids: list[int], params: dict, request_id: str | None = None):
        """Yields {"tokens": [...], "text": the new text} as verify passes finish (those that
        finished while the caller read the last one, together; text held back while a multi-byte
        character is incomplete), then the final result dict. Detokenized here, once per item:
        the HTTP front called detokenize on the replica for every item."""
        q: queue.Queue = queue.Queue()
        box = {}
        params = dict(params)
        on_tokens = self._stop_watch(params.pop("stop", None) or [], then=lambda t: q.put(list(t)))

        def work():
            try:
                box["result"] = self.engine.generate(prompt_ids, self.engine.decode_params(**params),
                                                     request_id, on_tokens=on_tokens)
            except Exception as e:  # surfaced to the caller below (Cancelled: nobody is listening)
                box["error"] = e
            q.put(_DONE)

        threading.Thread(target=work, daemon=True).start()

        def arrivals():  # what finished while the last item was read: one item, not one each
            while True:
                items = [q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                yield [i for i in items if i is not _DONE], _DONE in items
                if _DONE in items:
                    return

        yield from text_deltas(arrivals(), self.detokenize)
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
