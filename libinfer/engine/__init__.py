"""The engine: `sequence.py` (one running candidate: tokens, storage, RNG, stop rules),
`scheduler.py` (who runs next over the KV slots), `kv_cache.py` (slots + the shared prefix
pool). The step loop that ties them to the model runner is `generator._Call`."""

BLOCK = 16          # tokens per prefix block: a segment is a whole number of blocks (here: importable without torch)
