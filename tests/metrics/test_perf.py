import torch
from torch import nn

from dq.metrics import StepTimer, measure_pipeline, peak_memory, timed_call, warm_up
from dq.sizes import module_bytes


class TinyDenoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.out = nn.Conv2d(8, 8, 1).to(torch.float16)
        self.register_buffer("packed", torch.zeros(8, 4, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(8, dtype=torch.bfloat16))

    def forward(self, sample: torch.Tensor, timestep: int = 0) -> torch.Tensor:
        return self.proj(sample)


def fake_pipeline(denoiser: nn.Module, steps: int):
    def run() -> torch.Tensor:
        sample = torch.randn(2, 8)
        for step in range(steps):
            sample = denoiser(sample, timestep=step)
        return sample

    return run


def test_step_timer_counts_and_times_forward_calls():
    denoiser = TinyDenoiser()
    with StepTimer(denoiser) as timer:
        fake_pipeline(denoiser, steps=5)()
    denoiser(torch.randn(1, 8))  # after exit: hooks are gone
    assert timer.calls == 5
    assert len(timer.durations()) == 5 and all(d >= 0 for d in timer.durations())
    assert not denoiser._forward_hooks and not denoiser._forward_pre_hooks
    timer.reset()
    assert timer.calls == 0


def test_weight_bytes_is_the_sum_of_tensor_bytes():
    denoiser = TinyDenoiser()
    expected = (8 * 8 + 8) * 4 + (8 * 8 + 8) * 2 + 8 * 4 * 1 + 8 * 2
    assert module_bytes(denoiser) == expected


def test_shared_tensors_are_counted_once():
    shared = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(shared, shared)
    assert module_bytes(model) == 4 * 4 * 4


def test_cpu_peak_memory_sees_an_allocation():
    with peak_memory("cpu") as peak:
        block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
        del block
    assert peak.source.startswith("process_peak_rss")
    assert peak.bytes > 64 * 2**20


def test_measure_pipeline_reports_medians_after_warmup():
    denoiser = TinyDenoiser()
    result = measure_pipeline(fake_pipeline(denoiser, steps=4), denoiser, images_per_call=2, warmup=1, repeats=3)
    assert result.steps_per_call == 4
    assert result.latency_per_step_s is not None and result.latency_per_step_s <= result.latency_per_image_s * 2
    assert result.weight_bytes == module_bytes(denoiser)
    assert result.peak_memory_bytes > 0 and result.device == "cpu"
    assert set(result.to_dict()) >= {"latency_per_image_s", "latency_per_step_s", "peak_memory_bytes"}


def test_timed_call_returns_the_output_with_its_timings_and_warm_up_runs_one_step():
    denoiser = TinyDenoiser()
    call = timed_call(fake_pipeline(denoiser, steps=3), denoiser, "cpu")
    assert call.output.shape == (2, 8) and call.denoiser_calls == 3
    assert 0 < sum(call.step_seconds) <= call.seconds and call.peak.bytes > 0
    seen = []
    warm_up(lambda **kwargs: seen.append(kwargs), prompt="p", num_inference_steps=20)
    assert seen == [{"prompt": "p", "num_inference_steps": 1}]
