"""CIFAR ResNets with a width multiplier (SPEC section 2).

``maxpool=True`` is the network of the original code behind the published numbers: 3x3 stride-1
stem, BN, ReLU and the 3x3 stride-2 max-pool of the ImageNet design (stages at 16, 8, 4, 2 px).
``maxpool=False`` is the usual CIFAR ResNet of supervised contrastive learning (D-ST encoder).
Inputs are float images in [0, 1]; the per-channel normalisation is the model's first step.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SubsampledPointwiseConv(nn.Conv2d):
    """A 1x1 stride-s convolution computed as x[..., ::s, ::s] then a 1x1 stride-1 convolution: the
    same function and parameters (state-dict keys and shapes unchanged).

    Used for shortcuts with fewer than 16 input channels: there, torch 2.14's CPU backward of the
    strided 1x1 convolution on channels-last input corrupts memory with 2 or more threads and an
    odd batch size (measured: segfault or 'double free' for 4 and 8 input channels at 16x16 and
    32x32, batch 3 to 255; 16 channels and more ran clean), which the width-8 test networks hit.
    """

    def forward(self, x):
        s = self.stride
        return F.conv2d(x[:, :, ::s[0], ::s[1]], self.weight, self.bias)


def shortcut_conv(in_planes, out_planes, stride):
    """The projection shortcut's 1x1 convolution (see SubsampledPointwiseConv)."""
    cls = SubsampledPointwiseConv if stride != 1 and in_planes < 16 else nn.Conv2d
    return cls(in_planes, out_planes, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(shortcut_conv(in_planes, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(shortcut_conv(in_planes, planes * 4, stride), nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes, mean, std, width=64, maxpool=True):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if maxpool else nn.Identity()
        self.in_planes = width
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, width * 2, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, width * 4, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, width * 8, num_blocks[3], 2)
        self.feature_dim = width * 8 * block.expansion
        self.linear = nn.Linear(self.feature_dim, num_classes) if num_classes else nn.Identity()

    def _make_layer(self, block, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def features(self, x):
        """Penultimate output: (B, 3, H, W) images in [0, 1] -> (B, feature_dim)."""
        out = self.maxpool(F.relu(self.bn1(self.conv1(self.normalize(x)))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x):
        return self.linear(self.features(x))


ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
         "resnet50": (Bottleneck, [3, 4, 6, 3])}


def cifar_resnet(name, num_classes, mean, std, width=64, maxpool=True):
    block, blocks = ARCHS[name]
    return ResNet(block, blocks, num_classes, mean, std, width, maxpool)


class ImageNetResNet18(nn.Module):
    """torchvision's ImageNet ResNet-18 (7x7 stem) with a features method and a 200-way head."""

    def __init__(self, num_classes, mean, std, width=64):
        super().__init__()
        import torchvision
        self.normalize = Normalize(mean, std)
        self.net = torchvision.models.resnet18(num_classes=num_classes, width_per_group=64)
        if width != 64:
            raise ValueError("the ImageNet ResNet-18 has no width multiplier")
        self.feature_dim = 512

    def features(self, x):
        n = self.net
        out = n.maxpool(n.relu(n.bn1(n.conv1(self.normalize(x)))))
        out = n.layer4(n.layer3(n.layer2(n.layer1(out))))
        return torch.flatten(n.avgpool(out), 1)

    def forward(self, x):
        return self.net.fc(self.features(x))
