"""Training: the one step, the one loop, and the checkpointed trainer.

`python -m tiered_routing.train` runs the train binary (`cli.train`).

Modules:
  steps           the one optimizer step (generic over an objective) and the
                  LM objective of pre-training.
  loop            the one training loop (batches through a step, hooks).
  trainer         a checkpointed pre-training run on the loop.
  train_state     the train state and its sharded layout.
  optimizers      AdamW / Adafactor, schedules, partition-wise clipping.
  checkpoints     Orbax checkpoints of the train state.
  restore         parameters of a MODEL_DIR onto the devices at hand.
  metrics_writer  TensorBoard, metrics.jsonl and the NaN / Inf guard.
  model_dir_lock  one job per MODEL_DIR.
  atomic_file     result files written whole or not at all.
"""
