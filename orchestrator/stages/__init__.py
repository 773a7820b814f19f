"""The loop's stages, one module each, run in this order by `orchestrator.loop`:

    evaluate.run_base   policy0.evaluate
    generate.run        iter{k}.generate
    rank.run            iter{k}.rank
    pairs.run           iter{k}.pairs
    placement.release   iter{k}.release   (placement: time_shared)
    train.run           iter{k}.train
    swap.run            iter{k}.swap      (placement: dedicated)
    placement.wake      iter{k}.wake      (placement: time_shared; the wake is the swap)
    evaluate.run        iter{k}.evaluate
    report.run          report

Each `run(ctx, ...)` takes the run's `RunContext` and returns the stage's metrics for the manifest.
"""
