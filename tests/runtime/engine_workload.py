"""Drives an ``llmopt.Engine`` through a workload of requests arriving at given steps.

Shared by the engine tests (plain and speculative): request ``i`` is added at step
``arrivals[i][0]`` with prompt ``arrivals[i][1]``, and the engine steps until every
request has finished, its streamed tokens recorded.
"""


def run_with_arrivals(engine, arrivals, params):
    """Add request i at step arrivals[i]; step until all are done. Returns ``(ids,
    streamed)``: prompt index -> request id, request id -> ``[(token, finished), ...]``."""
    ids, streamed = {}, {}

    def record(rid, token, finished):
        streamed.setdefault(rid, []).append((token, finished))

    step = 0
    while len(ids) < len(arrivals) or engine.has_unfinished():
        for i, (at, prompt) in enumerate(arrivals):
            if at == step:
                ids[i] = engine.add_request(prompt, params[i], callback=record)
        engine.step()
        step += 1
        assert step < 500, "the engine made no progress"
    return ids, streamed
