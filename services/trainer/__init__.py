"""pairloop's DPO trainer: a Celery worker that turns an iteration's preference pairs into weights.

Start a worker (Redis from PAIRLOOP_REDIS_URL, job paths confined to the model store):

    PAIRLOOP_TRAINER_MODEL_STORE_ROOT=/models \\
        celery -A services.trainer.celery_app worker --without-gossip --without-mingle --without-heartbeat
    python -m services.trainer --model-store-root /models        # the same, with flags and --help

Send jobs with `pairloop.train_client.submit_train_job` (task `pairloop.train_dpo`, a
`pairloop.jobs.TrainJob`). Modules: `settings` (PAIRLOOP_TRAINER_*), `celery_app` (config),
`tasks` (the thin task), `runner` (one job end to end), `spec` (what a training process gets
and gives back), `data` (dataset checks and conversion), `dpo` (the TRL adapter), `publishing`
(validate + atomic publish), `launcher` and `launch_entry` (multi-GPU via `accelerate launch`,
one config per strategy in `accelerate/`), `sharding` (FSDP2 specifics inside the ranks:
the reference sharded per layer, the streamed save, per-rank reports, FSDP on CPU ranks),
`loading` (rank 0 reads the weights, the other ranks build empty models) and `join` (machines 1..N-1 of a
multi-machine job).
"""
