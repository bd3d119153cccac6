from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from pxd.cost import Cost, count_gmacs, count_params, measure_cost, measure_latency


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_params_counted_by_hand() -> None:
    # conv 3·8·9 = 216, batch norm 8 + 8, linear 8·5 + 5 = 45
    assert count_params(_tiny_cnn()) == pytest.approx((216 + 16 + 45) / 1e6)


def test_conv_macs_counted_by_hand() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    assert count_gmacs(conv, 16) == pytest.approx(3 * 8 * 9 * 16 * 16 / 1e9)


def test_linear_macs_count_a_multiply_add_once() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 5))
    assert count_gmacs(model, 1, channels=10) == pytest.approx(50 / 1e9)


def test_network_macs_are_the_sum_of_conv_and_linear() -> None:
    assert count_gmacs(_tiny_cnn(), 16) == pytest.approx((3 * 8 * 9 * 16 * 16 + 8 * 5) / 1e9)


def test_attention_matmuls_are_counted() -> None:
    torch.manual_seed(0)
    dim, depth, classes = 192, 2, 10
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=depth, num_classes=classes
    )
    patches, tokens = 8 * 8, 8 * 8 + 1  # 32/4 = 8 per side, plus the class token
    patch_embed = patches * dim * 3 * 4 * 4
    linear = tokens * (dim * 3 * dim + dim * dim + dim * 4 * dim + 4 * dim * dim)  # qkv, proj, mlp
    attention = 2 * tokens * tokens * dim  # q·kᵀ and attn·v over all heads
    expected = patch_embed + depth * (linear + attention) + dim * classes
    assert count_gmacs(vit, 32) == pytest.approx(expected / 1e9)


def test_gmacs_of_a_timm_cnn_scale_with_pixels() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    ratio = count_gmacs(model, 64) / count_gmacs(model, 32)
    assert 3.9 < ratio <= 4.0  # convolutions ×4; only the classifier stays constant


def test_measure_cost_records_everything() -> None:
    model = _tiny_cnn()
    cost = measure_cost(model, 16, warmup=1, repeats=2, throughput_batch=3)
    assert isinstance(cost, Cost)
    assert cost.pixels == 16 * 16
    assert cost.gmacs == pytest.approx(count_gmacs(model, 16))
    assert cost.params_m == pytest.approx(count_params(model))
    assert cost.latency_ms > 0 and cost.throughput_ips > 0
    assert (cost.device, cost.dtype, cost.batch_size) == ("cpu", "float32", 3)
    assert cost.threads == torch.get_num_threads()
    assert (cost.warmup, cost.repeats) == (1, 2)
    assert cost.device_name
    as_dict = cost.to_dict()
    assert as_dict["pixels"] == 256 and set(as_dict) >= {"params_m", "gmacs", "latency_ms", "throughput_ips"}


def test_measurement_leaves_the_model_as_it_was() -> None:
    model = _tiny_cnn().train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_cost(model, 8, warmup=1, repeats=1, throughput_batch=2)
    assert model.training and not model[1].training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched


def test_figures_other_than_latency_are_deterministic() -> None:
    first = measure_cost(_tiny_cnn(), 8, warmup=0, repeats=1, throughput_batch=2)
    second = measure_cost(_tiny_cnn(), 8, warmup=0, repeats=1, throughput_batch=2)
    assert (first.params_m, first.gmacs, first.pixels) == (second.params_m, second.gmacs, second.pixels)


def test_bfloat16_latency_runs_under_autocast() -> None:
    timing = measure_latency(_tiny_cnn(), 8, dtype=torch.bfloat16, warmup=0, repeats=1, batch_size=2)
    assert timing["dtype"] == "bfloat16" and timing["latency_ms"] > 0
    assert timing["throughput_ips"] == pytest.approx(2 / (timing["latency_ms"] / 1e3))


def test_unsupported_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="dtype"):
        measure_latency(_tiny_cnn(), 8, dtype=torch.int8, warmup=0, repeats=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measurement_in_bf16() -> None:
    model = _tiny_cnn()
    cost = measure_cost(model, 16, device="cuda", dtype=torch.bfloat16, warmup=1, repeats=2, throughput_batch=4)
    assert cost.device.startswith("cuda") and cost.dtype == "bfloat16"
    assert cost.latency_ms > 0 and cost.throughput_ips > 0
    assert next(model.parameters()).device.type == "cpu"  # the caller's model did not move
