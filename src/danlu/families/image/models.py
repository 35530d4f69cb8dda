"""Image models in pure torch (no torchvision): the tutorial's CNN, a small ResNet for 28-64 px images, or
the user's own module; each behind `ImageModel`, which takes uint8 pixels and normalizes inside."""

from __future__ import annotations

import torch
from torch import nn

from danlu.config import ModelConfig
from danlu.errors import DanluError
from danlu.families.image.state import ImageState
from danlu.models.custom import build_custom


class ImageModel(nn.Module):
    """uint8 images [n, c, h, w] -> float in [0, 1] -> per-channel standardization -> the network.

    Normalizing inside the model means training, the server and every export take the same raw pixels.
    The mean and std are buffers outside the state dict (they come from preprocess.json)."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std
        # channels_last: the layout oneDNN and cuDNN convolutions run fastest in
        return self.net(x.contiguous(memory_format=torch.channels_last))


class ProbeModel(ImageModel):
    """A linear probe (probe.ProbeNet behind the pixel normalization): uint8 images [n, c, h, w] through
    the frozen tower and the head, or (training, from the cache) the tower's features [n, dim] through
    the head alone. Batches reach a model positionally (run_model): the rank tells the two apart."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 2:
            return self.net.head(images)
        return super().forward(images)


def build_probe(config: ModelConfig, state: ImageState) -> nn.Module:
    """Training: the tower's weights from model.pretrained (unchanged since the run began). A finished
    run: the tower's architecture from preprocess.json, every weight from model.safetensors after."""
    from danlu.families.image import probe

    info = state.tower
    if state.run_dir is not None:
        tower = probe.tower_from_config(info)
    else:
        if config.pretrained is None:
            raise DanluError(
                "this run trained a linear probe: it needs model.pretrained", "set it as the run did"
            )
        tower, _ = probe.pretrained_tower(config.pretrained, info)
    net = probe.ProbeNet(tower, info["dimensions"], state.n_outputs)
    return ProbeModel(net, state.mean, state.std)


def build_cnn(config: ModelConfig, state: ImageState) -> nn.Module:
    """The PyTorch MNIST example's network: conv 32 -> conv 64 -> max-pool -> dropout -> dense 128 -> classes
    (widths from model.channels and model.hidden)."""
    channels = config.channels or [32, 64]
    hidden = config.hidden if config.hidden is not None else [128]
    layers: list[nn.Module] = []
    width, h, w = state.channels, state.height, state.width
    for out in channels:
        layers += [nn.Conv2d(width, out, 3), nn.ReLU()]
        width, h, w = out, h - 2, w - 2
    if h < 2 or w < 2:
        raise DanluError(
            f"{state.width}x{state.height} images are too small for {len(channels)} conv layers",
            "use fewer model.channels",
        )
    layers += [nn.MaxPool2d(2), nn.Dropout(0.25 if config.dropout is None else config.dropout), nn.Flatten()]
    features = width * (h // 2) * (w // 2)
    for size in hidden:
        layers += [
            nn.Linear(features, size),
            nn.ReLU(),
            nn.Dropout(0.5 if config.dropout is None else config.dropout),
        ]
        features = size
    layers.append(nn.Linear(features, state.n_outputs))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(inplace=True),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and inputs == outputs
            else nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.skip(x))


def build_resnet(config: ModelConfig, state: ImageState) -> nn.Module:
    """A small ResNet for 28-64 px images: a 3x3 stem, one stage of two basic blocks per width in
    model.channels (default 32, 64, 128; each later stage halves the resolution), global pooling, linear."""
    widths = config.channels or [32, 64, 128]
    layers: list[nn.Module] = [
        nn.Conv2d(state.channels, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    width = widths[0]
    for i, out in enumerate(widths):
        layers += [BasicBlock(width, out, 1 if i == 0 else 2), BasicBlock(out, out, 1)]
        width = out
    dropout = 0.0 if config.dropout is None else config.dropout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, state.n_outputs)]
    return nn.Sequential(*layers)


MODELS = {"cnn": build_cnn, "resnet": build_resnet}


def build_model(config: ModelConfig, state: ImageState) -> nn.Module:
    """The configured network behind ImageModel; a user's class (model.target) is built as
    Class(in_channels, out_features, image_size=(h, w), **kwargs) and gets normalized float images."""
    if state.tower is not None:
        return build_probe(config, state)
    if config.target is not None:
        net = build_custom(
            config, in_channels=state.channels, out_features=state.n_outputs, image_size=state.size
        )
    else:
        net = MODELS["cnn" if config.type == "auto" else config.type](config, state)
    return ImageModel(net, state.mean, state.std).to(memory_format=torch.channels_last)
