"""Training on DeepSpeed for every model of the project (DESIGN.md section 5).

    config.py        run config dataclasses, YAML/JSON + key=value overrides
    ds_config.py     shipped ZeRO JSON (configs/) filled from the run config
    distributed.py   process group: alone, or under torchrun / deepspeed
    data.py          image folders, `datasets`, ShapeWorld; resumable per-rank sampler
    tasks.py         model kind -> Task registry (encoder_task.py, tokenizer_task.py)
    optim.py         AdamW over trainable weights, warm-up + cosine/constant schedule
    ema.py           EMA of the trainable weights (sharded under ZeRO-3)
    checkpointing.py atomic multi-rank checkpoints, resume
    export.py        consolidated weights -> the inference folder
    metrics_log.py   JSON-lines metrics, optional TensorBoard
    engine.py        the loop
    cli.py           `uniflow train {encoder,tokenizer}`
"""
