"""CIFAR ResNets (SPEC section 2) and self-describing checkpoints."""
import pytest
import torch
import torch.nn as nn

from models import build_model, get_network
from utils.args import DATASETS, build_parser, validate_args
from utils.checkpoint import load_weights, model_from_checkpoint, read_checkpoint, save_checkpoint
from utils.errors import UserError

INFO = DATASETS["cifar10"]


def net(name="resnet18", width=8, maxpool=True, num_classes=10):
    torch.manual_seed(0)
    return build_model(name, num_classes, INFO.mean, INFO.std, width, maxpool)


def batch(n=4, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,expansion", [("resnet18", 1), ("resnet34", 1), ("resnet50", 4)])
@pytest.mark.parametrize("maxpool", [True, False])
def test_output_and_feature_shapes(name, expansion, maxpool):
    model = net(name, maxpool=maxpool).eval()
    x = batch(3)
    with torch.no_grad():
        logits, feats = model(x), model.features(x)
    assert logits.shape == (3, 10)
    assert feats.shape == (3, 8 * 8 * expansion) == (3, model.feature_dim)
    assert torch.allclose(model.linear(feats), logits, atol=1e-6), "features are the penultimate output"


@pytest.mark.parametrize("maxpool,stage_sizes", [(True, [16, 8, 4, 2]), (False, [32, 16, 8, 4])])
def test_maxpool_variant(maxpool, stage_sizes):
    model = net(maxpool=maxpool).eval()
    assert isinstance(model.maxpool, nn.MaxPool2d if maxpool else nn.Identity)
    sizes = []
    hooks = [getattr(model, f"layer{i}").register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
             for i in range(1, 5)]
    with torch.no_grad():
        model(batch(2))
    for h in hooks:
        h.remove()
    assert sizes == stage_sizes
    # the max-pool has no weights: both variants share their parameter names and shapes
    other = net(maxpool=not maxpool)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in other.state_dict().items()}


def test_width_scales_channels_and_head_can_be_dropped():
    assert net(width=16).feature_dim == 128
    headless = net(num_classes=0).eval()
    with torch.no_grad():
        assert headless(batch(2)).shape == (2, 64)


def test_normalisation_is_inside_the_model_and_not_saved():
    model = net()
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(INFO.mean))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(INFO.std))
    assert not any("normalize" in k for k in model.state_dict())


def _args(tmp_path, *flags):
    return validate_args(build_parser("test").parse_args(
        ["--dataset", "cifar10", "--width", "8", "--save_root", str(tmp_path), *flags]))


def _train_a_step(model):
    """Move weights and BatchNorm statistics away from their initial values."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(model(batch(8)), torch.arange(8) % 10)
    loss.backward()
    opt.step()
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_checkpoint_reloads_to_identical_outputs(tmp_path, name):
    args = _args(tmp_path, "--model", name)
    model = _train_a_step(get_network(args))
    path = tmp_path / "ckpt" / "3.tar"
    save_checkpoint(path, args, model, epoch=3)
    assert not list(path.parent.glob("*.tmp")), "written atomically"
    rebuilt, ckpt = model_from_checkpoint(path)
    rebuilt.eval()
    assert ckpt["epoch"] == 3 and ckpt["args"]["width"] == 8 and ckpt["args"]["model"] == name
    assert type(rebuilt) is type(model) and rebuilt.feature_dim == model.feature_dim
    x = batch(5)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
        assert torch.equal(rebuilt.features(x), model.features(x))


def test_checkpoint_into_another_width_is_a_user_error(tmp_path):
    args = _args(tmp_path)
    path = tmp_path / "0.tar"
    save_checkpoint(path, args, net(width=8), epoch=0)
    with pytest.raises(UserError, match="does not fit"):
        load_weights(net(width=16), read_checkpoint(path))


def test_unreadable_or_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "absent.tar")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        read_checkpoint(bad)


def test_subsampled_pointwise_conv_is_the_strided_one():
    """Same output and gradients as nn.Conv2d(k=1, stride 2), on odd and even sizes, any layout (the
    reference runs on NCHW input: its channels-last backward is the one that corrupts memory)."""
    from models.resnet import SubsampledPointwiseConv
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(8, 16, 1, 2, bias=False)
    sub = SubsampledPointwiseConv(8, 16, 1, 2, bias=False)
    sub.load_state_dict(ref.state_dict())
    for hw in (15, 16):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.rand(5, 8, hw, hw).contiguous(memory_format=layout).requires_grad_()
            y_ref, y_sub = ref(x.contiguous()), sub(x)
            assert torch.allclose(y_ref, y_sub, atol=1e-6)
            g_ref = torch.autograd.grad(y_ref.square().sum(), (x, ref.weight))
            g_sub = torch.autograd.grad(y_sub.square().sum(), (x, sub.weight))
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ref, g_sub))


def test_narrow_network_trains_an_odd_batch_with_two_threads():
    """The width-8 test network, channels-last, batch 75, 2 threads: the case that crashed torch's
    strided 1x1 convolution backward (see models/resnet.SubsampledPointwiseConv)."""
    import subprocess
    import sys
    code = ("import torch; from models import build_model; torch.set_num_threads(2);"
            "m = build_model('resnet18', 10, [0.5] * 3, [0.25] * 3, 8, True, False).to(memory_format=torch.channels_last);"
            "x = torch.rand(75, 3, 32, 32).contiguous(memory_format=torch.channels_last);"
            "[m(x).sum().backward() for _ in range(3)]; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-500:]
