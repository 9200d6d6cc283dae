"""Helpers of the calibration tests: the tiny SD pipeline with a calibration config."""

from tiny_pipelines import build


def tiny_sd_calib(steps: int = 4, samples: int = 2, **overrides):
    """The tiny SD pipeline and a CalibConfig that runs it on prompt embeddings (no tokenizer)."""
    from dq import CalibConfig

    pipe, kw = build("sd")
    kw = {k: v for k, v in kw.items() if k not in ("num_inference_steps", "output_type")}
    cfg = CalibConfig(prompts=["p"] * samples, steps=steps, samples=samples, batch_size=samples, pipeline_kwargs=kw, **overrides)
    return pipe, cfg
