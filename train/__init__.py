"""Training on DeepSpeed for every model of the project (docs/training.md; adding a model kind: docs/architecture.md).

    config.py        run config dataclasses (generic sections), YAML/JSON + key=value overrides
    registry.py      model kind -> Task + one-line help (the CLI is built from it)
    ds_config.py     shipped ZeRO JSON (configs/) filled from the run config
    distributed.py   process group: alone, or under torchrun / deepspeed
    data.py          image data library (folders, `datasets`, ShapeWorld); resumable per-rank sampler
    tasks.py         the Task hooks a model kind implements (encoder_task.py, tokenizer_task.py)
    optim.py         AdamW over named parameter groups (own lrs), warm-up + cosine/constant schedule
    ema.py           EMA of the trainable weights (sharded under ZeRO-3)
    checkpointing.py atomic multi-rank checkpoints, resume
    export.py        consolidated weights -> the inference folder
    metrics_log.py   JSON-lines metrics, optional TensorBoard
    engine.py        the loop
    cli.py           `uniflow train KIND`
"""
