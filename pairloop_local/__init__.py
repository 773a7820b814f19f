"""What runs pairloop on one machine and in tests, and that no service image needs.

- `processes`: start, watch and stop local service processes; free loopback ports.
- `redis_server`: the machine's Redis if one answers, else a private `redis-server`.
- `tiny_models`, `tiny_ranker`: tiny Llama/Mistral chat models and a tiny PairRM, built offline.

Nothing here is imported by `pairloop` (the contracts package) or by the generator and ranker.
"""
