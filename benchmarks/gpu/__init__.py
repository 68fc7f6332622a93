"""FLUX.1 at full size on one GPU: what the product's jobs cost in time and memory.

    python -m benchmarks.gpu --out-dir DIR [--budget-s 450]  # on the GPU machine: docs/gpu.md
    python -m benchmarks.gpu --out-dir DIR --small           # tiny configs on the CPU (CI)

Builds FLUX.1-schnell and FLUX.1-dev at their published sizes (``models``) with random
weights, straight on the GPU in bf16: no hub, no weights. Random weights cost what trained
ones cost; the images are noise. Then, one module per part, in this order:
  latency        schnell (4 steps): seconds per image and peak memory at 512, 768, 1024 px,
                 batch 1-8, through the worker's own generate call;
  refiner_speed  the default refiner (unet-cbam) at 1024 px, batch 1-16: ms per image,
                 eager and with channels_last and torch.compile (the <= 15 ms goal);
  batching       how far an image made in a batch differs from the same job run alone;
  saving         dev (28 steps) against schnell + refiner in wall time, beside the FLOPs
                 saving (benchmarks/results/refiner_cost.json);
  system         system/direct through a real local stack (redis-server, S3 server, a worker
                 process loading the same model from disk); skipped at once, with its
                 reason, where a package is missing or it cannot fit in what is left.
The budget counts from the process's start (imports included); what does not fit is
skipped and says so, and a watchdog stops the run at the budget whatever it is doing
(``record``). The run sets the hub offline itself (``run``). DIR receives gpu.json
(rewritten after every row, the versions first), gpu.log and the system part's worker.log.
"""
